"""The ShapesWorld recipes train the same model to the bit: every stage of configs/shapesworld-v2.yaml
(the default model's) and of configs/shapesworld.yaml (the ablations' base), cut to a tiny model and
two steps a stage, on one thread, must export the same weights and log the same losses as the
recorded run.

The digests were recorded on CPU with the torch build named in `RECORDED`; another build may
round differently, so the test runs only there. A change to the digests means the recipe no longer
trains the model it did: the bundled default model would not rebuild.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_train_loop import train

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# recipe -> torch version -> (exported weights, per-step stage / step / loss / lr / grad norm)
RECORDED = {
    "shapesworld.yaml": {
        "2.13.0+cpu": (
            "2bca361e51a1e1992e17e5555ab8d28061b7e530fb1b033b405dc343e7ab0eb9",
            "05b5ab8344a6df26bd7eb93c35115a9eed77837961da8d8cdd7f952661c0b15b",
        ),
    },
    "shapesworld-v2.yaml": {
        "2.13.0+cpu": (
            "82f82d054852cf46d2904d24ca458e2082f80e9f1ef7f2aa110d143dc4853f21",
            "ba018a53d3ce1d77b7f3d805503f316bdc4b467ca4edc171034df7d6a80e9829",
        ),
    },
}

TINY = [
    "data.generate.images=8",
    "data.generate.videos=4",
    "data.generate.test_images=2",
    "data.generate.test_videos=2",
    "data.generate.workers=1",
    "model.init.vision.hidden_size=32",
    "model.init.vision.intermediate_size=64",
    "model.init.vision.num_hidden_layers=2",
    "model.init.vision.num_attention_heads=2",
    "model.init.vision.image_size=32",
    "model.init.vision.patch_size=16",
    "model.init.llm.hidden_size=32",
    "model.init.llm.intermediate_size=64",
    "model.init.llm.num_hidden_layers=1",
    "model.init.llm.num_attention_heads=2",
    "model.init.llm.num_key_value_heads=2",
    "stage.tokenizer.vocab_size=320",
    "stage.align_image.text_encoder.hidden_size=32",
    "stage.align_image.text_encoder.num_layers=1",
    "stage.align_image.text_encoder.num_heads=2",
    "stage.align_image.projection_dim=16",
    "stage.align_image.batch_size=8",
    "stage.align_image.micro_batch_size=4",
    "stage.align_video.batch_size=4",
    "stage.align_video.micro_batch_size=2",
    "stage.projector.batch_size=8",
    "stage.projector.micro_batch_size=4",
    "stage.finetune.batch_size=8",
    "stage.finetune.micro_batch_size=4",
    "stage.finetune.eval.max_samples=4",
    *(f"stage.{name}.max_steps=2" for name in ("align_image", "align_video", "projector", "finetune")),
    "run.threads=1",
    "run.progress=false",
]
# The wider world's parts of configs/shapesworld-v2.yaml, cut as far.
TINY_WIDER = [
    "data.generate.event_videos=2",
    "data.generate.event_test_videos=0",
    "data.generate.variety_test_images=0",
    "data.generate.variety_test_videos=0",
]


def weights_digest(path: Path) -> str:
    weights = load_file(str(path))
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def steps_digest(metrics: Path) -> str:
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [
        [r["stage"], r["step"], r["loss"], r["lr"], r["grad_norm"]] for r in records if r["event"] == "step"
    ]
    return hashlib.sha256(json.dumps(steps).encode()).hexdigest()


@pytest.mark.parametrize("recipe", sorted(RECORDED))
def test_recipe_trains_the_recorded_model(recipe, tmp_path):
    recorded = RECORDED[recipe]
    if torch.__version__ not in recorded:
        pytest.skip(f"digests recorded for torch {', '.join(recorded)}, not {torch.__version__}")
    overrides = TINY + (TINY_WIDER if recipe == "shapesworld-v2.yaml" else [])
    threads = torch.get_num_threads()
    try:
        assert train(CONFIGS / recipe, tmp_path / "run", *overrides) == 0
    finally:
        torch.set_num_threads(threads)
    weights, steps = recorded[torch.__version__]
    assert steps_digest(tmp_path / "run" / "metrics.jsonl") == steps
    assert weights_digest(tmp_path / "run" / "model" / "model.safetensors") == weights
