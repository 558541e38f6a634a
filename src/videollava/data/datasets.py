"""Datasets over JSON records, one sample per record, and the collation of their samples into batches.

A sample that cannot be used raises `BadSample` while loading. `__getitem__` turns it into a
`Skipped` record, so a loader worker never dies on one file; the training loop logs every
`Skipped` (id and reason) and, by policy, drops it (the batch is just smaller) or stops.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset

from videollava.constants import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from videollava.data.conversation import from_llava, get_template
from videollava.data.frame_sampling import frame_times
from videollava.data.images import load_image
from videollava.data.media import read_video_clip
from videollava.data.records import Record
from videollava.data.regions import Box, Region, parse_regions
from videollava.data.sample_media import MediaSpec, SizeSink
from videollava.data.tokenize import tokenize_multimodal
from videollava.data.transforms import box_to_pixels
from videollava.errors import MediaError, PromptError, VideoLlavaError


class BadSample(VideoLlavaError):
    """A training sample that cannot be used, named by its id."""

    def __init__(self, sample_id: str, reason: str):
        self.sample_id = sample_id
        self.reason = reason
        super().__init__(f"sample {sample_id}: {reason}")


@dataclass
class Skipped:
    """What `__getitem__` returns in place of a bad sample."""

    id: str
    reason: str
    index: int


@dataclass
class Sample:
    """One tokenized conversation, its labels and its media, ready to collate."""

    id: str
    input_ids: list[int]
    labels: list[int]
    images: list[torch.Tensor]  # each (3, S, S), in slot order
    videos: list[torch.Tensor]  # each (T, 3, S, S), in slot order
    modality: str


class RecordDataset(Dataset):
    """A dataset over JSON records, one sample per record."""

    records: list[Record]

    @property
    def groups(self) -> list[str | None]:
        """Each record's group; the mixed sampler keeps a group in one batch."""
        return [r.group for r in self.records]


class ConversationDataset(RecordDataset):
    """Tokenized conversations with answer-only labels and their media, for the LLM stages."""

    def __init__(
        self,
        records: Sequence[Record],
        media: MediaSpec,
        tokenizer: Any,
        template: str,
        max_length: int,
    ):
        self.records = list(records)
        self.media = media
        self.tokenizer = tokenizer
        self.template = get_template(template)
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.records)

    @property
    def modalities(self) -> list[str]:
        return [r.modality for r in self.records]

    @property
    def lengths(self) -> list[int]:
        """Estimated LLM length: words of the text plus visual rows (no media decoded)."""
        rows = self.media.image_rows
        video_rows = self.media.frame_rows * self.media.num_frames
        return [r.text_words + rows * len(r.images) + video_rows * len(r.videos) for r in self.records]

    def load(self, index: int) -> Sample:
        """The sample, or `BadSample` naming why it cannot be used."""
        record = self.records[index]
        if record.problem:
            raise BadSample(record.id, f"malformed entry: {record.problem}")
        turns = record.raw.get("conversations")
        try:
            conversation = from_llava(turns, self.template)
        except PromptError as error:
            raise BadSample(record.id, f"malformed conversation: {error}") from None
        human = "".join(t["value"] for t in turns[::2])
        found = (human.count(IMAGE_PLACEHOLDER), human.count(VIDEO_PLACEHOLDER))
        if found != (len(record.images), len(record.videos)):
            raise BadSample(
                record.id,
                f"placeholder mismatch: {found[0]} {IMAGE_PLACEHOLDER} / {found[1]} {VIDEO_PLACEHOLDER} in the "
                f"text but {len(record.images)} image(s) / {len(record.videos)} video(s) given",
            )
        try:
            text, spans = conversation.render_for_training()
            tokens = tokenize_multimodal(self.tokenizer, text, spans)
        except (PromptError, ValueError) as error:
            raise BadSample(record.id, f"cannot tokenize: {error}") from None
        assert tokens.labels is not None
        visual = self.media.image_rows * tokens.num_images + (
            self.media.frame_rows * self.media.num_frames * tokens.num_videos
        )
        length = len(tokens.input_ids) - tokens.num_images - tokens.num_videos + visual
        if length > self.max_length:
            raise BadSample(
                record.id, f"too long: {length} tokens ({visual} visual) > model_max_length {self.max_length}"
            )
        if not any(label >= 0 for label in tokens.labels):
            raise BadSample(record.id, "no supervised tokens")
        try:
            images = [self.media.image_pixels(rel) for rel in record.images]
            videos = [self.media.video_pixels(rel) for rel in record.videos]
        except MediaError as error:
            raise BadSample(record.id, f"bad media: {error}") from None
        return Sample(record.id, tokens.input_ids, tokens.labels, images, videos, record.modality)

    def __getitem__(self, index: int) -> Sample | Skipped:
        try:
            return self.load(index)
        except BadSample as error:
            return Skipped(error.sample_id, error.reason, index)


