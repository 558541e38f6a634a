"""`videollava experiment ablations`: the paper's two ablations at ShapesWorld scale, over seeds.

Claim 1 (Table 5, Fig. 4): towers aligned to one language space before the shared projector
("united") beat towers that were not aligned together ("separated-mae", "separated-text").
Claim 2 (Table 6, Fig. 5): stage 1 and stage 2 on images and videos ("joint") beat videos alone
("video-only"), and help the image side ("image-only").

Every arm is a recipe (`experiments.recipes`) trained by the ordinary runner and scored by the
evaluation harness's ShapesWorld task on the held-out set. One folder per arm and seed,
`<output>/seed-<s>/<arm>/`: the runner's files, `eval/` (the harness's), and `result.json` once
both are done. All arms and seeds share one generated world (`<output>/data`); within a seed, an
arm adopts the finished stages it shares exactly with another arm's run (the tokenizer always,
united's towers for the joint-training arms), copied with a note in `shared.json`, and the
runner replays them as it replays finished stages on `--resume`. Training is deterministic (seeded
per stage, fixed thread count), so an arm run alone trains those stages to the same bits.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from videollava.data.sample_media import MediaCache
from videollava.eval.runner import RunConfig
from videollava.eval.runner import run as run_eval
from videollava.eval.store import read_records
from videollava.experiments.recipes import (
    ARM_FILES,
    ARMS,
    Arm,
    ExperimentError,
    Scale,
    run_arm,
    shared_prefix,
)
from videollava.shapesworld.evaluate import ShapesWorldTask
from videollava.train import checkpointing as ckpt
from videollava.train import distributed as D
from videollava.train.config import Recipe, TokenizerStage, TrainStage, load_recipe
from videollava.train.loop import STAGES_DIR
from videollava.train.runner import Run

RESULT_FILE = "result.json"
DEFAULT_THREADS = torch.get_num_threads()  # what torch chose before any recipe set a count
SHARED_FILE = "shared.json"
EXPERIMENT_FILE = "experiment.json"


def arm_dir(output: Path, arm: str, seed: int) -> Path:
    return output / f"seed-{seed}" / run_arm(arm)


@dataclass
class Plan:
    """What one invocation runs: which arms and seeds, at which scale, into which folder."""

    configs: Path
    output: Path
    scale: Scale
    seeds: list[int]
    arms: list[str]  # reported names; "joint" runs as "united"
    resume: bool = False
    jobs: int = 1  # seeds run side by side, each in a process of its own
    media_cache: MediaCache | None = field(default=None, repr=False, compare=False)

    @property
    def data_root(self) -> Path:
        return self.output / "data"

    def runs(self) -> list[tuple[str, int]]:
        """(run arm, seed) in the order they run: seed by seed, the arms others adopt stages from first."""
        order = [a for a in ("united", "video-only", "image-only", "separated-text", "separated-mae")]
        wanted = {run_arm(a) for a in self.arms}
        return [(arm, seed) for seed in self.seeds for arm in order if arm in wanted]

    def identity(self) -> dict[str, Any]:
        """What every run in the folder must agree on (checked on --resume): the scale, and every
        arm's resolved recipe (at seed 0), so that comments may change but no value may. Values at
        their defaults are left out, so options added since (at their defaults) change nothing."""
        recipes = {
            arm: Arm.load(self.configs, arm)
            .recipe(self.scale, 0, self.data_root)
            .to_dict(exclude_defaults=True)
            for arm in ARM_FILES
        }
        text = json.dumps(recipes, sort_keys=True, default=str)
        return {
            "scale": self.scale.name,
            "recipes": hashlib.sha256(text.encode()).hexdigest(),
            "eval": {"batch_size": self.scale.eval_batch_size, "limit": self.scale.eval_limit},
        }


# ---------------------------------------------------------------------------------------- sharing


def finished_stages(run_dir: Path, recipe: Recipe) -> int:
    """How many leading stages of `recipe` a run folder holds the final results of."""
    count = 0
    for index, stage in enumerate(recipe.stages):
        if isinstance(stage, TokenizerStage):
            done = (run_dir / "tokenizer" / "tokenizer_config.json").exists()
        else:
            folder = run_dir / STAGES_DIR / f"{index}-{stage.label}"
            done = (folder / "result.json").exists() and (folder / ckpt.WEIGHTS_FILE).exists()
        if not done:
            break
        count += 1
    return count


def adopt_shared_stages(run_dir: Path, recipe: Recipe, donors: list[Path], log: Callable[[str], None]) -> int:
    """Copy into a fresh run folder the finished stages it shares exactly with one of `donors`,
    and mark the last one complete, so that the runner replays them; the number adopted."""
    if ckpt.latest_checkpoint(run_dir) is not None:
        return 0  # the run has progress of its own: it resumes that
    best, source = 0, None
    for donor in donors:
        if donor == run_dir or not (donor / "recipe.yaml").exists():
            continue
        donor_recipe = load_recipe(donor / "recipe.yaml")
        count = min(shared_prefix(recipe, donor_recipe), finished_stages(donor, donor_recipe))
        if count > best:
            best, source = count, donor
    if source is None:
        return 0
    run_dir.mkdir(parents=True, exist_ok=True)
    labels = []
    for index, stage in enumerate(recipe.stages[:best]):
        if isinstance(stage, TokenizerStage):
            target = run_dir / "tokenizer"
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source / "tokenizer", target)
        else:
            name = f"{index}-{stage.label}"
            target = run_dir / STAGES_DIR / name
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source / STAGES_DIR / name, target)
        labels.append(stage.label)
    last = recipe.stages[best - 1]
    step = 0
    if isinstance(last, TrainStage):
        result = json.loads((run_dir / STAGES_DIR / f"{best - 1}-{last.label}" / "result.json").read_text())
        step = int(result.get("step", 0))
    state = ckpt.TrainerState(stage_index=best - 1, stage=last.label, step=step, complete=True)
    ckpt.save_checkpoint(run_dir, state, {}, keep=recipe.run.keep_checkpoints)
    note = {"from": str(source), "stages": labels}
    ckpt.atomic_write_text(run_dir / SHARED_FILE, json.dumps(note, indent=1) + "\n")
    log(f"adopted {', '.join(labels)} from {source}")
    return best


# ---------------------------------------------------------------------------------------- one run


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def set_threads(recipe: Recipe) -> None:
    """The recipe's intra-op thread count, for training and scoring alike: results are
    reproducible to the bit for a given count (sums split differently may round differently)."""
    torch.set_num_threads(recipe.run.threads or DEFAULT_THREADS)


def train(recipe: Recipe, run_dir: Path, media_cache: MediaCache | None = None) -> float:
    """Run (or resume) the recipe in `run_dir`; the seconds it took in this process. `media_cache`:
    decoded media kept across the runs of one process (the same files, decoded the same way)."""
    set_threads(recipe)
    info = D.setup(recipe.distributed.strategy, recipe.distributed.backend)
    started = time.perf_counter()
    resume = ckpt.latest_checkpoint(run_dir) is not None
    try:
        run = Run(recipe, info, run_dir, resume=resume)
        if media_cache is not None and run.media_cache is not None:
            run.media_cache = media_cache
        run.execute()
    finally:
        D.teardown(info)
    return time.perf_counter() - started


def evaluate(run_dir: Path, data_root: Path, scale: Scale, recipe: Recipe) -> dict[str, Any]:
    """The harness's ShapesWorld task on the run's exported model (resumed if cut short)."""
    from videollava.infer.pipeline import Pipeline  # loads the inference stack only when scoring

    folder = run_dir / "eval"
    if (folder / "results.json").exists():
        return json.loads((folder / "results.json").read_text())
    set_threads(recipe)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipeline = Pipeline.from_pretrained(run_dir / "model", dtype="float32", device=device)
    config = RunConfig(
        task="shapesworld",
        model=str((run_dir / "model").resolve()),
        data_dir=str(data_root.resolve()),
        batch_size=scale.eval_batch_size,
        limit=scale.eval_limit,
    )
    resume = (folder / "run.json").exists()
    return run_eval(ShapesWorldTask(), pipeline, config, folder, resume=resume, progress=None)


def per_question(run_dir: Path) -> dict[str, dict[str, Any]]:
    """question id -> {modality, type, correct} from a finished evaluation."""
    records = read_records(run_dir / "eval" / "predictions.jsonl")
    report = ShapesWorldTask().report(records)
    return {
        str(r.question_id): {"modality": r.modality, "type": r.type, "correct": bool(r.correct)}
        for r in report.results
    }


def summarise_result(
    arm: str, seed: int, run_dir: Path, results: dict[str, Any], times: dict[str, Any]
) -> dict:
    """The arm-seed's result.json: overall and per modality x question type accuracy, and times."""
    metrics = results["metrics"]
    accuracy = {
        modality: {qtype: entry["accuracy"] for qtype, entry in per_type.items()}
        for modality, per_type in metrics["accuracy"].items()
    }
    counts = {
        modality: {qtype: int(entry["n"]) for qtype, entry in per_type.items()}
        for modality, per_type in metrics["accuracy"].items()
    }
    by_modality = {}
    for modality, per_type in metrics["accuracy"].items():
        n = sum(entry["n"] for entry in per_type.values())
        by_modality[modality] = sum(entry["correct"] for entry in per_type.values()) / n if n else 0.0
    summary = json.loads((run_dir / "summary.json").read_text())
    shared = json.loads((run_dir / SHARED_FILE).read_text()) if (run_dir / SHARED_FILE).exists() else None
    return {
        "arm": arm,
        "seed": seed,
        "overall": metrics["overall"]["accuracy"],
        "by_modality": by_modality,
        "accuracy": accuracy,
        "n": counts,
        "questions": int(metrics["overall"]["n"]),
        "pope_f1": {split: m["f1"] for split, m in metrics["pope"].items()},
        "stages": [
            {k: s.get(k) for k in ("name", "kind", "steps", "wall_time", "mean_loss_last_10", "eval")}
            for s in summary["stages"]
        ],
        "shared_stages": shared,
        "model_sha256": file_sha256(run_dir / "model" / "model.safetensors"),
        "times": times,
    }


