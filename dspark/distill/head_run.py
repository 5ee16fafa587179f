"""`dspark train-head`: train an EAGLE-3 head for a target (`dspark.models.eagle3`,
`dspark.distill.heads`) and write it in the format vLLM loads (speculators' config.json).

Order of work (bad input fails before anything expensive):
1. options (objective, steps, TTT steps, draft vocabulary, layers, dtype);
2. whether the target exists here (`llama3-70b` offline fails at once), unless a complete
   `--hidden-cache` makes the target unnecessary;
3. the task / data source; the logits cache: `--cache` (checked against the target) or collected
   into OUT/cache on the TRAIN split, like `dspark distill`;
4. the draft vocabulary (`--draft-vocab V`: the V most frequent tokens of the cache's training rows,
   prompts and the target's own continuations, and of up to `--vocab-prompts` (4,096) more of the
   task's train prompts,
   held-out ones excluded; `dspark.models.vocab_map`); its coverage of the
   held-out continuation tokens is logged (a token outside it can never be drafted);
5. features: online (the target in the loop) or `--offline`: OUT/hidden collected first (storage
   estimate printed), or a given `--hidden-cache`;
6. training with checkpoints in OUT/checkpoints/<name> (a re-run resumes), then OUT/heads/<name>/
   (config.json + model.safetensors: speculators' format; dspark_head.json: settings, curve),
   OUT/curve.png (held-out expected acceptance per unrolled step against training steps),
   OUT/vllm.json (`speculative_config` with method "eagle3") and OUT/train_head.json (summary).
With `--compare-draft D` (repeatable) the separate draft D is scored on the same held-out rows with
the same chained figures (`heads.chain_metrics_for_draft`).
Decoding with a head lands with the decoder's proposer interface; until then nothing here decodes.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from dspark.errors import DataError, DsparkError

SUMMARY_FILE = "train_head.json"
CURVE_FILE = "curve.png"
VLLM_FILE = "vllm.json"
HEAD_META = "dspark_head.json"


@dataclass(frozen=True)
class HeadOptions:
    """What shapes the head (beyond training settings)."""

    name: str = "eagle3"
    draft_vocab: int | None = None  # None: the target's whole vocabulary
    layers: tuple[int, ...] | None = None  # None: `eagle3.default_aux_layers`
    train_lm_head: bool = False
    norm_before_residual: bool = True
    offline: bool = False
    hidden_cache: str | None = None
    hidden_dtype: str = "bfloat16"
    vocab_prompts: int = 4096  # task train prompts counted for the draft vocabulary

    def check(self) -> "HeadOptions":
        from dspark.distill.hidden_cache import DTYPES

        if self.draft_vocab is not None and self.draft_vocab < 1:
            raise DsparkError(f"--draft-vocab must be >= 1, got {self.draft_vocab}")
        if self.vocab_prompts < 0:
            raise DsparkError(f"--vocab-prompts must be >= 0, got {self.vocab_prompts}")
        if self.hidden_dtype not in DTYPES:
            raise DsparkError(f"--hidden-dtype must be one of {', '.join(DTYPES)}, got {self.hidden_dtype!r}")
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise DsparkError(f"--name must be a plain folder name, got {self.name!r}")
        return self


def parse_layers(text: str | None) -> tuple[int, ...] | None:
    """'2,15,27' -> (2, 15, 27); None stays None (the default layers)."""
    if text is None:
        return None
    try:
        ids = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise DsparkError(f"--layers must be 3 comma-separated layer ids like 2,15,27, got {text!r}") from None
    if len(ids) != 3:
        raise DsparkError(f"--layers must be 3 comma-separated layer ids like 2,15,27, got {text!r}")
    return ids


def token_counts(cache, heldout_percent: float, vocab_size: int, split: str = "train", prompts: bool = True,
                 extra: Iterable[Sequence[int]] = ()):
    """Token counts [V] over the cache's rows of `split` (the target's own continuations, and their
    prompts when `prompts`) and the `extra` id sequences."""
    from dspark.models.vocab_map import count_tokens

    def seqs():
        for r in cache.rows(split, heldout_percent):
            if prompts:
                yield r.prompt_ids.tolist()
            yield r.continuation_ids.tolist()
        yield from extra

    return count_tokens(seqs(), vocab_size)


def task_prompt_ids(source, tokenizer, heldout_percent: float, limit: int) -> list[list[int]]:
    """Up to `limit` of the task's TRAIN prompts as token ids, minus those the cache holds out (a
    small cache alone leaves many tokens unseen; held-out prompts must not pick the vocabulary)."""
    from dspark.distill.cache import is_heldout
    from dspark.distill.collect import encode_prompts
    from dspark.tasks import source_prompts

    if limit == 0:
        return []
    recs = [r for r in source_prompts(source, "train", limit) if not is_heldout(r.id, heldout_percent)]
    return [list(p.ids) for p in encode_prompts(recs, tokenizer)]


def plot_curve(history: Sequence[dict[str, Any]], path: Path, title: str,
               compare: dict[str, Any] | None = None) -> Path:
    """Held-out expected acceptance per unrolled step (and the greedy tokens per target step at
    K = steps) against training steps; separate drafts' figures as horizontal lines."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    xs = [h["step"] for h in history]
    steps = len(history[0]["expected_acceptance"]) if history else 0
    for s in range(steps):
        ax1.plot(xs, [h["expected_acceptance"][s] for h in history], "o-", label=f"head, unrolled step {s}")
    ax2.plot(xs, [h["greedy_tokens_per_step"][-1] for h in history], "o-", label=f"head, greedy, K={steps}")
    ax2.plot(xs, [h["tokens_per_step"][-1] for h in history], "s--", label=f"head, sampling, K={steps}")
    for i, (name, m) in enumerate((compare or {}).items()):
        ax1.axhline(m["expected_acceptance"][0], color=f"C{steps + i}", ls=":", label=f"{name} (separate draft)")
        ax2.axhline(m["greedy_tokens_per_step"][-1], color=f"C{steps + i}", ls=":", label=f"{name}, greedy")
    ax1.set_xlabel("training step")
    ax1.set_ylabel("held-out E[sum min(p, q)]")
    ax1.set_ylim(0, 1)
    ax2.set_xlabel("training step")
    ax2.set_ylabel("expected tokens per target step")
    for ax in (ax1, ax2):
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.parent / f".{path.name}.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def run_train_head(target: str, out: str | Path, *, task: str | None = None, data: str | None = None,
                   cache: str | Path | None = None, train=None, head: HeadOptions = HeadOptions(), collect=None,
                   compare_drafts: Sequence[str] = (), device: str = "auto", dtype: str = "auto", console=None,
                   show_progress: bool = True, log: Callable[[str], None] | None = None) -> dict[str, Any] | None:
    """Everything `dspark train-head` does (see the module docstring); returns the summary (None
    on data-parallel ranks other than 0)."""
    from dspark.distill import parallel
    from dspark.distill.cache import LogitsCache, manifest_hash
    from dspark.distill.collect import validate_args
    from dspark.distill.distill import CollectSettings, _check_available, _collect_into, _source_from_cache
    from dspark.distill.heads import HeadTrainConfig, validate_head_config
    from dspark.tasks import resolve_source

    log = log or (lambda _m: None)
    t_start = time.perf_counter()
    cfg = validate_head_config(train if train is not None else HeadTrainConfig())
    head.check()
    collect = collect or CollectSettings()
    if cache is None:
        validate_args(k=collect.k, max_new_tokens=collect.max_new_tokens, temperature=collect.temperature,
                      batch_size=collect.batch_size, shard=None, engine="hf")
    if head.offline and head.hidden_cache:
        raise DsparkError("give --offline (collect OUT/hidden) or --hidden-cache PATH, not both")
    if cfg.loss_on_prompt and (head.offline or head.hidden_cache):
        raise DsparkError("--loss-on-prompt needs the target's distribution at prompt positions: train online")
    hidden_given = head.hidden_cache is not None
    if hidden_given and cache is None:
        raise DsparkError("--hidden-cache needs the --cache it was made from")
    if not hidden_given or compare_drafts:
        _check_available(target, "target")
    for d in compare_drafts:
        _check_available(d, "--compare-draft")
    if task is None and data is None and cache is not None:
        source, task, data = _source_from_cache(cache)
    else:
        source = resolve_source(task, data)

    dist = parallel.init_distributed(device)
    main = dist is None or dist.is_main
    device = parallel.rank_device(dist, device)
    out = Path(out)
    try:
        tgt = None if hidden_given and not compare_drafts else _load_target(target, device, dtype)
        cache_dir = Path(cache) if cache is not None else out / "cache"
        if cache is None:
            failure = None
            try:
                if main:
                    _collect_into(cache_dir, tgt, source, task, data, collect, console, show_progress, log)
            except DsparkError as e:
                failure = e
            message = parallel.broadcast_object(dist, None if failure is None else str(failure))
            if failure is not None:
                raise failure
            if message is not None:
                raise DsparkError(f"rank 0 failed: {message}")
            parallel.barrier(dist)
        lc = LogitsCache(cache_dir)
        if tgt is not None:
            ident = tgt.identity
            lc.check_compatible(target_name=ident.name, tokenizer_hash=tgt.tokenizer_hash,
                                weight_hash=ident.weight_hash, revision=ident.revision)
        return _train(target, out, lc, manifest_hash(cache_dir), tgt, cfg, head, compare_drafts, dist, device,
                      console, show_progress, log, t_start, task or data, source)
    finally:
        parallel.shutdown(dist)


