"""The bundled ShapesWorld model: it answers the bundled examples and meets its targets on held-out data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from videollava.data.shapesworld import generate
from videollava.eval.metrics import exact_match
from videollava.eval.shapesworld import check_targets, evaluate
from videollava.infer.engine import Engine
from videollava.infer.pipeline import MediaItem, Pipeline, default_model_path
from videollava.infer.sampling import SamplingParams

EXAMPLES = Path(__file__).resolve().parent.parent / "src" / "videollava" / "assets" / "examples"


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    assert (default_model_path() / "config.json").exists(), "the package must ship its default model"
    return Pipeline.from_pretrained()


def test_default_model_is_small(pipeline):
    size = sum(f.stat().st_size for f in default_model_path().iterdir())
    assert size <= 30 * 1024**2


def test_bundled_examples_are_answered(pipeline):
    examples = json.loads((EXAMPLES / "examples.json").read_text())
    prepared, answers = [], []
    for example in examples:
        media = [MediaItem(example["kind"], str(EXAMPLES / example["file"]))]
        for question, answer in example["questions"]:
            images, videos = (1, 0) if example["kind"] == "image" else (0, 1)
            prepared.append(pipeline.prepare(pipeline.build_prompt(question, images, videos), media))
            answers.append(answer)
    completions = Engine(pipeline).generate(prepared, SamplingParams(max_new_tokens=10))
    wrong = [(a, c.text) for a, c in zip(answers, completions, strict=True) if not exact_match(c.text, a)]
    assert not wrong


def test_held_out_targets(pipeline, tmp_path_factory):
    """A fresh held-out set (a seed the model never saw) of more than 1,000 questions."""
    data = tmp_path_factory.mktemp("heldout")
    generate(data, seed=777, n_images=0, n_videos=0, n_test_images=150, n_test_videos=150, workers=2)
    report = evaluate(pipeline, data, batch_size=32)
    assert len(report.results) >= 1000
    assert check_targets(report) == []