@dataclass
class CaptionSample:
    """One media file and its caption, for contrastive alignment."""

    id: str
    pixels: torch.Tensor  # (3, S, S) or (T, 3, S, S)
    caption: str
    modality: str
    # Named boxes in the model's crop pixels, when the dataset reads regions.
    regions: list[Region] = field(default_factory=list)


class CaptionDataset(RecordDataset):
    """Media-caption pairs for contrastive alignment: the caption is the first gpt turn."""

    def __init__(self, records: Sequence[Record], media: MediaSpec, modality: str, regions: bool = False):
        if modality not in ("image", "video"):
            raise ValueError(f"modality must be 'image' or 'video', got {modality!r}")
        # Entries of the other modality are not this dataset's business; malformed ones are kept
        # so they are reported.
        self.records = [r for r in records if r.modality == modality or r.problem]
        self.media = media
        self.modality = modality
        self.regions = regions
        self._sizes: dict[str, tuple[int, int, int]] = {}  # media path -> (width, height, frames)
        self._sizes_lock = threading.Lock()

    def region_texts(self) -> list[str]:
        """Every distinct region name of the data, in first-seen order: the names regions are told
        apart from. Entries whose regions are malformed are left to ``load`` to report."""
        return self._distinct_regions(lambda r: (r.text,))

    def region_motions(self) -> list[str]:
        """Every distinct region ``motion`` phrase of the data, its tracks' included, in first-seen order."""
        return self._distinct_regions(lambda r: (r.motion, *r.track_motions))

    def _distinct_regions(self, values_of: Callable[[Region], Iterable[str]]) -> list[str]:
        values: dict[str, None] = {}
        for record in self.records:
            try:
                regions = parse_regions(record.raw.get("regions"))
            except (ValueError, AttributeError):
                continue
            values.update(dict.fromkeys(v for r in regions for v in values_of(r) if v))
        return list(values)

    def _remember_size(self, rel: str) -> SizeSink:
        def sink(width: int, height: int, n_frames: int) -> None:
            with self._sizes_lock:
                self._sizes[rel] = (width, height, n_frames)

        return sink

    def _media_size(self, rel: str) -> tuple[int, int, int]:
        """(width, height, frames) of media whose pixels came from the cache: decoded once more."""
        with self._sizes_lock:
            known = self._sizes.get(rel)
        if known is not None:
            return known
        if self.modality == "image":
            size = (*load_image(self.media.root / rel, name=rel).size, 1)
        else:
            clip = read_video_clip(self.media.root / rel, num_frames=1, name=rel)
            size = (clip.frames.shape[2], clip.frames.shape[1], clip.n_frames)
        self._remember_size(rel)(*size)
        return size

    def _crop_regions(self, record: Record, rel: str) -> list[Region]:
        try:
            regions = parse_regions(record.raw.get("regions"))
        except ValueError as error:
            raise BadSample(record.id, f"malformed regions: {error}") from None
        width, height, n_frames = self._media_size(rel)
        video = self.modality == "video"

        def to_crop(box: Box) -> Box | None:
            return box_to_pixels(box, width, height, self.media.transform, video=video)

        times = frame_times(n_frames, self.media.num_frames) if video else []
        cropped = []
        for region in regions:
            box = to_crop(region.box)
            frame_boxes = tuple(to_crop(region.box_at(float(t))) for t in times) if region.track else ()
            if box is not None and (not frame_boxes or any(b is not None for b in frame_boxes)):
                moves = region.motion or region.track_motions
                frame_motions = tuple(region.motion_at(float(t)) for t in times) if moves else ()
                cropped.append(
                    Region(
                        box,
                        region.text,
                        frame_boxes=frame_boxes,
                        motion=region.motion,
                        frame_motions=frame_motions,
                    )
                )
        return cropped

    def __len__(self) -> int:
        return len(self.records)

    @property
    def modalities(self) -> list[str]:
        return [self.modality] * len(self.records)

    @property
    def lengths(self) -> list[int]:
        return [r.text_words for r in self.records]

    def load(self, index: int) -> CaptionSample:
        record = self.records[index]
        if record.problem:
            raise BadSample(record.id, f"malformed entry: {record.problem}")
        turns = record.raw.get("conversations")
        try:
            from_llava(turns, "plain")
        except PromptError as error:
            raise BadSample(record.id, f"malformed conversation: {error}") from None
        paths = record.images if self.modality == "image" else record.videos
        if len(paths) != 1:
            raise BadSample(record.id, f"expected one {self.modality}, found {len(paths)}")
        placeholder = IMAGE_PLACEHOLDER if self.modality == "image" else VIDEO_PLACEHOLDER
        if turns[0]["value"].count(placeholder) != 1:
            raise BadSample(record.id, f"placeholder mismatch: the question needs one {placeholder}")
        load = self.media.image_pixels if self.modality == "image" else self.media.video_pixels
        try:
            pixels = load(paths[0], self._remember_size(paths[0]) if self.regions else None)
            regions = self._crop_regions(record, paths[0]) if self.regions else []
        except MediaError as error:
            raise BadSample(record.id, f"bad media: {error}") from None
        return CaptionSample(record.id, pixels, turns[1]["value"].strip(), self.modality, regions)

    def __getitem__(self, index: int) -> CaptionSample | Skipped:
        try:
            return self.load(index)
        except BadSample as error:
            return Skipped(error.sample_id, error.reason, index)


