"""Optional dependencies: the Gradio page (`web`) and the training tools (`train`) are extras.

A command that needs an extra imports it before any work (loading a model, generating data), so
a missing package ends in one line naming the pip command that installs it, not in a traceback
minutes later.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from videollava.errors import VideoLlavaError


class MissingDependencyError(VideoLlavaError):
    """A package that a command needs is not installed."""


def install_hint(extra: str | None) -> str:
    """The pip command that installs what `extra` adds (None: the base install)."""
    return f"pip install 'videollava[{extra}]'" if extra else "pip install videollava"


def missing_dependency(command: str, package: str, extra: str | None) -> MissingDependencyError:
    return MissingDependencyError(
        f"`videollava {command}` needs the {package} package, which is not installed; "
        f"install it with: {install_hint(extra)}"
    )


def require(command: str, extra: str | None, *modules: str) -> list[ModuleType]:
    """Import `modules` now, or raise the one-line error that names the extra to install."""
    imported = []
    for name in modules:
        try:
            imported.append(importlib.import_module(name))
        except ModuleNotFoundError as error:
            # `error.name` is the module that was missing: the package itself or one of its own
            # dependencies; installing the extra brings either.
            raise missing_dependency(command, error.name or name, extra) from None
    return imported
