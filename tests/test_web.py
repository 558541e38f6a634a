"""The Gradio page, end to end in headless Chromium: upload a video, ask, read the streamed answer."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.test_chat import PromptRecorder, picture, three_turn_prompts
from videollava.errors import PromptError
from videollava.infer.ask import Question, prepare_question
from videollava.infer.engine import Engine
from videollava.infer.pipeline import Pipeline
from videollava.infer.request import MediaItem
from videollava.infer.sampling import SamplingParams
from videollava.serve import web
from videollava.testing import free_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MAX_TOKENS = 12


def _normal(text: str) -> str:
    return " ".join(text.split())


def ask_page(pipeline, engine, question: str, image=None, video=None, messages=None, conversation=None):
    """One question through the page's handler, as Gradio drives it: the last (messages, state) it yields."""
    updates = list(web.respond(pipeline, engine, question, image, video, 0.0, 4, messages, conversation))
    assert all(box == "" for box, _, _ in updates)  # the question box is emptied
    return updates[-1][1:]


def test_page_prompts_hold_the_conversation_and_its_media(hf_checkpoint, sample_videos, tmp_path) -> None:
    """The exact prompts the page builds: an upload joins the conversation once (placeholders first,
    videos before images, then a newline), earlier turns keep their stripped answers and media."""
    pipeline = Pipeline.from_pretrained(hf_checkpoint[0], dtype="float32", template="vicuna_v1")
    system = pipeline.template.system
    clip = str(sample_videos / "bikes.mp4")
    red, blue = (
        str(picture(tmp_path / f"{c}.png", rgb)) for c, rgb in (("red", (200, 0, 0)), ("blue", (0, 0, 200)))
    )
    recorder = PromptRecorder(pipeline)
    engine = Engine.for_pipeline(pipeline, max_batch_size=1).start()
    try:
        with pytest.raises(PromptError, match="Type a question first"):
            ask_page(recorder, engine, "  ", red, clip)
        messages, state = ask_page(recorder, engine, "What is shown?", red, clip)
        first = messages[-1]["content"].strip()
        messages, state = ask_page(recorder, engine, "And then?", red, clip, messages, state)
        second = messages[-1]["content"].strip()
        messages, state = ask_page(recorder, engine, "Is <image> darker?", blue, clip, messages, state)
    finally:
        engine.stop()
    expected = three_turn_prompts(system, first, second, "Is <image> darker?")
    assert [prompt for prompt, _ in recorder.prepared] == expected
    shown = [("image", red), ("video", clip)]
    assert [media for _, media in recorder.prepared] == [shown, shown, [*shown, ("image", blue)]]
    assert [m["content"] for m in messages if m["role"] == "user"] == [
        "What is shown?\n\n[image red.png, video bikes.mp4]",
        "And then?",
        "Is <image> darker?\n\n[image blue.png]",
    ]


def test_web_page_answers_about_an_uploaded_video(hf_checkpoint, sample_videos: Path, tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium): the page cannot be driven")
    playwright_api = pytest.importorskip(
        "playwright.sync_api", reason="the playwright package is not installed"
    )
    pytest.importorskip("gradio", reason="gradio is not installed")

    folder = hf_checkpoint[0]
    clip = sample_videos / "bikes.mp4"
    first_question, second_question = "What happens in the video?", "Who rides the bike?"
    pipeline = Pipeline.from_pretrained(folder, dtype="float32")
    params = SamplingParams(max_new_tokens=MAX_TOKENS)
    first = Engine.for_pipeline(pipeline).generate(
        [prepare_question(pipeline, Question(first_question, videos=[str(clip)]))], params
    )[0]
    history = [("user", "<video>\n" + first_question), ("assistant", first.text.strip())]
    follow_up = pipeline.prepare(
        pipeline.build_prompt(second_question, 0, 0, history=history), [MediaItem("video", str(clip))]
    )
    second = Engine.for_pipeline(pipeline).generate([follow_up], params)[0]

    port = free_port()
    command = [sys.executable, "-m", "videollava", "web", "--model", str(folder), "--dtype", "float32"]
    command += ["--port", str(port), "--max-new-tokens", str(MAX_TOKENS)]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    log = open(tmp_path / "web.log", "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    external: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, (tmp_path / "web.log").read_text()
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the web app did not come up"
            time.sleep(0.3)

        with playwright_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            page = context.new_page()

            def local_only(route) -> None:
                if route.request.url.startswith(("http://127.0.0.1", "ws://127.0.0.1", "data:", "blob:")):
                    route.continue_()
                else:
                    external.append(route.request.url)
                    route.abort()

            page.route("**/*", local_only)
            page.goto(url)
            page.wait_for_selector("#question textarea", timeout=60_000)
            page.set_input_files("#video-input input[type=file]", str(clip))
            page.wait_for_selector("#video-input video", timeout=60_000)

            def bot_messages() -> list[str]:
                return [
                    _normal(m) for m in page.locator('[data-testid="bot"] .message-content').all_inner_texts()
                ]

            def wait_for_answer(count: int, expected: str) -> str:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    shown = bot_messages()
                    if len(shown) == count and shown[-1] == _normal(expected):
                        return shown[-1]
                    time.sleep(0.2)
                return bot_messages()[-1] if bot_messages() else ""

            page.fill("#question textarea", first_question)
            page.click("#send")
            assert wait_for_answer(1, first.text) == _normal(first.text)
            page.screenshot(path=str(tmp_path / "web.png"), full_page=True)

            page.fill("#question textarea", second_question)
            page.press("#question textarea", "Enter")
            assert wait_for_answer(2, second.text) == _normal(second.text)
            page.screenshot(path=str(tmp_path / "web-follow-up.png"), full_page=True)

            page.click("#clear")
            page.wait_for_function(
                "document.querySelectorAll('[data-testid=\"bot\"]').length === 0", timeout=30_000
            )
            assert page.locator("#video-input video").count() == 0
            browser.close()
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
    assert (tmp_path / "web.png").stat().st_size > 10_000
    assert external == [], f"the page tried to reach other hosts: {external}"


def _listening_socket() -> socket.socket:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    return holder


def test_busy_port_is_one_line_before_the_model_loads(tmp_path, capsys) -> None:
    pytest.importorskip("gradio", reason="gradio is not installed")
    from videollava.cli import main

    with _listening_socket() as holder:
        port = holder.getsockname()[1]
        code = main(["web", "--port", str(port), "--model", str(tmp_path / "no-such-model")])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""  # nothing that claims the page is served
    assert (
        err == f"error: cannot listen on 127.0.0.1:{port}: Address already in use (choose another --port)\n"
    )


def test_port_taken_while_the_model_loads_is_one_line(hf_checkpoint, monkeypatch, capsys) -> None:
    """Another server takes the port after the check: Gradio's failure becomes the same one line."""
    pytest.importorskip("gradio", reason="gradio is not installed")
    from videollava.cli import main
    from videollava.serve import web

    stopped = []
    monkeypatch.setattr(web, "check_port_free", lambda host, port: None)
    stop = Engine.stop

    def recorded_stop(self):
        stopped.append(self)
        return stop(self)

    monkeypatch.setattr(Engine, "stop", recorded_stop)
    with _listening_socket() as holder:
        port = holder.getsockname()[1]
        code = main(["web", "--port", str(port), "--model", str(hf_checkpoint[0]), "--dtype", "float32"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith(f"error: cannot listen on 127.0.0.1:{port}: ") and len(err.splitlines()) == 1
    assert "Traceback" not in err and len(stopped) == 1  # the engine's thread was stopped
