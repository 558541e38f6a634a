"""Language-anchored alignment of the visual towers, the LanguageBind recipe in miniature.

First an image tower and a text encoder learn a shared space from image-caption pairs (CLIP). Then
the video tower starts as a copy of the image tower with temporal modules that are initially a no-op,
the text encoder is frozen, and only the temporal modules, the CLS embedding, the post-LN and the
projection learn from video-caption pairs. The text side anchors both towers in one space, which is
why a single projector can later serve images and videos alike.

Where the data names the objects of a media and their boxes, a region loss beside the caption loss
makes the patches under each box pick that name, so that the patch features the LLM reads say what
each object is (and, in videos, how it moves), not only the pooled embedding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from videollava.model.vision import VisionTower

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from videollava.data.regions import Region

LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100.0)

TextPooling = Literal["eos", "mean"]
RegionPooling = Literal["box", "patch"]


def _one_of(name: str, value: str, choices: type) -> None:
    if value not in get_args(choices):
        raise ValueError(f"{name}: expected {' or '.join(map(repr, get_args(choices)))}, got {value!r}")


@dataclass
class TextEncoderConfig:
    """The text tower's shape and start; its vocabulary and projection come with the stage."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    max_length: int = 64
    # "eos": the last real token stands for the caption, as in CLIP. "mean": the average over the
    # caption's tokens, a bag of its words even before any training.
    pooling: TextPooling = "eos"
    token_init_std: float = 0.02  # std of the normal init of the token embeddings

    def __post_init__(self) -> None:
        _one_of("pooling", self.pooling, TextPooling)
        if not self.token_init_std > 0:
            raise ValueError(f"token_init_std: must be positive, got {self.token_init_std}")


class _TextBlock(nn.Module):
    """Pre-LN transformer block with causal self-attention, as in CLIP's text tower."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.layer_norm1 = nn.LayerNorm(hidden_size)
        self.qkv_proj = nn.Linear(hidden_size, 3 * hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)
        self.layer_norm2 = nn.LayerNorm(hidden_size)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, 4 * hidden_size), nn.GELU(), nn.Linear(4 * hidden_size, hidden_size)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        # (B, L, 3D) -> (B, L, 3, heads, head_dim) -> 3 x (B, heads, L, head_dim)
        qkv = self.qkv_proj(self.layer_norm1(x)).view(batch, length, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        # Causal: with right padding, real tokens never see padding, so no padding mask is needed.
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        # (B, heads, L, head_dim) -> (B, L, D)
        x = x + self.out_proj(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp(self.layer_norm2(x))


class TextEncoder(nn.Module):
    """Small CLIP-style text tower pooled at the EOS token (or over all tokens) into one vector."""

    def __init__(self, config: TextEncoderConfig, vocab_size: int, projection_dim: int):
        super().__init__()
        self.config = config
        self.projection_dim = projection_dim
        d = config.hidden_size
        self.token_embedding = nn.Embedding(vocab_size, d)
        self.position_embedding = nn.Embedding(config.max_length, d)
        self.layers = nn.ModuleList(_TextBlock(d, config.num_heads) for _ in range(config.num_layers))
        self.final_layer_norm = nn.LayerNorm(d)
        self.text_projection = nn.Linear(d, projection_dim, bias=False)
        nn.init.normal_(self.token_embedding.weight, std=config.token_init_std)
        nn.init.normal_(self.position_embedding.weight, std=0.01)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids with right padding -> (B, projection_dim), not normalised."""
        length = input_ids.shape[1]
        if length > self.config.max_length:
            raise ValueError(f"captions of {length} tokens exceed max_length {self.config.max_length}")
        positions = torch.arange(length, device=input_ids.device)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, L, D)
        for layer in self.layers:
            x = layer(x)
        x = self.final_layer_norm(x)
        if self.config.pooling == "mean":
            weights = attention_mask.to(x.dtype).unsqueeze(-1)  # (B, L, 1)
            pooled = (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)  # (B, D)
        else:
            last = attention_mask.long().sum(dim=1).clamp(min=1) - 1  # (B,) index of the EOS
            pooled = x[torch.arange(x.shape[0], device=x.device), last]  # (B, D)
        return self.text_projection(pooled)


