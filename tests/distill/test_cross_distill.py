"""Cross-tokenizer distillation (dspark.distill.cross): a draft with another tokenizer trained from the
target's cache.

- Alignment on hand-made tokenizations: a target boundary inside a draft token is not aligned;
  zero-length special tokens pair after the special on both sides.
- Re-tokenization with real byte maps (two small BPE vocabularies sharing 5 strings): the draft's
  prompt and continuation spell the target's text, the aligned target positions carry their cached
  top-K.
- The intersection buckets against brute force over the full vocabularies: exact when the top-K
  covers the target's vocabulary, bounds otherwise; the loss's minimiser q_I = p_I reaches p(I).
- The held-out expected acceptance equals what the real cross-tokenizer decoder accepts (its
  sampling path, through the public `make_decoder` API), within sampling error; the same formula
  without the intersection's renormalisation is far outside (the test can fail).
- Training on a real cache: each term moves the held-out metric it is for; `dspark distill` end to end with the
  built-in 1,024-token draft: the draft keeps its own tokenizer, the candidate records the mode, the
  exported draft decodes losslessly cross-tokenizer; unsupported settings and tokenizers fail in one line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dspark.distill.cross import (CrossDistill, VocabBridge, align_positions, cross_batch, cross_loss, fit_row,
                                  intersection_logprobs, intersection_support, retokenize, token_loss, vocab_bridge)
from dspark.distill.losses import acceptance_bounds, parse_objective
from tests.decode.decode_models import random_llama
from tests.decode.test_cross import D_MERGES, D_TOKENS, T_MERGES, T_TOKENS, literal_tokenizer

SHARED = ["a", "b", "c", "d", "ab"]  # the strings both small vocabularies have


@pytest.fixture(scope="module")
def small_tokenizers():
    return literal_tokenizer(T_TOKENS, T_MERGES), literal_tokenizer(D_TOKENS, D_MERGES)


@pytest.fixture(scope="module")
def bridge(small_tokenizers):
    ttok, dtok = small_tokenizers
    return vocab_bridge(ttok, dtok, 8, 8)


# -- alignment --------------------------------------------------------------------------------------------

def test_alignment_rule_on_hand_made_tokenizations():
    # "def foo": target ["def", " f", "oo"], draft ["de", "f", " foo"]: offsets 0,3,5 vs 0,2,3
    assert align_positions([3, 2, 2], [2, 1, 4]) == [(0, 0), (1, 2)]  # offset 5 is inside " foo"
    # identical tokenizations align everywhere
    assert align_positions([1, 2, 3], [1, 2, 3]) == [(0, 0), (1, 1), (2, 2)]
    # a final special (zero bytes) on both sides: the positions predicting it pair up
    assert align_positions([2, 0], [2, 0]) == [(0, 0), (1, 1)]
    # a special mid-text that the draft has too: pair after it on both sides, not before
    assert align_positions([2, 0, 3], [1, 1, 0, 3]) == [(0, 0), (2, 3)]
    # ... and one the draft has no counterpart for: the target's position after it pairs with the
    # draft's position at the same text (the decoder compares exactly these)
    assert align_positions([2, 0, 3], [2, 3]) == [(0, 0), (2, 1)]
    assert align_positions([], [4]) == [] and align_positions([4], []) == []


def test_retokenize_spells_the_target_text(bridge):
    tm, dm = bridge.tmap, bridge.dmap
    assert sorted(dm.pieces[i].decode() for i in bridge.inter_d.tolist()) == sorted(SHARED)
    prompt = tm.encode_bytes(b"ab")  # target [ab]
    cont = tm.encode_bytes(b"cdbacd")  # target [cd, ba, cd]
    assert [tm.pieces[i] for i in cont] == [b"cd", b"ba", b"cd"]
    row = retokenize(bridge, prompt, cont)
    assert dm.join(row.draft_ids[:row.prompt_len]) == b"ab"
    assert dm.join(row.draft_ids[row.prompt_len:]) == b"cdbacd"
    d_cont = [dm.pieces[i] for i in row.draft_ids[row.prompt_len:]]
    assert d_cont == [b"c", b"d", b"b", b"a", b"c", b"d"]  # the draft's own BPE: it has no "cd" or "ba"
    assert row.target_positions == 3
    assert row.aligned == [(0, 0), (1, 2), (2, 4)]  # every target boundary is a draft boundary here
    # a continuation the draft merges differently: target [ab, cd] vs draft [ab, c, d]
    row2 = retokenize(bridge, prompt, tm.encode_bytes(b"abcd"))
    assert [dm.pieces[i] for i in row2.draft_ids[row2.prompt_len:]] == [b"ab", b"c", b"d"]
    assert row2.aligned == [(0, 0), (1, 1)]
    # a draft model with fewer rows than its tokenizer ("ab" is id 4): no prompt the model can read
    from dataclasses import replace

    assert retokenize(replace(bridge, draft_vocab=4), prompt, cont) is None
    # fitting into a draft context of 4: the prompt keeps one id, the continuation is cut, pairs too
    fitted = fit_row(row, 4)
    assert fitted.prompt_len == 1 and len(fitted.draft_ids) == 4
    assert fitted.aligned == [(0, 0), (1, 2)]


def test_cross_batch_carries_the_cached_targets_at_aligned_positions(bridge):
    from dspark.distill.cache import CacheRow, collate

    tm = bridge.tmap
    rows = []
    for i, (p, c) in enumerate([(b"ab", b"cdbacd"), (b"d", b"abcd")]):
        cont = tm.encode_bytes(c)
        t = len(cont)
        rows.append(CacheRow(prompt_index=i, prompt_id=f"r{i}", prompt_ids=np.array(tm.encode_bytes(p), np.int32),
                             continuation_ids=np.array(cont, np.int32),
                             topk_ids=np.tile(np.arange(8, dtype=np.int32), (t, 1)),
                             topk_logprobs=(np.log(np.full((t, 8), 1 / 8)) + 0.01 * np.arange(t)[:, None])
                             .astype(np.float16), tail=np.zeros(t, np.float32)))
    b = cross_batch(collate(rows), bridge)
    for i, (p, c) in enumerate([(b"ab", b"cdbacd"), (b"d", b"abcd")]):
        n = int(b.attention_mask[i].sum())
        ids = b.input_ids[i, :n].tolist()
        u = int(b.loss_mask[i].sum())
        assert bridge.dmap.join(ids) == p + c and b.labels[i, :u].tolist() == ids[n - u:]
        assert b.positions[i, :u].tolist() == list(range(n - u - 1, n - 1))
    row = retokenize(bridge, rows[0].prompt_ids.tolist(), rows[0].continuation_ids.tolist())
    a = int(b.align_mask[0].sum())
    assert a == len(row.aligned) and b.align_index[0, :a].tolist() == [j for _, j in row.aligned]
    for k, (t, _) in enumerate(row.aligned):  # the row of target position t, not of aligned index k
        assert torch.allclose(b.topk_logprobs[0, k], torch.from_numpy(rows[0].topk_logprobs[t].astype(np.float32)))
    assert b.target_positions == 3 + 2


# -- the intersection buckets -------------------------------------------------------------------------------

def synthetic_bridge(vt: int = 10, vd: int = 7, pairs=((0, 3), (1, 0), (2, 5), (4, 1), (6, 8))) -> VocabBridge:
    """A bridge without tokenizers: (draft id, target id) pairs of the intersection."""
    t2i = torch.full((vt,), -1, dtype=torch.long)
    for i, (_, t) in enumerate(pairs):
        t2i[t] = i
    return VocabBridge(None, None, torch.tensor([d for d, _ in pairs]), torch.tensor([t for _, t in pairs]), t2i, vd)


def brute_acceptance(p: torch.Tensor, draft_logits: torch.Tensor, br: VocabBridge) -> torch.Tensor:
    """sum over the intersection of min(p(x), q_I(x)), q_I = the draft's softmax restricted to the
    intersection and renormalised, as the cross decoder's sampling path forms it: [N, Vt], [N, Vd] -> [N]."""
    q = torch.softmax(draft_logits, -1)[:, br.inter_d]
    q = q / q.sum(-1, keepdim=True)
    return torch.minimum(p[:, br.inter_t], q).sum(-1)


