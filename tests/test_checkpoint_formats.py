"""The original Video-LLaVA layout (shards + LanguageBind tower folders), temporal attention, conversion."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from videollava.errors import CheckpointError
from videollava.model.build import LLMConfig
from videollava.model.bundle import load_bundle, save_bundle
from videollava.model.checkpoint import load_from_parts, load_weights, normalize_hf_keys
from videollava.model.vision import VisionConfig
from videollava.testing import TINY_TEXT as TEXT
from videollava.testing import TINY_VISION as VISION
from videollava.testing import tiny_test_tokenizer

PATCHES = (VISION["image_size"] // VISION["patch_size"]) ** 2
TOWER_TEXT_VOCAB = 100


# What transformers 4.30 (the version LanguageBind pins) writes for every nested config: its
# PretrainedConfig attributes with their defaults. LanguageBind's tower configs are compositions, so
# `save_pretrained` writes `text_config` and `vision_config` whole, these fields included.
PRETRAINED_CONFIG_FIELDS = {
    "return_dict": True,
    "output_hidden_states": False,
    "output_attentions": False,
    "torchscript": False,
    "torch_dtype": None,
    "use_bfloat16": False,
    "tf_legacy_loss": False,
    "pruned_heads": {},
    "tie_word_embeddings": True,
    "is_encoder_decoder": False,
    "is_decoder": False,
    "cross_attention_hidden_size": None,
    "add_cross_attention": False,
    "tie_encoder_decoder": False,
    "max_length": 20,
    "min_length": 0,
    "do_sample": False,
    "early_stopping": False,
    "num_beams": 1,
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "typical_p": 1.0,
    "repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "num_return_sequences": 1,
    "chunk_size_feed_forward": 0,
    "output_scores": False,
    "return_dict_in_generate": False,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "remove_invalid_values": False,
    "exponential_decay_length_penalty": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "architectures": None,
    "finetuning_task": None,
    "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
    "label2id": {"LABEL_0": 0, "LABEL_1": 1},
    "tokenizer_class": None,
    "prefix": None,
    "bos_token_id": None,
    "pad_token_id": None,
    "eos_token_id": None,
    "sep_token_id": None,
    "decoder_start_token_id": None,
    "task_specific_params": None,
    "problem_type": None,
    "_name_or_path": "",
    "transformers_version": "4.30.2",
}


def languagebind_config(video: bool, frames: int = 8, add_time_attn: bool | None = None) -> dict:
    """A tower folder's config.json with the fields LanguageBind's configuration code writes.

    Its vision config class adds `add_time_attn`, `num_frames`, `force_patch_dropout`, the LoRA
    settings and the audio fields to CLIP's; the image model's constructor rewrites `image_size`
    into a pair before saving, the video model's does not. The image tower keeps the class
    defaults `add_time_attn` false and `num_frames` 1.
    """
    size = VISION["image_size"]
    add_time_attn = video if add_time_attn is None else add_time_attn
    vision = {
        **PRETRAINED_CONFIG_FIELDS,
        "hidden_size": VISION["hidden_size"],
        "intermediate_size": VISION["intermediate_size"],
        "projection_dim": VISION["projection_dim"],
        "num_hidden_layers": VISION["num_hidden_layers"],
        "num_attention_heads": VISION["num_attention_heads"],
        "num_channels": 3,
        "patch_size": VISION["patch_size"],
        "image_size": size if video else [size, size],
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "attention_dropout": 0.0,
        "layer_norm_eps": 1e-5,
        "hidden_act": "gelu",
        "add_time_attn": add_time_attn,
        "num_frames": frames if video else 1,
        "force_patch_dropout": 0.0,
        "lora_r": 0,  # LoRA merged into the plain weights
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "num_mel_bins": 0.0,
        "target_length": 0.0,
        "video_decode_backend": "decord",
        "model_type": "clip_vision_model",
    }
    text = {
        **PRETRAINED_CONFIG_FIELDS,
        "vocab_size": TOWER_TEXT_VOCAB,
        "hidden_size": 16,
        "intermediate_size": 32,
        "projection_dim": VISION["projection_dim"],
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "layer_norm_eps": 1e-5,
        "hidden_act": "gelu",
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "attention_dropout": 0.0,
        "add_time_attn": False,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
        "model_type": "clip_text_model",
    }
    return {
        "_name_or_path": "LanguageBind_Video_merge" if video else "LanguageBind_Image",
        "architectures": ["CLIPModel"],
        "initializer_factor": 1.0,
        "logit_scale_init_value": 2.6592,
        "model_type": "LanguageBindVideo" if video else "LanguageBindImage",
        "projection_dim": VISION["projection_dim"],
        "text_config": text,
        "torch_dtype": "float32",
        "transformers_version": "4.30.2",
        "vision_config": vision,
    }


def languagebind_extra_weights(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The CLIP text side, projections, logit scale and position ids a LanguageBind tower file also holds."""
    width, rows = 16, PATCHES + 1
    return {
        "vision_model.embeddings.position_ids": torch.arange(rows)[None],
        "text_model.embeddings.token_embedding.weight": torch.randn(
            TOWER_TEXT_VOCAB, width, generator=generator
        ),
        "text_model.embeddings.position_embedding.weight": torch.randn(77, width, generator=generator),
        "text_model.embeddings.position_ids": torch.arange(77)[None],
        "text_model.final_layer_norm.weight": torch.ones(width),
        "text_model.final_layer_norm.bias": torch.zeros(width),
        "visual_projection.weight": torch.randn(
            VISION["projection_dim"], VISION["hidden_size"], generator=generator
        ),
        "text_projection.weight": torch.randn(VISION["projection_dim"], width, generator=generator),
        "logit_scale": torch.tensor(4.6052),
    }


