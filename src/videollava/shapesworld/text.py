"""ShapesWorld language: captions, questions and their answers, all read off a scene's description."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from videollava.errors import VideoLlavaError
from videollava.shapesworld.world import COLORS, NUMBER_WORDS, SHAPES, Event, Scene, SceneObject

# The POPE object-probing splits: which absent objects a "no" question asks about.
POPE_SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")
# A "popular" probe asks about one of this many most frequent combinations absent from the scene.
POPULAR_TOP_K = 3

QUESTION_TEMPLATES: dict[str, str] = {
    "color": "What color is the {shape}?",
    "shape": "What shape is the {color} object?",
    "count": "How many objects are there?",
    "exists": "Is there a {color} {shape}?",
    "direction": "Which direction does the {color} {shape} move?",
    "moving": "Which object is moving?",
}
# Questions about videos of ordered events (`Scene.is_sequence`); answers in the same canonical
# style: "the red circle moves left", "the blue square", "yes", "two".
EVENT_QUESTION_TEMPLATES: dict[str, str] = {
    "first_event": "What happens first?",
    "last_event": "What happens last?",
    "moves_after": "Which object moves after the {object}?",
    "moves_before": "Does the {object} move before the {other}?",
    "move_count": "How many objects move?",
    "event_order": "What happens in the video?",
}
# in the order reports list them
QUESTION_TYPES: tuple[str, ...] = tuple(QUESTION_TEMPLATES) + tuple(EVENT_QUESTION_TEMPLATES)
YES_NO_TYPES: tuple[str, ...] = ("exists", "moves_before")  # answered "yes" or "no"
EVENT_ACCOUNT_TYPES: tuple[str, ...] = ("first_event", "last_event", "event_order")  # answered with events
CAPTION_REQUESTS: tuple[str, ...] = (
    "Describe the {media} briefly.",
    "Write a short caption for this {media}.",
    "What does this {media} show?",
    "Give a brief description of the {media}.",
    "Summarize the content of the {media} in one sentence.",
    "Describe the {media}.",
)
INSTRUCT_CAPTION_REQUESTS: tuple[str, ...] = ("Describe the {media}.", "What is shown in this {media}?")
SCENE_TEMPLATES: tuple[str, ...] = (
    "{objects} on a {background} background",
    "a {background} background with {objects}",
    "{objects} against a {background} background",
    "{count} on a {background} background: {objects}",
    "{a_media} of {objects} on a {background} background",
)
# Share of objects that captions name shape first ("a circle in red" rather than "a red circle").
SHAPE_FIRST_PROBABILITY = 0.5
# Motion is phrased with the same words that place objects in stills ("left", "top", ...), so a
# text encoder that learned them from images can tell the directions apart.
MOTION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("moves to the left", "moves left", "slides to the left"),
    "right": ("moves to the right", "moves right", "slides to the right"),
    "up": ("moves up to the top", "moves upward to the top", "slides up toward the top"),
    "down": ("moves down to the bottom", "moves downward to the bottom", "slides down toward the bottom"),
}
MOTION_TEMPLATES: tuple[str, ...] = (
    "{scene}; {motion}.",
    "{scene}, and {motion}.",
    "{scene}. {Motion}.",
    "{scene}. {Motion} while {rest} still.",
)
APPEAR_PHRASES: tuple[str, ...] = ("appears", "comes into view", "shows up")
DISAPPEAR_PHRASES: tuple[str, ...] = ("disappears", "vanishes", "goes away")
# Captions tell a video's events in order, by number of events; `event_order` answers join the
# canonical phrases with ", then ".
SEQUENCE_TEMPLATES: dict[int, tuple[str, ...]] = {
    2: ("First {0}, then {1}.", "{0}, and then {1}.", "{0}; after that, {1}."),
    3: (
        "First {0}, then {1}, and finally {2}.",
        "{0}, then {1}, and then {2}.",
        "{0}; after that, {1}; last, {2}.",
    ),
}
BACKDROP_WORDS: dict[str, str] = {
    "flat": "plain",
    "noise": "noisy",
    "linear": "gradient",
    "radial": "radial gradient",
    "texture": "softly textured",
    "coarse": "speckled",
}


def _article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _join(items: Sequence[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def background_words(scene: Scene) -> str:
    """How captions name the background: its lightness and whether it is noisy; in the wider world
    also its kind ("dark gradient", "speckled")."""
    backdrop = scene.backdrop
    if backdrop is None:
        tone = "dark grey" if scene.background < 100 else ("light grey" if scene.background > 160 else "grey")
        return f"noisy {tone}" if scene.noise else tone
    level = sum(sum(c) for c in backdrop.colors) / (3 * len(backdrop.colors))
    grey = all(c[0] == c[1] == c[2] for c in backdrop.colors)
    if backdrop.style in ("flat", "noise") and grey:
        tone = "dark grey" if level < 100 else ("light grey" if level > 160 else "grey")
        return f"noisy {tone}" if backdrop.style == "noise" else tone
    tone = "dark " if level < 100 else ("light " if level > 160 else "")
    return tone + BACKDROP_WORDS[backdrop.style]


def place_words(scene: Scene, obj: SceneObject) -> str:
    """Where an object sits, in thirds of the frame: "at the top left", "on the right", "in the middle"."""
    x, y = obj.start
    column = ("left", None, "right")[min(2, int(3 * x / scene.width))]
    row = ("top", None, "bottom")[min(2, int(3 * y / scene.height))]
    if row and column:
        return f"at the {row} {column}"
    if row:
        return f"at the {row}"
    if column:
        return f"on the {column}"
    return "in the middle"


def object_words(obj: SceneObject, rng: np.random.Generator) -> str:
    """Colour first ("a red circle") or, as often, shape first ("a circle in red").

    Said shape first, a caption makes its writer find an object by its shape and then name its
    colour: the lookup that "What color is the circle?" asks for, which colour-first wording
    never practises.
    """
    if rng.random() < SHAPE_FIRST_PROBABILITY:
        return f"{_article(obj.shape)} in {obj.color}"
    return _article(obj.name)


def _scene_words(scene: Scene, objects: Sequence[SceneObject], rng: np.random.Generator) -> str:
    names = [object_words(o, rng) for o in objects]
    names = [
        name if o.moves else f"{name} {place_words(scene, o)}" for name, o in zip(names, objects, strict=True)
    ]
    names = [names[int(i)] for i in rng.permutation(len(names))]
    count = len(objects)
    template = SCENE_TEMPLATES[int(rng.integers(len(SCENE_TEMPLATES)))]
    return template.format(
        objects=_join(names),
        background=background_words(scene),
        count=f"{NUMBER_WORDS[count]} shape{'s' if count > 1 else ''}",
        a_media="an image" if scene.kind == "image" else "a video",
    )


def make_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption naming every object, where still ones sit, and the motion in videos; in a video of
    ordered events, the objects there at the start and then its events in order."""
    if scene.is_sequence:
        return _sequence_caption(scene, rng)
    text = _scene_words(scene, scene.objects, rng)
    mover = scene.moving_object
    if mover is None or scene.direction is None:
        return _capitalise(text) + "."
    phrases = MOTION_PHRASES[scene.direction]
    motion = f"the {mover.name} {phrases[int(rng.integers(len(phrases)))]}"
    count = len(scene.objects)
    templates = MOTION_TEMPLATES if count > 1 else MOTION_TEMPLATES[:3]
    template = templates[int(rng.integers(len(templates)))]
    rest = "the other shape stays" if count == 2 else "the others stay"
    return _capitalise(template.format(scene=text, motion=motion, Motion=_capitalise(motion), rest=rest))


