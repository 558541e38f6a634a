"""Weight-only int8 for the LLM: decode and prefill speed against float32 and bfloat16, two routes.

Routes, all per-output-channel symmetric int8 on the decoder's linear layers (lm_head kept in
float unless the variant says so):

- ``int8_ao``: torchao's ``quantize_(model, Int8WeightOnlyConfig())`` (an int8 tensor subclass
  whose linear widens the weight and runs a float matmul), eager and with ``torch.compile`` on
  every quantised linear (``int8_ao_compiled``);
- ``int8_thin``: ``videollava.model.quantize.Int8Linear``, a thin ``nn.Linear`` replacement calling
  ``torch._weight_int8pack_mm``; on the CPU a float32 model's activations enter that kernel as
  bf16 (``int8_thin_fp32_kernel`` feeds it float32 as it is, to show why).

Two LLMs: a LLaMA wide enough that reading its weights dominates (random weights, built with
transformers' ``LlamaForCausalLM``), and the shipped default model's own LLM. Decode is batch 1,
one token per step after the prompt (matrix-vector); prefill is the whole prompt at once (GEMM).
One variant is in memory at a time, beside the float32 model, and the two alternate round by
round: each ratio is the median float32 time over the median variant time of those rounds, so
drift in a shared machine's load over the run does not move it. Also recorded: how far each
variant's prefill logits
are from float32's, and for how many greedy tokens it follows float32 (random weights have
near-ties everywhere: a first difference comes early and says little; the ShapesWorld held-out
accuracy is the quality measure).

Writes runs/bench/quantize.json (``--output`` elsewhere, ``--record`` to bench/results/).
Run: ``python bench/quantize.py`` (about 10-15 minutes on 2 cores; ``--quick`` for a small check).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import subprocess
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from _results import add_output_arguments, results_path, write_results
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from videollava.infer.pipeline import default_model_path
from videollava.model.bundle import load_bundle
from videollava.model.quantize import Int8Linear, quantize_language_model

NAME = "quantize"


class _Int8LinearFp32Kernel(Int8Linear):
    """The thin layer feeding float32 activations to the kernel as they are (its float32 path)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).contiguous()  # (M, K)
        out = torch._weight_int8pack_mm(flat, self.qweight, self.scales.to(flat.dtype))  # (M, N)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)


