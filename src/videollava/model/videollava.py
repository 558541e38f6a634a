"""Video-LLaVA: two language-aligned vision towers, one shared projector, a LLaMA-family LLM.

The towers turn pixels into visual tokens, the projector maps them into the LLM's embedding space,
and the splice writes them into the token embeddings where the prompt's `<image>` / `<video>`
placeholders stand. Parameter names match the Hugging Face -hf checkpoint layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig

from videollava.constants import (
    HF_IMAGE_TOKEN_ID,
    HF_PAD_TOKEN_ID,
    HF_VIDEO_TOKEN_ID,
    IGNORE_INDEX,
    IMAGE_SLOT,
    VIDEO_SLOT,
)
from videollava.errors import PromptError
from videollava.model.compress import check_budget, check_rank_layer, kept_patches
from videollava.model.vision import VisionConfig, VisionTower


@dataclass
class VideoLlavaConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    # The LLM's `transformers` config as a dict (model_type "llama" unless stated otherwise).
    text_config: dict[str, Any] = field(default_factory=dict)
    # Rows of the video tower's temporal embedding; 0 runs the video tower frame by frame like the -hf port.
    temporal_frames: int = 8
    # Frames sampled from a video by default.
    num_frames: int = 8
    vision_feature_layer: int = -2
    projector_hidden_act: str = "gelu"
    # Token ids of the placeholders in the -hf vocabulary; kept for the on-disk format.
    image_token_id: int = HF_IMAGE_TOKEN_ID
    video_token_id: int = HF_VIDEO_TOKEN_ID
    pad_token_id: int | None = HF_PAD_TOKEN_ID
    # "pad" pads images to a square with the mean colour before the crop; "crop" centre-crops;
    # "squash" resizes both sides to the square (data.transforms.ASPECT_MODES).
    image_aspect_ratio: str = "crop"
    # The reference crops video frames ("crop"); "pad" and "squash" as for images.
    video_aspect_ratio: str = "crop"
    template: str = "vicuna_v1"
    # Patch tokens kept per image or video frame when a request sets no budget (model.compress):
    # the ones the tower's CLS attends to most. None keeps all of them.
    visual_tokens: int | None = None
    # The hidden state whose producing block's CLS attention ranks the patches; None: the feature
    # layer's own block (FasterVLM). A later block (e.g. -1, the last) runs the blocks between too.
    visual_token_layer: int | None = None

    @property
    def video_vision(self) -> VisionConfig:
        return replace(self.vision, num_frames=self.temporal_frames)

    @property
    def image_tokens(self) -> int:
        return self.vision.num_patches

    def kept_patches(self, visual_tokens: int | None = None) -> int:
        """Patch rows per image or frame under a budget; None: this config's default budget."""
        budget = check_budget(visual_tokens if visual_tokens is not None else self.visual_tokens)
        return kept_patches(budget, self.vision.num_patches)

    def image_rows(self, visual_tokens: int | None = None) -> int:
        """Visual rows of one image under a budget (None: the default); the CLS is dropped."""
        return self.kept_patches(visual_tokens)

    def video_rows(self, num_frames: int, visual_tokens: int | None = None) -> int:
        """Visual rows of one video under a budget (None: the default): each frame's CLS and kept patches."""
        return num_frames * (self.kept_patches(visual_tokens) + 1)

    def video_tokens(self, num_frames: int) -> int:
        """Visual rows of one uncompressed video."""
        return num_frames * (self.vision.num_patches + 1)

    @property
    def rank_layer(self) -> int | None:
        """`visual_token_layer`, checked against the tower's depth."""
        return check_rank_layer(self.visual_token_layer, self.vision.num_hidden_layers)

    def llm_config(self) -> PretrainedConfig:
        data = dict(self.text_config)
        model_type = data.pop("model_type", "llama")
        if model_type == "llama":
            config = LlamaConfig(**data)
        else:
            from transformers import AutoConfig

            config = AutoConfig.for_model(model_type, **data)
        config._attn_implementation = "sdpa"
        return config


class Projector(nn.Module):
    """The shared two-layer MLP ("mlp2x_gelu") from vision width to LLM width."""

    def __init__(self, vision_size: int, text_size: int, act: str = "gelu"):
        super().__init__()
        self.linear_1 = nn.Linear(vision_size, text_size)
        self.linear_2 = nn.Linear(text_size, text_size)
        self.approximate = "tanh" if act in ("gelu_new", "gelu_pytorch_tanh") else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x), approximate=self.approximate))


