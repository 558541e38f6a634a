"""The `videollava` command: each subcommand lives beside the code it drives and registers itself here."""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys
from dataclasses import dataclass

from videollava.errors import VideoLlavaError
from videollava.extras import missing_dependency


@dataclass(frozen=True)
class Subcommand:
    module: str  # defines `register(subparsers)`
    summary: str  # the line `videollava --help` shows
    extra: str | None = None  # the pip extra that holds its optional dependencies


SUBCOMMANDS = {
    "ask": Subcommand("videollava.infer.ask", "answer a question about images and videos"),
    "convert": Subcommand("videollava.model.convert", "convert a checkpoint to the Hugging Face -hf layout"),
    "shapesworld": Subcommand(
        "videollava.shapesworld.generate", "synthetic shapes images and videos with exact answers"
    ),
    "train": Subcommand(
        "videollava.train.runner",
        "train a model from a recipe (tokenizer, alignment, projector, finetune stages)",
        extra="train",
    ),
    "eval": Subcommand("videollava.eval.cli", "evaluate a checkpoint"),
    "experiment": Subcommand(
        "videollava.experiments.cli",
        "run an experiment: recipes side by side over seeds, reported (ablations)",
        extra="train",
    ),
    "serve": Subcommand("videollava.serve.api", "serve an OpenAI-compatible chat completions API"),
    "chat": Subcommand("videollava.serve.chat", "chat about images and videos in the terminal"),
    "web": Subcommand(
        "videollava.serve.web", "a web page to chat about images and videos (Gradio)", extra="web"
    ),
}


class Parser(argparse.ArgumentParser):
    """Usage errors in one line (what is wrong, where help is), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; only the module of subcommand `only` is imported (none if None)."""
    parser = Parser(prog="videollava", description="Ask, train, evaluate and serve Video-LLaVA.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, subcommand in SUBCOMMANDS.items():
        if name == only:
            importlib.import_module(subcommand.module).register(subparsers)
        else:
            # Listed in `videollava --help` without importing anything heavy.
            subparsers.add_parser(name, help=subcommand.summary, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Import only the module of the chosen subcommand: heavy dependencies load on demand.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    if chosen is not None and chosen not in SUBCOMMANDS:
        close = difflib.get_close_matches(chosen, SUBCOMMANDS, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"the commands are {', '.join(SUBCOMMANDS)}"
        print(f"videollava: error: unknown command {chosen!r}; {hint}", file=sys.stderr)
        return 2
    try:
        parser = build_parser(only=chosen)
    except ModuleNotFoundError as error:
        if chosen is None or (error.name or "").startswith("videollava"):
            raise
        # A dependency of the chosen subcommand is missing: say what to install, even for --help.
        missing = missing_dependency(chosen, error.name or "a required", SUBCOMMANDS[chosen].extra)
        print(f"error: {missing}", file=sys.stderr)
        return 2
    if not argv:
        parser.print_help(sys.stderr)
        return 2
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
