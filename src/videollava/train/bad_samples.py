"""The record of bad samples a training run met: a JSON-lines file, a line on stderr, and the policy
that either trains on without them or stops at the first."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from videollava.data.datasets import BadSample, Skipped


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
