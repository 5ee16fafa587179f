"""Cross-tokenizer distillation: does distilling a draft with ANOTHER tokenizer toward the target buy
accepted tokens and speed?

    OMP_NUM_THREADS=1 python benchmarks/bench_cross_distill.py --out runs/bench_xdistill \
        [--target tiny-code] [--draft tiny-code-draft-xbpe] [--task code] [--cache CACHE] \
        [--num-prompts 64] [--max-new-tokens 128] [--top-k 64] [--objective fkl] [--token-weights 3,0] \
        [--steps 100] [--lr 2e-3] [--batch-size 8] [--eval-prompts 16] [--eval-max-new-tokens 64] [--k 4] \
        [--bench-n 8] [--bench-max-new-tokens 64] [--bench-ks 1,2,3] [--no-bench] [--threads 1] [--json]

One logits cache from the target on the task's TRAIN split (`dspark collect`; reused when --out holds it,
or give --cache), then `dspark.distill.run_distill` once per token-level weight (`--cross-token-weight`;
0 = the sequence-level term alone), same cache, steps, lr, seed. Reported per run:
- held-out (cache rows, no decoding), at the positions where both tokenizations have a boundary:
  expected acceptance sum over the intersection of min(p, q_I) (the cross decoder's sampling
  acceptance), the target's mass on the intersection, and the fraction of target positions aligned;
- mean accepted tokens per verify step (bonus included) of the real cross-tokenizer decoder, static K,
  on EVAL-split prompts, greedy (the goal's measure) and sampled at temperature 1 (seeded: the
  intersection path), for the undistilled draft and the EXPORTED distilled folder, and the ratios;
- with the bench (default on): `dspark bench` of the undistilled draft and of the draft distilled with
  the first token weight (`dspark.decode.bench.bench`: each run times dspark's own target-only loop
  too), their speedups over that loop (static Ks and `auto`).
Goal (issue 17): the distilled draft reaches >= 1.3x the undistilled one's mean accepted tokens, with
collection + one training under 10 minutes for tiny-code. Printed as met / MISSED, never asserted
(`--strict` exits 1 on a miss). Timings are wall-clock: on a shared machine, compare within one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

GOAL_RATIO = 1.3
GOAL_BUDGET_S = 10 * 60


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="tiny-code")
    ap.add_argument("--draft", default="tiny-code-draft-xbpe")
    ap.add_argument("--task", default="code")
    ap.add_argument("--cache", default=None, help="an existing cache of the target (default: collect into OUT/cache)")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--collect-batch-size", type=int, default=16)
    ap.add_argument("--objective", default="fkl")
    ap.add_argument("--token-weights", default="3,0", help="token-level weights to compare (0: sequence-level only)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--heldout-percent", type=float, default=10.0)
    ap.add_argument("--eval-prompts", type=int, default=16)
    ap.add_argument("--eval-max-new-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--bench-n", type=int, default=8)
    ap.add_argument("--bench-max-new-tokens", type=int, default=64)
    ap.add_argument("--bench-ks", default="1,2,3")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="work folder (cache, one run folder per weight, report)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--strict", action="store_true")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from dspark.distill.collect import encode_prompts, run_collect
    from dspark.distill.distill import EvalSettings, run_distill
    from dspark.distill.evaluate import measure_decoder
    from dspark.distill.train import TrainConfig
    from dspark.io import atomic_write_json
    from dspark.models import load_model
    from dspark.tasks import resolve_prompts

    out = Path(args.out)
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else (lambda m: print(m, flush=True))

    # 1. the cache
    t0 = time.perf_counter()
    if args.cache is None:
        cache = out / "cache"
        col = run_collect(args.target, cache, task=args.task, num_prompts=args.num_prompts, split="train",
                          k=args.top_k, max_new_tokens=args.max_new_tokens, batch_size=args.collect_batch_size,
                          device="cpu", dtype="float32", show_progress=False, log=say)
        collect_s = time.perf_counter() - t0
        timing = out / "collect_seconds.json"  # the budget counts a collection an earlier run made
        if col.status == "already-complete" and timing.is_file():
            collect_s = json.loads(timing.read_text())["seconds"]
        elif col.status != "already-complete":
            atomic_write_json(timing, {"seconds": collect_s})
        manifest = col.manifest
    else:
        from dspark.distill.cache import LogitsCache

        cache, collect_s = Path(args.cache), None
        manifest = LogitsCache(cache).manifest
    counts = manifest.counts
    say(f"cache {cache}: {counts.rows} prompts, {counts.positions:,} positions, top-{manifest.generation.k}"
        + (f", {collect_s:.0f}s" if collect_s is not None else " (given)"))

    # 2. the undistilled draft through the real cross decoder (reused by later runs with the same key)
    target = load_model(args.target, device="cpu", dtype="float32")
    stop_ids = tuple(manifest.generation.stop_token_ids)
    recs = resolve_prompts(args.task, None, "eval", args.eval_prompts)
    eval_ids = [list(p.ids) for p in encode_prompts(recs, target.tokenizer)]

    def decoder(draft) -> tuple[dict, float]:
        """Greedy, and sampled at temperature 1 (seeded): the intersection acceptance in action."""
        t = time.perf_counter()
        m = measure_decoder(target.model, draft.model, target.tokenizer, eval_ids, k=args.k,
                            max_new_tokens=args.eval_max_new_tokens, stop_token_ids=stop_ids,
                            draft_tokenizer=draft.tokenizer)
        m["sampled"] = measure_decoder(target.model, draft.model, target.tokenizer, eval_ids, k=args.k,
                                       max_new_tokens=args.eval_max_new_tokens, stop_token_ids=stop_ids,
                                       draft_tokenizer=draft.tokenizer, temperature=1.0, seed=args.seed)
        return m, time.perf_counter() - t

    key = {"target": args.target, "draft": args.draft, "task": args.task, "k": args.k, "eval_prompts": len(eval_ids),
           "eval_max_new_tokens": args.eval_max_new_tokens, "stop_ids": list(stop_ids), "seed": args.seed}
    saved = out / "before.json"
    before = json.loads(saved.read_text()) if saved.is_file() else None
    if before is None or before.get("key") != key:
        base = load_model(args.draft, device="cpu", dtype="float32")
        m, s = decoder(base)
        before = {"key": key, "metrics": m, "seconds": s}
        atomic_write_json(saved, before)
    say(f"undistilled {args.draft}: mean accepted tokens {before['metrics']['mean_accepted_tokens']:.3f} greedy, "
        f"{before['metrics']['sampled']['mean_accepted_tokens']:.3f} sampled ({before['metrics']['mode']}, K={args.k}, "
        f"{len(eval_ids)} eval prompts)")

    # 3. one distillation per token-level weight
    rows = []
    for w in _floats(args.token_weights):
        cfg = TrainConfig(objective=args.objective, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                          heldout_percent=args.heldout_percent, seed=args.seed)
        summary = run_distill(args.target, [args.draft], out / f"run-w{w:g}", cache=cache, train=cfg,
                              evaluation=EvalSettings(enabled=False), device="cpu", dtype="float32",
                              show_progress=False, cross_token_weight=w, log=say)
        d = summary["drafts"][0]
        train_s = d["provenance"]["train_seconds"]  # also right when --out already held this run
        exported = load_model(d["path"], device="cpu", dtype="float32")
        after, after_s = decoder(exported)
        hb, ha = d["metrics"]["heldout_before"], d["metrics"]["heldout_after"]
        b0 = before["metrics"]["mean_accepted_tokens"]
        row = {"token_weight": w, "objective": args.objective, "steps": args.steps,
               "heldout_acceptance_before": hb["expected_acceptance"],
               "heldout_acceptance_after": ha["expected_acceptance"],
               "heldout_acceptance_lower_before": hb.get("expected_acceptance_lower"),
               "heldout_acceptance_lower_after": ha.get("expected_acceptance_lower"),
               "intersection_mass": ha.get("intersection_mass"),
               "intersection_mass_lower": ha.get("intersection_mass_lower"),
               "aligned_fraction": ha.get("aligned_fraction"),
               "draft_token_match_before": hb["greedy_match"], "draft_token_match_after": ha["greedy_match"],
               "mean_accepted_before": b0, "mean_accepted_after": after["mean_accepted_tokens"],
               "acceptance_rate_before": before["metrics"]["acceptance_rate"],
               "acceptance_rate_after": after["acceptance_rate"],
               "ratio": after["mean_accepted_tokens"] / b0,
               "sampled_mean_accepted_before": before["metrics"]["sampled"]["mean_accepted_tokens"],
               "sampled_mean_accepted_after": after["sampled"]["mean_accepted_tokens"],
               "sampled_ratio": after["sampled"]["mean_accepted_tokens"] /
               before["metrics"]["sampled"]["mean_accepted_tokens"], "train_s": round(train_s, 1),
               "decode_s": round(after_s, 1), "path": d["path"], "candidate": d["candidate"]}
        rows.append(row)
        say(f"token weight {w:g}: held-out acceptance {row['heldout_acceptance_before']:.4f} -> "
            f"{row['heldout_acceptance_after']:.4f} (intersection mass {row['intersection_mass']:.3f}); mean "
            f"accepted tokens {b0:.3f} -> {row['mean_accepted_after']:.3f} ({row['ratio']:.2f}x) greedy, "
            f"{row['sampled_mean_accepted_before']:.3f} -> {row['sampled_mean_accepted_after']:.3f} sampled; "
            f"train {train_s:.0f}s")

    best = max(rows, key=lambda r: r["ratio"])
    budget = (collect_s or 0.0) + best["train_s"]

    # 4. speed: `dspark bench` before and after (each run times dspark's target-only loop itself), for the
    # draft of the FIRST token weight (the default of `dspark distill` when --token-weights is left alone)
    speed = {}
    if not args.no_bench:
        from dspark.decode.bench import BenchConfig, bench

        bcfg = BenchConfig(max_new_tokens=args.bench_max_new_tokens, ks=_ints(args.bench_ks), batch_sizes=(),
                           threads=args.threads)
        for name, draft in (("before", args.draft), ("after", rows[0]["path"])):
            rep = bench(args.target, draft, bcfg, task=args.task, n=args.bench_n, device="cpu", dtype="float32")
            speed[name] = _speed_summary(rep)
            say(f"bench {name}: " + ", ".join(f"{m} {v['speedup_vs_dspark_target_only']:.2f}x"
                                             for m, v in speed[name]["methods"].items()))

    report = {"target": args.target, "draft": args.draft, "task": args.task, "k": args.k, "threads": args.threads,
              "eval_prompts": len(eval_ids), "eval_max_new_tokens": args.eval_max_new_tokens,
              "cache": {"path": str(cache), "prompts": counts.rows, "positions": counts.positions,
                        "top_k": manifest.generation.k, "max_new_tokens": manifest.generation.max_new_tokens,
                        "seconds": None if collect_s is None else round(collect_s, 1)},
              "before": before["metrics"], "rows": rows, "speed": speed,
              "goal": {"ratio": GOAL_RATIO, "best_token_weight": best["token_weight"], "best_ratio": best["ratio"],
                       "ratio_met": best["ratio"] >= GOAL_RATIO, "budget_s": round(budget, 1),
                       "budget_counts_collection": collect_s is not None, "budget_met": budget <= GOAL_BUDGET_S}}
    atomic_write_json(out / "report.json", report)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    met = report["goal"]["ratio_met"] and report["goal"]["budget_met"]
    return 1 if args.strict and not met else 0


def _speed_summary(rep: dict) -> dict:
    """The dspark rows of a `dspark bench` report: tokens/s and speedup over dspark's own target-only
    loop, acceptance and mean accepted tokens; plus that loop's tokens/s and whether every output
    matched HF's target-only greedy output."""
    rows = {r["method"]: r for r in rep["results"]}
    own = rows["dspark-target-only"]
    methods = {m: {"tokens_per_s": r["tokens_per_s"], "speedup_vs_dspark_target_only": r["tokens_per_s"] /
                   own["tokens_per_s"], "acceptance_rate": r["acceptance_rate"],
                   "mean_accepted_tokens": r["mean_accepted_tokens"]}
               for m, r in rows.items() if m.startswith("dspark-") and m != "dspark-target-only"}
    return {"dspark_target_only_tokens_per_s": own["tokens_per_s"], "mode": rep.get("mode"), "methods": methods,
            "outputs_identical": all(r["outputs_identical"] for r in rep["results"])}


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console()
    t = Table(title=f"cross-tokenizer distill {report['draft']} -> {report['target']} ({report['task']}, greedy K="
                    f"{report['k']}, {report['eval_prompts']} eval prompts x {report['eval_max_new_tokens']} tokens)")
    for col in ("token weight", "held-out acc before", "after", "intersection mass", "aligned", "greedy acc. tokens",
                "ratio", "sampled acc. tokens", "ratio", "train s"):
        t.add_column(col, justify="right")
    for r in report["rows"]:
        t.add_row(f"{r['token_weight']:g}",
                  f"{r['heldout_acceptance_lower_before']:.3f}-{r['heldout_acceptance_before']:.3f}",
                  f"{r['heldout_acceptance_lower_after']:.3f}-{r['heldout_acceptance_after']:.3f}",
                  f"{r['intersection_mass_lower']:.3f}-{r['intersection_mass']:.3f}", f"{r['aligned_fraction']:.3f}",
                  f"{r['mean_accepted_before']:.3f} -> {r['mean_accepted_after']:.3f}", f"{r['ratio']:.2f}x",
                  f"{r['sampled_mean_accepted_before']:.3f} -> {r['sampled_mean_accepted_after']:.3f}",
                  f"{r['sampled_ratio']:.2f}x", f"{r['train_s']:.0f}")
    c.print(t)
    for name, s in report["speed"].items():
        c.print(f"bench {name}: dspark target-only {s['dspark_target_only_tokens_per_s']:.1f} tok/s; "
                + ", ".join(f"{m} {v['speedup_vs_dspark_target_only']:.2f}x (acc. tokens "
                            f"{v['mean_accepted_tokens']:.2f})" for m, v in s["methods"].items())
                + ("" if s["outputs_identical"] else "  OUTPUTS DIFFER"))
    g = report["goal"]
    c.print(f"goal >= {g['ratio']}x mean accepted tokens: {'met' if g['ratio_met'] else 'MISSED'} "
            f"(best token weight {g['best_token_weight']:g}: {g['best_ratio']:.2f}x)")
    c.print(f"goal budget (collect + one training) <= {GOAL_BUDGET_S // 60} min: "
            f"{'met' if g['budget_met'] else 'MISSED'} ({g['budget_s'] / 60:.1f} min"
            f"{'' if g['budget_counts_collection'] else ', training only: cache given'})")


if __name__ == "__main__":
    sys.exit(main())
