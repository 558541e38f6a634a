"""Checkpoints that survive a kill at any moment, and the state a resumed run needs.

A checkpoint is a folder `checkpoint-<stage>-<step>` holding the trainable weights (safetensors),
the optimiser and scheduler states, the sampler position, every process's RNG states and a JSON
description. It is written into a temporary folder and renamed into place (`os.replace`), then the
`latest` pointer file is replaced the same way; so whatever the moment of a crash, `latest` names a
complete checkpoint. Everything is read back with safetensors or `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from videollava.errors import CheckpointError

LATEST = "latest"
PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "weights.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"


@dataclass
class TrainerState:
    """Where training stands: stage, step within it, sampler position, results so far."""

    stage_index: int
    stage: str
    step: int
    total_steps: int = 0
    complete: bool = False
    epoch: int = 0
    batches_consumed: int = 0
    bad_samples: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{PREFIX}{self.stage_index}-{self.step}"


@dataclass
class Checkpoint:
    path: Path
    state: TrainerState
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    scheduler: dict[str, Any] | None
    rng: dict[str, Any] | None


# ---------------------------------------------------------------------------------------- files


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    """Write, flush to disk, then rename over `path`: readers see the old or the new text, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_weights_file(weights: dict[str, torch.Tensor], path: Path) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{path}: unreadable ({type(error).__name__}: {error})") from None


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as error:
        raise CheckpointError(f"{path}: unreadable ({type(error).__name__}: {error})") from None


# ---------------------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """This process's torch, numpy and Python RNG states, as types `weights_only` loading accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------- save


def _order_key(path: Path) -> tuple[int, int]:
    stage, step = path.name[len(PREFIX) :].split("-")
    return int(stage), int(step)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    found = []
    for path in Path(run_dir).glob(f"{PREFIX}*"):
        try:
            _order_key(path)
        except ValueError:
            continue
        if (path / STATE_FILE).exists():
            found.append(path)
    return sorted(found, key=_order_key)


def staging_dir(run_dir: Path, state: TrainerState) -> Path:
    """The temporary folder a checkpoint is assembled in (every rank may add its RNG file)."""
    return Path(run_dir) / f".tmp-{state.name}"


def begin_checkpoint(run_dir: Path, state: TrainerState) -> Path:
    tmp = staging_dir(run_dir, state)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_rng(tmp: Path, rank: int) -> None:
    torch.save(rng_state(), tmp / f"rng-{rank}.pt")


def finish_checkpoint(
    run_dir: Path,
    tmp: Path,
    state: TrainerState,
    weights: dict[str, torch.Tensor],
    optimizer: dict[str, Any] | None,
    scheduler: dict[str, Any] | None,
    keep: int,
) -> Path:
    """Write the rest, rename the folder into place, move `latest`, prune old checkpoints."""
    run_dir = Path(run_dir)
    save_weights_file(weights, tmp / WEIGHTS_FILE)
    if optimizer is not None:
        torch.save(optimizer, tmp / OPTIMIZER_FILE)
    if scheduler is not None:
        torch.save(scheduler, tmp / SCHEDULER_FILE)
    (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2) + "\n")
    for file in tmp.iterdir():
        _fsync_file(file)
    _fsync_dir(tmp)

    final = run_dir / state.name
    if final.exists():  # the same step saved again after a resume: move the old one aside first
        old = run_dir / f".old-{state.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(run_dir)
    atomic_write_text(run_dir / LATEST, state.name + "\n")
    prune(run_dir, keep)
    return final


def prune(run_dir: Path, keep: int) -> None:
    """Remove all but the newest `keep` checkpoints (never the one `latest` names) and stale temp folders."""
    latest = read_latest_name(run_dir)
    checkpoints = list_checkpoints(run_dir)
    for path in checkpoints[: max(0, len(checkpoints) - keep)]:
        if path.name != latest:
            shutil.rmtree(path, ignore_errors=True)
    for stale in Path(run_dir).glob(".old-*"):
        shutil.rmtree(stale, ignore_errors=True)


def save_checkpoint(
    run_dir: Path,
    state: TrainerState,
    weights: dict[str, torch.Tensor],
    optimizer: dict[str, Any] | None = None,
    scheduler: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Single-process convenience: stage, write this process's RNG, finish."""
    tmp = begin_checkpoint(run_dir, state)
    write_rng(tmp, 0)
    return finish_checkpoint(run_dir, tmp, state, weights, optimizer, scheduler, keep)


# ---------------------------------------------------------------------------------------- load


def read_latest_name(run_dir: Path) -> str | None:
    pointer = Path(run_dir) / LATEST
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    return name or None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `latest` names; falls back to the newest complete folder if the pointer is stale."""
    name = read_latest_name(run_dir)
    if name is not None and (Path(run_dir) / name / STATE_FILE).exists():
        return Path(run_dir) / name
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: Path, rank: int = 0) -> Checkpoint:
    path = Path(path)
    try:
        data = json.loads((path / STATE_FILE).read_text())
        state = TrainerState(**data)
    except (OSError, json.JSONDecodeError, TypeError) as error:
        raise CheckpointError(f"{path / STATE_FILE}: unreadable trainer state ({error})") from None
    weights = load_weights_file(path / WEIGHTS_FILE)
    optimizer = _torch_load(path / OPTIMIZER_FILE) if (path / OPTIMIZER_FILE).exists() else None
    scheduler = _torch_load(path / SCHEDULER_FILE) if (path / SCHEDULER_FILE).exists() else None
    rng_file = path / f"rng-{rank}.pt"
    if not rng_file.exists():
        rng_file = path / "rng-0.pt"
    rng = _torch_load(rng_file) if rng_file.exists() else None
    return Checkpoint(path, state, weights, optimizer, scheduler, rng)
