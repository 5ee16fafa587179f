"""Scoring candidates: every draft through dspark's decoder on the same held-out prompts, in one run.

Protocol (one process, one device; the fairness rules of `dspark bench`):
- Every request writes exactly `max_new_tokens` (eos disabled for every method) and is decoded alone
  (batch 1), so tokens/s compares like with like.
- Candidates are scored one after another, each in its own block: load the draft, warm every method
  up on the first prompt, then, prompt by prompt, the target-only baseline and each of the
  candidate's methods in turn (interleaved). A candidate's speedup is its tokens/s over the
  baseline's tokens/s *from its own block*, so a background load that comes and goes between
  blocks does not favour one candidate; `baseline_tokens_per_s` in the report is their mean.
- The baseline is the target alone through Hugging Face `generate` (greedy, or sampling at the same
  temperature), the same baseline `dspark bench` calls target-only.
- Methods per candidate: `auto`, each static K in `ks`, and the candidate's own `draft_length` when it
  is another form. The chosen policy is the fastest of them; `best_draft_length` the fastest static K.
  Pruning (`prune_margin`, default 0.15; None measures everything): after a quarter of the prompts
  (at least 3) the static Ks slower than (1 - margin) x the fastest method so far stop being
  measured (`prune_methods`); their rows keep the prompts they ran (`prompts`,
  `pruned_after_prompts`), and only methods that ran every prompt can be chosen.
- Greedy runs check every output against the baseline's (speculative decoding is lossless).

Per-candidate numbers (definitions of dspark.decode.types):
- acceptance_rate, mean_accepted_tokens: of the chosen policy's run (acceptance_rate: accepted /
  drafted; when that run drafted nothing, because `auto` found plain target steps faster, it is
  pooled over all the candidate's runs and `acceptance_rate_from` says "all methods");
- acceptance_per_position: accepted / drafted at draft position j of the largest static K run
  (dspark.decode.types counts every drafted position, so this is the fraction of steps whose
  first j + 1 drafts were all accepted; position j's conditional acceptance is the ratio of
  consecutive entries);
- acceptance_per_token (a): Leviathan's per-token acceptance from all the candidate's runs,
  accepted / (accepted + rejections), `dspark.decode.analysis.acceptance_from_counts`;
- draft_cost_ratio (c): median seconds of a one-token draft forward / one-token target forward,
  both measured in the candidate's block (`dspark.decode.bench.measure_forward_seconds`);
- predicted_speedup: Leviathan's bound at each K for a, c and the target's measured verify costs;
- peak_memory_mb: on CPU the peak resident set size while loading the draft and warming it up,
  minus the resident size just before (freed memory is returned to the OS first, and the peak is
  reset through /proc/self/clear_refs); on CUDA torch.cuda.max_memory_allocated over the same span
  minus the allocation before. Both cover the draft's weights plus the decode-time caches and
  activations of both models for one request; draft_memory_mb is the draft's weights alone;
- batched_tokens_per_s: all prompts decoded together (batches of `batch_size`) with the chosen
  policy: the `throughput` objective.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from dspark.decode import analysis
from dspark.decode.types import SEED_LIMIT, DecodeStats
from dspark.errors import DsparkError
from dspark.memory import MB, MemoryProbe, release_memory
from dspark.select.candidates import Entry

Progress = Callable[[str, int, int], None]

DEFAULT_KS = (1, 2, 4, 6)


@dataclass(frozen=True)
class SelectConfig:
    n: int = 20
    max_new_tokens: int = 64
    temperature: float = 0.0
    objective: str = "speedup"
    max_memory_gb: float | None = None
    ks: tuple[int, ...] = DEFAULT_KS
    batch_size: int = 8
    cost_reps: int = 10
    seed: int = 0
    threads: int | None = None
    tie_tolerance: float = 0.02
    cost_ratio: str | None = None
    hardware: str | None = None
    prune_margin: float | None = 0.15

    def __post_init__(self) -> None:
        from dspark.select.rank import check_objective

        check_objective(self.objective)
        if self.n < 1:
            raise DsparkError(f"--n must be >= 1, got {self.n}")
        if self.max_new_tokens < 2:
            raise DsparkError(f"--max-new-tokens must be >= 2 (one token leaves nothing to draft), got "
                              f"{self.max_new_tokens}")
        if not self.temperature >= 0:
            raise DsparkError(f"--temperature must be >= 0, got {self.temperature}")
        if not self.ks or any(k < 1 for k in self.ks):
            raise DsparkError(f"--ks must be integers >= 1, got {self.ks}")
        if self.batch_size < 1:
            raise DsparkError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.cost_reps < 1:
            raise DsparkError(f"--cost-reps must be >= 1, got {self.cost_reps}")
        if self.prune_margin is not None and not 0 < self.prune_margin < 1:
            raise DsparkError(f"prune margin must be in (0, 1) or None (measure every K on every prompt), "
                              f"got {self.prune_margin}")
        if self.max_memory_gb is not None and not self.max_memory_gb > 0:
            raise DsparkError(f"--max-memory must be > 0 (GB), got {self.max_memory_gb}")
        if not 0 <= self.seed <= SEED_LIMIT - self.n:  # prompt i samples with seed + i
            raise DsparkError(f"--seed must be in [0, 2**63 - {self.n}] (prompt i samples with seed + i), "
                              f"got {self.seed}")
        if self.cost_ratio is not None and self.hardware is not None:
            raise DsparkError("give --cost-ratio or --hardware, not both")
        if self.hardware is not None:
            from dspark.select.hardware import get_hardware

            get_hardware(self.hardware)

    @property
    def projected(self) -> bool:
        return self.cost_ratio is not None or self.hardware is not None


# -- one method's totals ----------------------------------------------------------------------------------

@dataclass
class MethodTotals:
    name: str
    draft_length: str
    outputs: list[list[int]] = field(default_factory=list)
    seconds: float = 0.0
    stats: DecodeStats = field(default_factory=DecodeStats)

    @property
    def tokens(self) -> int:
        return sum(len(o) for o in self.outputs)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def summary(self, baseline_tps: float) -> dict[str, Any]:
        st = self.stats
        return {"draft_length": self.draft_length, "tokens_per_s": self.tokens_per_s,
                "speedup": self.tokens_per_s / baseline_tps if baseline_tps else None,
                "acceptance_rate": st.acceptance_rate if st.drafted else None,
                "mean_accepted_tokens": st.mean_accepted_tokens,
                "mean_draft_length": st.drafted / st.verify_steps if st.verify_steps else 0.0,
                "drafted": st.drafted, "accepted": st.accepted, "recovered": st.recovered, "bonus": st.bonus,
                "verify_steps": st.verify_steps, "generated_tokens": self.tokens, "seconds": self.seconds,
                "acceptance_per_position": st.acceptance_per_position()}


def static_name(k: int) -> str:
    return f"k{k}"


def candidate_methods(spec_draft_length: str, ks: Sequence[int]) -> dict[str, str]:
    """Method name -> draft-length form: auto, the static Ks, and the candidate's own form when it
    is neither."""
    from dspark.decode.policy import parse_draft_length

    methods = {"auto": "auto"}
    for k in ks:
        methods[static_name(k)] = str(k)
    f = parse_draft_length(spec_draft_length)
    if f.kind not in ("auto", "static"):
        methods["candidate"] = f.spec
    elif f.kind == "static" and static_name(f.args[0]) not in methods:
        methods[static_name(f.args[0])] = str(f.args[0])
    return methods


def prune_point(n_prompts: int) -> int:
    """After how many prompts slow static Ks may be dropped: a quarter of them, at least 3 (never all)."""
    return min(max(3, n_prompts // 4), n_prompts)


def prune_methods(tokens_per_s: dict[str, float], margin: float) -> list[str]:
    """The static-K methods (`k<K>`) to stop measuring: those slower than (1 - margin) x the fastest
    method so far (measured on the same prompts). The fastest static K, `auto` and the candidate's
    own form are always kept. A speedup curve over K is unimodal in Leviathan's model, so a K this
    far behind after a quarter of the prompts does not win by the end (the margin absorbs noise)."""
    statics = [m for m in tokens_per_s if m.startswith("k") and m[1:].isdigit()]
    if not statics:
        return []
    best = max(tokens_per_s.values())
    best_static = max(statics, key=lambda m: tokens_per_s[m])
    return [m for m in statics if m != best_static and tokens_per_s[m] < (1 - margin) * best]


def pooled_acceptance(totals: Sequence[MethodTotals]) -> float | None:
    """Leviathan's per-token acceptance from all runs: accepted / (accepted + rejections)."""
    acc = sum(t.stats.accepted for t in totals)
    rej = sum(t.stats.recovered for t in totals)
    return analysis.acceptance_from_counts(acc, rej) if acc + rej else None


