"""Draft-length policies: parsing (and its errors), the goodput rule, auto's choice."""

from __future__ import annotations

import pytest

from dspark.decode.policy import (AUTO_CONFIDENCE, BatchablePolicy, BatchPlanner, ConfidencePolicy, CostLine,
                                  GoodputPolicy, LearnedPolicy, PolicyContext, StaticPolicy, StepFeedback,
                                  analytical_speedup, batch_goodput, best_draft_length, expected_tokens,
                                  parse_draft_length)
from dspark.errors import DsparkError

HEAD = PolicyContext(has_draft=True, has_acceptance_head=True)
NO_HEAD = PolicyContext(has_draft=True, has_acceptance_head=False)


@pytest.mark.parametrize("spec,cls,max_tokens", [("4", StaticPolicy, 4), (3, StaticPolicy, 3),
                                                 ("static:6", StaticPolicy, 6), (" static : 2 ", StaticPolicy, 2),
                                                 ("confidence:0.4", ConfidencePolicy, 16),
                                                 ("confidence:0.4:5", ConfidencePolicy, 5),
                                                 ("goodput", GoodputPolicy, 4), ("goodput:2", GoodputPolicy, 2)])
def test_parse_forms(spec, cls, max_tokens):
    pol = parse_draft_length(spec)(NO_HEAD)
    assert isinstance(pol, cls)
    assert pol.plan().max_tokens == max_tokens


def test_confidence_plan_carries_threshold():
    assert parse_draft_length("confidence:0.25")(NO_HEAD).plan().min_confidence == 0.25


@pytest.mark.parametrize("spec,match", [("0", "K must be >= 1"), ("-2", "K must be >= 1"), ("static:0", ">= 1"),
                                        ("static:x", "not an integer"), ("confidence:1.5", r"\(0, 1\)"),
                                        ("confidence:0", r"\(0, 1\)"), ("confidence", "confidence:T"),
                                        ("confidence:0.5:0", ">= 1"), ("goodput:0", ">= 1"),
                                        ("learned:2", r"\(0, 1\)"), ("auto:3", "no value"),
                                        ("fastest", "valid forms: auto, K"), ("", "valid forms"),
                                        (1.5, "valid forms"), (True, "valid forms")])
def test_parse_errors_name_the_value_and_the_valid_forms(spec, match):
    with pytest.raises(DsparkError, match=match):
        parse_draft_length(spec)


def test_learned_needs_a_head():
    factory = parse_draft_length("learned")
    with pytest.raises(DsparkError, match="acceptance head"):
        factory(NO_HEAD)
    pol = factory(HEAD)
    assert isinstance(pol, LearnedPolicy) and pol.plan().min_acceptance == 0.5
    assert parse_draft_length("learned:0.2")(HEAD).plan().min_acceptance == 0.2


def test_auto_prefers_the_head_else_goodput_with_confidence_exit():
    auto = parse_draft_length("auto")
    with_head = auto(HEAD)
    assert isinstance(with_head, LearnedPolicy) and auto.resolved_kind(HEAD) == "learned"
    without = auto(NO_HEAD)
    assert isinstance(without, GoodputPolicy) and without.plan().min_confidence == AUTO_CONFIDENCE
    assert auto.resolved_kind(NO_HEAD) == "goodput+confidence"


def test_expected_tokens_identities():
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(1.0, 5) == 6.0
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    assert analytical_speedup(0.0, 0, 0.1) == 1.0
    assert analytical_speedup(0.8, 4, 0.1, 1.0) == pytest.approx((1 - 0.8 ** 5) / 0.2 / 1.4)


def test_best_draft_length_follows_acceptance_and_cost():
    assert best_draft_length(0.95, 0.05, 1.0, 12) > best_draft_length(0.6, 0.05, 1.0, 12)
    assert best_draft_length(0.8, 0.5, 1.0, 12) < best_draft_length(0.8, 0.05, 1.0, 12)
    assert best_draft_length(0.05, 0.5, 1.0, 12) == 1
    assert best_draft_length(1.0, 0.01, 1.0, 7) == 7


def test_goodput_adapts_to_its_own_request():
    good, bad = GoodputPolicy(), GoodputPolicy()
    assert good.plan().max_tokens == 4  # no costs measured yet
    for _ in range(20):
        good.observe(StepFeedback(drafted=8, accepted=8, draft_forwards=8, draft_s=0.008, verify_s=0.01,
                                  verify_width=9))
        bad.observe(StepFeedback(drafted=4, accepted=0, draft_forwards=4, draft_s=0.004, verify_s=0.01,
                                 verify_width=5))
    assert good.acceptance > 0.9 and bad.acceptance < 0.3
    assert good.plan().max_tokens > 6
    assert bad.plan().max_tokens == 0  # the draft does not pay for itself: plain target steps
    no_zero = GoodputPolicy(allow_zero=False)
    no_zero.__dict__.update({k: bad.__dict__[k] for k in ("accepted", "rejections", "draft_cost", "verify_costs",
                                                          "position_trials", "position_accepts")})
    assert no_zero.plan().max_tokens == 1


