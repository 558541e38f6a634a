"""What decoding one image or video may cost, whatever its file claims.

Pictures and frames over a pixel limit are refused before they are decoded, decoding stops after a
number of frames or seconds, and a caller may stop it between frames (``cancelled``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from videollava.errors import MediaError, RequestCancelled

# Asked between frames; True stops the work with RequestCancelled.
Cancelled = Callable[[], bool]


@dataclass(frozen=True)
class DecodeLimits:
    """How much one image or video may cost to decode, whatever its file claims.

    The defaults lie beyond what ordinary media reach on a 2-core CPU and stop files built to be
    expensive; the decode rates they were chosen against are in reports/decode-limits.md.
    """

    max_pixels: int = 8192 * 8192  # per still image or video frame, as decoded
    # PIL keeps several full canvases of an animation (the frame, the previous one, the disposal).
    max_animation_pixels: int = 4096 * 4096
    max_frames: int = 100_000  # frames decoded (scanned) for one item, including skipped ones
    max_seconds: float = 60.0  # wall-clock decoding time for one item

    def __post_init__(self) -> None:
        if min(self.max_pixels, self.max_animation_pixels, self.max_frames) < 1 or not self.max_seconds > 0:
            raise ValueError(f"decode limits must be positive: {self}")


def raise_if_cancelled(cancelled: Cancelled | None, what: str) -> None:
    """Stop with RequestCancelled when the caller has gone away."""
    if cancelled is not None and cancelled():
        raise RequestCancelled(f"cancelled while {what}")


class DecodeBudget:
    """Frames and seconds spent decoding one item, checked between frames."""

    def __init__(self, name: str, limits: DecodeLimits, cancelled: Cancelled | None):
        self.name = name
        self.limits = limits
        self.cancelled = cancelled
        self.frames = 0
        self.start = time.monotonic()

    def check(self) -> None:
        raise_if_cancelled(self.cancelled, f"decoding {self.name}")
        seconds = time.monotonic() - self.start
        if self.frames > self.limits.max_frames or seconds > self.limits.max_seconds:
            raise MediaError(
                self.name,
                f"decoding stopped after {self.frames} frames / {seconds:.1f} s: more work than one media "
                f"item may cost (limits: {self.limits.max_frames} frames, {self.limits.max_seconds:g} s)",
            )

    def tick(self) -> None:
        """One more frame decoded."""
        self.frames += 1
        self.check()


def check_pixels(name: str, width: int, height: int, limit: int, what: str) -> None:
    """Refuse a picture or frame by its declared size, before any memory is spent decoding it."""
    if width * height > limit:
        raise MediaError(
            name,
            f"{what} too large: {width} x {height} = {width * height:,} pixels, over the limit of {limit:,}",
        )
