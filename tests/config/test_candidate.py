"""The candidate schema: strict keys, clear one-line errors, round trips, relative paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dspark.config.candidate import (QUANTIZATIONS, Candidate, Measured, Provenance, load_candidate, parse_candidate,
                                     resolve_relative, write_candidate)
from dspark.errors import DsparkError

RECIPES = Path(__file__).resolve().parents[2] / "dspark" / "recipes" / "candidates"


def _write(tmp_path: Path, body) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(body if isinstance(body, str) else yaml.safe_dump(body))
    return p


def test_unknown_key_lists_the_valid_keys(tmp_path):
    p = _write(tmp_path, {"name": "a", "draft": "tiny-code-draft-s", "quantisation": "int8"})
    with pytest.raises(DsparkError) as e:
        load_candidate(p)
    msg = str(e.value)
    assert "unknown key 'quantisation'" in msg and "valid keys: name, target, draft, quantization" in msg
    assert str(p) in msg and "\n" not in msg


def test_unknown_key_in_a_block_lists_that_blocks_keys():
    with pytest.raises(DsparkError, match=r"unknown key 'measured.speed' \(valid keys: expected_acceptance"):
        parse_candidate({"name": "a", "draft": "d", "measured": {"speed": 2}})
    with pytest.raises(DsparkError, match=r"unknown key 'provenance.who' \(valid keys: made_by"):
        parse_candidate({"name": "a", "draft": "d", "provenance": {"who": "me"}})


def test_missing_draft_and_missing_name():
    with pytest.raises(DsparkError, match="missing required key 'draft'"):
        parse_candidate({"name": "a"}, where="x.yaml")
    with pytest.raises(DsparkError, match="missing required key 'name'"):
        parse_candidate({"draft": "d"})


@pytest.mark.parametrize("bad", ["int3", "fp8", "INT8", ""])
def test_bad_quantization_names_the_allowed_values(bad):
    with pytest.raises(DsparkError) as e:
        parse_candidate({"name": "a", "draft": "d", "quantization": bad})
    assert f"bad value for 'quantization': {bad!r}" in str(e.value)
    assert "allowed: none, int8, int4, nf4, gptq4" in str(e.value)


@pytest.mark.parametrize("form,spec", [("auto", "auto"), (4, "4"), ("static:3", "static:3"),
                                       ("confidence:0.4", "confidence:0.4"), ("goodput", "goodput"),
                                       ("learned", "learned")])
def test_draft_length_forms(form, spec):
    assert parse_candidate({"name": "a", "draft": "d", "draft_length": form}).draft_length == spec


@pytest.mark.parametrize("bad", ["fast", "0", "confidence:2", True, [4]])
def test_bad_draft_length(bad):
    with pytest.raises(DsparkError, match="bad value for 'draft_length'"):
        parse_candidate({"name": "a", "draft": "d", "draft_length": bad})


def test_bad_device_dtype_and_name():
    with pytest.raises(DsparkError, match="bad value for 'device'"):
        parse_candidate({"name": "a", "draft": "d", "device": "tpu"})
    with pytest.raises(DsparkError, match="bad value for 'dtype'.*float32, bfloat16"):
        parse_candidate({"name": "a", "draft": "d", "dtype": "fp32"})
    with pytest.raises(DsparkError, match="bad value for 'name'"):
        parse_candidate({"name": "a/b", "draft": "d"})


def test_not_a_mapping_and_not_yaml(tmp_path):
    with pytest.raises(DsparkError, match="expected a mapping"):
        load_candidate(_write(tmp_path, "- a\n- b\n"))
    with pytest.raises(DsparkError, match="not valid YAML"):
        load_candidate(_write(tmp_path, "name: [unclosed\n"))
    with pytest.raises(DsparkError, match="does not exist"):
        load_candidate(tmp_path / "nope.yaml")


def test_write_then_load_round_trip(tmp_path):
    c = Candidate(name="s-int8", target="tiny-code", draft=".", quantization="int8", draft_length="3",
                  warnings=["ACCEPTANCE DROP: ..."],
                  measured=Measured(expected_acceptance=0.5, expected_acceptance_before=0.6, guard_passed=False),
                  provenance=Provenance(made_by="dspark quantize", extra={"guard_prompts": "code", "n": 3}))
    path = write_candidate(tmp_path / "c.yaml", c, header="made by a test")
    text = path.read_text()
    assert text.startswith("# made by a test\n")
    assert "dtype" not in text and "device" not in text  # unset fields are left out
    back = load_candidate(path)
    assert back == c


def test_resolve_relative(tmp_path):
    (tmp_path / "model").mkdir()
    f = tmp_path / "c.yaml"
    assert resolve_relative("model", f) == str((tmp_path / "model").resolve())
    assert resolve_relative(".", f) == str(tmp_path.resolve())
    assert resolve_relative("tiny-code-draft-s", f) == "tiny-code-draft-s"  # a name, not a path here
    assert resolve_relative("/abs/path", f) == "/abs/path"


def test_quantization_names_agree_with_the_bundle_schema():
    from dspark.bundle.manifest import QUANTIZATIONS as BUNDLE_QUANTIZATIONS

    assert tuple(QUANTIZATIONS) == tuple(BUNDLE_QUANTIZATIONS)


def test_example_candidates_parse():
    files = sorted(RECIPES.glob("*.yaml"))
    names = {load_candidate(f).name for f in files}
    assert {"tiny-code-draft-s", "tiny-code-draft-m", "tiny-code-draft-s-int8"} <= names
    assert any(load_candidate(f).quantization == "int8" for f in files)
