"""Loading a Video-LLaVA-7B-shaped checkpoint, and one answer about a video, on this machine.

A random checkpoint with the real shapes is written in the -hf layout (transformers' names, sharded
safetensors): the Vicuna-7B LLM (4096 wide, 32 layers, 11008 MLP, 32064-row vocabulary, 4096
context) and two ViT-L/14 towers at 224 px (24 layers, 1024 wide) with the video tower's temporal
modules. If the machine lacks the memory or disk for 7B, `--llm auto` takes the largest smaller
LLaMA shape that fits. Then, in a fresh process: `Pipeline.from_pretrained` with the weight files
evicted from the page cache first (load time, resident memory); the weights are memory-mapped, so
a pass touching every page times reading them in; then one answer about an 8-frame video (2056
visual tokens): video decoding and the towers, prefill, then `--decode-tokens` tokens.

Baselines in the same run: reading the weight files cold (the disk's share of the load), the
bytes of weights (what memory must hold), and this CPU's bf16 matmul rate and weight-streaming
bandwidth measured just before the answer (the floors under prefill and decode).

Writes runs/bench/paper_scale_load.json (`--output` elsewhere, `--record` to bench/results/). Run: ``python bench/paper_scale_load.py`` (at 7B: 5-10 minutes, 17 GiB of RAM and
15 GB of temporary disk).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import ROOT, add_output_arguments, results_path, write_results

NAME = "paper_scale_load"
VIDEO = ROOT / "src" / "videollava" / "assets" / "examples" / "shapes-video.mp4"
GIB = 1024**3

# ViT-L/14 at 224 px, as LanguageBind's towers (exact GELU).
VISION = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    hidden_act="gelu",
)
# LLaMA shapes, largest first: Vicuna-7B v1.5 (the paper's), then smaller public LLaMA shapes.
LLMS = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "3b": dict(hidden_size=3200, intermediate_size=8640, num_hidden_layers=26, num_attention_heads=32),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32),
}
VOCAB = 32064  # LLaMA's 32000 tokens, <image>, <video>, <pad>, padded to a multiple of 64
CONTEXT = 4096
QUESTION = "What is happening in this video?"


def llm_config(name: str) -> dict:
    shape = LLMS[name]
    return dict(
        **shape,
        num_key_value_heads=shape["num_attention_heads"],
        max_position_embeddings=CONTEXT,
        rms_norm_eps=1e-5,
    )


def parameter_count(name: str) -> int:
    """Parameters of the whole model (towers with temporal modules, projector, LLM) for an LLM shape."""
    import torch
    from transformers import VideoLlavaForConditionalGeneration

    from videollava.testing import hf_config, temporal_shapes, tiny_test_tokenizer

    config = hf_config(tiny_test_tokenizer(), VISION, llm_config(name), vocab_size=VOCAB)
    with torch.device("meta"):
        model = VideoLlavaForConditionalGeneration(config)
    temporal = sum(torch.Size(shape).numel() for shape in temporal_shapes(VISION, 8).values())
    return sum(p.numel() for p in model.parameters()) + temporal


def meminfo() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0]) * 1024
    return fields


def process_memory() -> dict[str, float]:
    """Resident memory of this process in GiB: all, its peak, and the anonymous / file-backed parts.

    Weights read with safetensors are memory-mapped: they count as file-backed once touched.
    """
    status = dict(
        line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line
    )

    def gib(key: str) -> float:
        return int(status[key].split()[0]) * 1024 / GIB

    return {
        "rss_gib": gib("VmRSS"),
        "peak_rss_gib": gib("VmHWM"),
        "anonymous_gib": gib("RssAnon"),
        "file_backed_gib": gib("RssFile"),
    }


def compute_floors() -> dict[str, float]:
    """This CPU's bf16 matrix throughput and weight-streaming bandwidth, measured now (same contention).

    They give the floors an answer is compared with: prefill cannot beat 2 x parameters x tokens at
    the matmul rate, and a decode step cannot beat streaming every weight once.
    """
    import torch

    activations = torch.randn(2048, 4096, dtype=torch.bfloat16)
    weight = torch.randn(11008, 4096, dtype=torch.bfloat16)
    torch.nn.functional.linear(activations, weight)
    start = time.perf_counter()
    for _ in range(3):
        torch.nn.functional.linear(activations, weight)
    flops = 3 * 2 * activations.shape[0] * weight.numel() / (time.perf_counter() - start)
    big = torch.randn(16384, 16384, dtype=torch.bfloat16)  # 512 MiB, far beyond the caches
    vector = torch.randn(1, 16384, dtype=torch.bfloat16)
    torch.nn.functional.linear(vector, big)
    start = time.perf_counter()
    for _ in range(5):
        torch.nn.functional.linear(vector, big)
    bandwidth = 5 * big.numel() * big.element_size() / (time.perf_counter() - start)
    return {"bf16_matmul_gflops": flops / 1e9, "weight_stream_gb_per_s": bandwidth / 1e9}


def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    flags = Path("/proc/cpuinfo").read_text()
    import torch

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "memory_gib": round(meminfo()["MemTotal"] / GIB, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def choose_llm(requested: str, folder: Path) -> str:
    """The requested shape, or with `auto` the largest one whose bf16 weights fit memory and disk."""
    available = meminfo()["MemAvailable"]
    disk = shutil.disk_usage(folder).free
    for name in LLMS if requested == "auto" else [requested]:
        weights = 2 * parameter_count(name)
        # Loading holds the weights once, plus the towers' activations and the KV cache of one answer.
        if weights + 3 * GIB < available and weights * 1.05 + GIB < disk:
            return name
        if requested != "auto":
            sys.exit(
                f"--llm {name}: needs about {(weights + 3 * GIB) / GIB:.1f} GiB of free memory and "
                f"{weights / GIB:.1f} GiB of disk; {available / GIB:.1f} GiB and {disk / GIB:.1f} GiB are free"
            )
    sys.exit(f"no LLM shape fits: {available / GIB:.1f} GiB of memory and {disk / GIB:.1f} GiB of disk free")


def evict(files: list[Path]) -> None:
    """Drop these files' pages from the page cache, so the next read comes from the disk."""
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def read_cold(files: list[Path]) -> float:
    """Seconds to read every weight file from the disk: the floor under any load time."""
    evict(files)
    start = time.perf_counter()
    for file in files:
        with open(file, "rb", buffering=0) as handle:
            while handle.read(64 * 1024**2):
                pass
    seconds = time.perf_counter() - start
    evict(files)
    return seconds


