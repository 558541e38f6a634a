"""Accuracy under visual-token compression on the ShapesWorld held-out set, and long videos.

1. Budgets: every held-out question (images and videos) at full / 1/2 / 1/4 / 1/8 / 1/16 of the
   tower's patches per frame (the paper's 256/128/64/32/16 are those fractions of 256; the
   shipped model has 36 patches, so 36/18/9/4/2 kept per frame, fractions rounded down, plus the
   rounded-up 5 and 3 for 1/8 and 1/16), zero-shot: the model was trained on all 36.
2. Long videos: the video questions at 8/16/32/64 frames (the temporal embedding resampled from
   the 4 rows it was trained with) x every budget above whose visual tokens fit the context.

Writes `visual-token-compression.{json,md,png}` to `--out-dir` (default runs/bench/; `--record`:
reports/). Each evaluation is saved as it finishes, so a killed run goes on where it stopped
(`--resume`). Run: ``python bench/visual_tokens.py --record`` (the machine's load is recorded with
every evaluation; accuracy does not depend on it, the seconds do).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from videollava.infer.pipeline import Pipeline, default_model_path
from videollava.shapesworld.evaluate import evaluate, load_questions

NAME = "visual-token-compression"
ROOT = Path(__file__).resolve().parent.parent
FRACTIONS = [(1, 1), (1, 2), (1, 4), (1, 8), (1, 16)]
LONG_FRAMES = [8, 16, 32, 64]
# The recipe's held-out stream (configs/shapesworld.yaml: data.generate), without its training media.
HELD_OUT = {"seed": 0, "test_images": 150, "test_videos": 150, "min_size": 96, "max_size": 160}
REFERENCE = ROOT / "reports" / "shapesworld-default-model.json"


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def budgets_for(patches: int) -> list[dict[str, Any]]:
    """Each fraction's patches per frame, rounded down (at least 1); 1/8 and 1/16 also rounded up."""
    out: list[dict[str, Any]] = []
    for num, den in FRACTIONS:
        exact = patches * num / den
        label = "full" if den == 1 else f"1/{den}"
        out.append({"label": label, "fraction": num / den, "keep": max(1, int(exact))})
        if den >= 8 and exact != int(exact):
            out.append({"label": f"1/{den} (rounded up)", "fraction": num / den, "keep": int(exact) + 1})
    return out


def ensure_data(data: Path) -> None:
    if (data / "test_questions.jsonl").is_file():
        return
    from videollava.shapesworld.generate import GenerationConfig, generate

    print(f"generating the held-out set in {data}", flush=True)
    generate(data, GenerationConfig(images=0, videos=0, workers=1, **HELD_OUT))


def video_only(data: Path, scratch: Path) -> Path:
    """A copy of the set holding only the video questions and the videos."""
    out = scratch / "video-questions"
    if (out / "test_questions.jsonl").is_file():
        return out
    (out / "media").mkdir(parents=True, exist_ok=True)
    shutil.copytree(data / "media" / "videos", out / "media" / "videos", dirs_exist_ok=True)
    lines = [
        line
        for line in (data / "test_questions.jsonl").read_text().splitlines()
        if line.strip() and json.loads(line)["modality"] == "video"
    ]
    (out / "test_questions.jsonl").write_text("\n".join(lines) + "\n")
    return out


def text_tokens(pipeline: Pipeline, data: Path) -> int:
    """The longest video question's text tokens (template included), for the context check."""
    longest = 0
    for q in load_questions(data):
        if q.modality == "video":
            prompt = pipeline.build_prompt(q.question, 0, 1)
            longest = max(longest, len(pipeline.tokenizer(prompt).input_ids))
    return longest


def run_one(
    pipeline: Pipeline, data: Path, frames: int, keep: int, batch_size: int, limit: int | None
) -> dict[str, Any]:
    pipeline.visual_tokens = keep
    before = load()
    started = time.perf_counter()
    report = evaluate(pipeline, data, limit=limit, batch_size=batch_size, num_frames=frames)
    config = pipeline.model.config
    return {
        "frames": frames,
        "keep": keep,
        "image_tokens": config.image_rows(keep),
        "video_tokens": config.video_rows(frames, keep),
        "overall": report.overall,
        "accuracy": report.accuracy,
        "pope": report.pope,
        "errors": report.errors,
        "error_examples": sorted({r.error for r in report.results if r.error})[:3],
        "seconds": round(time.perf_counter() - started, 1),
        "load_before": before,
        "load_after": load(),
    }


