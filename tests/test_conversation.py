from dataclasses import dataclass

import pytest

from videollava.data.conversation import (
    TEMPLATES,
    ChatHistory,
    Conversation,
    build_prompt,
    from_llava,
    get_template,
    user_turn,
)
from videollava.errors import PromptError

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

Q1 = "<video>\nWhat color is the circle?"
TWO_TURNS = [("user", Q1), ("assistant", "red"), ("user", "And the square?"), ("assistant", "It is blue.")]


def spans_text(text: str, spans: list[tuple[int, int]]) -> list[str]:
    return [text[a:b] for a, b in spans]


def test_registry_has_the_documented_templates():
    assert set(TEMPLATES) >= {"vicuna_v1", "llava_v1", "hf", "plain"}
    vicuna = get_template("vicuna_v1")
    assert (vicuna.system, vicuna.roles, vicuna.sep, vicuna.sep2) == (
        VICUNA_SYSTEM,
        ("USER", "ASSISTANT"),
        " ",
        "</s>",
    )
    assert get_template(vicuna) is vicuna


def test_unknown_template_lists_valid_ones():
    with pytest.raises(
        PromptError, match="unknown conversation template 'vicuna'.*hf, llava_v1, plain, vicuna_v1"
    ):
        get_template("vicuna")


@pytest.mark.parametrize(("name", "system"), [("vicuna_v1", VICUNA_SYSTEM), ("llava_v1", LLAVA_SYSTEM)])
def test_single_turn_generation_prompt(name, system):
    conv = Conversation(get_template(name), [("user", Q1)])
    assert conv.prompt() == system + " USER: <video>\nWhat color is the circle? ASSISTANT:"


@pytest.mark.parametrize(("name", "system"), [("vicuna_v1", VICUNA_SYSTEM), ("llava_v1", LLAVA_SYSTEM)])
def test_multi_turn_prompt_and_training_text(name, system):
    conv = Conversation(get_template(name), TWO_TURNS[:3])
    assert conv.prompt() == (
        system
        + " USER: <video>\nWhat color is the circle? ASSISTANT: red</s>USER: And the square? ASSISTANT:"
    )
    conv.append("assistant", "It is blue.")
    text, spans = conv.render_for_training()
    assert text == (
        system + " USER: <video>\nWhat color is the circle? ASSISTANT: red</s>"
        "USER: And the square? ASSISTANT: It is blue.</s>"
    )
    assert spans_text(text, spans) == ["red</s>", "It is blue.</s>"]


def test_hf_template_has_no_system_prompt():
    conv = Conversation(get_template("hf"), [("user", Q1)])
    assert conv.prompt() == "USER: <video>\nWhat color is the circle? ASSISTANT:"
    conv.append("assistant", "red")
    text, spans = conv.render_for_training()
    assert text == "USER: <video>\nWhat color is the circle? ASSISTANT: red</s>"
    assert spans_text(text, spans) == ["red</s>"]


def test_plain_template_keeps_only_placeholders():
    conv = Conversation(get_template("plain"), [("user", "<image>\nDescribe the image briefly.")])
    assert conv.prompt() == "<image>"
    conv.append("assistant", "a red circle on a white background")
    text, spans = conv.render_for_training()
    assert text == "<image>a red circle on a white background\n"
    assert spans_text(text, spans) == ["a red circle on a white background\n"]


def test_plain_template_keeps_placeholder_order_and_refuses_multi_turn():
    conv = Conversation(
        get_template("plain"), [("user", "<video> and <image>: caption?"), ("assistant", "c")]
    )
    assert conv.render_for_training()[0] == "<video><image>c\n"
    with pytest.raises(PromptError, match="one user and one assistant"):
        Conversation(get_template("plain"), TWO_TURNS).render_for_training()
    with pytest.raises(PromptError, match="placeholder"):
        Conversation(get_template("plain"), [("user", "no media"), ("assistant", "c")]).render_for_training()


def test_template_can_be_given_by_name():
    assert Conversation("hf", [("user", "hi")]).prompt() == "USER: hi ASSISTANT:"


def test_conversation_order_is_enforced():
    with pytest.raises(PromptError, match="message 1 is from the assistant"):
        Conversation(get_template("vicuna_v1"), [("assistant", "hi")])
    conv = Conversation(get_template("vicuna_v1"), [("user", "hi")])
    with pytest.raises(PromptError, match="message 2 is from the user"):
        conv.append("user", "again")
    with pytest.raises(PromptError, match="unknown role 'system'"):
        conv.append("system", "x")
    with pytest.raises(PromptError, match="end with an assistant"):
        conv.render_for_training()
    conv.append("assistant", "hello")
    with pytest.raises(PromptError, match="end with a user"):
        conv.prompt()
    with pytest.raises(PromptError, match="empty"):
        Conversation(get_template("vicuna_v1"), [("user", "hi"), ("assistant", " ")]).render_for_training()


def test_from_llava_converts_turns():
    sample = [
        {"from": "human", "value": Q1},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "And the square?"},
        {"from": "gpt", "value": "It is blue."},
    ]
    conv = from_llava(sample, "llava_v1")
    assert conv.messages == TWO_TURNS
    assert conv.template.name == "llava_v1"
    assert from_llava(sample, get_template("hf")).render_for_training()[0].startswith("USER: <video>\n")


