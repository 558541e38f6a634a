"""Training recipes: one YAML file read into typed sections.

A recipe names the model (a fresh small one under `init:`, or pretrained parts under `from:`), the
data, and an ordered list of stages. The model's own config dataclasses are embedded as they are,
with their types, defaults and checks: `VisionConfig` (the towers), `LLMConfig` (the LLM),
`TextEncoderConfig` and `RegionLoss` (alignment), ShapesWorld's `GenerationConfig` (`data.generate`)
and the `VideoLlavaConfig` fields a recipe sets under `model:`. Loading checks every key and type
(pydantic, strict: `"8"` is not a number), so a typo fails before any work starts, with the key's
full location in the message. Overrides from the command line (`--set stage.2.lr=1e-3`) are
applied to the YAML before checking.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PrivateAttr,
    SerializationInfo,
    ValidationError,
    create_model,
    field_validator,
)

from videollava.data.conversation import TEMPLATES
from videollava.data.transforms import ASPECT_MODES
from videollava.errors import VideoLlavaError
from videollava.model.build import LLMConfig
from videollava.model.videollava import VideoLlavaConfig
from videollava.model.vision import VisionConfig
from videollava.shapesworld.generate import GenerationConfig
from videollava.train.contrastive import RegionLoss, TemporalInit, TextEncoderConfig
from videollava.train.mae import MaeConfig
from videollava.train.recipe_messages import describe


class RecipeError(VideoLlavaError):
    """A recipe that cannot be run as written; the message names the key at fault."""


# ---------------------------------------------------------------------------------------- values


def _number(value: Any) -> Any:
    """YAML 1.1 reads "1e-3" (no dot) as a string: take it as the number it means."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _one_or_many(value: Any) -> Any:
    """A single file name stands for a list of one."""
    return [value] if isinstance(value, str) else value


def _known_template(name: str) -> str:
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; valid: {sorted(TEMPLATES)}")
    return name


Number = Annotated[float, BeforeValidator(_number)]
Integer = Annotated[int, BeforeValidator(_integral)]
Positive = Annotated[Integer, Field(gt=0)]
PositiveNumber = Annotated[Number, Field(gt=0)]
NonNegative = Annotated[Integer, Field(ge=0)]
Rate = Annotated[Number, Field(ge=0)]  # a learning rate that may be 0 (weights stay)
Files = Annotated[list[str], BeforeValidator(_one_or_many)]
Template = Annotated[str, AfterValidator(_known_template)]
# How non-square media reach the square tower input.
Aspect = Literal[ASPECT_MODES]


class Section(BaseModel):
    """A mapping of the recipe: unknown keys and loose types (`"yes"` for true) are refused."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _recipe_type(hint: Any) -> Any:
    """A dataclass field's type as a recipe reads it (numbers as YAML writes them)."""
    if hint is float:
        return Number
    if hint is int:
        return Integer
    if typing.get_origin(hint) in (Union, types.UnionType):
        return Union[tuple(_recipe_type(arg) for arg in typing.get_args(hint))]  # noqa: UP007
    return hint


def _fields_of(
    cls: type, names: typing.Iterable[str], types_: dict[str, Any] | None = None
) -> dict[str, Any]:
    """`create_model` field definitions for the named fields of dataclass `cls`: its types (or
    `types_`) and its defaults."""
    hints = typing.get_type_hints(cls)
    found = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for name in names:
        f = found[name]
        default = (
            Field(default_factory=f.default_factory)
            if f.default_factory is not dataclasses.MISSING
            else f.default
        )
        out[name] = ((types_ or {}).get(name, _recipe_type(hints[name])), default)
    return out


def embedded(cls: type, exclude: tuple[str, ...] = ()) -> Any:
    """A config dataclass of the model as a recipe section: its fields, types and defaults, checked
    strictly, then built into `cls` itself, whose own checks run (`exclude`: fields the recipe sets
    elsewhere)."""
    names = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in exclude]
    section = create_model(cls.__name__, __base__=Section, **_fields_of(cls, names))
    defaults = {
        name: field.default for name, field in section.model_fields.items() if not field.is_required()
    }

    def serialize(value: Any, info: SerializationInfo) -> dict[str, Any]:
        values = {name: getattr(value, name) for name in names}
        if info.exclude_defaults:  # as pydantic does for its own models
            values = {k: v for k, v in values.items() if k not in defaults or defaults[k] != v}
        return values

    return Annotated[
        section,
        AfterValidator(lambda value: cls(**dict(value))),
        PlainSerializer(serialize, return_type=dict),
    ]


