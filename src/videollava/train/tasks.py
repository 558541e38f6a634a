"""One task builder per kind of training stage, looked up by the stage's `kind` in `TASK_BUILDERS`.

A builder decides what trains (and at which rate), on which data, with which objective and
held-out evaluation, and returns the `Task` with a `finish` callback that undoes the stage's
training set-up (trainable flags, activation checkpointing, LoRA) when the stage ends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from videollava.data.datasets import (
    CaptionDataset,
    ConversationDataset,
    Skipped,
    collate_captions,
    collate_conversations,
)
from videollava.data.records import Record, read_records
from videollava.data.sample_media import MediaCache, MediaSpec
from videollava.data.transforms import ImageTransformConfig
from videollava.model.build import init_vision_tower
from videollava.model.compress import check_rank_layer
from videollava.model.videollava import VideoLlava
from videollava.model.vision import VisionTower
from videollava.train.config import (
    AlignImageStage,
    AlignVideoStage,
    FinetuneStage,
    LoraConfig,
    MaeImageStage,
    ProjectorStage,
    Recipe,
    RecipeError,
    TrainStage,
)
from videollava.train.contrastive import (
    ImageTextAligner,
    RegionVocabulary,
    TextEncoder,
    VideoTextAligner,
    init_video_tower_from_image,
    is_spatial_parameter,
)
from videollava.train.loop import Task
from videollava.train.mae import MaeObjective, MaskedAutoencoder, heldout_reconstruction
from videollava.train.objectives import AlignObjective, LMObjective
from videollava.train.retrieval import retrieval_metrics

Finish = Callable[[Task], None]


@dataclass
class Alignment:
    """What the alignment stages hand on: the text encoder, the image aligner (whose projections
    the video stage starts from), and the region names (a vocabulary per modality) their region
    losses picked from."""

    text_encoder: TextEncoder | None = None
    image_aligner: ImageTextAligner | None = None
    region_vocab: dict[str, RegionVocabulary] = field(default_factory=dict)


def media_transform(
    model: VideoLlava, image_aspect_ratio: str, video_aspect_ratio: str
) -> ImageTransformConfig:
    """How media become the towers' square input for this model."""
    size = model.config.vision.image_size
    return ImageTransformConfig(
        size=size,
        crop_size=size,
        image_aspect_ratio=image_aspect_ratio,
        video_aspect_ratio=video_aspect_ratio,
    )


@dataclass
class TaskContext:
    """What every builder reads: the recipe, the model and tokenizer as they stand, where the data
    lives, and what earlier alignment stages left."""

    recipe: Recipe
    model: VideoLlava
    tokenizer: Any
    data_root: Path
    alignment: Alignment
    media_cache: MediaCache | None = None
    distributed: bool = False  # more than one process
    log: Callable[[str], None] = lambda message: None

    def data_path(self, name: str) -> Path:
        return self.data_root / name  # an absolute name stays as it is

    def records(
        self, names: list[str], max_samples: int | None = None, only_media: str | None = None
    ) -> list[Record]:
        """The entries of the named files; with `only_media`, those of that modality (and text-only
        ones), then the first `max_samples`."""
        if only_media is None:
            return read_records([self.data_path(n) for n in names], max_samples)
        records = read_records([self.data_path(n) for n in names])
        return [r for r in records if r.modality in (only_media, "text") or r.problem][:max_samples]

    def media_spec(self, stage: TrainStage) -> MediaSpec:
        recipe = self.recipe
        if stage.media_root:
            root = recipe.resolve_path(stage.media_root)
        elif recipe.data.media_root:
            root = recipe.resolve_path(recipe.data.media_root)
        else:
            root = self.data_root / "media"
        aspect = stage.image_aspect_ratio or recipe.model.image_aspect_ratio
        transform = media_transform(self.model, aspect, recipe.model.video_aspect_ratio)
        num_frames = stage.num_frames or recipe.model.num_frames
        if self.media_cache is not None:
            self.media_cache.keep_only(transform, num_frames)
        return MediaSpec(
            root=root,
            transform=transform,
            num_frames=num_frames,
            # Under the model's budget of patches per frame (lm_task sets it for its stage).
            image_rows=self.model.config.image_rows(),
            frame_rows=self.model.config.video_rows(1),
            cache=self.media_cache,
        )

    def held_out_captions(
        self, stage: TrainStage, modality: str, regions: bool = False
    ) -> CaptionDataset | None:
        """The stage's held-out caption pairs of one modality, or None without a held-out file."""
        if stage.eval is None:
            return None
        path = self.data_path(stage.eval.data)
        if not path.exists():
            self.log(f"[{stage.label}] no held-out file {path}: retrieval is not evaluated")
            return None
        records = read_records([path], stage.eval.max_samples)
        return CaptionDataset(records, self.media_spec(stage), modality, regions=regions)


