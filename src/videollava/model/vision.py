"""CLIP ViT vision towers; the video tower adds divided space-time attention in every layer.

Parameter names follow `transformers`' CLIPVisionModel (without the `vision_model.` level) and
LanguageBind's video encoder (`temporal_embedding`, `temporal_layer_norm1`, `temporal_attn`), so
checkpoints of either load without renaming inside a layer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from videollava.model.compress import top_patches


@dataclass
class VisionConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    patch_size: int = 14
    image_size: int = 224
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu"
    # Rows of the per-layer temporal embedding; 0 means an image tower (no temporal modules).
    num_frames: int = 0

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def has_temporal(self) -> bool:
        return self.num_frames > 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VisionConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
        approximate = "none" if name == "gelu" else "tanh"
        return lambda x: F.gelu(x, approximate=approximate)
    raise ValueError(f"unsupported vision activation {name!r}")


class Attention(nn.Module):
    """Multi-head self-attention over the second axis, computed with SDPA."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_cls_attention(x, False)[0]

    def forward_with_cls_attention(
        self, x: torch.Tensor, cls_attention: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The attention output and, if asked, row 0's attention weights averaged over heads (B, L).

        SDPA stays fused for the output; the one query of row 0 (the CLS) is scored on its own
        against every key, in float32, softmax per head, then the mean over heads.
        """
        batch, length, width = x.shape

        # (B, L, D) -> (B, heads, L, head_dim)
        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        q, k = split(self.q_proj(x)), split(self.k_proj(x))
        out = F.scaled_dot_product_attention(q, k, split(self.v_proj(x)))
        # (B, heads, L, head_dim) -> (B, L, D)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, length, width))
        if not cls_attention:
            return out, None
        # (B, heads, 1, head_dim) @ (B, heads, head_dim, L) -> (B, heads, 1, L)
        logits = q[:, :, :1].float() @ k.float().transpose(-1, -2) * self.head_dim**-0.5
        return out, logits.softmax(dim=-1).mean(dim=1)[:, 0]  # (B, L)


class MLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = _activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-LN transformer block; with temporal modules it first attends across frames (TimeSformer style)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        d = config.hidden_size
        if config.has_temporal:
            self.temporal_embedding = nn.Parameter(torch.zeros(1, config.num_frames, d))
            self.temporal_layer_norm1 = nn.LayerNorm(d, eps=config.layer_norm_eps)
            self.temporal_attn = Attention(d, config.num_attention_heads)
        self.layer_norm1 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.self_attn = Attention(d, config.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def temporal_embedding_for(self, num_frames: int) -> torch.Tensor:
        """The (1, T, D) temporal embedding, linearly resampled along time when T differs from training."""
        table = self.temporal_embedding
        if table.shape[1] == num_frames:
            return table
        # (1, T0, D) -> (1, D, T0) -> (1, D, T) -> (1, T, D)
        resampled = F.interpolate(
            table.transpose(1, 2).float(), size=num_frames, mode="linear", align_corners=True
        )
        return resampled.transpose(1, 2).to(table.dtype)

    def forward(self, x: torch.Tensor, num_frames: int = 1) -> torch.Tensor:
        return self.forward_with_cls_attention(x, num_frames, False)[0]

    def forward_with_cls_attention(
        self, x: torch.Tensor, num_frames: int = 1, cls_attention: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The block's output and, if asked, how much each frame's CLS attends to each of its rows.

        The weights are those of the spatial attention (after `layer_norm1`, past the temporal
        step): (B*T, N), each row summing to one.
        """
        # x: (B*T, N, D), frames of one video adjacent
        if num_frames > 1 and hasattr(self, "temporal_embedding"):
            bt, n, d = x.shape
            # (B*T, N, D) -> (B, T, N, D) -> (B, N, T, D) -> (B*N, T, D)
            x = x.view(bt // num_frames, num_frames, n, d).transpose(1, 2).reshape(-1, num_frames, d)
            x = x + self.temporal_embedding_for(num_frames)
            x = x + self.temporal_attn(self.temporal_layer_norm1(x))
            # (B*N, T, D) -> (B, N, T, D) -> (B, T, N, D) -> (B*T, N, D)
            x = x.view(bt // num_frames, n, num_frames, d).transpose(1, 2).reshape(bt, n, d)
        normed = self.layer_norm1(x)
        if cls_attention:
            attended, weights = self.self_attn.forward_with_cls_attention(normed)
        else:
            attended, weights = self.self_attn(normed), None
        x = x + attended
        return x + self.mlp(self.layer_norm2(x)), weights


class Embeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        d = config.hidden_size
        self.class_embedding = nn.Parameter(torch.zeros(d))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, d, kernel_size=config.patch_size, stride=config.patch_size, bias=False
        )
        self.position_embedding = nn.Embedding(config.num_patches + 1, d)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B, D, H/p, W/p) -> (B, P, D)
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight  # (B, 1+P, D)


class Encoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = False


class VisionTower(nn.Module):
    """CLIP ViT returning the hidden state of one layer, as Video-LLaVA feeds the LLM.

    Hidden state index 0 is the embedding output after `pre_layrnorm`; index -2 (the default)
    is the output of the second-to-last block. Blocks after the selected one are skipped.
    """

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def _blocks(self, x: torch.Tensor, start: int, stop: int, num_frames: int) -> torch.Tensor:
        for block in self.encoder.layers[start:stop]:
            if self.encoder.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, num_frames, use_reentrant=False)
            else:
                x = block(x, num_frames)
        return x

    def hidden_state(self, pixel_values: torch.Tensor, layer: int = -2, num_frames: int = 1) -> torch.Tensor:
        """(B*T, C, H, W) -> (B*T, 1+P, D): the hidden state at `layer` (an index into all hidden states)."""
        index = layer % (self.config.num_hidden_layers + 1)
        return self._blocks(self.pre_layrnorm(self.embeddings(pixel_values)), 0, index, num_frames)

    def forward(self, pixel_values: torch.Tensor, num_frames: int = 1) -> torch.Tensor:
        """Pooled output (post-LN CLS of the last layer), used by contrastive alignment."""
        x = self.hidden_state(pixel_values, layer=-1, num_frames=num_frames)
        return self.post_layernorm(x[:, 0])

    def pooled_and_hidden(
        self, pixel_values: torch.Tensor, layer: int = -2, num_frames: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass for both: the pooled output (B*T, D) and the hidden state at `layer` (B*T, 1+P, D)."""
        total = self.config.num_hidden_layers + 1
        index = layer % total
        hidden = self.hidden_state(pixel_values, layer, num_frames)
        last = self._blocks(hidden, index, total - 1, num_frames)
        return self.post_layernorm(last[:, 0]), hidden

    def hidden_state_and_cls_attention(
        self, pixel_values: torch.Tensor, layer: int = -2, num_frames: int = 1, rank_layer: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B*T, C, H, W) -> the hidden state at `layer` (B*T, 1+P, D) and the CLS query's attention
        over the rows (B*T, 1+P), averaged over heads, in the block that produces hidden state
        `rank_layer` (default: `layer`'s own block, as FasterVLM ranks; a later one runs the
        blocks between too)."""
        total = self.config.num_hidden_layers + 1
        index = layer % total
        rank = index if rank_layer is None else rank_layer % total
        if rank == 0:
            raise ValueError(
                "visual-token compression ranks patches by a block's CLS attention, but layer "
                f"{layer if rank_layer is None else rank_layer} is the embedding output, which no block produces"
            )
        x = self._blocks(
            self.pre_layrnorm(self.embeddings(pixel_values)), 0, min(index, rank - 1), num_frames
        )
        if rank > index:
            hidden = x
            x = self._blocks(x, index, rank - 1, num_frames)
        out, weights = self.encoder.layers[rank - 1].forward_with_cls_attention(x, num_frames)
        if rank <= index:
            hidden = self._blocks(out, rank, index, num_frames)
        assert weights is not None
        return hidden, weights

    def _features(
        self,
        pixel_values: torch.Tensor,
        layer: int,
        num_frames: int,
        keep: int | None,
        with_cls: bool,
        rank_layer: int | None = None,
    ):
        """(B*T, C, H, W) -> (B*T, [1+]K, D); K = every patch when `keep` is None or covers them all."""
        if keep is None or keep >= self.config.num_patches:
            hidden = self.hidden_state(pixel_values, layer, num_frames)
            return hidden if with_cls else hidden[:, 1:]
        hidden, weights = self.hidden_state_and_cls_attention(pixel_values, layer, num_frames, rank_layer)
        return top_patches(hidden, weights, keep, with_cls)

    def encode_images(
        self,
        pixel_values: torch.Tensor,
        layer: int = -2,
        keep: int | None = None,
        rank_layer: int | None = None,
    ) -> torch.Tensor:
        """(N, C, H, W) -> (N, P, D): patch features, CLS dropped; with `keep`, the `keep` most
        attended patches per image (N, K, D), in their original order (see
        `hidden_state_and_cls_attention` for `rank_layer`)."""
        return self._features(pixel_values, layer, 1, keep, False, rank_layer)

    def encode_videos(
        self,
        pixel_values: torch.Tensor,
        layer: int = -2,
        keep: int | None = None,
        rank_layer: int | None = None,
    ) -> torch.Tensor:
        """(N, T, C, H, W) -> (N, T*(1+P), D): every frame's CLS and patches, frame after frame; with
        `keep`, each frame's CLS and its `keep` most attended patches (N, T*(1+K), D)."""
        n, t = pixel_values.shape[:2]
        # (N, T, C, H, W) -> (N*T, C, H, W)
        frames = t if self.config.has_temporal else 1
        features = self._features(pixel_values.flatten(0, 1), layer, frames, keep, True, rank_layer)
        # (N*T, 1+K, D) -> (N, T*(1+K), D)
        return features.reshape(n, t * features.shape[1], features.shape[2])

    def temporal_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if ".temporal_" in name]
