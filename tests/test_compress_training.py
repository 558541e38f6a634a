"""A stage-2 recipe with `visual_tokens`: the stage trains on compressed visual tokens and the exported
model keeps the budget as its default."""

from __future__ import annotations

import json

import pytest

from tests.test_train_loop import make_world, step_losses, tiny_recipe, train, write_recipe
from videollava.infer.pipeline import Pipeline
from videollava.infer.request import MediaItem
from videollava.train.config import RecipeError


def test_finetune_with_visual_tokens_trains_compressed_and_exports_the_budget(tmp_path):
    world = make_world(tmp_path / "world", images=8, videos=4)
    finetune = {
        "kind": "finetune",
        "lr": 3e-3,
        "batch_size": 4,
        "micro_batch_size": 4,
        "max_steps": 2,
        "sampler": "mixed",
        "bf16": False,
        "log_every": 1,
        "warmup_ratio": 0.0,
    }
    recipe = tiny_recipe(world, [{"kind": "tokenizer", "vocab_size": 320}, finetune])
    patches = (
        recipe["model"]["init"]["vision"]["image_size"] // recipe["model"]["init"]["vision"]["patch_size"]
    ) ** 2
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert train(path, tmp_path / "full") == 0
    assert train(path, tmp_path / "one", "stage.1.visual_tokens=1", "stage.1.visual_token_layer=-1") == 0
    full, one = step_losses(tmp_path / "full"), step_losses(tmp_path / "one")
    assert len(full) == len(one) == 2
    # Same data, same start: only the visual rows the LLM sees differ.
    assert full[0] != one[0]
    config = json.loads((tmp_path / "one" / "model" / "config.json").read_text())
    assert config["videollava"]["visual_tokens"] == 1 and config["videollava"]["visual_token_layer"] == -1
    assert (
        "visual_tokens"
        not in json.loads((tmp_path / "full" / "model" / "config.json").read_text())["videollava"]
    )
    pipeline = Pipeline.from_pretrained(tmp_path / "one" / "model", dtype="float32")
    video = next((world / "media" / "videos").glob("test_*"))
    prepared = pipeline.prepare(pipeline.build_prompt("What moves?", 0, 1), [MediaItem("video", str(video))])
    frames = recipe["model"]["num_frames"]
    assert prepared.visual_tokens == frames * 2 and patches > 1
    with pytest.raises(RecipeError, match="visual_tokens"):
        train(path, tmp_path / "bad", "stage.1.visual_tokens=0")
    with pytest.raises(RecipeError, match="visual_token_layer .* embedding output"):
        train(path, tmp_path / "bad-layer", "stage.1.visual_tokens=1", "stage.1.visual_token_layer=0")
