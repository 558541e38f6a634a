"""vLLM's offline engine gives `videollava ask --dtype float32`'s greedy tokens, prompt for prompt.

Each checkpoint starts one engine (about a minute here): the one videollava saved with temporal
weights, and the -hf port's layout (no temporal weights, no chat template of its own).
"""

from __future__ import annotations

import base64
import gc

import pytest

from tests.vllm.conftest import FRAMES_TRAINED, MAX_TOKENS, ask_batch

QUESTIONS = {
    "image": {"prompt": "Describe the image briefly.", "images": ["wide"]},
    "video": {"prompt": "What happens in the video?", "videos": ["clip"]},
    "both": {"prompt": "Compare them.", "images": ["tall"], "videos": ["long"]},
    "many": {"prompt": "How many shapes are there?", "images": ["wide"], "videos": ["clip", "long"]},
    "text": {"prompt": "Yes or no?"},
}


def _request(name: str, media) -> dict:
    q = QUESTIONS[name]
    return {
        "id": name,
        "prompt": q["prompt"],
        "images": [str(media[m]) for m in q.get("images", [])],
        "videos": [str(media[m]) for m in q.get("videos", [])],
    }


@pytest.fixture(scope="module", params=["temporal", "hf"])
def served(request, tmp_path_factory, media):
    """(LLM, checkpoint, ask's answers by question) for one checkpoint."""
    from vllm import LLM

    checkpoint = request.getfixturevalue(f"{request.param}_checkpoint")
    answers = ask_batch(checkpoint, [_request(n, media) for n in QUESTIONS], tmp_path_factory.mktemp("ask"))
    llm = LLM(
        model=str(checkpoint),
        dtype="float32",
        max_model_len=1024,
        enforce_eager=True,
        max_num_seqs=8,
        limit_mm_per_prompt={"image": 2, "video": 2},
        allowed_local_media_path=str(media["clip"].parent),
        seed=0,
    )
    yield llm, checkpoint, {a["id"]: a for a in answers}
    del llm
    gc.collect()


def _vllm_prompt(name: str, media, checkpoint, frames: int | None = None) -> dict:
    """The prompt `ask` builds (the checkpoint's template) and media as our readers decode them."""
    from videollava.data.conversation import build_prompt
    from videollava.data.images import load_image
    from videollava.data.media import read_video_frames
    from videollava.model.checkpoint import config_from_hf, read_json

    config = config_from_hf(read_json(checkpoint / "config.json"), has_temporal=False)
    q = QUESTIONS[name]
    images = [load_image(media[m]) for m in q.get("images", [])]
    videos = [read_video_frames(media[m], frames or config.num_frames) for m in q.get("videos", [])]
    data = {k: v for k, v in (("image", images), ("video", videos)) if v}
    prompt = build_prompt(q["prompt"], len(images), len(videos), config.template)
    return {"prompt": prompt, "multi_modal_data": data} if data else {"prompt": prompt}


def _greedy():
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=MAX_TOKENS)


def test_image_video_and_both_match_ask(served, media):
    llm, checkpoint, answers = served
    for name in ("image", "video", "both"):
        [output] = llm.generate([_vllm_prompt(name, media, checkpoint)], _greedy(), use_tqdm=False)
        assert list(output.outputs[0].token_ids) == answers[name]["token_ids"], name
        assert len(output.prompt_token_ids) == answers[name]["prompt_tokens"], name


def test_mixed_batch_matches_ask(served, media):
    llm, checkpoint, answers = served
    names = ["many", "text", "video", "image", "both"]
    outputs = llm.generate([_vllm_prompt(n, media, checkpoint) for n in names], _greedy(), use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outputs] == [answers[n]["token_ids"] for n in names]


def test_chat_messages_match_ask(served, media):
    """OpenAI-style messages: the checkpoint's chat template (or the plugin's, for the -hf layout)
    renders ask's prompt, and a video by URL goes through our loader at the checkpoint's frame count."""
    llm, checkpoint, answers = served
    picture = base64.b64encode(media["tall"].read_bytes()).decode()
    content = [
        {"type": "video_url", "video_url": {"url": media["long"].as_uri()}},
        {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{picture}"}},
        {"type": "text", "text": QUESTIONS["both"]["prompt"]},
    ]
    [output] = llm.chat([{"role": "user", "content": content}], _greedy(), use_tqdm=False)
    assert list(output.outputs[0].token_ids) == answers["both"]["token_ids"]


def test_trained_frame_count_matches_ask(served, media, tmp_path):
    """At the temporal embedding's own row count (no resampling) too."""
    llm, checkpoint, _ = served
    [answer] = ask_batch(checkpoint, [_request("video", media)], tmp_path, frames=FRAMES_TRAINED)
    [output] = llm.generate(
        [_vllm_prompt("video", media, checkpoint, frames=FRAMES_TRAINED)], _greedy(), use_tqdm=False
    )
    assert list(output.outputs[0].token_ids) == answer["token_ids"]
