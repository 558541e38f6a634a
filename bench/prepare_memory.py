"""Peak memory and time of preparing one hostile request, each in a fresh process.

Builds media whose files are small but whose claims are not (an 8192 x 8192 video, a 13000 x 13000
16-bit PNG, 1080p and 4K videos at 64 frames, a 3000 x 3000 GIF of one-pixel frames, a 40 MB
prompt), then prepares each with the bundled model (`Pipeline.from_pretrained()`) in its own
process: peak resident memory above the loaded model's, and seconds, whether the request was
prepared or refused. An ordinary request (the bundled example video) is the baseline of the run.
The bundled model's context holds 25 frames, so 64 frames of 4K are also decoded and transformed
for the released model's 224-pixel input on their own, to show that frame count is bounded too.

Target: every item costs at most ~1 GB above the model's resident memory, and the 8192 x 8192
video is prepared in under 3 s.

Run: ``python bench/prepare_memory.py`` (writes runs/bench/prepare_memory.json; ``--output``
elsewhere, ``--record`` to bench/results/).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import psutil
import torch
from _results import add_output_arguments, results_path, write_results
from PIL import Image

from videollava.data.decode_limits import DecodeLimits
from videollava.data.media import read_video_frames
from videollava.data.transforms import ImageTransformConfig, preprocess_video, shrink_factor
from videollava.errors import VideoLlavaError
from videollava.infer.pipeline import Pipeline, default_model_path
from videollava.infer.request import MediaItem
from videollava.testing import grey16_png, growing_gif, one_pixel_gif, write_moving_square_video

NAME = "prepare_memory"
TARGET_PEAK_MB = 1024
TARGET_8192_SECONDS = 3.0
MB = 2**20


def write_file(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def build_items(folder: Path) -> dict[str, dict[str, object]]:
    """name -> what to prepare: kind (video / image / text), file, frames ("fit": as many as fit)."""
    example = default_model_path().parent / "examples" / "shapes-video.mp4"
    hd = write_moving_square_video(folder / "1080p_64.mp4", 1920, 1080, 64)
    uhd = write_moving_square_video(folder / "4k_64.mp4", 3840, 2160, 64)
    return {
        "ordinary_video (baseline)": {"kind": "video", "file": str(example)},
        "video_8192x8192_8f": {
            "kind": "video",
            "file": str(write_moving_square_video(folder / "8192.mp4", 8192, 8192, 8)),
        },
        "png16_13000x13000": {
            "kind": "image",
            "file": write_file(folder / "13000.png", grey16_png(13000, 13000)),
        },
        "png16_8192x8192": {"kind": "image", "file": write_file(folder / "8192.png", grey16_png(8192, 8192))},
        "video_1080p_64f": {"kind": "video", "file": str(hd), "frames": 64},
        "video_1080p_as_many_frames_as_fit": {"kind": "video", "file": str(hd), "frames": "fit"},
        "video_4k_64f": {"kind": "video", "file": str(uhd), "frames": 64},
        "video_4k_as_many_frames_as_fit": {"kind": "video", "file": str(uhd), "frames": "fit"},
        "video_4k_64f_decoded_for_224px_input": {"kind": "frames", "file": str(uhd), "frames": 64},
        "gif_frame_grows_to_60000x60000": {
            "kind": "video",
            "file": write_file(folder / "grows.gif", growing_gif(60000, 60000)),
        },
        "gif_3000x3000_10000_one_pixel_frames": {
            "kind": "video",
            "file": write_file(folder / "dots.gif", one_pixel_gif(3000, 10_000)),
        },
        "text_40MB": {"kind": "text", "chars": 40 * MB},
    }


# --------------------------------------------------------------------------------------------
# one item, in a fresh process


def _resident_peak_reset() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _resident_peak() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def decode_for_224px(path: str, frames: int) -> torch.Tensor:
    """What encode_media does before the tower, for the released model's 224-pixel input."""
    cfg = ImageTransformConfig()
    shrink = functools.partial(shrink_factor, cfg=cfg, video=True)
    return preprocess_video(read_video_frames(path, frames, shrink=shrink, limits=DecodeLimits()), cfg)