def _load_target(target: str, device: str, dtype: str):
    from dspark.distill.collect import load_target

    tgt = load_target(target, device=device, dtype=dtype)
    tgt.model.eval()
    for p in tgt.model.parameters():
        p.requires_grad_(False)
    return tgt


def _features(out: Path, lc, tgt, head: HeadOptions, layer_ids, pad_id: int, main: bool, dist, log):
    """The feature source: online, or a hidden-state cache (collected into OUT/hidden by rank 0)."""
    from dspark.distill import parallel
    from dspark.distill.heads import OfflineFeatures, OnlineFeatures
    from dspark.distill.hidden_cache import HiddenCache, collect_hidden

    if not head.offline and not head.hidden_cache:
        return OnlineFeatures(tgt.model, layer_ids)
    path = Path(head.hidden_cache) if head.hidden_cache else out / "hidden"
    if head.offline and main:
        collect_hidden(tgt.model, lc, path, layer_ids, dtype=head.hidden_dtype, pad_id=pad_id, log=log)
    parallel.barrier(dist)
    hc = HiddenCache(path, lc)
    if tuple(hc.layer_ids) != tuple(layer_ids):
        raise DataError(f"hidden-state cache {str(path)!r} holds layers {list(hc.layer_ids)}, the head reads "
                        f"{list(layer_ids)}: pass --layers {','.join(map(str, hc.layer_ids))}")
    return OfflineFeatures(hc)


