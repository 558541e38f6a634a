"""Evaluation: answer matching, POPE and judge metrics by hand, and the ShapesWorld evaluator end to end."""

from __future__ import annotations

import json
import math

import pytest

from videollava.errors import VideoLlavaError
from videollava.eval.metrics import (
    JudgeReplyError,
    accuracy_by,
    judge_prompt,
    judge_summary,
    normalize_answer,
    parse_judge_reply,
    pope_metrics,
    yes_no,
)
from videollava.shapesworld.evaluate import Question, check_targets, evaluate, load_questions, score

# ------------------------------------------------------------------------------------------ metrics


def test_normalize_answer_treats_both_sides_alike():
    assert normalize_answer("The red circle.") == normalize_answer("the red circle")
    assert normalize_answer("red circle") == normalize_answer("the red circle")
    assert normalize_answer("  Red   CIRCLE!! ") == "red circle"
    assert normalize_answer("Three") == normalize_answer("3") == "3"
    assert normalize_answer("a square") == "square"
    # a lone article is an answer, not a prefix
    assert normalize_answer("A") == "a"
    assert normalize_answer("left") != normalize_answer("right")
    assert normalize_answer("red circle") != normalize_answer("red square")


def test_yes_no_reading():
    assert yes_no("Yes, there is.") == "yes"
    assert yes_no("no") == "no"
    assert yes_no("yesterday") == "no"
    assert yes_no("I think so") == "no"
    assert yes_no("") == "no"
    # LLaVA's POPE script: "no" only when the first sentence says no / not
    assert yes_no("I think so", protocol="llava") == "yes"
    assert yes_no("There is not. Yes.", protocol="llava") == "no"
    with pytest.raises(ValueError):
        yes_no("yes", protocol="other")


def test_pope_metrics_by_hand():
    labels = ["yes", "yes", "yes", "yes", "no", "no", "no", "no", "no", "no"]
    preds = ["Yes", "yes.", "yes", "no", "yes", "no", "No.", "maybe", "no", "no"]
    # tp=3 fn=1 fp=1 tn=5 ("maybe" counts as no)
    m = pope_metrics(preds, labels)
    assert m["n"] == 10
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["precision"] == pytest.approx(0.75)
    assert m["recall"] == pytest.approx(0.75)
    assert m["f1"] == pytest.approx(0.75)
    assert m["yes_ratio"] == pytest.approx(0.4)

    all_yes = pope_metrics(["yes"] * 4, ["yes", "no", "no", "no"])
    assert all_yes["precision"] == pytest.approx(0.25)
    assert all_yes["recall"] == 1.0
    assert all_yes["f1"] == pytest.approx(0.4)
    assert all_yes["yes_ratio"] == 1.0

    none_yes = pope_metrics(["no", "no"], ["yes", "no"])
    assert none_yes["precision"] == 0.0 and none_yes["f1"] == 0.0 and none_yes["accuracy"] == 0.5

    with pytest.raises(ValueError):
        pope_metrics(["yes"], ["yes", "no"])
    with pytest.raises(ValueError):
        pope_metrics(["yes"], ["maybe"])


def test_accuracy_by():
    out = accuracy_by([("a", True), ("b", False), ("a", False), ("a", True)])
    assert out["a"] == {"n": 3, "correct": 2, "accuracy": pytest.approx(2 / 3)}
    assert out["b"] == {"n": 1, "correct": 0, "accuracy": 0.0}


def test_judge_prompt_carries_the_pair():
    messages = judge_prompt("What moves?", "the red circle", "a red ball")
    assert [m["role"] for m in messages] == ["system", "user"]
    user = messages[1]["content"]
    assert "Question: What moves?" in user
    assert "Correct Answer: the red circle" in user
    assert "Predicted Answer: a red ball" in user
    assert "{'pred': 'yes', 'score': 4.8}" in user


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("{'pred': 'yes', 'score': 4}", {"pred": "yes", "score": 4.0}),
        ('{"pred": "no", "score": 0}', {"pred": "no", "score": 0.0}),
        ("Sure! Here it is:\n```python\n{'pred': 'Yes', 'score': 3.5}\n```", {"pred": "yes", "score": 3.5}),
        ("{'note': {'x': 1}} then {'pred': 'no', 'score': '2'}", {"pred": "no", "score": 2.0}),
    ],
)
def test_parse_judge_reply_good_and_messy(reply, expected):
    assert parse_judge_reply(reply) == expected


