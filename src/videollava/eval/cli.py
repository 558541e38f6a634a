"""`videollava eval`: every benchmark through one harness; `merge` joins shards, `report` compares runs."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from videollava.arguments import add_model_options, add_visual_tokens_option, positive_int
from videollava.errors import VideoLlavaError


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def register(subparsers: argparse._SubParsersAction) -> None:
    from videollava.eval.registry import TASK_NAMES, get_task

    parser = subparsers.add_parser(
        "eval",
        help="evaluate a checkpoint",
        description="Evaluate a checkpoint on a benchmark: `videollava eval TASK --data-dir D`. "
        "`videollava eval --list` lists the tasks and the files each reads.",
    )
    parser.add_argument("--list", action="store_true", help="list the tasks and the files each expects")
    parser.set_defaults(func=run, eval_command=None)
    commands = parser.add_subparsers(dest="eval_command", metavar="TASK|merge|report")

    for name in TASK_NAMES:
        task = get_task(name)
        sub = commands.add_parser(name, help=task.summary, description=task.summary)
        _task_options(sub, shapesworld=name == "shapesworld")

    merge = commands.add_parser("merge", help="join the folders of a sharded run", description=(
        "Join the finished folders of a sharded run into what an unsharded run writes; every question "
        "must be answered exactly once across them."
    ))  # fmt: skip
    merge.add_argument("dirs", nargs="+", type=Path, metavar="DIR")
    merge.add_argument("--output", type=Path, required=True, help="folder for the merged outputs")

    report = commands.add_parser("report", help="put finished runs side by side (markdown + PNG)")
    report.add_argument("dirs", nargs="+", type=Path, metavar="DIR")
    report.add_argument("--output", type=Path, default=None, help="write the markdown here (default: stdout)")
    report.add_argument("--png", type=Path, default=None, help="bar chart of the headline metrics")


def _task_options(sub: argparse.ArgumentParser, shapesworld: bool) -> None:
    add_model_options(sub)
    add_visual_tokens_option(sub)
    # ShapesWorld's command took --data and --num-frames before it joined the harness.
    names = ("--data-dir", "--data") if shapesworld else ("--data-dir",)
    sub.add_argument(
        *names, dest="data_dir", type=Path, required=True, help="the benchmark's folder (see --list)"
    )
    sub.add_argument(
        "--output", type=Path, default=None, help="run folder (default: a new runs/eval/TASK-DATE-TIME)"
    )
    sub.add_argument(
        "--frames", "--num-frames", dest="frames", type=positive_int, default=None,
        help="frames per video (default: the model's)",
    )  # fmt: skip
    sub.add_argument(
        "--batch-size", type=positive_int, default=8, help="requests decoded together (default 8)"
    )
    sub.add_argument("--limit", type=positive_int, default=None, help="only the first N questions")
    sub.add_argument("--shard", default=None, metavar="I/N", help="answer part I of N (by question id)")
    sub.add_argument("--resume", action="store_true", help="continue the run in --output")
    sub.add_argument(
        "--max-new-tokens", type=positive_int, default=None, help="answer length limit (default: the task's)"
    )
    sub.add_argument(
        "--template", default=None, help="prompt template (default: the task's, as the paper ran it)"
    )
    sub.add_argument(
        "--prepare-option", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
        help="an option handed to Pipeline.prepare for every request (VALUE read as JSON when it parses)",
    )  # fmt: skip
    judge = sub.add_argument_group("judge (LLM-judged tasks)")
    judge.add_argument(
        "--judge", choices=["exact", "http"], default=None, help="exact: offline exact/contains match"
    )
    judge.add_argument(
        "--judge-url", default=None, help="an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1"
    )
    judge.add_argument(
        "--judge-model", default=None, help="the judge model's name (recorded with the results)"
    )
    judge.add_argument(
        "--judge-key-env", default=None, metavar="VAR", help="environment variable holding the API key"
    )
    judge.add_argument(
        "--judge-cache", type=Path, default=None, help="verdict cache (default: ~/.cache/videollava)"
    )
    judge.add_argument(
        "--judge-workers", type=positive_int, default=4, help="judge calls in flight (default 4)"
    )
    judge.add_argument(
        "--judge-attempts", type=positive_int, default=3, help="tries per unreadable reply (default 3)"
    )
    judge.add_argument(
        "--judge-prompts", type=Path, default=None, metavar="FILE",
        help='JSON {prompt name: {"system", "user"}} replacing built-in judge prompts (e.g. a benchmark\'s own)',
    )  # fmt: skip
    judge.add_argument(
        "--judge-backoff", type=float, default=1.0, metavar="SECONDS",
        help="first wait before a retry, doubled for each next one (default 1)",
    )  # fmt: skip
    if shapesworld:
        sub.add_argument("--markdown", type=Path, default=None, help="also write the ShapesWorld report here")
        sub.add_argument(
            "--check-targets", action="store_true", help="exit with status 1 when a target is not met"
        )


def run(args: argparse.Namespace) -> int:
    from videollava.eval.registry import describe, get_task

    if args.list:
        sys.stdout.write(describe())
        return 0
    if args.eval_command is None:
        raise VideoLlavaError("name a task (see `videollava eval --list`), or merge / report")
    if args.eval_command == "merge":
        from videollava.eval.runner import merge

        results = merge(get_task, args.dirs, args.output)
        sys.stdout.write((args.output / "results.md").read_text(encoding="utf-8"))
        print(f"merged {results['count']} items into {args.output}", file=sys.stderr)
        return 0
    if args.eval_command == "report":
        from videollava.eval.report import compare

        text = compare(args.dirs, args.png)
        if args.output is not None:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(text, encoding="utf-8")
        sys.stdout.write(text)
        return 0
    return _run_task(args, get_task(args.eval_command))


def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) under torchrun; (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def _run_task(args: argparse.Namespace, task) -> int:
    from videollava.eval.items import Shard
    from videollava.eval.judge import default_cache_path, make_judge
    from videollava.eval.runner import RunConfig, merge, run
    from videollava.infer.pipeline import Pipeline, default_model_path

    shard = Shard.parse(args.shard) if args.shard else Shard()
    rank, world, local_rank = _distributed()
    output = args.output
    if output is None:
        if args.resume or world > 1:
            raise VideoLlavaError(
                "--resume and torchrun need --output: the run folder to continue or to share"
            )
        # A fresh folder per run: running the same command again never meets an earlier run.
        output = Path("runs") / "eval" / f"{task.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    device = args.device
    if world > 1 and args.shard is None:
        # Under torchrun each rank answers one shard; rank 0 merges them when all are finished.
        shard = Shard(rank, world)
        import torch

        if device == "auto" and torch.cuda.is_available():
            device = f"cuda:{local_rank}"
    folder = output / f"shard-{shard.index}-of-{shard.count}" if world > 1 and args.shard is None else output
    judge_kind = args.judge or ("http" if args.judge_url else None)
    judge = None
    if task.judge is not None:
        judge = make_judge(
            judge_kind, args.judge_url, args.judge_model, args.judge_key_env,
            args.judge_cache or default_cache_path(), args.judge_prompts, reply_attempts=args.judge_attempts,
            backoff=args.judge_backoff,
        )  # fmt: skip
    elif judge_kind is not None:
        print(f"note: task {task.name} is scored by rules; the judge options are ignored", file=sys.stderr)
    model = args.model if args.model is not None else str(default_model_path())
    config = RunConfig(
        task=task.name, model=model, data_dir=str(args.data_dir), frames=args.frames, batch_size=args.batch_size,
        limit=args.limit, shard=str(shard), max_new_tokens=args.max_new_tokens, template=args.template,
        prepare_options=dict(args.prepare_option) | _visual_tokens(args),
    )  # fmt: skip
    print(f"loading {model}", file=sys.stderr, flush=True)
    pipeline = Pipeline.from_pretrained(model, dtype=args.dtype, device=device, quantize=args.quantize)
    try:
        results = run(
            task, pipeline, config, folder, judge, resume=args.resume, judge_workers=args.judge_workers
        )
    finally:
        if hasattr(judge, "close"):
            judge.close()
    print(f"wrote {folder}", file=sys.stderr)
    if world > 1 and args.shard is None:
        if rank != 0:
            return 0
        folders = [output / f"shard-{i}-of-{world}" for i in range(world)]
        while not all((f / "results.json").exists() for f in folders):
            time.sleep(2.0)
        results = merge(lambda _: task, folders, output)
        folder = output
    sys.stdout.write((folder / "results.md").read_text(encoding="utf-8"))
    if task.name == "shapesworld":
        return _shapesworld_extras(args, task, folder, results)
    return 0


def _visual_tokens(args: argparse.Namespace) -> dict[str, Any]:
    """`--visual-tokens` as a prepare option, so a resumed run must keep the same budget."""
    return {} if args.visual_tokens is None else {"visual_tokens": args.visual_tokens}


def _shapesworld_extras(args: argparse.Namespace, task, folder: Path, results: dict[str, Any]) -> int:
    """The ShapesWorld report as `--markdown` writes it, and `--check-targets`."""
    from videollava.eval.store import read_records

    if args.markdown is not None:
        records = read_records(folder / "predictions.jsonl")
        report = task.report(
            records,
            {"model": results["model"], "data_dir": results["data_dir"], "seconds": results["seconds"]},
        )
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(report.to_markdown(), encoding="utf-8")
        print(f"wrote {args.markdown}", file=sys.stderr)
    failures = results["metrics"]["target_failures"]
    if args.check_targets:
        for failure in failures:
            print(f"target not met: {failure}", file=sys.stderr)
        return 1 if failures else 0
    return 0
