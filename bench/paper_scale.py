"""Video-LLaVA at the paper's scale on this machine: loading, and answers about a video against the port.

A random checkpoint with the real shapes is written in the -hf layout (transformers' names, sharded
safetensors): a LLaMA LLM (Vicuna-7B: 4096 wide, 32 layers, 11008 MLP, 32064-row vocabulary, 4096
context) and two ViT-L/14 towers at 224 px (24 layers, 1024 wide) with the video tower's temporal
modules. `--dtype auto` takes bf16 where the CPU has AMX (or on a GPU) and float32 elsewhere, where
bf16 matrix-vector products are slower than float32; `--llm auto` then takes the largest LLaMA
shape whose weights fit memory and disk in that dtype (7B in bf16 on 24 GiB, 3B in float32).

Then, in a fresh process: `Pipeline.from_pretrained` with the weight files evicted from the page
cache first (load time, resident memory); the weights are memory-mapped, so a pass touching every
page times reading them in; then one answer about an 8-frame video from the file, with every
visual token (2056) and with 4x and 8x fewer patch tokens per frame (`visual_tokens`): video
decoding and the towers, prefill, then `--decode-tokens` tokens. In another fresh process, the
`transformers` port (VideoLlavaForConditionalGeneration, its documented recipe) answers the same
question about the same file with the same number of new tokens.

Baselines in the same run: reading the weight files cold (the disk's share of the load), the
bytes of weights (what memory must hold), and this CPU's matmul rate and weight-streaming
bandwidth in the model's dtype, measured just before the answers (the floors under prefill and
decode).

Writes runs/bench/paper_scale.json (`--output` elsewhere, `--record` to bench/results/). Run:
``python bench/paper_scale.py`` (3B in float32: about 15 minutes, 16 GiB of RAM and 14 GB of
temporary disk).
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

NAME = "paper_scale"
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
DTYPES = ("bfloat16", "float32")
# Patch tokens kept per frame: all of them, then 4x and 8x fewer (of 256).
COMPRESSIONS = {"full": None, "4x": 64, "8x": 32}


def has_amx() -> bool:
    return "amx_bf16" in Path("/proc/cpuinfo").read_text()


def choose_dtype(requested: str) -> str:
    """bf16 where its matrix-vector products are fast (AMX, or a GPU), else float32."""
    if requested != "auto":
        return requested
    import torch

    return "bfloat16" if has_amx() or torch.cuda.is_available() else "float32"


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


def compute_floors(dtype_name: str) -> dict[str, float]:
    """This CPU's matrix throughput and weight-streaming bandwidth in `dtype`, measured now (same load).

    They give the floors an answer is compared with: prefill cannot beat 2 x parameters x tokens at
    the matmul rate, and a decode step cannot beat streaming every weight once.
    """
    import torch

    dtype = getattr(torch, dtype_name)
    activations = torch.randn(2048, 4096, dtype=dtype)
    weight = torch.randn(11008, 4096, dtype=dtype)
    torch.nn.functional.linear(activations, weight)
    start = time.perf_counter()
    for _ in range(3):
        torch.nn.functional.linear(activations, weight)
    flops = 3 * 2 * activations.shape[0] * weight.numel() / (time.perf_counter() - start)
    big = torch.randn(16384, 16384 // big_divisor(dtype), dtype=dtype)  # 512 MiB, far beyond the caches
    vector = torch.randn(1, big.shape[1], dtype=dtype)
    torch.nn.functional.linear(vector, big)
    start = time.perf_counter()
    for _ in range(5):
        torch.nn.functional.linear(vector, big)
    bandwidth = 5 * big.numel() * big.element_size() / (time.perf_counter() - start)
    return {"matmul_gflops": flops / 1e9, "weight_stream_gb_per_s": bandwidth / 1e9}


def big_divisor(dtype) -> int:
    """Columns of the bandwidth probe shrink with the element size, so it is 512 MiB in any dtype."""
    return dtype.itemsize // 2


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


def choose_llm(requested: str, folder: Path, dtype_name: str) -> str:
    """The requested shape, or with `auto` the largest one whose weights in `dtype` fit memory and disk."""
    available = meminfo()["MemAvailable"]
    disk = shutil.disk_usage(folder).free
    itemsize = 2 if dtype_name == "bfloat16" else 4
    for name in LLMS if requested == "auto" else [requested]:
        weights = itemsize * parameter_count(name)
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


def step_build(folder: Path, llm: str, dtype_name: str) -> dict:
    import torch

    from videollava.testing import tiny_test_tokenizer, write_large_random_checkpoint

    start = time.perf_counter()
    total = write_large_random_checkpoint(
        folder,
        tiny_test_tokenizer(),
        VISION,
        llm_config(llm),
        vocab_size=VOCAB,
        dtype=getattr(torch, dtype_name),
    )
    return {"build_seconds": time.perf_counter() - start, "weight_bytes": total, **process_memory()}


def touch_pages(parameters: list) -> float:
    """Seconds to read memory-mapped weights in: one value per page of every parameter."""
    import torch

    start = time.perf_counter()
    with torch.no_grad():
        for p in parameters:
            p.detach().reshape(-1)[:: 4096 // p.element_size()].float().sum()
    return time.perf_counter() - start


def step_measure(folder: Path, dtype_name: str, decode_tokens: int, answer: bool) -> dict:
    import torch

    from videollava.infer.ask import Question, prepare_question
    from videollava.infer.engine import Engine
    from videollava.infer.pipeline import Pipeline
    from videollava.infer.sampling import SamplingParams

    out: dict = {"before_load": process_memory(), "load_average_before": os.getloadavg()}
    evict(weight_files(folder))
    start = time.perf_counter()
    pipeline = Pipeline.from_pretrained(folder, dtype=getattr(torch, dtype_name))
    out["load_seconds"] = time.perf_counter() - start
    out["after_load"] = process_memory()
    parameters = list(pipeline.model.parameters())
    out["parameters"] = sum(p.numel() for p in parameters)
    out["temporal_frames"] = pipeline.model.config.temporal_frames
    out["first_touch_seconds"] = touch_pages(parameters)
    out["after_touch"] = process_memory()
    if not answer:
        out["load_average_after"] = os.getloadavg()
        return out
    out["floors"] = compute_floors(dtype_name)
    # random weights: generate exactly decode_tokens tokens
    pipeline.detokenizer = dataclasses.replace(pipeline.detokenizer, eos_token_id=-1)
    out["answers"] = {}
    for name, budget in COMPRESSIONS.items():
        pipeline.feature_cache = type(pipeline.feature_cache)()  # every answer starts from the file
        start = time.perf_counter()
        prepared = prepare_question(pipeline, Question(QUESTION, videos=[str(VIDEO)], visual_tokens=budget))
        towers = time.perf_counter() - start
        engine = Engine.for_pipeline(pipeline, max_batch_size=1, prefix_cache_bytes=0)
        completion = engine.generate([prepared], SamplingParams(max_new_tokens=decode_tokens))[0]
        generated = len(completion.token_ids)
        out["answers"][name] = {
            "visual_tokens_per_frame": budget,
            "prompt_tokens": completion.prompt_tokens,
            "visual_tokens": completion.visual_tokens,
            "generated_tokens": generated,
            "media_and_towers_seconds": towers,
            "prefill_seconds": completion.first_token_seconds,
            "decode_seconds_per_token": (completion.seconds - completion.first_token_seconds)
            / max(1, generated - 1),
            "answer_seconds": towers + completion.seconds,
        }
        print(name, json.dumps(out["answers"][name]), file=sys.stderr, flush=True)
    out["after_answer"] = process_memory()
    out["llm_parameters"] = sum(p.numel() for p in pipeline.model.language_model.parameters())
    out["llm_weight_bytes"] = sum(
        p.numel() * p.element_size() for p in pipeline.model.language_model.parameters()
    )
    out["load_average_after"] = os.getloadavg()
    return out


def step_port(folder: Path, dtype_name: str, decode_tokens: int) -> dict:
    """The transformers port's documented recipe, from the same file to the same number of tokens."""
    import torch
    from ask_latency import run_transformers

    start = time.perf_counter()
    once = run_transformers(folder, str(VIDEO), QUESTION, decode_tokens, getattr(torch, dtype_name))
    load = time.perf_counter() - start
    start = time.perf_counter()
    tokens = once()
    return {
        "load_seconds": load,
        "answer_seconds": time.perf_counter() - start,
        "generated_tokens": len(tokens),
        "memory": process_memory(),
        "load_average_after": os.getloadavg(),
    }


