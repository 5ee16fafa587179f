"""`dspark export`: package a (target, draft) pair into a verifiable bundle folder.

The bundle is built in a temporary folder next to OUT and renamed into place at the end, so OUT is
either absent, the previous bundle (until --force replaces it), or complete; never half written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from dspark.bundle import engines
from dspark.bundle.manifest import (DRAFT_DIR, HEAD_DIR, MANIFEST_NAME, README_FILE, SCHEMA_VERSION, SGLANG_FILE,
                                    TARGET_DIR, VLLM_FILE, BundleManifest, DecodingPolicy, DraftInfo, FileEntry,
                                    Metrics, SelectionRef, SelectionSpec, TargetRef, load_selection,
                                    resolve_selection_path)
from dspark.bundle.weights import check_engine_folder, check_weight_keys, model_weight_files, stored_tensors
from dspark.errors import DsparkError
from dspark.io import atomic_write_json, atomic_write_text, atomic_write_yaml, sha256_file, replace_dir

# A bundle is something people copy around; a target above this belongs in its own storage.
MAX_INCLUDED_TARGET_BYTES = 2 * 1024 ** 3
# The fixed K engines get when nothing was measured and the policy is adaptive: the middle of the
# range where small same-family drafts peak in published sweeps (vLLM's examples use 5, SGLang's 3-4).
DEFAULT_ENGINE_K = 4
SELECTION_COPY = "selection.yaml"
# Never copied into a bundle: pickled weights (dspark loads safetensors only).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# Named positional arguments of each draft-length form (dspark.decode.policy.PolicyFactory.args).
POLICY_ARG_NAMES = {"static": ("k",), "confidence": ("threshold", "k_max"), "goodput": ("k_max",),
                    "learned": ("threshold",), "auto": ()}
LIBRARIES = ("torch", "transformers", "tokenizers", "safetensors", "xgrammar", "pydantic")

Log = Callable[[str], None]


@dataclass
class ExportResult:
    path: Path
    manifest: BundleManifest
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        m = self.manifest
        return {"bundle": str(self.path), "name": m.name, "target": m.target.name, "draft": m.draft.name,
                "draft_length": m.policy.draft_length, "num_speculative_tokens": m.policy.num_speculative_tokens,
                "num_speculative_tokens_source": m.policy.num_speculative_tokens_source,
                "target_included": m.target.included, "files": len(m.files),
                "bytes": sum(f.size for f in m.files.values()), "metrics": m.metrics.measured(),
                "notes": list(self.notes)}


def library_versions() -> dict[str, str]:
    """dspark, Python and the libraries a bundle's numbers depend on (without importing them)."""
    from importlib.metadata import PackageNotFoundError, version

    from dspark import __version__

    out = {"dspark": __version__, "python": sys.version.split()[0]}
    for lib in LIBRARIES:
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            pass
    return out


def policy_from_draft_length(draft_length: str | int, metrics: Metrics, has_head: bool) -> DecodingPolicy:
    """The manifest's decoding policy: the draft-length form, its named parameters, and the fixed K
    for engines (measured best K > the static K > DEFAULT_ENGINE_K)."""
    from dspark.decode.policy import (DEFAULT_CONFIDENCE_KMAX, DEFAULT_GOODPUT_KMAX, DEFAULT_LEARNED_THRESHOLD,
                                      PolicyContext, parse_draft_length)

    factory = parse_draft_length(draft_length)
    factory.check(PolicyContext(has_draft=True, has_acceptance_head=has_head))
    names = POLICY_ARG_NAMES.get(factory.kind, ())
    params: dict[str, float | int] = dict(zip(names, factory.args))
    defaults = {"confidence": {"k_max": DEFAULT_CONFIDENCE_KMAX}, "goodput": {"k_max": DEFAULT_GOODPUT_KMAX},
                "learned": {"threshold": DEFAULT_LEARNED_THRESHOLD}}.get(factory.kind, {})
    for k, v in defaults.items():
        params.setdefault(k, v)
    if metrics.best_draft_length is not None:
        k, source = metrics.best_draft_length, "measured"
    elif factory.kind == "static":
        k, source = int(factory.args[0]), "static policy"
    else:
        k, source = DEFAULT_ENGINE_K, "default"
    return DecodingPolicy(draft_length=factory.spec, kind=factory.resolved_kind(
        PolicyContext(has_draft=True, has_acceptance_head=has_head)), params=params,
        num_speculative_tokens=k, num_speculative_tokens_source=source)


