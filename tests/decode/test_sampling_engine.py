"""Speculative sampling through the whole engine follows the target's warped distribution.

A small-vocabulary (V = 8) random Llama target and a noised copy of it as the draft; the joint distribution
of the first two generated tokens over N seeded samples (N rows of one batch, one seeded generator)
is compared with the exact target joint (computed from the target's logits) by a chi-square test.
Threshold: the 1e-4 upper quantile of chi-square with df = cells - 1 (Wilson-Hilferty), cells with
expected count < 5 pooled. The negative control replaces the verifier with one that accepts every
draft (i.e. samples the draft without correction) and must fail the same test.
"""

from __future__ import annotations

import math

import pytest
import torch

import dspark.decode.engine as engine_mod
from dspark.decode import GenerationConfig, SpeculativeDecoder
from dspark.decode.sampling import warp_logits
from dspark.decode.verify import VerifyResult
from tests.decode.decode_models import single_thread  # noqa: F401  (autouse fixture)
from tests.decode.decode_models import noised_copy, random_llama

VOCAB = 8
PROMPT = [3, 5]
N = 3000


@pytest.fixture(scope="module")
def pair():
    target = random_llama(VOCAB, seed=11, hidden=16, layers=2, scale=0.7)
    return target, noised_copy(target, 0.1, seed=1)  # joint TV to the target ~0.55: both paths matter


def exact_joint(target, temperature, top_k, top_p, prompt: list[int] = PROMPT) -> torch.Tensor:
    """[V, V]: P(x1, x2) after `prompt` under the target's warped distribution."""
    with torch.inference_mode():
        p1 = warp_logits(target(torch.tensor([prompt])).logits[0, -1], temperature, top_k, top_p)
        seqs = torch.tensor([prompt + [x] for x in range(p1.shape[-1])])
        p2 = warp_logits(target(seqs).logits[:, -1], temperature, top_k, top_p)
    return p1[:, None] * p2


def chi_square(samples: torch.Tensor, probs: torch.Tensor, n: int) -> tuple[float, float]:
    """Pearson chi-square of the observed pair counts against probs; returns (statistic, 1e-4 threshold)."""
    flat = probs.reshape(-1)
    counts = torch.bincount(samples[:, 0] * VOCAB + samples[:, 1], minlength=flat.numel()).double()
    expected = flat.double() * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().reshape(1)])
    exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    keep = exp > 0
    # counts where the target has zero probability make the statistic infinite: a real failure
    if (counts[expected == 0] > 0).any():
        return math.inf, 0.0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    df = int(keep.sum()) - 1
    z = 3.719  # upper 1e-4 normal quantile
    threshold = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return stat, threshold


def sample_pairs(target, draft, cfg, draft_length="3") -> torch.Tensor:
    dec = SpeculativeDecoder(target, draft, None, draft_length=draft_length)
    res = dec.generate([PROMPT] * N, cfg)
    assert all(len(r.token_ids) == 3 for r in res)
    return torch.tensor([r.token_ids[:2] for r in res])


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.8, 6, 0.9)])
def test_engine_samples_follow_the_target(pair, temperature, top_k, top_p):
    target, draft = pair
    joint = exact_joint(target, temperature, top_k, top_p)
    cfg = GenerationConfig(max_new_tokens=3, temperature=temperature, top_k=top_k, top_p=top_p, seed=1234,
                           ignore_eos=True)
    samples = sample_pairs(target, draft, cfg)
    stat, threshold = chi_square(samples, joint, N)
    assert stat < threshold, (stat, threshold)
    # the draft really differs from the target here (otherwise the test proves little)
    draft_joint = exact_joint(draft, temperature, top_k, top_p)
    assert 0.5 * (joint - draft_joint).abs().sum() > 0.2


def test_negative_control_uncorrected_draft_sampling_fails(pair, monkeypatch):
    target, draft = pair

    def accept_all(drafts, q, p, generator=None, num_drafts=None):
        b, k = drafts.shape
        nd = num_drafts if num_drafts is not None else torch.full((b,), k)
        bonus = torch.multinomial(p[torch.arange(b), nd], 1, generator=generator).squeeze(1)
        return VerifyResult(nd.clone(), bonus, torch.ones(b, dtype=torch.bool))

    monkeypatch.setattr(engine_mod, "verify_sampling", accept_all)
    cfg = GenerationConfig(max_new_tokens=3, temperature=1.0, seed=1234, ignore_eos=True)
    samples = sample_pairs(target, draft, cfg)
    stat, threshold = chi_square(samples, exact_joint(target, 1.0, 0, 1.0), N)
    assert stat > threshold, (stat, threshold)


def test_same_seed_same_samples(pair):
    target, draft = pair
    dec = SpeculativeDecoder(target, draft, None, draft_length=2)
    cfg = GenerationConfig(max_new_tokens=6, temperature=1.0, seed=7, ignore_eos=True)
    a = [r.token_ids for r in dec.generate([PROMPT] * 4, cfg)]
    b = [r.token_ids for r in dec.generate([PROMPT] * 4, cfg)]
    assert a == b and len({tuple(x) for x in a}) > 1
