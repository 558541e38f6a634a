"""Random checkpoints written shard by shard: transformers and our loader both read them whole."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from videollava.model.bundle import load_bundle
from videollava.model.checkpoint import load_weights
from videollava.testing import TINY_TEXT as TEXT
from videollava.testing import TINY_VISION as VISION
from videollava.testing import write_large_random_checkpoint

FRAMES = 4


@pytest.fixture(scope="module")
def large_written(tmp_path_factory, tiny_tokenizer):
    folder = tmp_path_factory.mktemp("large-random")
    total = write_large_random_checkpoint(
        folder, tiny_tokenizer, VISION, TEXT, frames=FRAMES, vocab_size=1024, shard_bytes=64 * 1024
    )
    return folder, total


def _file_tensors(folder) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    tensors = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(str(folder / file), "pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
    assert set(tensors) == set(index["weight_map"])
    return tensors


def test_shards_index_and_sizes(large_written):
    folder, total = large_written
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[-1].endswith(f"-of-{len(shards):05d}.safetensors")
    tensors = _file_tensors(folder)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert index["metadata"]["total_size"] == total == sum(t.numel() * 2 for t in tensors.values())
    embed = tensors["model.language_model.embed_tokens.weight"]
    assert embed.shape == (1024, TEXT["hidden_size"])
    norm = tensors["model.language_model.norm.weight"].float()
    assert 0.9 < norm.mean() < 1.1 and embed.float().std() < 0.05  # norms near one, the rest small


def test_transformers_reads_every_weight(large_written):
    """Names and shapes are transformers' own: nothing missing; only our temporal weights are extra."""
    from transformers import VideoLlavaForConditionalGeneration

    folder, _ = large_written
    model, info = VideoLlavaForConditionalGeneration.from_pretrained(
        folder, dtype=torch.bfloat16, output_loading_info=True
    )
    assert not info["missing_keys"]
    assert info["unexpected_keys"] and all(".temporal_" in k for k in info["unexpected_keys"])
    tensors = _file_tensors(folder)
    state = model.state_dict()
    for name in (
        "model.language_model.layers.1.mlp.up_proj.weight",
        "model.video_tower.encoder.layers.2.mlp.fc1.weight",
    ):
        torch.testing.assert_close(state[name], tensors[name], rtol=0, atol=0)


def test_our_loader_reads_it_with_temporal_modules(large_written):
    folder, _ = large_written
    model, _ = load_weights(folder, torch.bfloat16)
    assert model.config.temporal_frames == FRAMES
    tensors = _file_tensors(folder)
    torch.testing.assert_close(
        model.video_tower.encoder.layers[1].temporal_attn.v_proj.weight,
        tensors["model.video_tower.encoder.layers.1.temporal_attn.v_proj.weight"],
        rtol=0,
        atol=0,
    )
    bundle = load_bundle(folder, torch.bfloat16)  # the tokenizer fits the 1024 rows
    assert bundle.model.language_model.get_input_embeddings().num_embeddings == 1024


def test_vocab_smaller_than_the_tokenizer_is_refused(tmp_path, tiny_tokenizer):
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        write_large_random_checkpoint(tmp_path, tiny_tokenizer, VISION, TEXT, vocab_size=8)
