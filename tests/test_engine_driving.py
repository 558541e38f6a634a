"""The engine has one loop: its own thread or its caller drives it, turns never overlap, answers never change."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest

from videollava.infer.engine import Engine, LoopRunningError
from videollava.infer.pipeline import Pipeline
from videollava.infer.sampling import SamplingParams

QUESTIONS = ["Hi?", "What colour is it?", "Describe."]
LONG = SamplingParams(max_new_tokens=32)  # with no end-of-sequence token: exactly this many turns


@pytest.fixture(scope="module")
def pipeline(hf_checkpoint):
    return Pipeline.from_pretrained(hf_checkpoint[0], dtype="float32")


@pytest.fixture(scope="module")
def prompts(pipeline):
    return [pipeline.prepare(pipeline.build_prompt(q, 0, 0), []) for q in QUESTIONS]


def _endless(pipeline: Pipeline, **options) -> Engine:
    """An engine whose answers never stop early, so a test knows how many turns they take."""
    return Engine(pipeline.model, dataclasses.replace(pipeline.detokenizer, eos_token_id=-1), **options)


@pytest.fixture(scope="module")
def alone(pipeline, prompts):
    """Each prompt's tokens when it runs alone on a fresh engine driven by the caller."""
    return [_endless(pipeline).generate([p], LONG)[0].token_ids for p in prompts]


class TurnLog:
    """Records which thread took each turn of an engine, and whether two turns ever overlapped."""

    def __init__(self, engine: Engine, monkeypatch: pytest.MonkeyPatch):
        self.threads: list[str] = []
        self.overlaps = 0
        self._inside = 0
        self._lock = threading.Lock()
        self.turns_taken = threading.Condition(self._lock)
        step = engine._step

        def logged() -> None:
            with self._lock:
                self._inside += 1
                self.overlaps += self._inside > 1
                self.threads.append(threading.current_thread().name)
                self.turns_taken.notify_all()
            try:
                step()
            finally:
                with self._lock:
                    self._inside -= 1

        monkeypatch.setattr(engine, "_step", logged)

    def wait_for_turns(self, thread_name: str, count: int) -> None:
        with self._lock:
            assert self.turns_taken.wait_for(lambda: self.threads.count(thread_name) >= count, timeout=60)


def _generate_in_thread(engine: Engine, prompts, name: str = "caller"):
    results: list = []
    thread = threading.Thread(target=lambda: results.extend(engine.generate(prompts, LONG)), name=name)
    thread.start()
    return thread, results


def test_step_is_refused_while_the_loop_thread_drives(pipeline, prompts):
    engine = Engine.for_pipeline(pipeline).start()
    try:
        with pytest.raises(LoopRunningError, match=r"runs in its own thread \(Engine.start\)"):
            engine.step()
    finally:
        engine.stop()
    handle = engine.submit(prompts[0], SamplingParams(max_new_tokens=2))
    while not handle.done:  # stopped: the caller may drive it again
        engine.step()
    assert handle.result().finish_reason in ("stop", "length")


def test_generate_on_a_started_engine_only_waits_for_the_loop_thread(pipeline, prompts, alone, monkeypatch):
    engine = _endless(pipeline, max_batch_size=2).start()
    log = TurnLog(engine, monkeypatch)
    try:
        completions = engine.generate(prompts, LONG)
    finally:
        engine.stop()
    assert [c.token_ids for c in completions] == alone
    assert set(log.threads) == {"videollava-engine"} and log.overlaps == 0


def test_starting_the_loop_while_a_caller_drives_hands_the_turns_over(pipeline, prompts, alone, monkeypatch):
    engine = _endless(pipeline, max_batch_size=2)
    log = TurnLog(engine, monkeypatch)
    take_turn, started = engine._take_turn, threading.Event()

    def take_turn_then_wait_for_start() -> bool:
        """The caller pauses between its third and fourth turns (holding nothing) while the loop starts."""
        took = take_turn()
        if log.threads.count("caller") == 3:
            started.wait(timeout=60)
        return took

    monkeypatch.setattr(engine, "_take_turn", take_turn_then_wait_for_start)
    thread, results = _generate_in_thread(engine, prompts)
    log.wait_for_turns("caller", 3)
    engine.start()
    started.set()
    thread.join(timeout=120)
    engine.stop()
    assert [c.token_ids for c in results] == alone
    assert log.overlaps == 0
    assert log.threads[:3] == ["caller"] * 3 and set(log.threads[3:]) == {"videollava-engine"}


def test_stopping_the_loop_while_a_caller_waits_hands_the_turns_back(pipeline, prompts, alone, monkeypatch):
    engine = _endless(pipeline, max_batch_size=2).start()
    log = TurnLog(engine, monkeypatch)
    step = engine._step

    def step_then_wait_for_stop() -> None:
        """The loop thread's third turn lasts until stop() is called: the answers are then unfinished."""
        step()
        if log.threads.count("videollava-engine") == 3:
            deadline = time.monotonic() + 60
            while not engine._stop and time.monotonic() < deadline:
                time.sleep(0.001)

    monkeypatch.setattr(engine, "_step", step_then_wait_for_stop)
    thread, results = _generate_in_thread(engine, prompts)
    log.wait_for_turns("videollava-engine", 3)
    engine.stop()
    thread.join(timeout=120)
    assert not thread.is_alive() and [c.token_ids for c in results] == alone
    assert log.overlaps == 0
    assert log.threads[:3] == ["videollava-engine"] * 3 and set(log.threads[3:]) == {"caller"}


def test_callers_generating_at_once_take_turns_one_at_a_time(pipeline, prompts, alone, monkeypatch):
    engine = _endless(pipeline, max_batch_size=4)
    log = TurnLog(engine, monkeypatch)
    first, first_results = _generate_in_thread(engine, prompts[:2], name="first")
    second, second_results = _generate_in_thread(engine, prompts[2:], name="second")
    first.join(timeout=120)
    second.join(timeout=120)
    assert [c.token_ids for c in first_results + second_results] == alone
    assert log.overlaps == 0


def test_generate_runs_every_request_even_with_no_waiting_room(pipeline, prompts, alone):
    """With max_queue=0 only the running batch holds requests: the rest are submitted as it frees up."""
    engine = _endless(pipeline, max_batch_size=1, max_queue=0)
    assert [c.token_ids for c in engine.generate(prompts, LONG)] == alone
