"""Media built to hurt: what they may cost is bounded, and each is refused or read with a clear answer.

Every hostile file is built here and small on disk (an 8192 x 8192 video is a few hundred KB, a
13000 x 13000 16-bit PNG 330 KB). Memory and time are measured by bench/prepare_memory.py; these
tests check behaviour: sizes, messages, that work stops, and that nothing hangs.
"""

from __future__ import annotations

import functools
import io
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from videollava.cli import main
from videollava.data import images
from videollava.data.decode_limits import DecodeLimits
from videollava.data.images import load_image
from videollava.data.media import is_video_file, load_media, read_video_clip, read_video_frames
from videollava.data.media_source import open_media_file
from videollava.data.transforms import ImageTransformConfig, preprocess_images, shrink_factor
from videollava.errors import MediaError, PromptError, RequestCancelled
from videollava.infer import pipeline as pipeline_module
from videollava.infer.pipeline import Pipeline, content_hash
from videollava.infer.request import MediaItem
from videollava.testing import (
    grey,
    grey16_png,
    growing_gif,
    one_pixel_gif,
    png_header_only,
    write_flat_video,
)

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

REFERENCE = ImageTransformConfig()  # 224 pixels, as the released model


def shrink_for(cfg: ImageTransformConfig, video: bool = True) -> Callable[[int, int], int]:
    return functools.partial(shrink_factor, cfg=cfg, video=video)


def rgb_of_grey(luma: float) -> float:
    """The RGB level of a flat limited-range luma (BT.601, no chroma), as the scaler converts it."""
    return (luma - 16) * 255 / 219