def test_goodput_probes_with_drafts_while_it_runs_target_only():
    pol = GoodputPolicy(probe_every=3)
    for _ in range(10):
        pol.observe(StepFeedback(drafted=4, accepted=0, draft_forwards=4, draft_s=0.004, verify_s=0.01,
                                 verify_width=5))
    ks = [pol.plan().max_tokens for _ in range(8)]
    assert ks == [0, 0, 0, 1, 0, 0, 0, 1]


def test_goodput_drafts_less_in_a_compute_bound_batch():
    """Verify cost proportional to tokens in the forward (compute-bound) hurts a batch of 8 far more
    than one row; with a flat cost (overhead-bound) the batch size does not matter."""
    def trained(rows: int, per_token: float, fixed: float) -> GoodputPolicy:
        pol = GoodputPolicy()
        for _ in range(20):
            for w in (1, 2, 4):
                pol.observe(StepFeedback(drafted=w - 1, accepted=int(0.7 * (w - 1)), draft_forwards=w - 1,
                                         draft_s=0.0003 * (w - 1), verify_s=fixed + per_token * rows * w,
                                         verify_width=w, batch_rows=rows))
        return pol

    one, eight = trained(1, 0.001, 0.004), trained(8, 0.001, 0.004)
    assert eight.rows == 8 and one.plan().max_tokens >= 2 and eight.plan().max_tokens == 0
    flat1, flat8 = trained(1, 0.0, 0.01), trained(8, 0.0, 0.01)
    assert flat1.plan().max_tokens == flat8.plan().max_tokens >= 2


def test_goodput_acceptance_counts_trials_up_to_the_first_rejection():
    pol = GoodputPolicy(prior_weight=0.0)
    pol.observe(StepFeedback(drafted=5, accepted=2))  # 2 accepted, 1 rejected, 2 never judged
    assert pol.acceptance == pytest.approx(2 / 3)


def test_goodput_per_position_acceptance_and_verify_cost_line():
    pol = GoodputPolicy(prior_weight=1.0)
    for _ in range(30):  # position 0 always accepted, position 1 never
        pol.observe(StepFeedback(drafted=3, accepted=1, draft_forwards=3, draft_s=0.003, verify_s=0.010,
                                 verify_width=4))
        pol.observe(StepFeedback(drafted=1, accepted=1, draft_forwards=1, draft_s=0.001, verify_s=0.007,
                                 verify_width=2))
    assert pol.position_acceptance(0) > 0.95 and pol.position_acceptance(1) < 0.1
    assert pol.verify_cost_at(3) == pytest.approx(0.0085, rel=0.05)  # on the line through (2, 7ms), (4, 10ms)
    assert pol.expected_tokens(1) == pytest.approx(1 + pol.position_acceptance(0))
    assert pol.plan().max_tokens == 1  # a second draft is almost never accepted: not worth its cost


def test_goodput_prefers_fewer_drafts_when_verification_width_is_expensive():
    cheap, steep = GoodputPolicy(), GoodputPolicy()
    for _ in range(20):
        for pol, slope in ((cheap, 0.0001), (steep, 0.01)):
            for w in (2, 5):
                pol.observe(StepFeedback(drafted=w - 1, accepted=int(0.8 * (w - 1)), draft_forwards=w - 1,
                                         draft_s=0.0005 * (w - 1), verify_s=0.01 + slope * w, verify_width=w))
    assert cheap.plan().max_tokens > steep.plan().max_tokens


def test_a_joining_request_inherits_measured_costs_but_not_acceptance():
    running = GoodputPolicy()
    for _ in range(10):
        running.observe(StepFeedback(drafted=4, accepted=4, draft_forwards=4, draft_s=0.004, verify_s=0.01,
                                     verify_width=5, batch_rows=4))
    new = GoodputPolicy()
    assert new.plan().max_tokens == 4  # cold: the initial guess
    new.inherit_costs(running)
    assert new.draft_cost == running.draft_cost and new.verify_costs == running.verify_costs and new.rows == 4
    assert new.accepted == 0 and new.acceptance == pytest.approx(0.6)  # its own acceptance: the prior
    assert new.plan().max_tokens == new.choose_k()
    learned = LearnedPolicy()
    learned.inherit_costs(running)
    assert learned.cap.draft_cost == running.draft_cost


