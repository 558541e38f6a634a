"""The training loop and the stage runner on a tiny model and a tiny ShapesWorld set."""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from videollava.testing import TINY_RECIPE_LLM as LLM
from videollava.testing import TINY_RECIPE_VISION as VISION
from videollava.testing import TINY_TEXT_ENCODER
from videollava.train.loop import lr_schedule, param_groups, read_metrics


def tiny_recipe(data_root: Path, stages: list[dict] | None = None, bf16: bool = False) -> dict:
    """Every stage of the real recipe, at a size that trains in seconds."""
    common = {"bf16": bf16, "log_every": 1, "warmup_ratio": 0.0}
    if stages is None:
        stages = [
            {"kind": "tokenizer", "vocab_size": 320},
            {
                "kind": "align_image",
                "text_encoder": {**TINY_TEXT_ENCODER},
                "projection_dim": 16,
                "lr": 2e-3,
                "batch_size": 8,
                "micro_batch_size": 4,
                "max_steps": 2,
                "image_aspect_ratio": "crop",
                **common,
            },
            {
                "kind": "align_video",
                "lr": 2e-3,
                "batch_size": 4,
                "micro_batch_size": 2,
                "max_steps": 2,
                **common,
            },
            {"kind": "projector", "lr": 3e-3, "batch_size": 8, "micro_batch_size": 4, "epochs": 1, **common},
            {"kind": "finetune", "lr": 3e-3, "batch_size": 8, "micro_batch_size": 2, "epochs": 1, **common},
        ]
    return {
        "model": {
            "init": {"seed": 0, "tokenizer": "train", "vision": VISION, "llm": LLM},
            "temporal_frames": 2,
            "num_frames": 2,
            "image_aspect_ratio": "pad",
            "model_max_length": 1024,
        },
        "data": {"root": str(data_root)},
        "run": {"progress": False, "keep_checkpoints": 2},
        "stages": stages,
    }


def make_world(root: Path, images: int = 12, videos: int = 6) -> Path:
    from videollava.shapesworld.generate import GenerationConfig, generate

    generate(root, GenerationConfig(seed=1, images=images, videos=videos, test_images=4, test_videos=4))
    return root


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def train(recipe_path: Path, output: Path, *overrides: str, resume: bool = False) -> int:
    from videollava.train.runner import run

    args = argparse.Namespace(recipe=recipe_path, output=output, resume=resume, overrides=list(overrides))
    return run(args)


def step_losses(run_dir: Path, stage: str | None = None) -> list[float]:
    return [
        r["loss"]
        for r in read_metrics(run_dir / "metrics.jsonl")
        if r.get("event") == "step" and (stage is None or r["stage"] == stage)
    ]


