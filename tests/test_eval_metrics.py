"""The harness's metrics against hand-computed examples: VQA accuracy and its normalisation, option
letters and circular scoring, the judge's reply parsers and the video-QA aggregation."""

from __future__ import annotations

import pytest

from videollava.eval.choice import circular_correct, extract_choice, options_block, rotations
from videollava.eval.judge import (
    LLAVA_BENCH,
    MM_VET,
    PROMPTS,
    VIDEO_QA,
    VIDEOCHATGPT_AXES,
    VIDEOCHATGPT_CONSISTENCY,
    ExactJudge,
    cache_key,
    parse_fraction_reply,
    parse_pair_reply,
    parse_score_reply,
)
from videollava.eval.metrics import JudgeReplyError, parse_judge_reply, summarize_verdicts
from videollava.eval.vqa import normalize_vqa_answer, process_punctuation, vqa_accuracy

# ------------------------------------------------------------------------------------------ VQA


@pytest.mark.parametrize(
    "raw, normal",
    [
        ("Two", "2"),  # number words to digits
        ("none", "0"),
        ("Ten.", "10"),  # a final full stop goes
        ("2.5", "2.5"),  # a decimal point stays
        ("The cat", "cat"),  # articles go, anywhere
        ("a man and an apple", "man and apple"),
        ("dont", "don't"),  # contractions get their apostrophe back
        ("isnt it", "isn't it"),
        ("whats", "what's"),
        ("somebody'd", "somebodyd"),  # the published table's own oddity, kept
        ("1,000", "1000"),  # commas go
        ("black-and-white", "black and white"),  # a mark between letters becomes a space
        ("t-shirt", "t shirt"),
        ("left / right", "left right"),  # a mark next to a space is deleted
        ("yes!", "yes"),
        ("Yes?", "yes"),
        ("man's hat", "man 's hat"),  # "'s" is split off
        ("  red\tand\nblue  ", "red and blue"),
        ("(A) dog", "dog"),
        ("3:00", "3:00"),  # ':' is not among the marks
    ],
)
def test_vqa_normalisation_edge_cases(raw, normal):
    assert normalize_vqa_answer(raw) == normal


def test_punctuation_rule_depends_on_spaces_and_numbers():
    # No space next to the mark and no digit-comma-digit: the mark becomes a space.
    assert process_punctuation("a;b") == "a b"
    # A space next to it: deleted.
    assert process_punctuation("a; b") == "a b"
    # A digit-comma-digit number anywhere: every mark is deleted, not spaced.
    assert process_punctuation("1,5 a-b") == "15 ab"
    # A full stop before a digit stays, any other goes.
    assert process_punctuation("v1.2 end.") == "v1.2 end"


@pytest.mark.parametrize(
    "matching, expected",
    [
        (0, 0.0),
        (1, 0.3),  # left-out matching one: 0; the other nine: 1/3
        (2, 0.6),  # two left-outs see 1/3, eight see 2/3 -> (2/3 + 16/3) / 10
        (3, 0.9),  # three see 2/3, seven see 1 -> (2 + 7) / 10
        (4, 1.0),
        (10, 1.0),
    ],
)
def test_vqa_accuracy_by_hand(matching, expected):
    humans = ["two"] * matching + ["three"] * (10 - matching)
    assert vqa_accuracy("2", humans) == pytest.approx(expected)


def test_vqa_accuracy_normalises_both_sides():
    humans = ["Black and white", "black-and-white", "black & white"] + ["gray"] * 7
    # "black-and-white" and "Black and white" normalise alike; "black & white" keeps its "&".
    assert vqa_accuracy("black and white.", humans) == pytest.approx(0.6)
    assert vqa_accuracy("GRAY", humans) == 1.0
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


# ------------------------------------------------------------------------------------------ choices


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("B", "B"),
        ("(C)", "C"),
        ("A. apple", "A"),
        ("D: the last one", "D"),
        ("The answer is C.", "C"),
        ("I believe the answer is (B) because ...", "B"),
        ("The red circle", "B"),  # option text; the longer match beats "circle"
        ("circle", "A"),
        ("E", None),  # not an option
        ("", None),
        ("I do not know", None),
        ("Either (A) or (B)", None),  # two letters: undecided
    ],
)
def test_extract_choice(reply, expected):
    assert extract_choice(reply, ["circle", "red circle", "square", "triangle"]) == expected


def test_rotations_and_circular_scoring():
    options = ["w", "x", "y", "z"]
    turns = rotations(options)
    assert turns == [[0, 1, 2, 3], [1, 2, 3, 0], [2, 3, 0, 1], [3, 0, 1, 2]]
    # The right option is "y" (index 2): its letter in each rotation.
    letters = ["ABCD"[order.index(2)] for order in turns]
    assert letters == ["C", "B", "A", "D"]
    assert circular_correct(letters, letters)
    assert not circular_correct(["C", "B", "A", None], letters)
    assert not circular_correct(["C", "B", "B", "D"], letters)
    assert not circular_correct([], [])
    assert options_block(["w", "x"]) == "A. w\nB. x"


