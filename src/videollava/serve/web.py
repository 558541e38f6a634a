"""`videollava web`: a Gradio page to chat about an uploaded image or video, with streamed answers.

Media put in the upload boxes join the conversation with the next question, as in the terminal chat;
every browser session keeps its own conversation, and all of them share one running engine.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from videollava.arguments import add_model_options, add_visual_tokens_option, positive_int
from videollava.data.conversation import ChatHistory
from videollava.errors import PromptError, VideoLlavaError
from videollava.extras import require
from videollava.infer.engine import Engine
from videollava.infer.pipeline import Pipeline, content_hash
from videollava.infer.request import MediaItem
from videollava.infer.sampling import SamplingParams
from videollava.serve.ports import add_address_options, claim_port

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}
VIDEO_SUFFIXES = {".mp4", ".webm", ".mkv", ".avi", ".mov"}
# System fonts only: the page must not reach out to font servers.
_SANS = ["ui-sans-serif", "system-ui", "Helvetica", "Arial", "sans-serif"]
_MONO = ["ui-monospace", "Consolas", "monospace"]


def examples_folder() -> Path:
    return Path(__file__).resolve().parent.parent / "assets" / "examples"


def find_examples(folder: Path | None = None) -> tuple[list[str], list[str]]:
    """Bundled example images and videos, if the package ships any."""
    folder = folder or examples_folder()
    if not folder.is_dir():
        return [], []
    files = sorted(p for p in folder.iterdir() if p.is_file())
    images = [str(p) for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    videos = [str(p) for p in files if p.suffix.lower() in VIDEO_SUFFIXES]
    return images, videos


@dataclass
class PageConversation:
    """One browser session's conversation, and the uploads it has shown (by kind and content), so a file
    left in its box is shown once however many questions follow."""

    history: ChatHistory[MediaItem]
    shown: frozenset[str] = frozenset()


def respond(
    pipeline: Pipeline,
    engine: Engine,
    question: str | None,
    image_path: str | None,
    video_path: str | None,
    temperature: float,
    max_tokens: float,
    messages: list[dict[str, str]] | None,
    conversation: PageConversation | None,
) -> Iterator[tuple[str, list[dict[str, str]], PageConversation]]:
    """One question of a page's conversation: yields (question box, chat messages, conversation) as the
    answer streams. Uploads not yet shown join the conversation; the turn is kept once it completed."""
    conversation = conversation or PageConversation(ChatHistory(pipeline.template))
    question = (question or "").strip()
    if not question:
        raise PromptError("Type a question first.")
    messages = list(messages or [])
    new: list[MediaItem] = []
    keys: set[str] = set()
    for kind, path in (("image", image_path), ("video", video_path)):
        if not path:
            continue
        key = f"{kind}:{content_hash(path)}"
        if key not in conversation.shown:
            new.append(MediaItem(kind, path, name=Path(path).name))
            keys.add(key)
    history = conversation.history
    prompt = history.prompt(question, new)
    prepared = pipeline.prepare(prompt, history.media + new)
    params = SamplingParams(max_new_tokens=int(max_tokens), temperature=float(temperature))
    handle = engine.submit(prepared, params)
    shown = ", ".join(f"{m.kind} {m.name}" for m in new)
    messages.append({"role": "user", "content": f"{question}\n\n[{shown}]" if shown else question})
    messages.append({"role": "assistant", "content": ""})
    text = ""
    try:
        yield "", messages, conversation
        for delta in handle:
            text += delta.text
            messages[-1] = {"role": "assistant", "content": text}
            yield "", messages, conversation
    finally:
        handle.cancel()  # a no-op when finished; frees the engine when the page went away
    completion = handle.result()
    if completion.error:
        raise VideoLlavaError(f"generation failed: {completion.error}")
    messages[-1] = {"role": "assistant", "content": completion.text}
    history.add(question, new, completion.text)
    conversation.shown |= keys
    yield "", messages, conversation


def build_demo(pipeline: Pipeline, engine: Engine, max_new_tokens: int = 128, title: str = "Video-LLaVA"):
    """The Gradio Blocks app; the caller starts the engine and launches the app."""
    import gradio as gr

    def send(*inputs):
        try:
            yield from respond(pipeline, engine, *inputs)
        except VideoLlavaError as error:  # shown on the page, in the page's words
            raise gr.Error(str(error)) from None

    def clear():
        return None, None, [], None, ""

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        conversation = gr.State(None)
        gr.Markdown(
            f"## {title}\nUpload an image or a video, then ask about it. "
            "Media uploaded later join the conversation with the next question."
        )
        with gr.Row():
            with gr.Column(scale=2):
                image = gr.Image(type="filepath", label="Image", sources=["upload"], elem_id="image-input")
                video = gr.Video(label="Video", sources=["upload"], elem_id="video-input")
                image_examples, video_examples = find_examples()
                if image_examples:
                    gr.Examples([[p] for p in image_examples], inputs=[image], label="Example images")
                if video_examples:
                    gr.Examples([[p] for p in video_examples], inputs=[video], label="Example videos")
                temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="Temperature (0 = greedy)")
                max_tokens = gr.Slider(1, 1024, value=max_new_tokens, step=1, label="Max new tokens")
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(
                    label="Conversation", elem_id="chatbot", height=460, render_markdown=False
                )
                question = gr.Textbox(
                    placeholder="Ask about the image or video, then press Enter",
                    show_label=False,
                    elem_id="question",
                    lines=1,
                )
                with gr.Row():
                    send_button = gr.Button("Send", variant="primary", elem_id="send")
                    clear_button = gr.Button("Clear", elem_id="clear")
        inputs = [question, image, video, temperature, max_tokens, chatbot, conversation]
        outputs = [question, chatbot, conversation]
        send_button.click(send, inputs, outputs)
        question.submit(send, inputs, outputs)
        for event in (clear_button.click, chatbot.clear):  # the chatbot's own bin forgets the state too
            event(clear, None, [image, video, chatbot, conversation, question], queue=False)
    return demo


def theme():
    import gradio as gr

    return gr.themes.Soft(font=_SANS, font_mono=_MONO)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("web", help="a web page to chat about images and videos (Gradio)")
    add_model_options(parser)
    add_visual_tokens_option(parser)
    add_address_options(parser, default_port=7860)
    parser.add_argument(
        "--max-new-tokens", type=positive_int, default=128, help="initial value of the slider"
    )
    parser.add_argument("--max-batch-size", type=positive_int, default=8, help="answers decoded together")
    parser.add_argument("--max-upload-mb", type=float, default=64.0)
    parser.set_defaults(func=run)


# Gradio binds the port itself, after the model has loaded: this is checked first, and said again
# should another server take the port meanwhile.
BUSY_PORT = "cannot listen on {address}: {reason} (choose another --port)"


def check_port_free(host: str, port: int) -> None:
    """Fail before the model loads when nothing could listen on host:port (another server holds it)."""
    claim_port(host, port, BUSY_PORT).close()


def run(args: argparse.Namespace) -> int:
    require("web", "web", "gradio")  # before the model loads: a missing extra fails at once
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if not args.max_upload_mb > 0:
        raise VideoLlavaError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    check_port_free(args.host, args.port)
    pipeline = Pipeline.from_pretrained(
        args.model,
        dtype=args.dtype,
        device=args.device,
        visual_tokens=args.visual_tokens,
        quantize=args.quantize,
    )
    engine = Engine.for_pipeline(pipeline, max_batch_size=args.max_batch_size, max_queue=64).start()
    try:
        demo = build_demo(pipeline, engine, max_new_tokens=args.max_new_tokens)
        demo.queue(default_concurrency_limit=args.max_batch_size, max_size=64)
        try:
            demo.launch(
                server_name=args.host,
                server_port=args.port,
                share=False,
                theme=theme(),
                max_file_size=f"{args.max_upload_mb:g}mb",
                ssr_mode=False,
                show_error=True,
                quiet=True,
                allowed_paths=[str(examples_folder())] if examples_folder().is_dir() else None,
                prevent_thread_lock=True,
            )
        except OSError as error:  # the port was taken while the model loaded
            problem = error.strerror or "the port is in use"
            raise VideoLlavaError(
                BUSY_PORT.format(address=f"{args.host}:{args.port}", reason=problem)
            ) from None
        print(f"serving the chat page on http://{args.host}:{args.port}/", flush=True)
        demo.block_thread()
    finally:
        engine.stop()
    return 0
