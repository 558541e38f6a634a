"""ShapesWorld rendering: a scene drawn pixel by pixel, written as PNG, JPEG or H.264 MP4.

The contrast rule, in CIEDE2000 (ΔE00, CIELAB under D65) on the pixels as drawn, before lossy
encoding:

1. every object's colour stays at least `CONTRAST_MIN_DELTA_E` (25) away from every background
   pixel under it and around it: the pixels whose centres lie within its largest bounding disc
   (size / sqrt(2), whatever its shape, so a shape twin keeps the rule) plus
   `contrast_margin(size)` (max(3 px, size / 4)) of any point of its path;
2. no background pixel anywhere comes within `BACKDROP_MIN_DELTA_E` (12) of any colour of the
   world, so that no part of a backdrop can pass for an object.

The wider world's generator draws backdrops and colours until both hold (`meets_contrast_rule`).
The standard world's palette against its greys (levels 58 to 202 with the noise) is at least
27.7 apart, so the rule asks of the new backdrops only what the standard world always had.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from videollava.errors import VideoLlavaError
from videollava.shapesworld.backdrops import delta_e2000, srgb_to_lab
from videollava.shapesworld.world import COLORS, Scene, SceneObject

JPEG_QUALITY = 90
VIDEO_CRF = 20
VIDEO_PRESET = "veryfast"
# Without cpu-independent, x264 (one thread, identical input) now and then encoded the same scene
# differently from run to run (about one video in twenty); with it, runs repeat bit for bit.
X264_PARAMS = "cpu-independent=1"

CONTRAST_MIN_DELTA_E = 25.0
BACKDROP_MIN_DELTA_E = 12.0
_PALETTE_LAB = {name: srgb_to_lab(rgb) for name, rgb in COLORS.items()}


def contrast_margin(size: float) -> float:
    """How far around an object (in pixels, beyond its bounding disc) the contrast rule looks."""
    return max(3.0, 0.25 * size)


def background_pixels(scene: Scene) -> np.ndarray:
    """(H, W, 3) uint8: the scene's background alone, as every frame draws it."""
    return _background(scene)


