"""Still images decoded to upright 8-bit RGB, with their cost bounded.

Pictures over the pixel limit are refused before they are decoded. With ``shrink``, a picture much
larger than the model needs is made smaller while still 8-bit (by the JPEG decoder itself, or by a
box filter), so it never exists at full resolution in a wider type; 16-bit and float pictures are
brought to 8 bits a strip at a time for the same reason.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from videollava.data.decode_limits import Cancelled, DecodeLimits, check_pixels, raise_if_cancelled
from videollava.data.media_kind import (
    ANIMATED_FORMATS,
    NOT_IMAGE_FORMATS,
    not_an_image_problem,
    picture_frame_count,
)
from videollava.data.media_source import MediaSource, RewindableSource, rewindable_source
from videollava.errors import MediaError

# (height, width) of a decoded picture -> the integer its sides may be divided by before use (1 keeps
# every pixel). It must not depend on which side is which: EXIF may turn a photo after decoding.
Shrink = Callable[[int, int], int]

# Deep (16-bit, 32-bit, float) pictures are brought to 8 bits this many pixels at a time.
_STRIP_PIXELS = 1 << 22
# PIL modes that `Image.reduce` works on; others become RGB first.
_REDUCIBLE_MODES = frozenset({"L", "LA", "La", "RGB", "RGBA", "RGBa", "CMYK"})
_DEEP_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})


def bomb_error(name: str, error: Exception, limit: int, what: str = "image") -> MediaError:
    """PIL's own decompression-bomb refusal (far over our limit), restated with the pixel count."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    count = f"{int(found.group(1)):,} pixels" if found else "more pixels than PIL decodes safely"
    return MediaError(name, f"{what} too large: {count}, over the limit of {limit:,}")


def _deep_to_l(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float grey -> 8-bit "L", scaled rather than clipped.

    Converted a strip of rows at a time, so a large picture never has a full-size wider copy.
    """
    width, height = img.size
    rows = max(1, _STRIP_PIXELS // max(1, width))
    strips = [(0, y, width, min(height, y + rows)) for y in range(0, height, rows)]
    out = np.empty((height, width), np.uint8)
    if img.mode == "F":
        top = -np.inf
        for box in strips:
            strip = np.asarray(img.crop(box))
            top = max(top, float(np.max(strip, initial=-np.inf, where=~np.isnan(strip))))
        scale = 255.0 if height * width and top <= 1.0 else 1.0
        for box in strips:
            strip = np.nan_to_num(np.asarray(img.crop(box)).astype(np.float64) * scale)
            out[box[1] : box[3]] = np.clip(np.rint(strip), 0, 255).astype(np.uint8)
    else:
        deep = img.mode.startswith("I;16") or (img.getextrema()[1] or 0) > 255  # type: ignore[index]
        scale = 255.0 / (65535.0 if deep else 255.0)
        for box in strips:
            strip = np.asarray(img.crop(box)).astype(np.float64)
            out[box[1] : box[3]] = np.clip(np.rint(strip * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(out, "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB whatever the mode, so pixels mean the same thing for every input.

    Transparency is composited on white (a transparent logo on black would turn into a black
    square); 16-bit and float images are scaled rather than clipped.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _DEEP_MODES:
        return _deep_to_l(img).convert("RGB")
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _upright(img: Image.Image) -> Image.Image:
    """Apply EXIF orientation; a malformed EXIF block leaves the picture as stored."""
    try:
        turned = ImageOps.exif_transpose(img)
    except Exception:  # broken EXIF must not make a readable photo unusable
        return img
    return turned if turned is not None else img


def divided_size(size: tuple[int, int], factor: int) -> tuple[int, int]:
    """(width, height) divided by factor, rounded up as `Image.reduce` does."""
    return -(-size[0] // factor), -(-size[1] // factor)


def shrink_divisor(shrink: Shrink | None, width: int, height: int) -> int:
    """The factor `shrink` allows for a picture of this size; 1 without `shrink`."""
    return max(1, int(shrink(height, width))) if shrink is not None else 1


def reduce_picture(img: Image.Image, factor: int) -> Image.Image:
    """A box-filtered copy `factor` times smaller, still 8-bit."""
    if factor == 1:
        return img
    if img.mode not in _REDUCIBLE_MODES:
        img = to_rgb(img)
    return img.reduce(factor)


def load_image(
    source: MediaSource,
    *,
    name: str | None = None,
    shrink: Shrink | None = None,
    limits: DecodeLimits | None = None,
    cancelled: Cancelled | None = None,
) -> Image.Image:
    """Read a still image as upright 8-bit RGB; animated images are refused (read them as videos).

    With ``shrink``, a picture much larger than needed comes back smaller (see `Shrink`).
    """
    src = rewindable_source(source, name)
    raise_if_cancelled(cancelled, f"reading {src.name}")
    return decode_still_image(src, shrink, limits or DecodeLimits())


def decode_still_image(src: RewindableSource, shrink: Shrink | None, limits: DecodeLimits) -> Image.Image:
    """`load_image` for a source already checked to be readable."""
    try:
        img = Image.open(src.open())
    except Image.DecompressionBombError as e:
        raise bomb_error(src.name, e, limits.max_pixels) from None
    except UnidentifiedImageError:
        raise MediaError(src.name, not_an_image_problem(src)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise MediaError(src.name, f"truncated or corrupt image ({e})") from None
    with img:
        if img.format in NOT_IMAGE_FORMATS:
            raise MediaError(src.name, not_an_image_problem(src))
        n = picture_frame_count(img)
        if img.format in ANIMATED_FORMATS and n > 1:
            raise MediaError(
                src.name, f"not a still image: animated {img.format} with {n} frames (read it as a video)"
            )
        factor = shrink_divisor(shrink, *img.size)
        if factor > 1:
            # JPEG decodes straight to 1/2, 1/4 or 1/8 of its size; other formats ignore this.
            img.draft(None, (max(1, img.width // factor), max(1, img.height // factor)))
        check_pixels(src.name, img.width, img.height, limits.max_pixels, "image")
        try:
            img.load()
            picture = _deep_to_l(img) if img.mode in _DEEP_MODES else img
            picture = reduce_picture(picture, shrink_divisor(shrink, *picture.size))
            return to_rgb(_upright(picture))
        except Image.DecompressionBombError as e:
            raise bomb_error(src.name, e, limits.max_pixels) from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise MediaError(src.name, f"truncated or corrupt image ({e})") from None
