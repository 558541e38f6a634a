"""Training recipes: typed dataclasses read from one YAML file.

A recipe names the model (a fresh small one under `init:`, or pretrained parts under `from:`), the
data, and an ordered list of stages. Loading checks every key and type against the dataclasses
below, so a typo fails before any work starts, with the key's full location in the message.
Overrides from the command line (`--set stage.2.lr=1e-3`) are applied to the YAML before checking.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from videollava.errors import VideoLlavaError
from videollava.model.build import LLMConfig

# How non-square media reach the square tower input (data.transforms.ASPECT_MODES).
AspectRatio = Literal["pad", "crop", "squash"]


class RecipeError(VideoLlavaError):
    """A recipe that cannot be run as written; the message names the key at fault."""


# ---------------------------------------------------------------------------------------- model


@dataclass
class VisionSpec:
    """CLIP ViT shape of both towers (the video tower adds temporal modules of `temporal_frames` rows)."""

    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    patch_size: int = 8
    image_size: int = 64
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu"


@dataclass
class InitConfig:
    """A fresh model of the given shape, randomly initialised from `seed`."""

    vision: VisionSpec = field(default_factory=VisionSpec)
    llm: LLMConfig = field(default_factory=LLMConfig)
    # "train": the tokenizer a `tokenizer` stage trains on the data; otherwise a folder or hub id.
    tokenizer: str = "train"
    seed: int = 0
    # Std of the normal init of the towers' linear and embedding weights (CLIP-style).
    vision_init_std: float = 0.02


@dataclass
class ArchitectureSpec:
    """The shape the pretrained parts are expected to have: lets the model be built without weights."""

    vision: VisionSpec
    llm: LLMConfig


@dataclass
class FromConfig:
    """Pretrained parts: a whole Video-LLaVA checkpoint, or LanguageBind towers plus a LLaMA LLM."""

    checkpoint: str | None = None
    image_tower: str | None = None
    video_tower: str | None = None
    llm: str | None = None
    # Defaults to the checkpoint's or the LLM's own tokenizer.
    tokenizer: str | None = None
    architecture: ArchitectureSpec | None = None
    # Seed of the fresh projector when only towers and LLM are given.
    seed: int = 0


@dataclass
class ModelConfig:
    init: InitConfig | None = None
    from_: FromConfig | None = field(default=None, metadata={"key": "from"})
    # Rows of the video tower's temporal embedding (frames it is built for).
    temporal_frames: int = 8
    num_frames: int = 8
    vision_feature_layer: int = -2
    image_aspect_ratio: AspectRatio = "pad"
    video_aspect_ratio: AspectRatio = "crop"
    template: str = "vicuna_v1"
    model_max_length: int = 2048
    projector_hidden_act: str = "gelu"

    def architecture(self) -> tuple[VisionSpec, LLMConfig]:
        """The declared shape of the towers and of the LLM."""
        if self.init is not None:
            return self.init.vision, self.init.llm
        if self.from_ is None or self.from_.architecture is None:
            raise RecipeError("model.from.architecture: needed to build the model without its weights")
        return self.from_.architecture.vision, self.from_.architecture.llm


# ---------------------------------------------------------------------------------------- data


@dataclass
class GenerateConfig:
    """ShapesWorld data generated into the run folder (once; reused on resume)."""

    images: int = 2000
    videos: int = 1000
    test_images: int = 150
    test_videos: int = 150
    seed: int = 0
    min_size: int = 96
    max_size: int = 160
    workers: int = 1
    twins: float = 0.0  # fraction of training media with a contrast twin (see shapesworld.contrast_twin)
    mirrors: float = 0.0  # fraction of training images with a mirrored twin (see shapesworld.mirror_twin)


@dataclass
class DataConfig:
    # Folder with the JSON files; relative stage `data` paths resolve against it. Null with
    # `generate` means "<run dir>/data".
    root: str | None = None
    # Folder the media paths inside the JSON are relative to (default "<root>/media").
    media_root: str | None = None
    generate: GenerateConfig | None = None


# ---------------------------------------------------------------------------------------- stages


@dataclass
class LoraConfig:
    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class TextEncoderSpec:
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    max_length: int = 64
    pooling: Literal["eos", "mean"] = "eos"  # see contrastive.TextEncoderConfig
    token_init_std: float = 0.02


@dataclass
class RegionLossSpec:
    """Ground the data's region names (entries' ``regions``) in the patches their boxes cover."""

    weight: float = 1.0  # of the region loss beside the caption loss
    scale: float = 30.0  # fixed logit scale of region-name similarities
    # "box": the box's mean patch names the region; "patch": each of its patches does (see
    # contrastive.RegionLoss)
    pooling: Literal["box", "patch"] = "box"
    # videos: each frame's patches under the object in that frame (entries' region ``track``)
    # name it, instead of the frames' mean under the whole-clip box
    per_frame: bool = False
    # videos: the weight of a term where the mean of a region's patches over its whole-clip box and
    # all frames must pick its ``motion`` phrase ("moving left", "standing still") (0: none)
    motion_weight: float = 0.0


@dataclass
class EvalConfig:
    """Held-out evaluation: retrieval R@1 for alignment stages, mean loss for LLM stages."""

    data: str = "test_captions.json"
    every: int = 0  # steps; 0 = only at the end of the stage
    max_samples: int | None = None
    batch_size: int = 32


@dataclass
class Stage:
    kind: str
    name: str | None = None

    @property
    def label(self) -> str:
        return self.name or self.kind


@dataclass
class TokenizerStage(Stage):
    """Train a byte-level BPE tokenizer on the data's texts."""

    data: list[str] = field(default_factory=lambda: ["captions.json", "instruct.json"])
    vocab_size: int = 1000
    placeholder_tokens: bool = True


