"""ShapesWorld must be exact: every pixel, path and answer has to agree with the metadata."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from videollava.cli import main as cli_main
from videollava.errors import VideoLlavaError
from videollava.shapesworld.generate import GenerationConfig, generate, object_regions
from videollava.shapesworld.render import render_array, render_scene
from videollava.shapesworld.text import MOTION_PHRASES, POPE_SPLITS, POPULAR_TOP_K, place_words
from videollava.shapesworld.world import (
    COLORS,
    DIRECTIONS,
    GREY_RANGE,
    MIN_TRAVEL,
    SHAPES,
    Scene,
    SceneObject,
    paths_apart,
    sample_scene,
)

TOLERANCE = 30  # per channel, for JPEG and H.264
SMALL = dict(images=10, videos=8, test_images=4, test_videos=4)


def _read_json(path: Path):
    return json.loads(path.read_text())


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _scenes(root: Path) -> list[tuple[dict, Scene]]:
    return [(row, Scene.from_dict(row)) for row in _read_jsonl(root / "scenes.jsonl")]


def _decode(path: Path) -> tuple[list[np.ndarray], float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate)
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    return frames, fps


def _pixel(array: np.ndarray, centre: tuple[float, float]) -> np.ndarray:
    return array[int(centre[1]), int(centre[0])].astype(int)


def _centroid(array: np.ndarray, scene: Scene, obj: SceneObject) -> tuple[float, float]:
    """Centre of the object measured as the mean of its colour's pixels near its path.

    A mean over the whole area shrugs off the chroma blur of lossy edges; a triangle's area
    centroid lies size/6 below its centre (apex up), which is taken off here.
    """
    x0, y0, x1, y1 = _window(scene, obj)
    patch = array[y0:y1, x0:x1].astype(int)
    mask = np.all(np.abs(patch - np.array(COLORS[obj.color])) <= TOLERANCE, axis=2)
    ys, xs = np.nonzero(mask)
    assert len(xs) > 0, f"{obj.name} not found"
    offset = obj.size / 6 if obj.shape == "triangle" else 0.0
    return (x0 + xs.mean() + 0.5, y0 + ys.mean() + 0.5 - offset)


def _window(scene: Scene, obj: SceneObject) -> tuple[int, int, int, int]:
    half = obj.size / 2 + 3
    xs = (obj.start[0], obj.end[0])
    ys = (obj.start[1], obj.end[1])
    return (
        max(0, int(min(xs) - half)),
        max(0, int(min(ys) - half)),
        min(scene.width, int(max(xs) + half) + 1),
        min(scene.height, int(max(ys) + half) + 1),
    )


def _article(name: str) -> str:
    return ("an " if name[0] in "aeiou" else "a ") + name


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sw")
    generate(root, GenerationConfig(seed=7, **SMALL))
    return root


@pytest.fixture(scope="module")
def text_only(tmp_path_factory) -> Path:
    """A bigger dry run: enough questions for statistics without encoding any media."""
    root = tmp_path_factory.mktemp("sw_dry")
    generate(
        root, GenerationConfig(seed=11, images=400, videos=300, test_images=60, test_videos=60), dry_run=True
    )
    return root


# ------------------------------------------------------------------- determinism


# A small run with twins, mirrors, PNG, JPEG and H.264: the digests pin every file that
# `generate` writes, so a change of code that alters any byte of a data set fails here. The JSON
# digest and the PNGs' pixels depend on this code alone; the encoded bytes of the media also on
# the Pillow and PyAV (libx264) builds, so they are pinned per build.
GOLDEN_RUN = dict(
    seed=0, images=4, videos=2, test_images=2, test_videos=1, max_size=112, twins=0.5, mirrors=0.5
)
GOLDEN_TEXT_SHA256 = "e73e5b7cd48c17cdcf76d89cc7111899cad14d136e4c83c89f0b558817943ac6"
GOLDEN_PNG_PIXELS_SHA256 = "c138e8269b5cf47a5b20b1313bdcb24c77673798ca24b829c02c89b977f92afe"
GOLDEN_MEDIA_SHA256 = {  # (Pillow, PyAV) -> digest of the media files' bytes
    ("12.3.0", "18.1.0"): "44d56733042e922ba0ee6dd8e9b251cba3383d16c10bf65df48d9f4c5973537d",
    ("12.3.0", "18.1.1"): "14c8310ad39f00805757a700932824879e181cc287048e60f23979dbdb16660b",
}


def _digest(root: Path, media: bool) -> str:
    """SHA-256 over (relative path, bytes) of the files under media/ (or of all others), sorted."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if (path.relative_to(root).parts[0] == "media") == media:
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _png_pixels_digest(root: Path) -> str:
    """SHA-256 over (relative path, decoded RGB pixels) of the PNG files, sorted: lossless, so
    the same whichever build encoded them."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.png")):
        pixels = np.asarray(Image.open(path).convert("RGB"))
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + pixels.tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def golden_run(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("golden")
    return root, generate(root, GenerationConfig(**GOLDEN_RUN))


def test_generated_text_and_pixels_are_those_of_the_golden_run(golden_run) -> None:
    root, summary = golden_run
    assert (summary["train_twins"], summary["train_mirrors"], summary["media_written"]) == (4, 3, 16)
    assert _digest(root, media=False) == GOLDEN_TEXT_SHA256
    assert any(root.rglob("*.png")) and _png_pixels_digest(root) == GOLDEN_PNG_PIXELS_SHA256


def test_generated_media_are_byte_for_byte_those_of_the_golden_run(golden_run) -> None:
    import PIL

    build = (PIL.__version__, av.__version__)
    if build not in GOLDEN_MEDIA_SHA256:
        pytest.skip(f"no golden media digest for Pillow {build[0]} and PyAV {build[1]}")
    assert _digest(golden_run[0], media=True) == GOLDEN_MEDIA_SHA256[build]


def test_same_seed_same_files_and_different_seed_differs(tmp_path: Path, dataset: Path) -> None:
    again = tmp_path / "again"
    generate(again, GenerationConfig(seed=7, workers=2, **SMALL))
    for name in (
        "captions.json",
        "instruct.json",
        "instruct_direction.json",
        "test_captions.json",
        "test_questions.jsonl",
        "world.json",
    ):
        assert (again / name).read_bytes() == (dataset / name).read_bytes(), name
    assert (again / "scenes.jsonl").read_bytes() == (dataset / "scenes.jsonl").read_bytes()
    for row, _ in _scenes(dataset):
        a, b = dataset / "media" / row["media"], again / "media" / row["media"]
        if row["kind"] == "image":
            assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
        else:
            frames_a, _ = _decode(a)
            frames_b, _ = _decode(b)
            assert len(frames_a) == len(frames_b)
            assert all(np.array_equal(x, y) for x, y in zip(frames_a, frames_b, strict=True))

    other = tmp_path / "other"
    generate(other, GenerationConfig(seed=8, **SMALL), dry_run=True)
    for name in ("captions.json", "instruct.json", "test_questions.jsonl", "scenes.jsonl"):
        assert (other / name).read_bytes() != (dataset / name).read_bytes(), name


def test_png_matches_render_scene_exactly(dataset: Path) -> None:
    for row, scene in _scenes(dataset):
        if row["kind"] == "image" and scene.image_format == "png":
            stored = np.asarray(Image.open(dataset / "media" / row["media"]).convert("RGB"))
            assert np.array_equal(stored, np.asarray(render_scene(scene)))


# ------------------------------------------------------------------- pixels agree with metadata


def test_images_show_objects_where_metadata_says(dataset: Path) -> None:
    formats = Counter()
    for row, scene in _scenes(dataset):
        if scene.kind != "image":
            continue
        path = dataset / "media" / row["media"]
        with Image.open(path) as image:
            formats[image.format] += 1
            assert image.size == (scene.width, scene.height)
            array = np.asarray(image.convert("RGB"))
        for obj in scene.objects:
            diff = np.abs(_pixel(array, obj.start) - np.array(COLORS[obj.color]))
            assert diff.max() <= TOLERANCE, (row["media"], obj)
            cx, cy = _centroid(array, scene, obj)
            assert abs(cx - obj.start[0]) <= 1.5 and abs(cy - obj.start[1]) <= 1.5
        # a corner far from every object is background grey
        grey = _pixel(array, (1, 1))
        if all(math.hypot(o.start[0] - 1, o.start[1] - 1) > o.radius + 2 for o in scene.objects):
            assert abs(grey - scene.background).max() <= scene.noise + TOLERANCE // 2
    assert formats["PNG"] > 0 and formats["JPEG"] > 0


def test_videos_show_the_motion_metadata_says(dataset: Path) -> None:
    seen = 0
    for row, scene in _scenes(dataset):
        if scene.kind != "video":
            continue
        seen += 1
        frames, fps = _decode(dataset / "media" / row["media"])
        assert len(frames) == scene.n_frames
        assert fps == pytest.approx(scene.fps)
        assert frames[0].shape == (scene.height, scene.width, 3)
        mover = scene.moving_object
        assert mover is not None and sum(o.moves for o in scene.objects) == 1
        for index, frame in enumerate(frames):
            for obj in scene.objects:
                diff = np.abs(_pixel(frame, obj.center(scene.time(index))) - np.array(COLORS[obj.color]))
                assert diff.max() <= TOLERANCE, (row["media"], index, obj)

        axis = 0 if scene.direction in ("left", "right") else 1
        sign = -1 if scene.direction in ("left", "up") else 1
        extent = scene.width if axis == 0 else scene.height
        track = [_centroid(frame, scene, mover) for frame in frames]
        along = [sign * c[axis] for c in track]
        assert all(b >= a - 0.5 for a, b in zip(along, along[1:], strict=False)), along
        assert along[-1] - along[0] >= MIN_TRAVEL * extent
        for index, c in enumerate(track):  # on the path the metadata gives, with no drift across it
            expected = mover.center(scene.time(index))
            assert math.hypot(c[0] - expected[0], c[1] - expected[1]) <= 2.0, (row["media"], index)
        for obj in scene.objects:
            if obj is mover:
                continue
            first = _centroid(frames[0], scene, obj)
            last = _centroid(frames[-1], scene, obj)
            assert math.hypot(first[0] - last[0], first[1] - last[1]) <= 1.0
    assert seen > 0


# ------------------------------------------------------------------- scene invariants


def test_object_regions_frame_every_object_in_every_frame() -> None:
    """Each region's box holds all of its object's pixels, in every frame, and its name says what it is."""
    rng = np.random.default_rng(5)
    for i in range(40):
        kind = "video" if i % 2 else "image"
        scene = sample_scene(rng, kind, min_size=96, max_size=160)
        regions = object_regions(scene)
        assert len(regions) == len(scene.objects)
        for obj, region in zip(scene.objects, regions, strict=True):
            x0, y0, x1, y1 = region["box"]
            assert 0 <= x0 < x1 <= scene.width and 0 <= y0 < y1 <= scene.height
            if kind == "image":
                assert region["text"] == obj.name and "motion" not in region
            else:
                motion = f"moving {scene.direction}" if obj.moves else "standing still"
                assert region["text"] == f"{obj.name} {motion}" and region["motion"] == motion
            for frame in sorted({0, scene.n_frames // 2, scene.n_frames - 1}):
                ys, xs = np.nonzero((render_array(scene, frame) == COLORS[obj.color]).all(axis=-1))
                assert len(xs) > 0
                assert x0 - 0.5 <= xs.min() and xs.max() + 1 <= x1 + 0.5
                assert y0 - 0.5 <= ys.min() and ys.max() + 1 <= y1 + 0.5
        if kind == "video":  # the mover's box spans its path: wider along the motion than the object
            mover = regions[scene.objects.index(scene.moving_object)]
            horizontal = scene.direction in ("left", "right")
            box = mover["box"]
            span = box[2] - box[0] if horizontal else box[3] - box[1]
            assert span > scene.moving_object.size * 1.2
            # its track holds the object at the first and the last frame, tighter than the span
            assert [k["t"] for k in mover["track"]] == [0.0, 1.0]
            assert all("track" not in r for r in regions if r is not mover)
            for key, frame in zip(mover["track"], (0, scene.n_frames - 1), strict=True):
                color = COLORS[scene.moving_object.color]
                ys, xs = np.nonzero((render_array(scene, frame) == color).all(axis=-1))
                kx0, ky0, kx1, ky1 = key["box"]
                assert kx0 - 0.5 <= xs.min() and xs.max() + 1 <= kx1 + 0.5
                assert ky0 - 0.5 <= ys.min() and ys.max() + 1 <= ky1 + 0.5
                along = kx1 - kx0 if horizontal else ky1 - ky0
                assert along <= scene.moving_object.size + 0.02 < span


def test_sampled_scenes_respect_the_world_rules() -> None:
    rng = np.random.default_rng(0)
    kinds = Counter()
    for i in range(600):
        kind = "video" if i % 2 else "image"
        scene = sample_scene(rng, kind, min_size=96, max_size=200)
        kinds[(kind, len(scene.objects))] += 1
        short, long = sorted((scene.width, scene.height))
        assert short >= 96 and long / short <= 16 / 9 + 1e-9
        assert 1 <= len(scene.objects) <= 3
        assert len({o.color for o in scene.objects}) == len(scene.objects)
        assert all(o.color in COLORS and o.shape in SHAPES for o in scene.objects)
        for obj in scene.objects:
            assert 0.15 * short - 0.01 <= obj.size <= 0.35 * short + 0.01
            for point in (obj.start, obj.end):  # whole shape inside the frame along the path
                assert obj.size / 2 - 0.01 <= point[0] <= scene.width - obj.size / 2 + 0.01
                assert obj.size / 2 - 0.01 <= point[1] <= scene.height - obj.size / 2 + 0.01
        for a_index, a in enumerate(scene.objects):
            for b in scene.objects[a_index + 1 :]:
                # sample the motion densely: bounding discs never meet
                for t in np.linspace(0, 1, 50):
                    ca, cb = a.center(t), b.center(t)
                    assert math.hypot(ca[0] - cb[0], ca[1] - cb[1]) >= a.radius + b.radius
        assert GREY_RANGE[0] <= scene.background <= GREY_RANGE[1] and scene.noise <= 12
        if kind == "image":
            assert scene.n_frames == 1 and all(not o.moves for o in scene.objects)
            assert scene.image_format in ("png", "jpeg")
        else:
            assert scene.width % 2 == 0 and scene.height % 2 == 0
            assert 8 <= scene.n_frames <= 48 and 4 <= scene.fps <= 30
            movers = [o for o in scene.objects if o.moves]
            assert len(movers) == 1
            (mover,) = movers
            dx, dy = mover.end[0] - mover.start[0], mover.end[1] - mover.start[1]
            expected = {"left": (dx < 0, dy == 0), "right": (dx > 0, dy == 0)}
            expected |= {"up": (dy < 0, dx == 0), "down": (dy > 0, dx == 0)}
            assert all(expected[scene.direction])
            extent = scene.width if scene.direction in ("left", "right") else scene.height
            assert abs(dx) + abs(dy) >= 0.3 * extent
    assert all(kinds[(k, n)] > 0 for k in ("image", "video") for n in (1, 2, 3))


def test_render_scene_draws_each_shape_at_its_centre() -> None:
    objects = (
        SceneObject("red", "circle", 30.0, (30.0, 40.0), (30.0, 40.0)),
        SceneObject("orange", "triangle", 30.0, (80.0, 40.0), (80.0, 40.0)),
        SceneObject("blue", "square", 30.0, (130.0, 40.0), (130.0, 40.0)),
    )
    scene = Scene("t", "image", 170, 96, 128, 0, 0, objects)
    array = np.asarray(render_scene(scene))
    for obj in objects:
        assert tuple(_pixel(array, obj.start)) == COLORS[obj.color]
    # square fills its corners, circle and triangle do not
    assert tuple(array[26, 116]) == COLORS["blue"]
    assert tuple(array[26, 16]) == (128, 128, 128)
    assert tuple(array[27, 67]) == (128, 128, 128)  # triangle apex is narrow
    assert tuple(array[53, 67]) == COLORS["orange"]  # triangle base is wide
    with pytest.raises(VideoLlavaError):
        render_scene(scene, 1)


def test_bad_sizes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(VideoLlavaError):
        generate(tmp_path, GenerationConfig(min_size=64), dry_run=True)
    with pytest.raises(VideoLlavaError):
        generate(tmp_path, GenerationConfig(min_size=128, max_size=100), dry_run=True)
    with pytest.raises(VideoLlavaError, match="even"):  # no even short side for yuv420p video
        generate(tmp_path, GenerationConfig(min_size=97, max_size=97, images=0, videos=1), dry_run=True)
    summary = generate(
        tmp_path, GenerationConfig(min_size=97, max_size=97, videos=0, test_videos=0), dry_run=True
    )
    assert summary["train_images"] > 0


# ------------------------------------------------------------------- questions and answers


def _check_answer(scene: Scene, qtype: str, split: str | None, question: str, answer: str) -> None:
    objects = scene.objects
    names = {(o.color, o.shape) for o in objects}
    shapes = Counter(o.shape for o in objects)
    assert answer == answer.lower()
    if qtype == "color":
        (shape,) = [s for s in SHAPES if question == f"What color is the {s}?"]
        assert shapes[shape] == 1, "asked about a shape that is not unique"
        assert answer == next(o.color for o in objects if o.shape == shape)
    elif qtype == "shape":
        (color,) = [c for c in COLORS if question == f"What shape is the {c} object?"]
        assert answer == next(o.shape for o in objects if o.color == color)
    elif qtype == "count":
        assert question == "How many objects are there?"
        assert answer == {1: "one", 2: "two", 3: "three"}[len(objects)]
    elif qtype == "exists":
        assert split in POPE_SPLITS
        (combo,) = [(c, s) for c in COLORS for s in SHAPES if question == f"Is there a {c} {s}?"]
        assert answer == ("yes" if combo in names else "no")
        if answer == "no" and split == "adversarial":
            assert any(combo[0] == o.color or combo[1] == o.shape for o in objects)
    elif qtype == "direction":
        mover = scene.moving_object
        assert scene.kind == "video" and mover is not None
        assert question == f"Which direction does the {mover.color} {mover.shape} move?"
        assert answer == scene.direction
    elif qtype == "moving":
        assert scene.kind == "video" and question == "Which object is moving?"
        assert answer == f"the {scene.moving_object.name}"
    else:
        raise AssertionError(f"unknown question type {qtype}")
    if qtype != "exists":
        assert split is None


def _check_caption(scene: Scene, caption: str) -> None:
    lowered = caption.lower()
    for obj in scene.objects:
        said = [w for w in (_article(obj.name), f"{_article(obj.shape)} in {obj.color}") if w in lowered]
        assert len(said) == 1, (caption, obj.name)
        if not obj.moves:  # still objects are placed in thirds of the frame
            assert f"{said[0]} {place_words(scene, obj)}" in lowered, (caption, obj.name)
    if scene.kind == "video":
        mover = scene.moving_object
        motion = [f"the {mover.name} {phrase}" for phrase in MOTION_PHRASES[scene.direction]]
        assert any(m in lowered for m in motion), caption
        for direction, phrases in MOTION_PHRASES.items():
            if direction != scene.direction:
                assert not any(f"the {mover.name} {phrase}" in lowered for phrase in phrases)


def test_place_words_name_the_third_of_the_frame() -> None:
    def at(x: float, y: float) -> str:
        obj = SceneObject("red", "circle", 10.0, (x, y), (x, y))
        scene = Scene("s", "image", 300, 150, 128, 0, 0, (obj,))
        return place_words(scene, obj)

    assert at(20, 20) == "at the top left"
    assert at(150, 20) == "at the top"
    assert at(280, 75) == "on the right"
    assert at(150, 75) == "in the middle"
    assert at(20, 140) == "at the bottom left"


def test_test_questions_are_answered_from_metadata(text_only: Path) -> None:
    scenes = {row["media"]: scene for row, scene in _scenes(text_only) if row["set"] == "test"}
    questions = _read_jsonl(text_only / "test_questions.jsonl")
    assert [q["question_id"] for q in questions] == list(range(len(questions)))
    for q in questions:
        scene = scenes[q["media"]]
        assert q["modality"] == scene.kind and q["media"].startswith(scene.kind + "s/")
        _check_answer(scene, q["type"], q["split"], q["question"], q["answer"])
    assert {q["type"] for q in questions} == {"color", "shape", "count", "exists", "direction", "moving"}
    probes = [q for q in questions if q["type"] == "exists"]
    for split in POPE_SPLITS:
        answers = Counter(q["answer"] for q in probes if q["split"] == split)
        assert answers["yes"] == answers["no"] > 0


def test_popular_negatives_come_from_the_most_frequent_combinations(text_only: Path) -> None:
    world = _read_json(text_only / "world.json")
    ranking = [tuple(name.split()) for name in world["generation"]["popular_ranking_test"]]
    scenes = {row["media"]: scene for row, scene in _scenes(text_only) if row["set"] == "test"}
    counts = Counter((o.color, o.shape) for s in scenes.values() for o in s.objects)
    assert [counts[c] for c in ranking] == sorted((counts[c] for c in ranking), reverse=True)
    for q in _read_jsonl(text_only / "test_questions.jsonl"):
        if q["type"] == "exists" and q["split"] == "popular" and q["answer"] == "no":
            present = {(o.color, o.shape) for o in scenes[q["media"]].objects}
            top = [c for c in ranking if c not in present][:POPULAR_TOP_K]
            assert q["question"] in {f"Is there a {c} {s}?" for c, s in top}


def test_instructions_are_canonical_multi_turn(text_only: Path) -> None:
    scenes = {row["media"]: (row, scene) for row, scene in _scenes(text_only) if row["set"] == "train"}
    entries = _read_json(text_only / "instruct.json")
    assert len(entries) == len(scenes)
    probes: Counter = Counter()
    kinds = Counter()
    captions = 0
    for entry in entries:
        kind = "image" if "image" in entry else "video"
        row, scene = scenes[entry[kind]]
        assert entry["id"] == scene.id and scene.kind == kind
        kinds[kind] += 1
        conv = entry["conversations"]
        assert 2 <= len(conv) // 2 <= 8 and len(conv) % 2 == 0
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        token = f"<{kind}>"
        assert conv[0]["value"].startswith(token + "\n")
        assert all(token not in t["value"] for t in conv[1:])
        questions = [t["value"].removeprefix(token + "\n") for t in conv[0::2]]
        assert len(set(questions)) == len(questions)
        assert len(entry["turn_types"]) == len(questions)
        if kind == "video":  # the questions a single frame cannot answer are always there
            assert {"direction", "moving"} <= {t["type"] for t in entry["turn_types"]}
        for meta, question, answer in zip(entry["turn_types"], questions, conv[1::2], strict=True):
            if meta["type"] == "caption":
                captions += 1
                assert answer["value"] == row["caption"]
                continue
            _check_answer(scene, meta["type"], meta["split"], question, answer["value"])
            if meta["type"] == "exists":
                probes[(meta["split"], answer["value"])] += 1
    assert kinds["image"] == 400 and kinds["video"] == 300
    assert captions > 0
    for split in POPE_SPLITS:
        yes, no = probes[(split, "yes")], probes[(split, "no")]
        assert yes > 50 and abs(yes - no) <= 1


def test_direction_file_asks_each_training_video_its_direction_alone(text_only: Path) -> None:
    scenes = {row["media"]: scene for row, scene in _scenes(text_only) if row["set"] == "train"}
    instruct = _read_json(text_only / "instruct.json")
    entries = _read_json(text_only / "instruct_direction.json")
    videos = [entry["video"] for entry in instruct if "video" in entry]
    assert [entry["video"] for entry in entries] == videos  # one each, in the order of instruct.json
    for entry in entries:
        scene = scenes[entry["video"]]
        assert entry["id"] == f"{scene.id}_direction" and "image" not in entry
        human, gpt = entry["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt"
        assert human["value"].startswith("<video>\n")
        assert entry["turn_types"] == [{"type": "direction", "split": None}]
        _check_answer(scene, "direction", None, human["value"].removeprefix("<video>\n"), gpt["value"])
    assert {entry["conversations"][1]["value"] for entry in entries} == set(DIRECTIONS)


def test_captions_name_every_object_and_the_motion(text_only: Path) -> None:
    rows = {row["id"]: (row, scene) for row, scene in _scenes(text_only)}
    variants = set()
    for name in ("captions.json", "test_captions.json"):
        entries = _read_json(text_only / name)
        assert len({e["id"] for e in entries}) == len(entries)
        for entry in entries:
            row, scene = rows[entry["id"]]
            media = entry.get("image") or entry.get("video")
            assert media == row["media"] and ("image" in entry) == (scene.kind == "image")
            human, gpt = entry["conversations"]
            assert human["from"] == "human" and gpt["from"] == "gpt"
            assert human["value"].startswith(f"<{scene.kind}>\n")
            variants.add(human["value"])
            assert gpt["value"] == row["caption"]
            _check_caption(scene, gpt["value"])
            assert entry["regions"] == object_regions(scene)  # the boxes and names of its objects
    assert len(variants) >= 8
    distinct_openings = {row["caption"].split()[0] for row, _ in rows.values()}
    assert len(distinct_openings) >= 4
    # objects are named both ways: "a red circle" and "a circle in red"
    in_colour = re.compile(r"\b(?:" + "|".join(SHAPES) + ") in (?:" + "|".join(COLORS) + r")\b")
    shape_first = sum(bool(in_colour.search(row["caption"].lower())) for row, _ in rows.values())
    assert 0.3 * len(rows) < shape_first < 0.9 * len(rows)


def test_held_out_media_are_disjoint_from_training(text_only: Path) -> None:
    rows = [row for row, _ in _scenes(text_only)]
    train = [r for r in rows if r["set"] == "train"]
    test = [r for r in rows if r["set"] == "test"]
    assert len(train) == 700 and len(test) == 120
    assert not {r["media"] for r in train} & {r["media"] for r in test}
    assert not {r["id"] for r in train} & {r["id"] for r in test}
    signature = {Scene.from_dict(r).signature() for r in train}
    assert not any(Scene.from_dict(r).signature() in signature for r in test)
    caption_media = {e.get("image") or e.get("video") for e in _read_json(text_only / "captions.json")}
    test_media = {q["media"] for q in _read_jsonl(text_only / "test_questions.jsonl")}
    assert caption_media == {r["media"] for r in train} and not caption_media & test_media


def test_default_test_set_has_over_a_thousand_questions(tmp_path: Path) -> None:
    summary = generate(tmp_path, GenerationConfig(images=0, videos=0), dry_run=True)
    assert summary["test_questions"] >= 1000
    assert len(_read_jsonl(tmp_path / "test_questions.jsonl")) == summary["test_questions"]
    assert summary["media_written"] == 0 and not any((tmp_path / "media").rglob("*.*"))
    world = _read_json(tmp_path / "world.json")
    assert world["generation"]["n_test_images"] >= 150 and world["generation"]["n_test_videos"] >= 150
    assert world["colors"]["red"] == [220, 40, 40] and world["shapes"] == ["circle", "square", "triangle"]


# ------------------------------------------------------------------- command line


def test_cli_generates_a_small_dataset(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli"
    code = cli_main(
        ["shapesworld", "generate", "--out", str(out), "--images", "3", "--videos", "2"]
        + [
            "--test-images",
            "2",
            "--test-videos",
            "1",
            "--seed",
            "5",
            "--size",
            "100",
            "120",
            "--workers",
            "1",
        ]
    )
    assert code == 0
    assert "wrote 3 + 2 images" in capsys.readouterr().out
    assert len(list((out / "media" / "images").iterdir())) == 5
    assert len(list((out / "media" / "videos").glob("*.mp4"))) == 3
    for row, scene in _scenes(out):
        assert 100 <= min(scene.width, scene.height) <= 120
        assert (out / "media" / row["media"]).is_file()
    world = _read_json(out / "world.json")
    assert world["generation"]["seed"] == 5
    assert len(_read_json(out / "captions.json")) == 5 and len(_read_json(out / "instruct.json")) == 5
    assert len(_read_json(out / "test_captions.json")) == 3


def test_cli_refuses_bad_sizes(tmp_path: Path, capsys) -> None:
    code = cli_main(["shapesworld", "generate", "--out", str(tmp_path), "--min-size", "50", "--dry-run"])
    assert code == 2 and "min_size" in capsys.readouterr().err


def test_contrast_twins_differ_in_exactly_one_fact(tmp_path: Path) -> None:
    summary = generate(
        tmp_path, GenerationConfig(seed=5, images=60, videos=30, test_images=4, test_videos=4, twins=1.0)
    )
    rows = {row["id"]: scene for row, scene in _scenes(tmp_path) if row["set"] == "train"}
    twins = [i for i in rows if i.endswith("_twin")]
    assert summary["train_twins"] == len(twins) >= 80
    for twin_id in twins:
        base, twin = rows[twin_id.removesuffix("_twin")], rows[twin_id]
        assert (base.width, base.height, base.background, base.noise) == (
            twin.width,
            twin.height,
            twin.background,
            twin.noise,
        )
        changed = [(a, b) for a, b in zip(base.objects, twin.objects, strict=True) if a != b]
        assert len(changed) == 1
        a, b = changed[0]
        if base.kind == "image":
            assert a.shape != b.shape and (a.color, a.start, a.size) == (b.color, b.start, b.size)
        else:
            assert (a.start, a.end) == (b.end, b.start)
            assert {base.direction, twin.direction} in ({"left", "right"}, {"up", "down"})
        assert all(paths_apart(x, y) for i, x in enumerate(twin.objects) for y in twin.objects[i + 1 :])
        # Rendered like any scene: the changed object shows in the twin's media.
        media = next(r["media"] for r, s in _scenes(tmp_path) if s.id == twin_id)
        assert (tmp_path / "media" / media).exists()
    for name in ("captions.json", "instruct.json"):
        groups = Counter(e["group"] for e in _read_json(tmp_path / name) if "group" in e)
        assert len(groups) == len(twins) and set(groups.values()) == {2}
    assert not any("_twin" in q["media"] for q in _read_jsonl(tmp_path / "test_questions.jsonl"))


def test_mirror_twins_move_every_object_to_the_other_side(tmp_path: Path) -> None:
    summary = generate(
        tmp_path,
        GenerationConfig(seed=6, images=60, videos=10, test_images=4, test_videos=4, twins=1.0, mirrors=1.0),
    )
    rows = {row["id"]: (row, scene) for row, scene in _scenes(tmp_path) if row["set"] == "train"}
    mirrors = [i for i in rows if i.endswith("_mirror")]
    assert summary["train_mirrors"] == len(mirrors) >= 50  # only all-in-the-middle scenes have none
    assert not any(rows[i][1].kind == "video" for i in mirrors)
    for mirror_id in mirrors:
        (base_row, base), (row, mirror) = rows[mirror_id.removesuffix("_mirror")], rows[mirror_id]
        pairs = list(zip(base.objects, mirror.objects, strict=True))
        flipped_x = all(b.start == (round(base.width - a.start[0], 2), a.start[1]) for a, b in pairs)
        flipped_y = all(b.start == (a.start[0], round(base.height - a.start[1], 2)) for a, b in pairs)
        assert flipped_x != flipped_y  # one axis, and it moved something
        assert all((a.color, a.shape, a.size) == (b.color, b.shape, b.size) for a, b in pairs)
        places = lambda scene: [place_words(scene, o) for o in scene.objects]  # noqa: E731
        assert places(base) != places(mirror) and row["caption"] != base_row["caption"]
        assert (tmp_path / "media" / row["media"]).exists()
    # Original, shape twin and mirror share one group, so one contrastive batch.
    groups = Counter(e["group"] for e in _read_json(tmp_path / "captions.json") if "group" in e)
    originals = len(groups)
    assert max(groups.values()) == 3
    assert sum(groups.values()) == originals + summary["train_twins"] + len(mirrors)


def test_twins_must_be_a_fraction(tmp_path: Path) -> None:
    with pytest.raises(VideoLlavaError, match="twins"):
        generate(tmp_path, GenerationConfig(images=1, videos=0, twins=1.5), dry_run=True)
    with pytest.raises(VideoLlavaError, match="mirrors"):
        generate(tmp_path, GenerationConfig(images=1, videos=0, mirrors=-0.1), dry_run=True)
