"""Drafts made from the target: specs, layer plans, the narrow shape and embedding projection (pure),
then real truncated / narrow folders that load and decode as drafts."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from dspark.cli import app
from dspark.errors import DsparkError
from dspark.models import load_model
from dspark.models.draft_init import (DRAFT_META, SHARED_FILES, DraftInitSpec, init_draft, kept_layers,
                                      narrow_shape, parse_spec, projection_basis, renamed_tensors,
                                      spec_from_options, truncated_config)

from .conftest import BUILTIN
from .tiny_gguf import tiny_llama

runner = CliRunner()


@pytest.mark.parametrize("text,expected", [
    ("truncate:4", DraftInitSpec("truncate", first=4)),
    ("truncate:0,10,20,29", DraftInitSpec("truncate", layers=(0, 10, 20, 29))),
    ("truncate:5,", DraftInitSpec("truncate", layers=(5,))),
    (" every:6 ", DraftInitSpec("truncate", every=6)),
    ("narrow:256x2", DraftInitSpec("narrow", width=256, first=2)),
])
def test_spec_strings_round_trip(text, expected):
    spec = parse_spec(text)
    assert spec == expected and parse_spec(spec.text) == spec
    assert "/" not in spec.slug and ":" not in spec.slug


@pytest.mark.parametrize("text,match", [
    ("truncate", "is not one of"), ("shrink:4", "method 'shrink' is unknown"), ("truncate:0", ">= 1"),
    ("truncate:a,b", "'a' is not an integer"), ("narrow:256", "WIDTHxLAYERS"), ("every:x", "not an integer"),
])
def test_bad_specs_are_one_line_errors(text, match):
    with pytest.raises(DsparkError, match=match) as e:
        parse_spec(text)
    assert "\n" not in str(e.value)


def test_cli_options_make_one_spec():
    assert spec_from_options("4", None, None) == parse_spec("truncate:4")
    assert spec_from_options(None, 6, None) == parse_spec("every:6")
    assert spec_from_options("2", None, 256, seed=3) == parse_spec("narrow:256x2", seed=3)
    for args, match in [((None, None, None), "give --layers N"), (("4", 2, None), "not both"),
                        (("2", 3, 256), "does not go with --width"), ((None, None, 256), "needs --layers N"),
                        (("0,1", None, 256), "needs --layers N")]:
        with pytest.raises(DsparkError, match=match):
            spec_from_options(*args)


def test_kept_layers():
    assert kept_layers(parse_spec("truncate:4"), 30) == [0, 1, 2, 3]
    assert kept_layers(parse_spec("truncate:0,10,20,29"), 30) == [0, 10, 20, 29]
    assert kept_layers(parse_spec("every:6"), 30) == [0, 6, 12, 18, 24, 29]  # and the last layer
    assert kept_layers(parse_spec("every:5"), 31) == [0, 5, 10, 15, 20, 25, 30]
    for text, match in [("truncate:30", "between 1 and 29"), ("truncate:0,30", "layer 30 does not exist"),
                        ("truncate:3,1", "increasing order"), ("truncate:1,1", "increasing order"),
                        ("every:1", "K must be in 2..29"), ("every:30", "K must be in 2..29")]:
        with pytest.raises(DsparkError, match=match):
            kept_layers(parse_spec(text), 30)


def test_renamed_tensors_keep_and_renumber_layers():
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] + [
        f"model.layers.{i}.{p}" for i in range(4) for p in ("self_attn.q_proj.weight", "mlp.up_proj.weight")]
    out = renamed_tensors(names, [1, 3], 4)
    assert out["model.layers.3.mlp.up_proj.weight"] == "model.layers.1.mlp.up_proj.weight"
    assert out["model.layers.1.self_attn.q_proj.weight"] == "model.layers.0.self_attn.q_proj.weight"
    assert not any(k.startswith(("model.layers.0.", "model.layers.2.")) for k in out)
    assert all(out[n] == n for n in names[:3])
    with pytest.raises(DsparkError, match="cannot find the target's 5 decoder layers"):
        renamed_tensors(names, [0], 5)


def test_truncated_config_subsets_per_layer_lists():
    cfg = {"num_hidden_layers": 4, "layer_types": ["a", "b", "c", "d"], "eos_token_id": [1, 2, 3, 4]}
    assert truncated_config(cfg, [0, 3]) == {"num_hidden_layers": 2, "layer_types": ["a", "d"],
                                             "eos_token_id": [1, 2, 3, 4]}


SMOL = SimpleNamespace(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                       intermediate_size=1536)


@pytest.mark.parametrize("width,heads,kv,ffn", [(256, 4, 1, 704), (384, 6, 2, 1024), (192, 3, 1, 512),
                                                (64, 1, 1, 192)])
def test_narrow_shape_keeps_head_size_and_ratios(width, heads, kv, ffn):
    s = narrow_shape(SMOL, width, 2)
    assert (s["num_attention_heads"], s["num_key_value_heads"], s["head_dim"], s["intermediate_size"]) == \
        (heads, kv, 64, ffn)
    assert s["num_attention_heads"] % s["num_key_value_heads"] == 0


@pytest.mark.parametrize("width,match", [(576, "narrower than the target's 576"), (100, "multiple of the target's "
                                                                                        "head size 64")])
def test_bad_widths(width, match):
    with pytest.raises(DsparkError, match=match):
        narrow_shape(SMOL, width, 2)


def test_projection_basis_is_the_best_rank_w_embedding():
    torch.manual_seed(0)
    low_rank = torch.randn(200, 6) @ torch.randn(6, 32)  # [V, H] of rank 6
    basis = projection_basis(low_rank, 6)
    assert basis.shape == (32, 6)
    assert torch.allclose(basis.T @ basis, torch.eye(6), atol=1e-5)
    # rank 6 fits in width 6 exactly: the projected embedding keeps every token-token dot product
    projected = low_rank @ basis
    assert torch.allclose(projected @ projected.T, low_rank @ low_rank.T, rtol=1e-4, atol=1e-3)
    # and the first direction carries the most energy
    assert (projected[:, 0] ** 2).sum() >= (projected[:, 1] ** 2).sum()


# --- real folders ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    """A saved 4-layer random Llama with the built-in tokenizer and an untied head."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(BUILTIN / "tiny-code"))
    model = tiny_llama(tok, layers=4, tied=False, seed=2)
    folder = tmp_path_factory.mktemp("target") / "tiny-target"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    return folder


