"""Turning --candidates arguments into entries."""

from __future__ import annotations

import pytest

from dspark.errors import DsparkError
from dspark.select.candidates import gather

from tests.select.conftest import need_builtins


def test_globs_files_and_builtin_names(tmp_path):
    need_builtins("tiny-code-draft-s")
    (tmp_path / "m").mkdir()
    (tmp_path / "a.yaml").write_text("name: a\ndraft: tiny-code-draft-s\n")
    (tmp_path / "b.yaml").write_text("name: b\ndraft: m\n")  # relative to the file's folder
    (tmp_path / "bad.yaml").write_text("name: bad\ndraft: x\nspeed: 3\n")
    es = gather([str(tmp_path / "*.yaml"), str(tmp_path / "a.yaml"), "tiny-code-draft-s"])
    by = {e.name: e for e in es}
    assert sorted(by) == ["a", "b", "bad", "tiny-code-draft-s"]  # a.yaml twice counts once
    assert by["b"].draft == str((tmp_path / "m").resolve())
    assert by["bad"].error and "unknown key 'speed'" in by["bad"].error and by["bad"].spec is None
    assert by["tiny-code-draft-s"].spec.quantization == "none"


def test_errors_before_anything_loads(tmp_path):
    with pytest.raises(DsparkError, match="matched no candidate files"):
        gather([str(tmp_path / "*.yaml")])
    with pytest.raises(DsparkError, match="matched no files and is not a model"):
        gather([str(tmp_path / "nothing-here")])
    with pytest.raises(DsparkError, match="at least one --candidates"):
        gather([])
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "a.yaml").write_text("name: same\ndraft: d\n")
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "a.yaml").write_text("name: same\ndraft: d\n")
    with pytest.raises(DsparkError, match="two candidates are named 'same'"):
        gather([str(tmp_path / "x"), str(tmp_path / "y")])


def test_select_with_no_readable_candidate_fails_before_loading(tmp_path, monkeypatch):
    """An invalid candidate file was kept as a failed entry, so select loaded the target and measured
    for half a minute before saying nothing could be scored."""
    from typer.testing import CliRunner

    import dspark.models
    from dspark.cli import app

    def must_not_load(*_a, **_k):
        raise AssertionError("loaded the target with nothing to score")

    monkeypatch.setattr(dspark.models, "load_tokenizer", must_not_load)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [")
    res = CliRunner().invoke(app, ["select", "--candidates", str(bad), "--target", "tiny-code", "--task", "code",
                                   "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "no candidate can be scored" in res.output and "bad.yaml" in res.output, res.output
    assert not (tmp_path / "r").exists()
