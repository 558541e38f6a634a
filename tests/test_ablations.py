"""The ablation arms as recipes, the stages they share, the statistics and the report, without
training: recipes are composed and checked, results are written as the runs write them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from videollava.experiments.ablations import arm_dir, collect
from videollava.experiments.recipes import (
    ARM_FILES,
    Arm,
    ExperimentError,
    Scale,
    apply_edits,
    shared_prefix,
)
from videollava.experiments.report import build
from videollava.experiments.stats import bootstrap_mean_difference, mean_std, paired_difference
from videollava.train.config import load_recipe

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "ablations"
BASE = CONFIGS.parent / "shapesworld.yaml"


def recipe(arm: str, scale: str = "full", seed: int = 0, data: Path = Path("/data")):
    return Arm.load(CONFIGS, arm).recipe(Scale.load(CONFIGS, scale), seed, data)


def stages(r) -> dict[str, dict]:
    return {s["name"] or s["kind"]: s for s in r.to_dict()["stages"]}


@pytest.mark.parametrize("scale", ["smoke", "full"])
@pytest.mark.parametrize("arm", list(ARM_FILES))
def test_every_arm_is_a_valid_recipe_at_every_scale(arm, scale):
    r = recipe(arm, scale)
    assert r.data.root == "/data" and r.data.generate is not None
    assert all(s.seed == 0 for s in r.stages if s.kind != "tokenizer")


def test_united_is_todays_recipe_with_only_the_scale_changed():
    """united = configs/shapesworld.yaml; the full scale shortens stages and shrinks the world only."""
    base, united = load_recipe(BASE).to_dict(), recipe("united").to_dict()
    assert united["model"] == base["model"]
    for ours, theirs in zip(united["stages"], base["stages"], strict=True):
        changed = {k for k in ours if ours[k] != theirs[k]}
        assert changed <= {"max_steps", "checkpoint_every"}, (ours["kind"], changed)
    assert {k for k in base["data"]["generate"] if base["data"]["generate"][k] != united["data"]["generate"][k]} <= {
        "images", "videos", "test_images", "test_videos",
    }  # fmt: skip


def test_separated_mae_keeps_united_steps_and_aligns_video_to_a_text_encoder_of_its_own():
    united, mae = stages(recipe("united")), stages(recipe("separated-mae"))
    assert "align_image" not in mae and mae["mae_image"]["kind"] == "mae_image"
    for key in ("max_steps", "batch_size", "lr", "warmup_ratio", "data"):
        assert mae["mae_image"][key] == united["align_image"][key], key
    video = mae["align_video"]
    assert video["text_encoder"] == united["align_image"]["text_encoder"]
    assert video["projection_dim"] == united["align_image"]["projection_dim"]
    assert video["init_projection_from_image"] is False
    for name in ("projector", "finetune"):
        assert mae[name] == united[name]


def test_separated_text_aligns_a_second_fresh_tower_for_the_video_side():
    text, united = stages(recipe("separated-text")), stages(recipe("united"))
    extra = text["align_image_for_video"]
    assert extra["tower"] == "fresh" and text["align_image"] == united["align_image"]
    assert {k: v for k, v in extra.items() if k not in ("name", "tower")} == {
        k: v for k, v in united["align_image"].items() if k not in ("name", "tower")
    }
    assert list(text) == [
        "tokenizer",
        "align_image",
        "align_image_for_video",
        "align_video",
        "projector",
        "finetune",
    ]
    assert text["align_video"] == united["align_video"]


@pytest.mark.parametrize("arm, media", [("video-only", "video"), ("image-only", "image")])
def test_single_modality_arms_differ_from_joint_only_in_the_llm_stages_media(arm, media):
    joint, single = stages(recipe("united")), stages(recipe(arm))
    for name in joint:
        differs = {k for k in joint[name] if joint[name][k] != single[name][k]}
        assert differs == ({"only_media"} if name in ("projector", "finetune") else set()), name
        if name in ("projector", "finetune"):
            assert single[name]["only_media"] == media and single[name]["max_steps"] is not None


def test_stages_shared_within_a_seed_and_none_across_seeds():
    united = recipe("united")
    assert shared_prefix(united, recipe("video-only")) == 3  # tokenizer, align_image, align_video
    assert shared_prefix(united, recipe("image-only")) == 3
    assert shared_prefix(united, recipe("separated-text")) == 2
    assert shared_prefix(united, recipe("separated-mae")) == 1
    assert shared_prefix(united, recipe("video-only", seed=1)) == 0
    assert shared_prefix(united, recipe("united", data=Path("/elsewhere"))) == 0
    one, two = recipe("united", seed=1).to_dict(), recipe("united", seed=2).to_dict()
    assert one["data"] == two["data"] and one["model"]["init"]["seed"] == 1


def test_edits_name_the_file_and_the_missing_stage():
    raw = {"stages": [{"kind": "tokenizer"}, {"kind": "projector", "lr": 1.0}]}
    with pytest.raises(ExperimentError, match=r"arm.yaml: edits\[0\]: no stage named 'finetune'"):
        apply_edits(raw, [{"update": "finetune", "with": {"lr": 2.0}}], "arm.yaml")
    with pytest.raises(ExperimentError, match="exactly one of"):
        apply_edits(raw, [{"update": "projector", "replace": "projector"}], "arm.yaml")
    edited = apply_edits(
        raw,
        [
            {"insert_after": "projector", "from": "projector", "with": {"name": "second"}},
            {"replace": "projector", "from": "projector", "keys": ["lr"], "with": {"kind": "finetune"}},
        ],
        "arm.yaml",
    )
    assert edited["stages"][1:] == [
        {"kind": "finetune", "lr": 1.0},
        {"kind": "projector", "lr": 1.0, "name": "second"},
    ]
    assert raw["stages"][1] == {"kind": "projector", "lr": 1.0}  # the input is left as it was


# ---------------------------------------------------------------------------------------- statistics


def test_mean_and_sample_std():
    assert mean_std([]) == (None, None)
    assert mean_std([0.5]) == (0.5, None)
    mean, std = mean_std([0.2, 0.4, 0.6])
    assert mean == pytest.approx(0.4) and std == pytest.approx(0.2)


def test_bootstrap_interval_covers_zero_for_equal_arms_and_not_for_a_clear_gap():
    rng = np.random.default_rng(1)
    same = [rng.integers(0, 2, 400) for _ in range(3)]
    low, high = bootstrap_mean_difference(same, [a.copy() for a in same], 2000, seed=0)
    assert low == high == 0.0
    a = [(rng.random(400) < 0.8).astype(int) for _ in range(3)]
    b = [(rng.random(400) < 0.6).astype(int) for _ in range(3)]
    low, high = bootstrap_mean_difference(a, b, 2000, seed=0)
    truth = np.mean([x.mean() - y.mean() for x, y in zip(a, b, strict=True)])
    assert 0 < low < truth < high and high - low < 0.15


def test_bootstrap_matches_resampling_questions_one_by_one():
    """The multinomial shortcut draws what resampling individual questions draws."""
    rng = np.random.default_rng(2)
    a = [(rng.random(60) < p).astype(int) for p in (0.5, 0.7)]
    b = [(rng.random(60) < p).astype(int) for p in (0.6, 0.5)]
    low, high = bootstrap_mean_difference(a, b, 20000, seed=3)
    means = []
    for _ in range(20000):
        picks = rng.integers(0, 2, 2)
        diffs = []
        for s in picks:
            idx = rng.integers(0, 60, 60)
            diffs.append(a[s][idx].mean() - b[s][idx].mean())
        means.append(np.mean(diffs))
    ref_low, ref_high = np.percentile(means, [2.5, 97.5])
    assert low == pytest.approx(ref_low, abs=0.02) and high == pytest.approx(ref_high, abs=0.02)


def test_paired_difference_per_seed_and_verdict():
    a = {0: np.array([1, 1, 1, 0]), 1: np.array([1, 1, 0, 0]), 2: np.array([1, 1, 1, 1])}
    b = {0: np.array([1, 0, 0, 0]), 1: np.array([1, 1, 0, 0]), 3: np.array([0, 0, 0, 0])}
    d = paired_difference("image/color", "united", "separated-mae", a, b, 1000)
    assert d.seeds == [0, 1] and d.per_seed == [0.5, 0.0]
    assert (d.a_wins, d.b_wins) == (1, 0) and d.mean == 0.25
    assert paired_difference("x", "a", "b", {0: a[0]}, {1: b[1]}) is None


# ---------------------------------------------------------------------------------------- the report


TYPES = {"image": ["color", "shape", "count", "exists"], "video": ["color", "direction", "exists"]}
# Per arm: the chance each question is answered right. Every arm of a seed draws the same uniform
# numbers, so equal skills give equal answers, and a higher skill is right wherever a lower one is.
SKILL = {
    "united": {"image": 0.9, "video": 0.85},
    "separated-mae": {"image": 0.6, "video": 0.6},
    "separated-text": {"image": 0.9, "video": 0.85},
    "video-only": {"image": 0.3, "video": 0.85},
    "image-only": {"image": 0.9, "video": 0.5},
}


def fake_result(output: Path, arm: str, seed: int) -> None:
    """An arm-seed folder as a finished run leaves it: the harness's predictions, result.json."""
    rng = np.random.default_rng(seed)
    folder = arm_dir(output, arm, seed)
    (folder / "eval").mkdir(parents=True)
    records, accuracy, counts = [], {}, {}
    qid = 0
    for modality, types in TYPES.items():
        for qtype in types:
            right = 0
            for _ in range(40):
                correct = rng.random() < SKILL[arm][modality]
                answer = "yes" if qtype == "exists" else "red"
                wrong = "no" if qtype == "exists" else "blue"
                meta = {"question_id": qid, "media": "m", "modality": modality, "type": qtype, "split": None}
                records.append(
                    {
                        "id": str(qid),
                        "question": "q",
                        "answer": answer,
                        "pred": answer if correct else wrong,
                        "meta": meta,
                    }
                )
                right += correct
                qid += 1
            accuracy.setdefault(modality, {})[qtype] = right / 40
            counts.setdefault(modality, {})[qtype] = 40
    (folder / "eval" / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    by_modality = {m: sum(accuracy[m].values()) / len(accuracy[m]) for m in accuracy}
    overall = sum(a for m in accuracy for a in accuracy[m].values()) / sum(len(t) for t in TYPES.values())
    result = {
        "arm": arm, "seed": seed, "overall": overall, "by_modality": by_modality, "accuracy": accuracy,
        "n": counts, "questions": len(records), "model_sha256": f"{arm}-{seed}", "shared_stages": None,
        "times": {"train_seconds": 10.0, "eval_seconds": 1.0, "train_stage_seconds": {"finetune": 8.0}},
    }  # fmt: skip
    (folder / "result.json").write_text(json.dumps(result))


def test_report_from_finished_and_missing_arm_seeds(tmp_path):
    for seed in range(3):
        for arm in SKILL:
            if (arm, seed) != ("separated-text", 2):  # one arm-seed never finished
                fake_result(tmp_path, arm, seed)
    found = collect(tmp_path)
    assert found["joint"][1]["model_sha256"] == "united-1" and found["joint"][1]["arm"] == "joint"
    data = build(tmp_path, Scale.load(CONFIGS, "smoke"), [0, 1, 2], resamples=500)

    assert not data["complete"] and data["missing"] == ["separated-text seed 2"]
    assert [e["seed"] for e in data["arms"]["separated-text"]] == [0, 1]
    for arm in ("united", "separated-mae", "joint", "video-only", "image-only"):
        assert [e["seed"] for e in data["arms"][arm]] == [0, 1, 2]
        assert {"overall", "accuracy", "by_type"} <= set(data["arms"][arm][0])
    verdicts = data["verdicts"]
    assert verdicts["united vs separated-mae"]["verdict"] == "holds at this scale"
    assert verdicts["united vs separated-text"]["verdict"].startswith("is not shown")
    assert verdicts["joint vs video-only"]["verdict"].startswith(
        "is not shown"
    )  # 0.85 vs 0.8 on 120 questions
    video_only = data["comparisons"]["joint vs video-only"]["image/all"]
    assert video_only["verdict"] == "A" and video_only["low"] > 0.4  # joint far better on images
    mae = data["comparisons"]["united vs separated-mae"]["video/all"]
    assert len(mae["per_seed"]) == 3 and mae["low"] < mae["mean"] < mae["high"]
    separated_text = data["comparisons"]["united vs separated-text"]["all/all"]
    assert separated_text["seeds"] == [0, 1]  # paired over the seeds both have

    markdown = (tmp_path / "report" / "ablations.md").read_text()
    assert "**Missing (not finished):** separated-text seed 2." in markdown
    assert "| Separated-text (2 seeds) |" in markdown and "| United (3 seeds) |" in markdown
    assert "Δ United − Separated-MAE" in markdown and "▲" in markdown
    assert (tmp_path / "report" / "ablations-joint.png").exists()
    again = build(tmp_path, Scale.load(CONFIGS, "smoke"), [0, 1, 2], resamples=500)
    assert again["comparisons"] == data["comparisons"]  # the same digits when rebuilt


def test_an_experiment_folder_is_tied_to_its_recipes_not_to_their_comments(tmp_path):
    from videollava.experiments.ablations import Plan

    configs = tmp_path / "configs" / "ablations"
    configs.mkdir(parents=True)
    for path in CONFIGS.iterdir():
        (configs / path.name).write_text(path.read_text())
    (configs.parent / "shapesworld.yaml").write_text(BASE.read_text())

    def identity() -> dict:
        scale = Scale.load(configs, "smoke")
        return Plan(
            configs=configs, output=tmp_path / "out", scale=scale, seeds=[0], arms=["united"]
        ).identity()

    before = identity()
    scale_file = configs / "scale-smoke.yaml"
    scale_file.write_text("# another comment\n" + scale_file.read_text())
    assert identity() == before
    scale_file.write_text(scale_file.read_text().replace("max_steps: 2,", "max_steps: 3,"))
    assert identity() != before
