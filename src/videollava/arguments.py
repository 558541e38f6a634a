"""Argparse value types shared by every subcommand: a bad value is refused in one line, before any work."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """A whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def port_number(text: str) -> int:
    """A TCP port (0 lets the system pick one)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0-65535, got {value}")
    return value


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """`--device`: where the weights are loaded and every tensor of the model's work lives."""
    parser.add_argument(
        "--device",
        default="auto",
        metavar="auto|cpu|cuda|cuda:N",
        help="where the model runs (default: auto, the first GPU when there is one, else the CPU)",
    )


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """`--model`, `--dtype` and `--device`: which checkpoint a command loads, in which precision, where."""
    parser.add_argument(
        "--model", default=None, help="checkpoint folder or hub id (default: bundled ShapesWorld model)"
    )
    parser.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float32"],
        default="auto",
        help="precision of the weights (default: auto, bfloat16 on GPUs that support it and on CPUs with AMX)",
    )
    add_device_option(parser)
    parser.add_argument(
        "--quantize",
        choices=["int8"],
        default=None,
        help="store the language model's attention and MLP weights in int8, one scale per output "
        "channel (activations keep --dtype; for answering only)",
    )


def add_visual_tokens_option(parser: argparse.ArgumentParser) -> None:
    """`--visual-tokens N`: patch tokens kept per image or video frame, for every request a command answers."""
    parser.add_argument(
        "--visual-tokens",
        type=positive_int,
        default=None,
        metavar="N",
        help="keep N patch tokens per image or video frame, the ones the vision tower's CLS attends to "
        "most, in their order (fewer tokens, longer videos fit; default: the model's, else all)",
    )
