"""Visual-token budgets on a request's path: the pipeline, the caches, the engine, long videos, the
CLI (`--visual-tokens`), the server's `visual_tokens` field, and a stage-2 recipe trained compressed.

The tiny -hf checkpoint has 16 patches per frame and takes 8 frames per video: 8 x 17 rows
uncompressed, 8 x (K + 1) with a budget K; an image gives 16 rows, or K.
"""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import httpx
import openai
import pytest
import torch

from tests.test_serve_api import running_server
from videollava.cli import main
from videollava.errors import MediaError, PromptError, VideoLlavaError
from videollava.infer.engine import Engine
from videollava.infer.pipeline import Pipeline
from videollava.infer.request import MediaItem
from videollava.infer.sampling import SamplingParams
from videollava.serve.api import ServeSettings, create_app
from videollava.serve.media import MediaPolicy
from videollava.testing import serve_subprocess, write_moving_square_video

PATCHES = 16
FRAMES = 8
MODEL = "tiny-videollava"


@pytest.fixture(scope="module")
def pipeline(hf_checkpoint) -> Pipeline:
    return Pipeline.from_pretrained(hf_checkpoint[0], dtype="float32")


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    from PIL import Image

    root = tmp_path_factory.mktemp("compress-media")
    image = Image.new("RGB", (72, 56))
    image.putdata([((x * 7) % 256, (y * 5) % 256, (x * y) % 256) for y in range(56) for x in range(72)])
    image.save(root / "pattern.png")
    write_moving_square_video(root / "square.mp4", 96, 64, 64)  # 64 frames: enough for the longest
    write_moving_square_video(root / "other.mp4", 64, 64, 12)
    return {
        "root": root,
        "image": root / "pattern.png",
        "video": root / "square.mp4",
        "other": root / "other.mp4",
    }


def video_request(pipeline: Pipeline, video: Path, question: str = "What moves?", **options):
    prompt = pipeline.build_prompt(question, 0, 1)
    return pipeline.prepare(prompt, [MediaItem("video", str(video))], **options)


# --------------------------------------------------------------------------------------------
# pipeline and caches


def test_the_budget_sets_the_rows_and_a_covering_one_changes_nothing(pipeline: Pipeline, media) -> None:
    full = video_request(pipeline, media["video"])
    assert full.visual_tokens == FRAMES * (PATCHES + 1) and full.kept_patches == PATCHES
    for budget in (PATCHES, 99):
        same = video_request(pipeline, media["video"], visual_tokens=budget)
        assert same.visual_tokens == full.visual_tokens and same.prefix_key == full.prefix_key
        assert torch.equal(same.features[0], full.features[0])
    three = video_request(pipeline, media["video"], visual_tokens=3)
    assert three.visual_tokens == FRAMES * 4 and three.kept_patches == 3
    assert three.prompt_tokens == full.prompt_tokens - FRAMES * (PATCHES - 3)
    prompt = pipeline.build_prompt("What is it?", 1, 0)
    image = pipeline.prepare(prompt, [MediaItem("image", str(media["image"]))], visual_tokens=5)
    assert image.visual_tokens == 5 and image.features[0].shape[0] == 5
    for bad in (0, -1, True, 2.5, "3"):
        with pytest.raises(PromptError, match="visual_tokens must be a whole number of at least 1"):
            video_request(pipeline, media["video"], visual_tokens=bad)
    with pytest.raises(PromptError, match="visual_tokens must be"):
        Pipeline(pipeline.model, pipeline.tokenizer, pipeline.transform, visual_tokens=0)