def _temporal_weights(layers: int, frames: int, width: int, seed: int = 3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for n in range(layers):
        prefix = f"vision_model.encoder.layers.{n}."
        out[prefix + "temporal_embedding"] = 0.5 * torch.randn(1, frames, width, generator=generator)
        out[prefix + "temporal_layer_norm1.weight"] = 1 + 0.1 * torch.randn(width, generator=generator)
        out[prefix + "temporal_layer_norm1.bias"] = 0.1 * torch.randn(width, generator=generator)
        for proj in ("q", "k", "v", "out"):
            out[prefix + f"temporal_attn.{proj}_proj.weight"] = 0.3 * torch.randn(
                width, width, generator=generator
            )
            out[prefix + f"temporal_attn.{proj}_proj.bias"] = 0.1 * torch.randn(width, generator=generator)
    return out


def write_original_layout(
    root: Path, hf_model, tokenizer, temporal: bool = True, towers_inside: bool = False, frames: int = 8
) -> Path:
    """Write a Video-LLaVA-7B-style folder with its two LanguageBind tower folders beside it."""
    ours = normalize_hf_keys(hf_model.state_dict())
    main: dict[str, torch.Tensor] = {}
    towers: dict[str, dict[str, torch.Tensor]] = {"image": {}, "video": {}}
    for key, value in ours.items():
        value = value.clone()
        if key.startswith("language_model.lm_head."):
            main[key[len("language_model.") :]] = value
        elif key.startswith("language_model.model."):
            main[key[len("language_model.") :]] = value
        elif key.startswith("multi_modal_projector.linear_"):
            index = {"1": "0", "2": "2"}[key.split(".")[1][-1]]
            main[f"model.mm_projector.{index}.{key.split('.', 2)[2]}"] = value
        else:
            tower, rest = key.split(".", 1)
            towers[tower.split("_")[0]]["vision_model." + rest] = value
    if temporal:
        towers["video"].update(_temporal_weights(VISION["num_hidden_layers"], frames, VISION["hidden_size"]))
    generator = torch.Generator().manual_seed(5)
    for kind in ("image", "video"):
        folder = root / ("LanguageBind_Image" if kind == "image" else "LanguageBind_Video_merge")
        folder.mkdir(parents=True)
        video = kind == "video"
        config = languagebind_config(video, frames, add_time_attn=temporal if video else False)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        torch.save({**towers[kind], **languagebind_extra_weights(generator)}, folder / "pytorch_model.bin")
        if towers_inside:
            for k, v in towers[kind].items():
                main[f"model.{kind}_tower.{kind}_tower.{k}"] = v
    model_dir = root / "Video-LLaVA-7B"
    model_dir.mkdir()
    text = hf_model.config.text_config
    config = {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        **{k: TEXT[k] for k in TEXT},
        "vocab_size": text.vocab_size,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": 0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "mm_image_tower": "../LanguageBind_Image",
        "mm_video_tower": "../LanguageBind_Video_merge",
        "mm_hidden_size": VISION["hidden_size"],
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "image_aspect_ratio": "pad",
    }
    (model_dir / "config.json").write_text(json.dumps(config))
    # Two .bin shards with an index, as the published checkpoint has.
    names = sorted(main)
    half = len(names) // 2
    weight_map = {}
    for i, chunk in enumerate((names[:half], names[half:]), 1):
        file = f"pytorch_model-0000{i}-of-00002.bin"
        torch.save({k: main[k] for k in chunk}, model_dir / file)
        weight_map.update(dict.fromkeys(chunk, file))
    (model_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    tokenizer.save_pretrained(model_dir)
    return model_dir


@pytest.fixture(scope="module")
def original(tmp_path_factory, hf_checkpoint):
    from videollava.testing import tiny_test_tokenizer

    tokenizer = tiny_test_tokenizer(placeholder_tokens=False)
    root = tmp_path_factory.mktemp("original")
    return write_original_layout(root, hf_checkpoint[1], tokenizer)


def test_original_layout_loads_with_temporal_weights(original):
    image_config = json.loads((original.parent / "LanguageBind_Image" / "config.json").read_text())
    # The folder is what LanguageBind writes: a pair for image_size, one frame, no time attention.
    assert image_config["vision_config"]["image_size"] == [VISION["image_size"]] * 2
    assert image_config["vision_config"]["num_frames"] == 1
    assert image_config["vision_config"]["add_time_attn"] is False
    model, _ = load_weights(original, torch.float32)
    assert model.config.vision.image_size == VISION["image_size"]
    assert model.config.temporal_frames == 8
    assert model.config.image_aspect_ratio == "pad"
    towers = torch.load(original.parent / "LanguageBind_Video_merge" / "pytorch_model.bin", weights_only=True)
    layer = model.video_tower.encoder.layers[1]
    torch.testing.assert_close(
        layer.temporal_embedding, towers["vision_model.encoder.layers.1.temporal_embedding"]
    )
    torch.testing.assert_close(
        layer.temporal_attn.q_proj.weight, towers["vision_model.encoder.layers.1.temporal_attn.q_proj.weight"]
    )
    assert not any(hasattr(layer, "temporal_attn") for layer in model.image_tower.encoder.layers)
    image = torch.load(original.parent / "LanguageBind_Image" / "pytorch_model.bin", weights_only=True)
    torch.testing.assert_close(
        model.image_tower.encoder.layers[2].mlp.fc1.weight,
        image["vision_model.encoder.layers.2.mlp.fc1.weight"],
    )


def test_original_without_temporal_matches_hf_logits(tmp_path, hf_checkpoint):
    """Same weights in both layouts (no temporal weights): identical logits."""
    from videollava.testing import tiny_test_tokenizer

    _, hf = hf_checkpoint
    folder = write_original_layout(
        tmp_path, hf, tiny_test_tokenizer(placeholder_tokens=False), temporal=False
    )
    video_config = json.loads((tmp_path / "LanguageBind_Video_merge" / "config.json").read_text())
    assert video_config["vision_config"]["num_frames"] == 8  # ignored: add_time_attn is false
    ours, _ = load_weights(folder, torch.float32)
    assert ours.config.temporal_frames == 0
    reference, _ = load_weights(hf_checkpoint[0], torch.float32)
    ids = [[1, 5, 9, -201, 7, -200, 11, 12]]
    torch.manual_seed(0)
    images, videos = torch.randn(1, 3, 56, 56), torch.randn(1, 8, 3, 56, 56)
    with torch.no_grad():
        a = ours(ids, images=images, videos=videos).logits
        b = reference(ids, images=images, videos=videos).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def _copy_original(original: Path, tmp_path: Path) -> Path:
    """A writable copy of the original-layout fixture (checkpoint and both tower folders)."""
    root = tmp_path / "copy"
    shutil.copytree(original.parent, root)
    return root / original.name


def _edit_vision_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"].update(changes)
    (folder / "config.json").write_text(json.dumps(config, indent=2))


@pytest.mark.parametrize("image_size", [VISION["image_size"], [VISION["image_size"]] * 2])
def test_tower_image_size_is_an_int_or_a_pair_in_either_folder(original, tmp_path, image_size):
    """The published folders carry an int, folders saved by LanguageBind's image model a pair."""
    folder = _copy_original(original, tmp_path)
    for tower in ("LanguageBind_Image", "LanguageBind_Video_merge"):
        _edit_vision_config(folder.parent / tower, image_size=image_size)
    model, _ = load_weights(folder, torch.float32)
    assert model.config.vision.image_size == VISION["image_size"]
    assert model.config.temporal_frames == 8


def test_non_square_tower_image_size_is_named(original, tmp_path):
    folder = _copy_original(original, tmp_path)
    _edit_vision_config(folder.parent / "LanguageBind_Image", image_size=[56, 84])
    with pytest.raises(
        CheckpointError, match=r"LanguageBind_Image/config.json: image_size \[56, 84\] is not square"
    ):
        load_weights(folder, torch.float32)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("image_size", "224", r"image_size '224' must be a positive integer or a pair"),
        ("hidden_act", "swish", r"hidden_act 'swish' is not one of"),
        ("num_hidden_layers", 2.5, r"num_hidden_layers 2.5 must be a positive integer"),
        ("add_time_attn", "yes", r"add_time_attn 'yes' must be true or false"),
        ("num_frames", 0, r"num_frames 0 must be a positive integer"),
        ("layer_norm_eps", "1e-5", r"layer_norm_eps '1e-5' must be a number in \(0, 1\)"),
    ],
)
def test_bad_tower_config_fields_are_named(original, tmp_path, field, value, message):
    folder = _copy_original(original, tmp_path)
    _edit_vision_config(folder.parent / "LanguageBind_Video_merge", **{field: value})
    with pytest.raises(CheckpointError, match=rf"LanguageBind_Video_merge/config.json: .*{message}"):
        load_weights(folder, torch.float32)


