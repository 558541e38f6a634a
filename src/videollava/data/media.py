"""Any image or video file to RGB pixels: the kind is judged by content, then the right reader runs.

Every failure becomes a `MediaError` naming the file, so a bad upload or a broken dataset entry
reads as one line rather than a PyAV or PIL traceback. Still images are read by `images`, animated
GIF / WebP / PNG by `animation` and everything else by `video`; all of them within `DecodeLimits`.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from videollava.data.animation import read_animated_image
from videollava.data.decode_limits import Cancelled, DecodeBudget, DecodeLimits
from videollava.data.frame_sampling import VideoClip
from videollava.data.images import Shrink, decode_still_image
from videollava.data.media_kind import sniff_picture
from videollava.data.media_source import MediaSource, RewindableSource, rewindable_source
from videollava.data.video import open_container, read_container_video, video_stream
from videollava.errors import MediaError


def read_video_clip(
    source: MediaSource,
    num_frames: int = 8,
    *,
    name: str | None = None,
    shrink: Shrink | None = None,
    limits: DecodeLimits | None = None,
    cancelled: Cancelled | None = None,
) -> VideoClip:
    """Sample ``num_frames`` RGB frames the way the model was trained, and say which they were.

    Fewer distinct frames than ``num_frames`` repeat (linspace over n - 1 does that). Animated
    GIF / WebP / PNG count as videos; a still image does not. With ``shrink``, frames much larger
    than needed come back smaller (see `Shrink`); all frames have the size of the first.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    src = rewindable_source(source, name)
    budget = DecodeBudget(src.name, limits or DecodeLimits(), cancelled)
    budget.check()
    kind = sniff_picture(src)
    if kind == "still":
        raise MediaError(src.name, "not a video: it is a still image")
    return _read_clip(src, kind, num_frames, shrink, budget)


def _read_clip(
    src: RewindableSource, kind: str | None, num_frames: int, shrink: Shrink | None, budget: DecodeBudget
) -> VideoClip:
    """The reader for what is not a still picture: animated images by PIL, the rest by PyAV."""
    if kind == "animated":
        return read_animated_image(src, num_frames, shrink, budget)
    return read_container_video(src, num_frames, shrink, budget)


def read_video_frames(
    source: MediaSource,
    num_frames: int = 8,
    *,
    name: str | None = None,
    shrink: Shrink | None = None,
    limits: DecodeLimits | None = None,
    cancelled: Cancelled | None = None,
) -> np.ndarray:
    """``read_video_clip``'s frames alone: uint8 array (T, H, W, 3)."""
    clip = read_video_clip(source, num_frames, name=name, shrink=shrink, limits=limits, cancelled=cancelled)
    return clip.frames


def is_video_file(source: MediaSource, *, name: str | None = None) -> bool:
    """True for content that decodes as a video (incl. animated images), judged by content.

    Raises MediaError only when nothing can be read (missing, not a regular file, empty).
    """
    src = rewindable_source(source, name)
    kind = sniff_picture(src)
    if kind is not None:
        return kind == "animated"
    try:
        with open_container(src) as container:
            video_stream(container, src)
    except MediaError:
        return False
    return True


def load_media(
    source: MediaSource,
    num_frames: int = 8,
    *,
    name: str | None = None,
    shrink: Shrink | None = None,
    limits: DecodeLimits | None = None,
    cancelled: Cancelled | None = None,
) -> Image.Image | np.ndarray:
    """An RGB PIL image for a still picture, else ``read_video_frames`` (T, H, W, 3) uint8."""
    src = rewindable_source(source, name)
    budget = DecodeBudget(src.name, limits or DecodeLimits(), cancelled)
    budget.check()
    kind = sniff_picture(src)
    if kind == "still":
        return decode_still_image(src, shrink, budget.limits)
    return _read_clip(src, kind, num_frames, shrink, budget).frames
