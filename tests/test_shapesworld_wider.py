"""The wider ShapesWorld and its videos of ordered events: the contrast rule, the new ranges, the
events shown in the order stated, their questions and captions, the splits, and the standard data
set left exactly as it was."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest

from videollava.data.frame_sampling import frame_indices
from videollava.data.regions import parse_regions
from videollava.errors import VideoLlavaError
from videollava.shapesworld.backdrops import BACKDROP_STYLES, Backdrop, delta_e2000, srgb_to_lab
from videollava.shapesworld.evaluate import Question, is_correct
from videollava.shapesworld.generate import GenerationConfig, generate, object_regions
from videollava.shapesworld.render import (
    BACKDROP_MIN_DELTA_E,
    CONTRAST_MIN_DELTA_E,
    background_pixels,
    render_array,
)
from videollava.shapesworld.text import (
    APPEAR_PHRASES,
    DISAPPEAR_PHRASES,
    MOTION_PHRASES,
    POPE_SPLITS,
    event_order_answer,
    event_questions,
    make_caption,
    read_events,
)
from videollava.shapesworld.twins import contrast_twin
from videollava.shapesworld.wide import STANDARD, VARIETY, sample_event_scene, sample_wide_scene
from videollava.shapesworld.world import COLORS, MIN_TRAVEL, SHAPES, Scene

TOLERANCE = 30  # per channel, for H.264
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _digest(root: Path, skip: tuple[str, ...] = ()) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if not rel.startswith(skip):
            digest.update(rel.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _wide_scenes(n: int, seed: int = 0) -> list[Scene]:
    """Images and single-mover videos of the wider world, and ordered-event videos of both worlds."""
    scenes = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        if i % 3 == 2:
            scenes.append(sample_event_scene(rng, VARIETY if i % 2 else STANDARD, scene_id=f"e{i}"))
        else:
            scenes.append(sample_wide_scene(rng, ("image", "video")[i % 3], VARIETY, scene_id=f"w{i}"))
    return scenes


# ------------------------------------------------------------------- colour distance


def test_ciede2000_matches_published_pairs() -> None:
    # Sharma, Wu and Dalal (2005), table 1: pairs 1, 17, 18, 19, 20 and 34
    pairs = [
        ((50.0, 2.6772, -79.7751), (50.0, 0.0, -82.7485), 2.0425),
        ((50.0, 2.5, 0.0), (73.0, 25.0, -18.0), 27.1492),
        ((50.0, 2.5, 0.0), (61.0, -5.0, 29.0), 22.8977),
        ((50.0, 2.5, 0.0), (56.0, -27.0, -3.0), 31.9030),
        ((50.0, 2.5, 0.0), (58.0, 24.0, 15.0), 19.4535),
        ((84.25, 5.74, 96.0), (84.46, 8.88, 96.49), 1.6743),
    ]
    for a, b, expected in pairs:
        assert float(delta_e2000(a, b)) == pytest.approx(expected, abs=1e-4)
        assert float(delta_e2000(b, a)) == pytest.approx(expected, abs=1e-4)  # symmetric
    batch = delta_e2000(np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs]))
    assert batch == pytest.approx([p[2] for p in pairs], abs=1e-4)
    assert np.allclose(srgb_to_lab((255, 255, 255)), (100.0, 0.0, 0.0), atol=1e-3)
    assert np.allclose(srgb_to_lab((255, 0, 0)), (53.2408, 80.0925, 67.2032), atol=1e-3)
    assert float(delta_e2000(srgb_to_lab((120, 120, 120)), srgb_to_lab((120, 120, 120)))) == 0.0


# ------------------------------------------------------------------- backdrops


def test_every_backdrop_style_draws_the_same_pixels_again_and_survives_json() -> None:
    rng = np.random.default_rng(3)
    from videollava.shapesworld.backdrops import random_backdrop

    for style in BACKDROP_STYLES:
        backdrop = random_backdrop(rng, style, tint=45, levels=(70, 190), noise=(4, 12))
        pixels = backdrop.pixels(150, 90)
        assert pixels.shape == (90, 150, 3) and pixels.dtype == np.uint8
        assert np.array_equal(pixels, backdrop.pixels(150, 90))
        again = Backdrop.from_dict(json.loads(json.dumps(backdrop.to_dict())))
        assert again == backdrop and np.array_equal(again.pixels(150, 90), pixels)
        distinct = len(np.unique(pixels.reshape(-1, 3), axis=0))
        assert (distinct == 1) == (style == "flat"), style


def test_gradients_run_from_one_colour_to_the_other() -> None:
    linear = Backdrop("linear", ((40, 60, 80), (200, 180, 160)), angle=0.0).pixels(100, 20)
    assert np.abs(linear[:, 0].astype(int) - (40, 60, 80)).max() <= 2
    assert np.abs(linear[:, -1].astype(int) - (200, 180, 160)).max() <= 2
    assert (np.diff(linear[10, :, 0].astype(int)) >= 0).all()  # monotone along the angle
    down = Backdrop("linear", ((40, 60, 80), (200, 180, 160)), angle=90.0).pixels(20, 100)
    assert np.abs(down[0, :].astype(int) - (40, 60, 80)).max() <= 2
    radial = Backdrop("radial", ((30, 30, 30), (220, 220, 220)), center=(0.25, 0.5)).pixels(80, 40)
    assert radial[20, 20, 0] < 40 and radial[20, 79, 0] > radial[20, 50, 0] > radial[20, 20, 0]


def test_backdrops_refuse_bad_descriptions() -> None:
    with pytest.raises(VideoLlavaError, match="style"):
        Backdrop("plaid", ((1, 2, 3),))
    with pytest.raises(VideoLlavaError, match="colour"):
        Backdrop("linear", ((1, 2, 3),))
    with pytest.raises(VideoLlavaError, match="scale"):
        Backdrop("texture", ((1, 2, 3), (4, 5, 6)), scale=0)


# ------------------------------------------------------------------- the contrast rule


def _surrounding_lab(scene: Scene, obj) -> np.ndarray:
    """The rule's pixels found here from scratch, in CIELAB: the background (as frames draw it)
    wherever a pixel's centre lies within size/sqrt(2) + max(3, size/4) of a point of the path."""
    background = render_array(replace(scene, objects=()), 0)
    reach = obj.size / math.sqrt(2) + max(3.0, obj.size / 4)
    ys, xs = np.mgrid[0 : scene.height, 0 : scene.width] + 0.5
    near = np.zeros((scene.height, scene.width), dtype=bool)
    for t in np.linspace(0.0, 1.0, 41):  # path points 1/40 of the path apart, far under the margin
        px = obj.start[0] + (obj.end[0] - obj.start[0]) * t
        py = obj.start[1] + (obj.end[1] - obj.start[1]) * t
        near |= np.hypot(xs - px, ys - py) <= reach
    region = np.unique(background[near], axis=0)
    assert len(region) > 0
    return srgb_to_lab(region)


