"""Two CPU processes (torchrun, gloo) train exactly what one process trains with the same global batch.

Measured here: per-step losses of DDP and of FSDP2 (also when killed and resumed) agree with one
process to ~1e-7 relative in fp32 (the bound asserted is 1e-5); the exported weights agree to bf16 rounding.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_train_loop import make_world, tiny_recipe, train, write_recipe
from videollava.testing import TINY_TEXT_ENCODER, free_port
from videollava.train import distributed as D
from videollava.train.loop import read_metrics

ROOT = Path(__file__).resolve().parent.parent


def recipe(world: Path) -> dict:
    common = {"bf16": False, "log_every": 1, "warmup_ratio": 0.0}
    stages = [
        {"kind": "tokenizer", "vocab_size": 320},
        # Contrastive: the micro-batches (the negatives) are the same in both layouts, and so are the
        # region-name losses beside them.
        {
            "kind": "align_image",
            "text_encoder": {**TINY_TEXT_ENCODER},
            "region_loss": {"weight": 1.0},
            "projection_dim": 16,
            "lr": 2e-3,
            "batch_size": 8,
            "micro_batch_size": 2,
            "max_steps": 2,
            "eval": None,
            **common,
        },
        {"kind": "projector", "lr": 3e-3, "batch_size": 8, "micro_batch_size": 2, "max_steps": 2, **common},
        # Grouped batches: one rank may get only the text-only sample (no media in its forward).
        {"kind": "finetune", "lr": 3e-3, "batch_size": 8, "micro_batch_size": 2, "max_steps": 3, **common},
    ]
    return tiny_recipe(world, stages)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[Path, Path]:
    """The recipe and the run of one process: accumulation 4 where two processes use 2."""
    base = tmp_path_factory.mktemp("dist")
    world = make_world(base / "world", images=8, videos=4)
    raw = recipe(world)
    # A text-only sample makes the finetune data three-modal.
    entries = json.loads((world / "instruct.json").read_text())
    entries.append(
        {
            "id": "text-only",
            "conversations": [
                {"from": "human", "value": "Name a shape."},
                {"from": "gpt", "value": "a circle"},
            ],
        }
    )
    (world / "instruct.json").write_text(json.dumps(entries))
    path = write_recipe(base / "r.yaml", raw)
    train(path, base / "single")
    return path, base / "single"


def command(path: Path, output: Path, *overrides: str, resume: bool = False) -> list[str]:
    line = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "videollava",
        "train",
        str(path),
        "--output",
        str(output),
    ] + (["--resume"] if resume else [])
    for item in overrides:
        line += ["--set", item]
    return line


def start(line: list[str], cwd: Path | None = None, **env: str) -> subprocess.Popen:
    # This checkout's sources first: the processes run the code under test, whatever is installed.
    path = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    return subprocess.Popen(
        line,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": path, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def workers(process: subprocess.Popen) -> list[int]:
    """torchrun's worker processes (each in a process group of its own)."""
    try:
        return [
            int(pid) for pid in Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        ]
    except OSError:
        return []


def kill(process: subprocess.Popen) -> None:
    """SIGKILL the workers, then torchrun: the run stops wherever it is."""
    for pid in workers(process):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.kill()
    process.communicate()


def torchrun(path: Path, output: Path, *overrides: str, resume: bool = False) -> None:
    process = start(command(path, output, *overrides, resume=resume))
    try:
        _, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        kill(process)
        pytest.fail("torchrun did not finish in 240 s")
    assert process.returncode == 0, stderr[-4000:]


def steps(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if r["event"] == "step"]


def compare(single: Path, multi: Path) -> None:
    a, b = steps(single), steps(multi)
    assert [(r["stage"], r["step"]) for r in a] == [(r["stage"], r["step"]) for r in b]  # rank 0 logs, once
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), (x, y)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4), (x, y)
        assert y["samples"] == x["samples"] and y["items"] == x["items"]
    wa = load_file(str(single / "model" / "model.safetensors"))
    wb = load_file(str(multi / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name].float(), wb[name].float(), rtol=2e-2, atol=1e-3)
    assert json.loads((multi / "summary.json").read_text())["world_size"] == 2


