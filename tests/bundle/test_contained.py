"""What verify-bundle checks is what serve-bundle loads: every file read is inside the bundle and
hashed (no symlinks, no weight paths out of the model folder), the draft matches the manifest's
fingerprint and its config's tensor names, and a hostile manifest cannot blow up the parser or the
error message."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dspark.bundle.manifest import MANIFEST_NAME
from dspark.bundle.verify import verify_bundle
from dspark.errors import DsparkError

from tests.bundle.test_export_verify import _drop_tensor, _rehash

runner = CliRunner()


def _serve(bundle: Path):
    from dspark.serve.runtime import runtime_from_bundle

    return runtime_from_bundle(bundle, device="cpu", dtype="float32")


def _both_refuse(bundle: Path, match: str) -> None:
    """verify-bundle and the server's loader fail alike, with one line."""
    for load in (verify_bundle, _serve):
        with pytest.raises(DsparkError, match=match) as e:
            load(bundle)
        assert "\n" not in str(e.value)


def _randomised_copy(src: Path, dst: Path) -> None:
    """The draft's weights with the same names and shapes but other values: a swapped-in draft."""
    import torch
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(v.shape, generator=g).to(v.dtype) for k, v in load_file(str(src)).items()}
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, dst)


def _set_manifest(bundle: Path, *keys_value) -> None:
    raw = yaml.safe_load((bundle / MANIFEST_NAME).read_text())
    *path, key, value = keys_value
    node = raw
    for k in path:
        node = node[k]
    node[key] = value
    (bundle / MANIFEST_NAME).write_text(yaml.safe_dump(raw, sort_keys=False))


# -- weights from outside the bundle -------------------------------------------------------------------

@pytest.mark.parametrize("shard", ["absolute", "parent"])
def test_index_naming_shards_outside_the_bundle_is_refused(bundle_copy, tmp_path, shard):
    from safetensors import safe_open

    draft = bundle_copy / "draft"
    outside = tmp_path / "outside" / "w.safetensors"
    _randomised_copy(draft / "model.safetensors", outside)
    with safe_open(str(outside), framework="pt") as fh:
        keys = list(fh.keys())
    name = str(outside) if shard == "absolute" else "../../outside/w.safetensors"
    assert (draft / name).resolve() == outside.resolve()
    (draft / "model.safetensors").unlink()
    (draft / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        k: name for k in keys}}))
    _rehash(bundle_copy)  # the hashes cover every file inside: only the index points out
    _both_refuse(bundle_copy, r"model\.safetensors\.index\.json shard: .*w\.safetensors' is not a file inside")


def test_config_naming_a_weight_file_outside_is_refused(bundle_copy, tmp_path):
    draft = bundle_copy / "draft"
    _randomised_copy(draft / "model.safetensors", tmp_path / "w.safetensors")
    cfg = json.loads((draft / "config.json").read_text())
    cfg["transformers_weights"] = str(tmp_path / "w.safetensors")
    (draft / "config.json").write_text(json.dumps(cfg))
    _rehash(bundle_copy)
    _both_refuse(bundle_copy, r"config\.json transformers_weights: .* is not a file inside")


def test_symlinked_draft_folder_is_refused(bundle_copy, tmp_path):
    # the linked folder holds exactly the hashed files: the hashes pass, but what is loaded lives
    # outside the bundle and can change after the check
    shutil.move(bundle_copy / "draft", tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", bundle_copy / "draft")
    _both_refuse(bundle_copy, rf"symlink\(s\) draft/ -> {re.escape(str(tmp_path / 'elsewhere'))}")


def test_symlinked_folder_and_file_inside_are_named(bundle_copy, tmp_path):
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "x.json").write_text("{}")
    os.symlink(tmp_path / "extra", bundle_copy / "draft" / "extra")
    os.symlink(bundle_copy / "README.md", bundle_copy / "card.md")
    with pytest.raises(DsparkError, match=r"symlink\(s\) card\.md -> .*README\.md, draft/extra/ -> "):
        verify_bundle(bundle_copy)


def test_fifo_in_the_bundle_is_refused_not_read(bundle_copy):
    os.mkfifo(bundle_copy / "draft" / "pipe")
    with pytest.raises(DsparkError, match=r"special file\(s\) draft/pipe"):  # reading it would block
        verify_bundle(bundle_copy)


# -- the draft must be the one the manifest records ----------------------------------------------------

def test_draft_weight_sha256_is_checked(bundle_copy):
    draft = bundle_copy / "draft"
    _randomised_copy(draft / "model.safetensors", draft / "model.safetensors")
    _rehash(bundle_copy)  # file table updated, draft.weight_sha256 left as exported
    _both_refuse(bundle_copy, r"draft's weights in .* are not the ones the manifest records .*draft\.weight_sha256")


