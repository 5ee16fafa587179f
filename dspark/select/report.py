"""What `dspark select` writes: report.json, report.md, report.png, selected.yaml, and the table.

selected.yaml is a `dspark.bundle.manifest.SelectionSpec` (the schema `dspark export --selection`
parses): built through that class, so the two cannot drift apart. Paths in it are absolute.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dspark.io import check_out_folder

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
REPORT_PNG = "report.png"
SELECTED_YAML = "selected.yaml"


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def _abs_if_path(value: str | None) -> str | None:
    if value is None:
        return None
    p = Path(value).expanduser()
    return str(p.resolve()) if p.exists() else value


def selection_spec(report: dict[str, Any], winner_row: dict[str, Any], spec) -> Any:
    """The winner as a SelectionSpec: its candidate fields, the chosen draft-length policy, and the
    measured (or, with a projection, projected) numbers."""
    from dspark.bundle.manifest import Metrics, SelectionSpec

    projected = report.get("projection") is not None
    warnings = list(winner_row.get("warnings") or [])
    if winner_row.get("tied_with"):
        warnings.append(f"tied with {', '.join(winner_row['tied_with'])} on {report['ranked_by']} (within "
                        f"{100 * report['tie_tolerance']:.0f}%): the order among them is within measurement noise")
    speed = winner_row.get("projected_speedup") if projected else winner_row.get("speedup")
    if speed is not None and speed <= 1.0:
        warnings.append(f"the winner is not faster than the target alone ({'projected ' if projected else ''}"
                        f"speedup {speed:.2f}x)")
    metrics = Metrics(
        acceptance_rate=winner_row.get("acceptance_rate"),
        mean_accepted_tokens=winner_row.get("mean_accepted_tokens"),
        acceptance_per_position=winner_row.get("acceptance_per_position"),
        draft_cost_ratio=winner_row.get("projected_cost_ratio") if projected else winner_row.get("draft_cost_ratio"),
        tokens_per_s=None if projected else winner_row.get("tokens_per_s"),
        baseline_tokens_per_s=None if projected else winner_row.get("baseline_tokens_per_s"),
        speedup=speed,
        best_draft_length=(winner_row.get("projected_best_draft_length") if projected
                           else winner_row.get("best_draft_length")),
        auto_speedup=None if projected else winner_row.get("auto_speedup"),
        peak_memory_mb=winner_row.get("peak_memory_mb"),
        projected=projected,
        task=report.get("task"),
        prompts=report.get("n_prompts"),
        max_new_tokens=report.get("max_new_tokens"),
        temperature=report.get("temperature"),
        objective=report.get("objective"),
        device=report.get("device"),
        hardware=(report["projection"]["label"] if projected else None),
        measured_at=report.get("measured_at"),
    )
    return SelectionSpec(
        name=winner_row["name"], target=_abs_if_path(report["target"]), draft=_abs_if_path(winner_row["draft"]),
        # on another machine the adaptive policy re-measures its costs there; the fixed K for engines
        # without adaptive drafting is metrics.best_draft_length
        draft_length="auto" if projected else winner_row["draft_length"],
        quantization=winner_row.get("quantization") or "none",
        device=getattr(spec, "device", None), dtype=getattr(spec, "dtype", None),
        notes=getattr(spec, "notes", None), warnings=warnings, metrics=metrics)


def markdown(report: dict[str, Any]) -> str:
    proj = report.get("projection")
    lines = [f"# dspark select: {report['target']}", "",
             f"Command: `{report['command']}`" if report.get("command") else "",
             "",
             f"{report['n_prompts']} prompts ({report['prompts_source']}), {report['max_new_tokens']} new tokens each, "
             f"temperature {report['temperature']}, {report['device']} {report['dtype']}, {report['threads']} threads; "
             f"objective **{report['objective']}** (ranked by `{report['ranked_by']}`).",
             f"Target alone (Hugging Face generate): {_fmt(report['baseline_tokens_per_s'], '.1f')} tokens/s "
             "(mean of the per-candidate blocks).", ""]
    if proj:
        lines += [f"**Projected** onto {proj['label']}: speedups in the `projected` columns are Leviathan's model "
                  "for the measured acceptance and that machine's cost ratio, not measurements.", ""]
    head = ["#", "candidate", "status", "quant", "accept", "acc. tokens", "c", "tok/s", "speedup", "best K", "auto",
            "policy", "peak MB"]
    if proj:
        head += ["projected c", "projected speedup", "projected K"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["candidates"]:
        cells = [str(r.get("rank") or ""), r["name"], r["status"], str(r.get("quantization") or "-"),
                 _fmt(r.get("acceptance_rate"), ".1%"), _fmt(r.get("mean_accepted_tokens"), ".2f"),
                 _fmt(r.get("draft_cost_ratio"), ".3f"), _fmt(r.get("tokens_per_s"), ".1f"),
                 _fmt(r.get("speedup"), ".2f") + ("x" if r.get("speedup") is not None else ""),
                 _fmt(r.get("best_draft_length"), "d"), _fmt(r.get("auto_speedup"), ".2f"),
                 str(r.get("draft_length") or "-"), _fmt(r.get("peak_memory_mb"), ".1f")]
        if proj:
            cells += [_fmt(r.get("projected_cost_ratio"), ".3f"), _fmt(r.get("projected_speedup"), ".2f"),
                      _fmt(r.get("projected_best_draft_length"), "d")]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if report.get("winner"):
        lines.append(f"**Winner: {report['winner']}**" + (f" (tied with {', '.join(report['ties'])})"
                                                           if report.get("ties") else ""))
    else:
        lines.append("**No winner**: no candidate could be scored.")
    lines.append("")
    for r in report["candidates"]:
        if r["status"] != "ok":
            lines.append(f"- {r['name']}: {r['status']}: {r.get('reason')}")
        for w in r.get("warnings") or []:
            lines.append(f"- **WARNING** {r['name']}: {w}")
        for n in r.get("notes") or []:
            lines.append(f"- note {r['name']}: {n}")
    lines += ["", "## Per method", ""]
    for r in report["candidates"]:
        if r["status"] != "ok" and not r.get("methods"):
            continue
        lines += [f"### {r['name']}", "", "| method | draft length | tok/s | speedup | accept | acc. tokens | mean K |",
                  "|---|---|---|---|---|---|---|"]
        for m, v in (r.get("methods") or {}).items():
            lines.append(f"| {m} | {v['draft_length']} | {_fmt(v['tokens_per_s'], '.1f')} | "
                         f"{_fmt(v['speedup'], '.2f')} | "
                         f"{_fmt(v['acceptance_rate'], '.1%')} | {_fmt(v['mean_accepted_tokens'], '.2f')} | "
                         f"{_fmt(v['mean_draft_length'], '.2f')} |")
        pos = r.get("acceptance_per_position") or []
        lines += ["", f"Acceptance per draft position (K={r.get('acceptance_per_position_k')} run): "
                  + ", ".join(f"{x:.2f}" for x in pos), ""]
    lines += ["## Definitions", ""] + [f"- **{k}**: {v}" for k, v in report["definitions"].items()] + [""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> Path:
    """Speedup against static draft length per candidate (measured: solid; Leviathan's model from
    the measured a, c and verify costs: dashed; auto: a star at its mean draft length), and
    acceptance per draft position."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    rows = [r for r in report["candidates"] if r.get("methods")]
    for i, r in enumerate(rows):
        color = f"C{i % 10}"
        ks = sorted(int(m[1:]) for m in r["methods"] if m.startswith("k") and m[1:].isdigit())
        ax1.plot(ks, [r["methods"][f"k{k}"]["speedup"] for k in ks], "o-", color=color, label=f"{r['name']} (measured)")
        pred = {int(k): v for k, v in (r.get("predicted_speedup") or {}).items()}
        if pred:
            pk = sorted(pred)
            ax1.plot(pk, [pred[k] for k in pk], "--", color=color, alpha=0.6, label=f"{r['name']} (Leviathan model)")
        auto = r["methods"].get("auto")
        if auto and auto.get("speedup") is not None:
            ax1.plot([auto["mean_draft_length"]], [auto["speedup"]], "*", color=color, markersize=14,
                     label=f"{r['name']} auto")
        pos = r.get("acceptance_per_position") or []
        if pos:
            ax2.plot(range(1, len(pos) + 1), pos, "o-", color=color, label=r["name"])
    ax1.axhline(1.0, color="grey", lw=0.8)
    ax1.set_xlabel("draft length K (static)")
    ax1.set_ylabel("speedup over the target alone")
    ax1.set_title("speedup vs draft length")
    ax2.set_xlabel("draft position")
    ax2.set_ylabel("accepted / drafted (all earlier drafts accepted too)")
    ax2.set_ylim(0, 1.05)
    ax2.set_title("acceptance per draft position")
    if rows:
        ax1.legend(fontsize=7)
        ax2.legend(fontsize=7)
    else:
        ax1.text(0.5, 0.5, "no candidate could be scored", ha="center", transform=ax1.transAxes)
    fig.suptitle(f"dspark select: {report['target']}, {report['n_prompts']} prompts x {report['max_new_tokens']} "
                 f"tokens, T={report['temperature']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_report(out: Path, report: dict[str, Any], winner_spec) -> dict[str, str]:
    """Write every report file atomically; returns {kind: path}. selected.yaml only with a winner
    (a stale one from an earlier run in the same folder is removed, so it never names a loser)."""
    from dspark.io import atomic_write_json, atomic_write_text, atomic_write_yaml

    out.mkdir(parents=True, exist_ok=True)
    files = {"json": str(atomic_write_json(out / REPORT_JSON, report)),
             "markdown": str(atomic_write_text(out / REPORT_MD, markdown(report))),
             "plot": str(plot(report, out / REPORT_PNG))}
    sel = out / SELECTED_YAML
    if winner_spec is not None:
        body = winner_spec.model_dump(mode="json")
        body["metrics"] = winner_spec.metrics.model_dump(mode="json", exclude_none=True)
        header = (f"dspark selection: {winner_spec.name} for {report['target']} ({report['objective']})\n"
                  f"package it with: dspark export --selection {sel} --out BUNDLE")
        files["selected"] = str(atomic_write_yaml(sel, body, header=header))
    elif sel.exists():
        sel.unlink()
    return files


def render_table(report: dict[str, Any]):
    """The rich table `dspark select` prints."""
    from rich.table import Table

    proj = report.get("projection")
    t = Table(title=f"dspark select: {report['target']}, {report['n_prompts']} prompts x {report['max_new_tokens']} "
                    f"tokens, T={report['temperature']}, objective {report['objective']}")
    for col in ("#", "candidate", "status", "quant", "accept", "acc. tok", "c", "tok/s", "speedup", "best K", "auto",
                "policy", "peak MB"):
        t.add_column(col, justify="left" if col in ("candidate", "status", "quant", "policy") else "right",
                     overflow="fold")
    if proj:
        for col in ("projected c", "projected speedup", "proj. K"):
            t.add_column(col, justify="right", style="magenta")
    for r in report["candidates"]:
        style = {"ok": None, "excluded": "yellow", "unsupported": "yellow", "failed": "red"}.get(r["status"])
        name = r["name"] + (" *" if r.get("warnings") else "")
        cells = [str(r.get("rank") or ""), name, r["status"], str(r.get("quantization") or "-"),
                 _fmt(r.get("acceptance_rate"), ".1%"), _fmt(r.get("mean_accepted_tokens"), ".2f"),
                 _fmt(r.get("draft_cost_ratio"), ".3f"), _fmt(r.get("tokens_per_s"), ".1f"),
                 _fmt(r.get("speedup"), ".2f") + ("x" if r.get("speedup") is not None else ""),
                 _fmt(r.get("best_draft_length"), "d"), _fmt(r.get("auto_speedup"), ".2f"),
                 str(r.get("draft_length") or "-"), _fmt(r.get("peak_memory_mb"), ".1f")]
        if proj:
            cells += [_fmt(r.get("projected_cost_ratio"), ".3f"), _fmt(r.get("projected_speedup"), ".2f") + "x",
                      _fmt(r.get("projected_best_draft_length"), "d")]
        t.add_row(*cells, style=style)
    return t


def summary_lines(report: dict[str, Any]) -> list[tuple[str, str | None]]:
    """(text, rich style) lines printed under the table."""
    lines: list[tuple[str, str | None]] = [
        (f"target alone: {_fmt(report['baseline_tokens_per_s'], '.1f')} tok/s (HF generate); speedup = candidate "
         "tok/s / target-alone tok/s in the candidate's own block; c = draft step / target step", None)]
    proj = report.get("projection")
    if proj:
        lines.append((f"PROJECTED onto {proj['label']} (Leviathan's model from the measured acceptance; not "
                      "measured)", "magenta"))
    for r in report["candidates"]:
        if r["status"] != "ok":
            lines.append((f"{r['name']}: {r['status']}: {r.get('reason')}",
                          "red" if r["status"] == "failed" else "yellow"))
        for w in r.get("warnings") or []:
            lines.append((f"WARNING {r['name']}: {w}", "bold red"))
    if report.get("winner"):
        tie = f" (tied with {', '.join(report['ties'])})" if report.get("ties") else ""
        lines.append((f"winner: {report['winner']}{tie}, draft length {report['winner_draft_length']}", "bold green"))
    else:
        lines.append(("no winner: no candidate could be scored", "bold red"))
    for kind, p in (report.get("files") or {}).items():
        lines.append((f"{kind}: {p}", None))
    return lines


def check_out(out: str | os.PathLike) -> Path:
    return check_out_folder(out, "the report")