def test_image_folder_with_time_attention_is_refused(original, tmp_path):
    folder = _copy_original(original, tmp_path)
    _edit_vision_config(folder.parent / "LanguageBind_Image", add_time_attn=True, num_frames=8)
    with pytest.raises(CheckpointError, match=r"LanguageBind_Image/config.json: .*add_time_attn is true"):
        load_weights(folder, torch.float32)


def test_tower_shape_mismatch_names_the_fields(original, tmp_path):
    folder = _copy_original(original, tmp_path)
    _edit_vision_config(folder.parent / "LanguageBind_Video_merge", hidden_act="quick_gelu")
    with pytest.raises(
        CheckpointError, match=r"differs from the image tower's .*hidden_act gelu vs quick_gelu"
    ):
        load_weights(folder, torch.float32)


def test_unmerged_lora_tower_is_named(original, tmp_path):
    """A tower saved before merging has PEFT's names; it is refused by name, not as missing weights."""
    folder = _copy_original(original, tmp_path)
    tower = folder.parent / "LanguageBind_Video_merge"
    _edit_vision_config(tower, lora_r=16)
    weights = torch.load(tower / "pytorch_model.bin", weights_only=True)
    renamed = {
        k.replace("vision_model.encoder.layers.", "vision_model.encoder.base_model.model.layers."): v
        for k, v in weights.items()
    }
    renamed["vision_model.encoder.base_model.model.layers.0.temporal_attn.q_proj.lora_A.default.weight"] = (
        torch.zeros(16, VISION["hidden_size"])
    )
    torch.save(renamed, tower / "pytorch_model.bin")
    with pytest.raises(
        CheckpointError, match=r"LanguageBind_Video_merge: the weights hold unmerged LoRA adapters"
    ):
        load_weights(folder, torch.float32)


