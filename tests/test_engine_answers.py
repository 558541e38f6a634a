"""Answers are stripped like the reference's, streamed to the same text; cache salts keep callers apart."""

from __future__ import annotations

import pytest
import torch

from videollava.errors import VideoLlavaError
from videollava.infer.engine import Engine
from videollava.infer.kv import PrefixCache
from videollava.infer.pipeline import Pipeline
from videollava.infer.sampling import SamplingParams

QUESTIONS = ["Hi?", "What colour is it?", "Say something.", "Describe."]


@pytest.fixture(scope="module")
def pipeline(hf_checkpoint):
    return Pipeline.from_pretrained(hf_checkpoint[0], dtype="float32")


def _prompt(pipeline, question: str):
    return pipeline.prepare(pipeline.build_prompt(question, 0, 0), [])


class SpacedDetokenizer:
    """Token texts full of whitespace: a run of spaces or a word per token."""

    def __init__(self, pipeline: Pipeline, spaces_only: bool = False):
        self.eos_token_id = pipeline.detokenizer.eos_token_id
        self.spaces_only = spaces_only

    def piece(self, token: int) -> str:
        if self.spaces_only or token % 3:
            return " \n\t"[: token % 3 + 1]
        return f"w{token}"

    def decode(self, ids: list[int]) -> str:
        return "".join(self.piece(t) for t in ids)


def _stream(engine: Engine, prepared, params):
    handle = engine.submit(prepared, params)
    while not handle.done:
        engine.step()
    deltas = [delta.text for delta in handle]
    return deltas, handle.result()


def test_answers_are_stripped_and_token_ids_exact(pipeline):
    engine = Engine.for_pipeline(pipeline)
    completions = engine.generate(
        [_prompt(pipeline, q) for q in QUESTIONS], SamplingParams(max_new_tokens=12)
    )
    eos = pipeline.detokenizer.eos_token_id
    raw = [pipeline.detokenizer.decode([t for t in c.token_ids if t != eos]) for c in completions]
    assert any(text != text.lstrip() for text in raw)  # this tokenizer does start answers with a space
    assert [c.text for c in completions] == [text.strip() for text in raw]
    alone = Engine.for_pipeline(pipeline, prefix_cache_bytes=0).generate(
        [_prompt(pipeline, "Hi?")], SamplingParams(12)
    )[0]
    assert completions[0].token_ids == alone.token_ids


def test_streamed_deltas_never_start_or_end_the_answer_with_whitespace(pipeline):
    spaced = SpacedDetokenizer(pipeline)
    engine = Engine(pipeline.model, spaced)
    params = SamplingParams(max_new_tokens=24)
    checked = 0
    for question in QUESTIONS:
        deltas, completion = _stream(engine, _prompt(pipeline, question), params)
        full = spaced.decode([t for t in completion.token_ids if t != spaced.eos_token_id])
        assert completion.text == full.strip() and "".join(deltas) == completion.text
        assert all(deltas) and all(not d[-1].isspace() for d in deltas)  # trailing space waits for text
        if deltas:
            assert not deltas[0][0].isspace()
            checked += full != full.strip()
    assert checked  # at least one answer had whitespace to strip


def test_an_answer_of_only_whitespace_streams_nothing(pipeline):
    engine = Engine(pipeline.model, SpacedDetokenizer(pipeline, spaces_only=True))
    deltas, completion = _stream(engine, _prompt(pipeline, "Hi?"), SamplingParams(max_new_tokens=6))
    assert deltas == [] and completion.text == "" and completion.token_ids


def test_streaming_with_stop_strings_still_adds_up(pipeline):
    """Whitespace streamed just before a stop string would end the answer: it must wait too."""
    spaced = SpacedDetokenizer(pipeline)
    engine = Engine(pipeline.model, spaced)
    base = engine.generate([_prompt(pipeline, "Describe.")], SamplingParams(max_new_tokens=24))[0]
    words = base.text.split()
    assert len(words) >= 4
    for stop in words[1:4]:
        params = SamplingParams(max_new_tokens=24, stop=[stop, "never"])
        deltas, completion = _stream(engine, _prompt(pipeline, "Describe."), params)
        assert completion.finish_reason == "stop" and "".join(deltas) == completion.text
        assert completion.text == base.text[: base.text.index(stop)].rstrip()
        assert all(not d[-1].isspace() for d in deltas)


def test_different_cache_salts_never_share_prefixes(pipeline):
    engine = Engine.for_pipeline(pipeline)
    params = SamplingParams(max_new_tokens=4)
    prompt = _prompt(pipeline, "What colour is it?")

    def ask(salt):
        handle = engine.submit(prompt, params, cache_salt=salt)
        while not handle.done:
            engine.step()
        return handle.result()

    first = ask("alice")
    assert first.reused_prefix_tokens == 0
    assert ask("bob").reused_prefix_tokens == 0  # bob cannot tell that alice asked this
    assert ask(None).reused_prefix_tokens == 0  # nor can a caller without a salt
    again = ask("alice")
    assert again.reused_prefix_tokens > 0 and again.token_ids == first.token_ids
    assert ask(None).reused_prefix_tokens > 0  # no salt shares with no salt


@pytest.mark.parametrize("salt", ["", 7, b"bytes"])
def test_a_cache_salt_must_be_a_non_empty_string(pipeline, salt):
    with pytest.raises(VideoLlavaError, match="cache_salt must be a non-empty string"):
        Engine.for_pipeline(pipeline).submit(_prompt(pipeline, "Hi?"), cache_salt=salt)


def test_prefix_cache_entries_of_one_salt_neither_cover_nor_serve_another():
    cache = PrefixCache()
    layers = [(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8))]
    cache.put([1, 2, 3, 4], [1] * 4, layers, salt="a")
    cache.put([1, 2, 3], [1] * 3, [(k[:, :, :3], v[:, :, :3]) for k, v in layers], salt="b")
    assert cache.longest([1, 2, 3, 4], max_rows=10, salt="b")[0] == 3  # not covered by a's longer entry
    assert cache.longest([1, 2, 3, 4], max_rows=10, salt="a")[0] == 4
    assert cache.longest([1, 2, 3, 4], max_rows=10, salt=None) == (0, None)
