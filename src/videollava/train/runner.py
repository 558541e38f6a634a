"""`videollava train RECIPE.yaml`: run a recipe's stages in order, resumable after any interruption.

Stages (see `train.config`): `tokenizer`, `align_image`, `align_video` (LanguageBind-style
alignment of the towers to language), `projector` (stage 1) and `finetune` (stage 2). Each
training stage gets its task (objective, data, evaluation) from its kind's builder in
`train.tasks`, trains it with `train.loop.train_stage`, and leaves its final trainable weights in
`stages/<i>-<name>/`. A resumed
run replays finished stages from those weights (cheap: no training) and continues the interrupted
one from its latest checkpoint, with the same data order and RNG state.

Run folder: `recipe.yaml` (resolved), `data/` (if generated), `tokenizer/`, `metrics.jsonl`,
`bad_samples.jsonl`, `plots/`, `checkpoint-<stage>-<step>/`, `latest`, `stages/`, `model/` (the
-hf export) and `summary.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from videollava.constants import padded_vocab_size
from videollava.data.records import read_records, training_texts
from videollava.data.sample_media import MediaCache
from videollava.errors import CheckpointError, VideoLlavaError
from videollava.extras import require
from videollava.model.build import (
    LLMConfig,
    build_meta_model,
    init_vision_tower,
    model_config,
)
from videollava.model.bundle import save_bundle
from videollava.model.checkpoint import build_model, load_from_parts, load_weights
from videollava.model.videollava import VideoLlava, VideoLlavaConfig
from videollava.model.vision import VisionConfig
from videollava.shapesworld.generate import generate
from videollava.train import checkpointing as ckpt
from videollava.train import distributed as D
from videollava.train.config import (
    FinetuneStage,
    Recipe,
    RecipeError,
    TokenizerStage,
    TrainStage,
    batch_layout,
    dump_recipe,
    load_recipe,
)
from videollava.train.loop import (
    BAD_SAMPLES_FILE,
    METRICS_FILE,
    StageContext,
    load_artefact,
    load_trainable,
    train_stage,
    truncate_log,
)
from videollava.train.tasks import TASK_BUILDERS, Alignment, TaskContext, media_transform
from videollava.train.tokenizer import train_tokenizer

# ---------------------------------------------------------------------------------------- the model


def model_options(recipe: Recipe) -> dict[str, Any]:
    """The VideoLlavaConfig fields the recipe sets: the `model:` options and the answer template."""
    return recipe.model.options() | {"template": recipe.export_template()}


def recipe_model_config(
    recipe: Recipe, vision: VisionConfig, llm: LLMConfig, vocab_size: int, tokenizer: Any = None
) -> VideoLlavaConfig:
    """The config of the recipe's model: its towers and LLM, the `model:` options, the answer template."""
    return model_config(vision, llm, vocab_size, tokenizer, **model_options(recipe))


def meta_model(recipe: Recipe, vocab_size: int | None = None) -> VideoLlava:
    """The recipe's model on the meta device: shapes and parameter counts without memory or downloads."""
    vision, llm = recipe.model.architecture()
    vocab = llm.vocab_size or vocab_size
    if vocab is None:
        raise RecipeError(
            "model: the vocabulary size is unknown before the tokenizer exists; pass vocab_size"
        )
    return build_meta_model(recipe_model_config(recipe, vision, llm, vocab))


# ---------------------------------------------------------------------------------------- the run


