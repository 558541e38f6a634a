"""Recipes: the shipped configs validate, the 7B model builds on the meta device, errors name the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from videollava.data.samplers import micro_batches, shard
from videollava.shapesworld.generate import GenerationConfig, generate
from videollava.train import distributed as D
from videollava.train.config import (
    BatchLayout,
    FinetuneStage,
    ProjectorStage,
    RecipeError,
    batch_layout,
    dump_recipe,
    load_recipe,
    recipe_from_dict,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def minimal() -> dict:
    return {
        "model": {"init": {"tokenizer": "train"}},
        "data": {"root": "."},
        "stages": [
            {"kind": "tokenizer"},
            {"kind": "projector", "lr": 1e-3, "batch_size": 8, "micro_batch_size": 4},
            {"kind": "finetune", "name": "sft", "batch_size": 8, "micro_batch_size": 2},
        ],
    }


@pytest.mark.parametrize(
    "name", ["shapesworld.yaml", "shapesworld-smoke.yaml", "videollava-7b.yaml", "videollava-7b-lora.yaml"]
)
def test_shipped_recipes_validate(name):
    recipe = load_recipe(CONFIGS / name)
    assert recipe.stages
    # Round trip: the resolved recipe written into a run folder loads back to the same thing.
    again = recipe_from_dict(yaml.safe_load(dump_recipe(recipe)))
    assert again.to_dict() == recipe.to_dict()


def test_shapesworld_recipe_has_every_stage_in_order(tmp_path):
    recipe = load_recipe(CONFIGS / "shapesworld.yaml")
    assert [s.kind for s in recipe.stages] == [
        "tokenizer",
        "align_image",
        "align_video",
        "projector",
        "finetune",
    ]
    projector, finetune = recipe.stages[3], recipe.stages[4]
    assert projector.sampler_mode == "mixed" and projector.template == "plain"
    assert finetune.sampler_mode == "grouped"
    # every file a stage reads is one the data stage writes
    generate(tmp_path, GenerationConfig(images=4, videos=4, test_images=1, test_videos=1), dry_run=True)
    for stage in recipe.stages:
        evaluation = getattr(stage, "eval", None)
        for name in [*stage.data, *([evaluation.data] if evaluation is not None else [])]:
            assert (tmp_path / name).is_file(), (stage.label, name)


def test_7b_recipe_is_the_papers(monkeypatch):
    recipe = load_recipe(CONFIGS / "videollava-7b.yaml")
    stage1, stage2 = recipe.stages
    assert isinstance(stage1, ProjectorStage) and isinstance(stage2, FinetuneStage)
    assert (stage1.lr, stage1.batch_size, stage2.lr, stage2.batch_size) == (1e-3, 256, 2e-5, 128)
    for stage in (stage1, stage2):
        assert stage.epochs == 1 and stage.warmup_ratio == 0.03 and stage.weight_decay == 0.0
        assert stage.lr_schedule == "cosine" and stage.bf16 and stage.gradient_checkpointing
    assert stage1.data == ["valley_llavaimage.json"]
    assert stage2.data == ["llava_image_tune_.json", "videochatgpt_tune_.json"]
    assert stage1.sampler_mode == "mixed" and stage2.sampler_mode == "grouped"
    assert recipe.model.model_max_length == 2048
    assert recipe.distributed.strategy == "deepspeed"
    assert recipe.model.from_.image_tower == "LanguageBind/LanguageBind_Image"
    assert recipe.model.from_.video_tower == "LanguageBind/LanguageBind_Video_merge"
    assert recipe.model.from_.llm == "lmsys/vicuna-7b-v1.5"
    # Batch arithmetic under DeepSpeed: 256 = 32 x 1 x 8 GPUs, = 32 x 2 x 4 GPUs; 3 GPUs cannot share 256.
    assert batch_layout(stage1, 8, exact=True) == BatchLayout(accumulation=1, micro_batch_size=32)
    assert batch_layout(stage1, 4, exact=True) == BatchLayout(accumulation=2, micro_batch_size=32)
    assert batch_layout(stage2, 2, exact=True) == BatchLayout(accumulation=4, micro_batch_size=16)
    with pytest.raises(RecipeError, match=r"--set stage\.pretrain\.batch_size=255 or 258"):
        batch_layout(stage1, 3, exact=True)
    lora = load_recipe(CONFIGS / "videollava-7b-lora.yaml").stages[1]
    assert (lora.lora.r, lora.lora.alpha, lora.lr, lora.projector_lr) == (128, 256, 2e-4, 2e-5)


def test_7b_model_builds_on_meta_device_without_network(monkeypatch):
    from videollava.train.runner import meta_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = load_recipe(CONFIGS / "videollava-7b.yaml")
    model = meta_model(recipe)
    assert all(p.is_meta for p in model.parameters())
    count = {
        name: sum(p.numel() for p in getattr(model, name).parameters())
        for name in ("image_tower", "video_tower", "multi_modal_projector", "language_model")
    }
    total = sum(count.values())
    assert 7.3e9 < total < 7.6e9, total
    assert 6.6e9 < count["language_model"] < 6.8e9  # Vicuna-7B
    assert 3.0e8 < count["image_tower"] < 3.1e8  # ViT-L/14
    # The video tower adds ~4.2M temporal parameters per layer, 24 layers.
    assert 95e6 < count["video_tower"] - count["image_tower"] < 105e6
    assert count["multi_modal_projector"] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert model.config.image_tokens == 256 and model.config.video_tokens(8) == 2056


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda r: r["stages"][1].update(lrr=1e-3),
            r"stages\[1\]\.lrr: unknown key 'lrr'.*did you mean 'lr'",
        ),
        (lambda r: r["stages"][1].update(lr="fast"), r"stages\[1\]\.lr: expected a number, got 'fast'"),
        (lambda r: r["stages"][1].update(batch_size=8.5), r"stages\[1\]\.batch_size: expected an integer"),
        (lambda r: r["stages"][1].update(bf16="yes"), r"stages\[1\]\.bf16: expected true/false"),
        (
            lambda r: r["stages"][1].update(sampler="random"),
            r"stages\[1\]\.sampler: expected 'mixed' or 'grouped'",
        ),
        (lambda r: r["stages"][2].update(kind="pretrain"), r"stages\[2\]\.kind: expected one of"),
        (
            lambda r: r["model"]["init"].update(vison={}),
            r"model\.init\.vison: unknown key.*did you mean 'vision'",
        ),
        (lambda r: r["model"]["init"].update(llm={"hidden_size": "big"}), r"model\.init\.llm\.hidden_size"),
        (lambda r: r.update(stagez=[]), r"stagez: unknown key"),
        (lambda r: r["stages"][1].update(lora={"r": 8}), r"stages\[1\]\.lora: unknown key 'lora'"),
        (
            lambda r: r["stages"][1].update(micro_batch_size=0),
            r"stages\[1\] \(projector\)\.micro_batch_size: must be positive",
        ),
        (lambda r: r["model"].pop("init"), r"exactly one of 'init'.*or 'from'"),
        (lambda r: r["stages"].reverse(), r"tokenizer stage must come before"),
        (lambda r: r["stages"][2].update(name="projector"), r"stage name 'projector' is used twice"),
        (
            lambda r: r["stages"].insert(1, {"kind": "align_video"}),
            r"align_video starts from the aligned image",
        ),
        (
            lambda r: r["stages"].insert(1, {"kind": "align_image", "region_loss": {"weight": 0.0}}),
            r"stages\[1\] \(align_image\)\.region_loss: weight and scale must be positive",
        ),
        (
            lambda r: r["stages"].insert(1, {"kind": "align_image", "region_loss": {"wieght": 1.0}}),
            r"region_loss\.wieght: unknown key.*did you mean 'weight'",
        ),
        (
            lambda r: r["stages"].insert(1, {"kind": "align_image", "region_loss": {"pooling": "cls"}}),
            r"region_loss\.pooling: expected 'box' or 'patch'",
        ),
        (
            lambda r: r["stages"].insert(1, {"kind": "align_image", "region_loss": {"per_frame": True}}),
            r"stages\[1\] \(align_image\)\.region_loss\.per_frame: only videos have frames",
        ),
        (
            lambda r: r["stages"].insert(1, {"kind": "align_image", "region_loss": {"motion_weight": 1.0}}),
            r"stages\[1\] \(align_image\)\.region_loss\.motion_weight: only videos move",
        ),
        (
            lambda r: r["stages"].insert(1, {"kind": "align_image", "region_loss": {"motion_weight": -1}}),
            r"stages\[1\] \(align_image\)\.region_loss\.motion_weight: must be >= 0",
        ),
        (
            lambda r: r["stages"].insert(1, {"kind": "align_image", "text_encoder": {"pooling": "max"}}),
            r"text_encoder\.pooling: expected 'eos' or 'mean'",
        ),
        (
            lambda r: r["stages"].insert(1, {"kind": "align_image", "text_encoder": {"token_init_std": 0}}),
            r"text_encoder\.token_init_std: must be positive",
        ),
    ],
)
def test_validation_errors_name_the_key(mutate, message):
    raw = minimal()
    mutate(raw)
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(raw)


def test_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    bad.write_text(yaml.safe_dump({**minimal(), "stages": [{"kind": "tokenizer", "vocab_size": "many"}]}))
    with pytest.raises(RecipeError, match=r"bad\.yaml: stages\[0\]\.vocab_size: expected an integer"):
        load_recipe(bad)


def test_overrides():
    recipe = recipe_from_dict(
        minimal(),
        [
            "stage.1.lr=5e-3",  # by index (from 0)
            "stage.sft.micro_batch_size=4",  # by name
            "stages.2.epochs=3",
            "model.init.llm.hidden_size=64",
            "data.generate.images=10",  # creates the mapping
            "run.keep_checkpoints=5",
        ],
    )
    assert recipe.stages[1].lr == 5e-3
    assert recipe.stages[2].micro_batch_size == 4 and recipe.stages[2].epochs == 3
    assert recipe.model.init.llm.hidden_size == 64
    assert recipe.data.generate.images == 10
    assert recipe.run.keep_checkpoints == 5
    with pytest.raises(RecipeError, match="index 7 is out of range"):
        recipe_from_dict(minimal(), ["stage.7.lr=1"])
    with pytest.raises(RecipeError, match="no stage named 'nope'"):
        recipe_from_dict(minimal(), ["stage.nope.lr=1"])
    with pytest.raises(RecipeError, match=r"stages\[1\]\.lrr: unknown key"):
        recipe_from_dict(minimal(), ["stage.1.lrr=1"])
    with pytest.raises(RecipeError, match="expected key.path=value"):
        recipe_from_dict(minimal(), ["stage.1.lr"])


def test_yaml_scientific_notation_strings_are_numbers():
    raw = minimal()
    raw["stages"][1]["lr"] = "1e-3"  # YAML 1.1 reads 1e-3 (no dot) as a string
    assert recipe_from_dict(raw).stages[1].lr == 1e-3


def test_deepspeed_configs_are_valid_zero_configs():
    zero2 = json.loads((CONFIGS / "deepspeed" / "zero2.json").read_text())
    offload = json.loads((CONFIGS / "deepspeed" / "zero2_offload.json").read_text())
    zero3 = json.loads((CONFIGS / "deepspeed" / "zero3.json").read_text())
    assert zero2["zero_optimization"]["stage"] == 2 and "offload_optimizer" not in zero2["zero_optimization"]
    assert offload["zero_optimization"]["stage"] == 2
    assert offload["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert zero3["zero_optimization"]["stage"] == 3
    resolved = D.resolve_deepspeed_config(
        CONFIGS / "deepspeed" / "zero2_offload.json",
        micro_batch_size=16,
        accumulation=1,
        world_size=8,
        max_grad_norm=1.0,
        bf16=True,
    )
    assert resolved["train_batch_size"] == 128 and resolved["train_micro_batch_size_per_gpu"] == 16
    assert resolved["gradient_accumulation_steps"] == 1 and resolved["gradient_clipping"] == 1.0
    assert resolved["bf16"]["enabled"] is True and resolved["fp16"]["enabled"] is False
    assert "auto" not in json.dumps(resolved)
    recipe = load_recipe(CONFIGS / "videollava-7b.yaml")
    assert recipe.resolve_path(recipe.stages[1].deepspeed_config).name == "zero2_offload.json"


def test_deepspeed_missing_is_a_clear_error():
    pytest.importorskip("torch")
    try:
        import deepspeed  # noqa: F401

        pytest.skip("deepspeed is installed")
    except ImportError:
        pass
    import torch

    module = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(module.parameters())
    with pytest.raises(Exception, match="needs the deepspeed package"):
        D.deepspeed_initialize(module, optimizer, None, {})


@pytest.mark.parametrize(
    "batch, micro, world, layout",
    [
        (128, 128, 1, (1, 128)),
        (128, 128, 2, (1, 64)),  # the README's DDP command on the ShapesWorld recipe
        (8, 2, 1, (4, 2)),
        (8, 2, 2, (2, 2)),
        (10, 4, 1, (3, 4)),  # 4 + 3 + 3: equal cuts, none above the micro-batch size
        (16, 16, 3, (1, 6)),  # shares of 6, 5 and 5
        (2, 8, 4, (1, 1)),  # more processes than samples: two ranks sit the step out
    ],
)
def test_batch_layout_keeps_the_global_batch(batch, micro, world, layout):
    stage = ProjectorStage(kind="projector", batch_size=batch, micro_batch_size=micro)
    found = batch_layout(stage, world)
    assert (found.accumulation, found.micro_batch_size) == layout
    # Cut as the sampler cuts it, every rank's share fits, and together they are the global batch.
    samples = list(range(batch))
    pieces = [
        micro_batches(shard(samples, rank, world), found.micro_batch_size, found.accumulation)
        for rank in range(world)
    ]
    assert sorted(i for rank in pieces for piece in rank for i in piece) == samples
    assert max(len(piece) for rank in pieces for piece in rank) <= micro


def test_batch_layout_under_deepspeed_cuts_equal_shares():
    stage = FinetuneStage(kind="finetune", batch_size=96, micro_batch_size=20)
    # 48 per rank in micro-batches of at most 20: 3 of 16 (2 x 24 would exceed 20, 4 of 12 is more steps).
    assert batch_layout(stage, 2, exact=True) == BatchLayout(accumulation=3, micro_batch_size=16)
    # 96 over 5 processes: no equal shares; the message says which override fixes it.
    with pytest.raises(
        RecipeError,
        match=r"cannot be split evenly over 5 processes.*--set stage\.finetune\.batch_size=95 or 100",
    ):
        batch_layout(stage, 5, exact=True)


# Each bad recipe and the start of the message it gets: the key's full path, what is wrong, the
# value found and, for unknown keys, the nearest valid key. Lists of valid keys follow some of these.
RECIPE_ERRORS = [
    (
        lambda r: r["stages"][1].update(lrr=1e-3),
        "stages[1].lrr: unknown key 'lrr' in stages[1] (did you mean 'lr'?); valid keys: kind, name, data,",
    ),
    (
        lambda r: r["stages"][2].update(warmup=0.1),
        "stages[2].warmup: unknown key 'warmup' in stages[2] (did you mean 'warmup_ratio'?); valid keys:",
    ),
    (
        lambda r: r.update(stagez=[]),
        "stagez: unknown key 'stagez' in recipe (did you mean 'stages'?); valid keys: model, stages, data, "
        "run, distributed",
    ),
    (
        lambda r: r["model"]["init"].update(vision={"hiden_size": 3}),
        "model.init.vision.hiden_size: unknown key 'hiden_size' in model.init.vision "
        "(did you mean 'hidden_size'?); valid keys: hidden_size, intermediate_size,",
    ),
    (
        lambda r: r.update(run={"zzzz": 1}),
        "run.zzzz: unknown key 'zzzz' in run; valid keys: output_dir, keep_checkpoints, progress, threads, "
        "cache_media, export",
    ),
    (
        lambda r: r["stages"][2].update(lora={"rank": 8}),
        "stages[2].lora.rank: unknown key 'rank' in stages[2].lora; valid keys: r, alpha, dropout, "
        "target_modules",
    ),
    (
        lambda r: r["stages"][1].update(lr="fast"),
        "stages[1].lr: expected a number, got 'fast' [stage 'projector']",
    ),
    (lambda r: r["stages"][1].update(lr=float("nan")), "stages[1].lr: expected a number, got nan"),
    (lambda r: r["stages"][1].update(batch_size=8.5), "stages[1].batch_size: expected an integer, got 8.5"),
    (lambda r: r["stages"][1].update(batch_size="8"), "stages[1].batch_size: expected an integer, got '8'"),
    (lambda r: r["stages"][1].update(bf16="yes"), "stages[1].bf16: expected true/false, got 'yes'"),
    (lambda r: r["stages"][1].update(bf16=1), "stages[1].bf16: expected true/false, got 1"),
    (
        lambda r: r["stages"][1].update(sampler="random"),
        "stages[1].sampler: expected 'mixed' or 'grouped', got 'random' [stage 'projector']",
    ),
    (
        lambda r: r["stages"][2].update(kind="pretrain"),
        "stages[2].kind: expected one of tokenizer, align_image, mae_image, align_video, projector, finetune, got 'pretrain'",
    ),
    (
        lambda r: r["stages"][2].pop("kind"),
        "stages[2].kind: expected one of tokenizer, align_image, mae_image, align_video, projector, finetune, got None",
    ),
    (lambda r: r["stages"].__setitem__(2, "finetune"), "stages[2]: a stage is a mapping with a 'kind'"),
    (lambda r: r.update(model=[1]), "model: expected a mapping, got list"),
    (lambda r: r.pop("model"), "model: required key is missing"),
    (lambda r: r["stages"][1].update(data=["a.json", 3]), "stages[1].data[1]: expected a string, got 3"),
    (lambda r: r["stages"][1].update(betas=0.9), "stages[1].betas: expected a list of a number, got 0.9"),
    (
        lambda r: r["model"].update({"from": {"checkpoint": 3}}),
        "model.from.checkpoint: expected a string, got 3",
    ),
    (
        lambda r: r["model"]["init"].update(vision={"hidden_size": "big"}),
        "model.init.vision.hidden_size: expected an integer, got 'big'",
    ),
    (lambda r: r["model"]["init"].update(seed="x"), "model.init.seed: expected an integer, got 'x'"),
    (
        lambda r: r.update(distributed={"strategy": "horovod"}),
        "distributed.strategy: expected 'ddp' or 'fsdp' or 'deepspeed', got 'horovod'",
    ),
    (
        lambda r: r["stages"][2].update(micro_batch_size=0),
        "stages[2] (sft).micro_batch_size: must be positive, got 0",
    ),
    (
        lambda r: r["stages"][2].update(projector_lr=-1),
        "stages[2] (sft).projector_lr: must not be negative, got -1",
    ),
    (
        lambda r: r["stages"][1].update(warmup_ratio=1.5),
        "stages[1] (projector).warmup_ratio: must be in [0, 1), got 1.5",
    ),
    (
        lambda r: r["stages"][1].update(betas=[0.9]),
        "stages[1] (projector).betas: two numbers in [0, 1), got [0.9]",
    ),
    (
        lambda r: r["stages"][1].update(max_steps=0),
        "stages[1] (projector).max_steps: must be positive, got 0",
    ),
    (lambda r: r["stages"][1].update(data=[]), "stages[1] (projector).data: no data files"),
    (lambda r: r["model"].update(num_frames=0), "model.num_frames: must be positive, got 0"),
    (lambda r: r["model"].update(template="nope"), "model.template: unknown template 'nope'"),
    (lambda r: r["stages"][2].update(template="nope"), "stages[2] (sft).template: unknown template 'nope'"),
    (lambda r: r.update(data={}), "data: give 'root' (a folder with the JSON files) or 'generate'"),
    (lambda r: r.update(run={"keep_checkpoints": 0}), "run.keep_checkpoints: must be at least 1"),
    (
        lambda r: r["stages"].insert(1, {"kind": "align_image", "text_encoder": {"token_init_std": 0}}),
        "stages[1] (align_image).text_encoder.token_init_std: must be positive",
    ),
    (
        lambda r: r["stages"].insert(1, {"kind": "align_image", "region_loss": {"weight": 0.0}}),
        "stages[1] (align_image).region_loss: weight and scale must be positive, got 0.0, 30.0",
    ),
    (
        lambda r: r["stages"].insert(1, {"kind": "align_image", "region_loss": {"motion_weight": -1}}),
        "stages[1] (align_image).region_loss.motion_weight: must be >= 0, got -1",
    ),
    (
        lambda r: r["data"].update(generate={"twins": 1.5}),
        "data.generate.twins: must be a fraction in [0, 1], got 1.5",
    ),
    (
        lambda r: r["data"].update(generate={"min_size": 128, "max_size": 100}),
        "data.generate.max_size: 100 is smaller than min_size 128",
    ),
    (
        lambda r: r["data"].update(generate={"image": 10}),
        "data.generate.image: unknown key 'image' in data.generate (did you mean 'images'?)",
    ),
]


@pytest.mark.parametrize("mutate, start", RECIPE_ERRORS)
def test_recipe_errors_give_the_key_path_and_the_problem(mutate, start):
    raw = minimal()
    mutate(raw)
    with pytest.raises(RecipeError) as caught:
        recipe_from_dict(raw)
    assert str(caught.value).startswith(f"<recipe>: {start}"), str(caught.value)


def test_every_training_stage_kind_has_a_task_builder():
    from videollava.train.config import STAGE_KINDS, TrainStage
    from videollava.train.tasks import TASK_BUILDERS

    training = {kind for kind, cls in STAGE_KINDS.items() if issubclass(cls, TrainStage)}
    assert (
        training == set(TASK_BUILDERS) == {"align_image", "mae_image", "align_video", "projector", "finetune"}
    )


def test_recipe_sections_are_the_models_own_configs():
    """The towers, LLM, text encoder, region loss and model options are the model's dataclasses,
    with the model's defaults where the recipe is silent."""
    from videollava.model.build import LLMConfig
    from videollava.model.videollava import VideoLlavaConfig
    from videollava.model.vision import VisionConfig
    from videollava.train.contrastive import RegionLoss, TextEncoderConfig

    raw = minimal()
    raw["model"]["init"]["vision"] = {"hidden_size": 64, "image_size": 32, "patch_size": 16}
    raw["stages"].insert(1, {"kind": "align_image", "region_loss": {"pooling": "patch"}})
    recipe = recipe_from_dict(raw)
    assert recipe.model.init.vision == VisionConfig(hidden_size=64, image_size=32, patch_size=16)
    assert recipe.model.init.llm == LLMConfig()
    align = recipe.stages[1]
    assert align.text_encoder == TextEncoderConfig() and align.region_loss == RegionLoss(pooling="patch")
    defaults = VideoLlavaConfig()
    assert recipe.model.options() == {name: getattr(defaults, name) for name in recipe.model.options()}
    raw["data"]["generate"] = {"images": 10, "twins": 0.5}
    assert recipe_from_dict(raw).data.generate == GenerationConfig(images=10, twins=0.5)
    with pytest.raises(RecipeError, match=r"model\.init\.vision\.num_frames: unknown key"):
        recipe_from_dict(
            minimal(), ["model.init.vision.num_frames=4"]
        )  # the video tower's are model.temporal_frames


