"""The engine: continuous batching, streaming, caches, cancellation, back-pressure, failures."""

from __future__ import annotations

import threading

import pytest
import torch

from videollava.infer.engine import Engine, QueueFullError
from videollava.infer.pipeline import Pipeline
from videollava.infer.request import MediaItem
from videollava.infer.sampling import SamplingParams


@pytest.fixture(scope="module")
def pipeline(hf_checkpoint):
    return Pipeline.from_pretrained(hf_checkpoint[0], dtype="float32")


@pytest.fixture()
def video(sample_videos):
    return MediaItem("video", str(sample_videos / "bikes.mp4"))


def _prepare(pipeline, question, media, history=()):
    images = sum(m.kind == "image" for m in media)
    videos = sum(m.kind == "video" for m in media)
    return pipeline.prepare(pipeline.build_prompt(question, images, videos, history), media)


def test_stream_deltas_add_up_to_the_answer(pipeline, video):
    engine = Engine.for_pipeline(pipeline).start()
    try:
        handle = engine.submit(
            _prepare(pipeline, "What is moving?", [video]), SamplingParams(max_new_tokens=12)
        )
        streamed = "".join(delta.text for delta in handle)
        result = handle.result(timeout=60)
    finally:
        engine.stop()
    assert streamed == result.text
    assert result.finish_reason in ("stop", "length") and result.first_token_seconds is not None


def test_follow_up_reuses_prefix_and_matches_cold_answer(pipeline, video):
    params = SamplingParams(max_new_tokens=6)
    engine = Engine.for_pipeline(pipeline)
    first = engine.generate([_prepare(pipeline, "What is moving?", [video])], params)[0]
    history = [("user", "<video>\nWhat is moving?"), ("assistant", first.text.strip())]
    # the video placeholder stands in the history, so the media list still holds the video
    follow = pipeline.prepare(pipeline.build_prompt("And then?", 0, 0, history), [video])
    warm = engine.generate([follow], params)[0]
    cold = Engine.for_pipeline(pipeline, prefix_cache_bytes=0).generate([follow], params)[0]
    assert warm.token_ids == cold.token_ids
    assert warm.reused_prefix_tokens > 136  # at least the video's rows came from the cache
    assert cold.reused_prefix_tokens == 0
    # a second question about the same video reuses the system prompt and the video
    again = engine.generate([_prepare(pipeline, "Which way?", [video])], params)[0]
    assert again.reused_prefix_tokens >= 136


def test_cancel_frees_the_slot(pipeline, video):
    engine = Engine.for_pipeline(pipeline, max_batch_size=1, max_queue=1)
    long = engine.submit(_prepare(pipeline, "Describe.", [video]), SamplingParams(max_new_tokens=200))
    engine.step()
    queued = engine.submit(_prepare(pipeline, "Short?", []), SamplingParams(max_new_tokens=2))
    with pytest.raises(QueueFullError):
        engine.submit(_prepare(pipeline, "One more?", []), SamplingParams(max_new_tokens=2))
    queued.cancel()
    long.cancel()
    engine.step()
    assert long.result(timeout=1).finish_reason == "cancelled"
    assert queued.result(timeout=1).finish_reason == "cancelled"
    assert engine.queue_depth == 0 and engine.running == 0
    engine.submit(_prepare(pipeline, "Now?", []), SamplingParams(max_new_tokens=2))


def test_free_batch_slots_count_before_the_scheduler_fills_them(pipeline):
    """A request still waiting for a free batch slot does not use up the queue (a server race once did)."""
    engine = Engine.for_pipeline(pipeline, max_batch_size=1, max_queue=1)
    params = SamplingParams(max_new_tokens=2)
    first = engine.submit(_prepare(pipeline, "One?", []), params)
    second = engine.submit(_prepare(pipeline, "Two?", []), params)  # no step yet: both wait
    with pytest.raises(QueueFullError, match="holds 2 requests"):
        engine.submit(_prepare(pipeline, "Three?", []), params)
    while not (first.done and second.done):
        engine.step()
    assert first.result(timeout=1).finish_reason in ("stop", "length")
    assert second.result(timeout=1).finish_reason in ("stop", "length")
    third = engine.submit(_prepare(pipeline, "Three?", []), params)  # finished requests free their places
    fourth = engine.submit(_prepare(pipeline, "Four?", []), params)
    while not (third.done and fourth.done):
        engine.step()


def test_stop_strings_and_seeded_sampling(pipeline):
    prepared = _prepare(pipeline, "Say something.", [])
    engine = Engine.for_pipeline(pipeline)
    base = engine.generate([prepared], SamplingParams(max_new_tokens=10))[0]
    if len(base.text) > 3:
        cut = base.text[2:4]
        stopped = engine.generate([prepared], SamplingParams(max_new_tokens=10, stop=[cut]))[0]
        assert stopped.text == base.text[: base.text.index(cut)].rstrip()  # answers are stripped
    a = engine.generate([prepared], SamplingParams(max_new_tokens=8, temperature=1.0, seed=7))[0]
    b = engine.generate([prepared], SamplingParams(max_new_tokens=8, temperature=1.0, seed=7))[0]
    assert a.token_ids == b.token_ids


def test_continuous_batching_admits_while_running(pipeline, video):
    engine = Engine.for_pipeline(pipeline, max_batch_size=4)
    long = engine.submit(_prepare(pipeline, "Describe.", [video]), SamplingParams(max_new_tokens=40))
    for _ in range(3):
        engine.step()
    short = engine.submit(_prepare(pipeline, "Hi?", []), SamplingParams(max_new_tokens=2))
    while not short.done:
        engine.step()
    assert not long.done  # the short request finished while the long one kept running
    while not long.done:
        engine.step()
    assert len(long.result().token_ids) >= 1


def test_engine_thread_failure_fails_requests_instead_of_hanging(pipeline, monkeypatch):
    engine = Engine.for_pipeline(pipeline).start()
    try:

        def broken() -> None:
            raise RuntimeError("decoder exploded")

        monkeypatch.setattr(engine, "_decode", broken)
        handle = engine.submit(_prepare(pipeline, "Hi?", []), SamplingParams(max_new_tokens=4))
        result = handle.result(timeout=30)
        assert result.finish_reason == "error" and "decoder exploded" in result.error
    finally:
        engine.stop()


def test_many_threads_submit_concurrently(pipeline):
    engine = Engine.for_pipeline(pipeline, max_batch_size=8, max_queue=64).start()
    results: list = []
    prepared = [_prepare(pipeline, f"Question {i}?", []) for i in range(12)]

    def client(p):
        results.append(engine.submit(p, SamplingParams(max_new_tokens=3)).result(timeout=120))

    threads = [threading.Thread(target=client, args=(p,)) for p in prepared]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        engine.stop()
    assert len(results) == 12 and all(r.finish_reason in ("stop", "length") for r in results)
    alone = Engine.for_pipeline(pipeline).generate(prepared, SamplingParams(max_new_tokens=3))
    assert sorted(r.token_ids for r in results) == sorted(r.token_ids for r in alone)
    assert torch.get_num_threads() >= 1
