"""Video-LLaVA as a vLLM model: our towers and projector in front of vLLM's own LLaMA.

The towers are `model.vision.VisionTower` (the video one with divided space-time attention in
every layer when the checkpoint has the weights, its temporal embedding resampled for the
request's frame count) and the projector is `model.videollava.Projector`, so features are computed
exactly as in `videollava ask`. The language model is vLLM's `LlamaForCausalLM`, so paged
attention, tensor parallelism (the towers are replicated on every rank) and prefix caching work
as for any LLaMA. Checkpoint names are read with `checkpoint.normalize_hf_keys`: the -hf layout of
transformers 4.x and 5.x, and our saved folders with their temporal weights.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal, SupportsPP
from vllm.model_executor.models.utils import init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors

from videollava.constants import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from videollava.errors import CheckpointError
from videollava.model.checkpoint import normalize_hf_keys
from videollava.model.videollava import Projector
from videollava.model.vision import VisionTower
from videollava.vllm import check_vllm_version
from videollava.vllm.config import served_model
from videollava.vllm.processing import (
    VideoLlavaDummyInputsBuilder,
    VideoLlavaMultiModalProcessor,
    VideoLlavaProcessingInfo,
)

check_vllm_version()

_LM_PREFIX = "language_model."


def _normalized_name(name: str) -> str:
    """A checkpoint tensor's name in our layout (`image_tower.*`, `language_model.model.*`, ...)."""
    return next(iter(normalize_hf_keys({name: None})))  # type: ignore[dict-item]


def _as_list(value: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    return list(value.unbind(0)) if isinstance(value, torch.Tensor) else list(value)


@MULTIMODAL_REGISTRY.register_processor(
    VideoLlavaMultiModalProcessor, info=VideoLlavaProcessingInfo, dummy_inputs=VideoLlavaDummyInputsBuilder
)
class VideoLlavaForConditionalGeneration(nn.Module, SupportsMultiModal, SupportsPP):
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return IMAGE_PLACEHOLDER
        if modality.startswith("video"):
            return VIDEO_PLACEHOLDER
        raise ValueError(f"Video-LLaVA takes images and videos, not {modality}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        hf_config = vllm_config.model_config.hf_config
        self.served = served_model(hf_config, vllm_config.model_config.model)
        config = self.served.config
        self.configure_mm_token_handling(
            vocab_size=hf_config.text_config.vocab_size,
            mm_token_ids=[config.image_token_id, config.video_token_id],
        )
        with self._mark_tower_model(vllm_config, {"image", "video"}):
            self.image_tower = VisionTower(config.vision)
            self.video_tower = VisionTower(config.video_vision)
            self.multi_modal_projector = Projector(
                config.vision.hidden_size, hf_config.text_config.hidden_size, config.projector_hidden_act
            )
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config,
                hf_config=hf_config.text_config,
                prefix=maybe_prefix(prefix, "language_model"),
                architectures=["LlamaForCausalLM"],
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    # ------------------------------------------------------------ visual features

    @property
    def _dtype(self) -> torch.dtype:
        return self.multi_modal_projector.linear_1.weight.dtype

    def _image_features(self, pixels: list[torch.Tensor]) -> list[torch.Tensor]:
        """One (P, H) per image, CLS dropped, as `VideoLlava.encode_images`."""
        batch = torch.stack(pixels).to(self._dtype)  # (N, 3, S, S)
        features = self.image_tower.encode_images(batch, self.served.config.vision_feature_layer)
        return list(self.multi_modal_projector(features).unbind(0))

    def _video_features(self, pixels: list[torch.Tensor]) -> list[torch.Tensor]:
        """One (T*(P+1), H) per video, as `VideoLlava.encode_videos`; videos of one length run together."""
        out: list[torch.Tensor | None] = [None] * len(pixels)
        by_length: dict[int, list[int]] = {}
        for i, video in enumerate(pixels):
            by_length.setdefault(video.shape[0], []).append(i)
        for indices in by_length.values():
            batch = torch.stack([pixels[i] for i in indices]).to(self._dtype)  # (N, T, 3, S, S)
            features = self.video_tower.encode_videos(batch, self.served.config.vision_feature_layer)
            for i, feature in zip(indices, self.multi_modal_projector(features).unbind(0), strict=True):
                out[i] = feature
        return out  # type: ignore[return-value]

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """Feature rows per item; vLLM calls this with one modality at a time, items in prompt order."""
        embeddings: list[torch.Tensor] = []
        images = kwargs.get("pixel_values")
        if images is not None:
            embeddings += self._image_features(_as_list(images))  # type: ignore[arg-type]
        videos = kwargs.get("pixel_values_videos")
        if videos is not None:
            embeddings += self._video_features(_as_list(videos))  # type: ignore[arg-type]
        return embeddings

    # ------------------------------------------------------------ language model

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(
            input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds
        )

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    # ------------------------------------------------------------ weights

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Towers and projector by our names; the LLM's tensors go to vLLM's LLaMA loader."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()

        def llm_weights() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                key = _normalized_name(name)
                if key.startswith(_LM_PREFIX):
                    yield key[len(_LM_PREFIX) :], tensor
                elif key in params:
                    param = params[key]
                    if tuple(param.shape) != tuple(tensor.shape):
                        raise CheckpointError(
                            f"{name} has shape {tuple(tensor.shape)}, the config expects {tuple(param.shape)}"
                        )
                    getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                    loaded.add(key)
                else:
                    raise CheckpointError(f"{name}: no such parameter in Video-LLaVA ({key})")

        loaded |= {_LM_PREFIX + name for name in self.language_model.load_weights(llm_weights())}
        return loaded