def finishes(call: Callable[[], object], seconds: float = 20.0) -> object:
    """Run call in a daemon thread; fail (instead of hanging the suite) if it does not end in time."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as error:  # handed to the test
            outcome["error"] = error

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still running after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome.get("value")


class CancelAfter:
    """A cancelled() that turns True after it was asked `calls` times."""

    def __init__(self, calls: int):
        self.calls = calls
        self.asked = 0

    def __call__(self) -> bool:
        self.asked += 1
        return self.asked > self.calls


@pytest.fixture(scope="module")
def tiny_pipeline(hf_checkpoint) -> Pipeline:
    return Pipeline.from_pretrained(hf_checkpoint[0], dtype="float32")


# --------------------------------------------------------------------------------------------
# only regular files are read


ENTRY_POINTS: dict[str, Callable[[str], object]] = {
    "open_media_file": lambda p: open_media_file(p).close(),
    "content_hash": content_hash,
    "load_image": load_image,
    "read_video_clip": read_video_clip,
    "load_media": load_media,
    "is_video_file": is_video_file,
}


@pytest.fixture
def special_files(tmp_path: Path, request: pytest.FixtureRequest) -> dict[str, tuple[str, str]]:
    """path, expected problem: files that are not media, some of which would never finish reading."""
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    sock_path = tmp_path / "s.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock_path))
    request.addfinalizer(server.close)
    loop_a, loop_b = tmp_path / "loop_a.mp4", tmp_path / "loop_b.mp4"
    loop_a.symlink_to(loop_b)
    loop_b.symlink_to(loop_a)
    dangling = tmp_path / "dangling.png"
    dangling.symlink_to(tmp_path / "gone.png")
    to_zero = tmp_path / "zero.mp4"
    to_zero.symlink_to("/dev/zero")
    (tmp_path / "folder.mp4").mkdir()
    return {
        "dev_zero": ("/dev/zero", "is a character device, not a media file"),
        "symlink_to_dev_zero": (str(to_zero), "is a character device"),
        "fifo": (str(fifo), r"is a named pipe \(FIFO\), not a media file"),
        "socket": (str(sock_path), "is a socket, not a media file"),
        "symlink_loop": (str(loop_a), "symlink loop"),
        "dangling_symlink": (str(dangling), "file not found"),
        "directory": (str(tmp_path / "folder.mp4"), "is a directory"),
        "nul_in_path": (str(tmp_path / "a\0b.png"), "contains a NUL character"),
        "parent_is_a_file": (str(Path(__file__) / "x.png"), "file not found"),
    }


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_every_entry_point_refuses_what_is_not_a_regular_file(
    entry: str, special_files: dict[str, tuple[str, str]]
) -> None:
    for kind, (path, problem) in special_files.items():
        with pytest.raises(MediaError, match=problem) as error:
            finishes(lambda path=path: ENTRY_POINTS[entry](path), seconds=10)
        assert error.value.path == path, kind


def test_ask_on_dev_zero_and_a_fifo_ends_with_a_clear_error(hf_checkpoint, tmp_path: Path, capsys) -> None:
    fifo = tmp_path / "clip.mp4"
    os.mkfifo(fifo)
    for path, problem in (("/dev/zero", "character device"), (str(fifo), "named pipe")):
        args = ["ask", "--model", str(hf_checkpoint[0]), "--dtype", "float32", "--video", path, "What?"]
        code = finishes(lambda args=args: main(args), seconds=60)
        err = capsys.readouterr().err
        assert code == 2
        assert f"error: {path}: is a {problem}" in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------
# resolution


def test_8192_video_is_reduced_in_the_decoder(tmp_path: Path) -> None:
    path = write_flat_video(tmp_path / "big.mp4", 8192, 8192, 2)
    assert path.stat().st_size < 1_000_000
    factor = shrink_factor(8192, 8192, REFERENCE, video=True)
    side = -(-8192 // factor)
    assert 4 * 224 <= side < 8 * 224
    clip = read_video_clip(path, 4, shrink=shrink_for(REFERENCE))
    assert clip.frames.shape == (4, side, side, 3) and clip.n_frames == 2
    # The scaler keeps the picture: flat grey frames stay that grey (within codec rounding).
    means = clip.frames.reshape(4, -1).mean(axis=1)
    assert np.allclose(means, [rgb_of_grey(grey(i)) for i in (0, 0, 0, 1)], atol=3)
    with pytest.raises(MediaError, match=r"video frames too large: 8192 x 8192 = 67,108,864 pixels"):
        read_video_clip(path, 4, limits=DecodeLimits(max_pixels=4096 * 4096))


def test_ordinary_media_keep_every_pixel(tmp_path: Path) -> None:
    """Up to 8x the resized size nothing is reduced, so the model gets the numbers it always got."""
    video = write_flat_video(tmp_path / "hd.mp4", 1280, 720, 4)
    assert np.array_equal(
        read_video_frames(video, 4, shrink=shrink_for(REFERENCE)), read_video_frames(video, 4)
    )
    rng = np.random.default_rng(0)
    photo = tmp_path / "photo.jpg"
    Image.fromarray(rng.integers(0, 255, (1500, 1700, 3), dtype=np.uint8)).save(photo, quality=90)
    assert shrink_factor(1500, 1700, REFERENCE) == 1
    assert np.array_equal(
        np.asarray(load_image(photo, shrink=shrink_for(REFERENCE, video=False))),
        np.asarray(load_image(photo)),
    )


def test_large_jpeg_decodes_small_and_gives_nearly_the_same_model_input(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:3000, 0:4000]
    smooth = np.stack([xx * 255 // 3999, yy * 255 // 2999, (xx + yy) * 255 // 6998], -1).astype(np.uint8)
    path = tmp_path / "large.jpg"
    Image.fromarray(smooth).save(path, quality=95)
    small = load_image(path, shrink=shrink_for(REFERENCE, video=False))
    factor = shrink_factor(3000, 4000, REFERENCE)
    assert factor == 3 and max(small.size) <= 4000 // 2  # the JPEG decoder's own 1/2 scale, then reduced
    full = preprocess_images([load_image(path)])
    reduced = preprocess_images([small])
    assert reduced.shape == full.shape
    assert float((reduced - full).abs().mean()) < 0.01


def test_png_16bit_13000_square_is_refused_with_its_pixel_count(tmp_path: Path) -> None:
    path = tmp_path / "grey16.png"
    path.write_bytes(grey16_png(13000, 13000))
    assert path.stat().st_size < 400_000
    for read in (lambda: load_image(path), lambda: load_media(path)):
        with pytest.raises(MediaError, match=r"image too large: 13000 x 13000 = 169,000,000 pixels") as error:
            finishes(read, seconds=10)
        assert error.value.path == str(path)
    # Over twice PIL's own limit PIL refuses first; the message is still ours, with the count.
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_header_only(20000, 20000))
    with pytest.raises(MediaError, match=r"image too large: 400,000,000 pixels, over the limit of"):
        load_image(huge)


def test_deep_png_becomes_8bit_by_strips_exactly_as_before(tmp_path: Path, monkeypatch) -> None:
    rng = np.random.default_rng(1)
    deep = rng.integers(0, 65536, (301, 257), dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(deep).save(path)
    monkeypatch.setattr(images, "_STRIP_PIXELS", 1000)  # many strips, one of them short
    arr = np.asarray(load_image(path))
    expected = np.clip(np.rint(deep.astype(np.float64) * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
    assert np.array_equal(arr[..., 0], expected) and np.array_equal(arr[..., 2], expected)
    floats = rng.normal(0.5, 0.4, (40, 30)).astype(np.float32)
    floats[3, 4] = np.nan
    arr = np.asarray(load_image(_save_float(floats, tmp_path / "f.tif")))
    scaled = floats.astype(np.float64) * (255.0 if np.nanmax(floats) <= 1.0 else 1.0)
    expected = np.clip(np.rint(np.nan_to_num(scaled)), 0, 255).astype(np.uint8)
    assert np.array_equal(arr[..., 1], expected)


def _save_float(arr: np.ndarray, path: Path) -> Path:
    Image.fromarray(arr, "F").save(path)
    return path


def test_stream_that_changes_resolution_reads_at_the_first_frames_size(tmp_path: Path) -> None:
    first = write_flat_video(io.BytesIO(), 64, 48, 10, fmt="mpegts").getvalue()
    second = write_flat_video(io.BytesIO(), 128, 96, 10, fmt="mpegts", start=10).getvalue()
    path = tmp_path / "changes.ts"
    path.write_bytes(first + second)
    with av.open(str(path)) as container:
        sizes = {(f.width, f.height) for f in container.decode(video=0)}
    assert sizes == {(64, 48), (128, 96)}
    clip = read_video_clip(path, 8)
    assert clip.frames.shape == (8, 48, 64, 3) and clip.n_frames == 20
    lumas = clip.frames.reshape(8, -1).mean(axis=1)
    expected = [rgb_of_grey(grey(i)) for i in np.linspace(0, 19, 8).astype(int)]
    assert np.allclose(lumas, expected, atol=3)


def test_gif_whose_frame_grows_to_60000_square_is_refused(tmp_path: Path) -> None:
    data = growing_gif(60000, 60000)
    assert len(data) < 4000
    for source in (data, _write(tmp_path / "grow.gif", data)):
        with pytest.raises(MediaError, match=r"animation frame too large: 3,600,000,000 pixels") as error:
            finishes(lambda source=source: read_video_clip(source, 8, name="grow.gif"), seconds=10)
        assert error.value.path == "grow.gif"


def test_gif_whose_frame_grows_a_little_keeps_one_size() -> None:
    data = growing_gif(100, 80)
    with Image.open(io.BytesIO(data)) as img:
        img.seek(1)
        assert img.size == (100, 80)
    clip = read_video_clip(data, 3)
    assert clip.frames.shape == (3, 48, 64, 3) and clip.n_frames == 3


def test_large_animation_is_reduced_frame_by_frame() -> None:
    frames = [Image.new("L", (2400, 1800), 40 + 60 * i) for i in range(3)]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=40)
    assert shrink_factor(1800, 2400, REFERENCE, video=True) == 2
    clip = read_video_clip(out.getvalue(), 3, shrink=shrink_for(REFERENCE))
    assert clip.frames.shape == (3, 900, 1200, 3)
    assert clip.frames.reshape(3, -1).mean(axis=1).tolist() == [40, 100, 160]


def test_animation_over_the_canvas_limit_is_refused_before_decoding() -> None:
    with pytest.raises(MediaError, match=r"animation frame 0 too large: 64 x 48 = 3,072 pixels"):
        read_video_clip(growing_gif(64, 48), 3, limits=DecodeLimits(max_animation_pixels=1000))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------------------------
# decode work


def test_decoding_stops_after_the_frame_limit(tmp_path: Path) -> None:
    limits = DecodeLimits(max_frames=20)
    video = write_flat_video(tmp_path / "long.mkv", 64, 48, 60)
    with pytest.raises(MediaError, match=r"decoding stopped after 21 frames / [\d.]+ s") as error:
        read_video_clip(video, 8, limits=limits, name="long.mkv")
    assert error.value.path == "long.mkv" and "limits: 20 frames" in str(error.value)
    with pytest.raises(MediaError, match="decoding stopped after 21 frames"):
        read_video_clip(one_pixel_gif(16, 59), 8, limits=limits)
    # Frames scanned include those decoded again after a seek; far from the default.
    assert read_video_clip(video, 8, limits=DecodeLimits(max_frames=500)).n_frames == 60


def test_decoding_stops_after_the_time_limit() -> None:
    """One-pixel frames on a large canvas, in small: costly for PIL to composite, tiny on disk."""
    data = one_pixel_gif(1000, 2000)
    assert len(data) < 60_000
    with pytest.raises(MediaError, match=r"decoding stopped after \d+ frames / [\d.]+ s") as error:
        finishes(lambda: read_video_clip(data, 8, limits=DecodeLimits(max_seconds=0.2)), seconds=10)
    scanned = int(str(error.value).split("after ")[1].split(" frames")[0])
    assert 1 <= scanned < 2001


def test_decoding_can_be_cancelled_between_frames(tmp_path: Path) -> None:
    video = write_flat_video(tmp_path / "clip.mkv", 64, 48, 60)
    for source in (video, one_pixel_gif(16, 59)):
        cancelled = CancelAfter(5)
        with pytest.raises(RequestCancelled):
            read_video_clip(source, 8, cancelled=cancelled)
        assert cancelled.asked == 6  # it stopped at once


# --------------------------------------------------------------------------------------------
# the pipeline: cost checked before work, cancellation, limits


def test_frames_that_cannot_fit_the_context_are_refused_before_decoding(tiny_pipeline: Pipeline) -> None:
    per_frame = tiny_pipeline.model.config.video_tokens(1)
    context = tiny_pipeline.model.max_context
    frames = context // per_frame + 1
    prompt = tiny_pipeline.build_prompt("What happens?", 0, 1)
    # The file does not exist: had it been read, this would be a MediaError.
    item = MediaItem("video", "/nonexistent/clip.mp4")
    with pytest.raises(PromptError, match=rf"{frames} frames x {per_frame}.* context holds {context}"):
        tiny_pipeline.prepare(prompt, [item], num_frames=frames)
    with pytest.raises(PromptError, match="at least 1"):
        tiny_pipeline.prepare(prompt, [item], num_frames=-3)


def test_a_huge_prompt_is_refused_before_tokenizing(tiny_pipeline: Pipeline, monkeypatch) -> None:
    cap = tiny_pipeline.max_prompt_chars
    assert cap >= tiny_pipeline.model.max_context * 32
    longest = max(len(piece) for piece in tiny_pipeline.tokenizer.get_vocab())
    assert cap >= tiny_pipeline.model.max_context * longest

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized a prompt that cannot fit")

    monkeypatch.setattr(pipeline_module, "tokenize_multimodal", refuse)
    huge = "a" * (40 * 2**20)
    with pytest.raises(PromptError, match=rf"41,943,040 characters .* holds at most {cap:,}"):
        tiny_pipeline.prepare(huge, [])
    with pytest.raises(PromptError, match="characters"):
        tiny_pipeline.prepare("b" * (cap + 1), [])


def test_a_prompt_at_the_cap_is_still_judged_by_its_tokens(tiny_pipeline: Pipeline) -> None:
    words = "one two " * (tiny_pipeline.max_prompt_chars // 8)
    with pytest.raises(PromptError, match="tokens long"):
        tiny_pipeline.prepare(words[: tiny_pipeline.max_prompt_chars], [])


def test_oversized_media_reach_the_towers_small(tiny_pipeline: Pipeline, tmp_path: Path, monkeypatch) -> None:
    seen: list[tuple[int, ...]] = []
    real = pipeline_module.read_video_frames

    def spy(*args, **kwargs):
        frames = real(*args, **kwargs)
        seen.append(frames.shape)
        return frames

    monkeypatch.setattr(pipeline_module, "read_video_frames", spy)
    video = write_flat_video(tmp_path / "large.mp4", 2048, 2048, 2)
    prompt = tiny_pipeline.build_prompt("What?", 0, 1)
    prepared = tiny_pipeline.prepare(prompt, [MediaItem("video", str(video))], num_frames=2)
    side = tiny_pipeline.transform.size
    assert seen and 4 * side <= seen[0][1] < 8 * side and seen[0][1] == seen[0][2]
    assert prepared.visual_tokens == tiny_pipeline.model.config.video_tokens(2)


def test_decode_limits_are_the_pipelines(hf_checkpoint, tmp_path: Path) -> None:
    strict = Pipeline.from_pretrained(
        hf_checkpoint[0], dtype="float32", decode_limits=DecodeLimits(max_frames=10)
    )
    video = write_flat_video(tmp_path / "v.mkv", 64, 48, 30)
    prompt = strict.build_prompt("What?", 0, 1)
    with pytest.raises(MediaError, match="decoding stopped after 11 frames"):
        strict.prepare(prompt, [MediaItem("video", str(video))])


def test_prepare_stops_between_items_and_before_the_tower(
    tiny_pipeline: Pipeline, tmp_path: Path, monkeypatch
) -> None:
    towers: list[tuple[int, ...]] = []
    left = threading.Event()  # the caller leaves once a tower has run
    real = tiny_pipeline.model.encode_videos

    def tower(pixels: torch.Tensor, *budget: int) -> torch.Tensor:
        towers.append(tuple(pixels.shape))
        features = real(pixels, *budget)
        left.set()
        return features

    monkeypatch.setattr(tiny_pipeline.model, "encode_videos", tower)
    monkeypatch.setattr(tiny_pipeline, "feature_cache", pipeline_module.FeatureCache())
    videos = [write_flat_video(tmp_path / f"{k}.mkv", 64, 48, 12 + k) for k in range(2)]
    items = [MediaItem("video", str(v)) for v in videos]
    prompt = tiny_pipeline.build_prompt("Compare.", 0, 2)

    with pytest.raises(RequestCancelled):
        tiny_pipeline.prepare(prompt, items, num_frames=2, cancelled=left.is_set)
    assert len(towers) == 1  # the second video was never read

    # Gone while the first video's frames are decoded: no tower runs.
    towers.clear()
    monkeypatch.setattr(tiny_pipeline, "feature_cache", pipeline_module.FeatureCache())
    with pytest.raises(RequestCancelled):
        tiny_pipeline.prepare(prompt, items, num_frames=2, cancelled=CancelAfter(3))
    assert towers == []

    prepared = tiny_pipeline.prepare(prompt, items, num_frames=2, cancelled=lambda: False)
    assert len(towers) == 2 and len(prepared.features) == 2
