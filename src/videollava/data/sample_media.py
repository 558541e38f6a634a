"""The media of training samples: where they are, how they become pixels and LLM rows, and a cache
that spares every epoch after the first the decoding."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from videollava.data.images import load_image
from videollava.data.media import read_video_clip
from videollava.data.transforms import ImageTransformConfig, preprocess_images, preprocess_video

# Hears the stored (width, height, frame count) whenever a file is decoded; 1 frame for an image.
SizeSink = Callable[[int, int, int], None]


class MediaCache:
    """Preprocessed media kept in memory, so that every epoch after the first skips decoding.

    Only worth it when the dataset is read in the training process (``num_workers: 0``): each
    loader worker would fill a copy of its own. Media that fail to load are never cached, so a bad
    sample is reported every time it comes up.
    """

    def __init__(self) -> None:
        self._items: dict[tuple, torch.Tensor] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def keep_only(self, transform: ImageTransformConfig, num_frames: int) -> None:
        """Drop what a stage reading media this way cannot use (another transform, or videos at
        another frame count), so stages that differ there do not hold both copies at once."""
        with self._lock:
            self._items = {
                key: value
                for key, value in self._items.items()
                if key[2] == transform and (key[0] != "video" or key[3] == num_frames)
            }

    def get_or_load(self, key: tuple, load: Callable[[], torch.Tensor]) -> torch.Tensor:
        with self._lock:
            found = self._items.get(key)
        if found is not None:
            return found
        value = load()
        with self._lock:
            self._items[key] = value
        return value


@dataclass(frozen=True)
class MediaSpec:
    """How media become pixels and how many LLM rows they become."""

    root: Path
    transform: ImageTransformConfig
    num_frames: int
    image_rows: int  # visual rows per image
    frame_rows: int  # visual rows per video frame
    cache: MediaCache | None = field(default=None, compare=False)

    def image_pixels(self, rel: str, on_size: SizeSink | None = None) -> torch.Tensor:
        """(3, S, S): the image at ``rel`` under the root, preprocessed."""

        def load() -> torch.Tensor:
            image = load_image(self.root / rel, name=rel)
            if on_size is not None:
                on_size(*image.size, 1)
            return preprocess_images([image], self.transform)[0]

        return self._cached("image", rel, load)

    def video_pixels(self, rel: str, on_size: SizeSink | None = None) -> torch.Tensor:
        """(T, 3, S, S): ``num_frames`` frames of the video at ``rel`` under the root, preprocessed."""

        def load() -> torch.Tensor:
            clip = read_video_clip(self.root / rel, num_frames=self.num_frames, name=rel)
            if on_size is not None:
                on_size(clip.frames.shape[2], clip.frames.shape[1], clip.n_frames)
            return preprocess_video(clip.frames, self.transform)

        return self._cached("video", rel, load)

    def _cached(self, kind: str, rel: str, load: Callable[[], torch.Tensor]) -> torch.Tensor:
        if self.cache is None:
            return load()
        key = (kind, str(self.root / rel), self.transform, self.num_frames if kind == "video" else 0)
        return self.cache.get_or_load(key, load)
