"""Checkpoints survive SIGKILL; a resumed run ends with the same per-step losses as an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_train_loop import make_world, step_losses, tiny_recipe, train, write_recipe
from videollava.train import checkpointing as ckpt
from videollava.train.loop import read_metrics


def test_checkpoint_write_is_atomic_and_pruned(tmp_path):
    weights = {"w": torch.arange(4.0)}
    for step in (1, 2, 3):
        state = ckpt.TrainerState(stage_index=1, stage="s", step=step)
        ckpt.save_checkpoint(
            tmp_path, state, {"w": weights["w"] * step}, {"state": {}}, {"last_epoch": step}, keep=2
        )
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-1-2", "checkpoint-1-3"]
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-1-3"

    # A crash while the next checkpoint is being assembled leaves a temp folder: it is ignored.
    crashed = ckpt.begin_checkpoint(tmp_path, ckpt.TrainerState(stage_index=1, stage="s", step=4))
    (crashed / "weights.safetensors").write_bytes(b"half a file")
    latest = ckpt.latest_checkpoint(tmp_path)
    loaded = ckpt.load_checkpoint(latest)
    assert latest.name == "checkpoint-1-3" and torch.equal(loaded.weights["w"], weights["w"] * 3)
    assert loaded.scheduler == {"last_epoch": 3} and loaded.state.step == 3

    # A stale pointer (its folder gone) falls back to the newest complete checkpoint.
    (tmp_path / "latest").write_text("checkpoint-9-9\n")
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint-1-3"


def test_rng_state_round_trip(tmp_path):
    import random

    import numpy as np

    ckpt.seed_everything(5)
    state = ckpt.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert (
        torch.equal(expected[0], again[0])
        and np.array_equal(expected[1], again[1])
        and expected[2] == again[2]
    )


def resume_recipe(world: Path) -> dict:
    recipe = tiny_recipe(world)
    recipe["stages"][1].update(max_steps=1, eval=None)
    recipe["stages"][2].update(max_steps=1, eval=None)
    recipe["run"]["export"] = {"enabled": False}
    for stage in recipe["stages"][3:]:
        stage["checkpoint_every"] = 1
    recipe["stages"][3].update(epochs=2)  # projector: 2 epochs, so the kill can land across an epoch edge
    # LoRA with dropout in the last stage: the resumed run must also restore the RNG to match.
    recipe["stages"][4].update(
        max_steps=3, lora={"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}
    )
    return recipe


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    world = make_world(tmp_path / "world", images=8, videos=4)
    recipe = write_recipe(tmp_path / "r.yaml", resume_recipe(world))

    reference = tmp_path / "reference"
    train(recipe, reference)

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    process = subprocess.Popen(
        [sys.executable, "-m", "videollava", "train", str(recipe), "--output", str(killed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    # Kill it with SIGKILL as soon as the projector stage (index 3) has a checkpoint: mid-stage, maybe
    # mid-write of the next one.
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            name = ckpt.read_latest_name(killed) if (killed / "latest").exists() else None
            if name and name.startswith("checkpoint-3-") and name != "checkpoint-3-0":
                break
            assert process.poll() is None, "the run ended before it could be killed"
            time.sleep(0.02)
        time.sleep(0.3)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not (killed / "summary.json").exists(), "the run finished before the kill"
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(killed)).state
    assert state.stage_index >= 3 and not (state.stage_index == 4 and state.complete)

    assert train(recipe, killed, resume=True) == 0

    def by_step(run: Path) -> dict[tuple[int, int], dict]:
        return {
            (r["stage_index"], r["step"]): r
            for r in read_metrics(run / "metrics.jsonl")
            if r["event"] == "step"
        }

    a, b = by_step(reference), by_step(killed)
    assert sorted(a) == sorted(b)  # every step logged once, none missing
    for key in a:
        assert a[key]["loss"] == pytest.approx(b[key]["loss"], rel=1e-6, abs=1e-6), key
        assert a[key]["lr"] == pytest.approx(b[key]["lr"], rel=1e-9)
    assert step_losses(reference) == pytest.approx(step_losses(killed), rel=1e-6)
    summary_a = json.loads((reference / "summary.json").read_text())
    summary_b = json.loads((killed / "summary.json").read_text())
    trained_a = [s["final_loss"] for s in summary_a["stages"] if s["kind"] != "tokenizer"]
    trained_b = [s["final_loss"] for s in summary_b["stages"] if s["kind"] != "tokenizer"]
    assert trained_a == pytest.approx(trained_b, rel=1e-6)
