"""ShapesWorld: a synthetic image and video dataset whose every answer is known exactly.

Coloured circles, squares and triangles on a grey background; in videos one of them slides left,
right, up or down. Because the world is tiny and fully described by ``world.json``, a model trained
on it can be checked question by question, and anyone can re-render a scene from its metadata.

Outputs follow the LLaVA JSON convention (``captions.json`` for stage 1, ``instruct.json`` for
stage 2, ``instruct_direction.json`` with every training video's direction question alone) plus
held-out ``test_questions.jsonl`` / ``test_captions.json`` rendered from a separate seed stream,
and ``scenes.jsonl`` with the ground truth of every media file.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from videollava.errors import VideoLlavaError

# ----------------------------------------------------------------------------------------------
# The world: fixed, so that any scene can be rendered again from its description alone.

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
SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")
COUNT_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three"}

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
JPEG_QUALITY = 90
VIDEO_CRF = 20
VIDEO_PRESET = "veryfast"
# Without cpu-independent, x264 (one thread, identical input) now and then encoded the same scene
# differently from run to run (about one video in twenty); with it, runs repeat bit for bit.
X264_PARAMS = "cpu-independent=1"
POPULAR_TOP_K = 3

QUESTION_TEMPLATES: dict[str, str] = {
    "color": "What color is the {shape}?",
    "shape": "What shape is the {color} object?",
    "count": "How many objects are there?",
    "exists": "Is there a {color} {shape}?",
    "direction": "Which direction does the {color} {shape} move?",
    "moving": "Which object is moving?",
}
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


# ----------------------------------------------------------------------------------------------
# Scenes


@dataclass(frozen=True)
class SceneObject:
    """One solid shape; ``size`` is its width (diameter, side or triangle base) in pixels."""

    color: str
    shape: str
    size: float
    start: tuple[float, float]
    end: tuple[float, float]

    @property
    def radius(self) -> float:
        """Radius of the bounding disc that keeps objects apart."""
        return self.size / 2 if self.shape == "circle" else self.size / math.sqrt(2)

    @property
    def moves(self) -> bool:
        return self.start != self.end

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    def center(self, t: float) -> tuple[float, float]:
        """Centre at time ``t`` in [0, 1]: a straight path at constant speed."""
        return (
            self.start[0] + (self.end[0] - self.start[0]) * t,
            self.start[1] + (self.end[1] - self.start[1]) * t,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "color": self.color,
            "shape": self.shape,
            "rgb": list(COLORS[self.color]),
            "size": self.size,
            "center": list(self.start),
            "end": list(self.end),
            "moving": self.moves,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SceneObject:
        return cls(
            color=data["color"],
            shape=data["shape"],
            size=float(data["size"]),
            start=(float(data["center"][0]), float(data["center"][1])),
            end=(float(data["end"][0]), float(data["end"][1])),
        )


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

    @property
    def moving_object(self) -> SceneObject | None:
        return next((o for o in self.objects if o.moves), None)

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
            tuple((o.color, o.shape, o.size, o.start, o.end) for o in self.objects),
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
        )


def _weighted_choice(rng: np.random.Generator, weights: dict, size: int, replace: bool) -> list:
    keys = list(weights)
    p = np.array([weights[k] for k in keys], dtype=np.float64)
    idx = rng.choice(len(keys), size=size, replace=replace, p=p / p.sum())
    return [keys[int(i)] for i in idx]


def _r2(x: float) -> float:
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


def _paths_apart(a: SceneObject, b: SceneObject) -> bool:
    """Bounding discs disjoint at every instant (at most one object moves, so a point-to-segment test)."""
    limit = a.radius + b.radius + GAP
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
    if kind not in ("image", "video"):
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
    sizes = [_r2(rng.uniform(*OBJECT_SIZE_RANGE) * short) for _ in range(count)]

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
                centre = (_r2(rng.uniform(s / 2, width - s / 2)), _r2(rng.uniform(s / 2, height - s / 2)))
                candidate = SceneObject(colors[i], shapes[i], s, centre, centre)
            if all(_paths_apart(candidate, other) for other in placed):
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


def contrast_twin(scene: Scene, rng: np.random.Generator) -> Scene | None:
    """The same scene with one thing changed: an image's object takes another shape, a video's
    mover runs the opposite way. Seen side by side, the pair can only be told apart by that one
    fact, which teaches contrastive alignment shapes and directions instead of colours alone.
    Returns None when no changed shape fits without touching its neighbours.
    """
    if scene.kind == "video":
        mover = scene.moving_object
        if mover is None or scene.direction is None:
            return None
        reverse = {"left": "right", "right": "left", "up": "down", "down": "up"}
        objects = tuple(replace(o, start=o.end, end=o.start) if o.moves else o for o in scene.objects)
        return replace(scene, id=f"{scene.id}_twin", objects=objects, direction=reverse[scene.direction])
    for i in (int(k) for k in rng.permutation(len(scene.objects))):
        for shape in (SHAPES[int(k)] for k in rng.permutation(len(SHAPES))):
            obj = scene.objects[i]
            if shape == obj.shape:
                continue
            changed = replace(obj, shape=shape)
            others = [o for j, o in enumerate(scene.objects) if j != i]
            if all(_paths_apart(changed, other) for other in others) and _inside(changed, scene):
                objects = scene.objects[:i] + (changed,) + scene.objects[i + 1 :]
                return replace(scene, id=f"{scene.id}_twin", objects=objects)
    return None


def mirror_twin(scene: Scene, rng: np.random.Generator) -> Scene | None:
    """The same still scene mirrored left-right or top-bottom (objects keep their upright shapes).

    A pair like this differs only in where things are, so a contrastive batch holding both asks
    for the place words (left, right, top, bottom) that shape and colour twins never ask for, the
    words video alignment meets again in "moves to the left". Returns None for videos and for
    scenes whose captions no flip would change (everything in the middle).
    """
    if scene.kind != "image":
        return None

    def flip(point: tuple[float, float], axis: str) -> tuple[float, float]:
        x, y = point
        return (_r2(scene.width - x), y) if axis == "horizontal" else (x, _r2(scene.height - y))

    places = [place_words(scene, o) for o in scene.objects]
    for axis in (("horizontal", "vertical")[int(k)] for k in rng.permutation(2)):
        objects = tuple(replace(o, start=flip(o.start, axis), end=flip(o.end, axis)) for o in scene.objects)
        mirrored = replace(scene, id=f"{scene.id}_mirror", objects=objects)
        if [place_words(mirrored, o) for o in objects] != places:
            return mirrored
    return None


def _inside(obj: SceneObject, scene: Scene) -> bool:
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
    other = _r2(rng.uniform(s / 2, across - s / 2))
    a, b = _r2(along_start), _r2(along_end)
    if horizontal:
        return SceneObject(color, shape, s, (a, other), (b, other))
    return SceneObject(color, shape, s, (other, a), (other, b))


# ----------------------------------------------------------------------------------------------
# Rendering


def _background(scene: Scene) -> np.ndarray:
    canvas = np.full((scene.height, scene.width), scene.background, dtype=np.int16)
    if scene.noise:
        noise_rng = np.random.default_rng(scene.noise_seed)
        canvas += noise_rng.integers(-scene.noise, scene.noise + 1, size=canvas.shape, dtype=np.int16)
    grey = np.clip(canvas, 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def _draw(canvas: np.ndarray, obj: SceneObject, centre: tuple[float, float]) -> None:
    height, width = canvas.shape[:2]
    cx, cy = centre
    half = obj.size / 2
    x0, x1 = max(0, int(math.floor(cx - half))), min(width, int(math.ceil(cx + half)) + 1)
    y0, y1 = max(0, int(math.floor(cy - half))), min(height, int(math.ceil(cy + half)) + 1)
    if x0 >= x1 or y0 >= y1:
        return
    # Pixel (i, j) covers [j, j+1) x [i, i+1); sample it at its centre.
    px = np.arange(x0, x1, dtype=np.float64)[None, :] + 0.5 - cx
    py = np.arange(y0, y1, dtype=np.float64)[:, None] + 0.5 - cy
    if obj.shape == "circle":
        mask = px * px + py * py <= half * half
    elif obj.shape == "square":
        mask = (np.abs(px) <= half) & (np.abs(py) <= half)
    elif obj.shape == "triangle":
        # apex at the top, base at the bottom; the half width grows from 0 to size/2 downwards
        mask = (py <= half) & (np.abs(px) <= (py + half) / 2)
    else:
        raise VideoLlavaError(f"unknown shape {obj.shape!r}")
    canvas[y0:y1, x0:x1][mask] = COLORS[obj.color]


def _render_array(scene: Scene, frame_index: int, background: np.ndarray | None = None) -> np.ndarray:
    canvas = (_background(scene) if background is None else background).copy()
    t = scene.time(frame_index)
    for obj in scene.objects:
        _draw(canvas, obj, obj.center(t))
    return canvas


def render_scene(scene: Scene, frame_index: int = 0) -> Image.Image:
    """Render one frame (frame 0 for images) exactly as it is written before any lossy encoding."""
    if not 0 <= frame_index < scene.n_frames:
        raise VideoLlavaError(f"{scene.id}: frame {frame_index} outside 0..{scene.n_frames - 1}")
    return Image.fromarray(_render_array(scene, frame_index), mode="RGB")


def write_media(scene: Scene, path: str | Path) -> None:
    """Render and encode a scene to ``path`` (PNG, JPEG or H.264 MP4 by the scene's kind)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if scene.kind == "image":
        image = render_scene(scene, 0)
        if scene.image_format == "jpeg":
            image.save(path, format="JPEG", quality=JPEG_QUALITY)
        else:
            image.save(path, format="PNG")
        return
    import av

    background = _background(scene)
    options = {"crf": str(VIDEO_CRF), "preset": VIDEO_PRESET, "x264-params": X264_PARAMS}
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(scene.fps), options=options)
        stream.width = scene.width
        stream.height = scene.height
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        # swscale converts RGB with BT.601 in limited range unless told otherwise; say so in the stream
        stream.codec_context.colorspace = 6  # SMPTE 170M (BT.601)
        stream.codec_context.color_range = 1  # limited
        for index in range(scene.n_frames):
            frame = av.VideoFrame.from_ndarray(_render_array(scene, index, background), format="rgb24")
            frame.pts = index
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_job(job: tuple[dict[str, Any], str]) -> str:
    scene_dict, path = job
    write_media(Scene.from_dict(scene_dict), path)
    return path