def event_words(event: Event, rng: np.random.Generator) -> str:
    """An event as a caption tells it: "the red circle slides to the left", "a blue square appears"."""
    obj = event.obj
    if event.kind == "move":
        phrases = MOTION_PHRASES[obj.direction or ""]
        return f"the {obj.name} {phrases[int(rng.integers(len(phrases)))]}"
    if event.kind == "appear":
        return f"{_article(obj.name)} {APPEAR_PHRASES[int(rng.integers(len(APPEAR_PHRASES)))]}"
    return f"the {obj.name} {DISAPPEAR_PHRASES[int(rng.integers(len(DISAPPEAR_PHRASES)))]}"


def _sequence_caption(scene: Scene, rng: np.random.Generator) -> str:
    there = [o for o in scene.objects if o.appears is None]
    text = _capitalise(_scene_words(scene, there, rng)) + "."
    events = scene.events
    templates = SEQUENCE_TEMPLATES[len(events)]
    told = templates[int(rng.integers(len(templates)))].format(*(event_words(e, rng) for e in events))
    return f"{text} {_capitalise(told)}"


def event_order_answer(scene: Scene) -> str:
    """The canonical account of a video's events: "the red circle moves left, then the blue square appears"."""
    return ", then ".join(e.words for e in scene.events)


