"""`dspark distill`: collect the target's logits (unless a cache is given), then train each draft
toward the target, measure it before and after, and write a checkpoint folder and a candidate spec
per draft.

Order of work (bad input fails before anything expensive):
1. options (objective, steps/epochs, lr, LoRA rank, on-policy fraction, DeepSpeed config);
2. whether the target and every draft exist on this machine (`llama3-70b` offline fails here);
3. the task / data source, and the tokenizers (target vs each draft: the same vocabulary, or another one
   whose tokens are byte strings: that draft is distilled cross-tokenizer, `dspark.distill.cross`);
4. the cache: `--cache` is opened and checked against the target (weights, tokenizer), or a new one
   is collected into OUT/cache on the task's TRAIN split (resumable, like `dspark collect`);
5. per draft: decoder baseline on the task's EVAL split, training (resumable from
   OUT/checkpoints/<name>), decoder measurement after, OUT/drafts/<name>/ (HF folder: safetensors,
   tokenizer, config, acceptance head, dspark_distill.json) and OUT/candidates/<name>.yaml.
A draft whose outputs already exist for the same run is not trained again. OUT/distill.json holds the
summary `--json` prints.

Scale-out (torchrun / accelerate data parallel, DeepSpeed, multi-node commands): see
`dspark.distill.parallel`.

Held-out data, two kinds: the cache's held-out rows (a salted hash of the prompt id,
`--heldout-percent`) for the expected acceptance during training, and the task's eval split (disjoint
from the train split the cache is collected on) for the decoder measurements.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from dspark.errors import DataError, DsparkError

DEFAULT_EVAL_PROMPTS = 16
DEFAULT_EVAL_MAX_NEW_TOKENS = 64
DEFAULT_EVAL_K = 4
SUMMARY_FILE = "distill.json"
DEFAULT_LORA_RANK = 16
DEFAULT_ON_POLICY = 0.5
DISTILL_META = "dspark_distill.json"


@dataclass(frozen=True)
class EvalSettings:
    """How the real decoder measures a draft: greedy, static K, on `prompts` eval-split prompts."""

    prompts: int = DEFAULT_EVAL_PROMPTS
    max_new_tokens: int = DEFAULT_EVAL_MAX_NEW_TOKENS
    k: int = DEFAULT_EVAL_K
    enabled: bool = True

    def check(self) -> "EvalSettings":
        if self.prompts < 1 or self.max_new_tokens < 1 or self.k < 1:
            raise DsparkError(f"decoder measurement needs eval prompts, eval max new tokens and K >= 1, got "
                              f"{self.prompts}, {self.max_new_tokens}, {self.k}")
        return self


@dataclass(frozen=True)
class CollectSettings:
    """How the cache is collected when `--cache` is not given (see `dspark collect`)."""

    num_prompts: int | None = None
    max_new_tokens: int = 128
    k: int = 64
    temperature: float = 0.0
    batch_size: int = 8
    seed: int = 0


@dataclass
class _Run:
    """What every draft of one `run_distill` call shares."""

    out: Path
    target: Any  # CollectTarget: model, tokenizer, identity
    cache: Any  # LogitsCache
    cache_hash: str
    cfg: Any  # TrainConfig
    evaluation: EvalSettings
    eval_ids: list[list[int]]
    stop_ids: tuple[int, ...]
    dist: Any  # parallel.DistContext | None
    device: str
    ds_config: dict[str, Any] | None
    cross_token_weight: float
    console: Any
    show_progress: bool
    log: Callable[[str], None]
    source_name: str | None

    @property
    def main(self) -> bool:
        return self.dist is None or self.dist.is_main


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def draft_label(name: str) -> str:
    """Folder-safe name of a draft: a built-in / alias name as is, a folder by its last part, a hub
    id with '/' -> '--'."""
    p = Path(name)
    label = p.name if (p.exists() or name.startswith(("/", ".", "~"))) else name.replace("/", "--")
    label = _SAFE.sub("-", label).strip("-.")
    return label or "draft"


def _check_available(name: str, role: str) -> None:
    from dspark.distill.collect import check_target_available

    try:
        check_target_available(name)
    except DsparkError as e:
        raise type(e)(f"{role}: {e}") from None


def _source_from_cache(cache_path: str | Path):
    from dspark.distill.cache import read_manifest
    from dspark.tasks import resolve_source

    m = read_manifest(cache_path)
    if m.source.task is None and m.source.data is None:
        raise DsparkError(f"give --task or --data: the cache {str(cache_path)!r} does not record its source")
    return resolve_source(m.source.task, m.source.data), m.source.task, m.source.data


def _rich_train_progress(console, label: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                    TextColumn("loss {task.fields[loss]}"), TextColumn("held-out acc {task.fields[acc]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)
    state: dict[str, Any] = {}

    def update(step: int, total: int, info: dict[str, Any]) -> None:
        loss, acc = info.get("loss"), info.get("expected_acceptance")
        fields = {"loss": "-" if loss is None else f"{loss:.4f}", "acc": "-" if acc is None else f"{acc:.4f}"}
        if "task" not in state:
            state["task"] = prog.add_task(f"distill {label}", total=total, completed=step, **fields)
        else:
            prog.update(state["task"], completed=step, **fields)

    return prog, update


def save_draft_folder(model, tokenizer, out: Path, meta: dict[str, Any], head=None) -> Path:
    """Write the HF folder (safetensors weights, config, tokenizer, optional acceptance head, meta)
    into a temp sibling and rename it into place."""
    from dspark.decode.acceptance_head import save_acceptance_head
    from dspark.io import atomic_write_json

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if head is not None:
        save_acceptance_head(head, tmp)
    atomic_write_json(tmp / DISTILL_META, meta)
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
    return out


def write_candidate(path: Path, data: dict[str, Any]) -> Path:
    """Validate `data` with the strict candidate schema (`dspark.config.candidate`) and write it
    atomically."""
    from dspark.config.candidate import parse_candidate, write_candidate as write_spec

    header = ("dspark candidate written by `dspark distill`: the distilled draft, how to run it, the numbers\n"
              "measured at distillation time (before = the undistilled draft) and where it came from")
    return write_spec(path, parse_candidate(data, where=str(path)), header=header)


def _decoder_metrics(target_model, draft_model, tokenizer, prompts, ev: EvalSettings, stop_ids,
                     draft_tokenizer=None) -> dict[str, Any]:
    from dspark.distill.evaluate import measure_decoder

    return measure_decoder(target_model, draft_model, tokenizer, prompts, k=ev.k, max_new_tokens=ev.max_new_tokens,
                           stop_token_ids=stop_ids, draft_tokenizer=draft_tokenizer)


def _check_draft_tokenizer(target_tok, name: str, cfg) -> bool:
    """True when draft `name` has another tokenizer (distilled cross-tokenizer); raises a one-line error
    when its tokens are not byte strings or the training settings need a shared tokenizer."""
    from dspark.decode.tokenmap import tokenizer_kind
    from dspark.distill.cross import check_cross_config
    from dspark.models import check_tokenizers, load_tokenizer

    draft_tok = load_tokenizer(name)
    if check_tokenizers(target_tok, draft_tok).compatible:
        return False
    try:
        tokenizer_kind(target_tok)
        tokenizer_kind(draft_tok)
        check_cross_config(cfg)
    except DsparkError as e:
        raise type(e)(f"draft {name!r} has another tokenizer than the target (distilled cross-tokenizer): "
                      f"{e}") from None
    return True


def run_distill(target: str, drafts: Sequence[str], out: str | Path, *, task: str | None = None,
                data: str | None = None, cache: str | Path | None = None, train=None,
                collect: CollectSettings = CollectSettings(), evaluation: EvalSettings = EvalSettings(),
                device: str = "auto", dtype: str = "auto", deepspeed: str | Path | None = None,
                console=None, show_progress: bool = True, draft_init: Sequence[str] = (),
                cross_token_weight: float | None = None,
                log: Callable[[str], None] | None = None) -> dict[str, Any] | None:
    """Everything `dspark distill` does (see the module docstring); returns the summary (None on
    data-parallel ranks other than 0). `draft_init`: specs of drafts made from the target first
    (dspark.models.draft_init, into OUT/init/), distilled after the `drafts` given.
    `cross_token_weight`: weight of the token-level term for drafts with another tokenizer (default
    `cross.DEFAULT_TOKEN_WEIGHT`)."""
    from dspark.distill import parallel
    from dspark.distill.cache import LogitsCache, manifest_hash
    from dspark.distill.collect import encode_prompts, load_target, validate_args
    from dspark.distill.cross import DEFAULT_TOKEN_WEIGHT
    from dspark.distill.train import TrainConfig, validate_config
    from dspark.io import atomic_write_json, check_out_folder
    from dspark.models import load_tokenizer
    from dspark.models.draft_init import init_drafts, init_folder_name, parse_spec
    from dspark.tasks import resolve_source, source_prompts

    log = log or (lambda _m: None)
    t_start = time.perf_counter()
    # 1. options
    check_out_folder(out, "the run (cache/, drafts/, candidates/)")
    cfg = validate_config(train if train is not None else TrainConfig())
    evaluation.check()
    cross_token_weight = DEFAULT_TOKEN_WEIGHT if cross_token_weight is None else float(cross_token_weight)
    if not cross_token_weight >= 0:
        raise DsparkError(f"--cross-token-weight must be a number >= 0, got {cross_token_weight}")
    init_specs = [parse_spec(s, seed=cfg.seed) for s in draft_init]
    if not drafts and not init_specs:
        raise DsparkError("give at least one --draft or --draft-init")
    labels = [draft_label(d) for d in drafts] + [init_folder_name(target, s) for s in init_specs]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise DsparkError(f"--draft names must be distinct, {dup[0]!r} is given twice")
    if cache is None:
        validate_args(k=collect.k, max_new_tokens=collect.max_new_tokens, temperature=collect.temperature,
                      batch_size=collect.batch_size, shard=None, engine="hf")
    ds_config = parallel.load_deepspeed_config(deepspeed)
    if ds_config is not None:  # a batch setting that contradicts the run fails here, not after the baseline
        parallel.deepspeed_settings(ds_config, cfg.batch_size, max(1, parallel.world_size_from_env()), cfg.grad_clip)
    # 2. models exist here (drafts made from the target are made now)
    _check_available(target, "target")
    drafts = [*drafts, *init_drafts(target, init_specs, Path(out) / "init", log=log)]
    for d in drafts:
        _check_available(d, "draft")
    # 3. source and tokenizers
    if task is None and data is None and cache is not None:
        source, task, data = _source_from_cache(cache)
    else:
        source = resolve_source(task, data)
    target_tok = load_tokenizer(target)
    for d in drafts:
        _check_draft_tokenizer(target_tok, d, cfg)

    dist = parallel.init_distributed(device, single_process_group=ds_config is not None)
    main = dist is None or dist.is_main
    device = parallel.rank_device(dist, device)
    out = Path(out)
    try:
        # 4. the cache
        tgt = load_target(target, device=device, dtype=dtype)
        tokenizer = tgt.tokenizer
        if cache is None:
            cache_dir = out / "cache"
            failure = None
            try:
                if main:
                    _collect_into(cache_dir, tgt, source, task, data, collect, console, show_progress, log)
            except DsparkError as e:  # the other ranks wait in the barrier below: tell them
                failure = e
            message = parallel.broadcast_object(dist, None if failure is None else str(failure))
            if failure is not None:
                raise failure
            if message is not None:
                raise DsparkError(f"rank 0 failed: {message}")
            parallel.barrier(dist)
        else:
            cache_dir = Path(cache)
        lc = LogitsCache(cache_dir)
        ident = tgt.identity
        lc.check_compatible(target_name=ident.name, tokenizer_hash=tgt.tokenizer_hash,
                            weight_hash=ident.weight_hash, revision=ident.revision)
        if lc.manifest.target.vocab_size != ident.vocab_size:
            raise DataError(f"logits cache {str(cache_dir)!r} was made by a target with {lc.manifest.target.vocab_size} "
                            f"vocabulary rows, {target!r} has {ident.vocab_size}")
        cache_hash = manifest_hash(cache_dir)
        stop_ids = tuple(lc.manifest.generation.stop_token_ids)

        # decoder prompts: the task's eval split
        eval_ids: list[list[int]] = []
        if evaluation.enabled and main:
            recs = source_prompts(source, "eval", evaluation.prompts)
            eval_ids = [list(p.ids) for p in encode_prompts(recs, tokenizer)]

        run = _Run(out=out, target=tgt, cache=lc, cache_hash=cache_hash, cfg=cfg, evaluation=evaluation,
                   eval_ids=eval_ids, stop_ids=stop_ids, dist=dist, device=device, ds_config=ds_config,
                   cross_token_weight=cross_token_weight, console=console, show_progress=show_progress, log=log,
                   source_name=task or data)
        results = []
        for name, label in zip(drafts, labels):
            results.append(_distill_one(run, name, label))
            parallel.barrier(dist)
        summary = {"target": target, "target_identity": ident.model_dump(), "cache": str(cache_dir),
                   "cache_manifest_sha256": cache_hash, "objective": cfg.identity()["objective"],
                   "task": task, "data": data, "world_size": dist.world_size if dist else 1,
                   "seconds": round(time.perf_counter() - t_start, 2), "drafts": results}
        if not main:
            return None
        atomic_write_json(out / SUMMARY_FILE, summary)
        return summary
    finally:
        parallel.shutdown(dist)


def _collect_into(cache_dir: Path, tgt, source, task, data, collect: CollectSettings, console, show_progress: bool,
                  log: Callable[[str], None]) -> None:
    """Collect (or resume, or find complete) the cache on the source's TRAIN split, like `dspark collect`."""
    from dspark.distill.collect import RichProgress, collect as collect_cache
    from dspark.tasks import source_prompts

    prompts = source_prompts(source, "train", collect.num_prompts)
    kwargs = dict(k=collect.k, max_new_tokens=collect.max_new_tokens, temperature=collect.temperature,
                  seed=collect.seed, batch_size=collect.batch_size, task=task,
                  data=str(Path(data).resolve()) if data is not None and Path(data).exists() else data,
                  source_description=source.describe_source(), split="train", num_prompts=collect.num_prompts,
                  log=log)
    if show_progress:
        with RichProgress(console=console, description=f"collect {tgt.identity.name}") as bar:
            res = collect_cache(tgt, prompts, cache_dir, progress=bar, **kwargs)
    else:
        res = collect_cache(tgt, prompts, cache_dir, **kwargs)
    counts = res.manifest.counts
    log(f"cache {cache_dir}: {res.status}, {counts.rows if counts else 0} prompts, "
        f"{counts.positions if counts else 0:,} positions")