def pooled_acceptance_rate(totals: Sequence[MethodTotals]) -> float | None:
    """accepted / drafted over all runs (None when none drafted)."""
    drafted = sum(t.stats.drafted for t in totals)
    return sum(t.stats.accepted for t in totals) / drafted if drafted else None


# -- the session ---------------------------------------------------------------------------------------

@dataclass
class Session:
    """Everything shared by the candidates' blocks."""

    target: Any                    # dspark.models.LoadedModel
    prompts: list[list[int]]
    config: SelectConfig
    device: str
    threads: int
    prefix: list[int]
    target_costs: dict[int, float]  # seconds of a target forward over T tokens
    pad_id: int
    baseline_outputs: list[list[int]] | None = None
    baseline_batched_tokens_per_s: float | None = None
    progress: Progress | None = None
    done: int = 0
    total: int = 0

    def tick(self, label: str) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(label, self.done, max(self.total, self.done))

    @property
    def verify_costs(self) -> dict[int, float]:
        return analysis.relative_costs(self.target_costs)

    def gen_config(self, i: int | None):
        from dspark.decode.types import GenerationConfig

        seed = None if self.config.temperature == 0 else self.config.seed + (i or 0)
        return GenerationConfig(max_new_tokens=self.config.max_new_tokens, temperature=self.config.temperature,
                                seed=seed, ignore_eos=True)

    def baseline(self, i: int) -> list[int]:
        """The target alone through Hugging Face generate (eos disabled)."""
        import torch

        from dspark.decode.bench import hf_generate

        model = self.target.model
        if self.config.temperature == 0:
            return hf_generate(model, self.prompts[i], self.config.max_new_tokens, (), self.pad_id)
        x = torch.tensor([self.prompts[i]], device=next(model.parameters()).device)
        torch.manual_seed(self.config.seed + i)
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=self.config.max_new_tokens,
                             do_sample=True, temperature=self.config.temperature, top_k=0, top_p=1.0,
                             eos_token_id=[], pad_token_id=self.pad_id)
        return out[0, x.shape[1]:].tolist()


