"""Distillation: collect the target's logits into a cache (`collect`), the objectives that train a
draft toward acceptance (`losses`), and the cache format both share (`cache`); training a draft on a
cache (`train`, with `checkpoint`, `evaluate`, `acceptance`, `onpolicy`, `parallel`; a draft with
another tokenizer: `cross`) and the `dspark distill` pipeline around it (`distill`).

Submodules load lazily (`dspark.distill.collect` etc.) so importing the package stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # losses
    "OBJECTIVES": "losses", "Objective": "losses", "parse_objective": "losses", "topk_loss": "losses",
    "full_loss": "losses", "topk_support": "losses", "full_support": "losses", "forward_kl": "losses",
    "reverse_kl": "losses", "generalized_jsd": "losses", "tvd": "losses", "expected_acceptance": "losses",
    "acceptance_bounds": "losses", "masked_mean": "losses",
    # cache
    "LogitsCache": "cache", "CacheManifest": "cache", "CacheBatch": "cache", "CacheRow": "cache",
    "open_cache": "cache", "merge_caches": "cache", "read_manifest": "cache", "manifest_hash": "cache",
    # collect
    "collect": "collect", "run_collect": "collect", "CollectResult": "collect", "CollectTarget": "collect",
    "ENGINES": "collect", "Engine": "collect", "load_target": "collect", "target_from_loaded": "collect",
    "target_from_model": "collect",
    # training (dspark distill)
    "run_distill": "distill", "CollectSettings": "distill", "EvalSettings": "distill", "TrainConfig": "train",
    "TrainResult": "train", "train_draft": "train", "evaluate_heldout": "evaluate", "measure_decoder": "evaluate",
    # a draft with another tokenizer
    "CrossDistill": "cross", "vocab_bridge": "cross", "align_positions": "cross", "intersection_support": "cross",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dspark.distill' has no attribute {name!r}")
    return getattr(importlib.import_module(f"dspark.distill.{module}"), name)
