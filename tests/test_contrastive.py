"""Language-anchored alignment: the losses by hand (caption and region), what trains, the no-op start, and short training runs."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from videollava.data.regions import Box
from videollava.model.vision import VisionConfig, VisionTower
from videollava.testing import TINY_ALIGN_VISION
from videollava.train.contrastive import (
    LOGIT_SCALE_MAX,
    ImageTextAligner,
    RegionLoss,
    RegionVocabulary,
    TextEncoder,
    TextEncoderConfig,
    VideoTextAligner,
    box_patch_weights,
    clip_loss,
    init_video_tower_from_image,
    retrieval_recall_at_1,
    tokenize_captions,
)


def tiny_parts(seed: int = 0, vocab: int = 50, projection: int = 16):
    torch.manual_seed(seed)
    tower = VisionTower(VisionConfig(**TINY_ALIGN_VISION))
    with torch.no_grad():  # non-trivial values everywhere (the class embedding starts at zero)
        for param in tower.parameters():
            param.add_(0.05 * torch.randn_like(param))
    text = TextEncoder(
        TextEncoderConfig(hidden_size=32, num_heads=4), vocab_size=vocab, projection_dim=projection
    )
    return tower, text


def test_clip_loss_matches_a_hand_computation():
    media = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=-1)
    text = F.normalize(torch.tensor([[0.9, 0.1], [0.5, 0.5], [-0.2, 1.0]]), dim=-1)
    scale = 2.0
    logits = [
        [scale * sum(a * b for a, b in zip(m, t, strict=True)) for t in text.tolist()] for m in media.tolist()
    ]

    def ce(rows):  # mean over rows of -log softmax(row)[i]
        return sum(math.log(sum(math.exp(v) for v in row)) - row[i] for i, row in enumerate(rows)) / len(rows)

    columns = [list(c) for c in zip(*logits, strict=True)]
    expected = (ce(logits) + ce(columns)) / 2
    got = clip_loss(media, text, torch.tensor(math.log(scale)))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # the temperature is clamped at 100
    capped = clip_loss(media, text, torch.tensor(math.log(1000.0)))
    assert capped.item() == pytest.approx(clip_loss(media, text, torch.tensor(LOGIT_SCALE_MAX)).item())


def test_aligner_loss_is_the_symmetric_clip_loss():
    tower, text = tiny_parts()
    aligner = ImageTextAligner(tower, text, projection_dim=16)
    assert aligner.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    pixels = torch.randn(3, 3, 32, 32)
    ids = torch.randint(3, 50, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    media, words = aligner.embed_media(pixels), aligner.embed_text(ids, mask)
    assert media.shape == words.shape == (3, 16)
    assert torch.allclose(media.norm(dim=-1), torch.ones(3)) and torch.allclose(
        words.norm(dim=-1), torch.ones(3)
    )
    logits = aligner.logit_scale.exp() * media @ words.t()
    target = torch.arange(3)
    expected = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    assert aligner.loss(pixels, ids, mask).item() == pytest.approx(expected.item(), rel=1e-5)
    trainable = {id(p) for p in aligner.trainable_parameters()}
    assert trainable == {id(p) for p in aligner.parameters()}


def test_text_encoder_pools_at_the_last_real_token():
    _, text = tiny_parts()
    text.eval()
    ids = torch.tensor([[5, 6, 7, 2]])
    padded = torch.tensor([[5, 6, 7, 2, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0]])
    full = text(ids, torch.ones(1, 4, dtype=torch.long))
    assert torch.allclose(text(padded, mask), full, atol=1e-6)
    assert text(ids, torch.ones(1, 4, dtype=torch.long)).shape == (1, 16)


def test_mean_pooled_text_encoder_averages_the_real_tokens():
    text = TextEncoder(
        TextEncoderConfig(hidden_size=32, num_heads=4, pooling="mean"), vocab_size=50, projection_dim=16
    )
    text.eval()
    ids = torch.tensor([[5, 6, 7, 2]])
    padded = torch.tensor([[5, 6, 7, 2, 9, 9, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0]])
    full = text(ids, torch.ones(1, 4, dtype=torch.long))
    assert torch.allclose(text(padded, mask), full, atol=1e-6)  # padding never counts
    # by hand: the projection of the mean of the final hidden states
    x = text.token_embedding(ids) + text.position_embedding(torch.arange(4))
    for layer in text.layers:
        x = layer(x)
    expected = text.text_projection(text.final_layer_norm(x).mean(dim=1))
    assert torch.allclose(full, expected, atol=1e-6)
    wide = TextEncoder(TextEncoderConfig(token_init_std=1.0), vocab_size=50, projection_dim=128)
    assert wide.token_embedding.weight.std().item() == pytest.approx(1.0, rel=0.05)
    with pytest.raises(ValueError, match="pooling"):
        TextEncoderConfig(pooling="max")


def test_box_patch_weights_share_each_box_among_the_patches_it_covers():
    # a 32 px crop in 8 px patches: a 4 x 4 grid, row-major
    boxes = torch.tensor(
        [
            [1.0, 1.0, 5.0, 5.0],  # inside patch 0
            [4.0, 8.0, 12.0, 16.0],  # half in patch 4, half in patch 5
            [0.0, 0.0, 32.0, 32.0],  # the whole crop
        ]
    )
    weights = box_patch_weights(boxes, image_size=32, patch_size=8)
    assert weights.shape == (3, 16)
    assert torch.allclose(weights.sum(dim=1), torch.ones(3))
    assert weights[0, 0] == 1.0
    assert weights[1, 4] == pytest.approx(0.5) and weights[1, 5] == pytest.approx(0.5)
    assert torch.allclose(weights[2], torch.full((16,), 1 / 16))
    with pytest.raises(ValueError, match="covers no patch"):
        box_patch_weights(torch.tensor([[40.0, 40.0, 48.0, 48.0]]), image_size=32, patch_size=8)


def _region_batch(tokenizer, names, regions_per_media):
    from videollava.data.regions import Region

    vocab = RegionVocabulary(names, tokenizer, max_length=16)
    return vocab.batch(
        [[Region(box, text) for box, text in media] for media in regions_per_media], torch.device("cpu")
    )


def test_region_loss_reads_only_the_patches_of_each_box(tiny_tokenizer):
    tower, text = tiny_parts(vocab=len(tiny_tokenizer))
    aligner = ImageTextAligner(tower, text, projection_dim=16, regions=RegionLoss(weight=2.0, scale=10.0))
    aligner.eval()
    names = ["red circle", "blue square", "green triangle"]
    regions = _region_batch(
        tiny_tokenizer, names, [[((0, 0, 8, 8), "blue square")], [((16, 16, 32, 32), "red circle")]]
    )
    assert regions.sample_index.tolist() == [0, 1] and regions.target.tolist() == [1, 0]
    patches = torch.randn(2, 16, 32)
    logits = aligner.region_logits(patches, regions)
    assert logits.shape == (2, 3) and logits.abs().max() <= 10.0 + 1e-5  # scale x cosine
    # by hand for the first region: patch 0 of media 0, projected, against the three names
    own = F.normalize(aligner.region_projection(patches[0, 0]), dim=-1)
    ids, mask = tokenize_captions(tiny_tokenizer, names, 16)
    words = aligner.embed_text(ids, mask)
    assert torch.allclose(logits[0], 10.0 * words @ own, atol=1e-5)
    # patches outside every box change nothing
    moved = patches.clone()
    moved[0, 1:] += 5.0
    moved[1, :10] -= 3.0
    assert torch.allclose(aligner.region_logits(moved, regions), logits, atol=1e-6)
    # the total: caption loss + weight x cross-entropy of the names
    pixels = torch.randn(2, 3, 32, 32)
    cap_ids, cap_mask = tokenize_captions(tiny_tokenizer, ["a blue square", "a red circle"], 16)
    pooled, hidden = aligner.tower_pass(pixels)
    assert hidden.shape == (2, 16, 32) and torch.allclose(pooled, aligner.pooled_media(pixels), atol=1e-5)
    assert torch.allclose(hidden, tower.encode_images(pixels), atol=1e-6)
    region_ce = F.cross_entropy(aligner.region_logits(hidden, regions), regions.target)
    expected = aligner.loss(pixels, cap_ids, cap_mask) + 2.0 * region_ce
    assert aligner.loss(pixels, cap_ids, cap_mask, regions).item() == pytest.approx(expected.item(), rel=1e-5)
    assert {id(aligner.region_projection.weight)} <= {id(p) for p in aligner.trainable_parameters()}
    with pytest.raises(ValueError, match="not in the stage's vocabulary"):
        _region_batch(tiny_tokenizer, names, [[((0, 0, 8, 8), "purple circle")]])


def test_per_patch_region_loss_asks_every_patch_of_the_box(tiny_tokenizer):
    tower, text = tiny_parts(vocab=len(tiny_tokenizer))
    aligner = ImageTextAligner(
        tower, text, projection_dim=16, regions=RegionLoss(scale=10.0, pooling="patch")
    )
    aligner.eval()
    names = ["red circle", "blue square", "green triangle"]
    # media 0: a box over patches 0 and 1 (3/4 and 1/4 of it); media 1: patch 15 alone
    regions = _region_batch(
        tiny_tokenizer, names, [[((2, 0, 10, 8), "green triangle")], [((24, 24, 32, 32), "red circle")]]
    )
    patches = torch.randn(2, 16, 32)
    ids, mask = tokenize_captions(tiny_tokenizer, names, 16)
    words = aligner.embed_text(ids, mask)

    def patch_logits(media: int, patch: int) -> torch.Tensor:
        return 10.0 * words @ F.normalize(aligner.region_projection(patches[media, patch]), dim=-1)

    def ce(logits: torch.Tensor, target: int) -> torch.Tensor:
        return -logits.log_softmax(dim=-1)[target]

    expected = (
        0.75 * ce(patch_logits(0, 0), 2) + 0.25 * ce(patch_logits(0, 1), 2) + ce(patch_logits(1, 15), 0)
    ) / 2
    assert aligner.region_loss(patches, regions).item() == pytest.approx(expected.item(), rel=1e-5)
    # the logits that name a region: its patches' logits, weighted by their share of the box
    logits = aligner.region_logits(patches, regions)
    assert torch.allclose(logits[0], 0.75 * patch_logits(0, 0) + 0.25 * patch_logits(0, 1), atol=1e-5)
    with pytest.raises(ValueError, match="'box' or 'patch'"):
        RegionLoss(pooling="max")


@pytest.mark.parametrize("pooling", ["box", "patch"])
def test_region_loss_teaches_the_patches_what_is_where(tiny_tokenizer, pooling):
    """Two colours in random quadrants: the region loss alone learns to name each box's colour."""
    torch.manual_seed(0)
    tower, text = tiny_parts(vocab=len(tiny_tokenizer))
    aligner = ImageTextAligner(
        tower, text, projection_dim=16, regions=RegionLoss(weight=1.0, scale=10.0, pooling=pooling)
    )
    text.requires_grad_(False)
    names = ["red", "blue"]
    quadrants = [(0, 0, 16, 16), (16, 0, 32, 16), (0, 16, 16, 32), (16, 16, 32, 32)]

    def batch(n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        pixels = torch.zeros(n, 3, 32, 32)
        media = []
        for i in range(n):
            a, b = torch.randperm(4, generator=g)[:2].tolist()
            for q, colour in ((a, 0), (b, 2)):  # red in channel 0, blue in channel 2
                x0, y0, x1, y1 = quadrants[q]
                pixels[i, colour, y0:y1, x0:x1] = 2.0
            media.append([(quadrants[a], "red"), (quadrants[b], "blue")])
        return pixels, _region_batch(tiny_tokenizer, names, media)

    def accuracy(pixels, regions):
        with torch.no_grad():
            return (
                (aligner.region_logits(aligner.tower_pass(pixels)[1], regions).argmax(-1) == regions.target)
                .float()
                .mean()
                .item()
            )

    test = batch(64, seed=99)
    optimizer = torch.optim.AdamW([p for p in aligner.trainable_parameters() if p.requires_grad], lr=3e-3)
    ids, mask = tokenize_captions(tiny_tokenizer, ["red and blue"] * 16, 16)
    for step in range(60):
        pixels, regions = batch(16, seed=step)
        loss = aligner.loss(pixels, ids, mask, regions)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert accuracy(*test) > 0.95


def test_video_region_head_starts_from_the_image_one():
    tower, text = tiny_parts()
    image = ImageTextAligner(tower, text, projection_dim=16, regions=RegionLoss())
    video_tower = init_video_tower_from_image(tower, num_frames=2)
    video = VideoTextAligner(
        video_tower,
        text,
        16,
        image.visual_projection,
        regions=RegionLoss(),
        region_projection_init=image.region_projection,
    )
    assert torch.equal(video.region_projection.weight, image.region_projection.weight)
    assert video.region_projection.weight is not image.region_projection.weight
    trainable = {id(p) for p in video.trainable_parameters()}
    assert id(video.region_projection.weight) in trainable
    # a video's region features are its frames' patch features averaged over time
    pixels = torch.randn(2, 2, 3, 32, 32)
    pooled, patches = video.tower_pass(pixels)
    frames = video_tower.hidden_state(pixels.flatten(0, 1), -2, num_frames=2).view(2, 2, 17, 32)
    assert torch.allclose(patches, frames.mean(dim=1)[:, 1:], atol=1e-6)
    assert torch.allclose(pooled, video.pooled_media(pixels), atol=1e-5)


def test_per_frame_region_loss_reads_each_frame_under_the_object_there(tiny_tokenizer):
    from videollava.data.regions import Region

    tower, text = tiny_parts(vocab=len(tiny_tokenizer))
    video = VideoTextAligner(
        init_video_tower_from_image(tower, num_frames=2),
        text,
        16,
        regions=RegionLoss(scale=10.0, pooling="patch", per_frame=True),
    )
    video.eval()
    names = ["red circle moving right", "blue square standing still"]
    regions_per_media = [
        [
            # tracked: patch 0 in frame 0, patch 1 in frame 1
            Region((0, 0, 16, 8), names[0], frame_boxes=((0, 0, 8, 8), (8, 0, 16, 8))),
            # no track: its box in every frame
            Region((24, 24, 32, 32), names[1]),
        ],
        # out of sight in frame 1: frame 0 alone names it
        [Region((0, 0, 16, 8), names[0], frame_boxes=((0, 8, 8, 16), None))],
    ]
    pixels = torch.randn(2, 2, 3, 32, 32)
    assert video.region_frames(pixels) == 2
    regions = RegionVocabulary(names, tiny_tokenizer, 16).batch(regions_per_media, torch.device("cpu"), 2)
    assert regions.boxes.shape == (3, 2, 4) and regions.frame_valid.tolist() == [[1, 1], [1, 1], [1, 0]]
    _, patches = video.tower_pass(pixels)
    frames = video.video_tower.hidden_state(pixels.flatten(0, 1), -2, num_frames=2).view(2, 2, 17, 32)
    assert torch.allclose(patches, frames[:, :, 1:].flatten(1, 2), atol=1e-6)  # (B, T*P, D)
    ids, mask = tokenize_captions(tiny_tokenizer, names, 16)
    words = video.embed_text(ids, mask)

    def ce(media: int, frame: int, patch: int, target: int) -> torch.Tensor:
        own = F.normalize(video.region_projection(frames[media, frame, 1 + patch]), dim=-1)
        return -(10.0 * words @ own).log_softmax(dim=-1)[target]

    expected = (
        (ce(0, 0, 0, 0) + ce(0, 1, 1, 0)) / 2 + (ce(0, 0, 15, 1) + ce(0, 1, 15, 1)) / 2 + ce(1, 0, 4, 0)
    ) / 3
    assert video.region_loss(patches, regions).item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="1 frame boxes for 2 frames"):
        RegionVocabulary(names, tiny_tokenizer, 16).batch(
            [[Region((0, 0, 8, 8), names[0], frame_boxes=((0, 0, 8, 8),))]], torch.device("cpu"), 2
        )
    # without per_frame, one box over the frames' mean, as before
    plain = VideoTextAligner(video.video_tower, text, 16, regions=RegionLoss(pooling="patch"))
    assert plain.region_frames(pixels) == 1 and plain.tower_pass(pixels)[1].shape == (2, 16, 32)


