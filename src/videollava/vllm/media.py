"""Images and videos for the vLLM model, read and sampled exactly as `videollava ask` reads them.

`VideoLlavaVideoLoader` is a vLLM video loader backend (`--media-io-kwargs '{"video":
{"video_backend": "videollava"}}'`, which the plugin makes the default for our checkpoints): it
samples frames with our readers (indices `linspace(0, n - 1, T)`, seeking, 8-bit reduction of
oversized frames, decoding limits). `image_pixels` / `video_frames` turn whatever vLLM hands the
processor (the original bytes when a URL was fetched, PIL images or arrays from the offline API)
into the pixels our pipeline would make.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np
import torch
from PIL import Image

from videollava.data.decode_limits import DecodeLimits
from videollava.data.frame_sampling import frame_indices
from videollava.data.images import load_image, to_rgb
from videollava.data.media import read_video_clip
from videollava.data.transforms import ImageTransformConfig, shrink_factor
from videollava.errors import MediaError

VIDEO_BACKEND = "videollava"
# What transformers calls the -hf checkpoints' video processor; vLLM picks a checkpoint's video
# loader by that name when the checkpoint (or transformers' model-type table) names it.
VIDEO_PROCESSOR_NAMES = ("VideoLlavaVideoProcessor",)
# The frames a video gets when nothing says how many (the reference's count).
DEFAULT_FRAMES = 8

_log = logging.getLogger(__name__)


def _shrink(transform: ImageTransformConfig | None, video: bool):
    return functools.partial(shrink_factor, cfg=transform or ImageTransformConfig(), video=video)


def transform_from_kwargs(value: Any) -> ImageTransformConfig | None:
    """The preprocessing the plugin passes through `media_io_kwargs` (a dict of its fields)."""
    if value is None:
        return None
    if isinstance(value, ImageTransformConfig):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"media_io_kwargs video.transform must be an object, got {value!r}")
    fields = dict(value)
    for name in ("mean", "std"):
        if name in fields:
            fields[name] = tuple(fields[name])
    return ImageTransformConfig(**fields)


def decode_video(
    data: bytes, num_frames: int, transform: ImageTransformConfig | None, name: str = "video"
) -> tuple[np.ndarray, int]:
    """(T, H, W, 3) uint8 frames sampled from encoded bytes, and the file's frame count."""
    clip = read_video_clip(
        data, num_frames, name=name, shrink=_shrink(transform, video=True), limits=DecodeLimits()
    )
    return clip.frames, clip.n_frames


def _video_loader_base():
    from vllm.multimodal.video import VideoLoader

    return VideoLoader


class VideoLlavaVideoLoader(_video_loader_base()):
    """vLLM video loader: frames sampled from the bytes as the reference samples them."""

    @classmethod
    def load_bytes(
        cls, data: bytes, num_frames: int = -1, **kwargs: Any
    ) -> tuple[np.ndarray, dict[str, Any]]:
        frames_wanted = num_frames if num_frames and num_frames > 0 else DEFAULT_FRAMES
        transform = transform_from_kwargs(kwargs.get("transform"))
        try:
            frames, total = decode_video(data, frames_wanted, transform)
        except MediaError as error:
            raise ValueError(str(error)) from None  # vLLM answers a ValueError with a 400
        metadata = {
            "total_num_frames": total,
            "fps": 0.0,
            "duration": 0.0,
            "video_backend": VIDEO_BACKEND,
            "frames_indices": frame_indices(total, frames_wanted).tolist(),
            "do_sample_frames": False,
        }
        return frames, metadata


def register_video_loader() -> None:
    from vllm.multimodal.video import VIDEO_LOADER_REGISTRY

    VIDEO_LOADER_REGISTRY.register(VIDEO_BACKEND, video_processor=VIDEO_PROCESSOR_NAMES)(
        VideoLlavaVideoLoader
    )


# ------------------------------------------------------------------ items as vLLM hands them over


def _original_bytes(item: Any) -> bytes | None:
    from vllm.multimodal.media import MediaWithBytes

    if isinstance(item, MediaWithBytes) and isinstance(item.original_bytes, bytes):
        return item.original_bytes
    return None


def _unwrap(item: Any) -> Any:
    from vllm.multimodal.media import MediaWithBytes

    return item.media if isinstance(item, MediaWithBytes) else item


def image_pixels(item: Any, transform: ImageTransformConfig) -> Image.Image:
    """An RGB picture: decoded again from the fetched bytes by our reader, else the given image."""
    data = _original_bytes(item)
    if data is not None:
        try:
            return load_image(data, name="image", shrink=_shrink(transform, video=False))
        except MediaError as error:
            raise ValueError(str(error)) from None
    image = _unwrap(item)
    if isinstance(image, Image.Image):
        return to_rgb(image)
    array = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    return to_rgb(Image.fromarray(array.astype(np.uint8)))


def _as_frames(video: Any) -> np.ndarray:
    """(T, H, W, 3) uint8 from an array, a tensor or a list of pictures."""
    if isinstance(video, (list, tuple)) and video and isinstance(video[0], Image.Image):
        return np.stack([np.asarray(to_rgb(frame)) for frame in video])
    array = video.numpy() if isinstance(video, torch.Tensor) else np.asarray(video)
    if array.ndim != 4:
        raise ValueError(f"a video must be frames (T, H, W, 3), got an array of shape {array.shape}")
    if array.shape[-1] != 3 and array.shape[1] == 3:
        array = array.transpose(0, 2, 3, 1)  # (T, 3, H, W) -> (T, H, W, 3)
    return array.astype(np.uint8, copy=False)


def video_frames(
    item: Any,
    metadata: dict[str, Any] | None,
    num_frames: int | None,
    default_frames: int,
    transform: ImageTransformConfig,
) -> np.ndarray:
    """The frames to encode, (T, H, W, 3) uint8.

    Frames come as vLLM's loader decoded them (the server passes nothing else) or as the offline
    API was given them, and are used as they are, or `num_frames` of them picked the reference's
    way. Where the file's bytes came along (`vllm.multimodal.utils.fetch_video` in the offline
    API), frames of another loader, or of another count than asked, are sampled again from them.
    `default_frames` is the checkpoint's count, for files another loader decoded.
    """
    data = _original_bytes(item)
    backend = (metadata or {}).get("video_backend")
    frames = _as_frames(_unwrap(item))
    ours = backend == VIDEO_BACKEND
    if data is not None and backend != "jpeg_sequence" and not (ours and num_frames in (None, len(frames))):
        _log.debug(
            "sampling the video's frames again from its file (decoded by %r, %d frames)", backend, len(frames)
        )
        try:
            return decode_video(data, num_frames or (len(frames) if ours else default_frames), transform)[0]
        except MediaError as error:
            raise ValueError(str(error)) from None
    if num_frames is not None and num_frames != len(frames):
        frames = frames[frame_indices(len(frames), num_frames)]
    return frames