def object_patches(regions: list[dict[str, Any]], width: int, height: int, grid: int) -> torch.Tensor:
    """(grid*grid,) bool: the patches a region's box overlaps, for media squashed to the square."""
    mask = torch.zeros(grid, grid, dtype=torch.bool)
    for region in regions:
        x0, y0, x1, y1 = region["box"]
        c0, c1 = int(x0 / width * grid), min(grid - 1, int(x1 / width * grid - 1e-9))
        r0, r1 = int(y0 / height * grid), min(grid - 1, int(y1 / height * grid - 1e-9))
        mask[r0 : r1 + 1, c0 : c1 + 1] = True
    return mask.flatten()


def cls_attention_on_objects(pipeline: Pipeline, data: Path, keep: int) -> dict[str, Any] | None:
    """How often the K patches the image tower's CLS attends to most cover an object, at each block,
    against the share of all patches that do (what K patches drawn at random would give)."""
    from videollava.data.images import load_image
    from videollava.data.transforms import preprocess_images

    if pipeline.transform.image_aspect_ratio != "squash":
        return None  # boxes map to patches simply only when the picture is squashed to the square
    tower = pipeline.model.image_tower
    grid = tower.config.image_size // tower.config.patch_size
    layers = tower.config.num_hidden_layers
    entries = [e for e in json.loads((data / "test_captions.json").read_text()) if "image" in e]
    hits = torch.zeros(layers)
    share = 0.0
    for entry in entries:
        image = load_image(data / "media" / entry["image"])
        mask = object_patches(entry["regions"], image.width, image.height, grid)
        share += mask.float().mean().item()
        pixels = preprocess_images([image], pipeline.transform)
        with torch.no_grad():
            for block in range(1, layers + 1):
                _, weights = tower.hidden_state_and_cls_attention(pixels, block)
                top = weights[0, 1:].argsort(descending=True, stable=True)[:keep]
                hits[block - 1] += mask[top].float().mean()
    return {
        "images": len(entries),
        "keep": keep,
        "feature_block": pipeline.model.config.vision_feature_layer % (layers + 1),
        "top_k_on_objects_by_block": [round(float(h) / len(entries), 4) for h in hits],
        "all_patches_on_objects": round(share / len(entries), 4),
    }


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def accuracy_of(run: dict[str, Any], modality: str, qtype: str) -> str:
    entry = run["accuracy"].get(modality, {}).get(qtype)
    return pct(entry["accuracy"]) if entry else "-"


def modality_accuracy(run: dict[str, Any], modality: str) -> float:
    entries = run["accuracy"].get(modality, {}).values()
    n = sum(e["n"] for e in entries)
    return sum(e["correct"] for e in entries) / n if n else 0.0


def check_targets(sweep: list[dict[str, Any]], patches: int) -> list[dict[str, Any]]:
    """4x fewer visual tokens within 2 points of full accuracy, 8x within 5 (overall, zero-shot)."""
    full = next(r for r in sweep if r["keep"] == patches)
    out = []
    for ratio, allowed in ((4, 0.02), (8, 0.05)):
        keep = patches // ratio  # at least `ratio` times fewer patch tokens per frame
        run = next((r for r in sweep if r["keep"] == keep), None)
        if run is None:
            continue
        drop = full["overall"]["accuracy"] - run["overall"]["accuracy"]
        out.append(
            {
                "fewer": ratio,
                "keep": keep,
                "image_ratio": round(patches / keep, 2),
                "video_ratio": round((patches + 1) / (keep + 1), 2),
                "drop_points": round(100 * drop, 2),
                "allowed_points": 100 * allowed,
                "met": drop <= allowed + 1e-12,
            }
        )
    return out