def test_values_set_leave_out_options_at_their_defaults():
    """`to_dict(exclude_defaults=True)` (what an experiment folder's identity hashes) is the same
    whether an option at its default is written or not, so a new option leaves it unchanged."""
    raw = minimal()
    raw["model"]["init"]["vision"] = {"hidden_size": 64, "image_size": 32, "patch_size": 16}
    raw["stages"].insert(1, {"kind": "align_image", "region_loss": {"pooling": "patch", "weight": 3.0}})
    silent = recipe_from_dict(raw).to_dict(exclude_defaults=True)
    raw["stages"][1]["region_loss"] |= {"motion_weight": 0.0, "scale": 30.0}
    raw["stages"][2]["template"] = "plain"  # the projector stage's default
    assert recipe_from_dict(raw).to_dict(exclude_defaults=True) == silent
    assert silent["stages"][1] == {"kind": "align_image", "region_loss": {"weight": 3.0, "pooling": "patch"}}
    assert [stage["kind"] for stage in silent["stages"]] == [
        "tokenizer",
        "align_image",
        "projector",
        "finetune",
    ]
    raw["stages"][1]["region_loss"]["scale"] = 20.0
    assert recipe_from_dict(raw).to_dict(exclude_defaults=True) != silent
    # the full dump still writes every default out
    assert recipe_from_dict(raw).to_dict()["stages"][1]["region_loss"]["motion_weight"] == 0.0
