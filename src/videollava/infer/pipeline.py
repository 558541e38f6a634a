"""From a question and media files to LLM-ready inputs: the model with its tokenizer, transforms and template.

Every entry point (CLI, server, chat, web, evaluation) goes through `Pipeline.prepare`, so a
question is tokenized and its media preprocessed the same way everywhere, and what a request may
cost is checked in one place: the prompt's length in characters before it is tokenized, and the
visual tokens its frames will take before any frame is decoded.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from videollava.constants import IMAGE_SLOT, VIDEO_SLOT
from videollava.data.conversation import build_prompt, get_template
from videollava.data.decode_limits import Cancelled, DecodeLimits, raise_if_cancelled
from videollava.data.images import load_image
from videollava.data.media import read_video_frames
from videollava.data.media_source import open_media_file
from videollava.data.tokenize import check_placeholders, tokenize_multimodal
from videollava.data.transforms import (
    ImageTransformConfig,
    preprocess_images,
    preprocess_video,
    shrink_factor,
)
from videollava.errors import PromptError
from videollava.infer.request import MediaItem, MediaSource, Prepared
from videollava.model.bundle import load_bundle, save_bundle
from videollava.model.compress import check_budget
from videollava.model.devices import resolve_device, resolve_dtype
from videollava.model.quantize import check_quantize, quantize_language_model
from videollava.model.videollava import VideoLlava

# A prompt longer than the context times this many characters cannot fit, whatever it says; the
# tokenizer's longest token raises the bound when longer.
_CHARS_PER_TOKEN = 32


def default_model_path() -> Path:
    """The ShapesWorld checkpoint that ships inside the package."""
    return Path(__file__).resolve().parent.parent / "assets" / "shapesworld-model"


class FeatureCache:
    """Bounded LRU of projected visual features keyed by the media's content hash."""

    def __init__(self, max_bytes: int = 512 * 1024**2):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: str, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.numel() * old.element_size()


def content_hash(source: MediaSource, name: str = "", cancelled: Cancelled | None = None) -> str:
    """Digest of the media's bytes; a path must be a regular file (a device or a pipe never ends)."""
    digest = hashlib.blake2b(digest_size=16)
    if isinstance(source, bytes):
        digest.update(source)
        return digest.hexdigest()
    label = name or os.fspath(source)
    with open_media_file(source, label) as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
            raise_if_cancelled(cancelled, f"reading {label}")
    return digest.hexdigest()


