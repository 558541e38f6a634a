import time

import pytest
from transformers import AutoTokenizer

from videollava.testing import tiny_test_tokenizer
from videollava.train.tokenizer import train_tokenizer

PROMPT = "USER: <image>\nWhat color is the circle? ASSISTANT: red</s>"
ORDINARY = [
    "What color is the circle?",
    "two  spaces, a tab\there and\n\nblank lines\n",
    " leading and trailing space ",
    "Ünïcödé — 猫 🐱",
    "A chat between a curious user and an artificial intelligence assistant.",
]


@pytest.fixture(scope="module")
def tok():
    return tiny_test_tokenizer()


def test_llama_special_token_layout(tok):
    assert tok.convert_tokens_to_ids(["<unk>", "<s>", "</s>"]) == [0, 1, 2]
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    # Appended after the base vocabulary, like the -hf port's 32000 / 32001 / 32002.
    assert tok.convert_tokens_to_ids(["<image>", "<video>", "<pad>"]) == [597, 598, 599]
    assert tok.pad_token_id == 599
    assert len(tok) == 600
    assert {"<image>", "<video>", "<pad>"} <= set(tok.all_special_tokens)


def test_bos_prepended_and_eos_read_from_text(tok):
    ids = tok(PROMPT).input_ids
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids[-1] == tok.eos_token_id
    assert tok.convert_tokens_to_ids("<image>") in ids


def test_round_trip_decoding(tok):
    assert tok.decode(tok(PROMPT).input_ids) == "<s>" + PROMPT
    for text in ORDINARY:
        ids = tok(text).input_ids
        assert tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text


def test_padding_side_and_length(tok):
    assert tok.padding_side == "left"
    assert tok.model_max_length == 2048
    batch = tok(["red", "a red circle moves up"], padding=True)
    short, alone = batch.input_ids[0], tok("red").input_ids
    assert short[0] == tok.pad_token_id and short[-len(alone) :] == alone
    assert batch.attention_mask[0][0] == 0


def test_without_placeholder_tokens():
    tokenizer = tiny_test_tokenizer(placeholder_tokens=False)
    assert len(tokenizer) == 600 and tokenizer.pad_token_id == 599
    image = tokenizer.encode("<image>", add_special_tokens=False)
    assert len(image) > 1 and tokenizer.unk_token_id not in image
    assert tokenizer.decode(tokenizer(PROMPT).input_ids, skip_special_tokens=True) == PROMPT.replace(
        "</s>", ""
    )


def test_save_and_load_round_trip(tmp_path):
    trained = train_tokenizer(["a red circle moves up", "USER: hi ASSISTANT: hello</s>"] * 5, 300, tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in [PROMPT, *ORDINARY]:
        want = trained(text, return_offsets_mapping=True)
        got = loaded(text, return_offsets_mapping=True)
        assert got.input_ids == want.input_ids and got.offset_mapping == want.offset_mapping
        assert loaded.decode(got.input_ids) == trained.decode(want.input_ids)
    for attribute in ["bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id", "padding_side"]:
        assert getattr(loaded, attribute) == getattr(trained, attribute), attribute
    assert loaded.model_max_length == 2048
    assert loaded.convert_tokens_to_ids(["<image>", "<video>"]) == trained.convert_tokens_to_ids(
        ["<image>", "<video>"]
    )
    assert len(loaded) == len(trained) <= 300  # a small corpus runs out of merges before the target size


def test_training_is_deterministic_and_fast():
    start = time.perf_counter()
    first = tiny_test_tokenizer()
    assert time.perf_counter() - start < 2.0
    assert first.get_vocab() == tiny_test_tokenizer().get_vocab()


def test_vocab_too_small():
    with pytest.raises(ValueError, match="at least 262"):
        train_tokenizer(["x"], vocab_size=100)
