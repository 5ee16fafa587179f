"""export -> verify round trip on the built-in pair, and every way a bundle can be broken."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dspark.bundle.export import export_bundle, hash_tree
from dspark.bundle.manifest import MANIFEST_NAME, read_manifest
from dspark.bundle.verify import check_files, check_target_identity, verify_bundle
from dspark.errors import DsparkError
from dspark.io import atomic_write_yaml

from tests.bundle.conftest import BUILTIN, DRAFT, TARGET, write_selection

runner = CliRunner()


def _flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _rehash(bundle: Path) -> None:
    """Rewrite the manifest's file table as a (buggy) exporter would after changing files."""
    raw = yaml.safe_load((bundle / MANIFEST_NAME).read_text())
    raw["files"] = {k: v.model_dump() for k, v in hash_tree(bundle).items()}
    atomic_write_yaml(bundle / MANIFEST_NAME, raw)


def _drop_tensor(folder: Path, name: str, rename_to: str | None = None) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    t = tensors.pop(name)
    if rename_to:
        tensors[rename_to] = t
    save_file(tensors, str(path), metadata={"format": "pt"})


# -- the bundle itself ------------------------------------------------------------------------------


def test_bundle_layout_and_manifest(bundle):
    m = read_manifest(bundle)
    assert m.name == "tiny-s-selected"
    assert (m.target.name, m.target.kind, m.target.included) == (TARGET, "builtin", False)
    assert m.target.weight_sha256 and m.target.revision is None
    assert m.draft.name == DRAFT and m.draft.weight_files == ["model.safetensors"]
    assert m.draft.tokenizer_sha256 == m.target.tokenizer_sha256
    assert m.policy.draft_length == "3" and m.policy.num_speculative_tokens == 5  # measured best K wins
    assert m.policy.num_speculative_tokens_source == "measured"
    assert m.metrics.acceptance_rate == 0.61 and m.selection.candidate == "tiny-s-selected"
    assert {"dspark", "torch", "transformers", "safetensors"} <= set(m.versions)
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert on_disk - {MANIFEST_NAME} == set(m.files)
    for rel in ("draft/model.safetensors", "draft/config.json", "draft/tokenizer.json", "vllm.json", "sglang.sh",
                "README.md", "selection.yaml"):
        assert rel in m.files
    assert not (bundle / "target").exists()
    vllm = json.loads((bundle / "vllm.json").read_text())
    assert vllm["speculative_config"] == {"method": "draft_model", "model": "./draft", "num_speculative_tokens": 5}
    assert vllm["model"] == str(BUILTIN / TARGET)
    assert os.access(bundle / "sglang.sh", os.X_OK)
    card = (bundle / "README.md").read_text()
    assert "| acceptance_rate | 0.61 |" in card and "| speedup | 1.7 |" in card
    assert not list(bundle.parent.glob(".b.tmp-*"))  # the build folder was renamed, not left behind


