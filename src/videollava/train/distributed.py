"""Several processes training one model: setup, wrapping (DDP / FSDP2 / DeepSpeed) and collectives.

Launch with `torchrun --nproc_per_node N -m videollava train RECIPE.yaml`; a plain
`videollava train` is a world of one and uses none of this machinery. The backend is gloo on
CPU and nccl on GPU. Only rank 0 writes checkpoints, metrics and exports.

Strategies:
- `ddp`: `DistributedDataParallel` over the stage's objective; frozen parameters (the towers) are
  not registered, since DDP only synchronises parameters that require gradients.
- `fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`) on every LLM decoder layer and on the root,
  for the LLM stages; alignment stages (small towers) fall back to DDP. State dicts are gathered in
  full for saving.
- `deepspeed`: `deepspeed.initialize` with one of `configs/deepspeed/*.json`, whose `"auto"` values
  are filled from the stage. This path needs GPUs and the `deepspeed` package; it could not be
  exercised on the CPU-only machine this code was developed on.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from videollava.errors import VideoLlavaError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    strategy: str = "ddp"
    backend: str = "gloo"

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world_size() -> int:
    """The number of processes torchrun started (1 without torchrun), known before any setup."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(strategy: str = "ddp", backend: str = "auto") -> DistInfo:
    """Join the process group torchrun describes in the environment; a world of one otherwise."""
    world = launched_world_size()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local_rank, device, strategy, backend)


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum over ranks (float64 on CPU for gloo; on the device for nccl)."""
    if not info.enabled:
        return values
    tensor = values.to(info.device if info.backend == "nccl" else "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu()


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------------------- wrapping


def decoder_layers(module: nn.Module) -> list[nn.Module]:
    """The LLM's transformer blocks: the units FSDP shards one at a time."""
    return [m for m in module.modules() if type(m).__name__.endswith("DecoderLayer")]


@dataclass
class Wrapped:
    """The module to call for the forward pass, and how its gradients arrive."""

    module: nn.Module
    strategy: str  # "none" | "ddp" | "fsdp" | "deepspeed"
    # True when gradients come back averaged over ranks (DDP, FSDP): the loop multiplies by world size.
    averages_gradients: bool = False
    engine: Any = None  # the DeepSpeed engine

    @contextlib.contextmanager
    def accumulate(self, sync: bool) -> Iterator[None]:
        """Skip the gradient all-reduce on every micro-batch but the last of a step."""
        if self.strategy == "ddp" and not sync:
            with self.module.no_sync():
                yield
        elif self.strategy == "fsdp":
            self.module.set_requires_gradient_sync(sync)
            yield
        else:
            yield


def wrap(module: nn.Module, info: DistInfo, *, strategy: str, find_unused_parameters: bool) -> Wrapped:
    """Wrap the objective for the strategy; a world of one runs the module as is."""
    if not info.enabled or strategy == "none":
        return Wrapped(module, "none")
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # Buffers (rotary frequencies) are identical on every rank: no per-forward sync.
        buffers = (
            {"forward_sync_buffers": False}
            if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else {"broadcast_buffers": False}
        )
        ddp = DistributedDataParallel(
            module,
            device_ids=[info.device.index] if info.device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters,
            **buffers,
        )
        return Wrapped(ddp, "ddp", averages_gradients=True)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in decoder_layers(module):
            fully_shard(layer)
        fully_shard(module)
        return Wrapped(module, "fsdp", averages_gradients=True)
    raise VideoLlavaError(f"unknown strategy {strategy!r}; expected ddp, fsdp or deepspeed")


def full_state_dict(
    wrapped: Wrapped, names: set[str] | None = None, all_ranks: bool = False
) -> dict[str, torch.Tensor]:
    """Unsharded CPU tensors of the objective (only `names` if given). Collective under FSDP, where
    only rank 0 receives them unless `all_ranks`."""
    if wrapped.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(
            wrapped.module, options=StateDictOptions(full_state_dict=True, cpu_offload=not all_ranks)
        )
    else:
        state = unwrap(wrapped).state_dict()
    return {k: v.detach().cpu() for k, v in state.items() if names is None or k in names}


def optimizer_state_dict(wrapped: Wrapped, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimiser's state; under FSDP gathered in full on rank 0, keyed by parameter name (collective)."""
    if wrapped.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        state = get_optimizer_state_dict(
            wrapped.module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        return _to_cpu(state)
    return optimizer.state_dict()


def load_optimizer_state_dict(
    wrapped: Wrapped, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    if wrapped.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(
            wrapped.module, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True)
        )
        return
    optimizer.load_state_dict(state)


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(v) for v in value)
    return value


def unwrap(wrapped: Wrapped) -> nn.Module:
    if wrapped.strategy == "ddp":
        return wrapped.module.module
    if wrapped.strategy == "deepspeed":
        return wrapped.engine.module
    return wrapped.module


def local_tensor(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a DTensor (FSDP) result such as the clipped gradient norm."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


# ---------------------------------------------------------------------------------------- DeepSpeed


def resolve_deepspeed_config(
    path: str | Path,
    *,
    micro_batch_size: int,
    accumulation: int,
    world_size: int,
    max_grad_norm: float,
    bf16: bool,
) -> dict[str, Any]:
    """The JSON with its "auto" values replaced by the stage's numbers (as the HF Trainer does)."""
    try:
        config = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise VideoLlavaError(f"{path}: DeepSpeed config not found") from None
    except json.JSONDecodeError as error:
        raise VideoLlavaError(f"{path}: not valid JSON ({error})") from None
    fills = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch_size * accumulation * world_size,
        "gradient_clipping": max_grad_norm,
    }
    for key, value in fills.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
    if isinstance(config.get("bf16"), dict) and config["bf16"].get("enabled") == "auto":
        config["bf16"]["enabled"] = bf16
    if isinstance(config.get("fp16"), dict) and config["fp16"].get("enabled") == "auto":
        config["fp16"]["enabled"] = False
    zero = config.get("zero_optimization", {})
    for key in list(zero):
        if zero[key] == "auto":
            del zero[key]  # DeepSpeed's own default; the HF Trainer derives these from the hidden size
    return config


def make_optimizer(
    groups: list[dict[str, Any]],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    deepspeed_config: dict[str, Any] | None = None,
) -> torch.optim.Optimizer:
    """AdamW; under ZeRO-Offload DeepSpeed's CPU Adam (in AdamW mode), which offloading requires."""
    offload = (deepspeed_config or {}).get("zero_optimization", {}).get("offload_optimizer", {})
    if offload and offload.get("device", "none") != "none":
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam
        except ImportError:
            raise VideoLlavaError(
                "optimizer offload needs the deepspeed package (pip install deepspeed)"
            ) from None
        return DeepSpeedCPUAdam(
            groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adamw_mode=True
        )
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def deepspeed_initialize(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    config: dict[str, Any],
) -> Wrapped:
    """`deepspeed.initialize` on the objective; untested here (no GPU, no deepspeed on this machine)."""
    try:
        import deepspeed
    except ImportError:
        raise VideoLlavaError(
            "strategy 'deepspeed' needs the deepspeed package (pip install deepspeed) and GPUs; "
            "use strategy ddp or fsdp otherwise"
        ) from None
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=config
    )
    return Wrapped(engine, "deepspeed", averages_gradients=True, engine=engine)
