"""Memory benchmark: peak resident memory of `dspark generate` and `dspark bench` against the bytes of
the weights and KV cache they hold (issue 12, section 2), for the built-in pair and a 135M pair.

    python benchmarks/bench_memory.py                                 # both pairs, float32 and bf16, both paths
    python benchmarks/bench_memory.py --pairs builtin --dtypes float32 --paths generate
    python benchmarks/bench_memory.py --json runs/bench_memory.json

Pairs: `builtin` = tiny-code + tiny-code-draft-s; `smollm2-135m` = SmolLM2-135M-Instruct (the GGUF in
../shared/models/smollm2-135m-instruct, dequantized once into .dspark-cache/bench_memory/ as a
safetensors folder per dtype: a bf16 run loads a bf16 checkpoint, as deployed) + a draft made of its
first `--draft-layers` layers (embeddings and head shared by value, not by memory).

Each measurement runs in a fresh Python process, so peaks never mix. The process imports what the
path uses (torch, transformers, dspark), frees what it can (gc + malloc_trim), reads its resident size
(the baseline, before anything is loaded), resets the peak (/proc/self/clear_refs) and calls the stage
the CLI calls: `dspark.decode.run.generate` (load both models, decode the prompts together) or
`dspark.decode.bench.bench` (load, the forward-cost microbenchmark, HF generate, HF assisted
generation, dspark target-only and K=2, dspark auto at batch 1 and batch n). Then it reads the peak
(VmHWM) and, afterwards, loads the pair again to count its weights (parameters + buffers, tied ones
once: `model_bytes`).

    ratio = (peak - baseline) / (weights + KV)

KV is what the decoder's caches hold at the largest batch: both models' preallocated KV buffers
(KV_CAPACITY = 256 slots per row; every request here fits, which is checked). The rest of the growth is
tokenizers (two: one per model), activations, and the runtime's one-time allocations (oneDNN's
kernel cache, one entry per matrix shape and row count, ~0.6 MB each in bf16; lazily imported
modules). That part does not scale with the model, so each path is also run on a stand-in pair: each
model shrunk to one layer with head_dim 2 (same heads, vocabulary and tokenizer; negligible weights).
Its growth is the `fixed` column, and

    scaling ratio = (growth - fixed growth) / (weights + KV - stand-in weights + KV)

is the memory that grows with the model per byte of weights and KV: 1.0 means they are held once; a
second copy of the weights would show as ~2. The goal (issue 12): ratio <= 1.15 (printed met /
MISSED, never asserted; `--strict` exits 1 on a miss).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GOAL = 1.15
GGUF_DIR = ROOT.parent / "shared" / "models" / "smollm2-135m-instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM = "smollm2-135m-instruct"
PAIRS = ("builtin", "smollm2-135m")
DTYPES = ("float32", "bfloat16")
PATHS = ("generate", "bench")
PROMPTS = ["def fibonacci(n):", "import os, sys  # the command line tool", "class Stack:  # a LIFO stack",
           "The capital of France is"]  # one line each: bench reads a prompts file, one per line


# -- model folders (parent process) ----------------------------------------------------------------

def _replace_dir(tmp: Path, final: Path) -> Path:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def _save(model, out: Path, tokenizer=None, files_from: Path | None = None) -> Path:
    """Save `model` as a Hugging Face folder, atomically (temp folder + rename), with `tokenizer` or
    with the tokenizer (and other non-weight) files of the folder `files_from`."""
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    for f in files_from.iterdir() if files_from is not None else ():
        if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json")) and \
                not (tmp / f.name).exists():
            shutil.copy(f, tmp / f.name)
    return _replace_dir(tmp, out)


def keep_first_layers(model, n: int):
    """The model cut to its first n decoder layers (in place): a draft that shares the target's
    tokenizer, embeddings and head (by value)."""
    model.model.layers = model.model.layers[:n]
    model.config.num_hidden_layers = n
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:n]
    return model


def smollm_folders(cache: Path, dtype: str, draft_layers: int) -> tuple[Path, Path]:
    """(target folder, draft folder) of SmolLM2-135M-Instruct in `dtype`, converted from the GGUF once."""
    import torch

    target = cache / f"{SMOLLM}-{dtype}"
    draft = cache / f"{SMOLLM}-l{draft_layers}-{dtype}"
    if (target / "config.json").is_file() and (draft / "config.json").is_file():
        return target, draft
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError:
        raise SystemExit("the smollm2-135m pair needs the gguf package: pip install gguf==0.19.0") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {GGUF_FILE} to safetensors ({dtype}; once, ~30 s) ...", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(GGUF_DIR, gguf_file=GGUF_FILE, dtype=torch.float32)
    model.hf_quantizer = None  # dequantized: plain float weights, which save_pretrained refuses to save otherwise
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(getattr(torch, dtype))
    _save(model, target, tokenizer=tok)
    _save(keep_first_layers(model, draft_layers), draft, tokenizer=tok)
    return target, draft


def standin_folder(src: Path, out: Path, dtype: str) -> Path:
    """`src` shrunk to one layer with head_dim 2 (its heads, vocabulary and tokenizer files kept; the
    widths scaled alike, so the pair's distinct matrix shapes stay distinct: the CPU kernels' caches
    grow with the number of shapes), random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if (out / "config.json").is_file():
        return out
    cfg = AutoConfig.from_pretrained(src)
    hidden = cfg.num_attention_heads * 2  # head_dim 2, the same heads: q, k, v, o keep their distinct shapes
    cfg.intermediate_size = max(2, round(cfg.intermediate_size * hidden / cfg.hidden_size))
    cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers = hidden, 2, 1
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:1]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(getattr(torch, dtype))
    return _save(model, out, files_from=src)


