"""The verifier's pure functions: exact greedy outcomes, and the speculative-sampling identity
(every emitted token follows p) checked statistically with a broken-verifier negative control."""

from __future__ import annotations

import pytest
import torch

from dspark.decode.verify import (check_same_tokenizer, common_vocab_size, expected_acceptance, verify_greedy,
                                  verify_sampling)
from dspark.errors import IncompatibleTokenizersError


def onehot_logits(ids: list[int], vocab: int) -> torch.Tensor:
    out = torch.zeros(len(ids), vocab)
    out[torch.arange(len(ids)), torch.tensor(ids)] = 5.0
    return out


def test_greedy_all_accepted_gives_bonus():
    drafts = torch.tensor([3, 1, 4])
    res = verify_greedy(drafts, onehot_logits([3, 1, 4, 7], 8))
    assert (res.n_accepted.item(), res.next_token.item(), res.is_bonus.item()) == (3, 7, True)


def test_greedy_first_mismatch_is_recovered():
    drafts = torch.tensor([3, 1, 4])
    res = verify_greedy(drafts, onehot_logits([3, 2, 4, 7], 8))
    assert (res.n_accepted.item(), res.next_token.item(), res.is_bonus.item()) == (1, 2, False)


def test_greedy_never_accepted():
    res = verify_greedy(torch.tensor([5, 5]), onehot_logits([0, 5, 5], 8))
    assert (res.n_accepted.item(), res.next_token.item(), res.is_bonus.item()) == (0, 0, False)


def test_greedy_batched_rows_respect_their_own_num_drafts():
    drafts = torch.tensor([[1, 2, 3], [1, 2, 3], [1, 9, 3]])
    logits = torch.stack([onehot_logits([1, 2, 3, 4], 10)] * 3)
    res = verify_greedy(drafts, logits, torch.tensor([3, 1, 3]))
    assert res.n_accepted.tolist() == [3, 1, 1]
    # row 1 drafted one token: its bonus comes from position 1, whatever it drafted after
    assert res.next_token.tolist() == [4, 2, 2]
    assert res.is_bonus.tolist() == [True, True, False]


def test_zero_drafts_is_target_only():
    res = verify_greedy(torch.zeros(2, 0, dtype=torch.long), torch.stack([onehot_logits([6], 8)] * 2))
    assert res.n_accepted.tolist() == [0, 0] and res.next_token.tolist() == [6, 6] and res.is_bonus.all()
    p = torch.tensor([[[0.0, 1.0, 0.0]]])
    gen = torch.Generator().manual_seed(0)
    res = verify_sampling(torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, 3), p, gen)
    assert res.next_token.tolist() == [1] and res.is_bonus.tolist() == [True]


def test_sampling_identical_distributions_always_accept():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(64, 3, 6, generator=g), -1)
    drafts = torch.multinomial(probs.reshape(-1, 6), 1, generator=g).reshape(64, 3)
    target = torch.cat([probs, torch.softmax(torch.randn(64, 1, 6, generator=g), -1)], dim=1)
    res = verify_sampling(drafts, probs, target, g)
    assert res.n_accepted.tolist() == [3] * 64 and res.is_bonus.all()


def test_sampling_disjoint_support_never_accepts_and_recovers_from_p():
    q = torch.tensor([[[0.5, 0.5, 0.0, 0.0]]]).expand(200, 1, 4)
    p = torch.tensor([[[0.0, 0.0, 0.25, 0.75], [0.25, 0.25, 0.25, 0.25]]]).expand(200, 2, 4)
    drafts = torch.zeros(200, 1, dtype=torch.long)
    res = verify_sampling(drafts, q, p, torch.Generator().manual_seed(1))
    assert res.n_accepted.sum() == 0 and not res.is_bonus.any()
    assert set(res.next_token.tolist()) <= {2, 3}


