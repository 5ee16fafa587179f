"""Training a draft on a logits cache: a short distillation raises held-out expected acceptance;
an interrupted run resumes to exactly the uninterrupted result; checkpoints never unpickle; LoRA
merges into a plain checkpoint; on-policy batches; the acceptance head the decoder's `learned`
policy loads; bad settings fail before work."""

import json
import math

import pytest
import torch

from dspark.distill import checkpoint as ckpt
from dspark.distill.cache import LogitsCache
from dspark.distill.evaluate import DraftForward, evaluate_heldout
from dspark.distill.onpolicy import is_onpolicy_step, sample_continuations
from dspark.distill.train import TrainConfig, cosine_lr, train_draft, validate_config, weights_digest
from dspark.errors import DataError, DsparkError
from tests.distill.train_helpers import DRAFT, HELDOUT, TARGET, collect_small_cache, load_float32

VOCAB = 4096


@pytest.fixture(scope="module")
def cache():
    """The shared small cache (collected once per test process)."""
    return LogitsCache(collect_small_cache())


def cfg(**kw):
    base = dict(objective="fkl", steps=6, lr=2e-3, batch_size=4, heldout_percent=HELDOUT, eval_every=100)
    base.update(kw)
    return TrainConfig(**base)


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    lrs = [cosine_lr(s, 100, 1.0, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b - 1e-12 for a, b in zip(lrs[10:], lrs[11:]))  # monotone decay after warmup


# TVD's gradient is sparse (only the sign of p - q per bucket), so it moves more slowly at this budget.
@pytest.mark.parametrize("objective, margin", [("fkl", 0.01), ("tvd", 0.002)])
def test_short_distillation_raises_heldout_expected_acceptance(tmp_path, cache, objective, margin):
    draft = load_float32(DRAFT).model
    res = train_draft(draft, cache, cfg(objective=objective, steps=16), tmp_path / "ck", vocab_size=VOCAB)
    before, after = res.heldout_before["expected_acceptance"], res.heldout_after["expected_acceptance"]
    assert 0.0 < before < 1.0 and after > before + margin, (before, after)
    # the lower bound (no credit for the tail) and the objective move the right way too
    assert res.heldout_after["expected_acceptance_lower"] > res.heldout_before["expected_acceptance_lower"]
    assert res.heldout_after["objective"] < res.heldout_before["objective"]
    # the numbers are the held-out ones: recomputing on the trained model gives the same value
    again = evaluate_heldout(DraftForward(res.model), cache, objective, heldout_percent=HELDOUT, batch_size=4,
                             vocab_size=VOCAB)
    assert again["expected_acceptance"] == pytest.approx(after, abs=1e-5)
    assert res.history[0]["step"] == 0 and res.history[-1]["step"] == 16


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, cache):
    settings = cfg(steps=6, checkpoint_every=2, acceptance_head=True)
    full = train_draft(load_float32(DRAFT).model, cache, settings, tmp_path / "full", vocab_size=VOCAB)

    class Killed(Exception):
        pass

    def die_at_5(step, total, info):
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        train_draft(load_float32(DRAFT).model, cache, settings, tmp_path / "cut", vocab_size=VOCAB, progress=die_at_5)
    latest = ckpt.load_latest(tmp_path / "cut")
    assert latest is not None and latest.step == 4
    assert [p.name for p in (tmp_path / "cut").glob("step-*")] == ["step-00000004"]  # older ones pruned
    resumed = train_draft(load_float32(DRAFT).model, cache, settings, tmp_path / "cut", vocab_size=VOCAB)
    assert resumed.resumed_from == 4 and resumed.steps == 6
    a, b = params(full.model), params(resumed.model)
    assert a.keys() == b.keys()
    for n in a:
        assert torch.allclose(a[n], b[n], atol=1e-6, rtol=0), n
    for (n, x), (_, y) in zip(full.head.named_parameters(), resumed.head.named_parameters()):
        assert torch.allclose(x, y, atol=1e-6, rtol=0), n
    assert resumed.heldout_before == full.heldout_before
    assert resumed.positions_seen == full.positions_seen


def test_checkpoint_of_another_run_is_refused(tmp_path, cache):
    train_draft(load_float32(DRAFT).model, cache, cfg(steps=2), tmp_path / "ck", vocab_size=VOCAB)
    with pytest.raises(DataError, match="another run.*objective"):
        train_draft(load_float32(DRAFT).model, cache, cfg(steps=2, objective="rkl"), tmp_path / "ck", vocab_size=VOCAB)


def test_checkpoint_files_are_safetensors_and_json_only(tmp_path, cache):
    model = load_float32(DRAFT).model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    folder = ckpt.save_checkpoint(tmp_path, 7, model, opt, {"identity": {}, "note": "x"})
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["model.safetensors", "optimizer.safetensors", "state.json"]
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 7
    # round trip into a fresh model + optimizer reproduces parameters and Adam moments
    other = load_float32(DRAFT).model
    opt2 = torch.optim.AdamW(other.parameters(), lr=1e-3)
    ckpt.restore(ckpt.load_latest(tmp_path), other, opt2)
    assert weights_digest(other) == weights_digest(model)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for i in s1["state"]:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1["state"][i][k], s2["state"][i][k])
    # a damaged weights file is a DataError naming it, not a crash
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(DataError, match="model.safetensors"):
        ckpt.restore(ckpt.load_latest(tmp_path), other, opt2)


