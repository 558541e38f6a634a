"""Training data in the LLaVA JSON convention: samples, collation, batch samplers, bad-sample policy.

A sample is one JSON object with an `image` / `video` path (or `images` / `videos` lists, or
neither for text-only), relative to a media root, and a `conversations` list of human/gpt turns.
Everything the samplers need (modality, a length estimate) is read from the JSON alone; pixels
are decoded only when a sample is loaded, inside the DataLoader.

A sample that cannot be used raises `BadSample` while loading. `__getitem__` turns it into a
`Skipped` record, so a worker process never dies on one file; the training loop logs every
`Skipped` (id and reason) and, by policy, drops it (the batch is just smaller) or stops.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from videollava.data.conversation import from_llava, get_template
from videollava.data.media import frame_times, load_image, read_video_clip
from videollava.data.tokenize import (
    IMAGE_PLACEHOLDER,
    IMAGE_SLOT,
    VIDEO_PLACEHOLDER,
    VIDEO_SLOT,
    tokenize_multimodal,
)
from videollava.data.transforms import (
    ImageTransformConfig,
    box_to_pixels,
    preprocess_images,
    preprocess_video,
)
from videollava.errors import MediaError, PromptError, VideoLlavaError

MODALITIES = ("image", "video", "text", "mixed")


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


# ---------------------------------------------------------------------------------------- records


@dataclass
class Record:
    """One JSON entry, with what can be known without decoding media."""

    index: int
    id: str
    raw: Any
    images: list[str]
    videos: list[str]
    modality: str
    text_words: int
    problem: str | None = None  # structural problem found while reading the JSON
    group: str | None = None  # entries sharing a group go into one batch under the mixed sampler


def _media_list(raw: dict[str, Any], single: str, plural: str) -> list[str]:
    value: list[Any] = []
    if single in raw and raw[single] is not None:
        value.append(raw[single])
    if plural in raw and raw[plural] is not None:
        items = raw[plural]
        if not isinstance(items, list):
            raise ValueError(f"'{plural}' must be a list of paths")
        value.extend(items)
    if not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"'{single}' / '{plural}' must hold non-empty path strings")
    return value


def parse_record(raw: Any, index: int, source: str) -> Record:
    """Read modality and size from a JSON entry; a malformed entry is kept and reported when loaded."""
    fallback_id = f"{source}#{index}"
    if not isinstance(raw, dict):
        return Record(index, fallback_id, raw, [], [], "text", 0, "entry is not a JSON object")
    sample_id = str(raw.get("id", fallback_id))
    try:
        images = _media_list(raw, "image", "images")
        videos = _media_list(raw, "video", "videos")
    except ValueError as error:
        return Record(index, sample_id, raw, [], [], "text", 0, str(error))
    if images and videos:
        modality = "mixed"
    elif images:
        modality = "image"
    elif videos:
        modality = "video"
    else:
        modality = "text"
    words = 0
    turns = raw.get("conversations")
    if isinstance(turns, list):
        words = sum(
            len(t["value"].split()) for t in turns if isinstance(t, dict) and isinstance(t.get("value"), str)
        )
    group = raw.get("group")
    return Record(
        index, sample_id, raw, images, videos, modality, words, group=None if group is None else str(group)
    )


def read_records(paths: Sequence[str | os.PathLike], max_samples: int | None = None) -> list[Record]:
    """Concatenate LLaVA JSON lists (or JSON-lines files), in the order given."""
    records: list[Record] = []
    for path in paths:
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise VideoLlavaError(f"{path}: data file not found") from None
        try:
            if path.suffix == ".jsonl":
                entries = [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                entries = json.loads(text)
        except json.JSONDecodeError as error:
            raise VideoLlavaError(f"{path}: not valid JSON ({error})") from None
        if not isinstance(entries, list):
            raise VideoLlavaError(f"{path}: expected a JSON list of samples")
        for entry in entries:
            records.append(parse_record(entry, len(records), path.name))
    if max_samples is not None:
        records = records[:max_samples]
        for i, record in enumerate(records):
            record.index = i
    return records


def training_texts(records: Sequence[Record], template: str = "vicuna_v1") -> list[str]:
    """Texts a tokenizer should learn from: every turn, plus each conversation as rendered for training."""
    texts: list[str] = []
    for record in records:
        turns = record.raw.get("conversations") if isinstance(record.raw, dict) else None
        if not isinstance(turns, list):
            continue
        texts += [t["value"] for t in turns if isinstance(t, dict) and isinstance(t.get("value"), str)]
        try:
            texts.append(from_llava(turns, template).render_for_training()[0])
        except PromptError:
            continue
    return texts


# ---------------------------------------------------------------------------------------- media


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

    def _cached(self, kind: str, rel: str, load: Callable[[], torch.Tensor]) -> torch.Tensor:
        if self.cache is None:
            return load()
        key = (kind, str(self.root / rel), self.transform, self.num_frames if kind == "video" else 0)
        return self.cache.get_or_load(key, load)


# Hears the stored (width, height, frame count) whenever a file is decoded; 1 frame for an image.
SizeSink = Callable[[int, int, int], None]


def _load_image(spec: MediaSpec, rel: str, on_size: SizeSink | None = None) -> torch.Tensor:
    """(3, S, S)."""

    def load() -> torch.Tensor:
        image = load_image(spec.root / rel, name=rel)
        if on_size is not None:
            on_size(*image.size, 1)
        return preprocess_images([image], spec.transform)[0]

    return spec._cached("image", rel, load)


def _load_video(spec: MediaSpec, rel: str, on_size: SizeSink | None = None) -> torch.Tensor:
    """(T, 3, S, S)."""

    def load() -> torch.Tensor:
        clip = read_video_clip(spec.root / rel, num_frames=spec.num_frames, name=rel)
        if on_size is not None:
            on_size(clip.frames.shape[2], clip.frames.shape[1], clip.n_frames)
        return preprocess_video(clip.frames, spec.transform)

    return spec._cached("video", rel, load)


# ---------------------------------------------------------------------------------------- datasets


@dataclass
class Sample:
    id: str
    input_ids: list[int]
    labels: list[int]
    images: list[torch.Tensor]  # each (3, S, S), in slot order
    videos: list[torch.Tensor]  # each (T, 3, S, S), in slot order
    modality: str

    @property
    def supervised_tokens(self) -> int:
        return sum(1 for label in self.labels[1:] if label >= 0)


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
            images = [_load_image(self.media, rel) for rel in record.images]
            videos = [_load_video(self.media, rel) for rel in record.videos]
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
    id: str
    pixels: torch.Tensor  # (3, S, S) or (T, 3, S, S)
    caption: str
    modality: str
    # Named boxes in the model's crop pixels, when the dataset reads regions.
    regions: list[Region] = field(default_factory=list)


Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Region:
    """A named part of the media: an object and its box, (x0, y0, x1, y1) in pixels.

    A video region may also say where the object is over time: ``track`` holds keyframes
    (t, box), t from 0 (first frame) to 1 (last), the box moving linearly between them. Once the
    region is mapped into the model's crop, ``frame_boxes`` holds its box in each sampled frame
    (None where the crop cuts it away), so each frame's own patches can be told what they show.
    ``motion`` says how a video's object moves ("moving left", "standing still"), apart from its name.
    """

    box: Box
    text: str
    track: tuple[tuple[float, Box], ...] = ()
    frame_boxes: tuple[Box | None, ...] = ()
    motion: str = ""

    def box_at(self, t: float) -> Box:
        """The tracked box at time ``t`` in [0, 1]; the whole-clip box when there is no track."""
        if not self.track:
            return self.box
        if t <= self.track[0][0]:
            return self.track[0][1]
        for (t0, b0), (t1, b1) in zip(self.track, self.track[1:], strict=False):
            if t <= t1:
                w = (t - t0) / (t1 - t0)
                return tuple(a + (b - a) * w for a, b in zip(b0, b1, strict=True))  # type: ignore[return-value]
        return self.track[-1][1]


def _parse_box(box: Any, where: str) -> Box:
    if (
        not isinstance(box, list)
        or len(box) != 4
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
    ):
        raise ValueError(f"{where}: 'box' must be four numbers [x0, y0, x1, y1], got {box!r}")
    if not (box[0] < box[2] and box[1] < box[3]):
        raise ValueError(f"{where}: box {box} is empty (it needs x0 < x1 and y0 < y1)")
    return (float(box[0]), float(box[1]), float(box[2]), float(box[3]))


def _parse_track(raw: Any, where: str) -> tuple[tuple[float, Box], ...]:
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{where}: 'track' must be a non-empty list of {{t, box}} keyframes")
    keys = []
    for k, item in enumerate(raw):
        if not isinstance(item, dict) or not {"t", "box"} <= set(item):
            raise ValueError(f"{where}: track keyframe {k} must be an object with 't' and 'box'")
        t = item["t"]
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not 0.0 <= t <= 1.0:
            raise ValueError(f"{where}: track keyframe {k}: 't' must be a number in [0, 1], got {t!r}")
        if keys and t <= keys[-1][0]:
            raise ValueError(f"{where}: track times must increase, got {t} after {keys[-1][0]}")
        keys.append((float(t), _parse_box(item["box"], f"{where}, track keyframe {k}")))
    return tuple(keys)


def parse_regions(raw: Any) -> list[Region]:
    """The entry's optional ``regions``: ``[{"box": [x0, y0, x1, y1], "text": "...", "track":
    [{"t": 0.0, "box": [...]}, ...], "motion": "..."}]`` in the media's own pixels (for a video,
    ``box`` holds the object throughout and the optional ``track`` follows it)."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ValueError("'regions' must be a list of {box, text} objects")
    regions = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not {"box", "text"} <= set(item):
            raise ValueError(f"region {i} must be an object with 'box' and 'text'")
        box, text = _parse_box(item["box"], f"region {i}"), item["text"]
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"region {i}: 'text' must be a non-empty string")
        track = _parse_track(item["track"], f"region {i}") if "track" in item else ()
        motion = item.get("motion", "")
        if not isinstance(motion, str) or ("motion" in item and not motion.strip()):
            raise ValueError(f"region {i}: 'motion' must be a non-empty string")
        regions.append(Region(box, text.strip(), track, motion=motion.strip()))
    return regions


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
        return self._distinct_regions("text")

    def region_motions(self) -> list[str]:
        """Every distinct region ``motion`` phrase of the data, in first-seen order."""
        return self._distinct_regions("motion")

    def _distinct_regions(self, field: str) -> list[str]:
        values: dict[str, None] = {}
        for record in self.records:
            try:
                regions = parse_regions(record.raw.get("regions"))
            except (ValueError, AttributeError):
                continue
            values.update(dict.fromkeys(v for r in regions if (v := getattr(r, field))))
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
                cropped.append(Region(box, region.text, frame_boxes=frame_boxes, motion=region.motion))
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
        load = _load_image if self.modality == "image" else _load_video
        try:
            pixels = load(self.media, paths[0], self._remember_size(paths[0]) if self.regions else None)
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


