"""`videollava chat`: a multi-turn conversation about images and videos in the terminal, streamed.

Each question is sent with the whole conversation so far; the engine's prefix cache finds the earlier
turns (and the video's rows) again, so a follow-up costs only its new tokens.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import TextIO

from videollava.arguments import add_model_options, add_visual_tokens_option
from videollava.data.conversation import ChatHistory
from videollava.errors import VideoLlavaError
from videollava.infer.engine import Engine
from videollava.infer.pipeline import Pipeline
from videollava.infer.request import Completion, MediaItem
from videollava.infer.sampling import SamplingParams

PROMPT = "you> "
ANSWER_PREFIX = "assistant> "
HELP = """commands:
  /image PATH   attach an image to your next question
  /video PATH   attach a video to your next question
  /reset        forget the conversation and its media
  /stats        engine and cache statistics
  /help         this help
  /quit         leave (Ctrl-D too)
anything else is a question; Ctrl-C stops an answer"""


class ChatSession:
    """A conversation (its turns and the media they showed) and the media waiting for the next question."""

    def __init__(self, pipeline: Pipeline, engine: Engine, params: SamplingParams, out: TextIO = sys.stdout):
        self.pipeline = pipeline
        self.engine = engine
        self.params = params
        self.out = out
        self.history: ChatHistory[MediaItem] = ChatHistory(pipeline.template)
        self.pending: list[MediaItem] = []

    def attach(self, kind: str, path_text: str) -> str:
        """Check and encode the file now, so a bad file is reported before any question is asked."""
        path = Path(path_text).expanduser()
        if not path.exists():
            raise VideoLlavaError(f"{path}: no such file")
        if not path.is_file():
            raise VideoLlavaError(f"{path}: not a file")
        item = MediaItem(kind, str(path))
        features = self.pipeline.encode_media(item)
        self.pending.append(item)
        return f"attached {kind} {path.name} ({features.shape[0]} visual tokens) to your next question"

    def reset(self) -> None:
        self.history.clear()
        self.pending.clear()

    def ask(self, question: str) -> Completion:
        """Stream the answer to `out`; the turn joins the history only when it completed."""
        prompt = self.history.prompt(question, self.pending)
        prepared = self.pipeline.prepare(prompt, self.history.media + self.pending)
        handle = self.engine.submit(prepared, self.params)
        self.out.write(ANSWER_PREFIX)
        self.out.flush()
        try:
            for delta in handle:
                self.out.write(delta.text)
                self.out.flush()
        except KeyboardInterrupt:
            handle.cancel()
            completion = handle.result()
            self.out.write(" [stopped]\n")
            self.out.flush()
            return completion
        completion = handle.result()
        self.out.write("\n")
        if completion.error:
            raise VideoLlavaError(f"generation failed: {completion.error}")
        self.history.add(question, self.pending, completion.text)
        self.pending = []
        self.out.write(stats_line(completion) + "\n")
        self.out.flush()
        return completion

    def stats(self) -> str:
        stats = self.engine.stats
        cache = self.pipeline.feature_cache
        rate = stats.tokens_generated / stats.busy_seconds if stats.busy_seconds else 0.0
        return "\n".join(
            [
                f"requests: {stats.requests_total} ({stats.requests_failed} failed)",
                f"tokens generated: {stats.tokens_generated} ({rate:.1f} per busy second)",
                f"prefix cache: {self.engine.prefix_cache.hits} hits, "
                f"{self.engine.prefix_cache.reused_tokens} reused prefix tokens",
                f"feature cache: {cache.hits} hits, {cache.misses} misses",
                f"conversation: {len(self.history)} turns, {len(self.history.media)} media shown, "
                f"{len(self.pending)} attached for the next question",
            ]
        )


def stats_line(completion: Completion) -> str:
    first = f"{completion.first_token_seconds:.2f}" if completion.first_token_seconds is not None else "-"
    return (
        f"[{len(completion.token_ids)} tokens in {completion.seconds:.2f} s, first after {first} s, "
        f"reused {completion.reused_prefix_tokens} prefix tokens, {completion.finish_reason}]"
    )


def handle_line(session: ChatSession, line: str) -> bool:
    """Act on one input line; False when the chat should end."""
    line = line.strip()
    if not line:
        return True
    out = session.out
    if not line.startswith("/"):
        session.ask(line)
        return True
    command, _, rest = line.partition(" ")
    command = command.lower()
    if command in ("/quit", "/exit", "/q"):
        return False
    if command in ("/image", "/video"):
        if not rest.strip():
            raise VideoLlavaError(f"usage: {command} PATH")
        try:
            parts = shlex.split(rest)
        except ValueError:
            parts = [rest.strip()]
        path = parts[0] if len(parts) == 1 else rest.strip()
        out.write(session.attach(command[1:], path) + "\n")
    elif command == "/reset":
        session.reset()
        out.write("conversation and media cleared\n")
    elif command == "/stats":
        out.write(session.stats() + "\n")
    elif command == "/help":
        out.write(HELP + "\n")
    else:
        raise VideoLlavaError(f"unknown command {command}; /help lists them")
    out.flush()
    return True


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("chat", help="chat about images and videos in the terminal")
    add_model_options(parser)
    add_visual_tokens_option(parser)
    parser.add_argument(
        "--image", action="append", default=[], metavar="FILE", help="attach to the first question"
    )
    parser.add_argument(
        "--video", action="append", default=[], metavar="FILE", help="attach to the first question"
    )
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    out = sys.stdout
    out.write("loading model...\n")
    out.flush()
    pipeline = Pipeline.from_pretrained(
        args.model,
        dtype=args.dtype,
        device=args.device,
        visual_tokens=args.visual_tokens,
        quantize=args.quantize,
    )
    engine = Engine.for_pipeline(pipeline, max_batch_size=1, max_queue=4).start()
    session = ChatSession(pipeline, engine, params, out)
    out.write("Video-LLaVA chat. /help for commands, /quit or Ctrl-D to leave.\n")
    for kind, paths in (("image", args.image), ("video", args.video)):
        for path in paths:
            try:
                out.write(session.attach(kind, path) + "\n")
            except VideoLlavaError as error:
                out.write(f"error: {error}\n")
    out.flush()
    try:
        while True:
            try:
                line = input(PROMPT)
            except EOFError:
                out.write("\n")
                break
            except KeyboardInterrupt:
                out.write("\n(/quit or Ctrl-D to leave)\n")
                continue
            try:
                if not handle_line(session, line):
                    break
            except VideoLlavaError as error:
                out.write(f"error: {error}\n")
            except KeyboardInterrupt:
                out.write("\n")
            out.flush()
    finally:
        engine.stop()
    out.write("bye\n")
    out.flush()
    return 0
