"""The training pieces the ablations need: masked-patch reconstruction of an image tower (mae_image),
stages on one modality only (only_media), a fresh second tower (align_image tower: fresh), and an
align_video with a text encoder of its own; each checked on small inputs, without a whole run."""

from __future__ import annotations

import json

import pytest
import torch

from videollava.model.build import init_vision_tower
from videollava.model.vision import VisionConfig, VisionTower
from videollava.train.config import RecipeError, recipe_from_dict
from videollava.train.mae import MaeConfig, MaeObjective, MaskedAutoencoder, heldout_reconstruction, patchify
from videollava.train.tasks import Alignment, TaskContext

VISION = VisionConfig(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    patch_size=8,
    image_size=32,
)


def tower(seed: int = 0) -> VisionTower:
    torch.manual_seed(seed)
    t = VisionTower(VISION)
    init_vision_tower(t, 0.02)
    return t


def test_patchify_follows_the_patch_embedding_order():
    """Patch i of patchify is what the tower's patch embedding reads at position i."""
    pixels = torch.randn(2, 3, 32, 32)
    t = tower()
    embedded = t.embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, P, D)
    weight = t.embeddings.patch_embedding.weight  # (D, C, p, p)
    # the conv is a linear map of each patch's pixels, in (p, p, C) order as patchify lays them out
    flat = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)  # (D, p*p*C)
    assert torch.allclose(patchify(pixels, 8) @ flat.t(), embedded, atol=1e-5)
    with pytest.raises(ValueError, match="do not split"):
        patchify(torch.zeros(1, 3, 30, 32), 8)


def test_mae_scores_only_the_patches_the_tower_did_not_see():
    mae = MaskedAutoencoder(tower(), MaeConfig(mask_ratio=0.75, decoder_hidden_size=16, decoder_heads=2))
    assert (mae.num_patches, mae.keep) == (16, 4)
    pixels = torch.randn(3, 3, 32, 32)
    generator = torch.Generator().manual_seed(5)
    noise = torch.rand(3, 16, generator=generator)
    seen = noise.argsort(dim=1)[:, :4]  # the patches this draw lets the tower see
    loss = mae.loss(pixels, torch.Generator().manual_seed(5))
    # Paint over the patches the tower saw in a copy of the input: the tower's input changes, so
    # the loss does; but with a decoder that ignores its input the loss only depends on the masked
    # patches' targets, which are untouched.
    with torch.no_grad():
        for layer in mae.decoder_layers:
            for p in layer.parameters():
                p.zero_()
        mae.decoder_head.weight.zero_()
        mae.decoder_head.bias.fill_(0.3)
    painted = pixels.clone()
    rows, cols = seen // 4, seen % 4
    for b in range(3):
        for r, c in zip(rows[b].tolist(), cols[b].tolist(), strict=True):
            painted[b, :, 8 * r : 8 * r + 8, 8 * c : 8 * c + 8] = 9.0
    constant = mae.loss(pixels, torch.Generator().manual_seed(5))
    assert constant == mae.loss(painted, torch.Generator().manual_seed(5))
    assert constant != loss
    # normalised targets: a constant prediction of 0.3 costs 1 + 0.09 per pixel
    assert constant.item() == pytest.approx(1.09, abs=0.05)