def _emitted_pairs(verifier, p, q, n, seed):
    """Run one verify over n identical rows (K=2, V small); return the first two emitted tokens per row
    where two were emitted, and the first emitted token of every row."""
    g = torch.Generator().manual_seed(seed)
    v = p.shape[-1]
    drafts = torch.stack([torch.multinomial(q[j], n, replacement=True, generator=g) for j in range(2)], dim=1)
    res = verifier(drafts, q.expand(n, 2, v), p.expand(n, 3, v), g)
    first = torch.where(res.n_accepted >= 1, drafts[:, 0], res.next_token)
    two = res.n_accepted >= 1
    second = torch.where(res.n_accepted >= 2, drafts[:, 1], res.next_token)[two]
    return first, second


def _tv(samples: torch.Tensor, probs: torch.Tensor) -> float:
    emp = torch.bincount(samples, minlength=probs.numel()).float() / samples.numel()
    return 0.5 * (emp - probs).abs().sum().item()


def test_sampling_emits_the_target_distribution_and_a_broken_verifier_does_not():
    # q is far from p (TV(p0, q0) = 0.5): an uncorrected sampler is easy to tell apart.
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0], [0.5, 0.1, 0.1, 0.1, 0.2], [0.2, 0.2, 0.2, 0.2, 0.2]])
    q = torch.tensor([[0.4, 0.3, 0.2, 0.05, 0.05], [0.1, 0.1, 0.1, 0.1, 0.6]])
    n = 40000
    # Threshold: with 40k samples over 5 cells the empirical TV is ~0.005; 0.02 is > 4 sigma above it
    # and far below the TV a draft-only sampler shows (0.4 for the first token).
    threshold = 0.02
    first, second = _emitted_pairs(verify_sampling, p, q, n, seed=0)
    assert _tv(first, p[0]) < threshold
    assert _tv(second, p[1]) < threshold
    assert 4 not in first.tolist()  # p0(4) = 0: never emitted, though the draft proposes it

    def accept_all(drafts, q_, p_, g):  # the negative control: samples the draft without correction
        from dspark.decode.verify import VerifyResult
        b, k = drafts.shape
        return VerifyResult(torch.full((b,), k), torch.multinomial(p_[:, k], 1, generator=g).squeeze(1),
                            torch.ones(b, dtype=torch.bool))

    bad_first, _ = _emitted_pairs(accept_all, p, q, n, seed=0)
    assert _tv(bad_first, p[0]) > 10 * threshold


def test_sampling_acceptance_rate_matches_one_minus_tv():
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25] * 4])
    q = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    n = 40000
    g = torch.Generator().manual_seed(3)
    drafts = torch.multinomial(q[0], n, replacement=True, generator=g)[:, None]
    res = verify_sampling(drafts, q.expand(n, 1, 4), p.expand(n, 2, 4), g)
    rate = res.n_accepted.float().mean().item()
    assert abs(rate - expected_acceptance(p[0], q[0]).item()) < 0.01  # 1 - TV = 0.6


def test_shape_errors():
    with pytest.raises(ValueError):
        verify_greedy(torch.tensor([[1, 2]]), torch.zeros(1, 2, 5))
    with pytest.raises(ValueError):
        verify_sampling(torch.tensor([[1]]), torch.zeros(1, 1, 4), torch.zeros(1, 2, 5))


def test_common_vocab_size():
    assert common_vocab_size(32064, 32000, 32000) == 32000
    assert common_vocab_size(512, 576) == 512
    assert common_vocab_size(4096, None, 4100) == 4096


class _Tok:
    def __init__(self, vocab):
        self.vocab = vocab

    def get_vocab(self):
        return dict(self.vocab)


def test_check_same_tokenizer():
    check_same_tokenizer(_Tok({"a": 0, "b": 1}), _Tok({"b": 1, "a": 0}))
    with pytest.raises(IncompatibleTokenizersError, match="differ"):
        check_same_tokenizer(_Tok({"a": 0, "b": 1}), _Tok({"a": 1, "b": 0}))
