"""Devices: `--device` resolution, weights loaded onto the device, and every tensor of a request
following the model's device.

No GPU is needed: with the model on the CPU and the default device set to `meta`, a factory call
that forgets `device=` makes a meta tensor, and the first operation mixing it with the model's
CPU tensors (or reading its value) fails the run.
"""

from __future__ import annotations

import pytest
import torch

from videollava.arguments import add_model_options
from videollava.errors import VideoLlavaError
from videollava.infer import engine as engine_module
from videollava.infer.engine import Engine
from videollava.infer.pipeline import Pipeline
from videollava.infer.request import MediaItem
from videollava.infer.sampling import SamplingParams
from videollava.model.bundle import load_bundle
from videollava.model.devices import resolve_device, resolve_dtype
from videollava.testing import write_flat_video


@pytest.fixture(scope="module")
def pipeline(hf_checkpoint):
    return Pipeline.from_pretrained(hf_checkpoint[0], dtype="float32", device="cpu")


@pytest.fixture()
def image(tmp_path):
    from PIL import Image

    path = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (200, 20, 20)).save(path)
    return MediaItem("image", str(path))


@pytest.fixture()
def video(tmp_path):
    return MediaItem("video", str(write_flat_video(tmp_path / "flat.mp4", 32, 32, 8)))


def _conversation(pipeline, image, video):
    """Two media kinds, a batch of two, and a follow-up served from the prefix cache."""
    engine = Engine.for_pipeline(pipeline)
    params = SamplingParams(max_new_tokens=5)
    first = engine.generate(
        [pipeline.prepare(pipeline.build_prompt("What colour is it?", 1, 0), [image])], params
    )[0]
    both = [pipeline.prepare(pipeline.build_prompt(q, 0, 1), [video]) for q in ("What moves?", "Which way?")]
    batch = engine.generate(both, params)
    history = [("user", "<image>\nWhat colour is it?"), ("assistant", first.text.strip())]
    # the image placeholder stands in the history, so the media list still holds the image
    follow = pipeline.prepare(pipeline.build_prompt("And its shape?", 0, 0, history), [image])
    again = engine.generate([follow], params)[0]
    return [first.token_ids, *(b.token_ids for b in batch), again.token_ids], again.reused_prefix_tokens


def test_every_request_tensor_follows_the_model_device(pipeline, image, video):
    expected, _ = _conversation(pipeline, image, video)
    assert all(len(ids) > 1 for ids in expected)  # every answer went through decode steps
    pipeline.feature_cache = type(pipeline.feature_cache)()  # encode the media again, under meta
    with torch.device("meta"):
        got, reused = _conversation(pipeline, image, video)
    assert got == expected
    assert reused > 0  # the follow-up really went through the prefix cache


class _ForgetfulTorch:
    """`torch` as the engine sees it, with `tensor` rewritten carelessly (the device left out)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def tensor(data, dtype=None, device=None):
        return torch.tensor(data, dtype=dtype)


def test_a_factory_call_without_device_is_caught(pipeline, image, monkeypatch):
    """The check above is not vacuous: a planted factory call without `device=` fails it."""
    monkeypatch.setattr(engine_module, "torch", _ForgetfulTorch())
    engine = Engine.for_pipeline(pipeline)
    prepared = pipeline.prepare(pipeline.build_prompt("What colour is it?", 1, 0), [image])
    params = SamplingParams(max_new_tokens=4)
    # On the CPU default the planted call is harmless, and decode steps (where it sits) ran ...
    result = engine.generate([prepared], params)[0]
    assert result.finish_reason in ("stop", "length") and len(result.token_ids) > 1
    # ... under the meta default it is found.
    with torch.device("meta"):
        result = engine.generate([prepared], params)[0]
    assert result.finish_reason == "error"
    assert "meta" in result.error


def test_weights_load_onto_the_asked_device(hf_checkpoint):
    bundle = load_bundle(hf_checkpoint[0], torch.float32, device="meta")
    tensors = [*bundle.model.parameters(), *bundle.model.buffers()]
    assert tensors and all(t.device.type == "meta" for t in tensors)


def test_auto_device_is_the_cpu_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_device_is_the_first_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(VideoLlavaError, match=r"'cuda:2' was asked for, but this machine has 2"):
        resolve_device("cuda:2")


def test_missing_gpu_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(VideoLlavaError, match=r"'cuda' was asked for, but no CUDA device is available"):
        resolve_device("cuda")
    with pytest.raises(VideoLlavaError, match=r"unknown device 'gpu'"):
        resolve_device("gpu")
    with pytest.raises(VideoLlavaError, match=r"unsupported device 'meta'"):
        resolve_device("meta")


@pytest.mark.parametrize("supported, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_on_a_gpu_follows_its_bf16_support(monkeypatch, supported, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: supported)
    assert resolve_dtype("auto", torch.device("cuda", 0)) == expected
    assert resolve_dtype("float32", torch.device("cuda", 0)) == torch.float32


def test_every_model_command_takes_a_device():
    import argparse

    parser = argparse.ArgumentParser()
    add_model_options(parser)
    assert parser.parse_args([]).device == "auto"
    assert parser.parse_args(["--device", "cuda:1"]).device == "cuda:1"


def test_cli_refuses_a_missing_gpu_in_one_line(capsys):
    from videollava.cli import main

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code = main(["ask", "--device", "cuda:0", "hello"])
    err = capsys.readouterr().err
    assert code != 0
    assert "'cuda:0' was asked for, but no CUDA device is available" in err
    assert "Traceback" not in err
