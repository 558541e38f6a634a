"""`videollava ask` end to end on a tiny checkpoint and real clips, including every kind of bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from videollava.cli import main


def ask(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(["ask", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def model(hf_checkpoint) -> str:
    return str(hf_checkpoint[0])


def test_json_answer_fields(model, sample_videos, capsys):
    code, out, _ = ask(
        [
            "--model",
            model,
            "--dtype",
            "float32",
            "--video",
            str(sample_videos / "bikes.mp4"),
            "--max-new-tokens",
            "4",
            "--json",
            "What happens?",
        ],
        capsys,
    )
    assert code == 0
    result = json.loads(out)
    assert set(result) >= {"answer", "token_ids", "prompt_tokens", "visual_tokens", "seconds"}
    assert result["visual_tokens"] == 8 * 17  # 8 frames x (16 patches + CLS)
    assert 1 <= len(result["token_ids"]) <= 4
    assert result["prompt_tokens"] > result["visual_tokens"]


def test_raw_prompt_and_default_template(model, sample_videos, capsys):
    video = str(sample_videos / "carphone_pristine.mp4")
    base = ["--model", model, "--dtype", "float32", "--video", video, "--max-new-tokens", "3", "--json"]
    _, templated, _ = ask([*base, "Describe it."], capsys)
    _, same, _ = ask([*base, "--raw-prompt", "USER: <video>\nDescribe it. ASSISTANT:"], capsys)
    _, bare, _ = ask([*base, "--raw-prompt", "<video>\nDescribe it."], capsys)
    # An -hf checkpoint defaults to the port's documented prompt, "USER: <video>\n{question} ASSISTANT:".
    assert json.loads(templated) | {"seconds": 0} == json.loads(same) | {"seconds": 0}
    assert json.loads(bare)["prompt_tokens"] < json.loads(same)["prompt_tokens"]


def test_batch_file_keeps_order_and_reports_bad_lines(model, sample_videos, tmp_path, capsys):
    video = str(sample_videos / "bikes.mp4")
    requests = [
        {"id": "a", "prompt": "What is moving?", "video": video},
        {"id": "b", "prompt": "Describe.", "videos": [video, video]},
        {"id": "c", "prompt": "Missing file", "image": str(tmp_path / "nope.png")},
        "not json",
        {"id": "e", "prompt": "How many objects are there?"},
    ]
    lines = [r if isinstance(r, str) else json.dumps(r) for r in requests]
    (tmp_path / "requests.jsonl").write_text("\n".join(lines) + "\n")
    code, _, err = ask(
        [
            "--model",
            model,
            "--dtype",
            "float32",
            "--batch",
            str(tmp_path / "requests.jsonl"),
            "--output",
            str(tmp_path / "answers.jsonl"),
            "--max-new-tokens",
            "4",
            "--batch-size",
            "3",
        ],
        capsys,
    )
    assert code == 0
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [a["id"] for a in answers] == ["a", "b", "c", 4, "e"]
    assert "nope.png" in answers[2]["error"] and "no such file" in answers[2]["error"]
    assert "not valid JSON" in answers[3]["error"]
    assert answers[1]["visual_tokens"] == 2 * answers[0]["visual_tokens"]
    assert "2 of 5 requests failed" in err
    # batched greedy answers equal single answers
    code, out, _ = ask(
        [
            "--model",
            model,
            "--dtype",
            "float32",
            "--video",
            video,
            "--max-new-tokens",
            "4",
            "--json",
            "What is moving?",
        ],
        capsys,
    )
    assert json.loads(out)["token_ids"] == answers[0]["token_ids"]


def _write_audio_only(path: Path) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono"
        )
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "empty", "audio", "missing", "text"])
def test_bad_media_named_in_error(kind, model, sample_videos, tmp_path, capsys):
    path = tmp_path / f"{kind}.mp4"
    if kind == "corrupt":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    elif kind == "truncated":
        data = (sample_videos / "bikes.mp4").read_bytes()
        path.write_bytes(data[: len(data) // 10])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "audio":
        path = tmp_path / "audio.m4a"
        _write_audio_only(path)
    elif kind == "text":
        path.write_text("hello, I am not a video\n")
    code, out, err = ask(["--model", model, "--dtype", "float32", "--video", str(path), "What?"], capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and str(path) in err
    assert "Traceback" not in err


def test_placeholder_mismatch(model, sample_videos, capsys):
    video = str(sample_videos / "bikes.mp4")
    code, _, err = ask(
        ["--model", model, "--video", video, "--raw-prompt", "USER: <video>\n<video>\nWhat? ASSISTANT:"],
        capsys,
    )
    assert code == 2 and "2 <video> placeholders" in err and "1 video" in err
    code, _, err = ask(["--model", model, "--image", video, "USER: <video>\nWhat?"], capsys)
    assert code == 2 and "placeholder" in err


def test_prompt_longer_than_context(model, capsys):
    code, _, err = ask(["--model", model, "--max-new-tokens", "2", "red circle " * 400], capsys)
    assert code == 2 and "context holds 512" in err


def test_console_script_runs(model, sample_videos):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "videollava",
            "ask",
            "--model",
            model,
            "--video",
            str(sample_videos / "bikes.mp4"),
            "--max-new-tokens",
            "2",
            "Hi?",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() != "" or result.stdout == "\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["", "--model", "no-such-model"], "the prompt is empty"),
        (["  \n\t", "--model", "no-such-model"], "the prompt is empty"),
        (["Hi?", "--output", "answers.jsonl"], "--output is for --batch answers"),
        (["Hi?", "--batch", "requests.jsonl"], "drop a PROMPT"),
        (["--batch", "requests.jsonl", "--video", "a.mp4"], "drop --video"),
        (["--batch", "missing.jsonl"], "missing.jsonl: no such file"),
        (["--batch", "/dev/zero"], "/dev/zero: not a regular file"),
        (
            ["--batch", "requests.jsonl", "--output", "no-such-folder/answers.jsonl"],
            "not a file in an existing",
        ),
    ],
)
def test_bad_arguments_fail_before_the_model_loads(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "requests.jsonl").write_text('{"prompt": "Hi?"}\n')
    # A model that does not exist: had it been looked for, the error would be about it.
    code, out, err = ask([*args, "--model", str(tmp_path / "no-such-model")], capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert "no-such-model" not in err


@pytest.mark.parametrize("size", ["0", "-2", "two"])
def test_batch_size_must_be_a_positive_whole_number(size, tmp_path, capsys):
    (tmp_path / "requests.jsonl").write_text('{"prompt": "Hi?"}\n')
    with pytest.raises(SystemExit) as stop:
        main(["ask", "--batch", str(tmp_path / "requests.jsonl"), "--batch-size", size])
    out, err = capsys.readouterr()
    assert stop.value.code == 2 and out == ""
    assert len(err.splitlines()) == 1 and "argument --batch-size:" in err and repr(size)[1:-1] in err


def test_batch_line_with_an_empty_prompt_gets_an_error_field(model, tmp_path, capsys):
    lines = [{"id": "empty", "prompt": "   "}, {"id": "fine", "prompt": "How many objects are there?"}]
    (tmp_path / "requests.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    code, out, _ = ask(
        ["--model", model, "--batch", str(tmp_path / "requests.jsonl"), "--max-new-tokens", "2"], capsys
    )
    answers = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [a["id"] for a in answers] == ["empty", "fine"]
    assert "the prompt is empty" in answers[0]["error"] and "answer" not in answers[0]
    assert "error" not in answers[1] and len(answers[1]["token_ids"]) >= 1
