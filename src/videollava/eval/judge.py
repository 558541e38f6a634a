"""The LLM judge: prompts, reading replies, any OpenAI-compatible endpoint, and a cache on disk.

A judged benchmark's score is only as reproducible as its judge, so every verdict keeps the raw
reply, every prompt is identified by a hash of its exact text, and a verdict is cached on disk
under (judge model, prompt hash, the texts judged): a re-run or a resumed run never pays for the
same call twice. A reply that cannot be read is retried a bounded number of times with back-off;
what stays unreadable is reported as malformed, never counted as a "no".
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import string
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from videollava.errors import VideoLlavaError
from videollava.eval.metrics import (
    JUDGE_SYSTEM,
    JUDGE_USER,
    JudgeReplyError,
    normalize_answer,
    parse_judge_reply,
)


class JudgeError(VideoLlavaError):
    """The judge endpoint could not be reached or refused every attempt."""


# ------------------------------------------------------------------------------------------ prompts


@dataclass(frozen=True)
class JudgePrompt:
    """One judging protocol: the exact messages (fields in braces) and how its reply is read.

    ``reply`` is "pred_score" ({'pred': yes/no, 'score': 0-5}), "score" ({'score': 0-5}),
    "pair" (two scores on the first line: reference answer's, then the prediction's) or
    "fraction" (one number from 0 to 1).
    """

    name: str
    system: str
    user: str
    reply: str

    @property
    def hash(self) -> str:
        """Identifies the exact text: results judged with different prompts are not comparable."""
        text = json.dumps([self.system, self.user, self.reply], ensure_ascii=False)
        return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()

    def messages(self, fields: Mapping[str, str]) -> list[dict[str, str]]:
        user = self.user.format(**fields)
        return ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": user}
        ]

    def parse(self, text: str) -> dict[str, Any]:
        """{"pred": "yes"|"no"|None, "score": float}; JudgeReplyError when the reply cannot be read."""
        if self.reply == "pred_score":
            return parse_judge_reply(text)
        if self.reply == "score":
            return {"pred": None, "score": parse_score_reply(text)}
        if self.reply == "pair":
            first, second = parse_pair_reply(text)
            return {"pred": None, "score": second, "reference_score": first}
        if self.reply == "fraction":
            return {"pred": None, "score": parse_fraction_reply(text)}
        raise ValueError(f"unknown reply kind {self.reply!r}")


VIDEO_QA = JudgePrompt("video-qa", JUDGE_SYSTEM, JUDGE_USER, "pred_score")

_AXIS_SYSTEM = (
    "You judge answers that an AI model gave to questions about videos, on one aspect only: {aspect}. "
    "You are given the question, a correct answer written by a person, and the model's answer.\n"
    "Guidelines:\n{rules}"
)
_AXIS_USER = (
    "Judge this video question and answer:\n\n"
    "Question: {{question}}\n"
    "Correct Answer: {{answer}}\n"
    "Predicted Answer: {{prediction}}\n\n"
    "Give only a {aspect} score, an integer from 0 to 5 where 5 is best, as a Python dictionary "
    "string with the single key 'score' and an INTEGER value, for instance {{{{'score': 3}}}}. "
    "Write nothing else."
)


def _axis(name: str, aspect: str, rules: str) -> JudgePrompt:
    return JudgePrompt(
        name, _AXIS_SYSTEM.format(aspect=aspect, rules=rules), _AXIS_USER.format(aspect=aspect), "score"
    )


VIDEOCHATGPT_AXES: dict[str, JudgePrompt] = {
    "correctness": _axis(
        "videochatgpt-correctness",
        "factual accuracy",
        "- Does the predicted answer agree with the video's content as the correct answer gives it?\n"
        "- Claims that contradict the correct answer, or are unsupported by it, lower the score.\n"
        "- Different wording with the same meaning is fine.",
    ),
    "detail": _axis(
        "videochatgpt-detail",
        "detail orientation",
        "- Does the predicted answer cover every part of the question, as fully as the correct answer?\n"
        "- Specific details score higher than general statements.\n"
        "- Different wording with the same meaning is fine.",
    ),
    "context": _axis(
        "videochatgpt-context",
        "contextual understanding",
        "- Does the predicted answer fit the overall context of the video as the correct answer shows it?\n"
        "- Answers that ignore or misread the setting, or go off topic, score lower.",
    ),
    "temporal": _axis(
        "videochatgpt-temporal",
        "temporal understanding",
        "- Does the predicted answer give the events in the right order, and their timing, as the "
        "correct answer does?\n"
        "- Wrong or missing order of events lowers the score.",
    ),
}
VIDEOCHATGPT_CONSISTENCY = JudgePrompt(
    "videochatgpt-consistency",
    "You judge whether an AI model answers consistently about a video. It was asked two differently "
    "worded questions with the same meaning; a person wrote the correct answer to both.\n"
    "Guidelines:\n"
    "- Both predicted answers should agree with the correct answer and with each other.\n"
    "- Answers that contradict each other, or the correct answer, score low.",
    "Judge these two answers about one video:\n\n"
    "Question 1: {question}\n"
    "Question 2: {question2}\n"
    "Correct Answer: {answer}\n"
    "Predicted Answer to Question 1: {prediction}\n"
    "Predicted Answer to Question 2: {prediction2}\n\n"
    "Give only a consistency score, an integer from 0 to 5 where 5 is best, as a Python dictionary "
    "string with the single key 'score' and an INTEGER value, for instance {{'score': 3}}. "
    "Write nothing else.",
    "score",
)

LLAVA_BENCH = JudgePrompt(
    "llava-bench",
    "You review answers to questions about an image with care and without bias.",
    "[Context]\n{context}\n\n[Question]\n{question}\n\n"
    "[Assistant 1]\n{answer}\n[End of Assistant 1]\n\n"
    "[Assistant 2]\n{prediction}\n[End of Assistant 2]\n\n"
    "[System]\nYou cannot see the image; the context above describes it. Rate how helpful, relevant, "
    "accurate and detailed each assistant's answer is, each on a scale from 1 to 10 where higher is "
    "better. On the first line write only the two scores, Assistant 1's then Assistant 2's, separated "
    "by a space. Then explain your rating, without letting the order of the answers sway you.",
    "pair",
)

MM_VET = JudgePrompt(
    "mm-vet",
    "",
    "Compare the ground truth with a prediction from an AI model and rate the prediction's "
    "correctness from 0.0 (wrong) to 1.0 (fully right). <AND> in the ground truth means every part "
    "is needed, <OR> that any part is enough. A partly right prediction gets a value in between.\n\n"
    "Question | Ground truth | Prediction | Correctness\n"
    "--- | --- | --- | ---\n"
    "What is x in the equation? | -1 <AND> -5 | x = 3 | 0.0\n"
    "What is x in the equation? | -1 <AND> -5 | x = -1 | 0.5\n"
    "What is x in the equation? | -1 <AND> -5 | x = -5 or x = -1 | 1.0\n"
    "Can you explain this meme? | It jokes that people put off work they should do. | "
    "The meme shows a person who delays work until late at night. | 0.6\n"
    "{question} | {answer} | {prediction} | ",
    "fraction",
)

PROMPTS: dict[str, JudgePrompt] = {
    p.name: p for p in (VIDEO_QA, *VIDEOCHATGPT_AXES.values(), VIDEOCHATGPT_CONSISTENCY, LLAVA_BENCH, MM_VET)
}


def _fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def load_prompts(path: Path) -> dict[str, JudgePrompt]:
    """Prompt texts that replace the built-in ones by name, from {name: {"system", "user"}} JSON.

    For judging with a benchmark's own published wording (LLaVA-Bench's rules, MM-Vet's examples,
    Video-ChatGPT's axis prompts) without it living in this package. The reply format stays the
    built-in prompt's, and the user text may use only the fields the built-in one fills.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise VideoLlavaError(f"--judge-prompts {path}: cannot read it as JSON ({error})") from None
    if not isinstance(data, dict):
        raise VideoLlavaError(f'--judge-prompts {path}: expected {{name: {{"system", "user"}}}}')
    prompts = {}
    for name, texts in data.items():
        if name not in PROMPTS:
            raise VideoLlavaError(
                f"--judge-prompts {path}: unknown prompt {name!r}; the prompts are {', '.join(PROMPTS)}"
            )
        if not isinstance(texts, dict) or not isinstance(texts.get("user"), str):
            raise VideoLlavaError(f'--judge-prompts {path}: {name} needs a "user" text')
        base = PROMPTS[name]
        extra = _fields(texts["user"]) - _fields(base.user)
        if extra:
            raise VideoLlavaError(
                f"--judge-prompts {path}: {name} uses {sorted(extra)}; it may use {sorted(_fields(base.user))}"
                " (double other braces: {{ }})"
            )
        prompts[name] = JudgePrompt(name, str(texts.get("system", "")), texts["user"], base.reply)
    return prompts