# ---------------------------------------------------------------------------------------- collation


def collate_conversations(items: Sequence[Sample | Skipped]) -> dict[str, Any]:
    """Good samples in order with their media in slot order; bad ones listed under "skipped"."""
    good = [s for s in items if isinstance(s, Sample)]
    images = [img for s in good for img in s.images]
    videos = [vid for s in good for vid in s.videos]
    return {
        "input_ids": [s.input_ids for s in good],
        "labels": [s.labels for s in good],
        "images": torch.stack(images) if images else None,  # (N_img, 3, S, S)
        "videos": torch.stack(videos) if videos else None,  # (N_vid, T, 3, S, S)
        "ids": [s.id for s in good],
        "modalities": [s.modality for s in good],
        "skipped": [s for s in items if isinstance(s, Skipped)],
        "num_samples": len(good),
    }


def collate_captions(items: Sequence[CaptionSample | Skipped]) -> dict[str, Any]:
    good = [s for s in items if isinstance(s, CaptionSample)]
    return {
        "pixels": torch.stack([s.pixels for s in good]) if good else None,  # (B, 3, S, S) | (B, T, 3, S, S)
        "captions": [s.caption for s in good],
        "regions": [s.regions for s in good],
        "ids": [s.id for s in good],
        "skipped": [s for s in items if isinstance(s, Skipped)],
        "num_samples": len(good),
    }


def supervised_tokens(labels: Sequence[Sequence[int]]) -> int:
    """Tokens the shifted LM loss is computed on (a label at position 0 is never predicted)."""
    return sum(sum(1 for label in row[1:] if label >= 0) for row in labels)