# What may stand between the events of an account: "First ..., then ..., and finally ...".
_CONNECTIVES = re.compile(r"\b(?:first|then|and|after|that|finally|last|next)\b|[\s,;.:!]")


# Every way the captions tell what an object does, to the answers' canonical verb.
_CANONICAL_VERBS: dict[str, str] = {
    **{phrase: f"moves {d}" for d, phrases in MOTION_PHRASES.items() for phrase in phrases},
    **{f"moves {d}": f"moves {d}" for d in MOTION_PHRASES},
    **dict.fromkeys(APPEAR_PHRASES, "appears"),
    **dict.fromkeys(DISAPPEAR_PHRASES, "disappears"),
}
# One event in any of those wordings; the object's colour, shape and verb are its groups. The
# longest verbs go first, so "moves to the left" is never read as "moves" and words left over.
_EVENT = re.compile(
    rf"\b(?:the|an|a) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) "
    rf"({'|'.join(re.escape(v) for v in sorted(_CANONICAL_VERBS, key=len, reverse=True))})\b"
)


def read_events(text: str) -> list[str] | None:
    """The events an account tells, in its order and canonical words ("the red circle moves left");
    None when it says anything besides events and the words that join them.

    So "First a blue square appears, and then the red circle slides to the left." reads as the
    canonical "the blue square appears, then the red circle moves left".
    """
    lowered = text.lower()
    events, rest, at = [], [], 0
    for match in _EVENT.finditer(lowered):
        rest.append(lowered[at : match.start()])
        colour, shape, verb = match.groups()
        events.append(f"the {colour} {shape} {_CANONICAL_VERBS[verb]}")
        at = match.end()
    rest.append(lowered[at:])
    if not events or _CONNECTIVES.sub("", "".join(rest)):
        return None
    return events


def popularity_ranking(scenes: Iterable[Scene]) -> list[tuple[str, str]]:
    """Colour-shape combinations from most to least frequent over a set of scenes (POPE 'popular')."""
    counts = Counter((o.color, o.shape) for s in scenes for o in s.objects)
    colors, shapes = list(COLORS), list(SHAPES)
    combos = [(c, s) for c in colors for s in shapes]
    return sorted(combos, key=lambda cs: (-counts[cs], colors.index(cs[0]), shapes.index(cs[1])))


def absent_object(
    scene: Scene, split: str, rng: np.random.Generator, ranking: Sequence[tuple[str, str]]
) -> tuple[str, str]:
    """A colour-shape combination not in the scene, drawn the way the POPE split asks."""
    present = {(o.color, o.shape) for o in scene.objects}
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    if split == "popular":
        pool = [cs for cs in ranking if cs not in present][:POPULAR_TOP_K]
    elif split == "adversarial":
        colours = {c for c, _ in present}
        shapes = {s for _, s in present}
        pool = [(c, s) for c, s in absent if c in colours or s in shapes]
    elif split == "random":
        pool = absent
    else:
        raise VideoLlavaError(f"unknown POPE split {split!r}")
    return pool[int(rng.integers(len(pool)))]


def exists_question(
    scene: Scene, split: str, answer_yes: bool, rng: np.random.Generator, ranking: Sequence[tuple[str, str]]
) -> dict[str, Any]:
    if answer_yes:
        obj = scene.objects[int(rng.integers(len(scene.objects)))]
        color, shape = obj.color, obj.shape
    else:
        color, shape = absent_object(scene, split, rng, ranking)
    text = QUESTION_TEMPLATES["exists"].format(color=color, shape=shape)
    return {"type": "exists", "split": split, "question": text, "answer": "yes" if answer_yes else "no"}