def _contrast(region_lab: np.ndarray, color: str) -> float:
    return float(delta_e2000(region_lab, srgb_to_lab(COLORS[color])).min())


def test_every_object_keeps_its_contrast_with_the_background_around_it() -> None:
    tight = excluded = 0
    palette = srgb_to_lab(np.array(list(COLORS.values())))
    for scene in _wide_scenes(45):
        assert scene.backdrop is not None
        # rule 2: no pixel of the backdrop comes close to any colour of the world
        colours = np.unique(render_array(replace(scene, objects=()), 0).reshape(-1, 3), axis=0)
        nearest = delta_e2000(srgb_to_lab(colours)[:, None, :], palette[None, :, :]).min()
        assert nearest >= BACKDROP_MIN_DELTA_E - 0.05, (scene.id, nearest)
        for obj in scene.objects:
            region = _surrounding_lab(scene, obj)
            contrast = _contrast(region, obj.color)
            assert contrast >= CONTRAST_MIN_DELTA_E - 0.05, (scene.id, obj.name, contrast)
            tight += contrast < CONTRAST_MIN_DELTA_E + 8
            # some colour of the world would have broken the rule where this object lies
            excluded += any(_contrast(region, c) < CONTRAST_MIN_DELTA_E for c in COLORS if c != obj.color)
    # the rule is not idle: objects sit close to it, and it ruled colours out
    assert tight > 0 and excluded > 0


def test_the_standard_world_already_keeps_the_contrast_rule() -> None:
    from videollava.shapesworld.render import meets_contrast_rule, object_contrasts
    from videollava.shapesworld.world import sample_scene

    rng = np.random.default_rng(1)
    for i in range(60):
        scene = sample_scene(rng, "video" if i % 2 else "image")
        assert min(object_contrasts(scene)) >= CONTRAST_MIN_DELTA_E and meets_contrast_rule(scene)
    # and a scene that breaks it is told apart: the same objects on a backdrop close to red
    broken = replace(scene, backdrop=Backdrop("flat", ((190, 60, 50),)))
    assert not meets_contrast_rule(broken)


# ------------------------------------------------------------------- the wider world's ranges


