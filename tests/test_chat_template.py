"""The Jinja chat templates render, through transformers, exactly the prompts `videollava serve` builds,
and a saved checkpoint carries its own."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from videollava.data.chat_template import chat_template
from videollava.data.conversation import ChatHistory
from videollava.serve.protocol import parse_messages


@dataclass(frozen=True)
class Item:
    kind: str


def _serve_prompt(messages: list[dict], template: str) -> str:
    """The prompt the server builds for these messages (as serve.api does with ChatHistory)."""
    system, turns = parse_messages(messages)
    history: ChatHistory[Item] = ChatHistory(template, system=system)
    for question, answer in zip(turns[:-1:2], turns[1::2], strict=True):
        history.add(question.text, [Item(kind) for kind, _ in question.media], answer.text)
    last = turns[-1]
    return history.prompt(last.text, [Item(kind) for kind, _ in last.media])


def _image(n: int = 0) -> dict:
    return {"type": "image_url", "image_url": {"url": f"file:///a{n}.png"}}


def _video(n: int = 0) -> dict:
    return {"type": "video_url", "video_url": {"url": f"file:///v{n}.mp4"}}


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


CONVERSATIONS = {
    "one video": [{"role": "user", "content": [_video(), _text("What happens?")]}],
    "string content": [{"role": "user", "content": "Hello there"}],
    "media after text, several texts": [
        {"role": "user", "content": [_text("Compare"), _image(1), _video(), _text("these."), _image(2)]}
    ],
    "own placeholders": [{"role": "user", "content": [_image(), _text("Is <image> red?")]}],
    "multi-turn, answers stripped": [
        {"role": "user", "content": [_video(), _text("Describe it.")]},
        {"role": "assistant", "content": "  A red circle moves up.\n"},
        {"role": "user", "content": [_image(), _text("And this?")]},
    ],
    "system messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": [_text("Answer in English."), _text("Really.")]},
        {"role": "user", "content": [_video(), _text("Q?")]},
    ],
    "empty system": [{"role": "system", "content": ""}, {"role": "user", "content": "Q?"}],
}


def _openai_parts(messages: list[dict]) -> list[dict]:
    """Messages as vLLM hands them to a template in its "openai" content format."""
    kinds = {"image_url": "image", "video_url": "video"}
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = [{"type": kinds[p["type"]]} if p["type"] in kinds else p for p in content]
        out.append({**message, "content": content})
    return out


@pytest.mark.parametrize("template", ["hf", "vicuna_v1", "llava_v1"])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_template_renders_the_servers_prompt(tiny_tokenizer, template, name):
    messages = CONVERSATIONS[name]
    want = tiny_tokenizer.bos_token + _serve_prompt(messages, template)
    for given in (messages, _openai_parts(messages)):
        got = tiny_tokenizer.apply_chat_template(
            given, chat_template=chat_template(template), tokenize=False, add_generation_prompt=True
        )
        assert got == want


def test_plain_template_has_no_chat_form():
    with pytest.raises(ValueError, match="plain"):
        chat_template("plain")


def test_saved_checkpoint_carries_its_template(hf_checkpoint, tmp_path):
    from transformers import AutoTokenizer

    from videollava.model.bundle import load_bundle, save_bundle

    bundle = load_bundle(hf_checkpoint[0])
    bundle.model.config.template = "llava_v1"
    save_bundle(tmp_path / "saved", bundle.model, bundle.tokenizer, bundle.transform)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert tokenizer.chat_template == chat_template("llava_v1")
    messages = CONVERSATIONS["one video"]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        tokenizer.bos_token + _serve_prompt(messages, "llava_v1")
    )