# ------------------------------------------------------------------------------------------ replies

_NUMBER = r"(-?\d+(?:\.\d+)?)"


def _literal_dicts(text: str) -> list[dict[str, Any]]:
    found = []
    for match in re.finditer(r"\{[^{}]*\}", text):
        try:
            value = ast.literal_eval(match.group(0))
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            try:
                value = json.loads(match.group(0))
            except json.JSONDecodeError:
                continue
        if isinstance(value, dict):
            found.append(value)
    return found


def parse_score_reply(text: str) -> float:
    """{'score': N} (Python or JSON, N may have decimals, 0..5), or `score: N` in a brace-less reply."""
    for value in _literal_dicts(text):
        if "score" in value:
            return _check_score(value["score"], text, 5)
    match = re.search(r"['\"]?score['\"]?\s*[:=]\s*['\"]?" + _NUMBER, text, re.IGNORECASE)
    if match:
        return _check_score(match.group(1), text, 5)
    raise JudgeReplyError(f"no {{'score': ...}} in judge reply: {text!r}")


def parse_pair_reply(text: str) -> tuple[float, float]:
    """Two scores (1..10) on the first non-blank line: the reference answer's, then the prediction's."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    numbers = re.findall(_NUMBER, first.replace(",", " "))
    if len(numbers) != 2:
        raise JudgeReplyError(f"judge reply does not start with two scores: {text!r}")
    return _check_score(numbers[0], text, 10), _check_score(numbers[1], text, 10)


def parse_fraction_reply(text: str) -> float:
    """The first number of the reply, which must lie in [0, 1]."""
    match = re.search(_NUMBER, text)
    if not match:
        raise JudgeReplyError(f"no score in judge reply: {text!r}")
    return _check_score(match.group(1), text, 1)


def _check_score(value: Any, text: str, top: float) -> float:
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise JudgeReplyError(f"judge reply has a non-numeric score {value!r}: {text!r}") from None
    if not 0 <= score <= top:
        raise JudgeReplyError(f"judge reply has score {score:g} outside 0..{top:g}: {text!r}")
    return score


# ------------------------------------------------------------------------------------------ cache


def cache_key(model: str, prompt: JudgePrompt, fields: Mapping[str, str]) -> str:
    """(judge model, prompt hash, every text judged) as one digest."""
    text = json.dumps([model, prompt.hash, sorted(fields.items())], ensure_ascii=False)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


class JudgeCache:
    """Verdicts on disk, one JSON line each, appended and synced as they arrive.

    Several processes (shards) may share one file: each line goes out in a single write to a file
    opened for appending. A torn last line (a process killed mid-write) is skipped when reading.
    """

    def __init__(self, path: Path | None):
        self.path = path
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, Any]] = {}
        if path is not None and path.exists():
            with path.open(encoding="utf-8", errors="replace") as handle:
                for line in handle:
                    try:
                        entry = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(entry, dict) and isinstance(entry.get("key"), str):
                        self._entries[entry["key"]] = entry

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            return self._entries.get(key)

    def put(self, key: str, entry: dict[str, Any]) -> None:
        entry = {"key": key} | entry
        with self._lock:
            self._entries[key] = entry
            if self.path is None:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            data = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)


def default_cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "videollava" / "judge-cache.jsonl"


# ------------------------------------------------------------------------------------------ judges


class Judge(Protocol):
    model: str
    url: str | None
    calls: int
    overrides: dict[str, JudgePrompt]

    def verdict(self, prompt: JudgePrompt, fields: Mapping[str, str]) -> dict[str, Any]:
        """{"pred", "score", "raw", "attempts", "malformed", "cached"}; raises JudgeError when unreachable."""
        ...


class ExactJudge:
    """An offline stand-in: the normalised answer equals, or is contained in, the normalised prediction.

    "yes" scores 5 (1 for fractions, 10 for pairs), "no" 0. Results say that this judge was used.
    """

    model = "exact"
    url = None
    calls = 0
    overrides: dict[str, JudgePrompt] = {}

    def verdict(self, prompt: JudgePrompt, fields: Mapping[str, str]) -> dict[str, Any]:
        answer = normalize_answer(str(fields.get("answer", "")))
        predictions = [fields[k] for k in ("prediction", "prediction2") if k in fields]
        hit = bool(answer) and all(f" {answer} " in f" {normalize_answer(str(p))} " for p in predictions)
        top = {"pair": 10.0, "fraction": 1.0}.get(prompt.reply, 5.0)
        score = top if hit else 0.0
        verdict = {"pred": None, "score": score}
        if prompt.reply == "pred_score":
            verdict["pred"] = "yes" if hit else "no"
        if prompt.reply == "pair":
            verdict["reference_score"] = top
        raw = f"exact match: {'yes' if hit else 'no'}"
        return verdict | {"raw": raw, "attempts": 0, "malformed": False, "cached": False}


class HTTPJudge:
    """Any OpenAI-compatible chat endpoint (`videollava serve` included), with retries and the cache.

    Transport failures (connection errors, 429 and 5xx answers) are retried up to `http_attempts`
    times with exponential back-off; readable replies are cached; a reply that cannot be read is
    asked again up to `reply_attempts` times in all, and if it stays unreadable the verdict is
    returned as malformed with every raw reply (and not cached, so a later run asks again).
    """

    def __init__(
        self,
        url: str,
        model: str,
        api_key: str | None = None,
        cache: JudgeCache | None = None,
        reply_attempts: int = 3,
        http_attempts: int = 5,
        backoff: float = 1.0,
        timeout: float = 120.0,
        temperature: float = 0.0,
        max_tokens: int = 512,
        sleep: Callable[[float], None] = time.sleep,
    ):
        import httpx

        self.url = url.rstrip("/")
        self.endpoint = self.url if self.url.endswith("/chat/completions") else self.url + "/chat/completions"
        self.model = model
        self.cache = cache or JudgeCache(None)
        self.reply_attempts = max(1, reply_attempts)
        self.http_attempts = max(1, http_attempts)
        self.backoff = backoff
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.sleep = sleep
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(timeout=timeout, headers=headers)
        self._count_lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}
        self.overrides: dict[str, JudgePrompt] = {}  # prompt texts given by --judge-prompts
        self.calls = 0

    def close(self) -> None:
        self._client.close()

    def verdict(self, prompt: JudgePrompt, fields: Mapping[str, str]) -> dict[str, Any]:
        prompt = self.overrides.get(prompt.name, prompt)
        key = cache_key(self.model, prompt, fields)
        # Two workers judging the same texts at once ask once: the second waits and reads the cache.
        with self._count_lock:
            lock = self._key_locks.setdefault(key, threading.Lock())
        with lock:
            return self._verdict(key, prompt, fields)

    def _verdict(self, key: str, prompt: JudgePrompt, fields: Mapping[str, str]) -> dict[str, Any]:
        cached = self.cache.get(key)
        if cached is not None:
            return dict(cached["verdict"]) | {
                "raw": cached["raw"],
                "attempts": 0,
                "malformed": False,
                "cached": True,
            }
        messages = prompt.messages(fields)
        raws: list[str] = []
        for attempt in range(self.reply_attempts):
            if attempt:
                self.sleep(self.backoff * 2 ** (attempt - 1))
            raw = self._ask(messages)
            raws.append(raw)
            try:
                parsed = prompt.parse(raw)
            except JudgeReplyError:
                continue
            self.cache.put(
                key,
                {
                    "model": self.model,
                    "prompt": prompt.name,
                    "prompt_hash": prompt.hash,
                    "raw": raw,
                    "verdict": parsed,
                },
            )
            return parsed | {"raw": raw, "attempts": attempt + 1, "malformed": False, "cached": False}
        return {
            "pred": None,
            "score": None,
            "raw": raws[-1],
            "raw_attempts": raws,
            "attempts": len(raws),
            "malformed": True,
            "cached": False,
        }

    def _ask(self, messages: list[dict[str, str]]) -> str:
        import httpx

        body = {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        problem = ""
        for attempt in range(self.http_attempts):
            if attempt:
                self.sleep(self.backoff * 2 ** (attempt - 1))
            with self._count_lock:
                self.calls += 1
            try:
                response = self._client.post(self.endpoint, json=body)
            except httpx.HTTPError as error:
                problem = f"{type(error).__name__}: {error}"
                continue
            if response.status_code == 429 or response.status_code >= 500:
                problem = f"HTTP {response.status_code}: {response.text[:200]}"
                continue
            if response.status_code != 200:
                raise JudgeError(
                    f"judge {self.endpoint} refused the request: HTTP {response.status_code}: {response.text[:300]}"
                )
            try:
                content = response.json()["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                problem = f"an answer without choices[0].message.content: {response.text[:200]}"
                continue
            return content if isinstance(content, str) else json.dumps(content)
        raise JudgeError(f"judge {self.endpoint} failed {self.http_attempts} times; last: {problem}")


def make_judge(
    kind: str | None,
    url: str | None,
    model: str | None,
    key_env: str | None,
    cache_path: Path | None,
    prompts_file: Path | None = None,
    **options: Any,
) -> Judge | None:
    """The judge the command line asks for: "exact", an HTTP endpoint, or None."""
    judge = _make_judge(kind, url, model, key_env, cache_path, **options)
    if judge is not None and prompts_file is not None:
        judge.overrides = load_prompts(prompts_file)
    return judge


def _make_judge(
    kind: str | None,
    url: str | None,
    model: str | None,
    key_env: str | None,
    cache_path: Path | None,
    **options: Any,
) -> Judge | None:
    if kind == "exact":
        if url:
            raise VideoLlavaError("--judge exact takes no --judge-url")
        return ExactJudge()
    if kind not in (None, "http"):
        raise VideoLlavaError(f"--judge must be 'exact' or 'http', got {kind!r}")
    if url is None:
        if model is not None:
            raise VideoLlavaError("--judge-model needs --judge-url")
        return None
    if not model:
        raise VideoLlavaError("--judge-url needs --judge-model (the judge's name is part of every result)")
    api_key = None
    if key_env:
        api_key = os.environ.get(key_env)
        if not api_key:
            raise VideoLlavaError(f"--judge-key-env {key_env}: that environment variable is not set")
    return HTTPJudge(url, model, api_key, JudgeCache(cache_path), **options)
