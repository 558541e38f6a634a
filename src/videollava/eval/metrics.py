"""Answer matching and the paper's metrics: exact match, POPE yes/no probing, the LLM-judge protocol.

The judge helpers only build the messages and read the replies; sending them to a judge model is
left to the caller, so nothing here touches the network.
"""

from __future__ import annotations

import ast
import re
import string
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

from videollava.errors import VideoLlavaError

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
_LEADING_ARTICLES = ("the", "a", "an")
NUMBER_WORDS = {  # spelled-out numbers a short answer may use for a digit
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}


def normalize_answer(text: str) -> str:
    """Canonical form for exact match: case, punctuation, spacing, a leading article and numerals.

    Apply it to both the prediction and the reference: "The red circle." and "red circle" then
    compare equal, as do "3" and "three".
    """
    words = _PUNCTUATION.sub(" ", text.lower()).split()
    if len(words) > 1 and words[0] in _LEADING_ARTICLES:
        words = words[1:]
    return " ".join(NUMBER_WORDS.get(w, w) for w in words)


def exact_match(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


def yes_no(text: str, protocol: str = "strict") -> str:
    """Read a free-form reply to a yes/no question as "yes" or "no".

    ``strict``: the first word decides; anything that starts with neither counts as "no", so an
    evasive reply never earns a true positive. ``llava``: the rule of LLaVA's POPE script, which
    the published numbers used: "no" if the first sentence contains the word "no", "No" or "not",
    otherwise "yes".
    """
    if protocol == "strict":
        words = normalize_answer(text).split()
        return "yes" if words and words[0] == "yes" else "no"
    if protocol == "llava":
        first = text.split(".")[0] if "." in text else text
        words = first.replace(",", "").split(" ")
        return "no" if {"no", "No", "not"} & set(words) else "yes"
    raise ValueError(f"unknown yes/no protocol {protocol!r}; choose 'strict' or 'llava'")


def pope_metrics(preds: Sequence[str], labels: Sequence[str], protocol: str = "strict") -> dict[str, float]:
    """POPE's numbers with "yes" as the positive class: accuracy, precision, recall, F1, yes-ratio.

    Labels are "yes" / "no"; predictions are raw replies, read with ``yes_no``. Values are
    fractions in [0, 1]; precision (and so F1) is 0 when nothing is predicted "yes".
    """
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions for {len(labels)} labels")
    bad = sorted({label for label in labels if label not in ("yes", "no")})
    if bad:
        raise ValueError(f"POPE labels must be 'yes' or 'no', got {bad}")
    said = [yes_no(p, protocol) == "yes" for p in preds]
    truth = [label == "yes" for label in labels]
    tp = sum(s and t for s, t in zip(said, truth, strict=True))
    fp = sum(s and not t for s, t in zip(said, truth, strict=True))
    tn = sum(not s and not t for s, t in zip(said, truth, strict=True))
    fn = sum(not s and t for s, t in zip(said, truth, strict=True))
    n = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "n": n,
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n if n else 0.0,
    }


def accuracy_by(groups: Iterable[tuple[Hashable, bool]]) -> dict[Hashable, dict[str, float]]:
    """(group, correct) pairs -> {group: {n, correct, accuracy}}, groups in first-seen order."""
    out: dict[Hashable, dict[str, float]] = {}
    for key, correct in groups:
        entry = out.setdefault(key, {"n": 0, "correct": 0, "accuracy": 0.0})
        entry["n"] += 1
        entry["correct"] += int(bool(correct))
    for entry in out.values():
        entry["accuracy"] = entry["correct"] / entry["n"]
    return out


# ----------------------------------------------------------------------------------------------
# LLM judge (Video-ChatGPT protocol), used for open-ended video QA

JUDGE_SYSTEM = (
    "You are an intelligent chatbot designed for evaluating the correctness of generative outputs "
    "for question-answer pairs. Your task is to compare the predicted answer with the correct answer "
    "and determine if they match meaningfully. Here's how you can accomplish the task:"
    "------"
    "##INSTRUCTIONS: "
    "- Focus on the meaningful match between the predicted answer and the correct answer.\n"
    "- Consider synonyms or paraphrases as valid matches.\n"
    "- Evaluate the correctness of the prediction compared to the answer."
)
JUDGE_USER = (
    "Please evaluate the following video-based question-answer pair:\n\n"
    "Question: {question}\n"
    "Correct Answer: {answer}\n"
    "Predicted Answer: {prediction}\n\n"
    "Provide your evaluation only as a yes/no and score where the score is an integer value between "
    "0 and 5, with 5 indicating the highest meaningful match. "
    "Please generate the response in the form of a Python dictionary string with keys 'pred' and "
    "'score', where value of 'pred' is  a string of 'yes' or 'no' and value of 'score' is in INTEGER, "
    "not STRING."
    "DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION. Only provide the Python dictionary string. "
    "For example, your response should look like this: {{'pred': 'yes', 'score': 4.8}}."
)