def test_the_feature_and_prefix_caches_never_mix_budgets(hf_checkpoint, media) -> None:
    pipeline = Pipeline.from_pretrained(hf_checkpoint[0], dtype="float32")
    cache = pipeline.feature_cache
    full = video_request(pipeline, media["other"])
    assert (cache.hits, cache.misses) == (0, 1)
    four = video_request(pipeline, media["other"], visual_tokens=4)
    assert (cache.hits, cache.misses) == (0, 2)  # a budget is a different entry
    eight = video_request(pipeline, media["other"], visual_tokens=8)
    assert (cache.hits, cache.misses) == (0, 3)
    again = video_request(pipeline, media["other"], visual_tokens=4)
    assert (cache.hits, cache.misses) == (1, 3) and torch.equal(again.features[0], four.features[0])
    video_request(pipeline, media["other"], visual_tokens=PATCHES)  # covers every patch: the full entry
    assert (cache.hits, cache.misses) == (2, 3)
    pipeline.model.config.visual_token_layer = -1  # ranked by another block: other entries
    try:
        last = video_request(pipeline, media["other"], visual_tokens=4)
        assert (cache.hits, cache.misses) == (2, 4) and last.prefix_key != four.prefix_key
        assert video_request(pipeline, media["other"]).prefix_key == full.prefix_key  # full stays full
        assert (cache.hits, cache.misses) == (3, 4)
    finally:
        pipeline.model.config.visual_token_layer = None
    assert len({full.features[0].shape[0], four.features[0].shape[0], eight.features[0].shape[0]}) == 3
    keys = [p.prefix_key for p in (full, four, eight)]
    slot = next(i for i, k in enumerate(keys[0]) if isinstance(k, str))
    assert keys[0][:slot] == keys[1][:slot] == keys[2][:slot]
    assert len({k[slot] for k in keys}) == 3

    # The prefix cache: an uncompressed conversation never serves a compressed one past the video.
    engine = Engine.for_pipeline(pipeline)
    params = SamplingParams(max_new_tokens=3)
    first = engine.generate([full], params)[0]
    compressed = engine.generate([four], params)[0]
    assert 0 < compressed.reused_prefix_tokens <= slot  # the text before the video, no more
    repeat = engine.generate([again], params)[0]
    assert repeat.reused_prefix_tokens > slot + four.visual_tokens - 1  # its own budget's entry
    assert repeat.token_ids == compressed.token_ids
    assert first.visual_tokens == FRAMES * (PATCHES + 1) and compressed.visual_tokens == FRAMES * 5


def test_a_compressed_request_answers_the_same_alone_and_in_a_mixed_batch(hf_checkpoint, media) -> None:
    pipeline = Pipeline.from_pretrained(hf_checkpoint[0], dtype="float32")
    params = SamplingParams(max_new_tokens=8)
    target = video_request(pipeline, media["video"], "Where does the square go?", visual_tokens=3)
    others = [
        video_request(pipeline, media["video"], "Where does the square go?"),  # same, uncompressed
        video_request(pipeline, media["other"], "And this one?", visual_tokens=7),
        pipeline.prepare(
            pipeline.build_prompt("What is in the picture?", 1, 0),
            [MediaItem("image", str(media["image"]))],
            visual_tokens=2,
        ),
        pipeline.prepare(pipeline.build_prompt("Say something.", 0, 0), []),
    ]
    alone = Engine.for_pipeline(pipeline).generate([target], params)[0]
    batch = Engine.for_pipeline(pipeline, max_batch_size=8).generate([others[0], target, *others[1:]], params)
    assert batch[1].token_ids == alone.token_ids and batch[1].text == alone.text
    assert [c.visual_tokens for c in batch] == [FRAMES * 17, FRAMES * 4, FRAMES * 8, 2, 0]
    for prepared, completion in zip(others, [batch[0], *batch[2:]], strict=True):
        assert completion.token_ids == Engine.for_pipeline(pipeline).generate([prepared], params)[0].token_ids


def test_the_checkpoints_default_budget_applies_and_a_request_overrides_it(hf_checkpoint, media) -> None:
    pipeline = Pipeline.from_pretrained(hf_checkpoint[0], dtype="float32")
    pipeline.model.config.visual_tokens = 6
    assert video_request(pipeline, media["other"]).visual_tokens == FRAMES * 7
    assert video_request(pipeline, media["other"], visual_tokens=2).visual_tokens == FRAMES * 3
    assert video_request(pipeline, media["other"], visual_tokens=PATCHES).visual_tokens == FRAMES * 17
    pipeline.visual_tokens = 4  # the pipeline's own default (--visual-tokens) wins over the config's
    assert video_request(pipeline, media["other"]).visual_tokens == FRAMES * 5


# --------------------------------------------------------------------------------------------
# long videos