def crossing_squares(n: int, seed: int) -> tuple[torch.Tensor, list[tuple[int, Box, tuple[Box, ...]]]]:
    """(n, 3 frames, 3, 32, 32) clips of a square crossing three of a row's 8 px patches, left or
    right; per clip: 1 if it goes right, its whole-path box, its box in each frame."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.zeros(n, 3, 3, 32, 32)
    clips = []
    for i in range(n):
        row, start, right = (int(torch.randint(k, (1,), generator=g)) for k in (4, 2, 2))
        cols = [start + f for f in range(3)] if right else [start + 2 - f for f in range(3)]
        boxes = tuple((8.0 * c, 8.0 * row, 8.0 * c + 8, 8.0 * row + 8) for c in cols)
        for f, (x0, y0, x1, y1) in enumerate(boxes):
            pixels[i, f, :, int(y0) : int(y1), int(x0) : int(x1)] = 2.0
        clips.append((right, (8.0 * start, 8.0 * row, 8.0 * start + 24, 8.0 * row + 8), boxes))
    return pixels, clips


@pytest.mark.parametrize(("temporal_embedding_std", "learns"), [(0.2, True), (0.0, False)])
def test_per_frame_region_loss_teaches_the_video_tower_which_way_things_move(
    tiny_tokenizer, temporal_embedding_std, learns
):
    """A square crosses a row of patches one way or the other: named frame by frame, the video
    tower learns the direction into the patches under the square, which no single frame shows.
    Started symmetric in time (zero temporal embedding), it measured 0.62 after the same steps."""
    from videollava.data.regions import Region

    torch.manual_seed(0)
    tower, text = tiny_parts(vocab=len(tiny_tokenizer))
    video = VideoTextAligner(
        init_video_tower_from_image(tower, num_frames=3, temporal_embedding_std=temporal_embedding_std),
        text,
        16,
        regions=RegionLoss(weight=1.0, scale=10.0, pooling="patch", per_frame=True),
    )
    names = ["red moving left", "blue moving right"]

    def batch(n: int, seed: int):
        pixels, clips = crossing_squares(n, seed)
        media = [[Region(span, names[right], frame_boxes=boxes)] for right, span, boxes in clips]
        vocab = RegionVocabulary(names, tiny_tokenizer, 16)
        return pixels, vocab.batch(media, torch.device("cpu"), frames=3)

    def accuracy(pixels, regions) -> float:
        with torch.no_grad():
            logits = video.region_logits(video.tower_pass(pixels)[1], regions)
        return (logits.argmax(-1) == regions.target).float().mean().item()

    test = batch(64, seed=99)
    assert accuracy(*test) < 0.75  # every frame alone is a still square
    optimizer = torch.optim.AdamW([p for p in video.trainable_parameters() if p.requires_grad], lr=3e-3)
    for step in range(200):
        pixels, regions = batch(16, seed=step)
        loss = video.region_loss(video.tower_pass(pixels)[1], regions)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert (accuracy(*test) > 0.95) == learns


def test_video_tower_from_image_starts_as_the_image_tower():
    tower, _ = tiny_parts()
    tower.eval()
    video_tower = init_video_tower_from_image(tower, num_frames=4).eval()
    assert video_tower.config.num_frames == 4 and tower.config.num_frames == 0
    frames = torch.randn(2 * 4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(video_tower(frames, num_frames=4), tower(frames), atol=1e-6)
        for layer in (-2, -1):
            assert torch.allclose(
                video_tower.hidden_state(frames, layer, num_frames=4),
                tower.hidden_state(frames, layer),
                atol=1e-6,
            )
    # every shared weight copied, not shared
    for name, param in tower.state_dict().items():
        assert torch.equal(video_tower.state_dict()[name], param)
        assert video_tower.state_dict()[name].data_ptr() != param.data_ptr()
    layer = video_tower.encoder.layers[0]
    assert torch.count_nonzero(layer.temporal_embedding) == 0
    assert torch.count_nonzero(layer.temporal_attn.out_proj.weight) == 0
    assert torch.count_nonzero(layer.temporal_attn.q_proj.weight) > 0


def test_random_temporal_embedding_breaks_time_symmetry():
    """Zero temporal embeddings make a video and its reverse look the same; a small random one does not."""
    tower, _ = tiny_parts()
    tower.eval()
    frames = torch.randn(2, 4, 3, 32, 32)
    backwards = frames.flip(1)

    def pooled(video_tower: VisionTower, videos: torch.Tensor) -> torch.Tensor:
        # (B, T, 3, H, W) -> (B*T, D) -> (B, D): the mean over frames the video aligner uses
        return video_tower(videos.flatten(0, 1), num_frames=4).view(2, 4, -1).mean(1)

    with torch.no_grad():
        symmetric = init_video_tower_from_image(tower, 4).eval()
        assert torch.allclose(pooled(symmetric, frames), pooled(symmetric, backwards), atol=1e-5)
        broken = init_video_tower_from_image(tower, 4, temporal_embedding_std=0.02).eval()
        forward, reverse = pooled(broken, frames), pooled(broken, backwards)
        assert (forward - reverse).abs().max() > 1e-3
        # still close to the image tower it came from
        per_frame = tower(frames.flatten(0, 1)).view(2, 4, -1).mean(1)
        assert (forward - per_frame).norm() / per_frame.norm() < 0.1
    assert broken.encoder.layers[0].temporal_embedding.std().item() == pytest.approx(0.02, rel=0.3)
    assert torch.count_nonzero(broken.encoder.layers[0].temporal_attn.out_proj.weight) == 0
    with pytest.raises(ValueError, match="temporal_embedding_std"):
        init_video_tower_from_image(tower, 4, temporal_embedding_std=-1.0)


def test_sinusoidal_temporal_embedding_is_ordered_and_resamples_to_itself():
    from videollava.train.contrastive import sinusoidal_time_table

    tower, _ = tiny_parts()
    video = init_video_tower_from_image(
        tower, 8, temporal_embedding_std=0.4, temporal_embedding_init="sinusoidal"
    )
    table = sinusoidal_time_table(8, 32, 0.4)  # (T, D)
    for layer in video.encoder.layers:
        assert torch.equal(layer.temporal_embedding[0], table)
        assert torch.count_nonzero(layer.temporal_attn.out_proj.weight) == 0
    assert table.std().item() == pytest.approx(0.4, rel=0.1)
    # the slowest cosine falls from the first frame to the last: time has a direction
    assert bool((table[1:, 1] < table[:-1, 1]).all())
    # read at 15 frames, the tower's linear resampling stays near the curve itself
    resampled = video.encoder.layers[0].temporal_embedding_for(15)[0]
    finer = sinusoidal_time_table(15, 32, 0.4)
    assert (resampled - finer).norm() / finer.norm() < 0.15
    assert torch.equal(resampled[::2], table)
    with pytest.raises(ValueError, match="temporal_embedding_init"):
        init_video_tower_from_image(tower, 8, 0.4, temporal_embedding_init="learned")  # type: ignore[arg-type]


def test_video_aligner_trains_only_what_the_recipe_trains():
    tower, text = tiny_parts()
    image = ImageTextAligner(tower, text, projection_dim=16)
    video = VideoTextAligner(
        init_video_tower_from_image(tower, 4), text, 16, visual_projection_init=image.visual_projection
    )
    assert torch.equal(video.visual_projection.weight, image.visual_projection.weight)
    names = {id(p): n for n, p in video.named_parameters()}
    trainable = sorted(names[id(p)] for p in video.trainable_parameters())
    layer_parts = [
        "temporal_attn.k_proj.bias",
        "temporal_attn.k_proj.weight",
        "temporal_attn.out_proj.bias",
        "temporal_attn.out_proj.weight",
        "temporal_attn.q_proj.bias",
        "temporal_attn.q_proj.weight",
        "temporal_attn.v_proj.bias",
        "temporal_attn.v_proj.weight",
        "temporal_embedding",
        "temporal_layer_norm1.bias",
        "temporal_layer_norm1.weight",
    ]
    expected = sorted(
        [f"video_tower.encoder.layers.{i}.{part}" for i in range(2) for part in layer_parts]
        + [
            "video_tower.embeddings.class_embedding",
            "video_tower.post_layernorm.weight",
            "video_tower.post_layernorm.bias",
            "visual_projection.weight",
            "logit_scale",
        ]
    )
    assert trainable == expected
    assert {n for n, p in video.named_parameters() if p.requires_grad} == set(expected)

    video.train()
    assert not video.text_encoder.training and video.video_tower.training
    pixels = torch.randn(2, 4, 3, 32, 32)  # (B, T, 3, H, W)
    ids = torch.randint(3, 50, (2, 5))
    loss = video.loss(pixels, ids, torch.ones(2, 5, dtype=torch.long))
    loss.backward()
    assert all(p.grad is None for p in video.text_encoder.parameters())
    assert all(p.grad is None for n, p in video.named_parameters() if n not in expected)
    # the zero-initialised out_proj gets a gradient, so the temporal branch can grow
    assert video.video_tower.encoder.layers[1].temporal_attn.out_proj.weight.grad.abs().sum() > 0
    assert (
        video.logit_scale.grad is not None and video.video_tower.embeddings.class_embedding.grad is not None
    )


def test_spatial_lr_trains_the_video_towers_spatial_path_at_its_own_rate():
    from videollava.train.config import AlignVideoStage
    from videollava.train.objectives import AlignObjective
    from videollava.train.tasks import spatial_rate

    tower, text = tiny_parts()
    video = VideoTextAligner(init_video_tower_from_image(tower, 2), text, 16, train_spatial=True)
    tower_names = {n for n, _ in video.video_tower.named_parameters()}
    trainable = {n for n, p in video.named_parameters() if p.requires_grad}
    assert {f"video_tower.{n}" for n in tower_names} <= trainable
    assert not any(n.startswith("text_encoder.") for n in trainable)
    assert {id(p) for p in video.trainable_parameters()} == {
        id(p) for p in video.parameters() if p.requires_grad
    }
    # the rates, by the names the optimiser sees (the objective wraps the aligner)
    named = dict(AlignObjective(video, None, 16, (2, 3, 32, 32)).named_parameters())
    lr_for = spatial_rate(AlignVideoStage(lr=1e-3, spatial_lr=1e-4))
    spatial = "aligner.video_tower.encoder.layers.0.self_attn.q_proj.weight"
    temporal = "aligner.video_tower.encoder.layers.0.temporal_attn.q_proj.weight"
    assert {spatial, temporal, "aligner.visual_projection.weight"} <= set(named)
    assert lr_for(spatial) == 1e-4 and lr_for("aligner.video_tower.embeddings.patch_embedding.weight") == 1e-4
    assert lr_for(temporal) == lr_for("aligner.visual_projection.weight") == 1e-3
    assert spatial_rate(AlignVideoStage(lr=1e-3)) is None  # frozen: nothing to set apart
    pixels = torch.randn(2, 2, 3, 32, 32)
    video.loss(pixels, torch.randint(3, 50, (2, 5)), torch.ones(2, 5, dtype=torch.long)).backward()
    assert video.video_tower.encoder.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_video_embedding_is_the_mean_of_temporal_frame_outputs():
    tower, text = tiny_parts()
    video = VideoTextAligner(init_video_tower_from_image(tower, 4), text, 16).eval()
    with torch.no_grad():
        for layer in video.video_tower.encoder.layers:  # make the temporal branch matter
            layer.temporal_attn.out_proj.weight.normal_(std=0.2)
            layer.temporal_embedding.normal_(std=0.2)
        pixels = torch.randn(2, 4, 3, 32, 32)
        per_frame = video.video_tower(pixels.flatten(0, 1), num_frames=4).view(2, 4, -1)
        expected = F.normalize(video.visual_projection(per_frame.mean(1)), dim=-1)
        assert torch.allclose(video.embed_media(pixels), expected, atol=1e-6)
        # with temporal attention, frame order matters
        assert not torch.allclose(video.embed_media(pixels.flip(1)), expected, atol=1e-4)


def test_retrieval_recall_at_1():
    media = torch.eye(4)
    text = torch.eye(4)[[0, 1, 3, 2]]  # rows 2 and 3 swapped
    assert retrieval_recall_at_1(media, text) == {"media_to_text": 0.5, "text_to_media": 0.5}
    # rows 2 and 3 have the same caption: retrieving either one is right
    keys = ["a", "b", "c", "c"]
    assert retrieval_recall_at_1(media, text, text_keys=keys) == {"media_to_text": 1.0, "text_to_media": 1.0}
    with pytest.raises(ValueError):
        retrieval_recall_at_1(media, text[:3])


def test_tokenize_captions(tiny_tokenizer):
    ids, mask = tokenize_captions(
        tiny_tokenizer, ["a red circle", "a blue square moves up and down " * 20], 16
    )
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    assert ids.shape == mask.shape == (2, 16)
    short = int(mask[0].sum())
    assert ids[0, short - 1] == eos and (ids[0, short:] == pad).all() and (mask[0, :short] == 1).all()
    assert ids[1, -1] == eos and mask[1].all()  # truncated, EOS kept
    assert tiny_tokenizer.decode(ids[0, :short], skip_special_tokens=True) == "a red circle"


# ------------------------------------------------------------------------------------------ training run


def _fresh_tower(config: VisionConfig) -> VisionTower:
    """A tower with CLIP-like small embeddings; the N(0, 1) default position table slows learning a lot."""
    tower = VisionTower(config)
    with torch.no_grad():
        tower.embeddings.position_embedding.weight.normal_(std=0.02)
        tower.embeddings.class_embedding.normal_(std=0.02)
    return tower


def _load_pairs(folder, file_name: str, kind: str, size: int, num_frames: int):
    """(N, 3, S, S) images or (N, T, 3, S, S) videos with their captions, padded to square then resized."""
    from PIL import Image

    from videollava.data.images import load_image
    from videollava.data.media import read_video_frames
    from videollava.data.transforms import ImageTransformConfig, preprocess_images

    cfg = ImageTransformConfig(size=size, crop_size=size, image_aspect_ratio="pad")
    pixels, captions = [], []
    for entry in json.loads((folder / file_name).read_text()):
        if kind not in entry:
            continue
        captions.append(entry["conversations"][1]["value"])
        path = folder / "media" / entry[kind]
        if kind == "image":
            pixels.append(preprocess_images([load_image(path)], cfg)[0])
        else:
            frames = read_video_frames(path, num_frames)
            pixels.append(preprocess_images([Image.fromarray(f) for f in frames], cfg))
    return torch.stack(pixels), captions


def _recall(aligner, tokenizer, pixels, captions, max_length):
    aligner.eval()
    with torch.no_grad():
        ids, mask = tokenize_captions(tokenizer, captions, max_length)
        recall = retrieval_recall_at_1(
            aligner.embed_media(pixels), aligner.embed_text(ids, mask), text_keys=captions
        )
    aligner.train()
    return recall


@pytest.mark.slow
def test_short_training_run_aligns_shapesworld_images_and_carries_over_to_videos(tmp_path):
    """Measured here: held-out image R@1 0.025 -> about 0.4 both ways (chance 0.025); videos start near 0.3."""
    from videollava.shapesworld.generate import GenerationConfig, generate
    from videollava.train.tokenizer import train_tokenizer

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is as fast and does not fight other processes
    try:
        generate(
            tmp_path,
            GenerationConfig(seed=0, images=400, videos=40, test_images=40, test_videos=40, workers=1),
        )
        size, frames, max_length, width = 48, 4, 48, 64
        images, image_captions = _load_pairs(tmp_path, "captions.json", "image", size, frames)
        test_images, test_image_captions = _load_pairs(tmp_path, "test_captions.json", "image", size, frames)
        videos, video_captions = _load_pairs(tmp_path, "captions.json", "video", size, frames)
        test_videos, test_video_captions = _load_pairs(tmp_path, "test_captions.json", "video", size, frames)
        tokenizer = train_tokenizer(image_captions + video_captions, vocab_size=400)

        config = VisionConfig(
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=4,
            patch_size=8,
            image_size=size,
        )
        text = TextEncoder(
            TextEncoderConfig(hidden_size=width, max_length=max_length),
            vocab_size=len(tokenizer),
            projection_dim=width,
        )
        image_aligner = ImageTextAligner(_fresh_tower(config), text, width)
        chance = 1 / len(test_image_captions)
        before = _recall(image_aligner, tokenizer, test_images, test_image_captions, max_length)
        assert max(before.values()) <= 3 * chance

        ids, mask = tokenize_captions(tokenizer, image_captions, max_length)
        optimizer = torch.optim.AdamW(image_aligner.trainable_parameters(), lr=1e-3, weight_decay=0.0)
        order = torch.Generator().manual_seed(0)
        for _ in range(160):
            batch = torch.randperm(len(image_captions), generator=order)[:32]
            loss = image_aligner.loss(images[batch], ids[batch], mask[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        after = _recall(image_aligner, tokenizer, test_images, test_image_captions, max_length)
        assert after["media_to_text"] >= 5 * chance and after["text_to_media"] >= 5 * chance, after

        # Videos: the tower starts as the image tower, so held-out videos already land near their captions.
        video_aligner = VideoTextAligner(
            init_video_tower_from_image(image_aligner.image_tower, frames),
            text,
            width,
            visual_projection_init=image_aligner.visual_projection,
        )
        with torch.no_grad():
            video_aligner.logit_scale.copy_(image_aligner.logit_scale)
        video_chance = 1 / len(test_video_captions)
        carried = _recall(video_aligner, tokenizer, test_videos, test_video_captions, max_length)
        assert max(carried.values()) >= 3 * video_chance, carried

        frozen = {n: p.detach().clone() for n, p in video_aligner.text_encoder.named_parameters()}
        ids, mask = tokenize_captions(tokenizer, video_captions, max_length)
        optimizer = torch.optim.AdamW(video_aligner.trainable_parameters(), lr=1e-3, weight_decay=0.0)
        losses = []
        for _ in range(20):
            batch = torch.randperm(len(video_captions), generator=order)[:16]
            loss = video_aligner.loss(videos[batch], ids[batch], mask[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert sum(losses[-5:]) < sum(losses[:5])
        assert all(torch.equal(p, frozen[n]) for n, p in video_aligner.text_encoder.named_parameters())
        after_video = _recall(video_aligner, tokenizer, test_videos, test_video_captions, max_length)
        print(f"image R@1 before {before}, after {after}; video R@1 at start {carried}, after {after_video}")
        assert video_aligner.video_tower.encoder.layers[0].temporal_attn.out_proj.weight.abs().sum() > 0
    finally:
        torch.set_num_threads(threads)


def tiny_video_aligner(vocab: int, frames: int, **region_loss) -> VideoTextAligner:
    """A video aligner in eval mode, its region loss per patch and per frame at scale 10."""
    tower, text = tiny_parts(vocab=vocab)
    return VideoTextAligner(
        init_video_tower_from_image(tower, num_frames=frames, temporal_embedding_std=0.2),
        text,
        16,
        regions=RegionLoss(scale=10.0, pooling="patch", per_frame=True, **region_loss),
    ).eval()


def phrase_cross_entropy(video: VideoTextAligner, ids: torch.Tensor, mask: torch.Tensor):
    """By hand: a pooled feature's cross-entropy against the tokenised phrases, at scale 10."""
    phrases = video.embed_text(ids, mask)

    def ce(features: torch.Tensor, target: int) -> torch.Tensor:
        own = F.normalize(video.region_projection(features), dim=-1)
        return -(10.0 * phrases @ own).log_softmax(dim=-1)[target]

    return ce


