"""What each stage minimises, as modules the training loop calls: `forward(batch)` returns the
sum of per-item losses and how many items it summed (the loop divides by the global batch's total).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from videollava.constants import IGNORE_INDEX, IMAGE_SLOT
from videollava.model.videollava import VideoLlava
from videollava.train.contrastive import RegionVocabulary, tokenize_captions


class LMObjective(nn.Module):
    """Next-token loss on answers: the sum over supervised tokens and their count."""

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
        out = self.model(batch["input_ids"], batch["images"], batch["videos"], labels=batch["labels"])
        logits = out.logits[:, :-1]  # (B, L-1, V): position t predicts token t+1
        targets = out.labels[:, 1:]  # (B, L-1)
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
