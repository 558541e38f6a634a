"""`videollava ask`: one question, or a JSONL file of them, about images and videos."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from videollava.arguments import add_model_options, add_visual_tokens_option, positive_int
from videollava.errors import VideoLlavaError
from videollava.infer.engine import Engine
from videollava.infer.pipeline import Pipeline
from videollava.infer.request import Completion, MediaItem, Prepared
from videollava.infer.sampling import SamplingParams


@dataclass
class Question:
    """One request as users write it: a question (or a full raw prompt) and its media files."""

    prompt: str
    images: list[str] = field(default_factory=list)
    videos: list[str] = field(default_factory=list)
    raw_prompt: bool = False
    visual_tokens: int | None = None  # patch tokens kept per frame (None: the pipeline's default)

    def media(self) -> list[MediaItem]:
        return [MediaItem("image", p) for p in self.images] + [MediaItem("video", p) for p in self.videos]

    @classmethod
    def from_json(cls, data: dict[str, Any], raw_prompt: bool = False) -> Question:
        if not isinstance(data, dict) or not isinstance(data.get("prompt"), str):
            raise VideoLlavaError('each request needs a "prompt" string')

        def paths(one: str, many: str) -> list[str]:
            found = ([data[one]] if data.get(one) else []) + list(data.get(many) or [])
            if not all(isinstance(p, str) for p in found):
                raise VideoLlavaError(f'"{one}" / "{many}" must be file paths')
            return found

        check_prompt(data["prompt"])
        budget = data.get("visual_tokens")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise VideoLlavaError(f'"visual_tokens" must be a whole number of at least 1, got {budget!r}')
        return cls(data["prompt"], paths("image", "images"), paths("video", "videos"), raw_prompt, budget)


def check_prompt(prompt: str) -> None:
    """An empty question has no answer: refuse it rather than let the model make one up."""
    if not prompt.strip():
        raise VideoLlavaError("the prompt is empty: ask a question")


def prepare_question(pipeline: Pipeline, question: Question, num_frames: int | None = None) -> Prepared:
    media = question.media()
    if question.raw_prompt:
        # A raw prompt carries its own placeholders, in the order images then videos are consumed.
        prompt = question.prompt
    else:
        prompt = pipeline.build_prompt(question.prompt, len(question.images), len(question.videos))
    return pipeline.prepare(prompt, media, num_frames=num_frames, visual_tokens=question.visual_tokens)


def completion_json(completion: Completion, prepared: Prepared | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "answer": completion.text,
        "token_ids": completion.token_ids,
        "prompt_tokens": completion.prompt_tokens,
        "visual_tokens": completion.visual_tokens,
        "seconds": round(completion.seconds, 4),
        "finish_reason": completion.finish_reason,
    }
    if prepared is not None and prepared.kept_patches is not None:
        out["visual_tokens_per_frame"] = prepared.kept_patches  # patch tokens kept per image or frame
    if completion.error:
        out["error"] = completion.error
    return out


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("ask", help="answer a question about images and videos")
    parser.add_argument("prompt", nargs="?", help="the question (or, with --raw-prompt, the whole prompt)")
    add_model_options(parser)
    parser.add_argument("--image", action="append", default=[], metavar="FILE")
    parser.add_argument("--video", action="append", default=[], metavar="FILE")
    parser.add_argument(
        "--frames", type=positive_int, default=None, help="frames sampled per video (default: the model's)"
    )
    add_visual_tokens_option(parser)
    parser.add_argument("--max-new-tokens", type=positive_int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--raw-prompt", action="store_true", help="use PROMPT as the full prompt, no template"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--batch", metavar="REQUESTS.jsonl", help="answer every request of a JSONL file")
    parser.add_argument(
        "--output", metavar="ANSWERS.jsonl", help="with --batch: write answers here (default stdout)"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=8, help="with --batch: requests decoded together"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_arguments(args)
    lines = read_batch_file(Path(args.batch)) if args.batch else []
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    pipeline = Pipeline.from_pretrained(
        args.model,
        dtype=args.dtype,
        device=args.device,
        visual_tokens=args.visual_tokens,
        quantize=args.quantize,
    )
    if args.batch:
        return run_batch(pipeline, args, params, lines)
    started = time.perf_counter()
    question = Question(args.prompt, args.image, args.video, args.raw_prompt)
    prepared = prepare_question(pipeline, question, args.frames)
    completion = Engine.for_pipeline(pipeline, max_batch_size=1).generate([prepared], params)[0]
    if completion.error:
        raise VideoLlavaError(completion.error)
    if args.json:
        out = completion_json(completion, prepared)
        out["seconds"] = round(time.perf_counter() - started, 4)
        print(json.dumps(out))
    else:
        print(completion.text)
    return 0


def check_arguments(args: argparse.Namespace) -> None:
    """Combinations that argparse cannot see, refused before the model loads."""
    if args.batch is None:
        if args.prompt is None:
            raise VideoLlavaError("give a PROMPT, or --batch REQUESTS.jsonl")
        check_prompt(args.prompt)
        if args.output is not None:
            raise VideoLlavaError("--output is for --batch answers; a single answer goes to stdout")
        return
    given = [
        name
        for name, value in (("a PROMPT", args.prompt), ("--image", args.image), ("--video", args.video))
        if value
    ]
    if given:
        raise VideoLlavaError(
            f"--batch takes its prompts and media from {args.batch}; drop {' and '.join(given)}"
        )
    if args.output is not None:
        output = Path(args.output)
        if output.is_dir() or not output.parent.is_dir():
            raise VideoLlavaError(f"--output {output}: not a file in an existing folder")


def read_batch_file(path: Path) -> list[str]:
    if not path.is_file():  # a FIFO or a device would block or never end
        problem = "no such file" if not path.exists() else "not a regular file"
        raise VideoLlavaError(f"{path}: {problem}")
    try:
        return path.read_text().splitlines()
    except UnicodeDecodeError:
        raise VideoLlavaError(f"{path}: not a text file of JSON lines") from None
    except OSError as error:
        raise VideoLlavaError(f"{path}: cannot read ({error.strerror})") from None


def run_batch(pipeline: Pipeline, args: argparse.Namespace, params: SamplingParams, lines: list[str]) -> int:
    path = Path(args.batch)
    results: list[dict[str, Any] | None] = []
    work: list[tuple[int, Prepared]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record: dict[str, Any] = {"id": None}
        try:
            data = json.loads(line)
            record["id"] = data.get("id", number) if isinstance(data, dict) else number
            prepared = prepare_question(pipeline, Question.from_json(data, args.raw_prompt), args.frames)
            work.append((len(results), prepared))
            results.append(record)
        except json.JSONDecodeError as error:
            results.append({"id": number, "error": f"{path}:{number}: not valid JSON ({error.msg})"})
        except VideoLlavaError as error:
            results.append({**record, "error": f"{path}:{number}: {error}"})
    engine = Engine.for_pipeline(pipeline, max_batch_size=args.batch_size, max_queue=args.batch_size * 4)
    progress = tqdm(total=len(work), desc="answering", unit="req", file=sys.stderr, disable=not work)
    for start in range(0, len(work), args.batch_size * 4):
        chunk = work[start : start + args.batch_size * 4]
        for (index, prepared), completion in zip(
            chunk, engine.generate([p for _, p in chunk], params), strict=True
        ):
            answer_id = results[index]["id"]  # type: ignore[index]
            results[index] = {"id": answer_id, **completion_json(completion, prepared)}
            progress.update(1)
    progress.close()
    out = open(args.output, "w") if args.output else sys.stdout
    try:
        for record in results:
            out.write(json.dumps(record) + "\n")
    finally:
        if args.output:
            out.close()
    failed = sum(1 for r in results if r and "error" in r)
    if failed:
        print(f"{failed} of {len(results)} requests failed; see their error fields", file=sys.stderr)
    return 0
