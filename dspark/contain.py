"""Keep optional third-party libraries off dspark's stdout and out of its process environment.

dspark's commands print machine-readable output (`--json`, JSON lines) on stdout. Some optional
libraries write there on import or while working: gptqmodel prints a banner and its progress log
to stdout, and sets PYTORCH_ALLOC_CONF and CUDA_DEVICE_ORDER on import. peft imports gptqmodel
whenever it is installed (its GPTQ dispatch), so `--lora` meets it even when nothing is quantized.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

# What gptqmodel's import sets for the whole process (allocator tuning, device order).
GPTQMODEL_ENV = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF", "CUDA_DEVICE_ORDER")


@contextlib.contextmanager
def third_party_contained(env_keys: tuple[str, ...] = GPTQMODEL_ENV) -> Iterator[None]:
    """Inside: whatever is printed to stdout goes to stderr. On exit, the environment variables
    `env_keys` are back to what they were before (set, changed or removed inside)."""
    with restored_env(env_keys), contextlib.redirect_stdout(sys.stderr):
        yield


@contextlib.contextmanager
def restored_env(keys) -> Iterator[None]:
    """On exit, the environment variables `keys` are back to what they were on entry."""
    before = {k: os.environ.get(k) for k in keys}
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


__all__ = ["GPTQMODEL_ENV", "restored_env", "third_party_contained"]
