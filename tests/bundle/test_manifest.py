"""Schemas, the decoding-policy record, engine configs and the pure weight-name comparison."""

from __future__ import annotations

import json

import pytest
import yaml

from dspark.bundle.manifest import (BundleManifest, DecodingPolicy, DraftInfo, Metrics, TargetRef,
                                    check_relative_path, load_selection, resolve_selection_path)
from dspark.errors import DsparkError


def _selection(tmp_path, data) -> object:
    p = tmp_path / "selected.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_selection_minimal_fields(tmp_path):
    spec = load_selection(_selection(tmp_path, {"target": "t", "draft": "d", "draft_length": 4}))
    assert (spec.target, spec.draft, spec.draft_length, spec.quantization) == ("t", "d", 4, "none")
    assert spec.metrics.measured() == {}


def test_selection_unknown_key_lists_valid_keys(tmp_path):
    with pytest.raises(DsparkError, match=r"unknown key 'speed'.*valid keys: name, target, draft, draft_length"):
        load_selection(_selection(tmp_path, {"target": "t", "draft": "d", "draft_length": 4, "speed": 2}))


def test_selection_unknown_metric_is_an_error(tmp_path):
    with pytest.raises(DsparkError, match=r"unknown key 'metrics.accept_rate'.*acceptance_rate"):
        load_selection(_selection(tmp_path, {"target": "t", "draft": "d", "draft_length": 4,
                                             "metrics": {"accept_rate": 0.5}}))


def test_selection_missing_draft_and_bad_quantization(tmp_path):
    with pytest.raises(DsparkError, match="missing required key 'draft'"):
        load_selection(_selection(tmp_path, {"target": "t", "draft_length": 4}))
    with pytest.raises(DsparkError, match="quantization.*int3.*allowed: none, int8, int4, nf4, gptq4"):
        load_selection(_selection(tmp_path, {"target": "t", "draft": "d", "draft_length": 4, "quantization": "int3"}))


def test_selection_metric_range_checked(tmp_path):
    with pytest.raises(DsparkError, match="acceptance_rate"):
        load_selection(_selection(tmp_path, {"target": "t", "draft": "d", "draft_length": 4,
                                             "metrics": {"acceptance_rate": 1.5}}))


def test_selection_paths_relative_to_the_file(tmp_path):
    (tmp_path / "drafts" / "d1").mkdir(parents=True)
    sel = tmp_path / "selected.yaml"
    assert resolve_selection_path("drafts/d1", sel) == str((tmp_path / "drafts" / "d1").resolve())
    assert resolve_selection_path("tiny-code-draft-s", sel) == "tiny-code-draft-s"  # a name, not a path here


def _manifest_dict(**over) -> dict:
    m = {"schema_version": 1, "name": "b", "created_at": "2026-01-01T00:00:00+00:00",
         "target": {"name": "t", "kind": "builtin", "resolves_to": "/x/t", "tokenizer_sha256": "a" * 64,
                    "vocab_size": 10},
         "draft": {"name": "d", "source": "/x/d", "vocab_size": 10, "tokenizer_sha256": "a" * 64,
                   "weight_sha256": "b" * 64, "weight_files": ["model.safetensors"]},
         "policy": {"draft_length": "auto", "kind": "goodput+confidence", "num_speculative_tokens": 4,
                    "num_speculative_tokens_source": "default"},
         "files": {"draft/model.safetensors": {"sha256": "c" * 64, "size": 3}}}
    m.update(over)
    return m


def test_manifest_schema_version_and_paths():
    BundleManifest.parse(_manifest_dict())
    BundleManifest.parse(_manifest_dict(schema_version=2))
    with pytest.raises(DsparkError, match=r"unsupported schema_version 3 \(this dspark reads 1, 2\)"):
        BundleManifest.parse(_manifest_dict(schema_version=3))
    with pytest.raises(DsparkError, match="must be a relative path inside the bundle"):
        BundleManifest.parse(_manifest_dict(files={"../evil": {"sha256": "c" * 64, "size": 1}}))
    with pytest.raises(DsparkError, match="unknown key 'signature'"):
        BundleManifest.parse(_manifest_dict(signature="x"))
    with pytest.raises(ValueError):
        check_relative_path("/etc/passwd")


