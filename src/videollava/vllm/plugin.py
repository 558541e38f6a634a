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
from videollava.errors import VideoLlavaError
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
    from vllm import ModelRegistry

    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    if not supported_release():
        # Loading such a checkpoint stops at the model's import with the full message; a server of
        # another model must not fail because this package is installed, so nothing else is touched.
        import vllm

        _log.warning("videollava: vLLM %s is not supported (needs %s)", vllm.__version__, SUPPORTED_VLLM_TEXT)
        return
    from vllm.transformers_utils.chat_templates.registry import register_chat_template_fallback_path

    from videollava.vllm.media import register_video_loader

    register_video_loader()
    register_chat_template_fallback_path(MODEL_TYPE, template_path_for)


def supported_release() -> bool:
    """Whether the installed vLLM is in the tested range (an unreadable version is not)."""
    low, high = SUPPORTED_VLLM
    try:
        return low <= vllm_version() < high
    except VideoLlavaError:
        return False


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