def run_child(spec: dict[str, object]) -> dict[str, object]:
    pipeline = Pipeline.from_pretrained()
    config = pipeline.model.config
    frames = spec.get("frames")
    if frames == "fit":  # leave room for the question and the template
        frames = (pipeline.model.max_context - 64) // config.video_tokens(1)
    kind = spec["kind"]
    if kind == "text":
        prompt, media = "many words " * (int(spec["chars"]) // 11), []  # type: ignore[call-overload]
    elif kind == "frames":
        prompt, media = "", []
    else:
        media = [MediaItem(str(kind), str(spec["file"]))]
        prompt = pipeline.build_prompt("What happens?", int(kind == "image"), int(kind == "video"))
    process = psutil.Process()
    model_rss = process.memory_info().rss
    if not _resident_peak_reset():
        raise SystemExit(
            "cannot reset the peak-RSS mark (/proc/self/clear_refs): peaks would include loading"
        )
    start = time.perf_counter()
    try:
        if kind == "frames":
            pixels = decode_for_224px(str(spec["file"]), int(frames))  # type: ignore[call-overload]
            outcome = {"outcome": "decoded", "pixel_values": list(pixels.shape)}
        else:
            prepared = pipeline.prepare(prompt, media, num_frames=frames)  # type: ignore[arg-type]
            outcome = {"outcome": "prepared", "prompt_tokens": prepared.prompt_tokens}
    except VideoLlavaError as error:
        outcome = {"outcome": "refused", "message": f"{type(error).__name__}: {str(error)[-300:]}"}
    seconds = time.perf_counter() - start
    peak = _resident_peak()
    return {
        **outcome,
        "frames": frames,
        "seconds": round(seconds, 3),
        "model_rss_mb": round(model_rss / MB, 1),
        "peak_above_model_mb": round(max(0, peak - model_rss) / MB, 1),
    }


# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_output_arguments(parser, NAME)
    parser.add_argument(
        "--only", action="append", default=[], metavar="NAME", help="items whose name has NAME"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one item may take")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return

    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="prepare-memory-") as tmp:
        started = time.perf_counter()
        items = build_items(Path(tmp))
        print(f"built the media in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        for name, spec in items.items():
            if args.only and not any(part in name for part in args.only):
                continue
            if "file" in spec:
                spec_out = {**spec, "file_bytes": os.path.getsize(str(spec["file"]))}
            else:
                spec_out = dict(spec)
            command = [sys.executable, __file__, "--child", json.dumps(spec)]
            try:
                done = subprocess.run(
                    command, capture_output=True, text=True, timeout=args.timeout, check=False
                )
            except subprocess.TimeoutExpired:
                results[name] = {**spec_out, "outcome": f"did not finish in {args.timeout:g} s"}
                continue
            if done.returncode != 0:
                results[name] = {**spec_out, "outcome": "crashed", "stderr": done.stderr[-2000:]}
            else:
                results[name] = {**spec_out, **json.loads(done.stdout.strip().splitlines()[-1])}
            results[name].pop("file", None)  # type: ignore[union-attr]
            print(f"{name}: {json.dumps(results[name])}", file=sys.stderr)

    measured = [r for r in results.values() if isinstance(r, dict) and "peak_above_model_mb" in r]
    baseline = results.get("ordinary_video (baseline)")
    base_peak = baseline.get("peak_above_model_mb") if isinstance(baseline, dict) else None
    for r in measured:
        if base_peak:
            r["peak_vs_baseline"] = round(r["peak_above_model_mb"] / base_peak, 2)
    big = results.get("video_8192x8192_8f", {})
    report = {
        "what": "peak RSS above the loaded model while preparing one request, fresh process per item",
        "target": {"peak_above_model_mb": TARGET_PEAK_MB, "video_8192x8192_8f_seconds": TARGET_8192_SECONDS},
        "meets_target": bool(measured)
        and len(measured) == len(results)
        and all(r["peak_above_model_mb"] <= TARGET_PEAK_MB for r in measured)
        and (not big or (big.get("outcome") == "prepared" and big.get("seconds", 1e9) < TARGET_8192_SECONDS)),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "av": av.__version__,
            "pillow": Image.__version__,
        },
        "items": results,
    }
    print(json.dumps(report, indent=2))
    write_results(results_path(args, NAME), report)


if __name__ == "__main__":
    main()