def test_verify_round_trip_cli(bundle):
    res = runner.invoke(_app(), ["verify-bundle", str(bundle), "--json", "--max-new-tokens", "12"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["ok"] and report["files_checked"] == len(read_manifest(bundle).files)
    assert report["draft"]["weight_keys"]["checked"] and report["draft"]["weight_keys"]["tied"] == ["lm_head.weight"]
    assert report["target"]["weight_sha256"] == read_manifest(bundle).target.weight_sha256
    d = report["decode"]
    assert d["equal_to_target"] and 1 <= len(d["tokens"]) <= 12
    assert 0 <= d["accepted"] <= d["drafted"]


def _app():
    from dspark.cli import app

    return app


# -- tampering --------------------------------------------------------------------------------------


def test_modified_byte_is_named(bundle_copy):
    _flip_byte(bundle_copy / "draft" / "model.safetensors")
    with pytest.raises(DsparkError, match=r"modified file\(s\) draft/model\.safetensors"):
        verify_bundle(bundle_copy)
    res = runner.invoke(_app(), ["verify-bundle", str(bundle_copy)])
    assert res.exit_code == 2 and "draft/model.safetensors" in res.output and "Traceback" not in res.output


def test_missing_and_extra_files_are_named(bundle_copy):
    (bundle_copy / "draft" / "tokenizer.json").unlink()
    (bundle_copy / "draft" / "notes.txt").write_text("x")
    with pytest.raises(DsparkError, match=r"missing file\(s\) draft/tokenizer\.json.*not in the manifest draft/notes\.txt"):
        check_files(bundle_copy, read_manifest(bundle_copy))


def test_edited_manifest_fails_schema(bundle_copy):
    raw = yaml.safe_load((bundle_copy / MANIFEST_NAME).read_text())
    raw["policy"]["speculative_k"] = 9
    (bundle_copy / MANIFEST_NAME).write_text(yaml.safe_dump(raw))
    with pytest.raises(DsparkError, match=r"dspark-bundle\.yaml: unknown key 'policy\.speculative_k'"):
        verify_bundle(bundle_copy)
    (bundle_copy / MANIFEST_NAME).unlink()
    with pytest.raises(DsparkError, match="has no dspark-bundle.yaml"):
        verify_bundle(bundle_copy)


def test_verify_catches_missing_weight_key_even_with_consistent_hashes(bundle_copy):
    # A bundle whose hashes match its files but whose draft lost a tensor (a buggy exporter).
    _drop_tensor(bundle_copy / "draft", "model.layers.1.mlp.up_proj.weight",
                 rename_to="model.layers.1.mlp.upproj.weight")
    _rehash(bundle_copy)
    check_files(bundle_copy, read_manifest(bundle_copy))  # integrity alone passes
    with pytest.raises(DsparkError, match=r"missing keys: model\.layers\.1\.mlp\.up_proj\.weight.*"
                                          r"unexpected keys: model\.layers\.1\.mlp\.upproj\.weight"):
        verify_bundle(bundle_copy)


def test_untied_head_missing_is_caught(tmp_path, need_pair):
    # With tie_word_embeddings false, an absent lm_head would be randomly initialised by the loader.
    from dspark.bundle.weights import check_weight_keys

    folder = tmp_path / "d"
    shutil.copytree(BUILTIN / DRAFT, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DsparkError, match=r"missing keys: lm_head\.weight"):
        check_weight_keys(folder, "draft")


# -- export errors and options ----------------------------------------------------------------------


def test_export_refuses_a_draft_with_wrong_weight_names(tmp_path, need_pair):
    draft = tmp_path / "broken-draft"
    shutil.copytree(BUILTIN / DRAFT, draft)
    _drop_tensor(draft, "model.norm.weight", rename_to="norm.weight")
    with pytest.raises(DsparkError, match=r"missing keys: model\.norm\.weight; unexpected keys: norm\.weight"):
        export_bundle(tmp_path / "out", target=TARGET, draft=str(draft))
    assert not (tmp_path / "out").exists()


def test_export_argument_errors(tmp_path, need_pair):
    with pytest.raises(DsparkError, match="missing --draft"):
        export_bundle(tmp_path / "o", target=TARGET)
    with pytest.raises(DsparkError, match="not both"):
        export_bundle(tmp_path / "o", target=TARGET, selection=write_selection(tmp_path / "s"))
    with pytest.raises(DsparkError, match="does not exist"):
        export_bundle(tmp_path / "o", target=TARGET, draft=str(tmp_path / "nope"))
    with pytest.raises(DsparkError, match="same model"):
        export_bundle(tmp_path / "o", target=TARGET, draft=str(BUILTIN / TARGET))
    with pytest.raises(DsparkError, match="bundle name 'a b'"):
        export_bundle(tmp_path / "o", target=TARGET, draft=DRAFT, name="a b")
    assert not (tmp_path / "o").exists()


def test_existing_out_needs_force_and_failed_export_leaves_nothing(tmp_path, monkeypatch, need_pair):
    out = tmp_path / "out"
    export_bundle(out, target=TARGET, draft=DRAFT, draft_length="2")
    first = read_manifest(out)
    with pytest.raises(DsparkError, match="already exists: pass --force"):
        export_bundle(out, target=TARGET, draft=DRAFT)

    from dspark.bundle import engines

    def boom(_m):
        raise RuntimeError("disk full")

    monkeypatch.setattr(engines, "model_card", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_bundle(out, target=TARGET, draft=DRAFT, force=True)
    assert read_manifest(out).created_at == first.created_at  # the old bundle is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or trash folders
    monkeypatch.undo()
    res = export_bundle(out, target=TARGET, draft=DRAFT, draft_length="4", force=True)
    assert res.manifest.policy.num_speculative_tokens == 4
    assert res.manifest.metrics.measured() == {} and res.manifest.selection is None


def test_include_target_and_size_limit(tmp_path, need_pair):
    with pytest.raises(DsparkError, match="--include-target is for small targets"):
        export_bundle(tmp_path / "big", target=TARGET, draft=DRAFT, include_target=True,
                      max_included_target_bytes=1000)
    res = runner.invoke(_app(), ["export", "--target", TARGET, "--draft", DRAFT, "--out", str(tmp_path / "b"),
                                 "--include-target", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["target_included"] and summary["num_speculative_tokens_source"] == "default"
    m = read_manifest(tmp_path / "b")
    assert m.target.included and "target/model.safetensors" in m.files
    assert json.loads((tmp_path / "b" / "vllm.json").read_text())["model"] == "./target"
    ident = check_target_identity(tmp_path / "b", m)
    assert ident["weight_sha256"] == m.target.weight_sha256 and ident["source"].endswith("target")


def test_hub_target_records_revision(tmp_path, offline_hub, need_pair):
    # The target as a cached hub snapshot: the bundle pins its commit, and verify compares it.
    from tests.models.conftest import fake_hub_snapshot

    commit = "0123456789abcdef0123456789abcdef01234567"
    fake_hub_snapshot(offline_hub, "acme/tiny-target", BUILTIN / TARGET, commit=commit)
    res = export_bundle(tmp_path / "b", target="acme/tiny-target", draft=DRAFT)
    t = res.manifest.target
    assert (t.kind, t.resolves_to, t.revision, t.weight_sha256) == ("hub", "acme/tiny-target", commit, None)
    assert json.loads((tmp_path / "b" / "vllm.json").read_text())["model"] == "acme/tiny-target"
    assert check_target_identity(tmp_path / "b", res.manifest)["revision"] == commit
    raw = yaml.safe_load((tmp_path / "b" / MANIFEST_NAME).read_text())
    raw["target"]["revision"] = "f" * 40
    (tmp_path / "b" / MANIFEST_NAME).write_text(yaml.safe_dump(raw))
    with pytest.raises(DsparkError, match="was made with revision ffff"):
        check_target_identity(tmp_path / "b", read_manifest(tmp_path / "b"))


def test_selection_with_relative_draft_path(tmp_path, need_pair):
    shutil.copytree(BUILTIN / DRAFT, tmp_path / "sel" / "candidates" / "d")
    sel = write_selection(tmp_path / "sel", draft="candidates/d", name="rel")
    res = export_bundle(tmp_path / "b", selection=sel, draft_length="auto")
    assert res.manifest.draft.source == str((tmp_path / "sel" / "candidates" / "d").resolve())
    assert res.manifest.policy.draft_length == "auto"  # --draft-length overrides the selection's
