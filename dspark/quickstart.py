"""`dspark quickstart`: the main job end to end on the built-in family, offline, in one command.

Stages (each calls the stage function its own command uses; nothing is reimplemented here):

1. collect  tiny-code's continuations + top-K log-probs on the `code` task's train split  -> DIR/cache
2. distill  tiny-code-draft-s and tiny-code-draft-m toward tiny-code                       -> DIR/distill
3. quantize the distilled tiny-code-draft-m to int8 (skipped, with the reason, when no
            int8 backend is installed)                                                    -> DIR/quantized
4. select   among the base drafts, the distilled ones and the quantized one               -> DIR/select
5. export   the winner's bundle from selected.yaml                                        -> DIR/bundle
6. serve    the bundle on a free 127.0.0.1 port, send one real completion, stop it
7. summary  a table (acceptance, speedup per candidate, the winner, the bundle, the reply) -> DIR/quickstart.json

Re-running with the same DIR reuses finished work: collect and distill resume by themselves; the
quantized checkpoint, the select report and the bundle are reused when the inputs they were made
from (recorded in DIR/.quickstart/<stage>.json) are unchanged. An error in a stage is re-raised as
a one-line DsparkError that names the stage.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from dspark.errors import DsparkError

TARGET = "tiny-code"
DRAFTS = ("tiny-code-draft-s", "tiny-code-draft-m")
QUANTIZE_DRAFT = "tiny-code-draft-m"
QUANT_METHOD = "int8"
TASK = "code"
BASE_SUFFIX = "-base"
REQUEST_PROMPT = 'def is_palindrome(s):\n    """Return True if s reads the same backwards."""\n'
STATE_DIR = ".quickstart"
SUMMARY_FILE = "quickstart.json"
STAGES = ("collect", "distill", "quantize", "select", "export", "serve")


@dataclass(frozen=True)
class Budget:
    """Every size the quickstart uses. FULL fits ~10 minutes on 2 CPU cores; FAST is for tests."""

    collect_prompts: int
    collect_tokens: int
    top_k: int
    distill_steps: int
    distill_batch: int
    distill_eval_prompts: int
    distill_eval_tokens: int
    select_prompts: int
    select_tokens: int
    select_ks: tuple[int, ...]
    select_cost_reps: int
    select_batch: int
    guard_prompts: int
    guard_tokens: int
    request_tokens: int


FULL = Budget(collect_prompts=64, collect_tokens=64, top_k=64, distill_steps=100, distill_batch=8,
              distill_eval_prompts=4, distill_eval_tokens=32, select_prompts=10, select_tokens=48,
              select_ks=(1, 2, 4), select_cost_reps=5, select_batch=8, guard_prompts=8, guard_tokens=32,
              request_tokens=48)
FAST = Budget(collect_prompts=8, collect_tokens=16, top_k=16, distill_steps=2, distill_batch=4,
              distill_eval_prompts=1, distill_eval_tokens=8, select_prompts=2, select_tokens=8,
              select_ks=(2,), select_cost_reps=1, select_batch=2, guard_prompts=1, guard_tokens=8,
              request_tokens=16)


@dataclass
class QuickstartResult:
    out: Path
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    report: dict[str, Any] | None = None
    bundle: Path | None = None
    response: dict[str, Any] | None = None
    seconds: float = 0.0

    @property
    def winner(self) -> str | None:
        return None if self.report is None else self.report.get("winner")

    def summary(self) -> dict[str, Any]:
        rows = []
        for r in (self.report or {}).get("candidates", []):
            rows.append({k: r.get(k) for k in ("name", "status", "quantization", "acceptance_rate",
                                                "mean_accepted_tokens", "speedup", "draft_length", "tokens_per_s")})
        choice = ((self.response or {}).get("choices") or [{}])[0]
        return {"out": str(self.out), "stages": self.stages, "winner": self.winner, "candidates": rows,
                "baseline_tokens_per_s": (self.report or {}).get("baseline_tokens_per_s"),
                "bundle": str(self.bundle) if self.bundle else None,
                "request": {"prompt": REQUEST_PROMPT, "text": choice.get("text"),
                            "usage": (self.response or {}).get("usage"),
                            "speculative": (self.response or {}).get("speculative")},
                "seconds": round(self.seconds, 2)}


@contextlib.contextmanager
def stage_errors(name: str) -> Iterator[None]:
    """Any failure inside a stage becomes one line naming the stage (the cause stays chained for
    debugging); the CLI prints it as `error: ...`."""
    try:
        yield
    except DsparkError as e:
        raise type(e)(f"quickstart stage {name!r} failed: {e}") from e
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # a bug or a library failure: still one line, naming the stage
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DsparkError(f"quickstart stage {name!r} failed: {type(e).__name__}: {first}") from e


def fingerprint(obj: Any) -> str:
    """sha256 of a JSON-able value (what a reusable stage output was made from)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_digest(path: Path) -> str:
    from dspark.io import sha256_file

    return sha256_file(path)