def _read_config(folder: Path, what: str) -> dict:
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DsparkError(f"{what} config {str(folder / 'config.json')!r} is unreadable: {e}") from None
    if not isinstance(cfg, dict):
        raise DsparkError(f"{what} config {str(folder / 'config.json')!r} is not a JSON object")
    return cfg


def _vocab_size(cfg: dict) -> int:
    v = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
    if not isinstance(v, int) or v < 1:
        raise DsparkError("model config has no vocab_size")
    return v


def _architecture(cfg: dict) -> str | None:
    archs = cfg.get("architectures")
    return archs[0] if isinstance(archs, list) and archs else None


def _locate(name: str, what: str) -> "object":
    """resolve_model + 'is it here with safetensors weights', as one line when it is not."""
    from dspark.models import resolve_model
    from dspark.models.loading import not_available_error

    r = resolve_model(name)
    if r.local_path is None:
        raise not_available_error(r)
    if not (r.local_path / "config.json").is_file():
        raise DsparkError(f"{what} {name!r} ({r.local_path}) has no config.json: not a Hugging Face model folder")
    # the files the model loads from, so a quantizer's own file (quanto.safetensors) counts too
    if not model_weight_files(r.local_path):
        raise DsparkError(f"{what} {name!r} ({r.local_path}) has no safetensors weights (dspark bundles "
                          "safetensors only; convert pickle .bin weights with save_pretrained(safe_serialization=True))")
    return r


def copy_model_files(src: Path, dst: Path, exclude: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """Copy a model folder's top-level files (symlinks followed, as in a hub snapshot), except
    pickled weights, hidden files and the names in `exclude` (copied elsewhere by the caller).
    Returns (copied names, notes about what was left out)."""
    dst.mkdir(parents=True, exist_ok=False)
    copied, notes = [], []
    for p in sorted(src.iterdir()):
        if p.name.startswith(".") or p.name in exclude:
            continue
        if p.is_dir():
            notes.append(f"left out folder {p.name}/ of {src}")
            continue
        if p.suffix.lower() in PICKLE_SUFFIXES:
            notes.append(f"left out pickled file {p.name} of {src} (safetensors only)")
            continue
        shutil.copyfile(p, dst / p.name)
        copied.append(p.name)
    return copied, notes


def hash_tree(root: Path) -> dict[str, FileEntry]:
    """Every file under root except the manifest -> sha256 and size, keyed by POSIX relative path."""
    out: dict[str, FileEntry] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in sorted(filenames):
            p = Path(dirpath) / fn
            rel = p.relative_to(root).as_posix()
            if rel == MANIFEST_NAME:
                continue
            out[rel] = FileEntry(sha256=sha256_file(p), size=p.stat().st_size)
    return out


def default_bundle_name(target: str, draft: str) -> str:
    base = f"{Path(draft.rstrip('/')).name}-for-{Path(target.rstrip('/')).name}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-") or "dspark-bundle"


def _check_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name):
        raise DsparkError(f"bundle name {name!r} is not allowed: use letters, digits, '.', '_' and '-' "
                          "(it is the model id the server answers to)")
    return name


def _inputs(target, draft, selection, draft_length) -> tuple[str, str, str | int, SelectionSpec | None, Path | None]:
    if selection is not None:
        if target is not None or draft is not None:
            raise DsparkError("give either --selection FILE or --target and --draft, not both")
        sel_path = Path(selection)
        spec = load_selection(sel_path)
        t = resolve_selection_path(spec.target, sel_path)
        d = resolve_selection_path(spec.draft, sel_path)
        return t, d, (draft_length if draft_length is not None else spec.draft_length), spec, sel_path
    missing = [flag for flag, v in (("--target", target), ("--draft", draft)) if v is None]
    if missing:
        raise DsparkError(f"missing {' and '.join(missing)}: give --target T --draft D, or --selection FILE "
                          "(the selected.yaml written by `dspark select`)")
    return str(target), str(draft), (draft_length if draft_length is not None else "auto"), None, None