def test_motion_loss_pools_each_whole_clip_box_over_every_frame(tiny_tokenizer):
    from videollava.data.regions import Region

    video = tiny_video_aligner(len(tiny_tokenizer), 2, motion_weight=2.0)
    names = ["red circle moving right", "blue square standing still", "green circle"]
    motions = ["moving right", "standing still"]
    regions_per_media = [
        [
            # the whole-clip box covers patches 0 and 1, its frame boxes one each
            Region((0, 0, 16, 8), names[0], frame_boxes=((0, 0, 8, 8), (8, 0, 16, 8)), motion=motions[0]),
            Region((24, 24, 32, 32), names[1], motion=motions[1]),
        ],
        [Region((8, 8, 16, 16), names[2])],  # no motion phrase: no motion term
    ]
    pixels = torch.randn(2, 2, 3, 32, 32)
    vocabulary = RegionVocabulary(names, tiny_tokenizer, 16, motions)
    regions = vocabulary.batch(regions_per_media, torch.device("cpu"), 2)
    assert regions.motion_target.tolist() == [0, 1, -1]
    _, patches = video.tower_pass(pixels)
    frames = video.video_tower.hidden_state(pixels.flatten(0, 1), -2, num_frames=2).view(2, 2, 17, 32)
    ids, mask = tokenize_captions(tiny_tokenizer, motions, 16)
    ce = phrase_cross_entropy(video, ids, mask)

    # patch p of frame f is frames[media, f, 1 + p]; a 32 px crop in 8 px patches is 4 x 4
    mover = frames[0, :, 1:3].mean(dim=(0, 1))  # both patches of its box, both frames
    still = frames[0, :, 16].mean(dim=0)  # patch 15, both frames
    expected = (ce(mover, 0) + ce(still, 1)) / 2
    assert video.motion_loss(patches, regions).item() == pytest.approx(expected.item(), rel=1e-5)
    names_only = video.region_loss(patches, regions)
    assert video.loss(pixels, ids[:2], mask[:2], regions).item() == pytest.approx(
        (
            clip_loss(video.embed_media(pixels), video.embed_text(ids[:2], mask[:2]), video.logit_scale)
            + names_only
            + 2.0 * expected
        ).item(),
        rel=1e-4,
    )
    # a motion the stage was not told of is refused, a vocabulary without motions has no term
    with pytest.raises(ValueError, match="region motion 'moving up' is not in the stage's vocabulary"):
        vocabulary.batch([[Region((0, 0, 8, 8), names[2], motion="moving up")]], torch.device("cpu"), 2)
    plain = RegionVocabulary(names, tiny_tokenizer, 16).batch(regions_per_media, torch.device("cpu"), 2)
    assert plain.motion_ids is None and video.motion_loss(patches, plain).item() == 0.0
    with pytest.raises(ValueError, match="motion_weight: must be >= 0"):
        RegionLoss(motion_weight=-1.0)


