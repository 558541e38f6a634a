"""One request's fault (its sampling, its media, its row of the batched step) fails that request alone."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from videollava.infer.engine import Engine
from videollava.infer.pipeline import Pipeline
from videollava.infer.request import MediaItem
from videollava.infer.sampling import SamplingParams

TOKENS = 8
QUESTIONS = ["Hi?", "What colour is it?", "Say something.", "Describe."]


@pytest.fixture(scope="module")
def pipeline(hf_checkpoint):
    return Pipeline.from_pretrained(hf_checkpoint[0], dtype="float32")


@pytest.fixture(scope="module")
def normal(pipeline):
    """Four requests (three greedy, one seeded sample) and the tokens each gets when run alone."""
    prepared = [pipeline.prepare(pipeline.build_prompt(q, 0, 0), []) for q in QUESTIONS]
    params = [SamplingParams(max_new_tokens=TOKENS)] * 3 + [
        SamplingParams(max_new_tokens=TOKENS, temperature=0.7, top_p=0.9, seed=5)
    ]
    alone = [
        Engine.for_pipeline(pipeline).generate([p], s)[0].token_ids
        for p, s in zip(prepared, params, strict=True)
    ]
    assert all(len(tokens) >= 2 for tokens in alone)  # long enough to be decoding beside the hostile one
    return list(zip(prepared, params, strict=True)), alone


def _hostile(temperature: float) -> SamplingParams:
    """Valid parameters turned hostile after the door's check, the way they once reached sampling."""
    params = SamplingParams(max_new_tokens=TOKENS, temperature=1.0, seed=3)
    object.__setattr__(params, "temperature", temperature)
    return params


def _run(engine: Engine, handles) -> None:
    while not all(h.done for h in handles):
        engine.step()


def test_hostile_sampling_in_the_running_batch_fails_alone(pipeline, normal):
    """The hostile row fails in the shared decoding step; the other four finish exactly as alone."""
    requests, alone = normal
    engine = Engine.for_pipeline(pipeline, max_batch_size=5)
    params = SamplingParams(max_new_tokens=TOKENS, temperature=1.0, seed=3)
    hostile_prompt = pipeline.prepare(pipeline.build_prompt("Hostile?", 0, 0), [])
    handles = [engine.submit(*r) for r in requests[:2]]
    hostile = engine.submit(hostile_prompt, params)
    handles += [engine.submit(*r) for r in requests[2:]]
    engine.step()  # all five prefilled and decoded together once
    assert engine.running == 5
    # 1e-45 is the smallest float32: every logit divided by it overflows, as 3e-38 does a real model's.
    object.__setattr__(params, "temperature", 1e-45)
    engine.step()
    result = hostile.result(timeout=0)
    assert result.finish_reason == "error" and engine.running == 4
    assert "not finite at temperature 1e-45" in result.error
    assert result.client_error.startswith("sampling failed")
    _run(engine, handles)
    assert [h.result().token_ids for h in handles] == alone
    assert all(h.result().finish_reason in ("stop", "length") for h in handles)


def test_hostile_sampling_beside_four_concurrent_requests_in_the_engine_thread(pipeline, normal):
    requests, alone = normal
    engine = Engine.for_pipeline(pipeline, max_batch_size=5).start()
    try:
        hostile_prompt = pipeline.prepare(pipeline.build_prompt("Hostile?", 0, 0), [])
        handles = [engine.submit(*r) for r in requests[:2]]
        hostile = engine.submit(hostile_prompt, _hostile(1e-45))
        handles += [engine.submit(*r) for r in requests[2:]]
        results = [h.result(timeout=60) for h in handles]
        failed = hostile.result(timeout=60)
    finally:
        engine.stop()
    assert failed.finish_reason == "error" and "not finite" in failed.error
    assert [r.token_ids for r in results] == alone
    assert engine.stats.requests_failed == 1 and engine.stats.requests_total == 5


