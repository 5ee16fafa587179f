"""Training EAGLE-3 heads (`dspark.distill.heads`, `hidden_cache`): the per-step distributions,
anchors and chained figures; a short run raises held-out expected acceptance; an interrupted run
resumes to exactly the uninterrupted result; the offline hidden-state cache gives the online
features; bad settings fail before work."""

from __future__ import annotations

import math

import pytest
import torch

from dspark.distill.cache import LogitsCache
from dspark.distill.heads import (ChainTotals, HeadTrainConfig, OfflineFeatures, OnlineFeatures, at_step,
                                  draft_vocab_topk_support, evaluate_head, select_anchors, train_head,
                                  validate_head_config)
from dspark.distill.losses import acceptance_bounds, topk_support
from dspark.distill.train import weights_digest
from dspark.errors import DataError, DsparkError
from dspark.models.eagle3 import capture_features, init_head_for
from dspark.models.vocab_map import build_vocab_map
from tests.distill.train_helpers import HELDOUT, TARGET, collect_small_cache, load_float32


@pytest.fixture(scope="module")
def cache():
    return LogitsCache(collect_small_cache())


@pytest.fixture(scope="module")
def target():
    model = load_float32(TARGET).model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def cfg(**kw):
    base = dict(steps=6, lr=3e-3, batch_size=4, heldout_percent=HELDOUT, eval_every=100, ttt_steps=3)
    base.update(kw)
    return HeadTrainConfig(**base)


def online(target, head):
    return OnlineFeatures(target, head.config.aux_layer_ids)


def test_draft_vocabulary_support_equals_topk_support_on_the_full_vocabulary():
    g = torch.Generator().manual_seed(0)
    logits, draft = torch.randn(5, 30, generator=g), torch.randn(5, 30, generator=g)
    lp = torch.log_softmax(logits, -1)
    top = lp.topk(4, dim=-1)
    tail = 1 - top.values.exp().sum(-1)
    ref_p, ref_q = topk_support(top.values, top.indices, draft, tail)
    for restrict in (False, True):
        logp, logq = draft_vocab_topk_support(top.values, top.indices, draft, tail, restrict)
        torch.testing.assert_close(logp, ref_p)
        torch.testing.assert_close(logq, ref_q)


def test_restricted_support_drops_target_tokens_outside_the_draft_vocabulary():
    # target vocab 6, draft vocab = target ids {0, 1, 2}; the target's top-2 are ids 4 (outside) and 1
    vmap = build_vocab_map(torch.tensor([9, 9, 9, 0, 0, 0]), 3)
    lp = torch.tensor([[math.log(0.5), math.log(0.3)]])
    tail = torch.tensor([0.2])
    draft = torch.log(torch.tensor([[0.2, 0.6, 0.2]]))
    dk = vmap.to_draft(torch.tensor([[4, 1]]))
    assert dk.tolist() == [[-1, 1]]
    logp, logq = draft_vocab_topk_support(lp, dk, draft, tail, restrict=False)
    lower, upper = acceptance_bounds(logp, logq)
    # full-vocabulary acceptance: id 4 accepts nothing (q = 0), id 1: min(0.3, 0.6), tail: min(0.2, 0.4)
    assert float(lower) == pytest.approx(0.3) and float(upper) == pytest.approx(0.5)
    rp, rq = draft_vocab_topk_support(lp, dk, draft, tail, restrict=True)
    torch.testing.assert_close(rp.exp(), torch.tensor([[0.0, 0.6, 0.4]]))  # renormalised over the draft vocab
    torch.testing.assert_close(rq.exp(), torch.tensor([[0.0, 0.6, 0.4]]))


def test_anchors_cover_exactly_the_chains_that_reach_a_teacher_position():
    teach = torch.zeros(2, 8, dtype=torch.bool)
    teach[0, 4:6] = True
    teach[1, 1] = True
    anchors, valid = select_anchors(teach, steps=2)
    # row 0: i + 1 + s in {4, 5} for s in {0, 1} -> i in {2, 3, 4}; row 1: i in {0}
    assert anchors[valid].tolist() == [2, 3, 4, 0] and valid.sum(1).tolist() == [3, 1]
    x = torch.arange(16).view(2, 8)
    assert at_step(x, anchors, 1)[0].tolist() == [4, 5, 6]


