"""The plugin and the multimodal processor, without starting an engine (seconds, not minutes)."""

from __future__ import annotations

import pytest
import torch

from tests.vllm.conftest import FRAMES_TRAINED

PATCHES = 16  # 56 px in 14 px patches


@pytest.fixture(scope="module")
def processor(temporal_checkpoint):
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    config = ModelConfig(model=str(temporal_checkpoint), dtype="float32", max_model_len=1024)
    return MULTIMODAL_REGISTRY.create_processor(config)


def _apply(processor, text: str, data: dict, **kwargs):
    ids = processor.info.get_tokenizer().encode(text)
    return processor(ids, processor.info.parse_mm_data(data), hf_processor_mm_kwargs=kwargs)


def test_plugin_registers_once_per_process():
    from vllm import ModelRegistry

    from videollava.vllm.plugin import ARCHITECTURE, register

    register()
    register()  # vLLM may load plugins more than once in a process
    assert ARCHITECTURE in ModelRegistry.get_supported_archs()


def test_placeholders_expand_to_feature_rows(processor, media):
    from videollava.data.images import load_image
    from videollava.data.media import read_video_frames

    config = processor.info.served.config
    frames = read_video_frames(media["clip"], 8)
    out = _apply(
        processor,
        "USER: <video><image>\nCompare. ASSISTANT:",
        {"image": load_image(media["wide"]), "video": frames},
    )
    ids = out["prompt_token_ids"]
    assert ids.count(config.image_token_id) == PATCHES
    assert ids.count(config.video_token_id) == 8 * (PATCHES + 1)
    [video] = out["mm_placeholders"]["video"]
    assert ids[video.offset : video.offset + video.length] == [config.video_token_id] * video.length
    assert processor.info.get_mm_max_tokens_per_item(1024, {"video": 1}) == {
        "image": PATCHES,
        "video": (1024 // (PATCHES + 1)) * (PATCHES + 1),
    }


def test_pixels_are_our_pipelines(processor, media):
    """Fetched bytes are sampled again at the asked count; given frames are picked the reference's way."""
    from vllm.multimodal.media import MediaWithBytes

    from videollava.data.frame_sampling import frame_indices
    from videollava.data.media import read_video_frames
    from videollava.data.transforms import preprocess_video
    from videollava.vllm.media import VideoLlavaVideoLoader

    transform = processor.info.served.transform
    data = media["long"].read_bytes()
    fetched = MediaWithBytes(VideoLlavaVideoLoader.load_bytes(data, num_frames=8), data)
    out = _apply(processor, "<video>", {"video": [fetched]}, num_frames=FRAMES_TRAINED)
    got = out["mm_kwargs"]["video"][0]["pixel_values_videos"].data
    want = preprocess_video(read_video_frames(media["long"], FRAMES_TRAINED), transform)
    assert torch.equal(got, want)

    eight = read_video_frames(media["long"], 8)
    out = _apply(processor, "<video>", {"video": eight}, num_frames=3)
    got = out["mm_kwargs"]["video"][0]["pixel_values_videos"].data
    assert torch.equal(got, preprocess_video(eight[frame_indices(8, 3)], transform))
    assert out["prompt_token_ids"].count(processor.info.served.config.video_token_id) == 3 * (PATCHES + 1)


def test_fetched_videos_default_to_our_loader_and_frame_count(processor):
    video = processor.info.ctx.model_config.multimodal_config.media_io_kwargs["video"]
    assert video["video_backend"] == "videollava"
    assert video["num_frames"] == processor.info.served.config.num_frames == 8
    assert processor.info.served.config.temporal_frames == FRAMES_TRAINED


def test_bad_frame_count_is_refused(processor, media):
    from videollava.data.media import read_video_frames

    with pytest.raises(ValueError, match="num_frames must be a positive integer"):
        _apply(processor, "<video>", {"video": read_video_frames(media["clip"], 4)}, num_frames=0)


def test_chat_templates_are_the_checkpoints(hf_checkpoint, temporal_checkpoint, tmp_path):
    """Ours carries its own; for one without, the plugin supplies the one our config names, else the -hf one."""
    import json
    import shutil

    from videollava.data.chat_template import chat_template
    from videollava.vllm.plugin import template_path_for

    assert (temporal_checkpoint / "chat_template.jinja").read_text() == chat_template("hf")
    assert template_path_for(str(hf_checkpoint)).read_text() == chat_template("hf")
    llava = tmp_path / "llava"
    shutil.copytree(temporal_checkpoint, llava)
    config = json.loads((llava / "config.json").read_text())
    config["videollava"]["template"] = "llava_v1"
    (llava / "config.json").write_text(json.dumps(config))
    assert template_path_for(str(llava)).read_text() == chat_template("llava_v1")


def test_unsupported_vllm_release_is_named(monkeypatch):
    import vllm

    from videollava.errors import VideoLlavaError
    from videollava.vllm import SUPPORTED_VLLM_TEXT, check_vllm_version

    check_vllm_version()  # the installed release is the tested one
    monkeypatch.setattr(vllm, "__version__", "0.40.1")
    with pytest.raises(VideoLlavaError, match=f"supports vLLM {SUPPORTED_VLLM_TEXT}, but vLLM 0.40.1"):
        check_vllm_version()