def _state_path(out: Path, stage: str) -> Path:
    return out / STATE_DIR / f"{stage}.json"


def reusable(out: Path, stage: str, key: str, *outputs: Path) -> bool:
    """True when the stage's outputs exist and were made from inputs with this fingerprint."""
    p = _state_path(out, stage)
    if not p.is_file() or not all(o.exists() for o in outputs):
        return False
    try:
        return json.loads(p.read_text(encoding="utf-8")).get("inputs") == key
    except (OSError, ValueError):
        return False


def mark_done(out: Path, stage: str, key: str) -> None:
    from dspark.io import atomic_write_json

    atomic_write_json(_state_path(out, stage), {"inputs": key})


def check_budget(out: Path, budget: Budget) -> None:
    """A folder holds one budget's run: the stages refuse to resume with other settings, so say
    so before any work, in one line."""
    p = _state_path(out, "budget")
    if p.is_file() and not reusable(out, "budget", fingerprint(asdict(budget))):
        other = "without --fast" if budget is FAST else "with --fast (or other budgets)"
        raise DsparkError(f"--out {str(out)!r} holds a quickstart run made {other}: pass another --out, or delete "
                          "the folder to start over")


def base_candidate_files(out: Path) -> list[Path]:
    """Candidate files for the undistilled built-in drafts, named `<draft>-base` so they do not
    clash with the distilled candidates (which distill names after the draft)."""
    from dspark.config.candidate import Candidate, write_candidate

    folder = out / "base-candidates"
    files = []
    for d in DRAFTS:
        cand = Candidate(name=f"{d}{BASE_SUFFIX}", target=TARGET, draft=d,
                         notes=f"the built-in {d} as shipped (not distilled): the baseline distillation must beat")
        files.append(write_candidate(folder / f"{d}{BASE_SUFFIX}.yaml", cand,
                                     header="dspark candidate written by `dspark quickstart`: an undistilled draft"))
    return files


def quantize_skip_reason(method: str, device: str) -> str | None:
    """Why the quantize stage cannot run here (its library missing), or None."""
    from dspark.models.loading import parse_device
    from dspark.quantize.backends import choose_backend

    try:
        choose_backend(method, parse_device(device))
    except DsparkError as e:
        return str(e)
    return None


