"""The wider ShapesWorld: more backdrops, sizes, ratios and objects, and videos of ordered events.

Scenes here obey the standard world's rules (objects inside the frame, bounding discs apart at
every instant, axis-aligned straight motion of at least `MIN_TRAVEL`), and one more: the
contrast rule of `render` (each object's colour far enough from the background under and
around it), which the sampler enforces by choosing each object's colour among those that pass
where it lies, and by drawing again when none does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from videollava.errors import VideoLlavaError
from videollava.shapesworld.backdrops import BACKDROP_STYLES, random_backdrop
from videollava.shapesworld.render import (
    BACKDROP_MIN_DELTA_E,
    CONTRAST_MIN_DELTA_E,
    backdrop_contrast,
    palette_contrasts,
)
from videollava.shapesworld.world import (
    COLOR_WEIGHTS,
    COUNT_WEIGHTS,
    DIRECTIONS,
    FPS_RANGE,
    FRAMES_RANGE,
    GREY_RANGE,
    MIN_MEDIA_SIZE,
    NOISE_RANGE,
    OBJECT_SIZE_RANGE,
    SHAPE_WEIGHTS,
    Scene,
    SceneObject,
    _sample_mover,
    _weighted_choice,
    paths_apart,
    two_decimals,
)


@dataclass(frozen=True)
class WorldRanges:
    """What a sampler may draw: frame shapes, object sizes and counts, backdrop styles."""

    name: str
    max_aspect: float  # long side over short side
    tall: float  # probability that the frame stands upright
    object_size: tuple[float, float]  # fraction of the shorter side
    counts: dict[int, float]  # objects per scene, weighted
    backdrops: dict[str, float]  # backdrop styles, weighted
    tint: int  # how far (levels per channel) backdrop anchors may stray from grey


# The standard world's frames, sizes and counts, on its flat or noisy grey (what ordered-event
# videos are drawn in when the wider world is not asked for).
STANDARD = WorldRanges(
    name="standard",
    max_aspect=16 / 9,
    tall=0.3,
    object_size=OBJECT_SIZE_RANGE,
    counts=COUNT_WEIGHTS,
    backdrops={"flat": 0.5, "noise": 0.5},
    tint=0,
)
# The wider world: ratios up to 2.4:1 either way, objects from 10% to 40% of the short side, up to
# four of them, on flat colour, noisy grey, linear and radial gradients, soft textures and coarse
# colour noise.
VARIETY = WorldRanges(
    name="variety",
    max_aspect=2.4,
    tall=0.5,
    object_size=(0.10, 0.40),
    counts={1: 0.2, 2: 0.27, 3: 0.27, 4: 0.26},
    backdrops={style: 1.0 / len(BACKDROP_STYLES) for style in BACKDROP_STYLES},
    tint=45,
)
RANGES: dict[str, WorldRanges] = {r.name: r for r in (STANDARD, VARIETY)}

# Ordered events: two or three of them, each in its own share of the clip.
EVENT_FRAMES = (48, 128)
EVENT_COUNT_WEIGHTS: dict[int, float] = {2: 0.5, 3: 0.5}
EVENT_KIND_WEIGHTS: dict[str, float] = {"move": 0.6, "appear": 0.2, "disappear": 0.2}
# Within its share w of the clip, a move lasts 0.5-0.7 w and keeps 0.15 w from either edge; an
# appearance or disappearance falls in the middle 0.2 w. Then the next event starts at least
# 0.55 w after one starts, so with 8 frames sampled the reference's way from a clip of 40 frames
# or more, some sampled frame falls between the two starts and the order shows (tests check it).
MOVE_SHARE = (0.5, 0.7)
MOVE_EDGE = 0.15
SWITCH_EDGE = 0.4
ORDER_VISIBLE_FRAMES = 8
MIN_EVENT_FRAMES = 40


def _media_size(
    rng: np.random.Generator, kind: str, ranges: WorldRanges, lo: int, hi: int
) -> tuple[int, int]:
    short = int(rng.integers(lo, hi + 1))
    if kind == "video" and short % 2:  # yuv420p needs even sides
        short = short + 1 if short + 1 <= hi else short - 1
        if short < lo:
            raise VideoLlavaError(f"videos need an even short side, and {lo}..{hi} has none")
    aspect = float(rng.uniform(1.0, ranges.max_aspect))
    long = max(short, int(math.floor(short * aspect)))
    if kind == "video":
        long -= long % 2
        long = max(long, short)
    return (short, long) if rng.random() < ranges.tall else (long, short)


def _check_sizes(min_size: int, max_size: int) -> None:
    if min_size < MIN_MEDIA_SIZE or max_size < min_size:
        raise VideoLlavaError(f"media sizes must satisfy {MIN_MEDIA_SIZE} <= min_size <= max_size")


def _still(rng: np.random.Generator, shape: str, s: float, width: int, height: int) -> SceneObject:
    centre = (
        two_decimals(rng.uniform(s / 2, width - s / 2)),
        two_decimals(rng.uniform(s / 2, height - s / 2)),
    )
    return SceneObject("red", shape, s, centre, centre)  # colour chosen once the backdrop is known


def _place(makers: list[Callable[[], SceneObject]]) -> list[SceneObject] | None:
    """Place objects one by one (``makers[i]()`` draws a candidate for slot i), each apart from all
    before it; None when one does not fit in 100 draws."""
    placed: list[SceneObject] = []
    for maker in makers:
        for _ in range(100):
            candidate = maker()
            if all(paths_apart(candidate, other) for other in placed):
                break
        else:
            return None
        placed.append(candidate)
    return placed


def _colour(
    rng: np.random.Generator, scene: Scene, ranges: WorldRanges, noise_levels: tuple[int, int]
) -> Scene | None:
    """Draw a backdrop that keeps rule 2 of the contrast rule, then give each object a colour that
    keeps rule 1 where it lies.

    Colours stay distinct within a scene and follow the world's colour priors among those allowed;
    None when some object has no colour left.
    """
    style = _weighted_choice(rng, ranges.backdrops, 1, True)[0]
    for _ in range(50):  # a backdrop no part of which could pass for an object (rule 2)
        backdrop = random_backdrop(rng, style, tint=ranges.tint, levels=GREY_RANGE, noise=noise_levels)
        pixels = backdrop.pixels(scene.width, scene.height)
        if backdrop_contrast(pixels) >= BACKDROP_MIN_DELTA_E:
            break
    else:
        return None
    scene = replace(scene, backdrop=backdrop, background=_grey_level(backdrop.colors[0]))
    used: set[str] = set()
    objects = list(scene.objects)
    for i in (int(k) for k in rng.permutation(len(objects))):
        allowed = {
            c: COLOR_WEIGHTS[c]
            for c, contrast in palette_contrasts(scene, objects[i], pixels).items()
            if contrast >= CONTRAST_MIN_DELTA_E and c not in used
        }
        if not allowed:
            return None
        color = _weighted_choice(rng, allowed, 1, True)[0]
        used.add(color)
        objects[i] = replace(objects[i], color=color)
    return replace(scene, objects=tuple(objects))


def _grey_level(rgb: tuple[int, int, int]) -> int:
    return int(round(sum(rgb) / 3))


def sample_wide_scene(
    rng: np.random.Generator,
    kind: str,
    ranges: WorldRanges = VARIETY,
    *,
    scene_id: str = "",
    min_size: int = MIN_MEDIA_SIZE,
    max_size: int = 160,
) -> Scene:
    """An image, or a video in which one object moves, drawn from ``ranges``; the contrast rule holds."""
    if kind not in ("image", "video"):
        raise VideoLlavaError(f"scene kind must be 'image' or 'video', not {kind!r}")
    _check_sizes(min_size, max_size)
    for _ in range(1000):
        scene = _try_wide(rng, kind, ranges, scene_id, min_size, max_size)
        if scene is not None:
            return scene
    raise VideoLlavaError("could not place the objects of a scene; use larger media sizes")


def _try_wide(
    rng: np.random.Generator, kind: str, ranges: WorldRanges, scene_id: str, min_size: int, max_size: int
) -> Scene | None:
    width, height = _media_size(rng, kind, ranges, min_size, max_size)
    short = min(width, height)
    count = int(_weighted_choice(rng, ranges.counts, 1, True)[0])
    shapes = _weighted_choice(rng, SHAPE_WEIGHTS, count, replace=True)
    sizes = [two_decimals(rng.uniform(*ranges.object_size) * short) for _ in range(count)]
    makers = [
        lambda s=s, shape=shape: _still(rng, shape, s, width, height)
        for s, shape in zip(sizes, shapes, strict=True)
    ]
    n_frames, fps, direction = 1, 0, None
    if kind == "video":
        n_frames = int(rng.integers(FRAMES_RANGE[0], FRAMES_RANGE[1] + 1))
        fps = int(rng.integers(FPS_RANGE[0], FPS_RANGE[1] + 1))
        direction = DIRECTIONS[int(rng.integers(len(DIRECTIONS)))]
        s0, shape0 = sizes[0], shapes[0]
        makers[0] = lambda: _sample_mover(rng, "red", shape0, s0, width, height, direction)
    placed = _place(makers)
    if placed is None:
        return None
    # the mover is drawn first (it is the hardest to fit) but need not come first in the scene
    order = [int(k) for k in rng.permutation(count)]
    scene = Scene(
        id=scene_id,
        kind=kind,
        width=width,
        height=height,
        background=0,
        noise=0,
        noise_seed=0,
        objects=tuple(placed[k] for k in order),
        n_frames=n_frames,
        fps=fps,
        direction=direction,
        image_format=("png" if rng.random() < 0.5 else "jpeg") if kind == "image" else "png",
    )
    return _colour(rng, scene, ranges, NOISE_RANGE)


def sample_event_scene(
    rng: np.random.Generator,
    ranges: WorldRanges = STANDARD,
    *,
    scene_id: str = "",
    min_size: int = MIN_MEDIA_SIZE,
    max_size: int = 160,
    frames: tuple[int, int] = EVENT_FRAMES,
) -> Scene:
    """A video of two or three events in order, each by another object: moves (one of four ways),
    appearances and disappearances, at least one move, and at most one of each of the others."""
    _check_sizes(min_size, max_size)
    if not (MIN_EVENT_FRAMES <= frames[0] <= frames[1]):
        raise VideoLlavaError(
            f"event videos need at least {MIN_EVENT_FRAMES} frames and min <= max, got {frames}"
        )
    for _ in range(1000):
        scene = _try_events(rng, ranges, scene_id, min_size, max_size, frames)
        if scene is not None:
            return scene
    raise VideoLlavaError("could not place the objects of an event video; use larger media sizes")


def _event_kinds(rng: np.random.Generator, n_events: int) -> list[str]:
    while True:
        kinds = _weighted_choice(rng, EVENT_KIND_WEIGHTS, n_events, True)
        if "move" in kinds and kinds.count("appear") <= 1 and kinds.count("disappear") <= 1:
            return kinds


def _switch_time(rng: np.random.Generator, lo: float, share: float, n_frames: int) -> float:
    """A time in the middle of the share, halfway between two frames, so no frame sits on it."""
    t = rng.uniform(lo + SWITCH_EDGE * share, lo + (1 - SWITCH_EDGE) * share)
    return round((math.floor(t * (n_frames - 1)) + 0.5) / (n_frames - 1), 6)


def _try_events(
    rng: np.random.Generator,
    ranges: WorldRanges,
    scene_id: str,
    min_size: int,
    max_size: int,
    frames: tuple[int, int],
) -> Scene | None:
    width, height = _media_size(rng, "video", ranges, min_size, max_size)
    short = min(width, height)
    n_events = int(_weighted_choice(rng, EVENT_COUNT_WEIGHTS, 1, True)[0])
    counts = {k: w for k, w in ranges.counts.items() if k >= n_events}
    count = int(_weighted_choice(rng, counts, 1, True)[0])
    kinds = _event_kinds(rng, n_events)
    shapes = _weighted_choice(rng, SHAPE_WEIGHTS, count, replace=True)
    sizes = [two_decimals(rng.uniform(*ranges.object_size) * short) for _ in range(count)]
    n_frames = int(rng.integers(frames[0], frames[1] + 1))
    fps = int(rng.integers(FPS_RANGE[0], FPS_RANGE[1] + 1))
    share = 1.0 / n_events

    makers = []
    for k in range(count):
        s, shape = sizes[k], shapes[k]
        if k >= n_events:  # no event: stands still throughout
            makers.append(lambda s=s, shape=shape: _still(rng, shape, s, width, height))
            continue
        lo = k * share
        if kinds[k] == "move":
            length = round(rng.uniform(*MOVE_SHARE) * share, 6)
            begin = round(rng.uniform(lo + MOVE_EDGE * share, lo + (1 - MOVE_EDGE) * share - length), 6)
            direction = DIRECTIONS[int(rng.integers(len(DIRECTIONS)))]

            def mover(s=s, shape=shape, span=(begin, round(begin + length, 6)), direction=direction):
                return replace(_sample_mover(rng, "red", shape, s, width, height, direction), move=span)

            makers.append(mover)
        else:
            when = _switch_time(rng, lo, share, n_frames)
            key = "appears" if kinds[k] == "appear" else "vanishes"
            makers.append(
                lambda s=s, shape=shape, key=key, when=when: replace(
                    _still(rng, shape, s, width, height), **{key: when}
                )
            )
    # movers are the hardest to fit: place them first
    placing = sorted(range(count), key=lambda k: k >= n_events or kinds[k] != "move")
    placed = _place([makers[k] for k in placing])
    if placed is None:
        return None
    by_slot = dict(zip(placing, placed, strict=True))
    order = [int(k) for k in rng.permutation(count)]
    scene = Scene(
        id=scene_id,
        kind="video",
        width=width,
        height=height,
        background=0,
        noise=0,
        noise_seed=0,
        objects=tuple(by_slot[k] for k in order),
        n_frames=n_frames,
        fps=fps,
        direction=None,
    )
    return _colour(rng, scene, ranges, NOISE_RANGE)


def order_twin(scene: Scene, rng: np.random.Generator) -> Scene | None:
    """The same video with two events in the other order (each keeps its place in its share of the
    clip, moved to the other's share): a pair that only the order of events tells apart. None when
    the swapped timing would make objects touch."""
    events = scene.events
    if len(events) < 2:
        return None
    k = int(rng.integers(len(events) - 1))
    first, second = events[k], events[k + 1]
    shift = _share_start(scene, second) - _share_start(scene, first)

    def moved(obj: SceneObject, by: float) -> SceneObject:
        if obj.move != (0.0, 1.0):
            obj = replace(obj, move=(round(obj.move[0] + by, 6), round(obj.move[1] + by, 6)))
        if obj.appears is not None:
            obj = replace(obj, appears=_half_frame(obj.appears + by, scene.n_frames))
        if obj.vanishes is not None:
            obj = replace(obj, vanishes=_half_frame(obj.vanishes + by, scene.n_frames))
        return obj

    swap = {id(first.obj): shift, id(second.obj): -shift}
    objects = tuple(moved(o, swap[id(o)]) if id(o) in swap else o for o in scene.objects)
    if not all(paths_apart(a, b) for i, a in enumerate(objects) for b in objects[i + 1 :]):
        return None
    return replace(scene, id=f"{scene.id}_twin", objects=objects)


def _share_start(scene: Scene, event) -> float:
    n = len(scene.events)
    return math.floor(event.start * n) / n


def _half_frame(t: float, n_frames: int) -> float:
    return round((math.floor(t * (n_frames - 1)) + 0.5) / (n_frames - 1), 6)
