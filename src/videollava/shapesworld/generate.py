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
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from videollava.data.conversation import user_turn
from videollava.errors import VideoLlavaError
from videollava.shapesworld.render import JPEG_QUALITY, VIDEO_CRF, VIDEO_PRESET, X264_PARAMS, write_media
from videollava.shapesworld.text import (
    CAPTION_REQUESTS,
    INSTRUCT_CAPTION_REQUESTS,
    MOTION_PHRASES,
    MOTION_TEMPLATES,
    POPE_SPLITS,
    QUESTION_TEMPLATES,
    SCENE_TEMPLATES,
    SHAPE_FIRST_PROBABILITY,
    ProbeBalancer,
    heldout_questions,
    instruct_turns,
    make_caption,
    popularity_ranking,
)
from videollava.shapesworld.twins import contrast_twin, mirror_twin
from videollava.shapesworld.world import (
    COLOR_WEIGHTS,
    COLORS,
    COUNT_WEIGHTS,
    COUNT_WORDS,
    DEFAULT_MAX_SIZE,
    DIRECTIONS,
    FPS_RANGE,
    FRAMES_RANGE,
    GAP,
    GREY_RANGE,
    MIN_MEDIA_SIZE,
    MIN_TRAVEL,
    NOISE_RANGE,
    OBJECT_SIZE_RANGE,
    SHAPE_WEIGHTS,
    SHAPES,
    Scene,
    sample_scene,
    two_decimals,
)


class GenerationError(VideoLlavaError, ValueError):
    """Settings that cannot make a data set; also a ValueError, so that a recipe's check names the key."""


