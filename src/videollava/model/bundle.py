"""A whole model on disk: weights and config, tokenizer and preprocessing constants, checked to belong together.

Inference loads bundles, `videollava convert` rewrites them and training exports them; all three go
through here, so the -hf layout is written in one place and a tokenizer that does not fit its
weights is refused in one place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from videollava.data.chat_template import chat_template
from videollava.data.conversation import get_template
from videollava.data.transforms import ImageTransformConfig
from videollava.errors import CheckpointError
from videollava.model.checkpoint import load_weights, save_weights
from videollava.model.videollava import VideoLlava, VideoLlavaConfig


@dataclass
class Bundle:
    model: VideoLlava
    tokenizer: PreTrainedTokenizerBase
    transform: ImageTransformConfig  # how images and frames are resized and normalised for the towers
    folder: Path  # where it was read from (a hub id resolved to its local snapshot)


def load_bundle(
    path_or_id: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Bundle:
    """Any supported checkpoint layout, with the tokenizer and preprocessing constants saved beside it."""
    model, folder = load_weights(path_or_id, dtype, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as error:
        raise CheckpointError(f"{folder}: no usable tokenizer ({type(error).__name__}: {error})") from None
    check_vocabulary(tokenizer, model, folder)
    return Bundle(model, tokenizer, read_transform(folder, model.config), folder)


def save_bundle(
    out_dir: str | os.PathLike,
    model: VideoLlava,
    tokenizer: PreTrainedTokenizerBase,
    transform: ImageTransformConfig,
) -> None:
    """The -hf layout: config.json and safetensors, the tokenizer's files, preprocessor_config.json, and
    chat_template.jinja: the model's prompt template, so other engines build `videollava serve`'s prompts."""
    save_weights(model, out_dir)
    tokenizer.save_pretrained(str(out_dir))
    transform.to_preprocessor_json(out_dir)
    if get_template(model.config.template).style == "two":
        (Path(out_dir) / "chat_template.jinja").write_text(chat_template(model.config.template))


def check_vocabulary(tokenizer: Any, model: VideoLlava, folder: str | os.PathLike) -> None:
    """A tokenizer with ids past the LLM's embedding rows would fail mid-generation: refuse it at load."""
    rows = model.language_model.get_input_embeddings().num_embeddings
    tokens = max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)
    if tokens > rows:
        raise CheckpointError(
            f"{folder}: the tokenizer has {tokens} tokens but the model's embedding has {rows} rows "
            f"(vocab_size {rows}); ids {rows} and up would be out of range. "
            "The tokenizer does not belong to these weights."
        )


def read_transform(folder: Path, config: VideoLlavaConfig) -> ImageTransformConfig:
    """The checkpoint's own preprocessing constants, its aspect mode, and its tower's input size."""
    size = config.vision.image_size
    aspects = {
        "image_aspect_ratio": config.image_aspect_ratio,
        "video_aspect_ratio": config.video_aspect_ratio,
    }
    if (folder / "preprocessor_config.json").exists():
        return ImageTransformConfig.from_preprocessor_json(folder, **aspects)
    try:
        return ImageTransformConfig(size=size, crop_size=size, **aspects)
    except ValueError as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from None
