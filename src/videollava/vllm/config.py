"""What vLLM's view of a checkpoint (its transformers config and folder) means in our terms.

vLLM reads config.json with transformers; `model_config` turns that back into our
`VideoLlavaConfig` with the same rules as `videollava ask` (`checkpoint.config_from_hf`), and
tells whether the video tower has temporal modules: our saved config says so, and for a folder
written elsewhere the weights' names say so (read from the safetensors headers, not the tensors).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from videollava.data.transforms import ImageTransformConfig
from videollava.errors import CheckpointError
from videollava.model.bundle import read_transform
from videollava.model.checkpoint import config_from_hf
from videollava.model.videollava import VideoLlavaConfig


@dataclass(frozen=True)
class ServedModel:
    """Our config of the checkpoint vLLM serves and its preprocessing."""

    config: VideoLlavaConfig
    transform: ImageTransformConfig

    @property
    def image_tokens(self) -> int:
        return self.config.image_tokens

    @property
    def frame_tokens(self) -> int:
        return self.config.video_tokens(1)


def local_folder(model: str) -> Path | None:
    """The checkpoint's folder: a local path as is, a hub id's already-downloaded snapshot, else None."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=model, local_files_only=True))
    except Exception:  # not a hub id, or not in the cache: the caller falls back to the config
        return None


def temporal_rows(folder: Path | None) -> int:
    """Rows of the temporal embedding the folder's weights hold; 0 when they have none."""
    if folder is None:
        return 0
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        names = [(name, folder / file) for name, file in weight_map.items()]
    else:
        files = sorted(folder.glob("*.safetensors"))
        names = []
        for file in files:
            with safe_open(str(file), "pt") as handle:
                names += [(name, file) for name in handle.keys()]
    for name, file in names:
        if name.endswith(".temporal_embedding"):
            with safe_open(str(file), "pt") as handle:
                return int(handle.get_slice(name).get_shape()[1])  # (1, T, D)
    return 0


def served_model(hf_config: Any, model: str) -> ServedModel:
    """Our config and preprocessing for the checkpoint `model` (a folder or hub id) vLLM loaded as `hf_config`."""
    data = hf_config.to_dict()
    ours = data.get("videollava") or {}
    folder = local_folder(model)
    rows = ours["temporal_frames"] if "temporal_frames" in ours else temporal_rows(folder)
    config = config_from_hf(data, has_temporal=rows > 0, source=f"{model}/config.json")
    config.temporal_frames = rows
    if config.image_token_id < 0 or config.video_token_id < 0:
        raise CheckpointError(
            f"{model}: the tokenizer has no <image> / <video> tokens (an original-layout model); "
            "run `videollava convert` on it first"
        )
    if folder is not None:
        transform = read_transform(folder, config)
    else:
        size = config.vision.image_size
        transform = ImageTransformConfig(
            size=size,
            crop_size=size,
            image_aspect_ratio=config.image_aspect_ratio,
            video_aspect_ratio=config.video_aspect_ratio,
        )
    return ServedModel(config, transform)