def test_hf_image_size_pair_and_missing_fields(tmp_path, hf_checkpoint):
    """-hf configs: a pair is read like an int; fields left out take CLIP's defaults, as transformers does."""
    from videollava.model.checkpoint import config_from_hf

    data = json.loads((hf_checkpoint[0] / "config.json").read_text())
    data["vision_config"]["image_size"] = [VISION["image_size"]] * 2
    del data["vision_config"]["hidden_act"]
    config = config_from_hf(data, has_temporal=False)
    assert config.vision.image_size == VISION["image_size"]
    assert config.vision.hidden_act == "quick_gelu"
    assert config.vision.num_frames == 0 and config.temporal_frames == 0
    del data["vision_config"]
    assert config_from_hf(data, has_temporal=False).vision.hidden_size == 1024  # Video-LLaVA's default tower


def test_every_tower_shape_field_survives_a_written_config():
    """Each VisionConfig field but the temporal rows is written to vision_config and read back, so a field
    added to the tower's config cannot be left out of the -hf layout."""
    from videollava.model.checkpoint import config_from_hf, config_to_hf
    from videollava.model.videollava import VideoLlavaConfig

    vision = VisionConfig(
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=3,
        patch_size=4,
        image_size=12,
        num_channels=1,
        layer_norm_eps=1e-6,
        hidden_act="quick_gelu",
    )
    assert all(
        getattr(vision, f.name) != f.default
        for f in dataclasses.fields(VisionConfig)
        if f.name != "num_frames"
    )  # every field away from its default, so a field dropped on the way would show
    written = config_to_hf(VideoLlavaConfig(vision=vision, text_config={"vocab_size": 64}))
    assert set(written["vision_config"]) == {f.name for f in dataclasses.fields(VisionConfig)} - {
        "num_frames"
    } | {"model_type"}
    assert config_from_hf(written, has_temporal=False).vision == vision


