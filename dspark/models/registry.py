"""Model names: an explicit registry of hub aliases and built-in models, and name resolution.

`resolve_model(name)` never touches the network and never imports torch: it decides what a name
means (a local folder, a GGUF file, a built-in model, an alias, a GGUF converted earlier, or a hub id)
and whether its weights are on this machine (for hub ids: present in the local Hugging Face cache).

An alias may also name a GGUF file of the same model (`Alias.gguf`, looked for under a `shared/models`
folder above the working directory or the package, see `find_shared_file`). It resolves, first found:
the hub id's snapshot in the Hugging Face cache (the original weights), the GGUF's converted folder
in dspark's cache, the GGUF file itself (converted on first load, see dspark.models.gguf), and last
the hub id, downloaded when online.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from dspark.errors import DsparkError
from dspark.models.files import has_safetensors_weights, is_model_folder

BUILTIN_DIR = Path(__file__).parent / "builtin"

# The recipe that (re)builds the built-in family; named in errors when a built-in folder is missing.
BUILD_TINY_COMMAND = ("python -m dspark build-tiny-family --recipe dspark/recipes/tiny-code.yaml "
                      "--out dspark/models/builtin")

# huggingface_hub >= 1.0 ships the `hf` CLI (the old `huggingface-cli` entry point is gone).
DOWNLOAD_COMMAND = "hf download"

Kind = Literal["builtin", "alias", "local", "gguf", "hub"]


@dataclass(frozen=True)
class Alias:
    """A short name for a hub model. `family` groups models that share a tokenizer (pairable)."""

    hub_id: str
    family: str
    parameters: str
    instruct: bool = False
    # A GGUF file of this model, relative to a `shared/models` folder, and its sha256 (checked
    # before it is converted: a different file under that name is not this model).
    gguf: str | None = None
    gguf_sha256: str | None = None


def _pair(base: str, hub_base: str, family: str, params: str, hub_instruct: str) -> dict[str, Alias]:
    return {base: Alias(hub_base, family, params),
            f"{base}-instruct": Alias(hub_instruct, family, params, instruct=True)}


# The targets and drafts people actually pair. Llama 3 / 3.1 / 3.2 share one tokenizer; Qwen2.5
# sizes share a tokenizer but the 7B/72B embeddings are padded larger than the 0.5B/1.5B ones.
ALIASES: dict[str, Alias] = {
    **_pair("llama3-70b", "meta-llama/Meta-Llama-3-70B", "llama3", "70B",
            "meta-llama/Meta-Llama-3-70B-Instruct"),
    **_pair("llama3-8b", "meta-llama/Meta-Llama-3-8B", "llama3", "8B",
            "meta-llama/Meta-Llama-3-8B-Instruct"),
    **_pair("llama3.1-70b", "meta-llama/Llama-3.1-70B", "llama3", "70B",
            "meta-llama/Llama-3.1-70B-Instruct"),
    **_pair("llama3.1-8b", "meta-llama/Llama-3.1-8B", "llama3", "8B",
            "meta-llama/Llama-3.1-8B-Instruct"),
    **_pair("llama3.2-3b", "meta-llama/Llama-3.2-3B", "llama3", "3B",
            "meta-llama/Llama-3.2-3B-Instruct"),
    **_pair("llama3.2-1b", "meta-llama/Llama-3.2-1B", "llama3", "1B",
            "meta-llama/Llama-3.2-1B-Instruct"),
    **_pair("qwen2.5-72b", "Qwen/Qwen2.5-72B", "qwen2.5", "72B", "Qwen/Qwen2.5-72B-Instruct"),
    **_pair("qwen2.5-7b", "Qwen/Qwen2.5-7B", "qwen2.5", "7B", "Qwen/Qwen2.5-7B-Instruct"),
    **_pair("qwen2.5-1.5b", "Qwen/Qwen2.5-1.5B", "qwen2.5", "1.5B", "Qwen/Qwen2.5-1.5B-Instruct"),
    **_pair("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B", "qwen2.5", "0.5B", "Qwen/Qwen2.5-0.5B-Instruct"),
    **_pair("mistral-7b", "mistralai/Mistral-7B-v0.1", "mistral", "7B",
            "mistralai/Mistral-7B-Instruct-v0.1"),
    **_pair("gemma2-27b", "google/gemma-2-27b", "gemma2", "27B", "google/gemma-2-27b-it"),
    **_pair("gemma2-9b", "google/gemma-2-9b", "gemma2", "9B", "google/gemma-2-9b-it"),
    **_pair("gemma2-2b", "google/gemma-2-2b", "gemma2", "2B", "google/gemma-2-2b-it"),
}
# A real 135M model with no smaller sibling: the dev machines hold its Q4_1 GGUF in ../shared/models.
# Only its instruct variant is registered, so the short name stands for it too.
ALIASES["smollm2-135m-instruct"] = ALIASES["smollm2-135m"] = Alias(
    "HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2", "135M", instruct=True,
    gguf="smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")

# Built-in models ship inside the package (trained by dspark/recipes/tiny-code.yaml).
BUILTINS: dict[str, str] = {
    "tiny-code": "target of the built-in family (the analog of a 70B target)",
    "tiny-code-draft-s": "small draft of the built-in family",
    "tiny-code-draft-m": "medium draft of the built-in family",
    # trained by dspark/recipes/tiny-code-draft-xbpe.yaml
    "tiny-code-draft-xbpe": "draft for tiny-code with its own tokenizer (BPE 1024): cross-tokenizer decoding",
}


@dataclass(frozen=True)
class ResolvedModel:
    """What a model name means here. `local_path` is the folder to load from, None if not on disk."""

    name: str
    kind: Kind
    resolves_to: str
    local_path: Path | None
    available: bool
    # The GGUF file behind the name, when `local_path` is (or will be) its converted folder.
    gguf: Path | None = None

    @property
    def label(self) -> str:
        """`'llama3-70b' (meta-llama/Meta-Llama-3-70B)` or just `'path'` when both are the same."""
        if self.resolves_to == self.name:
            return repr(self.name)
        return f"{self.name!r} ({self.resolves_to})"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["local_path"] = str(self.local_path) if self.local_path else None
        d["gguf"] = str(self.gguf) if self.gguf else None
        return d


def builtin_path(name: str) -> Path:
    return BUILTIN_DIR / name


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (tests redirect it)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_snapshot(hub_id: str, cache_dir: Path | None = None) -> Path | None:
    """The cached snapshot folder of `hub_id` (revision main) if it holds config + safetensors."""
    from huggingface_hub import try_to_load_from_cache

    try:
        config = try_to_load_from_cache(hub_id, "config.json", cache_dir=str(cache_dir or hf_cache_dir()))
    except ValueError:  # not a syntactically valid repo id: cannot be cached
        return None
    if not isinstance(config, str):  # None (not cached) or the cached "does not exist" marker
        return None
    snapshot = Path(config).parent
    return snapshot if has_safetensors_weights(snapshot) else None


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def _looks_like_path(name: str) -> bool:
    """A name the user meant as a folder, not a hub id (`org/name` has exactly one slash)."""
    return (name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1
            or not _HUB_ID.match(name))


def shared_models_dirs() -> list[Path]:
    """`shared/models` folders above the working directory and above the package (nearest first):
    where a checkout's `../shared` lives, found the same way from a worktree further down."""
    found: list[Path] = []
    for start in (Path.cwd(), Path(__file__).resolve().parents[2]):
        for folder in (start, *start.parents):
            candidate = folder / "shared" / "models"
            if candidate.is_dir() and candidate not in found:
                found.append(candidate)
    return found