def export_bundle(out: str | os.PathLike, *, target: str | None = None, draft: str | None = None,
                  selection: str | os.PathLike | None = None, include_target: bool = False,
                  draft_length: str | int | None = None, name: str | None = None, force: bool = False,
                  max_included_target_bytes: int = MAX_INCLUDED_TARGET_BYTES, log: Log | None = None) -> ExportResult:
    """Write the bundle for (target, draft) (or for the pair a selection file names) to `out`."""
    log = log or (lambda _msg: None)
    t_name, d_name, dl, spec, sel_path = _inputs(target, draft, selection, draft_length)
    from dspark.decode.policy import parse_draft_length

    parse_draft_length(dl)  # a malformed --draft-length fails before any model file is read
    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise DsparkError(f"--out {str(out)!r} is a file: pass a folder path for the bundle")
    if out.exists() and any(out.iterdir()) and not force:
        raise DsparkError(f"--out {str(out)!r} already exists: pass --force to replace it, or another folder")
    bundle_name = _check_name(name or (spec.name if spec and spec.name else default_bundle_name(t_name, d_name)))

    from dspark.decode.acceptance_head import HEAD_FILES, has_acceptance_head
    from dspark.distill.collect import safetensors_hash
    from dspark.models import check_tokenizers, load_tokenizer, tokenizer_hash
    from dspark.quantize.backends import quantization_of
    from dspark.quantize.loading import draft_tokenizer

    rt = _locate(t_name, "target")
    rd = _locate(d_name, "draft")
    t_dir, d_dir = rt.local_path, rd.local_path
    if t_dir.resolve() == d_dir.resolve():
        raise DsparkError(f"target and draft are the same model ({t_dir}): a draft must be a different model")
    t_cfg, d_cfg = _read_config(t_dir, "target"), _read_config(d_dir, "draft")

    log(f"checking tokenizers of {t_name} and {d_name}")
    t_tok, d_tok = load_tokenizer(t_name), draft_tokenizer(str(d_dir))  # a quantized draft's folder too
    compat = check_tokenizers(t_tok, d_tok, _vocab_size(t_cfg), _vocab_size(d_cfg))
    if not compat.compatible:
        from dspark.decode.tokenmap import tokenizer_kind

        tokenizer_kind(d_tok)  # a draft tokenizer cross-tokenizer decoding cannot use is refused here
        tokenizer_kind(t_tok)
        log(f"{compat.message}: the bundle ships the draft's own tokenizer and is decoded cross-tokenizer")

    log(f"checking weight names of {d_name}")
    d_keys = check_weight_keys(d_dir, f"draft {d_name!r}")
    notes: list[str] = []
    # an acceptance head predicts same-tokenizer acceptance: a cross-tokenizer pair does not use it
    has_head = has_acceptance_head(d_dir) and compat.compatible
    if has_acceptance_head(d_dir) and not has_head:
        notes.append("left out the draft's acceptance head: it predicts same-tokenizer acceptance, and this "
                     "pair is decoded cross-tokenizer")
    metrics = spec.metrics if spec else Metrics()
    policy = policy_from_draft_length(dl, metrics, has_head)

    included_bytes = 0
    if include_target:
        included_bytes = sum(f.stat().st_size for f in model_weight_files(t_dir))
        if included_bytes > max_included_target_bytes:
            raise DsparkError(f"--include-target is for small targets: {t_name!r} has "
                              f"{included_bytes / 1024 ** 3:.2f} GiB of weights (limit "
                              f"{max_included_target_bytes / 1024 ** 3:.2f} GiB); leave it out, the bundle "
                              "references it by name and hash")
        check_weight_keys(t_dir, f"target {t_name!r}")

    quant = spec.quantization if spec else "none"
    qcfg = d_cfg.get("quantization_config")
    if quant == "none" and isinstance(qcfg, dict):
        quant = str(qcfg.get("quant_method", "unknown"))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        log(f"copying the draft from {d_dir}")
        # draft/ stays exactly a model folder an engine loads: the head goes to its own folder
        _, n = copy_model_files(d_dir, tmp / DRAFT_DIR, exclude=HEAD_FILES)
        notes += n
        check_engine_folder(tmp / DRAFT_DIR, f"draft folder {str(d_dir)!r}")
        if has_head:
            (tmp / HEAD_DIR).mkdir()
            for fn in HEAD_FILES:
                shutil.copyfile(d_dir / fn, tmp / HEAD_DIR / fn)
        if include_target:
            log(f"copying the target from {t_dir} ({included_bytes / 1024 ** 2:.1f} MiB of weights)")
            _, n = copy_model_files(t_dir, tmp / TARGET_DIR)
            notes += n
        revision = t_dir.name if t_dir.parent.name == "snapshots" else None
        log("fingerprinting the weights")
        d_files = model_weight_files(tmp / DRAFT_DIR)
        d_params = sum(_numel(s) for s in stored_tensors(d_files).values())
        target_ref = TargetRef(
            name=t_name, kind=rt.kind, resolves_to=rt.resolves_to, revision=revision,
            weight_sha256=None if revision else safetensors_hash(t_dir), tokenizer_sha256=tokenizer_hash(t_tok),
            vocab_size=_vocab_size(t_cfg), context_length=t_cfg.get("max_position_embeddings"),
            architecture=_architecture(t_cfg), included=include_target)
        draft_info = DraftInfo(
            name=d_name, source=str(d_dir), architecture=_architecture(d_cfg), parameters=d_params,
            vocab_size=_vocab_size(d_cfg), context_length=d_cfg.get("max_position_embeddings"),
            tokenizer_sha256=tokenizer_hash(d_tok), weight_sha256=safetensors_hash(tmp / DRAFT_DIR),
            weight_files=[f.name for f in d_files], acceptance_head=has_head, quantization=quant,
            quantization_format=quantization_of(d_dir), tokenizer=compat.mode.value)
        sel_ref = None
        if spec is not None and sel_path is not None:
            shutil.copyfile(sel_path, tmp / SELECTION_COPY)
            sel_ref = SelectionRef(file=SELECTION_COPY, sha256=sha256_file(sel_path), candidate=spec.name,
                                   warnings=list(spec.warnings))
        manifest = BundleManifest(
            schema_version=SCHEMA_VERSION, name=bundle_name,
            created_at=datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
            target=target_ref, draft=draft_info, policy=policy, metrics=metrics, selection=sel_ref,
            versions=library_versions(), files={})
        refused = engines.engine_refusals(manifest)
        if VLLM_FILE not in refused:
            atomic_write_json(tmp / VLLM_FILE, engines.vllm_config(manifest))
        if SGLANG_FILE not in refused:
            atomic_write_text(tmp / SGLANG_FILE, engines.sglang_script(manifest))
        notes += [f"no {name}: {why}" for name, why in refused.items()]
        atomic_write_text(tmp / README_FILE, engines.model_card(manifest))
        _make_shareable(tmp)
        log("hashing the bundle's files")
        manifest.files = hash_tree(tmp)
        body = manifest.model_dump(mode="json")
        body["metrics"] = manifest.metrics.model_dump(mode="json", exclude_none=True)
        atomic_write_yaml(tmp / MANIFEST_NAME, body,
                          header=f"dspark bundle {bundle_name}: target {t_name}, draft {d_name}\n"
                                 "check it with: dspark verify-bundle <this folder>")
        _make_shareable(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out}")
    notes += [] if d_keys.checked else [f"draft weight names not checked: {d_keys.reason}"]
    return ExportResult(out, manifest, notes)


def _make_shareable(root: Path) -> None:
    """Atomic writes create 0600 temp files; a bundle is meant to be read by others (and sglang.sh run)."""
    for dirpath, _dirs, files in os.walk(root):
        os.chmod(dirpath, 0o755)
        for fn in files:
            p = Path(dirpath) / fn
            os.chmod(p, 0o755 if p.name == SGLANG_FILE else 0o644)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