def _run_identity(tgt, cache_hash: str, resolved_draft: str, draft_hash: str | None) -> dict[str, Any]:
    return {"target": tgt.identity.model_dump(), "cache_manifest_sha256": cache_hash,
            "draft": {"resolves_to": resolved_draft, "weight_hash": draft_hash}}


def _distill_one(run: _Run, name: str, label: str) -> dict[str, Any]:
    """Measure, train, measure, export one draft (or return the summary of an earlier identical run)."""
    import json

    import torch

    from dspark.decode.factory import CROSS_TOKENIZER as CROSS_MODE, SAME_TOKENIZER as SAME_MODE
    from dspark.decode.verify import common_vocab_size
    from dspark.distill.collect import safetensors_hash
    from dspark.distill.cross import CrossDistill, vocab_bridge
    from dspark.distill.train import train_draft
    from dspark.io import atomic_write_json
    from dspark.models import check_tokenizers, load_model, resolve_model

    out, tgt, lc, cache_hash, cfg, evaluation = run.out, run.target, run.cache, run.cache_hash, run.cfg, run.evaluation
    eval_ids, stop_ids, dist, device, log, main = run.eval_ids, run.stop_ids, run.dist, run.device, run.log, run.main
    r = resolve_model(name)
    draft_hash = safetensors_hash(r.local_path) if r.local_path is not None else None
    run_identity = _run_identity(tgt, cache_hash, r.resolves_to, draft_hash)
    is_cross = _check_draft_tokenizer(tgt.tokenizer, name, cfg)
    if is_cross:
        run_identity["cross"] = {"mode": CROSS_MODE, "token_weight": run.cross_token_weight}
    full_identity = {"run": run_identity, "config": cfg.identity(), "evaluation": evaluation.__dict__}
    draft_dir = out / "drafts" / label
    cand_path = out / "candidates" / f"{label}.yaml"
    ck_dir = out / "checkpoints" / label

    meta_path = draft_dir / DISTILL_META
    if meta_path.is_file() and cand_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("identity") == json.loads(json.dumps(full_identity)):
            log(f"{label}: already distilled in {draft_dir} (same run), nothing to do")
            return meta["summary"]
        raise DataError(f"{str(draft_dir)!r} holds a draft distilled with other settings: choose another --out "
                        "or delete it")

    loaded = load_model(name, device=device, dtype="float32")
    cross = draft_tok = None
    if is_cross:
        draft_tok = loaded.tokenizer
        vocab = common_vocab_size(loaded.vocab_size, None, len(draft_tok))
        pad_id = int(draft_tok.pad_token_id if draft_tok.pad_token_id is not None else 0)
        cross = CrossDistill(vocab_bridge(tgt.tokenizer, draft_tok, tgt.identity.vocab_size, vocab),
                             run.cross_token_weight, pad_id=pad_id)
        log(f"{label}: another tokenizer ({len(draft_tok)} tokens vs the target's {len(tgt.tokenizer)}): distilled "
            f"cross-tokenizer; {cross.bridge.size} byte strings are tokens of both")
    else:
        check_tokenizers(tgt.tokenizer, loaded.tokenizer, tgt.identity.vocab_size,
                         loaded.vocab_size).require_shared_vocab(f"distilling draft {name!r}")
        vocab = common_vocab_size(tgt.identity.vocab_size, loaded.vocab_size, len(tgt.tokenizer))
        pad_id = int(tgt.tokenizer.pad_token_id if tgt.tokenizer.pad_token_id is not None else 0)
    target_model = tgt.model

    before_path = ck_dir / "decoder_before.json"
    before_dec = None
    if evaluation.enabled and main:
        if before_path.is_file():
            saved = json.loads(before_path.read_text(encoding="utf-8"))
            if saved.get("identity") == json.loads(json.dumps(full_identity)):
                before_dec = saved["metrics"]
        if before_dec is None:
            log(f"{label}: measuring the undistilled draft with the decoder ({len(eval_ids)} eval prompts, "
                f"K={evaluation.k}, {evaluation.max_new_tokens} tokens)")
            before_dec = _decoder_metrics(target_model, loaded.model, tgt.tokenizer, eval_ids, evaluation, stop_ids,
                                          draft_tok)
            atomic_write_json(before_path, {"identity": full_identity, "metrics": before_dec})

    if run.show_progress and main:
        prog, update = _rich_train_progress(run.console, label)
        with prog:
            result = train_draft(loaded.model, lc, cfg, ck_dir, vocab_size=vocab, pad_id=pad_id,
                                 target_model=target_model, stop_token_ids=stop_ids, run_identity=run_identity,
                                 dist=dist, deepspeed_config=run.ds_config, progress=update, log=log, cross=cross)
    else:
        result = train_draft(loaded.model, lc, cfg, ck_dir, vocab_size=vocab, pad_id=pad_id,
                             target_model=target_model, stop_token_ids=stop_ids, run_identity=run_identity,
                             dist=dist, deepspeed_config=run.ds_config, log=log, cross=cross)
    if not main:
        return {"name": label}

    after_dec = None
    if evaluation.enabled:
        after_dec = _decoder_metrics(target_model, result.model, tgt.tokenizer, eval_ids, evaluation, stop_ids,
                                     draft_tok)
    metrics = {"heldout_before": result.heldout_before, "heldout_after": result.heldout_after,
               "decoder_before": before_dec, "decoder_after": after_dec}
    if before_dec and after_dec and before_dec["mean_accepted_tokens"] > 0:
        metrics["mean_accepted_tokens_ratio"] = after_dec["mean_accepted_tokens"] / before_dec["mean_accepted_tokens"]
    provenance = {"target": tgt.identity.name, "target_resolves_to": tgt.identity.resolves_to,
                  "target_weight_hash": tgt.identity.weight_hash, "cache": str(lc.path),
                  "cache_manifest_sha256": cache_hash, "draft_base": name, "draft_base_weight_hash":
                  run_identity["draft"]["weight_hash"], "objective": cfg.identity()["objective"],
                  "steps": result.steps, "lr": cfg.learning_rate, "batch_size": cfg.batch_size,
                  "lora_rank": cfg.lora_rank, "on_policy": cfg.on_policy, "acceptance_head": cfg.acceptance_head,
                  "onpolicy_steps": result.onpolicy_steps, "positions_seen": result.positions_seen,
                  "world_size": dist.world_size if dist else 1,
                  "deepspeed_zero_stage": (run.ds_config.get("zero_optimization") or {}).get("stage", 0)
                  if run.ds_config is not None else None, "train_seconds": round(result.seconds, 2),
                  "weights_sha256": result.weights_sha256,
                  "decoder_mode": CROSS_MODE if is_cross else SAME_MODE}
    if cross is not None:
        provenance.update(cross_token_weight=cross.token_weight, intersection_size=cross.bridge.size)
    summary = {"name": label, "path": str(draft_dir), "candidate": str(cand_path), "metrics": metrics,
               "provenance": provenance, "resumed_from": result.resumed_from}
    meta = {"identity": full_identity, "summary": summary, "history": result.history}
    result.model.to(torch.float32)
    # a cross-tokenizer draft keeps its own tokenizer: the decoder re-tokenizes through it
    save_draft_folder(result.model, draft_tok if is_cross else tgt.tokenizer, draft_dir, meta, head=result.head)
    policy = "learned" if result.head is not None else "auto"
    cand = {"name": label, "target": tgt.identity.name, "draft": f"../drafts/{label}",
            "quantization": "none", "draft_length": policy, "device": device, "dtype": "float32",
            "notes": f"distilled from {name} toward {tgt.identity.name} with {provenance['objective']}, "
                     f"{result.steps} steps" + (f", LoRA rank {cfg.lora_rank} (merged)" if cfg.lora_rank else ""),
            "measured": _measured_block(metrics, task=run.source_name),
            "provenance": _provenance_block(provenance, name)}
    write_candidate(cand_path, cand)
    # The outputs now stand for the run; the training state is no longer needed.
    shutil.rmtree(ck_dir, ignore_errors=True)
    if after_dec:
        log(f"{label}: mean accepted tokens {before_dec['mean_accepted_tokens']:.3f} -> "
            f"{after_dec['mean_accepted_tokens']:.3f} (K={evaluation.k}); held-out expected acceptance "
            f"{result.heldout_before.get('expected_acceptance', float('nan')):.4f} -> "
            f"{result.heldout_after.get('expected_acceptance', float('nan')):.4f}"
            + (f" (intersection: {result.heldout_after.get('intersection_mass', float('nan')):.3f} of the target's "
               "mass at aligned positions)" if is_cross else ""))
    return summary


