"""Every benchmark reader on small files written here in the benchmark's real layout, and each task's
scoring on answers chosen by hand."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from videollava.eval.items import EvalDataError, Shard
from videollava.eval.registry import describe, get_task


def _png(path: Path | None = None, colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def _jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _answered(items, preds, judges=None):
    records = []
    for i, (item, pred) in enumerate(zip(items, preds, strict=True)):
        record = item.record() | {"pred": pred}
        if judges is not None:
            record["judge"] = judges[i]
        records.append(record)
    return records


# ------------------------------------------------------------------------------------------ video QA


def _video_qa_folder(
    root: Path, names=("clip0", "clip1", "clip2"), suffixes=(".mp4", ".avi", ".gif")
) -> Path:
    (root / "videos").mkdir(parents=True)
    for name, suffix in zip(names, suffixes, strict=True):
        (root / "videos" / f"{name}{suffix}").write_bytes(b"not decoded by the reader")
    questions = [
        {"video_name": names[0], "question": "what is moving?", "question_id": "q7"},
        {"video_name": names[1], "question": "how many shapes?", "question_id": "q3"},
        {"video_name": names[2], "question": "what colour?", "question_id": "q5"},
    ]
    # The answers, in another order and with fields of their own.
    answers = [
        {"answer": "three", "question_id": "q3", "type": 2},
        {"answer": "red", "question_id": "q5", "type": 1},
        {"answer": "circle", "question_id": "q7", "type": 0},
    ]
    (root / "test_q.json").write_text(json.dumps(questions))
    (root / "test_a.json").write_text(json.dumps(answers))
    return root


def test_video_qa_pairs_answers_by_question_id(tmp_path):
    folder = _video_qa_folder(tmp_path / "msvd")
    task = get_task("msvd-qa")
    task.check_data(folder)
    items = task.load(folder)
    assert [(i.id, i.question, i.answer) for i in items] == [
        ("q7", "what is moving?", "circle"),
        ("q3", "how many shapes?", "three"),
        ("q5", "what colour?", "red"),
    ]
    assert [Path(i.media[0].source).name for i in items] == ["clip0.mp4", "clip1.avi", "clip2.gif"]
    assert all(i.media[0].kind == "video" and i.prompts == (i.question,) for i in items)
    assert items[0].meta == {"video_name": "clip0", "type": 0}
    assert task.template == "llava_v1" and task.max_new_tokens == 1024 and task.judge == "video-qa"


def test_video_qa_missing_answer_or_video_is_an_error(tmp_path):
    folder = _video_qa_folder(tmp_path / "msvd")
    answers = json.loads((folder / "test_a.json").read_text())
    (folder / "test_a.json").write_text(json.dumps(answers[1:]))
    with pytest.raises(EvalDataError, match=r"test_a.json: no answer for question_id\(s\) \['q3'\]"):
        get_task("msrvtt-qa").load(folder)
    (folder / "test_a.json").write_text(json.dumps(answers))
    (folder / "videos" / "clip1.avi").unlink()
    with pytest.raises(EvalDataError, match="no video for 1 question.*clip1"):
        get_task("msrvtt-qa").load(folder)
    (folder / "test_a.json").write_text(json.dumps(answers + [answers[0]]))
    with pytest.raises(EvalDataError, match="has two answers"):
        get_task("msrvtt-qa").load(folder)
    with pytest.raises(EvalDataError, match="missing test_q.json"):
        get_task("tgif-qa").check_data(tmp_path)


def test_activitynet_names_with_or_without_v_prefix(tmp_path):
    folder = _video_qa_folder(
        tmp_path / "anet", names=("v_abc", "def", "v_ghi"), suffixes=(".mp4", ".mkv", ".mov")
    )
    questions = json.loads((folder / "test_q.json").read_text())
    questions[0]["video_name"] = "abc"  # file v_abc.mp4
    questions[1]["video_name"] = "v_def"  # file def.mkv
    (folder / "test_q.json").write_text(json.dumps(questions))
    items = get_task("activitynet-qa").load(folder)
    assert [Path(i.media[0].source).name for i in items] == ["v_abc.mp4", "def.mkv", "v_ghi.mov"]
    with pytest.raises(EvalDataError):
        get_task("msvd-qa").load(folder)  # only ActivityNet looks both ways


def test_video_qa_score_from_verdicts(tmp_path):
    task = get_task("msvd-qa")
    items = task.load(_video_qa_folder(tmp_path / "msvd"))
    judges = [
        {"pred": "yes", "score": 4.6, "raw": "{'pred': 'yes', 'score': 4.6}"},
        {"pred": "no", "score": 1.0, "raw": "{'pred': 'no', 'score': 1}"},
        {"pred": None, "score": None, "raw": "hmm", "malformed": True},
    ]
    metrics = task.score(_answered(items, ["a circle", "two", "??"], judges))
    assert metrics == {"accuracy": 50.0, "score": 2.5, "yes": 1, "no": 1, "malformed": 1}
    assert "| 50.0 | 2.50 | 1 | 1 | 1 |" in task.table(metrics)


def test_videochatgpt_generative_benchmark(tmp_path):
    folder = tmp_path / "vcgpt"
    (folder / "Test_Videos").mkdir(parents=True)
    for name in ("a", "b"):
        (folder / "Test_Videos" / f"{name}.mp4").write_bytes(b"x")
    (folder / "generic_qa.json").write_text(
        json.dumps([{"Q": "What happens?", "A": "A ball rolls.", "video_name": "a"}])
    )
    (folder / "temporal_qa.json").write_text(
        json.dumps([{"Q": "What first?", "A": "It jumps.", "video_name": "b"}])
    )
    (folder / "consistency_qa.json").write_text(
        json.dumps([{"Q1": "What colour?", "Q2": "Which colour is it?", "A": "Red.", "video_name": "a"}])
    )
    task = get_task("videochatgpt-gen")
    task.check_data(folder)
    items = task.load(folder)
    assert [i.id for i in items] == ["generic-0", "temporal-0", "consistency-0"]
    assert items[2].prompts == ("What colour?", "Which colour is it?")
    records = _answered(items, ["It rolls.", "It jumps.", "Red."])
    records[2]["pred2"] = "Blue."
    requests = [task.judge_requests(r) for r in records]
    assert sorted(requests[0]) == ["context", "correctness", "detail"]
    assert list(requests[1]) == ["temporal"]
    prompt, fields = requests[2]["consistency"]
    assert fields["prediction2"] == "Blue." and fields["question2"] == "Which colour is it?"
    assert "Predicted Answer to Question 2: Blue." in prompt.messages(fields)[-1]["content"]
    records[0]["judge"] = {
        "correctness": {"score": 4.0},
        "detail": {"score": 3.9},
        "context": {"score": None, "malformed": True},
    }
    records[1]["judge"] = {"temporal": {"score": 2.0}}
    records[2]["judge"] = {"consistency": {"score": 1.0}}
    metrics = task.score(records)
    assert (metrics["correctness"], metrics["detail"], metrics["temporal"], metrics["consistency"]) == (
        4,
        3,
        2,
        1,
    )
    assert metrics["context"] == 0.0 and metrics["malformed"] == 1
    assert metrics["mean"] == pytest.approx((4 + 3 + 2 + 1) / 4)  # an axis without verdicts is left out


# ------------------------------------------------------------------------------------------ POPE


def _pope_folder(root: Path) -> Path:
    rows, labels = [], {"random": [], "popular": []}
    qid = 0
    for split in ("random", "popular"):
        for k, label in enumerate(["yes", "no", "yes", "no"]):
            image = f"COCO_val2014_{split}{k}.jpg"
            _png(root / "val2014" / image)
            rows.append(
                {"question_id": qid, "image": image, "text": f"Is there a dog {k}?", "category": split}
            )
            labels[split].append({"question_id": k + 1, "image": image, "text": "...", "label": label})
            qid += 1
    _jsonl(root / "llava_pope_test.jsonl", rows)
    for split, lines in labels.items():
        _jsonl(root / "coco" / f"coco_pope_{split}.json", lines)
    return root


def test_pope_labels_and_metrics(tmp_path):
    task = get_task("pope")
    folder = _pope_folder(tmp_path / "pope")
    task.check_data(folder)
    items = task.load(folder)
    assert [i.answer for i in items] == ["yes", "no", "yes", "no"] * 2
    # random: yes/no/yes/no labels; replies read as yes, no, no, yes -> tp 1 fp 1 tn 1 fn 1
    # popular: every reply read as yes -> tp 2 fp 2
    preds = [
        "Yes, there is.",
        "No.",
        "There is not a dog.",
        "I see a dog",
        "yes",
        "Yes",
        "yes",
        "A dog, no doubt",
    ]
    metrics = task.score(_answered(items, preds))
    random, popular = metrics["splits"]["random"], metrics["splits"]["popular"]
    assert (random["accuracy"], random["precision"], random["recall"], random["f1"], random["yes_ratio"]) == (
        50.0,
        50.0,
        50.0,
        50.0,
        50.0,
    )
    # "A dog, no doubt": commas are removed, then the word "no" makes it a no.
    assert popular["yes_ratio"] == 75.0 and popular["recall"] == 100.0
    assert popular["precision"] == pytest.approx(100 * 2 / 3)
    assert metrics["f1"] == pytest.approx((random["f1"] + popular["f1"]) / 2)
    assert "| random | 4 | 50.0 |" in task.table(metrics)


def test_pope_label_files_must_follow_the_question_order(tmp_path):
    folder = _pope_folder(tmp_path / "pope")
    path = folder / "coco" / "coco_pope_random.json"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")
    with pytest.raises(EvalDataError, match="not in the same order"):
        get_task("pope").load(folder)


# ------------------------------------------------------------------------------------------ VQA family


def test_vqav2_accuracy_and_upload_file(tmp_path):
    folder = tmp_path / "vqav2"
    questions = []
    for qid in (262144000, 262144001):
        image = f"COCO_test2015_{qid}.jpg"
        _png(folder / "test2015" / image)
        questions.append(
            {
                "question_id": qid,
                "image": image,
                "text": "What?\nAnswer the question using a single word or phrase.",
            }
        )
    _jsonl(folder / "llava_vqav2_mscoco_test-dev2015.jsonl", questions)
    _jsonl(
        folder / "llava_vqav2_mscoco_test2015.jsonl",
        questions + [{"question_id": 9, "image": "x.jpg", "text": "?"}],
    )
    annotations = {
        "annotations": [
            {"question_id": 262144000, "answer_type": "number", "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(["2"] * 3 + ["3"] * 7)]},
            {"question_id": 262144001, "answer_type": "yes/no", "answers": [{"answer": "yes", "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)]},
        ]
    }  # fmt: skip
    (folder / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(annotations))
    task = get_task("vqav2")
    items = task.load(folder)
    records = _answered(items, ["Two.", "Yes"])
    metrics = task.score(records)
    assert metrics["accuracy"] == pytest.approx(100 * (0.9 + 1.0) / 2)
    assert metrics["by_answer_type"] == {"number": pytest.approx(90.0), "yes/no": 100.0}
    out = tmp_path / "out"
    out.mkdir()
    files = task.write_extra(records, out, "my-model")
    assert sorted(p.name for p in files) == ["answers.jsonl", "vqav2_test-dev_upload.json"]
    upload = json.loads((out / "vqav2_test-dev_upload.json").read_text())
    assert upload == [
        {"question_id": 262144000, "answer": "2"},
        {"question_id": 262144001, "answer": "yes"},
        {"question_id": 9, "answer": ""},
    ]
    answer = json.loads((out / "answers.jsonl").read_text().splitlines()[0])
    assert set(answer) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    assert (answer["question_id"], answer["text"], answer["model_id"]) == (262144000, "Two.", "my-model")
    # Without annotations there is no local score, only the upload.
    (folder / "v2_mscoco_val2014_annotations.json").unlink()
    assert (
        get_task("vqav2").score(_answered(get_task("vqav2").load(folder), ["2", "yes"]))["accuracy"] is None
    )


def test_gqa_exact_match(tmp_path):
    folder = tmp_path / "gqa"
    _png(folder / "images" / "n1.jpg")
    _jsonl(folder / "llava_gqa_testdev_balanced.jsonl", [
        {"question_id": "201", "image": "n1.jpg", "text": "Is it red?"},
        {"question_id": "202", "image": "n1.jpg", "text": "What is it?"},
    ])  # fmt: skip
    (folder / "testdev_balanced_questions.json").write_text(
        json.dumps({"202": {"answer": "table", "imageId": "n1"}, "201": {"answer": "yes", "imageId": "n1"}})
    )
    task = get_task("gqa")
    items = task.load(folder)
    records = _answered(items, ["Yes.", "a table"])
    assert task.score(records) == {"accuracy": 50.0, "n": 2}
    out = tmp_path / "out"
    out.mkdir()
    task.write_extra(records, out, "m")
    assert json.loads((out / "testdev_balanced_predictions.json").read_text())[0] == {
        "questionId": "201",
        "prediction": "yes",
    }


def test_vizwiz_unanswerable(tmp_path):
    folder = tmp_path / "vizwiz"
    rows, annotations = [], []
    for k, (answers, answerable) in enumerate([(["unanswerable"] * 10, 0), (["coffee"] * 10, 1)]):
        image = f"VizWiz_val_{k:08d}.jpg"
        _png(folder / "val" / image)
        rows.append({"question_id": k, "image": image, "text": "What is this?"})
        annotations.append({"image": image, "question": "What is this?", "answerable": answerable,
                            "answer_type": "other", "answers": [{"answer": a, "answer_confidence": "yes"} for a in answers]})  # fmt: skip
    _jsonl(folder / "llava_vizwiz_test.jsonl", rows)
    (folder / "val.json").write_text(json.dumps(annotations))
    task = get_task("vizwiz")
    items = task.load(folder)
    records = _answered(items, ["?", "Coffee."])  # "?" normalises to nothing -> "unanswerable"
    metrics = task.score(records)
    assert (
        metrics["accuracy"] == 100.0 and metrics["unanswerable"] == 100.0 and metrics["answerable"] == 100.0
    )
    assert metrics["said_unanswerable"] == 50.0
    out = tmp_path / "out"
    out.mkdir()
    task.write_extra(records, out, "m")
    assert json.loads((out / "vizwiz_upload.json").read_text()) == [
        {"image": "VizWiz_val_00000000.jpg", "answer": "unanswerable"},
        {"image": "VizWiz_val_00000001.jpg", "answer": "coffee"},
    ]


def test_textvqa_by_question_id(tmp_path):
    folder = tmp_path / "textvqa"
    _png(folder / "train_images" / "abc.jpg")
    _jsonl(folder / "llava_textvqa_val_v051_ocr.jsonl", [
        {"question_id": 34602, "image": "abc.jpg", "text": "what brand?\nReference OCR token: Sony"},
    ])  # fmt: skip
    answers = ["sony"] * 2 + ["Sony TV"] * 8
    (folder / "TextVQA_0.5.1_val.json").write_text(
        json.dumps({"data": [{"question_id": 34602, "answers": answers}]})
    )
    task = get_task("textvqa")
    items = task.load(folder)
    assert task.score(_answered(items, ["SONY"]))["accuracy"] == pytest.approx(60.0)


# ------------------------------------------------------------------------------------------ multiple choice


def test_scienceqa_image_subset(tmp_path):
    folder = tmp_path / "sqa"
    _png(folder / "images" / "test" / "11" / "image.png")
    _png(folder / "images" / "test" / "12" / "image.png")
    conversations = [
        {"id": "11", "image": "image.png", "conversations": [{"from": "human", "value": "<image>\nContext: a map.\nWhich is north?\nA. up\nB. down"}, {"from": "gpt", "value": "A"}]},
        {"id": "12", "image": "image.png", "conversations": [{"from": "human", "value": "<image>\nWhich is hot?\nA. ice\nB. fire\nC. snow"}, {"from": "gpt", "value": "B"}]},
        {"id": "13", "conversations": [{"from": "human", "value": "Text only?\nA. x\nB. y"}, {"from": "gpt", "value": "A"}]},
    ]  # fmt: skip
    (folder / "llava_test_CQM-A.json").write_text(json.dumps(conversations))
    problems = {
        "11": {"choices": ["up", "down"], "answer": 0, "subject": "social science", "image": "image.png"},
        "12": {
            "choices": ["ice", "fire", "snow"],
            "answer": 1,
            "subject": "natural science",
            "image": "image.png",
        },
        "13": {"choices": ["x", "y"], "answer": 0, "subject": "language science", "image": None},
    }
    (folder / "problems.json").write_text(json.dumps(problems))
    task = get_task("scienceqa-img")
    items = task.load(folder)
    assert [i.id for i in items] == ["11", "12"]  # the text-only problem is not in the image subset
    assert (
        items[0]
        .prompts[0]
        .endswith(
            "Which is north?\nA. up\nB. down\nAnswer with the option's letter from the given choices directly."
        )
    )
    assert "<image>" not in items[0].prompts[0]
    assert [i.answer for i in items] == ["A", "B"]
    metrics = task.score(_answered(items, ["A", "I am not sure"]))
    assert (metrics["accuracy"], metrics["unparsed"]) == (50.0, 1)


def _mmbench_tsv(path: Path, rows) -> None:
    header = [
        "index",
        "question",
        "hint",
        "A",
        "B",
        "C",
        "D",
        "answer",
        "category",
        "l2-category",
        "image",
        "source",
        "split",
    ]
    image = base64.b64encode(_png()).decode()
    lines = ["\t".join(header)]
    for r in rows:
        values = {"image": image, "source": "x", "split": "dev", "l2-category": "l2"} | r
        lines.append("\t".join(str(values.get(h, "")) for h in header))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def test_mmbench_circular_evaluation(tmp_path):
    folder = tmp_path / "mmbench"
    _mmbench_tsv(folder / "mmbench_dev_20230712.tsv", [
        {"index": 1, "question": "Which is red?", "hint": "Look closely.", "A": "sky", "B": "blood", "C": "grass", "D": "snow", "answer": "B", "category": "colour"},
        {"index": 2, "question": "How many?", "hint": "nan", "A": "one", "B": "two", "C": "three", "answer": "C", "category": "count"},
    ])  # fmt: skip
    task = get_task("mmbench")
    items = task.load(folder)
    assert [i.id for i in items] == ["1@0", "1@1", "1@2", "1@3", "2@0", "2@1", "2@2"]
    first = items[0]
    assert first.prompts[0] == (
        "Look closely.\nWhich is red?\nA. sky\nB. blood\nC. grass\nD. snow\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert isinstance(first.media[0].source, bytes) and first.media[0].source.startswith(b"\x89PNG")
    # "blood" sits at B, A, D, C in the four rotations; "three" at C, B, A.
    assert [i.answer for i in items] == ["B", "A", "D", "C", "C", "B", "A"]
    # Question 1: right in every rotation (by letter or by the option's text); question 2 misses one.
    preds = ["B", "(A)", "blood", "The answer is C.", "C", "B", "B"]
    metrics = task.score(_answered(items, preds))
    assert metrics["accuracy"] == 50.0 and metrics["single_pass"] == 100.0 and metrics["questions"] == 2
    assert metrics["by_category"] == {"colour": 100.0, "count": 0.0}
    out = tmp_path / "out"
    out.mkdir()
    task.write_extra(_answered(items, preds), out, "m")
    with (out / "mmbench_upload.tsv").open(newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t"))
    assert rows[0] == ["index", "round", "question", "A", "B", "C", "D", "prediction", "text"]
    assert rows[1] == ["1", "0", "Look closely.\nWhich is red?", "sky", "blood", "grass", "snow", "B", "B"]
    assert rows[5][:8] == ["2", "0", "How many?", "one", "two", "three", "", "C"]


# ------------------------------------------------------------------------------------------ judged image tasks


def test_llava_bench_relative_score(tmp_path):
    folder = tmp_path / "llava-bench"
    _png(folder / "images" / "001.jpg")
    _jsonl(folder / "questions.jsonl", [
        {"question_id": 0, "image": "001.jpg", "text": "Describe it.", "category": "detail"},
        {"question_id": 1, "image": "001.jpg", "text": "What is it?", "category": "conv"},
    ])  # fmt: skip
    _jsonl(folder / "context.jsonl", [{"id": "001", "image": "001.jpg", "caption": "A red ball on grass."}])
    _jsonl(
        folder / "answers_gpt4.jsonl",
        [{"question_id": 1, "text": "A ball."}, {"question_id": 0, "text": "A red ball."}],
    )
    task = get_task("llava-bench")
    items = task.load(folder)
    assert [i.answer for i in items] == ["A red ball.", "A ball."]
    records = _answered(items, ["A ball.", "Ball."], [
        {"pred": None, "score": 6.0, "reference_score": 8.0, "raw": "8 6"},
        {"pred": None, "score": 9.0, "reference_score": 9.0, "raw": "9 9"},
    ])  # fmt: skip
    prompt, fields = task.judge_requests(records[0])[""]
    assert fields["context"] == "A red ball on grass." and fields["answer"] == "A red ball."
    metrics = task.score(records)
    assert metrics["by_category"]["detail"]["relative"] == pytest.approx(75.0)
    assert metrics["relative"] == pytest.approx(100 * 7.5 / 8.5)


def test_mm_vet_scores(tmp_path):
    folder = tmp_path / "mm-vet"
    _png(folder / "images" / "v1_0.png")
    data = {
        "v1_0": {
            "imagename": "v1_0.png",
            "question": "What is x?",
            "answer": "-1 <AND> -5",
            "capability": ["math", "ocr"],
        },
        "v1_1": {"imagename": "v1_0.png", "question": "Colour?", "answer": "red", "capability": ["rec"]},
    }
    (folder / "mm-vet.json").write_text(json.dumps(data))
    task = get_task("mm-vet")
    items = task.load(folder)
    records = _answered(items, ["x = -1", "red"], [{"score": 0.5}, {"score": 1.0}])
    metrics = task.score(records)
    assert metrics["total"] == pytest.approx(75.0)
    assert metrics["by_capability"] == {"math": 50.0, "ocr": 50.0, "rec": 100.0}


# ------------------------------------------------------------------------------------------ shards, listing


def test_shards_partition_ids_deterministically():
    ids = [str(i) for i in range(200)]
    parts = [[i for i in ids if Shard(k, 3).holds(i)] for k in range(3)]
    assert sorted(sum(parts, [])) == sorted(ids)
    assert all(40 < len(p) < 95 for p in parts)
    assert parts == [[i for i in ids if Shard.parse(f"{k}/3").holds(i)] for k in range(3)]
    for bad in ("3/3", "1", "a/b", "0/0"):
        with pytest.raises(Exception, match="--shard"):
            Shard.parse(bad)


def test_list_names_every_task_and_its_files():
    text = describe()
    for name in ["shapesworld", "msvd-qa", "msrvtt-qa", "tgif-qa", "activitynet-qa", "videochatgpt-gen", "pope",
                 "vqav2", "gqa", "vizwiz", "textvqa", "scienceqa-img", "mmbench", "llava-bench", "mm-vet"]:  # fmt: skip
        assert f"\n{name}" in "\n" + text
    assert "D/test_q.json" in text and "D/llava_pope_test.jsonl" in text and "D/mm-vet.json" in text
