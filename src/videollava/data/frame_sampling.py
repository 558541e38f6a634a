"""Which frames of a clip the model sees, and the one array of one size they are gathered into.

Frames are sampled like the reference: indices ``linspace(0, n - 1, T)`` rounded down, first and
last frame included, frame rate ignored. Videos and animated images both fill a `SampledFrames`
through a `FrameShaper`, so every clip comes out the same way whatever decoded it.
"""

from __future__ import annotations

from dataclasses import dataclass

import av
import numpy as np
from PIL import Image

from videollava.data.decode_limits import check_pixels
from videollava.data.images import Shrink, divided_size, reduce_picture, shrink_divisor, to_rgb


@dataclass(frozen=True)
class VideoClip:
    """The frames the model sees and the file's frame count, which places them in time."""

    frames: np.ndarray  # (T, H, W, 3) uint8
    n_frames: int  # frames in the file; the sampled ones are frame_indices(n_frames, T)


def frame_indices(n_frames: int, num_frames: int) -> np.ndarray:
    """Indices of the frames the model sees: evenly spread, both ends included, as the reference."""
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    return np.linspace(0, n_frames - 1, num_frames).astype(int)


def frame_times(n_frames: int, num_frames: int) -> np.ndarray:
    """(num_frames,) where the sampled frames lie in the clip: 0 = first frame, 1 = last."""
    return frame_indices(n_frames, num_frames) / max(1, n_frames - 1)


class SampledFrames:
    """A clip's (T, H, W, 3) frames, written as each wanted frame is decoded, so none is held twice.

    An index wanted more than once (a clip shorter than T) fills several slots.
    """

    def __init__(self, indices: list[int]):
        self.count = len(indices)
        self.slots: dict[int, list[int]] = {}
        for slot, index in enumerate(indices):
            self.slots.setdefault(index, []).append(slot)
        self.filled: set[int] = set()
        self.array: np.ndarray | None = None

    def wanted(self) -> list[int]:
        return sorted(self.slots)

    def __contains__(self, index: int) -> bool:
        return index in self.slots

    def put(self, index: int, rgb: np.ndarray) -> None:
        if self.array is None:
            self.array = np.empty((self.count, *rgb.shape), np.uint8)  # (T, H, W, 3)
        for slot in self.slots[index]:
            self.array[slot] = rgb
        self.filled.add(index)

    def complete(self) -> bool:
        return self.array is not None and len(self.filled) == len(self.slots)


class FrameShaper:
    """Decoded frames -> uint8 RGB arrays of one size: the first frame's, divided by `shrink`'s factor.

    A frame of another size (a stream that changes resolution) is scaled to that size on its own.
    """

    def __init__(self, name: str, shrink: Shrink | None, max_pixels: int):
        self.name = name
        self.shrink = shrink
        self.max_pixels = max_pixels
        self.factor = 1
        self.size: tuple[int, int] | None = None  # (width, height) of every frame returned

    def _fix_size(self, width: int, height: int) -> tuple[int, int]:
        check_pixels(self.name, width, height, self.max_pixels, "video frame")
        if self.size is None:
            self.factor = shrink_divisor(self.shrink, width, height)
            self.size = divided_size((width, height), self.factor)
        return self.size

    def av_frame(self, frame: av.VideoFrame) -> np.ndarray:
        width, height = self._fix_size(frame.width, frame.height)
        if (frame.width, frame.height) == (width, height):
            return frame.to_ndarray(format="rgb24")  # (H, W, 3) uint8
        # Scaled and converted in one pass of the scaler: the full-size RGB frame never exists.
        scaled = frame.reformat(width=width, height=height, format="rgb24", interpolation="AREA")
        return scaled.to_ndarray()

    def picture(self, img: Image.Image) -> np.ndarray:
        size = self._fix_size(img.width, img.height)
        if divided_size(img.size, self.factor) == size:
            rgb = to_rgb(reduce_picture(img, self.factor))
        else:
            rgb = to_rgb(img).resize(size, Image.Resampling.BOX)
        return np.asarray(rgb, dtype=np.uint8)  # (H, W, 3)
