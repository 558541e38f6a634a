"""Language-anchored alignment of the visual towers, the LanguageBind recipe in miniature.

First an image tower and a text encoder learn a shared space from image-caption pairs (CLIP). Then
the video tower starts as a copy of the image tower with temporal modules that are initially a no-op,
the text encoder is frozen, and only the temporal modules, the CLS embedding, the post-LN and the
projection learn from video-caption pairs. The text side anchors both towers in one space, which is
why a single projector can later serve images and videos alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from videollava.model.vision import VisionTower

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100.0)


@dataclass
class TextEncoderConfig:
    vocab_size: int
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    max_length: int = 64
    projection_dim: int = 128


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
    """Small CLIP-style text tower: its output at the last real token (EOS) stands for the caption."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.token_embedding = nn.Embedding(config.vocab_size, d)
        self.position_embedding = nn.Embedding(config.max_length, d)
        self.layers = nn.ModuleList(_TextBlock(d, config.num_heads) for _ in range(config.num_layers))
        self.final_layer_norm = nn.LayerNorm(d)
        self.text_projection = nn.Linear(d, config.projection_dim, bias=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
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
        last = attention_mask.long().sum(dim=1).clamp(min=1) - 1  # (B,) index of the EOS
        pooled = x[torch.arange(x.shape[0], device=x.device), last]  # (B, D)
        return self.text_projection(pooled)


def clip_loss(media_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over L2-normalised (B, P) embeddings; pair i of the batch is the positive."""
    scale = logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()
    logits = scale * media_emb @ text_emb.t()  # (B media, B texts)
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


class _Aligner(nn.Module):
    """What image and video alignment share: a projection, a learnable temperature, the loss."""

    def __init__(self, tower: VisionTower, text_encoder: TextEncoder, projection_dim: int):
        super().__init__()
        if text_encoder.config.projection_dim != projection_dim:
            raise ValueError(
                f"text encoder projects to {text_encoder.config.projection_dim}, aligner to {projection_dim}"
            )
        self.text_encoder = text_encoder
        self.visual_projection = nn.Linear(tower.config.hidden_size, projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))

    def pooled_media(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed_media(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, P) unit vectors: the media's place in the shared space."""
        return F.normalize(self.visual_projection(self.pooled_media(pixel_values)), dim=-1)

    def embed_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, P) unit vectors: the caption's place in the shared space."""
        return F.normalize(self.text_encoder(input_ids, attention_mask), dim=-1)

    def loss(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        return clip_loss(
            self.embed_media(pixel_values), self.embed_text(input_ids, attention_mask), self.logit_scale
        )


class ImageTextAligner(_Aligner):
    """CLIP on image-caption pairs: everything trains, the text encoder included."""

    def __init__(self, image_tower: VisionTower, text_encoder: TextEncoder, projection_dim: int):
        super().__init__(image_tower, text_encoder, projection_dim)
        self.image_tower = image_tower

    def pooled_media(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # (B, 3, H, W) -> (B, D)
        return self.image_tower(pixel_values)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [
            *self.image_tower.parameters(),
            *self.text_encoder.parameters(),
            self.visual_projection.weight,
            self.logit_scale,
        ]


def _video_trainable_name(name: str) -> bool:
    return ".temporal_" in name or name == "embeddings.class_embedding" or name.startswith("post_layernorm.")


class VideoTextAligner(_Aligner):
    """Video-caption alignment against a frozen text encoder, so videos land where images already are."""

    def __init__(
        self,
        video_tower: VisionTower,
        text_encoder: TextEncoder,
        projection_dim: int,
        visual_projection_init: nn.Linear | None = None,
    ):
        super().__init__(video_tower, text_encoder, projection_dim)
        if not video_tower.config.has_temporal:
            raise ValueError("the video tower has no temporal modules (num_frames=0)")
        self.video_tower = video_tower
        if visual_projection_init is not None:
            if visual_projection_init.weight.shape != self.visual_projection.weight.shape:
                raise ValueError(
                    f"visual projection of shape {tuple(visual_projection_init.weight.shape)} does not fit "
                    f"{tuple(self.visual_projection.weight.shape)}"
                )
            with torch.no_grad():
                self.visual_projection.weight.copy_(visual_projection_init.weight)
        for name, param in video_tower.named_parameters():
            param.requires_grad_(_video_trainable_name(name))
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

    def embed_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return super().embed_text(input_ids, attention_mask)

    def trainable_parameters(self) -> list[nn.Parameter]:
        tower = [p for name, p in self.video_tower.named_parameters() if _video_trainable_name(name)]
        return [*tower, self.visual_projection.weight, self.logit_scale]


def init_video_tower_from_image(
    image_tower: VisionTower, num_frames: int, temporal_embedding_std: float = 0.0
) -> VisionTower:
    """A video tower that starts out computing what the image tower computes on each frame.

    The temporal branch is a residual whose output projection is zero, so training grows it from a
    no-op instead of disturbing the language-aligned image features. With a zero temporal embedding
    the tower is symmetric in time: frames in reverse order give the same pooled output, and on
    data that holds every motion and its reverse the gradient keeps that symmetry, so the tower
    never learns which way things move. A small random temporal embedding
    (``temporal_embedding_std``, about 2% of the unit-scale residual stream at 0.02) breaks it.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if temporal_embedding_std < 0:
        raise ValueError(f"temporal_embedding_std must be >= 0, got {temporal_embedding_std}")
    reference = next(image_tower.parameters())
    video_tower = VisionTower(replace(image_tower.config, num_frames=num_frames))
    video_tower.to(device=reference.device, dtype=reference.dtype)
    missing, unexpected = video_tower.load_state_dict(image_tower.state_dict(), strict=False)
    if unexpected or any(".temporal_" not in key for key in missing):
        raise ValueError(f"image tower does not fit: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for layer in video_tower.encoder.layers:
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