def fixed_questions(scene: Scene) -> list[dict[str, Any]]:
    """Every non-probing canonical question that applies to the scene, with its answer."""
    out: list[dict[str, Any]] = []
    shape_counts = Counter(o.shape for o in scene.objects)
    for obj in scene.objects:
        if shape_counts[obj.shape] == 1:
            out.append(
                {"type": "color", "split": None, "answer": obj.color} | _text("color", shape=obj.shape)
            )
    for obj in scene.objects:
        out.append({"type": "shape", "split": None, "answer": obj.shape} | _text("shape", color=obj.color))
    if scene.is_sequence:  # how many there are changes over the clip; every mover has its direction
        for obj in scene.objects:
            if obj.moves:
                out.append(
                    {"type": "direction", "split": None, "answer": obj.direction or ""}
                    | _text("direction", color=obj.color, shape=obj.shape)
                )
        return out
    out.append({"type": "count", "split": None, "answer": NUMBER_WORDS[len(scene.objects)]} | _text("count"))
    mover = scene.moving_object
    if scene.kind == "video" and mover is not None and scene.direction is not None:
        out.append(
            {"type": "direction", "split": None, "answer": scene.direction}
            | _text("direction", color=mover.color, shape=mover.shape)
        )
        out.append({"type": "moving", "split": None, "answer": f"the {mover.name}"} | _text("moving"))
    return out


def _text(qtype: str, **slots: str) -> dict[str, str]:
    templates = QUESTION_TEMPLATES if qtype in QUESTION_TEMPLATES else EVENT_QUESTION_TEMPLATES
    return {"question": templates[qtype].format(**slots)}


def _reference(scene: Scene, objs: Sequence[SceneObject]) -> list[str]:
    """How questions name objects: by shape alone when each one's shape is its own in the scene."""
    shapes = Counter(o.shape for o in scene.objects)
    if all(shapes[o.shape] == 1 for o in objs):
        return [o.shape for o in objs]
    return [o.name for o in objs]


def event_questions(scene: Scene, rng: np.random.Generator | None = None) -> list[dict[str, Any]]:
    """The questions about the order of a video's events, with their answers.

    What happens first and last, the whole order, how many objects move; for each object that moves
    with exactly one mover after it, which object that is; for every two movers, whether one moves
    before the other: both ways round without ``rng`` (held-out sets: as many yes as no), one way
    drawn from ``rng`` otherwise.
    """
    events = scene.events
    movers = [e.obj for e in events if e.kind == "move"]
    out: list[dict[str, Any]] = [
        {"type": "first_event", "split": None, "answer": events[0].words} | _text("first_event"),
        {"type": "last_event", "split": None, "answer": events[-1].words} | _text("last_event"),
        {"type": "event_order", "split": None, "answer": event_order_answer(scene)} | _text("event_order"),
        {"type": "move_count", "split": None, "answer": NUMBER_WORDS[len(movers)]} | _text("move_count"),
    ]
    if len(movers) >= 2:
        before, last = movers[-2], movers[-1]
        out.append(
            {"type": "moves_after", "split": None, "answer": f"the {last.name}"}
            | _text("moves_after", object=before.name)
        )
    for i, a in enumerate(movers):
        for b in movers[i + 1 :]:
            ways = [(a, b), (b, a)]
            if rng is not None:
                ways = [ways[int(rng.integers(2))]]
            for x, y in ways:
                ref_x, ref_y = _reference(scene, (x, y))
                answer = "yes" if x is a else "no"
                out.append(
                    {"type": "moves_before", "split": None, "answer": answer}
                    | _text("moves_before", object=ref_x, other=ref_y)
                )
    return out


class ProbeBalancer:
    """Hands out POPE splits round-robin and alternates yes/no within each split, so both stay balanced."""

    def __init__(self) -> None:
        self.n_probes = 0
        self.per_split: Counter[str] = Counter()

    def peek(self) -> tuple[str, bool]:
        split = POPE_SPLITS[self.n_probes % len(POPE_SPLITS)]
        return split, self.per_split[split] % 2 == 0

    def commit(self) -> None:
        split, _ = self.peek()
        self.n_probes += 1
        self.per_split[split] += 1


