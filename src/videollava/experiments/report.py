"""The ablations report: tables in the paper's layout (Table 5, Fig. 4, Table 6, Fig. 5), every
paired comparison with its interval, a plain verdict per claim, plots, commands and wall times.

Built from whatever arm-seeds have finished (`result.json` in their folders); what is missing is
listed, and every number says over how many seeds it stands.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from videollava.experiments.ablations import (
    EXPERIMENT_FILE,
    arm_dir,
    collect,
    per_question,
    reproduce_command,
)
from videollava.experiments.recipes import ARMS, Scale, run_arm
from videollava.experiments.stats import Difference, mean_std, paired_difference
from videollava.shapesworld.text import QUESTION_TYPES
from videollava.train import checkpointing as ckpt

MODALITIES = ("image", "video")
TITLES = {
    "united": "United",
    "separated-mae": "Separated-MAE",
    "separated-text": "Separated-text",
    "joint": "Joint (images + videos)",
    "video-only": "Video-only",
    "image-only": "Image-only",
}


@dataclass(frozen=True)
class Comparison:
    claim: str  # "alignment" or "joint"
    a: str  # the arm the paper says is better
    b: str


COMPARISONS = (
    Comparison("alignment", "united", "separated-mae"),
    Comparison("alignment", "united", "separated-text"),
    Comparison("joint", "joint", "video-only"),
    Comparison("joint", "joint", "image-only"),
)


# ---------------------------------------------------------------------------------------- cells


def cell_name(modality: str, qtype: str) -> str:
    return f"{modality}/{qtype}"


def _types(results: dict[str, dict[int, dict[str, Any]]], modality: str) -> list[str]:
    present = {
        t for per_seed in results.values() for r in per_seed.values() for t in r["accuracy"].get(modality, {})
    }
    return [t for t in QUESTION_TYPES if t in present] + sorted(present - set(QUESTION_TYPES))


def cell_value(result: dict[str, Any], modality: str, qtype: str) -> float | None:
    """One arm-seed's accuracy on a cell; `all` is the modality's (or, for modality `all`, every) question."""
    if modality == "all":
        return result["overall"]
    if qtype == "all":
        return result["by_modality"].get(modality)
    return result["accuracy"].get(modality, {}).get(qtype)


def cells(results: dict[str, dict[int, dict[str, Any]]]) -> list[tuple[str, str]]:
    out = [("all", "all")]
    for modality in MODALITIES:
        out.append((modality, "all"))
        out += [(modality, t) for t in _types(results, modality)]
    return out


@lru_cache(maxsize=64)
def _answers(run_dir: str) -> dict[str, dict[str, Any]]:
    return per_question(Path(run_dir))


def correctness(
    output: Path, arm: str, seeds: Sequence[int], modality: str, qtype: str
) -> dict[int, tuple[tuple[str, ...], np.ndarray]]:
    """seed -> (question ids, the arm's 0/1 answers to them) on a cell, in question-id order."""
    out = {}
    for seed in seeds:
        questions = _answers(str(arm_dir(output, arm, seed)))
        chosen = tuple(
            sorted(
                (
                    qid
                    for qid, q in questions.items()
                    if modality in ("all", q["modality"]) and qtype in ("all", q["type"])
                ),
                key=lambda qid: (len(qid), qid),
            )
        )
        out[seed] = (chosen, np.array([questions[q]["correct"] for q in chosen], dtype=np.int64))
    return out


def compare(
    output: Path,
    results: dict[str, dict[int, dict[str, Any]]],
    comparison: Comparison,
    resamples: int,
) -> dict[str, Difference]:
    """Every cell's paired difference between the comparison's arms, over their common seeds."""
    seeds = sorted(set(results[comparison.a]) & set(results[comparison.b]))
    out: dict[str, Difference] = {}
    if not seeds:
        return out
    for modality, qtype in cells({k: results[k] for k in (comparison.a, comparison.b)}):
        a = correctness(output, comparison.a, seeds, modality, qtype)
        b = correctness(output, comparison.b, seeds, modality, qtype)
        if any(a[s][0] != b[s][0] or not a[s][0] for s in seeds):
            continue  # not the same questions: no paired comparison
        diff = paired_difference(
            cell_name(modality, qtype),
            comparison.a,
            comparison.b,
            {s: a[s][1] for s in seeds},
            {s: b[s][1] for s in seeds},
            resamples,
        )
        if diff is not None:
            out[diff.cell] = diff
    return out


# ---------------------------------------------------------------------------------------- text


def pts(value: float | None, signed: bool = False) -> str:
    """A fraction as percentage points."""
    if value is None:
        return "-"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def mean_cell(results: dict[int, dict[str, Any]], modality: str, qtype: str) -> str:
    values = [v for r in results.values() if (v := cell_value(r, modality, qtype)) is not None]
    mean, std = mean_std(values)
    if mean is None:
        return "-"
    return pts(mean) + ("" if std is None else f" ± {pts(std)}")


def diff_cell(diff: Difference | None) -> str:
    if diff is None:
        return "-"
    interval = "" if diff.low is None else f" [{pts(diff.low, True)}, {pts(diff.high, True)}]"
    mark = {"A": " ▲", "B": " ▼", "none": ""}[diff.verdict]
    return f"{pts(diff.mean, True)}{interval}{mark}"


def layout_table(
    results: dict[str, dict[int, dict[str, Any]]],
    diffs: dict[tuple[str, str], dict[str, Difference]],
    rows: Sequence[str],
    deltas: Sequence[tuple[str, str]],
    modality: str,
) -> list[str]:
    """Rows of arms and of paired differences, columns the modality's question types and its total."""
    types = _types({r: results[r] for r in rows}, modality)
    head = ["method", *types, f"all {modality} questions"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for arm in rows:
        n = len(results[arm])
        cells_ = [mean_cell(results[arm], modality, t) for t in [*types, "all"]]
        lines.append(f"| {TITLES[arm]} ({n} seed{'s' * (n != 1)}) | " + " | ".join(cells_) + " |")
    for a, b in deltas:
        found = diffs.get((a, b), {})
        cells_ = [diff_cell(found.get(cell_name(modality, t))) for t in [*types, "all"]]
        lines.append(f"| Δ {TITLES[a]} − {TITLES[b]} | " + " | ".join(cells_) + " |")
    return lines


def difference_table(comparison: Comparison, found: dict[str, Difference]) -> list[str]:
    lines = [
        f"**{TITLES[comparison.a]} − {TITLES[comparison.b]}**",
        "",
        "| cell | questions per seed | per seed (seed: difference) | mean ± std | 95% bootstrap interval | "
        f"seeds {comparison.a} higher / lower |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for cell, d in found.items():
        per_seed = ", ".join(f"{s}: {pts(v, True)}" for s, v in zip(d.seeds, d.per_seed, strict=True))
        spread = pts(d.mean, True) + ("" if d.std is None else f" ± {pts(d.std)}")
        lines.append(
            f"| {cell} | {d.questions} | {per_seed} | {spread} | "
            f"[{pts(d.low, True)}, {pts(d.high, True)}] | {d.a_wins} / {d.b_wins} |"
        )
    return lines


def _noise(results: dict[str, dict[int, dict[str, Any]]], arm: str, modality: str) -> float | None:
    _, std = mean_std([v for r in results[arm].values() if (v := cell_value(r, modality, "all")) is not None])
    return std


def describe_difference(
    d: Difference | None, comparison: Comparison, what: str, results: dict[str, dict[int, dict[str, Any]]]
) -> str:
    if d is None:
        return f"{what}: no seed finished for both arms"
    modality = d.cell.split("/")[0]
    noise = [
        n for n in (_noise(results, comparison.a, modality), _noise(results, comparison.b, modality)) if n
    ]
    spread = "" if d.std is None else f"; the difference varies by {pts(d.std)} points from seed to seed"
    seed_noise = (
        f"; each arm's own seed-to-seed spread is {' and '.join(pts(n) for n in noise)} points"
        if noise
        else ""
    )
    return (
        f"{what}: {pts(d.mean, True)} points (95% interval {pts(d.low, True)} to {pts(d.high, True)}; "
        f"{comparison.a} higher at {d.a_wins} of {len(d.seeds)} seeds{spread}{seed_noise})"
    )


def by_type_verdicts(found: dict[str, Difference], modality: str) -> tuple[list[str], list[str], list[str]]:
    wins, losses, unclear = [], [], []
    for cell, d in found.items():
        m, t = cell.split("/")
        if m != modality or t == "all":
            continue
        {"A": wins, "B": losses, "none": unclear}[d.verdict].append(f"{t} ({pts(d.mean, True)})")
    return wins, losses, unclear


def _overall_word(ds: list[Difference | None]) -> str:
    verdicts = [d.verdict if d is not None else "missing" for d in ds]
    if "missing" in verdicts:
        return "cannot be judged yet (seeds missing)"
    if all(v == "A" for v in verdicts):
        return "holds at this scale"
    if any(v == "B" for v in verdicts) and not any(v == "A" for v in verdicts):
        return "is reversed at this scale"
    if any(v == "A" for v in verdicts):
        return "holds only in part at this scale"
    return "is not shown at this scale (every interval includes zero)"


def verdicts(
    results: dict[str, dict[int, dict[str, Any]]], diffs: dict[tuple[str, str], dict[str, Difference]]
) -> tuple[list[str], dict[str, Any]]:
    """Plain statements per claim and comparison, and the same as data."""
    lines: list[str] = []
    data: dict[str, Any] = {}
    plans = {
        "alignment": ("Claim 1: united beats separated on images and on videos", ("image", "video")),
        "joint": ("Claim 2: joint training beats one modality alone", None),
    }
    for claim, (title, _) in plans.items():
        lines += [f"### {title}", ""]
        for comparison in [c for c in COMPARISONS if c.claim == claim]:
            found = diffs.get((comparison.a, comparison.b), {})
            if claim == "alignment":
                modalities = ["image", "video"]
            else:  # the modality the single-modality arm lacks is the claim; the other is transfer
                modalities = ["video"] if comparison.b == "video-only" else ["image"]
            main = [found.get(cell_name(m, "all")) for m in modalities]
            word = _overall_word(main)
            lines.append(
                f"- **{TITLES[comparison.a]} vs {TITLES[comparison.b]}** ({', '.join(modalities)}): the claim {word}."
            )
            for m, d in zip(modalities, main, strict=True):
                lines.append(f"  - {describe_difference(d, comparison, f'{m} questions', results)}.")
                wins, losses, unclear = by_type_verdicts(found, m)
                lines.append(
                    f"  - by question type ({m}): {comparison.a} higher beyond noise on "
                    f"{', '.join(wins) or 'none'}; lower beyond noise on {', '.join(losses) or 'none'}; "
                    f"no clear difference on {', '.join(unclear) or 'none'}."
                )
            if claim == "joint":
                other = "image" if modalities == ["video"] else "video"
                d = found.get(cell_name(other, "all"))
                lines.append(
                    f"  - {other} questions ({comparison.b} never trained its LLM on them): "
                    f"{describe_difference(d, comparison, other + ' questions', results).split(': ', 1)[-1]}."
                )
            data[f"{comparison.a} vs {comparison.b}"] = {
                "claim": claim,
                "modalities": modalities,
                "verdict": word,
                "differences": {
                    m: (d.to_dict() if d else None) for m, d in zip(modalities, main, strict=True)
                },
            }
        lines.append("")
    return lines, data


# ---------------------------------------------------------------------------------------- plots


def plot_claim(
    path: Path,
    results: dict[str, dict[int, dict[str, Any]]],
    diffs: dict[tuple[str, str], dict[str, Difference]],
    arms: Sequence[str],
    comparisons: Sequence[Comparison],
    title: str,
) -> bool:
    """Accuracy per question type (mean, std bars, seed dots) and the paired differences with their
    intervals, images left and videos right; False when there is nothing to plot or no matplotlib."""
    if not any(results[a] for a in arms):
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        return False
    fig, axes = plt.subplots(2, 2, figsize=(13, 7.5), dpi=90, gridspec_kw={"height_ratios": [3, 2]})
    colours = ["tab:blue", "tab:orange", "tab:green"]
    for column, modality in enumerate(MODALITIES):
        types = [*_types({a: results[a] for a in arms}, modality), "all"]
        x = np.arange(len(types))
        width = 0.8 / len(arms)
        ax = axes[0][column]
        for i, arm in enumerate(arms):
            per_seed = [[cell_value(r, modality, t) for t in types] for r in results[arm].values()]
            if not per_seed:
                continue
            values = np.array([[np.nan if v is None else 100 * v for v in row] for row in per_seed])
            mean = np.nanmean(values, axis=0)
            std = np.nanstd(values, axis=0, ddof=1) if len(values) > 1 else np.zeros_like(mean)
            offset = x - 0.4 + width * (i + 0.5)
            ax.bar(offset, mean, width, yerr=std, color=colours[i], alpha=0.75, label=TITLES[arm], capsize=2)
            for row in values:
                ax.plot(offset, row, "k.", markersize=3)
        ax.set_xticks(x, types)
        ax.set_ylim(0, 100)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{modality} questions")
        ax.legend(fontsize=8, loc="lower left")
        ax = axes[1][column]
        width = 0.8 / max(1, len(comparisons))
        for i, comparison in enumerate(comparisons):
            found = diffs.get((comparison.a, comparison.b), {})
            ds = [found.get(cell_name(modality, t)) for t in types]
            offset = x - 0.4 + width * (i + 0.5)
            mean = np.array([np.nan if d is None else 100 * d.mean for d in ds])
            low = np.array([np.nan if d is None or d.low is None else 100 * d.low for d in ds])
            high = np.array([np.nan if d is None or d.high is None else 100 * d.high for d in ds])
            ax.errorbar(
                offset, mean, yerr=[mean - low, high - mean], fmt="o", capsize=3, color=colours[i + 1],
                label=f"{TITLES[comparison.a]} − {TITLES[comparison.b]}",
            )  # fmt: skip
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(x, types)
        ax.set_ylabel("difference (points), 95% CI")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return True


# ---------------------------------------------------------------------------------------- the report


def wall_times(
    output: Path, results: dict[str, dict[int, dict[str, Any]]]
) -> tuple[list[str], dict[str, Any]]:
    lines = [
        "| arm | seed | stages trained here (s) | train, all in (s) | evaluation (s) | stages adopted |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    data: dict[str, Any] = {}
    total = 0.0
    for arm in ARMS:
        if arm == "joint":
            continue
        own, train, evaluation = 0.0, 0.0, 0.0
        for seed, r in sorted(results[arm].items()):
            times = r["times"]
            stages = times.get("train_stage_seconds", {})
            shared = (r.get("shared_stages") or {}).get("stages", [])
            lines.append(
                f"| {arm} | {seed} | {sum(stages.values()):.0f} ({', '.join(f'{k} {v:.0f}' for k, v in stages.items())}) "
                f"| {times.get('train_seconds', 0):.0f} | {times.get('eval_seconds', 0):.0f} | {', '.join(shared) or '-'} |"
            )
            data.setdefault(arm, {})[seed] = times
            own += sum(stages.values())
            train += times.get("train_seconds", 0)
            evaluation += times.get("eval_seconds", 0)
        if len(results[arm]) > 1:
            lines.append(f"| **{arm}, all seeds** | | {own:.0f} | {train:.0f} | {evaluation:.0f} | |")
        total += train + evaluation
    data_time = output / "data-time.json"
    generated = json.loads(data_time.read_text())["seconds"] if data_time.exists() else 0.0
    lines += ["", f"Data generation (once, shared by every arm and seed): {generated:.0f} s. "
              f"Everything finished, data included: {(total + generated) / 60:.1f} minutes."]  # fmt: skip
    return lines, {"per_arm_seed": data, "data_seconds": generated, "total_seconds": total + generated}


def build(
    output: Path,
    scale: Scale,
    seeds: Sequence[int],
    arms: Sequence[str] = ARMS,
    report_dir: Path | None = None,
    command: str | None = None,
    resamples: int = 10000,
    name: str = "ablations",
) -> dict[str, Any]:
    """Write `<name>.md`, `<name>.json` and the plots into `report_dir` (default `<output>/report`)."""
    report_dir = report_dir or output / "report"
    found = collect(output)
    results = {arm: {s: r for s, r in found[arm].items() if s in seeds} for arm in ARMS}
    missing = [f"{arm} seed {s}" for arm in arms for s in seeds if s not in results[arm]]
    progress = [
        f"{run_arm(arm)} seed {s}: {where}"
        for arm in dict.fromkeys(run_arm(a) for a in arms)
        for s in seeds
        if s not in results[arm] and (where := standing(arm_dir(output, arm, s)))
    ]
    diffs = {(c.a, c.b): compare(output, results, c, resamples) for c in COMPARISONS}
    claims, verdict_data = verdicts(results, diffs)
    figures = {
        "alignment": plot_claim(
            report_dir / f"{name}-alignment.png", results, diffs, ("united", "separated-mae", "separated-text"),
            COMPARISONS[:2], "Alignment before projection (Table 5, Fig. 4)",
        ),
        "joint": plot_claim(
            report_dir / f"{name}-joint.png", results, diffs, ("joint", "video-only", "image-only"),
            COMPARISONS[2:], "Joint training (Table 6, Fig. 5)",
        ),
    }  # fmt: skip
    times, time_data = wall_times(output, results)
    out = str(output)
    commands = {
        "run": command
        or f"videollava experiment ablations --scale {scale.name} --seeds {len(seeds)} --output {out}",
        "resume": f"videollava experiment ablations --scale {scale.name} --seeds {len(seeds)} --output {out} --resume",
        "report": f"videollava experiment ablations --scale {scale.name} --seeds {len(seeds)} --output {out} "
        f"--report-only --report-dir {report_dir}",
        "one arm, one seed": reproduce_command(scale.name, "ARM", 0, "runs/ablations-check"),
    }
    lines = [
        "# Ablations at ShapesWorld scale: alignment before projection, and joint training",
        "",
        f"Scale `{scale.name}`: {scale.description}",
        "",
        f"Seeds: {', '.join(map(str, seeds))}. Finished: "
        + ", ".join(f"{arm} {len(results[arm])}/{len(seeds)}" for arm in arms)
        + ".",
        "",
        ("**Every arm and seed finished.**" if not missing else f"**Missing (not finished):** {', '.join(missing)}."),
        "",
        *([f"Where the unfinished ones stand: {'; '.join(progress)}.", ""] if progress else []),
        "`united` and `joint` are one recipe (today's, configs/shapesworld.yaml at this scale), run once "
        "per seed and reported under both names.",
        "",
        "Numbers are accuracies in % on the held-out ShapesWorld questions, mean ± standard deviation "
        "over seeds. Δ rows: the paired difference in points (mean over seeds) and its 95% bootstrap "
        "interval (seeds and questions resampled); ▲/▼ mark intervals that exclude zero.",
        "",
        "## Verdicts",
        "",
        *claims,
        "## Claim 1: alignment before projection",
        "",
        "Table 5 layout (images):",
        "",
        *layout_table(results, diffs, ("separated-mae", "separated-text", "united"),
                      (("united", "separated-mae"), ("united", "separated-text")), "image"),
        "",
        "Fig. 4 layout (videos):",
        "",
        *layout_table(results, diffs, ("separated-mae", "separated-text", "united"),
                      (("united", "separated-mae"), ("united", "separated-text")), "video"),
        "",
        *([f"![alignment]({name}-alignment.png)", ""] if figures["alignment"] else []),
        "## Claim 2: joint training",
        "",
        "Table 6 layout (videos):",
        "",
        *layout_table(results, diffs, ("video-only", "joint"), (("joint", "video-only"),), "video"),
        "",
        "Fig. 5 layout (images):",
        "",
        *layout_table(results, diffs, ("image-only", "joint"), (("joint", "image-only"),), "image"),
        "",
        "Each single-modality arm on the modality it never trained its LLM on:",
        "",
        *layout_table(results, diffs, ("image-only", "joint"), (("joint", "image-only"),), "video"),
        "",
        *layout_table(results, diffs, ("video-only", "joint"), (("joint", "video-only"),), "image"),
        "",
        *([f"![joint]({name}-joint.png)", ""] if figures["joint"] else []),
        "## Every paired comparison",
        "",
    ]  # fmt: skip
    for comparison in COMPARISONS:
        lines += [*difference_table(comparison, diffs[(comparison.a, comparison.b)]), ""]
    lines += [
        "## Commands",
        "",
        "```bash",
        *[f"# {k}\n{v}" for k, v in commands.items()],
        "```",
        "",
        "`--arms ARM --seed S` into a fresh folder re-runs one arm at one seed alone (every stage "
        "trained, none adopted) and gives the same numbers to the last digit: training and "
        "evaluation are deterministic on a given machine (each stage seeded, fixed thread count, "
        "greedy answers at batch 1). `model_sha256` in the JSON identifies each model.",
        "",
        "## Wall time",
        "",
        "Per arm and seed: the stages it trained itself, its whole training invocation (model "
        "building, stage evaluations and export included), and its evaluation. Adopted stages were "
        "trained (and timed) in the run they came from.",
        "",
        *times,
        "",
        "## The scale",
        "",
        "```yaml",
        scale.text.rstrip(),
        "```",
        "",
    ]
    markdown = "\n".join(lines) + "\n"
    arms_data = {
        arm: [
            {
                "seed": seed,
                "overall": r["overall"],
                "image": r["by_modality"].get("image"),
                "video": r["by_modality"].get("video"),
                "accuracy": r["accuracy"],
                "by_type": _pooled_by_type(r),
                "questions": r["questions"],
                "pope_f1": r.get("pope_f1"),
                "model_sha256": r["model_sha256"],
                "shared_stages": r.get("shared_stages"),
                "times": r["times"],
                "reproduce": reproduce_command(scale.name, arm, seed, f"runs/ablations-check-{arm}-{seed}"),
            }
            for seed, r in sorted(results[arm].items())
        ]
        for arm in ARMS
    }
    data = {
        "scale": scale.name,
        "description": scale.description,
        "seeds": list(seeds),
        "complete": not missing,
        "missing": missing,
        "arms": arms_data,
        "joint_is_united": "joint and united are one run per seed (today's recipe), reported under both names",
        "comparisons": {
            f"{a} vs {b}": {cell: d.to_dict() for cell, d in found.items()} for (a, b), found in diffs.items()
        },
        "verdicts": verdict_data,
        "commands": commands,
        "wall_time": time_data,
        "bootstrap_resamples": resamples,
    }
    report_dir.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_text(report_dir / f"{name}.md", markdown)
    ckpt.atomic_write_text(report_dir / f"{name}.json", json.dumps(data, indent=1) + "\n")
    return data


def standing(run_dir: Path) -> str | None:
    """Where an unfinished arm-seed's run stands: its last checkpoint's stage and step."""
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is None:
        return None
    state = json.loads((latest / ckpt.STATE_FILE).read_text())
    step = "done" if state["complete"] else f"at step {state['step']} of {state['total_steps']}"
    where = f"{state['stage']} {step}"
    if (run_dir / "model" / "model.safetensors").exists():
        where = "trained, not yet scored"
    return where


def _pooled_by_type(result: dict[str, Any]) -> dict[str, float]:
    """Accuracy per question type, images and videos pooled."""
    right: dict[str, float] = {}
    count: dict[str, int] = {}
    for modality, per_type in result["accuracy"].items():
        for qtype, accuracy in per_type.items():
            n = result["n"][modality][qtype]
            right[qtype] = right.get(qtype, 0.0) + accuracy * n
            count[qtype] = count.get(qtype, 0) + n
    return {t: right[t] / count[t] for t in right if count[t]}


def expected_seeds(output: Path, seeds: Sequence[int] | None) -> list[int]:
    if seeds:
        return list(seeds)
    found = sorted({int(p.name.split("-", 1)[1]) for p in output.glob("seed-*") if p.is_dir()})
    if not found and (output / EXPERIMENT_FILE).exists():
        return []
    return found