def _background(scene: Scene) -> np.ndarray:
    if scene.backdrop is not None:
        return scene.backdrop.pixels(scene.width, scene.height)
    canvas = np.full((scene.height, scene.width), scene.background, dtype=np.int16)
    if scene.noise:
        noise_rng = np.random.default_rng(scene.noise_seed)
        canvas += noise_rng.integers(-scene.noise, scene.noise + 1, size=canvas.shape, dtype=np.int16)
    grey = np.clip(canvas, 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def _draw(canvas: np.ndarray, obj: SceneObject, centre: tuple[float, float]) -> None:
    height, width = canvas.shape[:2]
    cx, cy = centre
    half = obj.size / 2
    x0, x1 = max(0, int(math.floor(cx - half))), min(width, int(math.ceil(cx + half)) + 1)
    y0, y1 = max(0, int(math.floor(cy - half))), min(height, int(math.ceil(cy + half)) + 1)
    if x0 >= x1 or y0 >= y1:
        return
    # Pixel (i, j) covers [j, j+1) x [i, i+1); sample it at its centre.
    px = np.arange(x0, x1, dtype=np.float64)[None, :] + 0.5 - cx
    py = np.arange(y0, y1, dtype=np.float64)[:, None] + 0.5 - cy
    if obj.shape == "circle":
        mask = px * px + py * py <= half * half
    elif obj.shape == "square":
        mask = (np.abs(px) <= half) & (np.abs(py) <= half)
    elif obj.shape == "triangle":
        # apex at the top, base at the bottom; the half width grows from 0 to size/2 downwards
        mask = (py <= half) & (np.abs(px) <= (py + half) / 2)
    else:
        raise VideoLlavaError(f"unknown shape {obj.shape!r}")
    canvas[y0:y1, x0:x1][mask] = COLORS[obj.color]


def render_array(scene: Scene, frame_index: int, background: np.ndarray | None = None) -> np.ndarray:
    """(H, W, 3) uint8 frame; a video passes its ``background`` once drawn, since the noise never moves."""
    canvas = (_background(scene) if background is None else background).copy()
    t = scene.time(frame_index)
    for obj in scene.objects:
        if obj.visible(t):
            _draw(canvas, obj, obj.center(t))
    return canvas


def surroundings(scene: Scene, obj: SceneObject) -> np.ndarray:
    """(H, W) bool: the pixels the contrast rule compares ``obj``'s colour with, over its whole path."""
    mask = np.zeros((scene.height, scene.width), dtype=bool)
    window, inside = _surroundings_window(scene, obj)
    mask[window] = inside
    return mask


def _surroundings_window(scene: Scene, obj: SceneObject) -> tuple[tuple[slice, slice], np.ndarray]:
    """The rule's pixels as a window of the frame and a mask over it (cheaper than a whole frame)."""
    reach = obj.size / np.sqrt(2) + contrast_margin(obj.size)
    (ax, ay), (bx, by) = obj.start, obj.end
    x0, x1 = (
        max(0, int(np.floor(min(ax, bx) - reach))),
        min(scene.width, int(np.ceil(max(ax, bx) + reach)) + 1),
    )
    y0, y1 = (
        max(0, int(np.floor(min(ay, by) - reach))),
        min(scene.height, int(np.ceil(max(ay, by) + reach)) + 1),
    )
    x = np.arange(x0, x1, dtype=np.float64)[None, :] + 0.5
    y = np.arange(y0, y1, dtype=np.float64)[:, None] + 0.5
    dx, dy = bx - ax, by - ay
    length2 = dx * dx + dy * dy
    t = np.zeros_like(x * y) if length2 == 0 else np.clip(((x - ax) * dx + (y - ay) * dy) / length2, 0.0, 1.0)
    return (slice(y0, y1), slice(x0, x1)), np.hypot(x - (ax + t * dx), y - (ay + t * dy)) <= reach


def palette_contrasts(scene: Scene, obj: SceneObject, background: np.ndarray) -> dict[str, float]:
    """For every colour of the world, its smallest ΔE00 to the background under and around ``obj``'s
    path (``background``: (H, W, 3) uint8, as `background_pixels` draws it): the colours ``obj`` may take."""
    window, inside = _surroundings_window(scene, obj)
    region = background[window][inside].astype(np.uint32)  # (n, 3)
    if not len(region):
        raise VideoLlavaError(f"{scene.id}: {obj.name} has no background around it")
    # each distinct colour once: (n, 3) -> (m,) packed 24-bit -> (m, 3)
    packed = np.unique(region[:, 0] << 16 | region[:, 1] << 8 | region[:, 2])
    distinct = np.stack([packed >> 16, (packed >> 8) & 255, packed & 255], axis=-1)
    names = list(_PALETTE_LAB)
    palette = np.stack([_PALETTE_LAB[n] for n in names])  # (6, 3)
    distances = delta_e2000(srgb_to_lab(distinct)[:, None, :], palette[None, :, :]).min(
        axis=0
    )  # (m, 6) -> (6,)
    return {name: float(d) for name, d in zip(names, distances, strict=True)}


def object_contrasts(scene: Scene) -> list[float]:
    """Each object's contrast with the background under and around it (ΔE00, in object order)."""
    background = _background(scene)
    return [palette_contrasts(scene, obj, background)[obj.color] for obj in scene.objects]


def backdrop_contrast(background: np.ndarray) -> float:
    """The smallest ΔE00 between any pixel of ``background`` ((H, W, 3) uint8) and any colour of
    the world: how close some part of it comes to passing for an object."""
    pixels = background.reshape(-1, 3).astype(np.uint32)  # (H*W, 3)
    packed = np.unique(pixels[:, 0] << 16 | pixels[:, 1] << 8 | pixels[:, 2])
    distinct = np.stack([packed >> 16, (packed >> 8) & 255, packed & 255], axis=-1)  # (m, 3)
    palette = np.stack(list(_PALETTE_LAB.values()))  # (6, 3)
    return float(delta_e2000(srgb_to_lab(distinct)[:, None, :], palette[None, :, :]).min())


def meets_contrast_rule(scene: Scene) -> bool:
    """Both parts of the contrast rule: every object far enough from the background around it, and
    no part of the background close to any colour of the world."""
    return all(c >= CONTRAST_MIN_DELTA_E for c in object_contrasts(scene)) and (
        backdrop_contrast(_background(scene)) >= BACKDROP_MIN_DELTA_E
    )


def render_scene(scene: Scene, frame_index: int = 0) -> Image.Image:
    """Render one frame (frame 0 for images) exactly as it is written before any lossy encoding."""
    if not 0 <= frame_index < scene.n_frames:
        raise VideoLlavaError(f"{scene.id}: frame {frame_index} outside 0..{scene.n_frames - 1}")
    return Image.fromarray(render_array(scene, frame_index), mode="RGB")


def write_media(scene: Scene, path: str | Path) -> None:
    """Render and encode a scene to ``path`` (PNG, JPEG or H.264 MP4 by the scene's kind)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if scene.kind == "image":
        image = render_scene(scene, 0)
        if scene.image_format == "jpeg":
            image.save(path, format="JPEG", quality=JPEG_QUALITY)
        else:
            image.save(path, format="PNG")
        return
    import av

    background = _background(scene)
    options = {"crf": str(VIDEO_CRF), "preset": VIDEO_PRESET, "x264-params": X264_PARAMS}
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(scene.fps), options=options)
        stream.width = scene.width
        stream.height = scene.height
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        # swscale converts RGB with BT.601 in limited range unless told otherwise; say so in the stream
        stream.codec_context.colorspace = 6  # SMPTE 170M (BT.601)
        stream.codec_context.color_range = 1  # limited
        for index in range(scene.n_frames):
            frame = av.VideoFrame.from_ndarray(render_array(scene, index, background), format="rgb24")
            frame.pts = index
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
