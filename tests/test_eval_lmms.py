"""lmms-eval's `openai` model against `videollava serve`: requests replayed exactly as that backend
builds them (read from its source), sent with the official `openai` client as it sends them.

- `pass_video_url=True`: one `video_url` part with a `file://` URL of the absolute path, the text
  part, and `extra_body={"media_io_kwargs": {"video": {"num_frames": N}}}` (N = max_frames_num);
- by default: the video decoded on the client into `max_frames_num` frames, each sent as an
  `image_url` part holding a `data:image/png;base64,...` URL.
Both with `model` = model_version, `max_tokens` = max_new_tokens and `temperature` 0.
"""

from __future__ import annotations

import base64
import io

import openai
import pytest

from tests.test_serve_api import running_server
from videollava.infer.pipeline import Pipeline
from videollava.serve.api import ServeSettings, create_app
from videollava.serve.media import MediaPolicy
from videollava.testing import write_moving_square_video

MODEL = "videollava-under-test"


@pytest.fixture(scope="module")
def pipeline(hf_checkpoint) -> Pipeline:
    return Pipeline.from_pretrained(hf_checkpoint[0], dtype="float32")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms-media")
    return root, write_moving_square_video(root / "clip.mp4", 96, 64, 30)


def _frames_as_data_urls(path, count: int) -> list[str]:
    """What lmms-eval does without pass_video_url: decode `count` frames, PNG-encode, base64."""
    import av
    from PIL import Image

    with av.open(str(path)) as container:
        frames = [f.to_image() for f in container.decode(video=0)]
    step = (len(frames) - 1) / (count - 1)
    urls = []
    for i in range(count):
        buffer = io.BytesIO()
        frame: Image.Image = frames[round(i * step)]
        frame.save(buffer, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    return urls


def _client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="EMPTY", max_retries=0, timeout=120)


def _ask(client, content, **extra):
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=8, temperature=0, **extra
    )


def test_pass_video_url_with_media_io_kwargs(pipeline, clip):
    root, path = clip
    app = create_app(pipeline, ServeSettings(model_name=MODEL, media=MediaPolicy(allowed_dir=root)))
    question = {"type": "text", "text": "What moves in the video?"}
    video = {"type": "video_url", "video_url": {"url": f"file://{path}"}}
    per_frame = pipeline.model.config.video_tokens(1)
    with running_server(app) as base:
        client = _client(base)
        usage = {}
        for frames in (2, 4):
            reply = _ask(
                client, [video, question], extra_body={"media_io_kwargs": {"video": {"num_frames": frames}}}
            )
            assert reply.choices[0].finish_reason in ("stop", "length")
            usage[frames] = reply.usage.prompt_tokens
        # The frame count came from media_io_kwargs: two more frames, two more frames' rows.
        assert usage[4] - usage[2] == 2 * per_frame
        # num_frames and media_io_kwargs must not disagree.
        with pytest.raises(openai.BadRequestError, match="disagree"):
            _ask(
                client,
                [video, question],
                extra_body={"num_frames": 3, "media_io_kwargs": {"video": {"num_frames": 4}}},
            )
        with pytest.raises(openai.BadRequestError, match="num_frames"):
            _ask(client, [video, question], extra_body={"media_io_kwargs": {"video": {"num_frames": 0}}})


def test_decoded_frames_as_image_parts(pipeline, clip):
    _, path = clip
    question = {"type": "text", "text": "What moves in the video?"}
    frames = [{"type": "image_url", "image_url": {"url": url}} for url in _frames_as_data_urls(path, 20)]
    # A server told so reads the image parts as the frames of one video, sampled to the model's count.
    app = create_app(pipeline, ServeSettings(model_name=MODEL, image_frames_as_video=True))
    with running_server(app) as base:
        client = _client(base)
        as_video = _ask(client, [*frames, question])
        text_only = _ask(client, [question])
        expected_rows = pipeline.model.config.video_tokens(pipeline.num_frames)
        # one video's rows (and no image's), as many as the model's frames give
        assert as_video.usage.model_extra["visual_tokens"] == expected_rows
        assert text_only.usage.model_extra["visual_tokens"] == 0
        # the frame count of media_io_kwargs applies to such a video too
        four = _ask(client, [*frames, question], extra_body={"media_io_kwargs": {"video": {"num_frames": 4}}})
        assert four.usage.model_extra["visual_tokens"] == pipeline.model.config.video_tokens(4)
    # Without it, twenty images are more than a request may hold.
    app = create_app(pipeline, ServeSettings(model_name=MODEL))
    with running_server(app) as base:
        with pytest.raises(openai.BadRequestError, match="more than 16 images"):
            _ask(_client(base), [*frames, question])
