"""Where a benchmark writes its results: `runs/bench/<name>.json` (ignored by git) by default.

`bench/results/` holds the results the README quotes; a benchmark writes there only when asked
with `--record`, so trying a benchmark never changes a tracked file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

from videollava.experiments.ablations import file_sha256
from videollava.model.checkpoint import resolve

ROOT = Path(__file__).resolve().parent.parent
RECORDED = ROOT / "bench" / "results"
SCRATCH = ROOT / "runs" / "bench"


def add_output_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """`--output FILE` and `--record`, for a benchmark whose results are `<name>.json`."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--output",
        type=Path,
        default=None,
        help=f"results JSON (default: {SCRATCH.relative_to(ROOT)}/{name}.json)",
    )
    where.add_argument(
        "--record",
        action="store_true",
        help=f"write {RECORDED.relative_to(ROOT)}/{name}.json, the committed results the README quotes",
    )


def results_path(args: argparse.Namespace, name: str) -> Path:
    if args.record:
        return RECORDED / f"{name}.json"
    return args.output if args.output is not None else SCRATCH / f"{name}.json"


def write_results(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}", flush=True)


def add_report_arguments(parser: argparse.ArgumentParser, data: Path) -> None:
    """The options of a benchmark that evaluates a ShapesWorld model into reports/: the model, the
    data folder, where the report goes, resuming, and the batch size."""
    parser.add_argument("--model", default=None, help="checkpoint (default: the shipped ShapesWorld model)")
    parser.add_argument("--data", type=Path, default=data)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out-dir", type=Path, default=SCRATCH)
    where.add_argument("--record", action="store_true", help="write to reports/")
    parser.add_argument("--resume", action="store_true", help="keep the evaluations an earlier run saved")
    parser.add_argument("--batch-size", type=int, default=16)


def weights_sha256(model: str | Path) -> str:
    """The digest of a model folder's weights: which model a report measured, whatever its path.

    One file: its SHA-256 (as `sha256sum` prints it); shards: the SHA-256 of their names and digests.
    """
    files = sorted(resolve(model).glob("*.safetensors"))
    if not files:
        raise SystemExit(f"{model}: no .safetensors weights, so no digest to record")
    if len(files) == 1:
        return file_sha256(files[0])
    return hashlib.sha256("".join(f"{f.name} {file_sha256(f)}\n" for f in files).encode()).hexdigest()
