"""What passes between the layers of inference: media in, LLM-ready requests, answers and their pieces out.

The pipeline makes `Prepared` requests from `MediaItem`s, the engine turns them into `Completion`s
(streamed as `StreamDelta`s), and the server, the chat, the web page and the CLI read both; keeping
the types here lets each of those import them without importing the others.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Protocol

import torch

MediaSource = str | os.PathLike | bytes


@dataclass
class MediaItem:
    kind: str  # "image" | "video"
    source: MediaSource
    name: str = ""

    def display_name(self) -> str:
        if self.name:
            return self.name
        return "<bytes>" if isinstance(self.source, bytes) else str(self.source)


@dataclass
class Prepared:
    """A request ready for the LLM: token ids with one slot per media item, and each item's features."""

    input_ids: list[int]
    features: list[torch.Tensor]  # one (rows, H) tensor per slot, in slot order
    # Content key of each position (token id, or a media hash per visual row block) for prefix reuse.
    prefix_key: list[int | str]
    visual_tokens: int
    # Patch tokens kept per image or video frame (all of them unless a budget cut them); None: no media.
    kept_patches: int | None = None
    prompt_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.prompt_tokens = len(self.input_ids) - len(self.features) + self.visual_tokens


@dataclass
class Completion:
    text: str  # the answer, stripped of surrounding whitespace as the reference strips it
    token_ids: list[int]  # exactly as generated, end-of-sequence token included
    prompt_tokens: int
    visual_tokens: int
    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    seconds: float
    first_token_seconds: float | None
    reused_prefix_tokens: int
    error: str | None = None  # what went wrong, in detail: for logs, not for the request's caller
    client_error: str | None = None  # a short message that is safe to send to the request's caller


@dataclass
class StreamDelta:
    text: str
    token_id: int


class Detokenizer(Protocol):
    """Turns generated ids into text, and names the id that ends an answer.

    The engine needs no more of a tokenizer than this, so anything shaped like it can stand in
    (a test's whitespace-heavy decoder, a benchmark's that never stops early).
    """

    eos_token_id: int | None

    def decode(self, ids: list[int]) -> str: ...