def prompt_ids(tok):
    return torch.tensor([tok("def add(a, b):\n    return").input_ids])


def test_truncated_draft_is_the_target_with_those_layers(target_dir, tmp_path):
    result = init_draft(str(target_dir), tmp_path / "d", parse_spec("truncate:0,3"))
    target = load_model(str(target_dir)).model
    draft = load_model(str(result.path))
    expected = copy.deepcopy(target)
    expected.model.layers = torch.nn.ModuleList([expected.model.layers[i] for i in (0, 3)])
    expected.config.num_hidden_layers = 2
    for layer_index, layer in enumerate(expected.model.layers):
        layer.self_attn.layer_idx = layer_index
    ids = prompt_ids(draft.tokenizer)
    with torch.no_grad():
        assert torch.equal(draft.model(ids).logits, expected(ids).logits)
    meta = json.loads((result.path / DRAFT_META).read_text())
    assert (meta["method"], meta["spec"], meta["layers"], meta["target_layers"]) == \
        ("truncate", "truncate:0,3", [0, 3], 4)
    assert meta["vocab"] == {"kind": "target", "size": draft.vocab_size, "d2t": None}
    assert meta["parameters"] == draft.num_parameters
    for name in SHARED_FILES:  # tokenizer and generation settings are the target's, byte for byte
        if (target_dir / name).is_file():
            assert (result.path / name).read_bytes() == (target_dir / name).read_bytes(), name


def test_narrow_draft_shares_the_tokenizer_and_projects_the_embedding(target_dir, tmp_path):
    from safetensors import safe_open

    result = init_draft(str(target_dir), tmp_path / "n", parse_spec("narrow:32x2", seed=5))
    draft = load_model(str(result.path))
    cfg = draft.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim) == (32, 2, 2, 16)
    with safe_open(str(target_dir / "model.safetensors"), framework="pt") as fh:
        emb, head = fh.get_tensor("model.embed_tokens.weight"), fh.get_tensor("lm_head.weight")
    basis = projection_basis(emb, 32)
    assert torch.allclose(draft.model.get_input_embeddings().weight, emb @ basis, atol=1e-6)
    assert torch.allclose(draft.model.get_output_embeddings().weight, head @ basis, atol=1e-6)  # untied target
    assert draft.tokenizer.get_vocab() == load_model(str(target_dir)).tokenizer.get_vocab()
    again = init_draft(str(target_dir), tmp_path / "n2", parse_spec("narrow:32x2", seed=5))
    with safe_open(str(result.path / "model.safetensors"), framework="pt") as a, \
            safe_open(str(again.path / "model.safetensors"), framework="pt") as b:
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())  # seeded


