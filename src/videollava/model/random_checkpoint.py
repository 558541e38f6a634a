"""Random Video-LLaVA checkpoints in the real -hf layout, written by transformers itself.

Tests and benchmarks need checkpoints they can build offline: these come from
`transformers.VideoLlavaForConditionalGeneration` with random weights, saved with its own
`save_pretrained`, next to a tokenizer and a preprocessor config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from videollava.data.transforms import ImageTransformConfig


def write_random_checkpoint(
    folder: str | Path,
    tokenizer: Any,
    vision: dict[str, Any],
    text: dict[str, Any],
    frames: int = 8,
    seed: int = 0,
    scale: float = 0.1,
    eos_never_argmax: bool = False,
):
    """Save a random model, `tokenizer` and preprocessor config into `folder`; return the model.

    Every weight is drawn anew (norm weights near one), since CLIP's own init leaves many at zero.
    `eos_never_argmax` pins the EOS logit at zero, so random greedy answers run to full length.
    """
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        VideoLlavaConfig,
        VideoLlavaForConditionalGeneration,
    )

    folder = Path(folder)
    torch.manual_seed(seed)
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    config = VideoLlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=LlamaConfig(
            **text,
            vocab_size=-(-len(tokenizer) // 64) * 64,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_seq_length=patches,
        video_seq_length=frames * (patches + 1),
    )
    config.pad_token_id = tokenizer.pad_token_id
    model = VideoLlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_(1 + scale * torch.randn_like(param))
            else:
                param.copy_(scale * torch.randn_like(param))
        if eos_never_argmax:
            model.lm_head.weight[tokenizer.eos_token_id] = 0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    size = vision["image_size"]
    ImageTransformConfig(size=size, crop_size=size).to_preprocessor_json(folder)
    return model
