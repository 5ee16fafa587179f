"""GGUF models: converted once (atomically, keyed by sha256) into a safetensors folder that loads
like the file itself, then resolved by path, by name or through an alias."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

from dspark.errors import DsparkError
from dspark.io import sha256_file
from dspark.models import gguf as gg
from dspark.models import load_model, registry, resolve_model
from dspark.models.registry import Alias, list_models

from .conftest import BUILTIN, fake_hub_snapshot
from .tiny_gguf import CHAT_TEMPLATE, tiny_llama, write_gguf

TEXT = "def add(a, b):\n    return a + b\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(source model, its tokenizer, the GGUF file written from them)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(BUILTIN / "tiny-code"))
    model = tiny_llama(tok)
    path = write_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf", model, tok)
    return model, tok, path


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
    """One conversion of the tiny file shared by the tests that only read it: (cache, folder)."""
    cache = tmp_path_factory.mktemp("shared-dspark-cache")
    return cache, gg.convert_gguf(tiny[2], cache=cache, log=lambda _m: None)


def logits(model, tok, text=TEXT):
    with torch.no_grad():
        return model(torch.tensor([tok(text).input_ids])).logits


def test_gguf_file_converts_to_a_folder_that_loads_like_the_source(tiny, dspark_cache):
    source, tok, path = tiny
    m = load_model(str(path))
    folder = dspark_cache / "models" / sha256_file(path)[:16]
    assert m.resolved.kind == "gguf" and m.resolved.gguf == path.resolve() and m.resolved.local_path == folder
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", gg.GGUF_META):
        assert (folder / name).is_file(), name
    assert (folder / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    meta = json.loads((folder / gg.GGUF_META).read_text())
    assert (meta["sha256"], meta["name"], meta["dtype"]) == (sha256_file(path), "tiny-llama.F32", "float32")
    # F32 tensors: llama.cpp's Q/K permutation and transformers' inverse are exact
    assert torch.equal(logits(m.model, m.tokenizer), logits(source, m.tokenizer))
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == tok.eos_token_id


def test_quantized_gguf_folder_gives_the_gguf_loads_logits(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, tok, _ = tiny
    path = write_gguf(tmp_path / "tiny-llama.Q8_0.gguf", source, tok, quant="Q8_0")
    direct = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    direct_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    m = load_model(str(tmp_path))  # the folder holding the file
    assert m.tokenizer(TEXT).input_ids == direct_tok(TEXT).input_ids
    assert (m.tokenizer.eos_token, m.tokenizer.pad_token) == (direct_tok.eos_token, direct_tok.pad_token)
    assert torch.equal(logits(m.model, m.tokenizer), logits(direct, m.tokenizer))
    # the weights really went through Q8_0 (else this test would not see dequantization)
    assert not torch.equal(logits(m.model, m.tokenizer), logits(source, m.tokenizer))


def test_a_converted_file_is_found_again_without_converting(tiny, converted, tmp_path, monkeypatch):
    cache, folder = converted
    monkeypatch.setenv("DSPARK_CACHE", str(cache))

    def no_conversion(*_a, **_k):
        raise AssertionError("converted twice")

    monkeypatch.setattr(gg, "_convert_into", no_conversion)
    assert resolve_model(str(tiny[2])).local_path == folder  # same path, size and mtime: no hashing
    by_name = resolve_model("tiny-llama.F32")
    assert (by_name.kind, by_name.local_path) == ("gguf", folder)
    assert resolve_model("tiny-llama.F32.gguf").local_path == folder
    # a copy elsewhere is hashed once, recognised, and remembered
    copy = shutil.copy(tiny[2], tmp_path / "renamed.gguf")
    assert resolve_model(str(copy)).local_path is None
    assert load_model(str(copy)).resolved.local_path == folder
    assert resolve_model(str(copy)).local_path == folder


def test_a_failed_conversion_leaves_nothing_behind(tiny, dspark_cache, monkeypatch):
    real = gg._convert_into

    def crash(gguf, tmp, sha):
        tmp.mkdir(parents=True)
        (tmp / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed")

    monkeypatch.setattr(gg, "_convert_into", crash)
    with pytest.raises(RuntimeError, match="killed"):
        gg.convert_gguf(tiny[2], log=lambda _m: None)
    assert [p for p in (dspark_cache / "models").iterdir() if not p.name.endswith(".lock")] == []
    assert resolve_model(str(tiny[2])).local_path is None
    monkeypatch.setattr(gg, "_convert_into", real)
    assert gg.convert_gguf(tiny[2], log=lambda _m: None) == dspark_cache / "models" / sha256_file(tiny[2])[:16]


def test_concurrent_conversions_convert_once_into_one_folder(tiny, monkeypatch):
    real, calls = gg._convert_into, []

    def counted(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(gg, "_convert_into", counted)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(gg.convert_gguf(tiny[2], log=lambda _m: None)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 2 and results[0] == results[1]
    assert gg._complete(results[0])


def test_gguf_paths_and_bad_ones(tiny, tmp_path):
    assert resolve_model(str(tiny[2].parent)).gguf == tiny[2].resolve()
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        shutil.copy(tiny[2], two / name)
    with pytest.raises(DsparkError, match=r"2 GGUF files \(a.gguf, b.gguf\)"):
        resolve_model(str(two))
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(DsparkError, match=r"is a file: .*or a \.gguf file"):
        resolve_model(str(other))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file at all")
    with pytest.raises(DsparkError, match="could not convert GGUF file") as e:
        load_model(str(broken))
    assert "\n" not in str(e.value)


@pytest.fixture
def test_alias(tiny, tmp_path, monkeypatch):
    """An alias `tiny-gguf` whose GGUF lives under tmp/shared/models (the only shared folder seen)."""
    shared = tmp_path / "shared" / "models"
    alias = Alias("test-org/tiny-gguf", "tiny", "0.3M", gguf="tiny/tiny-llama.F32.gguf",
                  gguf_sha256=sha256_file(tiny[2]))
    monkeypatch.setitem(registry.ALIASES, "tiny-gguf", alias)
    monkeypatch.setattr(registry, "shared_models_dirs", lambda: [shared])
    return shared / alias.gguf


def test_alias_resolves_to_its_shared_gguf_then_the_converted_folder(tiny, test_alias, offline_hub):
    r = resolve_model("tiny-gguf")
    assert (r.kind, r.available, r.resolves_to, r.local_path) == ("alias", False, "test-org/tiny-gguf", None)
    test_alias.parent.mkdir(parents=True)
    shutil.copy(tiny[2], test_alias)
    r = resolve_model("tiny-gguf")
    assert (r.available, r.gguf, r.local_path) == (True, test_alias.resolve(), None)
    folder = load_model("tiny-gguf").resolved.local_path  # offline: converted from the shared file
    assert resolve_model("tiny-gguf").local_path == folder
    test_alias.unlink()  # the converted folder alone keeps it available
    r = resolve_model("tiny-gguf")
    assert (r.available, r.local_path, r.resolves_to, r.gguf) == (True, folder, str(folder), None)
    row = next(x for x in list_models() if x["name"] == "tiny-gguf")
    assert row["available"] and "GGUF, converted" in row["notes"]
    assert "tiny-llama.F32" not in [x["name"] for x in list_models()]  # listed once, as its alias
    # the hub checkpoint, when cached, is the original model and wins
    snap = fake_hub_snapshot(offline_hub, "test-org/tiny-gguf", BUILTIN / "tiny-code-draft-s")
    assert resolve_model("tiny-gguf").local_path == snap


def test_an_unconverted_gguf_alias_is_available_offline_before_any_load(tiny, test_alias):
    from dspark.distill.collect import check_target_available

    test_alias.parent.mkdir(parents=True)
    shutil.copy(tiny[2], test_alias)
    check_target_available("tiny-gguf")  # collect / distill check this before loading anything
    assert resolve_model("tiny-gguf").local_path is None  # checking converted nothing


def test_alias_refuses_a_different_file_under_its_name(tiny, test_alias, tmp_path):
    test_alias.parent.mkdir(parents=True)
    write_gguf(test_alias, tiny_llama(tiny[1], seed=1), tiny[1])
    with pytest.raises(DsparkError, match=r"has sha256 .* not the .* this model name stands for"):
        load_model("tiny-gguf")


def test_converted_gguf_is_listed_by_name(converted, monkeypatch):
    cache, folder = converted
    monkeypatch.setenv("DSPARK_CACHE", str(cache))
    row = next(x for x in list_models() if x["name"] == "tiny-llama.F32")
    assert (row["kind"], row["resolves_to"], row["available"]) == ("gguf", str(folder), True)
    assert row["parameters"] == sum(p.numel() for p in load_model(str(folder)).model.parameters())


def test_smollm2_alias_is_listed():
    row = next(x for x in list_models() if x["name"] == "smollm2-135m")
    assert row["family"] == "smollm2" and "instruct" in row["notes"]
    shared = registry.find_shared_file(registry.ALIASES["smollm2-135m"].gguf)
    assert row["available"] == (shared is not None)
    assert row["resolves_to"] == (str(shared) if shared else "HuggingFaceTB/SmolLM2-135M-Instruct")


def test_reduced_vocabulary_draft_folder_is_refused(tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "draft"
    shutil.copytree(BUILTIN / "tiny-code-draft-s", folder)
    save_file({"d2t": torch.zeros(8, dtype=torch.int64)}, str(folder / "d2t.safetensors"))
    with pytest.raises(DsparkError, match="reduced-vocabulary draft"):
        load_model(str(folder))


SMOLLM2 = registry.find_shared_file("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def smollm2_converted(tmp_path_factory):
    """SmolLM2's GGUF converted once per test session (tens of seconds)."""
    if SMOLLM2 is None:
        pytest.skip("shared/models/smollm2-135m-instruct is not on this machine")
    cache = tmp_path_factory.mktemp("smollm2-cache")
    return cache, gg.convert_gguf(SMOLLM2, cache=cache, log=lambda _m: None)


@pytest.mark.slow
def test_smollm2_converted_folder_matches_the_gguf_load(smollm2_converted, monkeypatch):
    from transformers import AutoModelForCausalLM

    cache, folder = smollm2_converted
    monkeypatch.setenv("DSPARK_CACHE", str(cache))
    m = load_model("smollm2-135m")
    assert m.resolved.local_path == folder and m.num_parameters == 134_515_008
    direct = AutoModelForCausalLM.from_pretrained(str(SMOLLM2.parent), gguf_file=SMOLLM2.name,
                                                  dtype=torch.float32).eval()
    prompt = "def fibonacci(n):"
    assert m.tokenizer(prompt).input_ids[0] != m.tokenizer.bos_token_id  # plain text gets no BOS
    assert torch.equal(logits(m.model, m.tokenizer, prompt), logits(direct, m.tokenizer, prompt))
    ids = torch.tensor([m.tokenizer(prompt).input_ids])
    out = m.model.generate(ids, max_new_tokens=12, do_sample=False)
    assert m.tokenizer.decode(out[0, ids.shape[1]:]).startswith("\n    if n == 0:\n        return 1")
    assert "<|im_start|>" in m.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