# ---------------------------------------------------------------------------------------- samplers


def _generator(seed: int, epoch: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed * 1_000_003 + epoch)
    return g


def mixed_batches(
    n: int, batch_size: int, seed: int, epoch: int, groups: Sequence[str | None] | None = None
) -> list[list[int]]:
    """Everything shuffled together, cut into global batches (the last may be smaller).

    With ``groups``, the members of a group move as one unit and share a batch (a batch closes
    early rather than split one), so a contrastive loss always sees them side by side.
    """
    if groups is None or all(g is None for g in groups):
        order = torch.randperm(n, generator=_generator(seed, epoch)).tolist()
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]
    members: dict[str, list[int]] = {}
    units: list[list[int]] = []
    for index, group in enumerate(groups):
        if group is None:
            units.append([index])
        elif group in members:
            members[group].append(index)
        else:
            members[group] = [index]
            units.append(members[group])
    batches: list[list[int]] = [[]]
    for u in torch.randperm(len(units), generator=_generator(seed, epoch)).tolist():
        unit = units[u]
        if batches[-1] and len(batches[-1]) + len(unit) > batch_size:
            batches.append([])
        for start in range(0, len(unit), batch_size):  # a group larger than a batch is cut
            if batches[-1] and start:
                batches.append([])
            batches[-1].extend(unit[start : start + batch_size])
    return [b for b in batches if b]


