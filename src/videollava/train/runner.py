"""`videollava train RECIPE.yaml`: run a recipe's stages in order, resumable after any interruption.

Stages (see `train.config`): `tokenizer`, `align_image`, `align_video` (LanguageBind-style
alignment of the towers to language), `projector` (stage 1) and `finetune` (stage 2). Each
training stage builds an objective module around the shared model, trains it with
`train.loop.train_stage`, and leaves its final trainable weights in `stages/<i>-<name>/`. A resumed
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from videollava.data.datasets import (
    CaptionDataset,
    ConversationDataset,
    Skipped,
    collate_captions,
    collate_conversations,
)
from videollava.data.records import read_records, training_texts
from videollava.data.sample_media import MediaCache, MediaSpec
from videollava.data.tokenize import IGNORE_INDEX, IMAGE_SLOT, VIDEO_SLOT
from videollava.data.transforms import ImageTransformConfig
from videollava.errors import CheckpointError, VideoLlavaError
from videollava.extras import require
from videollava.model.videollava import Projector, VideoLlava, VideoLlavaConfig
from videollava.model.vision import VisionConfig, VisionTower
from videollava.train import checkpointing as ckpt
from videollava.train import distributed as D
from videollava.train.config import (
    AlignImageStage,
    AlignVideoStage,
    FinetuneStage,
    LLMSpec,
    ModelConfig,
    ProjectorStage,
    Recipe,
    RecipeError,
    TokenizerStage,
    TrainStage,
    VisionSpec,
    batch_layout,
    dump_recipe,
    load_recipe,
)
from videollava.train.loop import (
    BAD_SAMPLES_FILE,
    METRICS_FILE,
    StageContext,
    StageResult,
    Task,
    load_artefact,
    load_trainable,
    train_stage,
    truncate_log,
)

# ---------------------------------------------------------------------------------------- model building


def vision_config(spec: VisionSpec, num_frames: int = 0) -> VisionConfig:
    return VisionConfig(**dataclasses.asdict(spec), num_frames=num_frames)


def text_config(spec: LLMSpec, vocab_size: int, tokenizer: Any = None) -> dict[str, Any]:
    data = {k: v for k, v in dataclasses.asdict(spec).items() if v is not None}
    data["vocab_size"] = spec.vocab_size or vocab_size
    data.setdefault("num_key_value_heads", spec.num_attention_heads)
    data["model_type"] = "llama"
    if tokenizer is not None:
        data["bos_token_id"] = tokenizer.bos_token_id
        data["eos_token_id"] = tokenizer.eos_token_id
        data["pad_token_id"] = tokenizer.pad_token_id
    return data


def padded_vocab(tokenizer: Any) -> int:
    """The tokenizer's size rounded up to a multiple of 64, as the -hf port pads its vocabulary."""
    return -(-len(tokenizer) // 64) * 64


def export_template(recipe: Recipe) -> str:
    """The template the finished model answers in: that of its last instruction stage."""
    for stage in reversed(recipe.stages):
        if isinstance(stage, FinetuneStage):
            return stage.template or recipe.model.template
    return recipe.model.template


def model_config(
    recipe: Recipe, vision: VisionSpec, llm: LLMSpec, vocab_size: int, tokenizer: Any = None
) -> VideoLlavaConfig:
    m = recipe.model

    def token_id(token: str, slot: int) -> int:
        if tokenizer is None:
            return slot
        found = tokenizer.convert_tokens_to_ids(token)
        return slot if found is None or found == tokenizer.unk_token_id else int(found)

    return VideoLlavaConfig(
        vision=vision_config(vision),
        text_config=text_config(llm, vocab_size, tokenizer),
        temporal_frames=m.temporal_frames,
        num_frames=m.num_frames,
        vision_feature_layer=m.vision_feature_layer,
        projector_hidden_act=m.projector_hidden_act,
        image_token_id=token_id("<image>", IMAGE_SLOT),
        video_token_id=token_id("<video>", VIDEO_SLOT),
        pad_token_id=tokenizer.pad_token_id if tokenizer is not None else 0,
        image_aspect_ratio=m.image_aspect_ratio,
        video_aspect_ratio=m.video_aspect_ratio,
        template=export_template(recipe),
    )


def declared_architecture(model: ModelConfig) -> tuple[VisionSpec, LLMSpec]:
    if model.init is not None:
        return model.init.vision, model.init.llm
    assert model.from_ is not None
    if model.from_.architecture is None:
        raise RecipeError("model.from.architecture: needed to build the model without its weights")
    return model.from_.architecture.vision, model.from_.architecture.llm


def build_meta_model(recipe: Recipe, vocab_size: int | None = None) -> VideoLlava:
    """The recipe's model on the meta device: shapes and parameter counts without memory or downloads."""
    vision, llm = declared_architecture(recipe.model)
    vocab = llm.vocab_size or vocab_size
    if vocab is None:
        raise RecipeError(
            "model: the vocabulary size is unknown before the tokenizer exists; pass vocab_size"
        )
    with torch.device("meta"):
        return VideoLlava(model_config(recipe, vision, llm, vocab))


def init_vision_tower(tower: VisionTower, std: float) -> None:
    """CLIP-style init for a tower trained from scratch; temporal modules start as a no-op."""
    with torch.no_grad():
        for module in tower.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Conv2d | nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
        tower.embeddings.class_embedding.normal_(std=std)
        for layer in tower.encoder.layers:
            if hasattr(layer, "temporal_embedding"):
                layer.temporal_embedding.zero_()
                layer.temporal_attn.out_proj.weight.zero_()
                layer.temporal_attn.out_proj.bias.zero_()


def load_from_parts(recipe: Recipe) -> tuple[VideoLlava, Any]:
    """LanguageBind image / video tower folders plus a LLaMA-family LLM, with a fresh projector."""
    from transformers import AutoTokenizer

    from videollava.model.checkpoint import (
        _vision_from_languagebind,
        build_model,
        read_json,
        read_state_dict,
        resolve,
        tower_keys,
    )

    spec = recipe.model.from_
    assert spec is not None and spec.image_tower and spec.video_tower and spec.llm
    image_folder, video_folder, llm_folder = (
        resolve(spec.image_tower),
        resolve(spec.video_tower),
        resolve(spec.llm),
    )
    image_vision, _ = _vision_from_languagebind(image_folder)
    _, frames = _vision_from_languagebind(video_folder)
    llm_data = read_json(llm_folder / "config.json")
    llm = LLMSpec(
        **{
            f.name: llm_data[f.name]
            for f in dataclasses.fields(LLMSpec)
            if f.name in llm_data and llm_data[f.name] is not None
        }
    )
    vision = VisionSpec(
        **{
            f.name: getattr(image_vision, f.name)
            for f in dataclasses.fields(VisionSpec)
            if hasattr(image_vision, f.name)
        }
    )
    if spec.architecture is not None:
        for label, declared, found in (
            ("vision", spec.architecture.vision, vision),
            ("llm", spec.architecture.llm, llm),
        ):
            for f in dataclasses.fields(declared):
                want, got = getattr(declared, f.name), getattr(found, f.name)
                if (
                    want is not None
                    and got is not None
                    and want != got
                    and f.name not in ("initializer_range",)
                ):
                    raise CheckpointError(
                        f"model.from.architecture.{label}.{f.name} is {want!r} but the weights have {got!r}"
                    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(resolve(spec.tokenizer) if spec.tokenizer else llm_folder)
        )
    except Exception as error:
        raise CheckpointError(f"{spec.tokenizer or llm_folder}: no usable tokenizer ({error})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token  # as Video-LLaVA does for LLaMA's tokenizer
    config = model_config(recipe, vision, llm, llm.vocab_size or len(tokenizer), tokenizer)
    config.temporal_frames = frames
    state = tower_keys(
        read_state_dict(image_folder, keep=lambda k: k.startswith("vision_model.")), "image_tower"
    )
    state.update(
        tower_keys(read_state_dict(video_folder, keep=lambda k: k.startswith("vision_model.")), "video_tower")
    )
    state.update({f"language_model.{k}": v for k, v in read_state_dict(llm_folder).items()})
    ckpt.seed_everything(spec.seed)
    projector = Projector(config.vision.hidden_size, llm.hidden_size, config.projector_hidden_act)
    state.update({f"multi_modal_projector.{k}": v for k, v in projector.state_dict().items()})
    model = build_model(config, state, torch.float32, f"{image_folder} + {video_folder} + {llm_folder}")
    return model.train(), tokenizer


# ---------------------------------------------------------------------------------------- objectives


def expand_labels(
    input_ids: list[list[int]], labels: list[list[int]], image_rows: int, video_rows: int
) -> torch.Tensor:
    """Labels laid out like the spliced LLM input: each slot becomes its visual rows (ignored), right padded."""
    rows = []
    for ids, row_labels in zip(input_ids, labels, strict=True):
        out: list[int] = []
        for token, label in zip(ids, row_labels, strict=True):
            if token == IMAGE_SLOT:
                out += [IGNORE_INDEX] * image_rows
            elif token == VIDEO_SLOT:
                out += [IGNORE_INDEX] * video_rows
            else:
                out.append(label)
        rows.append(out)
    width = max(len(r) for r in rows)
    return torch.tensor([r + [IGNORE_INDEX] * (width - len(r)) for r in rows], dtype=torch.long)  # (B, L)


class LMObjective(nn.Module):
    """Next-token loss on answers: returns the sum over supervised tokens and their count."""

    def __init__(self, model: VideoLlava, bos_token_id: int, eval_modules: list[nn.Module]):
        super().__init__()
        self.model = model
        self.bos_token_id = bos_token_id
        self._eval_modules = eval_modules

    def train(self, mode: bool = True) -> LMObjective:
        super().train(mode)
        for module in self._eval_modules:
            module.eval()
        return self

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        if batch["num_samples"] == 0:
            # A rank with no data this step still joins the gradient all-reduce, contributing zero.
            size = self.model.config.vision.image_size
            image = torch.zeros(1, 3, size, size, device=self.model.device)
            out = self.model(input_ids=[[self.bos_token_id, IMAGE_SLOT]], images=image)
            return out.logits.sum() * 0.0, 0
        out = self.model(batch["input_ids"], batch["images"], batch["videos"])
        frames = batch["videos"].shape[1] if batch["videos"] is not None else self.model.config.num_frames
        labels = expand_labels(
            batch["input_ids"],
            batch["labels"],
            self.model.config.image_tokens,
            self.model.config.video_tokens(frames),
        ).to(out.logits.device)
        logits = out.logits[:, :-1]  # (B, L-1, V): position t predicts token t+1
        targets = labels[:, 1:]
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        if batch["images"] is None and batch["videos"] is None:
            # Text-only batch: touch the projector anyway so it gets a (zero) gradient on every rank and
            # every step, as under DeepSpeed; FSDP and DDP then see the same parameters used everywhere.
            projector = self.model.multi_modal_projector
            probe = torch.zeros(1, projector.linear_1.in_features, device=logits.device)
            loss = loss + 0.0 * projector(probe).sum()
        return loss, int((targets != IGNORE_INDEX).sum())


class AlignObjective(nn.Module):
    """Contrastive loss of one micro-batch, weighted by its size (the loop divides by the total)."""

    def __init__(
        self,
        aligner: nn.Module,
        tokenizer: Any,
        max_length: int,
        dummy_shape: tuple[int, ...],
        region_vocabulary: tuple[list[str], list[str]] | None = None,
    ):
        from videollava.train.contrastive import RegionVocabulary

        super().__init__()
        self.aligner = aligner
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.dummy_shape = dummy_shape
        self.regions = (
            None
            if region_vocabulary is None
            else RegionVocabulary(region_vocabulary[0], tokenizer, max_length, region_vocabulary[1])
        )

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        from videollava.train.contrastive import tokenize_captions

        device = self.aligner.logit_scale.device
        if batch["num_samples"] == 0:
            # A rank with no data this step still joins the gradient all-reduce, contributing zero.
            pixels = torch.zeros(1, *self.dummy_shape, device=device)
            ids = torch.full((1, 1), self.tokenizer.eos_token_id, dtype=torch.long, device=device)
            loss = self.aligner.loss(pixels, ids, torch.ones_like(ids))
            return loss * 0.0, 0
        ids, mask = tokenize_captions(self.tokenizer, batch["captions"], self.max_length)
        pixels = batch["pixels"].to(device)
        regions = (
            None
            if self.regions is None
            else self.regions.batch(batch["regions"], device, self.aligner.region_frames(pixels))
        )
        loss = self.aligner.loss(pixels, ids.to(device), mask.to(device), regions)
        n = len(batch["captions"])
        return loss * n, n


def activation_checkpointing(llm: nn.Module, enabled: bool) -> None:
    """Recompute LLM activations in the backward pass (transformers 5 name, 4.x name as fallback)."""
    if hasattr(llm, "activation_checkpointing_enable"):
        if enabled:
            llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            llm.activation_checkpointing_disable()
    elif enabled:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        llm.gradient_checkpointing_disable()


def submodule_lr(stage_lr: float, rates: dict[str, float | None]) -> Callable[[str], float] | None:
    """Parameter name -> lr: a submodule's own rate from `rates` where set, else the stage's."""
    markers = {f".{submodule}.": lr for submodule, lr in rates.items() if lr is not None}
    if not markers:
        return None

    def lr_for(name: str) -> float:
        dotted = f".{name}"
        return next((lr for marker, lr in markers.items() if marker in dotted), stage_lr)

    return lr_for


def set_trainable(module: nn.Module, trainable: list[nn.Parameter]) -> None:
    wanted = {id(p) for p in trainable}
    for p in module.parameters():
        p.requires_grad_(id(p) in wanted)


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
        self.text_encoder: nn.Module | None = None
        self.image_aligner: nn.Module | None = None
        self.video_aligner: nn.Module | None = None
        self.region_vocab: dict[str, Any] = {}  # modality -> the region names of its alignment stage
        self.results: list[dict[str, Any]] = []
        self.data_root: Path | None = None
        self.media_cache = MediaCache() if recipe.run.cache_media else None

    # ------------------------------------------------------------ helpers

    def log(self, message: str) -> None:
        if self.info.is_main:
            print(message, file=sys.stderr, flush=True)

    def data_path(self, name: str) -> Path:
        path = Path(name)
        if path.is_absolute():
            return path
        assert self.data_root is not None
        return self.data_root / path

    def media_root(self, stage: TrainStage) -> Path:
        if stage.media_root:
            return self.recipe.resolve_path(stage.media_root)
        if self.recipe.data.media_root:
            return self.recipe.resolve_path(self.recipe.data.media_root)
        assert self.data_root is not None
        return self.data_root / "media"

    def transform(self, aspect: str) -> ImageTransformConfig:
        size = self.require_model().config.vision.image_size
        return ImageTransformConfig(
            size=size,
            crop_size=size,
            image_aspect_ratio=aspect,
            video_aspect_ratio=self.recipe.model.video_aspect_ratio,
        )

    def media_spec(self, stage: TrainStage) -> MediaSpec:
        model = self.require_model()
        return MediaSpec(
            root=self.media_root(stage),
            transform=self.transform(stage.image_aspect_ratio or self.recipe.model.image_aspect_ratio),
            num_frames=stage.num_frames or self.recipe.model.num_frames,
            image_rows=model.config.image_tokens,
            frame_rows=model.config.vision.num_patches + 1,
            cache=self.media_cache,
        )

    def require_model(self) -> VideoLlava:
        if self.model is None:
            self.model = self.build_model()
        return self.model

    def context(self, index: int, stage: TrainStage) -> StageContext:
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
                from videollava.shapesworld.generate import generate

                g = data.generate
                self.log(f"generating ShapesWorld data into {self.data_root}")
                generate(
                    self.data_root,
                    seed=g.seed,
                    n_images=g.images,
                    n_videos=g.videos,
                    n_test_images=g.test_images,
                    n_test_videos=g.test_videos,
                    min_size=g.min_size,
                    max_size=g.max_size,
                    workers=g.workers,
                    twins=g.twins,
                    mirrors=g.mirrors,
                )
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
            config = model_config(
                self.recipe, m.init.vision, m.init.llm, padded_vocab(self.tokenizer), self.tokenizer
            )
            model = VideoLlava(config)
            init_vision_tower(model.image_tower, m.init.vision_init_std)
            init_vision_tower(model.video_tower, m.init.vision_init_std)
            return model.train()
        assert m.from_ is not None
        if m.from_.checkpoint:
            from transformers import AutoTokenizer

            from videollava.model.checkpoint import load_weights

            model, folder = load_weights(m.from_.checkpoint, torch.float32)
            self.tokenizer = AutoTokenizer.from_pretrained(str(m.from_.tokenizer or folder))
            model.config.template = export_template(self.recipe)
            return model.train()
        model, self.tokenizer = load_from_parts(self.recipe)
        return model

    def load_tokenizer_for_init(self) -> None:
        m = self.recipe.model
        if m.init is not None and m.init.tokenizer != "train":
            from transformers import AutoTokenizer

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
            ckpt.seed_everything(getattr(stage, "seed", 0) + 7919 * index)
            if isinstance(stage, TokenizerStage):
                self.run_tokenizer(index, stage, replay=done)
            else:
                self.run_training(index, stage, replay=done, resume=None if done else current)

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
        from transformers import AutoTokenizer

        from videollava.train.tokenizer import train_tokenizer

        out = self.run_dir / "tokenizer"
        if not replay and self.info.is_main:
            records = read_records([self.data_path(name) for name in stage.data])
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
        ctx = self.context(index, stage)
        if isinstance(stage, AlignImageStage):
            task, finish = self.align_image_task(stage)
        elif isinstance(stage, AlignVideoStage):
            task, finish = self.align_video_task(stage)
        elif isinstance(stage, ProjectorStage):
            task, finish = self.lm_task(stage, template=stage.template, train_llm=stage.train_llm, lora=None)
        elif isinstance(stage, FinetuneStage):
            task, finish = self.lm_task(
                stage, template=stage.template or self.recipe.model.template, train_llm=True, lora=stage.lora
            )
        else:
            raise RecipeError(f"stages[{index}]: unknown stage kind {stage.kind!r}")

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
            result: StageResult = train_stage(task, stage, ctx, resume)
            summary = {"kind": stage.kind, **result.summary()}
            if result.wrapped is not None and result.wrapped.strategy == "fsdp":
                self.unshard(result.wrapped)
                task = dataclasses.replace(task, module=_rebind(task.module, self.model))
        finish(task)
        self.results.append(summary)

    def unshard(self, wrapped: D.Wrapped) -> None:
        """After an FSDP stage: a plain model again, rebuilt from the gathered full state."""
        from videollava.model.checkpoint import build_model

        full = D.full_state_dict(wrapped, all_ranks=True)
        state = {k[len("model.") :]: v for k, v in full.items() if k.startswith("model.")}
        assert self.model is not None
        self.model = build_model(self.model.config, state, torch.float32, "fsdp gather").train()

    # ------------------------------------------------------------ alignment

    def caption_eval(self, stage: TrainStage, modality: str, regions: bool = False) -> CaptionDataset | None:
        if stage.eval is None:
            return None
        path = self.data_path(stage.eval.data)
        if not path.exists():
            self.log(f"[{stage.label}] no held-out file {path}: retrieval is not evaluated")
            return None
        records = read_records([path], stage.eval.max_samples)
        return CaptionDataset(records, self.media_spec(stage), modality, regions=regions)

    def retrieval(
        self, aligner: nn.Module, dataset: CaptionDataset | None, batch_size: int
    ) -> dict[str, float]:
        """Held-out R@1 both ways and, with a region loss, how often each region's name is picked."""
        from videollava.train.contrastive import retrieval_recall_at_1, tokenize_captions

        if dataset is None or len(dataset) == 0:
            return {}
        device = aligner.logit_scale.device
        vocabulary = self.region_vocab.get(dataset.modality) if dataset.regions else None
        media, texts, captions = [], [], []
        region_hits, region_total, motion_hits, motion_total = 0, 0, 0, 0
        items = [dataset[i] for i in range(len(dataset))]
        good = [s for s in items if not isinstance(s, Skipped)]
        max_length = aligner.text_encoder.config.max_length
        for start in range(0, len(good), batch_size):
            batch = collate_captions(good[start : start + batch_size])
            ids, mask = tokenize_captions(self.tokenizer, batch["captions"], max_length)
            pixels = batch["pixels"].to(device)
            if vocabulary is None:
                media.append(aligner.embed_media(pixels).float())
            else:  # one tower pass for both the pooled embedding and the patches
                pooled, patches = aligner.tower_pass(pixels)
                media.append(aligner.embed_pooled(pooled).float())
            texts.append(aligner.embed_text(ids.to(device), mask.to(device)).float())
            captions += batch["captions"]
            if vocabulary is not None:
                # names the training data never had cannot be picked: they are left out
                known = [[r for r in per_media if vocabulary.knows(r)] for per_media in batch["regions"]]
                named = vocabulary.batch(known, device, aligner.region_frames(pixels))
                if named.target.numel():
                    logits = aligner.region_logits(patches, named)
                    region_hits += int((logits.argmax(dim=-1) == named.target).sum())
                    region_total += named.target.numel()
                moving = named.motion_target[named.motion_target >= 0]
                if named.motion_ids is not None and moving.numel():
                    logits = aligner.motion_logits(patches, named)
                    motion_hits += int((logits.argmax(dim=-1) == moving).sum())
                    motion_total += moving.numel()
        recall = retrieval_recall_at_1(torch.cat(media), torch.cat(texts), captions)
        prefix = dataset.modality
        out = {f"{prefix}_r1_{k}": v for k, v in recall.items()} | {f"{prefix}_eval_pairs": float(len(good))}
        if region_total:
            out[f"{prefix}_region_name_acc"] = region_hits / region_total
        if motion_total:
            out[f"{prefix}_region_motion_acc"] = motion_hits / motion_total
        return out

    def region_loss(self, stage: AlignImageStage | AlignVideoStage) -> Any:
        from videollava.train.contrastive import RegionLoss

        spec = stage.region_loss
        if spec is None:
            return None
        return RegionLoss(
            spec.weight,
            spec.scale,
            self.require_model().config.vision_feature_layer,
            spec.pooling,
            spec.per_frame,
            spec.motion_weight,
        )

    def region_vocabulary(
        self, stage: AlignImageStage | AlignVideoStage, dataset: CaptionDataset
    ) -> tuple[list[str], list[str]] | None:
        """The names, and the motion phrases when the stage weighs them, its regions pick from."""
        if stage.region_loss is None:
            return None
        names = dataset.region_texts()
        if not names:
            raise RecipeError(
                f"stage {stage.label}: region_loss needs entries with 'regions' in {', '.join(stage.data)}"
            )
        motions = dataset.region_motions() if stage.region_loss.motion_weight > 0 else []
        if stage.region_loss.motion_weight > 0 and not motions:
            raise RecipeError(
                f"stage {stage.label}: region_loss.motion_weight needs regions with a 'motion' in "
                f"{', '.join(stage.data)}"
            )
        self.log(
            f"[{stage.label}] region loss over {len(names)} names"
            + (f", {len(motions)} motions" if motions else "")
        )
        return names, motions

    def align_image_task(self, stage: AlignImageStage) -> tuple[Task, Any]:
        from videollava.train.contrastive import ImageTextAligner, TextEncoder, TextEncoderConfig

        model = self.require_model()
        spec = stage.text_encoder
        self.text_encoder = TextEncoder(
            TextEncoderConfig(
                vocab_size=len(self.tokenizer),
                hidden_size=spec.hidden_size,
                num_layers=spec.num_layers,
                num_heads=spec.num_heads,
                max_length=spec.max_length,
                projection_dim=stage.projection_dim,
                pooling=spec.pooling,
                token_init_std=spec.token_init_std,
            )
        )
        regions = stage.region_loss
        aligner = ImageTextAligner(
            model.image_tower, self.text_encoder, stage.projection_dim, self.region_loss(stage)
        )
        self.image_aligner = aligner
        model.image_tower.encoder.gradient_checkpointing = stage.gradient_checkpointing
        size = model.config.vision.image_size
        records = read_records([self.data_path(n) for n in stage.data], stage.max_samples)
        dataset = CaptionDataset(records, self.media_spec(stage), "image", regions=regions is not None)
        objective = AlignObjective(
            aligner, self.tokenizer, spec.max_length, (3, size, size), self.region_vocabulary(stage, dataset)
        )
        set_trainable(objective, aligner.trainable_parameters())
        self.region_vocab = {"image": objective.regions} if objective.regions else {}
        held_out = self.caption_eval(stage, "image", regions=regions is not None)
        batch = stage.eval.batch_size if stage.eval else 32

        def evaluate(_: nn.Module) -> dict[str, float]:
            return self.retrieval(aligner, held_out, batch)

        lr_for = submodule_lr(stage.lr, {"text_encoder": stage.text_encoder_lr})
        return self.alignment_task(model.image_tower, aligner, objective, dataset, evaluate, stage, lr_for)

    def align_video_task(self, stage: AlignVideoStage) -> tuple[Task, Any]:
        from videollava.train.contrastive import VideoTextAligner, init_video_tower_from_image

        model = self.require_model()
        if self.text_encoder is None or self.image_aligner is None:
            raise RecipeError(f"stage {stage.label}: align_video needs a finished align_image stage")
        frames = model.config.temporal_frames
        if frames < 1:
            raise RecipeError("model.temporal_frames: the video tower needs temporal modules (>= 1) to align")
        fresh = init_video_tower_from_image(model.image_tower, frames, stage.temporal_embedding_std)
        model.video_tower.load_state_dict(fresh.state_dict())
        projection = self.image_aligner.visual_projection if stage.init_projection_from_image else None
        regions = stage.region_loss
        aligner = VideoTextAligner(
            model.video_tower,
            self.text_encoder,
            self.image_aligner.visual_projection.out_features,
            projection,
            self.region_loss(stage),
            region_projection_init=self.image_aligner.region_projection,
        )
        self.video_aligner = aligner
        model.video_tower.encoder.gradient_checkpointing = stage.gradient_checkpointing
        size = model.config.vision.image_size
        num_frames = stage.num_frames or self.recipe.model.num_frames
        records = read_records([self.data_path(n) for n in stage.data], stage.max_samples)
        dataset = CaptionDataset(records, self.media_spec(stage), "video", regions=regions is not None)
        objective = AlignObjective(
            aligner,
            self.tokenizer,
            self.text_encoder.config.max_length,
            (num_frames, 3, size, size),
            self.region_vocabulary(stage, dataset),
        )
        set_trainable(objective, aligner.trainable_parameters())
        if objective.regions:
            self.region_vocab["video"] = objective.regions
        held_images = self.caption_eval(stage, "image", regions="image" in self.region_vocab)
        held_videos = self.caption_eval(stage, "video", regions=regions is not None)
        batch = stage.eval.batch_size if stage.eval else 32
        image_aligner = self.image_aligner

        def evaluate(_: nn.Module) -> dict[str, float]:
            image_aligner.eval()
            return self.retrieval(image_aligner, held_images, batch) | self.retrieval(
                aligner, held_videos, batch
            )

        return self.alignment_task(model.video_tower, aligner, objective, dataset, evaluate, stage)

    @staticmethod
    def alignment_task(
        tower: nn.Module,
        aligner: nn.Module,
        objective: nn.Module,
        dataset: CaptionDataset,
        evaluate: Any,
        stage: TrainStage,
        lr_for: Callable[[str], float] | None = None,
    ) -> tuple[Task, Any]:
        """The task of a contrastive stage, and what to undo when it ends (the tower stays frozen)."""

        def finish(task: Task) -> None:
            tower.encoder.gradient_checkpointing = False
            set_trainable(task.module, [])
            aligner.eval()

        task = Task(
            module=objective,
            dataset=dataset,
            collate_fn=collate_captions,
            lengths=dataset.lengths,
            modalities=dataset.modalities,
            groups=dataset.groups,
            evaluate=evaluate,
            sampler_mode=stage.sampler_mode,
            lr_for=lr_for,
        )
        return task, finish

    # ------------------------------------------------------------ LLM stages

    def lm_task(self, stage: TrainStage, template: str, train_llm: bool, lora: Any) -> tuple[Task, Any]:
        model = self.require_model()
        model.requires_grad_(False)
        if lora is not None:
            if self.recipe.distributed.strategy == "fsdp" and self.info.enabled:
                raise RecipeError(f"stage {stage.label}: LoRA with strategy fsdp is not supported; use ddp")
            from peft import LoraConfig as PeftLoraConfig
            from peft import get_peft_model

            model.language_model = get_peft_model(
                model.language_model,
                PeftLoraConfig(
                    r=lora.r,
                    lora_alpha=lora.alpha,
                    lora_dropout=lora.dropout,
                    target_modules=list(lora.target_modules),
                    bias="none",
                ),
            )
        elif train_llm:
            model.language_model.requires_grad_(True)
        train_projector = getattr(stage, "train_projector", True)
        model.multi_modal_projector.requires_grad_(train_projector)
        tower_lr = getattr(stage, "tower_lr", None)
        towers = [model.image_tower, model.video_tower]
        if tower_lr is not None:
            for tower in towers:
                tower.requires_grad_(True)
        llm = model.language_model
        if stage.gradient_checkpointing:
            activation_checkpointing(llm, True)
        objective = LMObjective(model, self.tokenizer.bos_token_id, towers)
        records = read_records([self.data_path(n) for n in stage.data], stage.max_samples)
        max_length = min(self.recipe.model.model_max_length, model.max_context)
        media = self.media_spec(stage)
        dataset = ConversationDataset(records, media, self.tokenizer, template, max_length)
        held_out = None
        if stage.eval is not None:
            path = self.data_path(stage.eval.data)
            if path.exists():
                held_out = ConversationDataset(
                    read_records([path], stage.eval.max_samples), media, self.tokenizer, template, max_length
                )
            else:
                self.log(f"[{stage.label}] no held-out file {path}: eval loss is not computed")

        def evaluate(module: nn.Module) -> dict[str, float]:
            if held_out is None:
                return {}
            total, count = 0.0, 0
            items = [held_out[i] for i in range(len(held_out))]
            good = [s for s in items if not isinstance(s, Skipped)]
            size = stage.eval.batch_size if stage.eval else 8
            for start in range(0, len(good), size):
                loss, n = module(collate_conversations(good[start : start + size]))
                total += float(loss)
                count += n
            return {"eval_loss": total / max(count, 1), "eval_tokens": float(count)}

        def finish(task: Task) -> None:
            m = self.require_model()
            if stage.gradient_checkpointing:
                activation_checkpointing(m.language_model, False)
            if lora is not None:
                m.language_model = m.language_model.merge_and_unload()
            m.requires_grad_(False)

        task = Task(
            module=objective,
            dataset=dataset,
            collate_fn=collate_conversations,
            lengths=dataset.lengths,
            modalities=dataset.modalities,
            groups=dataset.groups,
            lr_for=submodule_lr(
                stage.lr,
                {
                    "multi_modal_projector": getattr(stage, "projector_lr", None),
                    "image_tower": tower_lr,
                    "video_tower": tower_lr,
                },
            ),
            evaluate=evaluate if held_out is not None else None,
            sampler_mode=stage.sampler_mode,
            fsdp_capable=True,
            sum_loss=True,
            # A batch of images alone leaves a trained video tower without gradients, and the reverse.
            find_unused_parameters=bool(self.recipe.distributed.find_unused_parameters)
            or tower_lr is not None,
        )
        return task, finish

    # ------------------------------------------------------------ the end

    def export(self) -> None:
        """The finished model in the -hf layout, with tokenizer and preprocessing constants."""
        from videollava.infer.pipeline import Pipeline

        model = self.require_model()
        if not self.info.is_main:
            D.barrier(self.info)
            return
        dtype = torch.bfloat16 if self.recipe.run.export.dtype == "bfloat16" else torch.float32
        model = model.to(dtype).eval()
        out = self.run_dir / "model"
        tmp = self.run_dir / ".tmp-model"
        shutil.rmtree(tmp, ignore_errors=True)
        pipeline = Pipeline(
            model,
            self.tokenizer,
            self.transform(self.recipe.model.image_aspect_ratio),
            template=model.config.template,
        )
        pipeline.save_pretrained(tmp)
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


def _rebind(objective: nn.Module, model: VideoLlava | None) -> nn.Module:
    if isinstance(objective, LMObjective) and model is not None:
        objective.model = model
    return objective


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
