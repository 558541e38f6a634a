"""`videollava eval`: score a checkpoint on a benchmark and write a report people and scripts can read."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from videollava.arguments import add_model_options, positive_int
from videollava.errors import VideoLlavaError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``eval shapesworld`` to the ``videollava`` command."""
    parser = subparsers.add_parser(
        "eval", help="evaluate a checkpoint", description="Evaluate a checkpoint on a benchmark."
    )
    benchmarks = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    sw = benchmarks.add_parser(
        "shapesworld",
        help="ask every held-out ShapesWorld question and score the answers",
        description="Greedy answers to every held-out ShapesWorld question: accuracy per question "
        "type (images and videos apart) and POPE metrics per split.",
    )
    add_model_options(sw)
    sw.add_argument("--data", required=True, type=Path, help="dataset folder with test_questions.jsonl")
    sw.add_argument("--limit", type=positive_int, default=None, help="only the first N questions")
    sw.add_argument(
        "--batch-size", type=positive_int, default=16, help="requests decoded together (default 16)"
    )
    sw.add_argument(
        "--num-frames", type=positive_int, default=None, help="frames per video (default: the model's)"
    )
    sw.add_argument(
        "--max-new-tokens", type=positive_int, default=10, help="answer length limit (default 10)"
    )
    sw.add_argument("--output", type=Path, default=None, help="write the JSON report here")
    sw.add_argument("--markdown", type=Path, default=None, help="write the Markdown report here")
    sw.add_argument(
        "--check-targets", action="store_true", help="exit with status 1 when a target is not met"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.benchmark != "shapesworld":
        raise VideoLlavaError(f"unknown benchmark {args.benchmark!r}")

    from videollava.infer.pipeline import Pipeline, default_model_path
    from videollava.shapesworld.evaluate import check_targets, evaluate, print_progress

    model = args.model if args.model is not None else str(default_model_path())
    print(f"loading {model}", file=sys.stderr, flush=True)
    pipeline = Pipeline.from_pretrained(model, dtype=args.dtype, device=args.device, quantize=args.quantize)
    report = evaluate(
        pipeline,
        args.data,
        limit=args.limit,
        batch_size=args.batch_size,
        num_frames=args.num_frames,
        max_new_tokens=args.max_new_tokens,
        progress=print_progress,
    )
    report.info = {"model": model, "dtype": str(pipeline.model.dtype).removeprefix("torch.")} | report.info
    markdown = report.to_markdown()
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report.to_json(), encoding="utf-8")
        print(f"wrote {args.output}", file=sys.stderr)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown, encoding="utf-8")
        print(f"wrote {args.markdown}", file=sys.stderr)
    sys.stdout.write(markdown)
    if args.check_targets:
        failures = check_targets(report)
        for failure in failures:
            print(f"target not met: {failure}", file=sys.stderr)
        return 1 if failures else 0
    return 0
