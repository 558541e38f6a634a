"""`videollava experiment ablations --scale smoke` end to end: every arm trains every stage and is
scored by the harness, the report lists them all; an arm re-run alone reproduces its adopted-stage
run to the bit; --resume keeps what finished. No accuracy claim: the smoke model learns nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

RUN_ARMS = ("united", "separated-mae", "separated-text", "video-only", "image-only")
REPORTED = ("united", "separated-mae", "separated-text", "joint", "video-only", "image-only")


def experiment(*args: str, output: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "videollava",
            "experiment",
            "ablations",
            "--scale",
            "smoke",
            "--bootstrap",
            "200",
        ]
        + ["--output", str(output), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_smoke_scale_end_to_end(tmp_path):
    out = tmp_path / "ablations"
    result = experiment("--seeds", "1", output=out)
    assert result.returncode == 0, result.stderr[-4000:]

    stage_kinds = {}
    for arm in RUN_ARMS:
        folder = out / "seed-0" / arm
        res = json.loads((folder / "result.json").read_text())
        assert res["arm"] == arm and res["seed"] == 0
        assert res["questions"] > 50 and 0.0 <= res["overall"] <= 1.0
        assert set(res["accuracy"]) == {"image", "video"}
        assert {"direction", "moving"} <= set(res["accuracy"]["video"])
        summary = json.loads((folder / "summary.json").read_text())
        stage_kinds[arm] = [(s["name"], s["kind"]) for s in summary["stages"]]
        # the harness's own outputs, one line per question
        lines = (folder / "eval" / "predictions.jsonl").read_text().splitlines()
        assert len(lines) == res["questions"]

    assert [k for _, k in stage_kinds["separated-mae"]] == [
        "tokenizer", "mae_image", "align_video", "projector", "finetune"
    ]  # fmt: skip
    assert [n for n, _ in stage_kinds["separated-text"]] == [
        "tokenizer", "align_image", "align_image_for_video", "align_video", "projector", "finetune"
    ]  # fmt: skip
    # Within a seed, identical leading stages are trained once and adopted by the other arms.
    for arm, adopted in [
        ("video-only", ["tokenizer", "align_image", "align_video"]),
        ("image-only", ["tokenizer", "align_image", "align_video"]),
        ("separated-text", ["tokenizer", "align_image"]),
        ("separated-mae", ["tokenizer"]),
    ]:
        shared = json.loads((out / "seed-0" / arm / "shared.json").read_text())
        assert shared["stages"] == adopted, arm
    assert not (out / "seed-0" / "united" / "shared.json").exists()
    # The MAE stage evaluated its reconstruction on held-out images; the separated video tower
    # still aligned to captions.
    mae = json.loads((out / "seed-0" / "separated-mae" / "result.json").read_text())
    assert "image_mae_loss" in mae["stages"][1]["eval"]
    assert any(k.startswith("video_r1") for k in mae["stages"][2]["eval"])

    report = json.loads((out / "report" / "ablations.json").read_text())
    assert set(report["arms"]) == set(REPORTED)
    for arm in REPORTED:
        (entry,) = report["arms"][arm]
        assert entry["seed"] == 0 and "overall" in entry and "color" in entry["accuracy"]["image"]
    assert report["arms"]["joint"][0]["model_sha256"] == report["arms"]["united"][0]["model_sha256"]
    assert report["complete"] and not report["missing"]
    markdown = (out / "report" / "ablations.md").read_text()
    assert "Table 5 layout" in markdown and "Table 6 layout" in markdown
    assert (out / "report" / "ablations-alignment.png").stat().st_size > 1000

    # One arm alone, from nothing, in a fresh folder: every stage trained here, the same model and
    # the same answers as the run that adopted united's stages.
    alone = tmp_path / "alone"
    result = experiment("--arms", "video-only", "--seed", "0", output=alone)
    assert result.returncode == 0, result.stderr[-4000:]
    again = json.loads((alone / "seed-0" / "video-only" / "result.json").read_text())
    first = json.loads((out / "seed-0" / "video-only" / "result.json").read_text())
    assert not (alone / "seed-0" / "video-only" / "shared.json").exists()
    assert again["model_sha256"] == first["model_sha256"]
    assert (again["overall"], again["accuracy"]) == (first["overall"], first["accuracy"])
    assert (alone / "seed-0" / "video-only" / "eval" / "predictions.jsonl").read_text() == (
        out / "seed-0" / "video-only" / "eval" / "predictions.jsonl"
    ).read_text().replace(str(out.resolve()), str(alone.resolve()))

    # The folder holds an experiment: without --resume it is refused; with it, finished arm-seeds
    # are kept and only what is missing runs (here: one arm's evaluation).
    refused = experiment("--seeds", "1", output=out)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    kept = {arm: (out / "seed-0" / arm / "result.json").stat().st_mtime_ns for arm in RUN_ARMS}
    (out / "seed-0" / "image-only" / "result.json").unlink()
    for name in ("results.json", "results.md"):
        (out / "seed-0" / "image-only" / "eval" / name).unlink()
    before = json.loads((out / "report" / "ablations.json").read_text())["arms"]["image-only"][0]
    result = experiment("--seeds", "1", "--resume", output=out)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "[seed 0 image-only] training" not in result.stderr
    for arm in RUN_ARMS:
        if arm != "image-only":
            assert (out / "seed-0" / arm / "result.json").stat().st_mtime_ns == kept[arm]
    after = json.loads((out / "report" / "ablations.json").read_text())["arms"]["image-only"][0]
    assert (after["overall"], after["accuracy"], after["model_sha256"]) == (
        before["overall"], before["accuracy"], before["model_sha256"]
    )  # fmt: skip