@dataclass
class VideoLlavaOutput:
    """The LLM's logits and, when labels were given, the labels laid out like them."""

    logits: torch.Tensor  # (B, L, V)
    labels: torch.Tensor | None  # (B, L): IGNORE_INDEX on visual rows and padding


@dataclass
class SplicedBatch:
    """LLM inputs after the visual tokens were written in; padded to one length."""

    inputs_embeds: torch.Tensor  # (B, L, H)
    attention_mask: torch.Tensor  # (B, L), 1 for real positions
    position_ids: torch.Tensor  # (B, L)
    labels: torch.Tensor | None  # (B, L) or None
    lengths: list[int]  # real length of each row
    visual_tokens: list[int]  # visual rows written into each row


class VideoLlava(nn.Module):
    def __init__(self, config: VideoLlavaConfig):
        super().__init__()
        self.config = config
        self.image_tower = VisionTower(config.vision)
        self.video_tower = VisionTower(config.video_vision)
        llm_config = config.llm_config()
        self.multi_modal_projector = Projector(
            config.vision.hidden_size, llm_config.hidden_size, config.projector_hidden_act
        )
        self.language_model = AutoModelForCausalLM.from_config(llm_config)

    @property
    def dtype(self) -> torch.dtype:
        return self.multi_modal_projector.linear_1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.multi_modal_projector.linear_1.weight.device

    @property
    def max_context(self) -> int:
        return int(self.language_model.config.max_position_embeddings)

    def encode_images(self, pixel_values: torch.Tensor, visual_tokens: int | None = None) -> torch.Tensor:
        """(N, 3, H, W) -> (N, K, H_llm): one row per kept patch, CLS dropped.

        K is every patch P unless `visual_tokens` (else the config's `visual_tokens`) is below P:
        then the K patches the CLS attends to most, in their original order (model.compress).
        """
        features = self.image_tower.encode_images(
            pixel_values.to(self.device, self.dtype, non_blocking=True),
            self.config.vision_feature_layer,
            keep=self.config.kept_patches(visual_tokens),
            rank_layer=self.config.rank_layer,
        )
        return self.multi_modal_projector(features)

    def encode_videos(self, pixel_values: torch.Tensor, visual_tokens: int | None = None) -> torch.Tensor:
        """(N, T, 3, H, W) -> (N, T*(K+1), H_llm): frame after frame, each frame's CLS first; K as
        for `encode_images`, chosen frame by frame."""
        features = self.video_tower.encode_videos(
            pixel_values.to(self.device, self.dtype, non_blocking=True),
            self.config.vision_feature_layer,
            keep=self.config.kept_patches(visual_tokens),
            rank_layer=self.config.rank_layer,
        )
        return self.multi_modal_projector(features)

    def splice(
        self,
        sequences: list[list[int]],
        visual_features: list[list[torch.Tensor]],
        labels: list[list[int]] | None = None,
        padding_side: str = "left",
        max_length: int | None = None,
    ) -> SplicedBatch:
        """Write visual rows where the slots stand and pad the rows to one length.

        `sequences[b]` holds token ids with IMAGE_SLOT / VIDEO_SLOT markers; `visual_features[b]`
        holds one (rows, H) tensor per slot, in the order the slots appear. `labels[b]`, one per
        token, come out laid out like the rows: IGNORE_INDEX on every visual row and on padding.
        """
        embed = self.language_model.get_input_embeddings()
        hidden = embed.weight.shape[1]
        rows: list[torch.Tensor] = []
        row_labels: list[torch.Tensor] = []
        visual_counts: list[int] = []
        for b, ids in enumerate(sequences):
            slots = [i for i, t in enumerate(ids) if t in (IMAGE_SLOT, VIDEO_SLOT)]
            features = visual_features[b]
            if len(slots) != len(features):
                raise PromptError(
                    f"prompt {b} has {len(slots)} media placeholders but {len(features)} media were given"
                )
            ids_tensor = torch.tensor(ids, dtype=torch.long, device=self.device)
            text_embeds = embed(ids_tensor.clamp(min=0))  # (L_text, H); slot rows replaced below
            pieces: list[torch.Tensor] = []
            piece_labels: list[torch.Tensor] = []
            start = 0
            visual = 0
            sample_labels = None
            if labels is not None:
                if len(labels[b]) != len(ids):
                    raise PromptError(f"prompt {b} has {len(ids)} tokens but {len(labels[b])} labels")
                sample_labels = torch.tensor(labels[b], dtype=torch.long, device=self.device)
            for slot, feature in zip(slots, features, strict=True):
                pieces += [text_embeds[start:slot], feature.to(text_embeds.dtype)]
                if sample_labels is not None:
                    piece_labels += [
                        sample_labels[start:slot],
                        torch.full((feature.shape[0],), IGNORE_INDEX, device=self.device),
                    ]
                visual += feature.shape[0]
                start = slot + 1
            pieces.append(text_embeds[start:])
            if sample_labels is not None:
                piece_labels.append(sample_labels[start:])
                row_labels.append(torch.cat(piece_labels))
            rows.append(torch.cat(pieces))
            visual_counts.append(visual)

        lengths = [r.shape[0] for r in rows]
        limit = max_length if max_length is not None else self.max_context
        for b, length in enumerate(lengths):
            if length > limit:
                raise PromptError(
                    f"prompt {b} is {length} tokens long ({visual_counts[b]} of them visual) "
                    f"but the model's context holds {limit}"
                )
        width = max(lengths)
        batch = len(rows)
        inputs_embeds = rows[0].new_zeros(batch, width, hidden)
        attention_mask = torch.zeros(batch, width, dtype=torch.long, device=self.device)
        out_labels = (
            torch.full((batch, width), IGNORE_INDEX, dtype=torch.long, device=self.device)
            if labels is not None
            else None
        )
        for b, row in enumerate(rows):
            span = slice(width - lengths[b], width) if padding_side == "left" else slice(0, lengths[b])
            inputs_embeds[b, span] = row
            attention_mask[b, span] = 1
            if out_labels is not None:
                out_labels[b, span] = row_labels[b]
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return SplicedBatch(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=out_labels,
            lengths=lengths,
            visual_tokens=visual_counts,
        )

    def forward(
        self,
        input_ids: list[list[int]],
        images: torch.Tensor | None = None,
        videos: torch.Tensor | None = None,
        labels: list[list[int]] | None = None,
        padding_side: str = "right",
        visual_tokens: int | None = None,
    ) -> VideoLlavaOutput:
        """Training / scoring forward pass.

        `images` (N_img, 3, H, W) and `videos` (N_vid, T, 3, H, W) hold the batch's media in slot
        order (all images of sample 0, then sample 1, ...; likewise videos). `labels` (one per
        token) come back spliced like the logits, for the caller's loss. `visual_tokens`: patches
        kept per image or frame (default: the config's; see `encode_images`).
        """
        features = self.visual_features_for(input_ids, images, videos, visual_tokens)
        batch = self.splice(input_ids, features, labels=labels, padding_side=padding_side)
        out = self.language_model(
            inputs_embeds=batch.inputs_embeds,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        )
        return VideoLlavaOutput(logits=out.logits, labels=batch.labels)

    def visual_features_for(
        self,
        input_ids: list[list[int]],
        images: torch.Tensor | None,
        videos: torch.Tensor | None,
        visual_tokens: int | None = None,
    ) -> list[list[torch.Tensor]]:
        """Encode every image and video once, then hand each sample its features in slot order."""
        image_features, video_features = [], []
        if images is not None and len(images):
            image_features = list(self.encode_images(images, visual_tokens))
        if videos is not None and len(videos):
            video_features = list(self.encode_videos(videos, visual_tokens))
        wanted_images = sum(ids.count(IMAGE_SLOT) for ids in input_ids)
        wanted_videos = sum(ids.count(VIDEO_SLOT) for ids in input_ids)
        if wanted_images != len(image_features) or wanted_videos != len(video_features):
            raise PromptError(
                f"the prompts have {wanted_images} <image> and {wanted_videos} <video> placeholders "
                f"but {len(image_features)} images and {len(video_features)} videos were given"
            )
        images_iter, videos_iter = iter(image_features), iter(video_features)
        return [
            [
                next(images_iter) if t == IMAGE_SLOT else next(videos_iter)
                for t in ids
                if t in (IMAGE_SLOT, VIDEO_SLOT)
            ]
            for ids in input_ids
        ]
