"""Drafts made from the target itself (`dspark draft-init`, `dspark distill --draft-init`), for a
target that has no smaller sibling with its tokenizer.

Methods, written as one spec string (`parse_spec`) or built from CLI options (`spec_from_options`):
- `truncate:N` / `truncate:I,J,...` / `every:K`: the target's own decoder layers (the first N, the
  listed ones, or every K-th counted from layer 0 plus the last layer, whose output the final norm
  and head were trained on), with its embeddings, final norm and head. Tensors are copied one by one
  from the target's safetensors: the target is never instantiated, so a 70B target's 4-layer draft
  reads only what it keeps, and the draft keeps the stored dtype. It is a warm start for
  distillation, not yet a draft: undistilled, SmolLM2's first 2-6 layers agree with its greedy
  token 1-4% of the time and layer sets with gaps ~0% (README, "GGUF models and drafts made from
  the target").
- `narrow:WxN`: a fresh body of N layers at width W, same tokenizer. The target's embedding has
  the target's width and cannot be copied, so the draft's is its projection onto its top-W right
  singular vectors, E' = E V_W: the rank-W embedding whose dot products E' E'^T best approximate
  the target's E E^T (Eckart-Young). Similar tokens start close and the (tied) head starts with the
  target's token geometry, which a random embedding would have to learn from the distillation data.
  An untied head is projected with the same basis. The body is initialised as transformers
  initialises a new model, seeded. Heads keep the target's head_dim and, as near as divisibility
  allows, its query/KV-head ratio; the FFN keeps the target's FFN/width ratio (rounded to a
  multiple of 64).

Output: a normal Hugging Face folder (config.json, model.safetensors, the target's tokenizer and
generation config, copied byte for byte) usable anywhere a draft is, and `dspark_draft.json`: how it
was made (target, method, spec, layers kept, width, seed, parameters) and a `vocab` block.

Reduced draft vocabulary (not yet): such a draft will carry `d2t.safetensors`, EAGLE-3's map (int64
[Vd]: draft id i stands for target id i + d2t[i]), and `"vocab": {"kind": "reduced", "size": Vd,
"d2t": "d2t.safetensors"}`; every draft written here has `{"kind": "target", ...}`. Until the decoder
maps ids, `load_model` refuses a folder holding that file (dspark.models.loading.D2T_FILE).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Literal

from dspark.errors import DsparkError

DRAFT_META = "dspark_draft.json"
SPEC_FORMS = "truncate:N, truncate:I,J,..., every:K or narrow:WIDTHxLAYERS"
# Top-level config lists with one entry per decoder layer (subset with the layers kept).
PER_LAYER_CONFIG_KEYS = ("layer_types", "no_rope_layers")
# Files of the target folder a draft shares verbatim (tokenizer, chat template, generation settings, license).
SHARED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                "generation_config.json", "LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE")
_LAYER_KEY = re.compile(r"^(?P<pre>(?:.+\.)?layers\.)(?P<index>\d+)(?P<post>\..+)$")
_FFN_MULTIPLE = 64


@dataclass(frozen=True)
class DraftInitSpec:
    """What draft to make. truncate: exactly one of `first` (N layers), `layers` (indices), `every`
    (K); narrow: `width` and `first` (its number of fresh layers)."""

    method: Literal["truncate", "narrow"]
    first: int | None = None
    layers: tuple[int, ...] | None = None
    every: int | None = None
    width: int | None = None
    seed: int = 0

    @property
    def text(self) -> str:
        """The spec string `parse_spec` reads back."""
        if self.method == "narrow":
            return f"narrow:{self.width}x{self.first}"
        if self.every is not None:
            return f"every:{self.every}"
        if self.layers is not None:
            return "truncate:" + ",".join(str(i) for i in self.layers) + ("," if len(self.layers) == 1 else "")
        return f"truncate:{self.first}"

    @property
    def slug(self) -> str:
        """Folder-safe form: truncate-4, truncate-0-10-29, every-6, narrow-256x2."""
        return re.sub(r"[^A-Za-z0-9x]+", "-", self.text).strip("-")


def _int(value: str, what: str, spec: str, minimum: int) -> int:
    try:
        n = int(value.strip())
    except ValueError:
        raise DsparkError(f"draft-init spec {spec!r}: {what} {value.strip()!r} is not an integer "
                          f"({SPEC_FORMS})") from None
    if n < minimum:
        raise DsparkError(f"draft-init spec {spec!r}: {what} must be >= {minimum}, got {n}")
    return n


def _parse_layers(value: str, spec: str) -> tuple[int | None, tuple[int, ...] | None]:
    """'4' -> (4, None): the first 4 layers; '0,10,29' or '5,' (one layer) -> (None, indices)."""
    if "," not in value:
        return _int(value, "number of layers", spec, 1), None
    parts = [p for p in value.split(",") if p.strip()]
    if not parts:
        raise DsparkError(f"draft-init spec {spec!r}: no layers given ({SPEC_FORMS})")
    return None, tuple(_int(p, "layer index", spec, 0) for p in parts)


def parse_spec(text: str, seed: int = 0) -> DraftInitSpec:
    """`truncate:4`, `truncate:0,10,20,29`, `every:6`, `narrow:256x2` -> DraftInitSpec."""
    spec = text.strip()
    method, sep, value = spec.partition(":")
    method = method.strip().lower()
    if not sep or not value.strip():
        raise DsparkError(f"draft-init spec {text!r} is not one of {SPEC_FORMS}")
    if method == "truncate":
        first, layers = _parse_layers(value, spec)
        return DraftInitSpec("truncate", first=first, layers=layers, seed=seed)
    if method == "every":
        return DraftInitSpec("truncate", every=_int(value, "K", spec, 1), seed=seed)
    if method == "narrow":
        width, x, n = value.strip().lower().partition("x")
        if not x:
            raise DsparkError(f"draft-init spec {text!r}: narrow needs WIDTHxLAYERS, e.g. narrow:256x2")
        return DraftInitSpec("narrow", width=_int(width, "width", spec, 1), first=_int(n, "number of layers", spec, 1),
                             seed=seed)
    raise DsparkError(f"draft-init method {method!r} is unknown (allowed: truncate, every, narrow; {SPEC_FORMS})")


def spec_from_options(layers: str | None, every: int | None, width: int | None, seed: int = 0) -> DraftInitSpec:
    """The CLI's --layers / --every / --width -> DraftInitSpec (exactly one shape; one-line errors)."""
    if width is not None:
        if every is not None:
            raise DsparkError("--every picks target layers to copy: it does not go with --width (a fresh body)")
        if layers is None or "," in layers:
            raise DsparkError("--width W needs --layers N, the number of fresh layers of the narrow draft")
        return parse_spec(f"narrow:{width}x{layers}", seed)
    if layers is not None and every is not None:
        raise DsparkError("give --layers or --every, not both")
    if layers is not None:
        return parse_spec(f"truncate:{layers}", seed)
    if every is not None:
        return parse_spec(f"every:{every}", seed)
    raise DsparkError("give --layers N (the target's first N layers), --layers I,J,... (these layers), --every K "
                      "(every K-th layer and the last), or --width W --layers N (a narrower fresh body)")