def test_ddp_two_processes_equal_one(single, tmp_path):
    path, one = single
    torchrun(path, tmp_path / "ddp", "distributed.strategy=ddp")
    compare(one, tmp_path / "ddp")


def test_ddp_shares_a_global_batch_smaller_than_its_micro_batches(single, tmp_path):
    """micro_batch_size 8 = batch_size 8 on two processes: one micro-batch of 4 each, the same steps."""
    path, one = single
    overrides = ("stage.projector.micro_batch_size=8", "stage.finetune.micro_batch_size=8")
    torchrun(path, tmp_path / "ddp", "distributed.strategy=ddp", *overrides)
    compare(one, tmp_path / "ddp")


def test_fsdp_two_processes_equal_one_across_a_kill(single, tmp_path):
    """FSDP2, SIGKILLed in the middle of the last stage and resumed: still the one-process losses."""
    path, one = single
    run = tmp_path / "fsdp"
    overrides = ("distributed.strategy=fsdp", "stage.finetune.checkpoint_every=1")
    process = start(command(path, run, *overrides))
    deadline = time.time() + 240
    try:
        while not ((run / "latest").exists() and (run / "latest").read_text().strip() == "checkpoint-3-1"):
            assert process.poll() is None, process.communicate()[1][-4000:]
            assert time.time() < deadline, "no finetune checkpoint in 240 s"
            time.sleep(0.02)
    finally:
        kill(process)
    assert not (run / "summary.json").exists()
    torchrun(path, run, *overrides, resume=True)
    compare(one, run)


def test_world_of_one_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = D.setup("ddp")
    assert not info.enabled and info.is_main and info.device.type in ("cpu", "cuda")
    strategy = D.strategy_for("ddp", info)
    module = torch.nn.Linear(2, 2)
    strategy.wrap(module, find_unused_parameters=False)
    assert strategy.name == "none" and not strategy.averages_gradients and strategy.module is module
    assert D.all_gather_objects({"a": 1}, info) == [{"a": 1}]


def test_readme_ddp_command_runs_the_full_recipe(tmp_path):
    """`torchrun --nproc_per_node 2 -m videollava train configs/shapesworld.yaml`, as the README has it.

    The recipe's first stage has batch_size 128 = micro_batch_size 128, which two processes share
    as one micro-batch of 64 each. `--set` overrides cut the data and every stage to one step.
    """
    (tmp_path / "configs").mkdir()
    shutil.copy(ROOT / "configs" / "shapesworld.yaml", tmp_path / "configs" / "shapesworld.yaml")
    torchrun_script = Path(sys.executable).with_name("torchrun")
    launcher = (
        [str(torchrun_script)]
        if torchrun_script.exists()
        else [sys.executable, "-m", "torch.distributed.run"]
    )
    line = [*launcher, "--nproc_per_node", "2", "-m", "videollava", "train", "configs/shapesworld.yaml"]
    overrides = [
        "data.generate.images=16",
        "data.generate.videos=8",
        "data.generate.test_images=4",
        "data.generate.test_videos=4",
        "data.generate.workers=1",
        "run.threads=1",
        "run.progress=false",
        *(f"stage.{name}.max_steps=1" for name in ("align_image", "align_video", "projector", "finetune")),
    ]
    for item in overrides:
        line += ["--set", item]
    # torchrun reads its options from PET_* variables too: a free port keeps the command as written.
    process = start(line, cwd=tmp_path, PET_MASTER_PORT=str(free_port()))
    try:
        _, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        kill(process)
        pytest.fail("torchrun did not finish in 120 s")
    assert process.returncode == 0, stderr[-4000:]
    run = tmp_path / "runs" / "shapesworld"  # the default run folder, under the working directory
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert [s["kind"] for s in summary["stages"]] == [
        "tokenizer",
        "align_image",
        "align_video",
        "projector",
        "finetune",
    ]
    first = [r for r in steps(run) if r["stage"] == "align_image"]
    # One step over the whole (small) data set: every sample of the global batch was trained on.
    assert len(first) == 1 and first[0]["samples"] == 32  # 16 images and their 16 twins
    assert (run / "model" / "model.safetensors").is_file()
