"""The speculative decoding loop on stub models with fixed logits (exact drafted / accepted /
recovered / bonus counts), cache rollback, padded vocabularies, stop handling, streaming, the
constraint hook, the acceptance-head plumbing and bad inputs. Equality with HF greedy on real
models is in test_lossless.py; the sampling distribution in test_sampling_engine.py."""

from __future__ import annotations

import pytest
import torch

from dspark.decode import (AcceptanceHead, DecodeStats, GenerationConfig, SpeculativeDecoder, save_acceptance_head)
from dspark.decode.engine import _Runner, _Slots
from dspark.decode.policy import LearnedPolicy
from dspark.errors import DsparkError, IncompatibleTokenizersError
from tests.decode.decode_models import single_thread  # noqa: F401  (autouse fixture)
from tests.decode.decode_models import bigram_llama, chain_table, hf_greedy, random_llama

V = 16


@pytest.fixture(scope="module")
def target():
    return bigram_llama(chain_table(V, 1))


def test_bigram_stub_has_the_table_logits(target):
    logits = target(torch.tensor([[3, 7]])).logits[0]
    assert logits[0].argmax().item() == 4 and logits[1].argmax().item() == 8
    assert torch.allclose(logits[1], chain_table(V)[7], atol=1e-4)


def _run(target, draft, k, max_new, prompt=(0,), **kw):
    dec = SpeculativeDecoder(target, draft, None, draft_length=k)
    cfg = GenerationConfig(max_new_tokens=max_new, **kw)
    return dec.generate([list(prompt)], cfg)[0]


def _check_invariants(st: DecodeStats):
    assert st.accepted + st.recovered + st.bonus == st.generated
    assert st.verify_steps == st.recovered + st.bonus or st.verify_steps >= st.recovered + st.bonus
    assert sum(st.drafted_per_position) == st.drafted and sum(st.accepted_per_position) == st.accepted


def test_always_accept_counts(target):
    r = _run(target, bigram_llama(chain_table(V, 1)), 3, 12)
    assert r.token_ids == [(i + 1) % V for i in range(12)]
    st = r.stats
    assert (st.drafted, st.accepted, st.recovered, st.bonus, st.verify_steps) == (9, 9, 0, 3, 3)
    assert st.target_forwards == 3  # a 1-token prompt needs no prefill
    assert st.draft_forwards == 9
    assert st.drafted_per_position == [3, 3, 3] and st.accepted_per_position == [3, 3, 3]
    assert st.mean_accepted_tokens == 4.0 and st.acceptance_rate == 1.0
    assert r.finish_reason == "length"
    _check_invariants(st)


def test_never_accept_counts(target):
    r = _run(target, bigram_llama(chain_table(V, 2)), 3, 5)
    assert r.token_ids == [1, 2, 3, 4, 5]
    st = r.stats
    # remaining 5,4,3,2,1 -> drafts capped at 3,3,2,1,0; the last step has no draft: its token is a bonus
    assert (st.drafted, st.accepted, st.recovered, st.bonus, st.verify_steps) == (9, 0, 4, 1, 5)
    assert st.acceptance_rate == 0.0 and st.mean_accepted_tokens == 1.0
    _check_invariants(st)


def test_sometimes_accept_counts(target):
    table = chain_table(V, 1)
    table[3] = chain_table(V, 6)[3]  # the draft is wrong only after token 3
    r = _run(target, bigram_llama(table), 4, 8)
    assert r.token_ids == list(range(1, 9))
    st = r.stats
    # step 1: drafts 1 2 3 9 -> 3 accepted, 4 recovered; step 2: 3 drafts (cap), all accepted, bonus 8
    assert (st.drafted, st.accepted, st.recovered, st.bonus, st.verify_steps) == (7, 6, 1, 1, 2)
    assert st.drafted_per_position == [2, 2, 2, 1] and st.accepted_per_position == [2, 2, 2, 0]
    assert st.draft_forwards == 7
    _check_invariants(st)


