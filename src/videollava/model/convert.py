"""`videollava convert`: any supported checkpoint layout in, the -hf layout out."""

from __future__ import annotations

import argparse

import torch

from videollava.arguments import add_device_option
from videollava.constants import (
    HF_SPECIAL_TOKENS,
    IMAGE_PLACEHOLDER,
    PAD_TOKEN,
    VIDEO_PLACEHOLDER,
    padded_vocab_size,
)
from videollava.model.bundle import load_bundle, save_bundle
from videollava.model.devices import resolve_device
from videollava.model.videollava import VideoLlava


def add_placeholder_tokens(model: VideoLlava, tokenizer) -> None:
    """Give an original-layout model the -hf vocabulary: `<image>`, `<video>`, `<pad>` as tokens.

    The new embedding rows are the mean of the existing ones; placeholders are replaced by visual
    features before the LLM sees them, so their rows are never used for images or videos.
    """
    missing = [t for t in HF_SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": [t for t in missing if t != PAD_TOKEN]})
        if PAD_TOKEN in missing:
            tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    llm = model.language_model
    old = llm.get_input_embeddings().weight.shape[0]
    size = padded_vocab_size(len(tokenizer))
    if size > old:
        with torch.no_grad():
            mean_in = llm.get_input_embeddings().weight.mean(0)
            mean_out = llm.get_output_embeddings().weight.mean(0)
            llm.resize_token_embeddings(size, mean_resizing=False)
            llm.get_input_embeddings().weight[old:] = mean_in
            llm.get_output_embeddings().weight[old:] = mean_out
        model.config.text_config["vocab_size"] = size
    model.config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    model.config.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_PLACEHOLDER)
    model.config.pad_token_id = tokenizer.pad_token_id


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("convert", help="convert a checkpoint to the Hugging Face -hf layout")
    parser.add_argument("source", help="checkpoint folder or hub id (-hf or original Video-LLaVA layout)")
    parser.add_argument("output", help="folder to write")
    parser.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16")
    add_device_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[args.dtype]
    bundle = load_bundle(args.source, dtype, resolve_device(args.device))
    if bundle.model.config.image_token_id < 0:
        add_placeholder_tokens(bundle.model, bundle.tokenizer)
    save_bundle(args.output, bundle.model, bundle.tokenizer, bundle.transform)
    print(f"wrote {args.output}")
    return 0
