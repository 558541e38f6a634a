"""Time the data stage of ShapesWorld recipes: each recipe's `data.generate`, written from nothing
into a scratch folder, one after the other in this process (so their ratio holds under one load).

Records, per recipe: the seconds to sample the scenes and write the JSON files, the seconds in
all, the media written (images, videos, frames), the size on disk; and the load average before
and after. Writes ``runs/bench/shapesworld_generate.json`` (``--output`` elsewhere, ``--record``
to ``bench/results/``). Run: ``python bench/shapesworld_generate.py configs/shapesworld.yaml
configs/shapesworld-v2.yaml``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import yaml
from _results import add_output_arguments, results_path, write_results

from videollava.shapesworld.generate import GenerationConfig, generate

NAME = "shapesworld_generate"


def measure(recipe: Path, workers: int | None) -> dict:
    settings = yaml.safe_load(recipe.read_text())["data"]["generate"]
    if workers is not None:
        settings["workers"] = workers
    folder = Path(tempfile.mkdtemp(prefix="sw-bench-"))
    try:
        load_before = os.getloadavg()
        summary = generate(folder, GenerationConfig(**settings))
        load_after = os.getloadavg()
        frames, videos, images = 0, 0, 0
        for scenes in folder.rglob("scenes.jsonl"):
            for line in scenes.read_text().splitlines():
                row = json.loads(line)
                if row["kind"] == "video":
                    videos += 1
                    frames += row["n_frames"]
                else:
                    images += 1
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {
        "recipe": str(recipe),
        "settings": settings,
        "seconds": summary["seconds"],
        "text_seconds": summary["text_seconds"],
        "media_written": summary["media_written"],
        "images": images,
        "videos": videos,
        "video_frames": frames,
        "megabytes": round(size / 1e6, 1),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in load_after],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipes", nargs="+", type=Path, help="recipes whose data.generate to time")
    parser.add_argument("--workers", type=int, default=None, help="override data.generate.workers")
    add_output_arguments(parser, NAME)
    args = parser.parse_args()
    runs = [measure(recipe, args.workers) for recipe in args.recipes]
    for run in runs:
        print(
            f"{run['recipe']}: {run['seconds']:.1f} s ({run['text_seconds']:.1f} s scenes and text), "
            f"{run['images']} images, {run['videos']} videos ({run['video_frames']} frames), "
            f"{run['megabytes']} MB, load {run['load_before'][0]} -> {run['load_after'][0]}"
        )
    results = {"cpus": os.cpu_count(), "runs": runs}
    if len(runs) > 1:
        results["seconds_ratio_to_first"] = [round(r["seconds"] / runs[0]["seconds"], 2) for r in runs]
    write_results(results_path(args, NAME), results)


if __name__ == "__main__":
    main()