def grouped_batches(
    lengths: Sequence[int], modalities: Sequence[str], batch_size: int, seed: int, epoch: int
) -> list[list[int]]:
    """Batches of one modality and similar length, in shuffled order.

    Per modality: shuffle, cut into megabatches of one global batch, sort each by length (longest
    first, so the micro-batches of a rank hold like-sized samples). The incomplete megabatches of all
    modalities are pooled into trailing batches; the full ones are shuffled.
    """
    g = _generator(seed, epoch)
    full: list[list[int]] = []
    leftovers: list[int] = []
    for modality in MODALITIES:
        members = [i for i, m in enumerate(modalities) if m == modality]
        if not members:
            continue
        shuffled = [members[j] for j in torch.randperm(len(members), generator=g).tolist()]
        for start in range(0, len(shuffled), batch_size):
            chunk = sorted(shuffled[start : start + batch_size], key=lambda i: -lengths[i])
            if len(chunk) == batch_size:
                full.append(chunk)
            else:
                leftovers.extend(chunk)
    order = torch.randperm(len(full), generator=g).tolist()
    batches = [full[j] for j in order]
    leftovers.sort(key=lambda i: -lengths[i])
    batches += [leftovers[i : i + batch_size] for i in range(0, len(leftovers), batch_size)]
    return batches