def test_hub_tower_ids_resolve_to_folders_inside_the_checkpoint(original, tmp_path, monkeypatch):
    """Offline: the published config names hub ids; the same relative paths inside the folder are used."""
    folder = _copy_original(original, tmp_path)
    for name in ("LanguageBind_Image", "LanguageBind_Video_merge"):
        (folder / "LanguageBind").mkdir(exist_ok=True)
        shutil.move(folder.parent / name, folder / "LanguageBind" / name)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        mm_image_tower="LanguageBind/LanguageBind_Image",
        mm_video_tower="LanguageBind/LanguageBind_Video_merge",
    )
    (folder / "config.json").write_text(json.dumps(config))
    from videollava.model import checkpoint

    def no_hub(reference, allow_bin=True):
        raise AssertionError(f"asked the hub for {reference}")

    monkeypatch.setattr(checkpoint, "resolve", no_hub)
    model = checkpoint.load_original(folder, torch.float32)
    assert model.config.temporal_frames == 8
    towers = torch.load(
        folder / "LanguageBind" / "LanguageBind_Video_merge" / "pytorch_model.bin", weights_only=True
    )
    torch.testing.assert_close(
        model.video_tower.encoder.layers[0].temporal_embedding,
        towers["vision_model.encoder.layers.0.temporal_embedding"],
    )


def test_towers_inside_main_checkpoint(tmp_path, hf_checkpoint):
    from videollava.testing import tiny_test_tokenizer

    folder = write_original_layout(
        tmp_path, hf_checkpoint[1], tiny_test_tokenizer(placeholder_tokens=False), towers_inside=True
    )
    # Break the tower folders' weights: the ones inside the main checkpoint must win.
    for name in ("LanguageBind_Image", "LanguageBind_Video_merge"):
        (tmp_path / name / "pytorch_model.bin").write_bytes(b"not weights")
    model, _ = load_weights(folder, torch.float32)
    assert model.config.temporal_frames == 8


def _video_features(model, pixels):
    with torch.no_grad():
        return model.video_tower.encode_videos(pixels)


def test_zeroed_temporal_branch_gives_per_frame_features(original):
    model, _ = load_weights(original, torch.float32)
    torch.manual_seed(0)
    video = torch.randn(1, 8, 3, 56, 56)
    with_temporal = _video_features(model, video)
    with torch.no_grad():
        for layer in model.video_tower.encoder.layers:
            layer.temporal_attn.out_proj.weight.zero_()
            layer.temporal_attn.out_proj.bias.zero_()
            layer.temporal_embedding.zero_()
        zeroed = _video_features(model, video)
        per_frame = model.video_tower.hidden_state(video[0], layer=-2, num_frames=1).reshape(
            1, -1, VISION["hidden_size"]
        )
    torch.testing.assert_close(zeroed, per_frame, atol=1e-5, rtol=0)
    assert (with_temporal - per_frame).abs().max() > 1e-2


