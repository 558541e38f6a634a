import pytest

from videollava.constants import IGNORE_INDEX, IMAGE_SLOT, VIDEO_SLOT
from videollava.data.conversation import Conversation, get_template
from videollava.data.tokenize import check_placeholders, count_placeholders, tokenize_multimodal
from videollava.errors import PromptError
from videollava.testing import tiny_test_tokenizer


@pytest.fixture(scope="module")
def with_tokens():
    """Like the -hf port's tokenizer: `<image>` and `<video>` are tokens of their own."""
    return tiny_test_tokenizer()


@pytest.fixture(scope="module")
def without_tokens():
    """Like LLaMA's original tokenizer: no placeholder tokens."""
    return tiny_test_tokenizer(placeholder_tokens=False)


@pytest.fixture(params=["with_tokens", "without_tokens"])
def tok(request):
    return request.getfixturevalue(request.param)


def reference_split_tokenize(tokenizer, text):
    """The reference `tokenizer_image_token`, generalised to both placeholders, written out plainly."""
    pieces, kinds, rest = [], [], text
    while True:
        positions = [(rest.find(p), p) for p in ("<image>", "<video>") if p in rest]
        if not positions:
            pieces.append(rest)
            break
        at, placeholder = min(positions)
        pieces.append(rest[:at])
        kinds.append(IMAGE_SLOT if placeholder == "<image>" else VIDEO_SLOT)
        rest = rest[at + len(placeholder) :]
    chunks = [tokenizer(piece).input_ids for piece in pieces]
    offset = 1 if chunks[0] and chunks[0][0] == tokenizer.bos_token_id else 0
    ids = [chunks[0][0]] if offset else []
    for i, chunk in enumerate(chunks):
        ids.extend(chunk[offset:])
        if i < len(kinds):
            ids.append(kinds[i])
    return ids


def supervised_runs(tokenizer, result):
    """Decoded text of each run of consecutive supervised tokens."""
    runs, current = [], []
    for token, label in zip(result.input_ids, result.labels, strict=True):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def training_text(template="vicuna_v1"):
    conv = Conversation(
        get_template(template),
        [
            ("user", "<video>\nWhat color is the circle?"),
            ("assistant", "red"),
            ("user", "<image>\nAnd the square?"),
            ("assistant", "It is blue."),
        ],
    )
    return conv.render_for_training()


def test_count_placeholders():
    assert count_placeholders("<video>\n<image> and <image>") == (2, 1)
    assert count_placeholders("no media") == (0, 0)


def test_check_placeholders_messages():
    check_placeholders("<image>\nq", 1, 0)
    with pytest.raises(PromptError, match="^prompt has 2 <image> placeholders but 1 image was given$"):
        check_placeholders("<image><image>\nq", 1, 0)
    with pytest.raises(PromptError, match="^prompt has 1 <video> placeholder but 0 videos were given$"):
        check_placeholders("<video>\nq", 0, 0)
    with pytest.raises(PromptError, match="0 <image> placeholders but 3 images were given; .*<video>"):
        check_placeholders("<video>\nq", 3, 2)


def test_path_a_matches_whole_text_tokenization(with_tokens):
    text = "USER: <video>\nWhat? <image> ASSISTANT:"
    result = tokenize_multimodal(with_tokens, text)
    whole = with_tokens(text).input_ids
    image_id, video_id = with_tokens.convert_tokens_to_ids(["<image>", "<video>"])
    assert result.input_ids == [{image_id: IMAGE_SLOT, video_id: VIDEO_SLOT}.get(i, i) for i in whole]
    assert (result.num_images, result.num_videos) == (1, 1)
    assert result.labels is None


def test_path_b_matches_reference_split(without_tokens):
    assert without_tokens.encode("<image>", add_special_tokens=False) != [without_tokens.unk_token_id]
    assert len(without_tokens.encode("<image>", add_special_tokens=False)) > 1
    for text in [
        "USER: <video>\nWhat? <image> ASSISTANT:",
        "<image><image>\ncompare",
        "<video>",
        "ends with <image>",
        "no media at all",
    ]:
        result = tokenize_multimodal(without_tokens, text)
        assert result.input_ids == reference_split_tokenize(without_tokens, text), text


