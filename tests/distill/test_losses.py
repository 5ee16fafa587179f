"""Distillation objectives against known identities (torchtune style): zero for identical
distributions, JSD endpoints equal the KLs, TVD = 1 - sum min, top-K + tail bounds, finite
gradients, masking and padded vocabularies."""

import math

import pytest
import torch

from dspark.distill import losses as L
from dspark.errors import DsparkError

ALL = ["fkl", "rkl", "jsd", "jsd:0.1", "jsd:0.9", "tvd"]


def random_logits(n=32, v=97, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * scale


def cached(target_logits, k):
    """What the cache stores: top-K log-probs (float16), ids, tail mass (float32)."""
    logp = torch.log_softmax(target_logits.float(), -1)
    values, ids = logp.topk(k, -1)
    tail = (1 - values.double().exp().sum(-1)).clamp_min(0).float()
    return values.half(), ids, tail


# -- identities on full distributions ------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_zero_for_identical_distributions(name):
    t = random_logits()
    obj = L.parse_objective(name)
    logp, logq = L.full_support(t, t.clone())
    assert obj(logp, logq).abs().max() < 1e-5
    assert L.full_loss(name, t, t.clone()).abs() < 1e-5


@pytest.mark.parametrize("name", ALL)
def test_positive_for_different_distributions(name):
    t, d = random_logits(seed=1), random_logits(seed=2)
    assert (L.parse_objective(name)(*L.full_support(t, d)) > 1e-3).all()


def test_kl_matches_direct_formula():
    t, d = random_logits(seed=3), random_logits(seed=4)
    p, q = torch.softmax(t, -1), torch.softmax(d, -1)
    logp, logq = L.full_support(t, d)
    assert torch.allclose(L.forward_kl(logp, logq), (p * (p.log() - q.log())).sum(-1), atol=1e-5)
    assert torch.allclose(L.reverse_kl(logp, logq), (q * (q.log() - p.log())).sum(-1), atol=1e-5)
    # torch's kl_div(input=log q, target=log p, log_target) is KL(p||q)
    ref = torch.nn.functional.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)
    assert torch.allclose(L.forward_kl(logp, logq), ref, atol=1e-5)