def test_frame_order_matters(original):
    model, _ = load_weights(original, torch.float32)
    torch.manual_seed(0)
    video = torch.randn(1, 8, 3, 56, 56)
    order = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0])
    rows = PATCHES + 1
    a = _video_features(model, video).reshape(8, rows, -1)[order]
    b = _video_features(model, video[:, order]).reshape(8, rows, -1)
    assert (a - b).abs().max() > 1e-2  # not a mere permutation of per-frame features


@pytest.mark.parametrize("frames", [4, 8, 16])
def test_any_frame_count_runs(original, frames):
    model, _ = load_weights(original, torch.float32)
    video = torch.randn(2, frames, 3, 56, 56)
    features = model.encode_videos(video)
    assert features.shape == (2, frames * (PATCHES + 1), TEXT["hidden_size"])
    assert torch.isfinite(features).all()
    table = model.video_tower.encoder.layers[0].temporal_embedding_for(frames)
    assert table.shape == (1, frames, VISION["hidden_size"])
    # linear resampling keeps the end points
    torch.testing.assert_close(table[0, 0], model.video_tower.encoder.layers[0].temporal_embedding[0, 0])
    torch.testing.assert_close(table[0, -1], model.video_tower.encoder.layers[0].temporal_embedding[0, -1])


def test_convert_original_to_hf_loads_in_transformers(original, tmp_path):
    from transformers import VideoLlavaForConditionalGeneration

    out = tmp_path / "converted"
    result = subprocess.run(
        [sys.executable, "-m", "videollava", "convert", str(original), str(out), "--dtype", "float32"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        assert (out / name).exists(), name
    hf = VideoLlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    ours, _ = load_weights(out, torch.float32)
    assert ours.config.temporal_frames == 8  # temporal weights kept under their own names
    config = json.loads((out / "config.json").read_text())
    image_id = config["image_token_index"]
    tokenizer = load_bundle(out).tokenizer  # the whole bundle: the tokenizer knows the placeholders
    assert tokenizer.convert_tokens_to_ids(["<image>", "<video>"]) == [image_id, config["video_token_index"]]
    ids = torch.tensor([[1, 5] + [image_id] * PATCHES + [9, 10]])
    images = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        a = hf(input_ids=ids, pixel_values=images).logits
        b = ours([[1, 5, -200, 9, 10]], images=images).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_parts_become_a_model_with_their_weights_and_a_seeded_projector(tmp_path):
    """LanguageBind tower folders + a LLaMA folder: the parts' tensors as they are, the video tower's
    temporal rows, a projector drawn from its seed alone, and the caller's random state untouched."""
    from safetensors.torch import load_file

    from tests.test_train_loop import LLM as PARTS_LLM
    from tests.test_train_loop import VISION as PARTS_VISION
    from tests.test_train_loop import write_parts

    parts = write_parts(tmp_path, tiny_test_tokenizer(placeholder_tokens=False))

    def load(seed: int, **kwargs):
        return load_from_parts(
            parts["image"], parts["video"], parts["llm"], projector_seed=seed, temporal_frames=0, **kwargs
        )

    torch.manual_seed(123)
    next_draw = torch.rand(3)
    torch.manual_seed(123)
    model, tokenizer = load(5, template="vicuna_v1")
    assert torch.equal(torch.rand(3), next_draw)

    video = load_file(str(parts["video"] / "model.safetensors"))
    llm = load_file(str(parts["llm"] / "model.safetensors"))
    assert torch.equal(
        model.video_tower.encoder.layers[1].temporal_attn.q_proj.weight,
        video["vision_model.encoder.layers.1.temporal_attn.q_proj.weight"],
    )
    assert torch.equal(
        model.language_model.model.layers[0].mlp.up_proj.weight, llm["model.layers.0.mlp.up_proj.weight"]
    )
    assert model.config.temporal_frames == 2 and model.config.template == "vicuna_v1" and model.training
    assert tokenizer.pad_token_id is not None

    projector = model.multi_modal_projector.linear_1.weight
    assert torch.equal(load(5)[0].multi_modal_projector.linear_1.weight, projector)
    assert not torch.equal(load(6)[0].multi_modal_projector.linear_1.weight, projector)

    declared = (VisionConfig(**PARTS_VISION), LLMConfig(**PARTS_LLM))
    load(5, architecture=declared)  # the shape the parts have
    wider = dataclasses.replace(declared[1], intermediate_size=2 * PARTS_LLM["intermediate_size"])
    with pytest.raises(
        CheckpointError,
        match=rf"^spec\.llm\.intermediate_size is {wider.intermediate_size} but the weights have "
        rf"{PARTS_LLM['intermediate_size']}$",
    ):
        load(5, architecture=(declared[0], wider), architecture_key="spec")


def test_a_saved_bundle_loads_back_as_it_was(tmp_path, hf_checkpoint):
    bundle = load_bundle(hf_checkpoint[0])
    transform = dataclasses.replace(bundle.transform, mean=(0.25, 0.5, 0.75), resample="bilinear")
    save_bundle(tmp_path / "saved", bundle.model, bundle.tokenizer, transform)
    again = load_bundle(tmp_path / "saved")
    assert again.folder == tmp_path / "saved" and again.transform == transform
    assert again.tokenizer.get_vocab() == bundle.tokenizer.get_vocab()
    assert again.model.config == bundle.model.config
    before, after = bundle.model.state_dict(), again.model.state_dict()
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        torch.testing.assert_close(after[name], tensor, rtol=0, atol=0)


def test_wrong_checkpoints_are_named(tmp_path, hf_checkpoint):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load_weights(tmp_path / "missing")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="neither a Video-LLaVA"):
        load_weights(tmp_path / "bert")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((hf_checkpoint[0] / "config.json").read_text())
    save_file({"language_model.model.norm.weight": torch.ones(3)}, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match="weights missing"):
        load_weights(broken)
    (broken / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_weights(broken)


@pytest.mark.parametrize("with_preprocessor", [True, False])
def test_unknown_aspect_mode_is_named(tmp_path, hf_checkpoint, with_preprocessor):
    """A checkpoint asking for an aspect mode we do not have fails on load, naming the file."""
    folder = tmp_path / "ckpt"
    shutil.copytree(hf_checkpoint[0], folder)
    config = json.loads((folder / "config.json").read_text())
    config.setdefault("videollava", {})["video_aspect_ratio"] = "anyres"
    (folder / "config.json").write_text(json.dumps(config))
    if not with_preprocessor:
        (folder / "preprocessor_config.json").unlink(missing_ok=True)
    name = "preprocessor_config.json" if with_preprocessor else "config.json"
    with pytest.raises(CheckpointError, match=rf"{name}: .*video_aspect_ratio must be one of .*'anyres'"):
        load_bundle(folder, torch.float32)


def test_hub_id_offline_gives_clear_error(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    code = (
        "from videollava.model.checkpoint import load_weights; load_weights('LanguageBind/Video-LLaVA-7B-hf')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode != 0
    assert "CheckpointError" in result.stderr and "could not fetch from the Hugging Face hub" in result.stderr


@pytest.mark.parametrize("past_the_rows", [0, 5])
def test_tokenizer_larger_than_the_embedding_fails_at_load(tmp_path, hf_checkpoint, past_the_rows):
    """Ids past the embedding rows would be an IndexError mid-generation: the load names both sizes."""
    from transformers import AutoTokenizer

    folder = tmp_path / "ckpt"
    shutil.copytree(hf_checkpoint[0], folder)
    rows = hf_checkpoint[1].get_input_embeddings().num_embeddings
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    extra = rows - len(tokenizer) + past_the_rows
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(extra)])
    tokenizer.save_pretrained(str(folder))
    assert len(tokenizer) == rows + past_the_rows
    if not past_the_rows:  # exactly as many tokens as rows: every id has its row
        assert (
            load_bundle(folder, torch.float32).tokenizer.convert_tokens_to_ids(f"<extra_{extra - 1}>")
            == rows - 1
        )
        return
    with pytest.raises(
        CheckpointError,
        match=rf"{folder}: the tokenizer has {rows + past_the_rows} tokens "
        rf"but the model's embedding has {rows} rows",
    ):
        load_bundle(folder, torch.float32)