def kept_layers(spec: DraftInitSpec, num_layers: int) -> list[int]:
    """The target layer indices a truncate spec keeps, checked against the target's `num_layers`."""
    if spec.method != "truncate":
        raise DsparkError(f"{spec.text}: not a truncation")
    if spec.every is not None:
        if not 2 <= spec.every < num_layers:
            raise DsparkError(f"every:{spec.every}: K must be in 2..{num_layers - 1} for a target with "
                              f"{num_layers} layers")
        return sorted(set(range(0, num_layers, spec.every)) | {num_layers - 1})
    if spec.layers is not None:
        bad = [i for i in spec.layers if not 0 <= i < num_layers]
        if bad:
            raise DsparkError(f"{spec.text}: layer {bad[0]} does not exist (the target has layers 0..{num_layers - 1})")
        if any(b <= a for a, b in zip(spec.layers, spec.layers[1:])):
            raise DsparkError(f"{spec.text}: list layers in increasing order, each once")
        keep = list(spec.layers)
    else:
        keep = list(range(spec.first or 0))
    if not 1 <= len(keep) < num_layers:
        raise DsparkError(f"{spec.text}: keep between 1 and {num_layers - 1} of the target's {num_layers} layers "
                          "(all of them is the target itself)")
    return keep


def renamed_tensors(names: list[str], keep: list[int], num_layers: int) -> dict[str, str]:
    """target tensor name -> draft tensor name: layer keep[j] becomes layer j, other layers are
    dropped, everything outside the layers (embeddings, final norm, head) is kept as is."""
    found: set[int] = set()
    out: dict[str, str] = {}
    new_index = {old: new for new, old in enumerate(keep)}
    for name in names:
        m = _LAYER_KEY.match(name)
        if m is None:
            out[name] = name
            continue
        i = int(m["index"])
        found.add(i)
        if i in new_index:
            out[name] = f"{m['pre']}{new_index[i]}{m['post']}"
    if found != set(range(num_layers)):
        raise DsparkError(f"cannot find the target's {num_layers} decoder layers as '<prefix>layers.N.' tensors "
                          f"(found {len(found)}): draft-init truncate supports Llama-style checkpoints")
    return out


