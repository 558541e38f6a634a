"""Tensor parallelism: vLLM's LLaMA split over two workers, our towers replicated on both, the same tokens."""

from __future__ import annotations

import gc
import os

import pytest

from tests.vllm.conftest import MAX_TOKENS, ask_batch


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two CPU workers need two cores")
def test_two_way_tensor_parallel_matches_ask(temporal_checkpoint, media, tmp_path, monkeypatch):
    from vllm import LLM, SamplingParams

    from videollava.data.conversation import build_prompt
    from videollava.data.images import load_image
    from videollava.data.media import read_video_frames

    question = "Compare them."
    request = {"prompt": question, "image": str(media["wide"]), "video": str(media["clip"])}
    [answer] = ask_batch(temporal_checkpoint, [request], tmp_path)
    # One core per worker: vLLM's CPU backend binds each worker's threads to its own cores.
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    llm = LLM(
        model=str(temporal_checkpoint),
        dtype="float32",
        max_model_len=1024,
        enforce_eager=True,
        tensor_parallel_size=2,
        max_num_seqs=2,
    )
    prompt = {
        "prompt": build_prompt(question, 1, 1, "hf"),
        "multi_modal_data": {
            "image": load_image(media["wide"]),
            "video": read_video_frames(media["clip"], 8),
        },
    }
    [output] = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    del llm  # its workers stop now, while the test's output is still captured
    gc.collect()
    assert list(output.outputs[0].token_ids) == answer["token_ids"]
