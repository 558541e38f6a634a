"""ShapesWorld: a synthetic image and video dataset whose every answer is known exactly.

Coloured circles, squares and triangles on a grey background; in videos one of them slides left,
right, up or down. Because the world is tiny and fully described by ``world.json``, a model trained
on it can be checked question by question, and anyone can re-render a scene from its metadata.

Outputs follow the LLaVA JSON convention (``captions.json`` for stage 1, ``instruct.json`` for
stage 2, ``instruct_direction.json`` with every training video's direction question alone, and
with ordered events ``instruct_events.json``, their videos' conversations once more) plus
held-out ``test_questions.jsonl`` / ``test_captions.json`` rendered from a separate seed stream,
and ``scenes.jsonl`` with the ground truth of every media file.

Optionally (all off by default, and then the output is byte for byte what it was before they
existed): training media from the wider world (``variety``: other backdrops, sizes, ratios, up
to four objects), training videos of ordered events (``event_videos``), and two more held-out
splits, each a folder laid out like the data set's root (``variety/`` and ``events/``:
``test_questions.jsonl``, ``test_captions.json``, ``scenes.jsonl``, ``world.json``, ``media/``),
so that ``videollava eval shapesworld --data-dir DATA/variety`` scores one as it scores the
standard split.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from videollava.data.conversation import user_turn
from videollava.errors import VideoLlavaError
from videollava.shapesworld.description import world_description
from videollava.shapesworld.render import (
    write_media,
)
from videollava.shapesworld.text import (
    CAPTION_REQUESTS,
    ProbeBalancer,
    heldout_questions,
    instruct_turns,
    make_caption,
    popularity_ranking,
)
from videollava.shapesworld.twins import contrast_twin, mirror_twin
from videollava.shapesworld.wide import (
    EVENT_FRAMES,
    MIN_EVENT_FRAMES,
    STANDARD,
    VARIETY,
    sample_event_scene,
    sample_wide_scene,
)
from videollava.shapesworld.world import (
    DEFAULT_MAX_SIZE,
    MEDIA_KINDS,
    MIN_MEDIA_SIZE,
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
    # Fraction of training images and videos drawn from the wider world instead (backdrops in
    # colour, gradients and textures; sizes 10-40%; ratios to 2.4:1 either way; up to 4 objects),
    # and of ordered-event videos, training and held-out, drawn there rather than on grey.
    variety: float = 0.0
    variety_test_images: int = 0  # held-out split variety/: wider-world images
    variety_test_videos: int = 0  # and videos in which one object moves
    event_videos: int = 0  # training videos of two or three events in order
    event_test_videos: int = 0  # held-out split events/
    event_min_frames: int = EVENT_FRAMES[0]
    event_max_frames: int = EVENT_FRAMES[1]

    def __post_init__(self) -> None:
        for name in ("twins", "mirrors", "variety"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise GenerationError(f"{name}: must be a fraction in [0, 1], got {getattr(self, name)}")
        counts = (
            "images",
            "videos",
            "test_images",
            "test_videos",
            "variety_test_images",
            "variety_test_videos",
        )
        for name in (*counts, "event_videos", "event_test_videos"):
            if getattr(self, name) < 0:
                raise GenerationError(f"{name}: must not be negative, got {getattr(self, name)}")
        if self.event_min_frames < MIN_EVENT_FRAMES:
            raise GenerationError(
                f"event_min_frames: must be at least {MIN_EVENT_FRAMES} (so that 8 sampled frames show "
                f"the order of events), got {self.event_min_frames}"
            )
        if self.event_max_frames < self.event_min_frames:
            raise GenerationError(
                f"event_max_frames: {self.event_max_frames} is smaller than event_min_frames {self.event_min_frames}"
            )
        if self.min_size < MIN_MEDIA_SIZE:
            raise GenerationError(f"min_size: must be at least {MIN_MEDIA_SIZE}, got {self.min_size}")
        if self.max_size < self.min_size:
            raise GenerationError(f"max_size: {self.max_size} is smaller than min_size {self.min_size}")


def generate(out_dir: str | Path, config: GenerationConfig, *, dry_run: bool = False) -> dict[str, Any]:
    """Write a complete ShapesWorld dataset; ``dry_run`` writes the JSON files but no media."""
    started = time.perf_counter()
    out = Path(out_dir)
    (out / "media" / "images").mkdir(parents=True, exist_ok=True)
    (out / "media" / "videos").mkdir(parents=True, exist_ok=True)

    with _worker_pool(config.workers) as pool:
        return _generate(out, config, dry_run, pool, started)


@contextlib.contextmanager
def _worker_pool(workers: int) -> Iterator[Any]:
    """Processes that draw scenes and write media (None for one worker); the output never
    depends on how many there are."""
    if workers <= 1:
        yield None
        return
    # fork where possible: spawn would re-run an unguarded calling script in every worker
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(processes=workers) as pool:
        yield pool


def _generate(
    out: Path, config: GenerationConfig, dry_run: bool, pool: Any, started: float
) -> dict[str, Any]:
    seed, min_size, max_size = config.seed, config.min_size, config.max_size
    twins, mirrors = config.twins, config.mirrors
    media_root = out / "media"
    train = _sample_set(
        seed, 0, "train", config.images, config.videos, min_size, max_size, variety=config.variety, pool=pool
    )
    train += _sample_events(seed, 0, "train", "train_events", config.event_videos, config, pool=pool)
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
        seed,
        1,
        "test",
        config.test_images,
        config.test_videos,
        min_size,
        max_size,
        train_signatures,
        pool=pool,
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
    # the ordered-event videos' conversations once more, for a recipe to weigh them up
    events = [instruct[k] for k, i in enumerate(order) if train[i][0].is_sequence]

    # Held-out text from its own stream
    test_captions, questions, test_rows, test_ranking = _heldout_text(
        test, np.random.default_rng([seed, 1, 2]), "test"
    )
    scene_rows += test_rows

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
    if _widened(config):  # written only when asked for, so the standard data set stays as it was
        params |= {
            "variety": config.variety,
            "n_variety_test_images": config.variety_test_images,
            "n_variety_test_videos": config.variety_test_videos,
            "n_event_videos": config.event_videos,
            "n_event_test_videos": config.event_test_videos,
            "event_frames": [config.event_min_frames, config.event_max_frames],
        }
    frames = (config.event_min_frames, config.event_max_frames)
    description = world_description(frames if _widened(config) else None)
    _write_json(out / "world.json", description | {"generation": params})
    _write_json(out / "captions.json", captions)
    _write_json(out / "instruct.json", instruct)
    _write_json(out / "instruct_direction.json", direction)
    if _widened(config):
        _write_json(out / "instruct_events.json", events)
    _write_json(out / "test_captions.json", test_captions)
    _write_jsonl(out / "test_questions.jsonl", questions)
    _write_jsonl(out / "scenes.jsonl", scene_rows)
    jobs = [(scene.to_dict(), str(media_root / media)) for scene, media in train + test]

    # The other held-out splits, each in a folder of its own laid out like the root
    splits: list[tuple[str, int, list[tuple[Scene, str]]]] = []
    if config.variety_test_images or config.variety_test_videos:
        variety = _sample_set(
            seed, 2, "variety", config.variety_test_images, config.variety_test_videos,
            min_size, max_size, train_signatures, variety=1.0, pool=pool,
        )  # fmt: skip
        splits.append(("variety", 2, variety))
    if config.event_test_videos:
        events = _sample_events(
            seed, 3, "events", "events", config.event_test_videos, config, train_signatures, pool
        )
        splits.append(("events", 3, events))
    split_questions: dict[str, list[dict[str, Any]]] = {}
    for name, stream, scenes in splits:
        folder = out / name
        (folder / "media" / "images").mkdir(parents=True, exist_ok=True)
        (folder / "media" / "videos").mkdir(parents=True, exist_ok=True)
        texts, asked, rows, split_ranking = _heldout_text(
            scenes, np.random.default_rng([seed, stream, 2]), name
        )
        counts = Counter(scene.kind for scene, _ in scenes)
        split_params = params | {
            "split": name,
            "n_split_images": counts["image"],
            "n_split_videos": counts["video"],
            "popular_ranking_split": [f"{c} {s}" for c, s in split_ranking],
        }
        _write_json(folder / "world.json", description | {"generation": split_params})
        _write_json(folder / "test_captions.json", texts)
        _write_jsonl(folder / "test_questions.jsonl", asked)
        _write_jsonl(folder / "scenes.jsonl", rows)
        jobs += [(scene.to_dict(), str(folder / "media" / media)) for scene, media in scenes]
        split_questions[name] = asked
    text_seconds = time.perf_counter() - started

    if not dry_run:
        # Videos first: they are the slow jobs, so the pool ends with short image jobs.
        jobs.sort(key=lambda job: (job[0]["kind"] != "video", -job[0].get("n_frames", 1)))
        if pool is not None and len(jobs) > 1:
            for _ in pool.imap_unordered(_write_job, jobs, chunksize=4):
                pass
        else:
            for job in jobs:
                _write_job(job)

    type_counts = Counter(q["type"] for q in questions)
    answers = Counter(a["answer"] for a in questions if a["type"] == "exists")
    summary = {
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
        "instruct_events": len(events),
        "test_questions": len(questions),
        "test_question_types": dict(sorted(type_counts.items())),
        "test_exists_answers": dict(sorted(answers.items())),
        "media_written": 0 if dry_run else len(jobs),
        "text_seconds": round(text_seconds, 2),
        "seconds": round(time.perf_counter() - started, 2),
    }
    if _widened(config):
        summary |= {
            "train_variety": sum(scene.backdrop is not None and not scene.is_sequence for scene, _ in train),
            "train_event_videos": sum(scene.is_sequence for scene, _ in train),
        }
        for name, asked in split_questions.items():
            summary[f"{name}_questions"] = len(asked)
            summary[f"{name}_question_types"] = dict(sorted(Counter(q["type"] for q in asked).items()))
    return summary


def _widened(config: GenerationConfig) -> bool:
    """Whether anything beyond the standard world is asked for."""
    return bool(
        config.variety
        or config.variety_test_images
        or config.variety_test_videos
        or config.event_videos
        or config.event_test_videos
    )


def _heldout_text(
    scenes: Sequence[tuple[Scene, str]], rng: np.random.Generator, set_name: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], list[tuple[str, str]]]:
    """Captions, every canonical question, and the ground-truth rows of a held-out set."""
    ranking = popularity_ranking(scene for scene, _ in scenes)
    captions: list[dict[str, Any]] = []
    questions: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    for scene, media in scenes:
        caption = make_caption(scene, rng)
        captions.append(_caption_entry(scene, media, caption, rng))
        for q in heldout_questions(scene, rng, ranking):
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
        rows.append({"set": set_name, "media": media, "caption": caption} | scene.to_dict())
    return captions, questions, rows, ranking


def _write_job(job: tuple[dict[str, Any], str]) -> str:
    """One media file, from a scene as a plain dict: what a worker process receives."""
    scene_dict, path = job
    write_media(Scene.from_dict(scene_dict), path)
    return path


# ----------------------------------------------------------------------------------------------
# Media sets


@dataclass(frozen=True)
class _Draw:
    """One media's scene: which sampler, and the seed words that make it (a worker's job)."""

    seed: int
    stream: int
    kind_id: int  # 0 image, 1 video, 2 video of ordered events
    index: int
    scene_id: str
    min_size: int
    max_size: int
    wide: bool
    frames: tuple[int, int] = EVENT_FRAMES

    def scene(self, attempt: int) -> Scene:
        # One seed per media: a set does not depend on the sizes of other sets or on workers.
        rng = np.random.default_rng([self.seed, self.stream, self.kind_id, self.index, attempt])
        sizes = {"scene_id": self.scene_id, "min_size": self.min_size, "max_size": self.max_size}
        if self.kind_id == 2:
            return sample_event_scene(rng, VARIETY if self.wide else STANDARD, frames=self.frames, **sizes)
        kind = MEDIA_KINDS[self.kind_id]
        if self.wide:
            return sample_wide_scene(rng, kind, VARIETY, **sizes)
        return sample_scene(rng, kind, **sizes)


def _first_draw(draw: _Draw) -> Scene:
    return draw.scene(0)


def _draw_all(draws: list[_Draw], avoid: set[tuple] | None, pool: Any) -> list[Scene]:
    """Every draw's scene, in order, in the pool's workers if there is a pool; a scene that
    repeats one in ``avoid`` is drawn again from its next seed."""
    if pool is not None and len(draws) > 1:
        scenes = pool.map(_first_draw, draws, chunksize=16)
    else:
        scenes = [_first_draw(d) for d in draws]
    for k, draw in enumerate(draws):
        attempt = 0
        while avoid is not None and scenes[k].signature() in avoid:
            attempt += 1
            scenes[k] = draw.scene(attempt)
    return scenes


def _sample_set(
    seed: int,
    stream: int,
    set_name: str,
    n_images: int,
    n_videos: int,
    min_size: int,
    max_size: int,
    avoid: set[tuple] | None = None,
    variety: float = 0.0,
    pool: Any = None,
) -> list[tuple[Scene, str]]:
    """Scenes of a set, each from its own seed; a ``variety`` share of them from the wider world
    (decided by a stream of its own, so the others are the scenes the standard world draws)."""
    draws: list[_Draw] = []
    for kind_id, (kind, count) in enumerate((("image", n_images), ("video", n_videos))):
        tag = "img" if kind == "image" else "vid"
        for index in range(count):
            wide = (
                variety > 0 and np.random.default_rng([seed, 10 + stream, kind_id, index]).random() < variety
            )
            scene_id = f"{set_name}_{tag}_{index:06d}"
            draws.append(_Draw(seed, stream, kind_id, index, scene_id, min_size, max_size, bool(wide)))
    scenes = _draw_all(draws, avoid, pool)
    return [(scene, _media_path(scene, set_name, d.index)) for scene, d in zip(scenes, draws, strict=True)]


def _sample_events(
    seed: int,
    stream: int,
    set_name: str,
    media_stem: str,
    count: int,
    config: GenerationConfig,
    avoid: set[tuple] | None = None,
    pool: Any = None,
) -> list[tuple[Scene, str]]:
    """Videos of ordered events, each from its own seed; a ``config.variety`` share of them in the
    wider world, the others on the standard world's grey."""
    frames = (config.event_min_frames, config.event_max_frames)
    draws = []
    for index in range(count):
        draw = np.random.default_rng([seed, 10 + stream, 2, index]).random()
        wide = config.variety > 0 and draw < config.variety
        scene_id = f"{set_name}_evt_{index:06d}"
        draws.append(
            _Draw(seed, stream, 2, index, scene_id, config.min_size, config.max_size, bool(wide), frames)
        )
    scenes = _draw_all(draws, avoid, pool)
    return [(scene, f"videos/{media_stem}_{index:06d}.mp4") for index, scene in enumerate(scenes)]


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
    its box at the first and the last frame (it moves in a straight line at constant speed) and,
    in a video of ordered events, where its move starts and stops. Objects that appear or vanish
    get no region.
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
        if obj.appears is not None or obj.vanishes is not None:
            continue  # not there in every frame: no box can name it throughout
        half = obj.size / 2
        region: dict[str, Any] = {"box": box_around((obj.start, obj.end), half), "text": obj.name}
        if scene.kind == "video":
            direction = obj.direction if scene.is_sequence else scene.direction
            region["motion"] = f"moving {direction}" if obj.moves else "standing still"
            region["text"] += " " + region["motion"]
            if obj.moves:
                # still before and after its move (an ordered-event video), sliding in between; in
                # such a video each keyframe says what the object does until the next one
                still, moving = "standing still", region["motion"]
                keys = [
                    (0.0, obj.start, still),
                    (obj.move[0], obj.start, moving),
                    (obj.move[1], obj.end, still),
                    (1.0, obj.end, still),
                ]
                # of keyframes at one time, the later says what follows (its box is the same)
                keys = [k for i, k in enumerate(keys) if i == len(keys) - 1 or k[0] < keys[i + 1][0]]
                region["track"] = [
                    {"t": t, "box": box_around((c,), half)} | ({"motion": m} if scene.is_sequence else {})
                    for t, c, m in keys
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
        variety=args.variety,
        variety_test_images=args.variety_test_images,
        variety_test_videos=args.variety_test_videos,
        event_videos=args.event_videos,
        event_test_videos=args.event_test_videos,
        event_min_frames=args.event_frames[0],
        event_max_frames=args.event_frames[-1],
    )
    if len(args.event_frames) > 2:
        raise VideoLlavaError("--event-frames takes one value (fixed) or two (MIN MAX)")
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
    gen.add_argument(
        "--variety",
        type=float,
        default=defaults.variety,
        help="fraction of training media (and of ordered-event videos) drawn from the wider world: "
        "colour backdrops, gradients, textures, sizes 10-40%%, ratios to 2.4:1, up to 4 objects "
        "(default %(default)s)",
    )
    gen.add_argument(
        "--variety-test-images", type=int, default=0, help="held-out wider-world images, in variety/"
    )
    gen.add_argument(
        "--variety-test-videos", type=int, default=0, help="held-out wider-world videos, in variety/"
    )
    gen.add_argument(
        "--event-videos", type=int, default=0, help="training videos of two or three events in order"
    )
    gen.add_argument(
        "--event-test-videos", type=int, default=0, help="held-out videos of ordered events, in events/"
    )
    gen.add_argument(
        "--event-frames",
        type=int,
        nargs="+",
        metavar="N",
        default=[defaults.event_min_frames, defaults.event_max_frames],
        help="frames of an ordered-event video: one value (fixed) or MIN MAX (default %(default)s)",
    )
    gen.add_argument("--dry-run", action="store_true", help="write the JSON files only, no media")
    gen.set_defaults(func=_run_generate)