def truncated_config(config: dict[str, Any], keep: list[int]) -> dict[str, Any]:
    """The target's config.json with `keep` layers (per-layer lists subset to them)."""
    out = dict(config)
    num_layers = int(config["num_hidden_layers"])
    out["num_hidden_layers"] = len(keep)
    for key in PER_LAYER_CONFIG_KEYS:
        value = config.get(key)
        if isinstance(value, list) and len(value) == num_layers:
            out[key] = [value[i] for i in keep]
    return out


def narrow_shape(config: Any, width: int, num_layers: int) -> dict[str, int]:
    """Config values of a narrow body at `width`: the target's head_dim, its query/KV-head ratio as
    near as divisibility allows, its FFN/width ratio rounded to a multiple of 64."""
    hidden, heads = int(config.hidden_size), int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    if not 1 <= width < hidden:
        raise DsparkError(f"--width {width}: a narrow draft is narrower than the target's {hidden} "
                          "(for full width, truncate the target's layers instead)")
    if width % head_dim:
        raise DsparkError(f"--width {width} is not a multiple of the target's head size {head_dim}")
    new_heads = width // head_dim
    # KV heads must divide the query heads: the divisor nearest the target's ratio (the smaller on a tie).
    new_kv = min((d for d in range(1, new_heads + 1) if new_heads % d == 0),
                 key=lambda d: (abs(d - new_heads * kv / heads), d))
    ffn = max(_FFN_MULTIPLE, round(width * int(config.intermediate_size) / hidden / _FFN_MULTIPLE) * _FFN_MULTIPLE)
    return {"hidden_size": width, "num_hidden_layers": num_layers, "num_attention_heads": new_heads,
            "num_key_value_heads": new_kv, "head_dim": head_dim, "intermediate_size": ffn}


def projection_basis(embedding, width: int):
    """[V, H] -> [H, W]: the top-`width` right singular vectors of the embedding (eigenvectors of
    E^T E, largest first), so that E @ basis is the best rank-W embedding (see the module docstring)."""
    import torch

    gram = embedding.double().T @ embedding.double()
    _, vectors = torch.linalg.eigh(gram)  # ascending eigenvalues
    return vectors[:, -width:].flip(1).to(embedding.dtype)


# --- reading the target's files ------------------------------------------------------------------

def _weight_files(folder: Path) -> dict[str, Path]:
    """tensor name -> the safetensors file that holds it (single file or sharded index)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    with safe_open(str(folder / "model.safetensors"), framework="pt") as fh:
        return {name: folder / "model.safetensors" for name in fh.keys()}


def _read_tensors(files: dict[str, Path], names: list[str]) -> dict[str, Any]:
    from safetensors import safe_open

    out: dict[str, Any] = {}
    by_file: dict[Path, list[str]] = {}
    for n in names:
        by_file.setdefault(files[n], []).append(n)
    for file, wanted in by_file.items():
        with safe_open(str(file), framework="pt") as fh:
            for n in wanted:
                out[n] = fh.get_tensor(n)
    return out


def _embedding_names(config) -> tuple[str, str | None]:
    """Names of the input embedding weight and of an untied output head (None when tied), found on
    a weightless (meta) instance of the target's architecture."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = {id(m): n for n, m in model.named_modules()}
    emb = names[id(model.get_input_embeddings())] + ".weight"
    head_module = model.get_output_embeddings()
    tied = head_module is None or head_module.weight is model.get_input_embeddings().weight
    return emb, None if tied else names[id(head_module)] + ".weight"


