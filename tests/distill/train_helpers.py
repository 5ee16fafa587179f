"""Shared by the training / distill-CLI tests: a small real logits cache from the built-in family.

The target is `tiny-code-draft-m` and the draft `tiny-code-draft-s` (same tokenizer, both tiny), so a
cache of a dozen prompts x 16 tokens collects in seconds on one CPU thread.
"""

from __future__ import annotations

from pathlib import Path

TARGET = "tiny-code-draft-m"
DRAFT = "tiny-code-draft-s"
NUM_PROMPTS = 16
MAX_NEW_TOKENS = 16
TOP_K = 16
HELDOUT = 30.0  # percent of cache rows held out: a few rows even in a 16-prompt cache


_SHARED: dict[str, Path] = {}


def collect_small_cache(out: Path | None = None) -> Path:
    """A complete cache of TARGET's greedy continuations on the code task's train split, collected
    once per test process (the training, CLI and data-parallel tests read it, never write it)."""
    import atexit
    import shutil
    import tempfile

    import torch

    from dspark.distill.collect import run_collect

    if out is None and "cache" in _SHARED:
        return _SHARED["cache"]
    where = out
    if where is None:
        tmp = Path(tempfile.mkdtemp(prefix="dspark-test-cache-"))
        atexit.register(shutil.rmtree, tmp, True)
        where = tmp / "cache"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_collect(TARGET, where, task="code", num_prompts=NUM_PROMPTS, split="train", k=TOP_K,
                    max_new_tokens=MAX_NEW_TOKENS, batch_size=8, device="cpu", dtype="float32", show_progress=False)
    finally:
        torch.set_num_threads(threads)
    if out is None:
        _SHARED["cache"] = where
    return where


def load_float32(name: str):
    from dspark.models import load_model

    return load_model(name, device="cpu", dtype="float32")
