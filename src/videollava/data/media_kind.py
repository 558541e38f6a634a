"""What kind of media a file holds, judged by its content rather than its name.

PIL is asked first (a still picture or an animated GIF / WebP / PNG), then PyAV (a video
container). The answers here also turn a refusal by either library into a message that says
what the file is instead.
"""

from __future__ import annotations

import av
import av.error
from PIL import Image, UnidentifiedImageError

from videollava.data.media_source import RewindableSource

# Formats PIL opens that may hold several frames; only these count as videos when animated
# (a multi-frame MPO from a camera or a multi-page TIFF is still a photo).
ANIMATED_FORMATS = frozenset({"GIF", "PNG", "WEBP"})
# Formats PIL identifies but cannot treat as a picture.
NOT_IMAGE_FORMATS = frozenset({"MPEG"})
# Signatures of containers: when PyAV rejects such a file it is damaged, not of an unknown kind.
_CONTAINER_MAGIC = (
    (4, b"ftyp"),  # mp4 / mov
    (4, b"moov"),
    (4, b"mdat"),
    (0, b"\x1a\x45\xdf\xa3"),  # matroska / webm
    (0, b"RIFF"),  # avi
    (0, b"OggS"),
    (0, b"FLV"),
)


def picture_frame_count(img: Image.Image) -> int:
    """Frames PIL sees in a picture; a damaged frame table counts as one frame."""
    try:
        return int(getattr(img, "n_frames", 1))
    except (OSError, SyntaxError, ValueError, EOFError):
        return 1


def sniff_picture(src: RewindableSource) -> str | None:
    """'still' or 'animated' if PIL recognises the content, else None."""
    try:
        with Image.open(src.open()) as img:
            if img.format in NOT_IMAGE_FORMATS:
                return None
            animated = img.format in ANIMATED_FORMATS and picture_frame_count(img) > 1
            return "animated" if animated else "still"
    except Image.DecompressionBombError:
        return "still"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        return None


def video_streams(container: av.container.InputContainer) -> list[av.video.stream.VideoStream]:
    """Video streams, without cover art (an mp3's album picture is not a video)."""
    attached = av.stream.Disposition.attached_pic
    return [s for s in container.streams.video if not (s.disposition & attached)]


def is_picture_demuxer(container: av.container.InputContainer) -> bool:
    """True when FFmpeg reads the file as a still picture (its one-frame "video" is not a video)."""
    fmt = container.format.name
    return fmt == "image2" or fmt.endswith("_pipe")


def has_container_signature(src: RewindableSource) -> bool:
    """True if the file starts like a video container, so a parse failure means it is damaged."""
    head = src.head()
    return any(head[o : o + len(m)] == m for o, m in _CONTAINER_MAGIC)


def not_an_image_problem(src: RewindableSource) -> str:
    """Why PIL could not read a picture: it is a video, or nothing recognisable."""
    try:
        with av.open(src.open(), mode="r") as container:
            # FFmpeg reads a damaged picture as a one-frame "video" of an image format.
            if video_streams(container) and not is_picture_demuxer(container):
                return "not an image: it is a video"
    except (av.error.FFmpegError, OSError, ValueError):
        pass
    return "not an image file (unrecognised format, or corrupt)"