def _measured_block(metrics: dict[str, Any], task: str | None) -> dict[str, Any]:
    """The candidate's `measured` block: held-out acceptance / greedy agreement (cache held-out rows)
    and the decoder's mean accepted tokens, after training and `_before` it."""
    hb, ha = metrics.get("heldout_before") or {}, metrics.get("heldout_after") or {}
    db, da = metrics.get("decoder_before") or {}, metrics.get("decoder_after") or {}
    out = {"expected_acceptance": ha.get("expected_acceptance"), "expected_acceptance_before": hb.get("expected_acceptance"),
           "greedy_agreement": ha.get("greedy_match"), "greedy_agreement_before": hb.get("greedy_match"),
           "mean_accepted_tokens": da.get("mean_accepted_tokens"),
           "mean_accepted_tokens_before": db.get("mean_accepted_tokens"),
           "acceptance_rate": da.get("acceptance_rate"), "prompts": da.get("prompts"), "task": task}
    return {k: v for k, v in out.items() if v is not None}


def _provenance_block(p: dict[str, Any], source: str) -> dict[str, Any]:
    """The candidate's `provenance` block: the schema's fields, the rest as scalars in `extra`."""
    from datetime import datetime, timezone

    from dspark import __version__

    named = {"made_by": "dspark distill", "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "source_draft": source, "target": p["target"],
             "method": "distill-lora" if p.get("lora_rank") else "distill-full", "objective": p["objective"],
             "steps": p["steps"], "cache_manifest_sha256": p["cache_manifest_sha256"], "dspark_version": __version__}
    taken = {"target", "objective", "steps", "cache_manifest_sha256", "draft_base"}
    extra = {k: v for k, v in p.items() if k not in taken and (v is None or isinstance(v, (str, int, float, bool)))}
    return {**named, "extra": extra}