# ----------------------------------------------------------------------------------------------
# Language: captions, questions and answers


def _article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _join(items: Sequence[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def background_words(scene: Scene) -> str:
    """How captions name the background: its lightness and whether it is noisy."""
    tone = "dark grey" if scene.background < 100 else ("light grey" if scene.background > 160 else "grey")
    return f"noisy {tone}" if scene.noise else tone


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


def make_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption naming every object, where still ones sit, and the motion in videos."""
    names = [object_words(o, rng) for o in scene.objects]
    names = [
        name if o.moves else f"{name} {place_words(scene, o)}"
        for name, o in zip(names, scene.objects, strict=True)
    ]
    names = [names[int(i)] for i in rng.permutation(len(names))]
    count = len(scene.objects)
    template = SCENE_TEMPLATES[int(rng.integers(len(SCENE_TEMPLATES)))]
    text = template.format(
        objects=_join(names),
        background=background_words(scene),
        count=f"{COUNT_WORDS[count]} shape{'s' if count > 1 else ''}",
        a_media="an image" if scene.kind == "image" else "a video",
    )
    mover = scene.moving_object
    if mover is None or scene.direction is None:
        return _capitalise(text) + "."
    phrases = MOTION_PHRASES[scene.direction]
    motion = f"the {mover.name} {phrases[int(rng.integers(len(phrases)))]}"
    templates = MOTION_TEMPLATES if count > 1 else MOTION_TEMPLATES[:3]
    template = templates[int(rng.integers(len(templates)))]
    rest = "the other shape stays" if count == 2 else "the others stay"
    return _capitalise(template.format(scene=text, motion=motion, Motion=_capitalise(motion), rest=rest))


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
    out.append({"type": "count", "split": None, "answer": COUNT_WORDS[len(scene.objects)]} | _text("count"))
    mover = scene.moving_object
    if scene.kind == "video" and mover is not None and scene.direction is not None:
        out.append(
            {"type": "direction", "split": None, "answer": scene.direction}
            | _text("direction", color=mover.color, shape=mover.shape)
        )
        out.append({"type": "moving", "split": None, "answer": f"the {mover.name}"} | _text("moving"))
    return out


def _text(qtype: str, **slots: str) -> dict[str, str]:
    return {"question": QUESTION_TEMPLATES[qtype].format(**slots)}


class ProbeBalancer:
    """Hands out POPE splits round-robin and alternates yes/no within each split, so both stay balanced."""

    def __init__(self) -> None:
        self.n_probes = 0
        self.per_split: Counter[str] = Counter()

    def peek(self) -> tuple[str, bool]:
        split = SPLITS[self.n_probes % len(SPLITS)]
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
    n_turns = int(rng.integers(4, 9))
    n_probes = int(rng.choice(4, p=[0.1, 0.3, 0.4, 0.2]))
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


def heldout_questions(
    scene: Scene, rng: np.random.Generator, ranking: Sequence[tuple[str, str]]
) -> list[dict[str, Any]]:
    """All canonical questions of a held-out scene, with one yes and one no probe per POPE split."""
    out = fixed_questions(scene)
    for split in SPLITS:
        out.append(exists_question(scene, split, True, rng, ranking))
        out.append(exists_question(scene, split, False, rng, ranking))
    return out


def _instruct_entry(
    scene: Scene, media: str, turns: Sequence[dict[str, Any]], **extra: str
) -> dict[str, Any]:
    return (
        _entry(scene, media)
        | extra
        | {
            "conversations": _conversation(scene, turns),
            "turn_types": [{"type": t["type"], "split": t["split"]} for t in turns],
        }
    )


def direction_entry(scene: Scene, media: str, turns: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The video's direction turn again, as a conversation of its own (None without one).

    Of all canonical questions only the direction needs the order of the frames, and in the
    multi-turn file it is one turn in twenty; a stage that also reads these entries gives it a
    larger share.
    """
    asked = [t for t in turns if t["type"] == "direction"]
    if not asked:
        return None
    return _instruct_entry(scene, media, asked) | {"id": f"{scene.id}_direction"}


def _conversation(scene: Scene, turns: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    token = "<image>" if scene.kind == "image" else "<video>"
    conv: list[dict[str, str]] = []
    for k, turn in enumerate(turns):
        question = f"{token}\n{turn['question']}" if k == 0 else turn["question"]
        conv.append({"from": "human", "value": question})
        conv.append({"from": "gpt", "value": turn["answer"]})
    return conv


# ----------------------------------------------------------------------------------------------
# Dataset generation


def _media_path(scene: Scene, set_name: str, index: int) -> str:
    folder = "images" if scene.kind == "image" else "videos"
    return f"{folder}/{set_name}_{index:06d}.{scene.extension}"


def _sample_set(
    seed: int,
    stream: int,
    set_name: str,
    n_images: int,
    n_videos: int,
    min_size: int,
    max_size: int,
    avoid: set[tuple] | None = None,
) -> list[tuple[Scene, str]]:
    out: list[tuple[Scene, str]] = []
    for kind_id, (kind, count) in enumerate((("image", n_images), ("video", n_videos))):
        for index in range(count):
            attempt = 0
            while True:
                # One seed per media: a set does not depend on the sizes of other sets or on workers.
                rng = np.random.default_rng([seed, stream, kind_id, index, attempt])
                tag = "img" if kind == "image" else "vid"
                scene = sample_scene(
                    rng, kind, scene_id=f"{set_name}_{tag}_{index:06d}", min_size=min_size, max_size=max_size
                )
                if avoid is None or scene.signature() not in avoid:
                    break
                attempt += 1
            out.append((scene, _media_path(scene, set_name, index)))
    return out


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def _entry(scene: Scene, media: str) -> dict[str, Any]:
    return {"id": scene.id, scene.kind: media}


def object_regions(scene: Scene) -> list[dict[str, Any]]:
    """Each object's box and name, for alignment that grounds names in the patches they cover.

    A video's box spans the object's whole path and its name says how it moves, so the region
    can only be named right by a tower that sees the motion; a moving object's ``track`` gives
    its box at the first and the last frame (it moves in a straight line at constant speed).
    """

    def box_around(centres: Sequence[tuple[float, float]], half: float) -> list[float]:
        xs, ys = [c[0] for c in centres], [c[1] for c in centres]
        return [
            _r2(max(0.0, min(xs) - half)),
            _r2(max(0.0, min(ys) - half)),
            _r2(min(float(scene.width), max(xs) + half)),
            _r2(min(float(scene.height), max(ys) + half)),
        ]

    regions = []
    for obj in scene.objects:
        half = obj.size / 2
        region: dict[str, Any] = {"box": box_around((obj.start, obj.end), half), "text": obj.name}
        if scene.kind == "video":
            region["motion"] = f"moving {scene.direction}" if obj.moves else "standing still"
            region["text"] += " " + region["motion"]
            if obj.moves:
                region["track"] = [
                    {"t": 0.0, "box": box_around((obj.start,), half)},
                    {"t": 1.0, "box": box_around((obj.end,), half)},
                ]
        regions.append(region)
    return regions


def _caption_entry(scene: Scene, media: str, caption: str, rng: np.random.Generator) -> dict[str, Any]:
    request = CAPTION_REQUESTS[int(rng.integers(len(CAPTION_REQUESTS)))].format(media=scene.kind)
    token = "<image>" if scene.kind == "image" else "<video>"
    conversations = [{"from": "human", "value": f"{token}\n{request}"}, {"from": "gpt", "value": caption}]
    return _entry(scene, media) | {"conversations": conversations, "regions": object_regions(scene)}


def world_description() -> dict[str, Any]:
    """The fixed world, so that other tools can render, ask and score without importing this module."""
    return {
        "colors": {name: list(rgb) for name, rgb in COLORS.items()},
        "shapes": list(SHAPES),
        "directions": list(DIRECTIONS),
        "pope_splits": list(SPLITS),
        "count_words": {str(k): v for k, v in COUNT_WORDS.items()},
        "question_templates": dict(QUESTION_TEMPLATES),
        "caption_requests": list(CAPTION_REQUESTS),
        "instruct_caption_requests": list(INSTRUCT_CAPTION_REQUESTS),
        "caption_templates": list(SCENE_TEMPLATES),
        "motion_phrases": {k: list(v) for k, v in MOTION_PHRASES.items()},
        "motion_templates": list(MOTION_TEMPLATES),
        "shape_first_probability": SHAPE_FIRST_PROBABILITY,
        "priors": {
            "color_weights": dict(COLOR_WEIGHTS),
            "shape_weights": dict(SHAPE_WEIGHTS),
            "count_weights": {str(k): v for k, v in COUNT_WEIGHTS.items()},
        },
        "rules": {
            "objects_per_scene": [1, 3],
            "object_size_fraction_of_short_side": list(OBJECT_SIZE_RANGE),
            "object_size_meaning": "width in pixels: circle diameter, square side, triangle base (= height)",
            "triangle": "apex up; vertices (cx, cy - size/2), (cx +- size/2, cy + size/2)",
            "bounding_disc_radius": "size/2 for circles, size/sqrt(2) otherwise",
            "min_gap_px": GAP,
            "min_travel_fraction": MIN_TRAVEL,
            "frames": list(FRAMES_RANGE),
            "fps": list(FPS_RANGE),
            "grey_level": list(GREY_RANGE),
            "noise_amplitude": list(NOISE_RANGE),
            "max_aspect": "16:9",
            "min_media_size": MIN_MEDIA_SIZE,
            "pixel_convention": "pixel (row i, column j) is drawn if its centre (j + 0.5, i + 0.5) is inside",
            "motion": "centre(t) = center + (end - center) * t / (n_frames - 1)",
        },
        "encoding": {
            "jpeg_quality": JPEG_QUALITY,
            "video_codec": "libx264",
            "video_crf": VIDEO_CRF,
            "video_preset": VIDEO_PRESET,
            "x264_params": X264_PARAMS,
            "pix_fmt": "yuv420p",
        },
    }


def generate(
    out_dir: str | Path,
    seed: int = 0,
    n_images: int = 2000,
    n_videos: int = 1000,
    n_test_images: int = 150,
    n_test_videos: int = 150,
    min_size: int = MIN_MEDIA_SIZE,
    max_size: int = DEFAULT_MAX_SIZE,
    workers: int = 1,
    dry_run: bool = False,
    twins: float = 0.0,
    mirrors: float = 0.0,
) -> dict[str, Any]:
    """Write a complete ShapesWorld dataset; ``dry_run`` writes the JSON files but no media.

    ``twins`` is the fraction of training media that also get a `contrast_twin`; both carry the
    same ``group`` in the JSON files, so samplers can put them in one batch. ``mirrors`` is the
    fraction of training images that also get a `mirror_twin`, in the same group.
    """
    started = time.perf_counter()
    for name, fraction in (("twins", twins), ("mirrors", mirrors)):
        if not 0.0 <= fraction <= 1.0:
            raise VideoLlavaError(f"{name} must be a fraction in [0, 1] (got {fraction})")
    for name, value in (
        ("n_images", n_images),
        ("n_videos", n_videos),
        ("n_test_images", n_test_images),
        ("n_test_videos", n_test_videos),
    ):
        if value < 0:
            raise VideoLlavaError(f"{name} must not be negative (got {value})")
    if min_size < MIN_MEDIA_SIZE:
        raise VideoLlavaError(f"min_size must be at least {MIN_MEDIA_SIZE} (got {min_size})")
    if max_size < min_size:
        raise VideoLlavaError(f"max_size ({max_size}) is smaller than min_size ({min_size})")
    out = Path(out_dir)
    media_root = out / "media"
    (media_root / "images").mkdir(parents=True, exist_ok=True)
    (media_root / "videos").mkdir(parents=True, exist_ok=True)

    train = _sample_set(seed, 0, "train", n_images, n_videos, min_size, max_size)
    groups: dict[str, str] = {}
    if twins > 0 or mirrors > 0:
        twin_rng = np.random.default_rng([seed, 0, 3])
        mirror_rng = np.random.default_rng([seed, 0, 4])
        paired: list[tuple[Scene, str]] = []
        for scene, media in train:
            paired.append((scene, media))
            stem = media.rsplit(".", 1)[0]
            twin = contrast_twin(scene, twin_rng) if twin_rng.random() < twins else None
            mirror = mirror_twin(scene, mirror_rng) if mirror_rng.random() < mirrors else None
            for kin, suffix in ((twin, "twin"), (mirror, "mirror")):
                if kin is not None:
                    paired.append((kin, f"{stem}_{suffix}.{kin.extension}"))
                    groups[scene.id] = groups[kin.id] = scene.id
        train = paired
    train_signatures = {scene.signature() for scene, _ in train}
    test = _sample_set(seed, 1, "test", n_test_images, n_test_videos, min_size, max_size, train_signatures)

    # Text for the training set
    text_rng = np.random.default_rng([seed, 0, 2])
    ranking = popularity_ranking(scene for scene, _ in train)
    balancer = ProbeBalancer()
    captions: list[dict[str, Any]] = []
    instruct: list[dict[str, Any]] = []
    direction: list[dict[str, Any] | None] = []  # per training media, in step with instruct
    scene_rows: list[dict[str, Any]] = []
    for scene, media in train:
        caption = make_caption(scene, text_rng)
        group = {"group": groups[scene.id]} if scene.id in groups else {}
        captions.append(_caption_entry(scene, media, caption, text_rng) | group)
        turns = instruct_turns(scene, caption, text_rng, ranking, balancer)
        instruct.append(_instruct_entry(scene, media, turns, **group))
        direction.append(direction_entry(scene, media, turns))
        scene_rows.append({"set": "train", "media": media, "caption": caption} | scene.to_dict())
    # Mix images and videos so that a reader going through the file in order sees both.
    order = [int(i) for i in text_rng.permutation(len(train))]
    captions = [captions[i] for i in order]
    instruct = [instruct[i] for i in order]
    direction = [direction[i] for i in order if direction[i] is not None]

    # Held-out text from its own stream
    test_rng = np.random.default_rng([seed, 1, 2])
    test_ranking = popularity_ranking(scene for scene, _ in test)
    test_captions: list[dict[str, Any]] = []
    questions: list[dict[str, Any]] = []
    for scene, media in test:
        caption = make_caption(scene, test_rng)
        test_captions.append(_caption_entry(scene, media, caption, test_rng))
        for q in heldout_questions(scene, test_rng, test_ranking):
            questions.append(
                {
                    "question_id": len(questions),
                    "media_id": scene.id,
                    "media": media,
                    "modality": scene.kind,
                    "type": q["type"],
                    "split": q["split"],
                    "question": q["question"],
                    "answer": q["answer"],
                }
            )
        scene_rows.append({"set": "test", "media": media, "caption": caption} | scene.to_dict())

    params = {
        "seed": seed,
        "n_images": n_images,
        "n_videos": n_videos,
        "n_test_images": n_test_images,
        "n_test_videos": n_test_videos,
        "min_size": min_size,
        "max_size": max_size,
        "popular_ranking_train": [f"{c} {s}" for c, s in ranking],
        "popular_ranking_test": [f"{c} {s}" for c, s in test_ranking],
    }
    _write_json(out / "world.json", world_description() | {"generation": params})
    _write_json(out / "captions.json", captions)
    _write_json(out / "instruct.json", instruct)
    _write_json(out / "instruct_direction.json", direction)
    _write_json(out / "test_captions.json", test_captions)
    _write_jsonl(out / "test_questions.jsonl", questions)
    _write_jsonl(out / "scenes.jsonl", scene_rows)
    text_seconds = time.perf_counter() - started

    if not dry_run:
        jobs = [(scene.to_dict(), str(media_root / media)) for scene, media in train + test]
        # Videos first: they are the slow jobs, so the pool ends with short image jobs.
        jobs.sort(key=lambda job: job[0]["kind"] != "video")
        if workers > 1 and len(jobs) > 1:
            # fork where possible: spawn would re-run an unguarded calling script in every worker
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            context = multiprocessing.get_context(method)
            with context.Pool(processes=workers) as pool:
                for _ in pool.imap_unordered(_write_job, jobs, chunksize=4):
                    pass
        else:
            for job in jobs:
                _write_job(job)

    type_counts = Counter(q["type"] for q in questions)
    answers = Counter(a["answer"] for a in questions if a["type"] == "exists")
    return {
        "out_dir": str(out),
        "seed": seed,
        "train_images": n_images,
        "train_videos": n_videos,
        "train_twins": sum(key.endswith("_twin") for key in groups),
        "train_mirrors": sum(key.endswith("_mirror") for key in groups),
        "test_images": n_test_images,
        "test_videos": n_test_videos,
        "captions": len(captions),
        "instruct": len(instruct),
        "instruct_turns": sum(len(e["conversations"]) // 2 for e in instruct),
        "instruct_direction": len(direction),
        "test_questions": len(questions),
        "test_question_types": dict(sorted(type_counts.items())),
        "test_exists_answers": dict(sorted(answers.items())),
        "media_written": 0 if dry_run else len(train) + len(test),
        "text_seconds": round(text_seconds, 2),
        "seconds": round(time.perf_counter() - started, 2),
    }


# ----------------------------------------------------------------------------------------------
# Command line


def default_data_folder(seed: int) -> Path:
    """Under runs/, beside training runs: a data set generated in a checkout stays out of git."""
    return Path("runs") / "shapesworld-data" / f"seed-{seed}"


def _run_generate(args: argparse.Namespace) -> int:
    min_size, max_size = args.min_size, args.max_size
    if args.size:
        if len(args.size) > 2:
            raise VideoLlavaError("--size takes one value (fixed short side) or two (MIN MAX)")
        min_size, max_size = args.size[0], args.size[-1]
    summary = generate(
        args.out if args.out is not None else default_data_folder(args.seed),
        seed=args.seed,
        n_images=args.images,
        n_videos=args.videos,
        n_test_images=args.test_images,
        n_test_videos=args.test_videos,
        min_size=min_size,
        max_size=max_size,
        workers=args.workers,
        dry_run=args.dry_run,
        twins=args.twins,
        mirrors=args.mirrors,
    )
    print(
        f"wrote {summary['train_images']} + {summary['test_images']} images, "
        f"{summary['train_videos']} + {summary['test_videos']} videos (train + test) "
        f"and {summary['test_questions']} test questions to {summary['out_dir']} "
        f"in {summary['seconds']:.1f} s"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``shapesworld generate`` to the ``videollava`` command."""
    parser = subparsers.add_parser(
        "shapesworld", help="synthetic shapes images and videos with exact answers", description=__doc__
    )
    actions = parser.add_subparsers(dest="shapesworld_action", required=True, metavar="ACTION")
    gen = actions.add_parser(
        "generate",
        help="render media and write captions, instructions and held-out questions",
        description="Render ShapesWorld media and write LLaVA-style JSON files; same seed, same output.",
    )
    gen.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder for media/ and the JSON files (default: runs/shapesworld-data/seed-SEED)",
    )
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--images", type=int, default=2000, help="training images (default 2000)")
    gen.add_argument("--videos", type=int, default=1000, help="training videos (default 1000)")
    gen.add_argument("--test-images", type=int, default=150, help="held-out images (default 150)")
    gen.add_argument("--test-videos", type=int, default=150, help="held-out videos (default 150)")
    gen.add_argument("--min-size", type=int, default=MIN_MEDIA_SIZE, help="smallest short side in pixels")
    gen.add_argument("--max-size", type=int, default=DEFAULT_MAX_SIZE, help="largest short side in pixels")
    gen.add_argument(
        "--size", type=int, nargs="+", metavar="PX", help="short side: one value (fixed) or MIN MAX"
    )
    gen.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="processes that render and encode media (output does not depend on it)",
    )
    gen.add_argument(
        "--twins",
        type=float,
        default=0.0,
        help="fraction of training media that also get a twin differing in one shape (images) or "
        "in direction (videos), grouped with it for contrastive batches (default 0)",
    )
    gen.add_argument(
        "--mirrors",
        type=float,
        default=0.0,
        help="fraction of training images that also get a mirrored twin (objects moved to the other "
        "side), grouped with them (default 0)",
    )
    gen.add_argument("--dry-run", action="store_true", help="write the JSON files only, no media")
    gen.set_defaults(func=_run_generate)