def pair_folders(pair: str, dtype: str, cache: Path, draft_layers: int) -> dict[str, tuple[str, str]]:
    """{"real": (target, draft), "standin": (target, draft)}: names or folders dspark can load."""
    from dspark.models.registry import BUILTIN_DIR

    if pair == "builtin":
        real = ("tiny-code", "tiny-code-draft-s")
        srcs = (BUILTIN_DIR / real[0], BUILTIN_DIR / real[1])
    else:
        srcs = smollm_folders(cache, dtype, draft_layers)
        real = (str(srcs[0]), str(srcs[1]))
    standin = tuple(str(standin_folder(s, cache / f"standin-{pair}-{role}-{dtype}", dtype))
                    for s, role in zip(srcs, ("target", "draft")))
    return {"real": real, "standin": standin}


# -- one measurement (child process) -----------------------------------------------------------------

def kv_bytes(config, batch: int, element_size: int, slots: int) -> int:
    """Bytes of one model's lean KV buffers: keys and values, [batch, kv_heads, slots, head_dim] per layer."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * batch * kv_heads * slots * head_dim * element_size


def child(spec: dict) -> dict:
    import torch
    # the runtime, imported before the baseline: these modules are what the paths import (tokenizer
    # loading imports the last two lazily)
    from transformers import AutoModelForCausalLM, AutoTokenizer, convert_slow_tokenizer  # noqa: F401
    from transformers import tokenization_utils_tokenizers  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    from dspark.decode import bench as bench_stage
    from dspark.decode import engine  # noqa: F401
    from dspark.decode import run as run_stage
    from dspark.decode.fastpath import KV_CAPACITY
    from dspark.memory import MB, RssWindow
    from dspark.models import load_model
    from dspark.quantize.loading import model_bytes

    torch.set_num_threads(spec["threads"])
    target, draft, dtype, prompts = spec["target"], spec["draft"], spec["dtype"], spec["prompts"]
    window = RssWindow().start()
    t0 = time.perf_counter()
    bench_memory = None
    if spec["path"] == "generate":
        run_stage.generate(target, prompts, draft, options=run_stage.GenerateOptions(
            max_new_tokens=spec["max_new_tokens"], device="cpu", dtype=dtype))
        new_tokens = spec["max_new_tokens"]
    else:
        new_tokens = spec["bench_new_tokens"]
        config = bench_stage.BenchConfig(max_new_tokens=new_tokens, ks=(2,), batch_sizes=(1, len(prompts)),
                                         cost_reps=3, threads=spec["threads"])
        report = bench_stage.bench(target, draft, config, prompts_file=spec["prompts_file"], n=len(prompts),
                                   device="cpu", dtype=dtype)
        bench_memory = report["memory"]
        if not report["greedy_outputs_identical"]:
            raise SystemExit("bench: outputs differ between methods")
    seconds = time.perf_counter() - t0
    peak, baseline = window.peak_bytes(), window.baseline_bytes
    # sizes, read after the peak (loading again cannot change a peak already read)
    t, d = load_model(target, dtype=dtype), load_model(draft, dtype=dtype)
    longest = max(len(t.tokenizer(p)["input_ids"]) for p in prompts)
    if longest + new_tokens + 16 > KV_CAPACITY:
        raise SystemExit(f"a request ({longest} + {new_tokens} tokens) outgrows the KV buffer's first "
                         f"{KV_CAPACITY} slots: KV below would be understated")
    size = torch.finfo(getattr(torch, dtype)).bits // 8
    kv = sum(kv_bytes(m.config, len(prompts), size, KV_CAPACITY) for m in (t, d))
    return {"weights_mb": (model_bytes(t.model) + model_bytes(d.model)) / MB, "kv_mb": kv / MB,
            "baseline_rss_mb": baseline / MB, "peak_rss_mb": peak / MB, "seconds": seconds,
            "parameters": t.num_parameters + d.num_parameters, "method": window.method,
            "bench_report_memory": bench_memory}


def measure(spec: dict) -> dict:
    """Run one measurement in a fresh interpreter; its result (the last line it prints, JSON)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        raise SystemExit(f"measurement {spec['path']} {spec['target']} {spec['dtype']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the table ------------------------------------------------------------------------------------------

def row(pair: str, path: str, dtype: str, real: dict, standin: dict) -> dict:
    growth = real["peak_rss_mb"] - real["baseline_rss_mb"]
    fixed = standin["peak_rss_mb"] - standin["baseline_rss_mb"]
    held = real["weights_mb"] + real["kv_mb"]
    scaling_held = held - standin["weights_mb"] - standin["kv_mb"]
    return {"pair": pair, "path": path, "dtype": dtype, "parameters": real["parameters"],
            "weights_mb": real["weights_mb"], "kv_mb": real["kv_mb"], "baseline_rss_mb": real["baseline_rss_mb"],
            "peak_rss_mb": real["peak_rss_mb"], "ratio": growth / held, "fixed_mb": fixed,
            "scaling_ratio": (growth - fixed) / scaling_held, "seconds": real["seconds"],
            "method": real["method"], "bench_report_memory": real["bench_report_memory"], "standin": standin}


def render(rows: list[dict]):
    from rich.table import Table

    table = Table(title="peak resident memory vs weights + KV (ratio = (peak - baseline) / (weights + KV))")
    for col in ("pair", "path", "dtype", "params", "weights MB", "KV MB", "baseline MB", "peak MB", "ratio",
                "fixed MB", "scaling ratio"):
        table.add_column(col, justify="left" if col in ("pair", "path", "dtype") else "right")
    for r in rows:
        table.add_row(r["pair"], r["path"], r["dtype"], f"{r['parameters'] / 1e6:.1f}M", f"{r['weights_mb']:.1f}",
                      f"{r['kv_mb']:.1f}", f"{r['baseline_rss_mb']:.0f}", f"{r['peak_rss_mb']:.0f}",
                      f"{r['ratio']:.2f}", f"{r['fixed_mb']:.1f}", f"{r['scaling_ratio']:.2f}")
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--pairs", default=",".join(PAIRS))
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--max-new-tokens", type=int, default=32, help="tokens per prompt on the generate path")
    ap.add_argument("--bench-new-tokens", type=int, default=16, help="tokens per prompt on the bench path")
    ap.add_argument("--draft-layers", type=int, default=4, help="layers of the 135M target the draft keeps")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default=str(ROOT / ".dspark-cache" / "bench_memory"))
    ap.add_argument("--json", default=None, help="write the rows here (JSON)")
    ap.add_argument("--strict", action="store_true", help=f"exit 1 when a ratio is above {GOAL}")
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    def pick(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
        out = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in out if x not in allowed]
        if bad or not out:
            raise SystemExit(f"{what}: {', '.join(bad) or 'nothing given'} (allowed: {', '.join(allowed)})")
        return out

    pairs, dtypes, paths = pick(args.pairs, PAIRS, "--pairs"), pick(args.dtypes, DTYPES, "--dtypes"), \
        pick(args.paths, PATHS, "--paths")
    from rich.console import Console

    from dspark.decode.run import quiet_transformers
    from dspark.io import atomic_write_json

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    prompts_file = cache / "prompts.txt"
    prompts_file.write_text("".join(p + "\n" for p in PROMPTS), encoding="utf-8")
    rows = []
    for pair in pairs:
        for dtype in dtypes:
            with quiet_transformers():
                folders = pair_folders(pair, dtype, cache, args.draft_layers)
            for path in paths:
                results = {}
                for kind in ("standin", "real"):
                    target, draft = folders[kind]
                    spec = {"path": path, "target": target, "draft": draft, "dtype": dtype, "threads": args.threads,
                            "prompts": PROMPTS,
                            "prompts_file": str(prompts_file), "max_new_tokens": args.max_new_tokens,
                            "bench_new_tokens": args.bench_new_tokens}
                    results[kind] = measure(spec)
                r = row(pair, path, dtype, results["real"], results["standin"])
                rows.append(r)
                print(f"{pair} {path} {dtype}: weights {r['weights_mb']:.1f} MB, peak - baseline "
                      f"{r['peak_rss_mb'] - r['baseline_rss_mb']:.1f} MB, ratio {r['ratio']:.2f}, "
                      f"scaling ratio {r['scaling_ratio']:.2f} ({r['seconds']:.0f} s)", file=sys.stderr)
    console = Console(width=140)
    console.print(render(rows))
    ok = True
    for r in rows:
        met = r["ratio"] <= GOAL
        ok &= met
        console.print(f"goal {r['pair']} {r['path']} {r['dtype']}: ratio {r['ratio']:.2f} (goal <= {GOAL}): "
                      f"{'met' if met else 'MISSED'}; scaling ratio {r['scaling_ratio']:.2f}", highlight=False)
    if args.json:
        atomic_write_json(args.json, {"goal": GOAL, "threads": args.threads, "rows": rows})
        console.print(f"rows: {args.json}", highlight=False)
    return 1 if args.strict and not ok else 0


if __name__ == "__main__":
    raise SystemExit(main())
