"""An image tower trained without language: masked-patch reconstruction, as MAE (He et al., 2022).

The paper's "Separated-MAE" ablation pairs an image encoder that never saw text with a
language-aligned video encoder. Here the image tower sees a random quarter of each image's patches
(the others are dropped, not replaced), and a small decoder, given the tower's output and a
shared mask token at every dropped position, must paint the dropped patches back: the mean squared
error over the masked patches' pixels, each patch normalised to zero mean and unit variance (MAE's
`norm_pix_loss`). Nothing in it names a colour or a shape; whatever the patches end up holding,
they hold for reconstruction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from videollava.model.vision import EncoderLayer, VisionConfig, VisionTower


@dataclass
class MaeConfig:
    """The masking and the decoder; the encoder is the model's image tower as it stands."""

    mask_ratio: float = 0.75  # fraction of each image's patches the tower does not see
    decoder_hidden_size: int = 64
    decoder_layers: int = 1
    decoder_heads: int = 4
    norm_pix_loss: bool = True  # each target patch normalised to zero mean, unit variance

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio: must be in (0, 1), got {self.mask_ratio}")
        for name in ("decoder_hidden_size", "decoder_layers", "decoder_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.decoder_hidden_size % self.decoder_heads:
            raise ValueError(
                f"decoder_hidden_size: {self.decoder_hidden_size} is not divisible by "
                f"decoder_heads {self.decoder_heads}"
            )


def patchify(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, P, p*p*C), patches in the row-major order of the tower's patch embedding."""
    b, c, h, w = pixels.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"{h}x{w} pixels do not split into {patch_size}-pixel patches")
    rows, cols = h // patch_size, w // patch_size
    # (B, C, rows, p, cols, p) -> (B, rows, cols, p, p, C) -> (B, rows*cols, p*p*C)
    x = pixels.reshape(b, c, rows, patch_size, cols, patch_size).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, rows * cols, patch_size * patch_size * c)


class MaskedAutoencoder(nn.Module):
    """The image tower as an MAE encoder (visible patches only) plus a light decoder."""

    def __init__(self, tower: VisionTower, config: MaeConfig):
        super().__init__()
        if tower.config.has_temporal:
            raise ValueError("masked-patch reconstruction trains an image tower (no temporal modules)")
        self.tower = tower
        self.config = config
        vision = tower.config
        d = config.decoder_hidden_size
        self.num_patches = vision.num_patches
        self.keep = max(1, round(self.num_patches * (1.0 - config.mask_ratio)))
        decoder = VisionConfig(
            hidden_size=d,
            intermediate_size=4 * d,
            num_hidden_layers=config.decoder_layers,
            num_attention_heads=config.decoder_heads,
            patch_size=vision.patch_size,
            image_size=vision.image_size,
            layer_norm_eps=vision.layer_norm_eps,
            hidden_act=vision.hidden_act,
        )
        self.decoder_embed = nn.Linear(vision.hidden_size, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.decoder_position = nn.Parameter(torch.zeros(1, self.num_patches + 1, d))
        self.decoder_layers = nn.ModuleList(EncoderLayer(decoder) for _ in range(config.decoder_layers))
        self.decoder_norm = nn.LayerNorm(d, eps=vision.layer_norm_eps)
        self.decoder_head = nn.Linear(d, vision.patch_size**2 * vision.num_channels)
        for module in (self.decoder_embed, self.decoder_head, *self.decoder_layers.modules()):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.normal_(self.decoder_position, std=0.02)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())  # the tower's and the decoder's

    def loss(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean squared error over the masked patches of (B, C, H, W) images; `generator` draws the
        masks (default: torch's global RNG, which the runner seeds per stage)."""
        tower, b = self.tower, pixels.shape[0]
        embeddings = tower.embeddings
        weight = embeddings.patch_embedding.weight
        # (B, C, H, W) -> (B, D, rows, cols) -> (B, P, D)
        patches = embeddings.patch_embedding(pixels.to(weight.dtype)).flatten(2).transpose(1, 2)
        position = embeddings.position_embedding.weight  # (1+P, D)
        patches = patches + position[1:]
        noise = torch.rand(b, self.num_patches, generator=generator).to(pixels.device)
        order = noise.argsort(dim=1)  # (B, P): the first `keep` are seen
        restore = order.argsort(dim=1)  # (B, P): where each patch sits in `order`
        seen = order[:, : self.keep]
        width = patches.shape[-1]
        visible = patches.gather(1, seen[..., None].expand(-1, -1, width))  # (B, K, D)
        cls = (embeddings.class_embedding + position[0]).expand(b, 1, width)
        x = tower.pre_layrnorm(torch.cat([cls, visible], dim=1))  # (B, 1+K, D)
        for layer in tower.encoder.layers:
            x = layer(x)
        x = self.decoder_embed(tower.post_layernorm(x))  # (B, 1+K, d)

        d = x.shape[-1]
        masks = self.mask_token.to(x.dtype).expand(b, self.num_patches - self.keep, d)
        shuffled = torch.cat([x[:, 1:], masks], dim=1)  # (B, P, d) in `order`
        unshuffled = shuffled.gather(1, restore[..., None].expand(-1, -1, d))  # (B, P, d) in patch order
        y = torch.cat([x[:, :1], unshuffled], dim=1) + self.decoder_position  # (B, 1+P, d)
        for layer in self.decoder_layers:
            y = layer(y)
        predicted = self.decoder_head(self.decoder_norm(y[:, 1:]))  # (B, P, p*p*C)

        target = patchify(pixels.to(predicted.dtype), tower.config.patch_size)  # (B, P, p*p*C)
        if self.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        masked = (restore >= self.keep).to(predicted.dtype)  # (B, P): 1 where the tower saw nothing
        per_patch = (predicted.float() - target.float()).pow(2).mean(dim=-1)  # (B, P)
        return (per_patch * masked).sum() / masked.sum()


class MaeObjective(nn.Module):
    """The reconstruction loss of one micro-batch of images, weighted by its size (the loop divides
    by the global batch's total)."""

    def __init__(self, mae: MaskedAutoencoder):
        super().__init__()
        self.mae = mae

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        tower = self.mae.tower
        device = tower.embeddings.patch_embedding.weight.device
        if batch["num_samples"] == 0:
            # A rank with no data this step still joins the gradient all-reduce, contributing zero.
            size = tower.config.image_size
            return self.mae.loss(torch.zeros(1, 3, size, size, device=device)) * 0.0, 0
        n = int(batch["num_samples"])
        return self.mae.loss(batch["pixels"].to(device)) * n, n


def heldout_reconstruction(
    mae: MaskedAutoencoder, batches: list[torch.Tensor], seed: int = 0
) -> dict[str, float]:
    """Mean masked-patch error on held-out image batches, under masks drawn from `seed`: the same
    masks at every evaluation, so the numbers of one run compare step to step."""
    if not batches:
        return {}
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    with torch.no_grad():
        for pixels in batches:
            total += mae.loss(pixels, generator).item() * pixels.shape[0]
            count += pixels.shape[0]
    return {"image_mae_loss": total / count}
