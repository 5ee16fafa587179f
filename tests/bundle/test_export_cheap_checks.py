"""`dspark export`: option errors come before any model file is read."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from dspark.cli import app
from tests.bundle.conftest import DRAFT, TARGET


@pytest.mark.parametrize("form,needle", [("0", "draft length K must be >= 1, got 0"),
                                         ("fast", "unknown draft length 'fast'")])
def test_bad_draft_length_fails_before_reading_the_models(tmp_path, monkeypatch, form, needle):
    """It was found only after both tokenizers were loaded and the draft's weight names checked."""
    import dspark.models

    def must_not_load(*_a, **_k):
        raise AssertionError("read a model before checking --draft-length")

    monkeypatch.setattr(dspark.models, "load_tokenizer", must_not_load)
    res = CliRunner().invoke(app, ["export", "--target", TARGET, "--draft", DRAFT, "--draft-length", form,
                                   "--out", str(tmp_path / "b")])
    assert res.exit_code == 2 and needle in res.output, res.output
    assert not (tmp_path / "b").exists()