def test_draft_weight_files_are_checked(bundle_copy):
    _set_manifest(bundle_copy, "draft", "weight_files", ["model-00001-of-00002.safetensors"])
    with pytest.raises(DsparkError, match=r"the draft loads from model\.safetensors, the manifest records "
                                          r"model-00001-of-00002\.safetensors"):
        verify_bundle(bundle_copy)


def test_serve_checks_draft_weight_names(bundle_copy):
    # a renamed tensor: transformers would initialise up_proj at random and serve it
    from dspark.distill.collect import safetensors_hash

    _drop_tensor(bundle_copy / "draft", "model.layers.1.mlp.up_proj.weight",
                 rename_to="model.layers.1.mlp.upproj.weight")
    _rehash(bundle_copy)
    _set_manifest(bundle_copy, "draft", "weight_sha256", safetensors_hash(bundle_copy / "draft"))
    with pytest.raises(DsparkError, match=r"missing keys: model\.layers\.1\.mlp\.up_proj\.weight"):
        _serve(bundle_copy)



# -- hostile manifests -----------------------------------------------------------------------------------

def _alias_bomb(levels: int = 7, fan: int = 9) -> str:
    lines = ["a0: &a0 [" + ", ".join(['"xxxxxxxxxx"'] * fan) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * fan) + "]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nschema_version: 1\nname: *a{levels - 1}\n"


def test_yaml_alias_bomb_is_refused_in_one_short_line(bundle_copy):
    bomb = _alias_bomb()
    assert len(bomb) < 1024  # expands to 9^7 strings
    (bundle_copy / MANIFEST_NAME).write_text(bomb)
    with pytest.raises(DsparkError, match=r"anchors and aliases expand it past 100000 YAML nodes") as e:
        verify_bundle(bundle_copy)
    assert len(str(e.value)) < 400
    from dspark.cli import app

    res = runner.invoke(app, ["verify-bundle", str(bundle_copy)])
    assert res.exit_code == 2 and len(res.output) < 600 and "Traceback" not in res.output


def test_long_bad_value_is_clipped_in_the_error(bundle_copy):
    _set_manifest(bundle_copy, "policy", "num_speculative_tokens", "9" * 100_000 + "x")
    with pytest.raises(DsparkError, match=r"bad value for 'policy\.num_speculative_tokens': '9{199}\.\.\. "
                                          r"\(100003 characters\)") as e:
        verify_bundle(bundle_copy)
    assert len(str(e.value)) < 600
    _set_manifest(bundle_copy, "policy", "num_speculative_tokens", 5)
    _set_manifest(bundle_copy, "policy", "k" * 5000, 1)
    with pytest.raises(DsparkError, match=r"unknown key 'policy\.k{190}.*characters\)") as e:
        verify_bundle(bundle_copy)
    assert len(str(e.value)) < 600
    # valid strings are bounded too: a manifest's names reach later messages
    raw = yaml.safe_load((bundle_copy / MANIFEST_NAME).read_text())
    del raw["policy"]["k" * 5000]
    raw["target"]["name"] = "t" * 5000
    (bundle_copy / MANIFEST_NAME).write_text(yaml.safe_dump(raw))
    with pytest.raises(DsparkError, match=r"bad value for 'target\.name': 't{199}\.\.\. \(5002 characters\) "
                                          r"\(String should have at most 4096 characters\)"):
        verify_bundle(bundle_copy)


def test_read_yaml_bounds(tmp_path):
    from dspark.config.base import MAX_YAML_BYTES, read_yaml

    ok = tmp_path / "ok.yaml"
    ok.write_text("base: &b {k: 3, name: x}\nfirst: *b\nsecond: *b\n")  # small anchors stay allowed
    assert read_yaml(ok)["second"] == {"k": 3, "name": "x"}
    cyclic = tmp_path / "cyclic.yaml"
    cyclic.write_text("a: &a [1, *a]\n")
    with pytest.raises(DsparkError, match="expand it past"):
        read_yaml(cyclic)
    big = tmp_path / "big.yaml"
    big.write_text("x: " + "y" * MAX_YAML_BYTES + "\n")
    with pytest.raises(DsparkError, match="larger than 4096 KiB"):
        read_yaml(big)
    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 50_000 + "]" * 50_000)
    with pytest.raises(DsparkError, match="nested too deeply"):
        read_yaml(deep)
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: *" + "n" * 10_000 + "\n")
    with pytest.raises(DsparkError, match="not valid YAML") as e:
        read_yaml(bad)
    assert len(str(e.value)) < 400