@pytest.mark.parametrize("motion_weight", [1.0, 0.0])
def test_motion_loss_teaches_the_mean_of_a_box_which_way_its_object_moves(tiny_tokenizer, motion_weight):
    """A square crosses a row of patches one way or the other, named the same both ways: only the
    motion term can teach the mean of its whole-clip box which way it went."""
    from videollava.data.regions import Region

    torch.manual_seed(0)
    tower, text = tiny_parts(vocab=len(tiny_tokenizer))
    video = VideoTextAligner(
        init_video_tower_from_image(tower, num_frames=3, temporal_embedding_std=0.2),
        text,
        16,
        regions=RegionLoss(weight=1.0, scale=10.0, pooling="patch"),
    )
    motions = ["moving left", "moving right"]
    vocabulary = RegionVocabulary(["red square"], tiny_tokenizer, 16, motions)

    def batch(n: int, seed: int):
        pixels, clips = crossing_squares(n, seed)
        media = [[Region(span, "red square", motion=motions[right])] for right, span, _ in clips]
        return pixels, vocabulary.batch(media, torch.device("cpu"))

    def accuracy(pixels, regions) -> float:
        with torch.no_grad():
            logits = video.motion_logits(video.tower_pass(pixels)[1], regions)
        return (logits.argmax(-1) == regions.motion_target).float().mean().item()

    test = batch(64, seed=99)
    assert accuracy(*test) < 0.75
    optimizer = torch.optim.AdamW([p for p in video.trainable_parameters() if p.requires_grad], lr=3e-3)
    for step in range(150):
        pixels, regions = batch(16, seed=step)
        patches = video.tower_pass(pixels)[1]
        loss = video.region_loss(patches, regions) + motion_weight * video.motion_loss(patches, regions)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert (accuracy(*test) > 0.95) == (motion_weight > 0)


