"""Checkpoint formats: read the -hf layout (transformers 4.x and 5.x key variants) and the original
Video-LLaVA layout with its LanguageBind tower folders; assemble a model from LanguageBind towers
plus a LLaMA-family LLM; write the -hf layout.

Weights are read with safetensors, or with `torch.load(weights_only=True)` for `.bin` files.
Models are built on the meta device and the loaded tensors assigned, so a 7B checkpoint is never
held twice in memory.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from videollava.constants import HF_IMAGE_TOKEN_ID, HF_VIDEO_TOKEN_ID, IMAGE_SLOT, VIDEO_SLOT
from videollava.errors import CheckpointError
from videollava.model.build import LLMConfig, model_config
from videollava.model.compress import check_budget, check_rank_layer
from videollava.model.videollava import Projector, VideoLlava, VideoLlavaConfig
from videollava.model.vision import VisionConfig

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*"]
SHARD_BYTES = 4 * 1024**3


# ---------------------------------------------------------------- locating and reading files


def resolve(path_or_id: str | os.PathLike, allow_bin: bool = True) -> Path:
    """A local folder as is; anything else is taken as a Hugging Face hub id and downloaded."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: expected a checkpoint folder, found a file")
    text = str(path_or_id)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise CheckpointError(f"{text}: no such checkpoint folder (and not a hub id of the form owner/name)")
    try:
        patterns = HUB_PATTERNS + (["*.bin"] if allow_bin else [])
        return Path(snapshot_download(repo_id=text, allow_patterns=patterns))
    except Exception as error:  # the hub client raises many types: offline, missing repo, auth
        raise CheckpointError(
            f"{text}: could not fetch from the Hugging Face hub ({type(error).__name__}: {error}). "
            "Without network access, download the checkpoint elsewhere and pass its local folder."
        ) from None


def _weight_files(folder: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / s for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).exists():
            return [folder / name]
    shards = sorted(folder.glob("model-*.safetensors")) or sorted(folder.glob("pytorch_model-*.bin"))
    if shards:
        return shards
    raise CheckpointError(f"{folder}: no weights found (looked for {', '.join(WEIGHT_FILES)} and shards)")


def _read_file(
    file: Path, keep: Callable[[str], bool] | None, names_only: bool
) -> dict[str, torch.Tensor | None]:
    """Tensors of one weights file (or just their names, from the header for safetensors)."""
    if not file.exists():
        raise CheckpointError(f"{file}: shard listed in the index is missing")
    if file.suffix != ".safetensors":
        return {k: v for k, v in _load_bin(file).items() if keep is None or keep(k)}
    try:
        with safe_open(str(file), "pt") as handle:
            return {
                name: None if names_only else handle.get_tensor(name)
                for name in handle.keys()
                if keep is None or keep(name)
            }
    except Exception as error:
        raise CheckpointError(f"{file}: not a readable safetensors file ({error})") from None


def read_key_names(folder: Path) -> list[str]:
    """Names of all tensors, read from headers only where the format allows it."""
    return [name for file in _weight_files(folder) for name in _read_file(file, None, names_only=True)]


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise CheckpointError(
            f"{file}: not a readable weights file ({type(error).__name__}: {error})"
        ) from None


