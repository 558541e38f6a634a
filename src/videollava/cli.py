"""The `videollava` command: each subcommand lives beside the code it drives and registers itself here."""

from __future__ import annotations

import argparse
import importlib
import sys

from videollava.errors import VideoLlavaError

# subcommand name -> module that defines `register(subparsers)`; imported lazily so `--help` stays fast.
SUBCOMMANDS = {
    "ask": "videollava.infer.ask",
    "convert": "videollava.model.convert",
    "shapesworld": "videollava.data.shapesworld",
    "train": "videollava.train.runner",
    "eval": "videollava.eval.cli",
    "serve": "videollava.serve.api",
    "chat": "videollava.serve.chat",
    "web": "videollava.serve.web",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="videollava", description="Ask, train, evaluate and serve Video-LLaVA."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        if only is not None and name != only:
            subparsers.add_parser(name, add_help=False)
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name and error.name.startswith("videollava"):
                continue  # subcommand not part of this build
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Import only the module of the chosen subcommand: heavy dependencies load on demand.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=chosen if chosen in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except VideoLlavaError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