# --- writing the draft ------------------------------------------------------------------------------

@dataclass(frozen=True)
class DraftInitResult:
    path: Path
    meta: dict[str, Any]
    reused: bool = False

    def summary(self) -> dict[str, Any]:
        return {"path": str(self.path), "reused": self.reused, **self.meta}


def _identity(target_folder: Path, spec: DraftInitSpec) -> dict[str, Any]:
    """What makes two draft-init runs the same draft (an existing folder with it is reused)."""
    return {"target_folder": str(target_folder), "spec": spec.text,
            "seed": spec.seed if spec.method == "narrow" else None}  # a truncation has nothing random


def _copy_shared_files(target: Path, tmp: Path) -> None:
    for name in SHARED_FILES:
        if (target / name).is_file():
            shutil.copyfile(target / name, tmp / name)


def _write_truncated(target: Path, tmp: Path, spec: DraftInitSpec) -> dict[str, Any]:
    from safetensors.torch import save_file

    config = json.loads((target / "config.json").read_text(encoding="utf-8"))
    num_layers = int(config.get("num_hidden_layers") or 0)
    if num_layers < 2:
        raise DsparkError(f"the target has {num_layers} decoder layers in config.json: nothing to truncate")
    keep = kept_layers(spec, num_layers)
    files = _weight_files(target)
    mapping = renamed_tensors(sorted(files), keep, num_layers)
    tensors = _read_tensors(files, list(mapping))
    save_file({mapping[n]: t.contiguous() for n, t in tensors.items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(truncated_config(config, keep), indent=2) + "\n", encoding="utf-8")
    return {"layers": keep, "target_layers": num_layers, "width": config.get("hidden_size"),
            "init": {"embedding": "copied", "body": "copied", "head": "copied"}}


def _write_narrow(target: Path, tmp: Path, spec: DraftInitSpec) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(target), local_files_only=True)
    missing = [k for k in ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers")
               if getattr(config, k, None) is None]
    if missing:
        raise DsparkError(f"draft-init narrow needs a Llama-style config; the target's has no {missing[0]}")
    target_layers = int(config.num_hidden_layers)
    emb_name, head_name = _embedding_names(config)
    files = _weight_files(target)
    source = _read_tensors(files, [n for n in (emb_name, head_name) if n is not None])
    shape = narrow_shape(config, spec.width, spec.first)
    for key, value in shape.items():
        setattr(config, key, value)
    for key in PER_LAYER_CONFIG_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, list) and len(value) == target_layers:
            setattr(config, key, value[: spec.first])
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    embedding = source[emb_name].float()
    basis = projection_basis(embedding, spec.width)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(embedding @ basis)
        if head_name is not None:
            model.get_output_embeddings().weight.copy_(source[head_name].float() @ basis)
    model.save_pretrained(tmp, safe_serialization=True)
    return {"layers": None, "target_layers": target_layers, "width": spec.width, "shape": shape,
            "init": {"embedding": "svd-projection", "body": "random", "head": "tied" if head_name is None
                     else "svd-projection", "seed": spec.seed}}


def _verify(tmp: Path) -> tuple[int, Any]:
    """Load the written folder strictly as a model would be (every weight present, none left over);
    returns (parameters, config)."""
    import torch
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32, local_files_only=True,
                                                       output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        kind, names = next(iter(problems.items()))
        raise DsparkError(f"the draft written to {str(tmp)!r} does not load cleanly ({kind}: "
                          f"{sorted(names)[:3]}): this architecture is not supported by draft-init")
    return sum(p.numel() for p in model.parameters()), model.config