def send_completion(base_url: str, model: str, prompt: str, max_tokens: int, timeout: float = 300.0) -> dict:
    """One greedy /v1/completions request; the JSON reply (HTTP errors raise DsparkError)."""
    import httpx

    r = httpx.post(f"{base_url}/v1/completions", timeout=timeout,
                   json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    if r.status_code != 200:
        raise DsparkError(f"POST /v1/completions answered HTTP {r.status_code}: {r.text[:200]}")
    return r.json()


def run_quickstart(out: str | Path = "dspark-quickstart", *, fast: bool = False, device: str = "auto",
                   console=None, log: Callable[[str], None] | None = None) -> QuickstartResult:
    """Run every stage (see the module docstring) and return what they produced."""
    from rich.console import Console

    console = console or Console(stderr=True)
    log = log or (lambda m: console.print(m, highlight=False, soft_wrap=True))
    budget = FAST if fast else FULL
    out = Path(out).expanduser().resolve()
    t0 = time.perf_counter()
    with stage_errors("setup"):
        _check_models()
        check_budget(out, budget)
        out.mkdir(parents=True, exist_ok=True)
        mark_done(out, "budget", fingerprint(asdict(budget)))
    res = QuickstartResult(out=out)

    def begin(i: int, name: str, what: str) -> float:
        console.rule(f"[bold][{i}/{len(STAGES) + 1}] {name}[/]: {what}")
        return time.perf_counter()

    def finish(name: str, t: float, **info) -> None:
        res.stages[name] = {"seconds": round(time.perf_counter() - t, 2), **info}
        log(f"[green]{name} done[/] in {res.stages[name]['seconds']:.1f} s")

    # 1. collect
    cache = out / "cache"
    t = begin(1, "collect", f"{TARGET} on the {TASK!r} task (train split), {budget.collect_prompts} prompts x "
                            f"{budget.collect_tokens} tokens -> {cache}")
    with stage_errors("collect"):
        from dspark.distill.collect import run_collect

        c = run_collect(TARGET, cache, task=TASK, num_prompts=budget.collect_prompts, split="train", k=budget.top_k,
                        max_new_tokens=budget.collect_tokens, device=device, console=console, log=log)
    finish("collect", t, status=c.status, path=str(cache), rows=c.to_dict()["rows"],
           positions=c.to_dict()["positions"])

    # 2. distill
    distill_dir = out / "distill"
    t = begin(2, "distill", f"{', '.join(DRAFTS)} toward {TARGET}, {budget.distill_steps} steps each -> "
                            f"{distill_dir}")
    with stage_errors("distill"):
        from dspark.distill.distill import EvalSettings, run_distill
        from dspark.distill.train import TrainConfig

        summary = run_distill(TARGET, list(DRAFTS), distill_dir, task=TASK, cache=cache,
                              train=TrainConfig(steps=budget.distill_steps, batch_size=budget.distill_batch),
                              evaluation=EvalSettings(prompts=budget.distill_eval_prompts,
                                                      max_new_tokens=budget.distill_eval_tokens),
                              device=device, console=console, log=log)
        distilled = {d["name"]: Path(d["candidate"]) for d in summary["drafts"]}
    finish("distill", t, candidates=[str(p) for p in distilled.values()])

    # 3. quantize
    quant_dir = out / "quantized" / f"{QUANTIZE_DRAFT}-{QUANT_METHOD}"
    quant_file: Path | None = None
    t = begin(3, "quantize", f"the distilled {QUANTIZE_DRAFT} to {QUANT_METHOD} -> {quant_dir}")
    with stage_errors("quantize"):
        reason = quantize_skip_reason(QUANT_METHOD, device)
        if reason is not None:
            log(f"[yellow]quantize skipped[/]: {reason}")
            finish("quantize", t, skipped=reason)
        else:
            from dspark.quantize.run import CANDIDATE_FILE, QuantizeOptions, quantize_draft

            source = distilled[QUANTIZE_DRAFT]
            key = fingerprint({"source": file_digest(source), "method": QUANT_METHOD, "budget": [
                budget.guard_prompts, budget.guard_tokens], "device": device})
            quant_file = quant_dir / CANDIDATE_FILE
            if reusable(out, "quantize", key, quant_file):
                log(f"{quant_file}: already quantized from the same draft, reused")
            else:
                opts = QuantizeOptions(method=QUANT_METHOD, target=TARGET, guard_prompts=budget.guard_prompts,
                                       guard_tokens=budget.guard_tokens, device=device, force=True)
                q = quantize_draft(quant_dir, opts, candidate=source, log=log)
                quant_file = q.candidate_file
                mark_done(out, "quantize", key)
            finish("quantize", t, candidate=str(quant_file))

    # 4. select
    select_dir = out / "select"
    t = begin(4, "select", f"base, distilled and quantized drafts on {budget.select_prompts} eval prompts x "
                           f"{budget.select_tokens} tokens -> {select_dir}")
    with stage_errors("select"):
        from dspark.select.report import REPORT_JSON, SELECTED_YAML

        files = base_candidate_files(out) + list(distilled.values()) + ([quant_file] if quant_file else [])
        config = _select_config(budget)
        key = fingerprint({"candidates": [[str(f), file_digest(f)] for f in files], "config": asdict(config),
                           "device": device})
        report_file, selected = select_dir / REPORT_JSON, select_dir / SELECTED_YAML
        if reusable(out, "select", key, report_file, selected):
            log(f"{report_file}: already scored the same candidates, reused")
            report = json.loads(report_file.read_text(encoding="utf-8"))
        else:
            report = _run_select(files, config, select_dir, device, console)
            mark_done(out, "select", key)
        res.report = report
        if report.get("winner") is None:
            raise DsparkError(f"no candidate could be scored (see {select_dir / 'report.md'})")
    finish("select", t, winner=report["winner"], report=str(report_file))

    # 5. export
    bundle = out / "bundle"
    t = begin(5, "export", f"the winner {report['winner']!r} from {selected} -> {bundle}")
    with stage_errors("export"):
        from dspark.bundle import MANIFEST_NAME
        from dspark.bundle.export import export_bundle

        key = fingerprint({"selected": file_digest(selected)})
        if reusable(out, "export", key, bundle / MANIFEST_NAME):
            log(f"{bundle}: already exported from the same selection, reused")
        else:
            export_bundle(bundle, selection=selected, force=True, log=log)
            mark_done(out, "export", key)
        res.bundle = bundle
    finish("export", t, bundle=str(bundle))

    # 6. serve one request
    t = begin(6, "serve", f"{bundle} on a free 127.0.0.1 port, one completion request")
    with stage_errors("serve"):
        res.response, url = _serve_one(bundle, device, budget.request_tokens, log)
    finish("serve", t, url=url)

    res.seconds = time.perf_counter() - t0
    from dspark.io import atomic_write_json

    atomic_write_json(out / SUMMARY_FILE, res.summary())
    return res


def _check_models() -> None:
    from dspark.distill.collect import check_target_available

    for name in (TARGET, *DRAFTS):
        check_target_available(name)


def _select_config(budget: Budget):
    from dspark.select.measure import SelectConfig

    # one thread: the built-in models gain nothing from a second one at batch 1, and on a busy
    # 2-core machine a preempted OpenMP thread makes every op wait (the timings, and so the ranking,
    # become noise: measured c of one architecture varied 0.28 vs 0.53 between blocks with 2 threads)
    return SelectConfig(n=budget.select_prompts, max_new_tokens=budget.select_tokens, ks=budget.select_ks,
                        cost_reps=budget.select_cost_reps, batch_size=budget.select_batch, threads=1)


def _run_select(files: list[Path], config, out: Path, device: str, console) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from dspark.select.run import select

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        bar = progress.add_task("loading the target", total=None)

        def on_step(label: str, done: int, total: int) -> None:
            progress.update(bar, description=label, completed=done, total=total)

        return select([str(f) for f in files], TARGET, config, task=TASK, out=out, device=device,
                      progress=on_step, command="dspark quickstart")


def _serve_one(bundle: Path, device: str, max_tokens: int, log) -> tuple[dict, str]:
    from dspark.serve.app import create_app
    from dspark.serve.runner import start_in_thread
    from dspark.serve.runtime import runtime_from_bundle

    runtime = runtime_from_bundle(bundle, device=device, log=log)
    server = start_in_thread(create_app(runtime, max_batch_size=8), host="127.0.0.1", port=0)
    try:
        log(f"serving {runtime.model_id} at {server.base_url}/v1; sending one completion request")
        reply = send_completion(server.base_url, runtime.model_id, REQUEST_PROMPT, max_tokens)
    finally:
        server.stop()
        log("server stopped")
    return reply, server.base_url


def render_summary(result: QuickstartResult):
    """The closing rich renderables: the candidates table and the lines under it."""
    from rich.table import Table

    s = result.summary()
    table = Table(title=f"dspark quickstart: drafts for {TARGET} ({len(s['candidates'])} candidates)")
    for col in ("candidate", "status", "quant", "acceptance", "tokens/step", "speedup", "draft length"):
        table.add_column(col, justify="left" if col in ("candidate", "status", "draft length") else "right")

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    for r in s["candidates"]:
        mark = " (winner)" if r["name"] == s["winner"] else ""
        table.add_row(r["name"] + mark, str(r["status"]), str(r["quantization"] or "none"),
                      fmt(r["acceptance_rate"], ".3f"), fmt(r["mean_accepted_tokens"], ".2f"),
                      fmt(r["speedup"], ".2f") + ("x" if r["speedup"] is not None else ""),
                      str(r["draft_length"] or "-"))
    req = s["request"]
    spec = req["speculative"] or {}
    lines = [
        f"winner: {s['winner']}",
        f"bundle: {s['bundle']}  (serve it: dspark serve-bundle {s['bundle']})",
        f"request: {req['prompt']!r} -> {req['text']!r}",
        f"speculative: accepted {spec.get('accepted')} of {spec.get('drafted')} drafted "
        f"(acceptance {fmt(spec.get('acceptance_rate'), '.3f')}), {fmt(spec.get('mean_accepted_tokens'), '.2f')} "
        f"tokens per target forward, draft length {spec.get('draft_length')}",
        "stages: " + ", ".join(f"{k} {v['seconds']:.1f} s" + (" (skipped)" if "skipped" in v else "")
                               for k, v in s["stages"].items()) + f"; total {s['seconds']:.1f} s",
        f"everything is under {s['out']} (summary: {SUMMARY_FILE})",
    ]
    return table, lines


__all__ = ["FAST", "FULL", "Budget", "QuickstartResult", "render_summary", "run_quickstart", "stage_errors"]