def test_target_only_scores_one(target):
    r = _run(target, None, 4, 6, prompt=(5, 6))
    assert r.token_ids == [7, 8, 9, 10, 11, 12]
    st = r.stats
    assert (st.drafted, st.accepted, st.bonus, st.verify_steps, st.target_forwards) == (0, 0, 6, 6, 7)
    assert st.mean_accepted_tokens == 1.0 and st.draft_forwards == 0


def test_batch_rows_have_their_own_counts(target):
    table = chain_table(V, 1)
    table[3] = chain_table(V, 6)[3]
    draft = bigram_llama(table)
    dec = SpeculativeDecoder(target, draft, None, draft_length=4)
    cfg = GenerationConfig(max_new_tokens=8)
    prompts = [[0], [9, 10, 11], [2], [14, 15, 0, 1, 2, 3]]
    batched = dec.generate(prompts, cfg)
    for p, b in zip(prompts, batched):
        alone = dec.generate([p], cfg)[0]
        assert b.token_ids == alone.token_ids == [(p[-1] + i) % V for i in range(1, 9)]
        for field in ("drafted", "accepted", "recovered", "bonus", "verify_steps", "drafted_per_position",
                      "accepted_per_position"):
            assert getattr(b.stats, field) == getattr(alone.stats, field), field


def test_per_request_draft_lengths_in_one_batch(target):
    dec = SpeculativeDecoder(target, bigram_llama(chain_table(V, 1)), None)
    res = dec.generate([[0], [0], [0]], GenerationConfig(max_new_tokens=9), draft_length=["1", "2", "static:8"])
    assert [r.stats.verify_steps for r in res] == [5, 3, 1]
    assert all(r.token_ids == list(range(1, 10)) for r in res)


def test_stop_token_inside_an_accepted_block_truncates(target):
    r = _run(target, bigram_llama(chain_table(V, 1)), 6, 20, stop_token_ids=(3,))
    assert r.token_ids == [1, 2, 3] and r.finish_reason == "stop"
    st = r.stats
    # the draft stops at its own stop token: 3 drafts, all accepted, no bonus emitted after the stop
    assert (st.drafted, st.accepted, st.recovered, st.bonus) == (3, 3, 0, 0)
    _check_invariants(st)
    # a stop token arriving as the recovered token
    table = chain_table(V, 1)
    table[2] = chain_table(V, 5)[2]
    r = _run(target, bigram_llama(table), 6, 20, stop_token_ids=(3,))
    assert r.token_ids == [1, 2, 3] and (r.stats.accepted, r.stats.recovered) == (2, 1)


def test_default_stop_ids_and_ignore_eos(target):
    dec = SpeculativeDecoder(target, bigram_llama(chain_table(V, 1)), None, draft_length=4, stop_token_ids=[5])
    assert dec.generate([[0]], GenerationConfig(max_new_tokens=10))[0].token_ids == [1, 2, 3, 4, 5]
    assert len(dec.generate([[0]], GenerationConfig(max_new_tokens=10, ignore_eos=True))[0].token_ids) == 10
    assert dec.generate([[0]], GenerationConfig(max_new_tokens=10, stop_token_ids=(2,)))[0].token_ids == [1, 2]


def test_context_limit_ends_with_length():
    small = bigram_llama(chain_table(V, 1), max_positions=12)
    dec = SpeculativeDecoder(small, bigram_llama(chain_table(V, 1), max_positions=12), None, draft_length=5)
    r = dec.generate([[0, 1, 2]], GenerationConfig(max_new_tokens=50))[0]
    assert len(r.token_ids) == 9 and r.finish_reason == "length"


def test_streaming_callback_and_events(target):
    dec = SpeculativeDecoder(target, bigram_llama(chain_table(V, 1)), None, draft_length=3)
    seen: dict[int, list[int]] = {0: [], 1: []}
    res = dec.generate([[0], [7]], GenerationConfig(max_new_tokens=7), on_tokens=lambda r, ids: seen[r].extend(ids))
    assert seen[0] == res[0].token_ids and seen[1] == res[1].token_ids
    events = list(dec.stream([[0]], GenerationConfig(max_new_tokens=7)))
    assert [len(e.token_ids) for e in events] == [4, 3]
    assert events[-1].result is not None and events[0].result is None


