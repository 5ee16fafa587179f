import json
import re
import shutil

import pytest

from dspark.errors import DsparkError, ModelNotAvailableError
from dspark.models import ALIASES, BUILTINS, list_models, load_model, resolve_model
from dspark.models import registry
from dspark.models.registry import format_parameters, has_safetensors_weights

from .conftest import BUILTIN, STORIES, builtin_ready, fake_hub_snapshot

REQUIRED = {
    "llama3-70b": "meta-llama/Meta-Llama-3-70B",
    "llama3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama3.2-3b": "meta-llama/Llama-3.2-3B",
    "qwen2.5-72b": "Qwen/Qwen2.5-72B",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "gemma2-27b": "google/gemma-2-27b",
    "gemma2-9b": "google/gemma-2-9b",
    "gemma2-2b": "google/gemma-2-2b",
}


@pytest.mark.parametrize("alias,hub_id", sorted(REQUIRED.items()))
def test_required_alias_resolves_to_hub_id(alias, hub_id):
    r = resolve_model(alias)
    assert (r.kind, r.resolves_to, r.name) == ("alias", hub_id, alias)
    # The private test cache is empty: nothing is available and nothing was fetched.
    assert r.available is False and r.local_path is None


def test_every_alias_is_an_org_slash_name_hub_id():
    for name, alias in ALIASES.items():
        assert re.fullmatch(r"[\w.\-]+/[\w.\-]+", alias.hub_id), name
        # a short name may stand for the very alias `<name>-instruct` (a model registered without its base)
        short_for_instruct = ALIASES.get(f"{name}-instruct") is alias
        assert alias.instruct == (name.endswith("-instruct") or short_for_instruct), name


def test_cached_alias_is_available_and_loads_from_the_snapshot(offline_hub):
    snap = fake_hub_snapshot(offline_hub, "meta-llama/Llama-3.2-1B", STORIES)
    r = resolve_model("llama3.2-1b")
    assert r.available and r.local_path == snap
    # Same hub id, named directly rather than by alias.
    assert resolve_model("meta-llama/Llama-3.2-1B").kind == "hub"
    assert resolve_model("meta-llama/Llama-3.2-1B").local_path == snap
    m = load_model("llama3.2-1b")
    assert m.resolved.kind == "alias" and m.vocab_size == 512


def test_cached_snapshot_without_weights_is_not_available(offline_hub):
    fake_hub_snapshot(offline_hub, "Qwen/Qwen2.5-0.5B", STORIES, files=["config.json", "tokenizer.json"])
    assert resolve_model("qwen2.5-0.5b").available is False
    with pytest.raises(ModelNotAvailableError):
        load_model("qwen2.5-0.5b")


def test_sharded_snapshot_needs_every_shard(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"x")
    assert not has_safetensors_weights(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"x")
    assert has_safetensors_weights(tmp_path)


def test_existing_local_folder_wins(tmp_path):
    r = resolve_model(str(STORIES))
    assert (r.kind, r.available, r.local_path) == ("local", True, STORIES.resolve())
    # A folder named like an alias is still the user's folder.
    folder = tmp_path / "llama3-70b"
    folder.mkdir()
    assert resolve_model(str(folder)).kind == "local"


def test_unknown_names(tmp_path):
    hub = resolve_model("some-org/some-model")
    assert (hub.kind, hub.resolves_to, hub.available) == ("hub", "some-org/some-model", False)
    missing = resolve_model(str(tmp_path / "nope"))
    assert (missing.kind, missing.available) == ("local", False)
    assert resolve_model("./nope").kind == "local"
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(DsparkError, match="is a file"):
        resolve_model(str(f))
    with pytest.raises(DsparkError, match="empty"):
        resolve_model("  ")


def test_builtins_resolve_inside_the_package():
    for name in BUILTINS:
        r = resolve_model(name)
        assert r.kind == "builtin"
        assert r.resolves_to == str(BUILTIN / name)
        assert r.available == builtin_ready(name)


def test_missing_builtin_says_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "BUILTIN_DIR", tmp_path)
    r = resolve_model("tiny-code")
    assert not r.available and r.local_path is None
    with pytest.raises(ModelNotAvailableError, match="build-tiny-family") as e:
        load_model("tiny-code")
    assert "\n" not in str(e.value)


@pytest.mark.skipif(not builtin_ready("tiny-code-draft-s"), reason="tiny-code-draft-s not built")
def test_incomplete_builtin_folder_is_not_available(tmp_path, monkeypatch):
    partial = tmp_path / "tiny-code-draft-s"
    shutil.copytree(BUILTIN / "tiny-code-draft-s", partial)
    (partial / "model.safetensors").unlink()
    monkeypatch.setattr(registry, "BUILTIN_DIR", tmp_path)
    assert resolve_model("tiny-code-draft-s").available is False


def test_list_models_covers_aliases_and_builtins(offline_hub):
    fake_hub_snapshot(offline_hub, "google/gemma-2-2b", STORIES)
    rows = {r["name"]: r for r in list_models()}
    assert set(REQUIRED) <= set(rows) and set(BUILTINS) <= set(rows)
    assert set(rows) == set(ALIASES) | set(BUILTINS)
    for row in rows.values():
        assert {"name", "kind", "resolves_to", "available", "parameters", "notes"} <= set(row)
        assert (row["hint"] is None) == row["available"]
    assert rows["gemma2-2b"]["available"] is True
    assert rows["gemma2-9b"]["available"] is False
    assert "hf download google/gemma-2-9b" in rows["gemma2-9b"]["hint"]
    for name in BUILTINS:
        assert rows[name]["available"] == builtin_ready(name)
        if builtin_ready(name):
            meta = json.loads((BUILTIN / name / "dspark_model.json").read_text())
            assert rows[name]["parameters"] == meta["parameters"]


def test_format_parameters():
    assert format_parameters(596_448) == "596.4K"
    assert format_parameters(5_500_000) == "5.5M"
    assert format_parameters(70_600_000_000) == "70.6B"
    assert format_parameters("70B") == "70B"
    assert format_parameters(None) == ""
    assert format_parameters(512) == "512"