def find_shared_file(relative: str) -> Path | None:
    """The first `shared/models/<relative>` file (see `shared_models_dirs`)."""
    for root in shared_models_dirs():
        if (root / relative).is_file():
            return (root / relative).resolve()
    return None


def _resolve_gguf(name: str, gguf: Path) -> ResolvedModel:
    from dspark.models.gguf import lookup_converted

    gguf = gguf.resolve()
    return ResolvedModel(name, "gguf", str(gguf), lookup_converted(gguf), True, gguf=gguf)


def _resolve_alias(name: str, alias: Alias, cache_dir: Path | None) -> ResolvedModel:
    snap = cached_snapshot(alias.hub_id, cache_dir)
    if snap is not None:
        return ResolvedModel(name, "alias", alias.hub_id, snap, True)
    if alias.gguf is not None and alias.gguf_sha256 is not None:
        from dspark.models.gguf import converted_folder

        folder = converted_folder(alias.gguf_sha256)
        file = find_shared_file(alias.gguf)
        if folder is not None or file is not None:
            return ResolvedModel(name, "alias", str(file or folder), folder, True, gguf=file)
    return ResolvedModel(name, "alias", alias.hub_id, None, False)


def resolve_model(name_or_path: str | os.PathLike, cache_dir: Path | None = None) -> ResolvedModel:
    """Decide what `name_or_path` is: an existing local folder or GGUF file, a built-in, an alias,
    a GGUF converted earlier (by its file name), or a hub id.

    An existing path wins over a name so a user can always point at their own copy.
    """
    from dspark.models.gguf import converted_by_name, find_gguf

    name = os.fspath(name_or_path)
    if not name.strip():
        raise DsparkError("model name is empty: pass a built-in name, an alias (see `dspark models`), "
                          "a hub id, a local folder path or a .gguf file")
    path = Path(name).expanduser()
    if path.exists():
        gguf = find_gguf(path)
        if gguf is not None:
            return _resolve_gguf(name, gguf)
        if not path.is_dir():
            raise DsparkError(f"model path {name!r} is a file: pass the model's folder (with config.json "
                              "and model.safetensors) or a .gguf file")
        path = path.resolve()
        return ResolvedModel(name, "local", str(path), path, True)
    if name in BUILTINS:
        folder = builtin_path(name)
        ok = is_model_folder(folder)
        return ResolvedModel(name, "builtin", str(folder), folder if ok else None, ok)
    if name in ALIASES:
        return _resolve_alias(name, ALIASES[name], cache_dir)
    if _looks_like_path(name):
        return ResolvedModel(name, "local", str(path), None, False)
    converted = converted_by_name(name)
    if len(converted) > 1:
        raise DsparkError(f"{len(converted)} converted GGUF files are called {name!r} "
                          f"({', '.join(str(c) for c in converted)}): pass the folder or the .gguf file")
    if converted:
        return ResolvedModel(name, "gguf", str(converted[0]), converted[0], True)
    snap = cached_snapshot(name, cache_dir)
    return ResolvedModel(name, "hub", name, snap, snap is not None)


