"""Pixels -> normalised model input, following the reference pipelines exactly.

Images follow the CLIP image processor the reference used (PIL bicubic resize of the shortest
side, centre crop with the offset rounded down, scale, normalise), optionally padding to a square
with the mean colour first, or squashed straight to the square (every pixel kept, aspect lost).
Videos follow the reference's video transform, whose order differs:
scale, normalise, then a torch resize of the shortest side (bilinear without antialiasing, as the
model was trained) and a centre crop with the offset rounded to nearest. The random horizontal flip
the reference applied at inference is not reproduced.

Media far larger than the model's input are first made smaller while still 8-bit (`shrink_factor`,
used by the decoders), and video frames become float a few at a time, so the memory a picture costs
does not grow with its resolution or its frame count; media up to 8 times the resized size on each
side keep every pixel and give the reference's numbers to the bit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from videollava.data.images import to_rgb
from videollava.errors import CheckpointError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The mean as 8-bit RGB, truncated as the reference does: int(m * 255).
PAD_COLOR = (122, 116, 104)

_PIL_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_PIL_RESAMPLE_NAME = {int(v): k for k, v in _PIL_RESAMPLE.items()}
_TORCH_MODES = ("nearest", "bilinear", "bicubic", "area")
# How non-square media become the square input: "crop" the centre (the reference's videos),
# "pad" with the mean colour first (the reference's images), or "squash" (resize both sides to
# the square: the whole picture at the full input resolution, its aspect ratio lost).
ASPECT_MODES = ("crop", "pad", "squash")
# Media up to twice this many times the size they are resized to keep every pixel until the exact
# resize; larger ones are divided by the integer that leaves them 4 to 8 times that size.
_KEEP_SCALE = 4
# Nor does a picture keep more pixels than this (a 16:1 panorama at full width is still reduced):
# one such video frame in float32 is 200 MB.
_EXACT_MAX_PIXELS = 4096 * 4096
# Video frames are made float this many bytes at a time.
_FLOAT_CHUNK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class ImageTransformConfig:
    """Sizes, constants and filters of the preprocessing, loadable from a checkpoint's own JSON."""

    size: int = 224  # shortest side after resizing
    crop_size: int = 224
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    image_aspect_ratio: str = "crop"  # one of ASPECT_MODES; the reference pads images
    # The reference crops video frames; pad and squash keep objects at the frame's edges in view.
    video_aspect_ratio: str = "crop"
    resample: str = "bicubic"  # images, PIL filter
    video_resample: str = "bilinear"  # videos, torch interpolate mode
    video_antialias: bool = False

    def __post_init__(self) -> None:
        if self.size < 1 or self.crop_size < 1:
            raise ValueError(f"size and crop_size must be positive, got {self.size}, {self.crop_size}")
        if self.crop_size > self.size:
            raise ValueError(f"crop_size {self.crop_size} is larger than the resized short side {self.size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values, std > 0: {self.mean}, {self.std}")
        if self.resample not in _PIL_RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(_PIL_RESAMPLE)}, got {self.resample!r}")
        if self.video_resample not in _TORCH_MODES:
            raise ValueError(f"video_resample must be one of {_TORCH_MODES}, got {self.video_resample!r}")
        for name in ("image_aspect_ratio", "video_aspect_ratio"):
            if getattr(self, name) not in ASPECT_MODES:
                raise ValueError(f"{name} must be one of {ASPECT_MODES}, got {getattr(self, name)!r}")
        if "squash" in (self.image_aspect_ratio, self.video_aspect_ratio) and self.size != self.crop_size:
            raise ValueError(f"squash resizes straight to crop_size; size {self.size} must equal it")

    @property
    def pad_color(self) -> tuple[int, int, int]:
        """Background of the square canvas: the mean colour, truncated like the reference."""
        return tuple(int(m * 255) for m in self.mean)  # type: ignore[return-value]

    @classmethod
    def from_preprocessor_json(cls, path: str | Path, **overrides: object) -> ImageTransformConfig:
        """Use a checkpoint's own constants (``preprocessor_config.json``) instead of the defaults."""
        path = Path(path)
        if path.is_dir():
            path = path / "preprocessor_config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path}: file not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not a readable JSON file ({e})") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path}: expected a JSON object")
        try:
            fields = _fields_from_hf(raw)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: unsupported preprocessor config ({e})") from None
        fields.update(overrides)
        try:
            return cls(**fields)  # type: ignore[arg-type]
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: {e}") from None

    def to_preprocessor_dict(self) -> dict[str, object]:
        """The fields of a ``preprocessor_config.json`` that CLIP-style image processors read.

        Squashed images are written as the CLIP processor's own square resize without a crop, so
        that it too gives the model's input.
        """
        squash = self.image_aspect_ratio == "squash"
        return {
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": True,
            "size": {"height": self.size, "width": self.size} if squash else {"shortest_edge": self.size},
            "resample": int(_PIL_RESAMPLE[self.resample]),
            "do_center_crop": not squash,
            "crop_size": {"height": self.crop_size, "width": self.crop_size},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "do_convert_rgb": True,
            "image_aspect_ratio": self.image_aspect_ratio,
            "video_aspect_ratio": self.video_aspect_ratio,
        }

    def to_preprocessor_json(self, path: str | Path) -> Path:
        """Write ``preprocessor_config.json`` (into ``path`` if it is a directory); returns the file."""
        path = Path(path)
        if path.is_dir():
            path = path / "preprocessor_config.json"
        path.write_text(json.dumps(self.to_preprocessor_dict(), indent=2) + "\n")
        return path

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