@pytest.mark.parametrize("lean", [True, False])
def test_slot_cache_rollback_equals_recomputation(lean):
    model = random_llama(vocab=32, seed=1, hidden=32, layers=2)
    runner = _Runner(model, "target", lean)
    assert (runner.lean is not None) == lean
    rng = torch.Generator().manual_seed(0)
    a = torch.randint(0, 32, (9,), generator=rng).tolist()
    b = torch.randint(0, 32, (5,), generator=rng).tolist()
    slots = _Slots(runner, 2)
    with torch.inference_mode():
        slots.feed([a, a[:4]], 0, False)
        slots.feed([b, b[:2]], 0, False)  # speculative tokens, then rejected:
        slots.keep([len(a) + 2, 4])  # row 0 keeps 2 of them, row 1 none
        logits, _ = slots.feed([[5, 6], [7]], 2, False)
        ref0 = model(torch.tensor([a + b[:2] + [5, 6]])).logits[0, -2:]
        ref1 = model(torch.tensor([a[:4] + [7]])).logits[0, -1]
    assert torch.allclose(logits[0], ref0, atol=1e-5)
    assert torch.allclose(logits[1, -1], ref1, atol=1e-5)
    assert slots.length == len(a) + 2 + 2  # the rejected tail no row used was cropped


def test_padded_vocab_draft_is_sliced(target):
    # the draft has 4 padded ids whose logits would win if they were not sliced away
    v2 = V + 4
    table = torch.zeros(v2, v2)
    table[:V, :V] = chain_table(V, 1)
    table[:, V:] = 50.0
    draft = bigram_llama(table)
    dec = SpeculativeDecoder(target, draft, None, draft_length=3)
    assert dec.vocab == V
    r = dec.generate([[0]], GenerationConfig(max_new_tokens=8))[0]
    assert r.token_ids == list(range(1, 9)) and r.stats.acceptance_rate == 1.0


def test_tokenizer_length_bounds_the_vocab(target):
    class Tok:
        eos_token_id = None

        def __len__(self):
            return 12

    dec = SpeculativeDecoder(target, None, Tok())
    r = dec.generate([[9]], GenerationConfig(max_new_tokens=4))[0]
    # after 11 the chain goes to 12, which the tokenizer lacks: the best real token is taken instead
    assert r.token_ids[:2] == [10, 11] and max(r.token_ids) < 12


class ParityConstraint:
    """Test-only constraint: generated position j allows only ids of parity j % 2 and ids < limit;
    finished after `length` tokens. It checks that the decoder only advances allowed tokens."""

    def __init__(self, vocab: int, length: int, limit: int | None = None):
        self.vocab, self.length, self.limit = vocab, length, limit or vocab
        self.tokens: list[int] = []
        self.calls = {"advance": 0, "rollback": 0}

    def allowed(self) -> torch.Tensor:
        ids = torch.arange(self.vocab)
        return ((ids % 2) == (len(self.tokens) % 2)) & (ids < self.limit)

    def advance(self, token_id: int) -> None:
        assert not self.is_finished() and bool(self.allowed()[token_id]), (token_id, self.tokens)
        self.tokens.append(token_id)
        self.calls["advance"] += 1

    def rollback(self, n: int) -> None:
        assert 0 <= n <= len(self.tokens)
        if n:
            del self.tokens[-n:]
            self.calls["rollback"] += 1

    def is_finished(self) -> bool:
        return len(self.tokens) >= self.length


def constrained_reference(model, prompt: list[int], constraint, max_new: int) -> list[int]:
    """The target's own constrained greedy decoding, recomputing the whole sequence each step."""
    seq, out = list(prompt), []
    with torch.inference_mode():
        while len(out) < max_new and not constraint.is_finished():
            logits = model(torch.tensor([seq])).logits[0, -1, : constraint.vocab]
            logits = logits.masked_fill(~constraint.allowed(), float("-inf"))
            t = int(logits.argmax())
            constraint.advance(t)
            seq.append(t)
            out.append(t)
    return out


