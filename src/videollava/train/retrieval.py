"""Held-out evaluation of an alignment stage: caption retrieval both ways and, where the data names
regions, how often the patches under each box pick that region's name and motion (over the clip,
and in each frame)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from videollava.data.datasets import CaptionDataset, Skipped, collate_captions
from videollava.train.contrastive import RegionVocabulary, retrieval_recall_at_1, tokenize_captions


def retrieval_metrics(
    aligner: nn.Module,
    dataset: CaptionDataset | None,
    tokenizer: Any,
    vocabulary: RegionVocabulary | None,
    batch_size: int,
) -> dict[str, float]:
    """`<modality>_r1_*` recall at 1, the number of pairs and, with a region vocabulary, the
    `<modality>_region_name_acc` / `_region_motion_acc` / `_region_frame_motion_acc` accuracies."""
    if dataset is None or len(dataset) == 0:
        return {}
    device = aligner.logit_scale.device
    vocabulary = vocabulary if dataset.regions else None
    media, texts, captions = [], [], []
    hits = dict.fromkeys(("name", "motion", "frame_motion"), 0)
    totals = dict.fromkeys(hits, 0)

    def count(kind: str, logits: torch.Tensor, target: torch.Tensor) -> None:
        hits[kind] += int((logits.argmax(dim=-1) == target).sum())
        totals[kind] += target.numel()

    items = [dataset[i] for i in range(len(dataset))]
    good = [s for s in items if not isinstance(s, Skipped)]
    max_length = aligner.text_encoder.config.max_length
    for start in range(0, len(good), batch_size):
        batch = collate_captions(good[start : start + batch_size])
        ids, mask = tokenize_captions(tokenizer, batch["captions"], max_length)
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
                count("name", aligner.region_logits(patches, named), named.target)
            moving = named.motion_target[named.motion_target >= 0]
            if named.motion_ids is not None and moving.numel():
                count("motion", aligner.motion_logits(patches, named), moving)
            in_frames = named.frame_motion_target[named.frame_motion_target >= 0]
            if named.motion_ids is not None and in_frames.numel() and named.boxes.shape[1] > 1:
                count("frame_motion", aligner.frame_motion_logits(patches, named), in_frames)
    recall = retrieval_recall_at_1(torch.cat(media), torch.cat(texts), captions)
    prefix = dataset.modality
    out = {f"{prefix}_r1_{k}": v for k, v in recall.items()} | {f"{prefix}_eval_pairs": float(len(good))}
    for kind, total in totals.items():
        if total:
            out[f"{prefix}_region_{kind}_acc"] = hits[kind] / total
    return out