def _decoder_linears(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of each decoder `nn.Linear` of a causal LM."""
    found = []
    for module in model.get_decoder().modules():
        for child_name, child in module.named_children():
            if type(child) is nn.Linear:
                found.append((module, child_name))
    return found


def _torchao_available() -> str | None:
    try:
        import torchao  # noqa: F401
        from torchao.quantization import Int8WeightOnlyConfig, quantize_  # noqa: F401
    except ImportError as error:
        return f"torchao not importable: {error}"
    return None


def _quantize_torchao(model: nn.Module, compiled: bool) -> nn.Module:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    # Only the decoder's linears, as the thin route does (lm_head's fqn is "lm_head").
    quantize_(
        model,
        Int8WeightOnlyConfig(),
        filter_fn=lambda m, fqn: type(m) is nn.Linear and fqn.startswith("model.layers."),
    )
    if compiled:
        # torchao keeps the layers' class (nn.Linear) and swaps their weight for its int8 tensor.
        for parent, attr in _decoder_linears(model):
            getattr(parent, attr).compile()
    return model


def _swap_fp32_kernel(model: nn.Module) -> nn.Module:
    quantize_language_model(model.eval(), "int8")
    for _, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is Int8Linear:
                swapped = _Int8LinearFp32Kernel(child.qweight, child.scales, child.bias).eval()
                setattr(module, child_name, swapped)
    return model


def make_variants(base: nn.Module, skip: set[str]) -> dict[str, Callable[[], nn.Module]]:
    """Name -> builder of that variant from a float32 base (each a deep copy)."""

    def fp32() -> nn.Module:
        return base  # the base itself: one float32 copy fewer in memory

    def bf16() -> nn.Module:
        return copy.deepcopy(base).to(torch.bfloat16)

    def thin(dtype: torch.dtype, head: bool = False) -> Callable[[], nn.Module]:
        def build() -> nn.Module:
            model = copy.deepcopy(base).to(dtype).eval()
            quantize_language_model(model, "int8", include_lm_head=head)
            return model

        return build

    def ao(dtype: torch.dtype, compiled: bool) -> Callable[[], nn.Module]:
        return lambda: _quantize_torchao(copy.deepcopy(base).to(dtype).eval(), compiled)

    variants: dict[str, Callable[[], nn.Module]] = {
        "fp32": fp32,
        "bf16": bf16,
        "int8_thin": thin(torch.float32),
        "int8_thin_lm_head": thin(torch.float32, head=True),
        "int8_thin_bf16": thin(torch.bfloat16),
        "int8_thin_fp32_kernel": lambda: _swap_fp32_kernel(copy.deepcopy(base).eval()),
        "int8_ao": ao(torch.float32, False),
        "int8_ao_compiled": ao(torch.float32, True),
        "int8_ao_bf16": ao(torch.bfloat16, False),
        "int8_ao_bf16_compiled": ao(torch.bfloat16, True),
    }
    return {k: v for k, v in variants.items() if k not in skip}


@torch.inference_mode()
def prefill(model: nn.Module, ids: torch.Tensor) -> tuple[float, torch.Tensor, DynamicCache]:
    """Seconds for the whole prompt (1, P), its last logits (V,), the cache."""
    cache = DynamicCache()
    start = time.perf_counter()
    logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1]
    return time.perf_counter() - start, logits.float(), cache


@torch.inference_mode()
def decode(model: nn.Module, ids: torch.Tensor, steps: int) -> tuple[float, list[int]]:
    """Seconds per token over `steps` greedy steps after a short prompt; the tokens picked."""
    cache = DynamicCache()
    token = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1].argmax()
    picked = [int(token)]
    start = time.perf_counter()
    for _ in range(steps):
        logits = model(input_ids=token.view(1, 1), past_key_values=cache, use_cache=True).logits
        token = logits[0, -1].argmax()
        picked.append(int(token))
    return (time.perf_counter() - start) / steps, picked


def measure(
    label: str,
    base: nn.Module,
    prompt_tokens: int,
    decode_prompt: int,
    decode_steps: int,
    rounds: int,
    skip: set[str],
    no_prefill: set[str],
) -> dict[str, Any]:
    """Each variant in turn, alternating with float32 round by round; only one variant in memory.

    A variant's ratios are against the float32 runs that alternated with it, so drift in the
    machine's load over the whole benchmark does not move them.
    """
    vocab = base.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    long_ids = torch.randint(3, vocab, (1, prompt_tokens), generator=gen)
    short_ids = torch.randint(3, vocab, (1, decode_prompt), generator=gen)
    _, reference_logits, _ = prefill(base, long_ids)
    _, reference_tokens = decode(base, short_ids, decode_steps)
    scale = reference_logits.abs().max().item()
    results = {}
    for name, build in make_variants(base, skip | {"fp32"}).items():
        start = time.perf_counter()
        model = build().eval()
        # Warm-up: compiles what is compiled, touches every weight once.
        decode(model, short_ids, 2)
        if name not in no_prefill:
            prefill(model, long_ids)
        build_seconds = time.perf_counter() - start
        times: dict[str, dict[str, list[float]]] = {
            side: {"decode": [], "prefill": []} for side in ("fp32", name)
        }
        logits, tokens = None, []
        for _ in range(rounds):
            for side, runner in (("fp32", base), (name, model)):
                seconds, picked = decode(runner, short_ids, decode_steps)
                times[side]["decode"].append(seconds)
                if side == name:
                    tokens = picked
                if name not in no_prefill:
                    seconds, last, _ = prefill(runner, long_ids)
                    times[side]["prefill"].append(seconds)
                    if side == name:
                        logits = last
        del model
        fp32_decode = statistics.median(times["fp32"]["decode"])
        per_token = statistics.median(times[name]["decode"])
        entry: dict[str, Any] = {
            "decode_tokens_per_s": 1.0 / per_token,
            "decode_vs_fp32": fp32_decode / per_token,
            "fp32_decode_tokens_per_s_alongside": 1.0 / fp32_decode,
            "decode_ms_per_token_by_round": [1000 * t for t in times[name]["decode"]],
            "fp32_decode_ms_per_token_by_round": [1000 * t for t in times["fp32"]["decode"]],
            "greedy_leading_tokens_equal_to_fp32": _common_prefix(tokens, reference_tokens),
            "greedy_tokens": len(reference_tokens),
            "build_and_warmup_s": build_seconds,
        }
        if logits is not None:
            fp32_prefill = statistics.median(times["fp32"]["prefill"])
            seconds = statistics.median(times[name]["prefill"])
            entry["prefill_tokens_per_s"] = prompt_tokens / seconds
            entry["prefill_vs_fp32"] = fp32_prefill / seconds
            entry["fp32_prefill_tokens_per_s_alongside"] = prompt_tokens / fp32_prefill
            entry["prefill_s_by_round"] = times[name]["prefill"]
            entry["fp32_prefill_s_by_round"] = times["fp32"]["prefill"]
            entry["prefill_logits_max_abs_diff_vs_fp32"] = (logits - reference_logits).abs().max().item()
            entry["prefill_logits_max_abs_fp32"] = scale
            entry["prefill_argmax_equal_to_fp32"] = bool(logits.argmax() == reference_logits.argmax())
        else:
            entry["prefill_tokens_per_s"] = None
            entry["prefill_note"] = "not measured: the kernel's float32 path takes minutes for one prompt"
        results[name] = entry
        print(
            f"[{label}] {name:24s} decode {entry['decode_vs_fp32']:.2f}x"
            f"  prefill {entry.get('prefill_vs_fp32') or 0:.2f}x  load {os.getloadavg()[0]:.2f}",
            flush=True,
        )
    return results


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def large_llm(args: argparse.Namespace) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        vocab_size=args.vocab,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompt", type=int, default=256, help="prefill length (large LLM)")
    parser.add_argument("--decode", type=int, default=16, help="greedy steps timed per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-torchao", action="store_true", help="leave the torchao variants out")
    parser.add_argument(
        "--quick", action="store_true", help="a small LLM and short runs, to check the script"
    )
    add_output_arguments(parser, NAME)
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.heads = 512, 1376, 2, 8
        args.vocab, args.prompt, args.decode, args.rounds = 4096, 64, 8, 2
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    # Compiling every linear: one graph per (shape, phase); more than the default allows.
    torch._dynamo.config.cache_size_limit = 512
    torch._dynamo.config.accumulated_cache_size_limit = 4096
    skip: set[str] = set()
    torchao_problem = None if not args.no_torchao else "left out (--no-torchao)"
    torchao_problem = torchao_problem or _torchao_available()
    if torchao_problem:
        skip |= {"int8_ao", "int8_ao_compiled", "int8_ao_bf16", "int8_ao_bf16_compiled"}
    load_before = os.getloadavg()
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()

    large = large_llm(args)
    large_results = measure(
        "large", large, args.prompt, 16, args.decode, args.rounds, skip, {"int8_thin_fp32_kernel"}
    )
    large_bytes = weight_bytes(large)
    del large

    bundle = load_bundle(default_model_path(), torch.float32)
    default_llm = bundle.model.language_model.eval()
    # A ShapesWorld video prompt: 4 frames x 37 visual rows and some 40 text tokens.
    default_results = measure(
        "default", default_llm, 192, 16, args.decode, args.rounds, skip, {"int8_thin_fp32_kernel"}
    )

    try:
        import torchao

        torchao_version = torchao.__version__
    except ImportError:
        torchao_version = None
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    results = {
        "what": "weight-only int8 (per output channel, symmetric) on the LLM's decoder linears: "
        "decode (batch 1) and prefill tokens/s, ratios against float32 in the same run",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "threads": args.threads,
            "avx512_bf16": "avx512_bf16" in flags,
            "amx_bf16": "amx_bf16" in flags,
            "torch": torch.__version__,
            "torchao": torchao_version,
            "torchao_note": torchao_problem,
        },
        "load": {
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "uptime_before": uptime_before,
            "uptime_after": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        },
        "large_llm": {
            "shape": {
                "hidden": args.hidden,
                "intermediate": args.intermediate,
                "layers": args.layers,
                "heads": args.heads,
                "vocab": args.vocab,
                "fp32_weight_bytes": large_bytes,
            },
            "prompt_tokens": args.prompt,
            "decode_context": 16,
            "decode_steps": args.decode,
            "rounds": args.rounds,
            "variants": large_results,
        },
        "default_model_llm": {
            "model": str(default_model_path()),
            "fp32_weight_bytes": weight_bytes(default_llm),
            "prompt_tokens": 192,
            "decode_context": 16,
            "decode_steps": args.decode,
            "rounds": args.rounds,
            "variants": default_results,
        },
    }
    for part in ("large_llm", "default_model_llm"):
        print(part)
        for name, entry in results[part]["variants"].items():  # fp32 is the reference, not a variant
            prefill_ratio = entry.get("prefill_vs_fp32")
            shown = f"{prefill_ratio:.2f}x" if prefill_ratio else "-"
            print(
                f"  {name:24s} decode {entry['decode_tokens_per_s']:8.1f} tok/s ({entry['decode_vs_fp32']:.2f}x)"
                f"  prefill {shown}  greedy prefix {entry['greedy_leading_tokens_equal_to_fp32']}/{entry['greedy_tokens']}"
            )
    write_results(results_path(args, NAME), results)


if __name__ == "__main__":
    main()