class Run:
    """One recipe in one run folder; every rank holds one."""

    def __init__(self, recipe: Recipe, info: D.DistInfo, run_dir: Path, resume: bool):
        self.recipe = recipe
        self.info = info
        self.run_dir = run_dir
        self.resume = resume
        self.tokenizer: Any = None
        self.model: VideoLlava | None = None
        self.alignment = Alignment()
        self.results: list[dict[str, Any]] = []
        self.data_root: Path | None = None
        self.media_cache = MediaCache() if recipe.run.cache_media else None

    def log(self, message: str) -> None:
        if self.info.is_main:
            print(message, file=sys.stderr, flush=True)

    def require_model(self) -> VideoLlava:
        if self.model is None:
            self.model = self.build_model()
        return self.model

    def stage_context(self, index: int, stage: TrainStage) -> StageContext:
        ds = stage.deepspeed_config or self.recipe.distributed.deepspeed_config
        return StageContext(
            index=index,
            name=stage.label,
            run_dir=self.run_dir,
            dist=self.info,
            strategy=self.recipe.distributed.strategy,
            keep_checkpoints=self.recipe.run.keep_checkpoints,
            progress=self.recipe.run.progress,
            deepspeed_config=self.recipe.resolve_path(ds) if ds else None,
        )

    def task_context(self) -> TaskContext:
        assert self.data_root is not None
        return TaskContext(
            recipe=self.recipe,
            model=self.require_model(),
            tokenizer=self.tokenizer,
            data_root=self.data_root,
            alignment=self.alignment,
            media_cache=self.media_cache,
            distributed=self.info.enabled,
            log=self.log,
        )

    # ------------------------------------------------------------ setup

    def prepare_data(self) -> None:
        data = self.recipe.data
        if data.generate is None:
            assert data.root is not None
            self.data_root = self.recipe.resolve_path(data.root)
            if not self.data_root.is_dir():
                raise RecipeError(f"data.root: {self.data_root} is not a folder")
            return
        self.data_root = self.recipe.resolve_path(data.root) if data.root else self.run_dir / "data"
        marker = self.data_root / ".generated.json"
        wanted = json.dumps(dataclasses.asdict(data.generate), sort_keys=True)
        if self.info.is_main:
            if marker.exists() and marker.read_text() != wanted:
                raise RecipeError(
                    f"data.generate: {self.data_root} was generated with other settings ({marker.read_text()}); "
                    "delete it or choose another data.root"
                )
            if not marker.exists():
                self.log(f"generating ShapesWorld data into {self.data_root}")
                generate(self.data_root, data.generate)
                ckpt.atomic_write_text(marker, wanted)
        D.barrier(self.info)

    def build_model(self) -> VideoLlava:
        m = self.recipe.model
        if m.init is not None:
            if self.tokenizer is None:
                raise RecipeError("model.init: the tokenizer must exist before the model is built")
            if m.init.llm.vocab_size is not None and m.init.llm.vocab_size < len(self.tokenizer):
                raise RecipeError(
                    f"model.init.llm.vocab_size: {m.init.llm.vocab_size} is smaller than the tokenizer's "
                    f"{len(self.tokenizer)} tokens"
                )
            ckpt.seed_everything(m.init.seed)
            config = recipe_model_config(
                self.recipe, m.init.vision, m.init.llm, padded_vocab_size(len(self.tokenizer)), self.tokenizer
            )
            model = VideoLlava(config)
            init_vision_tower(model.image_tower, m.init.vision_init_std)
            init_vision_tower(model.video_tower, m.init.vision_init_std)
            return model.train()
        assert m.from_ is not None
        if m.from_.checkpoint:
            model, folder = load_weights(m.from_.checkpoint, torch.float32)
            self.tokenizer = AutoTokenizer.from_pretrained(str(m.from_.tokenizer or folder))
            model.config.template = self.recipe.export_template()
            return model.train()
        parts = m.from_
        assert parts.image_tower and parts.video_tower and parts.llm
        model, self.tokenizer = load_from_parts(
            parts.image_tower,
            parts.video_tower,
            parts.llm,
            tokenizer=parts.tokenizer,
            architecture=(parts.architecture.vision, parts.architecture.llm) if parts.architecture else None,
            architecture_key="model.from.architecture",
            projector_seed=parts.seed,
            **model_options(self.recipe),
        )
        return model

    def load_tokenizer_for_init(self) -> None:
        m = self.recipe.model
        if m.init is not None and m.init.tokenizer != "train":
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.recipe.resolve_path(m.init.tokenizer)))
        elif m.from_ is not None:
            self.require_model()

    # ------------------------------------------------------------ main

    def execute(self) -> int:
        started = time.perf_counter()
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.check_run_dir()
            (self.run_dir / "recipe.yaml").write_text(dump_recipe(self.recipe))
        D.barrier(self.info)
        self.prepare_data()

        checkpoint = None
        if self.resume:
            path = ckpt.latest_checkpoint(self.run_dir)
            if path is None:
                self.log(f"no checkpoint in {self.run_dir}: starting from the beginning")
            else:
                checkpoint = ckpt.load_checkpoint(path, self.info.rank)
                index = checkpoint.state.stage_index
                stages = self.recipe.stages
                if index >= len(stages) or stages[index].label != checkpoint.state.stage:
                    found = stages[index].label if index < len(stages) else "nothing"
                    raise CheckpointError(
                        f"{path}: saved in stage {index} ({checkpoint.state.stage!r}) but the recipe has "
                        f"{found!r} there; resume with the recipe the run was started with"
                    )
                self.log(f"resuming from {path.name}")
                if self.info.is_main:
                    for name in (METRICS_FILE, BAD_SAMPLES_FILE):
                        truncate_log(self.run_dir / name, checkpoint.state.stage_index, checkpoint.state.step)
                D.barrier(self.info)
        self.load_tokenizer_for_init()

        for index, stage in enumerate(self.recipe.stages):
            done = checkpoint is not None and (
                index < checkpoint.state.stage_index
                or (index == checkpoint.state.stage_index and checkpoint.state.complete)
            )
            current = checkpoint if checkpoint is not None and index == checkpoint.state.stage_index else None
            if isinstance(stage, TrainStage):
                ckpt.seed_everything(stage.seed + 7919 * index)
                self.run_training(index, stage, replay=done, resume=None if done else current)
            else:
                ckpt.seed_everything(7919 * index)
                self.run_tokenizer(index, stage, replay=done)

        if self.recipe.run.export.enabled:
            self.export()
        self.write_summary(time.perf_counter() - started)
        return 0

    def check_run_dir(self) -> None:
        has_checkpoints = bool(ckpt.list_checkpoints(self.run_dir)) or (self.run_dir / ckpt.LATEST).exists()
        if has_checkpoints and not self.resume:
            raise VideoLlavaError(
                f"{self.run_dir} already holds a run; pass --resume to continue it or --output for a new folder"
            )
        saved = self.run_dir / "recipe.yaml"
        if self.resume and saved.exists() and saved.read_text() != dump_recipe(self.recipe):
            self.log(
                f"note: the recipe differs from the one {self.run_dir} was started with; using the new one"
            )
        if not self.resume:
            for name in (METRICS_FILE, BAD_SAMPLES_FILE):
                (self.run_dir / name).unlink(missing_ok=True)

    # ------------------------------------------------------------ stages

    def run_tokenizer(self, index: int, stage: TokenizerStage, replay: bool) -> None:
        out = self.run_dir / "tokenizer"
        if not replay and self.info.is_main:
            assert self.data_root is not None
            records = read_records([self.data_root / name for name in stage.data])
            texts = training_texts(records, self.recipe.model.template)
            tmp = self.run_dir / ".tmp-tokenizer"
            shutil.rmtree(tmp, ignore_errors=True)
            train_tokenizer(
                texts,
                vocab_size=stage.vocab_size,
                out_dir=tmp,
                placeholder_tokens=stage.placeholder_tokens,
                model_max_length=self.recipe.model.model_max_length,
            )
            shutil.rmtree(out, ignore_errors=True)
            tmp.replace(out)
            state = ckpt.TrainerState(stage_index=index, stage=stage.label, step=0, complete=True)
            ckpt.save_checkpoint(self.run_dir, state, {}, keep=self.recipe.run.keep_checkpoints)
            self.log(
                f"[{stage.label}] trained a tokenizer of {stage.vocab_size} tokens on {len(texts)} texts"
            )
        D.barrier(self.info)
        if not (out / "tokenizer.json").exists() and not (out / "tokenizer_config.json").exists():
            raise CheckpointError(f"{out}: the tokenizer stage's output is missing")
        self.tokenizer = AutoTokenizer.from_pretrained(str(out))
        self.results.append(
            {"name": stage.label, "index": index, "kind": "tokenizer", "vocab_size": len(self.tokenizer)}
        )

    def run_training(
        self, index: int, stage: TrainStage, replay: bool, resume: ckpt.Checkpoint | None
    ) -> None:
        self.require_model()
        ctx = self.stage_context(index, stage)
        task, finish = TASK_BUILDERS[stage.kind](self.task_context(), stage)
        if replay:
            weights, state = load_artefact(ctx)
            load_trainable(task.module, weights, str(ctx.artefact_dir))
            extra = state.get("extra", {})
            summary = {
                "name": stage.label,
                "index": index,
                "kind": stage.kind,
                "steps": state.get("step"),
                "final_loss": (extra.get("last_losses") or [None])[-1],
                "mean_loss_last_10": _mean(extra.get("last_losses")),
                "bad_samples": state.get("bad_samples", 0),
                "eval": extra.get("eval", {}),
                "wall_time": extra.get("wall_time"),
                "samples": extra.get("samples"),
            }
            self.log(f"[{stage.label}] finished earlier: weights restored from {ctx.artefact_dir}")
        else:
            result = train_stage(task, stage, ctx, resume)
            summary = {"kind": stage.kind, **result.summary()}
            if result.strategy is not None and result.strategy.shards_model:
                self.model = self.unshard(result.strategy)
                task.module.model = self.model  # only LM objectives shard
        finish(task)
        self.results.append(summary)

    def unshard(self, strategy: D.Strategy) -> VideoLlava:
        """After an FSDP stage: a plain model again, rebuilt from the gathered full state."""
        full = strategy.full_state(all_ranks=True)
        state = {k[len("model.") :]: v for k, v in full.items() if k.startswith("model.")}
        assert self.model is not None
        return build_model(self.model.config, state, torch.float32, "fsdp gather").train()

    # ------------------------------------------------------------ the end

    def export(self) -> None:
        """The finished model in the -hf layout, with tokenizer and preprocessing constants."""
        model = self.require_model()
        if not self.info.is_main:
            D.barrier(self.info)
            return
        dtype = torch.bfloat16 if self.recipe.run.export.dtype == "bfloat16" else torch.float32
        model = model.to(dtype).eval()
        out = self.run_dir / "model"
        tmp = self.run_dir / ".tmp-model"
        shutil.rmtree(tmp, ignore_errors=True)
        transform = media_transform(
            model, self.recipe.model.image_aspect_ratio, self.recipe.model.video_aspect_ratio
        )
        save_bundle(tmp, model, self.tokenizer, transform)
        shutil.rmtree(out, ignore_errors=True)
        tmp.replace(out)
        self.log(f"exported the model to {out}")
        D.barrier(self.info)

    def write_summary(self, wall_time: float) -> None:
        if not self.info.is_main:
            return
        retrieval: dict[str, float] = {}
        for result in self.results:
            retrieval.update({k: v for k, v in (result.get("eval") or {}).items() if "_r1_" in k})
        model_dir = self.run_dir / "model"
        size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) if model_dir.exists() else None
        summary = {
            "recipe": str(self.run_dir / "recipe.yaml"),
            "stages": self.results,
            "retrieval_r1": retrieval,
            "bad_samples": sum(r.get("bad_samples") or 0 for r in self.results),
            "train_wall_time": sum(r.get("wall_time") or 0.0 for r in self.results),
            "wall_time_this_process": wall_time,
            "model_dir": str(model_dir) if model_dir.exists() else None,
            "model_bytes": size,
            "world_size": self.info.world_size,
        }
        ckpt.atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        self.log(f"summary written to {self.run_dir / 'summary.json'}")