def test_constrained_speculative_greedy_equals_constrained_target_greedy():
    vocab = 32
    target = random_llama(vocab=vocab, seed=3, hidden=32, layers=2)
    draft = random_llama(vocab=vocab, seed=4, hidden=16, layers=1)
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9]]
    refs = [constrained_reference(target, p, ParityConstraint(vocab, 9, limit=20), 12) for p in prompts]
    for k in ("2", "5", "auto"):
        dec = SpeculativeDecoder(target, draft, None, draft_length=k)
        cons = [ParityConstraint(vocab, 9, limit=20) for _ in prompts]
        res = dec.generate(prompts, GenerationConfig(max_new_tokens=12), cons)
        assert [r.token_ids for r in res] == refs
        assert all(r.finish_reason == "stop" and len(r.token_ids) == 9 for r in res)
        assert all(c.tokens == r.token_ids for c, r in zip(cons, res))
    assert any(c.calls["rollback"] for c in cons)  # the rollback path ran


def test_constraint_that_allows_nothing_ends_the_request_as_a_dead_end():
    """Nothing may follow, yet the constraint is unfinished: the output does not match it, so the
    request ends as "dead_end", never as "stop" (which says the output is complete)."""
    target = random_llama(vocab=16, seed=3)

    class Dead(ParityConstraint):
        def allowed(self):
            return super().allowed() & torch.tensor(len(self.tokens) < 3)

    for k in ("4", "1", "auto"):
        dec = SpeculativeDecoder(target, random_llama(vocab=16, seed=5), None, draft_length=k)
        r = dec.generate([[1]], GenerationConfig(max_new_tokens=10), [Dead(16, 100)])[0]
        assert len(r.token_ids) == 3 and r.finish_reason == "dead_end"
    # a finished constraint still ends as "stop"
    r = dec.generate([[1]], GenerationConfig(max_new_tokens=10), [ParityConstraint(16, 3)])[0]
    assert len(r.token_ids) == 3 and r.finish_reason == "stop"


def test_learned_policy_with_a_saved_head(tmp_path, target):
    draft = bigram_llama(chain_table(V, 1))
    with pytest.raises(DsparkError, match="acceptance head"):
        SpeculativeDecoder(target, draft, None, draft_length="learned")
    head = AcceptanceHead(V, 0)
    with torch.no_grad():
        head.out.weight.zero_()
        head.out.bias.fill_(-0.5)  # predicts acceptance sigmoid(-0.5) = 0.38 for every token
    save_acceptance_head(head, tmp_path)
    # cumulative 0.38 >= 0.3 after one draft, 0.14 < 0.3 after two: every step drafts exactly 2
    dec = SpeculativeDecoder(target, draft, None, draft_length=lambda ctx: LearnedPolicy(0.3, fixed_cap=8),
                             acceptance_head=tmp_path)
    r = dec.generate([[0]], GenerationConfig(max_new_tokens=9))[0]
    assert r.token_ids == list(range(1, 10))
    assert r.stats.drafted_per_position == [3, 3]
    # the string form: the goodput cap may draft fewer, never more than the head allows
    dec = SpeculativeDecoder(target, draft, None, draft_length="learned:0.3", acceptance_head=tmp_path)
    r = dec.generate([[0]], GenerationConfig(max_new_tokens=9))[0]
    assert r.token_ids == list(range(1, 10)) and 1 <= len(r.stats.drafted_per_position) <= 2
    auto = SpeculativeDecoder(target, draft, None, acceptance_head=tmp_path)
    assert auto.policy_factory.resolved_kind(auto.policy_context) == "learned"


def test_acceptance_head_file_errors(tmp_path):
    from dspark.decode import load_acceptance_head

    with pytest.raises(DsparkError, match="no acceptance head"):
        load_acceptance_head(tmp_path)
    save_acceptance_head(AcceptanceHead(8, 4), tmp_path)
    assert load_acceptance_head(tmp_path).mlp_hidden_size == 4
    with pytest.raises(DsparkError, match="hidden size"):
        load_acceptance_head(tmp_path, hidden_size=16)
    (tmp_path / "acceptance_head.json").write_text('{"format": "other"}')
    with pytest.raises(DsparkError, match="not a dspark-acceptance-head"):
        load_acceptance_head(tmp_path)


