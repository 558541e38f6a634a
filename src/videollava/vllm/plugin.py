"""The vLLM plugin (entry point group `vllm.general_plugins`): run in every vLLM process, any number of times.

It registers the model under the architecture name -hf checkpoints carry, our video loader, and
the chat template for checkpoints that carry none (the one `videollava serve` uses for them:
`config.json`'s own template name when we saved it, else the -hf port's).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

from videollava.data.chat_template import chat_template
from videollava.vllm import SUPPORTED_VLLM, SUPPORTED_VLLM_TEXT, vllm_version

ARCHITECTURE = "VideoLlavaForConditionalGeneration"
MODEL_CLASS = "videollava.vllm.model:VideoLlavaForConditionalGeneration"
MODEL_TYPE = "video_llava"

_log = logging.getLogger(__name__)
_registered = False


def register() -> None:
    """Make vLLM serve Video-LLaVA checkpoints; a second call in one process does nothing."""
    global _registered
    if _registered:
        return
    _registered = True
    low, high = SUPPORTED_VLLM
    if not low <= vllm_version() < high:
        # The model's import stops with the full message if such a checkpoint is actually loaded;
        # a server of another model must not fail because this package is installed.
        _log.warning(
            "videollava: vLLM %s is not supported (needs %s)",
            ".".join(map(str, vllm_version())),
            SUPPORTED_VLLM_TEXT,
        )
    from vllm import ModelRegistry
    from vllm.transformers_utils.chat_templates.registry import register_chat_template_fallback_path

    from videollava.vllm.media import register_video_loader

    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    register_video_loader()
    register_chat_template_fallback_path(MODEL_TYPE, template_path_for)


def template_name_for(model: str) -> str:
    """The prompt template `videollava serve` uses for the checkpoint at `model`."""
    from videollava.vllm.config import local_folder

    folder = local_folder(model)
    if folder is not None and (folder / "config.json").exists():
        ours = json.loads((folder / "config.json").read_text()).get("videollava") or {}
        return ours.get("template", "hf")
    return "hf"


def template_path_for(model: str) -> Path:
    """A file holding the checkpoint's chat template (vLLM's fallback takes a path), written once."""
    text = chat_template(template_name_for(model))
    folder = Path(tempfile.gettempdir()) / "videollava-chat-templates"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.jinja"
    if not path.exists():
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(text)
        partial.replace(path)
    return path
