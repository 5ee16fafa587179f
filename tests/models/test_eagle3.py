"""The EAGLE-3 head (`dspark.models.eagle3`) on the built-in tiny-code target (Llama, 6 x 256)."""

from __future__ import annotations

import json

import pytest
import torch

from dspark.errors import DataError, DsparkError
from dspark.models.eagle3 import (capture_features, default_aux_layers, init_head_for, load_head, save_head,
                                  vllm_speculative_config)
from dspark.models.vocab_map import build_vocab_map

# Copied from vllm-project/speculators at commit c05b95b303f7d4f21e8d7624e0ffa1c2d9b4d73b:
# src/speculators/models/eagle3/config.py (Eagle3SpeculatorConfig's fields) and the fields it inherits
# from SpeculatorModelConfig in src/speculators/config.py (speculators_model_type, speculators_config;
# speculators_version is the writing library's version and is not written by dspark).
SPECULATORS_EAGLE3_KEYS = {"speculators_model_type", "architectures", "transformer_layer_config", "draft_vocab_size",
                           "norm_before_residual", "target_hidden_size", "eagle_aux_hidden_state_layer_ids",
                           "norm_before_fc", "fc_norm", "norm_output", "embed_requires_grad", "speculators_config"}
# src/speculators/config.py SpeculatorsConfig and VerifierConfig; src/speculators/proposals/greedy.py
SPECULATORS_CONFIG_KEYS = {"algorithm", "proposal_methods", "default_proposal_method", "verifier"}
VERIFIER_KEYS = {"name_or_path", "architectures"}
GREEDY_PROPOSAL_KEYS = {"proposal_type", "speculative_tokens", "verifier_accept_k", "accept_tolerance"}
# Tensor names: src/speculators/model.py (DraftVocabMixin: embed_tokens, lm_head, d2t, t2d),
# src/speculators/models/eagle3/core.py (fc, layers, norm) and model_definitions.py (hidden_norm);
# vLLM's llama_eagle3.py loads exactly these (d2t -> draft_id_to_target_id, t2d skipped).
SPECULATORS_TENSORS = {"embed_tokens.weight", "fc.weight", "norm.weight", "lm_head.weight",
                       "layers.0.input_layernorm.weight", "layers.0.hidden_norm.weight",
                       "layers.0.post_attention_layernorm.weight", "layers.0.self_attn.q_proj.weight",
                       "layers.0.self_attn.k_proj.weight", "layers.0.self_attn.v_proj.weight",
                       "layers.0.self_attn.o_proj.weight", "layers.0.mlp.gate_proj.weight",
                       "layers.0.mlp.up_proj.weight", "layers.0.mlp.down_proj.weight"}


