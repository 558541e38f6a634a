"""The ShapesWorld model on every held-out split: the standard one, the wider world, ordered events.

From a data folder of `configs/shapesworld-v2.yaml` (its `data/`, or `videollava shapesworld
generate` with the same held-out settings):

1. the standard split (`test_questions.jsonl`, the questions every earlier model was scored on)
   and the variety split (`variety/`), at the model's own frames and visual-token budget;
2. the ordered-event split (`events/`) at 8 / 16 / 32 frames x every patch / the model's budget /
   half of it, wherever the visual tokens and the longest question fit the context.

Greedy answers, scored by `videollava.shapesworld.evaluate` against its targets. Writes
`shapesworld-default-model.json` to `--out-dir` (default runs/bench/; `--record`: reports/) and
the measured tables into the report beside it, between its `<!-- measured -->` markers, so the
prose around them stays. Each evaluation is saved as it finishes (`--resume` goes on from there).
Run: ``python bench/shapesworld_model.py --data runs/shapesworld-v2/data --record``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from _results import add_report_arguments, weights_sha256

from videollava.infer.pipeline import Pipeline, default_model_path
from videollava.shapesworld.evaluate import (
    ACCURACY_TARGETS,
    POPE_F1_TARGET,
    check_targets,
    evaluate,
    load_questions,
)
from videollava.shapesworld.text import EVENT_QUESTION_TEMPLATES, QUESTION_TYPES

NAME = "shapesworld-default-model"
ROOT = Path(__file__).resolve().parent.parent
EVENT_FRAMES = [8, 16, 32]
SPLITS = {"standard": ".", "variety": "variety", "events": "events"}
BEGIN, END = "<!-- measured -->", "<!-- /measured -->"


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def settings(pipeline: Pipeline, data: Path) -> list[dict[str, Any]]:
    """Every (split, frames, budget) to evaluate; None budget = every patch."""
    config = pipeline.model.config
    own = {"frames": pipeline.num_frames, "keep": own_budget(pipeline)}
    runs = [{"split": name, **own} for name in ("standard", "variety")]
    patches = config.vision.num_patches
    own_keep = own["keep"] or patches
    budgets = sorted({patches, own_keep, max(1, own_keep // 2)}, reverse=True)
    longest = longest_video_prompt(pipeline, data / SPLITS["events"])
    for frames in EVENT_FRAMES:
        for keep in budgets:
            fits = config.video_rows(frames, keep) + longest < pipeline.model.max_context
            runs.append({"split": "events", "frames": frames, "keep": keep, "fits": fits})
    return runs


def own_budget(pipeline: Pipeline) -> int:
    """Patches per frame the model answers with when a request sets none."""
    return pipeline.kept_patches()


def longest_video_prompt(pipeline: Pipeline, folder: Path) -> int:
    """Text tokens of the longest question about a video (its visual rows are counted apart)."""
    prompts = [
        pipeline.build_prompt(q.question, 0, 1) for q in load_questions(folder) if q.modality == "video"
    ]
    return max(len(pipeline.tokenizer(p).input_ids) for p in prompts)


def key(run: dict[str, Any]) -> str:
    return f"{run['split']}/{run['frames']}/{run['keep']}"


def run_one(
    pipeline: Pipeline, data: Path, run: dict[str, Any], batch_size: int, limit: int | None
) -> dict[str, Any]:
    pipeline.visual_tokens = run["keep"]
    config = pipeline.model.config
    before = load_average()
    started = time.perf_counter()
    report = evaluate(
        pipeline, data / SPLITS[run["split"]], limit=limit, batch_size=batch_size, num_frames=run["frames"]
    )
    return run | {
        "image_tokens": config.image_rows(run["keep"]),
        "video_tokens": config.video_rows(run["frames"], run["keep"]),
        "overall": report.overall,
        "accuracy": report.accuracy,
        "pope": report.pope,
        "errors": report.errors,
        "target_failures": check_targets(report),
        "seconds": round(time.perf_counter() - started, 1),
        "load_before": before,
        "load_after": load_average(),
    }


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def type_table(rows: list[tuple[str, dict[str, Any]]], types: list[str]) -> list[str]:
    """One row per evaluation, one column per (modality, type) any of them has."""
    columns = [
        (m, t)
        for m in ("image", "video")
        for t in types
        if any(t in r["accuracy"].get(m, {}) for _, r in rows)
    ]
    lines = ["| | overall | " + " | ".join(f"{m} {t}" for m, t in columns) + " |"]
    lines.append("| --- " * (len(columns) + 2) + "|")
    for label, r in rows:
        cells = [pct(r["accuracy"].get(m, {}).get(t, {}).get("accuracy")) for m, t in columns]
        lines.append(f"| {label} | {pct(r['overall']['accuracy'])} | " + " | ".join(cells) + " |")
    return lines


def markdown(results: dict[str, Any]) -> str:
    done = results["evaluations"]
    by_key = {key(r): r for r in done}
    info = results["info"]
    own = f"{info['frames']} frames, {info['keep'] or 'every'} patches per frame"
    out = [BEGIN, "", f"Model: `{info['model']}`; data: `{info['data']}`; {info['dtype']} on the CPU.", ""]
    out += [f"### Standard and variety splits ({own})", ""]
    rows = [
        (s, by_key[k])
        for s in ("standard", "variety")
        if (k := f"{s}/{info['frames']}/{info['keep']}") in by_key
    ]
    out += type_table(rows, [t for t in QUESTION_TYPES if t not in EVENT_QUESTION_TEMPLATES])
    out += ["", "POPE F1 (random / popular / adversarial):", ""]
    for label, r in rows:
        out.append(
            f"- {label}: "
            + " / ".join(
                pct(r["pope"][s]["f1"]) for s in ("random", "popular", "adversarial") if s in r["pope"]
            )
        )
    out += ["", "### Ordered events (video questions)", ""]
    events = [r for r in results["plan"] if r["split"] == "events"]
    rows = []
    for run in events:
        label = f"{run['frames']} frames, {run['keep']} patches ({results['info_rows'][key(run)]} rows)"
        if not run["fits"]:
            out_row = f"{label}: does not fit the {info['context']}-token context"
            rows.append((out_row, None))
        elif key(run) in by_key:
            rows.append((label, by_key[key(run)]))
    measured = [(label, r) for label, r in rows if r is not None]
    out += type_table(
        measured,
        list(EVENT_QUESTION_TEMPLATES) + [t for t in QUESTION_TYPES if t not in EVENT_QUESTION_TEMPLATES],
    )
    out += [""] + [f"- {label}" for label, r in rows if r is None]
    out += ["", "### Targets", ""]
    for line in results["targets"]:
        out.append(f"- {line}")
    out += [
        "",
        f"Measured by `{results['command']}`; seconds and load per evaluation are in the JSON.",
        "",
        END,
    ]
    return "\n".join(out)


def targets(results: dict[str, Any]) -> list[str]:
    """The report's verdicts: standard and variety at the model's setting, events at 32 frames."""
    info = results["info"]
    by_key = {key(r): r for r in results["evaluations"]}
    lines = []
    for split in ("standard", "variety"):
        r = by_key.get(f"{split}/{info['frames']}/{info['keep']}")
        if r is None:
            lines.append(f"{split}: not measured")
            continue
        low = [
            f"{m} {t} {pct(e['accuracy'])}"
            for m, per in r["accuracy"].items()
            for t, e in per.items()
            if e["accuracy"] < 0.95
        ]
        pope = [f"{s} {pct(p['f1'])}" for s, p in r["pope"].items() if p["f1"] < 0.95]
        verdict = (
            "MET" if not low and not pope else "MISSED (" + ", ".join(low + [f"POPE {p}" for p in pope]) + ")"
        )
        lines.append(f"{split}: every type >= 95% and POPE F1 >= 95 on every split: {verdict}")
    order = list(EVENT_QUESTION_TEMPLATES)
    events = [r for r in results["evaluations"] if r["split"] == "events"]
    at32 = [r for r in events if r["frames"] == 32]
    best32 = max(at32, key=lambda r: r["overall"]["accuracy"], default=None)
    best8 = max((r for r in events if r["frames"] == 8), key=lambda r: r["overall"]["accuracy"], default=None)
    if best32 is None:
        lines.append("events at 32 frames: not measured")
    else:
        video = best32["accuracy"].get("video", {})
        low = [
            f"{t} {pct(video[t]['accuracy'])}" for t in order if t in video and video[t]["accuracy"] < 0.90
        ]
        verdict = "MET" if not low else "MISSED (" + ", ".join(low) + ")"
        lines.append(
            f"events at 32 frames ({best32['keep']} patches per frame): every order question >= 90%: {verdict}"
        )
        if best8 is not None:
            a32, a8 = best32["overall"]["accuracy"], best8["overall"]["accuracy"]
            verdict = "MET" if a32 >= a8 else "MISSED"
            lines.append(
                f"events at 32 frames {pct(a32)}% overall vs the best 8-frame setting ({best8['keep']} patches) "
                f"{pct(a8)}%: at least as good: {verdict}"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_report_arguments(parser, ROOT / "runs" / "shapesworld-v2" / "data")
    parser.add_argument(
        "--name", default=NAME, help="file names of the JSON and the report (default %(default)s)"
    )
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions of each split")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--splits",
        default="standard,variety,events",
        help="comma-separated splits to evaluate (default: all)",
    )
    args = parser.parse_args()

    out_dir = ROOT / "reports" if args.record else args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = out_dir / f"{args.name}.json"
    model = args.model or str(default_model_path())
    pipeline = Pipeline.from_pretrained(model, dtype=args.dtype)
    torch.manual_seed(0)
    plan = settings(pipeline, args.data)
    weights = weights_sha256(model)
    earlier = []
    if args.resume and saved.is_file():
        kept = json.loads(saved.read_text())
        if kept["info"].get("weights_sha256") != weights:
            parser.error(f"--resume: {saved} measured another model (its weights differ from {model}'s)")
        earlier = kept.get("evaluations", [])
    done = {key(r): r for r in earlier}
    command = "python bench/shapesworld_model.py" + (" --record" if args.record else "")
    command += f" --name {args.name}" if args.name != NAME else ""
    command += (
        f" --model {args.model}" if args.model else ""
    ) + f" --data {os.path.relpath(args.data, ROOT)}"
    config = pipeline.model.config
    results: dict[str, Any] = {
        "info": {
            "model": os.path.relpath(model, ROOT) if os.path.isabs(model) else model,
            "weights_sha256": weights,
            "data": os.path.relpath(args.data, ROOT),
            "dtype": args.dtype,
            "frames": pipeline.num_frames,
            "keep": own_budget(pipeline),
            "patches_per_frame": config.vision.num_patches,
            "context": pipeline.model.max_context,
            "accuracy_targets": ACCURACY_TARGETS,
            "pope_f1_target": POPE_F1_TARGET,
            "limit": args.limit,
        },
        "plan": plan,
        "info_rows": {key(r): config.video_rows(r["frames"], r["keep"]) for r in plan},
        "command": command,
    }
    wanted = set(args.splits.split(","))
    if not wanted <= set(SPLITS):
        parser.error(f"--splits: unknown {sorted(wanted - set(SPLITS))}; known: {', '.join(SPLITS)}")
    for run in plan:
        if run.get("fits", True) and key(run) not in done and run["split"] in wanted:
            print(f"evaluating {key(run)} ...", flush=True)
            done[key(run)] = run_one(pipeline, args.data, run, args.batch_size, args.limit)
            print(
                f"  {pct(done[key(run)]['overall']['accuracy'])}% in {done[key(run)]['seconds']} s",
                flush=True,
            )
            results["evaluations"] = list(done.values())
            saved.write_text(json.dumps(results, indent=1) + "\n")
    results["evaluations"] = [done[key(r)] for r in plan if key(r) in done]
    results["targets"] = targets(results)
    saved.write_text(json.dumps(results, indent=1) + "\n")
    page = out_dir / f"{args.name}.md"
    text = page.read_text() if page.is_file() else f"# The ShapesWorld model\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    page.write_text(head + markdown(results) + rest.split(END, 1)[1])
    print(f"wrote {saved} and {page}")
    print("\n".join(results["targets"]))


if __name__ == "__main__":
    main()