def test_policy_record_and_engine_k():
    from dspark.bundle.export import DEFAULT_ENGINE_K, policy_from_draft_length

    p = policy_from_draft_length("3", Metrics(), has_head=False)
    assert (p.kind, p.params, p.num_speculative_tokens, p.num_speculative_tokens_source) == \
        ("static", {"k": 3}, 3, "static policy")
    p = policy_from_draft_length("3", Metrics(best_draft_length=6), has_head=False)
    assert (p.num_speculative_tokens, p.num_speculative_tokens_source) == (6, "measured")
    p = policy_from_draft_length("auto", Metrics(), has_head=False)
    assert (p.kind, p.num_speculative_tokens, p.num_speculative_tokens_source) == \
        ("goodput+confidence", DEFAULT_ENGINE_K, "default")
    p = policy_from_draft_length("confidence:0.4", Metrics(), has_head=False)
    assert p.params == {"threshold": 0.4, "k_max": 16}
    with pytest.raises(DsparkError, match="'learned' needs an acceptance head"):
        policy_from_draft_length("learned", Metrics(), has_head=False)
    with pytest.raises(DsparkError, match="unknown draft length 'fast'"):
        policy_from_draft_length("fast", Metrics(), has_head=False)


def _manifest(included=False, k=5, metrics=None) -> BundleManifest:
    return BundleManifest(
        schema_version=1, name="pair", created_at="now",
        target=TargetRef(name="llama3-70b", kind="alias", resolves_to="meta-llama/Meta-Llama-3-70B",
                         revision="abc", tokenizer_sha256="a" * 64, vocab_size=128256, included=included),
        draft=DraftInfo(name="d", source="/d", vocab_size=128256, tokenizer_sha256="a" * 64,
                        weight_sha256="b" * 64, weight_files=["model.safetensors"]),
        policy=DecodingPolicy(draft_length="auto", kind="goodput+confidence", num_speculative_tokens=k,
                              num_speculative_tokens_source="measured"),
        metrics=metrics or Metrics(), files={})


def test_vllm_and_sglang_configs():
    from dspark.bundle import engines

    m = _manifest(k=5)
    cfg = engines.vllm_config(m)
    assert cfg == {"model": "meta-llama/Meta-Llama-3-70B",
                   "speculative_config": {"method": "draft_model", "model": "./draft", "num_speculative_tokens": 5}}
    cmd = engines.vllm_serve_command(m)
    assert cmd.startswith("vllm serve meta-llama/Meta-Llama-3-70B --speculative-config ")
    assert json.loads(cmd.split("--speculative-config ", 1)[1].strip("'")) == cfg["speculative_config"]
    sh = engines.sglang_script(m)
    for flag in ("--model-path meta-llama/Meta-Llama-3-70B", "--speculative-algorithm STANDALONE",
                 '--speculative-draft-model-path "$HERE/draft"', "--speculative-num-steps 5",
                 "--speculative-eagle-topk 1", "--speculative-num-draft-tokens 6", "127.0.0.1"):
        assert flag in sh
    inc = _manifest(included=True, k=2)
    assert engines.vllm_config(inc)["model"] == "./target"
    assert '--model-path "$HERE/target"' in engines.sglang_script(inc)


def test_model_card_shows_numbers_or_says_none():
    from dspark.bundle import engines

    card = engines.model_card(_manifest(metrics=Metrics(acceptance_rate=0.612, speedup=1.83, best_draft_length=5)))
    assert "| acceptance_rate | 0.612 |" in card and "| speedup | 1.83 |" in card
    assert "Nothing measured" in engines.model_card(_manifest())
    assert "PROJECTED" in engines.model_card(_manifest(metrics=Metrics(speedup=2.0, projected=True)))


def test_compare_keys_missing_unexpected_tied_and_shapes():
    from dspark.bundle.weights import compare_keys

    expected = {"emb": (10, 4), "lm_head": (10, 4), "w": (4, 4)}
    tied = {"lm_head": "emb"}
    assert compare_keys(expected, {"emb": (10, 4), "w": (4, 4)}, tied) == ([], [], [])
    missing, unexpected, shapes = compare_keys(expected, {"lm_head": (10, 4), "w2": (4, 4), "w": (4, 5)}, tied)
    assert missing == ["emb"]  # the source of a tie must be stored
    assert unexpected == ["w2"]
    assert shapes == ["w stored [4, 5], expected [4, 4]"]
    assert compare_keys({"emb": (1,)}, {"emb": (1,), "rotary.inv_freq": (2,)}, {}, [r"inv_freq"]) == ([], [], [])