def test_frame_motion_loss_asks_each_frame_what_its_object_does_then(tiny_tokenizer):
    from videollava.data.regions import Region

    video = tiny_video_aligner(len(tiny_tokenizer), 3, frame_motion_weight=1.5)
    names, motions = ["red circle moving right", "green circle"], ["moving right", "standing still"]
    # still in frame 0, moving in frames 1 and 2, out of the crop in frame 2 (no box there)
    mover = Region(
        (0, 0, 16, 8),
        names[0],
        frame_boxes=((0, 0, 8, 8), (4, 0, 12, 8), None),
        motion=motions[0],
        frame_motions=(motions[1], motions[0], motions[0]),
    )
    regions_per_media = [[mover], [Region((8, 8, 16, 16), names[1])]]  # media 1: no motion at all
    vocabulary = RegionVocabulary(names, tiny_tokenizer, 16, motions)
    regions = vocabulary.batch(regions_per_media, torch.device("cpu"), 3)
    assert regions.frame_motion_target.tolist() == [[1, 0, -1], [-1, -1, -1]]
    pixels = torch.randn(2, 3, 3, 32, 32)
    _, patches = video.tower_pass(pixels)
    frames = video.video_tower.hidden_state(pixels.flatten(0, 1), -2, num_frames=3).view(2, 3, 17, 32)
    ids, mask = tokenize_captions(tiny_tokenizer, motions, 16)
    ce = phrase_cross_entropy(video, ids, mask)

    # frame 0: patch 0 alone; frame 1: half of patch 0 and half of patch 1; frame 2 is not asked
    expected = (ce(frames[0, 0, 1], 1) + ce(frames[0, 1, 1:3].mean(dim=0), 0)) / 2
    assert video.frame_motion_loss(patches, regions).item() == pytest.approx(expected.item(), rel=1e-5)
    total = video.loss(pixels, ids[:2], mask[:2], regions)
    without = clip_loss(video.embed_media(pixels), video.embed_text(ids[:2], mask[:2]), video.logit_scale)
    assert total.item() == pytest.approx(
        (without + video.region_loss(patches, regions) + 1.5 * expected).item(), rel=1e-4
    )
    # a region without per-frame motions does the same thing in every frame it is seen in
    steady = vocabulary.batch([[Region((0, 0, 8, 8), names[0], motion=motions[0])]], torch.device("cpu"), 3)
    assert steady.frame_motion_target.tolist() == [[0, 0, 0]]
    with pytest.raises(ValueError, match="frame_motion_weight: needs per_frame"):
        RegionLoss(frame_motion_weight=1.0)
    with pytest.raises(ValueError, match="frame_motion_weight: must be >= 0"):
        RegionLoss(per_frame=True, frame_motion_weight=-0.5)
