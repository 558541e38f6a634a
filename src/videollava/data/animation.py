"""Animated GIF / WebP / PNG read as video clips, frame by frame within the decode limits."""

from __future__ import annotations

from PIL import Image

from videollava.data.decode_limits import DecodeBudget, check_pixels
from videollava.data.frame_sampling import FrameShaper, SampledFrames, VideoClip, frame_indices
from videollava.data.images import Shrink, bomb_error
from videollava.data.media_kind import picture_frame_count
from videollava.data.media_source import RewindableSource
from videollava.errors import MediaError


def read_animated_image(
    src: RewindableSource, num_frames: int, shrink: Shrink | None, budget: DecodeBudget
) -> VideoClip:
    """Frames of an animated GIF / WebP / PNG, composited by PIL (disposal, transparency).

    PIL composites every frame up to the last one wanted; it is asked for one frame at a time so
    that the budget is checked, and each frame's canvas size before that frame is loaded.
    """
    limit = budget.limits.max_animation_pixels
    try:
        with Image.open(src.open()) as img:
            n = picture_frame_count(img)
            clip = SampledFrames(frame_indices(n, num_frames).tolist())
            shaper = FrameShaper(src.name, shrink, limit)
            for i in range(clip.wanted()[-1] + 1):
                if i:
                    img.seek(i)
                budget.tick()
                check_pixels(src.name, img.width, img.height, limit, f"animation frame {i}")
                if i in clip:
                    clip.put(i, shaper.picture(img))
    except Image.DecompressionBombError as e:
        raise bomb_error(src.name, e, limit, "animation frame") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise MediaError(src.name, f"truncated or corrupt animation ({e})") from None
    assert clip.array is not None
    return VideoClip(clip.array, n)