def global_batches(
    mode: str,
    lengths: Sequence[int],
    modalities: Sequence[str],
    batch_size: int,
    seed: int,
    epoch: int,
    groups: Sequence[str | None] | None = None,
) -> list[list[int]]:
    """One epoch's global batches; the same for any number of processes."""
    if mode == "mixed":
        return mixed_batches(len(lengths), batch_size, seed, epoch, groups)
    if mode == "grouped":
        return grouped_batches(lengths, modalities, batch_size, seed, epoch)
    raise ValueError(f"unknown sampler mode {mode!r}; expected 'mixed' or 'grouped'")


def shard(batch: Sequence[int], rank: int, world_size: int) -> list[int]:
    """This rank's contiguous share of a global batch; shares differ in size by at most one."""
    base, extra = divmod(len(batch), world_size)
    start = rank * base + min(rank, extra)
    return list(batch[start : start + base + (1 if rank < extra else 0)])


def micro_batches(indices: Sequence[int], micro_batch_size: int, accumulation: int) -> list[list[int]]:
    """Exactly `accumulation` micro-batches (trailing ones may be empty) so every rank steps together."""
    pieces = [list(indices[i : i + micro_batch_size]) for i in range(0, len(indices), micro_batch_size)]
    if len(pieces) > accumulation:
        raise ValueError(
            f"{len(indices)} samples do not fit {accumulation} micro-batches of {micro_batch_size}"
        )
    return pieces + [[] for _ in range(accumulation - len(pieces))]


@dataclass
class SamplerState:
    epoch: int = 0
    batches_consumed: int = 0  # global batches of `epoch` already trained on

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_consumed": self.batches_consumed}


@dataclass
class StepBatches(Sampler[list[int]]):
    """This rank's micro-batches for one epoch, `accumulation` per global batch, after a resume point.

    Deterministic for (seed, epoch); the union over ranks of each step's micro-batches is the global
    batch a single process would train on.
    """

    mode: str
    lengths: Sequence[int]
    modalities: Sequence[str]
    batch_size: int
    micro_batch_size: int
    accumulation: int
    seed: int
    epoch: int = 0
    start: int = 0
    rank: int = 0
    world_size: int = 1
    # Order this rank's share by length before cutting micro-batches: less padding. Only for losses
    # that are sums over samples (LM), where the grouping into micro-batches does not change the result.
    sort_by_length: bool = False
    groups: Sequence[str | None] | None = None
    _batches: list[list[int]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self._batches = global_batches(
            self.mode, self.lengths, self.modalities, self.batch_size, self.seed, self.epoch, self.groups
        )

    @property
    def batches(self) -> list[list[int]]:
        return self._batches

    def steps(self) -> int:
        return len(self._batches)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._batches[self.start :]:
            indices = shard(batch, self.rank, self.world_size)
            if self.sort_by_length:
                indices.sort(key=lambda i: -self.lengths[i])
            yield from micro_batches(indices, self.micro_batch_size, self.accumulation)

    def __len__(self) -> int:
        return (len(self._batches) - self.start) * self.accumulation


# ---------------------------------------------------------------------------------------- bad samples


@dataclass
class BadSampleLog:
    """Counts bad samples, appends them to a JSON-lines file and stderr, and applies the policy."""

    path: Path | None
    policy: str = "skip"
    stage: str = ""
    count: int = 0
    echo: bool = True

    def record(self, skipped: Sequence[Skipped], step: int, stage_index: int = 0) -> None:
        if not skipped:
            return
        self.count += len(skipped)
        lines = []
        for item in skipped:
            entry = {
                "stage": self.stage,
                "stage_index": stage_index,
                "step": step,
                "id": item.id,
                "reason": item.reason,
            }
            lines.append(json.dumps(entry))
            if self.echo:
                action = "stopping" if self.policy == "fail" else "skipped"
                print(f"bad sample {item.id} ({action}): {item.reason}", file=sys.stderr)
        if self.path is not None:
            with open(self.path, "a") as handle:
                handle.write("\n".join(lines) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        if self.policy == "fail":
            first = skipped[0]
            raise BadSample(
                first.id, f"{first.reason} (bad_samples: fail; set bad_samples: skip to train without it)"
            )


__all__ = [
    "IMAGE_SLOT",
    "VIDEO_SLOT",
    "BadSample",
    "BadSampleLog",
    "CaptionDataset",
    "ConversationDataset",
    "MediaSpec",
    "Record",
    "SamplerState",
    "Skipped",
    "StepBatches",
    "collate_captions",
    "collate_conversations",
    "global_batches",
    "grouped_batches",
    "micro_batches",
    "mixed_batches",
    "read_records",
    "shard",
    "supervised_tokens",
    "training_texts",
]
