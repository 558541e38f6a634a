"""Weight-only int8 for the language model's linear layers: symmetric, one scale per output channel.

Why: generating a token reads every weight of the LLM once, so on a CPU decoding is bound by memory
bandwidth; int8 weights are a quarter of float32's bytes and half of bfloat16's. Activations stay
in the model's dtype (`--dtype`), and only the decoder layers' projections are quantised: the towers,
the projector, the embeddings and `lm_head` keep their precision (see `bench/quantize.py`).

On the CPU a decoding step (few rows) runs in `torch._weight_int8pack_mm`, PyTorch's own
int8-weight kernel, which reads the int8 weight and widens it in registers; a prompt (many rows)
widens the weight to bf16 once and runs the bf16 GEMM. Both take bf16 inputs (a float32 model's
activations are rounded for the product only) and accumulate in float32. On other devices the
layer widens its weight to the activations' dtype for each call and runs a plain `F.linear`:
correct everywhere, without the CPU kernel's speed (a CUDA build of PyTorch has its own
`_weight_int8pack_mm`, not used here: its constraints could not be checked on this machine).

Quantisation happens once at load, after the weights are on their device; a quantised model is
for answering only: putting it in training mode or saving it is refused, naming `--quantize`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from videollava.errors import VideoLlavaError

QUANTIZE_MODES = ("int8",)

# Rows quantised at a time, so the float32 copy of a large matrix (an lm_head) stays small.
_ROW_BLOCK = 4096
# int8 covers -127..127 symmetrically; -128 is left out so that w and -w quantise alike.
_QMAX = 127.0
# The CPU kernel takes activations of these dtypes, with scales of the same dtype.
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# From this many rows on, the CPU path widens the weight and runs a bf16 GEMM instead of the kernel
# (the two cross between 32 and 128 rows on this 2-core CPU: bench/quantize.py).
_GEMM_ROWS = 64


class QuantizeError(VideoLlavaError):
    """A `--quantize` value that is not known, or a use of a quantised model that is not supported."""


def check_quantize(mode: str | None) -> str | None:
    """`None` (float weights) or a known mode; anything else is refused before a model is loaded."""
    if mode is None or mode in QUANTIZE_MODES:
        return mode
    raise QuantizeError(f"quantize: unknown value {mode!r}; choose {', '.join(QUANTIZE_MODES)} (or none)")


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> int8 (N, K) and float32 scales (N,) with weight ~= int8 * scale[:, None].

    Computed in float32 on the weight's own device, a block of rows at a time.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise QuantizeError(
            f"quantize: expected a 2-D float weight, got {tuple(weight.shape)} {weight.dtype}"
        )
    rows = weight.shape[0]
    qweight = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(rows, dtype=torch.float32, device=weight.device)
    for start in range(0, rows, _ROW_BLOCK):
        block = weight[start : start + _ROW_BLOCK].detach().float()  # (n, K)
        scale = block.abs().amax(dim=1) / _QMAX  # (n,)
        # An all-zero row keeps scale 1 (any scale gives zeros) instead of dividing by zero.
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        qweight[start : start + _ROW_BLOCK] = (
            torch.round(block / scale[:, None]).clamp(-_QMAX, _QMAX).to(torch.int8)
        )
        scales[start : start + _ROW_BLOCK] = scale
    return qweight, scales


def _kernel_available(device: torch.device) -> bool:
    """`_weight_int8pack_mm` is used on the CPU, the one device its constraints were checked on."""
    return device.type == "cpu"


class Int8Linear(nn.Module):
    """`nn.Linear` with an int8 weight (out, in) and a float32 scale per output row.

    The output has the input's dtype; the bias keeps the float layer's dtype and is added in it.
    """

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        if qweight.dtype != torch.int8 or qweight.dim() != 2 or scales.shape != qweight.shape[:1]:
            raise QuantizeError(
                f"quantize: expected an int8 (N, K) weight and (N,) scales, got {qweight.dtype} "
                f"{tuple(qweight.shape)} and {tuple(scales.shape)}"
            )
        self.in_features = qweight.shape[1]
        self.out_features = qweight.shape[0]
        self.register_buffer("qweight", qweight.contiguous())  # (N, K) int8
        self.register_buffer("scales", scales.float())  # (N,)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self._scales_as: dict[torch.dtype, torch.Tensor] = {}
        self.register_state_dict_pre_hook(_refuse_saving)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        qweight, scales = quantize_rows(linear.weight)
        return cls(qweight, scales, linear.bias)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight this layer multiplies by: int8 * scale, (N, K) in `dtype`."""
        work = torch.float64 if dtype == torch.float64 else torch.float32
        return (self.qweight.to(work) * self.scales.to(work)[:, None]).to(dtype)

    def _scales_for(self, dtype: torch.dtype) -> torch.Tensor:
        """The scales in the activations' dtype (the CPU kernel wants them alike), made once per dtype."""
        cached = self._scales_as.get(dtype)
        if cached is None or cached.device != self.scales.device:
            cached = self.scales.to(dtype)
            self._scales_as[dtype] = cached
        return cached

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)  # (M, K)
        if _kernel_available(flat.device) and flat.dtype in _KERNEL_DTYPES:
            # On the CPU the product takes bf16 inputs (float32 ones are rounded), the int8 weight
            # exactly, and accumulates in float32; norms, attention and the residual keep the
            # model's dtype. The kernel's float32 path is scalar code (5x slower than a float32
            # matmul here); its bf16 path reads the int8 rows directly: the fastest for few rows.
            kernel_dtype = torch.bfloat16 if flat.dtype == torch.float32 else flat.dtype
            flat = flat.to(kernel_dtype).contiguous()
            if flat.shape[0] < _GEMM_ROWS:
                out = torch._weight_int8pack_mm(flat, self.qweight, self._scales_for(kernel_dtype))  # (M, N)
            else:
                # Many rows (a prompt): widening the weight once (int8 is exact in bf16) and running
                # the library's bf16 GEMM outruns the kernel, whose time grows with every row.
                out = F.linear(flat, self.qweight.to(kernel_dtype)).float() * self.scales  # (M, N)
            out = out.to(x.dtype)
        else:
            out = F.linear(flat, self.qweight.to(flat.dtype)) * self._scales_for(flat.dtype)  # (M, N)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*lead, self.out_features)

    def train(self, mode: bool = True) -> Int8Linear:
        if mode:
            raise QuantizeError(
                "quantize: a model loaded with --quantize int8 is for answering only and cannot be "
                "trained; load it without --quantize to train"
            )
        return super().train(False)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