def _mean(values: list[float] | None) -> float | None:
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------------------------------- CLI


def default_output(recipe_path: Path) -> Path:
    return Path("runs") / recipe_path.stem


def required_modules(recipe: Recipe) -> list[str]:
    """The optional packages (the `train` extra) this recipe uses: loss plots always, peft for LoRA."""
    lora = any(isinstance(stage, FinetuneStage) and stage.lora is not None for stage in recipe.stages)
    return ["matplotlib", *(["peft"] if lora else [])]


def check_batch_layouts(recipe: Recipe, world_size: int) -> None:
    """Every stage's batch can be cut over this many processes; checked before any work."""
    exact = recipe.distributed.strategy == "deepspeed" and world_size > 1
    for stage in recipe.stages:
        if isinstance(stage, TrainStage):
            batch_layout(stage, world_size, exact=exact)


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    require("train", "train", *required_modules(recipe))
    check_batch_layouts(recipe, D.launched_world_size())
    if recipe.run.threads:
        torch.set_num_threads(recipe.run.threads)
    output = args.output or (
        Path(recipe.run.output_dir) if recipe.run.output_dir else default_output(Path(args.recipe))
    )
    info = D.setup(recipe.distributed.strategy, recipe.distributed.backend)
    try:
        return Run(recipe, info, Path(output), resume=args.resume).execute()
    finally:
        D.teardown(info)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model from a recipe (tokenizer, alignment, projector, finetune stages)",
        description=(
            "Run the stages of a training recipe (YAML). Launch with torchrun for several processes: "
            "torchrun --nproc_per_node N -m videollava train RECIPE.yaml"
        ),
    )
    parser.add_argument("recipe", type=Path, help="recipe YAML file (see configs/)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in the output folder from its latest checkpoint",
    )
    parser.add_argument(
        "--output", type=Path, help="run folder (default: run.output_dir or runs/<recipe name>)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. stage.2.lr=1e-3 or model.init.llm.hidden_size=64 (repeatable)",
    )
    parser.set_defaults(func=run)
