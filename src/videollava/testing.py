"""What tests and benchmarks share: model shapes, a tokenizer, random checkpoints, hostile media.

All of it builds offline in seconds. Small checkpoints come from
`transformers.VideoLlavaForConditionalGeneration` with random weights, saved with its own
`save_pretrained`; full-size ones (a 7B LLM does not fit in memory in float32) are written
tensor by tensor under the names of the same transformers model, built on the meta device.
Both get a tokenizer and a preprocessor config beside them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
)

from videollava.constants import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, padded_vocab_size
from videollava.data.transforms import ImageTransformConfig
from videollava.train.tokenizer import train_tokenizer

# --------------------------------------------------------------------------------------------
# tiny shapes


def vit_shape(
    width: int, layers: int, heads: int, *, image_size: int, mlp: int, **extra: Any
) -> dict[str, Any]:
    """A tower's shape as transformers' CLIPVisionConfig arguments: the real towers' 14 px patches and
    exact GELU; `extra` are further CLIPVisionConfig arguments."""
    return dict(
        hidden_size=width,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=14,
        **extra,
        hidden_act="gelu",
    )


def llama_shape(
    width: int, layers: int, heads: int, *, mlp: int, kv_heads: int, context: int, **extra: Any
) -> dict[str, Any]:
    """An LLM's shape as transformers' LlamaConfig arguments; `extra` are further LlamaConfig arguments."""
    return dict(
        hidden_size=width,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=context,
        **extra,
    )


# The tiny -hf checkpoint: 56 px in 14 px patches (a 4 x 4 grid), the real towers' patch size on a
# sixteenth of their patches; grouped-query attention, two query heads per key/value head.
TINY_VISION = vit_shape(32, 3, 4, image_size=56, mlp=64, projection_dim=16)
TINY_TEXT = llama_shape(64, 2, 4, mlp=128, kv_heads=2, context=512, rms_norm_eps=1e-5)

# A training recipe's `model.init.vision` / `model.init.llm`, small enough that every stage runs in
# seconds.
TINY_RECIPE_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "patch_size": 8,
    "image_size": 16,
}
TINY_RECIPE_LLM = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    # ShapesWorld conversations run to eight turns: about 320 tokens with a 320-token vocabulary.
    "max_position_embeddings": 1024,
}
# The `align_image` stage's caption encoder at the same scale.
TINY_TEXT_ENCODER = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "max_length": 48}
# The recipe's tower at 32 px with four heads, for the alignment losses: boxes fall on a 4 x 4 grid
# of 8 px patches.
TINY_ALIGN_VISION = {**TINY_RECIPE_VISION, "num_attention_heads": 4, "image_size": 32}

# --------------------------------------------------------------------------------------------
# a tokenizer

_SYSTEMS = [
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
]
_COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "gray", "pink", "cyan"]
_SHAPES = ["circle", "square", "triangle", "star", "rectangle", "ellipse", "cross", "diamond"]
_MOTIONS = [
    "moves from left to right",
    "moves from right to left",
    "moves up",
    "moves down",
    "grows bigger",
    "shrinks",
    "rotates",
    "stays still",
    "bounces",
    "appears",
    "disappears",
]
_QUESTIONS = [
    "What color is the {shape}?",
    "What shape is {colour}?",
    "How many shapes are there?",
    "Describe the video.",
    "Describe the image briefly.",
    "Where does the {shape} move?",
    "Is there a {colour} {shape} in the video?",
    "What happens in the video?",
    "Answer the question using a single word or phrase.",
]


def _shapes_chat_corpus() -> list[str]:
    """Chat-formatted sentences about coloured shapes: the vocabulary the tests and tiny models use."""
    texts: list[str] = []
    for i, colour in enumerate(_COLOURS):
        for j, shape in enumerate(_SHAPES):
            motion = _MOTIONS[(i + j) % len(_MOTIONS)]
            question = _QUESTIONS[(i * 3 + j) % len(_QUESTIONS)].format(shape=shape, colour=colour)
            answer = f"A {colour} {shape} {motion}."
            system = _SYSTEMS[(i + j) % 2]
            texts.append(f"{system} USER: <video>\n{question} ASSISTANT: {answer}</s>")
            texts.append(
                f"USER: <image>\n{question} ASSISTANT: {colour}</s>USER: Yes or no? ASSISTANT: yes</s>"
            )
            texts.append(f"<image>The {shape} is {colour}. There are {i + j} shapes, {j} of them {shape}s.\n")
    texts.append("yes no one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9 10")
    return texts


def tiny_test_tokenizer(
    vocab_size: int = 600, *, placeholder_tokens: bool = True, out_dir: str | os.PathLike[str] | None = None
) -> PreTrainedTokenizerFast:
    """A LLaMA-laid-out tokenizer trained in milliseconds, so that nothing is downloaded."""
    return train_tokenizer(
        _shapes_chat_corpus(), vocab_size=vocab_size, out_dir=out_dir, placeholder_tokens=placeholder_tokens
    )


# --------------------------------------------------------------------------------------------
# random checkpoints


def hf_config(
    tokenizer: PreTrainedTokenizerBase,
    vision: dict[str, Any],
    text: dict[str, Any],
    frames: int = 8,
    vocab_size: int | None = None,
):
    """transformers' VideoLlavaConfig for these tower and LLM shapes and this tokenizer's special ids.

    The vocabulary is the tokenizer's, rounded up to a multiple of `VOCAB_MULTIPLE`, unless `vocab_size` asks for more
    rows (the real checkpoint has 32064 rows for LLaMA's 32000 tokens and three added ones).
    """
    rows = padded_vocab_size(len(tokenizer))
    if vocab_size is not None:
        if vocab_size < len(tokenizer):
            raise ValueError(
                f"vocab_size {vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)"
            )
        rows = vocab_size
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    config = VideoLlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=LlamaConfig(
            **text,
            vocab_size=rows,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
        video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_PLACEHOLDER),
        image_seq_length=patches,
        video_seq_length=frames * (patches + 1),
    )
    config.pad_token_id = tokenizer.pad_token_id
    return config


def _write_companions(folder: Path, tokenizer: PreTrainedTokenizerBase, vision: dict[str, Any]) -> None:
    tokenizer.save_pretrained(folder)
    size = vision["image_size"]
    ImageTransformConfig(size=size, crop_size=size).to_preprocessor_json(folder)


def write_random_checkpoint(
    folder: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    vision: dict[str, Any],
    text: dict[str, Any],
    frames: int = 8,
    seed: int = 0,
    scale: float = 0.1,
    eos_never_argmax: bool = False,
):
    """Save a random model, `tokenizer` and preprocessor config into `folder`; return the model.

    Every weight is drawn anew (norm weights near one), since CLIP's own init leaves many at zero.
    `eos_never_argmax` pins the EOS logit at zero, so random greedy answers run to full length.
    """
    folder = Path(folder)
    torch.manual_seed(seed)
    model = VideoLlavaForConditionalGeneration(hf_config(tokenizer, vision, text, frames)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(_random_like(name, param.shape, param.dtype, scale))
        if eos_never_argmax:
            model.lm_head.weight[tokenizer.eos_token_id] = 0
    model.save_pretrained(folder)
    _write_companions(folder, tokenizer, vision)
    return model


def _random_like(name: str, shape: tuple[int, ...], dtype: torch.dtype, scale: float) -> torch.Tensor:
    """Norm weights near one, everything else small and centred."""
    values = torch.randn(shape, dtype=dtype)
    if "norm" in name and name.endswith("weight"):
        return values.mul_(scale).add_(1)
    return values.mul_(scale)


def temporal_shapes(vision: dict[str, Any], frames: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the divided space-time modules of every video tower layer (LanguageBind's)."""
    width = vision["hidden_size"]
    shapes: dict[str, tuple[int, ...]] = {}
    for n in range(vision["num_hidden_layers"]):
        prefix = f"model.video_tower.encoder.layers.{n}."
        shapes[prefix + "temporal_embedding"] = (1, frames, width)
        shapes[prefix + "temporal_layer_norm1.weight"] = (width,)
        shapes[prefix + "temporal_layer_norm1.bias"] = (width,)
        for proj in ("q", "k", "v", "out"):
            shapes[prefix + f"temporal_attn.{proj}_proj.weight"] = (width, width)
            shapes[prefix + f"temporal_attn.{proj}_proj.bias"] = (width,)
    return shapes


def write_large_random_checkpoint(
    folder: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    vision: dict[str, Any],
    text: dict[str, Any],
    frames: int = 8,
    vocab_size: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    temporal: bool = True,
    seed: int = 0,
    scale: float = 0.02,
    shard_bytes: int = 2 * 1024**3,
) -> int:
    """Write a random checkpoint of any size without holding it in memory; return its bytes of weights.

    Names and shapes are those of transformers' VideoLlavaForConditionalGeneration (built on the meta
    device); tensors are drawn in `dtype` and written shard by shard with a safetensors index, so
    memory stays near `shard_bytes`. With `temporal`, the video tower also gets LanguageBind's
    temporal modules under their own names, as a faithful video tower has them.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = hf_config(tokenizer, vision, text, frames, vocab_size)
    config.dtype = dtype
    with torch.device("meta"):
        shapes = {
            name: tuple(tensor.shape)
            for name, tensor in VideoLlavaForConditionalGeneration(config).state_dict().items()
        }
    if temporal:
        shapes.update(temporal_shapes(vision, frames))
    torch.manual_seed(seed)
    itemsize = torch.empty((), dtype=dtype).element_size()
    # Shards are filled in order, each up to shard_bytes; a shard's final name needs the count.
    shards: list[list[str]] = [[]]
    shard_sizes = [0]
    for name, shape in shapes.items():
        nbytes = itemsize * torch.Size(shape).numel()
        if shards[-1] and shard_sizes[-1] + nbytes > shard_bytes:
            shards.append([])
            shard_sizes.append(0)
        shards[-1].append(name)
        shard_sizes[-1] += nbytes
    weight_map = {}
    for number, names in enumerate(shards, 1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: _random_like(name, shapes[name], dtype, scale) for name in names}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        del tensors
        weight_map.update(dict.fromkeys(names, file))
    total = sum(shard_sizes)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(folder)
    _write_companions(folder, tokenizer, vision)
    return total


# --------------------------------------------------------------------------------------------
# hostile media: small files whose claims are not (tests check the refusals, bench/ the costs)


def grey(i: int) -> int:
    """The luma of frame i of `write_flat_video`."""
    return (40 + 50 * i) % 200


def write_h264(
    path: str | Path | io.BytesIO,
    width: int,
    height: int,
    frames: int,
    paint: Callable[[np.ndarray, int], None],
    *,
    fmt: str | None = None,
    start: int = 0,
    crf: int = 30,
) -> str | Path | io.BytesIO:
    """An H.264 video whose luma plane (height, width) `paint(luma, i)` fills for frames start.. start +
    frames - 1; chroma stays neutral, so the frames are grey and compress to almost nothing."""
    with av.open(path if isinstance(path, io.BytesIO) else str(path), "w", format=fmt) as container:
        stream = container.add_stream("libx264", rate=Fraction(25))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": str(crf), "threads": "2"}
        planes = np.full((height * 3 // 2, width), 128, np.uint8)  # Y rows, then U and V rows
        for i in range(start, start + frames):
            paint(planes[:height], i)
            frame = av.VideoFrame.from_ndarray(planes, format="yuv420p")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_flat_video(
    path: str | Path | io.BytesIO, width: int, height: int, n: int, *, fmt: str | None = None, start: int = 0
) -> str | Path | io.BytesIO:
    """n flat grey frames (frame i has luma grey(start + i))."""
    return write_h264(path, width, height, n, lambda luma, i: luma.fill(grey(i)), fmt=fmt, start=start)


def write_moving_square_video(path: str | Path, width: int, height: int, frames: int) -> str | Path:
    """Dark grey frames with a drifting bright square: real motion, a few hundred KB at any size."""
    side = max(16, min(width, height) // 8)

    def paint(luma: np.ndarray, i: int) -> None:
        luma[:] = 60
        x = (i * side // 2) % (width - side)
        luma[height // 3 : height // 3 + side, x : x + side] = 220

    return write_h264(path, width, height, frames, paint, crf=35)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _grey16_png(width: int, height: int, pixel_data: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", pixel_data)
        + png_chunk(b"IEND", b"")
    )


def grey16_png(width: int, height: int) -> bytes:
    """A valid 16-bit grey PNG of zeros; deflate makes it about a thousand times smaller than its pixels."""
    compressor = zlib.compressobj(9)
    row = bytes(1 + 2 * width)  # filter byte, then the samples
    rows_per_block = max(1, (1 << 22) // len(row))
    parts = [
        compressor.compress(row * min(rows_per_block, height - y)) for y in range(0, height, rows_per_block)
    ]
    parts.append(compressor.flush())
    return _grey16_png(width, height, b"".join(parts))


def png_header_only(width: int, height: int) -> bytes:
    """A 16-bit grey PNG whose pixel data is missing: PIL judges the size from the header alone."""
    return _grey16_png(width, height, zlib.compress(b""))


def gif_image_descriptors(data: bytes) -> list[int]:
    """Offsets of the image descriptors (one per frame) of a GIF, found by walking its blocks."""
    pos = 13
    if data[10] & 0x80:
        pos += 3 << ((data[10] & 7) + 1)  # global colour table
    found = []
    while data[pos] != 0x3B:
        if data[pos] == 0x21:  # extension: label, then sub-blocks
            pos += 2
        else:
            found.append(pos)
            flags = data[pos + 9]
            pos += 10 + ((3 << ((flags & 7) + 1)) if flags & 0x80 else 0) + 1  # + LZW minimum code size
        while data[pos]:
            pos += data[pos] + 1
        pos += 1
    return found


def growing_gif(right: int, bottom: int) -> bytes:
    """A 3-frame 64 x 48 GIF whose second frame is placed to end at (right, bottom).

    A frame reaching past the canvas grows it (as browsers and PIL read GIFs).
    """
    frames = [Image.new("P", (64, 48), 10 + 100 * i) for i in range(3)]
    for f in frames:
        f.putpalette([v for i in range(256) for v in (i, 255 - i, 128)])
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=40, optimize=False)
    data = bytearray(out.getvalue())
    second = gif_image_descriptors(bytes(data))[1]
    data[second + 1 : second + 5] = struct.pack("<HH", right - 64, bottom - 48)
    return bytes(data)


def one_pixel_gif(side: int, n: int) -> bytes:
    """A side x side GIF, then n frames of one pixel each: tiny, but PIL composites the canvas each time."""
    palette = [0, 0, 0, 255, 255, 255] + [0] * 762
    base, dot = Image.new("P", (side, side), 0), Image.new("P", (1, 1), 1)
    base.putpalette(palette)
    dot.putpalette(palette)
    out, one = io.BytesIO(), io.BytesIO()
    base.save(out, "GIF")
    dot.save(one, "GIF")
    dot_bytes = one.getvalue()
    block = dot_bytes[gif_image_descriptors(dot_bytes)[0] : -1]  # descriptor .. data, no trailer
    frames = bytearray(out.getvalue()[:-1])
    for i in range(n):
        moved = bytearray(block)
        moved[1:5] = struct.pack("<HH", (7 * i) % side, (13 * i) % side)
        frames += moved
    return bytes(frames + b";")


def free_port() -> int:
    """A local TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class ServedProcess:
    """A `videollava serve` process: where it answers, and what it printed once stopped."""

    base_url: str
    output: str = ""


@contextlib.contextmanager
def serve_subprocess(arguments: list[str], timeout: float = 90.0) -> Iterator[ServedProcess]:
    """`videollava serve ARGUMENTS` on a free local port, handed over once `/health` answers, and
    stopped (its output kept) on the way out; the whole command as a user types it."""
    import httpx  # the serve extra's; only this helper needs it

    port = free_port()
    command = [sys.executable, "-m", "videollava", "serve", *arguments, "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    served = ServedProcess(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"videollava serve exited with {process.returncode}: {process.stdout.read()}"
                )
            try:
                if httpx.get(f"{served.base_url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"videollava serve did not answer /health within {timeout:.0f} s")
            time.sleep(0.2)
        yield served
    finally:
        process.terminate()
        try:
            served.output, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # deaf to SIGTERM: not left running behind the tests
            process.kill()
            served.output, _ = process.communicate()
