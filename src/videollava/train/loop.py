"""The training loop every stage runs: accumulation, precision, schedule, checkpoints, metrics.

A stage hands over a `Task`: an objective module whose `forward(batch)` returns `(loss_sum,
n_items)` (the *sum* of per-item losses, e.g. per supervised token, and how many items it summed),
the dataset, and which learning rate each trainable parameter gets.

Loss normalisation: per optimiser step, gradients of the summed losses are accumulated over all
micro-batches of all ranks, then divided by the total item count of the global batch (all-reduced).
So the step's loss is sum of per-token losses / supervised tokens of the whole global batch,
whatever the split into micro-batches and processes: one process with accumulation 4 and two
processes with accumulation 2 compute the same update (up to float summation order).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from videollava.data.samplers import StepBatches
from videollava.errors import CheckpointError, VideoLlavaError
from videollava.train import checkpointing as ckpt
from videollava.train import distributed as D
from videollava.train.bad_samples import BadSampleLog
from videollava.train.config import TrainStage, batch_layout

METRICS_FILE = "metrics.jsonl"
BAD_SAMPLES_FILE = "bad_samples.jsonl"
STAGES_DIR = "stages"


@dataclass
class Task:
    """What a stage trains and on what."""

    module: nn.Module  # forward(batch) -> (loss_sum, n_items); trainable parameters require grad
    dataset: Dataset
    collate_fn: Callable[[list[Any]], dict[str, Any]]
    lengths: list[int]
    modalities: list[str]
    lr_for: Callable[[str], float] | None = None  # parameter name -> lr (default: the stage's lr)
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
    sampler_mode: str = "mixed"
    # FSDP needs LLM decoder layers to shard; stages without an LLM fall back to DDP.
    fsdp_capable: bool = False
    # The loss is a sum over samples, so micro-batches may be regrouped by length (less padding).
    sum_loss: bool = False
    find_unused_parameters: bool = False
    groups: list[str | None] | None = None  # samples that the mixed sampler keeps in one batch


@dataclass
class StageContext:
    """Where a stage runs and writes."""

    index: int
    name: str
    run_dir: Path
    dist: D.DistInfo = field(default_factory=D.DistInfo)
    strategy: str = "ddp"
    keep_checkpoints: int = 2
    progress: bool = True
    deepspeed_config: Path | None = None

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @property
    def artefact_dir(self) -> Path:
        return self.run_dir / STAGES_DIR / f"{self.index}-{self.name}"


@dataclass
class StageResult:
    name: str
    index: int
    steps: int
    final_loss: float | None
    mean_loss_last_10: float | None
    bad_samples: int
    eval: dict[str, float]
    wall_time: float
    samples: int
    strategy: D.Strategy | None = field(default=None, repr=False)  # how it ran; holds the trained module

    def summary(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "strategy"}


# ---------------------------------------------------------------------------------------- metrics


class MetricsWriter:
    """Appends one JSON object per line to metrics.jsonl (rank 0 only)."""

    def __init__(self, path: Path | None):
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Records of metrics.jsonl; a line cut short by a kill is ignored."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_log(path: Path, stage_index: int, step: int) -> None:
    """Drop records written after the checkpoint a run resumes from, so steps are not logged twice."""
    if not path.exists():
        return
    kept = [
        r
        for r in read_metrics(path)
        if r.get("stage_index", 0) < stage_index
        or (r.get("stage_index", 0) == stage_index and r.get("step", 0) <= step)
    ]
    ckpt.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def plot_losses(metrics_path: Path, stage_index: int, out: Path) -> None:
    """Loss (and lr) against step for one stage, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [
        r
        for r in read_metrics(metrics_path)
        if r.get("stage_index") == stage_index
        and r.get("event", "step") == "step"
        and r.get("loss") is not None
    ]
    if not rows:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=80)
    fig.subplots_adjust(left=0.11, right=0.87, top=0.91, bottom=0.13)  # fixed margins: tight_layout is slow
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], color="tab:blue", lw=1.2, label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="tab:blue")
    ax.set_title(f"stage {stage_index}: {rows[0].get('stage', '')}")
    twin = ax.twinx()
    twin.plot([r["step"] for r in rows], [r["lr"] for r in rows], color="tab:orange", lw=0.8, alpha=0.7)
    twin.set_ylabel("lr", color="tab:orange")
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)