def test_bad_inputs(target):
    dec = SpeculativeDecoder(target, bigram_llama(chain_table(V, 1)), None)
    with pytest.raises(DsparkError, match="prompt 1 is empty"):
        dec.generate([[1], []], GenerationConfig())
    with pytest.raises(DsparkError, match="context is 256"):
        dec.generate([[1] * 256], GenerationConfig())
    with pytest.raises(DsparkError, match="outside the vocabulary"):
        dec.generate([[1, 99]], GenerationConfig())
    with pytest.raises(DsparkError, match="K must be >= 1"):
        SpeculativeDecoder(target, None, None, draft_length="0")
    with pytest.raises(DsparkError, match="K must be >= 1"):
        dec.generate([[1]], GenerationConfig(), draft_length="static:0")
    with pytest.raises(DsparkError, match="temperature"):
        GenerationConfig(temperature=-0.5)
    with pytest.raises(DsparkError, match="top_p"):
        GenerationConfig(top_p=0.0)
    with pytest.raises(DsparkError, match="top_p"):
        GenerationConfig(top_p=1.01)
    with pytest.raises(DsparkError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises(DsparkError, match="different sampling"):
        dec.generate([[1], [2]], [GenerationConfig(), GenerationConfig(temperature=1.0)])
    with pytest.raises(DsparkError, match="batch_size"):
        dec.generate([[1]], GenerationConfig(), batch_size=0)

    class Tok:
        def __init__(self, vocab):
            self.v = vocab

        def get_vocab(self):
            return self.v

        def __len__(self):
            return len(self.v)

    with pytest.raises(IncompatibleTokenizersError):
        SpeculativeDecoder(target, None, Tok({"a": 0}), draft_tokenizer=Tok({"b": 0}))


def test_batch_size_splits_and_keeps_order(target):
    dec = SpeculativeDecoder(target, bigram_llama(chain_table(V, 1)), None, draft_length=2)
    prompts = [[i] for i in range(5)]
    res = dec.generate(prompts, GenerationConfig(max_new_tokens=3), batch_size=2)
    assert [r.token_ids for r in res] == [[(i + 1) % V, (i + 2) % V, (i + 3) % V] for i in range(5)]


def test_lean_forward_matches_hf_forward():
    from dspark.decode.fastpath import LeanLlama, supports

    model = random_llama(vocab=32, seed=2, hidden=32, layers=3)
    assert supports(model)
    lean = LeanLlama(model)
    ids = torch.randint(0, 32, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        cache = lean.new_cache(2)
        causal = torch.ones(7, 7, dtype=torch.bool).tril()[None, None].expand(2, 1, 7, 7)
        logits, hidden = lean(ids[:, :5], torch.arange(5)[None].expand(2, 5), causal[:, :, :5, :5], cache, 5, True)
        step, _ = lean(ids[:, 5:6], torch.full((2, 1), 5), None, cache, 1, False)
        ref = model(ids[:, :6], output_hidden_states=True)
    assert torch.allclose(logits, ref.logits[:, :5], atol=1e-5)
    assert torch.allclose(step[:, 0], ref.logits[:, 5], atol=1e-5)
    assert torch.allclose(hidden, ref.hidden_states[-1][:, 4], atol=1e-5)


def test_hf_path_decodes_like_the_lean_path(target):
    draft = bigram_llama(chain_table(V, 1))
    cfg = GenerationConfig(max_new_tokens=10)
    for lean in (True, False):
        dec = SpeculativeDecoder(target, draft, None, draft_length=3, lean=lean)
        assert (dec.target.lean is not None) == lean
        res = dec.generate([[0], [4, 5, 6]], cfg)
        assert [r.token_ids for r in res] == [list(range(1, 11)), [(6 + i) % V for i in range(1, 11)]]


def test_stream_does_not_leak_inference_mode(target):
    dec = SpeculativeDecoder(target, bigram_llama(chain_table(V, 1)), None, draft_length=2)
    for _ in dec.stream([[0]], GenerationConfig(max_new_tokens=6)):
        assert not torch.is_inference_mode_enabled()


def test_sampling_with_a_constraint_stays_valid():
    vocab = 32
    target = random_llama(vocab=vocab, seed=3, hidden=32, layers=2)
    draft = random_llama(vocab=vocab, seed=4, hidden=16, layers=1)
    dec = SpeculativeDecoder(target, draft, None, draft_length=3)
    cons = [ParityConstraint(vocab, 10, limit=24) for _ in range(6)]
    cfg = GenerationConfig(max_new_tokens=20, temperature=1.2, top_k=10, seed=5)
    res = dec.generate([[1, 2]] * 6, cfg, cons)  # ParityConstraint.advance asserts every token is allowed
    for r, c in zip(res, cons):
        assert r.token_ids == c.tokens and len(r.token_ids) == 10 and r.finish_reason == "stop"
        assert all(t % 2 == j % 2 and t < 24 for j, t in enumerate(r.token_ids))


def test_bfloat16_models_decode():
    t16 = bigram_llama(chain_table(V, 1)).to(torch.bfloat16)
    table = chain_table(V, 1)
    table[3] = chain_table(V, 6)[3]
    d16 = bigram_llama(table).to(torch.bfloat16)
    for lean in (True, False):
        dec = SpeculativeDecoder(t16, d16, None, draft_length=4, lean=lean)
        r = dec.generate([[0], [7, 8]], GenerationConfig(max_new_tokens=8))
        assert [x.token_ids for x in r] == [list(range(1, 9)), [(8 + i) % V for i in range(1, 9)]]
        assert r[0].stats.recovered >= 1  # the draft's wrong guess after token 3 was corrected


@pytest.mark.parametrize("lean", [True, False])
def test_rows_joining_and_leaving_a_running_batch_decode_as_alone(lean):
    """Continuous batching: requests added to a running session (longer and shorter prompts than the
    batch's cache, a one-token prompt) and one cancelled midway; every greedy output equals the
    request decoded alone, on the lean KV buffer and on transformers' DynamicCache."""
    import collections
    import copy

    target = random_llama(vocab=32, seed=3, hidden=32, layers=2)
    draft = copy.deepcopy(target)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen) * p.std())
    dec = SpeculativeDecoder(target, draft, None, draft_length=2, lean=lean)
    prompts = {"a": [1, 2, 3, 4, 5, 6, 7], "b": [9], "c": [4] * 20 + [2], "d": [5, 6], "e": [7, 8, 9]}
    cfg = GenerationConfig(max_new_tokens=14)
    alone = {k: dec.generate([p], cfg)[0] for k, p in prompts.items()}
    assert 0 < sum(r.stats.accepted for r in alone.values()) < sum(r.stats.drafted for r in alone.values())
    for k, p in prompts.items():  # the reference: HF's own greedy decoding, no dspark code involved
        assert alone[k].token_ids == hf_greedy(target, p, 14, None), k
    s = dec.session()
    out, results = collections.defaultdict(list), {}

    def run(steps=1):
        for _ in range(steps):
            for ev in s.step():
                out[ev.row].extend(ev.token_ids)
                assert ev.stats is not None and ev.stats.generated == len(out[ev.row])
                if ev.result is not None:
                    results[ev.row] = ev.result

    s.add([prompts["a"]], cfg, row_ids=["a"])
    run(2)
    s.add([prompts["b"], prompts["c"]], cfg, row_ids=["b", "c"])
    run(1)
    s.add([prompts["d"], prompts["e"]], cfg, row_ids=["d", "e"])
    run(1)
    assert s.cancel("e") and not s.cancel("e") and s.active == 4
    while s.active:
        run()
    for k in "abcd":
        assert out[k] == alone[k].token_ids == results[k].token_ids, k
        assert results[k].stats.generated == 14
    assert out["e"] == alone["e"].token_ids[: len(out["e"])] and "e" not in results
    assert s.step() == []
    # finished and cancelled requests are released: a long-lived server session keeps no past tokens
    assert all(seq == [] for seq in s.seqs) and all(p is None for p in s.policies)