def topk_of(p: torch.Tensor, k: int):
    lp, ids = torch.log(p).topk(k, dim=-1)
    return lp, ids, (1 - lp.exp().sum(-1)).clamp_min(0)


def test_intersection_buckets_equal_brute_force_when_topk_covers_the_vocabulary():
    torch.manual_seed(0)
    br = synthetic_bridge()
    p = torch.softmax(torch.randn(6, 10) * 2, -1)
    dl = torch.randn(6, 9) * 2  # 2 padded columns past the draft's 7 real ids
    lp, ids, tail = topk_of(p, 10)
    sup = intersection_support(lp, ids, tail, dl, br)
    lower, upper = acceptance_bounds(sup.logp, sup.logq)
    want = brute_acceptance(p, dl[:, :7], br)
    assert torch.allclose(lower, want, atol=1e-6) and torch.allclose(upper, want, atol=1e-6)
    assert torch.allclose(sup.mass_lower, p[:, br.inter_t].sum(-1), atol=1e-6)
    assert torch.allclose(sup.logq.exp().sum(-1), torch.ones(6), atol=1e-6)
    assert torch.allclose(sup.logp_in.exp().sum(-1), torch.ones(6), atol=1e-6)
    # the log-space q_I is the decoder's q[I] / q(I)
    q = torch.softmax(dl[:, :7], -1)[:, br.inter_d]
    assert torch.allclose(intersection_logprobs(dl[:, :7], br.inter_d).exp(), q / q.sum(-1, keepdim=True), atol=1e-6)


