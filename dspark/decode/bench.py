"""`dspark bench`: dspark's decoder against its peers, in one process, on the same prompts, greedy.

Methods (names are part of the JSON contract):
- `target-only`: Hugging Face `model.generate` of the target alone (the baseline, speedup 1.0);
- `hf-assisted`: Hugging Face assisted generation (`assistant_model=draft`, its default settings; for a
  draft with another tokenizer, HF's universal assisted generation: `tokenizer` + `assistant_tokenizer`;
  left out, with a note, if HF refuses the pair);
- `dspark-target-only`: dspark's own loop without a draft (measures the loop's overhead);
- `dspark-k<K>`: dspark with a static draft length K, for each K in `ks`;
- `dspark-auto`: dspark's default policy.
Then dspark `auto` over all prompts at each batch size in `batch_sizes` (throughput). A draft with
another tokenizer runs through dspark.decode.cross (`mode` "cross-tokenizer" in the report; drafted /
accepted count target tokens; its requests are decoded one at a time even when batched).

Fairness: every method decodes each prompt alone (batch 1) with the same max_new_tokens and the same
stop ids: by default none (eos disabled for all, so every method writes exactly max_new_tokens);
with `stop_at_eos`, the target's eos ids for all. Each method is warmed up once on the first prompt,
then the methods are timed prompt by prompt in turn (interleaved), so a background load that comes
and goes is spread over all of them. GPU timings synchronise. Every output is compared with
`target-only`: greedy speculative decoding must reproduce it token for token.

The analytical bound of a dspark row is Leviathan's speedup (dspark.decode.analysis.speedup_bound)
for the row's measured per-token acceptance a = accepted / (accepted + rejections), its mean draft
length K (drafted / verify steps), the measured cost ratio c = draft forward / target decode step,
and the measured relative verify cost v(K + 1). Forward costs come from a microbenchmark of the
forward dspark's loop runs (`measure_forward_seconds`: the lean path where it applies), so the bound
is a speedup over dspark's own target-only decoding, and `fraction_of_bound` = (tokens/s /
dspark-target-only tokens/s) / bound says how much of the ideal the whole speculative loop
(drafting, verification, sampling, masks, bookkeeping) achieves. (Against HF `generate`, `speedup`
also counts the lean loop's own gain, which the bound does not model.)
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from dspark.decode import analysis
from dspark.decode.run import quiet_transformers
from dspark.decode.types import DecodeStats
from dspark.errors import DsparkError

Progress = Callable[[str, int, int], None]

TARGET_ONLY = "target-only"
HF_ASSISTED = "hf-assisted"
DSPARK_TARGET_ONLY = "dspark-target-only"
DSPARK_AUTO = "dspark-auto"


def dspark_k(k: int) -> str:
    return f"dspark-k{k}"


def parse_int_list(text: str, what: str, minimum: int = 1) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4): distinct integers >= minimum, in the order given."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise DsparkError(f"{what} must be a comma-separated list of integers, got {text!r}")
    out: list[int] = []
    for p in parts:
        try:
            v = int(p)
        except ValueError:
            raise DsparkError(f"{what}: {p!r} is not an integer (in {text!r})") from None
        if v < minimum:
            raise DsparkError(f"{what}: every value must be >= {minimum}, got {v} (in {text!r})")
        if v not in out:
            out.append(v)
    return tuple(out)


@dataclass(frozen=True)
class BenchConfig:
    """What `dspark bench` measures. `threads` None: as many torch threads as this process may use
    on CPU (never more than torch's default)."""

    max_new_tokens: int = 64
    ks: tuple[int, ...] = (1, 2, 4, 6, 8)
    batch_sizes: tuple[int, ...] = (1, 4, 8)
    stop_at_eos: bool = False
    dspark_target_only: bool = True
    cost_reps: int = 20
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise DsparkError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.ks or any(k < 1 for k in self.ks):
            raise DsparkError(f"draft lengths (--ks) must be integers >= 1, got {self.ks}")
        if any(b < 1 for b in self.batch_sizes):
            raise DsparkError(f"batch sizes must be integers >= 1, got {self.batch_sizes}")
        if self.cost_reps < 1:
            raise DsparkError(f"cost_reps must be >= 1, got {self.cost_reps}")
        if self.threads is not None and self.threads < 1:
            raise DsparkError(f"threads must be >= 1, got {self.threads}")


# -- timing -------------------------------------------------------------------------------------------

def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device) -> tuple[Any, float]:
    """(fn(), wall seconds), synchronising the device before and after."""
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def machine_threads() -> int:
    """CPU threads this process may use (its affinity mask), not the host's core count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def configure_threads(requested: int | None, device) -> int:
    """Set torch's intra-op threads for a CPU run without oversubscribing; returns the count used."""
    import torch

    if torch.device(device).type != "cpu":
        return torch.get_num_threads()
    n = requested if requested is not None else min(torch.get_num_threads(), machine_threads())
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


