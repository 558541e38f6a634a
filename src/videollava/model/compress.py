"""Visual-token compression before the projector: per frame, the K patches the tower's CLS attends to most.

Training-free (FasterVLM's per-frame CLS top-k): the CLS query's attention at the block that
produces the selected hidden state, averaged over heads, ranks the patches of each image or frame;
the K best are kept in their original order, so the LLM sees the same layout with holes. A video
keeps every frame's CLS row in front of its patches, as the reference feeds it. A budget at or
above the patch count changes nothing: the tower takes its uncompressed path.
"""

from __future__ import annotations

import torch


def check_budget(value: object, name: str = "visual_tokens") -> int | None:
    """A budget as given by a caller: None (no budget) or a whole number of at least 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{name} must be a whole number of at least 1 (patch tokens kept per frame), got {value!r}"
        )
    return value


def check_rank_layer(value: object, num_layers: int, name: str = "visual_token_layer") -> int | None:
    """The hidden-state index whose producing block's CLS attention ranks patches: None (the feature
    layer's own block) or an index into the tower's hidden states other than the embedding output."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not -(num_layers + 1) <= value <= num_layers:
        raise ValueError(
            f"{name} must be a hidden-state index from {-(num_layers + 1)} to {num_layers}, got {value!r}"
        )
    if value % (num_layers + 1) == 0:
        raise ValueError(f"{name} {value} is the embedding output, which no block's attention produces")
    return value


def kept_patches(budget: int | None, patches: int) -> int:
    """Patch rows kept per image or frame under `budget` (None: all `patches`)."""
    return patches if budget is None else min(budget, patches)


def top_patches(hidden: torch.Tensor, cls_attention: torch.Tensor, keep: int, with_cls: bool) -> torch.Tensor:
    """(B, 1+P, D) hidden states, (B, 1+P) CLS attention -> (B, [1+]K, D): the K most attended patches.

    Kept patches stay in their original order; among equal scores the earlier patch wins (a stable
    sort), so the choice never depends on the device's top-k. `with_cls` keeps row 0 first.
    """
    batch, rows, width = hidden.shape
    if keep >= rows - 1:
        return hidden if with_cls else hidden[:, 1:]
    # (B, P): the CLS query's weight on each patch (its weight on itself left out)
    scores = cls_attention[:, 1:]
    ranked = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :keep]
    chosen = ranked.sort(dim=1).values + 1  # (B, K) rows of `hidden`, in original order
    if with_cls:
        chosen = torch.cat([chosen.new_zeros(batch, 1), chosen], dim=1)  # (B, 1+K)
    # (B, K', 1) -> (B, K', D)
    return hidden.gather(1, chosen.unsqueeze(-1).expand(-1, -1, width))