@dataclass
class TrainStage(Stage):
    """Everything a training stage shares: data, batch arithmetic, optimiser, schedule, precision."""

    data: list[str] = field(default_factory=list)
    media_root: str | None = None
    max_samples: int | None = None
    lr: float = 1e-3
    batch_size: int = 32  # global: the samples of one optimiser step, over all processes
    micro_batch_size: int = 8  # the most samples a rank runs in one forward (see batch_layout)
    epochs: int = 1
    max_steps: int | None = None
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    bf16: bool = True
    gradient_checkpointing: bool = False
    num_frames: int | None = None  # default: model.num_frames
    image_aspect_ratio: AspectRatio | None = None  # default: model.image_aspect_ratio
    bad_samples: Literal["skip", "fail"] = "skip"
    sampler: Literal["mixed", "grouped"] | None = None  # default depends on the stage kind
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 0  # steps; 0 = only at the end of the stage
    num_workers: int = 0
    eval: EvalConfig | None = None
    # DeepSpeed JSON for this stage (strategy deepspeed); default: distributed.deepspeed_config.
    deepspeed_config: str | None = None

    @property
    def default_sampler(self) -> str:
        return "mixed"

    @property
    def sampler_mode(self) -> str:
        return self.sampler or self.default_sampler


@dataclass
class AlignImageStage(TrainStage):
    """Contrastive image-caption training of the image tower with a fresh text encoder."""

    data: list[str] = field(default_factory=lambda: ["captions.json"])
    text_encoder: TextEncoderSpec = field(default_factory=TextEncoderSpec)
    projection_dim: int = 128
    # The text encoder's own rate; default: lr. At 0 its weights stay as they are, but its gradients
    # still count in the stage's gradient clipping (see configs/shapesworld.yaml). A tenth of lr
    # measured higher retrieval R@1 on ShapesWorld but no better shape features (see reports/).
    text_encoder_lr: float | None = None
    region_loss: RegionLossSpec | None = None
    eval: EvalConfig | None = field(default_factory=EvalConfig)


