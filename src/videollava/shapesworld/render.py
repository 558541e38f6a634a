"""ShapesWorld rendering: a scene drawn pixel by pixel, written as PNG, JPEG or H.264 MP4."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from videollava.errors import VideoLlavaError
from videollava.shapesworld.world import COLORS, Scene, SceneObject

JPEG_QUALITY = 90
VIDEO_CRF = 20
VIDEO_PRESET = "veryfast"
# Without cpu-independent, x264 (one thread, identical input) now and then encoded the same scene
# differently from run to run (about one video in twenty); with it, runs repeat bit for bit.
X264_PARAMS = "cpu-independent=1"


def _background(scene: Scene) -> np.ndarray:
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
        _draw(canvas, obj, obj.center(t))
    return canvas


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