# ---------------------------------------------------------------------------------------- shared


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


# ---------------------------------------------------------------------------------------- alignment


def region_vocabulary(
    ctx: TaskContext, stage: AlignImageStage | AlignVideoStage, dataset: CaptionDataset
) -> tuple[list[str], list[str]] | None:
    """The names, and the motion phrases when the stage weighs them, its regions pick from."""
    if stage.region_loss is None:
        return None
    names = dataset.region_texts()
    if not names:
        raise RecipeError(
            f"stage {stage.label}: region_loss needs entries with 'regions' in {', '.join(stage.data)}"
        )
    motions = dataset.region_motions() if stage.region_loss.names_motions else []
    if stage.region_loss.names_motions and not motions:
        key = "motion_weight" if stage.region_loss.motion_weight > 0 else "frame_motion_weight"
        raise RecipeError(
            f"stage {stage.label}: region_loss.{key} needs regions with a 'motion' in {', '.join(stage.data)}"
        )
    ctx.log(
        f"[{stage.label}] region loss over {len(names)} names"
        + (f", {len(motions)} motions" if motions else "")
    )
    return names, motions


def contrastive_objective(
    ctx: TaskContext,
    stage: AlignImageStage | AlignVideoStage,
    aligner: ImageTextAligner | VideoTextAligner,
    modality: str,
    max_length: int,
    media_shape: tuple[int, ...],
) -> tuple[CaptionDataset, AlignObjective]:
    """The stage's caption pairs of one modality and the contrastive loss over them, with only the
    aligner's own trainable parameters learning."""
    records = ctx.records(stage.data, stage.max_samples, stage.only_media)
    dataset = CaptionDataset(records, ctx.media_spec(stage), modality, regions=stage.region_loss is not None)
    vocabulary = region_vocabulary(ctx, stage, dataset)
    objective = AlignObjective(aligner, ctx.tokenizer, max_length, media_shape, vocabulary)
    set_trainable(objective, aligner.trainable_parameters())
    return dataset, objective


def alignment_task(
    tower: nn.Module,
    aligner: nn.Module,
    objective: nn.Module,
    dataset: CaptionDataset,
    evaluate: Callable[[nn.Module], dict[str, float]],
    stage: TrainStage,
    lr_for: Callable[[str], float] | None = None,
) -> tuple[Task, Finish]:
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


def align_image_task(ctx: TaskContext, stage: AlignImageStage) -> tuple[Task, Finish]:
    """Image tower and a fresh text encoder, CLIP loss on image-caption pairs (plus regions)."""
    model, alignment = ctx.model, ctx.alignment
    alignment.text_encoder = TextEncoder(stage.text_encoder, len(ctx.tokenizer), stage.projection_dim)
    regions = stage.region_loss
    tower = model.image_tower
    if stage.tower == "fresh":  # a tower of its own, for a later align_video to start from
        tower = VisionTower(model.image_tower.config).to(next(model.image_tower.parameters()).device)
        assert ctx.recipe.model.init is not None  # validate: alignment needs model.init
        init_vision_tower(tower, ctx.recipe.model.init.vision_init_std)
    aligner = ImageTextAligner(
        tower,
        alignment.text_encoder,
        stage.projection_dim,
        regions,
        feature_layer=model.config.vision_feature_layer,
    )
    alignment.image_aligner = aligner
    tower.encoder.gradient_checkpointing = stage.gradient_checkpointing
    size = model.config.vision.image_size
    dataset, objective = contrastive_objective(
        ctx, stage, aligner, "image", stage.text_encoder.max_length, (3, size, size)
    )
    alignment.region_vocab = {"image": objective.regions} if objective.regions else {}
    held_out = ctx.held_out_captions(stage, "image", regions=regions is not None)
    batch = stage.eval.batch_size if stage.eval else 32

    def evaluate(_: nn.Module) -> dict[str, float]:
        return retrieval_metrics(aligner, held_out, ctx.tokenizer, alignment.region_vocab.get("image"), batch)

    lr_for = submodule_lr(stage.lr, {"text_encoder": stage.text_encoder_lr})
    return alignment_task(tower, aligner, objective, dataset, evaluate, stage, lr_for)


