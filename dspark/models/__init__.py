"""Models: name resolution (aliases, built-ins, local folders, GGUF files, hub ids), safetensors-only
loading with explicit dtype/device (a GGUF is converted once into a safetensors folder: gguf.py),
target/draft tokenizer compatibility, and drafts made from the target (draft_init.py).

Importing this package does not import torch or transformers; `load_model` does, when called.
"""

from dspark.models.compat import (CompatMode, TokenizerCompat, check_pair, check_tokenizers,
                                  tokenizer_hash)
from dspark.models.loading import (DEVICES, DTYPES, LoadedModel, is_offline, load_model,
                                   load_tokenizer, local_folder)
from dspark.models.registry import (ALIASES, BUILTIN_DIR, BUILTINS, Alias, ResolvedModel, list_models,
                                    resolve_model)

__all__ = [
    "ALIASES", "BUILTINS", "BUILTIN_DIR", "DEVICES", "DTYPES", "Alias", "CompatMode", "LoadedModel",
    "ResolvedModel", "TokenizerCompat", "check_pair", "check_tokenizers", "is_offline", "list_models",
    "load_model", "load_tokenizer", "local_folder", "resolve_model", "tokenizer_hash",
]
