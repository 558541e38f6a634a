"""Parity with the transformers port on the same tiny random weights (no temporal weights).

Tolerances: fp32 throughout; hidden states and logits agree within 1e-4 absolute.
"""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionModel, VideoLlavaForConditionalGeneration

from videollava.constants import IMAGE_SLOT, VIDEO_SLOT
from videollava.data.tokenize import tokenize_multimodal
from videollava.infer.engine import Engine
from videollava.infer.request import Prepared
from videollava.infer.sampling import SamplingParams
from videollava.model.checkpoint import load_weights, save_weights
from videollava.testing import TINY_VISION as VISION

ATOL = 1e-4
SIZE = VISION["image_size"]
PATCHES = (SIZE // VISION["patch_size"]) ** 2
FRAMES = 8


@pytest.fixture(scope="module")
def ours(hf_checkpoint):
    model, _ = load_weights(hf_checkpoint[0], torch.float32)
    return model


def expand_for_hf(ids: list[int], image_id: int, video_id: int) -> list[int]:
    out: list[int] = []
    for token in ids:
        if token == IMAGE_SLOT:
            out += [image_id] * PATCHES
        elif token == VIDEO_SLOT:
            out += [video_id] * (FRAMES * (PATCHES + 1))
        else:
            out.append(token)
    return out


def hf_batch(hf, sequences: list[list[int]], pad_id: int):
    """Left-padded input_ids / attention_mask for transformers."""
    cfg = hf.config
    expanded = [expand_for_hf(s, cfg.image_token_index, cfg.video_token_index) for s in sequences]
    width = max(len(s) for s in expanded)
    ids = torch.full((len(expanded), width), pad_id)
    mask = torch.zeros((len(expanded), width), dtype=torch.long)
    for i, s in enumerate(expanded):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
    return ids, mask


def test_image_tower_matches_clip_vision_model(hf_checkpoint, ours):
    _, hf = hf_checkpoint
    clip = CLIPVisionModel(hf.config.vision_config).eval()
    clip.load_state_dict(hf.model.image_tower.state_dict())
    pixels = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        reference = clip(pixels, output_hidden_states=True).hidden_states
        for layer in range(len(reference)):
            got = ours.image_tower.hidden_state(pixels, layer=layer)
            torch.testing.assert_close(got, reference[layer], atol=ATOL, rtol=0)


def _prompts(tokenizer):
    texts = {
        "image": "USER: <image>\nWhat color is the circle? ASSISTANT:",
        "video": "USER: <video>\nWhich direction does the red square move? ASSISTANT:",
        "both": "USER: <video>\n<image>\nAre they the same? ASSISTANT:",
        "text": "USER: How many objects are there? ASSISTANT:",
    }
    return {k: tokenize_multimodal(tokenizer, v).input_ids for k, v in texts.items()}


def _media(kinds):
    torch.manual_seed(1)
    images = [torch.randn(3, SIZE, SIZE) for k in kinds if k in ("image", "both")]
    videos = [torch.randn(FRAMES, 3, SIZE, SIZE) for k in kinds if k in ("video", "both")]
    return (torch.stack(images) if images else None), (torch.stack(videos) if videos else None)


@pytest.mark.parametrize(
    "kinds", [["image"], ["video"], ["both"], ["text"], ["image", "video", "text", "both"]]
)
def test_logits_match_transformers(hf_checkpoint, ours, tiny_tokenizer, kinds):
    _, hf = hf_checkpoint
    prompts = _prompts(tiny_tokenizer)
    sequences = [prompts[k] for k in kinds]
    images, videos = _media(kinds)
    ids, mask = hf_batch(hf, sequences, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        reference = hf(
            input_ids=ids, attention_mask=mask, pixel_values=images, pixel_values_videos=videos
        ).logits
        features = ours.visual_features_for(sequences, images, videos)
        batch = ours.splice(sequences, features, padding_side="left")
        got = ours.language_model(
            inputs_embeds=batch.inputs_embeds,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
        ).logits
    assert got.shape == reference.shape
    real = mask.bool()
    torch.testing.assert_close(got[real], reference[real], atol=ATOL, rtol=0)


def _ours_greedy(ours, tokenizer, sequences, images, videos, batch_size, max_new_tokens=6):
    class _Decoder:
        eos_token_id = tokenizer.eos_token_id

        def decode(self, ids):
            return tokenizer.decode(ids, skip_special_tokens=True)

    features = ours.visual_features_for(sequences, images, videos)
    prepared = []
    for seq, feats in zip(sequences, features, strict=True):
        blocks = iter(feats)
        # Position keys as the pipeline makes them: token ids, and one content key per media block.
        key = [t if t >= 0 else f"media:{hash(next(blocks).numpy().tobytes())}" for t in seq]
        prepared.append(Prepared(seq, feats, key, sum(x.shape[0] for x in feats)))
    engine = Engine(ours, _Decoder(), max_batch_size=batch_size)
    params = SamplingParams(max_new_tokens=max_new_tokens)
    return [c.token_ids for c in engine.generate(prepared, params)]


def test_greedy_tokens_match_transformers_and_batching(hf_checkpoint, ours, tiny_tokenizer):
    _, hf = hf_checkpoint
    kinds = ["image", "video", "text", "both"]
    prompts = _prompts(tiny_tokenizer)
    sequences = [prompts[k] for k in kinds]
    images, videos = _media(kinds)
    eos = tiny_tokenizer.eos_token_id
    with torch.no_grad():
        batched = _ours_greedy(ours, tiny_tokenizer, sequences, images, videos, batch_size=4)
        alone = []
        image_iter, video_iter = iter(images), iter(videos)
        for kind, seq in zip(kinds, sequences, strict=True):
            im = next(image_iter)[None] if kind in ("image", "both") else None
            vi = next(video_iter)[None] if kind in ("video", "both") else None
            alone.append(_ours_greedy(ours, tiny_tokenizer, [seq], im, vi, batch_size=1)[0])
            ids, mask = hf_batch(hf, [seq], tiny_tokenizer.pad_token_id)
            media = {k: v for k, v in (("pixel_values", im), ("pixel_values_videos", vi)) if v is not None}
            reference = hf.generate(
                input_ids=ids,
                attention_mask=mask,
                **media,
                do_sample=False,
                max_new_tokens=6,
                eos_token_id=eos,
                pad_token_id=tiny_tokenizer.pad_token_id,
            )[0, ids.shape[1] :].tolist()
            if eos in reference:
                reference = reference[: reference.index(eos) + 1]
            assert alone[-1] == reference, kind
    assert batched == alone


def test_saved_folder_loads_in_transformers(hf_checkpoint, ours, tiny_tokenizer, tmp_path):
    _, hf = hf_checkpoint
    save_weights(ours, tmp_path)
    reloaded = VideoLlavaForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).eval()
    sequences = [_prompts(tiny_tokenizer)["both"]]
    images, videos = _media(["both"])
    ids, mask = hf_batch(hf, sequences, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        a = hf(input_ids=ids, attention_mask=mask, pixel_values=images, pixel_values_videos=videos).logits
        b = reloaded(
            input_ids=ids, attention_mask=mask, pixel_values=images, pixel_values_videos=videos
        ).logits
    torch.testing.assert_close(b, a, atol=ATOL, rtol=0)
    # and back into ours
    again, _ = load_weights(tmp_path, torch.float32)
    for (name, p), q in zip(ours.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