def _train(target: str, out: Path, lc, cache_hash: str, tgt, cfg, opts: HeadOptions, compare_drafts, dist,
           device: str, console, show_progress: bool, log, t_start: float, source_name, task_source
           ) -> dict[str, Any] | None:
    from dspark.distill.heads import train_head
    from dspark.distill.hidden_cache import HiddenCache
    from dspark.io import atomic_write_json
    from dspark.models.eagle3 import (check_aux_layers, default_aux_layers, init_head, save_head, target_parts,
                                      vllm_speculative_config)

    main = dist is None or dist.is_main
    if tgt is not None:
        config, parts = target_parts(tgt.model)
        tokenizer = tgt.tokenizer
        pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    else:
        config, parts = HiddenCache(opts.hidden_cache, lc).target_parts()
        pad_id = int(getattr(config, "pad_token_id", None) or 0)
    text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_layers = int(text_cfg.num_hidden_layers)
    layer_ids = check_aux_layers(opts.layers or default_aux_layers(n_layers), n_layers)
    vocab = int(parts["embed_tokens"].shape[0])
    vmap, vocab_info = _draft_vocabulary(opts, lc, cfg.heldout_percent, vocab, tgt, task_source, log)
    source = _features(out, lc, tgt, opts, layer_ids, pad_id, main, dist, log)
    resolves_to = tgt.identity.resolves_to if tgt is not None else lc.manifest.target.resolves_to
    head = init_head(config, parts, aux_layer_ids=layer_ids, vocab_map=vmap,
                     norm_before_residual=opts.norm_before_residual, speculative_tokens=cfg.ttt_steps,
                     train_lm_head=opts.train_lm_head, verifier_name_or_path=resolves_to, seed=cfg.seed).to(device)
    run_identity = {"target": lc.manifest.target.model_dump(), "cache_manifest_sha256": cache_hash,
                    "features": source.kind, "head": {"name": opts.name, "train_lm_head": opts.train_lm_head},
                    "compare": list(compare_drafts),
                    "vocab_map_sha256": _digest(vmap.d2t) if vmap is not None else None}
    head_dir = out / "heads" / opts.name
    identity = json.loads(json.dumps({"run": run_identity, "config": cfg.identity(),
                                      "head": head.config.to_speculators()}))
    meta_path = head_dir / HEAD_META
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("identity") == identity:
            log(f"{opts.name}: already trained in {head_dir} (same run), nothing to do")
            return meta
        raise DataError(f"{str(head_dir)!r} holds a head trained with other settings: choose another --out or "
                        "--name, or delete it")
    ck_dir = out / "checkpoints" / opts.name
    kwargs = dict(pad_id=pad_id, run_identity=run_identity, dist=dist, log=log)
    if show_progress and main:
        from dspark.distill.distill import _rich_train_progress

        prog, update = _rich_train_progress(console, f"head {opts.name}")
        with prog:
            result = train_head(head, source, lc, cfg, ck_dir, progress=_first_step(update), **kwargs)
    else:
        result = train_head(head, source, lc, cfg, ck_dir, **kwargs)
    if not main:
        return None

    max_length = cfg.max_length or int(head.config.layer.max_position_embeddings)
    compare = {d: _score_draft(d, tgt.model, lc, cfg, pad_id, max_length, vocab, device, log) for d in compare_drafts}
    summary = {"identity": identity, "target": target, "target_identity": lc.manifest.target.model_dump(),
               "cache": str(lc.path), "cache_manifest_sha256": cache_hash, "task": source_name,
               "features": source.kind, "layers": list(layer_ids), "vocabulary": vocab_info, "config": cfg.identity(),
               "head": str(head_dir), "speculative_tokens": cfg.ttt_steps, "world_size": dist.world_size if dist else 1,
               **result.to_dict(), "compare": compare, "seconds_total": round(time.perf_counter() - t_start, 2)}
    save_head(result.head, head_dir, meta=summary)
    atomic_write_json(out / VLLM_FILE, {"model": resolves_to, "speculative_config": vllm_speculative_config(
        f"./heads/{opts.name}", cfg.ttt_steps)})
    plot_curve(result.history, out / CURVE_FILE, f"EAGLE-3 head for {target}: held-out rows of {lc.path.name}",
               compare)
    shutil.rmtree(ck_dir, ignore_errors=True)  # the head folder now stands for the run
    atomic_write_json(out / SUMMARY_FILE, summary)
    return summary


