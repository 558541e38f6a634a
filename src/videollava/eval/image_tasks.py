"""The paper's image benchmarks (Table 3), read in the layout of LLaVA-1.5's evaluation.

Questions come as LLaVA-1.5 JSONL (`question_id`, `image`, `text`, `category`) with the prompt
text as written there (its instruction, e.g. "Answer the question using a single word or
phrase.", included); images in the benchmark's folder; the annotations each official scorer
reads. Answers are also written as the reference writes them (`answers.jsonl`: `question_id`,
`prompt`, `text`, `answer_id`, `model_id`, `metadata`), and, where a benchmark is scored by a
server, the file to upload. Templates follow the reference's image scripts (`vicuna_v1`).
"""

from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from videollava.eval.choice import (
    ANSWER_WITH_LETTER,
    LETTERS,
    circular_correct,
    extract_choice,
    options_block,
    rotations,
)
from videollava.eval.items import (
    EvalDataError,
    ExpectedFile,
    Item,
    Task,
    field_of,
    find_file,
    media_for,
    need_file,
    read_json,
    read_jsonl,
)
from videollava.eval.metrics import pope_metrics
from videollava.eval.store import write_json, write_records
from videollava.eval.vqa import normalize_vqa_answer, vqa_accuracy
from videollava.infer.request import MediaItem


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def answer_lines(records: Sequence[dict[str, Any]], model_id: str) -> list[dict[str, Any]]:
    """The reference's answer file: one line per question, under the question's own id."""
    lines = []
    for record in records:
        meta = record.get("meta", {})
        answer_id = hashlib.blake2b(f"{model_id}\0{record['id']}".encode(), digest_size=11).hexdigest()
        lines.append(
            {
                "question_id": meta.get("question_id", record["id"]),
                "prompt": meta.get("prompt", record["question"]),
                "text": record["pred"],
                "answer_id": answer_id,
                "model_id": model_id,
                "metadata": {},
            }
        )
    return lines


class LlavaQuestionsTask(Task):
    """A benchmark whose questions are a LLaVA-1.5 JSONL file and whose images sit in one folder."""

    template = "vicuna_v1"
    max_new_tokens = 128
    questions_file = ""
    image_dirs = "images"

    def image_folder(self, data_dir: Path) -> Path:
        return need_file(data_dir, self.image_dirs)

    def questions(self, data_dir: Path) -> list[dict[str, Any]]:
        return read_jsonl(need_file(data_dir, self.questions_file))

    def base_items(self, data_dir: Path) -> list[Item]:
        path = need_file(data_dir, self.questions_file)
        folder = self.image_folder(data_dir)
        items, missing = [], []
        for row in read_jsonl(path):
            raw_id = field_of(row, "question_id", path)
            image = str(field_of(row, "image", path))
            text = str(field_of(row, "text", path))
            image_path = folder / image
            if not image_path.is_file():
                missing.append(image)
            meta = {"question_id": raw_id, "image": image, "prompt": text}
            if "category" in row:
                meta["category"] = row["category"]
            items.append(Item(str(raw_id), text, None, (text,), [media_for(image_path, "image")], meta))
        if missing:
            raise EvalDataError(f"{folder}: {len(missing)} image(s) not found, e.g. {missing[:5]}")
        return items

    def write_extra(self, records: Sequence[dict[str, Any]], out_dir: Path, model_id: str) -> list[Path]:
        path = out_dir / "answers.jsonl"
        write_records(path, answer_lines(records, model_id))
        return [path]


# ------------------------------------------------------------------------------------------ POPE

POPE_SPLITS = ("random", "popular", "adversarial")