# The towers' shape; the video tower's frames are model.temporal_frames.
VisionSection = embedded(VisionConfig, exclude=("num_frames",))
LLMSection = embedded(LLMConfig)
TextEncoderSection = embedded(TextEncoderConfig)
RegionLossSection = embedded(RegionLoss)
GenerationSection = embedded(GenerationConfig)
MaeSection = embedded(MaeConfig)


# ---------------------------------------------------------------------------------------- model


class InitConfig(Section):
    """A fresh model of the given shape, randomly initialised from `seed`."""

    vision: VisionSection = Field(default_factory=VisionConfig)
    llm: LLMSection = Field(default_factory=LLMConfig)
    # "train": the tokenizer a `tokenizer` stage trains on the data; otherwise a folder or hub id.
    tokenizer: str = "train"
    seed: Integer = 0
    vision_init_std: Number = 0.02  # std of the towers' linear and embedding weights (CLIP-style)


class ArchitectureSpec(Section):
    """The shape the pretrained parts are expected to have: lets the model be built without weights."""

    vision: VisionSection
    llm: LLMSection


class FromConfig(Section):
    """Pretrained parts: a whole Video-LLaVA checkpoint, or LanguageBind towers plus a LLaMA LLM."""

    checkpoint: str | None = None
    image_tower: str | None = None
    video_tower: str | None = None
    llm: str | None = None
    tokenizer: str | None = None  # default: the checkpoint's or the LLM's own
    architecture: ArchitectureSpec | None = None
    seed: Integer = 0  # of the fresh projector when only towers and LLM are given


class _ModelSection(Section):
    init: InitConfig | None = None
    from_: FromConfig | None = Field(default=None, alias="from")
    model_max_length: Positive = 2048

    def architecture(self) -> tuple[VisionConfig, LLMConfig]:
        """The declared shape of the towers and of the LLM."""
        if self.init is not None:
            return self.init.vision, self.init.llm
        if self.from_ is None or self.from_.architecture is None:
            raise RecipeError("model.from.architecture: needed to build the model without its weights")
        return self.from_.architecture.vision, self.from_.architecture.llm

    def options(self) -> dict[str, Any]:
        """The `VideoLlavaConfig` fields this section sets."""
        return {name: getattr(self, name) for name in MODEL_OPTIONS}


# The VideoLlavaConfig fields a recipe sets under `model:`, with the model's defaults.
MODEL_OPTIONS = (
    "temporal_frames",
    "num_frames",
    "vision_feature_layer",
    "projector_hidden_act",
    "image_aspect_ratio",
    "video_aspect_ratio",
    "template",
)
ModelConfig = create_model(
    "ModelConfig",
    __base__=_ModelSection,
    __doc__="The model: its parts (`init` or `from`) and the VideoLlavaConfig fields of MODEL_OPTIONS.",
    **_fields_of(
        VideoLlavaConfig,
        MODEL_OPTIONS,
        {
            "temporal_frames": NonNegative,
            "num_frames": Positive,
            "image_aspect_ratio": Aspect,
            "video_aspect_ratio": Aspect,
            "template": Template,
        },
    ),
)


# ---------------------------------------------------------------------------------------- data


class DataConfig(Section):
    # Folder with the JSON files; relative stage `data` paths resolve against it. Null with
    # `generate` means "<run dir>/data".
    root: str | None = None
    # Folder the media paths inside the JSON are relative to (default "<root>/media").
    media_root: str | None = None
    # ShapesWorld data generated into the run folder (once; reused on resume).
    generate: GenerationSection | None = None


# ---------------------------------------------------------------------------------------- stages


class LoraConfig(Section):
    r: Positive = 128
    alpha: PositiveNumber = 256
    dropout: Number = 0.05
    target_modules: Files = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


class EvalConfig(Section):
    """Held-out evaluation: retrieval R@1 for alignment stages, mean loss for LLM stages."""

    data: str = "test_captions.json"
    every: NonNegative = 0  # steps; 0 = only at the end of the stage
    max_samples: Positive | None = None
    batch_size: Positive = 32