def mae_image_task(ctx: TaskContext, stage: MaeImageStage) -> tuple[Task, Finish]:
    """The image tower without language: masked-patch reconstruction of image entries."""
    model = ctx.model
    mae = MaskedAutoencoder(model.image_tower, stage.mae)
    objective = MaeObjective(mae)
    set_trainable(objective, mae.trainable_parameters())
    model.image_tower.encoder.gradient_checkpointing = stage.gradient_checkpointing
    records = ctx.records(stage.data, stage.max_samples, stage.only_media)
    dataset = CaptionDataset(records, ctx.media_spec(stage), "image")
    held_out = ctx.held_out_captions(stage, "image")
    batch = stage.eval.batch_size if stage.eval else 32

    def evaluate(_: nn.Module) -> dict[str, float]:
        if held_out is None:
            return {}
        good = [s for s in (held_out[i] for i in range(len(held_out))) if not isinstance(s, Skipped)]
        device = next(mae.parameters()).device
        pixels = [
            collate_captions(good[i : i + batch])["pixels"].to(device) for i in range(0, len(good), batch)
        ]
        return heldout_reconstruction(mae, pixels)

    return alignment_task(model.image_tower, mae, objective, dataset, evaluate, stage)


def align_video_task(ctx: TaskContext, stage: AlignVideoStage) -> tuple[Task, Finish]:
    """Video tower = aligned image tower + temporal modules, against the frozen text encoder."""
    model, alignment = ctx.model, ctx.alignment
    text_encoder, image_aligner = alignment.text_encoder, alignment.image_aligner
    if stage.text_encoder is not None and stage.projection_dim is not None:
        # A language space of its own (frozen, as the image stage's is here).
        text_encoder = TextEncoder(stage.text_encoder, len(ctx.tokenizer), stage.projection_dim)
    if text_encoder is None or (stage.init_projection_from_image and image_aligner is None):
        raise RecipeError(f"stage {stage.label}: align_video needs a finished align_image stage")
    frames = model.config.temporal_frames
    if frames < 1:
        raise RecipeError("model.temporal_frames: the video tower needs temporal modules (>= 1) to align")
    # The tower the last align_image aligned (the model's image tower unless it made a fresh one);
    # after mae_image alone, the model's image tower.
    base = image_aligner.image_tower if image_aligner is not None else model.image_tower
    fresh = init_video_tower_from_image(
        base, frames, stage.temporal_embedding_std, stage.temporal_embedding_init
    )
    model.video_tower.load_state_dict(fresh.state_dict())
    projection = image_aligner.visual_projection if stage.init_projection_from_image else None
    regions = stage.region_loss
    aligner = VideoTextAligner(
        model.video_tower,
        text_encoder,
        text_encoder.projection_dim,
        projection,
        regions,
        region_projection_init=image_aligner.region_projection if image_aligner is not None else None,
        feature_layer=model.config.vision_feature_layer,
        train_spatial=stage.spatial_lr is not None,
    )
    model.video_tower.encoder.gradient_checkpointing = stage.gradient_checkpointing
    size = model.config.vision.image_size
    num_frames = stage.num_frames or ctx.recipe.model.num_frames
    dataset, objective = contrastive_objective(
        ctx, stage, aligner, "video", text_encoder.config.max_length, (num_frames, 3, size, size)
    )
    if objective.regions:
        alignment.region_vocab["video"] = objective.regions
    held_images = ctx.held_out_captions(stage, "image", regions="image" in alignment.region_vocab)
    held_videos = ctx.held_out_captions(stage, "video", regions=regions is not None)
    batch = stage.eval.batch_size if stage.eval else 32

    def evaluate(_: nn.Module) -> dict[str, float]:
        vocab = alignment.region_vocab
        images = {}
        if image_aligner is not None:
            image_aligner.eval()
            images = retrieval_metrics(image_aligner, held_images, ctx.tokenizer, vocab.get("image"), batch)
        return images | retrieval_metrics(aligner, held_videos, ctx.tokenizer, vocab.get("video"), batch)

    return alignment_task(
        model.video_tower, aligner, objective, dataset, evaluate, stage, spatial_rate(stage)
    )


def spatial_rate(stage: AlignVideoStage) -> Callable[[str], float] | None:
    """Parameter name -> lr: the video tower's spatial path at ``spatial_lr``, the rest at ``lr``."""
    spatial_lr = stage.spatial_lr
    if spatial_lr is None:
        return None
    marker = ".video_tower."

    def lr_for(name: str) -> float:
        dotted = f".{name}"
        if marker in dotted and is_spatial_parameter(dotted.split(marker, 1)[1]):
            return spatial_lr
        return stage.lr

    return lr_for


# ---------------------------------------------------------------------------------------- LLM stages