ProcessorConfig = ImageTransformConfig


def _fields_from_hf(raw: dict) -> dict[str, object]:
    fields: dict[str, object] = {}
    size = raw.get("size", 224)
    squash = raw.get("image_aspect_ratio") == "squash"
    if isinstance(size, dict) and "shortest_edge" in size:
        fields["size"] = int(size["shortest_edge"])
    elif isinstance(size, dict):
        if not (squash and size.get("height") is not None and size.get("height") == size.get("width")):
            raise ValueError(f"size {size} does not keep the aspect ratio; only shortest_edge is supported")
        fields["size"] = int(size["height"])
    else:
        fields["size"] = int(size)
    if raw.get("do_center_crop", True) is False and not squash:
        raise ValueError("do_center_crop false gives non-square outputs; not supported")
    crop = fields["size"] if squash else raw.get("crop_size", fields["size"])
    if isinstance(crop, dict):
        if crop.get("height") != crop.get("width"):
            raise ValueError(f"non-square crop_size {crop}")
        crop = crop["height"]
    fields["crop_size"] = int(crop)
    for key, name in (("image_mean", "mean"), ("image_std", "std")):
        if key in raw:
            value = raw[key]
            fields[name] = (
                (float(value),) * 3 if isinstance(value, int | float) else tuple(float(v) for v in value)
            )
    if "resample" in raw:
        fields["resample"] = _PIL_RESAMPLE_NAME[int(raw["resample"])]
    for key in ("image_aspect_ratio", "video_aspect_ratio"):
        if key in raw:
            fields[key] = str(raw[key])
    return fields


# --------------------------------------------------------------------------------------------
# images


