"""What `world.json` says about the world: every rule, prior, template and encoding setting, so
that other tools can render, ask and score without importing this package."""

from __future__ import annotations

from typing import Any

from videollava.shapesworld.backdrops import BACKDROP_STYLES
from videollava.shapesworld.render import (
    BACKDROP_MIN_DELTA_E,
    CONTRAST_MIN_DELTA_E,
    JPEG_QUALITY,
    VIDEO_CRF,
    VIDEO_PRESET,
    X264_PARAMS,
)
from videollava.shapesworld.text import (
    APPEAR_PHRASES,
    BACKDROP_WORDS,
    CAPTION_REQUESTS,
    DISAPPEAR_PHRASES,
    EVENT_QUESTION_TEMPLATES,
    INSTRUCT_CAPTION_REQUESTS,
    MOTION_PHRASES,
    MOTION_TEMPLATES,
    POPE_SPLITS,
    QUESTION_TEMPLATES,
    SCENE_TEMPLATES,
    SEQUENCE_TEMPLATES,
    SHAPE_FIRST_PROBABILITY,
)
from videollava.shapesworld.wide import (
    EVENT_COUNT_WEIGHTS,
    EVENT_KIND_WEIGHTS,
    MIN_EVENT_FRAMES,
    MOVE_EDGE,
    MOVE_SHARE,
    ORDER_VISIBLE_FRAMES,
    SWITCH_EDGE,
    VARIETY,
)
from videollava.shapesworld.world import (
    COLOR_WEIGHTS,
    COLORS,
    COUNT_WEIGHTS,
    COUNT_WORDS,
    DIRECTIONS,
    FPS_RANGE,
    FRAMES_RANGE,
    GAP,
    GREY_RANGE,
    MIN_MEDIA_SIZE,
    MIN_TRAVEL,
    NOISE_RANGE,
    NUMBER_WORDS,
    OBJECT_SIZE_RANGE,
    SHAPE_WEIGHTS,
    SHAPES,
)


def world_description(event_frames: tuple[int, int] | None = None) -> dict[str, Any]:
    """The fixed world, so that other tools can render, ask and score without importing this package;
    with ``event_frames`` (a data set that goes beyond the standard world), the wider world's rules
    and those of ordered events too."""
    description = _standard_description()
    if event_frames is not None:
        description["wider_world"] = {
            "backdrop_styles": list(BACKDROP_STYLES),
            "backdrop_words": dict(BACKDROP_WORDS),
            "max_aspect": VARIETY.max_aspect,
            "tall_probability": VARIETY.tall,
            "object_size_fraction_of_short_side": list(VARIETY.object_size),
            "count_weights": {str(k): v for k, v in VARIETY.counts.items()},
            "count_words": {str(k): v for k, v in NUMBER_WORDS.items()},
            "backdrop_tint": VARIETY.tint,
            "contrast_rule": {
                "min_delta_e2000": CONTRAST_MIN_DELTA_E,
                "around": "pixels within size/sqrt(2) + max(3, size/4) px of any point of the object's path",
                "backdrop_min_delta_e2000_to_every_color": BACKDROP_MIN_DELTA_E,
                "colour_space": "CIELAB, D65, from 8-bit sRGB as drawn (before lossy encoding)",
            },
        }
        description["events"] = {
            "frames": list(event_frames),
            "event_count_weights": {str(k): v for k, v in EVENT_COUNT_WEIGHTS.items()},
            "event_kind_weights": dict(EVENT_KIND_WEIGHTS),
            "timing": (
                f"event k of n holds the k-th n-th of the clip; a move lasts {MOVE_SHARE[0]}-{MOVE_SHARE[1]} of it, "
                f"{MOVE_EDGE} of it from either edge; an appearance or disappearance falls within its "
                f"middle {1 - 2 * SWITCH_EDGE:.2f}, halfway between two frames"
            ),
            "order_visible_with_frames": ORDER_VISIBLE_FRAMES,
            "min_frames": MIN_EVENT_FRAMES,
            "world": (
                "a `variety` share in the wider world; the others in the standard world's frames, "
                "sizes and counts on flat or noisy grey"
            ),
            "question_templates": dict(EVENT_QUESTION_TEMPLATES),
            "appear_phrases": list(APPEAR_PHRASES),
            "disappear_phrases": list(DISAPPEAR_PHRASES),
            "sequence_templates": {str(k): list(v) for k, v in SEQUENCE_TEMPLATES.items()},
        }
    return description


def _standard_description() -> dict[str, Any]:
    return {
        "colors": {name: list(rgb) for name, rgb in COLORS.items()},
        "shapes": list(SHAPES),
        "directions": list(DIRECTIONS),
        "pope_splits": list(POPE_SPLITS),
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