def test_bos_once_and_slot_placement(tok):
    bos = tok.bos_token_id
    result = tokenize_multimodal(tok, "<video>\nA <image><image> B <video>")
    ids = result.input_ids
    assert ids[0] == bos and ids.count(bos) == 1
    assert ids[1] == VIDEO_SLOT
    assert [i for i in ids if i < 0] == [VIDEO_SLOT, IMAGE_SLOT, IMAGE_SLOT, VIDEO_SLOT]
    first_image = ids.index(IMAGE_SLOT)
    assert ids[first_image + 1] == IMAGE_SLOT  # adjacent placeholders: nothing between them
    assert ids[-1] == VIDEO_SLOT
    assert (result.num_images, result.num_videos) == (2, 2)
    assert tok.decode([i for i in ids if i >= 0], skip_special_tokens=True) == "\nA  B "


def test_add_bos(tok):
    text = "USER: <image>\nhi ASSISTANT:"
    without = tokenize_multimodal(tok, text, add_bos=False).input_ids
    assert tok.bos_token_id not in without
    assert tokenize_multimodal(tok, text).input_ids == [tok.bos_token_id, *without]


def test_add_bos_when_the_tokenizer_does_not_add_it():
    tokenizer = tiny_test_tokenizer()
    tokenizer.add_bos_token = False
    assert tokenizer("hi").input_ids[0] != tokenizer.bos_token_id
    ids = tokenize_multimodal(tokenizer, "<image>\nhi").input_ids
    assert ids[:2] == [tokenizer.bos_token_id, IMAGE_SLOT] and ids.count(tokenizer.bos_token_id) == 1


def test_labels_cover_exactly_the_answers_and_eos(tok):
    text, spans = training_text()
    result = tokenize_multimodal(tok, text, spans)
    assert len(result.labels) == len(result.input_ids)
    # The space after "ASSISTANT:" travels with the answer's first token, as in LLaMA's tokenizer.
    assert supervised_runs(tok, result) == [" red</s>", " It is blue.</s>"]
    for token, label in zip(result.input_ids, result.labels, strict=True):
        if token < 0 or token == tok.bos_token_id:
            assert label == IGNORE_INDEX
    eos_positions = [i for i, t in enumerate(result.input_ids) if t == tok.eos_token_id]
    assert len(eos_positions) == 2
    for at in eos_positions:
        assert result.labels[at] == tok.eos_token_id
    after_first_eos = eos_positions[0] + 1
    assert tok.decode([result.input_ids[after_first_eos]]) == "USER"
    assert result.labels[after_first_eos] == IGNORE_INDEX
    first_answer = next(i for i, label in enumerate(result.labels) if label != IGNORE_INDEX)
    assert tok.decode(result.input_ids[first_answer - 2 : first_answer]) == " ASSISTANT:"
    assert result.labels[first_answer - 2 : first_answer] == [IGNORE_INDEX, IGNORE_INDEX]


def test_both_paths_give_the_same_tokens_for_this_tokenizer(with_tokens, without_tokens):
    # The byte-level tokenizer has no prefix space, so splitting on placeholders changes nothing.
    text, spans = training_text("hf")
    a = tokenize_multimodal(with_tokens, text, spans)
    b = tokenize_multimodal(without_tokens, text, spans)
    assert a.input_ids == b.input_ids and a.labels == b.labels


def test_separate_space_token_before_answer_is_supervised(tok):
    # Nothing in the training corpus starts with "Z": " Zq" stays " ", "Z", "q".
    text, spans = Conversation(
        get_template("hf"), [("user", "hi"), ("assistant", "Zq")]
    ).render_for_training()
    result = tokenize_multimodal(tok, text, spans)
    tokens = tok.convert_ids_to_tokens(result.input_ids)
    assert tokens[-4:] == ["Ġ", "Z", "q", "</s>"]
    assert result.labels[-5:] == [IGNORE_INDEX, *result.input_ids[-4:]]
    assert tokens[-5] == ":"


def test_slots_are_never_supervised(tok):
    text = "<image>a red circle\n"
    result = tokenize_multimodal(tok, text, [(0, len(text))])
    assert result.input_ids[1] == IMAGE_SLOT and result.labels[1] == IGNORE_INDEX
    assert supervised_runs(tok, result) == ["a red circle\n"]


def test_plain_template_supervises_caption_and_newline(tok):
    conv = Conversation(
        get_template("plain"), [("user", "<video>\nDescribe."), ("assistant", "a star rotates")]
    )
    text, spans = conv.render_for_training()
    result = tokenize_multimodal(tok, text, spans)
    assert result.input_ids[:2] == [tok.bos_token_id, VIDEO_SLOT]
    assert supervised_runs(tok, result) == ["a star rotates\n"]


def test_no_spans_means_no_labels_and_empty_spans_mean_all_ignored(tok):
    text, _ = training_text()
    assert tokenize_multimodal(tok, text).labels is None
    assert set(tokenize_multimodal(tok, text, []).labels) == {IGNORE_INDEX}


