"""ShapesWorld twins: a scene and a copy that differs from it in one fact, for contrastive batches."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from videollava.shapesworld.render import meets_contrast_rule
from videollava.shapesworld.text import place_words
from videollava.shapesworld.wide import order_twin
from videollava.shapesworld.world import SHAPES, Scene, inside_frame, paths_apart, two_decimals


def contrast_twin(scene: Scene, rng: np.random.Generator) -> Scene | None:
    """The same scene with one thing changed: an image's object takes another shape, a video's
    mover runs the opposite way. Seen side by side, the pair can only be told apart by that one
    fact, which teaches contrastive alignment shapes and directions instead of colours alone.
    In a video of ordered events, two events trade places in time (`order_twin`).
    Returns None when no changed shape fits without touching its neighbours.
    """
    if scene.is_sequence:
        return order_twin(scene, rng)
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
            if all(paths_apart(changed, other) for other in others) and inside_frame(changed, scene):
                objects = scene.objects[:i] + (changed,) + scene.objects[i + 1 :]
                return replace(scene, id=f"{scene.id}_twin", objects=objects)
    return None


def mirror_twin(scene: Scene, rng: np.random.Generator) -> Scene | None:
    """The same still scene mirrored left-right or top-bottom (objects keep their upright shapes).

    A pair like this differs only in where things are, so a contrastive batch holding both asks
    for the place words (left, right, top, bottom) that shape and colour twins never ask for, the
    words video alignment meets again in "moves to the left". Returns None for videos, for
    scenes whose captions no flip would change (everything in the middle), and for a backdrop
    that would break the contrast rule under the moved objects.
    """
    if scene.kind != "image":
        return None

    def flip(point: tuple[float, float], axis: str) -> tuple[float, float]:
        x, y = point
        return (
            (two_decimals(scene.width - x), y)
            if axis == "horizontal"
            else (x, two_decimals(scene.height - y))
        )

    places = [place_words(scene, o) for o in scene.objects]
    for axis in (("horizontal", "vertical")[int(k)] for k in rng.permutation(2)):
        objects = tuple(replace(o, start=flip(o.start, axis), end=flip(o.end, axis)) for o in scene.objects)
        mirrored = replace(scene, id=f"{scene.id}_mirror", objects=objects)
        if [place_words(mirrored, o) for o in objects] != places:
            if scene.backdrop is not None and not meets_contrast_rule(mirrored):
                continue
            return mirrored
    return None