def builtin_meta(name: str) -> dict:
    """The built-in model's `dspark_model.json` (training facts), or {} if it is absent."""
    meta = builtin_path(name) / "dspark_model.json"
    if not meta.is_file():
        return {}
    try:
        return json.loads(meta.read_text(encoding="utf-8"))
    except ValueError:
        return {}


def list_models(cache_dir: Path | None = None) -> list[dict]:
    """Every built-in model, alias and GGUF converted in dspark's cache: name, kind, resolves_to,
    available, parameters, family, notes, and `hint` (how to make it available) for the ones that
    are not here."""
    rows: list[dict] = []
    for name, note in BUILTINS.items():
        r = resolve_model(name, cache_dir)
        meta = builtin_meta(name)
        notes = note
        if meta.get("heldout_loss") is not None:
            notes += f"; held-out loss {meta['heldout_loss']}"
        rows.append({"name": name, "kind": r.kind, "resolves_to": r.resolves_to, "available": r.available,
                     "parameters": meta.get("parameters"), "family": meta.get("family", "tiny-code"),
                     "notes": notes, "hint": None if r.available else f"build it: `{BUILD_TINY_COMMAND}`"})
    alias_files = {a.gguf_sha256 for a in ALIASES.values() if a.gguf_sha256}
    for name, alias in ALIASES.items():
        r = resolve_model(name, cache_dir)
        notes = "instruct" if alias.instruct else "base"
        if r.resolves_to != alias.hub_id:  # here as its GGUF, not as the hub checkpoint
            notes += "; GGUF, converted" if r.local_path is not None else "; GGUF, converted on first load"
        rows.append({"name": name, "kind": r.kind, "resolves_to": r.resolves_to, "available": r.available,
                     "parameters": alias.parameters, "family": alias.family, "notes": notes,
                     "hint": None if r.available else f"download it: `{DOWNLOAD_COMMAND} {alias.hub_id}`"})
    from dspark.models.gguf import list_converted

    for c in list_converted():
        if c.get("sha256") in alias_files:  # shown as its alias above
            continue
        rows.append({"name": c.get("name"), "kind": "gguf", "resolves_to": c["folder"], "available": True,
                     "parameters": c.get("parameters"), "family": "-",
                     "notes": f"converted from {c.get('file')} (sha256 {str(c.get('sha256'))[:12]})", "hint": None})
    return rows


def format_parameters(n) -> str:
    """1_300_000 -> '1.3M'; strings ('70B') pass through; None -> ''."""
    if n is None:
        return ""
    if isinstance(n, str):
        return n
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)