def test_intersection_buckets_bound_the_truth_with_a_tail():
    torch.manual_seed(1)
    br = synthetic_bridge()
    p = torch.softmax(torch.randn(50, 10) * 2, -1)
    dl = torch.randn(50, 7) * 2
    lp, ids, tail = topk_of(p, 3)
    sup = intersection_support(lp, ids, tail, dl, br)
    lower, upper = acceptance_bounds(sup.logp, sup.logq)
    want = brute_acceptance(p, dl, br)
    assert bool((lower <= want + 1e-6).all() and (want <= upper + 1e-6).all())
    assert bool((lower < upper - 1e-3).any())  # the tail's share is really unknown somewhere
    mass = p[:, br.inter_t].sum(-1)
    assert bool((sup.mass_lower <= mass + 1e-6).all() and (mass <= sup.mass_upper + 1e-6).all())


def test_loss_minimiser_reaches_the_intersection_mass_and_gradients_are_finite():
    """With q_I = p_I every objective is 0 and the acceptance is p(I), its maximum; rows without target
    mass on the intersection or without intersection ids outside the top-K stay finite."""
    torch.manual_seed(2)
    br = synthetic_bridge()
    p = torch.softmax(torch.randn(4, 10) * 2, -1)
    p[0, br.inter_t] = 0.0  # no target mass on the intersection at all
    p[0] /= p[0].sum()
    lp, ids, tail = topk_of(p, 10)
    # the draft logits that make q_I = p_I on rows 1..3
    target_logq = torch.log(p[:, br.inter_t] / p[:, br.inter_t].sum(-1, keepdim=True).clamp_min(1e-30))
    dl = torch.full((4, 7), -30.0)
    dl[:, br.inter_d] = target_logq.clamp_min(-30.0)
    dl[0] = torch.randn(7)
    sup = intersection_support(lp, ids, tail, dl, br)  # row 0: log 0 = -inf on every intersection id
    assert sup.valid.tolist() == [False, True, True, True]
    _, upper = acceptance_bounds(sup.logp, sup.logq)
    assert torch.allclose(upper[1:], p[1:, br.inter_t].sum(-1), atol=1e-5)
    for name in ("fkl", "rkl", "jsd:0.5", "tvd"):
        obj = parse_objective(name)
        assert torch.allclose(obj(sup.logp_in, sup.logq)[1:], torch.zeros(3), atol=1e-4), name
        x = (torch.randn(4, 7) * 2).requires_grad_()
        lp3, ids3, tail3 = topk_of(p, 3)
        loss = token_loss(obj, intersection_support(lp3, ids3, tail3, x, br))
        loss.backward()
        assert math.isfinite(loss.item()) and bool(torch.isfinite(x.grad).all()), name
        # row 0 has all its intersection mass in the tail bucket, where q_I(rest) = 1 whatever x is
        assert float(x.grad[1:].abs().sum()) > 1e-3 and float(x.grad[0].abs().sum()) < 1e-6, name


# -- the held-out acceptance is the cross decoder's ---------------------------------------------------------

