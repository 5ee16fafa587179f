"""Load a causal LM + tokenizer by name: safetensors only, explicit dtype and device, clear errors.

Hub models are loaded from their cached snapshot folder when cached, so a cached model never
touches the network. A GGUF model is converted once into a safetensors folder (dspark.models.gguf)
and loaded from there. A model that is not on disk is fetched only when not offline; offline (or
when the hub fails) the user gets one line saying how to provide it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dspark.errors import DsparkError, ModelNotAvailableError
from dspark.models.registry import (BUILD_TINY_COMMAND, DOWNLOAD_COMMAND, ResolvedModel,
                                    has_safetensors_weights, resolve_model)

DTYPES = ("float32", "bfloat16", "float16", "auto")
DEVICES = ("cpu", "cuda", "cuda:N", "auto")

_TRUE = {"1", "on", "yes", "true"}


@dataclass
class LoadedModel:
    """A model in eval mode with its tokenizer. `vocab_size` is the embedding rows (may be padded
    beyond `len(tokenizer)`)."""

    model: Any
    tokenizer: Any
    resolved: ResolvedModel
    device: str
    dtype: str
    config: Any = field(repr=False)
    vocab_size: int
    tokenizer_size: int
    num_parameters: int

    @property
    def name(self) -> str:
        return self.resolved.name


def is_offline() -> bool:
    """Offline per HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now (not at import time)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return True
    return False


def parse_dtype(dtype: str, device: str):
    """'float32' | 'bfloat16' | 'float16' | 'auto' -> torch.dtype. `auto` is float32 on CPU (half
    precision matmuls there are slow and lossy) and bfloat16 on CUDA where supported, else float16."""
    import torch

    if dtype not in DTYPES:
        raise DsparkError(f"unknown dtype {dtype!r} (allowed: {', '.join(DTYPES)})")
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, dtype)


def check_device_name(device: str) -> str:
    """Reject a malformed device string without importing torch."""
    device = str(device).strip()
    valid = device in ("cpu", "cuda", "auto") or (device.startswith("cuda:") and device[5:].isdigit())
    if not valid:
        raise DsparkError(f"unknown device {device!r} (allowed: {', '.join(DEVICES)})")
    return device


def parse_device(device: str) -> str:
    """'cpu' | 'cuda' | 'cuda:N' | 'auto' -> a concrete torch device string; CUDA must exist."""
    device = check_device_name(device)
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DsparkError(f"device {device!r} requested but CUDA is not available on this machine "
                              "(use --device cpu or auto)")
        index = int(device[5:]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise DsparkError(f"device {device!r} does not exist: this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s) (cuda:0 .. "
                              f"cuda:{torch.cuda.device_count() - 1})")
    return device


def not_available_error(r: ResolvedModel) -> ModelNotAvailableError:
    """The one-line error for a model that is not on this machine, saying how to provide it."""
    if r.kind == "builtin":
        return ModelNotAvailableError(f"built-in model {r.name!r} is missing from the package "
                                      f"({r.resolves_to}): rebuild it with `{BUILD_TINY_COMMAND}`")
    if r.kind == "local":
        return ModelNotAvailableError(f"model folder {r.name!r} does not exist: pass an existing local "
                                      "folder, a built-in name or an alias (see `dspark models`)")
    return ModelNotAvailableError(
        f"model {r.label} is not available locally: download it with "
        f"`{DOWNLOAD_COMMAND} {r.resolves_to}` (needs network and access) or pass a local folder path")


# A draft with a reduced vocabulary will carry its draft-to-target id map in this file (EAGLE-3's
# `d2t`, see dspark.models.draft_init): loaded as a plain model its token ids would be wrong.
D2T_FILE = "d2t.safetensors"


def _check_folder(folder: Path) -> None:
    if (folder / D2T_FILE).is_file():
        raise DsparkError(f"model folder {str(folder)!r} is a reduced-vocabulary draft ({D2T_FILE}): this dspark "
                          "version cannot map its token ids to the target's")
    if not (folder / "config.json").is_file():
        raise DsparkError(f"model folder {str(folder)!r} has no config.json: not a Hugging Face model folder")
    if has_safetensors_weights(folder):
        return
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
        raise DsparkError(f"model folder {str(folder)!r} has only pickle weights (.bin/.pt): dspark loads "
                          "safetensors only; convert it (e.g. load it yourself if you trust it, then "
                          "`save_pretrained(..., safe_serialization=True)`)")
    raise DsparkError(f"model folder {str(folder)!r} has no model.safetensors (or complete shards)")


def _locate(name_or_path: str, offline: bool | None) -> tuple[ResolvedModel, str, bool]:
    """(resolved, what to pass to from_pretrained, whether that is a local folder)."""
    r = materialize(resolve_model(name_or_path))
    offline = is_offline() if offline is None else offline
    if r.local_path is not None:
        _check_folder(r.local_path)
        return r, str(r.local_path), True
    if r.kind in ("builtin", "local") or offline:
        raise not_available_error(r)
    return r, r.resolves_to, False


def materialize(r: ResolvedModel) -> ResolvedModel:
    """`r` with its GGUF converted (once, into dspark's cache) and `local_path` set to that folder;
    anything else unchanged."""
    if r.local_path is not None or r.gguf is None:
        return r
    import dataclasses

    from dspark.models.gguf import convert_gguf
    from dspark.models.registry import ALIASES

    expected = ALIASES[r.name].gguf_sha256 if r.kind == "alias" else None
    return dataclasses.replace(r, local_path=convert_gguf(r.gguf, expected_sha256=expected))


def local_folder(name_or_path: str) -> ResolvedModel:
    """Resolve a name to a model folder on this machine (converting a GGUF if needed), or raise the
    one-line 'not available' error: for stages that read the files themselves."""
    r = materialize(resolve_model(name_or_path))
    if r.local_path is None:
        raise not_available_error(r)
    _check_folder(r.local_path)
    return r


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip()


def _load_errors() -> tuple[type[BaseException], ...]:
    """What a broken or incompatible folder raises inside from_pretrained (a user problem, one line)."""
    from safetensors import SafetensorError

    return (OSError, ValueError, KeyError, ImportError, RuntimeError, SafetensorError)


def _fail(e: BaseException, local: bool, r: ResolvedModel, what: str) -> DsparkError:
    if not local:
        # Any hub failure (no network, gated repo, typo) means the same thing to the user.
        return ModelNotAvailableError(f"{not_available_error(r)} (hub: {_one_line(e)})")
    return DsparkError(f"could not load the {what} of {r.label}: {_one_line(e)}")


def _load_tokenizer(source: str, local: bool, r: ResolvedModel):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=local)
    except Exception as e:
        if local and not isinstance(e, _load_errors()):
            raise
        raise _fail(e, local, r, "tokenizer") from None