@dataclass(frozen=True)
class GenerationConfig:
    """What a ShapesWorld data set holds: the same config (workers aside) writes the same files."""

    images: int = 2000  # training images
    videos: int = 1000  # training videos
    test_images: int = 150  # held-out images, from a seed stream of their own
    test_videos: int = 150  # held-out videos
    seed: int = 0
    min_size: int = MIN_MEDIA_SIZE  # smallest short side in pixels
    max_size: int = DEFAULT_MAX_SIZE  # largest short side in pixels
    workers: int = 1  # processes that render and encode media; the output does not depend on it
    # Fraction of training media that also get a `contrast_twin`, in the same `group` (one batch).
    twins: float = 0.0
    # Fraction of training images that also get a `mirror_twin`, in the same group.
    mirrors: float = 0.0

    def __post_init__(self) -> None:
        for name in ("twins", "mirrors"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise GenerationError(f"{name}: must be a fraction in [0, 1], got {getattr(self, name)}")
        for name in ("images", "videos", "test_images", "test_videos"):
            if getattr(self, name) < 0:
                raise GenerationError(f"{name}: must not be negative, got {getattr(self, name)}")
        if self.min_size < MIN_MEDIA_SIZE:
            raise GenerationError(f"min_size: must be at least {MIN_MEDIA_SIZE}, got {self.min_size}")
        if self.max_size < self.min_size:
            raise GenerationError(f"max_size: {self.max_size} is smaller than min_size {self.min_size}")


def generate(out_dir: str | Path, config: GenerationConfig, *, dry_run: bool = False) -> dict[str, Any]:
    """Write a complete ShapesWorld dataset; ``dry_run`` writes the JSON files but no media."""
    started = time.perf_counter()
    seed, min_size, max_size = config.seed, config.min_size, config.max_size
    twins, mirrors = config.twins, config.mirrors
    out = Path(out_dir)
    media_root = out / "media"
    (media_root / "images").mkdir(parents=True, exist_ok=True)
    (media_root / "videos").mkdir(parents=True, exist_ok=True)

    train = _sample_set(seed, 0, "train", config.images, config.videos, min_size, max_size)
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
    test = _sample_set(
        seed, 1, "test", config.test_images, config.test_videos, min_size, max_size, train_signatures
    )

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
        "n_images": config.images,
        "n_videos": config.videos,
        "n_test_images": config.test_images,
        "n_test_videos": config.test_videos,
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
        if config.workers > 1 and len(jobs) > 1:
            # fork where possible: spawn would re-run an unguarded calling script in every worker
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            context = multiprocessing.get_context(method)
            with context.Pool(processes=config.workers) as pool:
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
        "train_images": config.images,
        "train_videos": config.videos,
        "train_twins": sum(key.endswith("_twin") for key in groups),
        "train_mirrors": sum(key.endswith("_mirror") for key in groups),
        "test_images": config.test_images,
        "test_videos": config.test_videos,
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


def _write_job(job: tuple[dict[str, Any], str]) -> str:
    """One media file, from a scene as a plain dict: what a worker process receives."""
    scene_dict, path = job
    write_media(Scene.from_dict(scene_dict), path)
    return path


def world_description() -> dict[str, Any]:
    """The fixed world, so that other tools can render, ask and score without importing this module."""
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


# ----------------------------------------------------------------------------------------------
# Media sets


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


def _media_path(scene: Scene, set_name: str, index: int) -> str:
    folder = "images" if scene.kind == "image" else "videos"
    return f"{folder}/{set_name}_{index:06d}.{scene.extension}"


# ----------------------------------------------------------------------------------------------
# LLaVA JSON entries


def _entry(scene: Scene, media: str) -> dict[str, Any]:
    return {"id": scene.id, scene.kind: media}


def _caption_entry(scene: Scene, media: str, caption: str, rng: np.random.Generator) -> dict[str, Any]:
    request = CAPTION_REQUESTS[int(rng.integers(len(CAPTION_REQUESTS)))].format(media=scene.kind)
    conversations = [
        {"from": "human", "value": _first_turn(scene, request)},
        {"from": "gpt", "value": caption},
    ]
    return _entry(scene, media) | {"conversations": conversations, "regions": object_regions(scene)}


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


def _first_turn(scene: Scene, question: str) -> str:
    """The question that shows the scene, written as inference writes a user turn."""
    return user_turn(question, images=int(scene.kind == "image"), videos=int(scene.kind == "video"))


def _conversation(scene: Scene, turns: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    conv: list[dict[str, str]] = []
    for k, turn in enumerate(turns):
        question = _first_turn(scene, turn["question"]) if k == 0 else turn["question"]
        conv.append({"from": "human", "value": question})
        conv.append({"from": "gpt", "value": turn["answer"]})
    return conv


def object_regions(scene: Scene) -> list[dict[str, Any]]:
    """Each object's box and name, for alignment that grounds names in the patches they cover.

    A video's box spans the object's whole path and its name says how it moves, so the region
    can only be named right by a tower that sees the motion; a moving object's ``track`` gives
    its box at the first and the last frame (it moves in a straight line at constant speed).
    """

    def box_around(centres: Sequence[tuple[float, float]], half: float) -> list[float]:
        xs, ys = [c[0] for c in centres], [c[1] for c in centres]
        return [
            two_decimals(max(0.0, min(xs) - half)),
            two_decimals(max(0.0, min(ys) - half)),
            two_decimals(min(float(scene.width), max(xs) + half)),
            two_decimals(min(float(scene.height), max(ys) + half)),
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


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


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
    config = GenerationConfig(
        images=args.images,
        videos=args.videos,
        test_images=args.test_images,
        test_videos=args.test_videos,
        seed=args.seed,
        min_size=min_size,
        max_size=max_size,
        workers=args.workers,
        twins=args.twins,
        mirrors=args.mirrors,
    )
    out = args.out if args.out is not None else default_data_folder(args.seed)
    summary = generate(out, config, dry_run=args.dry_run)
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
    defaults = GenerationConfig()
    gen.add_argument("--seed", type=int, default=defaults.seed)
    gen.add_argument(
        "--images", type=int, default=defaults.images, help="training images (default %(default)s)"
    )
    gen.add_argument(
        "--videos", type=int, default=defaults.videos, help="training videos (default %(default)s)"
    )
    gen.add_argument(
        "--test-images", type=int, default=defaults.test_images, help="held-out images (default %(default)s)"
    )
    gen.add_argument(
        "--test-videos", type=int, default=defaults.test_videos, help="held-out videos (default %(default)s)"
    )
    gen.add_argument("--min-size", type=int, default=defaults.min_size, help="smallest short side in pixels")
    gen.add_argument("--max-size", type=int, default=defaults.max_size, help="largest short side in pixels")
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
        default=defaults.twins,
        help="fraction of training media that also get a twin differing in one shape (images) or "
        "in direction (videos), grouped with it for contrastive batches (default %(default)s)",
    )
    gen.add_argument(
        "--mirrors",
        type=float,
        default=defaults.mirrors,
        help="fraction of training images that also get a mirrored twin (objects moved to the other "
        "side), grouped with them (default %(default)s)",
    )
    gen.add_argument("--dry-run", action="store_true", help="write the JSON files only, no media")
    gen.set_defaults(func=_run_generate)