def test_heldout_acceptance_equals_the_cross_decoders_sampling_acceptance(small_tokenizers, bridge):
    """At the first position after a prompt, sum_I min(p, q_I) (this module, from the two models'
    logits) is the probability that the real cross-tokenizer decoder (sampling, K = 1) accepts its
    first draft. Negative control: q not renormalised on the intersection gives a value far off."""
    from dspark.decode import GenerationConfig, make_decoder

    ttok, dtok = small_tokenizers
    torch.set_num_threads(1)
    target = random_llama(8, seed=11, hidden=16, layers=2, scale=0.7)
    # a draft with 44% of its mass on its own tokens outside the intersection, so the formula matters
    draft = random_llama(8, seed=1, hidden=16, layers=1, scale=0.7)
    prompt = [0, 1]  # target "a", "b"
    d_prompt = retokenize(bridge, prompt, []).draft_ids
    assert bridge.dmap.join(d_prompt) == b"ab"
    with torch.no_grad():
        p = torch.softmax(target(torch.tensor([prompt])).logits[0, -1], -1)
        dl = draft(torch.tensor([d_prompt])).logits[0, -1]
    lp, ids, tail = topk_of(p[None], 8)
    sup = intersection_support(lp, ids, tail, dl[None], bridge)
    expected = float(acceptance_bounds(sup.logp, sup.logq)[1])
    unnormalised = float(torch.minimum(p[bridge.inter_t], torch.softmax(dl, -1)[bridge.inter_d]).sum())

    n = 1000
    dec = make_decoder(target, draft, ttok, "1", draft_tokenizer=dtok)
    assert dec.mode == "cross-tokenizer"
    res = dec.generate([prompt] * n, GenerationConfig(max_new_tokens=2, temperature=1.0, seed=3, ignore_eos=True))
    drafted = sum(r.stats.drafted for r in res)
    accepted = sum(r.stats.accepted for r in res)
    assert drafted == n  # exactly one draft per request, at the first position
    sigma = math.sqrt(expected * (1 - expected) / n)
    assert abs(accepted / n - expected) < 4.5 * sigma, (accepted / n, expected, sigma)
    assert abs(unnormalised - expected) > 9 * sigma, (unnormalised, expected)  # the control can fail


# -- training ------------------------------------------------------------------------------------------

XBPE = "tiny-code-draft-xbpe"


def test_cross_loss_is_cross_entropy_plus_weighted_token_term(bridge):
    from dspark.distill.cache import CacheRow, collate

    tm = bridge.tmap
    cont = tm.encode_bytes(b"cdbacd")
    lp = np.log(np.array([[0.4, 0.3, 0.1, 0.1, 0.05, 0.03, 0.01, 0.01]] * 3))
    row = CacheRow(0, "r", np.array(tm.encode_bytes(b"ab"), np.int32), np.array(cont, np.int32),
                   np.tile(np.array([4, 0, 5, 1, 2, 3, 6, 7], np.int32), (3, 1)), lp.astype(np.float16),
                   np.zeros(3, np.float32))
    b = cross_batch(collate([row]), bridge)
    torch.manual_seed(0)
    logits = torch.randn(1, b.positions.shape[1], 8)
    ce = torch.nn.functional.cross_entropy(logits[b.loss_mask], b.labels[b.loss_mask])
    assert torch.allclose(cross_loss("fkl", logits, b, bridge, token_weight=0.0), ce)
    term = cross_loss("fkl", logits, b, bridge, token_weight=1.0) - ce
    assert float(term) > 0
    assert torch.allclose(cross_loss("fkl", logits, b, bridge, token_weight=2.5), ce + 2.5 * term, atol=1e-5)


def test_each_term_trains_what_it_measures(tmp_path):
    """On a real cache (target tiny-code-draft-m, 4,096 tokens; draft tiny-code-draft-xbpe, 1,024): the
    sequence-level term alone lowers the held-out cross-entropy and raises the draft's token match (the
    greedy signal) but lowers the intersection acceptance (the sampling signal: the draft's own short
    tokens are rarely what the target emits whole); a strong token-level term raises the acceptance."""
    from dspark.distill.cache import LogitsCache
    from dspark.distill.train import TrainConfig, train_draft
    from dspark.errors import DataError
    from tests.distill.train_helpers import HELDOUT, TARGET, collect_small_cache, load_float32

    target = load_float32(TARGET)
    cache = LogitsCache(collect_small_cache())
    cfg = TrainConfig(objective="fkl", steps=12, lr=3e-3, batch_size=4, heldout_percent=HELDOUT, eval_every=12)
    runs = {}
    for w in (0.0, 4.0):
        draft = load_float32(XBPE)
        br = vocab_bridge(target.tokenizer, draft.tokenizer, target.vocab_size, draft.vocab_size)
        cross = CrossDistill(br, token_weight=w, pad_id=int(draft.tokenizer.pad_token_id or 0))
        runs[w] = train_draft(draft.model, cache, cfg, tmp_path / f"ck{w:g}", vocab_size=br.draft_vocab, cross=cross)
    before = runs[0.0].heldout_before
    assert 0.9 < before["aligned_fraction"] <= 1.0 and 0 < before["intersection_mass"] <= 1
    seq, tok = runs[0.0].heldout_after, runs[4.0].heldout_after
    assert seq["ce"] < before["ce"] - 0.3 and seq["greedy_match"] > before["greedy_match"] + 0.05, (before, seq)
    assert seq["expected_acceptance_lower"] < before["expected_acceptance_lower"], (before, seq)
    for bound in ("expected_acceptance", "expected_acceptance_lower"):
        assert tok[bound] > before[bound] + 0.01 and tok[bound] > seq[bound] + 0.05, (bound, before, tok, seq)
    # the run's last checkpoint stays in its folder; another token weight is another run, not resumed
    with pytest.raises(DataError, match="another run"):
        train_draft(load_float32(XBPE).model, cache, cfg, tmp_path / "ck4", vocab_size=br.draft_vocab,
                    cross=CrossDistill(br, token_weight=0.5, pad_id=cross.pad_id))


