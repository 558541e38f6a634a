"""The LLM-judged image benchmarks of Table 3: LLaVA-Bench (in the wild) and MM-Vet.

Both go through the same judge machinery as video QA (cache, retries, malformed replies counted
apart), each with its own prompt: LLaVA-Bench has the judge score the reference answer and the
model's answer from the image's written description (the result is the model's score relative to
the reference's, in percent); MM-Vet has it grade the answer against the ground truth from 0 to 1.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from videollava.eval.image_tasks import answer_lines
from videollava.eval.items import (
    EvalDataError,
    ExpectedFile,
    Item,
    Task,
    field_of,
    media_for,
    need_file,
    read_json,
    read_jsonl,
)
from videollava.eval.judge import LLAVA_BENCH, MM_VET, JudgePrompt
from videollava.eval.store import write_json, write_records


def _usable(verdict: dict[str, Any] | None) -> bool:
    return bool(verdict) and not verdict.get("malformed") and verdict.get("score") is not None


class LlavaBenchTask(Task):
    name = "llava-bench"
    summary = "LLaVA-Bench in the wild (paper Table 3): judged score relative to the reference answers"
    files = (
        ExpectedFile("questions.jsonl", '{"question_id", "image", "text", "category"} per line'),
        ExpectedFile("context.jsonl", '{"image", "caption"} per line: what the judge knows of each image'),
        ExpectedFile("answers_gpt4.jsonl", '{"question_id", "text"} per line: the reference answers'),
        ExpectedFile("images", "the images"),
    )
    judge = "llava-bench"
    template = "vicuna_v1"
    max_new_tokens = 1024
    headline = "relative"

    def load(self, data_dir: Path) -> list[Item]:
        q_path, c_path, a_path = (
            data_dir / n for n in ("questions.jsonl", "context.jsonl", "answers_gpt4.jsonl")
        )
        captions = {
            Path(str(field_of(r, "image", c_path))).name: str(field_of(r, "caption", c_path))
            for r in read_jsonl(c_path)
        }
        references = {
            str(field_of(r, "question_id", a_path)): str(field_of(r, "text", a_path))
            for r in read_jsonl(a_path)
        }
        folder = need_file(data_dir, "images")
        items = []
        for row in read_jsonl(q_path):
            key = str(field_of(row, "question_id", q_path))
            image = str(field_of(row, "image", q_path))
            if key not in references:
                raise EvalDataError(f"{a_path}: no reference answer for question {key}")
            if Path(image).name not in captions:
                raise EvalDataError(f"{c_path}: no caption for image {image!r}")
            text = str(field_of(row, "text", q_path))
            meta = {
                "question_id": row["question_id"],
                "image": image,
                "category": row.get("category", "all"),
                "context": captions[Path(image).name],
                "prompt": text,
            }
            items.append(
                Item(key, text, references[key], (text,), [media_for(folder / image, "image")], meta)
            )
        return items

    def judge_prompts(self) -> list[JudgePrompt]:
        return [LLAVA_BENCH]

    def judge_requests(self, record: dict[str, Any]) -> dict[str, tuple[JudgePrompt, dict[str, str]]]:
        fields = {
            "context": record["meta"]["context"],
            "question": record["question"],
            "answer": str(record["answer"]),
            "prediction": record["pred"],
        }
        return {"": (LLAVA_BENCH, fields)}

    def score(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        groups: dict[str, list[tuple[float, float]]] = defaultdict(list)
        malformed = 0
        for record in records:
            verdict = record.get("judge")
            if not _usable(verdict):
                malformed += 1
                continue
            pair = (float(verdict["reference_score"]), float(verdict["score"]))
            groups[record["meta"]["category"]].append(pair)
            groups["all"].append(pair)
        by_category = {}
        for category, pairs in sorted(groups.items()):
            ref = sum(p[0] for p in pairs) / len(pairs)
            own = sum(p[1] for p in pairs) / len(pairs)
            by_category[category] = {
                "relative": 100 * own / ref if ref else 0.0,
                "reference": 10 * ref,
                "model": 10 * own,
                "n": len(pairs),
            }
        overall = by_category.get("all", {"relative": 0.0})
        return {"relative": overall["relative"], "by_category": by_category, "malformed": malformed}

    def table(self, metrics: dict[str, Any]) -> str:
        lines = ["| category | relative score | reference (x10) | model (x10) | n |", "| --- " * 5 + "|"]
        for category, m in metrics["by_category"].items():
            lines.append(
                f"| {category} | {m['relative']:.1f} | {m['reference']:.1f} | {m['model']:.1f} | {m['n']} |"
            )
        return "\n".join(lines) + "\n"

    def write_extra(self, records: Sequence[dict[str, Any]], out_dir: Path, model_id: str) -> list[Path]:
        path = out_dir / "answers.jsonl"
        write_records(path, answer_lines(records, model_id))
        return [path]


class MMVetTask(Task):
    name = "mm-vet"
    summary = "MM-Vet (paper Table 3): judged correctness 0-1, total and per capability, in percent"
    files = (
        ExpectedFile("mm-vet.json", '{id: {"imagename", "question", "answer", "capability": [...]}}'),
        ExpectedFile("images", "the images"),
    )
    judge = "mm-vet"
    template = "vicuna_v1"
    max_new_tokens = 1024
    headline = "total"

    def load(self, data_dir: Path) -> list[Item]:
        path = data_dir / "mm-vet.json"
        data = read_json(path)
        if not isinstance(data, dict):
            raise EvalDataError(f"{path}: expected an object of {{id: question}}")
        folder = need_file(data_dir, "images")
        items = []
        for key, row in data.items():
            question = str(field_of(row, "question", path, f" ({key})"))
            image = folder / str(field_of(row, "imagename", path, f" ({key})"))
            meta = {"question_id": key, "capability": list(row.get("capability", []))}
            answer = str(field_of(row, "answer", path, f" ({key})"))
            items.append(Item(str(key), question, answer, (question,), [media_for(image, "image")], meta))
        return items

    def judge_prompts(self) -> list[JudgePrompt]:
        return [MM_VET]

    def judge_requests(self, record: dict[str, Any]) -> dict[str, tuple[JudgePrompt, dict[str, str]]]:
        fields = {
            "question": record["question"],
            "answer": str(record["answer"]),
            "prediction": record["pred"],
        }
        return {"": (MM_VET, fields)}

    def score(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        scores: list[float] = []
        capability: dict[str, list[float]] = defaultdict(list)
        malformed = 0
        for record in records:
            verdict = record.get("judge")
            if not _usable(verdict):
                malformed += 1
                continue
            scores.append(float(verdict["score"]))
            for cap in record["meta"]["capability"]:
                capability[cap].append(float(verdict["score"]))
        return {
            "total": 100 * sum(scores) / len(scores) if scores else 0.0,
            "by_capability": {k: 100 * sum(v) / len(v) for k, v in sorted(capability.items())},
            "judged": len(scores),
            "malformed": malformed,
        }

    def table(self, metrics: dict[str, Any]) -> str:
        caps = list(metrics["by_capability"])
        head = "| total | " + " | ".join(caps) + " |\n" + "| --- " * (len(caps) + 1) + "|\n"
        return (
            head
            + f"| {metrics['total']:.1f} | "
            + " | ".join(f"{metrics['by_capability'][c]:.1f}" for c in caps)
            + " |\n"
        )

    def write_extra(self, records: Sequence[dict[str, Any]], out_dir: Path, model_id: str) -> list[Path]:
        path = out_dir / "mm-vet_results.json"
        write_json(path, {r["id"]: r["pred"] for r in records})
        return [path]


JUDGED_IMAGE_TASKS = (LlavaBenchTask, MMVetTask)
