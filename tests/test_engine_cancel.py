"""Cancelling frees a request's place in the engine's limit at once, and every request finishes exactly once."""

from __future__ import annotations

import random
import threading

import pytest

from videollava.infer.engine import Engine, QueueFullError
from videollava.infer.pipeline import Pipeline
from videollava.infer.sampling import SamplingParams


@pytest.fixture(scope="module")
def pipeline(hf_checkpoint):
    return Pipeline.from_pretrained(hf_checkpoint[0], dtype="float32")


@pytest.fixture(scope="module")
def prompt(pipeline):
    return pipeline.prepare(pipeline.build_prompt("Hi?", 0, 0), [])


def _capacity(engine: Engine, prompt) -> int:
    """How many more requests a stopped engine takes now (each then cancelled again)."""
    taken = []
    try:
        while len(taken) < 1000:
            taken.append(engine.submit(prompt, SamplingParams(max_new_tokens=2)))
    except QueueFullError:
        pass
    for handle in taken:
        handle.cancel()
    return len(taken)


def test_cancelling_waiting_requests_frees_their_places_without_a_step(pipeline, prompt):
    # No loop thread: nothing runs unless stepped.
    engine = Engine.for_pipeline(pipeline, max_batch_size=1, max_queue=2)
    params = SamplingParams(max_new_tokens=2)
    handles = [engine.submit(prompt, params) for _ in range(3)]
    with pytest.raises(QueueFullError):
        engine.submit(prompt, params)
    handles[0].cancel()
    handles[2].cancel()
    # The callers hear at once, and two new requests fit at once.
    assert [h.result(timeout=0).finish_reason for h in (handles[0], handles[2])] == ["cancelled"] * 2
    assert engine.queue_depth == 1
    late = [engine.submit(prompt, params) for _ in range(2)]
    with pytest.raises(QueueFullError):
        engine.submit(prompt, params)
    while not all(h.done for h in [handles[1], *late]):
        engine.step()
    assert all(h.result().finish_reason in ("stop", "length") for h in [handles[1], *late])
    assert handles[0].result().token_ids == [] and engine.stats.requests_total == 5
    assert _capacity(engine, prompt) == 3


def test_cancelling_a_running_request_frees_its_place_before_the_next_step(pipeline, prompt):
    engine = Engine.for_pipeline(pipeline, max_batch_size=1, max_queue=0)
    running = engine.submit(prompt, SamplingParams(max_new_tokens=50))
    engine.step()
    assert engine.running == 1 and not running.done
    with pytest.raises(QueueFullError):
        engine.submit(prompt, SamplingParams(max_new_tokens=2))
    running.cancel()
    successor = engine.submit(prompt, SamplingParams(max_new_tokens=2))  # no step in between
    engine.step()  # the cancelled row leaves, the successor takes its place
    assert running.result(timeout=0).finish_reason == "cancelled"
    while not successor.done:
        engine.step()
    assert successor.result().finish_reason in ("stop", "length")
    assert _capacity(engine, prompt) == 1


def test_cancel_after_finishing_changes_nothing(pipeline, prompt):
    engine = Engine.for_pipeline(pipeline, max_batch_size=2, max_queue=2)
    handle = engine.submit(prompt, SamplingParams(max_new_tokens=3))
    while not handle.done:
        engine.step()
    finished = handle.result()
    handle.cancel()
    handle.cancel()
    assert handle.result() is finished and finished.finish_reason in ("stop", "length")
    assert engine.stats.requests_total == 1
    assert _capacity(engine, prompt) == 4  # released once, not once per cancel


def test_cancels_racing_the_engine_thread_finish_each_request_once(pipeline, prompt):
    engine = Engine.for_pipeline(pipeline, max_batch_size=4, max_queue=8).start()
    chance = random.Random(0)
    handles, timers = [], []
    try:
        for _ in range(24):
            doomed = chance.random() < 0.6  # long enough to be cancelled, whenever the cancel comes
            tokens = 400 if doomed else chance.randint(1, 6)
            try:
                handle = engine.submit(prompt, SamplingParams(max_new_tokens=tokens))
            except QueueFullError:
                continue
            handles.append(handle)
            if doomed:
                timers.append(threading.Timer(chance.random() * 0.02, handle.cancel))
                timers[-1].start()
        results = [h.result(timeout=60) for h in handles]
        for timer in timers:
            timer.join()
        for handle in handles:  # each caller's stream ends with exactly one completion
            list(handle)
            assert handle._events.empty()
    finally:
        engine.stop()
    reasons = {r.finish_reason for r in results}
    assert reasons <= {"stop", "length", "cancelled"} and "cancelled" in reasons and len(reasons) > 1
    assert engine.stats.requests_total == len(handles) and engine.queue_depth == engine.running == 0
    assert _capacity(engine, prompt) == 12
