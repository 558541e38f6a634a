"""Sampling parameters are checked at the door, and one row that cannot be sampled never hurts the others."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from videollava.errors import VideoLlavaError
from videollava.infer.sampling import (
    MAX_NEW_TOKENS,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_TEMPERATURE,
    SamplingFault,
    SamplingParams,
    pick_tokens,
)

VOCAB = 50


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"temperature": math.nan}, "temperature must be a finite number, got nan"),
        ({"temperature": math.inf}, "temperature must be a finite number, got inf"),
        ({"temperature": "0.5"}, "temperature must be a finite number"),
        ({"temperature": True}, "temperature must be a finite number"),
        ({"temperature": -0.1}, f"temperature must be from 0 (greedy) to {MAX_TEMPERATURE:g}, got -0.1"),
        ({"temperature": 2.5}, f"temperature must be from 0 (greedy) to {MAX_TEMPERATURE:g}, got 2.5"),
        ({"top_p": math.nan}, "top_p must be a finite number, got nan"),
        ({"top_p": -math.inf}, "top_p must be a finite number, got -inf"),
        ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
        ({"seed": 2**64}, "seed must be an integer from -9223372036854775808 to 18446744073709551615"),
        ({"seed": -(2**63) - 1}, "seed must be an integer from"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"seed": "7"}, "seed must be an integer"),
        ({"max_new_tokens": 0}, f"max_new_tokens must be an integer from 1 to {MAX_NEW_TOKENS}, got 0"),
        ({"max_new_tokens": -2}, "max_new_tokens must be an integer from 1"),
        ({"max_new_tokens": MAX_NEW_TOKENS + 1}, "max_new_tokens must be an integer from 1"),
        ({"max_new_tokens": 8.0}, "max_new_tokens must be an integer"),
        ({"stop": "END"}, "stop must be a list of strings"),
        ({"stop": [""]}, f"each stop string must hold 1 to {MAX_STOP_CHARS} characters"),
        ({"stop": ["x" * (MAX_STOP_CHARS + 1)]}, "each stop string must hold 1 to"),
        ({"stop": [3]}, "each stop string must hold 1 to"),
        ({"stop": ["a"] * (MAX_STOP_STRINGS + 1)}, f"stop takes at most {MAX_STOP_STRINGS} strings"),
    ],
)
def test_bad_parameters_are_refused_naming_the_parameter_and_range(fields, message):
    with pytest.raises(VideoLlavaError) as caught:
        SamplingParams(**fields)
    assert message in str(caught.value)


def test_tiny_temperatures_are_greedy_and_params_are_frozen():
    for tiny in (3e-38, 5e-324, 9.99e-6):
        params = SamplingParams(temperature=tiny)
        assert params.greedy and params.temperature == 0.0 and params.generator() is None
    assert not SamplingParams(temperature=1e-5).greedy
    params = SamplingParams(temperature=1, stop=("a",))
    assert isinstance(params.temperature, float) and params.stop == ["a"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.temperature = 3e-38  # type: ignore[misc]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(min_value=-(2**63), max_value=2**64 - 1))
@example(seed=-(2**63))
@example(seed=2**64 - 1)
@example(seed=2**63)
def test_every_accepted_seed_seeds_a_generator_reproducibly(seed):
    params = SamplingParams(temperature=1.0, seed=seed)
    draws = [torch.rand(4, generator=params.generator()) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])


@settings(max_examples=80, deadline=None)
@given(
    temperature=st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=MAX_TEMPERATURE)),
    top_p=st.floats(min_value=0.0, max_value=1.0, exclude_min=True),
    seed=st.integers(min_value=-(2**63), max_value=2**64 - 1),
    scale=st.sampled_from([1e-3, 1.0, 30.0, 1e4]),
)
def test_any_accepted_parameters_sample_a_token_without_raising(temperature, top_p, seed, scale):
    params = SamplingParams(temperature=temperature, top_p=top_p, seed=seed)
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(0)) * scale
    tokens = pick_tokens(logits, [params, params], [params.generator(), params.generator()])
    assert all(isinstance(t, int) and 0 <= t < VOCAB for t in tokens)


def test_a_vanishing_top_p_keeps_the_most_likely_token():
    """top_p 1e-300 rounds to 0 in float32; the most likely token must still be kept, never none."""
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(1)) * 3
    params = SamplingParams(temperature=1.5, top_p=1e-300)
    for seed in range(5):
        generators = [torch.Generator().manual_seed(seed) for _ in range(3)]
        assert pick_tokens(logits, [params] * 3, generators) == logits.argmax(-1).tolist()


def _hostile(temperature: float) -> SamplingParams:
    """Parameters that slip past the door the way they did before it was checked."""
    params = SamplingParams(temperature=1.0)
    object.__setattr__(params, "temperature", temperature)
    return params


def test_a_row_that_cannot_be_sampled_is_reported_alone():
    # Scores of a real model's size: divided by 3e-38 they overflow float32.
    logits = torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(2)) * 40
    logits[3] = math.nan  # a model fault in one row
    sampled = SamplingParams(temperature=0.8, top_p=0.9, seed=11)
    params = [SamplingParams(), _hostile(3e-38), sampled, SamplingParams(), sampled]
    picked = pick_tokens(logits, params, [p.generator() for p in params])

    assert isinstance(picked[1], SamplingFault)
    assert "not finite at temperature 3e-38" in str(picked[1]) and picked[1].client_message
    assert isinstance(picked[3], SamplingFault)
    assert "not finite" in str(picked[3]) and "usable" in picked[3].client_message
    # The healthy rows get what they get in a batch of their own.
    healthy = [0, 2, 4]
    alone = pick_tokens(
        logits[healthy], [params[i] for i in healthy], [params[i].generator() for i in healthy]
    )
    assert [picked[i] for i in healthy] == alone
    assert picked[0] == int(logits[0].argmax())


def test_any_exception_while_sampling_one_row_becomes_that_rows_fault():
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(3))
    params = SamplingParams(temperature=1.0, seed=1)

    class NotAGenerator:
        device = torch.device("cpu")

    picked = pick_tokens(logits, [params, params], [NotAGenerator(), params.generator()])
    assert isinstance(picked[0], SamplingFault) and "TypeError" in str(picked[0])  # from multinomial
    assert picked[0].client_message == "sampling failed"
    assert isinstance(picked[1], int)