# ---------------------------------------------------------------------------------------- optimiser


def param_groups(
    module: nn.Module, lr: float, weight_decay: float, lr_for: Callable[[str], float] | None
) -> list[dict[str, Any]]:
    """Trainable parameters grouped by (lr, decay); biases and norm weights (1-d) get no decay."""
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    names: dict[tuple[float, bool], list[str]] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        group_lr = lr_for(name) if lr_for is not None else lr
        decay = weight_decay > 0 and param.ndim >= 2
        groups.setdefault((group_lr, decay), []).append(param)
        names.setdefault((group_lr, decay), []).append(name)
    if not groups:
        raise VideoLlavaError("the stage has no trainable parameters")
    return [
        {"params": params, "lr": key[0], "weight_decay": weight_decay if key[1] else 0.0, "names": names[key]}
        for key, params in groups.items()
    ]


def trainable_names(module: nn.Module) -> list[str]:
    return [name for name, p in module.named_parameters() if p.requires_grad]


def load_trainable(module: nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Put saved trainable weights back; every trainable parameter must be in the file."""
    wanted = set(trainable_names(module))
    missing = sorted(wanted - weights.keys())
    if missing:
        raise CheckpointError(f"{source}: no weights for {', '.join(missing[:5])}")
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            if name not in params:
                raise CheckpointError(f"{source}: {name} is not a parameter of this stage")
            if params[name].shape != tensor.shape:
                raise CheckpointError(
                    f"{source}: {name} has shape {tuple(tensor.shape)}, expected {tuple(params[name].shape)}"
                )
            params[name].copy_(tensor)


# ---------------------------------------------------------------------------------------- the loop


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


# The recipe's schedule names -> the HF Trainer's: both warm up linearly from 0 first.
SCHEDULES = {"cosine": "cosine", "constant": "constant_with_warmup"}


def lr_schedule(
    optimizer: torch.optim.Optimizer, stage: TrainStage, total_steps: int, warmup: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The stage's learning-rate schedule over `total_steps` optimiser steps, as the HF Trainer builds it."""
    # Heavy: transformers.optimization loads the Trainer's utilities, which probe for every optional
    # package; only a training stage needs it, not `videollava train --help`.
    from transformers import get_scheduler

    return get_scheduler(
        SCHEDULES[stage.lr_schedule], optimizer, num_warmup_steps=warmup, num_training_steps=total_steps
    )


def train_stage(
    task: Task,
    cfg: TrainStage,
    ctx: StageContext,
    resume: ckpt.Checkpoint | None = None,
) -> StageResult:
    """Train one stage to its end (or on from a checkpoint of it), checkpointing along the way."""
    info = ctx.dist
    strategy = D.strategy_for(
        ctx.strategy,
        info,
        shardable=task.fsdp_capable,
        deepspeed_config=ctx.deepspeed_config,
        stage=ctx.name,
    )
    layout = batch_layout(cfg, info.world_size, exact=strategy.equal_shares)
    module = task.module
    module.to(info.device)

    def sampler_for(epoch: int, start: int) -> StepBatches:
        return StepBatches(
            mode=task.sampler_mode,
            lengths=task.lengths,
            modalities=task.modalities,
            batch_size=cfg.batch_size,
            micro_batch_size=layout.micro_batch_size,
            accumulation=layout.accumulation,
            seed=cfg.seed,
            epoch=epoch,
            start=start,
            rank=info.rank,
            world_size=info.world_size,
            sort_by_length=task.sum_loss,
            groups=task.groups,
        )

    if len(task.dataset) == 0:
        raise VideoLlavaError(f"stage {ctx.name}: no training samples in {', '.join(cfg.data)}")
    per_epoch = sampler_for(0, 0).steps()
    total_steps = cfg.max_steps or cfg.epochs * per_epoch
    warmup = math.ceil(cfg.warmup_ratio * total_steps)

    step, epoch, consumed, bad_before, wall_before = 0, 0, 0, 0, 0.0
    if resume is not None:
        load_trainable(module, resume.weights, str(resume.path))
        step = resume.state.step
        epoch, consumed = resume.state.epoch, resume.state.batches_consumed
        bad_before = resume.state.bad_samples
        wall_before = float(resume.state.extra.get("wall_time", 0.0))

    strategy.wrap(module, find_unused_parameters=task.find_unused_parameters)
    groups = param_groups(module, cfg.lr, cfg.weight_decay, task.lr_for)
    optimizer = strategy.make_optimizer(
        [{k: v for k, v in g.items() if k != "names"} for g in groups], cfg, layout
    )
    scheduler = lr_schedule(optimizer, cfg, total_steps, warmup)
    strategy.attach(optimizer, scheduler)
    if resume is not None:
        strategy.restore(resume)
    # The group whose lr is the stage's own (others, such as projector_lr, are scaled alike).
    base_group = next((i for i, g in enumerate(groups) if g["lr"] == cfg.lr), 0)

    names = set(trainable_names(module))
    metrics = MetricsWriter(ctx.run_dir / METRICS_FILE if ctx.is_main else None)
    bad_log = BadSampleLog(
        ctx.run_dir / BAD_SAMPLES_FILE if ctx.is_main else None,
        policy=cfg.bad_samples,
        stage=ctx.name,
        count=bad_before,
        echo=ctx.is_main,
    )
    eval_results: dict[str, float] = dict(resume.state.extra.get("eval", {})) if resume else {}
    losses: list[float] = list(resume.state.extra.get("last_losses", [])) if resume else []
    samples_seen = int(resume.state.extra.get("samples", 0)) if resume else 0
    started = time.perf_counter()

    def run_eval() -> None:
        if task.evaluate is None:
            return
        module.eval()
        with torch.no_grad(), _autocast(info.device, cfg.bf16):
            results = task.evaluate(module)
        module.train()
        if not results:
            return
        eval_results.update(results)
        metrics.write({"event": "eval", "stage": ctx.name, "stage_index": ctx.index, "step": step, **results})
        if ctx.is_main:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in results.items())
            tqdm.write(f"[{ctx.name}] step {step} eval: {shown}", file=sys.stderr)

    def save(complete: bool) -> None:
        state = ckpt.TrainerState(
            stage_index=ctx.index,
            stage=ctx.name,
            step=step,
            total_steps=total_steps,
            complete=complete,
            epoch=epoch,
            batches_consumed=consumed,
            bad_samples=bad_log.count,
            extra={
                "eval": eval_results,
                "last_losses": losses[-10:],
                "samples": samples_seen,
                "wall_time": wall_before + time.perf_counter() - started,
                "strategy": strategy.name,
            },
        )
        weights = strategy.full_state(names)
        optim_state = strategy.optimizer_state()
        tmp = ckpt.staging_dir(ctx.run_dir, state)
        if ctx.is_main:
            ckpt.begin_checkpoint(ctx.run_dir, state)
        D.barrier(info)
        ckpt.write_rng(tmp, info.rank)
        strategy.save_engine(tmp)
        D.barrier(info)
        if ctx.is_main:
            if complete:
                _write_artefact(ctx, weights, state)
            ckpt.finish_checkpoint(
                ctx.run_dir, tmp, state, weights, optim_state, scheduler.state_dict(), ctx.keep_checkpoints
            )
            plot_losses(
                ctx.run_dir / METRICS_FILE, ctx.index, ctx.run_dir / "plots" / f"{ctx.index}-{ctx.name}.png"
            )
        D.barrier(info)

    if resume is not None and resume.rng is not None:
        ckpt.set_rng_state(resume.rng)

    bar = tqdm(
        total=total_steps,
        initial=step,
        desc=f"[{ctx.index}] {ctx.name}",
        file=sys.stderr,
        disable=not (ctx.progress and ctx.is_main),
        dynamic_ncols=True,
        mininterval=1.0,
    )
    module.train()
    loader_rng = torch.Generator()
    while step < total_steps:
        sampler = sampler_for(epoch, consumed)
        loader_rng.manual_seed(cfg.seed + epoch)
        loader = DataLoader(
            task.dataset,
            batch_sampler=sampler,
            collate_fn=task.collate_fn,
            num_workers=cfg.num_workers,
            generator=loader_rng,
        )
        batches = iter(loader)
        for _ in range(consumed, sampler.steps()):
            if step >= total_steps:
                break
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(layout.accumulation)]
            skipped = [s for m in micro for s in m["skipped"]]
            if info.enabled:
                skipped = [s for part in D.all_gather_objects(skipped, info) for s in part]
            bad_log.record(skipped, step + 1, ctx.index)

            loss_sum = torch.zeros((), dtype=torch.float64)
            items = 0
            samples = 0
            real = strategy.runs(micro)
            for j, batch in enumerate(real):
                with strategy.accumulate(sync=j == len(real) - 1):
                    with _autocast(info.device, cfg.bf16):
                        loss, n = strategy.forward(batch)
                    strategy.backward(loss, n)
                loss_sum += loss.detach().double().cpu()
                items += int(n)
                samples += int(batch["num_samples"])
            totals = D.all_reduce_sum(
                torch.tensor([loss_sum.item(), items, samples], dtype=torch.float64), info
            )
            total_loss, total_items, total_samples = totals.tolist()

            lr = scheduler.get_last_lr()[base_group]
            grad_norm = strategy.step(total_items, cfg.max_grad_norm)
            step += 1
            consumed += 1
            samples_seen += int(total_samples)
            loss_value = total_loss / total_items if total_items > 0 else None
            if loss_value is not None:
                losses.append(loss_value)
            elapsed = time.perf_counter() - t0
            rate = total_samples / elapsed if elapsed > 0 else 0.0
            metrics.write(
                {
                    "event": "step",
                    "stage": ctx.name,
                    "stage_index": ctx.index,
                    "step": step,
                    "epoch": epoch,
                    "loss": loss_value,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "samples": int(total_samples),
                    "items": int(total_items),
                    "samples_per_s": rate,
                    "skipped": len(skipped),
                }
            )
            bar.update(1)
            if step % cfg.log_every == 0 or step == total_steps:
                shown = f"{loss_value:.4f}" if loss_value is not None else "n/a"
                bar.set_postfix_str(f"loss {shown} lr {lr:.2e} {rate:.1f} samples/s", refresh=False)
                if not ctx.progress and ctx.is_main:
                    print(
                        f"[{ctx.name}] step {step}/{total_steps} loss {shown} lr {lr:.2e} {rate:.1f} samples/s",
                        file=sys.stderr,
                    )
            if cfg.eval is not None and cfg.eval.every and step % cfg.eval.every == 0 and step < total_steps:
                run_eval()
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total_steps:
                save(complete=False)
        if consumed >= sampler.steps():
            epoch += 1
            consumed = 0
    bar.close()

    run_eval()
    save(complete=True)
    return StageResult(
        name=ctx.name,
        index=ctx.index,
        steps=step,
        final_loss=losses[-1] if losses else None,
        mean_loss_last_10=sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        bad_samples=bad_log.count,
        eval=eval_results,
        wall_time=wall_before + time.perf_counter() - started,
        samples=samples_seen,
        strategy=strategy,
    )


def _write_artefact(ctx: StageContext, weights: dict[str, torch.Tensor], state: ckpt.TrainerState) -> None:
    """The stage's final trainable weights and results, kept for good (checkpoints get pruned)."""
    final = ctx.artefact_dir
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{final.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    ckpt.save_weights_file(weights, tmp / ckpt.WEIGHTS_FILE)
    (tmp / "result.json").write_text(json.dumps(asdict(state), indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.replace(final)


def load_artefact(ctx: StageContext) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and trainer state a finished stage left behind."""
    folder = ctx.artefact_dir
    weights = ckpt.load_weights_file(folder / ckpt.WEIGHTS_FILE)
    try:
        state = json.loads((folder / "result.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{folder}: unreadable stage result ({error})") from None
    return weights, state
