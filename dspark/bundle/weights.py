"""Weight-name checks: do a folder's safetensors hold exactly the tensors its config's model expects?

A loader that silently skips keys is the classic failure: transformers initialises a missing tensor
at random (with a log line nobody reads) and ignores an unexpected one, so a draft saved under the
wrong prefix loads "fine" and accepts nothing. Here the expected names and shapes come from the model
built from config.json on the meta device (no memory, no weights), and the stored names and shapes
from the safetensors headers (no tensor data read).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePath

from dspark.config.base import clip
from dspark.errors import DsparkError

# The acceptance head lives next to the weights in a distilled draft's folder (and in schema 1 bundles'
# draft/) but is not part of the model.
NON_MODEL_SAFETENSORS = ("acceptance_head.safetensors",)
SHOWN_KEYS = 6


@dataclass
class KeyCheck:
    """Outcome of `check_weight_keys`. `checked` is False only when the check does not apply
    (`reason` says why); a mismatch raises instead."""

    folder: str
    checked: bool
    tensors: int = 0
    files: list[str] = field(default_factory=list)
    tied: list[str] = field(default_factory=list)
    reason: str = ""

    def to_dict(self) -> dict:
        return {"checked": self.checked, "tensors": self.tensors, "files": self.files, "tied": self.tied,
                "reason": self.reason}


def inside(folder: Path, rel: object, what: str) -> Path:
    """folder / rel, for a file name a model folder's own metadata gives (an index's shard, the
    config's `transformers_weights`): a relative path that stays inside the folder, else DsparkError.
    transformers joins such names to the folder as they are, so '/x' or '../x' would load a file
    from anywhere."""
    if not isinstance(rel, str) or not rel:
        raise DsparkError(f"{what}: expected a file name, got {clip(repr(rel))}")
    # lexical: a hub snapshot's files are symlinks into its blob store (a bundle allows none: check_files)
    if PurePath(rel).is_absolute() or ".." in PurePath(rel).parts or "\\" in rel:
        raise DsparkError(f"{what}: {clip(repr(rel))} is not a file inside {str(folder)!r} (weights must sit "
                          "in the model folder)")
    return folder / rel


def _index_shards(index: Path) -> list[Path]:
    try:
        shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError):
        raise DsparkError(f"{index}: not a valid safetensors index (needs a 'weight_map' object)") from None
    return [inside(index.parent, s, f"{index} shard") for s in sorted(shards, key=str)]


def model_weight_files(folder: Path) -> list[Path]:
    """The safetensors files transformers loads the model from, in its order of preference: the file
    config.json names in `transformers_weights`, model.safetensors, the shards of
    model.safetensors.index.json; else (quantizers' own formats) every *.safetensors except the
    acceptance head. Every name must stay inside the folder (`inside`)."""
    try:
        explicit = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("transformers_weights")
    except (OSError, ValueError, AttributeError):
        explicit = None
    if explicit is not None:
        path = inside(folder, explicit, f"{folder / 'config.json'} transformers_weights")
        return _index_shards(path) if path.name.endswith(".index.json") else [path]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return _index_shards(index)
    return sorted(p for p in folder.glob("*.safetensors") if p.name not in NON_MODEL_SAFETENSORS)


def engine_weight_files(folder: Path) -> list[Path]:
    """The safetensors files vLLM's default loader reads from a local model folder: every top-level
    *.safetensors, or only those the weight_map of model.safetensors.index.json names when there is
    one (vllm/model_executor/model_loader/default_loader.py `_prepare_weights`: a glob, then
    `filter_duplicate_safetensors_files`; SGLang's loader has the same two steps)."""
    found = sorted(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        named = set(_index_shards(index))
        found = [p for p in found if p in named]
    return found


def check_engine_folder(folder: Path, what: str) -> None:
    """DsparkError naming the safetensors files an engine would load from `folder` besides the
    model's own weights (`model_weight_files`): it would read their tensors as weights and fail.
    `what` names the folder in the message."""
    own = set(model_weight_files(folder))
    extra = [p.name for p in engine_weight_files(folder) if p not in own]
    if extra:
        raise DsparkError(f"{what} holds {', '.join(clip(e) for e in extra[:SHOWN_KEYS])} "
                          f"besides its weights ({', '.join(sorted(p.name for p in own))}): vLLM and SGLang load "
                          "every *.safetensors of a model folder that has no index, so only the model's weights "
                          "may be there")


def stored_tensors(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """name -> shape from the safetensors headers. DsparkError naming the file if one is unreadable
    or two files hold the same name."""
    from safetensors import SafetensorError, safe_open

    out: dict[str, tuple[int, ...]] = {}
    where: dict[str, str] = {}
    for f in files:
        if not f.is_file():
            raise DsparkError(f"weight file {str(f)!r} is missing")
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    if k in out:
                        raise DsparkError(f"tensor {k!r} is stored twice: in {where[k]} and {f.name}")
                    out[k] = tuple(fh.get_slice(k).get_shape())
                    where[k] = f.name
        except (SafetensorError, OSError, ValueError) as e:
            raise DsparkError(f"weight file {str(f)!r} is not a readable safetensors file: {e}") from None
    return out


def _tied_map(model) -> dict[str, str]:
    """tied parameter name -> the name it shares storage with (transformers 5: all_tied_weights_keys)."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if tied is None:
        tied = getattr(model, "_tied_weights_keys", None)
    if isinstance(tied, dict):
        return {str(k): str(v) for k, v in tied.items()}
    if tied and getattr(model.config, "tie_word_embeddings", False):
        # older list form: these alias the input embeddings
        emb = next((n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight), None)
        return {str(k): emb for k in tied if emb}
    return {}


def expected_tensors(folder: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str], list[str]]:
    """(name -> shape, tied name -> source, ignore-unexpected regexes) of the model that config.json
    describes, built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as e:
        raise DsparkError(f"cannot build the model described by {folder / 'config.json'}: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = {k: v for k, v in _tied_map(model).items() if k in shapes}
    ignore = [str(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    return shapes, tied, ignore


def _show(names: list[str]) -> str:
    head = ", ".join(names[:SHOWN_KEYS])
    return head + (f", ... ({len(names)} in all)" if len(names) > SHOWN_KEYS else "")


def compare_keys(expected: dict[str, tuple[int, ...]], stored: dict[str, tuple[int, ...]],
                 tied: dict[str, str], ignore_unexpected: list[str] = ()) -> tuple[list[str], list[str], list[str]]:
    """Pure comparison: (missing, unexpected, shape mismatches as 'name stored S, expected E').
    A tied name may be absent when its source is stored (it is rebuilt by tying)."""
    missing = sorted(k for k in expected if k not in stored and not (k in tied and tied[k] in stored))
    unexpected = sorted(k for k in stored if k not in expected
                        and not any(re.search(p, k) for p in ignore_unexpected))
    mismatched = sorted(f"{k} stored {list(stored[k])}, expected {list(expected[k])}"
                        for k in stored if k in expected and tuple(stored[k]) != tuple(expected[k]))
    return missing, unexpected, mismatched


def check_weight_keys(folder: str | Path, what: str = "model") -> KeyCheck:
    """Raise DsparkError naming the keys when `folder`'s safetensors miss tensors the model needs,
    hold tensors it does not have, or hold them in another shape. Quantized checkpoints (a
    `quantization_config` in config.json) store the quantizer's own tensors: not checked here."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DsparkError(f"{what} config {str(cfg_path)!r} is unreadable: {e}") from None
    files = model_weight_files(folder)
    rel = [f.name for f in files]
    if not files:
        raise DsparkError(f"{what} folder {str(folder)!r} has no safetensors weights")
    if isinstance(cfg, dict) and cfg.get("quantization_config"):
        method = (cfg["quantization_config"] or {}).get("quant_method", "unknown")
        return KeyCheck(str(folder), False, files=rel,
                        reason=f"quantized checkpoint ({method}): tensors follow the quantizer's layout")
    stored = stored_tensors(files)
    expected, tied, ignore = expected_tensors(folder)
    missing, unexpected, mismatched = compare_keys(expected, stored, tied, ignore)
    problems = []
    if missing:
        problems.append(f"missing keys: {_show(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_show(unexpected)}")
    if mismatched:
        problems.append(f"wrong shapes: {_show(mismatched)}")
    if problems:
        raise DsparkError(f"{what} weights in {str(folder)!r} do not match the model built from its config.json "
                          f"({'; '.join(problems)}): a loader would silently skip or randomly initialise them")
    used_tied = sorted(k for k in tied if k not in stored)
    return KeyCheck(str(folder), True, tensors=len(stored), files=rel, tied=used_tied)