@dataclass
class AlignVideoStage(TrainStage):
    """Contrastive video-caption training of the temporal modules against the frozen text encoder."""

    data: list[str] = field(default_factory=lambda: ["captions.json"])
    # Start the video projection from the aligned image projection (else fresh).
    init_projection_from_image: bool = True
    # Std of the initial temporal embedding. 0 (LanguageBind's no-op start) keeps the fresh tower
    # symmetric in time; a small value breaks that symmetry (see init_video_tower_from_image).
    temporal_embedding_std: float = 0.0
    # Region names of videos say how each object moves; the region head starts from the image
    # stage's when that stage had one.
    region_loss: RegionLossSpec | None = None
    eval: EvalConfig | None = field(default_factory=EvalConfig)


@dataclass
class ProjectorStage(TrainStage):
    """Stage 1: only the projector learns, on single-turn captions of images and videos."""

    data: list[str] = field(default_factory=lambda: ["captions.json"])
    template: str = "plain"
    # The paper freezes its pretrained LLM here. A from-scratch LLM (ShapesWorld) knows no language
    # yet, so a small recipe may let it learn captions in this stage too.
    train_llm: bool = False


@dataclass
class FinetuneStage(TrainStage):
    """Stage 2: LLM (fully or through LoRA) and projector on multi-turn instructions."""

    data: list[str] = field(default_factory=lambda: ["instruct.json"])
    lr: float = 2e-5
    template: str | None = None  # default: model.template
    lora: LoraConfig | None = None
    projector_lr: float | None = None  # default: lr
    train_projector: bool = True
    # The paper keeps both towers frozen here (None). A rate trains the image and video towers
    # too, so the answers' loss reaches the patch features: a tower aligned at small scale may
    # lack what the questions ask (ShapesWorld: shape and motion, see reports/).
    tower_lr: float | None = None

    @property
    def default_sampler(self) -> str:
        return "grouped"


STAGE_KINDS: dict[str, type[Stage]] = {
    "tokenizer": TokenizerStage,
    "align_image": AlignImageStage,
    "align_video": AlignVideoStage,
    "projector": ProjectorStage,
    "finetune": FinetuneStage,
}


# ---------------------------------------------------------------------------------------- run


@dataclass
class ExportConfig:
    enabled: bool = True
    dtype: Literal["bfloat16", "float32"] = "bfloat16"


@dataclass
class RunConfig:
    output_dir: str | None = None  # default: runs/<recipe file stem>
    keep_checkpoints: int = 2
    progress: bool = True  # tqdm bar on stderr (rank 0)
    threads: int | None = None  # torch intra-op threads per process
    # Keep preprocessed media in memory across epochs and stages (pays off with num_workers: 0 and
    # a dataset that fits in RAM; each loader worker would hold a copy of its own).
    cache_media: bool = False
    export: ExportConfig = field(default_factory=ExportConfig)


@dataclass
class DistributedConfig:
    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    deepspeed_config: str | None = None
    # DDP's search for parameters a forward did not use; not needed by the stages here (text-only
    # batches still touch the projector), so off unless a custom objective needs it.
    find_unused_parameters: bool = False


@dataclass
class Recipe:
    model: ModelConfig
    stages: list[Stage]
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    # Where relative paths of the recipe resolve when the working directory does not have them.
    source_dir: str = field(default=".", metadata={"internal": True})

    def export_template(self) -> str:
        """The template the finished model answers in: that of its last instruction stage."""
        for stage in reversed(self.stages):
            if isinstance(stage, FinetuneStage):
                return stage.template or self.model.template
        return self.model.template

    def resolve_path(self, value: str) -> Path:
        """A path as written if it exists from the working directory, else relative to the recipe file."""
        path = Path(os.path.expanduser(value))
        if path.is_absolute() or path.exists():
            return path
        beside = Path(self.source_dir) / path
        return beside if beside.exists() else path

    def to_dict(self) -> dict[str, Any]:
        return _dump(self)


# ---------------------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class BatchLayout:
    """How a stage cuts each global batch: on every rank, `accumulation` micro-batches of at most
    `micro_batch_size` samples (trailing ones may hold fewer, or none)."""

    accumulation: int
    micro_batch_size: int