def measure_forward_seconds(model, prefix: Sequence[int], token_counts: Sequence[int], reps: int = 20,
                            warmup: int = 3) -> dict[int, float]:
    """Median seconds of one cached forward over T new tokens after `prefix`, for each T, through the
    forward the decoder itself runs (the lean Llama path where the model has that structure, else
    the HF forward; engine._Runner), so costs and the analytical bound describe dspark's loop.

    The cache holds the prefix; each timed forward appends T tokens (logits for all T, as a verify
    step needs) and is rolled back again, so every sample sees the same cache length. The sizes
    take turns within each repetition, so a burst of background load hits all of them alike
    instead of inflating one. Returns {T: seconds}."""
    import torch

    from dspark.decode.engine import _Runner, _Slots

    device = next(model.parameters()).device
    sizes = [int(t) for t in token_counts]
    samples: dict[int, list[float]] = {t: [] for t in sizes}
    with torch.inference_mode():
        slots = _Slots(_Runner(model, "model"), 1)
        slots.feed([list(prefix)], 0, False)
        n = len(prefix)
        inputs = {t: torch.full((1, t), int(prefix[-1]), dtype=torch.long, device=device) for t in sizes}
        for r in range(warmup + reps):
            for t in sizes:
                ids = inputs[t]
                _, dt = timed(lambda: slots.feed_tensor(ids, t, False), device)
                slots.keep([n])
                if r >= warmup:
                    samples[t].append(dt)
    return {t: analysis.median_seconds(v) for t, v in samples.items()}


@dataclass
class CostProfile:
    """Measured forward costs: the draft's and the target's 1-token step, and the target's forward
    over T tokens relative to its 1-token step (v(T))."""

    draft_step_s: float | None
    target_s_by_tokens: dict[int, float]

    @property
    def target_step_s(self) -> float:
        return self.target_s_by_tokens[1]

    @property
    def cost_ratio(self) -> float | None:
        return None if self.draft_step_s is None else analysis.cost_ratio(self.draft_step_s, self.target_step_s)

    @property
    def verify_costs(self) -> dict[int, float]:
        return analysis.relative_costs(self.target_s_by_tokens)

    def to_dict(self) -> dict[str, Any]:
        return {"cost_ratio": self.cost_ratio,
                "draft_step_ms": None if self.draft_step_s is None else 1e3 * self.draft_step_s,
                "target_step_ms": 1e3 * self.target_step_s,
                "verify_costs": {str(t): v for t, v in self.verify_costs.items()}}


def vocab_safe_prefix(model, prefix: Sequence[int]) -> list[int]:
    """The prefix with every id folded into the model's embedding range (a draft with another
    vocabulary; token values do not change a forward's cost)."""
    rows = int(model.get_input_embeddings().weight.shape[0])
    return [int(t) % rows for t in prefix]


def measure_costs(target_model, draft_model, prefix: Sequence[int], max_k: int, reps: int) -> CostProfile:
    target = measure_forward_seconds(target_model, prefix, range(1, max_k + 2), reps)
    draft = None
    if draft_model is not None:
        draft = measure_forward_seconds(draft_model, vocab_safe_prefix(draft_model, prefix), [1], reps)[1]
    return CostProfile(draft, target)


# -- methods ------------------------------------------------------------------------------------------