def test_lora_trains_adapters_and_merges_into_a_plain_model(tmp_path, cache):
    draft = load_float32(DRAFT).model
    before = params(draft)
    res = train_draft(draft, cache, cfg(steps=4, lora_rank=4, lr=5e-3), tmp_path / "ck", vocab_size=VOCAB)
    merged = res.model
    assert not hasattr(merged, "peft_config") and type(merged).__name__ == "LlamaForCausalLM"
    after = params(merged)
    assert after.keys() == before.keys()  # no lora_A / lora_B left: a plain checkpoint
    changed = [n for n in after if not torch.equal(after[n], before[n])]
    assert changed and all(any(t in n for t in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj")) for n in changed)
    assert res.heldout_after["expected_acceptance"] > res.heldout_before["expected_acceptance"]
    merged.save_pretrained(tmp_path / "m", safe_serialization=True)
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    assert weights_digest(back) == weights_digest(merged)


def test_onpolicy_draws_are_deterministic_with_the_requested_rate():
    draws = [is_onpolicy_step(3, s, 0.25) for s in range(4000)]
    assert draws == [is_onpolicy_step(3, s, 0.25) for s in range(4000)]
    assert abs(sum(draws) / 4000 - 0.25) < 0.03
    assert not any(is_onpolicy_step(3, s, 0.0) for s in range(50))
    assert all(is_onpolicy_step(3, s, 1.0) for s in range(50))


def test_onpolicy_training_samples_from_the_draft_and_scores_with_the_target(tmp_path, cache):
    target = load_float32(TARGET).model
    draft = load_float32(DRAFT).model
    start = weights_digest(draft)
    gen = torch.Generator().manual_seed(0)
    conts = sample_continuations(draft, [[5, 6, 7], [9]], 5, generator=gen, stop_token_ids=(), vocab_size=VOCAB)
    assert [len(c) for c in conts] == [5, 5] and all(0 <= t < VOCAB for c in conts for t in c)
    res = train_draft(draft, cache, cfg(steps=3, on_policy=1.0, on_policy_max_new_tokens=8), tmp_path / "ck",
                      vocab_size=VOCAB, target_model=target, stop_token_ids=(1,))
    assert res.onpolicy_steps == 3
    assert weights_digest(res.model) != start
    assert all(math.isfinite(h.get("loss", 0.0)) for h in res.history)
    with pytest.raises(DsparkError, match="target model"):
        train_draft(load_float32(DRAFT).model, cache, cfg(steps=1, on_policy=0.5), tmp_path / "x", vocab_size=VOCAB)


def test_acceptance_head_learns_and_the_learned_policy_loads_it(tmp_path, cache):
    from dspark.decode.acceptance_head import has_acceptance_head
    from dspark.decode.engine import SpeculativeDecoder
    from dspark.decode.types import GenerationConfig
    from dspark.distill.distill import save_draft_folder

    res = train_draft(load_float32(DRAFT).model, cache, cfg(steps=12, acceptance_head=True), tmp_path / "ck",
                      vocab_size=VOCAB)
    hb, ha = res.heldout_before, res.heldout_after
    assert ha["head_bce"] < hb["head_bce"] and ha["head_abs_error"] < hb["head_abs_error"]
    target = load_float32(TARGET)
    folder = save_draft_folder(res.model, target.tokenizer, tmp_path / "draft", {"test": True}, head=res.head)
    assert has_acceptance_head(folder)
    draft = load_float32(str(folder))
    dec = SpeculativeDecoder(target.model, draft.model, target.tokenizer, draft_length="learned")
    assert dec.acceptance_head is not None
    h = torch.randn(3, draft.model.config.hidden_size)
    assert torch.allclose(dec.acceptance_head(h), res.head(h), atol=1e-6)
    prompt = target.tokenizer("def add(a, b):\n")["input_ids"]
    out = dec.generate([prompt], GenerationConfig(max_new_tokens=12))[0]
    ids = list(prompt)
    with torch.no_grad():  # the target's own greedy continuation, recomputed from scratch per token
        for _ in range(len(out.token_ids)):
            ids.append(int(target.model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert len(out.token_ids) > 0 and out.token_ids == ids[len(prompt):]  # still lossless


@pytest.mark.parametrize("bad, match", [
    (dict(objective="kl"), "unknown objective"),
    (dict(steps=3, epochs=1.0), "not both"),
    (dict(steps=0), "--steps"),
    (dict(lr=-1.0), "--lr"),
    (dict(lora_rank=0), "--lora"),
    (dict(on_policy=1.5), "--on-policy"),
    (dict(heldout_percent=0.0), "--heldout-percent"),
])
def test_bad_settings_fail_before_work(bad, match):
    base = dict(objective="fkl", steps=None, epochs=None)
    base.update(bad)
    with pytest.raises(DsparkError, match=match):
        validate_config(TrainConfig(**base))