def batch_layout(stage: TrainStage, world_size: int, exact: bool = False) -> BatchLayout:
    """The fewest micro-batches per rank that keep each within the stage's `micro_batch_size`.

    Every optimiser step trains on the same global batch of `batch_size` samples, in the same
    order, whatever the number of processes: each rank takes a contiguous share (shares differ by
    one at most) and cuts it into equal micro-batches. So `batch_size` 128 with `micro_batch_size`
    128 is one micro-batch of 128 in one process and one of 64 on each of two. Language-model
    losses are sums normalised over the whole global batch, so the update does not depend on the
    cut; a contrastive loss compares the samples of one micro-batch, so its negatives do.

    `exact` (DeepSpeed, whose `train_batch_size` must equal micro x accumulation x world size):
    every rank gets the same number of samples, which fails only when `world_size` does not
    divide `batch_size`.
    """
    share = -(-stage.batch_size // world_size)  # the largest rank's share
    fewest = -(-share // stage.micro_batch_size)
    if exact:
        if stage.batch_size % world_size:
            below = stage.batch_size // world_size * world_size
            sizes = " or ".join(str(n) for n in (below, below + world_size) if n > 0)
            raise RecipeError(
                f"stages[{stage.label}]: batch_size {stage.batch_size} cannot be split evenly over "
                f"{world_size} processes, which DeepSpeed needs; run a number of processes that divides "
                f"it, or set a batch size they divide: --set stage.{stage.label}.batch_size={sizes}"
            )
        accumulation = next(a for a in range(fewest, share + 1) if share % a == 0)
    else:
        accumulation = fewest
    return BatchLayout(accumulation, -(-share // accumulation))


def validate(recipe: Recipe) -> None:
    """Checks across fields that types alone cannot express."""
    model = recipe.model
    if (model.init is None) == (model.from_ is None):
        raise RecipeError("model: give exactly one of 'init' (a fresh model) or 'from' (pretrained parts)")
    if model.from_ is not None:
        f = model.from_
        if f.checkpoint is None and not (f.image_tower and f.video_tower and f.llm):
            raise RecipeError(
                "model.from: give 'checkpoint', or all of 'image_tower', 'video_tower' and 'llm'"
            )
    for key in ("temporal_frames", "num_frames", "model_max_length"):
        if getattr(model, key) < (0 if key == "temporal_frames" else 1):
            raise RecipeError(f"model.{key}: must be positive, got {getattr(model, key)}")
    from videollava.data.conversation import TEMPLATES

    if model.template not in TEMPLATES:
        raise RecipeError(f"model.template: unknown template {model.template!r}; valid: {sorted(TEMPLATES)}")
    if not recipe.stages:
        raise RecipeError("stages: the recipe has no stages")

    labels = [s.label for s in recipe.stages]
    for i, label in enumerate(labels):
        if labels.index(label) != i:
            raise RecipeError(f"stages[{i}]: stage name {label!r} is used twice; give one a 'name'")

    kinds = [s.kind for s in recipe.stages]
    seen: list[str] = []
    for i, stage in enumerate(recipe.stages):
        where = f"stages[{i}] ({stage.label})"
        if stage.kind == "tokenizer":
            if model.init is None or model.init.tokenizer != "train":
                raise RecipeError(
                    f"{where}: a tokenizer stage needs model.init.tokenizer: train (the model would not use it)"
                )
            if any(k != "tokenizer" for k in seen):
                raise RecipeError(f"{where}: the tokenizer stage must come before every training stage")
        if isinstance(stage, TrainStage):
            _validate_train_stage(stage, where, model)
        if stage.kind in ("align_image", "align_video"):
            if model.init is None:
                raise RecipeError(
                    f"{where}: alignment stages train fresh towers; they need model.init "
                    "(pretrained LanguageBind towers are aligned already)"
                )
            if any(k in ("projector", "finetune") for k in seen):
                raise RecipeError(f"{where}: alignment must come before the projector and finetune stages")
            regions = stage.region_loss
            if regions is not None and not (regions.weight > 0 and regions.scale > 0):
                raise RecipeError(
                    f"{where}.region_loss: weight and scale must be positive, got {regions.weight}, {regions.scale}"
                )
            if regions is not None and regions.per_frame and isinstance(stage, AlignImageStage):
                raise RecipeError(f"{where}.region_loss.per_frame: only videos have frames (align_video)")
            if regions is not None and regions.motion_weight < 0:
                raise RecipeError(
                    f"{where}.region_loss.motion_weight: must be >= 0, got {regions.motion_weight}"
                )
            if regions is not None and regions.motion_weight > 0 and isinstance(stage, AlignImageStage):
                raise RecipeError(f"{where}.region_loss.motion_weight: only videos move (align_video)")
        if isinstance(stage, AlignImageStage) and not stage.text_encoder.token_init_std > 0:
            raise RecipeError(f"{where}.text_encoder.token_init_std: must be positive")
        if stage.kind == "align_video" and "align_image" not in seen:
            raise RecipeError(
                f"{where}: align_video starts from the aligned image tower; put align_image first"
            )
        if isinstance(stage, FinetuneStage):
            if stage.template is not None and stage.template not in TEMPLATES:
                raise RecipeError(f"{where}.template: unknown template {stage.template!r}")
            if stage.lora is not None and (stage.lora.r < 1 or stage.lora.alpha <= 0):
                raise RecipeError(f"{where}.lora: r must be >= 1 and alpha > 0")
        if isinstance(stage, ProjectorStage) and stage.template not in TEMPLATES:
            raise RecipeError(f"{where}.template: unknown template {stage.template!r}")
        seen.append(stage.kind)
    if model.init is not None and model.init.tokenizer == "train" and "tokenizer" not in kinds:
        raise RecipeError("model.init.tokenizer is 'train' but the recipe has no tokenizer stage")
    if recipe.data.generate is None and recipe.data.root is None:
        raise RecipeError("data: give 'root' (a folder with the JSON files) or 'generate'")
    if recipe.run.keep_checkpoints < 1:
        raise RecipeError("run.keep_checkpoints: must be at least 1")


def _validate_train_stage(stage: TrainStage, where: str, model: ModelConfig) -> None:
    positive = ("lr", "batch_size", "micro_batch_size", "epochs", "log_every")
    for key in positive:
        if not getattr(stage, key) > 0:
            raise RecipeError(f"{where}.{key}: must be positive, got {getattr(stage, key)}")
    if stage.max_steps is not None and stage.max_steps < 1:
        raise RecipeError(f"{where}.max_steps: must be positive, got {stage.max_steps}")
    if not 0 <= stage.warmup_ratio < 1:
        raise RecipeError(f"{where}.warmup_ratio: must be in [0, 1), got {stage.warmup_ratio}")
    for key in ("projector_lr", "text_encoder_lr", "tower_lr"):
        value = getattr(stage, key, None)
        if value is not None and not value >= 0:
            raise RecipeError(f"{where}.{key}: must not be negative, got {value}")
    if stage.weight_decay < 0 or stage.max_grad_norm < 0:
        raise RecipeError(f"{where}: weight_decay and max_grad_norm must not be negative")
    if len(stage.betas) != 2 or not all(0 <= b < 1 for b in stage.betas):
        raise RecipeError(f"{where}.betas: two numbers in [0, 1), got {stage.betas}")
    if stage.checkpoint_every < 0 or stage.num_workers < 0:
        raise RecipeError(f"{where}: checkpoint_every and num_workers must not be negative")
    if not stage.data:
        raise RecipeError(f"{where}.data: no data files")
    frames = stage.num_frames or model.num_frames
    if frames < 1:
        raise RecipeError(f"{where}.num_frames: must be positive")


# ---------------------------------------------------------------------------------------- loading


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Read, override (`key.path=value`), type-check and validate a recipe file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML ({error})") from None
    return recipe_from_dict(raw, overrides, source=path)


def recipe_from_dict(
    raw: Any, overrides: list[str] | None = None, source: str | os.PathLike = "<recipe>"
) -> Recipe:
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: a recipe is a mapping with 'model', 'data' and 'stages'")
    raw = _deepcopy(raw)
    for item in overrides or []:
        apply_override(raw, item)
    try:
        recipe = _build(Recipe, raw, "")
    except RecipeError as error:
        raise RecipeError(f"{source}: {error}") from None
    recipe.source_dir = str(Path(source).resolve().parent) if Path(str(source)).exists() else "."
    try:
        validate(recipe)
    except RecipeError as error:
        raise RecipeError(f"{source}: {error}") from None
    return recipe


def apply_override(raw: dict[str, Any], item: str) -> None:
    """`a.b.c=value` sets raw[a][b][c]; `stage.N` / `stages.N` is the N-th stage (from 0) or the one named N."""
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected key.path=value")
    key, _, text = item.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise RecipeError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as error:
        raise RecipeError(f"--set {item!r}: value is not valid YAML ({error})") from None
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[: depth + 1])
        if depth == 0 and part == "stage":
            part = "stages"
        if isinstance(node, list):
            node = node[_list_index(node, part, where)]
            continue
        if not isinstance(node, dict):
            raise RecipeError(f"--set {item!r}: {where} is not a mapping")
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, key)] = value
    elif isinstance(node, dict):
        node["stages" if last == "stage" and node is raw else last] = value
    else:
        raise RecipeError(f"--set {item!r}: {'.'.join(parts[:-1])} is not a mapping")


def _list_index(items: list[Any], part: str, where: str) -> int:
    if part.lstrip("-").isdigit():
        index = int(part)
        if not -len(items) <= index < len(items):
            raise RecipeError(f"--set {where}: index {index} is out of range ({len(items)} items)")
        return index
    for i, entry in enumerate(items):
        if isinstance(entry, dict) and (entry.get("name") or entry.get("kind")) == part:
            return i
    raise RecipeError(f"--set {where}: no stage named {part!r}")


def _deepcopy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deepcopy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deepcopy(v) for v in value]
    return value


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, str(tp))


