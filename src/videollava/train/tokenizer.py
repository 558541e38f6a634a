"""Train a small LLaMA-shaped tokenizer, for tiny models and for tests that must not download anything.

The result behaves like the Video-LLaVA tokenizers where it matters: `<unk>`=0, `<s>`=1, `</s>`=2,
a BOS prepended to every encoding, `</s>` in text read as the EOS token, left padding, and (optionally)
`<image>` / `<video>` / `<pad>` appended after the base vocabulary like the -hf port's 32000 / 32001 / 32002.
Byte-level BPE keeps decoding exact for any text, spaces and newlines included.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from videollava.constants import IMAGE_PLACEHOLDER, PAD_TOKEN, VIDEO_PLACEHOLDER

UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"

_BASE_SPECIALS = [UNK_TOKEN, BOS_TOKEN, EOS_TOKEN]  # ids 0, 1, 2 as in LLaMA
_BYTE_ALPHABET = len(pre_tokenizers.ByteLevel.alphabet())


def _pieces_between_specials(texts: Iterable[str]) -> Iterator[str]:
    """Text between special tokens: the trainer does not split on them, but encoding does."""
    pattern = re.compile(
        "|".join(re.escape(t) for t in (*_BASE_SPECIALS, PAD_TOKEN, IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER))
    )
    for text in texts:
        yield from (piece for piece in pattern.split(text) if piece)


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 1000,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    placeholder_tokens: bool = True,
    model_max_length: int = 2048,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with LLaMA's special-token layout.

    `vocab_size` counts every token, added ones included; a small corpus may run out of merges before it. With `placeholder_tokens=False` the tokenizer
    lacks `<image>` / `<video>`, like the original LLaMA tokenizer, so prompts must be split on them.
    """
    added = [IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, PAD_TOKEN] if placeholder_tokens else [PAD_TOKEN]
    smallest = _BYTE_ALPHABET + len(_BASE_SPECIALS) + len(added)
    if vocab_size < smallest:
        raise ValueError(
            f"vocab_size must be at least {smallest} (256 bytes + special tokens), got {vocab_size}"
        )

    backend = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(added),
        special_tokens=_BASE_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Placeholders are never learned as text: without placeholder tokens they must stay several tokens
    # long, as in LLaMA's tokenizer.
    backend.train_from_iterator(_pieces_between_specials(texts), trainer)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER] if placeholder_tokens else [],
        add_bos_token=True,  # builds the LLaMA post-processor "<s> $A", saved into tokenizer.json
        add_eos_token=False,
        model_max_length=model_max_length,
        padding_side="left",  # batched generation needs the prompts to end at the same column
        clean_up_tokenization_spaces=False,  # keep " ?" and " ." exactly as written
    )
    if out_dir is not None:
        tokenizer.save_pretrained(os.fspath(out_dir))
    return tokenizer
