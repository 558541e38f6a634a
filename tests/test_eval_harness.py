"""`videollava eval msvd-qa` end to end: ShapesWorld clips in MSVD-QA's layout, a small random
checkpoint, and a judge server started here that speaks the OpenAI chat API.

One unsharded run is the reference; a second run, a two-shard run merged, and a run killed half
way (a real subprocess) then resumed must all give the same answers and verdicts, item by item,
without asking the judge twice about anything.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_eval_judge import JudgeServer, fields_of
from videollava.cli import main
from videollava.eval.metrics import normalize_answer, parse_judge_reply
from videollava.eval.store import read_records

SRC = Path(__file__).resolve().parent.parent / "src"
STUBBORN = "[stubborn]"  # a question the judge never answers readably


def judge_reply(body: dict, attempt: int) -> tuple[int, str]:
    """A deterministic judge: yes when the answer's words are in the prediction; some replies unreadable."""
    fields = fields_of(body)
    if STUBBORN in fields["question"]:
        return 200, "Sorry, I cannot evaluate this."
    if attempt == 0 and len(fields["prediction"]) % 3 == 0:
        return 200, "Let me think. The prediction is close."  # unreadable once, fine on the retry
    hit = normalize_answer(fields["answer"]) in normalize_answer(fields["prediction"])
    score = 4.6 if hit else (len(fields["prediction"]) % 4) + 0.5
    pred = "yes" if hit or len(fields["prediction"]) % 2 else "no"
    return 200, json.dumps({"pred": pred, "score": score}) if attempt % 2 else repr(
        {"pred": pred, "score": score}
    )


@pytest.fixture(scope="module")
def msvd_dir(tmp_path_factory) -> Path:
    """ShapesWorld test videos laid out as MSVD-QA: test_q.json, test_a.json (another order), videos/."""
    from videollava.shapesworld.generate import GenerationConfig, generate

    source = tmp_path_factory.mktemp("sw")
    generate(source, GenerationConfig(seed=5, images=0, videos=0, test_images=0, test_videos=4, workers=1))
    root = tmp_path_factory.mktemp("msvd")
    (root / "videos").mkdir()
    questions, answers = [], []
    for line in (source / "test_questions.jsonl").read_text().splitlines():
        row = json.loads(line)
        name = Path(row["media"]).stem
        if not (root / "videos" / f"{name}.mp4").exists():
            shutil.copyfile(source / "media" / row["media"], root / "videos" / f"{name}.mp4")
        qid = f"msvd-{row['question_id']}"
        questions.append({"video_name": name, "question": row["question"], "question_id": qid})
        answers.append({"answer": row["answer"], "question_id": qid})
    questions = questions[:20]
    questions[7]["question"] += f" {STUBBORN}"
    ids = {q["question_id"] for q in questions}
    (root / "test_q.json").write_text(json.dumps(questions))
    (root / "test_a.json").write_text(json.dumps([a for a in reversed(answers) if a["question_id"] in ids]))
    return root


@pytest.fixture(scope="module")
def judge_server():
    with JudgeServer(judge_reply) as server:
        yield server


def eval_args(
    checkpoint: Path, data: Path, out: Path, server: JudgeServer, cache: Path, *extra: str
) -> list[str]:
    return [
        "eval", "msvd-qa", "--model", str(checkpoint), "--dtype", "float32", "--device", "cpu",
        "--data-dir", str(data), "--output", str(out), "--batch-size", "4", "--max-new-tokens", "12",
        "--judge-url", server.url, "--judge-model", "test-judge", "--judge-cache", str(cache),
        "--judge-attempts", "2", "--judge-backoff", "0.01", *extra,
    ]  # fmt: skip


