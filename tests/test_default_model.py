"""The bundled ShapesWorld model: small, answers in the world's vocabulary, and is measured against
its targets on fresh held-out sets: the standard world, the wider world (the variety split) and
videos of ordered events.

The target tests hold the shipped model to the world's targets on sets it never saw; where the
model is known to fall short they are expected failures (strict: one that starts passing fails, so
the mark comes off). The floor tests say, with a margin, what any model shipped here must reach
well above chance.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from videollava.eval.metrics import normalize_answer
from videollava.infer.engine import Engine
from videollava.infer.pipeline import Pipeline, default_model_path
from videollava.infer.request import MediaItem
from videollava.infer.sampling import SamplingParams
from videollava.shapesworld.evaluate import check_targets, evaluate
from videollava.shapesworld.generate import GenerationConfig, generate
from videollava.shapesworld.world import COLORS, COUNT_WORDS, DIRECTIONS, SHAPES

EXAMPLES = Path(__file__).resolve().parent.parent / "src" / "videollava" / "assets" / "examples"
# Ordered events are asked at 32 frames with 8 patches per frame: 288 rows, within the context.
EVENT_FRAMES, EVENT_PATCHES = 32, 8
# Accuracy the shipped model reaches on this test's sets (seed 777, float32 here, where auto picks it;
# standard: colour 99.5/100%, shape 97.8/98.4%, count 100/99.3%, yes/no 98.8/99.1% (images/videos),
# direction 100%, which-object-moves 98.0%; variety: colour 91.7/88.6%, shape 88.3/86.6%, count
# 98.0/97.0%, yes/no 94.0/92.2%, direction 100%, which-object-moves 89.0%; events at 32 frames:
# direction 83.5%, colour 96.3%, shape 96.2%), as floors well above chance (colour 1/6, shape and
# count 1/3 or less, yes/no 1/2, moving about 1/3, direction 1/4). The order questions have no
# floor: the model answers them near chance (first event 32%, moves-before 46%).
STANDARD = {"color": 0.9, "shape": 0.88, "count": 0.9, "exists": 0.9}
VARIETY = {"color": 0.8, "shape": 0.75, "count": 0.85, "exists": 0.85}
FLOORS: dict[str, dict[str, dict[str, float]]] = {  # split -> modality -> type -> floor
    "standard": {"image": STANDARD, "video": STANDARD | {"moving": 0.88, "direction": 0.88}},
    "variety": {"image": VARIETY, "video": VARIETY | {"moving": 0.75, "direction": 0.85}},
    "events": {"video": {"color": 0.85, "shape": 0.85, "direction": 0.7}},
}
MIN_QUESTIONS = {"standard": 3000, "variety": 2000, "events": 1000}
# What the model is known to miss, so the target tests expect to fail (strictly).
MISSED = {
    "variety": "the wider world: colour 88-92%, shape 87-88%, which-object-moves 89%",
    "events": "the order of events is not learned: first / last event 32 / 35%, moves-before at chance",
}


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    assert (default_model_path() / "config.json").exists(), "the package must ship its default model"
    return Pipeline.from_pretrained()


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> Path:
    """Fresh held-out sets (a seed the model never saw): standard, variety/ and events/."""
    data = tmp_path_factory.mktemp("heldout")
    generate(
        data,
        GenerationConfig(
            seed=777, images=0, videos=0, test_images=150, test_videos=150, workers=2,
            variety_test_images=100, variety_test_videos=100, event_test_videos=60,
        ),
    )  # fmt: skip
    return data


@pytest.fixture(scope="module")
def reports(pipeline, heldout):
    own = pipeline.visual_tokens
    out = {
        "standard": evaluate(pipeline, heldout, batch_size=32),
        "variety": evaluate(pipeline, heldout / "variety", batch_size=32),
    }
    pipeline.visual_tokens = EVENT_PATCHES
    try:
        out["events"] = evaluate(pipeline, heldout / "events", batch_size=16, num_frames=EVENT_FRAMES)
    finally:
        pipeline.visual_tokens = own
    return out


def test_default_model_is_small():
    size = sum(f.stat().st_size for f in default_model_path().iterdir())
    assert size <= 30 * 1024**2


def test_bundled_examples_get_answers_in_the_worlds_vocabulary(pipeline):
    vocabulary = {
        normalize_answer(w) for w in [*COLORS, *SHAPES, *COUNT_WORDS.values(), *DIRECTIONS, "yes", "no"]
    }
    vocabulary |= {normalize_answer(f"the {c} {s}") for c in COLORS for s in SHAPES}
    examples = json.loads((EXAMPLES / "examples.json").read_text())
    prepared = []
    for example in examples:
        media = [MediaItem(example["kind"], str(EXAMPLES / example["file"]))]
        images, videos = (1, 0) if example["kind"] == "image" else (0, 1)
        for question, _ in example["questions"]:
            prepared.append(pipeline.prepare(pipeline.build_prompt(question, images, videos), media))
    completions = Engine.for_pipeline(pipeline).generate(prepared, SamplingParams(max_new_tokens=10))
    assert all(c.finish_reason == "stop" for c in completions)
    assert all(normalize_answer(c.text) in vocabulary for c in completions), [c.text for c in completions]


@pytest.mark.parametrize("split", sorted(FLOORS))
def test_held_out_accuracy_floor(reports, split):
    report = reports[split]
    assert len(report.results) >= MIN_QUESTIONS[split]
    for modality, floors in FLOORS[split].items():
        for kind, floor in floors.items():
            assert report.accuracy[modality][kind]["accuracy"] >= floor, (split, modality, kind)


def test_held_out_targets(reports):
    assert check_targets(reports["standard"]) == []


@pytest.mark.xfail(strict=True, reason=MISSED["variety"])
def test_variety_targets(reports):
    assert check_targets(reports["variety"]) == []


@pytest.mark.xfail(strict=True, reason=MISSED["events"])
def test_ordered_event_targets(reports):
    assert check_targets(reports["events"]) == []
