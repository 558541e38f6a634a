"""Time 8-frame sampling of a long H.264 video: seeking reader vs decoding every frame.

Prints the result and writes it to ``runs/bench/frame_sampling.json`` (``--output`` elsewhere,
``--record`` to ``bench/results/``). Run: ``python bench/frame_sampling.py``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from _results import add_output_arguments, results_path, write_results

from videollava.data.frame_sampling import frame_indices
from videollava.data.media import read_video_frames

NAME = "frame_sampling"


def write_test_video(path: Path, seconds: int, fps: int, width: int, height: int) -> None:
    """A drifting colour pattern with grain, so the encoder has real work and GOPs are realistic."""
    n = seconds * fps
    rng = np.random.default_rng(0)
    step = 4  # pixels the pattern drifts per frame
    yy, xx = np.mgrid[0:height, 0 : width + step * n].astype(np.float32)
    # (H, W + drift, 3): each frame is a window sliding across this canvas.
    canvas = np.stack(
        [(xx * 0.2) % 256, (yy * 0.3 + xx * 0.05) % 256, ((xx + yy) * 0.1) % 256], axis=-1
    ).astype(np.uint8)
    grain = rng.integers(0, 8, size=(8, height, width, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "g": "250"}
        for i in range(n):
            frame = canvas[:, i * step : i * step + width] + grain[i % len(grain)]
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def decode_everything(path: Path, num_frames: int) -> np.ndarray:
    """Baseline: decode all frames (converting only the picked ones), then select by index."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = list(container.decode(stream))
    return np.stack([frames[i].to_ndarray(format="rgb24") for i in frame_indices(len(frames), num_frames)])


def best_of(fn: Callable[[], np.ndarray], repeats: int) -> tuple[float, np.ndarray]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    assert out is not None
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    add_output_arguments(parser, NAME)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "long.mp4"
        start = time.perf_counter()
        write_test_video(path, args.seconds, args.fps, 1280, 720)
        encode_seconds = time.perf_counter() - start
        seek_s, seek_frames = best_of(lambda: read_video_frames(path, args.frames), args.repeats)
        full_s, full_frames = best_of(lambda: decode_everything(path, args.frames), args.repeats)
        if not np.array_equal(seek_frames, full_frames):
            raise SystemExit("seeking reader returned different frames from a full decode")
        result = {
            "video": f"{args.seconds} s, 1280x720, {args.fps} fps, H.264 (x264 ultrafast, gop 250)",
            "num_frames": args.frames,
            "repeats": args.repeats,
            "encode_seconds": round(encode_seconds, 2),
            "file_megabytes": round(path.stat().st_size / 2**20, 1),
            "seek_seconds": round(seek_s, 4),
            "full_decode_seconds": round(full_s, 4),
            "speedup": round(full_s / seek_s, 2),
            "identical_frames": True,
        }
    print(json.dumps(result, indent=2))
    write_results(results_path(args, NAME), result)


if __name__ == "__main__":
    main()