def metaspace_tokenizer(placeholder_tokens):
    """A LLaMA-like tokenizer that prepends "▁" to the start of every text it is given."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    backend.decoder = decoders.Metaspace(prepend_scheme="first")
    corpus = ["What color is the circle? ASSISTANT: red", "USER: And the square? ASSISTANT: It is blue."]
    trainer = trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    backend.train_from_iterator(corpus * 3, trainer)
    if placeholder_tokens:
        backend.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in ("<image>", "<video>")]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", add_bos_token=True
    )


def test_split_path_keeps_the_reference_prefix_space_quirk():
    text, spans = training_text()
    split = metaspace_tokenizer(placeholder_tokens=False)
    whole = metaspace_tokenizer(placeholder_tokens=True)
    b = tokenize_multimodal(split, text, spans)
    a = tokenize_multimodal(whole, text, spans)
    assert b.input_ids == reference_split_tokenize(split, text)
    # Each piece after a placeholder is tokenized on its own, so it gains a leading "▁", as in the reference.
    after_video = b.input_ids.index(VIDEO_SLOT) + 1
    assert split.convert_ids_to_tokens(b.input_ids[after_video]).startswith("▁")
    assert not whole.convert_ids_to_tokens(a.input_ids[a.input_ids.index(VIDEO_SLOT) + 1]).startswith("▁")
    for tokenizer, result in ((split, b), (whole, a)):
        assert [run.strip() for run in supervised_runs(tokenizer, result)] == ["red</s>", "It is blue.</s>"]


def reference_spliced_labels(input_ids, labels, image_rows, video_rows):
    """The training objective's former layout of labels, written out plainly: each slot becomes its
    visual rows (ignored), then every row is right padded with ignored labels."""
    import torch

    rows = []
    for ids, row_labels in zip(input_ids, labels, strict=True):
        out = []
        for token, label in zip(ids, row_labels, strict=True):
            if token == IMAGE_SLOT:
                out += [IGNORE_INDEX] * image_rows
            elif token == VIDEO_SLOT:
                out += [IGNORE_INDEX] * video_rows
            else:
                out.append(label)
        rows.append(out)
    width = max(len(r) for r in rows)
    return torch.tensor([r + [IGNORE_INDEX] * (width - len(r)) for r in rows], dtype=torch.long)


def test_spliced_labels_ignore_visual_rows_and_padding(with_tokens):
    """The labels the splice lays out for training: each slot's visual rows and the right padding
    ignored, every text label where its token lands."""
    import torch

    from videollava.model.videollava import VideoLlava, VideoLlavaConfig
    from videollava.model.vision import VisionConfig

    vision = VisionConfig(
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        patch_size=8,
        image_size=16,
    )
    llm = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    model = VideoLlava(
        VideoLlavaConfig(vision=vision, text_config={**llm, "vocab_size": 640}, temporal_frames=2)
    )
    image_rows, video_rows = model.config.image_tokens, model.config.video_tokens(2)
    conversations = [
        ("<image>\nWhat color is the circle?", "red"),
        ("<video>\nWhat happens in the video? <image>", "A red circle moves up."),
        ("How many shapes are there?", "two"),
    ]
    ids, labels, features = [], [], []
    for question, answer in conversations:
        text, spans = Conversation(
            get_template("vicuna_v1"), [("user", question), ("assistant", answer)]
        ).render_for_training()
        tokens = tokenize_multimodal(with_tokens, text, spans)
        ids.append(tokens.input_ids)
        labels.append(tokens.labels)
        rows = [
            image_rows if t == IMAGE_SLOT else video_rows
            for t in tokens.input_ids
            if t in (IMAGE_SLOT, VIDEO_SLOT)
        ]
        features.append([torch.randn(n, 8) for n in rows])
    spliced = model.splice(ids, features, labels=labels, padding_side="right")
    expected = reference_spliced_labels(ids, labels, image_rows, video_rows)  # (B, L)
    assert spliced.labels.shape == expected.shape == spliced.attention_mask.shape
    assert torch.equal(spliced.labels, expected)
    # padding and visual rows are never supervised; every supervised label is one of the answers' tokens
    assert bool((spliced.labels[spliced.attention_mask == 0] == IGNORE_INDEX).all())
    assert int((spliced.labels != IGNORE_INDEX).sum()) == sum(
        sum(1 for x in row if x != IGNORE_INDEX) for row in labels
    )
    with pytest.raises(PromptError, match="prompt 0 has .* tokens but .* labels"):
        model.splice(ids, features, labels=[labels[0][:-1], *labels[1:]], padding_side="right")
