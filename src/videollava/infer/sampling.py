"""Per-request sampling: greedy at temperature 0, otherwise temperature + nucleus (top-p) sampling.

Parameters are checked when they are made, so a request that cannot be sampled is refused at the
door. Sampling itself is isolated per row: a row whose next token cannot be drawn is reported as a
`SamplingFault` in its place, and the other rows of the batch get their tokens as if it were absent.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from videollava.errors import VideoLlavaError

# Temperatures below this are greedy, as in vLLM: dividing logits by a smaller number overflows
# float32 (3e-38 turns every logit into +-inf), and the result would be the argmax anyway.
GREEDY_BELOW = 1e-5
# The OpenAI API's upper bound; beyond it every model's text is close to uniform noise.
MAX_TEMPERATURE = 2.0
# Longer than any context this package runs; generation also stops when the context is full.
MAX_NEW_TOKENS = 65536
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
# What `torch.Generator.manual_seed` accepts: any signed or unsigned 64-bit integer.
SEED_RANGE = (-(2**63), 2**64 - 1)


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens; frozen, so a checked value stays checked."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0, or GREEDY_BELOW..MAX_TEMPERATURE; smaller positive values are greedy
    top_p: float = 1.0  # in (0, 1]
    seed: int | None = None  # a 64-bit integer, signed or unsigned
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not _is_integer(self.max_new_tokens) or not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise VideoLlavaError(
                f"max_new_tokens must be an integer from 1 to {MAX_NEW_TOKENS}, got {self.max_new_tokens!r}"
            )
        if not _is_number(self.temperature) or not math.isfinite(self.temperature):
            raise VideoLlavaError(f"temperature must be a finite number, got {self.temperature!r}")
        if not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise VideoLlavaError(
                f"temperature must be from 0 (greedy) to {MAX_TEMPERATURE:g}, got {self.temperature!r}"
            )
        if not _is_number(self.top_p) or not math.isfinite(self.top_p):
            raise VideoLlavaError(f"top_p must be a finite number, got {self.top_p!r}")
        if not 0 < self.top_p <= 1:
            raise VideoLlavaError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (
            not _is_integer(self.seed) or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]
        ):
            raise VideoLlavaError(
                f"seed must be an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]} (64 bits), got {self.seed!r}"
            )
        if isinstance(self.stop, str) or not isinstance(self.stop, list | tuple):
            raise VideoLlavaError(f"stop must be a list of strings, got {self.stop!r:.80}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise VideoLlavaError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        for text in self.stop:
            if not isinstance(text, str) or not 1 <= len(text) <= MAX_STOP_CHARS:
                raise VideoLlavaError(
                    f"each stop string must hold 1 to {MAX_STOP_CHARS} characters, got {text!r:.80}"
                )
        # Normalised copies: plain float/int types, tiny temperatures as exact greedy, a private stop list.
        temperature = float(self.temperature) if self.temperature >= GREEDY_BELOW else 0.0
        object.__setattr__(self, "temperature", temperature)
        object.__setattr__(self, "top_p", float(self.top_p))
        object.__setattr__(self, "max_new_tokens", int(self.max_new_tokens))
        object.__setattr__(self, "seed", None if self.seed is None else int(self.seed))
        object.__setattr__(self, "stop", list(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> torch.Generator | None:
        if self.greedy:
            return None
        generator = torch.Generator()
        generator.manual_seed(self.seed if self.seed is not None else torch.seed())
        return generator


class SamplingFault(VideoLlavaError):
    """Why one row's next token could not be drawn: `str()` for logs, `client_message` for its caller."""

    def __init__(self, detail: str, client_message: str):
        super().__init__(detail)
        self.client_message = client_message


def pick_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One next token from a (V,) row of logits; raises SamplingFault when the row cannot be sampled."""
    if params.greedy:
        return int(logits.argmax())
    # (V,) -> (1, V): the warpers work on batches of rows.
    scores = TemperatureLogitsWarper(params.temperature)(None, logits[None].float())
    if params.top_p < 1:
        scores = TopPLogitsWarper(params.top_p)(None, scores)
    probs = torch.softmax(scores, dim=-1)
    if not bool(probs.isfinite().all()) or not float(probs.sum()) > 0:
        message = (
            f"sampling failed: the next-token probabilities are not finite at temperature "
            f"{params.temperature:g}, top_p {params.top_p:g}"
        )
        raise SamplingFault(message, message)
    if generator is not None:
        # Drawn where the generator lives (the CPU): a seed gives the same tokens on every device.
        probs = probs.to(generator.device)
    return int(torch.multinomial(probs[0], 1, generator=generator))


def pick_tokens(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int | SamplingFault]:
    """(B, V) -> B next tokens, or a SamplingFault in place of a row that cannot be sampled.

    Greedy rows share one argmax. A row whose scores hold NaN or no finite maximum is a fault even
    when greedy: its argmax would be an arbitrary token.
    """
    greedy = logits.argmax(-1).tolist()
    usable = logits.amax(-1).isfinite().tolist()  # NaN and +inf propagate to the maximum
    picked: list[int | SamplingFault] = []
    for row, (row_params, generator) in enumerate(zip(params, generators, strict=True)):
        if not usable[row]:
            picked.append(
                SamplingFault(
                    "the model's next-token scores for this request are not finite",
                    "the model produced no usable next-token scores for this request",
                )
            )
            continue
        if row_params.greedy:
            picked.append(greedy[row])
            continue
        try:
            picked.append(pick_token(logits[row], row_params, generator))
        except SamplingFault as fault:
            picked.append(fault)
        except Exception as error:  # whatever breaks one row's draw must not reach the others
            picked.append(
                SamplingFault(f"sampling failed: {type(error).__name__}: {error}", "sampling failed")
            )
    return picked