def test_wider_world_ranges() -> None:
    rng = np.random.default_rng(0)
    styles, counts, ratios = Counter(), Counter(), []
    smallest, largest = 1.0, 0.0
    for i in range(240):
        kind = "video" if i % 2 else "image"
        scene = sample_wide_scene(rng, kind, VARIETY, min_size=96, max_size=160)
        short, long = sorted((scene.width, scene.height))
        assert short >= 96 and long / short <= 2.4 + 1e-9
        ratios.append(scene.width / scene.height)
        styles[scene.backdrop.style] += 1
        counts[len(scene.objects)] += 1
        assert len({o.color for o in scene.objects}) == len(scene.objects)
        for obj in scene.objects:
            fraction = obj.size / short
            smallest, largest = min(smallest, fraction), max(largest, fraction)
            assert 0.10 - 1e-3 <= fraction <= 0.40 + 1e-3
            for x, y in (obj.start, obj.end):
                assert obj.size / 2 - 0.01 <= x <= scene.width - obj.size / 2 + 0.01
                assert obj.size / 2 - 0.01 <= y <= scene.height - obj.size / 2 + 0.01
        for a_index, a in enumerate(scene.objects):
            for b in scene.objects[a_index + 1 :]:
                for t in np.linspace(0, 1, 40):
                    (ax, ay), (bx, by) = a.center(t), b.center(t)
                    assert math.hypot(ax - bx, ay - by) >= a.radius + b.radius
        if kind == "video":
            assert scene.width % 2 == 0 and scene.height % 2 == 0
            assert [o.direction for o in scene.objects if o.moves] == [scene.direction]
    assert set(styles) == set(BACKDROP_STYLES)
    assert set(counts) == {1, 2, 3, 4}
    assert min(ratios) < 1 / 1.9 and max(ratios) > 1.9  # tall and wide beyond 16:9
    assert smallest < 0.12 and largest > 0.37


# ------------------------------------------------------------------- ordered events


def _changes(scene: Scene, indices) -> list[tuple[int, int, str, int, str | None]]:
    """What changes between the given frames, read from the world state alone (positions and
    visibility per frame): (first step, last step, kind, object index, direction), in order."""
    times = [scene.time(int(i)) for i in indices]
    found = []
    for j, obj in enumerate(scene.objects):
        seen = [obj.visible(t) for t in times]
        where = [obj.center(t) for t in times]
        moved = [k for k in range(1, len(times)) if where[k] != where[k - 1]]
        if moved:
            dx, dy = where[-1][0] - where[0][0], where[-1][1] - where[0][1]
            way = ("left" if dx < 0 else "right") if abs(dx) > abs(dy) else ("up" if dy < 0 else "down")
            found.append((moved[0], moved[-1], "move", j, way))
        for k in range(1, len(times)):
            if seen[k] != seen[k - 1]:
                found.append((k, k, "appear" if seen[k] else "disappear", j, None))
    return sorted(found)


def test_event_videos_hold_their_events_in_the_stated_order() -> None:
    n_events = Counter()
    for i in range(60):
        rng = np.random.default_rng([9, i])
        frames = (40, 60) if i % 4 == 0 else (48, 128)  # the shortest clips allowed, too
        scene = sample_event_scene(rng, VARIETY if i % 2 else STANDARD, scene_id=f"e{i}", frames=frames)
        events = scene.events
        n_events[len(events)] += 1
        assert 2 <= len(events) <= 3 and frames[0] <= scene.n_frames <= frames[1]
        assert scene.is_sequence and scene.direction is None
        kinds = [e.kind for e in events]
        assert "move" in kinds and kinds.count("appear") <= 1 and kinds.count("disappear") <= 1
        assert len({id(e.obj) for e in events}) == len(events)  # each event by another object
        every = _changes(scene, range(scene.n_frames))
        assert [(c[2], scene.objects[c[3]]) for c in every] == [(e.kind, e.obj) for e in events]
        for (_, last, *_), (first, *_) in zip(every, every[1:], strict=False):
            assert last < first  # one event is over before the next begins, frame by frame
        for change, event in zip(every, events, strict=True):
            if event.kind == "move":
                assert change[4] == event.obj.direction
                extent = scene.width if change[4] in ("left", "right") else scene.height
                travel = abs(event.obj.end[0] - event.obj.start[0]) + abs(
                    event.obj.end[1] - event.obj.start[1]
                )
                assert travel >= MIN_TRAVEL * extent
        assert any(o.visible(0.0) for o in scene.objects) and any(o.visible(1.0) for o in scene.objects)
        # seen through 8 frames sampled the reference's way, every event still shows, in order
        sampled = _changes(scene, frame_indices(scene.n_frames, 8))
        assert [(c[2], scene.objects[c[3]]) for c in sampled] == [(e.kind, e.obj) for e in events]
        assert all(a[0] < b[0] for a, b in zip(sampled, sampled[1:], strict=False))
        # objects keep apart at every instant, showing or not
        for a_index, a in enumerate(scene.objects):
            for b in scene.objects[a_index + 1 :]:
                for t in np.linspace(0, 1, 200):
                    (ax, ay), (bx, by) = a.center(t), b.center(t)
                    assert math.hypot(ax - bx, ay - by) >= a.radius + b.radius
    assert n_events[2] > 0 and n_events[3] > 0


def test_event_scenes_survive_json() -> None:
    for scene in _wide_scenes(12):
        again = Scene.from_dict(json.loads(json.dumps(scene.to_dict())))
        assert again == scene
        assert np.array_equal(
            render_array(again, again.n_frames - 1), render_array(scene, scene.n_frames - 1)
        )
        if scene.is_sequence:
            assert [e["kind"] for e in scene.to_dict()["events"]] == [e.kind for e in scene.events]