class PopeTask(LlavaQuestionsTask):
    """POPE: yes/no object probing, per split, with the reference's reading of the replies.

    A reply counts as "no" when its first sentence, commas removed, has the word "No", "no" or
    "not"; otherwise "yes". Labels come from a `label` field of the question line or, as the
    reference pairs them, from `coco/coco_pope_{split}.json`: the k-th question of a split with
    the k-th label line of that split's file (the image names must agree).
    """

    name = "pope"
    summary = (
        "POPE object hallucination (paper Table 3): accuracy, precision, recall, F1, yes-ratio per split"
    )
    files = (
        ExpectedFile(
            "llava_pope_test.jsonl", 'LLaVA-1.5 questions: {"question_id", "image", "text", "category"}'
        ),
        ExpectedFile(
            "coco/coco_pope_{random,popular,adversarial}.json",
            'one {"image", "label"} per line, in the order of the split\'s questions (unless questions carry "label")',
            optional=True,
        ),
        ExpectedFile("val2014|images", "the COCO images"),
    )
    questions_file = "llava_pope_test.jsonl"
    image_dirs = "val2014|images"
    headline = "f1"

    def load(self, data_dir: Path) -> list[Item]:
        items = self.base_items(data_dir)
        by_split: dict[str, list[Item]] = defaultdict(list)
        for item in items:
            split = item.meta.get("category")
            if split is None:
                raise EvalDataError(
                    f"{data_dir / self.questions_file}: question {item.id} has no category (split)"
                )
            by_split[split].append(item)
        rows = {str(r["question_id"]): r for r in self.questions(data_dir)}
        for split, members in by_split.items():
            if all("label" in rows[i.id] for i in members):
                for item in members:
                    item.answer = _label(rows[item.id]["label"], item.id)
                continue
            ann = find_file(data_dir, f"coco/coco_pope_{split}.json|coco_pope_{split}.json")
            if ann is None:
                raise EvalDataError(f"{data_dir}: no coco/coco_pope_{split}.json for the {split} questions")
            labels = read_jsonl(ann)
            if len(labels) != len(members):
                raise EvalDataError(f"{ann}: {len(labels)} labels for {len(members)} {split} questions")
            for number, (item, row) in enumerate(zip(members, labels, strict=True), start=1):
                if "image" in row and Path(str(row["image"])).name != Path(item.meta["image"]).name:
                    raise EvalDataError(
                        f"{ann}:{number}: label for image {row['image']!r} but question {item.id} is about "
                        f"{item.meta['image']!r}; the files are not in the same order"
                    )
                item.answer = _label(field_of(row, "label", ann, f":{number}"), item.id)
        return items

    def score(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        metrics: dict[str, Any] = {"splits": {}}
        for split in [*POPE_SPLITS, *sorted({r["meta"]["category"] for r in records} - set(POPE_SPLITS))]:
            chosen = [r for r in records if r["meta"]["category"] == split]
            if chosen:
                m = pope_metrics([r["pred"] for r in chosen], [r["answer"] for r in chosen], protocol="llava")
                metrics["splits"][split] = {k: (100 * v if k != "n" else v) for k, v in m.items()}
        splits = metrics["splits"].values()
        for key in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
            metrics[key] = sum(s[key] for s in splits) / len(splits) if splits else 0.0
        return metrics

    def table(self, metrics: dict[str, Any]) -> str:
        lines = ["| split | n | accuracy | precision | recall | F1 | yes ratio |", "| --- " * 7 + "|"]
        for split, m in metrics["splits"].items():
            lines.append(
                f"| {split} | {m['n']} | {_pct(m['accuracy'])} | {_pct(m['precision'])} | {_pct(m['recall'])} | "
                f"{_pct(m['f1'])} | {_pct(m['yes_ratio'])} |"
            )
        lines.append(
            f"| mean | | {_pct(metrics['accuracy'])} | {_pct(metrics['precision'])} | {_pct(metrics['recall'])} | "
            f"**{_pct(metrics['f1'])}** | {_pct(metrics['yes_ratio'])} |"
        )
        return "\n".join(lines) + "\n"


def _label(value: Any, item_id: str) -> str:
    label = str(value).strip().lower()
    if label not in ("yes", "no"):
        raise EvalDataError(f"POPE question {item_id}: label {value!r} is not yes or no")
    return label


# ------------------------------------------------------------------------------------------ VQA family


class VQATask(LlavaQuestionsTask):
    """VQA accuracy against ten human answers, when the annotations are there; the upload file always."""

    annotations_file = ""
    headline = "accuracy"

    def annotations(self, data_dir: Path) -> dict[str, dict[str, Any]] | None:
        return None

    def load(self, data_dir: Path) -> list[Item]:
        items = self.base_items(data_dir)
        annotations = self.annotations(data_dir)
        if annotations is not None:
            missing = [i.id for i in items if self.key(i) not in annotations]
            if missing:
                raise EvalDataError(f"{data_dir}: no annotation for question(s) {missing[:10]}")
            for item in items:
                ann = annotations[self.key(item)]
                item.answer = ann["answers"]
                item.meta |= {k: ann[k] for k in ("answer_type", "answerable") if k in ann}
        return items

    def key(self, item: Item) -> str:
        return item.id

    def prediction(self, record: dict[str, Any]) -> str:
        return record["pred"]

    def score(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        scored = [r for r in records if r["answer"] is not None]
        if not scored:
            return {
                "accuracy": None,
                "note": "no annotations here: upload the answers file to the evaluation server",
            }
        per: dict[str, list[float]] = defaultdict(list)
        total = []
        for record in scored:
            acc = vqa_accuracy(self.prediction(record), record["answer"])
            total.append(acc)
            if "answer_type" in record.get("meta", {}):
                per[record["meta"]["answer_type"]].append(acc)
        metrics = {"accuracy": 100 * sum(total) / len(total), "n": len(total)}
        if per:
            metrics["by_answer_type"] = {k: 100 * sum(v) / len(v) for k, v in sorted(per.items())}
        return metrics

    def table(self, metrics: dict[str, Any]) -> str:
        head = f"| {self.name} accuracy |"
        row = f"| {_pct(metrics['accuracy'])} |"
        for kind, value in metrics.get("by_answer_type", {}).items():
            head += f" {kind} |"
            row += f" {_pct(value)} |"
        out = head + "\n|" + " --- |" * (head.count("|") - 1) + "\n" + row + "\n"
        return out + (f"\n{metrics['note']}\n" if "note" in metrics else "")


def _answer_list(row: dict[str, Any], path: Path) -> list[str]:
    answers = field_of(row, "answers", path)
    return [str(a["answer"]) if isinstance(a, dict) else str(a) for a in answers]


class VQAv2Task(VQATask):
    name = "vqav2"
    summary = "VQAv2 (paper Table 3): VQA accuracy with val annotations; the test-dev upload file always"
    files = (
        ExpectedFile("llava_vqav2_mscoco_test-dev2015.jsonl", "LLaVA-1.5 questions"),
        ExpectedFile("test2015|val2014|images", "the COCO images"),
        ExpectedFile(
            "v2_mscoco_val2014_annotations.json", "official annotations, to score locally", optional=True
        ),
        ExpectedFile(
            "llava_vqav2_mscoco_test2015.jsonl", "every test2015 question, to fill the upload", optional=True
        ),
    )
    questions_file = "llava_vqav2_mscoco_test-dev2015.jsonl"
    image_dirs = "test2015|val2014|images"
    data_dir: Path | None = None

    def load(self, data_dir: Path) -> list[Item]:
        self.data_dir = data_dir  # the upload file is completed from its test2015 list
        return super().load(data_dir)

    def annotations(self, data_dir: Path) -> dict[str, dict[str, Any]] | None:
        path = find_file(data_dir, "v2_mscoco_val2014_annotations.json")
        if path is None:
            return None
        data = read_json(path)
        return {
            str(field_of(a, "question_id", path)): {
                "answers": _answer_list(a, path),
                "answer_type": a.get("answer_type"),
            }
            for a in data.get("annotations", [])
        }

    def write_extra(self, records: Sequence[dict[str, Any]], out_dir: Path, model_id: str) -> list[Path]:
        files = super().write_extra(records, out_dir, model_id)
        upload = [
            {"question_id": r["meta"]["question_id"], "answer": normalize_vqa_answer(r["pred"])}
            for r in records
        ]
        answered = {str(u["question_id"]) for u in upload}
        full = find_file(self.data_dir, "llava_vqav2_mscoco_test2015.jsonl") if self.data_dir else None
        if full is not None:
            # The server wants every test2015 question; the ones outside test-dev get an empty answer.
            upload += [
                {"question_id": row["question_id"], "answer": ""}
                for row in read_jsonl(full)
                if str(row["question_id"]) not in answered
            ]
        path = out_dir / "vqav2_test-dev_upload.json"
        write_json(path, upload)
        return [*files, path]


class GQATask(LlavaQuestionsTask):
    """GQA: exact match after lower-casing and dropping a final full stop, as LLaVA prepares it."""

    name = "gqa"
    summary = "GQA test-dev balanced (paper Table 3): exact-match accuracy"
    files = (
        ExpectedFile("llava_gqa_testdev_balanced.jsonl", "LLaVA-1.5 questions"),
        ExpectedFile(
            "testdev_balanced_questions.json", 'official questions with answers: {qid: {"answer", ...}}'
        ),
        ExpectedFile("images", "the GQA images"),
    )
    questions_file = "llava_gqa_testdev_balanced.jsonl"

    def load(self, data_dir: Path) -> list[Item]:
        path = need_file(data_dir, "testdev_balanced_questions.json")
        official = read_json(path)
        items = self.base_items(data_dir)
        missing = [i.id for i in items if i.id not in official]
        if missing:
            raise EvalDataError(f"{path}: no entry for question(s) {missing[:10]}")
        for item in items:
            item.answer = str(field_of(official[item.id], "answer", path))
        return items

    @staticmethod
    def normalize(text: str) -> str:
        return text.strip().rstrip(".").strip().lower()

    def score(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        right = sum(self.normalize(r["pred"]) == self.normalize(r["answer"]) for r in records)
        return {"accuracy": 100 * right / len(records) if records else 0.0, "n": len(records)}

    def table(self, metrics: dict[str, Any]) -> str:
        return f"| GQA accuracy | n |\n| --- | --- |\n| {_pct(metrics['accuracy'])} | {metrics['n']} |\n"

    def write_extra(self, records: Sequence[dict[str, Any]], out_dir: Path, model_id: str) -> list[Path]:
        files = super().write_extra(records, out_dir, model_id)
        path = out_dir / "testdev_balanced_predictions.json"
        write_json(path, [{"questionId": r["id"], "prediction": self.normalize(r["pred"])} for r in records])
        return [*files, path]


class VizWizTask(VQATask):
    """VizWiz: VQA accuracy; an answer that normalises to nothing is sent as "unanswerable"."""

    name = "vizwiz"
    summary = (
        "VizWiz VQA (paper Table 3): VQA accuracy with val annotations, unanswerable handled; upload file"
    )
    files = (
        ExpectedFile("llava_vizwiz_test.jsonl", "LLaVA-1.5 questions"),
        ExpectedFile("test|val|images", "the VizWiz images"),
        ExpectedFile(
            "val.json|Annotations/val.json", "official annotations, to score locally", optional=True
        ),
    )
    questions_file = "llava_vizwiz_test.jsonl"
    image_dirs = "test|val|images"

    def annotations(self, data_dir: Path) -> dict[str, dict[str, Any]] | None:
        path = find_file(data_dir, "val.json|Annotations/val.json")
        if path is None:
            return None
        rows = read_json(path)
        return {
            Path(str(field_of(r, "image", path))).name: {
                "answers": _answer_list(r, path),
                "answer_type": r.get("answer_type"),
                "answerable": r.get("answerable"),
            }
            for r in rows
        }

    def key(self, item: Item) -> str:
        return Path(item.meta["image"]).name

    def prediction(self, record: dict[str, Any]) -> str:
        return self.upload_answer(record["pred"])

    @staticmethod
    def upload_answer(text: str) -> str:
        answer = normalize_vqa_answer(text)
        return answer if answer else "unanswerable"

    def score(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        metrics = super().score(records)
        scored = [r for r in records if r["answer"] is not None and r["meta"].get("answerable") is not None]
        for flag, key in ((0, "unanswerable"), (1, "answerable")):
            part = [r for r in scored if int(r["meta"]["answerable"]) == flag]
            if part:
                metrics[key] = (
                    100 * sum(vqa_accuracy(self.prediction(r), r["answer"]) for r in part) / len(part)
                )
        if scored:
            said = [self.prediction(r) == "unanswerable" for r in scored]
            metrics["said_unanswerable"] = 100 * sum(said) / len(said)
        return metrics

    def write_extra(self, records: Sequence[dict[str, Any]], out_dir: Path, model_id: str) -> list[Path]:
        files = super().write_extra(records, out_dir, model_id)
        path = out_dir / "vizwiz_upload.json"
        write_json(
            path, [{"image": r["meta"]["image"], "answer": self.upload_answer(r["pred"])} for r in records]
        )
        return [*files, path]


class TextVQATask(VQATask):
    name = "textvqa"
    summary = "TextVQA val (paper Table 3): VQA accuracy"
    files = (
        ExpectedFile("llava_textvqa_val_v051_ocr.jsonl", "LLaVA-1.5 questions (with reference OCR tokens)"),
        ExpectedFile(
            "TextVQA_0.5.1_val.json", 'official annotations: {"data": [{"question_id", "answers"}]}'
        ),
        ExpectedFile("train_images|images", "the TextVQA images"),
    )
    questions_file = "llava_textvqa_val_v051_ocr.jsonl"
    image_dirs = "train_images|images"

    def annotations(self, data_dir: Path) -> dict[str, dict[str, Any]] | None:
        path = need_file(data_dir, "TextVQA_0.5.1_val.json")
        data = read_json(path)
        return {
            str(field_of(r, "question_id", path)): {"answers": _answer_list(r, path)}
            for r in data.get("data", [])
        }


# ------------------------------------------------------------------------------------------ multiple choice


class ScienceQATask(Task):
    """ScienceQA, image subset: the option letter the reply picks against the answer's letter."""

    name = "scienceqa-img"
    summary = "ScienceQA image subset (paper Table 3): accuracy of the picked option letter"
    files = (
        ExpectedFile("llava_test_CQM-A.json", 'LLaVA-1.5 conversations: [{"id", "image", "conversations"}]'),
        ExpectedFile("problems.json", 'official problems: {id: {"choices", "answer", ...}}'),
        ExpectedFile("images/test|images", "the test images, as {id}/image.png or as named"),
    )
    template = "vicuna_v1"
    max_new_tokens = 128

    def load(self, data_dir: Path) -> list[Item]:
        conv_path, prob_path = data_dir / "llava_test_CQM-A.json", data_dir / "problems.json"
        problems = read_json(prob_path)
        folder = need_file(data_dir, "images/test|images")
        items = []
        for row in read_json(conv_path):
            if "image" not in row:
                continue  # the image subset only
            key = str(field_of(row, "id", conv_path))
            problem = problems.get(key)
            if problem is None:
                raise EvalDataError(f"{prob_path}: no problem {key!r}")
            first = field_of(row, "conversations", conv_path)[0]["value"]
            question = first.replace("<image>", "").strip()
            prompt = question + "\n" + ANSWER_WITH_LETTER
            image = folder / str(row["image"])
            if not image.is_file():
                image = folder / key / str(row["image"])
            if not image.is_file():
                raise EvalDataError(f"{folder}: no image {row['image']!r} for problem {key}")
            choices = [str(c) for c in field_of(problem, "choices", prob_path)]
            answer = LETTERS[int(field_of(problem, "answer", prob_path))]
            meta = {
                "question_id": key,
                "choices": choices,
                "subject": problem.get("subject"),
                "prompt": prompt,
            }
            items.append(Item(key, question, answer, (prompt,), [media_for(image, "image")], meta))
        return items

    def score(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        picks = [extract_choice(r["pred"], r["meta"]["choices"]) for r in records]
        right = sum(p == r["answer"] for p, r in zip(picks, records, strict=True))
        return {
            "accuracy": 100 * right / len(records) if records else 0.0,
            "n": len(records),
            "unparsed": sum(p is None for p in picks),
            "note": "a reply naming no option counts as wrong (the reference picks a random letter)",
        }

    def table(self, metrics: dict[str, Any]) -> str:
        return (
            "| SQA-IMG accuracy | n | no option picked |\n| --- | --- | --- |\n"
            f"| {_pct(metrics['accuracy'])} | {metrics['n']} | {metrics['unparsed']} |\n"
        )

    def write_extra(self, records: Sequence[dict[str, Any]], out_dir: Path, model_id: str) -> list[Path]:
        path = out_dir / "answers.jsonl"
        write_records(path, answer_lines(records, model_id))
        return [path]


class MMBenchTask(Task):
    """MMBench with circular evaluation: each question asked once per rotation of its options.

    A question counts as right only when every rotation's reply picks the right option. Without
    an `answer` column (the test split) only the upload file is written.
    """

    name = "mmbench"
    summary = "MMBench dev (paper Table 3): circular accuracy over rotated options; upload TSV"
    files = (
        ExpectedFile(
            "mmbench_dev_20230712.tsv", "index, question, hint, A-D, answer, category, image (base64)"
        ),
    )
    template = "vicuna_v1"
    max_new_tokens = 128

    def load(self, data_dir: Path) -> list[Item]:
        path = need_file(data_dir, "mmbench_dev_20230712.tsv")
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
        items = []
        with path.open(encoding="utf-8", newline="") as handle:
            for number, row in enumerate(csv.DictReader(handle, delimiter="\t"), start=2):
                index = str(field_of(row, "index", path, f":{number}"))
                options = [row[c] for c in LETTERS[:8] if _present(row.get(c))]
                if len(options) < 2:
                    raise EvalDataError(f"{path}:{number}: fewer than two options")
                try:
                    image = base64.b64decode(field_of(row, "image", path, f":{number}"), validate=True)
                except (binascii.Error, ValueError):
                    raise EvalDataError(f"{path}:{number}: the image column is not base64") from None
                question = row["question"]
                if _present(row.get("hint")):
                    question = f"{row['hint']}\n{question}"
                answer = row.get("answer") if _present(row.get("answer")) else None
                base = {
                    "index": index,
                    "category": row.get("category"),
                    "l2-category": row.get("l2-category"),
                }
                for shift, order in enumerate(rotations(options)):
                    shown = [options[i] for i in order]
                    prompt = f"{question}\n{options_block(shown)}\n{ANSWER_WITH_LETTER}"
                    right = LETTERS[order.index(LETTERS.index(answer))] if answer else None
                    meta = base | {"round": shift, "options": shown, "order": order, "prompt": prompt}
                    media = [MediaItem("image", image, name=f"{path.name}:{index}")]
                    items.append(Item(f"{index}@{shift}", question, right, (prompt,), media, meta))
        return items

    def score(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if any(r["answer"] is None for r in records):
            return {
                "accuracy": None,
                "note": "no answers in the TSV: upload mmbench_upload.tsv to the server",
            }
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for record in records:
            groups[record["meta"]["index"]].append(record)
        passed, first, unparsed = {}, {}, 0
        by_category: dict[str, list[bool]] = defaultdict(list)
        for index, group in groups.items():
            group.sort(key=lambda r: r["meta"]["round"])
            picks = [extract_choice(r["pred"], r["meta"]["options"]) for r in group]
            unparsed += sum(p is None for p in picks)
            passed[index] = circular_correct(picks, [r["answer"] for r in group])
            first[index] = picks[0] == group[0]["answer"]
            by_category[group[0]["meta"].get("category") or "?"].append(passed[index])
        n = len(groups)
        return {
            "accuracy": 100 * sum(passed.values()) / n if n else 0.0,
            "single_pass": 100 * sum(first.values()) / n if n else 0.0,
            "questions": n,
            "unparsed": unparsed,
            "by_category": {k: 100 * sum(v) / len(v) for k, v in sorted(by_category.items())},
        }

    def table(self, metrics: dict[str, Any]) -> str:
        if metrics.get("accuracy") is None:
            return metrics["note"] + "\n"
        return (
            "| MMBench circular accuracy | first rotation only | questions | no option picked |\n"
            "| --- | --- | --- | --- |\n"
            f"| {_pct(metrics['accuracy'])} | {_pct(metrics['single_pass'])} | {metrics['questions']} | "
            f"{metrics['unparsed']} |\n"
        )

    def write_extra(self, records: Sequence[dict[str, Any]], out_dir: Path, model_id: str) -> list[Path]:
        path = out_dir / "mmbench_upload.tsv"
        with path.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle, delimiter="\t")
            writer.writerow(["index", "round", "question", "A", "B", "C", "D", "prediction", "text"])
            for r in records:
                options = (r["meta"]["options"] + [""] * 4)[:4]
                pick = extract_choice(r["pred"], r["meta"]["options"]) or ""
                writer.writerow(
                    [r["meta"]["index"], r["meta"]["round"], r["question"], *options, pick, r["pred"]]
                )
        return [path]


def _present(value: Any) -> bool:
    return value is not None and str(value).strip() not in ("", "nan", "NaN", "None")


IMAGE_TASKS = (PopeTask, VQAv2Task, GQATask, VizWizTask, TextVQATask, ScienceQATask, MMBenchTask)
