from videollava.constants import (
    HF_IMAGE_TOKEN_ID,
    HF_PAD_TOKEN_ID,
    HF_SPECIAL_TOKENS,
    HF_VIDEO_TOKEN_ID,
    PLACEHOLDER_PATTERN,
    SLOT_OF_PLACEHOLDER,
    padded_vocab_size,
)


def test_the_hf_vocabulary_pads_llamas_tokens_and_three_added_ones_to_32064_rows():
    added = dict(zip(HF_SPECIAL_TOKENS, (HF_IMAGE_TOKEN_ID, HF_VIDEO_TOKEN_ID, HF_PAD_TOKEN_ID), strict=True))
    assert added == {"<image>": 32000, "<video>": 32001, "<pad>": 32002}
    assert padded_vocab_size(32000 + len(added)) == 32064


def test_padding_rounds_up_to_the_next_multiple_of_64_and_keeps_an_exact_one():
    assert [padded_vocab_size(n) for n in (1, 63, 64, 65, 600, 640)] == [64, 64, 64, 128, 640, 640]


def test_the_pattern_finds_every_placeholder_in_order_and_each_has_its_own_slot():
    assert PLACEHOLDER_PATTERN.findall("<video><image>\nWhat <imag> <image>?") == [
        "<video>",
        "<image>",
        "<image>",
    ]
    assert sorted(SLOT_OF_PLACEHOLDER) == ["<image>", "<video>"]
    assert len(set(SLOT_OF_PLACEHOLDER.values())) == 2 and all(s < 0 for s in SLOT_OF_PLACEHOLDER.values())