def run_step(args: list[str], log) -> dict:
    """Run one step in a fresh interpreter; its last stdout line is its JSON result."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.run(
        [sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, env=env, check=False
    )
    if process.returncode:
        sys.exit(f"step {args[:2]} failed (exit {process.returncode})")
    return json.loads(process.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--llm", choices=["auto", *LLMS], default="auto", help="LLM shape (default: the largest that fits)"
    )
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="default: see above")
    parser.add_argument("--decode-tokens", type=int, default=8, help="tokens to generate after the prefill")
    parser.add_argument("--no-answer", action="store_true", help="measure the load only")
    parser.add_argument("--no-port", action="store_true", help="skip the transformers port's answer")
    parser.add_argument("--checkpoint", type=Path, help="reuse a checkpoint folder this script wrote earlier")
    parser.add_argument(
        "--keep", type=Path, help="write the checkpoint here and keep it (default: a temp dir)"
    )
    add_output_arguments(parser, NAME)
    parser.add_argument("--step", choices=["build", "measure", "port"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.step is not None:
        step = {
            "build": lambda: step_build(args.folder, args.llm, args.dtype),
            "measure": lambda: step_measure(args.folder, args.dtype, args.decode_tokens, not args.no_answer),
            "port": lambda: step_port(args.folder, args.dtype, args.decode_tokens),
        }[args.step]
        print(json.dumps(step()))
        return

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    temporary = None
    if args.checkpoint:
        folder = args.checkpoint
        config = json.loads((folder / "config.json").read_text())
        width = config["text_config"]["hidden_size"]
        llm = next(name for name, shape in LLMS.items() if shape["hidden_size"] == width)
        dtype = config.get("dtype") or config.get("torch_dtype") or choose_dtype(args.dtype)
        build = None
    else:
        dtype = choose_dtype(args.dtype)
        if args.keep:
            folder = args.keep
            folder.mkdir(parents=True, exist_ok=True)
        else:
            temporary = tempfile.TemporaryDirectory(prefix="videollava-paper-scale-")
            folder = Path(temporary.name)
        llm = choose_llm(args.llm, folder, dtype)
        log(f"writing a random {llm} checkpoint in {dtype} to {folder} ...")
        build = run_step(["--step", "build", "--folder", str(folder), "--llm", llm, "--dtype", dtype], log)
        log(f"written in {build['build_seconds']:.0f} s")
    common = ["--folder", str(folder), "--dtype", dtype, "--decode-tokens", str(args.decode_tokens)]
    try:
        weights = sum(f.stat().st_size for f in weight_files(folder))
        log("reading the weight files cold (baseline) ...")
        read_seconds = read_cold(weight_files(folder))
        log(f"read in {read_seconds:.1f} s; loading in a fresh process ...")
        measure = run_step(["--step", "measure", *common] + (["--no-answer"] if args.no_answer else []), log)
        port = None
        if not args.no_answer and not args.no_port:
            log("the transformers port answers in a fresh process ...")
            port = run_step(["--step", "port", *common], log)
    finally:
        if temporary is not None:
            temporary.cleanup()

    def rounded(memory: dict) -> dict:
        return {k: round(v, 2) for k, v in memory.items()}

    weight_gib = weights / GIB
    touched = measure["after_touch"]["rss_gib"] - measure["before_load"]["rss_gib"]
    results = {
        "what": f"Pipeline.from_pretrained of a random checkpoint with the real shapes in {dtype} from a cold "
        "page cache, in a fresh process; then answers about an 8-frame video at full and compressed "
        "visual tokens, and the transformers port's answer in another fresh process",
        "machine": machine(),
        "load_average": {"before": measure["load_average_before"], "after": measure["load_average_after"]},
        "llm_shape": llm,
        "llm": llm_config(llm),
        "vision": VISION,
        "vocab_size": VOCAB,
        "dtype": dtype,
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
        results["video"] = str(VIDEO.relative_to(ROOT))
        results["question"] = QUESTION
        results["floors"] = {k: round(v, 1) for k, v in floors.items()}
        results["memory_after_answers"] = rounded(measure["after_answer"])
        results["answers"] = {}
        for name, answer in measure["answers"].items():
            llm_flops = 2 * measure["llm_parameters"] * answer["prompt_tokens"]
            prefill_floor = llm_flops / (floors["matmul_gflops"] * 1e9)
            decode_floor = measure["llm_weight_bytes"] / (floors["weight_stream_gb_per_s"] * 1e9)
            entry = {k: round(v, 3) if isinstance(v, float) else v for k, v in answer.items()}
            entry["prefill_tokens_per_second"] = round(answer["prompt_tokens"] / answer["prefill_seconds"], 1)
            entry["decode_tokens_per_second"] = round(1 / answer["decode_seconds_per_token"], 3)
            entry["prefill_over_matmul_floor"] = round(answer["prefill_seconds"] / prefill_floor, 2)
            entry["decode_over_bandwidth_floor"] = round(answer["decode_seconds_per_token"] / decode_floor, 2)
            if port is not None:
                entry["port_seconds_over_ours"] = round(port["answer_seconds"] / answer["answer_seconds"], 2)
            results["answers"][name] = entry
        if port is not None:
            results["port"] = {
                "load_seconds": round(port["load_seconds"], 2),
                "answer_seconds": round(port["answer_seconds"], 2),
                "generated_tokens": port["generated_tokens"],
                "memory": rounded(port["memory"]),
                "load_average_after": port["load_average_after"],
            }
    print(json.dumps(results, indent=2))
    write_results(results_path(args, NAME), results)


if __name__ == "__main__":
    main()
