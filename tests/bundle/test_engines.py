"""Bundles that engines load unchanged: every written vllm.json uses only field names vLLM's
SpeculativeConfig accepts, sglang.sh only flags SGLang's server takes, draft/ is exactly a model folder
(the acceptance head lives in acceptance_head/, hashed like every file; schema 1 bundles with the head
inside draft/ still load it from there), and a draft neither engine loads (optimum-quanto) gets no
engine files."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml

from dspark.bundle import engines
from dspark.bundle.export import export_bundle, hash_tree
from dspark.bundle.manifest import HEAD_DIR, MANIFEST_NAME, read_manifest
from dspark.bundle.verify import open_bundle, verify_bundle
from dspark.errors import DsparkError
from dspark.io import atomic_write_yaml
from tests.bundle.conftest import BUILTIN, DRAFT, TARGET
from tests.common import have, isolated, offline_env

# vLLM's `SpeculativeConfig` fields, read from vllm/config/speculative.py of vllm-project/vllm at commit
# 002e77c1f0ef9b19cff8b9e21cfbd6feb3d6b443 (main; the file records no release number). The last five are
# filled in by the engine, not by users; `tensor_parallel_size` exists only to refuse it by name.
VLLM_SPECULATIVE_CONFIG_FIELDS = frozenset({
    "enforce_eager", "num_speculative_tokens", "model", "method", "draft_tensor_parallel_size",
    "tensor_parallel_size", "quantization", "moe_backend", "attention_backend", "kv_cache_dtype",
    "max_model_len", "revision", "code_revision", "index_share_for_mtp_iteration", "disable_padded_drafter_batch",
    "disable_eagle_block_drop", "use_local_argmax_reduction", "use_heterogeneous_vocab", "prompt_lookup_max",
    "prompt_lookup_min", "parallel_drafting", "num_speculative_tokens_per_batch_size",
    "suffix_decoding_max_tree_depth", "suffix_decoding_max_cached_requests", "suffix_decoding_max_spec_factor",
    "suffix_decoding_min_token_prob", "draft_load_config", "rejection_sample_method", "synthetic_acceptance_rates",
    "synthetic_acceptance_length", "enable_adaptive_verification", "draft_sample_method", "dspark_draft_topk",
    "target_model_config", "target_parallel_config", "draft_model_config", "draft_parallel_config",
})
# `SpeculativeMethod` in the same file (the MTP model types collapse to "mtp")
VLLM_METHODS = frozenset({"ngram", "medusa", "mlp_speculator", "draft_model", "suffix", "custom_class", "eagle",
                          "eagle3", "extract_hidden_states", "mtp", "dflash", "ngram_gpu", "dspark"})
# the `LLM(...)` / `vllm serve` arguments vllm.json uses (vllm/entrypoints/llm.py: model, speculative_config)
VLLM_ENGINE_ARGS = frozenset({"model", "speculative_config"})
# SGLang server flags sglang.sh passes, read from python/sglang/srt/server_args.py of sgl-project/sglang at
# commit 001067fffe33427bee0ed2f007fb7551a1d76b44 (`ServerArgs` fields; the flag is the field name with
# dashes). Its speculative section has no heterogeneous-vocabulary flag.
SGLANG_FLAGS = frozenset({"--model-path", "--speculative-algorithm", "--speculative-draft-model-path",
                          "--speculative-num-steps", "--speculative-eagle-topk", "--speculative-num-draft-tokens",
                          "--host", "--port"})
SGLANG_ALGORITHMS = frozenset({"EAGLE", "EAGLE3", "NEXTN", "STANDALONE", "NGRAM", "DFLASH", "DSPARK"})

XDRAFT = "tiny-code-draft-xbpe"


def check_vllm_json(cfg: dict) -> None:
    """AssertionError naming every key vLLM would not accept."""
    assert set(cfg) <= VLLM_ENGINE_ARGS, f"unknown vLLM engine arguments {sorted(set(cfg) - VLLM_ENGINE_ARGS)}"
    spec = cfg["speculative_config"]
    unknown = sorted(set(spec) - VLLM_SPECULATIVE_CONFIG_FIELDS)
    assert not unknown, f"vLLM's SpeculativeConfig has no field(s) {unknown}"
    assert spec["method"] in VLLM_METHODS


def check_sglang_script(text: str) -> None:
    """AssertionError naming every flag SGLang's server does not take."""
    words = shlex.split(" ".join(line.rstrip("\\") for line in text.splitlines() if not line.startswith("#")))
    flags = {w for w in words if w.startswith("--")}
    assert flags <= SGLANG_FLAGS, f"SGLang has no flag(s) {sorted(flags - SGLANG_FLAGS)}"
    assert words[words.index("--speculative-algorithm") + 1] in SGLANG_ALGORITHMS


def check_engine_files(bundle: Path) -> None:
    if (bundle / "vllm.json").exists():
        check_vllm_json(json.loads((bundle / "vllm.json").read_text()))
    if (bundle / "sglang.sh").exists():
        check_sglang_script((bundle / "sglang.sh").read_text())