@pytest.fixture(scope="module")
def target():
    from dspark.models import load_model

    model = load_model("tiny-code", device="cpu", dtype="float32").model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def batch(target):
    """Two rows (the second right-padded) with the target's features."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 4096, (2, 14), generator=g)
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[1, 10:] = 0
    with torch.no_grad():
        feats, _ = capture_features(target, ids, mask, (1, 3, 5))
    t = ids.shape[1] - 1
    return {"features": feats[:, :-1], "token_ids": ids[:, 1:], "positions": torch.arange(1, t + 1)[None].expand(2, t),
            "valid": mask[:, 1:].bool()}


def test_default_layers_follow_speculators():
    assert default_aux_layers(32) == (2, 16, 29)  # speculators' [2, L // 2, L - 3]
    assert default_aux_layers(30) == (2, 15, 27)  # SmolLM2-135M
    assert default_aux_layers(6) == (1, 3, 5)  # tiny-code: [2, 3, 3] would repeat a layer
    assert default_aux_layers(3) == (0, 1, 2)
    with pytest.raises(DsparkError, match="3 distinct"):
        default_aux_layers(2)


def test_features_are_the_hidden_states_entering_the_chosen_layers(target):
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        feats, logits = capture_features(target, ids, None, (1, 3, 5))
        ref = target(input_ids=ids, output_hidden_states=True).hidden_states
    assert feats.shape == (1, 4, 3 * 256) and logits.shape == (1, 4, 4096)
    assert torch.equal(feats[..., 256:512], ref[3])  # vLLM's layer id k = HF hidden_states[k]


def test_shapes(target, batch):
    head = init_head_for(target, seed=0)
    hidden = head.unroll(**batch, steps=3)
    assert len(hidden) == 3 and all(h.shape == (2, 13, 256) for h in hidden)
    assert head.logits(hidden[0]).shape == (2, 13, 4096)
    logits, h = head.step(batch["features"][:, :4], batch["token_ids"][:, :4], batch["positions"][:, :4], head.start())
    assert logits.shape == (2, 4, 4096) and h.shape == (2, 4, 256)
    with pytest.raises(DsparkError, match="last dimension 100"):
        head.step(torch.zeros(2, 1, 100), batch["token_ids"][:, :1], batch["positions"][:, :1], head.start())


def _decode_chain(head, batch, row: int, anchor: int, steps: int) -> list[torch.Tensor]:
    """What a decode-time proposer does from `anchor`: the head's cache holds positions 0..anchor
    (from the target's features), then each draft step feeds the head's own hidden state back."""
    cache = head.start()
    sl = slice(row, row + 1)
    logits, hidden = head.step(batch["features"][sl, :anchor + 1], batch["token_ids"][sl, :anchor + 1],
                               batch["positions"][sl, :anchor + 1], cache)
    out = [logits[0, anchor]]
    hidden = hidden[:, -1:]
    for s in range(1, steps):
        tok = batch["token_ids"][sl, anchor + s:anchor + s + 1]
        logits, hidden = head.step(hidden, tok, batch["positions"][sl, anchor:anchor + 1] + s, cache)
        out.append(logits[0, 0])
    return out


def test_training_forward_equals_decode_time_steps(target, batch):
    head = init_head_for(target, seed=1)
    steps = 3
    with torch.no_grad():
        unrolled = [head.logits(h) for h in head.unroll(**batch, steps=steps)]
        for row in range(2):
            n = int(batch["valid"][row].sum())
            for anchor in range(n - steps + 1):
                for s, logits in enumerate(_decode_chain(head, batch, row, anchor, steps)):
                    torch.testing.assert_close(logits, unrolled[s][row, anchor], rtol=1e-4, atol=1e-4)


def test_anchors_select_the_same_chains(target, batch):
    head = init_head_for(target, seed=2)
    anchors = torch.tensor([[1, 4, 8], [0, 2, 5]])
    with torch.no_grad():
        full = head.unroll(**batch, steps=3)
        some = head.unroll(**batch, steps=3, anchors=anchors)
    for f, s in zip(full, some):
        torch.testing.assert_close(f.gather(1, anchors[..., None].expand(-1, -1, 256)), s, rtol=1e-4, atol=1e-4)


def test_unrolled_steps_read_the_heads_own_features_not_the_targets(target, batch):
    """Step 1 at index i must depend on the target's features up to position i only (it reads the
    head's own step-0 state); feeding the target's features of position i + 1 (EAGLE-1-style
    teacher forcing) would make it depend on them."""
    head = init_head_for(target, seed=3)
    i = 4
    changed = dict(batch, features=batch["features"].clone())
    changed["features"][:, i + 1:] += 1.0
    with torch.no_grad():
        a = head.unroll(**batch, steps=3)
        b = head.unroll(**changed, steps=3)
    torch.testing.assert_close(a[1][:, i], b[1][:, i])
    torch.testing.assert_close(a[2][:, i], b[2][:, i])
    assert not torch.allclose(a[0][:, i + 1], b[0][:, i + 1])  # the perturbation is real


def test_reduced_vocabulary_head(target):
    counts = torch.arange(4096).flip(0)
    vmap = build_vocab_map(counts, 512)
    head = init_head_for(target, vocab_map=vmap, seed=0)
    assert head.lm_head.weight.shape == (512, 256)
    torch.testing.assert_close(head.lm_head.weight, target.lm_head.weight[vmap.target_ids])
    assert torch.equal(head.d2t, vmap.d2t) and torch.equal(head.t2d, vmap.t2d)
    assert not head.lm_head.weight.requires_grad and not head.embed_tokens.weight.requires_grad
    assert set(dict(head.trainable().named_parameters())) == {n for n, _ in head.named_parameters()
                                                               if not n.startswith(("lm_head", "embed_tokens"))}


def test_saved_head_matches_speculators_format_and_reloads(target, batch, tmp_path):
    from safetensors import safe_open

    vmap = build_vocab_map(torch.arange(4096) % 97, 1024)
    head = init_head_for(target, vocab_map=vmap, seed=4, verifier_name_or_path="tiny-code")
    folder = save_head(head, tmp_path / "head")
    cfg = json.loads((folder / "config.json").read_text())
    assert set(cfg) == SPECULATORS_EAGLE3_KEYS
    assert cfg["speculators_model_type"] == "eagle3" and cfg["architectures"] == ["Eagle3Speculator"]
    spec = cfg["speculators_config"]
    assert set(spec) == SPECULATORS_CONFIG_KEYS and spec["algorithm"] == "eagle3"
    assert spec["default_proposal_method"] == "greedy"
    assert set(spec["proposal_methods"][0]) == GREEDY_PROPOSAL_KEYS
    assert spec["proposal_methods"][0]["proposal_type"] == "greedy"
    assert set(spec["verifier"]) == VERIFIER_KEYS and spec["verifier"]["architectures"] == ["LlamaForCausalLM"]
    layer = cfg["transformer_layer_config"]
    assert layer["model_type"] == "llama" and layer["num_hidden_layers"] == 1 and layer["vocab_size"] == 4096
    assert cfg["draft_vocab_size"] == 1024 and cfg["eagle_aux_hidden_state_layer_ids"] == [1, 3, 5]
    assert cfg["norm_before_residual"] is True and cfg["norm_before_fc"] is False
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        shapes = {n: tuple(f.get_slice(n).get_shape()) for n in names}
    assert names == SPECULATORS_TENSORS | {"d2t", "t2d"}
    # the shapes vLLM's Eagle3LlamaForCausalLM builds: q/k/v read 2 x hidden, fc reads 3 x hidden
    hd, heads, kv = layer["head_dim"], layer["num_attention_heads"], layer["num_key_value_heads"]
    assert shapes["layers.0.self_attn.q_proj.weight"] == (heads * hd, 2 * 256)
    assert shapes["layers.0.self_attn.k_proj.weight"] == (kv * hd, 2 * 256)
    assert shapes["fc.weight"] == (256, 3 * 256) and shapes["lm_head.weight"] == (1024, 256)
    assert shapes["d2t"] == (1024,) and shapes["t2d"] == (4096,)
    back = load_head(folder)
    with torch.no_grad():
        a = [head.logits(h) for h in head.unroll(**batch, steps=2)]
        b = [back.logits(h) for h in back.unroll(**batch, steps=2)]
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    assert vllm_speculative_config(folder, 3) == {"method": "eagle3", "model": str(folder), "num_speculative_tokens": 3}


def test_bad_head_folders_are_refused(target, tmp_path):
    with pytest.raises(DataError, match="not an EAGLE-3 head folder"):
        load_head(tmp_path)
    folder = save_head(init_head_for(target, seed=0), tmp_path / "h")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["norm_output"] = True
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DataError, match="norm_output"):
        load_head(folder)


def test_cache_rollback_and_masked_entries(target, batch):
    """What a proposer does after verification: drop rejected drafts (crop) or mask another row's
    entries (valid = False); either way the next step sees exactly the kept entries."""
    head = init_head_for(target, seed=6)
    f, t, p = batch["features"][:1], batch["token_ids"][:1], batch["positions"][:1]
    with torch.no_grad():
        fresh = head.start()
        head.step(f[:, :5], t[:, :5], p[:, :5], fresh)
        want, _ = head.step(f[:, 5:6], t[:, 5:6], p[:, 5:6], fresh)

        cache = head.start()
        _, h = head.step(f[:, :5], t[:, :5], p[:, :5], cache)
        head.step(h[:, -1:], t[:, 5:6], p[:, 4:5] + 1, cache)  # a draft step that gets rejected
        cache.crop(5)
        got, _ = head.step(f[:, 5:6], t[:, 5:6], p[:, 5:6], cache)
        torch.testing.assert_close(got, want)

        masked = head.start()
        _, h = head.step(f[:, :5], t[:, :5], p[:, :5], masked)
        head.step(h[:, -1:], t[:, 5:6], p[:, 4:5] + 1, masked)
        masked.valid[:, 5] = False  # a hole instead of a crop
        got, _ = head.step(f[:, 5:6], t[:, 5:6], p[:, 5:6], masked)
        torch.testing.assert_close(got, want)
    with pytest.raises(DsparkError, match="cannot crop"):
        cache.crop(99)