class Stage(Section):
    kind: str
    name: str | None = None

    @property
    def label(self) -> str:
        return self.name or self.kind


class TokenizerStage(Stage):
    """Train a byte-level BPE tokenizer on the data's texts."""

    kind: Literal["tokenizer"] = "tokenizer"
    data: Files = Field(default_factory=lambda: ["captions.json", "instruct.json"])
    vocab_size: Positive = 1000
    placeholder_tokens: bool = True


class TrainStage(Stage):
    """Everything a training stage shares: data, batch arithmetic, optimiser, schedule, precision."""

    data: Files = Field(default_factory=list)
    media_root: str | None = None
    max_samples: Positive | None = None
    lr: PositiveNumber = 1e-3
    batch_size: Positive = 32  # global: the samples of one optimiser step, over all processes
    micro_batch_size: Positive = 8  # the most samples a rank runs in one forward (see batch_layout)
    epochs: Positive = 1
    max_steps: Positive | None = None
    warmup_ratio: Number = 0.03
    weight_decay: Annotated[Number, Field(ge=0)] = 0.0
    betas: list[Number] = Field(default_factory=lambda: [0.9, 0.999])
    eps: Number = 1e-8
    max_grad_norm: Annotated[Number, Field(ge=0)] = 1.0  # 0: no clipping
    lr_schedule: Literal["cosine", "constant"] = "cosine"  # after a linear warm-up
    bf16: bool = True
    gradient_checkpointing: bool = False
    num_frames: Positive | None = None  # default: model.num_frames
    image_aspect_ratio: Aspect | None = None  # default: model.image_aspect_ratio
    bad_samples: Literal["skip", "fail"] = "skip"
    sampler: Literal["mixed", "grouped"] | None = None  # default depends on the stage kind
    only_media: Literal["image", "video"] | None = None  # train on this modality's entries (and text) only
    seed: Integer = 0
    log_every: Positive = 10
    checkpoint_every: NonNegative = 0  # steps; 0 = only at the end of the stage
    num_workers: NonNegative = 0
    eval: EvalConfig | None = None
    # DeepSpeed JSON for this stage (strategy deepspeed); default: distributed.deepspeed_config.
    deepspeed_config: str | None = None

    @field_validator("data")
    @classmethod
    def _some_data(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("no data files")
        return value

    @field_validator("warmup_ratio")
    @classmethod
    def _fraction(cls, value: float) -> float:
        if not 0 <= value < 1:
            raise ValueError(f"must be in [0, 1), got {value}")
        return value

    @field_validator("betas")
    @classmethod
    def _two_betas(cls, value: list[float]) -> list[float]:
        if len(value) != 2 or not all(0 <= b < 1 for b in value):
            raise ValueError(f"two numbers in [0, 1), got {value}")
        return value

    @property
    def default_sampler(self) -> str:
        return "mixed"

    @property
    def sampler_mode(self) -> str:
        return self.sampler or self.default_sampler


class AlignImageStage(TrainStage):
    """Contrastive image-caption training of the image tower with a fresh text encoder."""

    kind: Literal["align_image"] = "align_image"
    data: Files = Field(default_factory=lambda: ["captions.json"])
    text_encoder: TextEncoderSection = Field(default_factory=TextEncoderConfig)
    projection_dim: Positive = 128
    # The text encoder's own rate (default: lr); at 0 its weights stay, but its gradients still
    # count in the stage's gradient clipping.
    text_encoder_lr: Rate | None = None
    region_loss: RegionLossSection | None = None
    eval: EvalConfig | None = Field(default_factory=EvalConfig)
    # "fresh": a new tower of the model's shape, not the model's image tower, aligned to this stage's
    # own text encoder; a later align_video starts from it (towers aligned to separate spaces).
    tower: Literal["image", "fresh"] = "image"


class MaeImageStage(TrainStage):
    """The image tower without language: masked-patch reconstruction (MAE, see `train.mae`)."""

    kind: Literal["mae_image"] = "mae_image"
    data: Files = Field(default_factory=lambda: ["captions.json"])
    mae: MaeSection = Field(default_factory=MaeConfig)
    eval: EvalConfig | None = Field(default_factory=EvalConfig)


class AlignVideoStage(TrainStage):
    """Contrastive video-caption training of the temporal modules against the frozen text encoder."""

    kind: Literal["align_video"] = "align_video"
    data: Files = Field(default_factory=lambda: ["captions.json"])
    init_projection_from_image: bool = True  # else a fresh video projection
    # Std of the initial temporal embedding: 0 (LanguageBind's no-op start) leaves the fresh tower
    # symmetric in time, a small value breaks that symmetry (see init_video_tower_from_image).
    temporal_embedding_std: Number = 0.0
    # "random": normal at that std, one draw per layer; "sinusoidal": every layer starts from the
    # same smooth table of time (contrastive.sinusoidal_time_table), ordered from the start.
    temporal_embedding_init: TemporalInit = "random"
    # Videos' region names say how each object moves; the region head starts from the image stage's.
    region_loss: RegionLossSection | None = None
    eval: EvalConfig | None = Field(default_factory=EvalConfig)
    # A fresh, frozen text encoder of this shape (and projection_dim) to align to, instead of the
    # image stage's: needed after mae_image, which has none.
    text_encoder: TextEncoderSection | None = None
    projection_dim: Positive | None = None
    # The rate of the tower's spatial path (patch embedding, spatial attention, MLPs), copied from
    # the image tower; None keeps it frozen, as LanguageBind does. Which way an object moves shows
    # only in how neighbouring patches change over time, and a frozen spatial path may not carry that.
    spatial_lr: Rate | None = None


class ProjectorStage(TrainStage):
    """Stage 1: only the projector learns, on single-turn captions of images and videos."""

    kind: Literal["projector"] = "projector"
    data: Files = Field(default_factory=lambda: ["captions.json"])
    template: Template = "plain"
    # The LLM learns too: the paper freezes its pretrained LLM, but one trained from scratch must
    # learn the language somewhere.
    train_llm: bool = False


class FinetuneStage(TrainStage):
    """Stage 2: LLM (fully or through LoRA) and projector on multi-turn instructions."""

    kind: Literal["finetune"] = "finetune"
    data: Files = Field(default_factory=lambda: ["instruct.json"])
    lr: PositiveNumber = 2e-5
    template: Template | None = None  # default: model.template
    lora: LoraConfig | None = None
    projector_lr: Rate | None = None  # default: lr
    train_projector: bool = True
    tower_lr: Rate | None = None  # both towers' rate; None keeps them frozen, as the paper does
    # Patch tokens kept per image or video frame while training (the ones the tower's CLS attends
    # to most, model.compress); the exported model keeps it as its default. None: all of them.
    visual_tokens: Positive | None = None
    # The hidden state whose producing block's CLS attention ranks the patches (the model's
    # `visual_token_layer`; None: the feature layer's own block, as FasterVLM ranks).
    visual_token_layer: Integer | None = None

    @property
    def default_sampler(self) -> str:
        return "grouped"


_KINDS = (TokenizerStage, AlignImageStage, MaeImageStage, AlignVideoStage, ProjectorStage, FinetuneStage)
STAGE_KINDS: dict[str, type[Stage]] = {cls.model_fields["kind"].default: cls for cls in _KINDS}
AnyStage = Annotated[
    Union[  # noqa: UP007
        TokenizerStage, AlignImageStage, MaeImageStage, AlignVideoStage, ProjectorStage, FinetuneStage
    ],
    Field(discriminator="kind"),
]


# ---------------------------------------------------------------------------------------- run


class ExportConfig(Section):
    enabled: bool = True
    dtype: Literal["bfloat16", "float32"] = "bfloat16"


class RunConfig(Section):
    output_dir: str | None = None  # default: runs/<recipe file stem>
    keep_checkpoints: Annotated[Integer, Field(ge=1)] = 2
    progress: bool = True  # tqdm bar on stderr (rank 0)
    threads: Positive | None = None  # torch intra-op threads per process
    # Keep preprocessed media in memory across epochs and stages (pays off with num_workers: 0 and
    # a dataset that fits in RAM; each loader worker would hold a copy of its own).
    cache_media: bool = False
    export: ExportConfig = Field(default_factory=ExportConfig)


class DistributedConfig(Section):
    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    deepspeed_config: str | None = None
    # DDP's search for parameters a forward did not use; not needed by the stages here (text-only
    # batches still touch the projector), so off unless a custom objective needs it.
    find_unused_parameters: bool = False


class Recipe(Section):
    model: ModelConfig
    stages: list[AnyStage]
    data: DataConfig = Field(default_factory=DataConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    # Where relative paths of the recipe resolve when the working directory does not have them.
    _source_dir: str = PrivateAttr(default=".")

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
        beside = Path(self._source_dir) / path
        return beside if beside.exists() else path

    def to_dict(self, exclude_defaults: bool = False) -> dict[str, Any]:
        """The recipe as plain data; ``exclude_defaults``: only the values it sets apart from the
        defaults, which a later version's new options (at their defaults) leave unchanged."""
        data = self.model_dump(by_alias=True, exclude_defaults=exclude_defaults)
        # a stage's kind is its default too, but it says what the stage is
        if "stages" in data:
            data["stages"] = [
                {"kind": stage.kind} | values
                for stage, values in zip(self.stages, data["stages"], strict=True)
            ]
        return data


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
    """Checks across fields and stages, which types and per-field bounds cannot express."""
    model = recipe.model
    if (model.init is None) == (model.from_ is None):
        raise RecipeError("model: give exactly one of 'init' (a fresh model) or 'from' (pretrained parts)")
    if model.from_ is not None:
        f = model.from_
        if f.checkpoint is None and not (f.image_tower and f.video_tower and f.llm):
            raise RecipeError(
                "model.from: give 'checkpoint', or all of 'image_tower', 'video_tower' and 'llm'"
            )
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
        if isinstance(stage, TokenizerStage):
            if model.init is None or model.init.tokenizer != "train":
                raise RecipeError(
                    f"{where}: a tokenizer stage needs model.init.tokenizer: train (the model would not use it)"
                )
            if any(k != "tokenizer" for k in seen):
                raise RecipeError(f"{where}: the tokenizer stage must come before every training stage")
        if isinstance(stage, AlignImageStage | MaeImageStage | AlignVideoStage):
            if model.init is None:
                raise RecipeError(
                    f"{where}: alignment stages train fresh towers; they need model.init "
                    "(pretrained LanguageBind towers are aligned already)"
                )
            if any(k in ("projector", "finetune") for k in seen):
                raise RecipeError(f"{where}: alignment must come before the projector and finetune stages")
        if isinstance(stage, AlignImageStage) and stage.region_loss is not None:
            if stage.region_loss.per_frame:
                raise RecipeError(f"{where}.region_loss.per_frame: only videos have frames (align_video)")
            for key in ("motion_weight", "frame_motion_weight"):
                if getattr(stage.region_loss, key) > 0:
                    raise RecipeError(f"{where}.region_loss.{key}: only videos move (align_video)")
        if isinstance(stage, AlignVideoStage):
            if "align_image" not in seen and "mae_image" not in seen:
                raise RecipeError(
                    f"{where}: align_video starts from the aligned image tower; put align_image "
                    "(or mae_image) first"
                )
            if "align_image" not in seen and stage.init_projection_from_image:
                raise RecipeError(f"{where}.init_projection_from_image: needs an align_image stage before")
            if "align_image" not in seen and stage.text_encoder is None:
                raise RecipeError(f"{where}.text_encoder: no align_image stage before has one to align to")
            if (stage.text_encoder is None) != (stage.projection_dim is None):
                raise RecipeError(f"{where}: give text_encoder and projection_dim together")
        seen.append(stage.kind)
    if model.init is not None and model.init.tokenizer == "train" and "tokenizer" not in kinds:
        raise RecipeError("model.init.tokenizer is 'train' but the recipe has no tokenizer stage")
    if recipe.data.generate is None and recipe.data.root is None:
        raise RecipeError("data: give 'root' (a folder with the JSON files) or 'generate'")


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
    raw = copy.deepcopy(raw)
    for item in overrides or []:
        apply_override(raw, item)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as error:
        raise RecipeError(f"{source}: {describe(error.errors()[0], raw, Recipe, STAGE_KINDS)}") from None
    recipe._source_dir = str(Path(source).resolve().parent) if Path(str(source)).exists() else "."
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


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML (all defaults written out), stored in the run folder."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