def expand_to_square(img: Image.Image, color: tuple[int, int, int] = PAD_COLOR) -> Image.Image:
    """Pad to a square with the picture centred, so the crop keeps the whole picture."""
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    canvas = Image.new(img.mode, (side, side), color)
    canvas.paste(img, ((side - width) // 2, (side - height) // 2))
    return canvas


def shortest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(new_h, new_w) with the short side = size and the long side ``int(size * long / short)``.

    Same rule and rounding (down) as the CLIP image processor.
    """
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def resized_size(height: int, width: int, cfg: ImageTransformConfig, video: bool = False) -> tuple[int, int]:
    """(new_h, new_w) before the centre crop: the square itself when squashing, otherwise the
    shortest-side rule of images (``shortest_side_size``) or of videos (``video_resize_size``)."""
    if (cfg.video_aspect_ratio if video else cfg.image_aspect_ratio) == "squash":
        return cfg.crop_size, cfg.crop_size
    return (video_resize_size if video else shortest_side_size)(height, width, cfg.size)


def shrink_factor(height: int, width: int, cfg: ImageTransformConfig, video: bool = False) -> int:
    """The integer a picture's sides may be divided by (box filter, 8-bit) before the exact resize.

    1 for ordinary media: a picture up to 8 times the size it is resized to (a 1792-pixel short
    side for the 224-pixel reference input) keeps every pixel. Larger ones land 4 to 8 times that
    size, which the exact resize then brings down as before. The same for a picture and its
    transpose, as decoders ask before an EXIF turn.
    """
    if height < 1 or width < 1:
        return 1
    aspect = cfg.video_aspect_ratio if video else cfg.image_aspect_ratio
    if aspect == "pad":
        ratio = max(height, width) / cfg.size  # the padded square is resized to size x size
    else:
        new_h, new_w = resized_size(height, width, cfg, video)
        ratio = min(height / new_h, width / new_w)
    factor = int(ratio // _KEEP_SCALE) if ratio >= 2 * _KEEP_SCALE else 1
    while height * width > _EXACT_MAX_PIXELS * factor * factor:
        factor += 1
    return factor


def _normalise(x: torch.Tensor, cfg: ImageTransformConfig) -> torch.Tensor:
    mean = torch.tensor(cfg.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def preprocess_images(images: Sequence[Image.Image], cfg: ImageTransformConfig | None = None) -> torch.Tensor:
    """Images -> float32 (N, 3, crop, crop), numerically the CLIP image processor's output."""
    cfg = cfg or ImageTransformConfig()
    if len(images) == 0:
        return torch.empty(0, 3, cfg.crop_size, cfg.crop_size, device="cpu")
    crops = []
    for img in images:
        img = to_rgb(img)
        if cfg.image_aspect_ratio == "pad":
            img = expand_to_square(img, cfg.pad_color)
        new_h, new_w = resized_size(img.height, img.width, cfg)
        if (new_h, new_w) != (img.height, img.width):
            img = img.resize((new_w, new_h), resample=_PIL_RESAMPLE[cfg.resample])
        top = (new_h - cfg.crop_size) // 2
        left = (new_w - cfg.crop_size) // 2
        arr = np.array(img, dtype=np.uint8)[top : top + cfg.crop_size, left : left + cfg.crop_size]
        crops.append(torch.from_numpy(np.ascontiguousarray(arr)))
    x = torch.stack(crops).permute(0, 3, 1, 2)  # (N, H, W, 3) -> (N, 3, H, W)
    # Scale in float64 then round to float32, as the CLIP processor's rescale does.
    x = (x.to(torch.float64) * (1 / 255)).to(torch.float32)
    return _normalise(x, cfg).contiguous()


# --------------------------------------------------------------------------------------------
# videos


def video_resize_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(new_h, new_w) by the reference video rule: short side = size, long = floor(long / short * size)."""
    if width < height:
        return int(math.floor(float(height) / width * size)), size
    return size, int(math.floor(float(width) / height * size))


def box_to_pixels(
    box: Sequence[float], width: int, height: int, cfg: ImageTransformConfig, video: bool = False
) -> tuple[float, float, float, float] | None:
    """A box (x0, y0, x1, y1) in the media's own pixels -> the same region in the model's crop.

    Follows the geometry of ``preprocess_images`` (``video=False``) or ``preprocess_video``: the
    optional pad to a square (or the squash), the resize and the centre crop. ``None`` when the
    crop cuts the box away entirely.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x0 < x1 and y0 < y1):
        raise ValueError(f"box {list(box)} is empty: it needs x0 < x1 and y0 < y1")
    aspect = cfg.video_aspect_ratio if video else cfg.image_aspect_ratio
    if aspect == "pad" and width != height:
        side = max(width, height)
        dx, dy = (side - width) // 2, (side - height) // 2
        x0, x1, y0, y1 = x0 + dx, x1 + dx, y0 + dy, y1 + dy
        width = height = side
    new_h, new_w = resized_size(height, width, cfg, video)
    sx, sy = new_w / width, new_h / height
    if video:
        top, left = round((new_h - cfg.crop_size) / 2.0), round((new_w - cfg.crop_size) / 2.0)
    else:
        top, left = (new_h - cfg.crop_size) // 2, (new_w - cfg.crop_size) // 2
    crop = float(cfg.crop_size)
    x0, x1 = min(max(x0 * sx - left, 0.0), crop), min(max(x1 * sx - left, 0.0), crop)
    y0, y1 = min(max(y0 * sy - top, 0.0), crop), min(max(y1 * sy - top, 0.0), crop)
    if x0 >= x1 or y0 >= y1:
        return None
    return (x0, y0, x1, y1)


def _as_frames(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected frames of shape (T, H, W, 3), got {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 frames, got {x.dtype}")
    return x


def _video_batch(x: torch.Tensor, cfg: ImageTransformConfig) -> torch.Tensor:
    """uint8 (N, H, W, 3) frames of one size -> float32 (N, 3, crop, crop), a few frames at a time.

    Each frame is resized on its own, so chunks give exactly what one call would.
    """
    n, h, w, _ = x.shape
    if cfg.video_aspect_ratio == "pad":
        h = w = max(h, w)
    step = max(1, _FLOAT_CHUNK_BYTES // (h * w * 3 * 4))
    if n <= step:
        return _video_chunk(x, cfg)
    out = torch.empty(n, 3, cfg.crop_size, cfg.crop_size, device="cpu")
    for start in range(0, n, step):
        out[start : start + step] = _video_chunk(x[start : start + step], cfg)
    return out


def _video_chunk(x: torch.Tensor, cfg: ImageTransformConfig) -> torch.Tensor:
    """uint8 (N, H, W, 3) frames of one size -> float32 (N, 3, crop, crop), all in one interpolate."""
    if cfg.video_aspect_ratio == "pad" and x.shape[1] != x.shape[2]:
        n, h, w, _ = x.shape
        side = max(h, w)
        canvas = (
            torch.tensor(cfg.pad_color, dtype=torch.uint8, device=x.device).expand(n, side, side, 3).clone()
        )
        top, left = (side - h) // 2, (side - w) // 2
        canvas[:, top : top + h, left : left + w] = x
        x = canvas
    x = x.permute(0, 3, 1, 2)  # (N, H, W, 3) -> (N, 3, H, W)
    x = x / 255.0  # float32
    mean = torch.tensor(cfg.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    x = x.sub_(mean).div_(std)  # in place: the same numbers as _normalise, one float copy fewer
    h, w = x.shape[-2:]
    new_h, new_w = resized_size(h, w, cfg, video=True)
    if (new_h, new_w) != (h, w):
        kwargs = {"antialias": cfg.video_antialias} if cfg.video_resample in ("bilinear", "bicubic") else {}
        align = {"align_corners": False} if cfg.video_resample in ("bilinear", "bicubic") else {}
        x = F.interpolate(x, size=(new_h, new_w), mode=cfg.video_resample, **align, **kwargs)
    # Offsets rounded to nearest (Python round), as the reference's video centre crop.
    top = int(round((new_h - cfg.crop_size) / 2.0))
    left = int(round((new_w - cfg.crop_size) / 2.0))
    return x[..., top : top + cfg.crop_size, left : left + cfg.crop_size].contiguous()


def preprocess_video(
    frames: np.ndarray | torch.Tensor, cfg: ImageTransformConfig | None = None
) -> torch.Tensor:
    """uint8 frames (T, H, W, 3) -> float32 (T, 3, crop, crop)."""
    cfg = cfg or ImageTransformConfig()
    return _video_batch(_as_frames(frames), cfg)


def preprocess_videos(
    videos: Sequence[np.ndarray | torch.Tensor], cfg: ImageTransformConfig | None = None
) -> torch.Tensor:
    """Several videos with the same frame count -> float32 (B, T, 3, crop, crop).

    Videos of the same resolution are resized together, a few frames at a time.
    """
    cfg = cfg or ImageTransformConfig()
    clips = [_as_frames(v) for v in videos]
    if not clips:
        return torch.empty(0, 0, 3, cfg.crop_size, cfg.crop_size, device="cpu")
    t = clips[0].shape[0]
    if any(c.shape[0] != t for c in clips):
        raise ValueError(f"videos have different frame counts: {[c.shape[0] for c in clips]}")
    out: list[torch.Tensor | None] = [None] * len(clips)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, c in enumerate(clips):
        by_size.setdefault((c.shape[1], c.shape[2]), []).append(i)
    for members in by_size.values():
        stacked = torch.cat([clips[i] for i in members])  # (len(members) * T, H, W, 3)
        done = _video_batch(stacked, cfg).view(len(members), t, 3, cfg.crop_size, cfg.crop_size)
        for j, i in enumerate(members):
            out[i] = done[j]
    return torch.stack(out)  # type: ignore[arg-type]