def test_chained_tokens_per_target_step():
    tot = ChainTotals(2)
    tot.add_chains(torch.tensor([[0.5, 0.5], [1.0, 0.0]]), torch.tensor([[True, False], [False, True]]))
    res = tot.result()
    # sampling: K=1: 1 + a0 -> (1.5 + 2) / 2; K=2: 1 + a0 + a0 a1 -> (1.75 + 2) / 2
    assert res["tokens_per_step"] == pytest.approx([1.75, 1.875])
    # greedy: leading matches only -> K=1: (2 + 1) / 2; K=2: (2 + 1) / 2 (the second row's 2nd match is after a miss)
    assert res["greedy_tokens_per_step"] == pytest.approx([1.5, 1.5])


def test_short_training_raises_heldout_expected_acceptance(tmp_path, cache, target):
    head = init_head_for(target, seed=0)
    res = train_head(head, online(target, head), cache, cfg(steps=24, eval_every=12), tmp_path / "ck", pad_id=2)
    before, after = res.before, res.after
    assert len(after["expected_acceptance"]) == 3
    for s in range(3):
        assert after["expected_acceptance"][s] > before["expected_acceptance"][s] + 0.05, (before, after)
        assert after["objective"][s] < before["objective"][s]
    assert after["greedy_tokens_per_step"][-1] > before["greedy_tokens_per_step"][-1]
    assert [h["step"] for h in res.history] == [0, 12, 24]
    assert res.history[1]["loss"] > res.history[2]["loss"]
    again = evaluate_head(res.head, online(target, head), cache, cfg(), head.vocab_map, pad_id=2)
    assert again["expected_acceptance"] == pytest.approx(after["expected_acceptance"], abs=1e-5)


def test_reduced_vocabulary_training(tmp_path, cache, target):
    from dspark.distill.head_run import token_counts

    vmap = build_vocab_map(token_counts(cache, HELDOUT, 4096), 256)
    head = init_head_for(target, vocab_map=vmap, seed=0)
    res = train_head(head, online(target, head), cache, cfg(steps=8), tmp_path / "ck", pad_id=2)
    # acceptance is over the FULL target distribution: ids outside the draft vocabulary count as misses
    assert all(0 < a < 1 for a in res.after["expected_acceptance"])
    assert res.after["expected_acceptance"][0] > res.before["expected_acceptance"][0]


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, cache, target):
    settings = cfg(steps=6, checkpoint_every=2)
    head = init_head_for(target, seed=5)
    full = train_head(head, online(target, head), cache, settings, tmp_path / "full", pad_id=2)

    class Killed(Exception):
        pass

    def die_at_5(step, total, info):
        if step == 5:
            raise Killed

    cut = init_head_for(target, seed=5)
    with pytest.raises(Killed):
        train_head(cut, online(target, cut), cache, settings, tmp_path / "cut", pad_id=2, progress=die_at_5)
    again = init_head_for(target, seed=5)
    resumed = train_head(again, online(target, again), cache, settings, tmp_path / "cut", pad_id=2)
    assert resumed.resumed_from == 4
    assert weights_digest(resumed.head.trainable()) == weights_digest(full.head.trainable())
    assert resumed.history == full.history[:1] + resumed.history[1:] and resumed.before == full.before
    other = init_head_for(target, seed=5)
    with pytest.raises(DataError, match="another run.*ttt_steps"):
        train_head(other, online(target, other), cache, cfg(steps=6, ttt_steps=2), tmp_path / "cut", pad_id=2)