@pytest.fixture
def one_thread():
    """Tiny matrices: one thread is faster than two that wait for each other on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_mae_objective_learns_and_its_held_out_score_is_repeatable(one_thread):
    torch.manual_seed(0)
    mae = MaskedAutoencoder(tower(), MaeConfig(decoder_hidden_size=16, decoder_heads=2))
    objective = MaeObjective(mae)
    optimizer = torch.optim.AdamW(mae.trainable_parameters(), lr=3e-3)
    # smooth images (a gradient per channel): masked patches can be told from visible ones
    ramp = torch.linspace(-1, 1, 32)
    images = torch.stack([ramp[None, :] * s + ramp[:, None] * (1 - s) for s in torch.rand(8)])
    pixels = images[:, None].expand(-1, 3, -1, -1).contiguous()
    held_out = [pixels[:4]]
    before = heldout_reconstruction(mae, held_out)["image_mae_loss"]
    assert heldout_reconstruction(mae, held_out)["image_mae_loss"] == before  # the same masks every time
    for _ in range(60):
        loss, n = objective({"num_samples": 8, "pixels": pixels})
        optimizer.zero_grad()
        (loss / n).backward()
        optimizer.step()
    assert heldout_reconstruction(mae, held_out)["image_mae_loss"] < 0.5 * before
    assert all(p.grad is not None for p in mae.tower.parameters())  # the tower itself learns
    zero, count = objective({"num_samples": 0})
    assert count == 0 and zero.item() == 0.0 and zero.requires_grad  # joins the backward pass


def test_mae_config_checks_its_values():
    with pytest.raises(ValueError, match="mask_ratio"):
        MaeConfig(mask_ratio=1.0)
    with pytest.raises(ValueError, match="divisible"):
        MaeConfig(decoder_hidden_size=30, decoder_heads=4)
    with pytest.raises(ValueError, match="image tower"):
        MaskedAutoencoder(VisionTower(VisionConfig(**{**VISION.__dict__, "num_frames": 2})), MaeConfig())


def test_only_media_keeps_one_modality_and_text(tmp_path):
    entries = [
        {"id": "i1", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]},
        {"id": "v1", "video": "a.mp4", "conversations": [{"from": "human", "value": "<video>\nq"}, {"from": "gpt", "value": "a"}]},
        {"id": "t1", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"id": "v2", "video": "b.mp4", "conversations": [{"from": "human", "value": "<video>\nq"}, {"from": "gpt", "value": "a"}]},
    ]  # fmt: skip
    (tmp_path / "d.json").write_text(json.dumps(entries))
    ctx = TaskContext(recipe=None, model=None, tokenizer=None, data_root=tmp_path, alignment=Alignment())  # type: ignore[arg-type]
    assert [r.id for r in ctx.records(["d.json"])] == ["i1", "v1", "t1", "v2"]
    assert [r.id for r in ctx.records(["d.json"], only_media="video")] == ["v1", "t1", "v2"]
    assert [r.id for r in ctx.records(["d.json"], only_media="image")] == ["i1", "t1"]
    assert [r.id for r in ctx.records(["d.json"], 2, only_media="video")] == ["v1", "t1"]


def minimal(stages: list[dict]) -> dict:
    return {
        "model": {"init": {"tokenizer": "train"}},
        "data": {"root": "."},
        "stages": [{"kind": "tokenizer"}, *stages],
    }


def test_stage_order_and_language_space_checks():
    encoder = {"hidden_size": 32, "num_layers": 1, "num_heads": 2}
    ok = recipe_from_dict(
        minimal([{"kind": "mae_image"}, {"kind": "align_video", "init_projection_from_image": False,
                                         "text_encoder": encoder, "projection_dim": 16}])
    )  # fmt: skip
    assert [s.kind for s in ok.stages] == ["tokenizer", "mae_image", "align_video"]
    assert ok.stages[1].mae.mask_ratio == 0.75
    cases = [
        ([{"kind": "mae_image"}, {"kind": "align_video", "init_projection_from_image": False}], "text_encoder: no align_image"),
        ([{"kind": "mae_image"}, {"kind": "align_video", "text_encoder": encoder, "projection_dim": 16}],
         "init_projection_from_image: needs an align_image"),
        ([{"kind": "align_image"}, {"kind": "align_video", "text_encoder": encoder}], "give text_encoder and projection_dim together"),
        ([{"kind": "projector"}, {"kind": "mae_image"}], "alignment must come before"),
        ([{"kind": "mae_image", "mae": {"mask_ratio": 1.5}}], "mask_ratio"),
        ([{"kind": "align_image", "tower": "video"}], "tower"),
        ([{"kind": "projector", "only_media": "audio"}], "only_media"),
    ]  # fmt: skip
    for stages, message in cases:
        with pytest.raises(RecipeError, match=message):
            recipe_from_dict(minimal(stages))