def test_jsd_endpoints_equal_the_kls_and_are_continuous():
    t, d = random_logits(seed=5, scale=1.0).double(), random_logits(seed=6, scale=1.0).double()
    logp, logq = torch.log_softmax(t, -1), torch.log_softmax(d, -1)
    fkl, rkl = L.forward_kl(logp, logq), L.reverse_kl(logp, logq)
    assert torch.equal(L.generalized_jsd(logp, logq, 0.0), fkl)
    assert torch.equal(L.generalized_jsd(logp, logq, 1.0), rkl)
    # the scaled family tends to the KLs (the error is O(beta * max p/q), so it converges
    # monotonically as beta -> 0 and is tiny once beta * max(p/q) << 1)
    errs = [(L.generalized_jsd(logp, logq, b) - fkl).abs().max() for b in (1e-2, 1e-4, 1e-7)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-5
    errs = [(L.generalized_jsd(logp, logq, 1 - b) - rkl).abs().max() for b in (1e-2, 1e-4, 1e-7)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-5


def test_jsd_interior_is_trl_convention_rescaled():
    """beta * KL(p||m) + (1-beta) * KL(q||m), m = beta p + (1-beta) q (trl's generalized_jsd_loss),
    divided by beta (1 - beta)."""
    t, d = random_logits(seed=7).double(), random_logits(seed=8).double()
    p, q = torch.softmax(t, -1), torch.softmax(d, -1)
    for beta in (0.1, 0.5, 0.8):
        m = beta * p + (1 - beta) * q
        raw = beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)
        got = L.generalized_jsd(torch.log_softmax(t, -1), torch.log_softmax(d, -1), beta)
        assert torch.allclose(got, raw / (beta * (1 - beta)), atol=1e-9)
    # JSD(0.5) * 0.25 is the classic Jensen-Shannon divergence, bounded by log 2
    js = L.generalized_jsd(torch.log_softmax(t, -1), torch.log_softmax(d, -1), 0.5) * 0.25
    assert (js <= math.log(2) + 1e-9).all()


def test_tvd_equals_one_minus_sum_min():
    t, d = random_logits(seed=9), random_logits(seed=10)
    logp, logq = L.full_support(t, d)
    p, q = logp.exp(), logq.exp()
    assert torch.allclose(L.tvd(logp, logq), 0.5 * (p - q).abs().sum(-1), atol=1e-6)
    assert torch.allclose(L.tvd(logp, logq), 1 - torch.minimum(p, q).sum(-1), atol=1e-6)
    assert torch.allclose(L.expected_acceptance(logp, logq), 1 - L.tvd(logp, logq), atol=1e-6)


def test_acceptance_matches_speculative_sampling_frequency():
    """sum min(p, q) is the acceptance probability of speculative sampling: check it by sampling."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(12, generator=g) * 2, -1)
    q = torch.softmax(torch.randn(12, generator=g) * 2, -1)
    n = 200_000
    x = torch.multinomial(q, n, replacement=True, generator=g)
    accept = torch.rand(n, generator=g) < (p[x] / q[x]).clamp(max=1)
    expected = float(L.expected_acceptance(p.log()[None], q.log()[None]))
    assert abs(accept.float().mean().item() - expected) < 0.005


# -- top-K + tail -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_topk_zero_when_draft_equals_target(name):
    t = random_logits(seed=11)
    lp, ids, tail = cached(t, k=8)
    assert L.topk_loss(name, lp, ids, t.clone(), tail).abs() < 2e-3  # float16 rounding of log-probs


def test_topk_equals_full_when_k_covers_vocab():
    t, d = random_logits(v=20, seed=12), random_logits(v=20, seed=13)
    logp = torch.log_softmax(t, -1)
    values, ids = logp.topk(20, -1)
    for name in ALL:
        full = L.full_loss(name, t, d)
        top = L.topk_loss(name, values, ids, d, torch.zeros(values.shape[0]))
        assert torch.allclose(top, full, atol=1e-5), name


def test_topk_tail_bounds_on_random_distributions():
    """The top-K + tail bucketing is p and q pushed through x -> (x if x in top-K else TAIL), so:
    KLs and JSD of the buckets are <= the full ones (data processing), and
    0 <= TVD_full - TVD_bucket <= min(p_tail, q_tail)."""
    for seed, (v, k, scale) in enumerate([(64, 4, 1.0), (256, 16, 2.0), (512, 64, 4.0), (97, 1, 0.5)]):
        t, d = random_logits(n=64, v=v, scale=scale, seed=100 + seed), random_logits(n=64, v=v, scale=scale,
                                                                                       seed=200 + seed)
        logp_full, logq_full = L.full_support(t, d)
        values, ids = logp_full.topk(k, -1)
        tail = 1 - values.double().exp().sum(-1)
        logp_b, logq_b = L.topk_support(values, ids, d, tail=tail.float())
        assert torch.allclose(logp_b.exp().sum(-1), torch.ones(64), atol=1e-5)
        assert torch.allclose(logq_b.exp().sum(-1), torch.ones(64), atol=1e-5)
        for fn in (L.forward_kl, L.reverse_kl, lambda a, b: L.generalized_jsd(a, b, 0.3)):
            assert (fn(logp_b, logq_b) <= fn(logp_full, logq_full) + 1e-5).all()
        gap = L.tvd(logp_full, logq_full) - L.tvd(logp_b, logq_b)
        q_tail = logq_b[:, -1].exp()
        bound = torch.minimum(tail.float(), q_tail)
        assert (gap >= -1e-6).all() and (gap <= bound + 1e-6).all()
        assert gap.max() > 0  # the bound is not vacuous: the tail does hide some mismatch
        lower, upper = L.acceptance_bounds(logp_b, logq_b)
        acc = L.expected_acceptance(logp_full, logq_full)
        assert (lower <= acc + 1e-6).all() and (acc <= upper + 1e-6).all()


def test_draft_tail_is_exact_mass_outside_support():
    t, d = random_logits(seed=14), random_logits(seed=15)
    lp, ids, tail = cached(t, k=5)
    _, logq = L.topk_support(lp, ids, d, tail)
    q = torch.softmax(d, -1)
    outside = q.sum(-1) - q.gather(-1, ids).sum(-1)
    assert torch.allclose(logq[:, -1].exp(), outside, atol=1e-6)


def test_zero_tail_is_floored_so_reverse_kl_stays_finite():
    t, d = random_logits(seed=16), random_logits(seed=17)
    lp, ids, _ = cached(t, k=4)
    loss = L.topk_loss("rkl", lp, ids, d, tail=torch.zeros(lp.shape[0]))
    assert torch.isfinite(loss)


# -- gradients, masking, padded vocabularies ------------------------------------------------------

@pytest.mark.parametrize("name", ALL + ["jsd:0", "jsd:1"])
def test_gradients_finite_including_empty_buckets(name):
    t = random_logits(v=30, seed=18)
    d = random_logits(v=30, seed=19).requires_grad_(True)
    lp, ids, tail = cached(t, k=8)
    L.topk_loss(name, lp, ids, d, tail).backward()
    assert torch.isfinite(d.grad).all() and d.grad.abs().sum() > 0
    # K = V: both tails are empty (-inf); no NaN may leak into the gradient
    d.grad = None
    values, all_ids = torch.log_softmax(t, -1).topk(30, -1)
    L.topk_loss(name, values, all_ids, d, torch.zeros(values.shape[0])).backward()
    assert torch.isfinite(d.grad).all()
    d.grad = None
    L.full_loss(name, t, d).backward()
    assert torch.isfinite(d.grad).all()


def test_mask_ignores_padded_positions_even_with_garbage():
    t, d = random_logits(n=6, seed=20), random_logits(n=6, seed=21)
    lp, ids, tail = cached(t, k=8)
    mask = torch.tensor([True, True, False, True, False, True])
    ref = L.topk_loss("fkl", lp[mask], ids[mask], d[mask], tail[mask])
    lp2, tail2 = lp.clone(), tail.clone()
    lp2[~mask] = float("nan")  # padded rows may hold anything
    tail2[~mask] = float("inf")
    d2 = d.clone().requires_grad_(True)
    got = L.topk_loss("fkl", lp2, ids, d2, tail2, mask=mask)
    assert torch.allclose(got, ref, atol=1e-6)
    got.backward()
    assert torch.isfinite(d2.grad).all() and (d2.grad[~mask] == 0).all()


def test_batched_shapes_and_mask_mean():
    t, d = random_logits(n=12, seed=22).reshape(3, 4, -1), random_logits(n=12, seed=23).reshape(3, 4, -1)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[2, 2:] = False
    flat = L.full_loss("tvd", t.reshape(12, -1)[mask.reshape(-1)], d.reshape(12, -1)[mask.reshape(-1)])
    assert torch.allclose(L.full_loss("tvd", t, d, mask=mask), flat)
    none = torch.zeros(3, 4, dtype=torch.bool)
    assert float(L.full_loss("tvd", t, d, mask=none)) == 0.0


def test_padded_vocab_slicing():
    """A draft whose output layer is padded past the tokenizer: the padded columns are not tokens."""
    t, d = random_logits(v=50, seed=24), random_logits(v=50, seed=25)
    padded = torch.cat([d, torch.full((d.shape[0], 14), 30.0)], -1)  # huge logits on fake ids
    lp, ids, tail = cached(t, k=8)
    want = L.topk_loss("fkl", lp, ids, d, tail)
    assert torch.allclose(L.topk_loss("fkl", lp, ids, padded, tail, vocab_size=50), want, atol=1e-6)
    assert not torch.allclose(L.topk_loss("fkl", lp, ids, padded, tail), want, atol=1e-3)
    # full form: the common vocabulary defaults to the shorter side
    assert torch.allclose(L.full_loss("rkl", t, padded), L.full_loss("rkl", t, d), atol=1e-6)
    with pytest.raises(DsparkError, match="vocab_size 80"):
        L.topk_loss("fkl", lp, ids, d, tail, vocab_size=80)


def test_target_ids_outside_draft_vocab_is_a_clear_error():
    t, d = random_logits(v=50, seed=26), random_logits(v=40, seed=27)
    values, ids = torch.log_softmax(t, -1).topk(50, -1)
    with pytest.raises(DsparkError, match="share a tokenizer"):
        L.topk_loss("fkl", values, ids, d)


# -- registry -----------------------------------------------------------------------------------

def test_registry_parses_specs():
    assert L.parse_objective("fkl").spec == "fkl"
    assert L.parse_objective("jsd").beta == 0.5
    assert L.parse_objective("JSD:0.3").spec == "jsd:0.3"
    assert L.parse_objective("tvd").fn is L.tvd
    assert set(L.OBJECTIVES) == {"fkl", "rkl", "jsd", "tvd"}


@pytest.mark.parametrize("bad", ["kl", "jsd:2", "jsd:x", "fkl:0.3", "", "tvd:"])
def test_registry_errors_list_valid_names(bad):
    with pytest.raises(DsparkError) as e:
        L.parse_objective(bad)
    msg = str(e.value)
    assert "\n" not in msg and repr(bad) in msg or "beta" in msg
    if bad in ("kl", "", "fkl:0.3"):
        assert "fkl" in msg and "jsd[:BETA]" in msg and "tvd" in msg
