"""Running a task: answer its items through the engine, judge them, and write the run's outputs.

One run answers one shard of one task into one folder. Each answered item is appended to
`predictions.jsonl` (synced) as soon as it is answered, and sent to the judge at once (judging
overlaps answering); `--resume` answers only what the file does not hold yet, and judge verdicts
come from the judge's cache, so nothing is paid twice. When every item of the shard is answered,
the folder is finished: `predictions.jsonl` rewritten in the task's item order with each item's
verdict, `results.json`, `results.md` and the task's upload files. `merge` turns the folders of
all shards into exactly what an unsharded run writes.
"""

from __future__ import annotations

import inspect
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from videollava import __version__
from videollava.data.conversation import build_prompt
from videollava.errors import VideoLlavaError
from videollava.eval.items import Item, Shard, Task, unique_ids
from videollava.eval.judge import Judge, JudgeError, JudgePrompt
from videollava.eval.report import results_markdown
from videollava.eval.store import (
    PREDICTIONS,
    RESULTS,
    RESULTS_MD,
    RUN,
    OutputError,
    RecordWriter,
    read_json_file,
    read_records,
    write_json,
    write_records,
)
from videollava.infer.engine import Engine, Handle
from videollava.infer.pipeline import Pipeline
from videollava.infer.sampling import SamplingParams

MALFORMED_POLICY = (
    "a judge reply that could not be read after every retry is counted as malformed and left out of "
    "both accuracy and score (never counted as 'no')"
)


@dataclass
class RunConfig:
    """What decides a run's answers; a resumed run must match the one it continues."""

    task: str
    model: str
    data_dir: str
    frames: int | None = None
    batch_size: int = 8
    limit: int | None = None
    shard: str = "0/1"
    max_new_tokens: int | None = None
    template: str | None = None  # None: the task's (or, for tasks without one, the model's)
    # Per-run options handed to Pipeline.prepare for every request (e.g. visual-token settings).
    prepare_options: dict[str, Any] = field(default_factory=dict)

    # Fields that may differ between a run and its resumption without changing any answer.
    FREE = ("batch_size",)

    def identity(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in self.FREE}


def load_items(task: Task, data_dir: Path, limit: int | None = None) -> list[Item]:
    """The task's items in its own order: the first `limit` of them if given, ids checked unique."""
    task.check_data(data_dir)
    items = task.load(data_dir)
    unique_ids(items, data_dir)
    return items[:limit] if limit is not None else items


# ------------------------------------------------------------------------------------------ answering


def template_for(task: Task, config: RunConfig, pipeline: Pipeline) -> str:
    return config.template or task.template or pipeline.template.name


def check_prepare_options(pipeline: Pipeline, options: dict[str, Any]) -> None:
    """--prepare-option names must be options of this Pipeline.prepare (checked before any work)."""
    own = ("prompt", "media", "num_frames", "cancelled")
    accepted = [name for name in inspect.signature(pipeline.prepare).parameters if name not in own]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise VideoLlavaError(
            f"--prepare-option {', '.join(unknown)}: not an option of Pipeline.prepare "
            f"(it takes {', '.join(accepted) or 'none'})"
        )


def prepare_request(pipeline: Pipeline, item: Item, prompt_text: str, template: str, config: RunConfig):
    """The one place a question becomes an engine request; per-run options go to Pipeline.prepare."""
    images = sum(m.kind == "image" for m in item.media)
    videos = sum(m.kind == "video" for m in item.media)
    prompt = build_prompt(prompt_text, images, videos, template)
    return pipeline.prepare(prompt, item.media, num_frames=config.frames, **config.prepare_options)