@dataclass
class MethodRun:
    """One method's outputs and totals over the prompts."""

    name: str
    outputs: list[list[int]] = field(default_factory=list)
    seconds: float = 0.0
    stats: DecodeStats | None = None

    @property
    def tokens(self) -> int:
        return sum(len(o) for o in self.outputs)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def hf_generate(model, prompt: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int], pad_id: int,
                assistant=None, tokenizers: tuple | None = None) -> list[int]:
    """Greedy Hugging Face generate (assisted when `assistant` is given); generated ids only.

    The attention mask is explicit: inferred from pad_token_id it would hide a prompt token that
    happens to equal the pad id (BOS often does). eos_token_id=[] disables stopping (None would fall
    back to the model's eos)."""
    import torch

    device = next(model.parameters()).device
    x = torch.tensor([list(prompt)], device=device)
    kwargs: dict[str, Any] = {}
    if assistant is not None:
        kwargs["assistant_model"] = assistant
        if tokenizers is not None:  # universal assisted generation (a draft with another tokenizer)
            kwargs["tokenizer"], kwargs["assistant_tokenizer"] = tokenizers
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=list(stop_ids), pad_token_id=pad_id, **kwargs)
    return out[0, x.shape[1]:].tolist()


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def _merge(stats: Sequence[DecodeStats]) -> DecodeStats:
    out = DecodeStats()
    for s in stats:
        out = out.merge(s)
    return out


# -- the benchmark ------------------------------------------------------------------------------------