def lines(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(hf_checkpoint, msvd_dir, judge_server, tmp_path_factory):
    """The unsharded run: (folder, results, judge calls it made)."""
    folder, _ = hf_checkpoint
    out = tmp_path_factory.mktemp("runs") / "full"
    cache = out.parent / "cache.jsonl"
    before = judge_server.calls
    assert main(eval_args(folder, msvd_dir, out, judge_server, cache)) == 0
    return out, json.loads((out / "results.json").read_text()), judge_server.calls - before


def test_every_item_answered_once_and_judged_as_recorded(reference, msvd_dir, judge_server):
    out, results, calls = reference
    questions = json.loads((msvd_dir / "test_q.json").read_text())
    answers = {a["question_id"]: a["answer"] for a in json.loads((msvd_dir / "test_a.json").read_text())}
    records = lines(out)
    assert [r["id"] for r in records] == [q["question_id"] for q in questions]
    for record, question in zip(records, questions, strict=True):
        assert record["question"] == question["question"] and record["answer"] == answers[record["id"]]
        assert set(record["judge"]) >= {"pred", "score", "raw"}
    # Each judge prompt carried the item's question, correct answer and prediction.
    sent = [fields_of(body) for body in judge_server.requests]
    for record in records:
        assert {
            "question": record["question"],
            "answer": record["answer"],
            "prediction": record["pred"],
        } in sent
    # Accuracy and score recomputed from the recorded raw replies; the stubborn one is malformed.
    good = [r for r in records if not r["judge"].get("malformed")]
    bad = [r for r in records if r["judge"].get("malformed")]
    assert [STUBBORN in r["question"] for r in bad] == [True]
    assert bad[0]["judge"]["raw_attempts"] == ["Sorry, I cannot evaluate this."] * 2
    parsed = [parse_judge_reply(r["judge"]["raw"]) for r in good]
    yes = sum(p["pred"] == "yes" for p in parsed)
    metrics = results["metrics"]
    assert metrics["accuracy"] == pytest.approx(100 * yes / len(parsed))
    assert metrics["score"] == pytest.approx(sum(int(p["score"]) for p in parsed) / len(parsed))
    assert (metrics["yes"] + metrics["no"], metrics["malformed"], results["malformed"]) == (len(good), 1, 1)
    # One call per distinct (question, answer, prediction), one more per first-time unreadable reply,
    # two for the stubborn one.
    distinct = {(r["question"], r["answer"], r["pred"]) for r in good}
    assert calls == len(distinct) + sum(len(pred) % 3 == 0 for _, _, pred in distinct) + 2
    judge = results["judge"]
    assert judge["url"] == judge_server.url and judge["model"] == "test-judge"
    assert set(judge["prompt_hash"]) == {"video-qa"} and "never counted as 'no'" in judge["malformed"]
    assert results["task"] == "msvd-qa" and results["count"] == len(questions) and results["version"]
    assert "| MSVD-QA accuracy | MSVD-QA score |" in (out / "results.md").read_text()


def test_a_second_run_asks_the_judge_nothing(reference, hf_checkpoint, msvd_dir, judge_server, tmp_path):
    out, results, _ = reference
    before = judge_server.calls
    again = tmp_path / "again"
    assert main(eval_args(hf_checkpoint[0], msvd_dir, again, judge_server, out.parent / "cache.jsonl")) == 0
    # Only the stubborn item, whose malformed verdict is not cached, is asked again.
    assert judge_server.calls - before == 2
    assert lines(again) == lines(out)
    assert json.loads((again / "results.json").read_text())["metrics"] == results["metrics"]
    # The same folder again without --resume is refused.
    assert main(eval_args(hf_checkpoint[0], msvd_dir, again, judge_server, out.parent / "cache.jsonl")) == 2


def test_two_shards_merged_equal_the_unsharded_run(
    reference, hf_checkpoint, msvd_dir, judge_server, tmp_path, capsys
):
    out, results, _ = reference
    cache = out.parent / "cache.jsonl"
    shards = [tmp_path / f"shard{i}" for i in range(2)]
    for i, folder in enumerate(shards):
        assert (
            main(eval_args(hf_checkpoint[0], msvd_dir, folder, judge_server, cache, "--shard", f"{i}/2")) == 0
        )
    sizes = [len(lines(f)) for f in shards]
    assert sum(sizes) == len(lines(out)) and min(sizes) > 0
    assert not set(r["id"] for r in lines(shards[0])) & set(r["id"] for r in lines(shards[1]))
    # Only one shard: the merge names what is missing.
    assert main(["eval", "merge", str(shards[0]), "--output", str(tmp_path / "half")]) == 2
    assert "unanswered" in capsys.readouterr().err
    # The same shard twice: the merge names the duplicates.
    assert (
        main(
            [
                "eval",
                "merge",
                str(shards[0]),
                str(shards[0]),
                str(shards[1]),
                "--output",
                str(tmp_path / "dup"),
            ]
        )
        == 2
    )
    assert "answered more than once" in capsys.readouterr().err
    merged = tmp_path / "merged"
    assert main(["eval", "merge", *map(str, shards), "--output", str(merged)]) == 0
    assert lines(merged) == lines(out)
    merged_results = json.loads((merged / "results.json").read_text())
    assert merged_results["metrics"] == results["metrics"] and merged_results["count"] == results["count"]
    assert merged_results["judge"] == results["judge"]


def test_a_killed_run_resumes_without_losing_or_repeating_anything(
    reference, hf_checkpoint, msvd_dir, judge_server, tmp_path
):
    out, results, _ = reference
    killed = tmp_path / "killed"
    cache = tmp_path / "cache.jsonl"  # a cache of its own: the judge calls of this run are counted
    total = len(lines(out))
    args = eval_args(
        hf_checkpoint[0], msvd_dir, killed, judge_server, cache, "--batch-size", "1", "--max-new-tokens", "40"
    )
    env = os.environ | {"PYTHONPATH": str(SRC)}
    process = subprocess.Popen(
        [sys.executable, "-m", "videollava", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    predictions = killed / "predictions.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if predictions.exists() and predictions.read_bytes().count(b"\n") >= 3:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    written = read_records(predictions)
    assert 3 <= len(written) < total and not (killed / "results.json").exists()
    # Resuming with other settings is refused; with the same ones it finishes the run.
    changed = eval_args(
        hf_checkpoint[0], msvd_dir, killed, judge_server, cache, "--max-new-tokens", "5", "--resume"
    )
    assert main(changed) == 2
    calls_before = judge_server.calls
    cached_before = (
        {json.loads(line)["key"] for line in cache.read_text().splitlines()} if cache.exists() else set()
    )
    assert main([*args, "--resume"]) == 0
    # Nothing was answered twice, nothing judged twice: each verdict is in the cache once.
    final = lines(killed)
    assert [r["id"] for r in final] == [r["id"] for r in lines(out)]
    keys = [json.loads(line)["key"] for line in cache.read_text().splitlines()]
    distinct = {(r["question"], r["answer"], r["pred"]) for r in final if not r["judge"].get("malformed")}
    assert len(keys) == len(set(keys)) == len(distinct)
    asked = len(set(keys) - cached_before)
    assert asked <= judge_server.calls - calls_before <= 2 * asked + 2
    # Same answers as the reference run at these settings, so the same verdicts and numbers.
    reference_run = tmp_path / "reference-40"
    assert (
        main(
            [
                *eval_args(
                    hf_checkpoint[0],
                    msvd_dir,
                    reference_run,
                    judge_server,
                    cache,
                    "--batch-size",
                    "1",
                    "--max-new-tokens",
                    "40",
                )
            ]
        )
        == 0
    )
    assert final == lines(reference_run)
    assert (
        json.loads((killed / "results.json").read_text())["metrics"]
        == json.loads((reference_run / "results.json").read_text())["metrics"]
    )


def test_per_run_options_reach_pipeline_prepare(tmp_path):
    """One place hands the run's options to Pipeline.prepare, with the frames and the task's template."""
    from videollava.eval.items import Item
    from videollava.eval.runner import RunConfig, prepare_request
    from videollava.infer.request import MediaItem

    calls = []

    class Recorder:
        def prepare(self, prompt, media, **options):
            calls.append((prompt, media, options))
            return "prepared"

    item = Item("1", "What moves?", "x", ("What moves?",), [MediaItem("video", "clip.mp4")])
    config = RunConfig("msvd-qa", "m", str(tmp_path), frames=6, prepare_options={"visual_tokens": 64})
    assert prepare_request(Recorder(), item, "What moves?", "llava_v1", config) == "prepared"
    prompt, media, options = calls[0]
    assert options == {"num_frames": 6, "visual_tokens": 64}
    assert prompt.startswith("A chat between a curious human") and prompt.endswith(
        "USER: <video>\nWhat moves? ASSISTANT:"
    )
    assert media == item.media


def test_unknown_prepare_options_are_refused_before_any_work(hf_checkpoint, msvd_dir, tmp_path, capsys):
    args = [
        "eval",
        "msvd-qa",
        "--model",
        str(hf_checkpoint[0]),
        "--dtype",
        "float32",
        "--data-dir",
        str(msvd_dir),
    ]
    args += ["--output", str(tmp_path / "run"), "--judge", "exact", "--prepare-option", "no_such_option=3"]
    assert main(args) == 2
    assert "--prepare-option no_such_option: not an option of Pipeline.prepare" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_image_benchmarks_run_through_the_same_harness(hf_checkpoint, tmp_path):
    """POPE (image files) and MMBench (base64 images in a TSV) end to end: answers, metrics, upload files."""
    from tests.test_eval_readers import _mmbench_tsv, _pope_folder

    pope = _pope_folder(tmp_path / "pope")
    common = ["--model", str(hf_checkpoint[0]), "--dtype", "float32", "--max-new-tokens", "4"]
    assert (
        main(["eval", "pope", "--data-dir", str(pope), "--output", str(tmp_path / "pope-run"), *common]) == 0
    )
    results = json.loads((tmp_path / "pope-run" / "results.json").read_text())
    assert set(results["metrics"]["splits"]) == {"random", "popular"} and results["count"] == 8
    assert results["template"] == "vicuna_v1" and results["judge"] is None
    answers = [
        json.loads(line) for line in (tmp_path / "pope-run" / "answers.jsonl").read_text().splitlines()
    ]
    assert [a["question_id"] for a in answers] == list(range(8))
    assert [a["text"] for a in answers] == [r["pred"] for r in lines(tmp_path / "pope-run")]

    mmbench = tmp_path / "mmbench"
    _mmbench_tsv(mmbench / "mmbench_dev_20230712.tsv", [
        {"index": 5, "question": "Which?", "hint": "nan", "A": "x", "B": "y", "C": "z", "answer": "A", "category": "c"},
    ])  # fmt: skip
    assert (
        main(["eval", "mmbench", "--data-dir", str(mmbench), "--output", str(tmp_path / "mmb-run"), *common])
        == 0
    )
    results = json.loads((tmp_path / "mmb-run" / "results.json").read_text())
    assert results["count"] == 3 and results["metrics"]["questions"] == 1
    assert results["files"] == ["mmbench_upload.tsv"]


def test_report_puts_runs_side_by_side(reference, tmp_path, capsys):
    out, results, _ = reference
    png = tmp_path / "chart.png"
    assert main(["eval", "report", str(out), "--png", str(png), "--output", str(tmp_path / "report.md")]) == 0
    text = capsys.readouterr().out
    assert "| model | msvd-qa |" in text
    assert f"{results['metrics']['accuracy']:.1f} / {results['metrics']['score']:.2f}" in text
    assert png.read_bytes().startswith(b"\x89PNG") and (tmp_path / "report.md").read_text() == text
    assert main(["eval", "report", str(tmp_path)]) == 2  # not a run folder
    assert main(["eval", "--list"]) == 0 and "msvd-qa [judge: video-qa]" in capsys.readouterr().out


def test_torn_last_line_is_dropped_on_resume(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text('{"id": "1", "pred": "a"}\n{"id": "2", "pred": "b"}\n{"id": "3", "pr')
    assert [r["id"] for r in read_records(path)] == ["1", "2"]
    assert path.read_text() == '{"id": "1", "pred": "a"}\n{"id": "2", "pred": "b"}\n'
    path.write_text('{"id": "1"}\nnot json\n{"id": "2"}\n')
    with pytest.raises(Exception, match="not a JSON line"):
        read_records(path)
