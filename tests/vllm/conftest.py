"""The vLLM tests: collected only where vLLM is installed (`.venv-vllm`, made by scripts/test-vllm).

In the main environment this folder holds nothing to collect, so `pytest -q` neither fails nor
waits on it. Checkpoints are tiny and random, in float32, with the LLM's head_dim at 64 (vLLM's
CPU attention does not take 16); media are made here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("vllm") is None:
    collect_ignore_glob = ["test_*.py"]

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache: plenty for these checkpoints

# 4 x 4 patches of 14 px (16 image rows, 17 per frame); LLaMA with two heads of 64, one KV head.
FRAMES_TRAINED = 4  # rows of the temporal embedding; the checkpoint's default frame count is 8
MAX_TOKENS = 12


def _text_shape():
    from videollava.testing import llama_shape

    return llama_shape(128, 2, 2, mlp=256, kv_heads=1, context=1024, rms_norm_eps=1e-5)


@pytest.fixture(scope="session")
def tokenizer():
    from videollava.testing import tiny_test_tokenizer

    return tiny_test_tokenizer()


@pytest.fixture(scope="session")
def temporal_checkpoint(tmp_path_factory, tokenizer) -> Path:
    """Saved by videollava (`save_bundle`): temporal weights, our config fields, chat_template.jinja.
    EOS never wins the argmax, so greedy answers run to full length."""
    import torch

    from videollava.model.bundle import load_bundle, save_bundle
    from videollava.testing import TINY_VISION, write_large_random_checkpoint

    root = tmp_path_factory.mktemp("temporal")
    write_large_random_checkpoint(
        root / "raw",
        tokenizer,
        TINY_VISION,
        _text_shape(),
        frames=FRAMES_TRAINED,
        dtype=torch.float32,
        scale=0.1,
    )
    bundle = load_bundle(root / "raw")
    assert bundle.model.config.temporal_frames == FRAMES_TRAINED
    with torch.no_grad():
        bundle.model.language_model.lm_head.weight[tokenizer.eos_token_id] = 0
    save_bundle(root / "model", bundle.model, bundle.tokenizer, bundle.transform)
    return root / "model"


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory, tokenizer) -> Path:
    """Saved by transformers' own `save_pretrained`: the -hf port's layout, no temporal weights, no
    chat template."""
    from videollava.testing import TINY_VISION, write_random_checkpoint

    folder = tmp_path_factory.mktemp("hf")
    write_random_checkpoint(folder, tokenizer, TINY_VISION, _text_shape(), eos_never_argmax=True)
    return folder


@pytest.fixture(scope="session")
def media(tmp_path_factory) -> dict[str, Path]:
    """Two videos of different sizes and lengths, two pictures (one wide, one tall)."""
    import numpy as np
    from PIL import Image

    from videollava.testing import write_moving_square_video

    folder = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    write_moving_square_video(folder / "clip.mp4", 96, 72, 30)
    write_moving_square_video(folder / "long.mp4", 64, 112, 57)
    Image.fromarray((rng.random((60, 80, 3)) * 255).astype(np.uint8)).save(folder / "wide.png")
    Image.fromarray((rng.random((90, 50, 3)) * 255).astype(np.uint8)).save(folder / "tall.jpg", quality=90)
    return {p.stem: p for p in folder.iterdir()}


def ask_batch(
    checkpoint: Path, requests: list[dict], tmp_path: Path, frames: int | None = None
) -> list[dict]:
    """`videollava ask --dtype float32 --batch`, one request at a time: each answer's JSON."""
    requests_file = tmp_path / "requests.jsonl"
    answers_file = tmp_path / "answers.jsonl"
    requests_file.write_text("".join(json.dumps(r) + "\n" for r in requests))
    command = [sys.executable, "-m", "videollava", "ask", "--model", str(checkpoint), "--dtype", "float32"]
    command += [
        "--max-new-tokens",
        str(MAX_TOKENS),
        "--batch",
        str(requests_file),
        "--output",
        str(answers_file),
    ]
    command += ["--batch-size", "1"] + (["--frames", str(frames)] if frames else [])
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    answers = [json.loads(line) for line in answers_file.read_text().splitlines()]
    assert all("error" not in a for a in answers), answers
    return answers
