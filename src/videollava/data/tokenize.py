"""Turn a rendered prompt into token ids with one slot per image or video, and labels for training.

A slot is a negative id that the model later replaces by the visual feature rows of that image or video.
Two tokenizers are handled, matching the two public checkpoints: the -hf port's, which has `<image>` and
`<video>` as tokens of their own, and LLaMA's original one, which has not (the prompt is then split on the
placeholders and the pieces tokenized apart, as the reference implementation does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from videollava.constants import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    IMAGE_SLOT,
    PLACEHOLDER_PATTERN,
    SLOT_OF_PLACEHOLDER,
    VIDEO_PLACEHOLDER,
    VIDEO_SLOT,
)
from videollava.errors import PromptError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_NO_CHARS = (0, 0)  # offset of tokens that come from no text, such as an added BOS


@dataclass
class TokenizedPrompt:
    """Token ids with slots, plus labels when supervised spans were given."""

    input_ids: list[int]
    labels: list[int] | None
    num_images: int
    num_videos: int

    def __len__(self) -> int:
        return len(self.input_ids)


def count_placeholders(text: str) -> tuple[int, int]:
    """Number of `<image>` and `<video>` placeholders in `text`."""
    return text.count(IMAGE_PLACEHOLDER), text.count(VIDEO_PLACEHOLDER)


def _counted(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def check_placeholders(text: str, n_images: int, n_videos: int) -> None:
    """Fail early when a prompt's placeholders do not match the media given, since the model cannot."""
    found_images, found_videos = count_placeholders(text)
    problems = []
    for placeholder, found, given, kind in (
        (IMAGE_PLACEHOLDER, found_images, n_images, "image"),
        (VIDEO_PLACEHOLDER, found_videos, n_videos, "video"),
    ):
        if found != given:
            verb = "was" if given == 1 else "were"
            problems.append(
                f"prompt has {_counted(found, placeholder + ' placeholder')} but {_counted(given, kind)} {verb} given"
            )
    if problems:
        raise PromptError("; ".join(problems))


def _placeholder_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[int, int] | None:
    """Map token id -> slot id when the tokenizer reads both placeholders as single tokens, else None."""
    found: dict[int, int] = {}
    for placeholder, slot in SLOT_OF_PLACEHOLDER.items():
        ids = tokenizer.encode(placeholder, add_special_tokens=False)
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            return None
        found[ids[0]] = slot
    return found


def _encode(
    tokenizer: PreTrainedTokenizerBase, text: str, with_offsets: bool
) -> tuple[list[int], list[tuple[int, int]]]:
    """Encode with the tokenizer's default special tokens (a LLaMA tokenizer adds BOS)."""
    encoding = tokenizer(text, return_offsets_mapping=with_offsets)
    ids = list(encoding["input_ids"])
    offsets = [tuple(o) for o in encoding["offset_mapping"]] if with_offsets else [_NO_CHARS] * len(ids)
    return ids, offsets


def _labels(
    text: str, ids: list[int], offsets: list[tuple[int, int]], spans: Sequence[tuple[int, int]]
) -> list[int]:
    """Copy the ids of supervised tokens, IGNORE_INDEX elsewhere.

    A token is supervised when its characters overlap a span. So is a whitespace-only token ending
    exactly where a span starts: the space after "ASSISTANT:" that the tokenizer did not merge into the
    answer's first word (" 3" -> " ", "3"); the model has to emit it, and the reference supervises it too.
    Slots and tokens from no text (BOS) never are.
    """
    starts = {start for start, end in spans if start < end}
    labels = []
    for token, (a, b) in zip(ids, offsets, strict=True):
        supervised = a < b and (
            any(a < end and b > start for start, end in spans) or (b in starts and text[a:b].isspace())
        )
        labels.append(token if supervised and token >= 0 else IGNORE_INDEX)
    return labels


def tokenize_multimodal(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    supervised_spans: Sequence[tuple[int, int]] | None = None,
    add_bos: bool = True,
) -> TokenizedPrompt:
    """Tokenize a rendered prompt, each placeholder becoming one slot id, with labels for `supervised_spans`.

    `supervised_spans` are character ranges [start, end) of `text` (as given by
    `Conversation.render_for_training`); a token is supervised when its characters overlap one of them
    (see `_labels` for the one exception). Offsets need a fast tokenizer.
    """
    want_labels = supervised_spans is not None
    if want_labels and not getattr(tokenizer, "is_fast", False):
        raise ValueError("labels need character offsets, which only fast (tokenizers-backed) tokenizers give")
    bos_id = tokenizer.bos_token_id

    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    token_slots = _placeholder_token_ids(tokenizer)
    if token_slots is not None:
        # One pass over the whole text, as the -hf processor does; placeholder tokens become slots.
        ids, offsets = _encode(tokenizer, text, want_labels)
        ids = [token_slots.get(i, i) for i in ids]
        if ids and ids[0] == bos_id and offsets[0] == _NO_CHARS:
            ids, offsets = ids[1:], offsets[1:]
        counts = count_placeholders(text)
        if (ids.count(IMAGE_SLOT), ids.count(VIDEO_SLOT)) != counts:
            raise ValueError(f"tokenizer split the placeholders of {text!r} into other tokens")
    else:
        # The reference's way: tokenize the text between placeholders piece by piece, dropping each piece's BOS.
        start = 0
        for match in [*PLACEHOLDER_PATTERN.finditer(text), None]:
            end = len(text) if match is None else match.start()
            piece_ids, piece_offsets = _encode(tokenizer, text[start:end], want_labels)
            if piece_ids and piece_ids[0] == bos_id and piece_offsets[0] == _NO_CHARS:
                piece_ids, piece_offsets = piece_ids[1:], piece_offsets[1:]
            ids += piece_ids
            offsets += [
                (a + start, b + start) if (a, b) != _NO_CHARS else _NO_CHARS for a, b in piece_offsets
            ]
            if match is not None:
                ids.append(SLOT_OF_PLACEHOLDER[match.group()])
                offsets.append(_NO_CHARS)
                start = match.end()

    if add_bos and bos_id is not None:
        ids.insert(0, bos_id)
        offsets.insert(0, _NO_CHARS)

    labels = None
    if supervised_spans is not None:
        labels = _labels(text, ids, offsets, supervised_spans)
    return TokenizedPrompt(
        input_ids=ids, labels=labels, num_images=ids.count(IMAGE_SLOT), num_videos=ids.count(VIDEO_SLOT)
    )