@pytest.mark.parametrize(("frames", "fits_full"), [(16, True), (32, False), (64, False)])
def test_long_videos_fit_the_context_through_compression(pipeline: Pipeline, media, frames, fits_full):
    context = pipeline.model.max_context  # 512
    missing = MediaItem("video", str(media["root"] / "absent.mp4"))
    prompt = pipeline.build_prompt("What moves?", 0, 1)
    if not fits_full:
        needed = frames * (PATCHES + 1)
        # Refused before any decoding: the file does not exist, yet the error is about the context.
        with pytest.raises(PromptError, match=rf"need {needed} visual tokens .* context holds {context}"):
            pipeline.prepare(prompt, [missing], num_frames=frames)
    budget = min(context // frames - 2, PATCHES // 4)  # a quarter of the patches, and room for the text
    with pytest.raises(MediaError):  # the budget fits: the check passes and the reader runs
        pipeline.prepare(prompt, [missing], num_frames=frames, visual_tokens=budget)
    prepared = video_request(pipeline, media["video"], num_frames=frames, visual_tokens=budget)
    assert prepared.visual_tokens == frames * (budget + 1) and prepared.prompt_tokens < context
    completion = Engine.for_pipeline(pipeline).generate([prepared], SamplingParams(max_new_tokens=4))[0]
    assert completion.error is None and completion.visual_tokens == frames * (budget + 1)


def test_text_and_visual_tokens_that_together_overflow_say_so(pipeline: Pipeline, media) -> None:
    prompt = pipeline.build_prompt("Which way? " * 40, 0, 1)
    missing = MediaItem("video", str(media["root"] / "absent.mp4"))
    with pytest.raises(PromptError, match=r"prompt would be \d+ tokens long \(\d+ of text .* holds 512"):
        pipeline.prepare(prompt, [missing], num_frames=24)


# --------------------------------------------------------------------------------------------
# the CLI


def ask(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(["ask", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_ask_visual_tokens_and_its_json(hf_checkpoint, media, capsys) -> None:
    base = ["--model", str(hf_checkpoint[0]), "--dtype", "float32", "--max-new-tokens", "4", "--json"]
    video = ["--video", str(media["video"]), "What moves?"]
    code, out, _ = ask([*base, "--visual-tokens", "3", *video], capsys)
    assert code == 0
    result = json.loads(out)
    assert result["visual_tokens"] == FRAMES * 4 and result["visual_tokens_per_frame"] == 3
    pipeline = Pipeline.from_pretrained(hf_checkpoint[0], dtype="float32")
    expected = Engine.for_pipeline(pipeline).generate(
        [video_request(pipeline, media["video"], visual_tokens=3)], SamplingParams(max_new_tokens=4)
    )[0]
    assert result["token_ids"] == expected.token_ids
    _, out, _ = ask([*base, *video], capsys)
    assert json.loads(out)["visual_tokens_per_frame"] == PATCHES
    with pytest.raises(SystemExit) as exit_info:
        main(["ask", "--visual-tokens", "0", *video])
    assert exit_info.value.code == 2 and "--visual-tokens: must be at least 1" in capsys.readouterr().err


def test_batch_ask_takes_a_default_and_a_budget_per_line(hf_checkpoint, media, tmp_path, capsys) -> None:
    lines = [
        {"id": "default", "prompt": "What moves?", "video": str(media["video"])},
        {"id": "two", "prompt": "What moves?", "video": str(media["video"]), "visual_tokens": 2},
        {"id": "bad", "prompt": "What moves?", "video": str(media["video"]), "visual_tokens": "2"},
        {"id": "image", "prompt": "What is it?", "image": str(media["image"]), "visual_tokens": 1},
    ]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    model = ["--model", str(hf_checkpoint[0]), "--dtype", "float32"]
    code, out, _ = ask(
        [*model, "--batch", str(requests), "--visual-tokens", "5", "--max-new-tokens", "3"], capsys
    )
    assert code == 0
    answers = {a["id"]: a for a in map(json.loads, out.splitlines())}
    assert answers["default"]["visual_tokens"] == FRAMES * 6
    assert answers["two"]["visual_tokens"] == FRAMES * 3 and answers["two"]["visual_tokens_per_frame"] == 2
    assert '"visual_tokens" must be a whole number of at least 1' in answers["bad"]["error"]
    assert answers["image"]["visual_tokens"] == 1


def test_chat_and_web_build_their_pipeline_with_the_budget(hf_checkpoint, media, monkeypatch, capsys) -> None:
    from videollava.serve import web

    prepared = []
    real_prepare = Pipeline.prepare

    def recording_prepare(self, *args, **kwargs):
        prepared.append(real_prepare(self, *args, **kwargs))
        return prepared[-1]

    lines = iter([f"/video {media['video']}", "What moves?"])

    def typed(prompt: str = "") -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(Pipeline, "prepare", recording_prepare)
    monkeypatch.setattr(builtins, "input", typed)
    model = ["--model", str(hf_checkpoint[0]), "--dtype", "float32"]
    assert main(["chat", *model, "--max-new-tokens", "3", "--visual-tokens", "3"]) == 0
    assert [p.visual_tokens for p in prepared] == [FRAMES * 4]

    built = {}

    def stop_after_loading(*args, **kwargs):
        built.update(kwargs)
        raise VideoLlavaError("stopped after reading the options")

    monkeypatch.setattr(web, "check_port_free", lambda host, port: None)
    monkeypatch.setattr(web.Pipeline, "from_pretrained", stop_after_loading)
    capsys.readouterr()
    assert main(["web", *model, "--visual-tokens", "7"]) == 2
    assert built["visual_tokens"] == 7 and "stopped after reading the options" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# the server


def test_the_api_field_selects_the_budget_and_is_checked(pipeline: Pipeline, media, hf_checkpoint, capsys):
    settings = ServeSettings(
        model_name=MODEL, api_key=None, media=MediaPolicy(allowed_dir=media["root"]), default_max_tokens=4
    )
    app = create_app(pipeline, settings, Engine.for_pipeline(pipeline, max_batch_size=4))
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "video_url", "video_url": {"url": "square.mp4"}},
                {"type": "text", "text": "What moves?"},
            ],
        }
    ]
    with running_server(app) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)

        def reply(**extra):
            return client.chat.completions.create(model=MODEL, messages=messages, extra_body=extra)

        assert reply().usage.model_extra["visual_tokens"] == FRAMES * 17
        three = reply(visual_tokens=3)
        assert three.usage.model_extra["visual_tokens"] == FRAMES * 4
        for bad in (0, -4, "3", 2.5, True, 2**40):
            response = httpx.post(
                f"{base}/v1/chat/completions", json={"messages": messages, "visual_tokens": bad}, timeout=60
            )
            assert response.status_code == 400, (bad, response.text)
            assert response.json()["error"]["param"] == "visual_tokens"
    # The same answer as `ask --visual-tokens 3`.
    code, out, _ = ask(
        ["--model", str(hf_checkpoint[0]), "--dtype", "float32", "--json", "--max-new-tokens", "4"]
        + ["--visual-tokens", "3", "--video", str(media["video"]), "What moves?"],
        capsys,
    )
    assert code == 0 and json.loads(out)["answer"] == three.choices[0].message.content


