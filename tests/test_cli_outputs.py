"""What the commands and benchmarks write by default stays out of the checkout's tracked files."""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from videollava.cli import main

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def _bench_results_module():
    spec = importlib.util.spec_from_file_location("bench_results", BENCH / "_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}


def _ignored_by_git(relative: str) -> bool:
    result = subprocess.run(["git", "check-ignore", "-q", relative], cwd=ROOT, capture_output=True)
    return result.returncode == 0


def test_shapesworld_generate_writes_under_runs_by_default(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["--images", "2", "--videos", "0", "--test-images", "1", "--test-videos", "0", "--dry-run"]
    assert main(["shapesworld", "generate", "--seed", "3", *args]) == 0
    written = tmp_path / "runs" / "shapesworld-data" / "seed-3"
    assert (written / "captions.json").is_file() and (written / "test_questions.jsonl").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    assert str(Path("runs") / "shapesworld-data" / "seed-3") in capsys.readouterr().out


def test_default_outputs_are_ignored_by_git():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for relative in (
        "runs/shapesworld-data/seed-1/test_questions.jsonl",  # shapesworld generate
        "runs/shapesworld/summary.json",  # train configs/shapesworld.yaml
        "runs/eval/shapesworld.md",  # the README's evaluation report
        "runs/bench/serve.json",  # every benchmark
        "runs/bench/serve.png",
    ):
        assert _ignored_by_git(relative), relative
    assert not _ignored_by_git("bench/results/serve.json")  # the recorded results stay tracked


def test_bench_results_go_to_runs_unless_recorded():
    results = _bench_results_module()
    parser = argparse.ArgumentParser()
    results.add_output_arguments(parser, "demo")
    assert results.results_path(parser.parse_args([]), "demo") == ROOT / "runs" / "bench" / "demo.json"
    assert results.results_path(parser.parse_args(["--record"]), "demo") == BENCH / "results" / "demo.json"
    assert results.results_path(parser.parse_args(["--output", "x.json"]), "demo") == Path("x.json")


@pytest.mark.parametrize("name", ["ask_latency", "frame_sampling", "serve"])
def test_every_benchmark_writes_through_the_shared_rule(name):
    """Read, not run (importing transformers alone takes seconds): each script declares the
    --output / --record pair and writes its results only through `write_results(results_path(...))`."""
    tree = ast.parse((BENCH / f"{name}.py").read_text())
    calls = {
        node.func.id: node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }
    assert "add_output_arguments" in calls and "write_results" in calls
    writes = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr in ("write_text", "write_bytes")
    ]
    assert writes == [], f"{name} writes a file outside write_results"
    assert 'results"' not in (BENCH / f"{name}.py").read_text().replace("bench/results/", "")


def test_frame_sampling_refuses_output_with_record(tmp_path):
    line = [
        sys.executable,
        str(BENCH / "frame_sampling.py"),
        "--record",
        "--output",
        str(tmp_path / "x.json"),
    ]
    result = subprocess.run(line, capture_output=True, text=True, timeout=300, env=_env())
    assert result.returncode == 2 and "--output: not allowed with argument --record" in result.stderr


def test_a_benchmark_run_leaves_the_recorded_results_alone(tmp_path):
    recorded = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (BENCH / "results").glob("*")}
    env = _env()
    out = tmp_path / "frame_sampling.json"
    line = [
        sys.executable,
        str(BENCH / "frame_sampling.py"),
        "--seconds",
        "1",
        "--fps",
        "5",
        "--repeats",
        "1",
    ]
    result = subprocess.run(
        [*line, "--output", str(out)], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(out.read_text())["identical_frames"] is True
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (BENCH / "results").glob("*")} == recorded
