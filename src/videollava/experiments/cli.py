"""`videollava experiment ablations`: run the ablation arms over seeds, resumably, and report them."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from videollava.arguments import positive_int
from videollava.errors import VideoLlavaError


def default_configs() -> Path:
    """configs/ablations of the source tree this package runs from, else of the working directory."""
    source = Path(__file__).resolve().parents[3] / "configs" / "ablations"
    return source if source.is_dir() else Path("configs") / "ablations"


def _arms(text: str) -> list[str]:
    from videollava.experiments.recipes import ARMS

    names = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in names if a not in ARMS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown arm(s) {unknown or text!r}; the arms are {', '.join(ARMS)}"
        )
    return names


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "experiment",
        help="run an experiment: recipes side by side over seeds, reported",
        description="Experiments built on training and evaluation.",
    )
    commands = parser.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    ablations = commands.add_parser(
        "ablations",
        help="the paper's ablations: alignment before projection, and joint training",
        description=(
            "Train and score the ablation arms (united, separated-mae, separated-text, joint = united, "
            "video-only, image-only) over seeds on ShapesWorld, then write the report. Resumable arm "
            "by arm and seed by seed."
        ),
    )
    ablations.add_argument("--scale", choices=["smoke", "full"], default="full", help="default full")
    ablations.add_argument(
        "--seeds", type=positive_int, default=3, help="seeds 0..N-1 (default 3; --seed picks others)"
    )
    ablations.add_argument(
        "--seed", dest="seed_list", type=int, action="append", default=[], metavar="S",
        help="run this seed (repeatable); overrides --seeds",
    )  # fmt: skip
    ablations.add_argument(
        "--arms", type=_arms, default=None, metavar="A,B", help="only these arms (default: all six)"
    )
    ablations.add_argument(
        "--output", type=Path, default=None, help="experiment folder (default runs/ablations[-smoke])"
    )
    ablations.add_argument(
        "--resume", action="store_true", help="keep every finished arm-seed and continue the rest"
    )
    ablations.add_argument(
        "--report-dir", type=Path, default=None, help="where the report goes (default OUTPUT/report)"
    )
    ablations.add_argument(
        "--report-only", action="store_true", help="only build the report from what has finished"
    )
    ablations.add_argument(
        "--bootstrap", type=positive_int, default=10000, help="bootstrap resamples per difference"
    )
    ablations.add_argument(
        "--jobs", type=positive_int, default=1,
        help="seeds run side by side, one process each (default 1; 2 uses both cores of a quiet machine)",
    )  # fmt: skip
    ablations.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)
    ablations.add_argument(
        "--configs", type=Path, default=None, help="arm and scale files (default configs/ablations)"
    )
    ablations.set_defaults(func=run)


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    from videollava.experiments.ablations import Plan, execute
    from videollava.experiments.recipes import ARMS, Scale
    from videollava.experiments.report import build
    from videollava.extras import require

    require("experiment", "train", "matplotlib")
    configs = args.configs or default_configs()
    if not configs.is_dir():
        raise VideoLlavaError(f"--configs {configs}: no such folder (the arm and scale files)")
    scale = Scale.load(configs, args.scale)
    seeds = sorted(set(args.seed_list)) if args.seed_list else list(range(args.seeds))
    output = args.output or Path("runs") / ("ablations" if args.scale == "full" else "ablations-smoke")
    arms = args.arms or list(ARMS)
    command = "videollava " + shlex.join(sys.argv[1:] if argv is None else argv)
    if not args.report_only:
        plan = Plan(
            configs=configs, output=output, scale=scale, seeds=seeds, arms=arms, resume=args.resume,
            jobs=args.jobs,
        )  # fmt: skip
        execute(plan)
        if args.no_report:
            return 0
    elif not output.is_dir():
        raise VideoLlavaError(f"--output {output}: no such experiment folder")
    # The command that runs the experiment (a report-only invocation is not it).
    data = build(
        output, scale, seeds, arms, args.report_dir, None if args.report_only else command, args.bootstrap
    )
    where = args.report_dir or output / "report"
    print(f"report: {where / 'ablations.md'}", file=sys.stderr)
    if data["missing"]:
        print(f"not finished: {', '.join(data['missing'])}", file=sys.stderr)
    return 0