def test_the_checks_catch_a_typo():
    good = {"model": "t", "speculative_config": {"method": "draft_model", "model": "./draft",
                                                 "num_speculative_tokens": 3}}
    check_vllm_json(good)
    with pytest.raises(AssertionError, match="num_speculative_token'"):
        check_vllm_json({**good, "speculative_config": {**good["speculative_config"], "num_speculative_token": 3}})
    with pytest.raises(AssertionError, match="speculative_confg"):
        check_vllm_json({"model": "t", "speculative_confg": {}})
    with pytest.raises(AssertionError, match="--speculative-num-step'"):
        check_sglang_script("exec python -m sglang.launch_server --speculative-algorithm STANDALONE "
                            "--speculative-num-step 3")


def test_same_tokenizer_bundle_engine_files(bundle):
    check_engine_files(bundle)
    assert (bundle / "vllm.json").exists() and (bundle / "sglang.sh").exists()
    card = (bundle / "README.md").read_text()
    assert "num_speculative_tokens_per_batch_size` is not set" in card
    assert "`draft_tensor_parallel_size` is left unset" in card


# -- the acceptance head outside draft/ -------------------------------------------------------------


@pytest.fixture(scope="module")
def head_bundle(tmp_path_factory):
    """A bundle of the built-in pair whose draft carries an acceptance head (random weights: the
    `learned` policy reads it; losslessness does not depend on it)."""
    if not ((BUILTIN / TARGET).is_dir() and (BUILTIN / DRAFT).is_dir()):
        pytest.skip("built-in pair not built yet")
    from dspark.decode import AcceptanceHead, save_acceptance_head

    root = tmp_path_factory.mktemp("head")
    draft = root / "draft-with-head"
    shutil.copytree(BUILTIN / DRAFT, draft)
    hidden = json.loads((draft / "config.json").read_text())["hidden_size"]
    save_acceptance_head(AcceptanceHead(hidden, 4), draft)
    with offline_env():
        export_bundle(root / "b", target=TARGET, draft=str(draft), draft_length="learned")
    return root / "b"


def test_head_is_outside_the_draft_folder_and_hashed(head_bundle):
    m = read_manifest(head_bundle)
    assert m.schema_version == 2 and m.draft.acceptance_head and m.head_dir == HEAD_DIR
    assert sorted(p.name for p in (head_bundle / "draft").glob("*.safetensors")) == ["model.safetensors"]
    assert not list((head_bundle / "draft").glob("acceptance_head*"))
    for fn in ("acceptance_head.json", "acceptance_head.safetensors"):
        assert f"{HEAD_DIR}/{fn}" in m.files
    check_engine_files(head_bundle)
    assert f"in `{HEAD_DIR}/`" in (head_bundle / "README.md").read_text()


def test_serve_and_verify_load_the_head_from_its_folder(head_bundle):
    from dspark.serve.runtime import runtime_from_bundle

    rt = runtime_from_bundle(head_bundle, device="cpu", dtype="float32")
    assert rt.decoder.acceptance_head is not None and rt.decoder.policy_context.has_acceptance_head
    rep = verify_bundle(head_bundle, max_new_tokens=8)
    assert rep["ok"] and rep["draft"]["acceptance_head"] == HEAD_DIR and rep["draft"]["schema_version"] == 2


def _as_schema_1(src: Path, dst: Path) -> None:
    """The layout dspark wrote before the head moved: head files inside draft/, schema_version 1."""
    shutil.copytree(src, dst)
    for f in (dst / HEAD_DIR).iterdir():
        f.rename(dst / "draft" / f.name)
    (dst / HEAD_DIR).rmdir()
    from dspark.distill.collect import safetensors_hash

    raw = yaml.safe_load((dst / MANIFEST_NAME).read_text())
    raw["schema_version"] = 1
    del raw["draft"]["quantization_format"]  # not in schema 1 manifests
    raw["draft"]["weight_sha256"] = safetensors_hash(dst / "draft")  # schema 1 fingerprinted the head too
    raw["files"] = {k: v.model_dump() for k, v in hash_tree(dst).items()}
    atomic_write_yaml(dst / MANIFEST_NAME, raw)


def test_schema_1_bundle_is_migrated_on_read(head_bundle, tmp_path):
    from dspark.serve.runtime import runtime_from_bundle

    old = tmp_path / "old"
    _as_schema_1(head_bundle, old)
    opened = open_bundle(old)
    assert opened.head_folder == old / "draft"
    rt = runtime_from_bundle(old, device="cpu", dtype="float32")
    assert rt.decoder.acceptance_head is not None
    assert verify_bundle(old, max_new_tokens=4)["draft"]["acceptance_head"] == "draft"


