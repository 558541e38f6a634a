"""Training data files in the LLaVA JSON convention, read into records without decoding any media.

A sample is one JSON object with an `image` / `video` path (or `images` / `videos` lists, or
neither for text-only), relative to a media root, and a `conversations` list of human/gpt turns.
Everything the samplers need (modality, a length estimate) is read from the JSON alone; pixels
are decoded only when a dataset loads the sample, inside the DataLoader.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from videollava.data.conversation import from_llava
from videollava.errors import PromptError, VideoLlavaError

MODALITIES = ("image", "video", "text", "mixed")


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