def lm_task(
    ctx: TaskContext,
    stage: TrainStage,
    *,
    template: str,
    train_llm: bool,
    lora: LoraConfig | None = None,
    train_projector: bool = True,
    projector_lr: float | None = None,
    tower_lr: float | None = None,
    visual_tokens: int | None = None,
    visual_token_layer: int | None = None,
) -> tuple[Task, Finish]:
    """Next-token loss on the answers; the LLM trains fully, through LoRA, or not at all.

    `visual_tokens` patches per image or frame reach the LLM (None: all), ranked by the CLS
    attention of the block that produces hidden state `visual_token_layer` (None: the feature
    layer's): the model's defaults are set to them, so the training forward, the sample lengths
    and the export follow them.
    """
    model, recipe = ctx.model, ctx.recipe
    try:
        check_rank_layer(visual_token_layer, model.config.vision.num_hidden_layers)
    except ValueError as error:
        raise RecipeError(f"stage {stage.label}: {error}") from None
    model.config.visual_tokens = visual_tokens
    model.config.visual_token_layer = visual_token_layer
    model.requires_grad_(False)
    if lora is not None:
        if recipe.distributed.strategy == "fsdp" and ctx.distributed:
            raise RecipeError(f"stage {stage.label}: LoRA with strategy fsdp is not supported; use ddp")
        # peft is an optional extra that only LoRA recipes need (the runner checks it is there).
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
    model.multi_modal_projector.requires_grad_(train_projector)
    towers = [model.image_tower, model.video_tower]
    if tower_lr is not None:
        for tower in towers:
            tower.requires_grad_(True)
    if stage.gradient_checkpointing:
        activation_checkpointing(model.language_model, True)
    objective = LMObjective(model, ctx.tokenizer.bos_token_id, towers)
    records = ctx.records(stage.data, stage.max_samples, stage.only_media)
    max_length = min(recipe.model.model_max_length, model.max_context)
    media = ctx.media_spec(stage)
    dataset = ConversationDataset(records, media, ctx.tokenizer, template, max_length)
    held_out = None
    if stage.eval is not None:
        path = ctx.data_path(stage.eval.data)
        if path.exists():
            held_out = ConversationDataset(
                read_records([path], stage.eval.max_samples), media, ctx.tokenizer, template, max_length
            )
        else:
            ctx.log(f"[{stage.label}] no held-out file {path}: eval loss is not computed")

    def evaluate(module: nn.Module) -> dict[str, float]:
        assert held_out is not None
        total, count = 0.0, 0
        good = [s for s in (held_out[i] for i in range(len(held_out))) if not isinstance(s, Skipped)]
        size = stage.eval.batch_size if stage.eval else 8
        for start in range(0, len(good), size):
            loss, n = module(collate_conversations(good[start : start + size]))
            total += float(loss)
            count += n
        return {"eval_loss": total / max(count, 1), "eval_tokens": float(count)}

    def finish(task: Task) -> None:
        trained = task.module.model  # after FSDP, the model gathered back from the shards
        if stage.gradient_checkpointing:
            activation_checkpointing(trained.language_model, False)
        if lora is not None:
            trained.language_model = trained.language_model.merge_and_unload()
        trained.requires_grad_(False)

    task = Task(
        module=objective,
        dataset=dataset,
        collate_fn=collate_conversations,
        lengths=dataset.lengths,
        modalities=dataset.modalities,
        groups=dataset.groups,
        lr_for=submodule_lr(
            stage.lr,
            {"multi_modal_projector": projector_lr, "image_tower": tower_lr, "video_tower": tower_lr},
        ),
        evaluate=evaluate if held_out is not None else None,
        sampler_mode=stage.sampler_mode,
        fsdp_capable=True,
        sum_loss=True,
        # A batch of images alone leaves a trained video tower without gradients, and the reverse.
        find_unused_parameters=recipe.distributed.find_unused_parameters or tower_lr is not None,
    )
    return task, finish


def projector_task(ctx: TaskContext, stage: ProjectorStage) -> tuple[Task, Finish]:
    """Stage 1: the projector (and, for a from-scratch LLM, the LLM) on single-turn captions."""
    return lm_task(ctx, stage, template=stage.template, train_llm=stage.train_llm)


def finetune_task(ctx: TaskContext, stage: FinetuneStage) -> tuple[Task, Finish]:
    """Stage 2: LLM (fully or through LoRA) and projector on multi-turn instructions."""
    return lm_task(
        ctx,
        stage,
        template=stage.template or ctx.recipe.model.template,
        train_llm=True,
        lora=stage.lora,
        train_projector=stage.train_projector,
        projector_lr=stage.projector_lr,
        tower_lr=stage.tower_lr,
        visual_tokens=stage.visual_tokens,
        visual_token_layer=stage.visual_token_layer,
    )


# The builder of each kind of training stage (config.STAGE_KINDS names every kind).
TASK_BUILDERS: dict[str, Callable[[TaskContext, Any], tuple[Task, Finish]]] = {
    "align_image": align_image_task,
    "mae_image": mae_image_task,
    "align_video": align_video_task,
    "projector": projector_task,
    "finetune": finetune_task,
}