def bench_prefix(prompts: Sequence[Sequence[int]], max_new_tokens: int, context: int) -> list[int]:
    """A cache prefix as long as the middle of a typical request: the median prompt length plus
    half the new tokens (token values do not change a forward's cost)."""
    lengths = sorted(len(p) for p in prompts)
    want = min(lengths[len(lengths) // 2] + max_new_tokens // 2, max(1, context - 64))
    pool = [t for p in prompts for t in p]
    return (pool * (want // len(pool) + 1))[:want]


def run_bench(target_model, draft_model, tokenizer, prompts: Sequence[Sequence[int]], config: BenchConfig,
              progress: Progress | None = None, draft_tokenizer=None) -> dict[str, Any]:
    """Benchmark the methods (see the module docstring) on `prompts` (token ids). Returns the report
    dict that `dspark bench --json` prints. draft_tokenizer: the draft's, when it may differ from the
    target's (then the pair may run cross-tokenizer)."""
    import torch

    from dspark.decode.engine import SpeculativeDecoder
    from dspark.decode.factory import make_decoder
    from dspark.decode.types import GenerationConfig

    if not prompts:
        raise DsparkError("bench needs at least one prompt")
    prompts = [list(p) for p in prompts]
    device = next(target_model.parameters()).device
    threads = configure_threads(config.threads, device)
    decoder = make_decoder(target_model, draft_model, tokenizer, "auto", draft_tokenizer=draft_tokenizer)
    mode = getattr(decoder, "mode", "same-tokenizer")
    compat = getattr(decoder, "compat", None)
    cross = mode == "cross-tokenizer"
    target_only = SpeculativeDecoder(target_model, None, tokenizer) if config.dspark_target_only else None
    if config.stop_at_eos:
        stop_ids = tuple(decoder.default_stop_ids)
        if not stop_ids:
            raise DsparkError("stop_at_eos: neither the tokenizer nor the target's generation config has an eos id")
    else:
        stop_ids = ()
    gcfg = GenerationConfig(max_new_tokens=config.max_new_tokens, stop_token_ids=stop_ids,
                            ignore_eos=not stop_ids)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = int(pad_id) if pad_id is not None else (stop_ids[0] if stop_ids else 0)

    def hf(assistant):
        if assistant is not None and cross:  # universal assisted generation needs both tokenizers
            kw = {"tokenizers": (tokenizer, draft_tokenizer)}
        else:
            kw = {}
        return lambda p: (hf_generate(target_model, p, config.max_new_tokens, stop_ids, pad_id, assistant, **kw),
                          None)

    def ds(dec, draft_length):
        def run(p):
            r = dec.generate([p], gcfg, draft_length=draft_length)[0]
            return r.token_ids, r.stats
        return run

    methods: dict[str, Callable] = {TARGET_ONLY: hf(None), HF_ASSISTED: hf(draft_model)}
    if target_only is not None:
        methods[DSPARK_TARGET_ONLY] = ds(target_only, None)
    for k in config.ks:
        methods[dspark_k(k)] = ds(decoder, str(k))
    methods[DSPARK_AUTO] = ds(decoder, "auto")

    notes: list[str] = []
    runs = {name: MethodRun(name) for name in methods}
    per_stats: dict[str, list[DecodeStats]] = {name: [] for name in methods}
    total = len(methods) * (len(prompts) + 1) + len(config.batch_sizes)
    done = 0

    def tick(label: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(label, done, total)

    with quiet_transformers(), torch.inference_mode():
        # microbenchmark first, while nothing else has touched the caches
        context = getattr(target_model.config, "max_position_embeddings", None) or 1 << 20
        prefix = bench_prefix(prompts, config.max_new_tokens, context)
        costs = measure_costs(target_model, draft_model, prefix, max(max(config.ks), 8), config.cost_reps)
        for name, fn in list(methods.items()):
            try:
                fn(prompts[0])
            except Exception as e:  # HF's universal assisted generation refuses some tokenizer pairs
                if not (cross and name == HF_ASSISTED):
                    raise
                del methods[name], runs[name], per_stats[name]
                notes.append(f"{HF_ASSISTED} left out: Hugging Face assisted generation failed for this "
                             f"cross-tokenizer pair ({type(e).__name__}: {str(e).strip().splitlines()[0][:160]})")
            tick(f"warm-up {name}")
        for i, p in enumerate(prompts):
            for name, fn in methods.items():
                (ids, st), dt = timed(lambda: fn(p), device)
                runs[name].outputs.append(list(ids))
                runs[name].seconds += dt
                if st is not None:
                    per_stats[name].append(st)
                tick(f"prompt {i + 1}/{len(prompts)} {name}")
        batched_runs = []
        for b in config.batch_sizes:
            res, dt = timed(lambda: decoder.generate(prompts, gcfg, draft_length="auto", batch_size=b), device)
            batched_runs.append((b, [r.token_ids for r in res], dt, _merge([r.stats for r in res])))
            tick(f"batch {b} {DSPARK_AUTO}")

    for name, sts in per_stats.items():
        if sts:
            runs[name].stats = _merge(sts)
    reference = runs[TARGET_ONLY].outputs
    mismatches = []
    for name, run in runs.items():
        for i, (got, want) in enumerate(zip(run.outputs, reference)):
            if got != want:
                mismatches.append({"method": name, "prompt": i, "first_difference": _first_difference(got, want)})
    batched = []
    base_tps = runs[TARGET_ONLY].tokens_per_s
    for b, outs, dt, st in batched_runs:
        ok = outs == reference
        for i, (got, want) in enumerate(zip(outs, reference)):
            if got != want:
                mismatches.append({"method": f"{DSPARK_AUTO}@batch{b}", "prompt": i,
                                   "first_difference": _first_difference(got, want)})
        tokens = sum(len(o) for o in outs)
        tps = tokens / dt if dt > 0 else 0.0
        batched.append({"method": DSPARK_AUTO, "batch_size": b, "tokens_per_s": tps,
                        "speedup": tps / base_tps if base_tps else None, "generated_tokens": tokens,
                        "seconds": dt, "mean_accepted_tokens": st.mean_accepted_tokens,
                        "acceptance_rate": st.acceptance_rate, "outputs_identical": ok})

    results = [_result_row(run, runs, costs, reference) for run in runs.values()]
    static = [r for r in results if r["method"].startswith("dspark-k")]
    best_static = max(static, key=lambda r: r["tokens_per_s"]) if static else None
    auto = next(r for r in results if r["method"] == DSPARK_AUTO)
    import transformers

    return {
        "results": results,
        "mode": mode,
        "tokenizer_compat": compat.to_dict() if compat is not None else None,
        "notes": notes,
        "greedy_outputs_identical": not mismatches,
        "mismatches": mismatches,
        "batched": batched,
        **costs.to_dict(),
        "best_static": best_static["method"] if best_static else None,
        "auto_vs_best_static": (auto["tokens_per_s"] / best_static["tokens_per_s"]
                                if best_static and best_static["tokens_per_s"] else None),
        "n_prompts": len(prompts),
        "mean_prompt_tokens": statistics.fmean(len(p) for p in prompts),
        "max_new_tokens": config.max_new_tokens,
        "stop_token_ids": list(stop_ids),
        "device": str(device),
        "dtype": str(next(target_model.parameters()).dtype).removeprefix("torch."),
        "threads": threads,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }


def _result_row(run: MethodRun, runs: dict[str, MethodRun], costs: CostProfile,
                reference: list[list[int]]) -> dict[str, Any]:
    base = runs[TARGET_ONLY].tokens_per_s
    hf_assisted = runs[HF_ASSISTED].tokens_per_s if HF_ASSISTED in runs else 0.0
    tps = run.tokens_per_s
    speedup = tps / base if base else None
    row: dict[str, Any] = {
        "method": run.name, "tokens_per_s": tps, "speedup": speedup,
        "ratio_to_hf_assisted": tps / hf_assisted if hf_assisted else None,
        "mean_accepted_tokens": None, "acceptance_rate": None, "acceptance_per_token": None,
        "mean_draft_length": None, "analytical_bound": None, "fraction_of_bound": None,
        "generated_tokens": run.tokens, "seconds": run.seconds, "outputs_identical": run.outputs == reference,
    }
    st = run.stats
    if run.name == TARGET_ONLY:
        row.update(mean_accepted_tokens=1.0, acceptance_rate=None, mean_draft_length=0.0, analytical_bound=1.0)
    elif st is not None:
        a = analysis.acceptance_from_counts(st.accepted, st.recovered)
        k = st.drafted / st.verify_steps if st.verify_steps else 0.0
        row.update(mean_accepted_tokens=st.mean_accepted_tokens,
                   acceptance_rate=st.acceptance_rate if st.drafted else None,
                   acceptance_per_token=a if st.drafted else None, mean_draft_length=k)
        if k == 0:
            row["analytical_bound"] = analysis.speedup_bound(0.0, 0, 0.0, costs.verify_costs)
        elif costs.cost_ratio is not None:
            row["analytical_bound"] = analysis.speedup_bound(a, k, costs.cost_ratio, costs.verify_costs)
            row["best_k_for_measured"] = analysis.best_k(a, costs.cost_ratio, costs.verify_costs,
                                                         k_max=max(costs.target_s_by_tokens) - 1)
    own = runs[DSPARK_TARGET_ONLY].tokens_per_s if DSPARK_TARGET_ONLY in runs else 0.0
    if run.name == TARGET_ONLY or not own:
        row["fraction_of_bound"] = analysis.fraction_of(speedup, row["analytical_bound"])
    else:  # the bound is relative to target-only decoding through the same forward: dspark's own
        row["speedup_vs_dspark_target_only"] = tps / own
        row["fraction_of_bound"] = analysis.fraction_of(tps / own, row["analytical_bound"])
    return row


# -- the stage `dspark bench` calls ---------------------------------------------------------------------

def bench_prompts(tokenizer, prompts_file: str | Path | None, task: str | None, n: int) -> tuple[list[str], str]:
    """Prompt texts from a .txt/.jsonl file or a task's eval split (first n); and where they came from."""
    from dspark.decode.run import check_prompt_texts, read_prompts_file

    _check_source(prompts_file, task, n)
    if prompts_file is not None:
        return check_prompt_texts(read_prompts_file(prompts_file)[:n]), f"file {prompts_file}"
    from dspark.tasks import resolve_prompts

    records = resolve_prompts(task, None, "eval", n)
    return check_prompt_texts([r.render(tokenizer) for r in records]), f"task {task} (eval split)"


def _check_source(prompts_file, task, n: int) -> None:
    if n < 1:
        raise DsparkError(f"--n must be >= 1, got {n}")
    if (prompts_file is None) == (task is None):
        raise DsparkError("give exactly one of --prompts FILE or --task NAME")
    if task is not None:
        from dspark.tasks import get_task

        get_task(task)


def bench(target: str, draft: str, config: BenchConfig, prompts_file: str | Path | None = None,
          task: str | None = None, n: int = 10, device: str = "auto", dtype: str = "auto",
          out: str | Path | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Load the pair, gather prompts, run `run_bench`; write the report to `out` (atomically) if given.
    The prompt source is checked before any model loads. The report's `memory` block is this
    process's resident memory measured over the whole command, loading included (dspark.memory):
    the baseline just before loading, the peak, both models' weights, and (peak - baseline) / weights."""
    from dspark.decode.run import encode, load_pair
    from dspark.io import atomic_write_json
    from dspark.memory import RssWindow
    from dspark.quantize.loading import model_bytes

    _check_source(prompts_file, task, n)
    if prompts_file is not None:
        bench_prompts(None, prompts_file, None, n)
    # the baseline is the runtime with the libraries loading uses imported (transformers' modeling
    # code alone is ~160 MB): the window measures what loading the pair and benchmarking it add
    import transformers.modeling_utils  # noqa: F401
    from transformers import AutoModelForCausalLM, convert_slow_tokenizer, tokenization_utils_tokenizers  # noqa: F401

    window = RssWindow().start()
    pair = load_pair(target, draft, device, dtype)
    texts, source = bench_prompts(pair.target.tokenizer, prompts_file, task, n)
    ids = encode(pair.target.tokenizer, texts)
    context = getattr(pair.target.config, "max_position_embeddings", None)
    if context is not None:
        for i, p in enumerate(ids):
            if len(p) + config.max_new_tokens > context:
                raise DsparkError(f"prompt {i} has {len(p)} tokens: with max_new_tokens {config.max_new_tokens} "
                                  f"it exceeds the target's context of {context} tokens")
    report = run_bench(pair.target.model, pair.draft.model, pair.target.tokenizer, ids, config, progress,
                       draft_tokenizer=pair.draft.tokenizer)
    weights = model_bytes(pair.target.model) + model_bytes(pair.draft.model)
    report = {"target": pair.target.name, "draft": pair.draft.name, "prompts": source, **report,
              "memory": window.report(weights)}
    if out is not None:
        atomic_write_json(out, report)
    return report


# -- presentation -----------------------------------------------------------------------------------------

def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def render_table(report: dict[str, Any]):
    """The rich tables `dspark bench` prints: the methods (acc. tok = mean accepted tokens per target
    forward, bonus included; accept = acceptance rate; K = mean drafts per step; bound = analytical
    speedup bound, % bound = speedup / bound; same = output identical to target-only), then dspark
    auto's batched throughput."""
    from rich.table import Table

    cross = " (cross-tokenizer)" if report.get("mode") == "cross-tokenizer" else ""
    title = (f"dspark bench: {report.get('target', 'target')} + {report.get('draft', 'draft')}{cross}, "
             f"{report['n_prompts']} prompts x {report['max_new_tokens']} new tokens, greedy, "
             f"{report['device']} {report['dtype']}, {report['threads']} threads")
    table = Table(title=title)
    table.add_column("method", no_wrap=True, min_width=len("dspark-target-only"))
    for col in ("tok/s", "speedup", "vs HF asst", "acc. tok", "accept", "K", "bound", "% bound", "same"):
        table.add_column(col, justify="right")
    for r in report["results"]:
        table.add_row(r["method"], _fmt(r["tokens_per_s"], ".1f"), _fmt(r["speedup"], ".2f") + "x",
                      _fmt(r["ratio_to_hf_assisted"], ".2f") + "x", _fmt(r["mean_accepted_tokens"], ".2f"),
                      _fmt(r["acceptance_rate"], ".1%"), _fmt(r["mean_draft_length"], ".2f"),
                      _fmt(r["analytical_bound"], ".2f"), _fmt(r["fraction_of_bound"], ".0%"),
                      "yes" if r["outputs_identical"] else "NO")
    batched = Table(title="dspark auto, batched throughput")
    for col in ("batch size", "tok/s", "speedup", "mean acc. tokens", "identical"):
        batched.add_column(col, justify="right")
    for b in report["batched"]:
        batched.add_row(str(b["batch_size"]), _fmt(b["tokens_per_s"], ".1f"), _fmt(b["speedup"], ".2f") + "x",
                        _fmt(b["mean_accepted_tokens"], ".2f"), "yes" if b["outputs_identical"] else "NO")
    return table, batched


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The lines under the table: costs, identity, auto vs the best static K."""
    c = report.get("cost_ratio")
    vc = report.get("verify_costs", {})
    lines = [f"cost ratio c = draft step / target step = {_fmt(c, '.3f')} "
             f"({_fmt(report.get('draft_step_ms'), '.3f')} ms / {_fmt(report.get('target_step_ms'), '.3f')} ms); "
             f"verify cost v(K+1): " + ", ".join(f"v({t})={v:.2f}" for t, v in list(vc.items())[1:6])]
    if report["greedy_outputs_identical"]:
        lines.append("greedy outputs identical across all methods: yes")
    else:
        bad = sorted({m["method"] for m in report["mismatches"]})
        lines.append(f"greedy outputs identical across all methods: NO ({', '.join(bad)} differ from target-only)")
    lines.extend(report.get("notes") or [])
    if report.get("best_static"):
        lines.append(f"dspark-auto vs best static ({report['best_static']}): {report['auto_vs_best_static']:.2f}x")
    mem = report.get("memory")
    if mem and mem.get("peak_rss_mb") is not None:
        lines.append(f"memory: peak RSS {mem['peak_rss_mb']:.0f} MB, {mem['baseline_rss_mb']:.0f} MB before loading; "
                     f"(peak - before) / weights ({mem['weights_mb']:.1f} MB) = "
                     f"{_fmt(mem['peak_growth_over_weights'], '.2f')}")
    return lines
