"""ShapesWorld evaluation: every held-out question asked greedily, scored against its known answer.

Answers are keyed by question id from the moment they are generated, so an answer can only ever be
scored against its own question (the reference's sharded evaluation paired some with the wrong one).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from videollava.errors import VideoLlavaError
from videollava.eval.items import ExpectedFile, Item, Task
from videollava.eval.metrics import accuracy_by, exact_match, pope_metrics, yes_no
from videollava.eval.runner import RunConfig, answer_items, load_items
from videollava.infer.pipeline import Pipeline
from videollava.infer.request import MediaItem
from videollava.shapesworld.text import (
    EVENT_ACCOUNT_TYPES,
    EVENT_QUESTION_TEMPLATES,
    POPE_SPLITS,
    QUESTION_TYPES,
    YES_NO_TYPES,
    read_events,
)
from videollava.shapesworld.world import MEDIA_KINDS

# The longest answer, three events in order, is about 20 tokens; a short answer stops at its end.
MAX_NEW_TOKENS = 32

# Targets a trained ShapesWorld model must reach (fractions).
ACCURACY_TARGETS: dict[str, float] = {
    "color": 0.95,
    "shape": 0.95,
    "count": 0.95,
    "direction": 0.90,
    "moving": 0.90,
}
# Every question about the order of events in a clip (the events/ split).
ACCURACY_TARGETS |= dict.fromkeys(EVENT_QUESTION_TEMPLATES, 0.90)
POPE_F1_TARGET = 0.90


@dataclass
class Question:
    question_id: int
    media: str
    modality: str
    type: str
    split: str | None
    question: str
    answer: str

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> Question:
        try:
            return cls(
                question_id=int(row["question_id"]),
                media=str(row["media"]),
                modality=str(row["modality"]),
                type=str(row["type"]),
                split=row.get("split"),
                question=str(row["question"]),
                answer=str(row["answer"]),
            )
        except KeyError as missing:
            raise VideoLlavaError(f"test question without field {missing}: {row}") from None


@dataclass
class Result:
    question_id: int
    modality: str
    type: str
    split: str | None
    question: str
    answer: str
    prediction: str
    correct: bool
    error: str | None = None


@dataclass
class Report:
    """Scores of one model on one ShapesWorld test set; every fraction is in [0, 1]."""

    results: list[Result]
    # modality -> question type -> {n, correct, accuracy}
    accuracy: dict[str, dict[str, dict[str, float]]]
    # POPE split -> metrics, images and videos together; and per modality
    pope: dict[str, dict[str, float]]
    pope_by_modality: dict[str, dict[str, dict[str, float]]]
    overall: dict[str, float]
    errors: int
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, with_results: bool = True) -> dict[str, Any]:
        data = {
            "info": self.info,
            "overall": self.overall,
            "accuracy": self.accuracy,
            "pope": self.pope,
            "pope_by_modality": self.pope_by_modality,
            "errors": self.errors,
            "target_failures": check_targets(self),
        }
        if with_results:
            data["results"] = [asdict(r) for r in self.results]
        return data

    def to_json(self, with_results: bool = True) -> str:
        return json.dumps(self.to_dict(with_results), indent=1) + "\n"

    def to_markdown(self) -> str:
        lines = ["# ShapesWorld evaluation", ""]
        for key in ("model", "data_dir", "seconds"):
            if key in self.info:
                lines.append(f"- {key}: {self.info[key]}")
        return "\n".join(lines) + "\n" + self.body(check_targets(self))

    def body(self, failures: list[str]) -> str:
        """Everything below the run's information: counts, accuracy per type, POPE, targets."""
        o = self.overall
        lines = [f"- questions: {int(o['n'])}, correct: {int(o['correct'])} ({_pct(o['accuracy'])})"]
        if self.errors:
            lines.append(f"- failed requests (scored wrong): {self.errors}")
        lines += ["", "## Accuracy by question type", "", "| type | " + " | ".join(MEDIA_KINDS) + " |"]
        lines.append("| --- |" + " --- |" * len(MEDIA_KINDS))
        for qtype in _types_present(self.accuracy):
            cells = []
            for modality in MEDIA_KINDS:
                entry = self.accuracy.get(modality, {}).get(qtype)
                cells.append(f"{_pct(entry['accuracy'])} ({entry['correct']}/{entry['n']})" if entry else "-")
            lines.append(f"| {qtype} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "## Yes/no object probing (POPE)",
            "",
            "| split | media | n | accuracy | precision | recall | F1 | yes ratio |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        rows = [(split, "all", self.pope[split]) for split in POPE_SPLITS if split in self.pope]
        for modality in MEDIA_KINDS:
            rows += [
                (split, modality, metrics)
                for split, metrics in self.pope_by_modality.get(modality, {}).items()
            ]
        for split, media, m in rows:
            lines.append(
                f"| {split} | {media} | {int(m['n'])} | {_pct(m['accuracy'])} | {_pct(m['precision'])} | "
                f"{_pct(m['recall'])} | {_pct(m['f1'])} | {m['yes_ratio']:.2f} |"
            )
        lines += ["", "## Targets", ""]
        lines += [f"- FAIL: {f}" for f in failures] or ["- all targets met"]
        return "\n".join(lines) + "\n"


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _types_present(accuracy: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    present = {t for per_type in accuracy.values() for t in per_type}
    return [t for t in QUESTION_TYPES if t in present] + sorted(present - set(QUESTION_TYPES))


def load_questions(data_dir: str | Path, limit: int | None = None) -> list[Question]:
    """The held-out questions of a generated dataset, in file order."""
    path = Path(data_dir) / "test_questions.jsonl"
    if not path.is_file():
        raise VideoLlavaError(f"{path}: no such file (generate the dataset with `videollava shapesworld`)")
    questions: list[Question] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if limit is not None and len(questions) >= limit:
                break
            if not line.strip():
                continue
            try:
                questions.append(Question.from_dict(json.loads(line)))
            except json.JSONDecodeError as error:
                raise VideoLlavaError(f"{path}:{number}: not JSON ({error})") from None
    ids = [q.question_id for q in questions]
    if len(set(ids)) != len(ids):
        raise VideoLlavaError(f"{path}: question ids are not unique")
    return questions


def is_correct(question: Question, prediction: str) -> bool:
    """Yes/no questions (probes, "Does the square move before the circle?") are read like POPE
    reads them; an account of events must tell the same events in the same order, in any of the
    captions' wordings ("First a red circle appears, and then..."); every other answer must match
    exactly."""
    if question.type in YES_NO_TYPES:
        return yes_no(prediction) == normalize_label(question.answer)
    if question.type in EVENT_ACCOUNT_TYPES:
        told = read_events(prediction)
        return told is not None and told == read_events(question.answer)
    return exact_match(prediction, question.answer)


def normalize_label(answer: str) -> str:
    label = answer.strip().lower()
    if label not in ("yes", "no"):
        raise VideoLlavaError(f"yes/no question with answer {answer!r}")
    return label


def score(
    questions: Sequence[Question],
    predictions: dict[int, str],
    errors: dict[int, str] | None = None,
    info: dict[str, Any] | None = None,
) -> Report:
    """Score answers keyed by question id; every question must have exactly one answer, and no more."""
    errors = errors or {}
    ids = [q.question_id for q in questions]
    missing = [i for i in ids if i not in predictions]
    extra = sorted(set(predictions) - set(ids))
    if missing or extra:
        raise VideoLlavaError(
            f"answers do not pair with questions: missing {missing[:10]}, unknown ids {extra[:10]}"
        )
    results = [
        Result(
            question_id=q.question_id,
            modality=q.modality,
            type=q.type,
            split=q.split,
            question=q.question,
            answer=q.answer,
            prediction=predictions[q.question_id],
            correct=q.question_id not in errors and is_correct(q, predictions[q.question_id]),
            error=errors.get(q.question_id),
        )
        for q in questions
    ]
    accuracy: dict[str, dict[str, dict[str, float]]] = {}
    for (modality, qtype), entry in accuracy_by(((r.modality, r.type), r.correct) for r in results).items():
        accuracy.setdefault(modality, {})[qtype] = entry
    probes = [r for r in results if r.type == "exists"]
    pope: dict[str, dict[str, float]] = {}
    pope_by_modality: dict[str, dict[str, dict[str, float]]] = {}
    for split in _splits_present(probes):
        in_split = [r for r in probes if r.split == split]
        pope[split] = _pope(in_split)
        for modality in MEDIA_KINDS:
            chosen = [r for r in in_split if r.modality == modality]
            if chosen:
                pope_by_modality.setdefault(modality, {})[split] = _pope(chosen)
    correct = sum(r.correct for r in results)
    overall = {"n": len(results), "correct": correct, "accuracy": correct / len(results) if results else 0.0}
    return Report(results, accuracy, pope, pope_by_modality, overall, len(errors), dict(info or {}))


def _splits_present(probes: Sequence[Result]) -> list[str]:
    present = {r.split or "none" for r in probes}
    return [s for s in POPE_SPLITS if s in present] + sorted(present - set(POPE_SPLITS))


def _pope(results: Sequence[Result]) -> dict[str, float]:
    # A failed request counts as an answer that is neither yes nor no.
    preds = ["" if r.error else r.prediction for r in results]
    return pope_metrics(preds, [normalize_label(r.answer) for r in results])


def check_targets(report: Report) -> list[str]:
    """What falls short of the targets: accuracy per modality and type, F1 per POPE split."""
    failures: list[str] = []
    if not report.results:
        return ["no questions were answered"]
    for modality, per_type in report.accuracy.items():
        for qtype, target in ACCURACY_TARGETS.items():
            entry = per_type.get(qtype)
            if entry and entry["accuracy"] < target:
                failures.append(
                    f"{modality} {qtype} accuracy {_pct(entry['accuracy'])} < {_pct(target)}"
                    f" ({entry['correct']}/{entry['n']})"
                )
    for split, metrics in report.pope.items():
        if metrics["f1"] < POPE_F1_TARGET:
            failures.append(f"POPE {split} F1 {_pct(metrics['f1'])} < {_pct(POPE_F1_TARGET)}")
    return failures


class ShapesWorldTask(Task):
    """The held-out questions of a generated ShapesWorld folder, as one task of the harness."""

    name = "shapesworld"
    summary = "held-out ShapesWorld questions: accuracy per type (images, videos), POPE per split"
    files = (
        ExpectedFile("test_questions.jsonl", "held-out questions (`videollava shapesworld generate`)"),
        ExpectedFile("media", "the images and videos the questions name"),
    )
    template = None  # the model's own: the one it was trained with
    max_new_tokens = MAX_NEW_TOKENS
    headline = "overall_accuracy"

    def load(self, data_dir: Path) -> list[Item]:
        items = []
        for q in load_questions(data_dir):
            if q.modality not in MEDIA_KINDS:
                raise VideoLlavaError(f"question {q.question_id}: unknown modality {q.modality!r}")
            meta = {
                "question_id": q.question_id,
                "media": q.media,
                "modality": q.modality,
                "type": q.type,
                "split": q.split,
            }
            media = [MediaItem(q.modality, data_dir / "media" / q.media)]
            items.append(Item(str(q.question_id), q.question, q.answer, (q.question,), media, meta))
        return items

    def report(self, records: Sequence[dict[str, Any]], info: dict[str, Any] | None = None) -> Report:
        questions = [
            Question(
                question_id=int(r["meta"]["question_id"]),
                media=r["meta"]["media"],
                modality=r["meta"]["modality"],
                type=r["meta"]["type"],
                split=r["meta"]["split"],
                question=r["question"],
                answer=r["answer"],
            )
            for r in records
        ]
        predictions = {q.question_id: r["pred"] for q, r in zip(questions, records, strict=True)}
        errors = {q.question_id: r["error"] for q, r in zip(questions, records, strict=True) if "error" in r}
        return score(questions, predictions, errors, info)

    def score(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        data = self.report(records).to_dict(with_results=False)
        data.pop("info")
        return {"overall_accuracy": 100 * data["overall"]["accuracy"]} | data

    def table(self, metrics: dict[str, Any]) -> str:
        report = Report(
            [],
            metrics["accuracy"],
            metrics["pope"],
            metrics["pope_by_modality"],
            metrics["overall"],
            metrics["errors"],
        )
        return report.body(metrics["target_failures"])


def evaluate(
    pipeline: Pipeline,
    data_dir: str | Path,
    limit: int | None = None,
    batch_size: int = 16,
    num_frames: int | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    progress: Callable[[int, int], None] | None = None,
) -> Report:
    """Ask every held-out question of a ShapesWorld folder (greedy, short answers) and score them.

    The harness's own answering (`videollava eval shapesworld` runs the same), without output files.
    """
    started = time.perf_counter()
    data_dir = Path(data_dir)
    task = ShapesWorldTask()
    items = load_items(task, data_dir, limit)
    config = RunConfig(
        task=task.name, model="", data_dir=str(data_dir), frames=num_frames, batch_size=batch_size,
        limit=limit, max_new_tokens=max_new_tokens,
    )  # fmt: skip
    answers: dict[str, dict[str, Any]] = {}

    def on_answer(item: Item, answer: dict[str, Any]) -> None:
        if item.id in answers:
            raise VideoLlavaError(f"question {item.id} was answered twice")
        answers[item.id] = item.record() | answer

    answer_items(pipeline, task, items, config, on_answer, progress)
    info = {
        "data_dir": str(data_dir),
        "questions": len(items),
        "max_new_tokens": max_new_tokens,
        "num_frames": num_frames or pipeline.num_frames,
        "seconds": round(time.perf_counter() - started, 1),
    }
    return task.report([answers[item.id] for item in items], info)


def print_progress(done: int, total: int) -> None:
    """Progress on stderr, so stdout stays clean for the report."""
    print(f"answered {done}/{total} questions", file=sys.stderr, flush=True)
