"""The stage behind `dspark quantize`: quantize a draft, check it loads, guard its acceptance, and
write the checkpoint plus a candidate spec.

Output folder (built beside OUT and renamed into place, so OUT is complete or absent):

    OUT/config.json, weights, tokenizer   the quantized checkpoint (format: see backends.py)
    OUT/acceptance_head.*                 copied from the source draft when it has one
    OUT/candidate.yaml                    the candidate (`draft: .`), measured sizes, guard result

Order of work: every cheap check first (method, backend installed, source folder, OUT), then the
quantization, a reload of the written checkpoint (a checkpoint that does not load is an error, not a
candidate), then the guard (needs the target: `--target`, or the candidate file's `target`).
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from dspark.config.candidate import (Candidate, Measured, Provenance, load_candidate, resolve_relative,
                                     write_candidate)
from dspark.io import replace_dir
from dspark.errors import DsparkError
from dspark.quantize.backends import (PREFERENCES, QuantRequest, check_method, choose_backend, device_type,
                                      quantization_of)
from dspark.quantize.guard import (DEFAULT_PROMPTS, DEFAULT_THRESHOLD, DEFAULT_TOKENS, AcceptanceEstimate, GuardVerdict,
                                   fit_prompts, guard_verdict, target_continuations, teacher_forced_acceptance)
from dspark.quantize.loading import (MB, count_parameters, load_draft, model_bytes, quiet_quant_libraries,
                                     stored_dtype, weights_on_disk)

CANDIDATE_FILE = "candidate.yaml"
DEFAULT_GUARD_TASK = "code"
DEFAULT_CALIBRATION_SAMPLES = 64
HEAD_FILES = ("acceptance_head.json", "acceptance_head.safetensors")

Log = Callable[[str], None]


@dataclass
class QuantizeOptions:
    method: str
    backend: str | None = None
    calibration: str | None = None
    calibration_samples: int = DEFAULT_CALIBRATION_SAMPLES
    target: str | None = None
    guard: bool = True
    guard_threshold: float = DEFAULT_THRESHOLD
    guard_prompts: int = DEFAULT_PROMPTS
    guard_tokens: int = DEFAULT_TOKENS
    device: str = "auto"
    dtype: str = "auto"
    name: str | None = None
    force: bool = False

    def check(self) -> None:
        check_method(self.method)
        if not 0.0 <= self.guard_threshold <= 1.0:
            raise DsparkError(f"--guard-threshold must be in [0, 1] (an absolute drop in expected acceptance), "
                              f"got {self.guard_threshold}")
        for flag, v in (("--guard-prompts", self.guard_prompts), ("--guard-tokens", self.guard_tokens),
                        ("--calibration-samples", self.calibration_samples)):
            if v < 1:
                raise DsparkError(f"{flag} must be >= 1, got {v}")


@dataclass
class QuantizeResult:
    out: Path
    candidate_file: Path
    candidate: Candidate
    backend: str
    backend_reason: str
    method: str
    device: str
    source: str
    disk_bytes: int
    disk_bytes_before: int
    memory_bytes: int
    memory_bytes_before: int
    verdict: GuardVerdict | None = None
    estimates: dict[str, AcceptanceEstimate] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "out": str(self.out), "candidate": str(self.candidate_file), "name": self.candidate.name,
            "method": self.method, "backend": self.backend, "backend_reason": self.backend_reason,
            "device": self.device, "source": self.source,
            "size_on_disk_mb": self.disk_bytes / MB, "size_on_disk_mb_before": self.disk_bytes_before / MB,
            "memory_mb": self.memory_bytes / MB, "memory_mb_before": self.memory_bytes_before / MB,
            "guard": None if self.verdict is None else {
                "expected_acceptance": self.verdict.after, "expected_acceptance_before": self.verdict.before,
                "drop": self.verdict.drop, "threshold": self.verdict.threshold, "passed": self.verdict.passed,
                "positions": next(iter(self.estimates.values())).positions if self.estimates else None,
                "greedy_agreement": self.estimates["after"].greedy_agreement if self.estimates else None,
                "greedy_agreement_before": self.estimates["before"].greedy_agreement if self.estimates else None,
                "message": self.verdict.message},
            "warnings": list(self.candidate.warnings), "notes": list(self.notes),
        }


def _source(draft: str | None, candidate: str | os.PathLike | None) -> tuple[str, Candidate | None]:
    if (draft is None) == (candidate is None):
        raise DsparkError("give exactly one of --draft D or --candidate FILE")
    if candidate is None:
        return str(draft), None
    spec = load_candidate(candidate)
    if spec.quantization != "none":
        raise DsparkError(f"candidate {spec.name!r} ({candidate}) is already quantized ({spec.quantization}): "
                          "quantize its unquantized source draft instead")
    return resolve_relative(spec.draft, candidate), spec


def _source_folder(name: str) -> Path:
    from dspark.models.loading import _check_folder, not_available_error
    from dspark.models.registry import resolve_model

    r = resolve_model(name)
    if r.local_path is None:
        raise not_available_error(r)
    _check_folder(r.local_path)
    q = quantization_of(r.local_path)
    if q is not None:
        raise DsparkError(f"draft {name!r} is already quantized ({q}): quantize a full-precision checkpoint")
    return r.local_path


def _check_out(out: Path, force: bool) -> Path:
    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise DsparkError(f"--out {str(out)!r} is a file: pass a folder for the quantized checkpoint")
    if out.exists() and any(out.iterdir()) and not force:
        raise DsparkError(f"--out {str(out)!r} already exists and is not empty: pass --force to replace it, "
                          "or another folder")
    return out




def prompt_texts(source: str, split: str, limit: int, tokenizer=None) -> list[str]:
    """Texts from a built-in task name or user data (file, folder, hub id)."""
    from dspark.tasks import TASKS, resolve_prompts

    task, data = (source, None) if source in TASKS else (None, source)
    return [r.render(tokenizer) for r in resolve_prompts(task, data, split, limit)]


def backend_reason(method: str, device: str, chosen: str, requested: str | None) -> str:
    if requested is not None:
        return f"--backend {requested}"
    prefs = PREFERENCES[method].get(device_type(device), ())
    if len(prefs) == 1:
        return f"the only {method} backend on {device_type(device)}"
    return f"first installed of {', '.join(prefs)} for {method} on {device_type(device)}"


def _label(path_or_name: str) -> str:
    p = Path(path_or_name)
    return str(p.resolve()) if p.exists() else path_or_name


def run_guard(target: str, source_model, quantized_model, tokenizer, opts: QuantizeOptions, device: str, dtype: str,
              log: Log) -> tuple[GuardVerdict, dict[str, AcceptanceEstimate], str]:
    """Load the target, write its greedy continuations of held-out prompts, and compare the two
    drafts' teacher-forced expected acceptance. Returns (verdict, estimates by 'before'/'after',
    the prompt source)."""
    from dspark.decode.run import encode, quiet_transformers
    from dspark.decode.verify import common_vocab_size
    from dspark.models import check_tokenizers, load_model

    with quiet_transformers():
        t = load_model(target, device=device, dtype=dtype)
    check_tokenizers(t.tokenizer, tokenizer, t.vocab_size,
                     int(source_model.get_input_embeddings().weight.shape[0])).require_shared_vocab(
        f"the acceptance guard (target {t.name})")
    src = opts.calibration or DEFAULT_GUARD_TASK
    texts = prompt_texts(src, "eval", opts.guard_prompts, t.tokenizer)
    ids = encode(t.tokenizer, texts)
    contexts = [getattr(t.config, "max_position_embeddings", None),
                getattr(source_model.config, "max_position_embeddings", None)]
    context = min(c for c in contexts if c) if any(contexts) else 1 << 20
    ids = fit_prompts(ids, context, opts.guard_tokens)
    log(f"guard: {t.name} continues {len(ids)} held-out prompts ({src}, eval split) by {opts.guard_tokens} tokens")
    conts = target_continuations(t.model, t.tokenizer, ids, opts.guard_tokens)
    seqs = [p + c for p, c in zip(ids, conts)]
    vocab = common_vocab_size(t.vocab_size, int(source_model.get_input_embeddings().weight.shape[0]), len(t.tokenizer))
    est = teacher_forced_acceptance(t.model, {"before": source_model, "after": quantized_model}, seqs,
                                    [len(p) for p in ids], vocab)
    return guard_verdict(est["before"].expected_acceptance, est["after"].expected_acceptance, opts.guard_threshold), \
        est, f"{src} (eval split, {len(ids)} prompts)"


def quantize_draft(out: str | os.PathLike, opts: QuantizeOptions, draft: str | None = None,
                   candidate: str | os.PathLike | None = None, log: Log | None = None) -> QuantizeResult:
    """Quantize `draft` (or the draft of `candidate`) into `out`; see the module docstring."""
    from dspark import __version__
    from dspark.decode.run import quiet_transformers
    from dspark.models import load_model
    from dspark.models.loading import parse_device, parse_dtype

    log = log or (lambda _m: None)
    opts.check()
    source, spec = _source(draft, candidate)
    device = parse_device(opts.device)
    backend = choose_backend(opts.method, device, opts.backend)
    reason = backend_reason(opts.method, device, backend.name, opts.backend)
    folder = _source_folder(source)
    out_path = _check_out(Path(out), opts.force)
    target = opts.target
    notes: list[str] = []
    if target is None and spec is not None and spec.target:
        target = resolve_relative(spec.target, candidate)
        notes.append(f"guard target {spec.target!r} taken from the candidate file")
    # compute dtype: what select and the guard run in; save dtype: what the checkpoint stores for
    # the unquantized parts (by default the source's own, so int8 never grows a bf16 checkpoint)
    dtype_name = str(parse_dtype("auto" if opts.dtype == "auto" else opts.dtype, device)).removeprefix("torch.")
    save_name = (stored_dtype(folder) or dtype_name) if opts.dtype == "auto" else opts.dtype
    save_dtype = parse_dtype(save_name, device)

    calibration_texts = None
    if backend.needs_calibration:
        cal = opts.calibration or DEFAULT_GUARD_TASK
        if opts.calibration is None:
            notes.append(f"no --calibration: calibrating on the built-in {DEFAULT_GUARD_TASK!r} task (train split)")
        calibration_texts = prompt_texts(cal, "train", opts.calibration_samples)
    elif opts.calibration is not None:
        notes.append(f"{opts.method} ({backend.name}) needs no calibration data: --calibration only picks the "
                     "guard's held-out prompts")

    base_name = spec.name if spec is not None else Path(folder).name
    name = opts.name or f"{base_name}-{opts.method}"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.parent / f".{out_path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        log(f"quantizing {source} to {opts.method} with {backend.name} ({reason}) on {device}")
        with quiet_transformers():
            src = load_model(str(folder), device=device, dtype=dtype_name)
        request = QuantRequest(source=Path(folder), out=tmp, method=opts.method, device=device, dtype=save_dtype,
                               calibration=calibration_texts, tokenizer=src.tokenizer)
        with quiet_transformers(), quiet_quant_libraries():
            backend.quantize(request)
        notes += request.notes
        src.tokenizer.save_pretrained(str(tmp))
        for f in HEAD_FILES:
            if (Path(folder) / f).is_file():
                shutil.copyfile(Path(folder) / f, tmp / f)
        if all((tmp / f).is_file() for f in HEAD_FILES):
            notes.append("copied the source draft's acceptance head (it was trained on the unquantized draft's "
                         "hidden states)")
        log("reloading the written checkpoint")
        with quiet_quant_libraries():
            q = load_draft(str(tmp), device=device, dtype=dtype_name)
        disk, disk_before = weights_on_disk(tmp), weights_on_disk(folder)
        mem, mem_before = model_bytes(q.model), model_bytes(src.model)

        verdict, estimates, guard_src = None, {}, None
        if target is not None and opts.guard:
            with quiet_quant_libraries():
                verdict, estimates, guard_src = run_guard(target, src.model, q.model, src.tokenizer, opts, device,
                                                          dtype_name, log)
        elif target is None:
            notes.append("no --target: acceptance guard skipped")
        else:
            notes.append("--no-guard: acceptance guard skipped")

        measured = Measured(size_on_disk_mb=disk / MB, size_on_disk_mb_before=disk_before / MB, memory_mb=mem / MB,
                            memory_mb_before=mem_before / MB, parameters=count_parameters(q.model))
        warnings: list[str] = []
        if verdict is not None:
            measured.expected_acceptance = min(1.0, max(0.0, verdict.after))
            measured.expected_acceptance_before = min(1.0, max(0.0, verdict.before))
            measured.acceptance_drop = verdict.drop
            measured.greedy_agreement = estimates["after"].greedy_agreement
            measured.greedy_agreement_before = estimates["before"].greedy_agreement
            measured.guard_threshold = verdict.threshold
            measured.guard_passed = verdict.passed
            measured.guard_positions = estimates["after"].positions
            if not verdict.passed:
                warnings.append(verdict.message)
        cand = Candidate(
            name=name, target=_label(target) if target is not None else None, draft=".",
            quantization=opts.method, draft_length=spec.draft_length if spec is not None else "auto",
            device=device,
            notes=f"{opts.method} of {_label(source)} by {backend.name} (unquantized parts stored in "
                  f"{str(save_dtype).removeprefix('torch.')})",
            warnings=warnings, measured=measured,
            provenance=Provenance(
                made_by="dspark quantize", created_at=datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
                source_draft=_label(source), target=_label(target) if target is not None else None,
                method=opts.method, backend=backend.name,
                calibration=(opts.calibration or DEFAULT_GUARD_TASK) if backend.needs_calibration else None,
                calibration_samples=len(calibration_texts) if calibration_texts else None,
                dspark_version=__version__,
                extra={**({"guard_prompts": guard_src} if guard_src else {}),
                       **({"unquantized_layers": ", ".join(request.unquantized)} if request.unquantized else {})}))
        write_candidate(tmp / CANDIDATE_FILE, cand,
                        header=f"dspark candidate {name}: {opts.method} ({backend.name}) of {_label(source)}\n"
                               f"score it with: dspark select --candidates {out_path / CANDIDATE_FILE} --target "
                               f"{cand.target or 'T'} --task code")
        replace_dir(tmp, out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return QuantizeResult(out=out_path, candidate_file=out_path / CANDIDATE_FILE, candidate=cand, backend=backend.name,
                          backend_reason=reason, method=opts.method, device=device, source=_label(source),
                          disk_bytes=disk, disk_bytes_before=disk_before, memory_bytes=mem,
                          memory_bytes_before=mem_before, verdict=verdict, estimates=estimates, notes=notes)
