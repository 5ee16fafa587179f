"""Server benchmark: total tokens/s with 1 client vs C concurrent clients, and request latency.

    python benchmarks/bench_serve.py                          # exports tiny-code + tiny-code-draft-s, CPU
    python benchmarks/bench_serve.py --bundle BUNDLE --clients 8 --requests 4 --max-tokens 64
    python benchmarks/bench_serve.py --device cuda --dtype bfloat16 --json

It starts the real server on a bundle (one exported from the built-in pair into a temp folder when
--bundle is not given): by default as its own process, `python -m dspark serve-bundle BUNDLE --port 0`,
the way users run it, so the benchmark's client threads do not share the server's interpreter lock
(`--in-process` runs uvicorn in a thread of this process instead, as the tests do). It warms it up, then
runs two phases with the same work: the same clients x requests completions (the same prompts),
sent by 1 client one after the other, then by --clients client threads each sending --requests
requests back to back. Every request is a greedy
/v1/completions call with a fixed max_tokens and `ignore_eos` (so each produces exactly that many
tokens), prompts taken from the `code` task's eval split. Reported per phase: total completion
tokens / wall seconds, requests/s, p50 / p99 latency of one request; then the goal of issue 6:
C-client tokens/s >= 3x single-client tokens/s. The goal is reported, never asserted (timings depend
on the machine); `--strict` exits 1 when it is missed or any request fails.

After the server stops, the same requests run through the bundle's decoder alone, in this process
(no HTTP): one at a time, then C rows of continuous batching (a finished row is replaced at once).
Their ratio is what this machine's batched forwards allow, the ceiling of the server's ratio
(`--no-ceiling` skips it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
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


def start_in_process(bundle: Path, args, log):
    from dspark.serve.app import create_app
    from dspark.serve.runner import set_threads, start_in_thread
    from dspark.serve.runtime import runtime_from_bundle

    set_threads(args.threads)
    runtime = runtime_from_bundle(bundle, device=args.device, dtype=args.dtype, log=log)
    app = create_app(runtime, max_batch_size=args.max_batch_size, batch_window_s=args.batch_window_ms / 1000)
    return start_in_thread(app, host="127.0.0.1", port=0), runtime.model_id, runtime.policy, runtime.tokenizer


def decoder_ceiling(bundle: Path, prompts: list[str], clients: int, requests: int, max_tokens: int, args) -> dict:
    """tokens/s of the bundle's decoder alone on the phases' requests: 1 row at a time, then `clients`
    rows of continuous batching (prefill included in both, as in the server)."""
    from dspark.decode.types import GenerationConfig
    from dspark.serve.runner import set_threads
    from dspark.serve.runtime import runtime_from_bundle
    from dspark.serve.text import encode_prompt

    set_threads(args.threads)
    rt = runtime_from_bundle(bundle, device=args.device, dtype=args.dtype)
    total = clients * requests
    ids = [encode_prompt(rt.tokenizer, prompts[i % len(prompts)]) for i in range(total)]
    cfg = GenerationConfig(max_new_tokens=max_tokens, ignore_eos=True)
    rt.decoder.generate(ids[:1], cfg)  # warm-up

    def run(rows: int) -> float:
        session, queue, tokens = rt.decoder.session(), list(ids), 0
        t0 = time.perf_counter()
        while queue or session.active:
            room = rows - session.active
            if room > 0 and queue:
                session.add(queue[:room], cfg)
                del queue[:room]
            tokens += sum(len(ev.token_ids) for ev in session.step())
        return tokens / (time.perf_counter() - t0)

    one, many = run(1), run(clients)
    return {"single_tokens_per_s": one, "concurrent_tokens_per_s": many, "ratio": many / one}


def export_default_bundle(folder: Path, target: str, draft: str) -> Path:
    from dspark.bundle.export import export_bundle

    out = folder / "bundle"
    export_bundle(out, target=target, draft=draft, name="bench-serve")
    return out


class ServerProcess:
    """`python -m dspark serve-bundle` in a child process on a free loopback port."""

    def __init__(self, bundle: Path, args, log):
        cmd = [sys.executable, "-m", "dspark", "serve-bundle", str(bundle), "--host", "127.0.0.1", "--port", "0",
               "--max-batch-size", str(args.max_batch_size), "--batch-window-ms", str(args.batch_window_ms),
               "--device", args.device, "--dtype", args.dtype]
        if args.threads is not None:
            cmd += ["--threads", str(args.threads)]
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   COLUMNS="1000")  # one line per message: the port is parsed from it
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.base_url, self.model_id, lines = None, None, []
        for line in self.proc.stdout:
            lines.append(line.rstrip())
            log(f"  server: {line.rstrip()}")
            m = re.search(r"serving (\S+) at (http://127\.0\.0\.1:\d+)/v1", line)
            if m:
                self.model_id, self.base_url = m.group(1), m.group(2)
                break
        if self.base_url is None:
            self.stop()
            raise RuntimeError("the server process did not start:\n" + "\n".join(lines[-20:]))
        # keep draining its output so a chatty server never blocks on a full pipe
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

    def wait_ready(self, timeout: float = 60.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(self.base_url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"the server at {self.base_url} did not become healthy")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, help="Bundle to serve (default: export --target/--draft to a temp dir).")
    ap.add_argument("--target", default="tiny-code")
    ap.add_argument("--draft", default="tiny-code-draft-s")
    ap.add_argument("--clients", type=int, default=8, help="Concurrent clients of the second phase.")
    ap.add_argument("--requests", type=int, default=3, help="Requests per client, in both phases.")
    ap.add_argument("--max-tokens", type=int, default=48, help="Completion tokens per request (eos ignored).")
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--batch-window-ms", type=float, default=0.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads of the server (default: torch's).")
    ap.add_argument("--in-process", action="store_true",
                    help="Run the server in a thread of this process (shares the clients' interpreter lock).")
    ap.add_argument("--no-ceiling", action="store_true", help="Skip the decoder-alone measurement.")
    ap.add_argument("--timeout", type=float, default=600.0, help="Seconds one request may take.")
    ap.add_argument("--json", action="store_true", help="Print the results as JSON.")
    ap.add_argument("--strict", action="store_true", help="Exit 1 when the goal is missed or a request fails.")
    args = ap.parse_args(argv)
    for flag in ("clients", "requests", "max_tokens", "max_batch_size"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1")

    from dspark.tasks import resolve_prompts

    log = (lambda m: print(m, file=sys.stderr, flush=True))
    with tempfile.TemporaryDirectory(prefix="dspark-bench-serve-") as tmp:
        bundle = args.bundle
        if bundle is None:
            log(f"exporting {args.target} + {args.draft} into a temp bundle")
            bundle = export_default_bundle(Path(tmp), args.target, args.draft)
        if args.in_process:
            server, model_id, policy, tokenizer = start_in_process(bundle, args, log)
            base_url = server.base_url
        else:
            from dspark.bundle.manifest import read_manifest
            from dspark.bundle.verify import check_target_identity
            from dspark.models.loading import load_tokenizer

            manifest = read_manifest(bundle)
            policy = manifest.policy.draft_length
            tokenizer = load_tokenizer(check_target_identity(bundle, manifest, full_hash=False)["source"])
            server = ServerProcess(Path(bundle), args, log)
            server.wait_ready()
            base_url, model_id = server.base_url, server.model_id
        prompts = [r.render(tokenizer) for r in resolve_prompts("code", None, "eval", 16)]
        try:
            log(f"serving {model_id} at {base_url}; warm-up")
            run_phase(base_url, model_id, prompts, 1, 1, args.max_tokens, args.timeout)
            total = args.clients * args.requests  # client c's request r gets prompt c * requests + r
            log(f"phase 1: 1 client x {total} requests x {args.max_tokens} tokens")
            one = run_phase(base_url, model_id, prompts, 1, total, args.max_tokens, args.timeout)
            log(f"phase 2: {args.clients} clients x {args.requests} requests x {args.max_tokens} tokens")
            many = run_phase(base_url, model_id, prompts, args.clients, args.requests, args.max_tokens, args.timeout)
        finally:
            server.stop()
        ceiling = None
        if not args.no_ceiling:
            log(f"decoder alone: the same requests, 1 row then {args.clients} rows")
            ceiling = decoder_ceiling(Path(bundle), prompts, args.clients, args.requests, args.max_tokens, args)
    ratio = many["tokens_per_s"] / one["tokens_per_s"] if one["tokens_per_s"] > 0 else None
    met = ratio is not None and ratio >= GOAL_RATIO
    result = {"bundle": str(args.bundle) if args.bundle else f"{args.target} + {args.draft} (temp)",
              "server": "in-process thread" if args.in_process else "subprocess",
              "policy": policy, "device": args.device, "dtype": args.dtype, "threads": args.threads,
              "max_tokens": args.max_tokens, "max_batch_size": args.max_batch_size,
              "single": one, "concurrent": many, "ratio": ratio, "decoder_alone": ceiling, "goal_ratio": GOAL_RATIO,
              "goal_met": met}
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
        if ceiling is not None:
            print(f"decoder alone (no HTTP): {ceiling['single_tokens_per_s']:.1f} tok/s 1 row, "
                  f"{ceiling['concurrent_tokens_per_s']:.1f} tok/s {args.clients} rows: {ceiling['ratio']:.2f}x, "
                  f"the ceiling of the server's ratio on this machine")
        for e in one["errors"] + many["errors"]:
            print(f"failed: {e}")
    if args.strict and (not met or one["failed"] or many["failed"]):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