def test_serve_visual_tokens_is_the_default_of_requests(hf_checkpoint, media) -> None:
    arguments = [
        "--model",
        str(hf_checkpoint[0]),
        "--dtype",
        "float32",
        "--allowed-media-dir",
        str(media["root"]),
    ]
    arguments += ["--served-model-name", MODEL, "--visual-tokens", "2"]
    with serve_subprocess(arguments) as served:
        client = openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="none", max_retries=0)
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "video_url", "video_url": {"url": "other.mp4"}},
                    {"type": "text", "text": "?"},
                ],
            }
        ]
        default = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
        assert default.usage.model_extra["visual_tokens"] == FRAMES * 3
        chosen = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=2, extra_body={"visual_tokens": 5}
        )
        assert chosen.usage.model_extra["visual_tokens"] == FRAMES * 6


def test_the_default_models_temporal_tower_reads_64_frames_compressed() -> None:
    """The shipped model's video tower was trained on 8 frames: its temporal embedding is resampled to
    64, and 64 frames at its own budget (16 patches and the CLS: 1,088 rows) overflow its 1,024-token
    context unless compressed further."""
    pipeline = Pipeline.from_pretrained(dtype="float32")
    video = Path(__file__).resolve().parent.parent / "src/videollava/assets/examples/shapes-video.mp4"
    assert pipeline.model.config.temporal_frames == 8
    with pytest.raises(PromptError, match=r"need 1088 visual tokens .* context holds 1024"):
        video_request(pipeline, video, num_frames=64)
    prepared = video_request(pipeline, video, "How many objects are there?", num_frames=64, visual_tokens=9)
    assert prepared.visual_tokens == 64 * 10
    completion = Engine.for_pipeline(pipeline).generate([prepared], SamplingParams(max_new_tokens=4))[0]
    assert completion.error is None and completion.text