@pytest.mark.parametrize(
    "reply",
    [
        "yes, score 4",
        "{'pred': 'yes'}",
        "{'pred': 'maybe', 'score': 3}",
        "{'pred': 'yes', 'score': 'high'}",
        "{'pred': 'yes', 'score': 9}",
        "{'pred': 'yes', 'score': __import__('os')}",
        "",
    ],
)
def test_parse_judge_reply_bad(reply):
    with pytest.raises(JudgeReplyError, match="judge reply"):
        parse_judge_reply(reply)


def test_judge_summary_records_the_judge():
    records = [{"pred": "yes", "score": 5}, {"pred": "no", "score": 1}, {"pred": "yes", "score": 3}]
    summary = judge_summary(records, judge_model="gpt-3.5-turbo-0613")
    assert summary["judge_model"] == "gpt-3.5-turbo-0613"
    assert summary["accuracy"] == pytest.approx(2 / 3)
    assert summary["score"] == pytest.approx(3.0)
    assert (summary["n"], summary["yes"], summary["no"]) == (3, 2, 1)
    with pytest.raises(ValueError):
        judge_summary(records, judge_model="")


# ------------------------------------------------------------------------------------------ scoring


@pytest.fixture(scope="module")
def shapesworld_dir(tmp_path_factory):
    from videollava.shapesworld.generate import GenerationConfig, generate

    out = tmp_path_factory.mktemp("shapesworld")
    generate(out, GenerationConfig(seed=3, images=0, videos=0, test_images=3, test_videos=3, workers=1))
    return out


def test_score_all_correct_and_all_yes(shapesworld_dir):
    questions = load_questions(shapesworld_dir)
    types = {q.type for q in questions}
    assert types == {"color", "shape", "count", "exists", "direction", "moving"}

    perfect = score(questions, {q.question_id: q.answer for q in questions})
    assert perfect.overall == {"n": len(questions), "correct": len(questions), "accuracy": 1.0}
    for per_type in perfect.accuracy.values():
        assert all(entry["accuracy"] == 1.0 for entry in per_type.values())
    assert set(perfect.pope) == {"random", "popular", "adversarial"}
    for metrics in perfect.pope.values():
        assert metrics["f1"] == 1.0 and metrics["yes_ratio"] == pytest.approx(0.5)
    assert check_targets(perfect) == []

    # Paraphrases that normalise to the answer are still right.
    styled = {q.question_id: f"The {q.answer.upper()}." for q in questions}
    styled |= {q.question_id: f"{q.answer.capitalize()}, it is." for q in questions if q.type == "exists"}
    # "the red circle" -> "Red circle!"
    styled |= {q.question_id: q.answer[4:].capitalize() + "!" for q in questions if q.type == "moving"}
    assert score(questions, styled).overall["accuracy"] == 1.0

    yes = score(questions, {q.question_id: "yes" for q in questions})
    for metrics in yes.pope.values():
        assert metrics["yes_ratio"] == 1.0 and metrics["recall"] == 1.0 and metrics["precision"] == 0.5
    assert yes.accuracy["image"]["exists"]["accuracy"] == pytest.approx(0.5)
    assert yes.accuracy["image"]["color"]["accuracy"] == 0.0
    failures = check_targets(yes)
    assert any("image color" in f for f in failures) and any("POPE random F1" in f for f in failures)


def test_order_questions_have_targets(tmp_path):
    """Every question about the order of events is held to its target, type by type."""
    from videollava.shapesworld.generate import GenerationConfig, generate
    from videollava.shapesworld.text import EVENT_QUESTION_TEMPLATES

    generate(tmp_path, GenerationConfig(seed=5, images=0, videos=0, test_images=0, test_videos=0,
                                        event_test_videos=3, workers=1))  # fmt: skip
    questions = load_questions(tmp_path / "events")
    order = [q for q in questions if q.type in EVENT_QUESTION_TEMPLATES]
    assert {q.type for q in order} == set(EVENT_QUESTION_TEMPLATES)
    assert check_targets(score(questions, {q.question_id: q.answer for q in questions})) == []
    wrong_first = {q.question_id: "nothing" if q.type == "first_event" else q.answer for q in questions}
    failures = check_targets(score(questions, wrong_first))
    assert len(failures) == 1 and failures[0].startswith("video first_event accuracy 0.0%"), failures


