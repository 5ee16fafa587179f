"""Server benchmark: total tokens/s with 1 client vs C concurrent clients, and request latency.

    python benchmarks/bench_serve.py                          # exports tiny-code + tiny-code-draft-s, CPU
    python benchmarks/bench_serve.py --bundle BUNDLE --clients 8 --requests 4 --max-tokens 64
    python benchmarks/bench_serve.py --device cuda --dtype bfloat16 --json

It starts the real server (uvicorn in a background thread, 127.0.0.1, a free port) on a bundle (one
exported from the built-in pair into a temp folder when --bundle is not given), warms it up, then
runs two phases with the same work: the same clients x requests completions (the same prompts),
sent by 1 client one after the other, then by --clients client threads each sending --requests
requests back to back. Every request is a greedy
/v1/completions call with a fixed max_tokens and `ignore_eos` (so each produces exactly that many
tokens), prompts taken from the `code` task's eval split. Reported per phase: total completion
tokens / wall seconds, requests/s, p50 / p99 latency of one request; then the goal of issue 6:
C-client tokens/s >= 3x single-client tokens/s. The goal is reported, never asserted (timings depend
on the machine); `--strict` exits 1 when it is missed or any request fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GOAL_RATIO = 3.0


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def run_phase(base_url: str, model: str, prompts: list[str], clients: int, requests: int, max_tokens: int,
              timeout: float) -> dict:
    """`clients` threads each send `requests` completions back to back; all start together."""
    import httpx

    latencies: list[float] = []
    tokens: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        with httpx.Client(base_url=base_url, timeout=timeout) as http:
            start.wait()
            for r in range(requests):
                prompt = prompts[(c * requests + r) % len(prompts)]
                t0 = time.perf_counter()
                try:
                    resp = http.post("/v1/completions", json={"model": model, "prompt": prompt, "temperature": 0,
                                                              "max_tokens": max_tokens, "ignore_eos": True})
                    dt = time.perf_counter() - t0
                    if resp.status_code != 200:
                        raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:160]}")
                    n = int(resp.json()["usage"]["completion_tokens"])
                except Exception as e:  # reported, not fatal: the other clients keep going
                    with lock:
                        errors.append(f"client {c} request {r}: {type(e).__name__}: {e}")
                    continue
                with lock:
                    latencies.append(dt)
                    tokens.append(n)

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"clients": clients, "requests": len(latencies), "failed": len(errors), "errors": errors[:5],
            "completion_tokens": sum(tokens), "seconds": wall,
            "tokens_per_s": sum(tokens) / wall if wall > 0 else 0.0,
            "requests_per_s": len(latencies) / wall if wall > 0 else 0.0,
            "latency_p50_s": percentile(latencies, 50) if latencies else None,
            "latency_p99_s": percentile(latencies, 99) if latencies else None}


def export_default_bundle(folder: Path, target: str, draft: str) -> Path:
    from dspark.bundle.export import export_bundle

    out = folder / "bundle"
    export_bundle(out, target=target, draft=draft, name="bench-serve")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, help="Bundle to serve (default: export --target/--draft to a temp dir).")
    ap.add_argument("--target", default="tiny-code")
    ap.add_argument("--draft", default="tiny-code-draft-s")
    ap.add_argument("--clients", type=int, default=8, help="Concurrent clients of the second phase.")
    ap.add_argument("--requests", type=int, default=3, help="Requests per client, in both phases.")
    ap.add_argument("--max-tokens", type=int, default=48, help="Completion tokens per request (eos ignored).")
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--batch-window-ms", type=float, default=10.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads of the server (default: torch's).")
    ap.add_argument("--timeout", type=float, default=600.0, help="Seconds one request may take.")
    ap.add_argument("--json", action="store_true", help="Print the results as JSON.")
    ap.add_argument("--strict", action="store_true", help="Exit 1 when the goal is missed or a request fails.")
    args = ap.parse_args(argv)
    for flag in ("clients", "requests", "max_tokens", "max_batch_size"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1")

    from dspark.serve.app import create_app
    from dspark.serve.runner import set_threads, start_in_thread
    from dspark.serve.runtime import runtime_from_bundle
    from dspark.tasks import resolve_prompts

    log = (lambda m: print(m, file=sys.stderr, flush=True))
    set_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="dspark-bench-serve-") as tmp:
        bundle = args.bundle
        if bundle is None:
            log(f"exporting {args.target} + {args.draft} into a temp bundle")
            bundle = export_default_bundle(Path(tmp), args.target, args.draft)
        runtime = runtime_from_bundle(bundle, device=args.device, dtype=args.dtype, log=log)
        prompts = [r.render(runtime.tokenizer) for r in resolve_prompts("code", None, "eval", 16)]
        app = create_app(runtime, max_batch_size=args.max_batch_size, batch_window_s=args.batch_window_ms / 1000)
        server = start_in_thread(app, host="127.0.0.1", port=0)
        try:
            log(f"serving {runtime.model_id} at {server.base_url}; warm-up")
            run_phase(server.base_url, runtime.model_id, prompts, 1, 1, args.max_tokens, args.timeout)
            total = args.clients * args.requests  # client c's request r gets prompt c * requests + r
            log(f"phase 1: 1 client x {total} requests x {args.max_tokens} tokens")
            one = run_phase(server.base_url, runtime.model_id, prompts, 1, total, args.max_tokens, args.timeout)
            log(f"phase 2: {args.clients} clients x {args.requests} requests x {args.max_tokens} tokens")
            many = run_phase(server.base_url, runtime.model_id, prompts, args.clients, args.requests,
                             args.max_tokens, args.timeout)
        finally:
            server.stop()
    ratio = many["tokens_per_s"] / one["tokens_per_s"] if one["tokens_per_s"] > 0 else None
    met = ratio is not None and ratio >= GOAL_RATIO
    result = {"bundle": str(args.bundle) if args.bundle else f"{args.target} + {args.draft} (temp)",
              "policy": runtime.policy, "device": args.device, "dtype": args.dtype,
              "threads": __import__("torch").get_num_threads(),
              "max_tokens": args.max_tokens, "max_batch_size": args.max_batch_size,
              "single": one, "concurrent": many, "ratio": ratio, "goal_ratio": GOAL_RATIO, "goal_met": met}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        def ms(v):
            return "-" if v is None else f"{1e3 * v:.0f} ms"

        print(f"{'phase':<12} {'requests':>8} {'failed':>6} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} "
              f"{'req/s':>6} {'p50':>9} {'p99':>9}")
        for label, p in (("1 client", one), (f"{args.clients} clients", many)):
            print(f"{label:<12} {p['requests']:>8} {p['failed']:>6} {p['completion_tokens']:>7} "
                  f"{p['seconds']:>8.2f} {p['tokens_per_s']:>9.1f} {p['requests_per_s']:>6.2f} "
                  f"{ms(p['latency_p50_s']):>9} {ms(p['latency_p99_s']):>9}")
        shown = "-" if ratio is None else f"{ratio:.2f}x"
        print(f"goal: {args.clients}-client tokens/s >= {GOAL_RATIO:.0f}x single-client: {shown} "
              f"({'met' if met else 'NOT met'})")
        for e in one["errors"] + many["errors"]:
            print(f"failed: {e}")
    if args.strict and (not met or one["failed"] or many["failed"]):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
