"""Loading `datasets` hub ids, offline-aware: a dataset that can't be had is a one-line DataError.

`datasets` and `huggingface_hub` read HF_HUB_OFFLINE / HF_DATASETS_OFFLINE once, when they are
imported. We read them at call time and apply them for the duration of the load, so that offline
mode set after import (by a test, or by a program embedding dspark) still means "no network": without
this, `load_dataset` retries the network for ~25 s before failing. The same switch lets
`cached_rows` ask "is this dataset in the local cache?" without touching the network.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from typing import Any, Iterator

from dspark.errors import DataError

_TRUE = {"1", "ON", "YES", "TRUE"}
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
# owner/name, optionally :split or :config:split (hub ids have exactly one slash)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(:[\w.-]+){0,2}$")
DATA_HINT = "pass a local .jsonl/.json/.parquet/.txt file or folder with --data FILE"


def offline_requested() -> bool:
    """True when the environment asks for no network, read now (not at import time)."""
    if any(os.environ.get(v, "").strip().upper() in _TRUE for v in OFFLINE_VARS):
        return True
    try:
        import datasets.config

        return bool(datasets.config.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - datasets is a core dependency
        return False


@contextmanager
def _offline_mode(offline: bool):
    if not offline:
        yield
        return
    import datasets.config as dconf
    import huggingface_hub.constants as hconst

    saved = (dconf.HF_HUB_OFFLINE, dconf.HF_DATASETS_OFFLINE, hconst.HF_HUB_OFFLINE)
    dconf.HF_HUB_OFFLINE = dconf.HF_DATASETS_OFFLINE = hconst.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        dconf.HF_HUB_OFFLINE, dconf.HF_DATASETS_OFFLINE, hconst.HF_HUB_OFFLINE = saved


def looks_like_hub_id(src: str) -> bool:
    return bool(_HUB_ID.match(src))


def parse_hub_spec(spec: str) -> tuple[str, str | None, str | None]:
    """"owner/name" | "owner/name:split" | "owner/name:config:split" -> (id, config, split)."""
    parts = spec.split(":")
    if not looks_like_hub_id(spec) or len(parts) > 3:
        raise DataError(f"{spec!r} is not a hub dataset id (expected owner/name, owner/name:split or "
                        f"owner/name:config:split)")
    if len(parts) == 1:
        return parts[0], None, None
    if len(parts) == 2:
        return parts[0], None, parts[1]
    return parts[0], parts[1], parts[2]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def load_hub_dataset(dataset_id: str, split_name: str = "train", data_dir: str | None = None,
                     config: str | None = None, cached_only: bool = False):
    """One split of a hub dataset as a `datasets.Dataset`. `cached_only`: never use the network."""
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a core dependency
        raise DataError(f"the `datasets` package is needed to load {dataset_id!r}") from e
    offline = cached_only or offline_requested()
    kwargs: dict[str, Any] = {"split": split_name}
    if data_dir:
        kwargs["data_dir"] = data_dir
    with _offline_mode(offline):
        try:
            return datasets.load_dataset(dataset_id, config, **kwargs)
        except Exception as e:  # datasets raises many kinds: connection, not found, offline, bad config
            error = e
    detail = _first_line(error)
    if offline and isinstance(error, (ConnectionError, FileNotFoundError)):
        raise DataError(f"dataset {dataset_id!r} is not available locally and the hub is offline "
                        f"(HF_HUB_OFFLINE); download it once with network access, or {DATA_HINT}")
    raise DataError(f"dataset {dataset_id!r} could not be loaded ({detail}); check the id, config and "
                    f"split and the network, or {DATA_HINT}")


def load_hub_rows(dataset_id: str, split_name: str = "train", data_dir: str | None = None,
                  config: str | None = None) -> Iterator[dict[str, Any]]:
    for row in load_hub_dataset(dataset_id, split_name, data_dir=data_dir, config=config):
        yield dict(row)


def cached_num_rows(dataset_id: str, split_name: str = "train", data_dir: str | None = None,
                    config: str | None = None) -> int | None:
    """Rows of the split when it is in the local cache, else None. Never touches the network."""
    try:
        return len(load_hub_dataset(dataset_id, split_name, data_dir=data_dir, config=config,
                                    cached_only=True))
    except DataError:
        return None