# ------------------------------------------------------------------------------------------ judge replies


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("{'pred': 'yes', 'score': 4}", ("yes", 4.0)),
        ('{"pred": "no", "score": 1}', ("no", 1.0)),  # JSON
        ("{'pred': 'Yes.', 'score': 4.8}", ("yes", 4.8)),  # decimals, a full stop
        ("```python\n{'pred': 'no', 'score': '2'}\n```", ("no", 2.0)),
        ("pred: yes, score: 3", ("yes", 3.0)),  # no braces at all
        ("Here you go: {'pred': 'yes', 'score': 5} Hope it helps", ("yes", 5.0)),
    ],
)
def test_pred_score_replies(reply, expected):
    parsed = parse_judge_reply(reply)
    assert (parsed["pred"], parsed["score"]) == expected
    assert VIDEO_QA.parse(reply)["pred"] == expected[0]


@pytest.mark.parametrize(
    "reply",
    [
        "yes",
        "{'pred': 'probably', 'score': 3}",
        "{'pred': 'yes', 'score': 7}",
        "{'score': 3}",
        "I cannot judge this.",
    ],
)
def test_malformed_pred_score_replies(reply):
    with pytest.raises(JudgeReplyError):
        VIDEO_QA.parse(reply)


def test_score_pair_and_fraction_replies():
    assert parse_score_reply("{'score': 4}") == 4.0
    assert parse_score_reply('{"score": 3.5}') == 3.5
    assert parse_score_reply("score: 2") == 2.0
    assert parse_pair_reply("8 6\nAssistant 1 was more precise.") == (8.0, 6.0)
    assert parse_pair_reply("\n7, 9\n") == (7.0, 9.0)
    assert parse_fraction_reply("0.4") == 0.4
    assert parse_fraction_reply("Correctness: 1.0") == 1.0
    for bad, parser in [
        ("{'score': 6}", parse_score_reply),
        ("no score", parse_score_reply),
        ("8\n6", parse_pair_reply),
        ("8 6 4", parse_pair_reply),
        ("11 3", parse_pair_reply),
        ("1.5", parse_fraction_reply),
        ("none", parse_fraction_reply),
    ]:
        with pytest.raises(JudgeReplyError):
            parser(bad)


def test_summary_counts_malformed_apart_and_truncates_scores():
    verdicts = [
        {"pred": "yes", "score": 4.8},  # int(4.8) = 4, as the reference's int(score)
        {"pred": "no", "score": 2.0},
        {"pred": "yes", "score": 5.0},
        {"pred": None, "score": None, "malformed": True, "raw": "I think so"},
        None,  # never judged
    ]
    summary = summarize_verdicts(verdicts)
    assert summary["yes"] == 2 and summary["no"] == 1 and summary["malformed"] == 2
    assert summary["accuracy"] == pytest.approx(100 * 2 / 3)
    assert summary["score"] == pytest.approx((4 + 2 + 5) / 3)
    assert summarize_verdicts([])["accuracy"] == 0.0


def test_prompts_carry_their_fields_and_have_distinct_hashes():
    fields = {"question": "Q?", "answer": "A!", "prediction": "P.", "question2": "Q2?", "prediction2": "P2."}
    user = VIDEO_QA.messages(fields)[-1]["content"]
    assert "Question: Q?" in user and "Correct Answer: A!" in user and "Predicted Answer: P." in user
    consistency = VIDEOCHATGPT_CONSISTENCY.messages(fields)[-1]["content"]
    assert "Question 2: Q2?" in consistency and "Predicted Answer to Question 2: P2." in consistency
    for prompt in VIDEOCHATGPT_AXES.values():
        assert "Predicted Answer: P." in prompt.messages(fields)[-1]["content"]
    assert "[Assistant 2]\nP." in LLAVA_BENCH.messages(fields | {"context": "C"})[-1]["content"]
    assert "Q? | A! | P. |" in MM_VET.messages(fields)[-1]["content"]
    hashes = [p.hash for p in PROMPTS.values()]
    assert len(set(hashes)) == len(hashes)
    # The cache key changes with every part it is made of.
    base = cache_key("m", VIDEO_QA, fields)
    assert cache_key("m2", VIDEO_QA, fields) != base
    assert cache_key("m", VIDEOCHATGPT_AXES["detail"], fields) != base
    assert cache_key("m", VIDEO_QA, fields | {"prediction": "other"}) != base


def test_exact_judge():
    judge = ExactJudge()
    fields = {"question": "What moves?", "answer": "The red circle", "prediction": "the red circle moves up"}
    yes = judge.verdict(VIDEO_QA, fields)
    assert (yes["pred"], yes["score"], yes["malformed"]) == ("yes", 5.0, False)
    no = judge.verdict(VIDEO_QA, fields | {"prediction": "a blue square"})
    assert (no["pred"], no["score"]) == ("no", 0.0)
    # whole words only: "red" is not in "redder"
    assert judge.verdict(VIDEO_QA, {"question": "", "answer": "red", "prediction": "redder"})["pred"] == "no"
    assert judge.verdict(MM_VET, fields)["score"] == 1.0
    pair = judge.verdict(LLAVA_BENCH, fields | {"context": ""})
    assert (pair["reference_score"], pair["score"]) == (10.0, 10.0)