def _place(tmp: Path, out: Path, force: bool, identity: dict[str, Any]) -> bool:
    """Rename the finished `tmp` to `out`; True if an identical draft was already there (kept)."""
    from dspark.io import replace_dir

    if force and out.exists():
        replace_dir(tmp, out)
        return False
    try:
        os.rename(tmp, out)
        return False
    except OSError:
        # Made meanwhile by a concurrent identical run (data-parallel ranks): keep the first one.
        if read_identity(out) == identity:
            shutil.rmtree(tmp, ignore_errors=True)
            return True
        raise


def read_identity(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / DRAFT_META).read_text(encoding="utf-8")).get("identity")
    except (OSError, ValueError, AttributeError):
        return None


def init_draft(target: str, out: str | os.PathLike, spec: DraftInitSpec, force: bool = False,
               reuse: bool = False, log: Callable[[str], None] | None = None) -> DraftInitResult:
    """Make the draft `spec` describes from `target` (a name or folder; a GGUF is converted first)
    into the folder `out`, built aside and renamed into place. An existing `out` is an error unless
    `force` (replaced) or `reuse` and it holds this very draft (kept)."""
    from dspark import __version__
    from dspark.io import atomic_write_json
    from dspark.models.loading import local_folder

    log = log or (lambda _m: None)
    out = Path(out)
    if spec.method == "narrow" and (spec.width is None or spec.first is None):
        raise DsparkError(f"{spec.text}: narrow needs a width and a number of layers")
    if out.exists() and not force and not reuse:
        raise DsparkError(f"--out {str(out)!r} already exists: pass --force to replace it, or another folder")
    r = local_folder(target)
    folder = r.local_path
    identity = _identity(folder, spec)
    if out.exists() and reuse and not force:
        if read_identity(out) == identity:
            meta = json.loads((out / DRAFT_META).read_text(encoding="utf-8"))
            log(f"draft {out} already made from {r.label} ({spec.text}): reused")
            return DraftInitResult(out, meta, reused=True)
        raise DsparkError(f"{str(out)!r} holds another draft than {spec.text} of {r.label}: remove it or choose "
                          "another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        made = (_write_truncated if spec.method == "truncate" else _write_narrow)(folder, tmp, spec)
        _copy_shared_files(folder, tmp)
        parameters, config = _verify(tmp)
        size = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
        meta = {"made_by": "dspark draft-init", "dspark_version": __version__,
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "target": r.name, "target_resolves_to": r.resolves_to, "target_folder": str(folder),
                "method": spec.method, "spec": spec.text, **made, "parameters": parameters, "bytes": size,
                "vocab": {"kind": "target", "size": int(config.vocab_size), "d2t": None},
                "identity": identity}
        atomic_write_json(tmp / DRAFT_META, meta)
        reused = _place(tmp, out, force, identity)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if reused:
        meta = json.loads((out / DRAFT_META).read_text(encoding="utf-8"))
    return DraftInitResult(out, meta, reused=reused)


def init_folder_name(target: str, spec: DraftInitSpec) -> str:
    """`smollm2-135m` + truncate:4 -> `smollm2-135m-truncate-4` (a folder target by its last part)."""
    base = Path(target).name if ("/" in target or os.sep in target) and Path(target).exists() else target
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{base}-{spec.slug}").strip("-.")


def init_drafts(target: str, specs: list[DraftInitSpec], folder: Path,
                log: Callable[[str], None] | None = None) -> list[str]:
    """Make (or reuse, when already made for this target) each spec's draft in `folder`/<name>;
    returns their folders (for `dspark distill --draft-init`)."""
    paths = []
    for spec in specs:
        out = Path(folder) / init_folder_name(target, spec)
        result = init_draft(target, out, spec, reuse=True, log=log)
        if not result.reused and log is not None:
            log(f"draft-init {spec.text}: {out} ({result.meta['parameters']:,} parameters)")
        paths.append(str(out))
    return paths


__all__ = ["DRAFT_META", "DraftInitResult", "DraftInitSpec", "init_draft", "init_drafts", "init_folder_name",
           "kept_layers", "narrow_shape", "parse_spec", "projection_basis", "renamed_tensors", "spec_from_options",
           "truncated_config"]
