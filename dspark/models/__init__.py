"""Models: name resolution (aliases, built-ins, local folders, hub ids), safetensors-only loading
with explicit dtype/device, and target/draft tokenizer compatibility.

Importing this package does not import torch or transformers; `load_model` does, when called.
"""

from dspark.models.compat import (CompatMode, TokenizerCompat, check_pair, check_tokenizers,
                                  tokenizer_hash)
from dspark.models.loading import (DEVICES, DTYPES, LoadedModel, is_offline, load_model,
                                   load_tokenizer)
from dspark.models.registry import (ALIASES, BUILTIN_DIR, BUILTINS, Alias, ResolvedModel, list_models,
                                    resolve_model)

__all__ = [
    "ALIASES", "BUILTINS", "BUILTIN_DIR", "DEVICES", "DTYPES", "Alias", "CompatMode", "LoadedModel",
    "ResolvedModel", "TokenizerCompat", "check_pair", "check_tokenizers", "is_offline", "list_models",
    "load_model", "load_tokenizer", "resolve_model", "tokenizer_hash",
]