def read_state_dict(folder: Path, keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder (optionally only names for which `keep(name)` is true)."""
    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(folder):
        state.update(_read_file(file, keep, names_only=False))  # type: ignore[arg-type]
    return state


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None


# ---------------------------------------------------------------- key names

_TOWERS = ("image_tower", "video_tower")


def normalize_hf_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map transformers 4.x / 5.x -hf names onto ours (which are the 4.x names without `vision_model.`)."""
    out = {}
    for name, tensor in state.items():
        key = name
        if key.startswith("model.") and key.split(".")[1] in (
            *_TOWERS,
            "multi_modal_projector",
            "language_model",
        ):
            key = key[len("model.") :]  # 5.x: model.<part>.*
        if key == "lm_head.weight":
            key = "language_model.lm_head.weight"
        elif key.startswith("language_model.") and not key.startswith(
            ("language_model.model.", "language_model.lm_head.")
        ):
            key = "language_model.model." + key[len("language_model.") :]
        for tower in _TOWERS:
            if key.startswith(f"{tower}.vision_model."):
                key = tower + "." + key[len(f"{tower}.vision_model.") :]
        out[key] = tensor
    return out


def normalize_original_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the original LlavaLlamaForCausalLM names (mm_projector, nested towers) onto ours."""
    out = {}
    for name, tensor in state.items():
        key = name
        match = re.match(r"model\.(image|video)_tower\.\1_tower\.(?:vision_model\.)?(.*)", key)
        if match:
            if match.group(2).startswith(
                ("text_model.", "text_projection", "visual_projection", "logit_scale")
            ):
                continue
            key = f"{match.group(1)}_tower.{match.group(2)}"
        elif key.startswith("model.mm_projector."):
            index, param = key[len("model.mm_projector.") :].split(".", 1)
            key = f"multi_modal_projector.linear_{ {'0': 1, '2': 2}[index] }.{param}"
        elif key.startswith("model."):
            key = "language_model." + key
        elif key == "lm_head.weight":
            key = "language_model.lm_head.weight"
        out[key] = tensor
    return out


def tower_keys(state: dict[str, torch.Tensor], tower: str) -> dict[str, torch.Tensor]:
    """Vision weights of a LanguageBind tower folder (`vision_model.*`), renamed for our tower."""
    prefix = "vision_model."
    return {f"{tower}.{k[len(prefix) :]}": v for k, v in state.items() if k.startswith(prefix)}


def _has_temporal(names: Iterable[str]) -> bool:
    return any(".temporal_embedding" in n for n in names)


# ---------------------------------------------------------------- configs

# The tower shape a vision_config of a config.json holds: every VisionConfig field but `num_frames`,
# which the -hf layout keeps outside the vision_config (temporal rows are read from the weights).
_VISION_FIELDS = tuple(f.name for f in dataclasses.fields(VisionConfig) if f.name != "num_frames")


# Defaults of CLIP's vision config class, for fields a config.json leaves out (transformers 4.x
# writes only the fields that differ from them). LanguageBind's vision config class has the same
# defaults for these fields.
_CLIP_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "patch_size": 32,
    "image_size": 224,
    "num_channels": 3,
    "layer_norm_eps": 1e-5,
    "hidden_act": "quick_gelu",
}
# What transformers' VideoLlavaConfig builds when a -hf config.json has no vision_config at all.
_HF_DEFAULT_VISION: dict[str, Any] = {
    **_CLIP_VISION_DEFAULTS,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 14,
}
_POSITIVE_INT_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "patch_size",
    "num_channels",
)
_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh")


def square_image_size(value: Any, source: str) -> int:
    """The tower's input side from `image_size`: an int, or the [height, width] pair LanguageBind writes."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        height, width = value
        if height != width:
            raise CheckpointError(
                f"{source}: image_size {list(value)} is not square; the towers take square inputs only"
            )
        value = height
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointError(
            f"{source}: image_size {value!r} must be a positive integer or a pair of equal ones"
        )
    return value


def vision_config(data: dict[str, Any], source: str) -> VisionConfig:
    """The spatial shape of a tower from a vision_config; temporal modules are the caller's to decide."""
    fields = {**_CLIP_VISION_DEFAULTS, **{k: data[k] for k in _VISION_FIELDS if k in data}}
    fields["image_size"] = square_image_size(fields["image_size"], source)
    for name in _POSITIVE_INT_FIELDS:
        value = fields[name]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise CheckpointError(f"{source}: vision_config.{name} {value!r} must be a positive integer")
    eps = fields["layer_norm_eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise CheckpointError(f"{source}: vision_config.layer_norm_eps {eps!r} must be a number in (0, 1)")
    if fields["hidden_act"] not in _ACTIVATIONS:
        raise CheckpointError(
            f"{source}: vision_config.hidden_act {fields['hidden_act']!r} is not one of {', '.join(_ACTIVATIONS)}"
        )
    if fields["hidden_size"] % fields["num_attention_heads"]:
        raise CheckpointError(
            f"{source}: vision_config.hidden_size {fields['hidden_size']} is not a multiple of "
            f"num_attention_heads {fields['num_attention_heads']}"
        )
    return VisionConfig(**fields, num_frames=0)


def config_from_hf(data: dict[str, Any], has_temporal: bool, source: str = "config.json") -> VideoLlavaConfig:
    if data.get("model_type") != "video_llava":
        raise CheckpointError(
            f"{source}: expected model_type 'video_llava', found {data.get('model_type')!r}"
        )
    layer = data.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise CheckpointError(f"vision_feature_layer {layer!r}: only a single layer is supported")
    if data.get("vision_feature_select_strategy", "default") != "default":
        raise CheckpointError("vision_feature_select_strategy 'full' is not supported")
    ours = data.get("videollava", {})
    vision_data = data.get("vision_config") or _HF_DEFAULT_VISION
    if not isinstance(vision_data, dict):
        raise CheckpointError(f"{source}: vision_config must be an object, found {vision_data!r}")
    vision = vision_config(vision_data, source)
    text_config = dict(data.get("text_config") or {})
    return VideoLlavaConfig(
        vision=vision,
        text_config=text_config,
        temporal_frames=ours.get("temporal_frames", 8) if has_temporal else 0,
        num_frames=ours.get("num_frames", 8),
        vision_feature_layer=layer,
        projector_hidden_act=data.get("projector_hidden_act", "gelu"),
        image_token_id=data.get("image_token_index", HF_IMAGE_TOKEN_ID),
        video_token_id=data.get("video_token_index", HF_VIDEO_TOKEN_ID),
        pad_token_id=data.get("pad_token_id", text_config.get("pad_token_id")),
        image_aspect_ratio=ours.get("image_aspect_ratio", "crop"),
        video_aspect_ratio=ours.get("video_aspect_ratio", "crop"),
        template=ours.get("template", "hf"),
        visual_tokens=_compression(check_budget, ours.get("visual_tokens"), "visual_tokens", source),
        visual_token_layer=_compression(
            functools.partial(check_rank_layer, num_layers=vision.num_hidden_layers),
            ours.get("visual_token_layer"),
            "visual_token_layer",
            source,
        ),
    )


def _compression(check: Callable[..., Any], value: Any, name: str, source: str) -> Any:
    """The checkpoint's default visual-token budget or ranking layer (absent: all patches; the
    feature layer's block)."""
    try:
        return check(value, name=f"videollava.{name}")
    except ValueError as error:
        raise CheckpointError(f"{source}: {error}") from None


def config_to_hf(config: VideoLlavaConfig) -> dict[str, Any]:
    vision = {k: getattr(config.vision, k) for k in _VISION_FIELDS}
    vision["model_type"] = "clip_vision_model"
    text = dict(config.text_config)
    text.setdefault("model_type", "llama")
    return {
        "architectures": ["VideoLlavaForConditionalGeneration"],
        "model_type": "video_llava",
        "image_token_index": config.image_token_id,
        "video_token_index": config.video_token_id,
        "pad_token_id": config.pad_token_id,
        "projector_hidden_act": config.projector_hidden_act,
        "vision_feature_layer": config.vision_feature_layer,
        "vision_feature_select_strategy": "default",
        "image_seq_length": config.image_tokens,
        "video_seq_length": config.video_tokens(config.num_frames),
        "multimodal_projector_bias": True,
        "tie_word_embeddings": False,
        "vision_config": vision,
        "text_config": text,
        # Fields of our own; transformers keeps unknown config fields and otherwise ignores them.
        "videollava": {
            "temporal_frames": config.temporal_frames,
            "num_frames": config.num_frames,
            "image_aspect_ratio": config.image_aspect_ratio,
            "video_aspect_ratio": config.video_aspect_ratio,
            "template": config.template,
        }
        # Written only when set, so an uncompressed model's config.json stays as it was.
        | ({"visual_tokens": config.visual_tokens} if config.visual_tokens is not None else {})
        | (
            {"visual_token_layer": config.visual_token_layer} if config.visual_token_layer is not None else {}
        ),
    }


def _vision_from_languagebind(folder: Path) -> tuple[VisionConfig, int]:
    """A LanguageBind tower folder's vision shape and its temporal rows (0: no temporal modules).

    As in LanguageBind's modeling code, `add_time_attn` alone decides whether the layers have
    temporal modules, with `num_frames` rows of temporal embedding; an image tower says
    `add_time_attn` false and keeps `num_frames` 1.
    """
    file = folder / "config.json"
    vision = read_json(file).get("vision_config")
    if not isinstance(vision, dict) or not vision:
        raise CheckpointError(f"{file}: no vision_config (not a LanguageBind tower folder?)")
    shape = vision_config(vision, str(file))
    add_time_attn = vision.get("add_time_attn", False)
    if not isinstance(add_time_attn, bool):
        raise CheckpointError(f"{file}: vision_config.add_time_attn {add_time_attn!r} must be true or false")
    if not add_time_attn:
        return shape, 0
    frames = vision.get("num_frames", 1)
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise CheckpointError(f"{file}: vision_config.num_frames {frames!r} must be a positive integer")
    return shape, frames


def _read_tower_weights(folder: Path, tower: str) -> dict[str, torch.Tensor]:
    """The vision weights of a LanguageBind tower folder, renamed for our `tower`."""
    state = read_state_dict(folder, keep=lambda k: k.startswith("vision_model."))
    adapters = [k for k in state if ".lora_" in k or ".base_model.model." in k]
    if adapters:
        raise CheckpointError(
            f"{folder}: the weights hold unmerged LoRA adapters ({adapters[0]}, ...); "
            "use a folder with the LoRA merged into the weights, such as LanguageBind/LanguageBind_Video_merge"
        )
    return tower_keys(state, tower)


def _shape_differences(image: VisionConfig, video: VisionConfig) -> list[str]:
    return [
        f"{name} {getattr(image, name)} vs {getattr(video, name)}"
        for name in _VISION_FIELDS
        if getattr(image, name) != getattr(video, name)
    ]


def config_from_original(
    data: dict[str, Any], image_vision: VisionConfig, temporal_frames: int
) -> VideoLlavaConfig:
    if data.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise CheckpointError(
            f"mm_projector_type {data.get('mm_projector_type')!r}: only mlp2x_gelu is supported"
        )
    if data.get("mm_vision_select_feature", "patch") != "patch":
        raise CheckpointError("mm_vision_select_feature must be 'patch'")
    llama_fields = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "rms_norm_eps",
        "vocab_size",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "hidden_act",
        "tie_word_embeddings",
        "rope_theta",
        "rope_scaling",
        "attention_bias",
        "initializer_range",
    )
    text = {k: data[k] for k in llama_fields if k in data}
    text["model_type"] = "llama"
    return VideoLlavaConfig(
        vision=image_vision,
        text_config=text,
        temporal_frames=temporal_frames,
        num_frames=temporal_frames or 8,
        vision_feature_layer=data.get("mm_vision_select_layer", -2),
        image_token_id=IMAGE_SLOT,
        video_token_id=VIDEO_SLOT,
        pad_token_id=data.get("pad_token_id", 0),
        image_aspect_ratio=data.get("image_aspect_ratio", "pad")
        if data.get("image_aspect_ratio") == "pad"
        else "crop",
        template="llava_v1",
    )


# ---------------------------------------------------------------- building


def build_model(
    config: VideoLlavaConfig,
    state: dict[str, torch.Tensor],
    dtype: torch.dtype,
    source: str,
    device: torch.device | str = "cpu",
) -> VideoLlava:
    """Construct on the meta device and assign the checkpoint's tensors; every parameter must be present.

    Each tensor goes from the (memory-mapped) file to `device` in one copy, cast there, so the
    weights are never materialised twice on the CPU.
    """
    with torch.device("meta"):
        model = VideoLlava(config)
    expected = set(model.state_dict().keys())
    missing = sorted(expected - state.keys())
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{source}: weights missing for {shown}")
    for name, param in model.state_dict().items():
        if state[name].shape != param.shape:
            raise CheckpointError(
                f"{source}: {name} has shape {tuple(state[name].shape)}, the config expects {tuple(param.shape)}"
            )
    state = {
        k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
        for k, v in state.items()
        if k in expected
    }
    model.load_state_dict(state, assign=True, strict=True)
    _materialize_buffers(model, torch.device(device))
    return model.eval()


def _materialize_buffers(model: VideoLlava, device: torch.device) -> None:
    """Non-persistent buffers (the LLM's rotary frequencies) are not in checkpoints: rebuild them."""
    for module_name, module in model.named_modules():
        for buffer_name, buffer in list(module.named_buffers(recurse=False)):
            if not buffer.is_meta:
                continue
            if hasattr(module, "rope_init_fn") or buffer_name in ("inv_freq", "original_inv_freq"):
                fresh = type(module)(config=model.language_model.config)
                for name, value in fresh.named_buffers(recurse=False):
                    module.register_buffer(name, value.to(device), persistent=False)
                break
            raise CheckpointError(f"buffer {module_name}.{buffer_name} was not initialised")


def detect_layout(folder: Path) -> str:
    data = read_json(folder / "config.json")
    if data.get("model_type") == "video_llava":
        return "hf"
    if data.get("model_type") in ("llava", "llava_llama") or "LlavaLlamaForCausalLM" in data.get(
        "architectures", []
    ):
        return "original"
    raise CheckpointError(
        f"{folder / 'config.json'}: model_type {data.get('model_type')!r} is neither a Video-LLaVA -hf checkpoint "
        "('video_llava') nor an original Video-LLaVA checkpoint ('llava')"
    )


def load_hf(folder: Path, dtype: torch.dtype, device: torch.device | str = "cpu") -> VideoLlava:
    names = read_key_names(folder)
    config = config_from_hf(
        read_json(folder / "config.json"), _has_temporal(names), str(folder / "config.json")
    )
    state = normalize_hf_keys(read_state_dict(folder))
    if config.temporal_frames:
        rows = next(v for k, v in state.items() if k.endswith("temporal_embedding")).shape[1]
        config.temporal_frames = rows
    return build_model(config, state, dtype, str(folder), device)


def _tower_folder(reference: str, base: Path) -> Path:
    local = Path(reference).expanduser()
    if not local.is_absolute():
        beside = base / reference
        if beside.is_dir():
            return beside
    return resolve(reference)


def load_original(folder: Path, dtype: torch.dtype, device: torch.device | str = "cpu") -> VideoLlava:
    data = read_json(folder / "config.json")
    state = normalize_original_keys(read_state_dict(folder))
    has_image = any(k.startswith("image_tower.") for k in state)
    has_video = any(k.startswith("video_tower.") for k in state)
    image_ref, video_ref = data.get("mm_image_tower"), data.get("mm_video_tower")
    if not image_ref or not video_ref:
        raise CheckpointError(f"{folder / 'config.json'}: mm_image_tower and mm_video_tower must both be set")
    image_folder = _tower_folder(image_ref, folder)
    video_folder = _tower_folder(video_ref, folder)
    image_vision, frames = _tower_shapes(image_folder, video_folder)
    if not has_image:
        state.update(_read_tower_weights(image_folder, "image_tower"))
    if not has_video:
        state.update(_read_tower_weights(video_folder, "video_tower"))
    _check_temporal_weights(video_folder, frames, state)
    config = config_from_original(data, image_vision, frames)
    return build_model(config, state, dtype, str(folder), device)


def _tower_shapes(image_folder: Path, video_folder: Path) -> tuple[VisionConfig, int]:
    """The towers' shared shape and the video tower's temporal rows, from two LanguageBind tower folders."""
    image_vision, image_frames = _vision_from_languagebind(image_folder)
    video_vision, frames = _vision_from_languagebind(video_folder)
    if image_frames:
        raise CheckpointError(
            f"{image_folder / 'config.json'}: vision_config.add_time_attn is true, but the image tower "
            "has no temporal modules (is this a video tower folder?)"
        )
    differences = _shape_differences(image_vision, video_vision)
    if differences:
        raise CheckpointError(
            f"{video_folder / 'config.json'}: the video tower's shape differs from the image tower's "
            f"({image_folder / 'config.json'}): {', '.join(differences)}"
        )
    return image_vision, frames


def _check_temporal_weights(video_folder: Path, frames: int, state: dict[str, torch.Tensor]) -> None:
    if frames and not _has_temporal(state):
        raise CheckpointError(
            f"{video_folder}: config.json says add_time_attn but no temporal weights were found"
        )


def load_from_parts(
    image_tower: str | os.PathLike,
    video_tower: str | os.PathLike,
    llm: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | None = None,
    architecture: tuple[VisionConfig, LLMConfig] | None = None,
    architecture_key: str = "architecture",
    projector_seed: int = 0,
    **options: Any,
) -> tuple[VideoLlava, PreTrainedTokenizerBase]:
    """A trainable float32 model from LanguageBind image / video tower folders plus a LLaMA-family LLM
    folder, with a fresh projector drawn from `projector_seed`; and the tokenizer it uses.

    `tokenizer` defaults to the LLM folder's own. `architecture`, the shape the parts are declared to
    have, is compared with the weights' before anything large is read; a difference names the field
    under `architecture_key`. `options` are further VideoLlavaConfig fields (frames, feature layer,
    aspect ratios, template); the video tower's own temporal rows win over `temporal_frames`.
    """
    image_folder, video_folder, llm_folder = resolve(image_tower), resolve(video_tower), resolve(llm)
    vision, frames = _tower_shapes(image_folder, video_folder)
    llm_config = _llm_config(read_json(llm_folder / "config.json"))
    if architecture is not None:
        _check_architecture(architecture, (vision, llm_config), architecture_key)
    tokenizer_source = resolve(tokenizer) if tokenizer else llm_folder
    try:
        loaded_tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_source))
    except Exception as error:
        raise CheckpointError(f"{tokenizer or llm_folder}: no usable tokenizer ({error})") from None
    if loaded_tokenizer.pad_token_id is None:
        loaded_tokenizer.pad_token = loaded_tokenizer.unk_token  # as Video-LLaVA does for LLaMA's tokenizer
    vocab_size = llm_config.vocab_size or len(loaded_tokenizer)
    config = model_config(vision, llm_config, vocab_size, loaded_tokenizer, **options)
    config.temporal_frames = frames
    state = _read_tower_weights(image_folder, "image_tower")
    state.update(_read_tower_weights(video_folder, "video_tower"))
    _check_temporal_weights(video_folder, frames, state)
    state.update({f"language_model.{k}": v for k, v in read_state_dict(llm_folder).items()})
    with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
        torch.manual_seed(projector_seed)
        projector = Projector(config.vision.hidden_size, llm_config.hidden_size, config.projector_hidden_act)
    state.update({f"multi_modal_projector.{k}": v for k, v in projector.state_dict().items()})
    model = build_model(config, state, torch.float32, f"{image_folder} + {video_folder} + {llm_folder}")
    return model.train(), loaded_tokenizer