def answer_items(
    pipeline: Pipeline,
    task: Task,
    items: Sequence[Item],
    config: RunConfig,
    on_answer: Callable[[Item, dict[str, Any]], None],
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Greedy answers to every prompt of every item, batched by the engine; `on_answer` per item, in order.

    The engine's loop runs in its own thread while this one prepares the next requests (decoding
    media, running the towers), with a window of items in flight. A request that fails (bad media,
    too long) gives an empty answer with its error; the others go on.
    """
    template = template_for(task, config, pipeline)
    params = SamplingParams(max_new_tokens=config.max_new_tokens or task.max_new_tokens)
    window = max(2, 2 * config.batch_size)
    engine = Engine.for_pipeline(pipeline, max_batch_size=config.batch_size, max_queue=8 * window)
    engine.start()
    flight: deque[tuple[Item, list[Handle | str]]] = deque()
    done = 0

    def finish() -> None:
        nonlocal done
        item, handles = flight.popleft()
        texts: list[str] = []
        errors: list[str] = []
        for handle in handles:
            if isinstance(handle, str):
                texts.append("")
                errors.append(handle)
                continue
            completion = handle.result()
            texts.append(completion.text.strip())
            if completion.error is not None:
                errors.append(completion.error)
        answer: dict[str, Any] = {"pred": texts[0]}
        if len(texts) > 1:
            answer["pred2"] = texts[1]
        if errors:
            answer["error"] = "; ".join(errors)
        on_answer(item, answer)
        done += 1
        if progress is not None:
            progress(done, len(items))

    try:
        for item in items:
            handles: list[Handle | str] = []
            for text in item.prompts:
                try:
                    prepared = prepare_request(pipeline, item, text, template, config)
                except VideoLlavaError as error:
                    handles.append(f"{type(error).__name__}: {error}")
                    continue
                handles.append(engine.submit(prepared, params))
            flight.append((item, handles))
            while len(flight) >= window:
                finish()
        while flight:
            finish()
    finally:
        engine.stop()


# ------------------------------------------------------------------------------------------ judging


def judge_record(task: Task, judge: Judge, record: dict[str, Any]) -> Any:
    """The verdict(s) for one answered record: one dict, or {axis: dict} for multi-axis tasks."""
    requests = task.judge_requests(record)
    verdicts = {}
    for axis, (prompt, fields) in requests.items():
        verdicts[axis] = _stored(judge.verdict(prompt, fields))
    return verdicts[""] if set(verdicts) == {""} else verdicts


def _stored(verdict: dict[str, Any]) -> dict[str, Any]:
    kept = {"pred": verdict.get("pred"), "score": verdict.get("score"), "raw": verdict.get("raw")}
    for key in ("reference_score",):
        if key in verdict:
            kept[key] = verdict[key]
    if verdict.get("malformed"):
        kept |= {"malformed": True, "raw_attempts": verdict.get("raw_attempts", [])}
    return kept


def judge_info(task: Task, judge: Judge | None) -> dict[str, Any] | None:
    if judge is None or task.judge is None:
        return None
    prompts: list[JudgePrompt] = [judge.overrides.get(p.name, p) for p in task.judge_prompts()]
    return {
        "url": judge.url,
        "model": judge.model,
        "prompt_hash": {p.name: p.hash for p in prompts},
        "prompts_given": sorted(judge.overrides),  # replaced by --judge-prompts
        "temperature": getattr(judge, "temperature", None),
        "malformed": MALFORMED_POLICY,
    }


def count_malformed(records: Sequence[dict[str, Any]]) -> int:
    count = 0
    for record in records:
        verdict = record.get("judge")
        if verdict is None:
            continue
        parts = [verdict] if "raw" in verdict else list(verdict.values())
        count += sum(bool(p.get("malformed")) for p in parts)
    return count


# ------------------------------------------------------------------------------------------ a run


def print_progress(done: int, total: int) -> None:
    if done == total or done % 25 == 0:
        print(f"answered {done}/{total}", file=sys.stderr, flush=True)


def run(
    task: Task,
    pipeline: Pipeline,
    config: RunConfig,
    out_dir: Path,
    judge: Judge | None = None,
    resume: bool = False,
    judge_workers: int = 4,
    progress: Callable[[int, int], None] | None = print_progress,
) -> dict[str, Any]:
    """Answer (the rest of) one shard of a task into out_dir and finish the folder; returns results.json."""
    started = time.time()
    if task.judge is not None and judge is None:
        raise VideoLlavaError(
            f"task {task.name} is judged by an LLM: pass --judge-url URL --judge-model NAME "
            "(any OpenAI-compatible endpoint), or --judge exact for an offline exact-match stand-in"
        )
    check_prepare_options(pipeline, config.prepare_options)
    shard = Shard.parse(config.shard)
    items = shard.select(load_items(task, Path(config.data_dir), config.limit))
    out_dir.mkdir(parents=True, exist_ok=True)
    done = _start_folder(out_dir, config, {i.id for i in items}, resume)

    workers = ThreadPoolExecutor(max_workers=max(1, judge_workers)) if task.judge else None
    verdicts: dict[str, Future] = {}

    def send_to_judge(record: dict[str, Any]) -> None:
        if workers is not None and judge is not None:
            verdicts[record["id"]] = workers.submit(judge_record, task, judge, record)

    for record in done.values():
        send_to_judge(record)
    pending = [item for item in items if item.id not in done]
    try:
        with RecordWriter(out_dir / PREDICTIONS) as writer:

            def on_answer(item: Item, answer: dict[str, Any]) -> None:
                record = item.record() | answer
                writer.write(record)
                done[item.id] = record
                send_to_judge(record)

            if pending:
                answer_items(pipeline, task, pending, config, on_answer, progress)
        records = [done[item.id] for item in items]
        for record in records:
            if record["id"] in verdicts:
                try:
                    record["judge"] = verdicts[record["id"]].result()
                except JudgeError as error:
                    raise JudgeError(
                        f"{error}; every answer is kept in {out_dir / PREDICTIONS}: run again with --resume"
                    ) from None
    finally:
        if workers is not None:
            workers.shutdown(wait=True, cancel_futures=True)
    effective = {
        "frames": config.frames or pipeline.num_frames,
        "template": template_for(task, config, pipeline),
    }
    return finish_folder(
        task, config, out_dir, records, judge_info(task, judge), time.time() - started, effective
    )


def _start_folder(out_dir: Path, config: RunConfig, ids: set[str], resume: bool) -> dict[str, dict[str, Any]]:
    """Check the folder against the run (fresh, or the same run when resuming); the records it holds."""
    run_file, predictions = out_dir / RUN, out_dir / PREDICTIONS
    if not resume:
        if predictions.exists() or run_file.exists():
            raise OutputError(
                f"{out_dir} already holds a run; pass --resume to continue it, or another --output"
            )
        write_json(run_file, asdict(config))
        return {}
    if not run_file.exists():
        if predictions.exists():
            raise OutputError(f"{out_dir}: predictions.jsonl without run.json; cannot tell which run it was")
        write_json(run_file, asdict(config))
        return {}
    before = RunConfig(
        **{k: v for k, v in read_json_file(run_file).items() if k in RunConfig.__dataclass_fields__}
    )
    changed = [
        f"{k} was {before.identity().get(k)!r}, now {v!r}"
        for k, v in config.identity().items()
        if before.identity().get(k) != v
    ]
    if changed:
        raise OutputError(
            f"{out_dir} holds another run; --resume needs the same settings: " + "; ".join(changed)
        )
    write_json(run_file, asdict(config))
    records: dict[str, dict[str, Any]] = {}
    for record in read_records(predictions):
        record_id = str(record["id"])
        if record_id not in ids:
            raise OutputError(f"{predictions}: id {record_id!r} is not a question of this run")
        if record_id in records:
            raise OutputError(f"{predictions}: id {record_id!r} appears twice")
        record.pop("judge", None)  # judged again (from the cache) with this run's judge
        records[record_id] = record
    return records


def finish_folder(
    task: Task,
    config: RunConfig,
    out_dir: Path,
    records: list[dict[str, Any]],
    judge: dict[str, Any] | None,
    seconds: float,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """predictions.jsonl in item order with verdicts, results.json, results.md, the task's upload files."""
    write_records(out_dir / PREDICTIONS, records)
    metrics = task.score(records)
    results = {
        "task": task.name,
        "model": config.model,
        "frames": config.frames,
        "template": config.template or task.template,
        "metrics": metrics,
        "headline": task.headline,
        "count": len(records),
        "errors": sum("error" in r for r in records),
        "malformed": count_malformed(records),
        "judge": judge,
        "shard": config.shard,
        "limit": config.limit,
        "data_dir": config.data_dir,
        "max_new_tokens": config.max_new_tokens or task.max_new_tokens,
        "prepare_options": config.prepare_options,
        "version": __version__,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 1),
    } | (extra or {})
    results["files"] = [p.name for p in task.write_extra(records, out_dir, config.model)]
    write_json(out_dir / RESULTS, results)
    (out_dir / RESULTS_MD).write_text(results_markdown(task, results), encoding="utf-8")
    return results