def parse_optional_value_flags(args: Sequence[str]) -> tuple[int | None, float | None]:
    """The CLI's `--lora [RANK]` and `--on-policy [LAMBDA]` (options whose value may be left out),
    from the arguments the option parser did not consume. Returns (lora rank or None, on-policy
    fraction or None); anything else there is an error naming it."""
    lora: int | None = None
    on_policy: float | None = None
    items = list(args)
    i = 0
    while i < len(items):
        tok = items[i]
        name, eq, inline = tok.partition("=")
        if name not in ("--lora", "--on-policy"):
            raise DsparkError(f"unexpected argument {tok!r} (see `dspark distill --help`)")
        value = inline if eq else None
        if not eq and i + 1 < len(items) and not items[i + 1].startswith("--"):
            value = items[i + 1]
            i += 1
        i += 1
        if name == "--lora":
            if value is None:
                lora = DEFAULT_LORA_RANK
                continue
            try:
                lora = int(value)
            except ValueError:
                raise DsparkError(f"--lora RANK must be a positive integer, got {value!r}") from None
            if lora < 1:
                raise DsparkError(f"--lora RANK must be a positive integer, got {value!r}")
        else:
            if value is None:
                on_policy = DEFAULT_ON_POLICY
                continue
            try:
                on_policy = float(value)
            except ValueError:
                raise DsparkError(f"--on-policy LAMBDA must be a number in [0, 1], got {value!r}") from None
            if not 0.0 <= on_policy <= 1.0:
                raise DsparkError(f"--on-policy LAMBDA must be a number in [0, 1], got {value!r}")
    return lora, on_policy


__all__ = ["CollectSettings", "EvalSettings", "draft_label", "parse_optional_value_flags", "run_distill",
           "save_draft_folder", "write_candidate"]