def clip_loss(media_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over L2-normalised (B, P) embeddings; pair i of the batch is the positive."""
    scale = logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()
    logits = scale * media_emb @ text_emb.t()  # (B media, B texts)
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def box_patch_weights(boxes: torch.Tensor, image_size: int, patch_size: int) -> torch.Tensor:
    """(R, 4) boxes in crop pixels -> (R, P) weights: each patch's share of the box's area.

    Overlap area rather than "patch centre inside the box", so a box smaller than one patch still
    pools from the patches it lies in.
    """
    grid = image_size // patch_size
    cells = torch.arange(grid, dtype=boxes.dtype, device=boxes.device) * patch_size  # (g,) cell starts
    x0, y0, x1, y1 = (boxes[:, i : i + 1] for i in range(4))  # each (R, 1)
    overlap_x = (torch.minimum(x1, cells + patch_size) - torch.maximum(x0, cells)).clamp(min=0)  # (R, g)
    overlap_y = (torch.minimum(y1, cells + patch_size) - torch.maximum(y0, cells)).clamp(min=0)  # (R, g)
    # (R, g rows, 1) * (R, 1, g cols) -> (R, g, g) -> (R, P), patches in row-major order
    area = (overlap_y.unsqueeze(2) * overlap_x.unsqueeze(1)).flatten(1)
    total = area.sum(dim=1, keepdim=True)
    if bool((total <= 0).any()):
        raise ValueError("a region box covers no patch of the crop")
    return area / total


@dataclass(frozen=True)
class RegionLoss:
    """The region objective: its weight beside the caption loss, its fixed logit scale, and what
    names a region (the aligner's `feature_layer` says which patch features it shapes).

    ``pooling="box"``: the mean of the box's patches must pick the name, so the object may be
    spread over its patches. ``"patch"``: every patch of the box must pick it on its own (weighted
    by its share of the box), so each patch the LLM reads carries the whole object's name.

    Videos: by default a region is named by the patches of its whole-clip box, averaged over the
    frames. ``per_frame``: in every frame, the patches under the object in that frame (its
    ``frame_boxes``, else the whole-clip box) name it, as the LLM reads every frame's patches.
    ``motion_weight``: beside the name, the mean of the patches of the whole-clip box over all
    frames must pick the region's ``motion`` phrase ("moving left") out of all the motion phrases.
    Which way an object goes shows in where it is at which time, so no single patch need hold it,
    but their mean can, and the LLM reads the object's patches together.
    ``frame_motion_weight`` (with ``per_frame``): in every frame, the mean of the patches under the
    object must pick what it is doing at that moment (its track's motion there, "standing still"
    before a move starts), so each frame's tokens say when an object moves, not only that it does.
    """

    weight: float = 1.0  # of the region loss beside the caption loss
    scale: float = 30.0  # fixed logit scale of the name similarities
    pooling: RegionPooling = "box"
    per_frame: bool = False
    motion_weight: float = 0.0  # of the motion term; 0: none
    frame_motion_weight: float = 0.0  # of the per-frame motion term; 0: none

    def __post_init__(self) -> None:
        if not (self.weight > 0 and self.scale > 0):
            raise ValueError(f"weight and scale must be positive, got {self.weight}, {self.scale}")
        for name in ("motion_weight", "frame_motion_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.frame_motion_weight > 0 and not self.per_frame:
            raise ValueError("frame_motion_weight: needs per_frame, since it reads each frame's patches")
        _one_of("pooling", self.pooling, RegionPooling)

    @property
    def names_motions(self) -> bool:
        return self.motion_weight > 0 or self.frame_motion_weight > 0


@dataclass
class RegionBatch:
    """The named regions of a micro-batch, against the vocabulary of names they are told apart from."""

    sample_index: torch.Tensor  # (R,) which media each region belongs to
    boxes: torch.Tensor  # (R, F, 4) crop pixels, in each of F frames (F = 1: one box for the media)
    clip_boxes: torch.Tensor  # (R, 4) crop pixels, the box over the whole media
    frame_valid: torch.Tensor  # (R, F) bool: the region is in sight in that frame
    target: torch.Tensor  # (R,) index of the region's name in the vocabulary
    vocab_ids: torch.Tensor  # (V, L) the vocabulary, tokenised
    vocab_mask: torch.Tensor  # (V, L)
    motion_target: torch.Tensor  # (R,) index of the region's motion phrase, -1 for none
    motion_ids: torch.Tensor | None  # (M, L) the motion phrases, tokenised (None: there are none)
    motion_mask: torch.Tensor | None  # (M, L)
    frame_motion_target: torch.Tensor  # (R, F) the phrase of what the region does in each frame, -1: none


class RegionVocabulary:
    """The names (and motion phrases) regions are told apart from, tokenised once for the stage."""

    def __init__(
        self,
        names: list[str],
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        motions: Sequence[str] = (),
    ):
        if not names:
            raise ValueError("the region loss needs named regions in the data, and there are none")
        self.names = list(names)
        self.index = {name: i for i, name in enumerate(self.names)}
        self.ids, self.mask = tokenize_captions(tokenizer, self.names, max_length)
        self.motions = sorted(motions)  # whatever order the data gives them in
        self.motion_index = {motion: i for i, motion in enumerate(self.motions)}
        self.motion_ids, self.motion_mask = (
            tokenize_captions(tokenizer, self.motions, max_length) if self.motions else (None, None)
        )

    def knows(self, region: Region) -> bool:
        """Whether the region's name (and motion, if it has one and the stage names motions) is here."""
        motion_known = not (self.motions and region.motion) or region.motion in self.motion_index
        return region.text in self.index and motion_known

    def batch(self, regions_per_media: list[list], device: torch.device, frames: int = 1) -> RegionBatch:
        """Regions of each media of a micro-batch (objects with ``box``, ``text``, ``motion`` and,
        for ``frames`` > 1, optional ``frame_boxes``) -> one batch."""
        sample_index, boxes, clip_boxes, valid, target, motion, frame_motion = [], [], [], [], [], [], []
        for i, regions in enumerate(regions_per_media):
            for region in regions:
                if region.text not in self.index:
                    raise ValueError(f"region name {region.text!r} is not in the stage's vocabulary")
                if self.motions and region.motion and region.motion not in self.motion_index:
                    raise ValueError(f"region motion {region.motion!r} is not in the stage's vocabulary")
                per_frame = list(region.frame_boxes) if frames > 1 and region.frame_boxes else []
                if per_frame and len(per_frame) != frames:
                    raise ValueError(
                        f"region {region.text!r} has {len(per_frame)} frame boxes for {frames} frames"
                    )
                per_frame = per_frame or [region.box] * frames
                sample_index.append(i)
                # a frame where the object is out of sight keeps the whole-clip box, unweighted
                boxes.append([region.box if b is None else b for b in per_frame])
                clip_boxes.append(region.box)
                valid.append([b is not None for b in per_frame])
                target.append(self.index[region.text])
                motion.append(self.motion_index.get(region.motion, -1))
                now = (
                    list(region.frame_motions)
                    if frames > 1 and region.frame_motions
                    else [region.motion] * frames
                )
                if len(now) != frames:
                    raise ValueError(
                        f"region {region.text!r} has {len(now)} frame motions for {frames} frames"
                    )
                frame_motion.append(
                    [
                        self.motion_index.get(m, -1) if seen else -1
                        for m, seen in zip(now, valid[-1], strict=True)
                    ]
                )
        return RegionBatch(
            torch.tensor(sample_index, dtype=torch.long, device=device),
            torch.tensor(boxes, dtype=torch.float32, device=device).view(-1, frames, 4),
            torch.tensor(clip_boxes, dtype=torch.float32, device=device).view(-1, 4),
            torch.tensor(valid, dtype=torch.bool, device=device).view(-1, frames),
            torch.tensor(target, dtype=torch.long, device=device),
            self.ids.to(device),
            self.mask.to(device),
            torch.tensor(motion, dtype=torch.long, device=device),
            None if self.motion_ids is None else self.motion_ids.to(device),
            None if self.motion_mask is None else self.motion_mask.to(device),
            torch.tensor(frame_motion, dtype=torch.long, device=device).view(-1, frames),
        )


def _motion_cross_entropy(
    patches: torch.Tensor,
    regions: RegionBatch,
    targets: torch.Tensor,
    logits_of: Callable[[torch.Tensor, RegionBatch], torch.Tensor],
) -> torch.Tensor:
    """Cross-entropy of the motion logits against the ``targets`` that are set (>= 0); 0 if none are."""
    target = targets[targets >= 0]
    if regions.motion_ids is None or target.numel() == 0:
        return patches.new_zeros(())
    return F.cross_entropy(logits_of(patches, regions), target)


class _Aligner(nn.Module):
    """What image and video alignment share: projections, a learnable temperature, the losses.

    Beside the media-caption loss, an optional region loss grounds names in patches: the features
    at ``feature_layer`` (the layer the LLM reads) under each named box, pooled or patch by patch,
    must pick that box's name out of all the names in the data. A caption loss alone is met by the
    CLS token; this one puts what each object is into the patches the projector hands to the LLM.
    """

    def __init__(
        self,
        tower: VisionTower,
        text_encoder: TextEncoder,
        projection_dim: int,
        regions: RegionLoss | None = None,
        feature_layer: int = -2,
    ):
        super().__init__()
        if text_encoder.projection_dim != projection_dim:
            raise ValueError(
                f"text encoder projects to {text_encoder.projection_dim}, aligner to {projection_dim}"
            )
        self.text_encoder = text_encoder
        self.feature_layer = feature_layer
        self.visual_projection = nn.Linear(tower.config.hidden_size, projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        self.regions = regions
        self.image_size = tower.config.image_size
        self.patch_size = tower.config.patch_size
        self.region_projection = (
            nn.Linear(tower.config.hidden_size, projection_dim, bias=False) if regions is not None else None
        )

    def tower_pass(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, ...) media -> pooled (B, D) and patch features at ``feature_layer`` (B, F*P, D),
        F = ``region_frames``."""
        raise NotImplementedError

    def region_frames(self, pixel_values: torch.Tensor) -> int:
        """How many frames' patches ``tower_pass`` hands the region loss: 1 unless per frame."""
        return 1

    def pooled_media(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed_media(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, P) unit vectors: the media's place in the shared space."""
        return self.embed_pooled(self.pooled_media(pixel_values))

    def embed_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, D) pooled tower output -> (B, P) unit vectors in the shared space."""
        return F.normalize(self.visual_projection(pooled), dim=-1)

    def embed_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, P) unit vectors: the caption's place in the shared space."""
        return F.normalize(self.text_encoder(input_ids, attention_mask), dim=-1)

    def _name_logits(self, features: torch.Tensor, regions: RegionBatch) -> torch.Tensor:
        """(..., D) features -> (..., V) scaled cosines with every name of the vocabulary."""
        return self._phrase_logits(features, regions.vocab_ids, regions.vocab_mask)

    def _phrase_logits(self, features: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(..., D) features -> (..., N) scaled cosines with each of N tokenised phrases."""
        assert self.region_projection is not None and self.regions is not None
        phrases = self.embed_text(ids, mask)  # (N, E)
        return self.regions.scale * F.normalize(self.region_projection(features), dim=-1) @ phrases.t()

    def _region_weights(self, regions: RegionBatch, like: torch.Tensor) -> torch.Tensor:
        """(R, F*P): each patch's share of its region, the frames in sight sharing equally."""
        r, f = regions.boxes.shape[:2]
        # (R, F, 4) -> (R*F, 4) -> (R*F, P) -> (R, F, P)
        weights = box_patch_weights(regions.boxes.to(like).view(r * f, 4), self.image_size, self.patch_size)
        weights = weights.view(r, f, -1)
        valid = regions.frame_valid.to(like)  # (R, F)
        share = valid / valid.sum(dim=1, keepdim=True).clamp(min=1)
        return (weights * share[..., None]).flatten(1)

    def region_logits(self, patches: torch.Tensor, regions: RegionBatch) -> torch.Tensor:
        """(R, V): how well each region matches each name (per-patch pooling: the patches' mean logits)."""
        assert self.regions is not None
        weights = self._region_weights(regions, patches)  # (R, F*P)
        if self.regions.pooling == "patch":
            # (R, F*P) x (R, F*P, V) -> (R, V)
            return torch.einsum(
                "rp,rpv->rv", weights, self._name_logits(patches, regions)[regions.sample_index]
            )
        # (R, F*P) x (R, F*P, D) -> (R, D): each region's patches, weighted by their share of its box
        pooled = torch.einsum("rp,rpd->rd", weights, patches[regions.sample_index])
        return self._name_logits(pooled, regions)

    def region_loss(self, patches: torch.Tensor, regions: RegionBatch) -> torch.Tensor:
        assert self.regions is not None
        target = regions.target.to(patches.device)
        if self.regions.pooling == "box":
            return F.cross_entropy(self.region_logits(patches, regions), target)
        weights = self._region_weights(regions, patches)  # (R, F*P)
        logits = self._name_logits(patches, regions)[regions.sample_index]  # (R, F*P, V)
        # (R, F*P, V) -> (R, F*P): each patch's cross-entropy against its region's name
        per_patch = -logits.log_softmax(dim=-1).gather(
            -1, target[:, None, None].expand(-1, logits.shape[1], 1)
        )
        return (weights * per_patch.squeeze(-1)).sum(dim=1).mean()

    def motion_logits(self, patches: torch.Tensor, regions: RegionBatch) -> torch.Tensor:
        """(R', M) for the R' regions with a motion phrase: the mean of the patches of the
        region's whole-clip box, over every frame, against every motion phrase."""
        assert regions.motion_ids is not None and regions.motion_mask is not None
        keep = regions.motion_target >= 0
        weights = box_patch_weights(regions.clip_boxes[keep].to(patches), self.image_size, self.patch_size)
        frames = patches.shape[1] // weights.shape[1]
        # (R', P) -> (R', F*P): the same box in every frame, the frames sharing equally
        weights = weights.repeat(1, frames) / frames
        # (R', F*P) x (R', F*P, D) -> (R', D)
        pooled = torch.einsum("rp,rpd->rd", weights, patches[regions.sample_index[keep]])
        return self._phrase_logits(pooled, regions.motion_ids, regions.motion_mask)

    def motion_loss(self, patches: torch.Tensor, regions: RegionBatch) -> torch.Tensor:
        return _motion_cross_entropy(patches, regions, regions.motion_target, self.motion_logits)

    def frame_motion_logits(self, patches: torch.Tensor, regions: RegionBatch) -> torch.Tensor:
        """(N, M) for the N (region, frame) pairs with a motion: the mean of the patches under the
        region in that frame, against every motion phrase (``frame_motion_target >= 0`` picks them)."""
        assert regions.motion_ids is not None and regions.motion_mask is not None
        f = regions.boxes.shape[1]
        keep = regions.frame_motion_target >= 0  # (R, F)
        # (R, F, 4) -> (N, 4) -> (N, P): the region's box in each kept frame
        weights = box_patch_weights(regions.boxes[keep].to(patches), self.image_size, self.patch_size)
        # (B, F*P, D) -> (B, F, P, D) -> (R, F, P, D) -> (N, P, D): the kept frames' own patches
        frames = patches.view(patches.shape[0], f, -1, patches.shape[-1])[regions.sample_index][keep]
        pooled = torch.einsum("np,npd->nd", weights, frames)  # (N, D)
        return self._phrase_logits(pooled, regions.motion_ids, regions.motion_mask)

    def frame_motion_loss(self, patches: torch.Tensor, regions: RegionBatch) -> torch.Tensor:
        return _motion_cross_entropy(patches, regions, regions.frame_motion_target, self.frame_motion_logits)

    def loss(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        regions: RegionBatch | None = None,
    ) -> torch.Tensor:
        if self.region_projection is None or self.regions is None:
            media = self.embed_media(pixel_values)
            return clip_loss(media, self.embed_text(input_ids, attention_mask), self.logit_scale)
        pooled, patches = self.tower_pass(pixel_values)
        loss = clip_loss(
            self.embed_pooled(pooled), self.embed_text(input_ids, attention_mask), self.logit_scale
        )
        if regions is None or regions.target.numel() == 0:
            # Every rank touches the region head each step, so gradient all-reduces stay in step.
            return loss + 0.0 * self.region_projection.weight.sum()
        loss = loss + self.regions.weight * self.region_loss(patches, regions)
        if self.regions.motion_weight > 0:
            loss = loss + self.regions.motion_weight * self.motion_loss(patches, regions)
        if self.regions.frame_motion_weight > 0:
            loss = loss + self.regions.frame_motion_weight * self.frame_motion_loss(patches, regions)
        return loss


class ImageTextAligner(_Aligner):
    """CLIP on image-caption pairs: everything trains, the text encoder included."""

    def __init__(
        self,
        image_tower: VisionTower,
        text_encoder: TextEncoder,
        projection_dim: int,
        regions: RegionLoss | None = None,
        feature_layer: int = -2,
    ):
        super().__init__(image_tower, text_encoder, projection_dim, regions, feature_layer)
        self.image_tower = image_tower

    def pooled_media(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # (B, 3, H, W) -> (B, D)
        return self.image_tower(pixel_values)

    def tower_pass(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, hidden = self.image_tower.pooled_and_hidden(pixel_values, self.feature_layer)
        return pooled, hidden[:, 1:]  # (B, D), (B, P, D) without the CLS

    def trainable_parameters(self) -> list[nn.Parameter]:
        region = [] if self.region_projection is None else [self.region_projection.weight]
        return [
            *self.image_tower.parameters(),
            *self.text_encoder.parameters(),
            self.visual_projection.weight,
            self.logit_scale,
            *region,
        ]


def _video_trainable_name(name: str) -> bool:
    """A video tower parameter that video alignment trains (LanguageBind's choice); the rest is the
    image tower's spatial path, which stays frozen unless the stage trains it too."""
    return ".temporal_" in name or name == "embeddings.class_embedding" or name.startswith("post_layernorm.")


def is_spatial_parameter(name: str) -> bool:
    """``name`` (a video tower parameter's) belongs to the spatial path copied from the image tower."""
    return not _video_trainable_name(name)


def _copy_linear(target: nn.Linear, source: nn.Linear, what: str) -> None:
    if source.weight.shape != target.weight.shape:
        raise ValueError(
            f"{what} of shape {tuple(source.weight.shape)} does not fit {tuple(target.weight.shape)}"
        )
    with torch.no_grad():
        target.weight.copy_(source.weight)


class VideoTextAligner(_Aligner):
    """Video-caption alignment against a frozen text encoder, so videos land where images already are."""

    def __init__(
        self,
        video_tower: VisionTower,
        text_encoder: TextEncoder,
        projection_dim: int,
        visual_projection_init: nn.Linear | None = None,
        regions: RegionLoss | None = None,
        region_projection_init: nn.Linear | None = None,
        feature_layer: int = -2,
        train_spatial: bool = False,
    ):
        super().__init__(video_tower, text_encoder, projection_dim, regions, feature_layer)
        self.train_spatial = train_spatial
        if not video_tower.config.has_temporal:
            raise ValueError("the video tower has no temporal modules (num_frames=0)")
        self.video_tower = video_tower
        if visual_projection_init is not None:
            _copy_linear(self.visual_projection, visual_projection_init, "visual projection")
        if region_projection_init is not None and self.region_projection is not None:
            _copy_linear(self.region_projection, region_projection_init, "region projection")
        for name, param in video_tower.named_parameters():
            param.requires_grad_(train_spatial or _video_trainable_name(name))
        text_encoder.requires_grad_(False)
        text_encoder.eval()

    def train(self, mode: bool = True) -> VideoTextAligner:
        super().train(mode)
        self.text_encoder.eval()  # frozen: never in training mode
        return self

    def pooled_media(self, pixel_values: torch.Tensor) -> torch.Tensor:
        b, t = pixel_values.shape[:2]
        # (B, T, 3, H, W) -> (B*T, 3, H, W) -> (B*T, D) with temporal attention across each video's frames
        per_frame = self.video_tower(pixel_values.flatten(0, 1), num_frames=t)
        # (B*T, D) -> (B, T, D) -> (B, D)
        return per_frame.view(b, t, -1).mean(dim=1)

    def region_frames(self, pixel_values: torch.Tensor) -> int:
        return pixel_values.shape[1] if self.regions is not None and self.regions.per_frame else 1

    def tower_pass(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t = pixel_values.shape[:2]
        pooled, hidden = self.video_tower.pooled_and_hidden(pixel_values.flatten(0, 1), self.feature_layer, t)
        frames = hidden.view(b, t, *hidden.shape[1:])[:, :, 1:]  # (B*T, 1+P, D) -> (B, T, P, D)
        if self.region_frames(pixel_values) > 1:
            patches = frames.flatten(1, 2)  # (B, T*P, D): each frame's own patches
        else:
            patches = frames.mean(dim=1)  # (B, P, D): a region spans all frames
        return pooled.view(b, t, -1).mean(dim=1), patches

    def embed_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return super().embed_text(input_ids, attention_mask)

    def trainable_parameters(self) -> list[nn.Parameter]:
        tower = [
            p
            for name, p in self.video_tower.named_parameters()
            if self.train_spatial or _video_trainable_name(name)
        ]
        region = [] if self.region_projection is None else [self.region_projection.weight]
        return [*tower, self.visual_projection.weight, self.logit_scale, *region]


TemporalInit = Literal["random", "sinusoidal"]


def sinusoidal_time_table(num_frames: int, width: int, std: float) -> torch.Tensor:
    """(T, D): frame t at time t / (T - 1) in [0, 1], as sines and cosines of 1/2 to 2 turns over
    the clip, scaled to ``std`` per element. Nearby frames get nearby rows and the order of frames
    is a direction in the table, so the tower can tell earlier from later from the start; the
    curve does not depend on T, so the table resampled to more frames is that curve sampled finer."""
    times = torch.linspace(0.0, 1.0, num_frames) if num_frames > 1 else torch.zeros(1)
    turns = torch.logspace(math.log10(0.5), math.log10(2.0), width // 2)  # (D/2,)
    angles = 2 * math.pi * times[:, None] * turns[None, :]  # (T, D/2)
    table = torch.zeros(num_frames, width)
    table[:, 0 : 2 * (width // 2) : 2] = angles.sin()
    table[:, 1 : 2 * (width // 2) : 2] = angles.cos()
    return table * std * math.sqrt(2.0)


def init_video_tower_from_image(
    image_tower: VisionTower,
    num_frames: int,
    temporal_embedding_std: float = 0.0,
    temporal_embedding_init: TemporalInit = "random",
) -> VisionTower:
    """A video tower that starts out computing what the image tower computes on each frame.

    The temporal branch is a residual whose output projection is zero, so training grows it from a
    no-op instead of disturbing the language-aligned image features. With a zero temporal embedding
    the tower is symmetric in time: frames in reverse order give the same pooled output, and on
    data that holds every motion and its reverse the gradient keeps that symmetry, so the tower
    never learns which way things move. A small random temporal embedding
    (``temporal_embedding_std``, about 2% of the unit-scale residual stream at 0.02) breaks it;
    ``temporal_embedding_init="sinusoidal"`` starts every layer from `sinusoidal_time_table` instead.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if temporal_embedding_std < 0:
        raise ValueError(f"temporal_embedding_std must be >= 0, got {temporal_embedding_std}")
    _one_of("temporal_embedding_init", temporal_embedding_init, TemporalInit)
    reference = next(image_tower.parameters())
    video_tower = VisionTower(replace(image_tower.config, num_frames=num_frames))
    video_tower.to(device=reference.device, dtype=reference.dtype)
    missing, unexpected = video_tower.load_state_dict(image_tower.state_dict(), strict=False)
    if unexpected or any(".temporal_" not in key for key in missing):
        raise ValueError(f"image tower does not fit: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for layer in video_tower.encoder.layers:
            if temporal_embedding_init == "sinusoidal":
                table = sinusoidal_time_table(
                    num_frames, layer.temporal_embedding.shape[-1], temporal_embedding_std
                )
                layer.temporal_embedding.copy_(table[None])
            else:
                layer.temporal_embedding.normal_(0.0, temporal_embedding_std)
            layer.temporal_attn.out_proj.weight.zero_()
            layer.temporal_attn.out_proj.bias.zero_()
    video_tower.train(image_tower.training)
    return video_tower


def retrieval_recall_at_1(
    media_emb: torch.Tensor, text_emb: torch.Tensor, text_keys: list[str] | None = None
) -> dict[str, float]:
    """Recall@1 both ways for aligned (N, P) embeddings where row i of each belongs together.

    With ``text_keys`` (the caption strings), retrieving a different row whose caption is the same
    string still counts as a hit: identical captions cannot be told apart by any model.
    """
    if media_emb.shape[0] != text_emb.shape[0]:
        raise ValueError(f"{media_emb.shape[0]} media but {text_emb.shape[0]} texts")
    n = media_emb.shape[0]
    if text_keys is not None and len(text_keys) != n:
        raise ValueError(f"{len(text_keys)} text keys for {n} pairs")
    sim = media_emb.float() @ text_emb.float().t()  # (N media, N texts)
    truth = torch.arange(n)
    if text_keys is None:
        same = truth[:, None] == truth[None, :]
    else:
        ids = {key: i for i, key in enumerate(dict.fromkeys(text_keys))}
        key_ids = torch.tensor([ids[k] for k in text_keys])
        same = key_ids[:, None] == key_ids[None, :]  # (N, N): caption i equals caption j
    best_text = sim.argmax(dim=1).cpu()
    best_media = sim.argmax(dim=0).cpu()
    return {
        "media_to_text": same[truth, best_text].float().mean().item(),
        "text_to_media": same[best_media, truth].float().mean().item(),
    }


def tokenize_captions(
    tokenizer: PreTrainedTokenizerBase, captions: list[str], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (N, L) ids and mask, each caption ending in EOS so the text tower pools there."""
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    rows: list[list[int]] = []
    for caption in captions:
        ids = list(tokenizer(caption, add_special_tokens=True)["input_ids"])
        if ids and ids[-1] == eos:
            ids = ids[:-1]
        rows.append(ids[: max_length - 1] + [eos])
    width = max((len(r) for r in rows), default=0)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return input_ids, mask