def load_tokenizer(name_or_path: str, offline: bool | None = None):
    """The tokenizer of a model name or folder (same resolution and errors as `load_model`)."""
    r, source, local = _locate(name_or_path, offline)
    return _load_tokenizer(source, local, r)


# safetensors' names of the floating dtypes a model loads in
SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


@contextlib.contextmanager
def weights_read_for(torch_dtype):
    """While loading in `torch_dtype`, transformers reads every safetensors file that stores floating
    tensors in another dtype with pread(2), one tensor at a time, instead of mapping it.

    Why: every page of a mapped file that loading reads stays resident until the last tensor viewing
    the mapping is freed. Converting (the built-in bf16 checkpoints loaded in float32, a float32 file
    in bf16) reads every page, so the file's bytes and the converted weights were resident at once:
    1.5x the weights (3x for float32 -> bf16). With pread the peak is the weights plus one tensor.
    A file already in `torch_dtype` stays mapped: its tensors are the file's pages, with no copy."""
    import transformers.modeling_utils as mu

    original = getattr(mu, "safe_open", None)
    want = SAFETENSORS_DTYPES.get(str(torch_dtype).removeprefix("torch."))
    if original is None or want is None:  # transformers opens files elsewhere / an unknown dtype
        yield
        return

    def safe_open(filename, *args, **kwargs):
        with original(filename, framework="pt") as probe:  # reads the header only
            stored = {probe.get_slice(k).get_dtype() for k in probe.keys()}
        if stored & (set(SAFETENSORS_DTYPES.values()) - {want}):
            kwargs["backend"] = "pread"
        return original(filename, *args, **kwargs)

    mu.safe_open = safe_open
    try:
        yield
    finally:
        mu.safe_open = original


def load_model(name_or_path: str, device: str = "cpu", dtype: str = "float32",
               offline: bool | None = None) -> LoadedModel:
    """Load a causal LM (eval mode) and its tokenizer.

    Built-in checkpoints are stored in bf16; the float32 default upcasts them, which is what the
    CPU decoder wants. `offline=None` follows HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE.
    """
    # Cheap checks first: a typo or a missing model is reported without importing torch.
    if dtype not in DTYPES:
        raise DsparkError(f"unknown dtype {dtype!r} (allowed: {', '.join(DTYPES)})")
    check_device_name(device)
    r, source, local = _locate(name_or_path, offline)
    device = parse_device(device)
    torch_dtype = parse_dtype(dtype, device)

    from transformers import AutoModelForCausalLM

    from dspark.memory import release_memory

    tokenizer = _load_tokenizer(source, local, r)
    # glibc keeps what loading freed (a 49k-token BPE's JSON parse: ~30 MB; conversion buffers) and
    # the big allocations that follow never reuse it: returned now, it counts in no later peak
    release_memory()
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "use_safetensors": True, "local_files_only": local}
    if device != "cpu":
        # Place weights straight on the GPU instead of materialising a 70B model in host RAM first.
        kwargs["device_map"] = device
    try:
        with weights_read_for(torch_dtype):
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as e:
        if local and not isinstance(e, _load_errors()):
            raise
        raise _fail(e, local, r, "model") from None
    model.eval()
    release_memory()
    emb = model.get_input_embeddings()
    return LoadedModel(model=model, tokenizer=tokenizer, resolved=r, device=device,
                       dtype=str(torch_dtype).removeprefix("torch."), config=model.config,
                       vocab_size=int(emb.weight.shape[0]), tokenizer_size=len(tokenizer),
                       num_parameters=sum(p.numel() for p in model.parameters()))


def model_info(name_or_path: str, load: bool = False, device: str = "cpu", dtype: str = "float32",
               offline: bool | None = None) -> dict[str, Any]:
    """What a name resolves to; with `load`, also load it and report its real sizes. A model that is
    not on this machine raises ModelNotAvailableError (without `load`: even when online, since
    nothing is fetched)."""
    if not load:
        r = resolve_model(name_or_path)
        if not r.available:
            raise not_available_error(r)
        if r.kind == "local":
            _check_folder(r.local_path)
        return r.to_dict()
    m = load_model(name_or_path, device=device, dtype=dtype, offline=offline)
    from dspark.models.compat import tokenizer_hash

    return {**m.resolved.to_dict(), "device": m.device, "dtype": m.dtype,
            "architecture": type(m.model).__name__, "parameters": m.num_parameters,
            "vocab_size": m.vocab_size, "tokenizer_size": m.tokenizer_size,
            "tokenizer_hash": tokenizer_hash(m.tokenizer)}
