"""Questions per second of `videollava eval shapesworld` with the bundled model, batch 1 against batch 8.

A held-out ShapesWorld set (images and videos) is generated once; then the command runs at each
batch size in turn, twice, in the order 1, 8, 8, 1 so that a change of load during the run weighs
on both alike. Throughput is the run's own time (answering and writing its outputs, the model
already loaded) over the questions answered; the ratio of the two is the figure to quote, with
the load average the machine ran under. Results go to runs/bench/eval_throughput.json
(`--output` elsewhere, `--record` to bench/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from _results import add_output_arguments, results_path, write_results

from videollava.cli import main
from videollava.shapesworld.generate import GenerationConfig, generate

NAME = "eval_throughput"


def run_once(data: Path, out: Path, batch_size: int, limit: int, dtype: str) -> dict:
    args = ["eval", "shapesworld", "--data-dir", str(data), "--output", str(out), "--dtype", dtype]
    args += ["--device", "cpu", "--batch-size", str(batch_size), "--limit", str(limit)]
    status = main(args)
    if status not in (0, 1):  # 1: a target missed, still a finished run
        raise SystemExit(f"videollava eval failed with status {status}")
    results = json.loads((out / "results.json").read_text())
    predictions = [json.loads(line)["pred"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    return {
        "batch_size": batch_size,
        "questions": results["count"],
        "seconds": results["seconds"],
        "questions_per_second": results["count"] / results["seconds"],
        "accuracy": results["metrics"]["overall_accuracy"],
        "predictions": predictions,
    }


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=240, help="questions per run (default 240)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    add_output_arguments(parser, NAME)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        generate(
            data, GenerationConfig(seed=11, images=0, videos=0, test_images=12, test_videos=12, workers=1)
        )
        load_before = os.getloadavg()
        started = time.time()
        runs = []
        for n, batch in enumerate((1, 8, 8, 1)):
            runs.append(run_once(data, Path(tmp) / f"run{n}", batch, args.limit, args.dtype))
        load_after = os.getloadavg()
    by_batch = {b: [r for r in runs if r["batch_size"] == b] for b in (1, 8)}
    qps = {b: sum(r["questions"] for r in rs) / sum(r["seconds"] for r in rs) for b, rs in by_batch.items()}
    same = all(r["predictions"] == runs[0]["predictions"] for r in runs)
    results = {
        "benchmark": NAME,
        "what": "questions per second of `videollava eval shapesworld`, bundled model, batch 1 vs 8",
        "questions_per_run": runs[0]["questions"],
        "questions_per_second": {"batch_1": qps[1], "batch_8": qps[8]},
        "speedup_batch_8_over_1": qps[8] / qps[1],
        "same_answers_at_every_batch_size": same,
        "accuracy_percent": runs[0]["accuracy"],
        "runs": [{k: v for k, v in r.items() if k != "predictions"} for r in runs],
        "order": "batch 1, 8, 8, 1",
        "dtype": args.dtype,
        "threads": args.threads,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "wall_seconds": round(time.time() - started, 1),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
    }
    write_results(results_path(args, NAME), results)
    print(
        json.dumps(
            {k: results[k] for k in ("questions_per_second", "speedup_batch_8_over_1", "load_average_before")}
        )
    )


if __name__ == "__main__":
    main_bench()