def test_order_twins_swap_two_events_and_nothing_else() -> None:
    made = 0
    for i in range(30):
        rng = np.random.default_rng([4, i])
        scene = sample_event_scene(rng, STANDARD, scene_id=f"e{i}")
        twin = contrast_twin(scene, np.random.default_rng(i))
        if twin is None:
            continue
        made += 1
        before, after = (
            [(e.kind, e.obj.name) for e in scene.events],
            [(e.kind, e.obj.name) for e in twin.events],
        )
        assert sorted(before) == sorted(after) and before != after
        swapped = [k for k in range(len(before)) if before[k] != after[k]]
        assert len(swapped) == 2 and swapped[1] == swapped[0] + 1
        for a, b in zip(scene.objects, twin.objects, strict=True):
            assert (a.color, a.shape, a.size, a.start, a.end) == (b.color, b.shape, b.size, b.start, b.end)
        sampled = _changes(twin, frame_indices(twin.n_frames, 8))  # still shows its events, in order
        assert [(c[2], twin.objects[c[3]].name) for c in sampled] == after
    assert made >= 20


@pytest.fixture(scope="module")
def wide_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sw_wide")
    generate(
        root,
        GenerationConfig(
            seed=2, images=8, videos=4, test_images=3, test_videos=2, twins=1.0, variety=0.5,
            variety_test_images=4, variety_test_videos=3, event_videos=5, event_test_videos=5, workers=2,
        ),
    )  # fmt: skip
    return root


