"""What a model folder holds (shared by name resolution and the GGUF cache; imports nothing of dspark)."""

from __future__ import annotations

import json
from pathlib import Path


def has_safetensors_weights(folder: Path) -> bool:
    """True if `folder` holds a complete safetensors checkpoint (single file or every shard)."""
    if (folder / "model.safetensors").is_file():
        return True
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return False
    try:
        shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
    except (ValueError, KeyError, TypeError):
        return False
    return bool(shards) and all((folder / s).is_file() for s in shards)


def is_model_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() and has_safetensors_weights(folder)


__all__ = ["has_safetensors_weights", "is_model_folder"]
