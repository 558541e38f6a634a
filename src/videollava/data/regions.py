"""Named regions of a sample's media (an object, its box, and for videos its track and motion),
as the optional ``regions`` list of a LLaVA JSON entry gives them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Region:
    """A named part of the media: an object and its box, (x0, y0, x1, y1) in pixels.

    A video region may also say where the object is over time: ``track`` holds keyframes
    (t, box), t from 0 (first frame) to 1 (last), the box moving linearly between them. Once the
    region is mapped into the model's crop, ``frame_boxes`` holds its box in each sampled frame
    (None where the crop cuts it away), so each frame's own patches can be told what they show.
    ``motion`` says how a video's object moves ("moving left", "standing still"), apart from its name.
    A track keyframe may say what the object does from then until the next keyframe
    (``track_motions``, "" where it does not), so that ``motion_at`` tells, say, when in a clip of
    ordered events the object moves; ``frame_motions`` holds that per sampled frame.
    """

    box: Box
    text: str
    track: tuple[tuple[float, Box], ...] = ()
    frame_boxes: tuple[Box | None, ...] = ()
    motion: str = ""
    track_motions: tuple[str, ...] = ()
    frame_motions: tuple[str, ...] = ()

    def motion_at(self, t: float) -> str:
        """What the object does at time ``t`` in [0, 1]: the motion of the track segment holding
        ``t`` when the keyframes name one, else the whole clip's ``motion``."""
        k = max((i for i, (start, _) in enumerate(self.track) if start <= t), default=0)
        named = self.track_motions[k] if k < len(self.track_motions) else ""
        return named or self.motion

    def box_at(self, t: float) -> Box:
        """The tracked box at time ``t`` in [0, 1]; the whole-clip box when there is no track."""
        if not self.track:
            return self.box
        if t <= self.track[0][0]:
            return self.track[0][1]
        for (t0, b0), (t1, b1) in zip(self.track, self.track[1:], strict=False):
            if t <= t1:
                w = (t - t0) / (t1 - t0)
                return tuple(a + (b - a) * w for a, b in zip(b0, b1, strict=True))  # type: ignore[return-value]
        return self.track[-1][1]


def _parse_box(box: Any, where: str) -> Box:
    if (
        not isinstance(box, list)
        or len(box) != 4
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
    ):
        raise ValueError(f"{where}: 'box' must be four numbers [x0, y0, x1, y1], got {box!r}")
    if not (box[0] < box[2] and box[1] < box[3]):
        raise ValueError(f"{where}: box {box} is empty (it needs x0 < x1 and y0 < y1)")
    return (float(box[0]), float(box[1]), float(box[2]), float(box[3]))


def _parse_track(raw: Any, where: str) -> tuple[tuple[tuple[float, Box], ...], tuple[str, ...]]:
    """The keyframes and, per keyframe, the motion it names from then on ("" where none)."""
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{where}: 'track' must be a non-empty list of {{t, box}} keyframes")
    keys, motions = [], []
    for k, item in enumerate(raw):
        if not isinstance(item, dict) or not {"t", "box"} <= set(item):
            raise ValueError(f"{where}: track keyframe {k} must be an object with 't' and 'box'")
        t = item["t"]
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not 0.0 <= t <= 1.0:
            raise ValueError(f"{where}: track keyframe {k}: 't' must be a number in [0, 1], got {t!r}")
        if keys and t <= keys[-1][0]:
            raise ValueError(f"{where}: track times must increase, got {t} after {keys[-1][0]}")
        keys.append((float(t), _parse_box(item["box"], f"{where}, track keyframe {k}")))
        motion = item.get("motion", "")
        if not isinstance(motion, str) or ("motion" in item and not motion.strip()):
            raise ValueError(f"{where}: track keyframe {k}: 'motion' must be a non-empty string")
        motions.append(motion.strip())
    return tuple(keys), tuple(motions) if any(motions) else ()


def parse_regions(raw: Any) -> list[Region]:
    """The entry's optional ``regions``: ``[{"box": [x0, y0, x1, y1], "text": "...", "track":
    [{"t": 0.0, "box": [...], "motion": "..."}, ...], "motion": "..."}]`` in the media's own pixels
    (for a video, ``box`` holds the object throughout and the optional ``track`` follows it; a
    keyframe's optional ``motion`` holds until the next keyframe)."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ValueError("'regions' must be a list of {box, text} objects")
    regions = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not {"box", "text"} <= set(item):
            raise ValueError(f"region {i} must be an object with 'box' and 'text'")
        box, text = _parse_box(item["box"], f"region {i}"), item["text"]
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"region {i}: 'text' must be a non-empty string")
        track, track_motions = _parse_track(item["track"], f"region {i}") if "track" in item else ((), ())
        motion = item.get("motion", "")
        if not isinstance(motion, str) or ("motion" in item and not motion.strip()):
            raise ValueError(f"region {i}: 'motion' must be a non-empty string")
        regions.append(Region(box, text.strip(), track, motion=motion.strip(), track_motions=track_motions))
    return regions
