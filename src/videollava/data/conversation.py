"""Chat templates of Video-LLaVA, rendered character for character as the checkpoints were trained.

A template renders a conversation either as a generation prompt (ending with the open "ASSISTANT:" turn)
or as training text plus the character spans to supervise: each answer with its closing separator.
`user_turn` writes a question with its media as the training data did, and `ChatHistory` is the
conversation with media that every front end (server, terminal chat, web page) keeps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, Protocol, TypeVar

from videollava.constants import IMAGE_PLACEHOLDER, PLACEHOLDER_PATTERN, VIDEO_PLACEHOLDER
from videollava.data.tokenize import check_placeholders, count_placeholders
from videollava.errors import PromptError

USER = "user"
ASSISTANT = "assistant"


@dataclass(frozen=True)
class Template:
    """How turns are joined.

    style "two" (LLaVA's SeparatorStyle.TWO): `{system}{sep}` then `ROLE: text` closed by `sep` after a
    user turn and `sep2` after an assistant turn; an empty system adds nothing, not even `sep`.
    style "plain" (stage-1 captioning): the user turn shrinks to its placeholders, followed by `sep`,
    then the caption and `sep2`.
    """

    name: str
    system: str
    roles: tuple[str, str]
    sep: str = " "
    sep2: str = "</s>"
    style: Literal["two", "plain"] = "two"

    @property
    def stop_text(self) -> str:
        """Text that ends an answer: generation stops there."""
        return self.sep2


_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template("vicuna_v1", _VICUNA_SYSTEM, ("USER", "ASSISTANT")),
        Template("llava_v1", _LLAVA_SYSTEM, ("USER", "ASSISTANT")),
        # The -hf port's documented prompt: no system prompt at all.
        Template("hf", "", ("USER", "ASSISTANT")),
        Template("plain", "", ("", ""), sep="", sep2="\n", style="plain"),
    )
}


def get_template(name: str | Template) -> Template:
    """Look a template up by name (a Template passes through)."""
    if isinstance(name, Template):
        return name
    try:
        return TEMPLATES[name]
    except KeyError:
        raise PromptError(
            f"unknown conversation template {name!r}; valid templates: {', '.join(sorted(TEMPLATES))}"
        ) from None


@dataclass
class Conversation:
    """Alternating user / assistant messages, starting with the user, under one template (or its name)."""

    template: Template
    messages: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.template = get_template(self.template)
        messages, self.messages = list(self.messages), []
        for role, text in messages:
            self.append(role, text)

    def append(self, role: str, text: str) -> None:
        """Add a turn; turns must alternate, starting with the user."""
        if role not in (USER, ASSISTANT):
            raise PromptError(f"unknown role {role!r}; a message is from {USER!r} or {ASSISTANT!r}")
        if not isinstance(text, str):
            raise PromptError(f"message text must be a string, got {type(text).__name__}")
        expected = USER if len(self.messages) % 2 == 0 else ASSISTANT
        if role != expected:
            raise PromptError(
                f"message {len(self.messages) + 1} is from the {role} but should be from the {expected}:"
                " turns alternate, starting with the user"
            )
        self.messages.append((role, text))

    def prompt(self) -> str:
        """The text to generate the next answer from."""
        if not self.messages or self.messages[-1][0] != USER:
            raise PromptError("a generation prompt needs the conversation to end with a user message")
        if self.template.style == "plain":
            if len(self.messages) != 1:
                raise PromptError("the plain template takes a single user message")
            return _media_only(self.messages[0][1])
        text, _ = self._render_two()
        return text + self.template.roles[1] + ":"

    def render_for_training(self) -> tuple[str, list[tuple[int, int]]]:
        """The full text and the character spans [start, end) the loss is computed on."""
        if not self.messages or self.messages[-1][0] != ASSISTANT:
            raise PromptError("a training conversation must end with an assistant message")
        for role, text in self.messages:
            if role == ASSISTANT and not text.strip():
                raise PromptError("an assistant message is empty: nothing to learn from")
        if self.template.style == "plain":
            if len(self.messages) != 2:
                raise PromptError(
                    f"the plain template takes one user and one assistant message, got {len(self.messages)} messages"
                )
            head = _media_only(self.messages[0][1]) + self.template.sep
            answer = self.messages[1][1] + self.template.sep2
            return head + answer, [(len(head), len(head) + len(answer))]
        return self._render_two()

    def _render_two(self) -> tuple[str, list[tuple[int, int]]]:
        t = self.template
        parts = [t.system + t.sep] if t.system else []
        length = len(parts[0]) if parts else 0
        spans = []
        for role, text in self.messages:
            name = t.roles[0] if role == USER else t.roles[1]
            head = name + ": "
            tail = t.sep if role == USER else t.sep2
            if role == ASSISTANT:
                start = length + len(head)
                spans.append((start, start + len(text) + len(tail)))
            parts.append(head + text + tail)
            length += len(parts[-1])
        return "".join(parts), spans


def _media_only(user_text: str) -> str:
    """The placeholders of a user turn, in order: all the plain template keeps of it."""
    placeholders = PLACEHOLDER_PATTERN.findall(user_text)
    if not placeholders:
        raise PromptError(
            f"the plain template needs a {IMAGE_PLACEHOLDER} or {VIDEO_PLACEHOLDER} placeholder in the user message"
        )
    return "".join(placeholders)


_LLAVA_ROLES = {"human": USER, "gpt": ASSISTANT}


def from_llava(conversations: Sequence[dict], template: str | Template = "vicuna_v1") -> Conversation:
    """Read the `conversations` list of a LLaVA-style JSON sample, refusing malformed ones."""
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise PromptError("sample has no conversation turns")
    conversation = Conversation(get_template(template))
    for number, turn in enumerate(conversations, start=1):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise PromptError(f"turn {number} is not an object with 'from' and 'value'")
        speaker, value = turn["from"], turn["value"]
        if speaker not in _LLAVA_ROLES:
            raise PromptError(f"turn {number} is from {speaker!r}; expected 'human' or 'gpt'")
        expected = "human" if number % 2 else "gpt"
        if speaker != expected:
            raise PromptError(
                f"turn {number} is from {speaker!r} but should be from {expected!r}:"
                " turns alternate human/gpt, starting with human"
            )
        if not isinstance(value, str) or not value.strip():
            raise PromptError(f"turn {number} ({speaker}) has an empty or non-text value")
        if speaker == "gpt" and any(count_placeholders(value)):
            raise PromptError(f"turn {number} (gpt) contains a media placeholder; they belong in human turns")
        conversation.append(_LLAVA_ROLES[speaker], value)
    if len(conversations) % 2:
        raise PromptError(f"turn {len(conversations)} (human) has no gpt answer after it")
    return conversation


def user_turn(question: str, images: int = 0, videos: int = 0) -> str:
    """A user turn as the template sees it: the media's placeholders (videos, then images), a newline,
    then the question, as in the training data.

    A question that places its own placeholders is kept as written, and must have one per image and video.
    """
    if images < 0 or videos < 0:
        raise ValueError(f"media counts cannot be negative: images={images}, videos={videos}")
    if any(count_placeholders(question)):
        check_placeholders(question, images, videos)
        return question
    if images or videos:
        return VIDEO_PLACEHOLDER * videos + IMAGE_PLACEHOLDER * images + "\n" + question
    return question


def build_prompt(
    question: str,
    images: int = 0,
    videos: int = 0,
    template: str | Template = "vicuna_v1",
    history: Sequence[tuple[str, str]] = (),
) -> str:
    """A generation prompt for `question` about `images` and `videos` after earlier (role, text) turns."""
    return Conversation(
        get_template(template), [*history, (USER, user_turn(question, images, videos))]
    ).prompt()


class Medium(Protocol):
    """What a conversation needs to know of an image or a video it shows."""

    kind: str  # "image" or "video"


M = TypeVar("M", bound=Medium)


@dataclass(frozen=True)
class Exchange(Generic[M]):
    """A finished turn: the user turn as the template sees it, the media it showed, and the answer."""

    question: str
    media: tuple[M, ...]
    answer: str


def _count(media: Sequence[Medium]) -> tuple[int, int]:
    """(images, videos) among `media`."""
    return sum(m.kind == "image" for m in media), sum(m.kind == "video" for m in media)


class ChatHistory(Generic[M]):
    """A conversation about images and videos: its finished turns, each with the media it showed first.

    It renders the next question to a generation prompt through the template, and a turn joins it only
    with its answer, so a question that failed or was stopped leaves no trace. The media of a prompt are
    `media` (shown so far, in order) followed by the question's own.
    """

    def __init__(self, template: str | Template, system: str | None = None):
        template = get_template(template)
        if system is not None and template.style == "two":  # the plain template has no system prompt
            template = dataclasses.replace(template, system=system)
        self.template = template
        self.exchanges: list[Exchange[M]] = []

    def __len__(self) -> int:
        return len(self.exchanges)

    @property
    def media(self) -> list[M]:
        """Every image and video shown so far, in the order the conversation showed them."""
        return [medium for exchange in self.exchanges for medium in exchange.media]

    def messages(self) -> list[tuple[str, str]]:
        """The finished turns as (role, text), user turns with their placeholders."""
        return [
            message
            for exchange in self.exchanges
            for message in ((USER, exchange.question), (ASSISTANT, exchange.answer))
        ]

    def prompt(self, question: str, media: Sequence[M] = ()) -> str:
        """The generation prompt for `question`, which shows `media` (new to the conversation)."""
        turn = user_turn(question, *_count(media))
        return Conversation(self.template, [*self.messages(), (USER, turn)]).prompt()

    def add(self, question: str, media: Sequence[M], answer: str) -> Exchange[M]:
        """Keep a finished turn. The answer loses the whitespace around it: the template writes the space
        after "ASSISTANT:" itself, and an answer as generated follows that space."""
        turn = user_turn(question, *_count(media))
        answer = answer.strip()
        if any(count_placeholders(answer)):
            raise PromptError("an assistant message contains a media placeholder; only user turns show media")
        exchange = Exchange(turn, tuple(media), answer)
        self.exchanges.append(exchange)
        return exchange

    def clear(self) -> None:
        self.exchanges.clear()
