"""What people read: one run's results.md, and several runs side by side (markdown and a bar chart)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from videollava.errors import VideoLlavaError
from videollava.eval.items import Task
from videollava.eval.store import RESULTS, read_json_file


def results_markdown(task: Task, results: dict[str, Any]) -> str:
    """The task's table in the paper's layout, then how the numbers were obtained."""
    lines = [f"# {task.name}: {results['model']}", "", task.table(results["metrics"]).rstrip(), ""]
    lines.append(
        f"- items: {results['count']}"
        + (f", failed requests: {results['errors']}" if results["errors"] else "")
    )
    frames = results.get("frames")
    lines.append(
        f"- frames per video: {frames if frames else 'the model default'}; template: {results.get('template') or 'the model default'}"
    )
    judge = results.get("judge")
    if judge:
        where = judge["url"] or "offline"
        hashes = ", ".join(f"{k} {v}" for k, v in judge["prompt_hash"].items())
        lines.append(f"- judge: {judge['model']} ({where}); prompt hashes: {hashes}")
        lines.append(f"- malformed judge replies: {results['malformed']} ({judge['malformed']})")
    if results.get("shard", "0/1") != "0/1":
        lines.append(f"- shard {results['shard']} only")
    if results.get("prepare_options"):
        lines.append(f"- inference options: {results['prepare_options']}")
    lines.append(f"- videollava {results['version']}, {results['time']}, {results['seconds']} s")
    return "\n".join(lines) + "\n"


def headline(results: dict[str, Any]) -> tuple[str, float | None]:
    key = results.get("headline", "accuracy")
    value = results["metrics"].get(key)
    return key, float(value) if isinstance(value, int | float) else None


def compare(dirs: Sequence[Path], png: Path | None = None) -> str:
    """A markdown table of several finished runs (one row per run) and, if asked, a PNG bar chart."""
    runs = []
    for folder in dirs:
        if not (folder / RESULTS).exists():
            raise VideoLlavaError(f"{folder}: no results.json (not a finished `videollava eval` run)")
        runs.append((folder, read_json_file(folder / RESULTS)))
    tasks = sorted({r["task"] for _, r in runs})
    models = list(dict.fromkeys(r["model"] for _, r in runs))
    cell: dict[tuple[str, str], str] = {}
    values: dict[tuple[str, str], float] = {}
    for _, results in runs:
        key, value = headline(results)
        text = "-" if value is None else f"{value:.1f}"
        score = results["metrics"].get("score")
        if key == "accuracy" and isinstance(score, int | float) and results.get("judge"):
            text += f" / {score:.2f}"
        cell[(results["model"], results["task"])] = text
        if value is not None:
            values[(results["model"], results["task"])] = value
    lines = ["| model | " + " | ".join(tasks) + " |", "| --- |" + " --- |" * len(tasks)]
    for model in models:
        lines.append(f"| {model} | " + " | ".join(cell.get((model, t), "-") for t in tasks) + " |")
    lines += ["", "Headline metric per task (accuracy in percent; judged video QA: accuracy / score)."]
    if png is not None:
        _bar_chart(png, tasks, models, values)
        lines.append(f"\n![results]({png.name})")
    return "\n".join(lines) + "\n"


def _bar_chart(path: Path, tasks: list[str], models: list[str], values: dict[tuple[str, str], float]) -> None:
    from videollava.extras import require

    require("eval report", "train", "matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(tasks) * max(1, len(models)) ** 0.5 + 2), 3.5))
    for m, model in enumerate(models):
        # A task a model was not run on gets no bar (not a bar at zero).
        present = [(t, values[(model, task)]) for t, task in enumerate(tasks) if (model, task) in values]
        ax.bar(
            [t + m * width for t, _ in present],
            [v for _, v in present],
            width,
            label=Path(model).name or model,
        )
    ax.set_xticks([t + width * (len(models) - 1) / 2 for t in range(len(tasks))])
    ax.set_xticklabels(tasks, rotation=20, ha="right")
    ax.set_ylabel("headline metric")
    ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
