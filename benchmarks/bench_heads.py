"""An EAGLE-3 head against separate drafts on the same held-out rows, at draft lengths beyond the
head's training unroll.

    OMP_NUM_THREADS=1 python benchmarks/bench_heads.py --target tiny-code --cache runs/tc-cache \
        --head runs/tc-head/heads/eagle3 --draft tiny-code-draft-m --draft runs/tc-distill/drafts/tiny-code-draft-m \
        [--k 8] [--heldout-percent 10] [--batch-size 8] [--max-rows N] [--json]

No decoding (the decoder's head proposer lands with the proposer interface): on the cache's held-out
rows, teacher-forced on the target's own continuation, per anchor position and depth s < K
(`dspark.distill.heads`): the expected acceptance of speculative sampling against the target's full
distribution, the greedy match, and chained into the expected tokens per target step of a K-token
chain (greedy: 1 + leading matches, what greedy decoding accepts from that anchor; sampling:
1 + sum_k prod_{s<k} a_s). The head is unrolled K steps at evaluation even if it trained on fewer;
a separate draft's depth s is its own distribution s positions further on. Printed: per method the
tokens per target step at K = 1..K, and the head's ratio to the best separate draft at each K
(issue 14's goal: >= 1.5x at the same K).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--head", required=True)
    ap.add_argument("--draft", action="append", default=[])
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--heldout-percent", type=float, default=10.0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-rows", type=int, default=None)
    ap.add_argument("--max-length", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import torch

    from dspark.distill.cache import LogitsCache
    from dspark.distill.heads import HeadTrainConfig, OnlineFeatures, chain_metrics_for_draft, evaluate_head
    from dspark.models import load_model
    from dspark.models.eagle3 import load_head

    tgt = load_model(args.target, device="cpu", dtype="float32")
    target = tgt.model.eval()
    pad = int(tgt.tokenizer.pad_token_id if tgt.tokenizer.pad_token_id is not None else 0)
    cache = LogitsCache(args.cache)
    head = load_head(args.head)
    cfg = HeadTrainConfig(ttt_steps=args.k, batch_size=args.batch_size, heldout_percent=args.heldout_percent,
                          max_length=args.max_length)
    results = {}
    with torch.no_grad():
        results[f"head {Path(args.head).name}"] = evaluate_head(
            head, OnlineFeatures(target, head.config.aux_layer_ids), cache, cfg, head.vocab_map, pad_id=pad,
            max_length=args.max_length, max_rows=args.max_rows)
        for d in args.draft:
            draft = load_model(d, device="cpu", dtype="float32").model.eval()
            results[d] = chain_metrics_for_draft(draft, target, cache, steps=args.k, batch_size=args.batch_size,
                                                 heldout_percent=args.heldout_percent, pad_id=pad,
                                                 max_length=args.max_length, max_rows=args.max_rows,
                                                 vocab_size=min(int(target.get_output_embeddings().weight.shape[0]),
                                                                int(draft.get_output_embeddings().weight.shape[0])))
    head_name = next(iter(results))
    drafts = [n for n in results if n != head_name]
    ratio = {}
    for kind in ("greedy_tokens_per_step", "tokens_per_step"):
        if drafts:
            best = [max(results[d][kind][k] for d in drafts) for k in range(args.k)]
            ratio[kind] = [round(results[head_name][kind][k] / best[k], 4) for k in range(args.k)]
    report = {"target": args.target, "cache": args.cache, "k": args.k, "anchors": results[head_name]["anchors"],
              "methods": results, "head_over_best_draft": ratio}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"held-out rows of {args.cache}: {report['anchors']} anchors; expected tokens per target step at "
          f"K = 1..{args.k}")
    for kind, label in (("greedy_tokens_per_step", "greedy"), ("tokens_per_step", "sampling T=1")):
        print(f"\n{label}")
        for name, m in results.items():
            print(f"  {name:48s} " + " ".join(f"{x:6.3f}" for x in m[kind]))
        if kind in ratio:
            print(f"  {'head / best separate draft':48s} " + " ".join(f"{x:6.3f}" for x in ratio[kind]))
    print("\nexpected acceptance per depth")
    for name, m in results.items():
        print(f"  {name:48s} " + " ".join(f"{x:6.3f}" for x in m["expected_acceptance"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