def test_session_refuses_a_different_sampling_setting(target):
    dec = SpeculativeDecoder(target, None, None)
    s = dec.session()
    s.add([[0]], GenerationConfig(max_new_tokens=2, temperature=0.5, seed=1))
    assert not s.accepts(GenerationConfig(temperature=0.7))
    with pytest.raises(DsparkError, match="sampling setting"):
        s.add([[1]], GenerationConfig(max_new_tokens=2, temperature=0.7))
    greedy = dec.session()
    greedy.add([[0]], GenerationConfig(max_new_tokens=2))
    assert greedy.accepts(GenerationConfig(top_p=0.5))  # greedy ignores top_p


def test_adaptive_rows_verify_the_drafts_a_batch_computed_anyway(target):
    """A row whose adaptive policy planned 1 draft shares a batch with a static-8 row: the batch
    computes 8 drafts, and the adaptive row verifies all of them (free tokens); a static row keeps
    exactly its K. Outputs stay the target's own."""
    from dspark.decode.policy import ConfidencePolicy, StaticPolicy

    class OneDraft(ConfidencePolicy):
        def plan(self):
            from dspark.decode.policy import DraftPlan
            return DraftPlan(1)

    dec = SpeculativeDecoder(target, bigram_llama(chain_table(V, 1)), None)
    pols = [OneDraft(0.5), StaticPolicy(1), StaticPolicy(8)]
    s = dec.session()
    s.add([[0], [0], [0]], GenerationConfig(max_new_tokens=9), policies=pols)
    results = {}
    while s.active:
        for ev in s.step():
            if ev.result is not None:
                results[ev.row] = ev.result
    assert all(results[i].token_ids == list(range(1, 10)) for i in range(3))
    # adaptive: 8 drafts verified in the first (shared) step + bonus = 9 tokens in one step
    assert results[0].stats.verify_steps == 1 and results[0].stats.drafted == 8
    assert results[1].stats.verify_steps == 5 and results[2].stats.verify_steps == 1