def _refuse_saving(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    raise QuantizeError(
        f"quantize: {prefix.rstrip('.') or 'the model'} holds int8 weights (--quantize int8) and is not "
        "saved in that form; load the checkpoint without --quantize to convert or export it"
    )


def quantize_language_model(model: nn.Module, mode: str | None, include_lm_head: bool = False) -> int:
    """Swap the LLM's decoder `nn.Linear`s (and `lm_head` when asked) for `Int8Linear`, in place.

    `model` is a `VideoLlava` (its `language_model` is quantised) or a bare causal LM. Returns the
    number of layers swapped; `mode=None` changes nothing.
    """
    if check_quantize(mode) is None:
        return 0
    llm = getattr(model, "language_model", model)
    if model.training:
        raise QuantizeError("quantize: the model is in training mode; --quantize int8 is for answering only")
    decoder = llm.get_decoder() if hasattr(llm, "get_decoder") else llm
    targets = [(name, module) for name, module in decoder.named_modules() if type(module) is nn.Linear]
    owners: list[tuple[nn.Module, str, nn.Linear]] = []
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        owners.append((decoder.get_submodule(parent_name) if parent_name else decoder, child, linear))
    head = llm.get_output_embeddings() if hasattr(llm, "get_output_embeddings") else None
    if include_lm_head and type(head) is nn.Linear:
        if head.weight is llm.get_input_embeddings().weight:
            raise QuantizeError("quantize: lm_head shares its weight with the embeddings; it stays in float")
        owners.append((llm, _attribute_of(llm, head), head))
    for parent, child, linear in owners:
        if linear.weight.is_meta:
            raise QuantizeError("quantize: the weights must be loaded before they are quantised")
        setattr(parent, child, Int8Linear.from_linear(linear).eval())
    return len(owners)


def _attribute_of(parent: nn.Module, module: nn.Module) -> str:
    for name, child in parent.named_children():
        if child is module:
            return name
    raise QuantizeError("quantize: the output layer is not a direct child of the language model")


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())
