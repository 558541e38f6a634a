"""What every benchmark of the harness is made of: items to answer, and the task that reads and scores them.

A task reads its benchmark's files in their published layout into `Item`s (one question, its media
and what the answer should be), and later turns the answered records into the numbers the paper
reports. Everything in between (inference, shards, resuming, the judge, output files) is the
runner's, so every benchmark is run the same way.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from videollava.errors import VideoLlavaError
from videollava.eval.judge import VIDEO_QA, JudgePrompt
from videollava.infer.request import MediaItem


class EvalDataError(VideoLlavaError):
    """A benchmark file that is missing or not in the layout the task reads; names the file."""


@dataclass
class Item:
    """One question to answer.

    ``id`` is the benchmark's question id as a string (the key of every file the harness writes);
    ``prompts`` holds one user turn per generation (two for a consistency pair), each without
    placeholders: the media's go first. ``answer`` is what scoring compares with (a string, the
    human answers of a VQA question, a choice letter...), ``meta`` what the task needs besides.
    """

    id: str
    question: str
    answer: Any
    prompts: tuple[str, ...]
    media: list[MediaItem]
    meta: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The fields of this item's line in predictions.jsonl before it is answered."""
        return {"id": self.id, "question": self.question, "answer": self.answer} | (
            {"meta": self.meta} if self.meta else {}
        )


@dataclass(frozen=True)
class ExpectedFile:
    path: str  # relative to the data folder; "a|b" means either name
    what: str
    optional: bool = False


class Task:
    """A benchmark: how to read it, how to prompt for it, how to score it.

    Subclasses set the class attributes and implement `load` and `score`; the rest has defaults.
    ``judge`` names the judge protocol the task needs (None: scored by rules alone).
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    files: ClassVar[tuple[ExpectedFile, ...]] = ()
    judge: ClassVar[str | None] = None
    template: ClassVar[str | None] = "llava_v1"  # None: the model's own template
    max_new_tokens: ClassVar[int] = 128
    # The metric that stands for the task in tables and charts, and its unit.
    headline: ClassVar[str] = "accuracy"

    def load(self, data_dir: Path) -> list[Item]:
        raise NotImplementedError

    def score(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The task's metrics from its answered (and, if judged, judged) records."""
        raise NotImplementedError

    def table(self, metrics: dict[str, Any]) -> str:
        """A markdown table of the metrics, laid out as the paper lays them out."""
        rows = [(k, v) for k, v in metrics.items() if isinstance(v, int | float)]
        return "| metric | value |\n| --- | --- |\n" + "".join(f"| {k} | {_fmt(v)} |\n" for k, v in rows)

    def judge_prompts(self) -> list[JudgePrompt]:
        """Every prompt this task's judge uses (their hashes go into the results)."""
        return [VIDEO_QA] if self.judge == "video-qa" else []

    def judge_requests(self, record: dict[str, Any]) -> dict[str, tuple[JudgePrompt, dict[str, str]]]:
        """What to ask the judge about one answered record: {axis: (prompt, fields)}; "" for one verdict."""
        fields = {
            "question": record["question"],
            "answer": str(record["answer"]),
            "prediction": record["pred"],
        }
        return {"": (VIDEO_QA, fields)}

    def write_extra(self, records: Sequence[dict[str, Any]], out_dir: Path, model_id: str) -> list[Path]:
        """Files an official server or scorer wants (upload files); none by default."""
        return []

    def check_data(self, data_dir: Path) -> None:
        """Every file the task needs is there, else one error listing what is missing."""
        if not data_dir.is_dir():
            raise EvalDataError(f"{data_dir}: no such folder (--data-dir)")
        missing = [f.path for f in self.files if not f.optional and find_file(data_dir, f.path) is None]
        if missing:
            raise EvalDataError(
                f"{data_dir}: missing {', '.join(missing)} for task {self.name} "
                f"(see `videollava eval --list` for the layout)"
            )