def markdown(results: dict[str, Any]) -> str:
    info, sweep, long_runs = results["info"], results["sweep"], results["long_videos"]
    patches, frames = info["patches_per_frame"], info["default_frames"]
    full = next(r for r in sweep if r["keep"] == patches)
    types = [("image", t) for t in ("color", "shape", "count", "exists")]
    types += [("video", t) for t in ("color", "shape", "count", "exists", "direction", "moving")]
    lines = [
        "# Visual-token compression on ShapesWorld",
        "",
        "Per image or video frame, only the K patch tokens that the tower's CLS attends to most (at the",
        "block that produces the feature layer, mean over heads) reach the projector, in their original",
        "order; a video keeps every frame's CLS row (T x (K + 1) rows), an image K rows. Training-free:",
        f"the shipped model (`{info['model']}`) was trained on all {patches} patches and is measured",
        "zero-shot at smaller budgets. Greedy answers to every held-out question, scored by",
        "`videollava.shapesworld.evaluate` as in `reports/shapesworld-default-model.md`.",
        "",
        f"- Model: {patches} patches per frame ({info['image_size']} px in {info['patch_size']} px patches), "
        f"{frames} frames per video by default (temporal embedding of {info['temporal_frames']} rows), "
        f"context {info['context']} tokens; float32 on the CPU.",
        f"- Data: {info['data']} ({info['questions']} questions; {info['video_questions']} about videos).",
        f"- Same questions as the default model's report: {info['matches_reference']}.",
        f"- Regenerate: `{info['command']}` ({info['total_seconds'] / 60:.0f} minutes in this run; load "
        f"average {info['load_start']} at the start, {info['load_end']} at the end, on "
        f"{info['cpus']} CPUs shared with other work: the seconds below are for this machine, this day).",
        "",
        "## Accuracy by budget (4 frames per video)",
        "",
        "The paper's 256 / 128 / 64 / 32 / 16 tokens per frame are full, 1/2, 1/4, 1/8 and 1/16 of 256",
        f"patches; here the same fractions of {patches}, rounded down (1/8 and 1/16 also rounded up).",
        "",
        "| budget | patches kept per frame | tokens per image | tokens per video | overall | images | videos "
        "| drop (points) | POPE F1 random / popular / adversarial | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run, budget in zip(sweep, results["budgets"], strict=True):
        f1 = " / ".join(
            pct(run["pope"][s]["f1"]) for s in ("random", "popular", "adversarial") if s in run["pope"]
        )
        drop = 100 * (full["overall"]["accuracy"] - run["overall"]["accuracy"])
        lines.append(
            f"| {budget['label']} | {run['keep']} of {patches} | {run['image_tokens']} | {run['video_tokens']} "
            f"| {pct(run['overall']['accuracy'])}% | {pct(modality_accuracy(run, 'image'))}% "
            f"| {pct(modality_accuracy(run, 'video'))}% | {drop:.1f} | {f1} | {run['seconds']} |"
        )
    lines += [
        "",
        "Per question type (accuracy, %):",
        "",
        "| patches kept | " + " | ".join(f"{m} {t}" for m, t in types) + " |",
        "| --- |" + " --- |" * len(types),
    ]
    for run in sweep:
        lines.append(f"| {run['keep']} | " + " | ".join(accuracy_of(run, m, t) for m, t in types) + " |")
    lines += ["", "## Targets (overall accuracy, zero-shot)", ""]
    for target in results["targets"]:
        verdict = (
            "met"
            if target["met"]
            else f"MISSED by {target['drop_points'] - target['allowed_points']:.1f} points"
        )
        lines.append(
            f"- {target['fewer']}x fewer patch tokens per frame (K = {target['keep']}: {target['image_ratio']}x "
            f"fewer rows per image, {target['video_ratio']}x per video, CLS rows included): "
            f"{target['drop_points']:.1f} points below full, allowed {target['allowed_points']:.0f}: {verdict}."
        )
    lines += [
        "",
        "## Long videos (video questions only)",
        "",
        f"Frames sampled per video x patches kept per frame; a budget is run when the longest video "
        f"question ({info['longest_video_prompt']} text tokens) plus its visual tokens fit the "
        f"{info['context']}-token context. Cells: accuracy % (visual tokens per video). "
        f"The {frames}-frame row is the sweep above, restricted to videos.",
        "",
        "| frames | " + " | ".join(f"K = {b['keep']} ({b['label']})" for b in results["budgets"]) + " |",
        "| --- |" + " --- |" * len(results["budgets"]),
    ]
    by_cell = {(r["frames"], r["keep"]): r for r in long_runs}
    for run in sweep:
        by_cell[(frames, run["keep"])] = run
    for n in sorted({frames, *LONG_FRAMES}):
        cells = []
        for b in results["budgets"]:
            run = by_cell.get((n, b["keep"]))
            rows = n * (b["keep"] + 1)
            cells.append(
                f"{pct(modality_accuracy(run, 'video'))} ({rows})" if run else f"does not fit ({rows})"
            )
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    long_types = ("color", "shape", "count", "exists", "direction", "moving")
    lines += [
        "",
        "Per question type at each length (accuracy, %):",
        "",
        "| frames | K | visual tokens | " + " | ".join(long_types) + " | seconds |",
        "| --- | --- | --- |" + " --- |" * len(long_types) + " --- |",
    ]
    for run in sorted(long_runs, key=lambda r: (r["frames"], -r["keep"])):
        lines.append(
            f"| {run['frames']} | {run['keep']} | {run['video_tokens']} | "
            + " | ".join(accuracy_of(run, "video", t) for t in long_types)
            + f" | {run['seconds']} |"
        )
    probe = results.get("cls_attention_on_objects")
    if probe:
        blocks = probe["top_k_on_objects_by_block"]
        lines += [
            "",
            "## Where the CLS looks",
            "",
            f"On the {probe['images']} held-out images, the share of the {probe['keep']} patches the image "
            "tower's CLS attends to most that overlap an object's box, by the block whose attention ranks "
            f"them (the feature layer's is block {probe['feature_block']}), against the share of all patches "
            "that overlap one (what the same number of patches drawn at random would cover):",
            "",
            "| | " + " | ".join(f"block {b}" for b in range(1, len(blocks) + 1)) + " | all patches |",
            "| --- |" + " --- |" * (len(blocks) + 1),
            "| on an object (%) | "
            + " | ".join(pct(b) for b in blocks)
            + f" | {pct(probe['all_patches_on_objects'])} |",
        ]
    lines += ["", "![accuracy against visual tokens](visual-token-compression.png)", ""]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    info, sweep = results["info"], results["sweep"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    keeps = [r["keep"] for r in sweep]
    for label, values in (
        ("overall", [r["overall"]["accuracy"] for r in sweep]),
        ("images", [modality_accuracy(r, "image") for r in sweep]),
        ("videos", [modality_accuracy(r, "video") for r in sweep]),
    ):
        left.plot(keeps, [100 * v for v in values], marker="o", label=label)
    left.set_xscale("log", base=2)
    left.set_xticks(keeps, [str(k) for k in keeps])
    left.invert_xaxis()
    left.set_xlabel(f"patch tokens kept per frame (of {info['patches_per_frame']})")
    left.set_ylabel("accuracy (%)")
    left.set_title(f"ShapesWorld held-out, {info['default_frames']} frames per video")
    left.grid(alpha=0.3)
    left.legend()
    runs = results["long_videos"] + [{**r, "frames": info["default_frames"]} for r in sweep]
    for budget in results["budgets"]:
        points = sorted(
            (r["frames"], modality_accuracy(r, "video")) for r in runs if r["keep"] == budget["keep"]
        )
        if points:
            right.plot(
                [p[0] for p in points],
                [100 * p[1] for p in points],
                marker="o",
                label=f"K = {budget['keep']}",
            )
    right.set_xscale("log", base=2)
    frames = sorted({r["frames"] for r in runs})
    right.set_xticks(frames, [str(f) for f in frames])
    right.set_xlabel("frames per video")
    right.set_ylabel("video-question accuracy (%)")
    right.set_title(f"Long videos (context {info['context']})")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: the shipped ShapesWorld model)")
    parser.add_argument("--data", type=Path, default=ROOT / "runs" / "shapesworld-data" / "seed-0")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "bench")
    where.add_argument("--record", action="store_true", help="write to reports/")
    parser.add_argument("--resume", action="store_true", help="keep the evaluations a earlier run saved")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on this shared 2-core machine two threads ran 100 questions 16x slower)",
    )
    parser.add_argument("--skip-long", action="store_true", help="only the budget sweep")
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions (a trial run)")
    args = parser.parse_args()
    if args.record and args.limit is not None:
        parser.error("--record writes the whole evaluation; --limit is for trial runs")
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = ROOT / "reports" if args.record else args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = ROOT / "runs" / "bench" / "visual-tokens"
    scratch.mkdir(parents=True, exist_ok=True)
    partial = scratch / ("evaluations.json" if args.limit is None else f"evaluations-limit-{args.limit}.json")
    done: dict[str, Any] = json.loads(partial.read_text()) if args.resume and partial.is_file() else {}
    started, load_start = time.perf_counter(), load()

    ensure_data(args.data)
    model = args.model or str(default_model_path())
    pipeline = Pipeline.from_pretrained(model, dtype="float32")
    config = pipeline.model.config
    patches, frames = config.vision.num_patches, pipeline.num_frames
    budgets = budgets_for(patches)
    videos = video_only(args.data, scratch)
    longest = text_tokens(pipeline, args.data)

    def evaluation(data: Path, n: int, keep: int) -> dict[str, Any]:
        key = f"{data.name}:{n}:{keep}"
        if key not in done:
            print(f"evaluating {data.name}: {n} frames, {keep} patches per frame (load {load()})", flush=True)
            done[key] = run_one(pipeline, data, n, keep, args.batch_size, args.limit)
            partial.write_text(json.dumps(done, indent=1) + "\n")
            print(
                f"  overall {pct(done[key]['overall']['accuracy'])}% in {done[key]['seconds']} s", flush=True
            )
        return done[key]

    sweep = [evaluation(args.data, frames, b["keep"]) for b in budgets]
    long_runs = []
    if not args.skip_long:
        for n in LONG_FRAMES:
            for b in budgets:
                if longest + config.video_rows(n, b["keep"]) < pipeline.model.max_context:
                    long_runs.append(evaluation(videos, n, b["keep"]))

    reference = json.loads(REFERENCE.read_text()) if REFERENCE.is_file() else None
    full = sweep[0]
    if reference is not None and full["accuracy"] == reference["accuracy"]:
        matches = (
            f"yes: at full budget {full['overall']['correct']} of {full['overall']['n']} correct, every "
            "question type's count as in reports/shapesworld-default-model.json"
        )
    else:
        matches = "no: the full-budget counts differ from reports/shapesworld-default-model.json"
    command = "python bench/visual_tokens.py --record" + (f" --model {args.model}" if args.model else "")
    results = {
        "info": {
            "model": os.path.relpath(model, ROOT) if os.path.isabs(model) else model,
            "data": f"{os.path.relpath(args.data, ROOT)} (the recipe's held-out stream: {HELD_OUT})",
            "questions": full["overall"]["n"],
            "video_questions": sum(e["n"] for e in full["accuracy"].get("video", {}).values()),
            "patches_per_frame": patches,
            "image_size": config.vision.image_size,
            "patch_size": config.vision.patch_size,
            "default_frames": frames,
            "temporal_frames": config.temporal_frames,
            "context": pipeline.model.max_context,
            "longest_video_prompt": longest,
            "feature_layer": config.vision_feature_layer,
            "matches_reference": matches,
            "command": command,
            "total_seconds": round(time.perf_counter() - started, 1),
            "load_start": load_start,
            "load_end": load(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "budgets": budgets,
        "sweep": sweep,
        "targets": check_targets(sweep, patches),
        "long_videos": long_runs,
        "cls_attention_on_objects": cls_attention_on_objects(pipeline, args.data, max(1, patches // 4)),
    }
    (out_dir / f"{NAME}.json").write_text(json.dumps(results, indent=1) + "\n")
    (out_dir / f"{NAME}.md").write_text(markdown(results))
    plot(results, out_dir / f"{NAME}.png")
    print(f"wrote {out_dir / NAME}.{{json,md,png}}", flush=True)


if __name__ == "__main__":
    main()
