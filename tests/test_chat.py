"""The terminal chat: a session object driven directly, and the real command driven in tmux."""

from __future__ import annotations

import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from videollava.errors import VideoLlavaError
from videollava.infer.ask import Question, prepare_question
from videollava.infer.engine import Engine
from videollava.infer.pipeline import Pipeline
from videollava.infer.request import MediaItem
from videollava.infer.sampling import SamplingParams
from videollava.serve.chat import ANSWER_PREFIX, ChatSession, handle_line


class RecordingOut(io.StringIO):
    """Remembers each write, to see that answers arrive in pieces."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


class PromptRecorder:
    """The real pipeline, remembering every prompt it prepares and the (kind, file) of the media with it."""

    def __init__(self, pipeline: Pipeline):
        self._pipeline = pipeline
        self.prepared: list[tuple[str, list[tuple[str, str]]]] = []

    def __getattr__(self, name: str):
        return getattr(self._pipeline, name)

    def prepare(self, prompt, media, *args, **kwargs):
        self.prepared.append((prompt, [(m.kind, str(m.source)) for m in media]))
        return self._pipeline.prepare(prompt, media, *args, **kwargs)


def picture(path: Path, colour: tuple[int, int, int]) -> Path:
    from PIL import Image

    Image.new("RGB", (40, 30), colour).save(path)
    return path


@pytest.fixture(scope="module")
def chat_pipeline(hf_checkpoint) -> Pipeline:
    return Pipeline.from_pretrained(hf_checkpoint[0], dtype="float32")


def test_session_streams_answers_equal_to_ask_and_reuses_the_prefix(
    chat_pipeline, sample_videos: Path
) -> None:
    params = SamplingParams(max_new_tokens=10)
    engine = Engine.for_pipeline(chat_pipeline, max_batch_size=1).start()
    out = RecordingOut()
    session = ChatSession(chat_pipeline, engine, params, out)
    try:
        clip = str(sample_videos / "bikes.mp4")
        handle_line(session, f"/video {clip}")
        assert "attached video bikes.mp4" in out.getvalue()
        first = session.ask("What happens in the video?")
        expected = Engine.for_pipeline(chat_pipeline, max_batch_size=1).generate(
            [prepare_question(chat_pipeline, Question("What happens in the video?", videos=[clip]))], params
        )[0]
        assert first.text == expected.text
        answer_writes = out.writes[out.writes.index(ANSWER_PREFIX) + 1 :]
        assert len([w for w in answer_writes if w.strip()]) > 1  # streamed, not printed at once
        assert "".join(answer_writes).startswith(expected.text)

        second = session.ask("And then?")
        history = [("user", "<video>\nWhat happens in the video?"), ("assistant", first.text.strip())]
        prompt = chat_pipeline.build_prompt("And then?", 0, 0, history=history)
        reference = Engine.for_pipeline(chat_pipeline).generate(
            [chat_pipeline.prepare(prompt, [MediaItem("video", clip)])], params
        )[0]
        assert second.text == reference.text
        assert second.reused_prefix_tokens > first.visual_tokens
        assert "reused prefix tokens" in session.stats()

        with pytest.raises(VideoLlavaError, match="no such file"):
            handle_line(session, "/image /no/such/picture.png")
        with pytest.raises(VideoLlavaError, match="unknown command"):
            handle_line(session, "/frobnicate")
        handle_line(session, "/reset")
        assert len(session.history) == 0 and session.history.media == [] and session.pending == []
        assert handle_line(session, "/quit") is False
    finally:
        engine.stop()


def three_turn_prompts(system: str, first: str, second: str, last: str) -> list[str]:
    """The prompts of a conversation under the vicuna template: "What is shown?" about a new image and
    video, answered `first`; "And then?", answered `second`; then `last`, which places its own image."""
    turn_one = f"USER: <video><image>\nWhat is shown? ASSISTANT: {first}</s>"
    turn_two = f"USER: And then? ASSISTANT: {second}</s>"
    return [
        f"{system} USER: <video><image>\nWhat is shown? ASSISTANT:",
        f"{system} {turn_one}USER: And then? ASSISTANT:",
        f"{system} {turn_one}{turn_two}USER: {last} ASSISTANT:",
    ]


@pytest.fixture(scope="module")
def vicuna_pipeline(hf_checkpoint) -> Pipeline:
    """The tiny checkpoint under a template with a system prompt, so prompts show every separator."""
    return Pipeline.from_pretrained(hf_checkpoint[0], dtype="float32", template="vicuna_v1")


def test_session_prompts_hold_the_conversation_and_its_media(
    vicuna_pipeline, sample_videos: Path, tmp_path: Path
) -> None:
    """The exact prompts the chat builds: new media as placeholders (videos first) and a newline before
    the question, unless the question places them itself; earlier turns with their stripped answers;
    every medium shown so far, in the order attached."""
    system = vicuna_pipeline.template.system
    assert system.startswith("A chat between")
    clip, image = str(sample_videos / "bikes.mp4"), str(picture(tmp_path / "red.png", (200, 30, 30)))
    recorder = PromptRecorder(vicuna_pipeline)
    engine = Engine.for_pipeline(vicuna_pipeline, max_batch_size=1).start()
    session = ChatSession(recorder, engine, SamplingParams(max_new_tokens=4), io.StringIO())
    try:
        session.attach("image", image)
        session.attach("video", clip)
        first = session.ask("What is shown?").text.strip()
        second = session.ask("And then?").text.strip()
        session.attach("image", image)
        session.ask("Is <image> the same picture?")
    finally:
        engine.stop()
    expected = three_turn_prompts(system, first, second, "Is <image> the same picture?")
    assert [prompt for prompt, _ in recorder.prepared] == expected
    shown = [("image", image), ("video", clip)]
    assert [media for _, media in recorder.prepared] == [shown, shown, [*shown, ("image", image)]]


def test_chat_command_in_tmux(hf_checkpoint, sample_videos: Path, tmp_path: Path) -> None:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (apt-get install tmux): the terminal chat cannot be driven")
    socket_name = f"videollava-test-{os.getpid()}"
    tmux = ["tmux", "-L", socket_name]
    command = " ".join(
        shlex.quote(part)
        for part in (sys.executable, "-m", "videollava", "chat", "--model", str(hf_checkpoint[0]))
        + ("--dtype", "float32", "--max-new-tokens", "8")
    )
    env = {**os.environ, "TERM": "xterm-256color"}
    subprocess.run(
        [
            *tmux,
            "new-session",
            "-d",
            "-s",
            "chat",
            "-x",
            "200",
            "-y",
            "60",
            f"{command}; echo CHAT-EXITED-$?; sleep 300",
        ],
        check=True,
        env=env,
    )

    def screen() -> str:
        return subprocess.run(
            [*tmux, "capture-pane", "-p", "-J", "-t", "chat", "-S", "-500"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    def wait_for(predicate, what: str, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = screen()
            if predicate(text):
                return text
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; the screen shows:\n{screen()}")

    def send(line: str) -> None:
        subprocess.run([*tmux, "send-keys", "-t", "chat", "-l", line], check=True)
        subprocess.run([*tmux, "send-keys", "-t", "chat", "Enter"], check=True)

    def stats_lines(text: str) -> list[re.Match]:
        return list(
            re.finditer(r"\[(\d+) tokens in [\d.]+ s, first after [\d.]+ s, reused (\d+) prefix tokens", text)
        )

    try:
        wait_for(lambda t: "you> " in t, "the prompt")
        send(f"/video {sample_videos / 'bikes.mp4'}")
        wait_for(lambda t: "attached video bikes.mp4" in t, "the video to attach")
        send("What happens in the video?")
        text = wait_for(lambda t: len(stats_lines(t)) == 1, "the first answer")
        assert ANSWER_PREFIX in text
        send("What colour is the first bike?")
        text = wait_for(lambda t: len(stats_lines(t)) == 2, "the follow-up answer")
        reused = int(stats_lines(text)[1].group(2))
        assert reused > 100, text  # the first turn, video rows included, came from the prefix cache
        send("/stats")
        wait_for(lambda t: "reused prefix tokens" in t and "feature cache" in t, "the statistics")
        send("/image /no/such/file.png")
        wait_for(lambda t: "error: /no/such/file.png: no such file" in t, "the error message")
        send("/reset")
        wait_for(lambda t: "conversation and media cleared" in t, "the reset")
        send("Hello again")
        text = wait_for(lambda t: len(stats_lines(t)) == 3, "an answer after the reset")
        assert int(stats_lines(text)[2].group(2)) < reused
        send("/quit")
        text = wait_for(lambda t: "CHAT-EXITED-" in t, "the chat to exit")
        assert "CHAT-EXITED-0" in text and "bye" in text
        (tmp_path / "chat-screen.txt").write_text(text)
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