def test_out_folder_rules(target_dir, tmp_path):
    out = tmp_path / "d"
    first = init_draft(str(target_dir), out, parse_spec("truncate:1"))
    with pytest.raises(DsparkError, match="already exists: pass --force"):
        init_draft(str(target_dir), out, parse_spec("truncate:1"))
    assert init_draft(str(target_dir), out, parse_spec("truncate:1"), reuse=True).reused
    with pytest.raises(DsparkError, match="holds another draft than truncate:2"):
        init_draft(str(target_dir), out, parse_spec("truncate:2"), reuse=True)
    replaced = init_draft(str(target_dir), out, parse_spec("truncate:2"), force=True)
    assert replaced.meta["layers"] == [0, 1] and first.meta["layers"] == [0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temporary folders left


def test_truncated_draft_decodes_losslessly(target_dir, tmp_path):
    from dspark.decode.engine import SpeculativeDecoder
    from dspark.decode.types import GenerationConfig

    result = init_draft(str(target_dir), tmp_path / "d", parse_spec("truncate:2"))
    target, draft = load_model(str(target_dir)), load_model(str(result.path))
    prompt = prompt_ids(target.tokenizer)[0].tolist()
    gcfg = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    alone = SpeculativeDecoder(target.model, None, target.tokenizer).generate([prompt], gcfg)[0]
    pair = SpeculativeDecoder(target.model, draft.model, target.tokenizer)
    paired = pair.generate([prompt], gcfg, draft_length="3")[0]
    assert paired.token_ids == alone.token_ids and paired.stats.drafted > 0


def test_cli_draft_init(target_dir, tmp_path):
    out = tmp_path / "d"
    res = runner.invoke(app, ["draft-init", "--target", str(target_dir), "--out", str(out), "--every", "2"])
    assert res.exit_code == 0, res.output
    assert "every:2, layers [0, 2, 3] of the target's 4" in res.output and "parameters" in res.output
    res = runner.invoke(app, ["draft-init", "--target", str(target_dir), "--out", str(out), "--every", "2", "--json"])
    assert res.exit_code == 2 and "already exists" in res.output
    res = runner.invoke(app, ["draft-init", "--target", str(target_dir), "--out", str(tmp_path / "x"),
                              "--layers", "9"])
    assert res.exit_code == 2 and "keep between 1 and 3 of the target's 4 layers" in res.output
    res = runner.invoke(app, ["draft-init", "--target", "no-such-model-here", "--out", str(tmp_path / "y"),
                              "--layers", "1"])
    assert res.exit_code == 2 and "not available locally" in res.output


def test_distill_draft_init_makes_the_draft_then_distils_it(tmp_path):
    from tests.distill.train_helpers import HELDOUT, TARGET, collect_small_cache

    out = tmp_path / "run"
    args = ["distill", "--target", TARGET, "--draft-init", "truncate:1", "--cache", str(collect_small_cache()),
            "--out", str(out), "--steps", "2", "--batch-size", "4", "--heldout-percent", str(HELDOUT),
            "--eval-prompts", "2", "--eval-max-new-tokens", "8", "--device", "cpu", "--dtype", "float32", "--json"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    (d,) = json.loads(res.stdout[res.stdout.index("{"):])["drafts"]
    init = out / "init" / f"{TARGET}-truncate-1"
    assert d["name"] == init.name and d["provenance"]["draft_base"] == str(init)
    assert json.loads((init / DRAFT_META).read_text())["layers"] == [0]
    assert load_model(d["path"]).config.num_hidden_layers == 1
    res = runner.invoke(app, ["distill", "--target", TARGET, "--task", "code", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "give at least one --draft or --draft-init" in res.output
    res = runner.invoke(app, [*args[:4], "shrink:2", *args[5:]])
    assert res.exit_code == 2 and "method 'shrink' is unknown" in res.output
