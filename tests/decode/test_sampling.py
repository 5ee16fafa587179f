"""Warping matches Hugging Face's logits warpers (temperature -> top-k -> top-p), so "the target's
warped distribution" means the same in dspark and in HF `generate`."""

from __future__ import annotations

import pytest
import torch

from dspark.decode.sampling import make_generator, sample, warp_logits
from dspark.errors import DsparkError


def hf_warp(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.softmax(-1)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0),
                                                     (1.0, 0, 0.9), (0.8, 10, 0.5), (2.0, 3, 0.95)])
def test_matches_hf_warpers(temperature, top_k, top_p):
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    ours = warp_logits(logits, temperature, top_k, top_p)
    assert torch.allclose(ours, hf_warp(logits, temperature, top_k, top_p), atol=1e-6)
    assert torch.allclose(ours.sum(-1), torch.ones(6))


def test_top_k_and_top_p_keep_the_right_sets():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert (warp_logits(logits, 1.0, top_k=2) > 0).tolist() == [True, True, False, False]
    # top_p 0.8: 0.5 + 0.3 reaches it, so two tokens stay; 0.81 needs a third
    assert (warp_logits(logits, 1.0, top_p=0.8) > 0).tolist() == [True, True, False, False]
    assert (warp_logits(logits, 1.0, top_p=0.81) > 0).tolist() == [True, True, True, False]
    assert (warp_logits(logits, 1.0, top_p=0.01) > 0).tolist() == [True, False, False, False]


def test_disallowed_tokens_stay_at_zero():
    logits = torch.tensor([[1.0, float("-inf"), 2.0, 0.5]])
    probs = warp_logits(logits, 0.5, top_k=3)
    assert probs[0, 1] == 0 and torch.isfinite(probs).all()


@pytest.mark.parametrize("kwargs,match", [({"temperature": 0.0}, "temperature"), ({"temperature": -1.0}, "temperature"),
                                          ({"temperature": 1.0, "top_p": 0.0}, "top_p"),
                                          ({"temperature": 1.0, "top_p": 1.5}, "top_p"),
                                          ({"temperature": 1.0, "top_k": -1}, "top_k")])
def test_bad_params(kwargs, match):
    with pytest.raises(DsparkError, match=match):
        warp_logits(torch.zeros(1, 4), **kwargs)


def test_seeded_sampling_is_reproducible():
    probs = torch.softmax(torch.randn(3, 20, generator=torch.Generator().manual_seed(0)), -1)
    a = [sample(probs, make_generator(7, "cpu")).tolist() for _ in range(2)]
    assert a[0] == a[1]
    draws = torch.stack([sample(probs, g) for g in [make_generator(7, "cpu")] for _ in range(50)])
    assert len({tuple(r) for r in draws.tolist()}) > 1