def test_media_that_make_the_model_produce_nan_fail_only_their_request(pipeline, normal, tmp_path):
    requests, alone = normal
    Image.new("RGB", (32, 32), "red").save(tmp_path / "red.png")
    image = MediaItem("image", str(tmp_path / "red.png"))
    poisoned = pipeline.prepare(pipeline.build_prompt("What is it?", 1, 0), [image])
    poisoned.features = [torch.full_like(f, math.nan) for f in poisoned.features]
    engine = Engine.for_pipeline(pipeline, max_batch_size=5)
    handles = [engine.submit(*r) for r in requests]
    bad = engine.submit(poisoned, SamplingParams(max_new_tokens=TOKENS))
    _run(engine, [*handles, bad])
    result = bad.result()
    assert result.finish_reason == "error" and result.token_ids == []
    assert "not finite" in result.error and result.client_error == (
        "the model produced no usable next-token scores for this request"
    )
    assert [h.result().token_ids for h in handles] == alone


def _last_layer(pipeline):
    return pipeline.model.language_model.get_decoder().layers[-1]


def test_a_fault_in_one_rows_part_of_the_batched_step_fails_that_row_alone(pipeline, normal, monkeypatch):
    """The fault strikes in the last layer, after the first ones have grown the shared cache."""
    requests, alone = normal
    engine = Engine.for_pipeline(pipeline, max_batch_size=5)
    # A long prompt: the position its first decoding step feeds (its prompt's last) is past any
    # position the four short requests reach.
    hostile_prompt = pipeline.prepare(pipeline.build_prompt("Describe. " * 20, 0, 0), [])
    first_hostile_position = len(hostile_prompt.input_ids) - 1
    assert first_hostile_position > max(len(p.input_ids) for p, _ in requests) + TOKENS
    layer = _last_layer(pipeline)
    forward = layer.forward
    decoding_steps = 0

    def faulty_for_one_row(hidden_states, *args, position_ids=None, **kwargs):
        nonlocal decoding_steps
        decoding_steps += hidden_states.shape[1] == 1
        if hidden_states.shape[1] == 1 and bool((position_ids >= first_hostile_position).any()):
            raise RuntimeError("internal detail: the kernel broke on this row")
        return forward(hidden_states, *args, position_ids=position_ids, **kwargs)

    monkeypatch.setattr(layer, "forward", faulty_for_one_row)
    handles = [engine.submit(*r) for r in requests[:2]]
    hostile = engine.submit(hostile_prompt, SamplingParams(max_new_tokens=TOKENS))
    handles += [engine.submit(*r) for r in requests[2:]]
    engine.step()  # prefilled alone (no fault), then the first batched step
    result = hostile.result(timeout=0)
    assert result.finish_reason == "error" and "kernel broke" in result.error
    assert result.client_error == "the server failed while generating this answer"  # no internal text
    assert engine.running == 4 and decoding_steps >= 2  # the batched step, then the row alone
    _run(engine, handles)
    assert [h.result().token_ids for h in handles] == alone


def test_a_step_that_fails_only_as_a_batch_fails_the_batch_and_spares_the_queue(
    pipeline, normal, monkeypatch
):
    requests, alone = normal
    engine = Engine.for_pipeline(pipeline, max_batch_size=2)
    layer = _last_layer(pipeline)
    forward = layer.forward
    broken = True

    def fails_in_any_batch(hidden_states, *args, **kwargs):
        if broken and hidden_states.shape[0] > 1:
            raise RuntimeError("out of memory")
        return forward(hidden_states, *args, **kwargs)

    monkeypatch.setattr(layer, "forward", fails_in_any_batch)
    first, second, waiting = (engine.submit(*r) for r in requests[:3])
    engine.step()
    assert first.result(timeout=0).finish_reason == "error" and "out of memory" in first.result().error
    assert second.result(timeout=0).finish_reason == "error"
    assert not waiting.done and engine.running == 0 and engine.queue_depth == 1
    broken = False
    _run(engine, [waiting])
    assert waiting.result().token_ids == alone[2]


def test_an_engine_fault_fails_the_running_batch_but_not_the_queue(pipeline, normal, monkeypatch):
    requests, alone = normal
    engine = Engine.for_pipeline(pipeline, max_batch_size=1)
    decode = engine._decode
    faults = []

    def fails_once() -> None:
        if not faults:
            faults.append(1)
            raise RuntimeError("engine bug")
        decode()

    monkeypatch.setattr(engine, "_decode", fails_once)
    engine.start()
    try:
        running, waiting = (engine.submit(*r) for r in requests[:2])
        failed = running.result(timeout=60)
        assert failed.finish_reason == "error" and "engine bug" in failed.error
        assert waiting.result(timeout=60).token_ids == alone[1]
    finally:
        engine.stop()