def _fmt(value: float) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def find_file(data_dir: Path, spec: str) -> Path | None:
    """The first of the "a|b" alternatives that exists under data_dir."""
    for name in spec.split("|"):
        path = data_dir / name
        if path.exists():
            return path
    return None


def need_file(data_dir: Path, spec: str) -> Path:
    path = find_file(data_dir, spec)
    if path is None:
        raise EvalDataError(f"{data_dir}: missing {spec.replace('|', ' or ')}")
    return path


# ------------------------------------------------------------------------------------------ readers


def read_json(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise EvalDataError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise EvalDataError(f"{path}: not JSON ({error})") from None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every non-blank line of a JSONL file as a dict; a bad line is an error naming its number."""
    rows = []
    try:
        handle = path.open(encoding="utf-8")
    except FileNotFoundError:
        raise EvalDataError(f"{path}: no such file") from None
    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise EvalDataError(f"{path}:{number}: not JSON ({error})") from None
            if not isinstance(row, dict):
                raise EvalDataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def read_json_or_jsonl(path: Path) -> list[dict[str, Any]]:
    """A list of objects, whether the file is one JSON array or JSON lines (benchmarks ship both)."""
    text = path.read_text(encoding="utf-8").lstrip()
    if text.startswith("["):
        rows = read_json(path)
        if not all(isinstance(r, dict) for r in rows):
            raise EvalDataError(f"{path}: expected a list of JSON objects")
        return rows
    return read_jsonl(path)


def field_of(row: dict[str, Any], key: str, path: Path, where: str = "") -> Any:
    try:
        return row[key]
    except KeyError:
        raise EvalDataError(f"{path}{where}: entry without {key!r}: {json.dumps(row)[:200]}") from None


def unique_ids(items: Iterable[Item], source: Path) -> None:
    seen: set[str] = set()
    repeated = []
    for item in items:
        if item.id in seen:
            repeated.append(item.id)
        seen.add(item.id)
    if repeated:
        raise EvalDataError(f"{source}: question ids are not unique: {sorted(set(repeated))[:10]}")


# ------------------------------------------------------------------------------------------ media

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif")


def find_video(folder: Path, name: str, strip_prefix: str = "") -> Path | None:
    """`{name}{suffix}` in folder, for each video suffix; also without (or with) `strip_prefix`.

    A name that already carries its suffix is tried as it is first.
    """
    names = [name]
    if strip_prefix:
        names.append(name[len(strip_prefix) :] if name.startswith(strip_prefix) else strip_prefix + name)
    for candidate in names:
        direct = folder / candidate
        if direct.suffix.lower() in VIDEO_SUFFIXES and direct.is_file():
            return direct
        for suffix in VIDEO_SUFFIXES:
            path = folder / f"{candidate}{suffix}"
            if path.is_file():
                return path
    return None


def media_for(path: Path, kind: str) -> MediaItem:
    return MediaItem(kind, str(path))


# ------------------------------------------------------------------------------------------ shards

_SHARD = re.compile(r"^(\d+)/(\d+)$")


@dataclass(frozen=True)
class Shard:
    """Part `index` of `count` (0-based): the questions whose id hashes to index modulo count.

    Hashing the id, not its position, puts a question in the same shard whatever else is in the
    run (a --limit, a data file in another order).
    """

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        match = _SHARD.match(text.strip())
        if not match:
            raise VideoLlavaError(f"--shard must be I/N (e.g. 0/4), got {text!r}")
        index, count = int(match.group(1)), int(match.group(2))
        if count < 1 or not 0 <= index < count:
            raise VideoLlavaError(f"--shard {text}: need 0 <= I < N")
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def holds(self, item_id: str) -> bool:
        if self.count == 1:
            return True
        digest = hashlib.blake2b(item_id.encode("utf-8"), digest_size=8).digest()
        return int.from_bytes(digest, "big") % self.count == self.index

    def select(self, items: Sequence[Item]) -> list[Item]:
        return [item for item in items if self.holds(item.id)]
