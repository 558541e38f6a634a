"""The paper's video benchmarks: open-ended video QA (Table 2) and Video-ChatGPT's generative benchmark.

Video QA folders are laid out as the reference's download instructions leave them:
`test_q.json` (a list of {"video_name", "question", "question_id"}), `test_a.json` (a list of
{"answer", "question_id", ...}, paired with the questions by id, never by position) and
`videos/{video_name}.{mp4|avi|mov|mkv|webm|gif}`. Answers are greedy, in the `llava_v1` template,
up to 1024 new tokens, as the reference ran them, and judged by the Video-ChatGPT protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from videollava.eval.items import (
    EvalDataError,
    ExpectedFile,
    Item,
    Task,
    field_of,
    find_video,
    media_for,
    need_file,
    read_json,
)
from videollava.eval.judge import VIDEOCHATGPT_AXES, VIDEOCHATGPT_CONSISTENCY, JudgePrompt
from videollava.eval.metrics import summarize_verdicts

VIDEO_DIRS = "videos|Test_Videos"


def _video_dir(data_dir: Path) -> Path:
    return need_file(data_dir, VIDEO_DIRS)


def _list_of_dicts(path: Path) -> list[dict[str, Any]]:
    rows = read_json(path)
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise EvalDataError(f"{path}: expected a JSON list of objects")
    return rows


def _missing_videos(missing: list[str], folder: Path) -> EvalDataError:
    return EvalDataError(
        f"{folder}: no video for {len(missing)} question(s), e.g. {missing[:5]} "
        "(looked for NAME.mp4/.avi/.mov/.mkv/.webm/.gif)"
    )


class VideoQATask(Task):
    files = (
        ExpectedFile("test_q.json", 'a list of {"video_name", "question", "question_id"}'),
        ExpectedFile("test_a.json", 'a list of {"answer", "question_id", ...}'),
        ExpectedFile(VIDEO_DIRS, "{video_name}.mp4|.avi|.mov|.mkv|.webm|.gif"),
    )
    judge = "video-qa"
    template = "llava_v1"
    max_new_tokens = 1024
    title = ""
    strip_prefix = ""

    def __init__(self, name: str, title: str, summary: str, strip_prefix: str = ""):
        self.name = name
        self.title = title
        self.summary = summary
        self.strip_prefix = strip_prefix

    def load(self, data_dir: Path) -> list[Item]:
        q_path, a_path = data_dir / "test_q.json", data_dir / "test_a.json"
        questions = _list_of_dicts(q_path)
        answers: dict[str, dict[str, Any]] = {}
        for row in _list_of_dicts(a_path):
            key = str(field_of(row, "question_id", a_path))
            if key in answers:
                raise EvalDataError(f"{a_path}: question_id {key!r} has two answers")
            answers[key] = row
        folder = _video_dir(data_dir)
        items, no_answer, no_video = [], [], []
        for row in questions:
            key = str(field_of(row, "question_id", q_path))
            name = str(field_of(row, "video_name", q_path))
            question = str(field_of(row, "question", q_path))
            if key not in answers:
                no_answer.append(key)
                continue
            video = find_video(folder, name, self.strip_prefix)
            if video is None:
                no_video.append(name)
                continue
            answer = answers[key]
            meta = {"video_name": name} | ({"type": answer["type"]} if "type" in answer else {})
            items.append(
                Item(
                    key,
                    question,
                    str(field_of(answer, "answer", a_path)),
                    (question,),
                    [media_for(video, "video")],
                    meta,
                )
            )
        if no_answer:
            raise EvalDataError(f"{a_path}: no answer for question_id(s) {no_answer[:10]} of {q_path.name}")
        if no_video:
            raise _missing_videos(no_video, folder)
        return items

    def score(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        summary = summarize_verdicts(r.get("judge") for r in records)
        return {"accuracy": summary["accuracy"], "score": summary["score"]} | {
            k: summary[k] for k in ("yes", "no", "malformed")
        }

    def table(self, metrics: dict[str, Any]) -> str:
        return (
            f"| {self.title} accuracy | {self.title} score | yes | no | malformed |\n| --- | --- | --- | --- | --- |\n"
            f"| {metrics['accuracy']:.1f} | {metrics['score']:.2f} | {metrics['yes']} | {metrics['no']} | "
            f"{metrics['malformed']} |\n"
        )


VIDEO_QA_TASKS = [
    VideoQATask("msvd-qa", "MSVD-QA", "MSVD-QA open-ended video QA (paper Table 2), LLM-judged"),
    VideoQATask("msrvtt-qa", "MSRVTT-QA", "MSRVTT-QA open-ended video QA (paper Table 2), LLM-judged"),
    VideoQATask("tgif-qa", "TGIF-QA", "TGIF-QA frame QA on GIFs (paper Table 2), LLM-judged"),
    VideoQATask(
        "activitynet-qa",
        "ActivityNet-QA",
        "ActivityNet-QA (paper Table 2), LLM-judged; video names with or without v_",
        strip_prefix="v_",
    ),
]


class VideoChatGPTTask(Task):
    """Video-ChatGPT's generative benchmark: five judged axes, each the mean of 0-5 integer scores.

    Correctness, detail and context are judged on `generic_qa.json`, temporal understanding on
    `temporal_qa.json`, consistency on `consistency_qa.json` (two phrasings of one question, both
    answered). Items have no ids in these files: they are named by file and position.
    """

    name = "videochatgpt-gen"
    summary = (
        "Video-ChatGPT generative benchmark: correctness, detail, context, temporal, consistency (judged)"
    )
    files = (
        ExpectedFile("generic_qa.json", 'a list of {"Q", "A", "video_name"}'),
        ExpectedFile("temporal_qa.json", 'a list of {"Q", "A", "video_name"}'),
        ExpectedFile("consistency_qa.json", 'a list of {"Q1", "Q2", "A", "video_name"}'),
        ExpectedFile(VIDEO_DIRS, "{video_name}.mp4|.avi|.mov|.mkv|.webm|.gif"),
    )
    judge = "videochatgpt"
    template = "llava_v1"
    max_new_tokens = 1024
    headline = "mean"
    AXES = ("correctness", "detail", "context", "temporal", "consistency")

    def load(self, data_dir: Path) -> list[Item]:
        folder = _video_dir(data_dir)
        items, no_video = [], []
        for part in ("generic", "temporal", "consistency"):
            path = data_dir / f"{part}_qa.json"
            for index, row in enumerate(_list_of_dicts(path)):
                name = str(field_of(row, "video_name", path))
                video = find_video(folder, name)
                if video is None:
                    no_video.append(name)
                    continue
                answer = str(field_of(row, "A", path))
                if part == "consistency":
                    prompts = (str(field_of(row, "Q1", path)), str(field_of(row, "Q2", path)))
                else:
                    prompts = (str(field_of(row, "Q", path)),)
                meta = {"part": part, "video_name": name} | (
                    {"question2": prompts[1]} if len(prompts) > 1 else {}
                )
                items.append(
                    Item(f"{part}-{index}", prompts[0], answer, prompts, [media_for(video, "video")], meta)
                )
        if no_video:
            raise _missing_videos(no_video, folder)
        return items

    def judge_prompts(self) -> list[JudgePrompt]:
        return [*VIDEOCHATGPT_AXES.values(), VIDEOCHATGPT_CONSISTENCY]

    def judge_requests(self, record: dict[str, Any]) -> dict[str, tuple[JudgePrompt, dict[str, str]]]:
        fields = {
            "question": record["question"],
            "answer": str(record["answer"]),
            "prediction": record["pred"],
        }
        part = record["meta"]["part"]
        if part == "generic":
            return {axis: (VIDEOCHATGPT_AXES[axis], fields) for axis in ("correctness", "detail", "context")}
        if part == "temporal":
            return {"temporal": (VIDEOCHATGPT_AXES["temporal"], fields)}
        fields |= {"question2": record["meta"]["question2"], "prediction2": record.get("pred2", "")}
        return {"consistency": (VIDEOCHATGPT_CONSISTENCY, fields)}

    def score(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        scores: dict[str, list[int]] = {axis: [] for axis in self.AXES}
        malformed = 0
        for record in records:
            for axis, verdict in (record.get("judge") or {}).items():
                if verdict.get("malformed") or verdict.get("score") is None:
                    malformed += 1
                else:
                    scores[axis].append(int(float(verdict["score"])))
        metrics: dict[str, Any] = {axis: (sum(v) / len(v) if v else 0.0) for axis, v in scores.items()}
        present = [metrics[a] for a in self.AXES if scores[a]]
        metrics["mean"] = sum(present) / len(present) if present else 0.0
        metrics["judged"] = {axis: len(v) for axis, v in scores.items()}
        metrics["malformed"] = malformed
        return metrics

    def table(self, metrics: dict[str, Any]) -> str:
        head = "| correctness | detail | context | temporal | consistency | mean |\n" + "| --- " * 6 + "|\n"
        return head + "| " + " | ".join(f"{metrics[k]:.2f}" for k in (*self.AXES, "mean")) + " |\n"
