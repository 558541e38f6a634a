"""Random Video-LLaVA checkpoints in the real -hf layout, with transformers' own names and config.

Tests and benchmarks need checkpoints they can build offline. Small ones come from
`transformers.VideoLlavaForConditionalGeneration` with random weights, saved with its own
`save_pretrained`; full-size ones (a 7B LLM does not fit in memory in float32) are written
tensor by tensor under the names of the same transformers model, built on the meta device.
Both get a tokenizer and a preprocessor config beside them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from videollava.data.transforms import ImageTransformConfig


def hf_config(
    tokenizer: Any,
    vision: dict[str, Any],
    text: dict[str, Any],
    frames: int = 8,
    vocab_size: int | None = None,
):
    """transformers' VideoLlavaConfig for these tower and LLM shapes and this tokenizer's special ids.

    The vocabulary is the tokenizer's, rounded up to a multiple of 64, unless `vocab_size` asks for more
    rows (the real checkpoint has 32064 rows for LLaMA's 32000 tokens and three added ones).
    """
    from transformers import CLIPVisionConfig, LlamaConfig, VideoLlavaConfig

    rows = -(-len(tokenizer) // 64) * 64
    if vocab_size is not None:
        if vocab_size < len(tokenizer):
            raise ValueError(
                f"vocab_size {vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)"
            )
        rows = vocab_size
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    config = VideoLlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=LlamaConfig(
            **text,
            vocab_size=rows,
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
    return config


def _write_companions(folder: Path, tokenizer: Any, vision: dict[str, Any]) -> None:
    tokenizer.save_pretrained(folder)
    size = vision["image_size"]
    ImageTransformConfig(size=size, crop_size=size).to_preprocessor_json(folder)


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
    from transformers import VideoLlavaForConditionalGeneration

    folder = Path(folder)
    torch.manual_seed(seed)
    model = VideoLlavaForConditionalGeneration(hf_config(tokenizer, vision, text, frames)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(_random_like(name, param.shape, param.dtype, scale))
        if eos_never_argmax:
            model.lm_head.weight[tokenizer.eos_token_id] = 0
    model.save_pretrained(folder)
    _write_companions(folder, tokenizer, vision)
    return model


def _random_like(name: str, shape: tuple[int, ...], dtype: torch.dtype, scale: float) -> torch.Tensor:
    """Norm weights near one, everything else small and centred."""
    values = torch.randn(shape, dtype=dtype)
    if "norm" in name and name.endswith("weight"):
        return values.mul_(scale).add_(1)
    return values.mul_(scale)


def temporal_shapes(vision: dict[str, Any], frames: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the divided space-time modules of every video tower layer (LanguageBind's)."""
    width = vision["hidden_size"]
    shapes: dict[str, tuple[int, ...]] = {}
    for n in range(vision["num_hidden_layers"]):
        prefix = f"model.video_tower.encoder.layers.{n}."
        shapes[prefix + "temporal_embedding"] = (1, frames, width)
        shapes[prefix + "temporal_layer_norm1.weight"] = (width,)
        shapes[prefix + "temporal_layer_norm1.bias"] = (width,)
        for proj in ("q", "k", "v", "out"):
            shapes[prefix + f"temporal_attn.{proj}_proj.weight"] = (width, width)
            shapes[prefix + f"temporal_attn.{proj}_proj.bias"] = (width,)
    return shapes


def write_large_random_checkpoint(
    folder: str | Path,
    tokenizer: Any,
    vision: dict[str, Any],
    text: dict[str, Any],
    frames: int = 8,
    vocab_size: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    temporal: bool = True,
    seed: int = 0,
    scale: float = 0.02,
    shard_bytes: int = 2 * 1024**3,
) -> int:
    """Write a random checkpoint of any size without holding it in memory; return its bytes of weights.

    Names and shapes are those of transformers' VideoLlavaForConditionalGeneration (built on the meta
    device); tensors are drawn in `dtype` and written shard by shard with a safetensors index, so
    memory stays near `shard_bytes`. With `temporal`, the video tower also gets LanguageBind's
    temporal modules under their own names, as a faithful video tower has them.
    """
    from transformers import VideoLlavaForConditionalGeneration

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = hf_config(tokenizer, vision, text, frames, vocab_size)
    config.dtype = dtype
    with torch.device("meta"):
        shapes = {
            name: tuple(tensor.shape)
            for name, tensor in VideoLlavaForConditionalGeneration(config).state_dict().items()
        }
    if temporal:
        shapes.update(temporal_shapes(vision, frames))
    torch.manual_seed(seed)
    itemsize = torch.empty((), dtype=dtype).element_size()
    # Shards are filled in order, each up to shard_bytes; a shard's final name needs the count.
    shards: list[list[str]] = [[]]
    shard_sizes = [0]
    for name, shape in shapes.items():
        nbytes = itemsize * torch.Size(shape).numel()
        if shards[-1] and shard_sizes[-1] + nbytes > shard_bytes:
            shards.append([])
            shard_sizes.append(0)
        shards[-1].append(name)
        shard_sizes[-1] += nbytes
    weight_map = {}
    for number, names in enumerate(shards, 1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: _random_like(name, shapes[name], dtype, scale) for name in names}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        del tensors
        weight_map.update(dict.fromkeys(names, file))
    total = sum(shard_sizes)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(folder)
    _write_companions(folder, tokenizer, vision)
    return total