def _draft_vocabulary(opts: HeadOptions, lc, heldout_percent: float, vocab: int, tgt, task_source, log):
    """(VocabMap or None, what to report about it) for `--draft-vocab` (see the module docstring)."""
    from dspark.models.vocab_map import build_vocab_map, coverage

    if opts.draft_vocab is None:
        return None, None
    if opts.draft_vocab > vocab:
        raise DsparkError(f"--draft-vocab {opts.draft_vocab} is larger than the target's vocabulary ({vocab})")
    extra = task_prompt_ids(task_source, tgt.tokenizer, heldout_percent, opts.vocab_prompts) if tgt is not None else []
    vmap = build_vocab_map(token_counts(lc, heldout_percent, vocab, extra=extra), opts.draft_vocab)
    held = token_counts(lc, heldout_percent, vocab, "heldout", prompts=False)
    info = {"draft_vocab_size": opts.draft_vocab, "target_vocab_size": vocab,
            "heldout_coverage": round(coverage(vmap, held), 6)}
    log(f"draft vocabulary: {opts.draft_vocab:,} of {vocab:,} target ids cover {info['heldout_coverage']:.1%} of "
        "the held-out continuation tokens")
    return vmap, info


def _score_draft(name: str, target_model, lc, cfg, pad_id: int, max_length: int, vocab: int, device: str, log):
    """`--compare-draft`: a separate draft's chained figures on the head's held-out rows."""
    import torch

    from dspark.distill.heads import chain_metrics_for_draft
    from dspark.models import load_model

    draft = load_model(name, device=device, dtype="float32").model.eval()
    log(f"scoring the separate draft {name} on the same held-out rows")
    shared = min(vocab, int(draft.get_output_embeddings().weight.shape[0]))
    with torch.no_grad():
        return chain_metrics_for_draft(draft, target_model, lc, steps=cfg.ttt_steps, objective=cfg.objective,
                                       batch_size=cfg.batch_size, heldout_percent=cfg.heldout_percent, pad_id=pad_id,
                                       max_length=max_length, max_rows=cfg.eval_max_rows, vocab_size=shared)


def _digest(t) -> str:
    import hashlib

    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def _first_step(update):
    """Adapt train_head's progress (per-step lists) to the distill progress bar (one number)."""
    def call(step: int, total: int, info: dict[str, Any]) -> None:
        acc = info.get("expected_acceptance")
        update(step, total, {**info, "expected_acceptance": acc[0] if isinstance(acc, list) else acc})

    return call


__all__ = ["HeadOptions", "task_prompt_ids", "token_counts", "parse_layers", "plot_curve", "run_train_head"]
