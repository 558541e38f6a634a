"""The strings and numbers that prompts, data, the model and its checkpoints must agree on, each defined once."""

from __future__ import annotations

import re

# Where a prompt shows an image or a video; the model puts that item's feature rows there.
IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
PLACEHOLDER_PATTERN = re.compile(f"{re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)}")

# Token ids of the placeholders after tokenization: negative, so no vocabulary can hold them.
IMAGE_SLOT = -200
VIDEO_SLOT = -201
SLOT_OF_PLACEHOLDER = {IMAGE_PLACEHOLDER: IMAGE_SLOT, VIDEO_PLACEHOLDER: VIDEO_SLOT}

# The label of a position the loss skips: PyTorch's cross-entropy default `ignore_index`.
IGNORE_INDEX = -100

# The -hf port's special tokens, appended after LLaMA's 32000 tokens with these ids.
PAD_TOKEN = "<pad>"
HF_SPECIAL_TOKENS = (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, PAD_TOKEN)
HF_IMAGE_TOKEN_ID = 32000
HF_VIDEO_TOKEN_ID = 32001
HF_PAD_TOKEN_ID = 32002

# The -hf port pads its embedding rows to a multiple of this (32003 tokens, 32064 rows), as do models built here.
VOCAB_MULTIPLE = 64


def padded_vocab_size(tokens: int) -> int:
    """Embedding rows for `tokens` tokens: the next multiple of `VOCAB_MULTIPLE`."""
    return -(-tokens // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