# ------------------------------------------------------------------------------------------ merging


def merge(task_for: Callable[[str], Task], dirs: Sequence[Path], out_dir: Path) -> dict[str, Any]:
    """Join the finished folders of a sharded run into what an unsharded run writes.

    Every question of the run must be answered exactly once across the folders: missing or
    repeated ids are an error that lists them.
    """
    if not dirs:
        raise OutputError("merge needs at least one run folder")
    runs = []
    for folder in dirs:
        if not (folder / RESULTS).exists():
            raise OutputError(
                f"{folder}: no results.json; this shard has not finished (resume it with --resume)"
            )
        runs.append((folder, read_json_file(folder / RUN), read_json_file(folder / RESULTS)))
    first = RunConfig(**{k: v for k, v in runs[0][1].items() if k in RunConfig.__dataclass_fields__})
    same = {k: v for k, v in first.identity().items() if k != "shard"}
    for folder, run_data, _ in runs[1:]:
        other = RunConfig(
            **{k: v for k, v in run_data.items() if k in RunConfig.__dataclass_fields__}
        ).identity()
        diff = [k for k, v in same.items() if other.get(k) != v]
        if diff:
            raise OutputError(f"{folder} is another run than {runs[0][0]}: {', '.join(diff)} differ")
    judges = {_judge_identity(r) for _, _, r in runs}
    if len(judges) > 1:
        raise OutputError("the shards were judged by different judges or prompts; judge them alike first")
    task = task_for(first.task)
    items = load_items(task, Path(first.data_dir), first.limit)
    seen: dict[str, dict[str, Any]] = {}
    repeated: list[str] = []
    for folder, _, _ in runs:
        for record in read_records(folder / PREDICTIONS):
            record_id = str(record["id"])
            if record_id in seen:
                repeated.append(record_id)
            seen[record_id] = record
    ids = [item.id for item in items]
    missing = [i for i in ids if i not in seen]
    unknown = sorted(set(seen) - set(ids))
    if missing or repeated or unknown:
        parts = []
        if missing:
            parts.append(f"{len(missing)} unanswered: {missing[:20]}")
        if repeated:
            parts.append(f"{len(repeated)} answered more than once: {sorted(set(repeated))[:20]}")
        if unknown:
            parts.append(f"{len(unknown)} not questions of this run: {unknown[:20]}")
        raise OutputError("cannot merge: " + "; ".join(parts))
    out_dir.mkdir(parents=True, exist_ok=True)
    config = RunConfig(**(asdict(first) | {"shard": "0/1"}))
    write_json(out_dir / RUN, asdict(config) | {"merged_from": [str(d) for d in dirs]})
    seconds = sum(r.get("seconds", 0.0) for _, _, r in runs)
    return finish_folder(
        task, config, out_dir, [seen[i] for i in ids], runs[0][2].get("judge"), seconds,
        {"merged_from": [str(d) for d in dirs], "frames": runs[0][2].get("frames"), "template": runs[0][2].get("template")},
    )  # fmt: skip


def _judge_identity(results: dict[str, Any]) -> str:
    judge = results.get("judge") or {}
    return repr((judge.get("model"), sorted((judge.get("prompt_hash") or {}).items())))
