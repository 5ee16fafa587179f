"""float32 vs bfloat16 for one model decoding alone on CPU: tokens/s of HF `generate` and of dspark's
target-only loop in both dtypes, and whether bfloat16's greedy output equals float32's.

    python benchmarks/bench_dtype_cpu.py                                   # smollm2-135m, 8 HumanEval prompts x 64
    python benchmarks/bench_dtype_cpu.py --model tiny-code --n 4 --max-new-tokens 16 --threads 1

Greedy, eos disabled (every method writes exactly --max-new-tokens), each prompt decoded alone; the
four methods take turns prompt by prompt after one warm-up each, so background load is shared.
bfloat16's output is compared with float32's token by token (the first differing position is
printed). The numbers are reported, never asserted.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HUMANEVAL = "shared/data/humaneval/HumanEval.jsonl.gz"


def humaneval_prompts(n: int) -> list[str]:
    """The first n HumanEval prompts from the nearest `shared/data` above this checkout."""
    for folder in (ROOT, *ROOT.parents):
        path = folder / HUMANEVAL
        if path.is_file():
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                return [json.loads(line)["prompt"] for line in fh][:n]
    raise SystemExit(f"{HUMANEVAL} not found above {ROOT}: pass --prompts FILE")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", help=".txt / .jsonl prompts file (default: HumanEval from ../shared)")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", help="also write the JSON report here")
    args = ap.parse_args()

    import torch

    from dspark.decode.bench import _first_difference, hf_generate
    from dspark.decode.engine import SpeculativeDecoder
    from dspark.decode.run import encode, quiet_transformers, read_prompts_file
    from dspark.decode.types import GenerationConfig
    from dspark.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    texts = read_prompts_file(args.prompts)[: args.n] if args.prompts else humaneval_prompts(args.n)
    with quiet_transformers():
        models = {dt: load_model(args.model, device="cpu", dtype=dt) for dt in ("float32", "bfloat16")}
    tok = models["float32"].tokenizer
    prompts = encode(tok, texts)
    gcfg = GenerationConfig(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    methods = {}
    for dt, m in models.items():
        loop = SpeculativeDecoder(m.model, None, m.tokenizer)
        methods[f"hf-generate-{dt}"] = lambda p, mm=m.model: hf_generate(mm, p, args.max_new_tokens, (), pad)
        methods[f"dspark-target-only-{dt}"] = lambda p, d=loop: d.generate([p], gcfg)[0].token_ids
    seconds = {name: 0.0 for name in methods}
    outputs: dict[str, list[list[int]]] = {name: [] for name in methods}
    with torch.inference_mode():
        for fn in methods.values():  # warm-up
            fn(prompts[0])
        for p in prompts:
            for name, fn in methods.items():
                t0 = time.perf_counter()
                outputs[name].append(list(fn(p)))
                seconds[name] += time.perf_counter() - t0
    tokens = args.max_new_tokens * len(prompts)
    rows = {name: {"tokens_per_s": tokens / seconds[name], "seconds": seconds[name]} for name in methods}
    for dt in ("float32", "bfloat16"):
        a, b = outputs[f"hf-generate-{dt}"], outputs[f"dspark-target-only-{dt}"]
        rows[f"dspark-target-only-{dt}"]["same_as_hf"] = a == b
    f32, b16 = outputs["hf-generate-float32"], outputs["hf-generate-bfloat16"]
    diffs = [-1 if x == y else _first_difference(x, y) for x, y in zip(f32, b16)]
    report = {"model": args.model, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
              "threads": torch.get_num_threads(), "methods": rows,
              "bf16_equals_fp32_prompts": sum(d < 0 for d in diffs),
              "bf16_first_difference": diffs,
              "bf16_over_fp32_hf": rows["hf-generate-bfloat16"]["tokens_per_s"]
              / rows["hf-generate-float32"]["tokens_per_s"],
              "bf16_over_fp32_dspark": rows["dspark-target-only-bfloat16"]["tokens_per_s"]
              / rows["dspark-target-only-float32"]["tokens_per_s"]}
    for name, r in rows.items():
        extra = "" if "same_as_hf" not in r else f"  same output as HF: {'yes' if r['same_as_hf'] else 'NO'}"
        print(f"{name:28s} {r['tokens_per_s']:8.1f} tok/s{extra}")
    print(f"bf16 / fp32 tokens/s: HF generate {report['bf16_over_fp32_hf']:.2f}x, dspark loop "
          f"{report['bf16_over_fp32_dspark']:.2f}x")
    print(f"bf16 greedy == fp32 greedy on {report['bf16_equals_fp32_prompts']}/{len(prompts)} prompts "
          f"(first differing position per prompt, -1 = none: {diffs})")
    if args.out:
        from dspark.io import atomic_write_json

        atomic_write_json(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