def test_hidden_state_cache_gives_the_online_features_and_trains_offline(tmp_path, cache, target):
    from dspark.distill.hidden_cache import HiddenCache, collect_hidden, read_hidden_manifest

    layers = (0, 1, 2)
    logs: list[str] = []
    collect_hidden(target, cache, tmp_path / "hidden", layers, dtype="float32", pad_id=2, log=logs.append)
    from dspark.distill.hidden_cache import row_positions

    n = row_positions(cache)
    assert n == sum(len(r.prompt_ids) + len(r.continuation_ids) for r in cache.rows("all"))
    assert logs[0].startswith("storage estimate") and f"{n:,} prompt + continuation positions x 3 layers" in logs[0]
    hc = HiddenCache(tmp_path / "hidden", cache)
    batch = next(iter(cache.batches(4, split="all", shuffle=False, pad_id=2, max_length=40)))
    rows = {r.prompt_index: r for r in cache.rows("all")}
    feats = hc.batch_features(batch)
    truncated = 0
    for b, pi in enumerate(batch.prompt_index.tolist()):
        # the target's features over the whole cached row, sliced as the (possibly truncated) batch row keeps it
        r = rows[pi]
        full = torch.tensor([list(r.prompt_ids) + list(r.continuation_ids)])
        with torch.no_grad():
            ref, _ = capture_features(target, full, None, layers)
        n, kept_t = int(batch.attention_mask[b].sum()), int(batch.loss_mask[b].sum())
        lo = len(r.prompt_ids) - (n - kept_t)
        truncated += int(lo > 0)
        torch.testing.assert_close(feats[b, :n], ref[0, lo:lo + n], rtol=1e-4, atol=1e-4)
    assert truncated > 0  # the slicing of cut rows is exercised
    head = init_head_for(target, aux_layer_ids=layers, seed=0)
    # a run killed between writing a part and recording it, re-run: the part is checked and kept
    import json

    manifest = read_hidden_manifest(tmp_path / "hidden")
    part = tmp_path / "hidden" / manifest.parts[0].file
    written = part.stat().st_mtime_ns
    (tmp_path / "hidden" / "manifest.json").write_text(json.dumps(
        manifest.model_copy(update={"status": "collecting", "parts": []}).model_dump(mode="json")))
    again = collect_hidden(target, cache, tmp_path / "hidden", layers, dtype="float32", pad_id=2)
    assert again == manifest.model_copy(update={"created_by": again.created_by})
    assert part.stat().st_mtime_ns == written  # not recomputed
    with pytest.raises(DataError, match="other arguments.*layer_ids"):
        collect_hidden(target, cache, tmp_path / "hidden", (0, 1, 1), dtype="float32", pad_id=2)
    res = train_head(head, OfflineFeatures(hc), cache, cfg(steps=6), tmp_path / "ck", pad_id=2)
    assert res.after["expected_acceptance"][0] > res.before["expected_acceptance"][0]


@pytest.mark.parametrize("kw, match", [
    (dict(ttt_steps=0), "ttt-steps"), (dict(ttt_decay=0.0), "ttt-decay"), (dict(steps=0), "steps"),
    (dict(steps=2, epochs=1.0), "not both"), (dict(lr=-1.0), "lr"), (dict(objective="kl"), "unknown objective"),
    (dict(heldout_percent=0.0), "heldout"), (dict(max_length=0), "max-length")])
def test_bad_settings_fail_before_work(kw, match):
    with pytest.raises(DsparkError, match=match):
        validate_head_config(HeadTrainConfig(**kw))


def test_training_on_prompts_still_evaluates_the_continuation(tmp_path, cache, target):
    """--loss-on-prompt adds training positions; the held-out figures stay on the continuation
    positions decoding drafts, so runs with and without it compare."""
    head = init_head_for(target, seed=0)
    src = online(target, head)
    a = evaluate_head(head, src, cache, cfg(loss_on_prompt=True), head.vocab_map, pad_id=2)
    b = evaluate_head(head, src, cache, cfg(), head.vocab_map, pad_id=2)
    assert a == b
    res = train_head(head, src, cache, cfg(steps=4, loss_on_prompt=True), tmp_path / "ck", pad_id=2)
    assert res.positions_seen > 4 * 4 * 16  # more than the continuation positions of 4 batches of 4 rows
