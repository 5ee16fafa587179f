"""The `dspark` command line: thin. Each command parses its options, calls one stage function and
prints. User errors (`DsparkError`) become one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from dspark.errors import DsparkError
from dspark.serve.runner import DEFAULT_MAX_BODY_MB

app = typer.Typer(name="dspark", no_args_is_help=True, add_completion=False,
                  help="Distil, select, quantize and serve draft models for speculative decoding.")
console = Console()
err_console = Console(stderr=True)


def user_errors(fn: Callable) -> Callable:
    """Turn DsparkError into `error: ...` + exit 2 (the contract every command follows)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DsparkError as e:
            # escape: messages quote user values and names like 'dspark[train]', never markup
            err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code)

    return wrapper


@contextlib.contextmanager
def resumable(out: Path):
    """Ctrl-C in a resumable command: one line saying how to resume, exit 130 (the shell's code for
    SIGINT), instead of a traceback."""
    try:
        yield
    except KeyboardInterrupt:
        err_console.print(f"interrupted: {out} keeps the work finished so far; run the same command again to resume",
                          highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None


@app.callback()
def _root(version: bool = typer.Option(False, "--version", help="Print the dspark version and exit.")):
    """Distil, select, quantize and serve draft models for speculative decoding."""
    if version:
        from dspark import __version__

        console.print(f"dspark {__version__}")
        raise typer.Exit(0)


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


@app.command("build-tiny-family")
@user_errors
def build_tiny_family_cmd(
    recipe: Path = typer.Option(Path(__file__).parent / "recipes" / "tiny-code.yaml", help="Family recipe YAML."),
    out: Path = typer.Option(..., help="Folder that receives one model folder per recipe entry."),
    only: Optional[List[str]] = typer.Option(None, help="Build only these model names."),
):
    """Train the built-in tiny family (tokenizer + target + drafts) on CPU from a recipe."""
    from dspark.models.tiny import TinyFamilyRecipe, build_family
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    spec = TinyFamilyRecipe.load_yaml(recipe)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[loss]}"),
                  TimeRemainingColumn(), console=console) as progress:
        bars: dict[str, int] = {}

        def on_step(name: str, step: int, steps: int, loss: float) -> None:
            if name not in bars:
                bars[name] = progress.add_task(name, total=steps, loss="")
            progress.update(bars[name], completed=step, loss=f"loss {loss:.3f}")

        results = build_family(spec, out, only=only, progress=on_step, log=console.print)
    for name, meta in results.items():
        console.print(f"{name}: {meta['parameters']:,} params, held-out loss {meta['heldout_loss']}")