@dataclass(frozen=True)
class TokenizerDetokenizer:
    """Answers as text without special tokens; `eos_token_id` ends them (a benchmark may swap it)."""

    tokenizer: PreTrainedTokenizerBase
    eos_token_id: int | None

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class Pipeline:
    """A loaded model with everything needed to turn requests into LLM inputs and ids into text."""

    def __init__(
        self,
        model: VideoLlava,
        tokenizer: PreTrainedTokenizerBase,
        transform: ImageTransformConfig,
        template: str | None = None,
        num_frames: int | None = None,
        feature_cache: FeatureCache | None = None,
        decode_limits: DecodeLimits | None = None,
        visual_tokens: int | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.transform = transform
        self.template = get_template(template or model.config.template)
        self.num_frames = num_frames or model.config.num_frames
        self.feature_cache = feature_cache or FeatureCache()
        self.decode_limits = decode_limits or DecodeLimits()
        self.detokenizer = TokenizerDetokenizer(tokenizer, tokenizer.eos_token_id)
        # Patch tokens kept per image or frame when a request sets none (None: the model config's).
        self.visual_tokens = _budget(visual_tokens, "visual_tokens")
        self._model_lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = "cpu",
        quantize: str | None = None,
        **kwargs,
    ) -> Pipeline:
        """Weights land straight on `device` (`auto`: the first GPU if any); `dtype` auto follows it.

        `quantize="int8"` stores the LLM's decoder weights in int8 once they are on the device.
        """
        check_quantize(quantize)
        target = resolve_device(device)
        folder = path if path is not None else default_model_path()
        bundle = load_bundle(folder, resolve_dtype(dtype, target), device=target)
        quantize_language_model(bundle.model, quantize)
        return cls(bundle.model, bundle.tokenizer, bundle.transform, **kwargs)

    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        """The -hf layout: weights and config, tokenizer, preprocessor config."""
        save_bundle(out_dir, self.model, self.tokenizer, self.transform)

    # ------------------------------------------------------------ prompts

    def build_prompt(self, question: str, num_images: int, num_videos: int, history=()) -> str:
        """The templated prompt for a question about new media after earlier turns."""
        return build_prompt(question, num_images, num_videos, self.template, history)

    # ------------------------------------------------------------ media

    def kept_patches(self, visual_tokens: int | None = None) -> int:
        """Patch rows per image or frame for a request's budget: its own, else the pipeline's, else
        the model config's; all patches when none is set or the budget covers them."""
        budget = _budget(visual_tokens, "visual_tokens")
        return self.model.config.kept_patches(budget if budget is not None else self.visual_tokens)

    def _budget_key(self, keep: int) -> str:
        """What the features depend on besides the media and frames: the patches kept per frame and,
        when that is fewer than all, the layer whose CLS attention chose them. Every budget at or
        above the patch count gives the same (uncompressed) features: one key."""
        config = self.model.config
        if keep >= config.vision.num_patches:
            return "all"
        rank = config.rank_layer
        return f"{keep}@{'feature' if rank is None else rank % (config.vision.num_hidden_layers + 1)}"

    def encode_media(
        self,
        item: MediaItem,
        num_frames: int | None = None,
        digest: str | None = None,
        cancelled: Cancelled | None = None,
        visual_tokens: int | None = None,
    ) -> torch.Tensor:
        """Projected features (rows, H) of one image or video; cached by content, frame count and
        patches kept per frame (`visual_tokens`, see `kept_patches`).

        Decoding stays within `decode_limits`; ``cancelled`` is asked between decoded frames and
        before the tower runs, and stops the work with RequestCancelled.
        """
        frames = num_frames or self.num_frames
        keep = self.kept_patches(visual_tokens)
        digest = digest or content_hash(item.source, item.name, cancelled)
        key = f"{item.kind}:{frames}:{self._budget_key(keep)}:{digest}"
        cached = self.feature_cache.get(key)
        if cached is not None:
            return cached
        name = item.display_name()
        video = item.kind == "video"
        if not video and item.kind != "image":
            raise ValueError(f"unknown media kind {item.kind!r}")
        shrink = functools.partial(shrink_factor, cfg=self.transform, video=video)
        read = {"name": name, "shrink": shrink, "limits": self.decode_limits, "cancelled": cancelled}
        with torch.inference_mode():
            if video:
                pixels = preprocess_video(read_video_frames(item.source, frames, **read), self.transform)
            else:
                pixels = preprocess_images([load_image(item.source, **read)], self.transform)
            raise_if_cancelled(cancelled, f"encoding {name}")
            with self._model_lock:
                # The lock may have been held by another request's tower for a while.
                raise_if_cancelled(cancelled, f"encoding {name}")
                if video:
                    features = self.model.encode_videos(pixels[None], keep)[0]  # (T*(K+1), H)
                else:
                    features = self.model.encode_images(pixels, keep)[0]  # (K, H)
        self.feature_cache.put(key, features)
        return features

    # ------------------------------------------------------------ requests

    @functools.cached_property
    def max_prompt_chars(self) -> int:
        """Characters beyond which a prompt cannot fit the context, checked before tokenizing.

        Every token covers at most as many characters as its longest vocabulary entry (at least
        `_CHARS_PER_TOKEN` is assumed), so a longer text cannot be fewer tokens than the context.
        """
        try:
            longest = max((len(piece) for piece in self.tokenizer.get_vocab()), default=0)
        except (AttributeError, NotImplementedError, TypeError):
            longest = 0
        return self.model.max_context * max(_CHARS_PER_TOKEN, longest)

    def prepare(
        self,
        prompt: str,
        media: list[MediaItem],
        num_frames: int | None = None,
        add_bos: bool = True,
        cancelled: Cancelled | None = None,
        visual_tokens: int | None = None,
    ) -> Prepared:
        """Tokenize a full prompt (with placeholders) and encode its media, in placeholder order.

        The visual tokens the media will take are counted before anything is decoded, so media
        that cannot fit the context cost nothing. ``cancelled`` is asked between media items and
        passed down (see `encode_media`). ``visual_tokens`` keeps that many patch tokens per image
        or video frame, the ones the tower's CLS attends to most (default: the pipeline's, else the
        model config's; at or above the patch count nothing changes).
        """
        if len(prompt) > self.max_prompt_chars:
            raise PromptError(
                f"prompt is {len(prompt):,} characters long but the model's context of "
                f"{self.model.max_context} tokens holds at most {self.max_prompt_chars:,}; shorten it"
            )
        frames = num_frames or self.num_frames
        if frames < 1:
            raise PromptError(f"frames per video must be at least 1, got {frames}")
        keep = self.kept_patches(visual_tokens)
        n_images = sum(m.kind == "image" for m in media)
        n_videos = sum(m.kind == "video" for m in media)
        check_placeholders(prompt, n_images, n_videos)
        tokenized = tokenize_multimodal(self.tokenizer, prompt, add_bos=add_bos)
        config = self.model.config
        visual = n_images * config.image_rows(keep) + n_videos * config.video_rows(frames, keep)
        text = len(tokenized.input_ids) - n_images - n_videos
        if text + visual >= self.model.max_context:
            raise PromptError(self._too_long(text, n_images, n_videos, frames, keep))
        images = iter([m for m in media if m.kind == "image"])
        videos = iter([m for m in media if m.kind == "video"])
        features: list[torch.Tensor] = []
        prefix_key: list[int | str] = []
        for token in tokenized.input_ids:
            if token in (IMAGE_SLOT, VIDEO_SLOT):
                item = next(images) if token == IMAGE_SLOT else next(videos)
                raise_if_cancelled(cancelled, f"preparing {item.display_name()}")
                # Read once: the cache key and the prefix key.
                digest = content_hash(item.source, item.name, cancelled)
                feature = self.encode_media(item, num_frames, digest, cancelled, keep)
                features.append(feature)
                # The budget is part of the key: compressed rows never stand in for full ones.
                prefix_key.append(f"{item.kind}:{digest}:{self._budget_key(keep)}:{feature.shape[0]}")
            else:
                prefix_key.append(token)
        visual = sum(f.shape[0] for f in features)
        prepared = Prepared(
            list(tokenized.input_ids), features, prefix_key, visual, kept_patches=keep if media else None
        )
        if prepared.prompt_tokens >= self.model.max_context:
            raise PromptError(
                f"prompt is {prepared.prompt_tokens} tokens long ({visual} of them visual) "
                f"but the model's context holds {self.model.max_context}; shorten it or use fewer frames"
            )
        return prepared

    def _too_long(self, text: int, n_images: int, n_videos: int, frames: int, keep: int) -> str:
        """Why a request cannot fit: the visual tokens its media need, the text's, and the context."""
        config, context = self.model.config, self.model.max_context
        parts = []
        if n_images:
            parts.append(f"{n_images} image(s) x {config.image_rows(keep)}")
        if n_videos:
            parts.append(f"{n_videos} video(s) x {frames} frames x {config.video_rows(1, keep)}")
        visual = n_images * config.image_rows(keep) + n_videos * config.video_rows(frames, keep)
        kept = f"; {keep} of {config.vision.num_patches} patches per frame" if parts else ""
        if visual >= context:
            return (
                f"the media need {visual} visual tokens ({' + '.join(parts)}{kept}) but the model's "
                f"context holds {context}; use fewer frames or fewer visual tokens per frame (visual_tokens)"
            )
        return (
            f"prompt would be {text + visual} tokens long ({' + '.join([f'{text} of text', *parts])}{kept}) "
            f"but the model's context holds {context}; shorten it or use fewer frames"
        )


def _budget(value: object, name: str) -> int | None:
    """A budget of patch tokens per frame as a request gives it, refused in one line when wrong."""
    try:
        return check_budget(value, name)
    except ValueError as error:
        raise PromptError(str(error)) from None
