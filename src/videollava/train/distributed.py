"""Several processes training one model: setup, collectives, and one strategy per way of sharing
the work (DDP / FSDP2 / DeepSpeed) behind the small interface the training loop calls.

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
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from videollava.errors import VideoLlavaError
from videollava.train.config import BatchLayout, TrainStage


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


# ---------------------------------------------------------------------------------------- strategies


def decoder_layers(module: nn.Module) -> list[nn.Module]:
    """The LLM's transformer blocks: the units FSDP shards one at a time."""
    return [m for m in module.modules() if type(m).__name__.endswith("DecoderLayer")]


class Strategy:
    """How one stage's objective runs over the processes: wrapping, optimiser, gradient sync and what
    a checkpoint holds. This base runs a single process (a world of one) as is.

    The training loop calls `wrap`, `make_optimizer`, `attach` (with the schedule) and, when
    resuming, `restore`; then every step `runs`, and for each micro-batch `accumulate`, `forward`
    and `backward`, then `step`; to checkpoint, `full_state`, `optimizer_state` and `save_engine`.
    """

    name = "none"
    # Gradients come back averaged over ranks (DDP, FSDP): the step multiplies by the world size.
    averages_gradients = False
    # Every rank must get the same number of samples (DeepSpeed's fixed train_batch_size).
    equal_shares = False
    # Every rank runs every micro-batch, an empty one as a zero-weight forward: FSDP gathers
    # parameters in every forward and DeepSpeed counts micro-batches to find the step boundary.
    every_micro_batch = False
    # The model ends the stage sharded over the ranks and must be gathered back (FSDP).
    shards_model = False

    def __init__(self, info: DistInfo):
        self.info = info
        self.module: Any = None  # what the forward pass calls
        self.target: nn.Module | None = None  # the objective itself, whose parameters train
        self.optimizer: Any = None
        self.scheduler: Any = None
        self.params: list[nn.Parameter] = []

    def wrap(self, module: nn.Module, find_unused_parameters: bool = False) -> None:
        self.module = self.target = module

    def make_optimizer(
        self, groups: list[dict[str, Any]], stage: TrainStage, layout: BatchLayout
    ) -> torch.optim.Optimizer:
        """AdamW over the parameter groups, with the stage's settings."""
        return torch.optim.AdamW(
            groups,
            lr=stage.lr,
            betas=(stage.betas[0], stage.betas[1]),
            eps=stage.eps,
            weight_decay=stage.weight_decay,
        )

    def attach(self, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        self.optimizer, self.scheduler = optimizer, scheduler
        self.params = [p for group in optimizer.param_groups for p in group["params"]]

    def restore(self, checkpoint: Any) -> None:
        """The optimiser and schedule state of a checkpoint of this stage."""
        if checkpoint.optimizer is not None:
            self.optimizer.load_state_dict(checkpoint.optimizer)
        if checkpoint.scheduler is not None:
            self.scheduler.load_state_dict(checkpoint.scheduler)

    def runs(self, micro: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The micro-batches this rank runs this step: the non-empty ones; on a rank with none, one
        zero-weight forward keeps the ranks' gradient all-reduces in step."""
        if self.every_micro_batch:
            return micro
        real = [m for m in micro if m["num_samples"] > 0]
        return real or (micro[:1] if self.info.enabled else [])

    @contextlib.contextmanager
    def accumulate(self, sync: bool) -> Iterator[None]:
        """Skip the gradient all-reduce on every micro-batch but the last of a step."""
        yield

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        return self.module(batch)

    def backward(self, loss: torch.Tensor, items: int) -> None:
        loss.float().backward()

    def step(self, total_items: float, max_grad_norm: float) -> float | None:
        """Normalise the summed gradients by the global batch's item count, clip, step the optimiser
        and the schedule; the gradient norm before clipping."""
        grad_norm = None
        if total_items > 0:
            scale = (self.info.world_size if self.averages_gradients else 1) / total_items
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(scale)
            norm = torch.nn.utils.clip_grad_norm_(
                self.params, max_grad_norm if max_grad_norm > 0 else float("inf")
            )
            grad_norm = float(local_tensor(norm))
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return grad_norm

    def full_state(self, names: set[str] | None = None, all_ranks: bool = False) -> dict[str, torch.Tensor]:
        """Unsharded CPU tensors of the objective (only `names` if given). Collective under FSDP,
        where only rank 0 receives them unless `all_ranks`."""
        return _cpu_tensors(self.target.state_dict(), names)

    def optimizer_state(self) -> dict[str, Any] | None:
        """What a checkpoint keeps of the optimiser (collective under FSDP)."""
        return self.optimizer.state_dict()

    def save_engine(self, folder: Path) -> None:
        """State a checkpoint keeps beside weights and optimiser: none but DeepSpeed's own."""


class DDPStrategy(Strategy):
    """`DistributedDataParallel` over the objective. Frozen parameters (the towers) are not
    registered: DDP only synchronises parameters that require gradients."""

    name = "ddp"
    averages_gradients = True

    def wrap(self, module: nn.Module, find_unused_parameters: bool = False) -> None:
        # Buffers (rotary frequencies) are identical on every rank: no per-forward sync.
        buffers = (
            {"forward_sync_buffers": False}
            if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else {"broadcast_buffers": False}
        )
        self.target = module
        self.module = DistributedDataParallel(
            module,
            device_ids=[self.info.device.index] if self.info.device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters,
            **buffers,
        )

    @contextlib.contextmanager
    def accumulate(self, sync: bool) -> Iterator[None]:
        if sync:
            yield
        else:
            with self.module.no_sync():
                yield


class FSDPStrategy(Strategy):
    """FSDP2 (`fully_shard`) on every LLM decoder layer and on the root; state is gathered in full
    for saving."""

    name = "fsdp"
    averages_gradients = True
    every_micro_batch = True
    shards_model = True

    def wrap(self, module: nn.Module, find_unused_parameters: bool = False) -> None:
        for layer in decoder_layers(module):
            fully_shard(layer)
        fully_shard(module)
        self.module = self.target = module

    @contextlib.contextmanager
    def accumulate(self, sync: bool) -> Iterator[None]:
        self.module.set_requires_gradient_sync(sync)
        yield

    def full_state(self, names: set[str] | None = None, all_ranks: bool = False) -> dict[str, torch.Tensor]:
        options = StateDictOptions(full_state_dict=True, cpu_offload=not all_ranks)
        return _cpu_tensors(get_model_state_dict(self.module, options=options), names)

    def optimizer_state(self) -> dict[str, Any]:
        """Gathered in full on rank 0, keyed by parameter name."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return _to_cpu(get_optimizer_state_dict(self.module, self.optimizer, options=options))

    def restore(self, checkpoint: Any) -> None:
        if checkpoint.optimizer is not None:
            set_optimizer_state_dict(
                self.module,
                self.optimizer,
                optim_state_dict=checkpoint.optimizer,
                options=StateDictOptions(full_state_dict=True),
            )
        if checkpoint.scheduler is not None:
            self.scheduler.load_state_dict(checkpoint.scheduler)


def strategy_for(
    name: str,
    info: DistInfo,
    *,
    shardable: bool = True,
    deepspeed_config: Path | None = None,
    stage: str = "",
) -> Strategy:
    """The strategy a stage runs under. A world of one runs as is; a stage without LLM decoder
    layers to shard (`shardable` False: the alignment stages) falls back from FSDP to DDP."""
    if not info.enabled:
        return Strategy(info)
    if name == "fsdp" and not shardable:
        name = "ddp"
    if name == "ddp":
        return DDPStrategy(info)
    if name == "fsdp":
        return FSDPStrategy(info)
    if name == "deepspeed":
        if deepspeed_config is None:
            raise VideoLlavaError(f"stage {stage}: strategy deepspeed needs a deepspeed_config")
        return DeepSpeedStrategy(info, deepspeed_config)
    raise VideoLlavaError(f"unknown strategy {name!r}; expected ddp, fsdp or deepspeed")


def _cpu_tensors(state: dict[str, torch.Tensor], names: set[str] | None) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in state.items() if names is None or k in names}


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


def deepspeed_initialize(
    module: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, config: dict[str, Any]
) -> Any:
    """`deepspeed.initialize` on the objective: its engine. Untested here (no GPU, no deepspeed)."""
    try:
        import deepspeed  # optional and heavy: only a deepspeed run pays for it
    except ImportError:
        raise VideoLlavaError(
            "strategy 'deepspeed' needs the deepspeed package (pip install deepspeed) and GPUs; "
            "use strategy ddp or fsdp otherwise"
        ) from None
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=config
    )
    return engine


class DeepSpeedStrategy(Strategy):
    """`deepspeed.initialize` with one of `configs/deepspeed/*.json`, its "auto" values filled from
    the stage; the engine accumulates, clips, steps and checkpoints on its own."""

    name = "deepspeed"
    averages_gradients = True
    equal_shares = True
    every_micro_batch = True

    def __init__(self, info: DistInfo, config_path: Path):
        super().__init__(info)
        self.config_path = config_path
        self.config: dict[str, Any] = {}

    def wrap(self, module: nn.Module, find_unused_parameters: bool = False) -> None:
        self.target = module  # the engine wraps it in `attach`, once optimiser and schedule exist

    def make_optimizer(
        self, groups: list[dict[str, Any]], stage: TrainStage, layout: BatchLayout
    ) -> torch.optim.Optimizer:
        """AdamW; under ZeRO-Offload DeepSpeed's CPU Adam (in AdamW mode), which offloading requires."""
        self.config = resolve_deepspeed_config(
            self.config_path,
            micro_batch_size=layout.micro_batch_size,
            accumulation=layout.accumulation,
            world_size=self.info.world_size,
            max_grad_norm=stage.max_grad_norm,
            bf16=stage.bf16,
        )
        offload = self.config.get("zero_optimization", {}).get("offload_optimizer", {})
        if not offload or offload.get("device", "none") == "none":
            return super().make_optimizer(groups, stage, layout)
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam  # optional, as above
        except ImportError:
            raise VideoLlavaError(
                "optimizer offload needs the deepspeed package (pip install deepspeed)"
            ) from None
        betas = (stage.betas[0], stage.betas[1])
        return DeepSpeedCPUAdam(
            groups, lr=stage.lr, betas=betas, eps=stage.eps, weight_decay=stage.weight_decay, adamw_mode=True
        )

    def attach(self, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        super().attach(optimizer, scheduler)
        self.module = deepspeed_initialize(self.target, optimizer, scheduler, self.config)

    def restore(self, checkpoint: Any) -> None:
        self.module.load_checkpoint(str(checkpoint.path / "deepspeed"))

    def backward(self, loss: torch.Tensor, items: int) -> None:
        self.module.backward(loss.float() / max(int(items), 1))
        self.module.step()

    def step(self, total_items: float, max_grad_norm: float) -> float | None:
        return self.module.get_global_grad_norm()

    def full_state(self, names: set[str] | None = None, all_ranks: bool = False) -> dict[str, torch.Tensor]:
        """ZeRO-2 keeps full parameters on every rank."""
        return _cpu_tensors(self.module.module.state_dict(), names)

    def optimizer_state(self) -> None:
        return None  # in the engine's own checkpoint

    def save_engine(self, folder: Path) -> None:
        self.module.save_checkpoint(str(folder / "deepspeed"))