# ---------------------------------------------------------------- the steps, each in a fresh process


def step_build(folder: Path, llm: str) -> dict:
    import torch

    from videollava.testing import tiny_test_tokenizer, write_large_random_checkpoint

    start = time.perf_counter()
    total = write_large_random_checkpoint(
        folder, tiny_test_tokenizer(), VISION, llm_config(llm), vocab_size=VOCAB, dtype=torch.bfloat16
    )
    return {"build_seconds": time.perf_counter() - start, "weight_bytes": total, **process_memory()}


def step_measure(folder: Path, decode_tokens: int, answer: bool) -> dict:
    import torch

    from videollava.infer.ask import Question, prepare_question
    from videollava.infer.engine import Engine
    from videollava.infer.pipeline import Pipeline
    from videollava.infer.sampling import SamplingParams

    out: dict = {"before_load": process_memory(), "load_average_before": os.getloadavg()}
    evict(weight_files(folder))
    start = time.perf_counter()
    pipeline = Pipeline.from_pretrained(folder, dtype=torch.bfloat16)
    out["load_seconds"] = time.perf_counter() - start
    out["after_load"] = process_memory()
    parameters = list(pipeline.model.parameters())
    out["parameters"] = sum(p.numel() for p in parameters)
    out["temporal_frames"] = pipeline.model.config.temporal_frames
    # The mapped weights are read from the disk on first use; touch one value per page to time it.
    start = time.perf_counter()
    with torch.no_grad():
        for p in parameters:
            p.detach().reshape(-1)[:: 4096 // p.element_size()].float().sum()
    out["first_touch_seconds"] = time.perf_counter() - start
    out["after_touch"] = process_memory()
    if not answer:
        out["load_average_after"] = os.getloadavg()
        return out
    out["floors"] = compute_floors()
    # random weights: generate exactly decode_tokens tokens
    pipeline.detokenizer = dataclasses.replace(pipeline.detokenizer, eos_token_id=-1)
    start = time.perf_counter()
    prepared = prepare_question(pipeline, Question(QUESTION, videos=[str(VIDEO)]))
    out["media_and_towers_seconds"] = time.perf_counter() - start
    engine = Engine.for_pipeline(pipeline, max_batch_size=1, prefix_cache_bytes=0)
    completion = engine.generate([prepared], SamplingParams(max_new_tokens=decode_tokens))[0]
    out["prompt_tokens"] = completion.prompt_tokens
    out["visual_tokens"] = completion.visual_tokens
    out["generated_tokens"] = len(completion.token_ids)
    out["prefill_seconds"] = completion.first_token_seconds
    out["decode_seconds_per_token"] = (completion.seconds - completion.first_token_seconds) / max(
        1, len(completion.token_ids) - 1
    )
    out["answer_seconds"] = out["media_and_towers_seconds"] + completion.seconds
    out["after_answer"] = process_memory()
    out["llm_parameters"] = sum(p.numel() for p in pipeline.model.language_model.parameters())
    out["llm_weight_bytes"] = sum(
        p.numel() * p.element_size() for p in pipeline.model.language_model.parameters()
    )
    out["load_average_after"] = os.getloadavg()
    return out


def run_step(args: list[str], log) -> dict:
    """Run one step in a fresh interpreter; its last stdout line is its JSON result."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=False
    )
    log(process.stderr.strip()[-2000:] if process.returncode else "")
    if process.returncode:
        sys.exit(f"step {args[:2]} failed (exit {process.returncode})")
    return json.loads(process.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--llm", choices=["auto", *LLMS], default="auto", help="LLM shape (default: 7b if it fits)"
    )
    parser.add_argument("--decode-tokens", type=int, default=8, help="tokens to generate after the prefill")
    parser.add_argument("--no-answer", action="store_true", help="measure the load only")
    parser.add_argument("--checkpoint", type=Path, help="reuse a checkpoint folder this script wrote earlier")
    parser.add_argument(
        "--keep", type=Path, help="write the checkpoint here and keep it (default: a temp dir)"
    )
    add_output_arguments(parser, NAME)
    parser.add_argument("--step", choices=["build", "measure"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.step == "build":
        print(json.dumps(step_build(args.folder, args.llm)))
        return
    if args.step == "measure":
        print(json.dumps(step_measure(args.folder, args.decode_tokens, not args.no_answer)))
        return

    def log(message: str) -> None:
        if message:
            print(message, file=sys.stderr, flush=True)

    temporary = None
    if args.checkpoint:
        folder = args.checkpoint
        config = json.loads((folder / "config.json").read_text())
        width = config["text_config"]["hidden_size"]
        llm = next(name for name, shape in LLMS.items() if shape["hidden_size"] == width)
        build = None
    else:
        if args.keep:
            folder = args.keep
            folder.mkdir(parents=True, exist_ok=True)
        else:
            temporary = tempfile.TemporaryDirectory(prefix="videollava-paper-scale-")
            folder = Path(temporary.name)
        llm = choose_llm(args.llm, folder)
        log(f"writing a random {llm} checkpoint to {folder} ...")
        build = run_step(["--step", "build", "--folder", str(folder), "--llm", llm], log)
        log(f"written in {build['build_seconds']:.0f} s")
    try:
        weights = sum(f.stat().st_size for f in weight_files(folder))
        log("reading the weight files cold (baseline) ...")
        read_seconds = read_cold(weight_files(folder))
        log(f"read in {read_seconds:.1f} s; loading in a fresh process ...")
        step = ["--step", "measure", "--folder", str(folder), "--decode-tokens", str(args.decode_tokens)]
        measure = run_step(step + (["--no-answer"] if args.no_answer else []), log)
    finally:
        if temporary is not None:
            temporary.cleanup()

    def rounded(memory: dict) -> dict:
        return {k: round(v, 2) for k, v in memory.items()}

    weight_gib = weights / GIB
    touched = measure["after_touch"]["rss_gib"] - measure["before_load"]["rss_gib"]
    results = {
        "what": "Pipeline.from_pretrained of a random checkpoint with the real shapes in bf16 from a cold "
        "page cache, in a fresh process; then one answer about an 8-frame video",
        "machine": machine(),
        "load_average": {"before": measure["load_average_before"], "after": measure["load_average_after"]},
        "llm_shape": llm,
        "llm": llm_config(llm),
        "vision": VISION,
        "vocab_size": VOCAB,
        "dtype": "bfloat16",
        "parameters": measure["parameters"],
        "temporal_frames": measure["temporal_frames"],
        "weight_files_gib": round(weight_gib, 3),
        "build": build,
        "baseline_read_cold_seconds": round(read_seconds, 2),
        "load_seconds": round(measure["load_seconds"], 2),
        "first_touch_seconds": round(measure["first_touch_seconds"], 2),
        "load_and_touch_over_cold_read": round(
            (measure["load_seconds"] + measure["first_touch_seconds"]) / read_seconds, 2
        ),
        "memory_before_load": rounded(measure["before_load"]),
        "memory_after_load": rounded(measure["after_load"]),
        "memory_after_touch": rounded(measure["after_touch"]),
        "resident_weights_over_weight_files": round(touched / weight_gib, 3),
    }
    if not args.no_answer:
        floors = measure["floors"]
        llm_flops = 2 * measure["llm_parameters"] * measure["prompt_tokens"]
        prefill_floor = llm_flops / (floors["bf16_matmul_gflops"] * 1e9)
        decode_floor = measure["llm_weight_bytes"] / (floors["weight_stream_gb_per_s"] * 1e9)
        results["answer"] = {
            "video": str(VIDEO.relative_to(ROOT)),
            "question": QUESTION,
            "prompt_tokens": measure["prompt_tokens"],
            "visual_tokens": measure["visual_tokens"],
            "media_and_towers_seconds": round(measure["media_and_towers_seconds"], 2),
            "prefill_seconds": round(measure["prefill_seconds"], 2),
            "prefill_tokens_per_second": round(measure["prompt_tokens"] / measure["prefill_seconds"], 1),
            "decode_seconds_per_token": round(measure["decode_seconds_per_token"], 3),
            "generated_tokens": measure["generated_tokens"],
            "answer_seconds": round(measure["answer_seconds"], 2),
            "memory_after_answer": rounded(measure["after_answer"]),
            "floors": {k: round(v, 1) for k, v in floors.items()},
            "prefill_over_matmul_floor": round(measure["prefill_seconds"] / prefill_floor, 2),
            "decode_over_bandwidth_floor": round(measure["decode_seconds_per_token"] / decode_floor, 2),
        }
    print(json.dumps(results, indent=2))
    write_results(results_path(args, NAME), results)


if __name__ == "__main__":
    main()