def _decode(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def test_event_videos_show_each_object_where_and_when_the_world_says(wide_data: Path) -> None:
    checked = 0
    for folder in (wide_data, wide_data / "events"):
        for row in _read_jsonl(folder / "scenes.jsonl"):
            scene = Scene.from_dict(row)
            if not scene.is_sequence:
                continue
            frames = _decode(folder / "media" / row["media"])
            assert len(frames) == scene.n_frames and frames[0].shape == (scene.height, scene.width, 3)
            background = background_pixels(scene).astype(int)
            for index, frame in enumerate(frames):
                t = scene.time(index)
                for obj in scene.objects:
                    x, y = obj.center(t)
                    pixel = frame[int(y), int(x)].astype(int)
                    if obj.visible(t):
                        assert np.abs(pixel - COLORS[obj.color]).max() <= TOLERANCE, (
                            row["media"],
                            index,
                            obj.name,
                        )
                    else:  # not there: the background shows, far from the object's colour
                        assert np.abs(pixel - background[int(y), int(x)]).max() <= TOLERANCE
                        seen = float(delta_e2000(srgb_to_lab(pixel), srgb_to_lab(COLORS[obj.color])))
                        assert seen > CONTRAST_MIN_DELTA_E / 2
            checked += 1
    assert checked >= 8


# ------------------------------------------------------------------- questions, answers, captions


def _check_event_answer(scene: Scene, qtype: str, question: str, answer: str) -> None:
    """Each answer worked out again from the per-frame world state (not from `Scene.events`)."""
    changes = _changes(scene, range(scene.n_frames))

    def words(change) -> str:
        obj = scene.objects[change[3]]
        verb = {"move": f"moves {change[4]}", "appear": "appears", "disappear": "disappears"}[change[2]]
        return f"the {obj.name} {verb}"

    movers = [scene.objects[c[3]] for c in changes if c[2] == "move"]
    shapes = Counter(o.shape for o in scene.objects)

    def named(text: str):
        hits = [o for o in scene.objects if text in (o.name, o.shape)]
        assert len(hits) == 1 and (text == hits[0].name or shapes[text] == 1), text
        return hits[0]

    assert answer == answer.lower()
    if qtype == "first_event":
        assert question == "What happens first?" and answer == words(changes[0])
    elif qtype == "last_event":
        assert question == "What happens last?" and answer == words(changes[-1])
    elif qtype == "event_order":
        assert question == "What happens in the video?"
        assert answer == ", then ".join(words(c) for c in changes)
    elif qtype == "move_count":
        assert question == "How many objects move?" and answer == NUMBERS[len(movers)]
    elif qtype == "moves_after":
        (name,) = re.fullmatch(r"Which object moves after the (.+)\?", question).groups()
        after = movers[movers.index(named(name)) + 1 :]
        assert len(after) == 1 and answer == f"the {after[0].name}"
    elif qtype == "moves_before":
        first, second = re.fullmatch(r"Does the (.+) move before the (.+)\?", question).groups()
        a, b = named(first), named(second)
        assert answer == ("yes" if movers.index(a) < movers.index(b) else "no")
    elif qtype == "direction":
        (name,) = re.fullmatch(r"Which direction does the (.+) move\?", question).groups()
        change = next(c for c in changes if scene.objects[c[3]] is named(name))
        assert answer == change[4]
    elif qtype == "color":
        (shape,) = re.fullmatch(r"What color is the (\w+)\?", question).groups()
        assert shapes[shape] == 1 and answer == next(o.color for o in scene.objects if o.shape == shape)
    elif qtype == "shape":
        (color,) = re.fullmatch(r"What shape is the (\w+) object\?", question).groups()
        assert answer == next(o.shape for o in scene.objects if o.color == color)
    elif qtype == "exists":
        (color, shape) = re.fullmatch(r"Is there an? (\w+) (\w+)\?", question).groups()
        assert answer == ("yes" if (color, shape) in {(o.color, o.shape) for o in scene.objects} else "no")
    else:
        raise AssertionError(f"unexpected question type {qtype} for a video of events")


def test_held_out_event_questions_are_canonical_and_right(wide_data: Path) -> None:
    scenes = {
        row["media"]: Scene.from_dict(row) for row in _read_jsonl(wide_data / "events" / "scenes.jsonl")
    }
    questions = _read_jsonl(wide_data / "events" / "test_questions.jsonl")
    assert [q["question_id"] for q in questions] == list(range(len(questions)))
    for q in questions:
        scene = scenes[q["media"]]
        assert q["modality"] == "video" and scene.is_sequence
        _check_event_answer(scene, q["type"], q["question"], q["answer"])
        assert (q["split"] in POPE_SPLITS) == (q["type"] == "exists")
    types = Counter(q["type"] for q in questions)
    for name in ("first_event", "last_event", "event_order", "move_count", "direction"):
        assert types[name] >= 5 if name != "direction" else types[name] > 0
    assert "count" not in types and "moving" not in types  # both change over such a clip
    before = Counter(q["answer"] for q in questions if q["type"] == "moves_before")
    assert before["yes"] == before["no"]  # both ways round


def test_every_sampled_event_question_is_right() -> None:
    """Many scenes, text only: every question that `event_questions` asks, checked from frames."""
    types = Counter()
    for i in range(80):
        rng = np.random.default_rng([5, i])
        scene = sample_event_scene(rng, VARIETY if i % 2 else STANDARD, scene_id=f"e{i}")
        for q in event_questions(scene, rng if i % 2 else None):
            types[q["type"]] += 1
            _check_event_answer(scene, q["type"], q["question"], q["answer"])
    assert set(types) == {
        "first_event",
        "last_event",
        "event_order",
        "move_count",
        "moves_after",
        "moves_before",
    }


def _event_part(scene: Scene, caption: str) -> str:
    """The sentence(s) after the scene's description: where a caption tells the events."""
    return caption.split(". ", 1)[1].lower()


def test_captions_tell_the_events_in_order(wide_data: Path) -> None:
    told = 0
    for folder in (wide_data, wide_data / "events"):
        for row in _read_jsonl(folder / "scenes.jsonl"):
            scene = Scene.from_dict(row)
            if not scene.is_sequence:
                continue
            told += 1
            part = _event_part(scene, row["caption"])
            changes = _changes(scene, range(scene.n_frames))
            places = []
            for change in changes:
                obj = scene.objects[change[3]]
                if change[2] == "move":
                    phrases = [f"the {obj.name} {p}" for p in MOTION_PHRASES[change[4]]]
                elif change[2] == "appear":
                    phrases = [
                        f"{'an' if obj.color[0] in 'aeiou' else 'a'} {obj.name} {p}" for p in APPEAR_PHRASES
                    ]
                else:
                    phrases = [f"the {obj.name} {p}" for p in DISAPPEAR_PHRASES]
                hits = [part.find(p) for p in phrases if p in part]
                assert len(hits) == 1, (row["caption"], phrases)
                places.append(hits[0])
            assert places == sorted(places), row["caption"]
            # objects that only appear later are not in the opening description
            opening = row["caption"].split(". ", 1)[0].lower()
            for obj in scene.objects:
                said = obj.name in opening or f"{obj.shape} in {obj.color}" in opening
                assert said == (obj.appears is None), (row["caption"], obj.name)
    assert told >= 8
    # many random captions, text only: the same holds
    for i in range(60):
        rng = np.random.default_rng([6, i])
        scene = sample_event_scene(rng, STANDARD)
        caption = make_caption(scene, rng)
        names = [e.obj.name for e in scene.events]
        part = _event_part(scene, caption)
        assert [part.find(n) for n in names] == sorted(part.find(n) for n in names)
        assert all(part.find(n) >= 0 for n in names)


def test_an_account_of_events_is_read_in_any_caption_wording() -> None:
    """Every caption's account of its events reads as the canonical one; anything else does not."""
    for i in range(60):
        rng = np.random.default_rng([7, i])
        scene = sample_event_scene(rng, VARIETY if i % 2 else STANDARD)
        canonical = [e.words for e in scene.events]
        assert read_events(_event_part(scene, make_caption(scene, rng))) == canonical
        assert read_events(event_order_answer(scene)) == canonical
    assert read_events("First a blue square appears, and then the red circle slides to the left.") == [
        "the blue square appears",
        "the red circle moves left",
    ]
    assert read_events("The purple triangle moves up to the top; last, the green circle vanishes") == [
        "the purple triangle moves up",
        "the green circle disappears",
    ]
    for told in (
        "",
        "two",
        "the red circle",  # no verb
        "the red circle moves",  # no direction
        "the red circle moves left at the bottom",  # words besides the events
        "a red circle on a grey background, then the blue square appears",
        "the pink circle moves left",  # no such colour
    ):
        assert read_events(told) is None, told


def test_event_accounts_are_scored_by_their_events_not_their_words() -> None:
    def question(qtype: str, answer: str) -> Question:
        return Question(0, "videos/v.mp4", "video", qtype, None, "What happens?", answer)

    first = question("first_event", "the red circle moves left")
    assert is_correct(first, "The red circle slides to the left.")
    assert is_correct(first, "the red circle moves left")
    assert not is_correct(first, "the red circle moves right")
    assert not is_correct(first, "the red circle moves left, then the blue square appears")
    order = question("event_order", "the red circle moves left, then the blue square appears")
    assert is_correct(order, "First the red circle moves to the left, and then a blue square shows up.")
    assert not is_correct(order, "the blue square appears, then the red circle moves left")
    assert not is_correct(order, "the red circle moves left")
    # every other type still asks for the exact answer
    assert not is_correct(question("moves_after", "the blue square"), "a blue square appears")


def test_stage_two_instructions_tell_the_events_in_order(wide_data: Path) -> None:
    scenes = {row["id"]: Scene.from_dict(row) for row in _read_jsonl(wide_data / "scenes.jsonl")}
    instruct = json.loads((wide_data / "instruct.json").read_text())
    sequences = 0
    for entry in instruct:
        scene = scenes[entry["id"]]
        if not scene.is_sequence:
            continue
        sequences += 1
        conv = entry["conversations"]
        assert 6 <= len(conv) // 2 <= 14 and conv[0]["value"].startswith("<video>\n")
        types = [t["type"] for t in entry["turn_types"]]
        assert {"first_event", "last_event", "event_order", "move_count"} <= set(types)
        assert types.count("direction") == sum(o.moves for o in scene.objects)
        for meta, human, gpt in zip(entry["turn_types"], conv[0::2], conv[1::2], strict=True):
            question = human["value"].removeprefix("<video>\n")
            if meta["type"] == "caption":
                continue
            _check_event_answer(scene, meta["type"], question, gpt["value"])
    assert sequences >= 5
    # instruct_events.json: those same conversations once more, in the same order, and no others
    again = json.loads((wide_data / "instruct_events.json").read_text())
    assert again == [e for e in instruct if scenes[e["id"]].is_sequence]


def test_region_tracks_follow_event_movers_frame_by_frame() -> None:
    for i in range(12):
        scene = sample_event_scene(np.random.default_rng([8, i]), STANDARD)
        regions = object_regions(scene)
        there = [o for o in scene.objects if o.appears is None and o.vanishes is None]
        assert len(there) < len(scene.objects) or all(e.kind == "move" for e in scene.events)
        assert len(regions) == len(there)  # objects that appear or vanish get no region
        for obj, region in zip(there, regions, strict=True):
            motion = f"moving {obj.direction}" if obj.moves else "standing still"
            assert region["motion"] == motion and region["text"] == f"{obj.name} {motion}"
            if not obj.moves:
                assert "track" not in region
                continue
            keys = region["track"]
            assert [k["t"] for k in keys] == sorted({0.0, *obj.move, 1.0})
            for index in range(0, scene.n_frames, 7):
                t = scene.time(index)
                ys, xs = np.nonzero((render_array(scene, index) == COLORS[obj.color]).all(axis=-1))
                # the box training reads for frame t (keyframes, linear between) holds the object's pixels
                (parsed,) = parse_regions([region])
                box = parsed.box_at(t)
                assert box[0] - 0.5 <= xs.min() and xs.max() + 1 <= box[2] + 0.5
                assert box[1] - 0.5 <= ys.min() and ys.max() + 1 <= box[3] + 0.5
                # and what it does at that moment: its motion while it moves, standing still around it
                moving = obj.move[0] <= t < obj.move[1]
                assert parsed.motion_at(t) == (motion if moving else "standing still")


# ------------------------------------------------------------------- splits, determinism, the standard set


def test_splits_are_folders_laid_out_like_the_root(wide_data: Path) -> None:
    for name, kinds in (("variety", {"image", "video"}), ("events", {"video"})):
        folder = wide_data / name
        rows = _read_jsonl(folder / "scenes.jsonl")
        assert {r["set"] for r in rows} == {name} and {r["kind"] for r in rows} == kinds
        for row in rows:
            assert (folder / "media" / row["media"]).is_file()
            assert row["backdrop"]
        questions = _read_jsonl(folder / "test_questions.jsonl")
        assert {q["media"] for q in questions} == {r["media"] for r in rows}
        world = json.loads((folder / "world.json").read_text())
        assert world["generation"]["split"] == name and "contrast_rule" in world["wider_world"]
        assert len(json.loads((folder / "test_captions.json").read_text())) == len(rows)
    variety = [Scene.from_dict(r) for r in _read_jsonl(wide_data / "variety" / "scenes.jsonl")]
    assert all(not s.is_sequence for s in variety)
    train = [Scene.from_dict(r) for r in _read_jsonl(wide_data / "scenes.jsonl") if r["set"] == "train"]
    held_out = {s.signature() for s in variety}
    assert not held_out & {s.signature() for s in train}
    assert any(s.backdrop is not None and not s.is_sequence for s in train)
    assert any(s.backdrop is None for s in train) and any(s.is_sequence for s in train)


def test_widening_leaves_the_standard_held_out_split_byte_for_byte(wide_data: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    generate(plain, GenerationConfig(seed=2, images=8, videos=4, test_images=3, test_videos=2, twins=1.0))
    for name in ("test_questions.jsonl", "test_captions.json"):
        assert (plain / name).read_bytes() == (wide_data / name).read_bytes(), name
    test_rows = lambda root: [r for r in _read_jsonl(root / "scenes.jsonl") if r["set"] == "test"]  # noqa: E731
    assert test_rows(plain) == test_rows(wide_data)
    for row in test_rows(plain):
        assert (plain / "media" / row["media"]).read_bytes() == (
            wide_data / "media" / row["media"]
        ).read_bytes()
    # and the training scenes the standard world drew are the same scenes
    standard = {r["id"]: r for r in _read_jsonl(plain / "scenes.jsonl") if r["set"] == "train"}
    wide = {r["id"]: r for r in _read_jsonl(wide_data / "scenes.jsonl") if r["set"] == "train"}
    kept = [i for i, r in wide.items() if "backdrop" not in r and i in standard and not i.endswith("_twin")]
    assert kept and all(
        {k: v for k, v in wide[i].items() if k != "caption"}
        == {k: v for k, v in standard[i].items() if k != "caption"}
        for i in kept
    )
    # the options left at their defaults add nothing to what is written
    world = json.loads((plain / "world.json").read_text())
    assert "wider_world" not in world and "variety" not in world["generation"]
    assert not (plain / "variety").exists() and not (plain / "events").exists()


def test_generation_with_every_option_is_deterministic(wide_data: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate(
        again,
        GenerationConfig(
            seed=2, images=8, videos=4, test_images=3, test_videos=2, twins=1.0, variety=0.5,
            variety_test_images=4, variety_test_videos=3, event_videos=5, event_test_videos=5, workers=1,
        ),
    )  # fmt: skip
    assert _digest(again) == _digest(wide_data)  # every file, media too, whatever the workers
    other = tmp_path / "other"
    generate(
        other,
        GenerationConfig(seed=3, images=8, videos=4, test_images=3, test_videos=2, variety=0.5,
                         event_videos=5, event_test_videos=5),
        dry_run=True,
    )  # fmt: skip
    assert (other / "events" / "test_questions.jsonl").read_bytes() != (
        wide_data / "events" / "test_questions.jsonl"
    ).read_bytes()


def test_new_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(VideoLlavaError, match="variety"):
        GenerationConfig(variety=1.5)
    with pytest.raises(VideoLlavaError, match="event_min_frames"):
        GenerationConfig(event_min_frames=16)
    with pytest.raises(VideoLlavaError, match="event_max_frames"):
        GenerationConfig(event_min_frames=64, event_max_frames=48)
    with pytest.raises(VideoLlavaError, match="event_test_videos"):
        GenerationConfig(event_test_videos=-1)


def test_cli_generates_the_splits(tmp_path: Path, capsys) -> None:
    from videollava.cli import main

    out = tmp_path / "cli"
    code = main(
        ["shapesworld", "generate", "--out", str(out), "--images", "2", "--videos", "1", "--test-images", "1"]
        + ["--test-videos", "1", "--variety", "1", "--variety-test-images", "2", "--event-videos", "2"]
        + ["--event-test-videos", "1", "--event-frames", "48", "60", "--workers", "1", "--dry-run"]
    )
    assert code == 0 and "wrote" in capsys.readouterr().out
    rows = _read_jsonl(out / "scenes.jsonl")
    assert sum("backdrop" in r for r in rows if r["set"] == "train") == 5  # 2 + 1 + 2 event videos
    events = [Scene.from_dict(r) for r in rows if r["id"].startswith("train_evt")]
    assert len(events) == 2 and all(48 <= s.n_frames <= 60 for s in events)
    assert len(_read_jsonl(out / "variety" / "scenes.jsonl")) == 2
    assert len(_read_jsonl(out / "events" / "scenes.jsonl")) == 1


def test_counts_of_four_are_answered_in_words() -> None:
    rng = np.random.default_rng(2)
    seen = set()
    from videollava.shapesworld.text import fixed_questions

    for _ in range(80):
        scene = sample_wide_scene(rng, "image", VARIETY)
        (count,) = [q for q in fixed_questions(scene) if q["type"] == "count"]
        assert count["answer"] == NUMBERS[len(scene.objects)]
        seen.add(count["answer"])
        assert all(o.shape in SHAPES for o in scene.objects)
    assert "four" in seen


# ------------------------------------------------------------------- the evaluation harness


def test_the_shapesworld_task_scores_the_new_question_types(hf_checkpoint, tmp_path: Path, capsys) -> None:
    from videollava.cli import main
    from videollava.shapesworld.evaluate import load_questions, score
    from videollava.shapesworld.text import EVENT_QUESTION_TEMPLATES, QUESTION_TYPES

    data = tmp_path / "data"
    generate(
        data,
        GenerationConfig(
            seed=4, images=0, videos=0, test_images=0, test_videos=0, event_test_videos=3,
            variety_test_images=1, variety_test_videos=1, event_min_frames=48, event_max_frames=56,
        ),
    )  # fmt: skip
    questions = load_questions(data / "events")
    types = {q.type for q in questions}
    new = set(EVENT_QUESTION_TEMPLATES)
    assert new <= types  # this seed's three videos ask every kind of question about events

    # the scorer, by hand: canonical answers are right, a yes/no question is read like a probe
    perfect = score(questions, {q.question_id: q.answer for q in questions})
    assert perfect.overall["accuracy"] == 1.0
    assert new <= set(perfect.accuracy["video"])
    replies = {q.question_id: q.answer for q in questions}
    for q in questions:
        if q.type == "moves_before":
            replies[q.question_id] = "Yes, it does." if q.answer == "yes" else "Yes."
        if q.type == "first_event":
            replies[q.question_id] = q.answer.replace("moves", "goes")
    mixed = score(questions, replies)
    entry = mixed.accuracy["video"]["moves_before"]
    assert entry["correct"] == sum(q.type == "moves_before" and q.answer == "yes" for q in questions)
    moved_first = sum(q.type == "first_event" and " moves " in q.answer for q in questions)
    assert mixed.accuracy["video"]["first_event"]["correct"] == 3 - moved_first
    rows = [
        line.split("|")[1].strip() for line in perfect.to_markdown().splitlines() if line.startswith("| ")
    ]
    listed = [r for r in rows if r in QUESTION_TYPES]
    assert listed == [t for t in QUESTION_TYPES if t in types]  # in the report, each type by name

    # the harness, with a small random checkpoint, on the events split folder
    folder, _ = hf_checkpoint
    out = tmp_path / "run"
    status = main(
        [
            "eval",
            "shapesworld",
            "--model",
            str(folder),
            "--data-dir",
            str(data / "events"),
            "--output",
            str(out),
        ]
        + ["--batch-size", "4", "--dtype", "float32", "--max-new-tokens", "3"]
    )
    assert status == 0
    written = json.loads((out / "results.json").read_text())
    accuracy = written["metrics"]["accuracy"]["video"]
    for qtype in types:
        assert accuracy[qtype]["n"] == sum(q.type == qtype for q in questions)
    assert written["metrics"]["overall"]["n"] == len(questions)
    assert "| event_order |" in capsys.readouterr().out


# ------------------------------------------------------------------- recipes


def test_recipes_turn_the_wider_world_on_only_when_asked(tmp_path: Path) -> None:
    import yaml

    from videollava.train.config import dump_recipe, load_recipe, recipe_from_dict

    configs = Path(__file__).resolve().parent.parent / "configs"
    default = GenerationConfig()
    data = load_recipe(configs / "shapesworld.yaml").data.generate
    assert (data.variety, data.event_videos, data.event_test_videos, data.variety_test_images) == (
        default.variety, 0, 0, 0,
    )  # fmt: skip
    v1, v2 = load_recipe(configs / "shapesworld.yaml"), load_recipe(configs / "shapesworld-v2.yaml")
    assert recipe_from_dict(yaml.safe_load(dump_recipe(v2))).to_dict() == v2.to_dict()
    data = v2.data.generate
    assert data.variety > 0 and data.event_videos > 0 and data.event_test_videos > 0
    assert data.variety_test_images > 0 and data.variety_test_videos > 0
    assert (data.event_min_frames, data.event_max_frames) == (48, 128)
    # the standard held-out split of v2 is v1's: same seed, counts and sizes
    same = ("seed", "test_images", "test_videos", "min_size", "max_size")
    assert all(getattr(data, k) == getattr(v1.data.generate, k) for k in same)
    assert v2.model.num_frames >= 8  # every event shows apart from the next in 8 sampled frames
    # the smoke recipe trains on both too, so CI runs every stage on the new data
    smoke = load_recipe(configs / "shapesworld-smoke.yaml").data.generate
    assert smoke.event_videos > 0 and smoke.variety > 0 and smoke.event_test_videos > 0
    # every file a v2 stage reads is one its data stage writes (a small dry run of the same options)
    small = replace(data, images=4, videos=2, test_images=1, test_videos=1, variety_test_images=1,
                    variety_test_videos=1, event_videos=2, event_test_videos=1)  # fmt: skip
    generate(tmp_path, small, dry_run=True)
    for stage in v2.stages:
        evaluation = getattr(stage, "eval", None)
        for name in [*stage.data, *([evaluation.data] if evaluation is not None else [])]:
            assert (tmp_path / name).is_file(), (stage.label, name)