@pytest.mark.parametrize(
    ("turns", "message"),
    [
        ([], "no conversation turns"),
        ("not a list", "no conversation turns"),
        ([{"from": "gpt", "value": "hi"}, {"from": "human", "value": "x"}], "turn 1 is from 'gpt'"),
        ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "turn 2 is from 'human'"),
        ([{"from": "human", "value": "a"}], "turn 1 \\(human\\) has no gpt answer"),
        ([{"from": "human", "value": "a"}, {"from": "gpt", "value": ""}], "turn 2 \\(gpt\\) has an empty"),
        ([{"from": "human", "value": "a"}, {"from": "gpt", "value": None}], "turn 2 \\(gpt\\) has an empty"),
        ([{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}], "turn 2 is from 'bot'"),
        ([{"from": "human"}, {"from": "gpt", "value": "b"}], "turn 1 is not an object"),
        (["hello", {"from": "gpt", "value": "b"}], "turn 1 is not an object"),
        (
            [{"from": "human", "value": "a"}, {"from": "gpt", "value": "<image> b"}],
            "turn 2 \\(gpt\\) contains",
        ),
    ],
)
def test_from_llava_rejects_malformed_samples(turns, message):
    with pytest.raises(PromptError, match=message):
        from_llava(turns, "vicuna_v1")


def test_build_prompt_places_placeholders_first():
    assert (
        build_prompt("What is shown?", images=1)
        == VICUNA_SYSTEM + " USER: <image>\nWhat is shown? ASSISTANT:"
    )
    assert build_prompt("What happens?", videos=1, template="hf") == "USER: <video>\nWhat happens? ASSISTANT:"
    assert build_prompt("Compare.", images=1, videos=2, template="hf") == (
        "USER: <video><video><image>\nCompare. ASSISTANT:"
    )
    assert build_prompt("Just text.", template="hf") == "USER: Just text. ASSISTANT:"
    assert build_prompt("<video>", videos=1, template="plain") == "<video>"


def test_build_prompt_keeps_placeholders_already_in_question():
    assert build_prompt("Is <image> like <image>?", images=2, template="hf") == (
        "USER: Is <image> like <image>? ASSISTANT:"
    )
    with pytest.raises(PromptError, match="prompt has 2 <image> placeholders but 1 image was given"):
        build_prompt("Is <image> like <image>?", images=1)


def test_user_turn_puts_videos_then_images_then_a_newline_before_the_question():
    assert user_turn("What is shown?") == "What is shown?"
    assert user_turn("What is shown?", images=1) == "<image>\nWhat is shown?"
    assert user_turn("Compare.", images=2, videos=1) == "<video><image><image>\nCompare."
    assert user_turn("Is <image> like <video>?", images=1, videos=1) == "Is <image> like <video>?"
    with pytest.raises(PromptError, match="1 <image> placeholder but 2 images were given"):
        user_turn("Is <image> it?", images=2)
    with pytest.raises(PromptError, match="<video>"):
        user_turn("look <video> here")
    with pytest.raises(ValueError, match="cannot be negative"):
        user_turn("Hi", images=-1)


@dataclass(frozen=True)
class Shown:
    kind: str
    name: str


def test_chat_history_renders_turns_with_their_media():
    red, clip, blue = Shown("image", "red"), Shown("video", "clip"), Shown("image", "blue")
    history: ChatHistory[Shown] = ChatHistory("vicuna_v1")
    assert history.prompt("What is shown?", [red, clip]) == (
        VICUNA_SYSTEM + " USER: <video><image>\nWhat is shown? ASSISTANT:"
    )
    history.add("What is shown?", [red, clip], "  a red bike\n")
    history.add("And then?", [], "It rides.")
    assert len(history) == 2 and history.media == [red, clip]
    assert history.messages() == [
        ("user", "<video><image>\nWhat is shown?"),
        ("assistant", "a red bike"),
        ("user", "And then?"),
        ("assistant", "It rides."),
    ]
    expected = (
        VICUNA_SYSTEM + " USER: <video><image>\nWhat is shown? ASSISTANT: a red bike</s>"
        "USER: And then? ASSISTANT: It rides.</s>USER: Is <image> darker? ASSISTANT:"
    )
    assert history.prompt("Is <image> darker?", [blue]) == expected
    # the same prompt as the counts-and-turns form
    assert build_prompt("Is <image> darker?", 1, 0, "vicuna_v1", history.messages()) == expected
    history.clear()
    assert (
        len(history) == 0
        and history.media == []
        and history.prompt("Hi") == VICUNA_SYSTEM + " USER: Hi ASSISTANT:"
    )


def test_chat_history_keeps_only_well_formed_turns():
    history: ChatHistory[Shown] = ChatHistory("hf")
    with pytest.raises(PromptError, match="assistant message contains a media placeholder"):
        history.add("Hi", [], "see <video>")
    with pytest.raises(PromptError, match="2 <image> placeholders but 1 image"):
        history.add("<image> or <image>?", [Shown("image", "a")], "a")
    with pytest.raises(PromptError, match="placeholder"):
        history.prompt("What is <image>?")
    assert len(history) == 0  # refused turns leave nothing behind


def test_chat_history_system_prompt_replaces_the_templates():
    history: ChatHistory[Shown] = ChatHistory("vicuna_v1", system="Answer in one word.")
    assert history.prompt("Hi") == "Answer in one word. USER: Hi ASSISTANT:"
    assert ChatHistory("hf", system="Be brief.").prompt("Hi") == "Be brief. USER: Hi ASSISTANT:"
    # the plain template has no system prompt to replace
    assert ChatHistory("plain", system="ignored").prompt("Caption.", [Shown("image", "a")]) == "<image>"
    assert get_template("vicuna_v1").system == VICUNA_SYSTEM  # the registry's template is unchanged
