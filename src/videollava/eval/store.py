"""The per-item output of a run: JSON lines appended, flushed and synced one by one.

A run killed at any moment loses nothing it wrote: each answered item is on disk before the next
is written, and the one line a kill can tear (the last) is dropped when the file is read back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from videollava.errors import VideoLlavaError

PREDICTIONS = "predictions.jsonl"
RUN = "run.json"
RESULTS = "results.json"
RESULTS_MD = "results.md"


class OutputError(VideoLlavaError):
    """An output folder that cannot be written to, resumed or merged as asked."""


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every complete line of a predictions file; a torn last line is cut off the file.

    A bad line anywhere but at the end is an error: the file was not written by this harness.
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    records = []
    good_bytes = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            good_bytes += len(line) + 1
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if number == len(lines) or all(not rest.strip() for rest in lines[number:]):
                # A torn last line: the run was killed while writing it. Cut it off.
                with path.open("r+b") as handle:
                    handle.truncate(good_bytes)
                break
            raise OutputError(
                f"{path}:{number}: not a JSON line; this file was not written by `videollava eval`"
            ) from None
        if not isinstance(record, dict) or "id" not in record:
            raise OutputError(f"{path}:{number}: a record without an id")
        records.append(record)
        good_bytes += len(line) + 1
    else:
        if data and not data.endswith(b"\n"):
            # The last line parsed but its newline was not written: complete it.
            with path.open("ab") as handle:
                handle.write(b"\n")
    return records


class RecordWriter:
    """Appends one JSON line per record, flushed and synced before `write` returns."""

    def __init__(self, path: Path):
        self.path = path
        self._handle = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_atomic(path: Path, text: str) -> None:
    """Write a whole file so that a reader sees the old one or the new one, never half of either."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_records(path: Path, records: Iterable[dict[str, Any]]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def read_json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OutputError(f"{path}: no such file") from None
    except json.JSONDecodeError as error:
        raise OutputError(f"{path}: not JSON ({error})") from None
