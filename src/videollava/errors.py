"""Errors that users see: each names the file or input at fault and what is wrong with it."""

from __future__ import annotations

from pathlib import Path


class VideoLlavaError(Exception):
    """Base class of every error this package raises on purpose."""


class MediaError(VideoLlavaError):
    """An image or video that cannot be used, with the file named."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class PromptError(VideoLlavaError):
    """A prompt that does not fit its media or the model's context."""


class CheckpointError(VideoLlavaError):
    """A checkpoint folder or file that is missing, of an unknown layout, or does not fit the model."""


class RequestCancelled(VideoLlavaError):
    """The caller went away (or gave up) while its request was being prepared; the work was stopped."""
