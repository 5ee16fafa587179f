"""Bundle fixtures: offline, a private empty Hugging Face cache, and one exported bundle per session
(target tiny-code-draft-m, draft tiny-code-draft-s: the built-in pair that shares a tokenizer)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from tests.common import offline_env

REPO = Path(__file__).resolve().parents[2]
BUILTIN = REPO / "dspark" / "models" / "builtin"
STORIES = REPO.parent / "shared" / "models" / "stories260K"
TARGET, DRAFT = "tiny-code-draft-m", "tiny-code-draft-s"


def _need(name: str) -> None:
    if not (BUILTIN / name).is_dir():
        pytest.skip(f"built-in model {name} is not built yet")


@pytest.fixture(autouse=True)
def offline_hub(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.mktemp("hf-cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def write_selection(folder: Path, **over) -> Path:
    sel = {"name": "tiny-s-selected", "target": TARGET, "draft": DRAFT, "draft_length": "3",
           "quantization": "none",
           "metrics": {"acceptance_rate": 0.61, "mean_accepted_tokens": 2.3, "best_draft_length": 5,
                       "speedup": 1.7, "tokens_per_s": 420.0, "baseline_tokens_per_s": 250.0,
                       "task": "code", "prompts": 20}}
    sel.update(over)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "selected.yaml"
    path.write_text(yaml.safe_dump(sel, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def bundle(tmp_path_factory):
    """A bundle exported from a selection file (read-only: copy it before changing anything)."""
    _need(TARGET)
    _need(DRAFT)
    from dspark.bundle.export import export_bundle

    root = tmp_path_factory.mktemp("bundle")
    sel = write_selection(root / "select")
    with offline_env():
        export_bundle(root / "b", selection=sel)
    return root / "b"


@pytest.fixture
def bundle_copy(bundle, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(bundle, dst)
    return dst


@pytest.fixture
def need_pair():
    _need(TARGET)
    _need(DRAFT)
