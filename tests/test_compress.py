"""Visual-token compression in the model: top-k selection, the CLS attention that ranks patches, the
budget's no-op, and the budget as a field of the checkpoint's config.

Tolerance: the CLS attention is compared in float32 with an explicit full attention matrix within
1e-6 absolute (softmax weights in [0, 1]); everything said to be unchanged is compared bitwise.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from videollava.errors import CheckpointError
from videollava.model.bundle import load_bundle, save_bundle
from videollava.model.checkpoint import load_weights
from videollava.model.compress import check_budget, kept_patches, top_patches
from videollava.model.vision import VisionConfig, VisionTower
from videollava.testing import TINY_VISION

ATOL = 1e-6
SIZE = TINY_VISION["image_size"]
PATCHES = (SIZE // TINY_VISION["patch_size"]) ** 2  # 16


@pytest.fixture(scope="module")
def ours(hf_checkpoint):
    model, _ = load_weights(hf_checkpoint[0], torch.float32)
    return model


def temporal_tower(frames: int = 4, seed: int = 0) -> VisionTower:
    """A random video tower with divided space-time attention (random temporal weights too)."""
    torch.manual_seed(seed)
    config = VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        patch_size=14, image_size=SIZE, num_frames=frames,
    )  # fmt: skip
    tower = VisionTower(config).eval()
    with torch.no_grad():
        for name, param in tower.named_parameters():
            noise = torch.randn_like(param) * 0.2
            param.copy_(noise + 1 if "norm" in name and name.endswith("weight") else noise)
    return tower


# --------------------------------------------------------------------------------------------
# selection


def test_top_patches_keeps_the_most_attended_in_their_order():
    torch.manual_seed(0)
    hidden = torch.randn(3, 1 + 10, 5)
    scores = torch.rand(3, 1 + 10)
    kept = top_patches(hidden, scores, 4, with_cls=False)
    assert kept.shape == (3, 4, 5)
    for b in range(3):
        best = sorted(range(1, 11), key=lambda i: -float(scores[b, i]))[:4]
        assert torch.equal(kept[b], hidden[b, sorted(best)])  # original order, not score order
        # Every kept patch scores at least as much as every dropped one.
        dropped = [i for i in range(1, 11) if i not in best]
        assert scores[b, best].min() >= scores[b, dropped].max()


def test_top_patches_puts_the_cls_first_for_videos_and_never_ranks_it():
    hidden = torch.arange(2 * 6 * 1, dtype=torch.float32).view(2, 6, 1)
    # The CLS attends most to itself: that must not take a patch's place.
    scores = torch.tensor([[0.9, 0.01, 0.05, 0.02, 0.01, 0.01], [0.5, 0.1, 0.1, 0.1, 0.1, 0.1]])
    video = top_patches(hidden, scores, 2, with_cls=True)
    assert video[0, :, 0].tolist() == [0, 2, 3]  # CLS, then patches 2 and 3 in order
    image = top_patches(hidden, scores, 2, with_cls=False)
    assert image[0, :, 0].tolist() == [2, 3]


def test_ties_are_broken_by_position_the_same_way_every_time():
    hidden = torch.randn(1, 1 + 8, 3)
    flat = torch.full((1, 9), 0.125)
    assert torch.equal(top_patches(hidden, flat, 3, with_cls=False), hidden[:, 1:4])
    # Patches 2, 5 and 7 tie for the top; 5 and 7 tie for the last place kept: the earlier wins.
    scores = torch.tensor([[0.5, 0.1, 0.3, 0.1, 0.2, 0.3, 0.0, 0.3, 0.2]])
    first = top_patches(hidden, scores, 2, with_cls=False)
    assert torch.equal(first, hidden[:, [2, 5]])
    for _ in range(5):
        assert torch.equal(top_patches(hidden, scores.clone(), 2, with_cls=False), first)


@pytest.mark.parametrize("keep", [8, 9, 1000])
def test_a_budget_covering_every_patch_is_a_no_op(keep):
    hidden = torch.randn(2, 1 + 8, 4)
    scores = torch.rand(2, 9)
    assert top_patches(hidden, scores, keep, with_cls=True) is hidden
    assert torch.equal(top_patches(hidden, scores, keep, with_cls=False), hidden[:, 1:])
    assert kept_patches(keep, 8) == 8 and kept_patches(None, 8) == 8 and kept_patches(3, 8) == 3


@pytest.mark.parametrize("bad", [0, -2, True, 2.5, "4"])
def test_a_budget_must_be_a_positive_whole_number(bad):
    with pytest.raises(ValueError, match="visual_tokens must be a whole number of at least 1"):
        check_budget(bad)
    assert check_budget(None) is None and check_budget(7) == 7


# --------------------------------------------------------------------------------------------
# the CLS attention


def test_cls_attention_equals_clip_vision_models_attention_matrix(hf_checkpoint, ours):
    """Against transformers' eager CLIP attention (output_attentions) on the same weights, at every
    block: hidden state h comes from block h-1, whose attentions are `attentions[h - 1]`."""
    _, hf = hf_checkpoint
    config = CLIPVisionConfig(**hf.config.vision_config.to_dict())
    clip = CLIPVisionModel._from_config(config, attn_implementation="eager").eval()
    clip.load_state_dict(hf.model.image_tower.state_dict())
    torch.manual_seed(3)
    pixels = torch.randn(3, 3, SIZE, SIZE)
    layers = ours.config.vision.num_hidden_layers
    with torch.no_grad():
        reference = clip(pixels, output_attentions=True, output_hidden_states=True)
        for layer in [*range(1, layers + 1), -1, -2]:
            hidden, weights = ours.image_tower.hidden_state_and_cls_attention(pixels, layer)
            index = layer % (layers + 1)
            expected = reference.attentions[index - 1][:, :, 0].mean(dim=1)  # (B, 1+P)
            torch.testing.assert_close(weights, expected, atol=ATOL, rtol=0)
            torch.testing.assert_close(hidden, reference.hidden_states[index], atol=1e-4, rtol=0)
            assert torch.allclose(weights.sum(-1), torch.ones(3), atol=ATOL)
        # Ranked by another block's CLS (visual_token_layer): the features stay the feature layer's.
        today = ours.image_tower.hidden_state(pixels, -2)
        for rank in [*range(1, layers + 1), -1]:
            hidden, weights = ours.image_tower.hidden_state_and_cls_attention(pixels, -2, rank_layer=rank)
            expected = reference.attentions[rank % (layers + 1) - 1][:, :, 0].mean(dim=1)
            torch.testing.assert_close(weights, expected, atol=ATOL, rtol=0)
            assert torch.equal(hidden, today)
    with pytest.raises(ValueError, match="embedding output"):
        ours.image_tower.hidden_state_and_cls_attention(pixels, 0)
    with pytest.raises(ValueError, match="embedding output"):
        ours.image_tower.hidden_state_and_cls_attention(pixels, -2, rank_layer=-(layers + 1))


def test_cls_attention_of_a_temporal_tower_equals_an_explicit_attention_matrix():
    """Video tower: the spatial attention of the selected block after its temporal step, from the full
    (1+P) x (1+P) matrix of every head, row 0, mean over heads."""
    frames, layer = 4, -2
    tower = temporal_tower(frames)
    torch.manual_seed(4)
    pixels = torch.randn(2 * frames, 3, SIZE, SIZE)
    with torch.no_grad():
        hidden, weights = tower.hidden_state_and_cls_attention(pixels, layer, num_frames=frames)
        block_index = layer % (tower.config.num_hidden_layers + 1) - 1
        x = tower.hidden_state(pixels, block_index, num_frames=frames)  # the selected block's input
        block = tower.encoder.layers[block_index]
        bt, n, d = x.shape
        # The block's temporal step, written out: (B*T, N, D) -> (B*N, T, D) and back.
        t = x.view(bt // frames, frames, n, d).transpose(1, 2).reshape(-1, frames, d)
        t = t + block.temporal_embedding
        t = t + block.temporal_attn(block.temporal_layer_norm1(t))
        x = t.view(bt // frames, n, frames, d).transpose(1, 2).reshape(bt, n, d)
        normed = block.layer_norm1(x)
        attn, heads = block.self_attn, block.self_attn.num_heads
        q = attn.q_proj(normed).view(bt, n, heads, -1).transpose(1, 2)
        k = attn.k_proj(normed).view(bt, n, heads, -1).transpose(1, 2)
        matrix = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)  # (B*T, H, N, N)
        torch.testing.assert_close(weights, matrix[:, :, 0].mean(dim=1), atol=ATOL, rtol=0)
        # The hidden state that comes with the scores is the one the tower gives without them.
        assert torch.equal(hidden, tower.hidden_state(pixels, layer, num_frames=frames))


# --------------------------------------------------------------------------------------------
# towers and the model


def test_no_budget_or_a_covering_one_gives_todays_features_bitwise(ours):
    torch.manual_seed(5)
    images = torch.randn(2, 3, SIZE, SIZE)
    videos = torch.randn(2, 8, 3, SIZE, SIZE)
    layer = ours.config.vision_feature_layer
    with torch.no_grad():
        # Today's features: the hidden state at the feature layer, CLS dropped for images, projected.
        image_today = ours.multi_modal_projector(ours.image_tower.hidden_state(images, layer)[:, 1:])
        frames = ours.video_tower.hidden_state(videos.flatten(0, 1), layer)  # (N*T, 1+P, D)
        video_today = ours.multi_modal_projector(frames.reshape(2, 8 * (1 + PATCHES), -1))
        for budget in (None, PATCHES, PATCHES + 1, 10**6):
            assert torch.equal(ours.encode_images(images, budget), image_today)
            assert torch.equal(ours.encode_videos(videos, budget), video_today)


@pytest.mark.parametrize("keep", [1, 5, PATCHES - 1])
def test_compressed_features_are_rows_of_the_full_ones(ours, keep):
    """Image: K rows of the full tower features; video: per frame its CLS row then K patch rows, chosen
    by that frame's own CLS attention, in order (bitwise). Projected, within 1e-6 (the projector's
    matrix products may round differently for another number of rows)."""
    torch.manual_seed(6)
    images = torch.randn(2, 3, SIZE, SIZE)
    videos = torch.randn(1, 8, 3, SIZE, SIZE)
    layer = ours.config.vision_feature_layer
    with torch.no_grad():
        full_images = ours.image_tower.encode_images(images, layer)
        got = ours.image_tower.encode_images(images, layer, keep=keep)
        _, weights = ours.image_tower.hidden_state_and_cls_attention(images, layer)
        assert got.shape == (2, keep, full_images.shape[-1])
        for b in range(2):
            chosen = sorted(weights[b, 1:].argsort(descending=True, stable=True)[:keep].tolist())
            assert torch.equal(got[b], full_images[b, chosen])
        projected = ours.encode_images(images, keep)
        torch.testing.assert_close(projected, ours.multi_modal_projector(got), atol=1e-6, rtol=0)

        full_video = ours.video_tower.encode_videos(videos, layer).view(8, 1 + PATCHES, -1)
        got = ours.video_tower.encode_videos(videos, layer, keep=keep)
        assert got.shape == (1, 8 * (1 + keep), full_video.shape[-1])
        _, weights = ours.video_tower.hidden_state_and_cls_attention(videos[0], layer)
        per_frame = got.view(8, 1 + keep, -1)
        for f in range(8):
            chosen = sorted(weights[f, 1:].argsort(descending=True, stable=True)[:keep].tolist())
            assert torch.equal(per_frame[f], full_video[f, [0] + [c + 1 for c in chosen]])
        projected = ours.encode_videos(videos, keep)
        torch.testing.assert_close(projected, ours.multi_modal_projector(got), atol=1e-6, rtol=0)


def test_a_temporal_towers_video_keeps_each_frames_cls_and_its_own_patches():
    frames, keep = 4, 3
    tower = temporal_tower(frames, seed=1)
    torch.manual_seed(7)
    video = torch.randn(1, frames, 3, SIZE, SIZE)
    with torch.no_grad():
        full = tower.encode_videos(video).view(frames, 1 + PATCHES, -1)
        got = tower.encode_videos(video, keep=keep).view(frames, 1 + keep, -1)
        _, weights = tower.hidden_state_and_cls_attention(video[0], num_frames=frames)
    picks = []
    for f in range(frames):
        chosen = sorted(weights[f, 1:].argsort(descending=True, stable=True)[:keep].tolist())
        assert torch.equal(got[f], full[f, [0] + [c + 1 for c in chosen]])
        picks.append(chosen)
    assert len({tuple(p) for p in picks}) > 1  # frames choose for themselves


def test_the_ranking_layer_changes_which_patches_not_their_features(ours):
    torch.manual_seed(9)
    images = torch.randn(4, 3, SIZE, SIZE)
    layer = ours.config.vision_feature_layer
    with torch.no_grad():
        full = ours.image_tower.encode_images(images, layer)
        by_feature_block = ours.image_tower.encode_images(images, layer, keep=4)
        ours.config.visual_token_layer = -1
        try:
            projected = ours.encode_images(images, 4)
        finally:
            ours.config.visual_token_layer = None
        by_last_block = ours.image_tower.encode_images(images, layer, keep=4, rank_layer=-1)
        _, weights = ours.image_tower.hidden_state_and_cls_attention(images, -1)
    torch.testing.assert_close(projected, ours.multi_modal_projector(by_last_block), atol=1e-6, rtol=0)
    for b in range(4):
        chosen = sorted(weights[b, 1:].argsort(descending=True, stable=True)[:4].tolist())
        assert torch.equal(by_last_block[b], full[b, chosen])
    assert not torch.equal(by_last_block, by_feature_block)  # another block, other patches
    for bad in (0, 4, -5, True, 1.0):
        ours.config.visual_token_layer = bad
        try:
            with pytest.raises(ValueError, match="visual_token_layer"):
                ours.encode_images(images, 4)
        finally:
            ours.config.visual_token_layer = None


def test_the_config_budget_is_the_default_and_a_call_overrides_it(ours):
    torch.manual_seed(8)
    images = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        full = ours.encode_images(images)
        four = ours.encode_images(images, 4)
        ours.config.visual_tokens = 4
        try:
            assert torch.equal(ours.encode_images(images), four)
            assert torch.equal(ours.encode_images(images, PATCHES), full)
            assert ours.config.image_rows() == 4 and ours.config.video_rows(8) == 8 * 5
            assert ours.config.video_tokens(8) == 8 * (PATCHES + 1)  # the uncompressed count stays
        finally:
            ours.config.visual_tokens = None


# --------------------------------------------------------------------------------------------
# the checkpoint's default budget


def test_the_default_budget_is_saved_with_the_config_and_absent_means_all(hf_checkpoint, tmp_path):
    bundle = load_bundle(hf_checkpoint[0], torch.float32)
    assert bundle.model.config.visual_tokens is None
    save_bundle(tmp_path / "plain", bundle.model, bundle.tokenizer, bundle.transform)
    written = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert "visual_tokens" not in written["videollava"]  # an uncompressed model's config is as before
    assert "visual_token_layer" not in written["videollava"]
    bundle.model.config.visual_tokens = 6
    bundle.model.config.visual_token_layer = -1
    save_bundle(tmp_path / "six", bundle.model, bundle.tokenizer, bundle.transform)
    ours = json.loads((tmp_path / "six" / "config.json").read_text())["videollava"]
    assert ours["visual_tokens"] == 6 and ours["visual_token_layer"] == -1
    loaded = load_bundle(tmp_path / "six", torch.float32).model.config
    assert loaded.visual_tokens == 6 and loaded.visual_token_layer == -1
    for field, bad in [("visual_tokens", v) for v in (0, "6", 2.5, True)] + [
        ("visual_token_layer", v) for v in (0, 9, "-1", False)
    ]:
        broken = {**written, "videollava": {**written["videollava"], field: bad}}
        (tmp_path / "plain" / "config.json").write_text(json.dumps(broken))
        with pytest.raises(CheckpointError, match=rf"config.json: videollava.{field} "):
            load_bundle(tmp_path / "plain", torch.float32)