def instruct_turns(
    scene: Scene,
    caption: str,
    rng: np.random.Generator,
    ranking: Sequence[tuple[str, str]],
    balancer: ProbeBalancer,
    caption_probability: float = 0.15,
) -> list[dict[str, Any]]:
    """Four to eight question-answer turns for one media.

    Many turns per media make each (costly) pass over its visual tokens teach more answers. Yes/no
    probes come from ``balancer`` so that splits and answers stay balanced over the file, and every
    video asks both motion questions, the ones a single frame cannot answer.
    """
    if scene.is_sequence:
        return _sequence_turns(scene, caption, rng, ranking, balancer, caption_probability)
    n_turns = int(rng.integers(4, 9))
    n_probes = int(rng.choice(4, p=[0.1, 0.3, 0.4, 0.2]))
    turns = _probes(scene, n_probes, rng, ranking, balancer)
    others = fixed_questions(scene)
    others = [others[int(i)] for i in rng.permutation(len(others))]
    motion = [q for q in others if q["type"] in ("direction", "moving")]
    turns.extend(motion)
    others = [q for q in others if q not in motion]
    if rng.random() < caption_probability:
        request = INSTRUCT_CAPTION_REQUESTS[int(rng.integers(len(INSTRUCT_CAPTION_REQUESTS)))]
        question = request.format(media=scene.kind)
        others.insert(0, {"type": "caption", "split": None, "question": question, "answer": caption})
    turns.extend(others[: max(0, n_turns - len(turns))])
    return [turns[int(i)] for i in rng.permutation(len(turns))]


def _probes(
    scene: Scene,
    n_probes: int,
    rng: np.random.Generator,
    ranking: Sequence[tuple[str, str]],
    balancer: ProbeBalancer,
) -> list[dict[str, Any]]:
    turns: list[dict[str, Any]] = []
    seen: set[str] = set()
    for _ in range(n_probes):
        split, yes = balancer.peek()
        for _attempt in range(10):
            probe = exists_question(scene, split, yes, rng, ranking)
            if probe["question"] not in seen:
                seen.add(probe["question"])
                turns.append(probe)
                balancer.commit()
                break
    return turns


def _sequence_turns(
    scene: Scene,
    caption: str,
    rng: np.random.Generator,
    ranking: Sequence[tuple[str, str]],
    balancer: ProbeBalancer,
    caption_probability: float,
) -> list[dict[str, Any]]:
    """The turns for a video of ordered events: every question about its order and every mover's
    direction, up to two yes/no probes, then colours and shapes while there are fewer than six
    to ten turns (drawn)."""
    n_turns = int(rng.integers(6, 11))
    n_probes = int(rng.choice(3, p=[0.3, 0.4, 0.3]))
    turns = _probes(scene, n_probes, rng, ranking, balancer)
    order = event_questions(scene, rng)
    order = [order[int(i)] for i in rng.permutation(len(order))]
    others = fixed_questions(scene)
    turns += order + [q for q in others if q["type"] == "direction"]
    others = [q for q in others if q["type"] != "direction"]
    others = [others[int(i)] for i in rng.permutation(len(others))]
    if rng.random() < caption_probability:
        request = INSTRUCT_CAPTION_REQUESTS[int(rng.integers(len(INSTRUCT_CAPTION_REQUESTS)))]
        others.insert(
            0,
            {"type": "caption", "split": None, "question": request.format(media="video"), "answer": caption},
        )
    turns.extend(others[: max(0, n_turns - len(turns))])
    return [turns[int(i)] for i in rng.permutation(len(turns))]


def heldout_questions(
    scene: Scene, rng: np.random.Generator, ranking: Sequence[tuple[str, str]]
) -> list[dict[str, Any]]:
    """All canonical questions of a held-out scene, with one yes and one no probe per POPE split."""
    out = fixed_questions(scene)
    if scene.is_sequence:
        out += event_questions(scene)
    for split in POPE_SPLITS:
        out.append(exists_question(scene, split, True, rng, ranking))
        out.append(exists_question(scene, split, False, rng, ranking))
    return out