def run_one(plan: Plan, arm: str, seed: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Train and score one arm at one seed (or finish what an earlier invocation left)."""
    run_dir = arm_dir(plan.output, arm, seed)
    done = run_dir / RESULT_FILE
    if done.exists():
        log(f"[seed {seed} {arm}] finished earlier: kept")
        return json.loads(done.read_text())
    recipe = Arm.load(plan.configs, arm).recipe(plan.scale, seed, plan.data_root)
    run_dir.mkdir(parents=True, exist_ok=True)
    donors = sorted(p for p in run_dir.parent.iterdir() if p.is_dir() and p != run_dir)
    adopt_shared_stages(run_dir, recipe, donors, log)
    times: dict[str, Any] = {}
    if not (run_dir / "model" / "model.safetensors").exists() or not (run_dir / "summary.json").exists():
        log(f"[seed {seed} {arm}] training")
        times["train_seconds"] = round(train(recipe, run_dir, plan.media_cache), 1)
    else:
        times["train_seconds"] = 0.0
    log(f"[seed {seed} {arm}] evaluating")
    started = time.perf_counter()
    results = evaluate(run_dir, plan.data_root, plan.scale, recipe)
    times["eval_seconds"] = round(time.perf_counter() - started, 1)
    times["eval_questions_per_second"] = round(results["count"] / max(times["eval_seconds"], 1e-9), 1)
    previous = run_dir / "times.json"
    if previous.exists():  # an interrupted invocation's time counts too
        earlier = json.loads(previous.read_text())
        times = {
            k: round(v + earlier.get(k, 0.0), 1) if k.endswith("seconds") else v for k, v in times.items()
        }
    times["train_stage_seconds"] = _stage_seconds(run_dir)
    result = summarise_result(arm, seed, run_dir, results, times)
    ckpt.atomic_write_text(done, json.dumps(result, indent=1) + "\n")
    log(f"[seed {seed} {arm}] overall {100 * result['overall']:.1f}% ({result['questions']} questions)")
    return result


def _stage_seconds(run_dir: Path) -> dict[str, float]:
    """Seconds each stage trained for in this run folder (adopted stages: in the donor's)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    shared = set()
    if (run_dir / SHARED_FILE).exists():
        shared = set(json.loads((run_dir / SHARED_FILE).read_text())["stages"])
    return {
        s["name"]: round(s.get("wall_time") or 0.0, 1)
        for s in summary["stages"]
        if s.get("kind") != "tokenizer" and s["name"] not in shared
    }


def _record_partial_time(run_dir: Path, seconds: float) -> None:
    """Time spent on a run that was interrupted, added to its next invocation's."""
    path = run_dir / "times.json"
    earlier = json.loads(path.read_text()) if path.exists() else {}
    earlier["train_seconds"] = round(earlier.get("train_seconds", 0.0) + seconds, 1)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_text(path, json.dumps(earlier) + "\n")


# ---------------------------------------------------------------------------------------- the experiment


def check_output(plan: Plan) -> None:
    """A fresh folder, or with --resume the same experiment (same scale file) as before."""
    marker = plan.output / EXPERIMENT_FILE
    started = any(plan.output.glob("seed-*/*")) or marker.exists()
    if started and not plan.resume:
        raise ExperimentError(
            f"{plan.output} already holds an experiment; pass --resume to continue it, or another --output"
        )
    if marker.exists():
        before = json.loads(marker.read_text())
        if before.get("identity") != plan.identity():
            raise ExperimentError(
                f"{plan.output} holds an experiment at another scale or with other recipes "
                f"({before.get('identity')}); use another --output"
            )
    plan.output.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_text(
        marker, json.dumps({"identity": plan.identity(), "configs": str(plan.configs)}, indent=1) + "\n"
    )


def prepare_data(plan: Plan, log: Callable[[str], None]) -> float:
    """Generate the shared world once (the recipes' own `data.generate`); seconds taken."""
    recipe = Arm.load(plan.configs, "united").recipe(plan.scale, plan.seeds[0], plan.data_root)
    started = time.perf_counter()
    if not (plan.data_root / ".generated.json").exists():
        log(f"generating the ShapesWorld data into {plan.data_root}")
    Run(recipe, D.DistInfo(), plan.output, resume=True).prepare_data()
    seconds = time.perf_counter() - started
    times = plan.output / "data-time.json"
    if not times.exists():
        ckpt.atomic_write_text(times, json.dumps({"seconds": round(seconds, 1)}) + "\n")
    return seconds


def execute(plan: Plan, log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Run every requested arm-seed not finished yet; the results of those that finish."""
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    if D.launched_world_size() > 1:
        raise ExperimentError("experiments run in one process; start them without torchrun")
    for arm in plan.arms:
        run_arm(arm)  # unknown names fail before any work
    if not plan.seeds:
        raise ExperimentError("--seeds: at least one seed")
    for arm in {run_arm(a) for a in plan.arms}:  # every recipe is checked before any work
        Arm.load(plan.configs, arm).recipe(plan.scale, plan.seeds[0], plan.data_root)
    check_output(plan)
    prepare_data(plan, log)
    if plan.jobs > 1 and len(plan.seeds) > 1:
        run_in_processes(plan, log)
        return [r for per_seed in collect(plan.output).values() for r in per_seed.values()]
    united = Arm.load(plan.configs, "united").recipe(plan.scale, plan.seeds[0], plan.data_root)
    if united.run.cache_media and plan.media_cache is None:
        plan.media_cache = MediaCache()
    results = []
    for arm, seed in plan.runs():
        started = time.perf_counter()
        try:
            results.append(run_one(plan, arm, seed, log))
        except BaseException:
            _record_partial_time(arm_dir(plan.output, arm, seed), time.perf_counter() - started)
            raise
    return results


def run_in_processes(plan: Plan, log: Callable[[str], None]) -> None:
    """Each seed in a process of its own (`--seed S --resume`), `plan.jobs` at a time: on a quiet
    machine, one-thread runs side by side use the cores better than one run with more threads."""
    import signal
    import subprocess

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    pending = list(plan.seeds)
    running: dict[int, subprocess.Popen] = {}
    failed = []
    previous = signal.signal(signal.SIGTERM, stop)  # a TERM (e.g. from timeout) ends the seeds' runs too
    try:
        while pending or running:
            while pending and len(running) < plan.jobs:
                seed = pending.pop(0)
                command = [
                    sys.executable, "-m", "videollava", "experiment", "ablations", "--scale", plan.scale.name,
                    "--configs", str(plan.configs), "--output", str(plan.output), "--seed", str(seed),
                    "--arms", ",".join(plan.arms), "--resume", "--no-report",
                ]  # fmt: skip
                log(f"[seed {seed}] started in its own process")
                running[seed] = subprocess.Popen(command)
            time.sleep(2.0)
            for seed, process in list(running.items()):
                if process.poll() is not None:
                    del running[seed]
                    if process.returncode != 0:
                        failed.append(seed)
                    log(f"[seed {seed}] process ended with status {process.returncode}")
    finally:
        for process in running.values():  # interrupted: no seed's run outlives this one
            process.terminate()
        for process in running.values():
            process.wait()
        signal.signal(signal.SIGTERM, previous)
    if failed:
        raise ExperimentError(f"seed(s) {failed} failed; see the log above, then run again with --resume")


def reproduce_command(scale: str, arm: str, seed: int, output: str) -> str:
    """The command that re-runs one arm at one seed alone, into a folder of its own."""
    return f"videollava experiment ablations --scale {scale} --arms {arm} --seed {seed} --output {output}"


def collect(output: Path) -> dict[str, dict[int, dict[str, Any]]]:
    """Finished results in a folder: reported arm -> seed -> result (joint is united's run)."""
    found: dict[str, dict[int, dict[str, Any]]] = {arm: {} for arm in ARMS}
    for path in sorted(output.glob(f"seed-*/*/{RESULT_FILE}")):
        result = json.loads(path.read_text())
        for arm in ARMS:
            if run_arm(arm) == result["arm"]:
                found[arm][int(result["seed"])] = result | {"arm": arm}
    return found
