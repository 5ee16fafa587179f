"""The stage behind `dspark select`: gather candidates, score them (measure.py), project, rank
(rank.py), write the report (report.py). Every input error (an unknown objective, a glob that
matches nothing, candidates none of which can be read, a bad --cost-ratio, a missing task) is raised
before the target loads."""

from __future__ import annotations

import os
import platform
import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from dspark.errors import DsparkError
from dspark.select.candidates import gather
from dspark.select.measure import Progress, SelectConfig, entry_work, open_session, score_candidate
from dspark.select.rank import rank_candidates
from dspark.select.report import check_out, selection_spec, write_report

DEFINITIONS = {
    "acceptance_rate": "accepted / drafted draft tokens, in the chosen policy's run (all runs pooled when that "
                       "run drafted nothing: acceptance_rate_from)",
    "mean_accepted_tokens": "tokens emitted per target forward (verify step), bonus included; target alone = 1.0",
    "acceptance_per_token": "Leviathan's per-token acceptance a = accepted / (accepted + rejections), all runs",
    "acceptance_per_position": "accepted / drafted at draft position j in the largest static-K run: the fraction "
                               "of steps whose first j+1 drafts were all accepted",
    "draft_cost_ratio": "c = median one-token draft forward / median one-token target forward, same block",
    "tokens_per_s": "generated tokens / wall seconds, each prompt decoded alone, eos disabled",
    "speedup": "tokens_per_s / the target alone's tokens_per_s (HF generate) measured in the same block",
    "best_draft_length": "the static K with the highest measured tokens_per_s",
    "draft_length": "the chosen policy: the fastest of auto, the static Ks and the candidate's own form",
    "predicted_speedup": "Leviathan's model E(a,K)/(K c + v(K+1)) with this machine's measured verify costs v, "
                         "relative to bare target forwards (HF generate and dspark's loop add their own overhead)",
    "projected_speedup": "Leviathan's E(a,K)/(K c' + 1) at the best K for another machine's cost ratio c' "
                         "(projected, not measured)",
    "peak_memory_mb": "CPU: peak RSS while loading + warming up the draft minus RSS before; CUDA: "
                      "max_memory_allocated over that span minus the allocation before",
    "batched_tokens_per_s": "all prompts decoded together (batches of --batch-size) with the chosen policy",
}


def prompt_texts(tokenizer, prompts_file, task: str | None, n: int) -> tuple[list[str], str]:
    from dspark.decode.bench import bench_prompts

    return bench_prompts(tokenizer, prompts_file, task, n)


def check_prompt_source(prompts_file, task: str | None, n: int) -> None:
    """Exactly one source, checked before any model loads (a prompts file is read here)."""
    if (prompts_file is None) == (task is None):
        raise DsparkError("give exactly one of --task NAME or --prompts FILE")
    if task is not None:
        from dspark.tasks import get_task

        get_task(task)
    else:
        prompt_texts(None, prompts_file, None, n)


def _projection(config: SelectConfig, rows: list[dict[str, Any]], target_bytes: int, target_layers: int):
    """Add projected_cost_ratio / projected_speedup / projected_best_draft_length to the scored rows."""
    from dspark.select.hardware import get_hardware, parse_cost_ratios, project, roofline_cost_ratio

    if not config.projected:
        return None
    names = [r["name"] for r in rows]
    if config.hardware is not None:
        hw = get_hardware(config.hardware)
        info = {"label": f"{hw.name} ({hw.description})", "hardware": hw.name, "method": "roofline",
                "memory_bandwidth_gbs": hw.memory_bandwidth_gbs,
                "launch_overhead_us_per_layer": 1e6 * hw.launch_overhead_s_per_layer,
                "target_deployed_bytes": target_bytes}
        ratios = {}
        for r in rows:
            if r.get("draft_deployed_bytes"):
                ratios[r["name"]] = roofline_cost_ratio(r["draft_deployed_bytes"], r.get("draft_layers") or 1,
                                                        target_bytes, target_layers, hw)
    else:
        ratios = parse_cost_ratios(config.cost_ratio, names)
        info = {"label": f"cost ratio {config.cost_ratio}", "hardware": None, "method": "given cost ratio",
                "cost_ratio": config.cost_ratio}
    for r in rows:
        a = r.get("acceptance_per_token")
        c = ratios.get(r["name"])
        if r["status"] != "ok" or a is None or c is None:
            continue
        s, k = project(a, c)
        r.update(projected_cost_ratio=c, projected_speedup=s, projected_best_draft_length=k)
    return info


