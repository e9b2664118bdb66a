"""Greedy, temperature, top-k, top-p and seeds."""

from __future__ import annotations

import pytest
import torch

from edgeheads.headnode.sampling import Sampler, SamplingParams

LOGITS = torch.tensor([1.0, 3.0, 2.5, -1.0, 0.5])


def draws(params: SamplingParams, n: int = 400) -> list[int]:
    sampler = Sampler(params)
    return [sampler(LOGITS) for _ in range(n)]


def test_greedy_is_argmax():
    assert set(draws(SamplingParams(), 20)) == {1}


def test_seed_makes_sampling_repeatable_and_seeds_differ():
    a = draws(SamplingParams(temperature=1.0, seed=7))
    assert a == draws(SamplingParams(temperature=1.0, seed=7))
    assert a != draws(SamplingParams(temperature=1.0, seed=8))
    assert len(set(a)) == 5


def test_top_k_keeps_only_the_k_best():
    assert set(draws(SamplingParams(temperature=1.0, top_k=2, seed=1))) == {1, 2}
    assert set(draws(SamplingParams(temperature=5.0, top_k=1, seed=1), 50)) == {1}


def test_top_p_keeps_the_smallest_nucleus():
    probs = LOGITS.softmax(-1)  # sorted: 1 (0.53), 2 (0.32), 0 (0.07), 4 (0.04), 3 (0.01)
    assert probs[1] < 0.6 < probs[1] + probs[2]
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.6, seed=3))) == {1, 2}
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.5, seed=3), 50)) == {1}


def test_low_temperature_concentrates_high_temperature_spreads():
    cold = draws(SamplingParams(temperature=0.05, seed=0))
    hot = draws(SamplingParams(temperature=10.0, seed=0))
    assert cold.count(1) > 390
    assert hot.count(1) < 200


@pytest.mark.parametrize("kwargs", [dict(max_new_tokens=0), dict(temperature=-0.1), dict(top_k=-1),
                                    dict(top_p=0.0), dict(top_p=1.5), dict(temperature=float("nan"))])
def test_invalid_params_are_rejected(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