class JudgeReplyError(VideoLlavaError, ValueError):
    """A judge reply that holds no readable {'pred': ..., 'score': ...} dictionary."""


def judge_prompt(question: str, answer: str, prediction: str) -> list[dict[str, str]]:
    """Chat messages asking a judge model whether ``prediction`` matches ``answer``."""
    return [
        {"role": "system", "content": JUDGE_SYSTEM},
        {
            "role": "user",
            "content": JUDGE_USER.format(question=question, answer=answer, prediction=prediction),
        },
    ]


def _dict_candidates(text: str) -> Iterable[str]:
    """Every balanced {...} substring, outermost first, so a dict wrapped in prose is still found."""
    for start, char in enumerate(text):
        if char != "{":
            continue
        depth = 0
        for end in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                yield text[start : end + 1]
                break


def parse_judge_reply(text: str) -> dict[str, Any]:
    """Read a judge reply such as "{'pred': 'yes', 'score': 4}" -> {"pred": "yes", "score": 4.0}.

    Judges sometimes wrap the dictionary in prose or code fences, write JSON instead of Python,
    add a full stop to the pred or decimals to the score; the first dictionary with both keys is
    used, else a brace-less `pred: yes, score: 4`. Anything else raises JudgeReplyError naming
    the reply.
    """
    for candidate in _dict_candidates(text):
        try:
            value = ast.literal_eval(candidate)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if not isinstance(value, dict) or "pred" not in value or "score" not in value:
            continue
        return _pred_score(value["pred"], value["score"], text)
    pred = re.search(r"[\'\"]?pred[\'\"]?\s*:\s*[\'\"]?(yes|no)\b", text, re.IGNORECASE)
    score = re.search(r"[\'\"]?score[\'\"]?\s*:\s*[\'\"]?(-?\d+(?:\.\d+)?)", text, re.IGNORECASE)
    if pred and score:
        return _pred_score(pred.group(1), score.group(1), text)
    raise JudgeReplyError(f"no {{'pred': ..., 'score': ...}} dictionary in judge reply: {text!r}")


def _pred_score(pred_value: Any, score_value: Any, text: str) -> dict[str, Any]:
    pred = _PUNCTUATION.sub("", str(pred_value)).strip().lower()
    if pred not in ("yes", "no"):
        raise JudgeReplyError(f"judge reply has pred {pred_value!r}, not 'yes' or 'no': {text!r}")
    try:
        score = float(score_value)
    except (TypeError, ValueError):
        raise JudgeReplyError(f"judge reply has a non-numeric score {score_value!r}: {text!r}") from None
    if not 0 <= score <= 5:
        raise JudgeReplyError(f"judge reply has score {score} outside 0..5: {text!r}")
    return {"pred": pred, "score": score}


def summarize_verdicts(verdicts: Iterable[Mapping[str, Any] | None]) -> dict[str, Any]:
    """Video QA as the reference aggregates it, over readable verdicts only.

    accuracy = yes / (yes + no) in percent; score = mean of the scores truncated to integers, as
    the reference's int(score). Malformed verdicts (unreadable after every retry) and missing ones
    are counted apart and left out of both numbers.
    """
    yes = no = malformed = 0
    scores: list[int] = []
    for verdict in verdicts:
        if not verdict or verdict.get("malformed") or verdict.get("pred") not in ("yes", "no"):
            malformed += 1
            continue
        yes += verdict["pred"] == "yes"
        no += verdict["pred"] == "no"
        scores.append(int(float(verdict["score"])))
    judged = yes + no
    return {
        "accuracy": 100.0 * yes / judged if judged else 0.0,
        "score": sum(scores) / len(scores) if scores else 0.0,
        "yes": yes,
        "no": no,
        "malformed": malformed,
    }


def judge_summary(records: Iterable[Mapping[str, Any]], judge_model: str) -> dict[str, Any]:
    """Accuracy = yes / (yes + no) and mean score over parsed judge replies, tagged with the judge.

    The judge model is part of the result: an unpinned judge drifts, so numbers from different
    judges are not comparable.
    """
    if not judge_model:
        raise ValueError("name the judge model: results from different judges are not comparable")
    preds: list[str] = []
    scores: list[float] = []
    for record in records:
        preds.append(record["pred"])
        scores.append(float(record["score"]))
    yes = preds.count("yes")
    no = preds.count("no")
    if yes + no != len(preds):
        raise ValueError("every record's pred must be 'yes' or 'no'")
    return {
        "judge_model": judge_model,
        "n": len(preds),
        "yes": yes,
        "no": no,
        "accuracy": yes / (yes + no) if preds else 0.0,
        "score": sum(scores) / len(scores) if scores else 0.0,
    }