def test_schema_2_bundle_with_safetensors_beside_the_draft_weights_is_refused(head_bundle, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(head_bundle, bad)
    shutil.copyfile(bad / HEAD_DIR / "acceptance_head.safetensors", bad / "draft" / "acceptance_head.safetensors")
    from dspark.distill.collect import safetensors_hash

    raw = yaml.safe_load((bad / MANIFEST_NAME).read_text())
    # hashed and fingerprinted as if exported so: only the layout is wrong
    raw["files"] = {k: v.model_dump() for k, v in hash_tree(bad).items()}
    raw["draft"]["weight_sha256"] = safetensors_hash(bad / "draft")
    atomic_write_yaml(bad / MANIFEST_NAME, raw)
    with pytest.raises(DsparkError, match=r"holds acceptance_head\.safetensors besides its weights "
                                          r"\(model\.safetensors\): vLLM and SGLang load every") as e:
        open_bundle(bad)
    assert "\n" not in str(e.value)


def test_export_refuses_a_draft_folder_an_engine_would_misload(tmp_path, need_pair):
    draft = tmp_path / "d"
    shutil.copytree(BUILTIN / DRAFT, draft)
    shutil.copyfile(draft / "model.safetensors", draft / "consolidated.safetensors")
    with offline_env(), pytest.raises(DsparkError, match="holds consolidated.safetensors besides its weights"):
        export_bundle(tmp_path / "b", target=TARGET, draft=str(draft))
    assert not (tmp_path / "b").exists()


# -- drafts the engines cannot load, and cross-tokenizer pairs -----------------------------------------


@pytest.mark.skipif(not (BUILTIN / XDRAFT).is_dir(), reason=f"needs built-in {XDRAFT}")
def test_cross_bundle_vllm_json_is_valid(tmp_path, need_pair):
    with offline_env():
        export_bundle(tmp_path / "x", target=TARGET, draft=XDRAFT, draft_length="2")
    check_engine_files(tmp_path / "x")
    assert json.loads((tmp_path / "x" / "vllm.json").read_text())["speculative_config"]["use_heterogeneous_vocab"]


@pytest.mark.skipif(not (BUILTIN / XDRAFT).is_dir(), reason=f"needs built-in {XDRAFT}")
def test_cross_draft_head_is_left_out(tmp_path, need_pair):
    """An acceptance head predicts same-tokenizer acceptance: a cross-tokenizer bundle does not ship
    it (recorded as absent, so the server, which passes a recorded head explicitly, still starts)."""
    from dspark.decode import AcceptanceHead, CrossTokenizerDecoder, save_acceptance_head
    from dspark.serve.runtime import runtime_from_bundle

    draft = tmp_path / "x"
    shutil.copytree(BUILTIN / XDRAFT, draft)
    save_acceptance_head(AcceptanceHead(json.loads((draft / "config.json").read_text())["hidden_size"]), draft)
    with offline_env():
        result = export_bundle(tmp_path / "b", target=TARGET, draft=str(draft), draft_length="auto")
        rt = runtime_from_bundle(tmp_path / "b", device="cpu", dtype="float32")
    m = read_manifest(tmp_path / "b")
    assert not m.draft.acceptance_head and not (tmp_path / "b" / HEAD_DIR).exists()
    assert not any("acceptance_head" in rel for rel in m.files)
    assert any(n.startswith("left out the draft's acceptance head") for n in result.notes)
    assert isinstance(rt.decoder, CrossTokenizerDecoder)


def test_refusals_and_card_by_quantization_format():
    from tests.bundle.test_manifest import _manifest

    m = _manifest()
    assert engines.engine_refusals(m) == {}
    for fmt in ("bitsandbytes", "gptq"):
        m.draft.quantization_format = fmt
        assert engines.engine_refusals(m) == {}
    m.draft.quantization_format, m.draft.quantization = "quanto", "int8"
    refused = engines.engine_refusals(m)
    assert set(refused) == {"vllm.json", "sglang.sh"} and "optimum-quanto" in refused["vllm.json"]
    card = engines.model_card(m)
    assert re.search(r"vLLM: no `vllm.json`: the draft is quantized with optimum-quanto \(int8\), which neither "
                     r"vLLM nor SGLang loads \(both load bitsandbytes and GPTQ drafts\)", card)
    assert "vllm serve" not in card


@pytest.mark.skipif(not have("optimum.quanto"), reason="optimum-quanto is not installed")
@isolated
def test_quanto_draft_bundle_has_no_engine_files(tmp_path, need_pair):
    from dspark.quantize.run import QuantizeOptions, quantize_draft

    with offline_env():
        quantize_draft(tmp_path / "q", QuantizeOptions(method="int8", backend="quanto"), draft=DRAFT)
        result = export_bundle(tmp_path / "b", target=TARGET, draft=str(tmp_path / "q"))
    m = read_manifest(tmp_path / "b")
    assert m.draft.quantization_format == "quanto"
    assert not (tmp_path / "b" / "vllm.json").exists() and not (tmp_path / "b" / "sglang.sh").exists()
    assert [n for n in result.notes if n.startswith("no ")] == [
        f"no {f}: {engines.engine_refusals(m)[f]}" for f in ("vllm.json", "sglang.sh")]
    assert "optimum-quanto" in (tmp_path / "b" / "README.md").read_text()
