"""vLLM's multimodal processing for Video-LLaVA: pixels as our pipeline makes them, one placeholder
position per feature row, and the sizes vLLM profiles and budgets its encoder cache with.

No transformers processor runs: images and frames go through `data.transforms` with the
checkpoint's own constants and aspect modes, and each `<image>` token becomes the checkpoint's
patch count of image tokens (256 for the 7B model), each `<video>` T x (patches + 1) video tokens
(T x 257), T being the frames the video was sampled with.

Frames per video: the video loader samples them from the file (`media_io_kwargs={"video":
{"num_frames": T}}`, per request or `--media-io-kwargs`; by default the checkpoint's count, which
the plugin makes the server's default along with our loader). `mm_processor_kwargs={"num_frames":
T}` then picks T of those frames the reference's way; the server hands the processor decoded frames
only, so that is exact only where the loader's frames are the whole clip (or T equals their count).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any

import torch
from transformers import BatchFeature
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageProcessorItems, MultiModalDataItems, VideoProcessorItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
)
from vllm.multimodal.processing.processor import HFMultiModalInputs

from videollava.constants import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from videollava.data.transforms import preprocess_images, preprocess_video
from videollava.vllm.config import ServedModel, served_model
from videollava.vllm.media import VIDEO_BACKEND, image_pixels, video_frames

# Frames a profiled (largest) video may have, whatever the context would hold.
MAX_PROFILED_FRAMES = 64


class VideoLlavaProcessingInfo(BaseProcessingInfo):
    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self._default_media_io_kwargs()

    @cached_property
    def served(self) -> ServedModel:
        return served_model(self.ctx.get_hf_config(), self.ctx.model_config.model)

    def _default_media_io_kwargs(self) -> None:
        """Fetched videos go through our loader with the checkpoint's frame count and preprocessing,
        unless the server was started with other `--media-io-kwargs`."""
        mm_config = self.ctx.model_config.multimodal_config
        if mm_config is None:
            return
        video = mm_config.media_io_kwargs.setdefault("video", {})
        video.setdefault("video_backend", VIDEO_BACKEND)
        if video["video_backend"] == VIDEO_BACKEND:
            video.setdefault("num_frames", self.served.config.num_frames)
            video.setdefault("transform", dataclasses.asdict(self.served.transform))

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None, "video": None}

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        return {}  # no transformers processor: `num_frames` is read flat

    def max_frames(self, seq_len: int, mm_counts: Mapping[str, int]) -> int:
        """The most frames each video may have with the prompt's other media in the context."""
        videos = max(1, mm_counts.get("video", 0))
        room = seq_len - mm_counts.get("image", 0) * self.served.image_tokens
        return max(1, min(MAX_PROFILED_FRAMES, room // (videos * self.served.frame_tokens)))

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {
            "image": self.served.image_tokens,
            "video": self.max_frames(seq_len, mm_counts) * self.served.frame_tokens,
        }

    def frames_option(self, hf_kwargs: Mapping[str, object]) -> int | None:
        """`num_frames` of the merged `mm_processor_kwargs`, checked; None when not given."""
        value = self.ctx.get_merged_mm_kwargs(hf_kwargs).get("num_frames")
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"mm_processor_kwargs num_frames must be a positive integer, got {value!r}")
        return value


class VideoLlavaDummyInputsBuilder(BaseDummyInputsBuilder[VideoLlavaProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return IMAGE_PLACEHOLDER * mm_counts.get("image", 0) + VIDEO_PLACEHOLDER * mm_counts.get("video", 0)

    def get_dummy_mm_data(
        self, seq_len: int, mm_counts: Mapping[str, int], mm_options: MultiModalDummyOptions
    ):
        side = self.info.served.transform.crop_size
        return {
            "image": self._get_dummy_images(
                width=side,
                height=side,
                num_images=mm_counts.get("image", 0),
                overrides=mm_options.get("image"),
            ),
            "video": self._get_dummy_videos(
                width=side,
                height=side,
                num_frames=self.info.max_frames(seq_len, mm_counts),
                num_videos=mm_counts.get("video", 0),
                overrides=mm_options.get("video"),
            ),
        }


class VideoLlavaMultiModalProcessor(BaseMultiModalProcessor[VideoLlavaProcessingInfo]):
    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {
            "pixel_values": MultiModalFieldConfig.batched("image"),
            "pixel_values_videos": MultiModalFieldConfig.batched("video"),
        }

    def _get_hf_mm_inputs(
        self, mm_items: MultiModalDataItems, hf_kwargs: Mapping[str, object]
    ) -> HFMultiModalInputs:
        """The items as vLLM holds them: fetched media keep their original bytes."""
        data: dict[str, object] = {}
        for items in mm_items.values():
            if isinstance(items, ImageProcessorItems):
                data["images"] = list(items.data)
            elif isinstance(items, VideoProcessorItems):
                metadata = (
                    items.metadata if isinstance(items.metadata, list) else [items.metadata] * len(items.data)
                )
                data["videos"] = list(zip(items.data, metadata, strict=True))
            else:
                raise ValueError(f"{type(items).__name__}: only images and videos as pixels are supported")
        return HFMultiModalInputs(data, hf_kwargs, {})

    def _call_hf_processor(
        self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]
    ) -> BatchFeature:
        served = self.info.served
        frames = self.info.frames_option(hf_kwargs)
        out: dict[str, Any] = {}
        images = hf_data.get("images") or []
        if images:
            pictures = [image_pixels(item, served.transform) for item in images]  # type: ignore[union-attr]
            out["pixel_values"] = preprocess_images(pictures, served.transform)  # (N, 3, S, S)
        videos = hf_data.get("videos") or []
        if videos:
            out["pixel_values_videos"] = [  # one (T, 3, S, S) per video; T may differ
                preprocess_video(
                    video_frames(item, meta, frames, served.config.num_frames, served.transform),
                    served.transform,
                )
                for item, meta in videos  # type: ignore[union-attr]
            ]
        return BatchFeature(out)

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        config = self.info.served.config

        def video_rows(index: int) -> list[int]:
            pixels: torch.Tensor = out_mm_kwargs["video"][index]["pixel_values_videos"].data
            return [config.video_token_id] * config.video_tokens(pixels.shape[0])

        return [
            PromptReplacement(
                modality="image",
                target=[config.image_token_id],
                replacement=[config.image_token_id] * config.image_tokens,
            ),
            PromptReplacement(modality="video", target=[config.video_token_id], replacement=video_rows),
        ]