def open_session(target: str, texts: Sequence[str], config: SelectConfig, device: str, dtype: str,
                 progress: Progress | None = None) -> Session:
    """Load the target, encode the prompts, measure the target's forward costs and its batched
    target-only throughput."""
    import torch

    from dspark.decode.bench import bench_prefix, configure_threads, measure_forward_seconds, timed
    from dspark.decode.engine import SpeculativeDecoder
    from dspark.decode.run import encode, quiet_transformers
    from dspark.models import load_model

    with quiet_transformers():
        t = load_model(target, device=device, dtype=dtype)
    ids = encode(t.tokenizer, texts)
    context = getattr(t.config, "max_position_embeddings", None)
    if context is not None:
        for i, p in enumerate(ids):
            if len(p) + config.max_new_tokens > context:
                raise DsparkError(f"prompt {i} has {len(p)} tokens: with --max-new-tokens {config.max_new_tokens} it "
                                  f"exceeds the target's context of {context} tokens")
    threads = configure_threads(config.threads, t.device)
    pad = getattr(t.tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(t.tokenizer, "eos_token_id", None)
    prefix = bench_prefix(ids, config.max_new_tokens, context or 1 << 20)
    with quiet_transformers(), torch.inference_mode():
        costs = measure_forward_seconds(t.model, prefix, range(1, max(config.ks) + 2), config.cost_reps)
    s = Session(target=t, prompts=ids, config=config, device=t.device, threads=threads, prefix=prefix,
                target_costs=costs, pad_id=int(pad) if pad is not None else 0, progress=progress)
    with quiet_transformers(), torch.inference_mode():
        dec = SpeculativeDecoder(t.model, None, t.tokenizer)
        gcfg = s.gen_config(None)
        dec.generate([ids[0]], gcfg)
        res, dt = timed(lambda: dec.generate(ids, gcfg, batch_size=config.batch_size), t.device)
        s.baseline_batched_tokens_per_s = sum(len(r.token_ids) for r in res) / dt if dt > 0 else None
        if config.temperature == 0:
            s.baseline_outputs = [s.baseline(i) for i in range(len(ids))]
    return s


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text and not isinstance(e, DsparkError) else (text[0] if text else
                                                                                            type(e).__name__)


def check_entry_tokenizer(s: Session, entry: Entry) -> tuple[str | None, str]:
    """(reason it is unsupported or None, the compatibility mode), from the tokenizers alone. A draft
    with another tokenizer is scored too (cross-tokenizer decoding, dspark.decode.cross); only a
    tokenizer whose tokens are not exact byte strings (WordPiece) is unsupported."""
    from dspark.decode.run import quiet_transformers
    from dspark.models import check_tokenizers
    from dspark.quantize.loading import draft_tokenizer

    with quiet_transformers():
        tok = draft_tokenizer(entry.draft)
    compat = check_tokenizers(s.target.tokenizer, tok, s.target.vocab_size, None)
    if compat.compatible:
        return None, compat.mode.value
    from dspark.decode.tokenmap import tokenizer_kind
    from dspark.errors import IncompatibleTokenizersError

    try:
        tokenizer_kind(tok)
    except IncompatibleTokenizersError as e:
        return f"{compat.message}; {e}", compat.mode.value
    return None, compat.mode.value


def score_candidate(s: Session, entry: Entry) -> dict[str, Any]:
    """Score one candidate (see the module docstring). Returns its report row; a failure becomes
    status "failed" with the reason, a tokenizer mismatch status "unsupported"."""
    spec = entry.spec
    row: dict[str, Any] = {"name": entry.name, "status": "ok", "reason": None, "source": entry.source,
                           "draft": entry.draft, "quantization": spec.quantization if spec else None,
                           "candidate_draft_length": spec.draft_length if spec else None,
                           "warnings": list(spec.warnings) if spec else [], "notes": []}
    if entry.error is not None:
        row.update(status="failed", reason=entry.error)
        return row
    if spec.target and spec.target not in (s.target.name, s.target.resolved.resolves_to):
        row["notes"].append(f"made for target {spec.target!r}, scored against {s.target.name!r}")
    t0 = time.perf_counter()
    try:
        reason, mode = check_entry_tokenizer(s, entry)
        row["tokenizer"] = mode
        if reason is not None:
            row.update(status="unsupported", reason=reason)
            return row
        measured = _measure(s, entry)
        row["warnings"].extend(measured.pop("warnings_extra", []))
        row["notes"].extend(measured.pop("notes_extra", []))
        row.update(measured)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # a broken candidate must not end the comparison: it is reported instead
        row.update(status="failed", reason=_one_line(e))
    finally:
        release_memory()
        row["scoring_seconds"] = time.perf_counter() - t0
    return row


def _measure(s: Session, entry: Entry) -> dict[str, Any]:
    import torch

    from dspark.decode.bench import measure_forward_seconds, timed, vocab_safe_prefix
    from dspark.decode.factory import make_decoder
    from dspark.decode.policy import parse_draft_length
    from dspark.decode.run import quiet_transformers
    from dspark.quantize.loading import (count_parameters, deployment_bytes, load_draft,
                                         model_bytes, quiet_quant_libraries)

    cfg = s.config
    methods = candidate_methods(entry.spec.draft_length, cfg.ks)
    probe = MemoryProbe(s.device)
    out: dict[str, Any] = {}
    with quiet_transformers(), quiet_quant_libraries(), torch.inference_mode():
        probe.start()
        d = load_draft(entry.draft, device=s.device, dtype=s.target.dtype)
        dec = make_decoder(s.target.model, d.model, s.target.tokenizer, "auto", draft_tokenizer=d.tokenizer)
        out["decoder_mode"] = getattr(dec, "mode", "same-tokenizer")
        notes = []
        for m, form in list(methods.items()):
            try:  # e.g. the candidate asks for `learned` but its draft carries no acceptance head
                parse_draft_length(form).check(dec.policy_context)
            except DsparkError as e:
                del methods[m]
                notes.append(f"draft length {form!r} not measured: {e}")
        out["notes_extra"] = notes
        for m, form in methods.items():
            dec.generate([s.prompts[0]], s.gen_config(0), draft_length=form)
            s.tick(f"{entry.name}: warm-up {m}")
        out["peak_memory_mb"] = probe.peak_mb()
        out["memory_method"] = probe.method
        out["draft_memory_mb"] = model_bytes(d.model) / MB
        out["parameters"] = count_parameters(d.model)
        out["draft_deployed_bytes"] = deployment_bytes(d.model)
        out["draft_layers"] = int(getattr(d.config, "num_hidden_layers", 0) or 0)

        # forward costs, both measured now (the machine's load drifts between blocks)
        t1 = measure_forward_seconds(s.target.model, s.prefix, [1], cfg.cost_reps)[1]
        d1 = measure_forward_seconds(d.model, vocab_safe_prefix(d.model, s.prefix), [1], cfg.cost_reps)[1]

        totals = {m: MethodTotals(m, form) for m, form in methods.items()}
        active = dict(methods)
        pruned: dict[str, int] = {}
        base_out: list[list[int]] = []
        base_s = 0.0
        for i, p in enumerate(s.prompts):
            ids, dt = timed(lambda: s.baseline(i), s.device)
            base_out.append(ids)
            base_s += dt
            for m, form in active.items():
                res, dt = timed(lambda: dec.generate([p], s.gen_config(i), draft_length=form)[0], s.device)
                totals[m].outputs.append(list(res.token_ids))
                totals[m].seconds += dt
                totals[m].stats = totals[m].stats.merge(res.stats)
            s.tick(f"{entry.name}: prompt {i + 1}/{len(s.prompts)}")
            if cfg.prune_margin is not None and i + 1 == prune_point(len(s.prompts)) < len(s.prompts):
                for m in prune_methods({m: totals[m].tokens_per_s for m in active}, cfg.prune_margin):
                    del active[m]
                    pruned[m] = i + 1
        base_tps = sum(len(o) for o in base_out) / base_s if base_s > 0 else 0.0

        summaries = {m: t.summary(base_tps) for m, t in totals.items()}
        for m, t in totals.items():
            summaries[m]["prompts"] = len(t.outputs)
            summaries[m]["pruned_after_prompts"] = pruned.get(m)
        # compared on the same prompts: only methods that ran all of them can be chosen
        chosen = max(active, key=lambda m: (totals[m].tokens_per_s, m == "auto"))
        statics = [m for m in methods if m.startswith("k") and m[1:].isdigit()]
        best_static = max((m for m in statics if m in active), key=lambda m: totals[m].tokens_per_s)
        widest = max(statics, key=lambda m: int(m[1:]))

        res, dt = timed(lambda: dec.generate(s.prompts, s.gen_config(None), draft_length=methods[chosen],
                                             batch_size=cfg.batch_size), s.device)
        batched_tps = sum(len(r.token_ids) for r in res) / dt if dt > 0 else 0.0
        s.tick(f"{entry.name}: batched")

    reference = s.baseline_outputs if cfg.temperature == 0 else None
    mismatches = []
    if reference is not None:
        for m, t in totals.items():
            bad = [i for i, (a, b) in enumerate(zip(t.outputs, reference)) if a != b]
            if bad:
                mismatches.append(f"{m}: prompts {bad[:5]}")
    a = pooled_acceptance(list(totals.values()))
    c = analysis.cost_ratio(d1, t1)
    ch = summaries[chosen]
    from dspark.select.hardware import predicted_curve

    curve_ks = sorted({int(m[1:]) for m in statics})
    predicted = predicted_curve(a, c, s.verify_costs, curve_ks) if a is not None else {}
    out.update({
        "draft_length": methods[chosen], "chosen_method": chosen,
        "acceptance_rate": (ch["acceptance_rate"] if ch["acceptance_rate"] is not None
                            else pooled_acceptance_rate(list(totals.values()))),
        "acceptance_rate_from": "chosen method" if ch["acceptance_rate"] is not None else "all methods",
        "mean_accepted_tokens": ch["mean_accepted_tokens"],
        "acceptance_per_token": a, "acceptance_per_position": summaries[widest]["acceptance_per_position"],
        "acceptance_per_position_k": int(widest[1:]),
        "draft_cost_ratio": c, "draft_step_ms": 1e3 * d1, "target_step_ms": 1e3 * t1,
        "tokens_per_s": ch["tokens_per_s"], "baseline_tokens_per_s": base_tps, "speedup": ch["speedup"],
        "best_draft_length": int(best_static[1:]), "best_static_speedup": summaries[best_static]["speedup"],
        "auto_tokens_per_s": summaries["auto"]["tokens_per_s"], "auto_speedup": summaries["auto"]["speedup"],
        "methods": summaries,
        "predicted_speedup": {str(k): v for k, v in predicted.items()},
        "predicted_best_draft_length": (analysis.best_k(a, c, s.verify_costs, k_max=max(s.target_costs) - 1)
                                        if a is not None else None),
        "batched_tokens_per_s": batched_tps,
        "batched_speedup": (batched_tps / s.baseline_batched_tokens_per_s
                            if s.baseline_batched_tokens_per_s else None),
        "outputs_identical": (not mismatches) if reference is not None else None,
    })
    if mismatches:
        out.setdefault("warnings_extra", []).append(
            f"greedy outputs differ from the target's own ({'; '.join(mismatches)}): a decoder bug, please report it")
    return out


def entry_work(entry: Entry, config: SelectConfig) -> int:
    """Progress steps one entry takes (for the bar's total)."""
    if entry.spec is None:
        return 0
    try:
        m = len(candidate_methods(entry.spec.draft_length, config.ks))
    except DsparkError:
        m = 1 + len(config.ks)
    return m + config.n + 1