@app.command("models")
@user_errors
def models_cmd(
    name: Optional[str] = typer.Argument(None, help="Show one model (alias, built-in, hub id or folder); "
                                                     "fails if it is not on this machine."),
    load: bool = typer.Option(False, "--load", help="With NAME: load it and report its real sizes."),
    device: str = typer.Option("cpu", help="With --load: cpu, cuda, cuda:N or auto."),
    dtype: str = typer.Option("float32", help="With --load: float32, bfloat16, float16 or auto."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """List the built-in models and aliases (what each resolves to, whether it is here), or show one."""
    from rich.table import Table

    from dspark.models.loading import model_info
    from dspark.models.registry import (BUILD_TINY_COMMAND, DOWNLOAD_COMMAND, format_parameters,
                                        list_models)

    if name is not None:
        info = model_info(name, load=load, device=device, dtype=dtype)
        if as_json:
            print_json(info)
        else:
            for key, value in info.items():
                console.print(f"{key}: {value}", highlight=False)
        return
    rows = list_models()
    if as_json:
        print_json(rows)
        return
    table = Table(title="dspark models")
    for col in ("name", "kind", "resolves to", "here", "params", "family", "notes"):
        table.add_column(col, overflow="fold")
    for r in rows:
        # a folder or file path by its last part: the full path is in --json
        shown = Path(r["resolves_to"]).name if Path(r["resolves_to"]).is_absolute() else r["resolves_to"]
        table.add_row(r["name"], r["kind"], shown, "yes" if r["available"] else "no",
                      format_parameters(r["parameters"]), r["family"], r["notes"])
    console.print(table)
    missing = [r for r in rows if not r["available"]]
    if any(r["kind"] == "builtin" for r in missing):
        console.print(f"missing built-ins: {BUILD_TINY_COMMAND}", highlight=False, soft_wrap=True)
    if any(r["kind"] == "alias" for r in missing):
        console.print(f"aliases not here are not in the Hugging Face cache: `{DOWNLOAD_COMMAND} <hub id>` "
                      "(needs network and access)", highlight=False, soft_wrap=True)


@app.command("draft-init")
@user_errors
def draft_init_cmd(
    target: str = typer.Option(..., "--target", help="Target model: built-in name, alias, folder or .gguf file."),
    out: Path = typer.Option(..., "--out", help="Folder for the draft (a Hugging Face model folder)."),
    layers: Optional[str] = typer.Option(None, "--layers", help="N: the target's first N layers; I,J,...: these "
                                                                "layers; with --width: N fresh layers."),
    every: Optional[int] = typer.Option(None, "--every", help="K: every K-th target layer from layer 0, and the last."),
    width: Optional[int] = typer.Option(None, "--width", help="A narrower fresh body of this width (same tokenizer; "
                                                              "embedding projected from the target's)."),
    seed: int = typer.Option(0, "--seed", help="Seed of a narrow draft's fresh body."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the draft's record as JSON."),
):
    """Make a draft from the target itself: some of its layers (with its embeddings, final norm and head),
    or a narrower fresh body sharing its tokenizer. Distil it next (`dspark distill --draft OUT`)."""
    from dspark.models.draft_init import init_draft, spec_from_options
    from dspark.models.registry import format_parameters

    spec = spec_from_options(layers, every, width, seed)
    result = init_draft(target, out, spec, force=force)
    m = result.meta
    if as_json:
        print_json(result.summary())
        return
    shape = (f"layers {m['layers']} of the target's {m['target_layers']}" if m["method"] == "truncate"
             else f"{m['shape']['num_hidden_layers']} fresh layers at width {m['width']} (target: "
                  f"{m['target_layers']} layers)")
    console.print(f"draft {out}: {spec.text}, {shape}; {format_parameters(m['parameters'])} parameters "
                  f"({m['parameters']:,}), {m['bytes'] / 1e6:.1f} MB of weights", highlight=False, soft_wrap=True)


@app.command("tasks")
@user_errors
def tasks_cmd(
    data: Optional[str] = typer.Option(None, "--data", help="Check this data instead (a .jsonl/.json/"
                                                            ".parquet/.txt file, a folder of them, or a hub id)."),
    counts: bool = typer.Option(True, "--counts/--no-counts", help="Count prompts per split (reads every source)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """List the built-in tasks (source, whether it is here, prompts per split), or check user data."""
    from rich.table import Table

    from dspark.tasks import describe_sources

    rows = describe_sources(data, count=counts)
    if as_json:
        print_json(rows)
        return
    table = Table(title="dspark tasks" if data is None else "dspark data")
    for col in ("name", "source", "here", "train", "eval", "notes"):
        table.add_column(col, overflow="fold")
    for r in rows:
        c = r["counts"] or {}
        table.add_row(r["name"], r["source"], "yes" if r["available"] else "no",
                      str(c.get("train", "-")), str(c.get("eval", "-")), r["note"])
    console.print(table)


@app.command("collect")
@user_errors
def collect_cmd(
    target: str = typer.Option(..., "--target", help="Target model: built-in name, alias, hub id or folder."),
    out: Path = typer.Option(..., "--out", help="Cache folder (created; an interrupted one is resumed)."),
    task: Optional[str] = typer.Option(None, "--task", help="Built-in task name (see `dspark tasks`)."),
    data: Optional[str] = typer.Option(None, "--data", help="User data: .jsonl/.json/.parquet/.txt, folder or hub id."),
    num_prompts: Optional[int] = typer.Option(None, "--num-prompts", help="Use at most this many prompts."),
    split: str = typer.Option("train", "--split", help="Prompt split: train (default), eval or all."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="Continuation length per prompt."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy; > 0 samples (seeded per prompt)."),
    top_k: int = typer.Option(64, "--top-k", help="K: target log-probs stored per position (+ the tail mass)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Prompts per generation batch."),
    shard: Optional[str] = typer.Option(None, "--shard", help="I/N: collect only prompts with index % N == I."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto."),
    dtype: str = typer.Option("auto", "--dtype", help="float32, bfloat16, float16 or auto."),
    engine: str = typer.Option("hf", "--engine", help="hf (default) or vllm (needs vllm on a GPU machine)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed (each prompt's generator is seeded from it)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
):
    """Collect the target's own continuations and its top-K log-probs into a logits cache."""
    from dspark.distill.collect import human_bytes, run_collect

    say = (lambda m: err_console.print(m, highlight=False, soft_wrap=True)) if as_json else \
        (lambda m: console.print(m, highlight=False, soft_wrap=True))
    with resumable(out):
        result = run_collect(target, out, task=task, data=data, num_prompts=num_prompts, split=split, k=top_k,
                             max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                             batch_size=batch_size, shard=shard, device=device, dtype=dtype, engine=engine,
                             console=err_console if as_json else console, log=say)
    summary = result.to_dict()
    if as_json:
        print_json(summary)
        return
    bpp = summary["bytes_per_position"]
    say(f"{summary['status']}: {out} holds {summary['rows']} prompts, {summary['positions']:,} positions, "
        f"{human_bytes(summary['bytes'])}" + (f" ({bpp:.1f} B/position)" if bpp else ""))
    if summary["new_positions"]:
        say(f"{summary['tokens_per_s']:,.1f} tokens/s; writing took {100 * summary['write_fraction']:.1f}% of the time")


@app.command("merge-caches")
@user_errors
def merge_caches_cmd(
    caches: List[Path] = typer.Argument(..., help="The cache folders of every `--shard I/N` run."),
    out: Path = typer.Option(..., "--out", help="New folder for the merged cache."),
    as_json: bool = typer.Option(False, "--json", help="Print the merged manifest's counts as JSON."),
):
    """Join the caches of `dspark collect --shard I/N` runs into one cache."""
    from dspark.distill.cache import merge_caches

    merged = merge_caches(caches, out)
    summary = {"out": str(out), "shards": merged.shards.count, **merged.counts.model_dump(),
               "bytes_per_position": merged.bytes_per_position}
    if as_json:
        print_json(summary)
    else:
        console.print(f"merged {len(caches)} caches into {out}: {summary['rows']} prompts, "
                      f"{summary['positions']:,} positions", highlight=False)


@app.command("generate")
@user_errors
def generate_cmd(
    target: str = typer.Option(..., help="Target model: folder, hub id, alias or built-in name."),
    draft: Optional[str] = typer.Option(None, help="Draft model (any tokenizer). Default: "
                                                   "tiny-code-draft-s for the built-in target tiny-code; "
                                                   "required for any other target unless --no-draft."),
    no_draft: bool = typer.Option(False, "--no-draft", help="Decode with the target alone."),
    prompt: Optional[str] = typer.Option(None, help="One prompt text."),
    prompts: Optional[Path] = typer.Option(None, help="A .txt file (one prompt per line) or .jsonl file "
                                                      "(a 'prompt' field per line)."),
    max_new_tokens: int = typer.Option(128, help="Tokens to generate at most per prompt."),
    temperature: float = typer.Option(0.0, help="0 is greedy (output identical to the target's own)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass, in (0, 1]."),
    top_k: int = typer.Option(0, help="Sample among the k most likely tokens (0: all)."),
    seed: Optional[int] = typer.Option(None, help="Seed for sampling."),
    draft_length: str = typer.Option("auto", help="auto, K, static:K, confidence:T[:KMAX], goodput[:KMAX] "
                                                  "or learned[:T]."),
    batch_size: Optional[int] = typer.Option(None, help="Decode this many prompts together (default: all)."),
    json_schema: Optional[Path] = typer.Option(None, "--json-schema", help="Constrain the output to this "
                                                                          "JSON schema file."),
    regex: Optional[str] = typer.Option(None, help="Constrain the output to this regular expression."),
    grammar: Optional[Path] = typer.Option(None, help="Constrain the output to this EBNF grammar file."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto."),
    dtype: str = typer.Option("auto", help="float32, bfloat16, float16 or auto (float32 on CPU)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per prompt, in input order."),
):
    """Generate text with speculative decoding (lossless: greedy output equals the target's own)."""
    from rich.text import Text

    from dspark.decode.run import GenerateOptions, generate, prompt_source, stats_line

    texts = prompt_source(prompt, prompts)
    options = GenerateOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                              seed=seed, draft_length=draft_length, batch_size=batch_size,
                              json_schema=None if json_schema is None else str(json_schema), regex=regex,
                              grammar=None if grammar is None else str(grammar), device=device, dtype=dtype)
    rows = generate(target, texts, draft=draft, no_draft=no_draft, options=options)
    for i, row in enumerate(rows):
        if row["finish_reason"] == "dead_end":
            err_console.print(f"warning: prompt {i}: the constraint allowed no further token before it was complete, "
                              "so the output does not match it (finish reason dead_end)", highlight=False,
                              soft_wrap=True)
    for row in rows:
        if as_json:
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
            continue
        console.print(Text(row["prompt"], style="dim") + Text(row["text"]))
        console.print(Text(stats_line(row["stats"]), style="cyan"))


@app.command("bench")
@user_errors
def bench_cmd(
    target: str = typer.Option(..., help="Target model: folder, hub id, alias or built-in name."),
    draft: str = typer.Option(..., help="Draft model (any tokenizer: another one is decoded cross-tokenizer)."),
    prompts: Optional[Path] = typer.Option(None, help="A .txt (one prompt per line) or .jsonl prompts file."),
    task: Optional[str] = typer.Option(None, help="A built-in task; its eval split is used (see `dspark tasks`)."),
    n: int = typer.Option(10, help="Number of prompts."),
    max_new_tokens: int = typer.Option(64, help="New tokens per prompt (every method writes exactly this many "
                                                "unless --stop-at-eos)."),
    ks: str = typer.Option("1,2,4,6,8", help="Static draft lengths to compare, comma-separated."),
    batch_sizes: str = typer.Option("1,4,8", help="Batch sizes for dspark auto's throughput."),
    stop_at_eos: bool = typer.Option(False, "--stop-at-eos", help="Stop every method at the target's eos "
                                                                  "(default: eos disabled for all)."),
    threads: Optional[int] = typer.Option(None, help="CPU threads (default: those this process may use)."),
    cost_reps: int = typer.Option(20, help="Timed repetitions per forward in the cost microbenchmark."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto."),
    dtype: str = typer.Option("auto", help="float32, bfloat16, float16 or auto (float32 on CPU)."),
    out: Optional[Path] = typer.Option(None, help="Also write the JSON report to this file."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON report instead of tables."),
):
    """Benchmark dspark against HF generate and HF assisted generation (same prompts, greedy, one process)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from dspark.decode.bench import BenchConfig, bench, parse_int_list, render_table, summary_lines

    config = BenchConfig(max_new_tokens=max_new_tokens, ks=parse_int_list(ks, "--ks"),
                         batch_sizes=parse_int_list(batch_sizes, "--batch-sizes"), stop_at_eos=stop_at_eos,
                         threads=threads, cost_reps=cost_reps)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=err_console,
                  transient=True) as progress:
        bar = progress.add_task("bench", total=None)

        def on_step(label: str, done: int, total: int) -> None:
            progress.update(bar, description=label, completed=done, total=total)

        report = bench(target, draft, config, prompts_file=prompts, task=task, n=n, device=device, dtype=dtype,
                       out=out, progress=on_step)
    if as_json:
        print_json(report)
        return
    # a pipe or file gets rich's 80 columns, too narrow for the table: give it room
    out_console = console if console.is_terminal else Console(width=max(console.width, 130))
    for table in render_table(report):
        out_console.print(table)
    for line in summary_lines(report):
        out_console.print(line, highlight=False, soft_wrap=True)


@app.command("export")
@user_errors
def export_cmd(
    out: Path = typer.Option(..., "--out", help="Bundle folder to write (built aside, renamed into place)."),
    target: Optional[str] = typer.Option(None, "--target", help="Target model (alias, built-in, hub id or folder)."),
    draft: Optional[str] = typer.Option(None, "--draft", help="Draft model folder or name."),
    selection: Optional[Path] = typer.Option(None, "--selection",
                                             help="selected.yaml from `dspark select` (instead of --target/--draft)."),
    include_target: bool = typer.Option(False, "--include-target", help="Copy a small local target into BUNDLE/target."),
    draft_length: Optional[str] = typer.Option(None, "--draft-length",
                                               help="Draft-length policy (auto, K, confidence:T, goodput, learned); "
                                                    "default: the selection's, else auto."),
    name: Optional[str] = typer.Option(None, "--name", help="Bundle name = the model id the server answers to."),
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle at --out."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Package a target/draft pair as a verifiable bundle (draft weights, policy, numbers, vLLM/SGLang configs)."""
    from dspark.bundle.export import export_bundle

    log = (lambda _m: None) if as_json else (lambda m: err_console.print(m, highlight=False, soft_wrap=True))
    result = export_bundle(out, target=target, draft=draft, selection=selection, include_target=include_target,
                           draft_length=draft_length, name=name, force=force, log=log)
    summary = result.summary()
    if as_json:
        print_json(summary)
        return
    for key in ("bundle", "name", "target", "draft", "draft_length", "num_speculative_tokens", "target_included",
                "files", "bytes"):
        console.print(f"{key}: {summary[key]}", highlight=False)
    for note in summary["notes"]:
        console.print(f"note: {note}", highlight=False, soft_wrap=True)


@app.command("verify-bundle")
@user_errors
def verify_bundle_cmd(
    bundle: Path = typer.Argument(..., help="Bundle folder written by `dspark export`."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto."),
    dtype: str = typer.Option("float32", help="float32, bfloat16, float16 or auto."),
    prompt: Optional[str] = typer.Option(None, help="Prompt for the decode check."),
    max_new_tokens: int = typer.Option(16, help="Tokens decoded by the check."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    """Check a bundle: schema, file hashes, weight names, target identity, and a lossless decode."""
    from dspark.bundle.verify import DEFAULT_PROMPT, verify_bundle

    log = (lambda _m: None) if as_json else (lambda m: err_console.print(m, highlight=False, soft_wrap=True))
    report = verify_bundle(bundle, device=device, dtype=dtype, prompt=prompt if prompt is not None else DEFAULT_PROMPT,
                           max_new_tokens=max_new_tokens, log=log)
    if as_json:
        print_json(report)
        return
    d = report["decode"]
    console.print(f"bundle {report['name']}: OK ({report['files_checked']} files, weight names checked, "
                  f"{len(d['tokens'])} tokens equal to the target alone, acceptance {d['acceptance_rate']:.2f}, "
                  f"{d['mean_accepted_tokens']:.2f} tokens per target forward)", highlight=False, soft_wrap=True)


@app.command("serve-bundle")
@user_errors
def serve_bundle_cmd(
    bundle: Path = typer.Argument(..., help="Bundle folder written by `dspark export`."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind (loopback unless you mean otherwise)."),
    port: int = typer.Option(8000, help="TCP port (0: any free port, printed at start-up)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="DSPARK_API_KEY",
                                          help="Require `Authorization: Bearer KEY` on /v1/* (or set DSPARK_API_KEY); "
                                               "visible ASCII characters only."),
    allow_no_key: bool = typer.Option(False, "--allow-no-key",
                                      help="Serve a --host other machines can reach without --api-key."),
    max_batch_size: int = typer.Option(8, help="Most concurrent requests decoded together."),
    max_body_mb: float = typer.Option(DEFAULT_MAX_BODY_MB, "--max-body-mb",
                                      help="Largest request body in MiB (a larger one is refused with 413)."),
    batch_window_ms: float = typer.Option(
        0.0, help="How long an idle server waits for companions of a request (late arrivals join the running "
                  "batch at its next step anyway)."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto."),
    dtype: str = typer.Option("auto", help="float32, bfloat16, float16 or auto."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for decoding (default: torch's)."),
):
    """Serve a bundle as an OpenAI-compatible endpoint (completions, chat, streaming, JSON schema, /metrics).

    Limits: request bodies up to --max-body-mb; response_format JSON schemas up to 64 levels of nesting
    and 16 KiB; seed in [0, 2**63). SIGTERM or Ctrl-C ends the requests in flight with a 503 (a stream
    with a final error event).
    """
    from dspark.serve.runner import serve_bundle

    serve_bundle(bundle, host=host, port=port, api_key=api_key, allow_no_key=allow_no_key,
                 max_batch_size=max_batch_size, batch_window_ms=batch_window_ms, device=device, dtype=dtype,
                 threads=threads, max_body_mb=max_body_mb,
                 log=lambda m: console.print(m, highlight=False, soft_wrap=True))


@app.command("distill", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@user_errors
def distill_cmd(
    ctx: typer.Context,
    target: str = typer.Option(..., "--target", help="Target model: built-in name, alias, hub id or folder."),
    draft: Optional[List[str]] = typer.Option(None, "--draft", help="Draft model to distil (repeat for several)."),
    draft_init: Optional[List[str]] = typer.Option(
        None, "--draft-init", help="Also distil a draft made from the target first (see `dspark draft-init`): "
                                   "truncate:N, truncate:I,J,..., every:K or narrow:WIDTHxLAYERS (repeatable)."),
    out: Path = typer.Option(..., "--out", help="Run folder: cache/, drafts/<name>/, candidates/<name>.yaml."),
    task: Optional[str] = typer.Option(None, "--task", help="Built-in task name (see `dspark tasks`)."),
    data: Optional[str] = typer.Option(None, "--data", help="User data: .jsonl/.json/.parquet/.txt, folder or hub id."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Existing logits cache (default: collect into OUT/cache)."),
    objective: str = typer.Option("fkl", "--objective", help="fkl, rkl, jsd[:BETA] or tvd."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Training steps (default: one epoch)."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Training epochs over the cache (instead of --steps)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (default 5e-4; 2e-3 with --lora)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Cached prompts per training step (per process)."),
    acceptance_head: bool = typer.Option(False, "--acceptance-head",
                                         help="Also train the acceptance head the `learned` draft length uses."),
    num_prompts: Optional[int] = typer.Option(None, "--num-prompts", help="Collect: at most this many prompts."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="Collect / on-policy: continuation length."),
    top_k: int = typer.Option(64, "--top-k", help="Collect: target log-probs kept per position (+ tail)."),
    heldout_percent: float = typer.Option(10.0, "--heldout-percent",
                                          help="Cache rows held out for the expected-acceptance evaluation."),
    eval_prompts: int = typer.Option(16, "--eval-prompts", help="Eval-split prompts for the decoder before/after."),
    eval_max_new_tokens: int = typer.Option(64, "--eval-max-new-tokens", help="Tokens per decoder measurement."),
    eval_k: int = typer.Option(4, "--eval-k", help="Static draft length of the decoder measurement."),
    cross_token_weight: Optional[float] = typer.Option(
        None, "--cross-token-weight", help="A draft with another tokenizer: weight of the token-level term (on the "
                                           "tokens both vocabularies share) beside the sequence-level cross-entropy "
                                           "(default 3)."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto."),
    dtype: str = typer.Option("auto", "--dtype", help="Target dtype: float32, bfloat16, float16 or auto."),
    seed: int = typer.Option(0, "--seed", help="Seed of shuffling, sampling and initialisation."),
    deepspeed: Optional[Path] = typer.Option(None, "--deepspeed", help="DeepSpeed JSON config (needs the train extra)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary (each draft: path, candidate, metrics)."),
):
    """Distil drafts toward a target: collect its logits (unless --cache), train, measure, write candidates.

    Also: --lora [RANK] (LoRA adapters, default rank 16, merged at the end) and --on-policy [LAMBDA]
    (a fraction LAMBDA, default 0.5, of batches sampled by the draft and scored by the target online).
    Data parallel: `torchrun --nproc_per_node N -m dspark distill ...`.
    """
    from dspark.distill.distill import (CollectSettings, EvalSettings, parse_optional_value_flags,
                                        run_distill)
    from dspark.distill.train import TrainConfig

    lora, on_policy = parse_optional_value_flags(ctx.args)
    cfg = TrainConfig(objective=objective, steps=steps, epochs=epochs, lr=lr, batch_size=batch_size,
                      heldout_percent=heldout_percent, seed=seed, lora_rank=lora, on_policy=on_policy or 0.0,
                      on_policy_max_new_tokens=max_new_tokens, acceptance_head=acceptance_head)
    say_console = err_console if as_json else console
    with resumable(out):
        summary = run_distill(
            target, draft or [], out, task=task, data=data, cache=cache, train=cfg, draft_init=draft_init or (),
            collect=CollectSettings(num_prompts=num_prompts, max_new_tokens=max_new_tokens, k=top_k, seed=seed),
            evaluation=EvalSettings(prompts=eval_prompts, max_new_tokens=eval_max_new_tokens, k=eval_k),
            device=device, dtype=dtype, deepspeed=deepspeed, console=say_console, cross_token_weight=cross_token_weight,
            log=lambda m: say_console.print(m, highlight=False, soft_wrap=True))
    if summary is None:  # a data-parallel rank other than 0: rank 0 reports
        return
    if as_json:
        print_json(summary)
        return
    for d in summary["drafts"]:
        if "path" in d:
            console.print(f"{d['name']}: {d['path']} (candidate {d['candidate']})", highlight=False, soft_wrap=True)


@app.command("train-head")
@user_errors
def train_head_cmd(
    target: str = typer.Option(..., "--target", help="Target model: built-in name, alias, hub id or folder."),
    out: Path = typer.Option(..., "--out", help="Run folder: cache/, heads/<name>/, curve.png, vllm.json."),
    task: Optional[str] = typer.Option(None, "--task", help="Built-in task name (see `dspark tasks`)."),
    data: Optional[str] = typer.Option(None, "--data", help="User data: .jsonl/.json/.parquet/.txt, folder or hub id."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Existing logits cache (default: OUT/cache)."),
    name: str = typer.Option("eagle3", "--name", help="Head name (folder under OUT/heads)."),
    objective: str = typer.Option("fkl", "--objective", help="fkl, rkl, jsd[:BETA] or tvd (on the draft vocabulary)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Training steps (default: one epoch)."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Epochs over the cache (instead of --steps)."),
    lr: float = typer.Option(1e-3, "--lr", help="Peak learning rate (AdamW, warmup + cosine)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Cached prompts per training step (per process)."),
    ttt_steps: int = typer.Option(3, "--ttt-steps", help="Training-time-test steps unrolled (speculators' default 3)."),
    ttt_decay: float = typer.Option(1.0, "--ttt-decay", help="Loss weight decay per unrolled step."),
    draft_vocab: Optional[int] = typer.Option(None, "--draft-vocab", help="Reduced draft vocabulary size (d2t/t2d)."),
    vocab_prompts: int = typer.Option(4096, "--vocab-prompts", help="Task train prompts counted for --draft-vocab."),
    layers: Optional[str] = typer.Option(None, "--layers", help="3 target layer ids, e.g. 2,15,27."),
    train_lm_head: bool = typer.Option(False, "--train-lm-head", help="Also train the LM head (default: frozen)."),
    loss_on_prompt: bool = typer.Option(False, "--loss-on-prompt", help="Also train on prompt positions (online)."),
    offline: bool = typer.Option(False, "--offline", help="Collect the hidden states into OUT/hidden, train from it."),
    hidden_cache: Optional[str] = typer.Option(None, "--hidden-cache", help="Train from this hidden-state cache."),
    hidden_dtype: str = typer.Option("bfloat16", "--hidden-dtype", help="Hidden-state cache dtype."),
    compare_draft: List[str] = typer.Option([], "--compare-draft", help="Score this separate draft on the same rows."),
    num_prompts: Optional[int] = typer.Option(None, "--num-prompts", help="Collect: at most this many prompts."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="Collect: continuation length."),
    top_k: int = typer.Option(64, "--top-k", help="Collect: target log-probs kept per position (+ tail)."),
    heldout_percent: float = typer.Option(10.0, "--heldout-percent", help="Cache rows held out for evaluation."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Steps between held-out evaluations."),
    eval_rows: Optional[int] = typer.Option(None, "--eval-rows", help="Held-out rows per evaluation (default: all)."),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Tokens per row (default: the context)."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto."),
    dtype: str = typer.Option("auto", "--dtype", help="Target dtype: float32, bfloat16, float16 or auto."),
    seed: int = typer.Option(0, "--seed", help="Seed of shuffling and initialisation."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Train an EAGLE-3 head that reads the target's hidden states; written in vLLM's speculators format."""
    from dspark.distill.distill import CollectSettings
    from dspark.distill.head_run import HeadOptions, parse_layers, run_train_head
    from dspark.distill.heads import HeadTrainConfig

    cfg = HeadTrainConfig(objective=objective, ttt_steps=ttt_steps, ttt_decay=ttt_decay, steps=steps, epochs=epochs,
                          lr=lr, batch_size=batch_size, eval_every=eval_every, heldout_percent=heldout_percent,
                          eval_max_rows=eval_rows, max_length=max_length, seed=seed, loss_on_prompt=loss_on_prompt)
    opts = HeadOptions(name=name, draft_vocab=draft_vocab, layers=parse_layers(layers), train_lm_head=train_lm_head,
                       offline=offline, hidden_cache=hidden_cache, hidden_dtype=hidden_dtype,
                       vocab_prompts=vocab_prompts)
    say_console = err_console if as_json else console
    summary = run_train_head(
        target, out, task=task, data=data, cache=cache, train=cfg, head=opts, compare_drafts=compare_draft,
        collect=CollectSettings(num_prompts=num_prompts, max_new_tokens=max_new_tokens, k=top_k, seed=seed),
        device=device, dtype=dtype, console=say_console,
        log=lambda m: say_console.print(m, highlight=False, soft_wrap=True))
    if summary is None:
        return
    if as_json:
        print_json(summary)
        return
    after = summary["after"]
    console.print(f"{name}: {summary['head']} (vLLM: {out / 'vllm.json'}); held-out expected acceptance per "
                  f"unrolled step {after.get('expected_acceptance')}, greedy tokens per target step at K={ttt_steps} "
                  f"{(after.get('greedy_tokens_per_step') or [None])[-1]}", highlight=False, soft_wrap=True)


@app.command("quantize")
@user_errors
def quantize_cmd(
    method: str = typer.Option(..., "--method", help="int8, int4, nf4 or gptq4."),
    out: Path = typer.Option(..., "--out", help="Folder for the quantized checkpoint and its candidate.yaml."),
    draft: Optional[str] = typer.Option(None, "--draft", help="Draft to quantize: folder, built-in, alias or hub id."),
    candidate: Optional[Path] = typer.Option(None, "--candidate", help="Or: a candidate YAML whose draft to quantize."),
    calibration: Optional[str] = typer.Option(None, "--calibration",
                                              help="Task name or data (file, folder, hub id): calibration text for "
                                                   "gptq4 (train split) and the guard's held-out prompts (eval split)."),
    target: Optional[str] = typer.Option(None, "--target", help="Target for the acceptance guard (default: the "
                                                                "candidate file's target)."),
    backend: Optional[str] = typer.Option(None, "--backend", help="torchao, quanto, bitsandbytes or gptqmodel "
                                                                  "(default: the first installed one for the method)."),
    guard: bool = typer.Option(True, "--guard/--no-guard", help="Measure the acceptance drop (needs a target)."),
    guard_threshold: float = typer.Option(0.05, "--guard-threshold",
                                          help="Flag the candidate when expected acceptance drops by more (absolute)."),
    guard_prompts: int = typer.Option(16, "--guard-prompts", help="Held-out prompts the guard uses."),
    guard_tokens: int = typer.Option(32, "--guard-tokens", help="Target tokens per guard prompt."),
    calibration_samples: int = typer.Option(64, "--calibration-samples", help="Calibration texts (gptq4)."),
    name: Optional[str] = typer.Option(None, "--name", help="Candidate name (default: <draft>-<method>)."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto."),
    dtype: str = typer.Option("auto", help="Dtype of the unquantized parts (auto: the draft's stored dtype)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Quantize a draft (int8 / int4 / nf4 / gptq4), check it loads, guard its acceptance, write a candidate."""
    from dspark.quantize.run import QuantizeOptions, quantize_draft

    opts = QuantizeOptions(method=method, backend=backend, calibration=calibration,
                           calibration_samples=calibration_samples, target=target, guard=guard,
                           guard_threshold=guard_threshold, guard_prompts=guard_prompts, guard_tokens=guard_tokens,
                           device=device, dtype=dtype, name=name, force=force)
    log = (lambda m: err_console.print(m, highlight=False, soft_wrap=True))
    result = quantize_draft(out, opts, draft=draft, candidate=candidate, log=log)
    summary = result.summary()
    if as_json:
        print_json(summary)
    else:
        say = lambda m, style=None: console.print(m, style=style, highlight=False, soft_wrap=True)  # noqa: E731
        say(f"backend: {summary['backend']} ({summary['backend_reason']})")
        say(f"weights on disk: {summary['size_on_disk_mb']:.2f} MB (unquantized {summary['size_on_disk_mb_before']:.2f} "
            f"MB); in memory: {summary['memory_mb']:.2f} MB (unquantized {summary['memory_mb_before']:.2f} MB)")
        g = summary["guard"]
        if g is not None:
            say(f"guard: {g['message']} ({g['positions']} positions; greedy agreement {g['greedy_agreement']:.3f} vs "
                f"{g['greedy_agreement_before']:.3f})", None if g["passed"] else "bold red")
        for n in summary["notes"]:
            say(f"note: {n}", "yellow")
        say(f"candidate: {summary['candidate']}")
    for w in summary["warnings"]:
        err_console.print(f"WARNING: {w}", style="bold red", highlight=False, soft_wrap=True)


@app.command("select")
@user_errors
def select_cmd(
    candidates: List[str] = typer.Option(..., "--candidates", help="Candidate YAML files or globs (repeatable); "
                                                                   "also model folders or built-in names."),
    target: str = typer.Option(..., "--target", help="Target model: built-in name, alias, hub id or folder."),
    task: Optional[str] = typer.Option(None, "--task", help="Built-in task; its eval (held-out) split is used."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Or: a .txt / .jsonl prompts file."),
    n: int = typer.Option(20, "--n", help="Number of prompts."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="New tokens per prompt (eos disabled)."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy (outputs checked against the target's)."),
    objective: str = typer.Option("speedup", "--objective", help="speedup, throughput or memory."),
    max_memory: Optional[float] = typer.Option(None, "--max-memory", help="Exclude candidates whose peak memory "
                                                                          "exceeds this many GB."),
    out: Path = typer.Option(Path("select-report"), "--out", help="Folder for report.json/.md/.png and selected.yaml."),
    ks: str = typer.Option("1,2,4,6", "--ks", help="Static draft lengths to try, comma-separated."),
    full_sweep: bool = typer.Option(False, "--full-sweep", help="Measure every static K on every prompt (default: "
                                                                "stop measuring Ks 15% behind the fastest method "
                                                                "after a quarter of the prompts)."),
    cost_ratio: Optional[str] = typer.Option(None, "--cost-ratio", help="Project speedups for this draft cost ratio "
                                                                        "(F, or NAME=F,NAME=F)."),
    hardware: Optional[str] = typer.Option(None, "--hardware", help="Project speedups onto this machine "
                                                                    "(h200, h100, a100, l40s, a10g, l4, rtx4090)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Batch size of the throughput measurement."),
    cost_reps: int = typer.Option(10, "--cost-reps", help="Timed repetitions per forward in the cost measurement."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed (temperature > 0)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: those this process may use)."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto."),
    dtype: str = typer.Option("auto", help="float32, bfloat16, float16 or auto (float32 on CPU)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    """Score candidate drafts on the same held-out prompts, rank them, and write the winner's selection."""
    import shlex

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from dspark.decode.bench import parse_int_list
    from dspark.select.measure import SelectConfig
    from dspark.select.report import render_table, summary_lines
    from dspark.select.run import select

    config = SelectConfig(n=n, max_new_tokens=max_new_tokens, temperature=temperature, objective=objective,
                          max_memory_gb=max_memory, ks=parse_int_list(ks, "--ks"), batch_size=batch_size,
                          cost_reps=cost_reps, seed=seed, threads=threads, cost_ratio=cost_ratio, hardware=hardware,
                          prune_margin=None if full_sweep else SelectConfig.prune_margin)
    command = "dspark " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True) as progress:
        bar = progress.add_task("loading the target", total=None)

        def on_step(label: str, done: int, total: int) -> None:
            progress.update(bar, description=label, completed=done, total=total)

        report = select(candidates, target, config, task=task, prompts_file=prompts, out=out, device=device,
                        dtype=dtype, progress=on_step, command=command)
    if as_json:
        print_json(report)
    else:
        out_console = console if console.is_terminal else Console(width=max(console.width, 150))
        out_console.print(render_table(report))
        for line, style in summary_lines(report):
            out_console.print(line, style=style, highlight=False, soft_wrap=True)
    if report["winner"] is None:
        raise DsparkError(f"no candidate could be scored (see {out / 'report.md'})")


@app.command("quickstart")
@user_errors
def quickstart_cmd(
    out: Path = typer.Option(Path("dspark-quickstart"), "--out", help="Folder for every stage's output "
                                                                      "(a re-run reuses finished stages)."),
    fast: bool = typer.Option(False, "--fast", help="Tiny budgets everywhere (a smoke run of a minute or two)."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """The whole job on the built-in family, offline: collect, distill, quantize, select, export, serve one request."""
    from dspark.quickstart import render_summary, run_quickstart

    result = run_quickstart(out, fast=fast, device=device, console=err_console)
    if as_json:
        print_json(result.summary())
        return
    out_console = console if console.is_terminal else Console(width=max(console.width, 150))
    table, lines = render_summary(result)
    out_console.print(table)
    for line in lines:
        out_console.print(line, highlight=False, soft_wrap=True)




def main() -> None:  # pragma: no cover
    app()