def trained_stage_weights(
    recipe: Path, output: Path, stage_dir: str, *overrides: str
) -> dict[str, torch.Tensor]:
    """Train the recipe into `output` and return what the stage saved as its trainable weights."""
    train(recipe, output, *overrides)
    with safe_open(str(output / "stages" / stage_dir / "weights.safetensors"), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return make_world(tmp_path_factory.mktemp("world"))


def test_cosine_schedule_with_warmup():
    from videollava.train.config import ProjectorStage

    def factors(schedule: str, total: int, warmup: int) -> list[float]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = lr_schedule(optimizer, ProjectorStage(lr_schedule=schedule), total, warmup)
        out = []
        for _ in range(total + 1):
            out.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return out

    f = factors("cosine", total=10, warmup=2)
    assert [f[0], f[1], f[2]] == [0.0, 0.5, 1.0]
    assert f[6] == pytest.approx(0.5)
    assert f[10] == pytest.approx(0.0)
    assert factors("constant", 10, 0)[7] == 1.0


class _Quadratic(torch.nn.Module):
    """A one-parameter objective: enough for the loop to step, schedule and log."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2))

    def forward(self, batch: dict) -> tuple[torch.Tensor, int]:
        return ((batch["x"] * self.weight).sum(-1) ** 2).sum(), batch["num_samples"]


def _stack(items: list) -> dict:
    return {"x": torch.stack(items), "num_samples": len(items), "skipped": []}


def _warmup_cosine(lr: float, step: int, total: int, warmup: int, schedule: str) -> float:
    """The HF Trainer's schedules written out: linear warm-up from 0, then cosine to 0 (or constant)."""
    if step < warmup:
        return lr * (step / max(1, warmup))
    if schedule == "constant":
        return lr * 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


@pytest.mark.parametrize(
    "settings, total, warmup",
    [
        ({"max_steps": 10, "warmup_ratio": 0.2}, 10, 2),
        ({"epochs": 3, "warmup_ratio": 0.03}, 12, 1),  # 4 steps an epoch; ceil(0.36) warm-up steps
        ({"max_steps": 5, "warmup_ratio": 0.0}, 5, 0),
        ({"max_steps": 6, "warmup_ratio": 0.5, "lr_schedule": "constant"}, 6, 3),
    ],
)
def test_learning_rate_per_step(tmp_path, settings, total, warmup):
    """Each step logs the rate it trained at: warm-up then cosine (or constant), to the last bit."""
    from videollava.train.config import ProjectorStage
    from videollava.train.loop import StageContext, Task, train_stage

    torch.manual_seed(0)
    data = list(torch.randn(8, 2))
    task = Task(
        module=_Quadratic(), dataset=data, collate_fn=_stack, lengths=[1] * 8, modalities=["image"] * 8
    )
    stage = ProjectorStage(kind="projector", lr=0.1, batch_size=2, micro_batch_size=2, **settings)
    train_stage(task, stage, StageContext(index=0, name="s", run_dir=tmp_path, progress=False))
    logged = [r["lr"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["event"] == "step"]
    schedule = settings.get("lr_schedule", "cosine")
    assert logged == [_warmup_cosine(0.1, step, total, warmup, schedule) for step in range(total)]


def test_param_groups_split_lr_and_decay():
    model = torch.nn.ModuleDict(
        {
            "multi_modal_projector": torch.nn.Linear(3, 3),
            "llm": torch.nn.Linear(3, 3),
            "norm": torch.nn.LayerNorm(3),
        }
    )
    model["norm"].requires_grad_(False)
    groups = param_groups(model, 1e-3, 0.1, lambda name: 5e-4 if "projector" in name else 1e-3)
    by_names = {tuple(g["names"]): (g["lr"], g["weight_decay"]) for g in groups}
    assert by_names == {
        ("multi_modal_projector.weight",): (5e-4, 0.1),
        ("multi_modal_projector.bias",): (5e-4, 0.0),
        ("llm.weight",): (1e-3, 0.1),
        ("llm.bias",): (1e-3, 0.0),
    }


def test_full_recipe_trains_and_exports(world, tmp_path):
    """Every stage kind once, then the loss of stage 2 goes down over a few epochs on the same data."""
    recipe = tiny_recipe(world)
    recipe["stages"][-1].update(epochs=5, micro_batch_size=4)
    out = tmp_path / "run"
    assert train(write_recipe(tmp_path / "r.yaml", recipe), out) == 0

    records = read_metrics(out / "metrics.jsonl")
    steps = [r for r in records if r["event"] == "step"]
    for key in ("step", "loss", "lr", "samples_per_s", "grad_norm", "stage"):
        assert all(key in r for r in steps)
    assert {r["stage"] for r in steps} == {"align_image", "align_video", "projector", "finetune"}
    finetune = step_losses(out, "finetune")
    assert len(finetune) == 5 * math.ceil(len(json.loads((world / "instruct.json").read_text())) / 8)
    first, last = sum(finetune[:3]) / 3, sum(finetune[-3:]) / 3
    assert last < first - 0.5, finetune  # nats; the run is seeded (measured: 5.62 -> 4.69)

    summary = json.loads((out / "summary.json").read_text())
    kinds = [s["kind"] for s in summary["stages"]]
    assert kinds == ["tokenizer", "align_image", "align_video", "projector", "finetune"]
    for key in ("image_r1_media_to_text", "image_r1_text_to_media", "video_r1_media_to_text"):
        assert 0.0 <= summary["retrieval_r1"][key] <= 1.0
    assert summary["bad_samples"] == 0 and summary["stages"][-1]["final_loss"] == finetune[-1]
    for index, name in enumerate(kinds[1:], 1):
        assert (out / "plots" / f"{index}-{name}.png").stat().st_size > 1000
        assert (out / "stages" / f"{index}-{name}" / "weights.safetensors").exists()

    # The export is a -hf checkpoint the inference pipeline loads, in bf16.
    from videollava.infer.pipeline import Pipeline

    pipeline = Pipeline.from_pretrained(out / "model", dtype="float32")
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["model_type"] == "video_llava" and config["videollava"]["template"] == "vicuna_v1"
    with safe_open(str(out / "model" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("multi_modal_projector.linear_1.weight").dtype == torch.bfloat16
    assert pipeline.model.config.temporal_frames == 2
    # Alignment put the aligned image tower's weights into the video tower (spatial parts).
    with safe_open(str(out / "model" / "model.safetensors"), "pt") as f:
        image_q = f.get_tensor("image_tower.encoder.layers.0.self_attn.q_proj.weight")
        video_q = f.get_tensor("video_tower.encoder.layers.0.self_attn.q_proj.weight")
    assert torch.equal(image_q, video_q)


def test_accumulation_does_not_change_the_update(world, tmp_path):
    """micro 8 x 1 and micro 2 x 4 make the same global batches, losses and weights (fp32)."""
    stages = [
        {"kind": "tokenizer", "vocab_size": 320},
        {
            "kind": "finetune",
            "lr": 3e-3,
            "batch_size": 8,
            "micro_batch_size": 8,
            "max_steps": 3,
            "bf16": False,
            "warmup_ratio": 0.0,
        },
    ]
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(world, stages))
    train(recipe, tmp_path / "a")
    train(recipe, tmp_path / "b", "stage.1.micro_batch_size=2")
    a, b = step_losses(tmp_path / "a"), step_losses(tmp_path / "b")
    assert len(a) == 3 and a == pytest.approx(b, rel=1e-5)
    with (
        safe_open(str(tmp_path / "a" / "stages" / "1-finetune" / "weights.safetensors"), "pt") as fa,
        safe_open(str(tmp_path / "b" / "stages" / "1-finetune" / "weights.safetensors"), "pt") as fb,
    ):
        for name in fa.keys():
            torch.testing.assert_close(fa.get_tensor(name), fb.get_tensor(name), rtol=1e-4, atol=1e-5)


def test_lora_finetune_merges_into_plain_weights(world, tmp_path):
    stages = [
        {"kind": "tokenizer", "vocab_size": 320},
        {
            "kind": "finetune",
            "lr": 1e-2,
            "projector_lr": 1e-3,
            "batch_size": 8,
            "micro_batch_size": 4,
            "max_steps": 2,
            "bf16": True,
            "gradient_checkpointing": True,
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        },
    ]
    out = tmp_path / "run"
    train(write_recipe(tmp_path / "r.yaml", tiny_recipe(world, stages)), out)
    with safe_open(str(out / "stages" / "1-finetune" / "weights.safetensors"), "pt") as f:
        names = list(f.keys())
        lora_b = [f.get_tensor(n) for n in names if "lora_B" in n]
    assert any("multi_modal_projector" in n for n in names)
    assert lora_b and all("q_proj" in n or "v_proj" in n for n in names if "lora_" in n)
    assert not any("mlp" in n or "embed_tokens" in n for n in names)  # the base LLM stays frozen
    assert any(t.abs().sum() > 0 for t in lora_b)  # LoRA B starts at zero: it trained
    with safe_open(str(out / "model" / "model.safetensors"), "pt") as f:
        exported = list(f.keys())
    assert not any("lora" in n or "base_layer" in n for n in exported)
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in exported


def test_text_encoder_lr_sets_the_text_encoders_own_rate(world, tmp_path):
    """text_encoder_lr 0 freezes the text encoder while the image tower trains; unset, both train."""
    from videollava.train.config import RecipeError

    align = copy.deepcopy(tiny_recipe(world)["stages"][1])
    align["max_steps"] = 1
    recipe = write_recipe(
        tmp_path / "r.yaml", tiny_recipe(world, [{"kind": "tokenizer", "vocab_size": 320}, align])
    )

    def weights(run: str, *overrides: str) -> dict[str, torch.Tensor]:
        return trained_stage_weights(recipe, tmp_path / run, "1-align_image", *overrides)

    one = weights("one", "stage.1.text_encoder_lr=0")
    two = weights("two", "stage.1.text_encoder_lr=0", "stage.1.max_steps=2")
    both = weights("both", "stage.1.max_steps=2")
    text = [n for n in one if ".text_encoder." in f".{n}"]
    tower = [n for n in one if "image_tower" in n and n.endswith("weight")]
    assert text and tower
    assert all(torch.equal(one[n], two[n]) for n in text)  # a second step left the text encoder as it was
    assert any(not torch.equal(one[n], two[n]) for n in tower)
    assert any(not torch.equal(two[n], both[n]) for n in text)
    with pytest.raises(RecipeError, match="text_encoder_lr: must not be negative"):
        train(recipe, tmp_path / "bad", "stage.1.text_encoder_lr=-1")


def test_region_loss_trains_a_region_head_in_both_alignment_stages(world, tmp_path):
    """With region_loss the image stage trains its region head, the video stage starts from it;
    data without regions is refused by name."""
    from videollava.train.config import RecipeError

    stages = copy.deepcopy(tiny_recipe(world)["stages"][:3])
    for stage in stages[1:]:
        stage.update(max_steps=1, region_loss={"weight": 2.0, "scale": 20.0})
    stages[1]["text_encoder"].update(pooling="mean", token_init_std=1.0)
    stages[2]["region_loss"].update(motion_weight=1.0, per_frame=True, frame_motion_weight=1.0)
    stages[2]["spatial_lr"] = 1e-3
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(world, stages))
    image = trained_stage_weights(recipe, tmp_path / "run", "1-align_image")
    with safe_open(str(tmp_path / "run" / "stages" / "2-align_video" / "weights.safetensors"), "pt") as f:
        video = {name: f.get_tensor(name) for name in f.keys()}
    (image_head,) = [n for n in image if "region_projection" in n]
    (video_head,) = [n for n in video if "region_projection" in n]
    # one step from the image head: close to it, not equal
    assert not torch.equal(image[image_head], video[video_head])
    assert (image[image_head] - video[video_head]).abs().max() < 0.05
    # held-out: how often each region's name is picked, images and videos
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["event"] == "eval"]
    assert 0.0 <= evals[0]["image_region_name_acc"] <= 1.0 and "video_region_name_acc" not in evals[0]
    assert 0.0 <= evals[1]["video_region_name_acc"] <= 1.0 and "image_region_name_acc" in evals[1]
    # and how often the way each video region moves is picked, by the mean of its box
    assert 0.0 <= evals[1]["video_region_motion_acc"] <= 1.0 and "image_region_motion_acc" not in evals[1]
    # and in each frame, what the object under it does then
    assert 0.0 <= evals[1]["video_region_frame_motion_acc"] <= 1.0
    # spatial_lr: the video tower's spatial path learned too, away from the image tower's
    spatial = "encoder.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(image[f"aligner.image_tower.{spatial}"], video[f"aligner.video_tower.{spatial}"])
    again = trained_stage_weights(recipe, tmp_path / "plain", "1-align_image", "stage.1.region_loss=null")
    assert not any("region_projection" in n for n in again)
    assert any(not torch.equal(image[n], again[n]) for n in again if "image_tower" in n)

    bare = tmp_path / "bare"
    shutil.copytree(world, bare)
    entries = json.loads((bare / "captions.json").read_text())
    (bare / "captions.json").write_text(
        json.dumps([{k: v for k, v in e.items() if k != "regions"} for e in entries])
    )
    with pytest.raises(RecipeError, match="region_loss needs entries with 'regions'"):
        train(recipe, tmp_path / "no-regions", f"data.root={bare}")
    still = tmp_path / "still"
    shutil.copytree(world, still)
    for entry in entries:
        for region in entry.get("regions", []):
            region.pop("motion", None)
    (still / "captions.json").write_text(json.dumps(entries))
    with pytest.raises(RecipeError, match="motion_weight needs regions with a 'motion'"):
        train(recipe, tmp_path / "no-motion", f"data.root={still}")


def test_tower_lr_trains_both_towers_in_stage_2(world, tmp_path):
    """Unset, stage 2 leaves the towers as the paper does; with tower_lr both towers learn too."""
    from videollava.train.config import RecipeError

    finetune = {
        "kind": "finetune",
        "lr": 3e-3,
        "batch_size": 8,
        "micro_batch_size": 8,
        "max_steps": 2,
        "sampler": "mixed",
    }
    recipe = write_recipe(
        tmp_path / "r.yaml", tiny_recipe(world, [{"kind": "tokenizer", "vocab_size": 320}, finetune])
    )

    def stage_weights(run: str, *overrides: str) -> dict[str, torch.Tensor]:
        return trained_stage_weights(recipe, tmp_path / run, "1-finetune", *overrides)

    def exported_towers(run: str) -> dict[str, torch.Tensor]:
        weights = load_file_(tmp_path / run / "model" / "model.safetensors")
        return {n: t for n, t in weights.items() if n.startswith(("image_tower.", "video_tower."))}

    frozen = stage_weights("frozen")
    assert not any(".image_tower." in f".{n}" or ".video_tower." in f".{n}" for n in frozen)
    trained = stage_weights("trained", "stage.1.tower_lr=1e-2")
    for prefix in ("image_tower.", "video_tower."):
        names = [n for n in trained if f".{prefix}" in f".{n}"]
        assert names, f"no {prefix} weights saved"
    before, after = exported_towers("frozen"), exported_towers("trained")
    assert before.keys() == after.keys()
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert any(n.startswith("image_tower.") for n in changed)
    assert any("temporal" in n for n in changed)  # the answers' loss reaches the video tower's time attention
    with pytest.raises(RecipeError, match="tower_lr: must not be negative"):
        train(recipe, tmp_path / "bad", "stage.1.tower_lr=-1")


def test_existing_run_needs_resume(world, tmp_path):
    from videollava.errors import VideoLlavaError

    stages = [{"kind": "tokenizer", "vocab_size": 320}]
    recipe = tiny_recipe(world, stages)
    recipe["run"]["export"] = {"enabled": False}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    train(path, tmp_path / "run")
    with pytest.raises(VideoLlavaError, match="already holds a run; pass --resume"):
        train(path, tmp_path / "run")
    assert train(path, tmp_path / "run", resume=True) == 0
    from videollava.errors import CheckpointError

    with pytest.raises(CheckpointError, match="saved in stage 0 \\('tokenizer'\\) but the recipe has 'tok'"):
        train(path, tmp_path / "run", "stage.0.name=tok", resume=True)


def test_bad_samples_in_training_are_logged_and_skipped(world, tmp_path):
    entries = json.loads((world / "instruct.json").read_text())
    broken = copy.deepcopy(entries[:6])
    broken[1]["id"] = "gone"
    broken[1]["image" if "image" in broken[1] else "video"] = "images/gone.png"
    broken[2]["id"] = "swapped"
    broken[2]["conversations"] = broken[2]["conversations"][::-1]
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    stages = [
        {"kind": "tokenizer", "vocab_size": 320, "data": [str(world / "instruct.json")]},
        {
            "kind": "finetune",
            "data": [str(tmp_path / "broken.json")],
            "batch_size": 6,
            "micro_batch_size": 3,
            "max_steps": 1,
            "bf16": False,
        },
    ]
    recipe = tiny_recipe(world, stages)
    recipe["run"]["export"] = {"enabled": False}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    train(path, tmp_path / "skip")
    logged = [json.loads(line) for line in (tmp_path / "skip" / "bad_samples.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in logged) == ["gone", "swapped"]
    step = next(r for r in read_metrics(tmp_path / "skip" / "metrics.jsonl") if r["event"] == "step")
    assert step["samples"] == 4 and step["skipped"] == 2  # the batch is just smaller
    assert json.loads((tmp_path / "skip" / "summary.json").read_text())["bad_samples"] == 2

    from videollava.data.datasets import BadSample

    with pytest.raises(BadSample, match="sample (gone|swapped)"):
        train(path, tmp_path / "fail", "stage.1.bad_samples=fail")


def write_parts(folder: Path, tokenizer) -> dict[str, Path]:
    """Tiny stand-ins for LanguageBind_Image, LanguageBind_Video_merge and a LLaMA LLM, in their layouts."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from videollava.model.vision import VisionConfig, VisionTower

    torch.manual_seed(0)
    parts = {}
    for name, frames in (("image", 0), ("video", 2)):
        tower = VisionTower(VisionConfig(**VISION, num_frames=frames))
        path = folder / f"LanguageBind_{name}"
        path.mkdir(parents=True)
        vision_config = {
            **VISION,
            "hidden_act": "gelu",
            "add_time_attn": bool(frames),
            "num_frames": frames or 8,
        }
        model_type = "LanguageBindVideo" if frames else "LanguageBindImage"
        (path / "config.json").write_text(
            json.dumps({"model_type": model_type, "vision_config": vision_config})
        )
        state = {f"vision_model.{k}": v.contiguous() for k, v in tower.state_dict().items()}
        state["text_model.embeddings.token_embedding.weight"] = torch.zeros(4, 4)  # ignored
        save_file(state, str(path / "model.safetensors"))
        parts[name] = path
    llm = LlamaForCausalLM(
        LlamaConfig(
            **LLM,
            rms_norm_eps=1e-5,
            vocab_size=len(tokenizer),
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    )
    parts["llm"] = folder / "llm"
    llm.save_pretrained(parts["llm"])
    tokenizer.save_pretrained(parts["llm"])
    return parts


def test_from_pretrained_parts_and_from_checkpoint(world, tmp_path):
    """`from:` LanguageBind-style tower folders + a LLaMA folder; then `from:` the exported checkpoint."""
    from transformers import AutoTokenizer

    from videollava.errors import CheckpointError
    from videollava.testing import tiny_test_tokenizer

    # A LLaMA-like tokenizer: no <image>/<video> tokens, prompts are split on the placeholders.
    tokenizer = tiny_test_tokenizer(placeholder_tokens=False)
    parts = write_parts(tmp_path / "parts", tokenizer)
    llm_spec = {**LLM, "vocab_size": len(tokenizer)}
    stage = {"kind": "projector", "batch_size": 4, "micro_batch_size": 4, "max_steps": 1, "bf16": False}
    raw = {
        "model": {
            "from": {
                "image_tower": str(parts["image"]),
                "video_tower": str(parts["video"]),
                "llm": str(parts["llm"]),
                "architecture": {"vision": VISION, "llm": llm_spec},
            },
            "temporal_frames": 2,
            "num_frames": 2,
            "image_aspect_ratio": "pad",
            "model_max_length": 256,
        },
        "data": {"root": str(world)},
        "run": {"progress": False, "export": {"dtype": "float32"}},
        "stages": [stage],
    }
    out = tmp_path / "parts-run"
    train(write_recipe(tmp_path / "parts.yaml", raw), out)
    exported = load_file_(out / "model" / "model.safetensors")
    llm_weights = load_file_(parts["llm"] / "model.safetensors")
    assert torch.equal(
        exported["language_model.model.layers.0.mlp.up_proj.weight"],
        llm_weights["model.layers.0.mlp.up_proj.weight"],
    )  # frozen in stage 1
    video = load_file_(parts["video"] / "model.safetensors")
    assert torch.equal(
        exported["video_tower.encoder.layers.1.temporal_attn.q_proj.weight"],
        video["vision_model.encoder.layers.1.temporal_attn.q_proj.weight"],
    )
    assert AutoTokenizer.from_pretrained(out / "model").convert_tokens_to_ids("<image>") in (None, 0)

    # Continue from the exported checkpoint with a finetune stage.
    raw2 = {
        **raw,
        "model": {
            "from": {"checkpoint": str(out / "model")},
            "num_frames": 2,
            "image_aspect_ratio": "pad",
            "model_max_length": 256,
        },
        "stages": [{**stage, "kind": "finetune"}],
    }
    out2 = tmp_path / "continued"
    train(write_recipe(tmp_path / "continued.yaml", raw2), out2)
    assert step_losses(out2, "finetune")

    # A declared shape that the weights do not have is refused, naming the field.
    raw["model"]["from"]["architecture"]["llm"] = {**llm_spec, "intermediate_size": 96}
    with pytest.raises(
        CheckpointError, match=r"architecture\.llm\.intermediate_size is 96 but the weights have 64"
    ):
        train(write_recipe(tmp_path / "bad.yaml", raw), tmp_path / "bad")


def load_file_(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_projector_stage_can_train_a_from_scratch_llm(world, tmp_path):
    stages = [
        {"kind": "tokenizer", "vocab_size": 320},
        {"kind": "projector", "train_llm": True, "batch_size": 4, "micro_batch_size": 4, "max_steps": 1},
    ]
    recipe = tiny_recipe(world, stages)
    recipe["run"]["export"] = {"enabled": False}
    train(write_recipe(tmp_path / "r.yaml", recipe), tmp_path / "run")
    with safe_open(str(tmp_path / "run" / "stages" / "1-projector" / "weights.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.language_model.model.layers.0.mlp.up_proj.weight" in names
    assert "model.multi_modal_projector.linear_1.weight" in names
    assert not any("tower" in n for n in names)  # the towers stay frozen