def test_cost_line_fits_sizes_and_uses_the_slope_prior_before_two_sizes():
    line = CostLine(momentum=0.0, slope_prior=0.5)
    assert not line.known
    line.observe(1, 0.010)
    assert line.at(1) == pytest.approx(0.010) and line.at(3) == pytest.approx(0.010 * 2)
    line.observe(3, 0.016)
    assert line.at(2) == pytest.approx(0.013) and line.at(5) == pytest.approx(0.022)
    line.observe(5, 0.0)  # ignored: not a measurement
    assert line.at(5) == pytest.approx(0.022)


def test_batch_goodput_identities():
    """One row: the batch rate is that row's Leviathan rate; B identical rows: B x the tokens."""
    a, cd = 0.7, 0.002
    curve = [expected_tokens(a, k) for k in range(5)]
    verify = lambda n: 0.01 + 0.001 * n  # noqa: E731
    one = batch_goodput([curve], lambda b: cd, verify)
    assert one[0] == pytest.approx(1 / verify(1))
    assert one[3] == pytest.approx(expected_tokens(a, 3) / (3 * cd + verify(4)))
    four = batch_goodput([curve] * 4, lambda b: cd * b, verify)
    assert four[2] == pytest.approx(4 * expected_tokens(a, 2) / (2 * 4 * cd + verify(12)))
    assert batch_goodput([], lambda b: cd, verify) == []


def _planner(fixed: float, per_token: float, draft: float = 0.0005) -> BatchPlanner:
    pl = BatchPlanner()
    for rows in (1, 8):
        for w in (1, 2, 5):
            for _ in range(5):
                pl.observe(rows, w, w - 1, draft * (w - 1) * rows ** 0.5, fixed + per_token * rows * w)
    return pl


def test_batch_planner_one_k_for_the_batch_from_the_rows_curves():
    good = [expected_tokens(0.9, k) for k in range(9)]
    bad = [expected_tokens(0.05, k) for k in range(9)]
    cold = BatchPlanner(initial_k=4)
    assert cold.choose([good, bad], 8) == 4  # nothing measured yet
    overhead_bound = _planner(fixed=0.010, per_token=0.00001)
    assert overhead_bound.choose([good] * 8, 8) >= 3  # forwards cost the same at any width: draft deep
    k_mixed = overhead_bound.choose([good] * 4 + [bad] * 4, 8)
    assert 1 <= k_mixed < overhead_bound.choose([good] * 8, 8)  # the batch's acceptance, not its best row's
    compute_bound = _planner(fixed=0.002, per_token=0.001)
    assert compute_bound.choose([good] * 8, 8) < overhead_bound.choose([good] * 8, 8)
    assert compute_bound.choose([bad] * 8, 8) == 0  # drafts do not pay: plain target steps


def test_batch_planner_probes_once_every_probe_every_steps():
    pl = _planner(fixed=0.002, per_token=0.001)
    pl.probe_every = 3
    bad = [expected_tokens(0.05, k) for k in range(5)]
    assert [pl.choose([bad] * 8, 4) for _ in range(8)] == [0, 0, 0, 1, 0, 0, 0, 1]
    assert pl.choose([bad] * 8, 4, allow_zero=False) == 1
    assert pl.choose([bad] * 8, 0) == 0  # no row may draft (length limits)


def test_adaptive_policies_are_batchable_and_keep_their_early_exits():
    g = GoodputPolicy(min_confidence=0.3)
    assert isinstance(g, BatchablePolicy) and g.batchable
    assert g.expected_curve(3) == pytest.approx([1.0, 1.6, 1.96, 2.176])  # prior acceptance 0.6
    assert g.batch_plan(5) == type(g.plan())(5, min_confidence=0.3)
    capped = GoodputPolicy(k_max=1)
    assert capped.expected_curve(3)[1:] == pytest.approx([1.6, 1.6, 1.6])  # flat past its own cap
    learned = LearnedPolicy(threshold=0.4)
    assert learned.batchable and learned.batch_plan(6).min_acceptance == 0.4
    assert not LearnedPolicy(fixed_cap=3).batchable
    assert not getattr(StaticPolicy(2), "batchable", False)


def test_a_request_at_an_idle_decoder_inherits_the_planners_costs():
    pl = _planner(fixed=0.004, per_token=0.001)
    new = GoodputPolicy()
    new.inherit_costs(pl)
    assert new.draft_cost == pytest.approx(pl.draft.at(1)) and new.verify_costs == pl.verify.points
    assert new.accepted == 0 and GoodputPolicy().choose_k() == 4  # cold: the initial guess
    assert new.choose_k() == 1  # measured costs: one draft pays at the prior acceptance, four do not
