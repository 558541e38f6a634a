"""Building a Video-LLaVA model from the shapes of its parts: its config, fresh weights, or the
meta device (shapes and parameter counts without memory or downloads)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from videollava.constants import IMAGE_PLACEHOLDER, IMAGE_SLOT, VIDEO_PLACEHOLDER, VIDEO_SLOT
from videollava.model.videollava import VideoLlava, VideoLlavaConfig
from videollava.model.vision import VisionConfig, VisionTower


@dataclass
class LLMConfig:
    """LLaMA shape of the language model; `vocab_size` None means "the tokenizer's, padded"."""

    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    max_position_embeddings: int = 1024
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    vocab_size: int | None = None
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02


def text_config(llm: LLMConfig, vocab_size: int, tokenizer: Any = None) -> dict[str, Any]:
    """The LLM's `transformers` config as a dict; special token ids from `tokenizer` when given."""
    data = {k: v for k, v in asdict(llm).items() if v is not None}
    data["vocab_size"] = llm.vocab_size or vocab_size
    data.setdefault("num_key_value_heads", llm.num_attention_heads)
    data["model_type"] = "llama"
    if tokenizer is not None:
        data["bos_token_id"] = tokenizer.bos_token_id
        data["eos_token_id"] = tokenizer.eos_token_id
        data["pad_token_id"] = tokenizer.pad_token_id
    return data


def placeholder_id(tokenizer: Any, token: str, slot: int) -> int:
    """The id of `<image>` / `<video>` in the tokenizer, or the slot itself when it has no such token."""
    if tokenizer is None:
        return slot
    found = tokenizer.convert_tokens_to_ids(token)
    return slot if found is None or found == tokenizer.unk_token_id else int(found)


def model_config(
    vision: VisionConfig, llm: LLMConfig, vocab_size: int, tokenizer: Any = None, **options: Any
) -> VideoLlavaConfig:
    """The config of a model with these towers and this LLM; `options` are further VideoLlavaConfig
    fields (frames, feature layer, aspect ratios, template)."""
    return VideoLlavaConfig(
        vision=vision,
        text_config=text_config(llm, vocab_size, tokenizer),
        image_token_id=placeholder_id(tokenizer, IMAGE_PLACEHOLDER, IMAGE_SLOT),
        video_token_id=placeholder_id(tokenizer, VIDEO_PLACEHOLDER, VIDEO_SLOT),
        pad_token_id=tokenizer.pad_token_id if tokenizer is not None else 0,
        **options,
    )


def build_meta_model(config: VideoLlavaConfig) -> VideoLlava:
    """The model on the meta device: shapes and parameter counts without memory or downloads."""
    with torch.device("meta"):
        return VideoLlava(config)


def init_vision_tower(tower: VisionTower, std: float) -> None:
    """CLIP-style init for a tower trained from scratch; temporal modules start as a no-op."""
    with torch.no_grad():
        for module in tower.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Conv2d | nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
        tower.embeddings.class_embedding.normal_(std=std)
        for layer in tower.encoder.layers:
            if hasattr(layer, "temporal_embedding"):
                layer.temporal_embedding.zero_()
                layer.temporal_attn.out_proj.weight.zero_()
                layer.temporal_attn.out_proj.bias.zero_()
