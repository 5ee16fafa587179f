"""Collection cost: tokens/s, the fraction of time spent writing the cache, bytes per cached position.

    python benchmarks/bench_collect.py --target tiny-code --task code --num-prompts 64 \
        --max-new-tokens 64 --top-k 64 --batch-size 8 [--json]

Runs `dspark collect` (hf engine) into a fresh temporary folder and, in the same run, the peer:
transformers' batched `generate` on the same prompts and settings (left padding, greedy), which
only generates (no scoring forward, no cache). Reported:
- collect tokens/s (continuation positions per second of collection) and generate / score / write
  seconds; write fraction = write seconds / collection seconds (goal: <= 10%);
- bytes per cached position (measured on disk) next to the uncompressed estimate;
- collect time / peer generate time (what scoring and caching add to generation alone).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def peer_generate_seconds(target: str, prompts, batch_size: int, max_new_tokens: int, device: str,
                          dtype: str) -> tuple[float, int]:
    import torch

    from dspark.distill.collect import default_stop_token_ids, encode_prompts, load_target

    t = load_target(target, device=device, dtype=dtype)
    enc = [p.ids for p in encode_prompts(prompts, t.tokenizer)]
    pad = t.tokenizer.pad_token_id if t.tokenizer.pad_token_id is not None else 0
    stops = list(default_stop_token_ids(t)) or None
    tokens = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(enc), batch_size):
            batch = enc[s:s + batch_size]
            L = max(map(len, batch))
            ids = torch.full((len(batch), L), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), L), dtype=torch.long)
            for i, e in enumerate(batch):
                ids[i, L - len(e):] = torch.tensor(e)
                mask[i, L - len(e):] = 1
            out = t.model.generate(input_ids=ids.to(t.model.device), attention_mask=mask.to(t.model.device),
                                   max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                                   pad_token_id=pad)
            tokens += int((out[:, L:] != pad).sum())
    return time.perf_counter() - start, tokens


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="tiny-code")
    ap.add_argument("--task", default="code")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from dspark.distill.cache import bytes_per_position_estimate
    from dspark.distill.collect import run_collect
    from dspark.tasks import resolve_prompts

    with tempfile.TemporaryDirectory() as tmp:
        res = run_collect(args.target, Path(tmp) / "cache", task=args.task, num_prompts=args.num_prompts,
                          k=args.top_k, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                          device=args.device, dtype=args.dtype, show_progress=False)
    prompts = resolve_prompts(args.task, None, "train", args.num_prompts)
    peer_s, peer_tokens = peer_generate_seconds(args.target, prompts, args.batch_size, args.max_new_tokens,
                                                args.device, args.dtype)
    d = res.to_dict()
    report = {
        "target": args.target, "task": args.task, "prompts": d["rows"], "positions": d["positions"], "k": args.top_k,
        "collect_tokens_per_s": d["tokens_per_s"], "seconds": d["seconds"], "write_fraction": d["write_fraction"],
        "bytes_per_position": round(d["bytes_per_position"] or 0.0, 1),
        "bytes_per_position_uncompressed": bytes_per_position_estimate(args.top_k),
        "peer_generate_seconds": round(peer_s, 3), "peer_generate_tokens": peer_tokens,
        "peer_generate_tokens_per_s": round(peer_tokens / peer_s, 1) if peer_s else 0.0,
        "collect_over_generate": round(d["seconds"]["total"] / peer_s, 2) if peer_s else None,
    }
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"collect {args.target} / {args.task}: {d['rows']} prompts, {d['positions']:,} positions, "
                        f"K={args.top_k}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("collect_tokens_per_s", "write_fraction", "bytes_per_position", "bytes_per_position_uncompressed",
                "peer_generate_tokens_per_s", "collect_over_generate"):
        table.add_row(key, str(report[key]))
    for key, value in d["seconds"].items():
        table.add_row(f"seconds.{key}", str(value))
    Console().print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