def _key_of(f: dataclasses.Field) -> str:
    return f.metadata.get("key", f.name)


def _join(where: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if where else key


def _build(cls: type, data: Any, where: str) -> Any:
    if cls is Stage:
        return _build_stage(data, where)
    if not isinstance(data, dict):
        raise RecipeError(f"{where or 'recipe'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]
    by_key = {_key_of(f): f for f in fields}
    unknown = [k for k in data if k not in by_key]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(by_key), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        label = f"{where}" if where else "recipe"
        raise RecipeError(
            f"{_join(where, str(key))}: unknown key {key!r} in {label}{hint}; valid keys: {', '.join(by_key)}"
        )
    values: dict[str, Any] = {}
    for key, f in by_key.items():
        if key in data:
            values[f.name] = _convert(hints[f.name], data[key], _join(where, key))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"{_join(where, key)}: required key is missing")
    return cls(**values)


def _build_stage(data: Any, where: str) -> Stage:
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a stage is a mapping with a 'kind'")
    kind = data.get("kind")
    if kind not in STAGE_KINDS:
        raise RecipeError(f"{where}.kind: expected one of {', '.join(STAGE_KINDS)}, got {kind!r}")
    label = data.get("name") or kind
    try:
        return _build(STAGE_KINDS[kind], data, where)
    except RecipeError as error:
        raise RecipeError(f"{error} [stage {label!r}]") from None


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, where)
            except RecipeError as error:
                errors.append(error)
        if len(errors) == 1:
            raise errors[0]
        raise RecipeError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise RecipeError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str) and item is str:
            return [value]  # a single file name stands for a list of one
        if not isinstance(value, list | tuple):
            raise RecipeError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return [_convert(item, v, _join(where, i)) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise RecipeError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-3" as a string; accept it as the number it means
                value = float(value)
            except ValueError:
                raise RecipeError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise RecipeError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise RecipeError(f"{where}: unsupported field type {tp!r}")


def _dump(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for f in dataclasses.fields(value):
            if f.metadata.get("internal"):
                continue
            out[_key_of(f)] = _dump(getattr(value, f.name))
        return out
    if isinstance(value, list | tuple):
        return [_dump(v) for v in value]
    return value


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML (all defaults written out), stored in the run folder."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
