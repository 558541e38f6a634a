"""Image-tower alignment steps per second: the text encoder trained against frozen.

The ShapesWorld recipe keeps its text encoder fixed (``text_encoder_lr: 0``). Frozen, it needs no
backward pass and no optimizer state. The baseline gives it a rate of 1e-12, which costs what
training it costs while changing nothing. Both run the recipe's own tokenizer and align_image stage
(its tower, text encoder, region loss and batch of 128) through ``videollava train`` on freshly
generated ShapesWorld data, and are timed from the run's metrics after the first steps.

Writes ``bench/results/align_step.json`` and prints it. Run: ``python bench/align_step.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import yaml

from videollava.data.shapesworld import generate
from videollava.train.loop import read_metrics
from videollava.train.runner import run

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "align_step.json"


def recipe_for(data: Path, steps: int, text_encoder_lr: float) -> dict:
    """The shipped recipe cut to its tokenizer and align_image stage, on `data`."""
    recipe = yaml.safe_load((ROOT / "configs" / "shapesworld.yaml").read_text())
    recipe["data"] = {"root": str(data)}
    recipe["run"].update(progress=False, export={"enabled": False}, keep_checkpoints=1)
    tokenizer, align = recipe["stages"][:2]
    align.update(
        max_steps=steps, text_encoder_lr=text_encoder_lr, eval=None, checkpoint_every=steps, log_every=1
    )
    recipe["stages"] = [tokenizer, align]
    return recipe


def steps_per_second(folder: Path, data: Path, steps: int, warmup: int, text_encoder_lr: float) -> float:
    folder.mkdir()
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_for(data, steps, text_encoder_lr), sort_keys=False))
    run(argparse.Namespace(recipe=path, output=folder / "run", resume=False, overrides=[]))
    rows = [r for r in read_metrics(folder / "run" / "metrics.jsonl") if r.get("event") == "step"]
    # samples_per_s is per step; the median after warm-up (the first epoch also decodes the media)
    return statistics.median(r["samples_per_s"] for r in rows[warmup:]) / rows[-1]["samples"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--images", type=int, default=1024)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        generate(data, seed=0, n_images=args.images, n_videos=8, n_test_images=8, n_test_videos=8)
        trained = steps_per_second(Path(tmp) / "trained", data, args.steps, args.warmup, 1e-12)
        frozen = steps_per_second(Path(tmp) / "frozen", data, args.steps, args.warmup, 0.0)
    results = {
        "what": "align_image steps/s at the ShapesWorld recipe's sizes, text encoder trained vs frozen",
        "steps": args.steps,
        "timed_after": args.warmup,
        "text_encoder_trained_steps_per_s": round(trained, 3),
        "text_encoder_frozen_steps_per_s": round(frozen, 3),
        "speedup": round(frozen / trained, 3),
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
