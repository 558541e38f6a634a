"""Incremental detokenization: the streamed pieces add up to the whole decode, characters never split."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers
from transformers import PreTrainedTokenizerFast

from videollava.infer.detokenize import INCOMPLETE_CHARACTER, IncrementalDecoder
from videollava.infer.engine import Engine
from videollava.infer.pipeline import Pipeline
from videollava.infer.sampling import SamplingParams
from videollava.testing import tiny_test_tokenizer

TEXT = "the cat 猫は on 🐱 cat🐱the"


def _sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """LLaMA's layout: word starts marked by '▁', bytes of unknown characters as <0xNN> tokens."""
    pieces = ["▁", "t", "h", "e", "c", "a", "o", "n"]
    merges = [
        ("t", "h"),
        ("th", "e"),
        ("▁", "the"),
        ("c", "a"),
        ("ca", "t"),
        ("▁", "cat"),
        ("o", "n"),
        ("▁", "on"),
    ]
    tokens = (
        ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + [a + b for a, b in merges]
    )
    backend = Tokenizer(
        models.BPE({t: i for i, t in enumerate(tokens)}, merges, unk_token="<unk>", byte_fallback=True)
    )
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


class _Detokenizer:
    """The pipeline's way of decoding, recording how many ids each call decodes."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast):
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        self.lengths: list[int] = []

    def decode(self, ids: list[int]) -> str:
        self.lengths.append(len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens=True)


SENTENCEPIECE = _Detokenizer(_sentencepiece_tokenizer())
BYTE_LEVEL = _Detokenizer(tiny_test_tokenizer())


def _pieces(detokenizer: _Detokenizer, ids: list[int]) -> tuple[list[str], IncrementalDecoder]:
    decoder = IncrementalDecoder(detokenizer)
    return [decoder.push(token) for token in ids], decoder


@pytest.mark.parametrize("detokenizer", [SENTENCEPIECE, BYTE_LEVEL], ids=["sentencepiece", "byte-level"])
def test_multibyte_characters_arrive_whole_and_spaces_between_words_are_kept(detokenizer):
    ids = detokenizer.tokenizer.encode(TEXT, add_special_tokens=False)
    pieces, decoder = _pieces(detokenizer, ids)
    assert "".join(pieces) == TEXT and decoder.text == TEXT and decoder.pending == ""
    assert not any(INCOMPLETE_CHARACTER in piece for piece in pieces)
    assert any("猫" in piece for piece in pieces)


def test_sentencepiece_byte_runs_settle_whole_with_the_next_word():
    tokenizer = SENTENCEPIECE.tokenizer
    ids = tokenizer.encode("cat 🐱é the", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(ids)[2:8] == [
        "<0xF0>",
        "<0x9F>",
        "<0x90>",
        "<0xB1>",
        "<0xC3>",
        "<0xA9>",
    ]
    pieces, decoder = _pieces(SENTENCEPIECE, ids)
    assert pieces == ["cat"] + [""] * 7 + [" 🐱é the"]
    # A word after the first keeps its space, though decoding it alone would drop it.
    assert tokenizer.decode(ids[1:]) == "🐱é the"
    # Cut inside the run, the whole decode shows the run as replacement characters, and so does the decoder.
    pieces, decoder = _pieces(SENTENCEPIECE, ids[:7])
    assert "".join(pieces) == "cat" and decoder.pending == SENTENCEPIECE.decode(ids[:7])[len("cat") :]
    assert decoder.pending.endswith(INCOMPLETE_CHARACTER * 3)


def test_an_unfinished_character_waits_in_pending_and_matches_the_whole_decode():
    ids = SENTENCEPIECE.tokenizer.encode("on 猫", add_special_tokens=False)[:-1]  # last byte missing
    pieces, decoder = _pieces(SENTENCEPIECE, ids)
    assert "".join(pieces) == "on"
    assert decoder.pending.endswith(INCOMPLETE_CHARACTER)
    assert decoder.text + decoder.pending == SENTENCEPIECE.decode(ids)


def test_each_token_decodes_a_short_window_not_the_whole_text():
    ids = SENTENCEPIECE.tokenizer.encode(TEXT * 20, add_special_tokens=False)
    SENTENCEPIECE.lengths.clear()
    pieces, _ = _pieces(SENTENCEPIECE, ids)
    assert "".join(pieces) == TEXT * 20
    assert (
        len(ids) > 200 and max(SENTENCEPIECE.lengths) <= 16
    )  # the longest run of held tokens and its context


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_random_ids_stream_to_the_whole_decode(data):
    detokenizer = data.draw(st.sampled_from([SENTENCEPIECE, BYTE_LEVEL]))
    ids = data.draw(st.lists(st.integers(0, len(detokenizer.tokenizer) - 1), max_size=40))
    pieces, decoder = _pieces(detokenizer, ids)
    assert "".join(pieces) == decoder.text
    assert decoder.text + decoder.pending == detokenizer.decode(ids)
    assert not decoder.text.endswith(INCOMPLETE_CHARACTER)


@settings(max_examples=100, deadline=None)
@given(texts=st.lists(st.text(alphabet="the cat on 猫は🐱é\n.", max_size=12), max_size=4), data=st.data())
def test_text_cut_anywhere_streams_to_the_whole_decode(texts, data):
    """Pieces of encoded text, cut inside characters too: what a generator cut off by a limit leaves."""
    ids: list[int] = []
    for text in texts:
        encoded = SENTENCEPIECE.tokenizer.encode(text, add_special_tokens=False)
        start = data.draw(st.integers(0, len(encoded)))
        ids += encoded[start : data.draw(st.integers(start, len(encoded)))]
    pieces, decoder = _pieces(SENTENCEPIECE, ids)
    assert "".join(pieces) + decoder.pending == SENTENCEPIECE.decode(ids)


def test_the_engine_decodes_short_windows_and_streams_the_whole_answer(hf_checkpoint):
    pipeline = Pipeline.from_pretrained(hf_checkpoint[0], dtype="float32")
    recording = _Detokenizer(pipeline.detokenizer.tokenizer)
    recording.eos_token_id = None  # a long answer whatever the random model picks
    engine = Engine(pipeline.model, recording)
    prepared = pipeline.prepare(pipeline.build_prompt("Describe.", 0, 0), [])
    handle = engine.submit(prepared, SamplingParams(max_new_tokens=64))
    while not handle.done:
        engine.step()
    streamed = "".join(delta.text for delta in handle)
    completion = handle.result()
    assert len(completion.token_ids) == 64
    assert completion.text == streamed == recording.decode(completion.token_ids).strip()
    assert max(recording.lengths[:-1]) < 16  # never the whole answer while generating it
