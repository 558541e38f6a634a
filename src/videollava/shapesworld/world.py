"""The ShapesWorld world: fixed, so that any scene can be rendered again from its description alone.

Its colours, shapes and priors, the rules scenes obey, and the scenes themselves: what an image or
a video holds, drawn at random within those rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from videollava.errors import VideoLlavaError
from videollava.shapesworld.backdrops import Backdrop

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
MEDIA_KINDS: tuple[str, ...] = ("image", "video")
COUNT_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three"}  # the standard world's counts
# Every count an answer may hold: the wider world has up to four objects.
NUMBER_WORDS: dict[int, str] = COUNT_WORDS | {4: "four"}
EVENT_KINDS: tuple[str, ...] = ("move", "appear", "disappear")

# Skewed priors so that the POPE "popular" split (most frequent combinations) means something.
COLOR_WEIGHTS: dict[str, float] = {
    "red": 0.24,
    "blue": 0.21,
    "green": 0.17,
    "yellow": 0.15,
    "orange": 0.12,
    "purple": 0.11,
}
SHAPE_WEIGHTS: dict[str, float] = {"circle": 0.42, "square": 0.33, "triangle": 0.25}
COUNT_WEIGHTS: dict[int, float] = {1: 0.3, 2: 0.35, 3: 0.35}

MIN_MEDIA_SIZE = 96
DEFAULT_MAX_SIZE = 160
MAX_ASPECT = 16 / 9
OBJECT_SIZE_RANGE = (0.15, 0.35)  # fraction of the shorter side
MIN_TRAVEL = 0.30  # fraction of the frame's extent along the motion
FRAMES_RANGE = (8, 48)
FPS_RANGE = (4, 30)
GREY_RANGE = (70, 190)
NOISE_RANGE = (4, 12)
GAP = 2.0  # pixels between bounding discs


@dataclass(frozen=True)
class SceneObject:
    """One solid shape; ``size`` is its width (diameter, side or triangle base) in pixels.

    It slides from ``start`` to ``end`` at constant speed during ``move`` (times in [0, 1], first
    frame to last) and stands still before and after; an object that ``appears`` is drawn from
    that time on, one that ``vanishes`` only before it. The standard world's objects move over the
    whole clip (or not at all) and are always there.
    """

    color: str
    shape: str
    size: float
    start: tuple[float, float]
    end: tuple[float, float]
    move: tuple[float, float] = (0.0, 1.0)
    appears: float | None = None
    vanishes: float | None = None

    @property
    def radius(self) -> float:
        """Radius of the bounding disc that keeps objects apart."""
        return self.size / 2 if self.shape == "circle" else self.size / math.sqrt(2)

    @property
    def moves(self) -> bool:
        return self.start != self.end

    @property
    def timed(self) -> bool:
        """Part of a video of ordered events: moves during part of it, or appears or vanishes."""
        return self.move != (0.0, 1.0) or self.appears is not None or self.vanishes is not None

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def direction(self) -> str | None:
        """Which way it moves (the world moves objects along one axis only)."""
        dx, dy = self.end[0] - self.start[0], self.end[1] - self.start[1]
        if dx == 0 and dy == 0:
            return None
        if abs(dx) >= abs(dy):
            return "left" if dx < 0 else "right"
        return "up" if dy < 0 else "down"

    def center(self, t: float) -> tuple[float, float]:
        """Centre at time ``t`` in [0, 1]: a straight path at constant speed during ``move``."""
        if self.move == (0.0, 1.0):
            return (
                self.start[0] + (self.end[0] - self.start[0]) * t,
                self.start[1] + (self.end[1] - self.start[1]) * t,
            )
        t0, t1 = self.move
        progress = min(1.0, max(0.0, (t - t0) / (t1 - t0)))
        return (
            self.start[0] + (self.end[0] - self.start[0]) * progress,
            self.start[1] + (self.end[1] - self.start[1]) * progress,
        )

    def visible(self, t: float) -> bool:
        return (self.appears is None or t >= self.appears) and (self.vanishes is None or t < self.vanishes)

    def to_dict(self) -> dict[str, Any]:
        data = {
            "color": self.color,
            "shape": self.shape,
            "rgb": list(COLORS[self.color]),
            "size": self.size,
            "center": list(self.start),
            "end": list(self.end),
            "moving": self.moves,
        }
        if self.move != (0.0, 1.0):
            data["move"] = list(self.move)
        if self.appears is not None:
            data["appears"] = self.appears
        if self.vanishes is not None:
            data["vanishes"] = self.vanishes
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SceneObject:
        move = data.get("move", (0.0, 1.0))
        return cls(
            color=data["color"],
            shape=data["shape"],
            size=float(data["size"]),
            start=(float(data["center"][0]), float(data["center"][1])),
            end=(float(data["end"][0]), float(data["end"][1])),
            move=(float(move[0]), float(move[1])),
            appears=None if data.get("appears") is None else float(data["appears"]),
            vanishes=None if data.get("vanishes") is None else float(data["vanishes"]),
        )


@dataclass(frozen=True)
class Event:
    """One thing that happens in a video: an object moves (from ``start`` to ``end``), appears or
    vanishes (at ``start`` = ``end``); times in [0, 1]."""

    kind: str  # one of EVENT_KINDS
    obj: SceneObject
    start: float
    end: float

    @property
    def words(self) -> str:
        """The canonical phrase: "the red circle moves left", "the blue square appears"."""
        if self.kind == "move":
            return f"the {self.obj.name} moves {self.obj.direction}"
        return f"the {self.obj.name} {'appears' if self.kind == 'appear' else 'disappears'}"

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "kind": self.kind,
            "object": self.obj.name,
            "start": self.start,
            "end": self.end,
        }
        if self.kind == "move":
            data["direction"] = self.obj.direction
        return data


@dataclass(frozen=True)
class Scene:
    """Everything needed to render one image or video and to answer any question about it."""

    id: str
    kind: str  # "image" | "video"
    width: int
    height: int
    background: int
    noise: int
    noise_seed: int
    objects: tuple[SceneObject, ...]
    n_frames: int = 1
    fps: int = 0
    direction: str | None = None
    image_format: str = "png"
    # None: the standard world's grey, flat or noisy (``background``, ``noise``, ``noise_seed``)
    backdrop: Backdrop | None = None

    @property
    def moving_object(self) -> SceneObject | None:
        return next((o for o in self.objects if o.moves), None)

    @property
    def is_sequence(self) -> bool:
        """A video of events in order (objects that move one after another, appear or vanish)."""
        return self.kind == "video" and any(o.timed for o in self.objects)

    @property
    def events(self) -> tuple[Event, ...]:
        """What happens, in order of time: every move, appearance and disappearance."""
        found = []
        for obj in self.objects:
            if obj.moves:
                found.append(Event("move", obj, *obj.move))
            if obj.appears is not None:
                found.append(Event("appear", obj, obj.appears, obj.appears))
            if obj.vanishes is not None:
                found.append(Event("disappear", obj, obj.vanishes, obj.vanishes))
        return tuple(sorted(found, key=lambda e: (e.start, e.end)))

    @property
    def extension(self) -> str:
        return "mp4" if self.kind == "video" else ("jpg" if self.image_format == "jpeg" else "png")

    def time(self, frame_index: int) -> float:
        return 0.0 if self.n_frames <= 1 else frame_index / (self.n_frames - 1)

    def signature(self) -> tuple:
        """Identity of the picture content, used to keep held-out media apart from training media."""
        return (
            self.kind,
            self.width,
            self.height,
            self.background,
            self.noise,
            self.n_frames,
            tuple(
                (o.color, o.shape, o.size, o.start, o.end, o.move, o.appears, o.vanishes)
                for o in self.objects
            ),
            None if self.backdrop is None else self.backdrop.signature(),
        )

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "kind": self.kind,
            "width": self.width,
            "height": self.height,
            "background": self.background,
            "noise": self.noise,
            "noise_seed": self.noise_seed,
            "objects": [o.to_dict() for o in self.objects],
        }
        if self.kind == "video":
            data.update(n_frames=self.n_frames, fps=self.fps, direction=self.direction)
        else:
            data["image_format"] = self.image_format
        if self.backdrop is not None:
            data["backdrop"] = self.backdrop.to_dict()
        if self.is_sequence:  # written for readers; read back from the objects
            data["events"] = [e.to_dict() for e in self.events]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scene:
        return cls(
            id=data["id"],
            kind=data["kind"],
            width=int(data["width"]),
            height=int(data["height"]),
            background=int(data["background"]),
            noise=int(data["noise"]),
            noise_seed=int(data["noise_seed"]),
            objects=tuple(SceneObject.from_dict(o) for o in data["objects"]),
            n_frames=int(data.get("n_frames", 1)),
            fps=int(data.get("fps", 0)),
            direction=data.get("direction"),
            image_format=data.get("image_format", "png"),
            backdrop=Backdrop.from_dict(data["backdrop"]) if data.get("backdrop") else None,
        )


def _weighted_choice(rng: np.random.Generator, weights: dict, size: int, replace: bool) -> list:
    keys = list(weights)
    p = np.array([weights[k] for k in keys], dtype=np.float64)
    idx = rng.choice(len(keys), size=size, replace=replace, p=p / p.sum())
    return [keys[int(i)] for i in idx]


def two_decimals(x: float) -> float:
    """Positions and sizes are kept to two decimals, so that they survive JSON unchanged."""
    return round(float(x), 2)


def _media_size(rng: np.random.Generator, kind: str, min_size: int, max_size: int) -> tuple[int, int]:
    short = int(rng.integers(min_size, max_size + 1))
    aspect = float(rng.uniform(1.0, MAX_ASPECT))
    if kind == "video" and short % 2:  # yuv420p needs even sides
        if short + 1 <= max_size:
            short += 1
        elif short - 1 >= min_size:
            short -= 1
        else:
            raise VideoLlavaError(f"videos need an even short side, and {min_size}..{max_size} has none")
    long = max(short, int(math.floor(short * aspect)))
    if kind == "video":
        long -= long % 2
        long = max(long, short)
    portrait = bool(rng.random() < 0.3)
    return (short, long) if portrait else (long, short)


def _segment_distance(p: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
    ax, ay = a
    dx, dy = b[0] - ax, b[1] - ay
    length2 = dx * dx + dy * dy
    t = 0.0 if length2 == 0 else max(0.0, min(1.0, ((p[0] - ax) * dx + (p[1] - ay) * dy) / length2))
    return math.hypot(p[0] - (ax + t * dx), p[1] - (ay + t * dy))


def paths_apart(a: SceneObject, b: SceneObject) -> bool:
    """Bounding discs disjoint at every instant (whether or not an object is showing yet).

    Between two instants where any motion starts or stops both centres move in straight lines,
    so their offset does too, and its smallest length is a point-to-segment distance.
    """
    limit = a.radius + b.radius + GAP
    if a.timed or b.timed:
        times = sorted({0.0, 1.0, *a.move, *b.move})
        for t0, t1 in zip(times, times[1:], strict=False):
            (ax0, ay0), (bx0, by0), (ax1, ay1), (bx1, by1) = (
                a.center(t0),
                b.center(t0),
                a.center(t1),
                b.center(t1),
            )
            if _segment_distance((0.0, 0.0), (ax0 - bx0, ay0 - by0), (ax1 - bx1, ay1 - by1)) < limit:
                return False
        return True
    # the standard world: at most one of the two moves
    if a.moves:
        return _segment_distance(b.start, a.start, a.end) >= limit
    if b.moves:
        return _segment_distance(a.start, b.start, b.end) >= limit
    return math.hypot(a.start[0] - b.start[0], a.start[1] - b.start[1]) >= limit


def sample_scene(
    rng: np.random.Generator,
    kind: str,
    *,
    scene_id: str = "",
    min_size: int = MIN_MEDIA_SIZE,
    max_size: int = DEFAULT_MAX_SIZE,
    n_objects: int | None = None,
) -> Scene:
    """Draw a random scene of the world; retries internally until the objects fit without touching."""
    if kind not in MEDIA_KINDS:
        raise VideoLlavaError(f"scene kind must be 'image' or 'video', not {kind!r}")
    if min_size < MIN_MEDIA_SIZE or max_size < min_size:
        raise VideoLlavaError(f"media sizes must satisfy {MIN_MEDIA_SIZE} <= min_size <= max_size")
    for _ in range(1000):
        scene = _try_sample_scene(rng, kind, scene_id, min_size, max_size, n_objects)
        if scene is not None:
            return scene
    raise VideoLlavaError("could not place the objects of a scene; use larger media sizes")


def _try_sample_scene(
    rng: np.random.Generator,
    kind: str,
    scene_id: str,
    min_size: int,
    max_size: int,
    n_objects: int | None,
) -> Scene | None:
    width, height = _media_size(rng, kind, min_size, max_size)
    short = min(width, height)
    count = n_objects if n_objects is not None else int(_weighted_choice(rng, COUNT_WEIGHTS, 1, True)[0])
    colors = _weighted_choice(rng, COLOR_WEIGHTS, count, replace=False)
    shapes = _weighted_choice(rng, SHAPE_WEIGHTS, count, replace=True)
    sizes = [two_decimals(rng.uniform(*OBJECT_SIZE_RANGE) * short) for _ in range(count)]

    n_frames, fps, direction = 1, 0, None
    placed: list[SceneObject] = []
    order = list(range(count))
    if kind == "video":
        n_frames = int(rng.integers(FRAMES_RANGE[0], FRAMES_RANGE[1] + 1))
        fps = int(rng.integers(FPS_RANGE[0], FPS_RANGE[1] + 1))
        direction = DIRECTIONS[int(rng.integers(len(DIRECTIONS)))]
        mover = int(rng.integers(count))
        order = [mover] + [i for i in order if i != mover]
    slots: dict[int, SceneObject] = {}
    for position, i in enumerate(order):
        s = sizes[i]
        for _ in range(100):
            if kind == "video" and position == 0:
                candidate = _sample_mover(rng, colors[i], shapes[i], s, width, height, direction)
            else:
                centre = (
                    two_decimals(rng.uniform(s / 2, width - s / 2)),
                    two_decimals(rng.uniform(s / 2, height - s / 2)),
                )
                candidate = SceneObject(colors[i], shapes[i], s, centre, centre)
            if all(paths_apart(candidate, other) for other in placed):
                break
        else:
            return None
        placed.append(candidate)
        slots[i] = candidate

    background = int(rng.integers(GREY_RANGE[0], GREY_RANGE[1] + 1))
    noise = int(rng.integers(NOISE_RANGE[0], NOISE_RANGE[1] + 1)) if rng.random() < 0.5 else 0
    noise_seed = int(rng.integers(0, 2**31 - 1))
    image_format = "png" if rng.random() < 0.5 else "jpeg"
    return Scene(
        id=scene_id,
        kind=kind,
        width=width,
        height=height,
        background=background,
        noise=noise,
        noise_seed=noise_seed,
        objects=tuple(slots[i] for i in range(count)),
        n_frames=n_frames,
        fps=fps,
        direction=direction,
        image_format=image_format if kind == "image" else "png",
    )


def inside_frame(obj: SceneObject, scene: Scene) -> bool:
    """The object lies wholly inside the frame at both ends of its path."""
    half = obj.size / 2
    return all(
        half <= x <= scene.width - half and half <= y <= scene.height - half for x, y in (obj.start, obj.end)
    )


def _sample_mover(
    rng: np.random.Generator, color: str, shape: str, s: float, width: int, height: int, direction: str
) -> SceneObject:
    horizontal = direction in ("left", "right")
    extent = width if horizontal else height
    across = height if horizontal else width
    # A couple of pixels above the minimum, so the travel still measures above it after lossy encoding.
    shortest = MIN_TRAVEL * extent + 2.0
    travel = rng.uniform(shortest, max(shortest, extent - s))
    lo = s / 2 + (travel if direction in ("left", "up") else 0.0)
    along_start = rng.uniform(lo, max(lo, extent - s / 2 - (0.0 if direction in ("left", "up") else travel)))
    along_end = along_start - travel if direction in ("left", "up") else along_start + travel
    other = two_decimals(rng.uniform(s / 2, across - s / 2))
    a, b = two_decimals(along_start), two_decimals(along_end)
    if horizontal:
        return SceneObject(color, shape, s, (a, other), (b, other))
    return SceneObject(color, shape, s, (other, a), (other, b))