def _llm_config(data: dict[str, Any]) -> LLMConfig:
    """The LLaMA shape of an LLM folder's config.json; fields it leaves out or sets to null keep their defaults."""
    known = {f.name for f in dataclasses.fields(LLMConfig)}
    return LLMConfig(**{k: v for k, v in data.items() if k in known and v is not None})


def _check_architecture(
    declared: tuple[VisionConfig, LLMConfig], found: tuple[VisionConfig, LLMConfig], key: str
) -> None:
    """Every field the declaration and the weights both set agrees (the init scale is no shape)."""
    for label, want_config, got_config in zip(("vision", "llm"), declared, found, strict=True):
        for f in dataclasses.fields(want_config):
            want, got = getattr(want_config, f.name), getattr(got_config, f.name)
            if f.name != "initializer_range" and None not in (want, got) and want != got:
                raise CheckpointError(f"{key}.{label}.{f.name} is {want!r} but the weights have {got!r}")


def load_weights(
    path_or_id: str | os.PathLike, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> tuple[VideoLlava, Path]:
    folder = resolve(path_or_id)
    layout = detect_layout(folder)
    load = load_hf if layout == "hf" else load_original
    model = load(folder, dtype, device)
    return model, folder


# ---------------------------------------------------------------- saving


def save_weights(model: VideoLlava, out_dir: str | os.PathLike, shard_bytes: int = SHARD_BYTES) -> None:
    """config.json and safetensors in the -hf layout; temporal weights ride along under their own names."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config_to_hf(model.config), indent=2) + "\n")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
