"""Language-anchored alignment: the loss by hand, what trains, the no-op start, and a short training run."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from videollava.model.vision import VisionConfig, VisionTower
from videollava.train.contrastive import (
    LOGIT_SCALE_MAX,
    ImageTextAligner,
    TextEncoder,
    TextEncoderConfig,
    VideoTextAligner,
    clip_loss,
    init_video_tower_from_image,
    retrieval_recall_at_1,
    tokenize_captions,
)

TINY_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    patch_size=8,
    image_size=32,
)


def tiny_parts(seed: int = 0, vocab: int = 50, projection: int = 16):
    torch.manual_seed(seed)
    tower = VisionTower(VisionConfig(**TINY_VISION))
    with torch.no_grad():  # non-trivial values everywhere (the class embedding starts at zero)
        for param in tower.parameters():
            param.add_(0.05 * torch.randn_like(param))
    text = TextEncoder(
        TextEncoderConfig(vocab_size=vocab, hidden_size=32, num_heads=4, projection_dim=projection)
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

    from videollava.data.media import load_image, read_video_frames
    from videollava.data.transforms import ImageTransformConfig, preprocess_images

    cfg = ImageTransformConfig(size=size, crop_size=size, pad_to_square=True)
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
    from videollava.data.shapesworld import generate
    from videollava.train.tokenizer import train_tokenizer

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is as fast and does not fight other processes
    try:
        generate(tmp_path, seed=0, n_images=400, n_videos=40, n_test_images=40, n_test_videos=40, workers=1)
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
            TextEncoderConfig(len(tokenizer), hidden_size=width, max_length=max_length, projection_dim=width)
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