def test_a_batch_of_adaptive_rows_drafts_the_batch_planners_k(target):
    """Rows with adaptive policies share one K chosen by the decoder's BatchPlanner (not the max of
    their own choices); a lone row follows its own policy; static rows are never overridden. The
    planner measures costs from every step, so the next request starts from them."""
    from dspark.decode.policy import GoodputPolicy, StaticPolicy

    class FixedPlanner:
        draft_cost, verify_costs, rows = None, {}, 1  # nothing to inherit

        def __init__(self, k):
            self.k, self.calls = k, []

        def choose(self, curves, k_max, allow_zero=True):
            self.calls.append((len(curves), k_max))
            return self.k

        def observe(self, *a):
            pass

    dec = SpeculativeDecoder(target, bigram_llama(chain_table(V, 1)), None, draft_length="goodput")
    cfg = GenerationConfig(max_new_tokens=9)
    res = dec.generate([[0]], cfg)[0]
    assert dec.batch_planner.verify.known and dec.batch_planner.draft.known  # measured by that request
    assert res.token_ids == list(range(1, 10))
    joining = GoodputPolicy()
    dec.session().add([[3]], cfg, policies=[joining])
    assert joining.draft_cost == pytest.approx(dec.batch_planner.draft_cost)  # not a cold guess
    assert joining.verify_costs == dec.batch_planner.verify_costs and joining.accepted == 0
    dec.batch_planner = FixedPlanner(2)
    res = dec.generate([[0], [5]], cfg)
    assert [r.token_ids for r in res] == [list(range(1, 10)), list(range(6, 15))]
    assert all(r.stats.drafted_per_position[2:] in ([], [0] * (len(r.stats.drafted_per_position) - 2))
               for r in res)  # never a third draft
    assert all(r.stats.verify_steps == 3 for r in res)  # 2 accepted + bonus = 3 tokens per step
    assert dec.batch_planner.calls and all(n == 2 for n, _ in dec.batch_planner.calls)
    def run(prompts, policies):
        s = dec.session()
        s.add(prompts, cfg, policies=policies)
        out = {}
        while s.active:
            out.update({ev.row: ev.result for ev in s.step() if ev.result is not None})
        return [out[i] for i in range(len(prompts))]

    dec.batch_planner.calls.clear()
    run([[0]], [GoodputPolicy()])
    assert dec.batch_planner.calls == []  # one row: its own policy decides
    mixed = run([[0], [0]], [GoodputPolicy(), StaticPolicy(1)])
    assert dec.batch_planner.calls == [] and mixed[1].stats.verify_steps == 5