def select(candidates: Sequence[str], target: str, config: SelectConfig, task: str | None = None,
           prompts_file: str | os.PathLike | None = None, out: str | os.PathLike = "select-report",
           device: str = "auto", dtype: str = "auto", progress: Progress | None = None,
           command: str | None = None) -> dict[str, Any]:
    """Score `candidates` against `target` and write the report into `out`; returns the report
    (report.json's content plus `files`)."""
    import time

    import torch
    import transformers

    from dspark import __version__
    from dspark.quantize.loading import deployment_bytes
    from dspark.select.hardware import parse_cost_ratios

    t_start = time.perf_counter()
    out_path = check_out(out)
    check_prompt_source(prompts_file, task, config.n)
    entries = gather(list(candidates))
    unreadable = [e for e in entries if e.error is not None]
    if len(unreadable) == len(entries):  # nothing to score: say so before the target loads
        more = f" (and {len(unreadable) - 1} more unreadable candidates)" if len(unreadable) > 1 else ""
        raise DsparkError(f"no candidate can be scored: {unreadable[0].error}{more}")
    if config.cost_ratio is not None:
        parse_cost_ratios(config.cost_ratio, [e.name for e in entries])

    from dspark.decode.run import quiet_transformers
    from dspark.models import load_tokenizer

    with quiet_transformers():
        tok = load_tokenizer(target)
    texts, source = prompt_texts(tok, prompts_file, task, config.n)
    threads_before = torch.get_num_threads()
    try:
        session = open_session(target, texts, config, device, dtype, progress)
        session.total = sum(entry_work(e, config) for e in entries)
        rows = [score_candidate(session, e) for e in entries]
    finally:
        torch.set_num_threads(threads_before)  # --threads is for this run, not for the caller's process
    t = session.target
    projection = _projection(config, rows, deployment_bytes(t.model), int(getattr(t.config, "num_hidden_layers", 1)))
    ranking = rank_candidates(rows, config.objective,
                              None if config.max_memory_gb is None else config.max_memory_gb * 1024,
                              config.tie_tolerance, projected=config.projected)
    blocks = [r["baseline_tokens_per_s"] for r in rows if r.get("baseline_tokens_per_s")]
    winner_row = next((r for r in ranking.rows if r["name"] == ranking.winner), None)
    report: dict[str, Any] = {
        "target": target,
        "task": task,
        "prompts_source": source,
        "command": command,
        "n_prompts": len(session.prompts),
        "max_new_tokens": config.max_new_tokens,
        "temperature": config.temperature,
        "objective": config.objective,
        "ranked_by": ranking.metric,
        "tie_tolerance": config.tie_tolerance,
        "max_memory_gb": config.max_memory_gb,
        "ks": list(config.ks),
        "winner": ranking.winner,
        "winner_draft_length": winner_row.get("draft_length") if winner_row else None,
        "ties": ranking.ties,
        "baseline_tokens_per_s": statistics.fmean(blocks) if blocks else None,
        "baseline_batched_tokens_per_s": session.baseline_batched_tokens_per_s,
        "batch_size": config.batch_size,
        "target_step_ms": 1e3 * session.target_costs[1],
        "verify_costs": {str(k): v for k, v in session.verify_costs.items()},
        "projection": projection,
        "candidates": ranking.rows,
        "device": str(session.device),
        "dtype": t.dtype,
        "threads": session.threads,
        "seed": config.seed,
        "measured_at": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "elapsed_s": None,
        "versions": {"dspark": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "definitions": DEFINITIONS,
    }
    spec = None
    if winner_row is not None:
        entry = next(e for e in entries if e.name == winner_row["name"])
        spec = selection_spec(report, winner_row, entry.spec)
    report["elapsed_s"] = time.perf_counter() - t_start
    report["files"] = write_report(Path(out_path), report, spec)
    return report