def test_score_refuses_unpaired_answers(shapesworld_dir):
    questions = load_questions(shapesworld_dir, limit=5)
    answers = {q.question_id: q.answer for q in questions}
    with pytest.raises(VideoLlavaError, match="missing"):
        score(questions, {k: v for k, v in answers.items() if k != questions[2].question_id})
    with pytest.raises(VideoLlavaError, match="unknown ids"):
        score(questions, answers | {10_000: "red"})


def test_score_keys_by_question_id_not_position():
    questions = [
        Question(7, "images/a.png", "image", "color", None, "What color is the circle?", "red"),
        Question(3, "images/a.png", "image", "shape", None, "What shape is the red object?", "circle"),
    ]
    # Answers listed in a different order than the questions still land on the right question.
    report = score(questions, {3: "circle", 7: "red"})
    assert report.overall["accuracy"] == 1.0
    assert [r.question_id for r in report.results] == [7, 3]


def test_failed_requests_count_as_wrong():
    questions = [Question(0, "images/a.png", "image", "exists", "random", "Is there a red circle?", "yes")]
    report = score(questions, {0: "yes"}, errors={0: "MediaError: broken"})
    assert report.overall["correct"] == 0 and report.errors == 1
    assert report.pope["random"]["yes_ratio"] == 0.0


# ------------------------------------------------------------------------------------------ end to end


def test_evaluate_end_to_end_on_a_random_checkpoint(hf_checkpoint, shapesworld_dir, tmp_path, capsys):
    from videollava.infer.pipeline import Pipeline

    folder, _ = hf_checkpoint
    pipeline = Pipeline.from_pretrained(folder, dtype="float32")
    questions = load_questions(shapesworld_dir)
    seen: list[tuple[int, int]] = []
    report = evaluate(
        pipeline, shapesworld_dir, batch_size=8, max_new_tokens=3, progress=lambda d, t: seen.append((d, t))
    )
    assert seen[-1] == (len(questions), len(questions))
    assert report.errors == 0
    assert [r.question_id for r in report.results] == [q.question_id for q in questions]
    by_id = {q.question_id: q for q in questions}
    for r in report.results:
        assert (r.question, r.answer) == (by_id[r.question_id].question, by_id[r.question_id].answer)
    # counts add up: per type, per split, overall
    assert sum(e["n"] for per_type in report.accuracy.values() for e in per_type.values()) == len(questions)
    assert (
        sum(e["correct"] for t in report.accuracy.values() for e in t.values()) == report.overall["correct"]
    )
    assert sum(m["n"] for m in report.pope.values()) == sum(q.type == "exists" for q in questions)
    for split, metrics in report.pope.items():
        by_modality = [report.pope_by_modality[m][split]["n"] for m in report.pope_by_modality]
        assert sum(by_modality) == metrics["n"]
        assert 0.0 <= metrics["yes_ratio"] <= 1.0
    data = json.loads(report.to_json())
    assert len(data["results"]) == len(questions)
    markdown = report.to_markdown()
    assert "| color |" in markdown and "| adversarial |" in markdown
    # Same predictions through the scorer directly give the same report.
    again = score(questions, {r.question_id: r.prediction for r in report.results})
    assert again.overall == report.overall

    # the command line (the harness), with targets that a random model cannot meet
    from videollava.cli import main

    out_dir, out_md = tmp_path / "run", tmp_path / "report.md"
    status = main(
        ["eval", "shapesworld", "--model", str(folder), "--data", str(shapesworld_dir), "--limit", "12"]
        + ["--batch-size", "4", "--dtype", "float32", "--max-new-tokens", "2"]
        + ["--output", str(out_dir), "--markdown", str(out_md), "--check-targets"]
    )
    assert status == 1
    captured = capsys.readouterr()
    assert "target not met" in captured.err and "answered 12/12" in captured.err
    assert "## Accuracy by question type" in captured.out
    written = json.loads((out_dir / "results.json").read_text())
    assert written["count"] == 12 and written["model"] == str(folder)
    assert written["metrics"]["overall"]["n"] == 12
    assert math.isfinite(written["metrics"]["overall_accuracy"])
    assert out_md.read_text().startswith("# ShapesWorld evaluation")
    lines = (out_dir / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [str(q.question_id) for q in questions[:12]]
