"""Accuracy under visual-token compression on the ShapesWorld held-out set, and long videos.

1. Budgets: every held-out question (images and videos) at full / 1/2 / 1/4 / 1/8 / 1/16 of the
   tower's patches per frame (the paper's 256/128/64/32/16 are those fractions of 256; the
   shipped model has 36 patches, so 36/18/9/4/2 kept per frame, fractions rounded down, plus the
   rounded-up 5 and 3 for 1/8 and 1/16), zero-shot: the model was trained on all 36.
2. Long videos: the video questions at 8/16/32/64 frames (the temporal embedding resampled from
   the 4 rows it was trained with) x every budget above whose visual tokens fit the context.

Both with the patches ranked as FasterVLM ranks them (the CLS attention of the block that produces
the feature layer) and, `visual_token_layer: -1`, by the last block's CLS attention (long videos:
the rounded-down budgets only). Where the CLS looks is measured too: how many of the patches it
ranks first cover an object, block by block.

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
from _results import add_report_arguments, weights_sha256

from videollava.infer.pipeline import Pipeline, default_model_path
from videollava.shapesworld.evaluate import evaluate, load_questions

NAME = "visual-token-compression"
ROOT = Path(__file__).resolve().parent.parent
FRACTIONS = [(1, 1), (1, 2), (1, 4), (1, 8), (1, 16)]
LONG_FRAMES = [8, 16, 32, 64]
# How patches are ranked: (name, visual_token_layer, what it means).
RANKINGS = [
    ("feature", None, "the CLS attention of the block that produces the feature layer (FasterVLM)"),
    ("last", -1, "the CLS attention of the tower's last block (`visual_token_layer: -1`)"),
]
# The recipe's held-out stream (configs/shapesworld.yaml: data.generate), without its training media.
HELD_OUT = {"seed": 0, "test_images": 150, "test_videos": 150, "min_size": 96, "max_size": 160}
# The full-budget evaluation the sweep's first point is checked against, when it measured the same
# weights: the model the recorded sweeps were measured on (4 frames, every patch).
REFERENCE = ROOT / "reports" / "shapesworld-v1-model.json"


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
    pipeline: Pipeline,
    data: Path,
    frames: int,
    keep: int,
    rank_layer: int | None,
    batch_size: int,
    limit: int | None,
) -> dict[str, Any]:
    pipeline.visual_tokens = keep
    pipeline.model.config.visual_token_layer = rank_layer
    before = load()
    started = time.perf_counter()
    report = evaluate(pipeline, data, limit=limit, batch_size=batch_size, num_frames=frames)
    config = pipeline.model.config
    return {
        "frames": frames,
        "keep": keep,
        "visual_token_layer": rank_layer if keep < config.vision.num_patches else None,
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


def budget_table(ranking: dict[str, Any], budgets: list[dict[str, Any]], patches: int) -> list[str]:
    sweep = ranking["sweep"]
    full = next(r for r in sweep if r["keep"] == patches)
    lines = [
        "| budget | patches kept per frame | tokens per image | tokens per video | overall | images | videos "
        "| drop (points) | POPE F1 random / popular / adversarial | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run, budget in zip(sweep, budgets, strict=True):
        f1 = " / ".join(
            pct(run["pope"][s]["f1"]) for s in ("random", "popular", "adversarial") if s in run["pope"]
        )
        drop = 100 * (full["overall"]["accuracy"] - run["overall"]["accuracy"])
        lines.append(
            f"| {budget['label']} | {run['keep']} of {patches} | {run['image_tokens']} | {run['video_tokens']} "
            f"| {pct(run['overall']['accuracy'])}% | {pct(modality_accuracy(run, 'image'))}% "
            f"| {pct(modality_accuracy(run, 'video'))}% | {drop:.1f} | {f1} | {run['seconds']} |"
        )
    types = [("image", t) for t in ("color", "shape", "count", "exists")]
    types += [("video", t) for t in ("color", "shape", "count", "exists", "direction", "moving")]
    lines += [
        "",
        "Per question type (accuracy, %):",
        "",
        "| patches kept | " + " | ".join(f"{m} {t}" for m, t in types) + " |",
        "| --- |" + " --- |" * len(types),
    ]
    for run in sweep:
        lines.append(f"| {run['keep']} | " + " | ".join(accuracy_of(run, m, t) for m, t in types) + " |")
    lines += ["", "Targets (overall accuracy, zero-shot):", ""]
    for target in ranking["targets"]:
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
    return lines


def long_table(
    ranking: dict[str, Any], budgets: list[dict[str, Any]], frames: int, longest: int
) -> list[str]:
    by_cell = {(r["frames"], r["keep"]): r for r in ranking["long_videos"]}
    for run in ranking["sweep"]:
        by_cell[(frames, run["keep"])] = run
    measured = {keep for (_, keep) in by_cell}
    columns = [b for b in budgets if b["keep"] in measured]
    lines = [
        "| frames | " + " | ".join(f"K = {b['keep']} ({b['label']})" for b in columns) + " |",
        "| --- |" + " --- |" * len(columns),
    ]
    for n in sorted({frames, *LONG_FRAMES}):
        cells = []
        for b in columns:
            run = by_cell.get((n, b["keep"]))
            rows = n * (b["keep"] + 1)
            if run:
                cells.append(f"{pct(modality_accuracy(run, 'video'))} ({rows})")
            else:
                cells.append(f"does not fit ({rows})" if rows + longest >= ranking["context"] else "-")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    long_types = ("color", "shape", "count", "exists", "direction", "moving")
    lines += [
        "",
        "Per question type at each length (accuracy, %):",
        "",
        "| frames | K | visual tokens | " + " | ".join(long_types) + " | seconds |",
        "| --- | --- | --- |" + " --- |" * len(long_types) + " --- |",
    ]
    for run in sorted(ranking["long_videos"], key=lambda r: (r["frames"], -r["keep"])):
        lines.append(
            f"| {run['frames']} | {run['keep']} | {run['video_tokens']} | "
            + " | ".join(accuracy_of(run, "video", t) for t in long_types)
            + f" | {run['seconds']} |"
        )
    return lines


def markdown(results: dict[str, Any]) -> str:
    info, budgets = results["info"], results["budgets"]
    patches, frames = info["patches_per_frame"], info["default_frames"]
    lines = [
        "# Visual-token compression on ShapesWorld",
        "",
        "Per image or video frame, only the K patch tokens that the tower's CLS attends to most (mean",
        "over heads) reach the projector, in their original order; a video keeps every frame's CLS row",
        "(T x (K + 1) rows), an image K rows. Training-free: the shipped model",
        f"(`{info['model']}`) was trained on all {patches} patches and is measured zero-shot at smaller",
        "budgets. Greedy answers to every held-out question, scored by",
        "`videollava.shapesworld.evaluate` as in `reports/shapesworld-v1-model.md`.",
        "",
        f"- Model: {patches} patches per frame ({info['image_size']} px in {info['patch_size']} px patches), "
        f"{frames} frames per video by default (temporal embedding of {info['temporal_frames']} rows), "
        f"{info['tower_blocks']} tower blocks, feature layer {info['feature_layer']} (block "
        f"{info['feature_block']}'s output), context {info['context']} tokens; float32 on the CPU.",
        f"- Data: {info['data']} ({info['questions']} questions; {info['video_questions']} about videos).",
        f"- Same answers as the report of the same weights at full budget: {info['matches_reference']}.",
        f"- Regenerate: `{info['command']}` (evaluations saved as they finish; the last pass took "
        f"{info['total_seconds'] / 60:.0f} minutes, load average {info['load_start']} at its start and "
        f"{info['load_end']} at its end, on {info['cpus']} CPUs shared with other work, "
        f"{info['torch_threads']} torch thread; each evaluation's seconds are in the tables and its load "
        "in the JSON: they are this machine's, this day).",
        "",
        "The paper's 256 / 128 / 64 / 32 / 16 tokens per frame are full, 1/2, 1/4, 1/8 and 1/16 of 256",
        f"patches; here the same fractions of {patches}, rounded down (1/8 and 1/16 also rounded up).",
    ]
    for ranking in results["rankings"]:
        lines += [
            "",
            f"## Ranked by {ranking['description']}",
            "",
            f"### Accuracy by budget ({frames} frames per video)",
            "",
            *budget_table(ranking, budgets, patches),
            "",
            "### Long videos (video questions only)",
            "",
            f"Frames sampled per video x patches kept per frame; a budget is run when the longest video "
            f"question ({info['longest_video_prompt']} text tokens) plus its visual tokens fit the "
            f"{info['context']}-token context. Cells: accuracy % (visual tokens per video; - not "
            f"measured). The {frames}-frame row is the budget sweep above, its video questions.",
            "",
            *long_table(ranking, budgets, frames, info["longest_video_prompt"]),
        ]
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

    info = results["info"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"feature": "-", "last": "--"}
    names = {"feature": "feature block", "last": "last block"}
    for ranking in results["rankings"]:
        sweep = sorted(ranking["sweep"], key=lambda r: r["keep"])
        keeps = [r["keep"] for r in sweep]
        for label, pick, colour in (
            ("overall", lambda r: r["overall"]["accuracy"], "C0"),
            ("videos", lambda r: modality_accuracy(r, "video"), "C1"),
        ):
            left.plot(
                keeps,
                [100 * pick(r) for r in sweep],
                styles[ranking["name"]],
                marker="o",
                color=colour,
                label=f"{label}, ranked by the {names[ranking['name']]}",
            )
    keeps = sorted({r["keep"] for r in results["rankings"][0]["sweep"]})
    left.set_xscale("log", base=2)
    left.set_xticks(keeps, [str(k) for k in keeps])
    left.set_xlabel(f"patch tokens kept per frame (of {info['patches_per_frame']})")
    left.set_ylabel("accuracy (%)")
    left.set_title(f"ShapesWorld held-out, {info['default_frames']} frames per video")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    colours = {}
    for ranking in results["rankings"]:
        runs = ranking["long_videos"] + list(ranking["sweep"])
        for budget in results["budgets"]:
            if "rounded up" in budget["label"] or (
                ranking is not results["rankings"][0] and budget["fraction"] == 1
            ):
                continue  # the full budget ranks nothing: drawn once
            points = sorted(
                (r["frames"], modality_accuracy(r, "video")) for r in runs if r["keep"] == budget["keep"]
            )
            if len(points) < 2:
                continue
            colour = colours.setdefault(budget["keep"], f"C{len(colours)}")
            right.plot(
                [p[0] for p in points],
                [100 * p[1] for p in points],
                styles[ranking["name"]],
                marker="o",
                color=colour,
                label=f"K = {budget['keep']}, {names[ranking['name']]}",
            )
    frames = sorted({info["default_frames"], *LONG_FRAMES})
    right.set_xscale("log", base=2)
    right.set_xticks(frames, [str(f) for f in frames])
    right.set_xlabel("frames per video")
    right.set_ylabel("video-question accuracy (%)")
    right.set_title(f"Long videos (context {info['context']}; missing points do not fit)")
    right.grid(alpha=0.3)
    right.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def reference_check(path: Path, full: dict[str, Any], weights: str) -> str:
    """Whether the full-budget evaluation counts what a report of the same weights counted."""
    name = os.path.relpath(path, ROOT)
    if not path.is_file():
        return f"not checked: no {name}"
    reference = json.loads(path.read_text())
    if reference.get("info", {}).get("weights_sha256") != weights:
        return f"not checked: {name} measured other weights"
    if full["accuracy"] == reference.get("accuracy"):
        return (
            f"yes: at full budget {full['overall']['correct']} of {full['overall']['n']} correct, every "
            f"question type's count as in {name}"
        )
    return f"no: the full-budget counts differ from {name}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_report_arguments(parser, ROOT / "runs" / "shapesworld-data" / "seed-0")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on this shared 2-core machine two threads ran 100 questions 16x slower)",
    )
    parser.add_argument(
        "--reference",
        type=Path,
        default=REFERENCE,
        help="a report of the same weights' full-budget evaluation on the same questions (default %(default)s)",
    )
    parser.add_argument("--skip-long", action="store_true", help="only the budget sweeps")
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions (a trial run)")
    args = parser.parse_args()
    if args.record and args.limit is not None:
        parser.error("--record writes the whole evaluation; --limit is for trial runs")
    torch.set_num_threads(args.threads)
    out_dir = ROOT / "reports" if args.record else args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = ROOT / "runs" / "bench" / "visual-tokens"
    scratch.mkdir(parents=True, exist_ok=True)
    model = args.model or str(default_model_path())
    weights = weights_sha256(model)
    # One file per model: --resume never mixes two models' evaluations.
    limited = "" if args.limit is None else f"-limit-{args.limit}"
    partial = scratch / f"evaluations-{weights[:16]}{limited}.json"
    done: dict[str, Any] = json.loads(partial.read_text()) if args.resume and partial.is_file() else {}
    started, load_start = time.perf_counter(), load()

    ensure_data(args.data)
    pipeline = Pipeline.from_pretrained(model, dtype="float32")
    config = pipeline.model.config
    patches, frames = config.vision.num_patches, pipeline.num_frames
    blocks = config.vision.num_hidden_layers
    budgets = budgets_for(patches)
    videos = video_only(args.data, scratch)
    longest = text_tokens(pipeline, args.data)

    def evaluation(data: Path, n: int, keep: int, rank_layer: int | None) -> dict[str, Any]:
        # Without compression the ranking plays no part: one evaluation serves every ranking.
        ranked = rank_layer is not None and keep < patches
        key = f"{data.name}:{n}:{keep}" + (f":rank{rank_layer}" if ranked else "")
        if key not in done:
            how = f", ranked by block {rank_layer % (blocks + 1)}" if ranked else ""
            print(
                f"evaluating {data.name}: {n} frames, {keep} patches per frame{how} (load {load()})",
                flush=True,
            )
            done[key] = run_one(pipeline, data, n, keep, rank_layer, args.batch_size, args.limit)
            partial.write_text(json.dumps(done, indent=1) + "\n")
            print(
                f"  overall {pct(done[key]['overall']['accuracy'])}% in {done[key]['seconds']} s", flush=True
            )
        return done[key]

    rankings = []
    for name, rank_layer, description in RANKINGS:
        sweep = [evaluation(args.data, frames, b["keep"], rank_layer) for b in budgets]
        long_runs = []
        if not args.skip_long:
            for n in LONG_FRAMES:
                for b in budgets:
                    # The second ranking's long videos: the rounded-down budgets only, to save time.
                    if rank_layer is not None and "rounded up" in b["label"]:
                        continue
                    if longest + config.video_rows(n, b["keep"]) < pipeline.model.max_context:
                        long_runs.append(evaluation(videos, n, b["keep"], rank_layer))
        rankings.append(
            {
                "name": name,
                "visual_token_layer": rank_layer,
                "description": description,
                "context": pipeline.model.max_context,
                "sweep": sweep,
                "targets": check_targets(sweep, patches),
                "long_videos": long_runs,
            }
        )

    full = rankings[0]["sweep"][0]
    matches = reference_check(args.reference, full, weights)
    command = "python bench/visual_tokens.py --record" + (f" --model {args.model}" if args.model else "")
    results = {
        "info": {
            "model": os.path.relpath(model, ROOT) if os.path.isabs(model) else model,
            "weights_sha256": weights,
            "data": f"{os.path.relpath(args.data, ROOT)} (the recipe's held-out stream: {HELD_OUT})",
            "questions": full["overall"]["n"],
            "video_questions": sum(e["n"] for e in full["accuracy"].get("video", {}).values()),
            "patches_per_frame": patches,
            "image_size": config.vision.image_size,
            "patch_size": config.vision.patch_size,
            "default_frames": frames,
            "temporal_frames": config.temporal_frames,
            "tower_blocks": blocks,
            "context": pipeline.model.max_context,
            "longest_video_prompt": longest,
            "feature_layer": config.vision_feature_layer,
            "feature_block": config.vision_feature_layer % (blocks + 1),
            "matches_reference": matches,
            "command": command,
            "total_seconds": round(time.perf_counter() - started, 1),
            "load_start": load_start,
            "load_end": load(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "budgets": budgets,
        "rankings": rankings,
        "cls_attention_on_objects": cls_attention_on_objects(pipeline, args.data, max(1, patches // 4)),
    }
    (out_dir / f"{NAME}.json").write_text(json.dumps(results, indent=1) + "\n")
    (out_dir / f"{NAME}.md").write_text(markdown(results))
    plot(results, out_dir / f"{NAME}.png")
    print(f"wrote {out_dir / NAME}.{{json,md,png}}", flush=True)


if __name__ == "__main__":
    main()