# -- `dspark distill` -----------------------------------------------------------------------------------------

def test_distill_cli_trains_a_draft_with_another_tokenizer(tmp_path):
    import yaml

    from dspark.decode import GenerationConfig, make_decoder
    from dspark.models import load_model
    from tests.distill.test_distill_cli import TINY, run
    from tests.distill.train_helpers import TARGET, collect_small_cache

    out = tmp_path / "run"
    res = run("--target", TARGET, "--draft", XBPE, "--cache", collect_small_cache(), "--out", out,
              "--cross-token-weight", "0.5", "--json", *TINY)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    (d,) = summary["drafts"]
    m, prov = d["metrics"], d["provenance"]
    assert prov["decoder_mode"] == "cross-tokenizer" and prov["cross_token_weight"] == 0.5
    assert prov["intersection_size"] == 1021
    for when in ("before", "after"):
        assert 0 < m[f"heldout_{when}"]["expected_acceptance"] <= 1
        assert 0 < m[f"heldout_{when}"]["intersection_mass"] <= 1
        assert m[f"decoder_{when}"]["mode"] == "cross-tokenizer" and m[f"decoder_{when}"]["mean_accepted_tokens"] >= 1
    folder = Path(d["path"])
    draft = load_model(str(folder))
    assert len(draft.tokenizer) == 1024  # the draft's own tokenizer, not the target's
    spec = yaml.safe_load(Path(d["candidate"]).read_text())
    assert spec["provenance"]["extra"]["decoder_mode"] == "cross-tokenizer"
    assert spec["measured"]["expected_acceptance"] == m["heldout_after"]["expected_acceptance"]
    # the exported draft decodes cross-tokenizer, greedy output equal to the target's own
    target = load_model(TARGET)
    prompt = target.tokenizer("def add(a, b):\n")["input_ids"]
    dec = make_decoder(target.model, draft.model, target.tokenizer, "3", draft_tokenizer=draft.tokenizer)
    alone = make_decoder(target.model, None, target.tokenizer, "1")
    cfg = GenerationConfig(max_new_tokens=16)
    assert dec.mode == "cross-tokenizer"
    assert dec.generate([prompt], cfg)[0].token_ids == alone.generate([prompt], cfg)[0].token_ids


@pytest.mark.parametrize("extra, match", [(["--on-policy", "0.5"], "--on-policy"),
                                          (["--acceptance-head"], "--acceptance-head"),
                                          (["--cross-token-weight", "-1"], "--cross-token-weight")])
def test_cross_draft_settings_fail_before_work(tmp_path, extra, match):
    from tests.distill.test_distill_cli import TINY, error_line, run
    from tests.distill.train_helpers import TARGET

    out = tmp_path / "run"
    text = error_line(run("--target", TARGET, "--draft", XBPE, "--task", "code", "--out", out, *TINY, *extra))
    assert match in text and not out.exists()


def test_wordpiece_draft_is_refused_before_collecting(tmp_path):
    """A draft whose tokens are not byte strings cannot be re-tokenized: one line, nothing written."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tests.distill.test_distill_cli import TINY, error_line, run
    from tests.distill.train_helpers import TARGET

    vocab = {"[UNK]": 0, "[PAD]": 1, **{c: i + 2 for i, c in enumerate("abcdefgh")}, "##a": 10, "##b": 11}
    wp = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path / "wp-draft"
    PreTrainedTokenizerFast(tokenizer_object=wp, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(folder)
    random_llama(12, seed=0).save_pretrained(folder, safe_serialization=True)
    out = tmp_path / "run"
    text = error_line(run("--target", TARGET, "--draft", folder, "--task", "code", "--out", out, *TINY))
    assert "WordPiece" in text and "another tokenizer" in text and not out.exists()
