"""Where a model runs and in which precision: `auto` resolved once, a device that is not there refused.

Every command that loads a model goes through these two functions, so `--device` and `--dtype`
mean the same everywhere.
"""

from __future__ import annotations

from pathlib import Path

import torch

from videollava.errors import VideoLlavaError


def cpu_supports_bf16() -> bool:
    """bf16 pays off only with AMX tiles; with AVX512-BF16 alone it measured slower than fp32 here."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags


def resolve_device(name: str | torch.device | None) -> torch.device:
    """`auto` is the first GPU when there is one, else the CPU; a GPU that is not there is refused by name."""
    if isinstance(name, torch.device):
        device = name
    elif name in (None, "auto"):
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except (RuntimeError, ValueError):
            raise VideoLlavaError(f"unknown device {name!r}; choose auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise VideoLlavaError(f"unsupported device {str(device)!r}; choose auto, cpu, cuda or cuda:N")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = 0 if device.index is None else device.index
    if index >= count:
        found = (
            "no CUDA device is available"
            if count == 0
            else f"this machine has {count} (cuda:0-cuda:{count - 1})"
        )
        raise VideoLlavaError(f"device {str(device)!r} was asked for, but {found}")
    return torch.device("cuda", index)


def resolve_dtype(name: str | torch.dtype | None, device: torch.device | str | None = None) -> torch.dtype:
    """`auto` is bf16 on a GPU that computes it and on a CPU with AMX, fp32 elsewhere."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        if device is not None and torch.device(device).type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    table = {
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float32": torch.float32,
        "fp32": torch.float32,
    }
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; choose bfloat16 or float32")
    return table[name]
