"""What a bundle tells the serving engines people already run, and its model card. Pure functions of
the manifest: text in, text out.

vLLM (docs "Draft Models"): `speculative_config = {"method": "draft_model", "model": DRAFT,
"num_speculative_tokens": K}`, passed as `LLM(model=TARGET, speculative_config=...)` or
`vllm serve TARGET --speculative-config '<json>'`.
SGLang (docs "Standalone Speculative Decoding"): `--speculative-algorithm STANDALONE
--speculative-draft-model-path DRAFT --speculative-num-steps K --speculative-eagle-topk 1
--speculative-num-draft-tokens K+1` (a chain of K drafts plus the verified root token).
Both engines draft a fixed K per step, so they get the measured best K (or the static K, or a
default); dspark's own server uses the adaptive policy.
"""

from __future__ import annotations

import json
import shlex
from typing import TYPE_CHECKING

from dspark.bundle.manifest import DRAFT_DIR, SGLANG_FILE, TARGET_DIR, VLLM_FILE

if TYPE_CHECKING:
    from dspark.bundle.manifest import BundleManifest, TargetRef


def engine_target(target: "TargetRef", relative_to_bundle: bool = True) -> str:
    """How an engine should name the target: the bundled copy, the hub id, or the local folder the
    bundle was made from."""
    if target.included:
        return f"./{TARGET_DIR}" if relative_to_bundle else TARGET_DIR
    return target.resolves_to


def vllm_config(m: "BundleManifest") -> dict:
    """vLLM arguments: `LLM(**json.load(open("vllm.json")))` from inside the bundle folder."""
    return {
        "model": engine_target(m.target),
        "speculative_config": {
            "method": "draft_model",
            "model": f"./{DRAFT_DIR}",
            "num_speculative_tokens": m.policy.num_speculative_tokens,
        },
    }


def vllm_serve_command(m: "BundleManifest") -> str:
    spec = json.dumps(vllm_config(m)["speculative_config"], separators=(",", ":"))
    return f"vllm serve {shlex.quote(engine_target(m.target))} --speculative-config {shlex.quote(spec)}"


def sglang_script(m: "BundleManifest") -> str:
    """A launch script that works from any folder (paths are taken relative to the script)."""
    k = m.policy.num_speculative_tokens
    target = engine_target(m.target)
    target_expr = '"$HERE/target"' if m.target.included else shlex.quote(target)
    return "\n".join([
        "#!/usr/bin/env bash",
        f"# SGLang server for the dspark bundle {m.name!r}: target {m.target.name}, draft {m.draft.name},",
        f"# {k} drafted tokens per step ({m.policy.num_speculative_tokens_source}). Extra flags are passed on,",
        "# e.g. ./sglang.sh --tp-size 2. Binds 127.0.0.1 unless HOST is set.",
        "set -euo pipefail",
        'HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"',
        "exec python -m sglang.launch_server \\",
        f"  --model-path {target_expr} \\",
        "  --speculative-algorithm STANDALONE \\",
        f'  --speculative-draft-model-path "$HERE/{DRAFT_DIR}" \\',
        f"  --speculative-num-steps {k} \\",
        "  --speculative-eagle-topk 1 \\",
        f"  --speculative-num-draft-tokens {k + 1} \\",
        '  --host "${HOST:-127.0.0.1}" --port "${PORT:-30000}" \\',
        '  "$@"',
        "",
    ])


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def model_card(m: "BundleManifest") -> str:
    """README.md: what the pair is, the numbers, and how to serve it three ways."""
    t, d, p = m.target, m.draft, m.policy
    cross = d.tokenizer == "different"
    if cross:
        tok_line = (f"Target tokenizer sha256: `{t.tokenizer_sha256}`; the draft has its own tokenizer (in "
                    f"`{DRAFT_DIR}/`, sha256 `{d.tokenizer_sha256}`): dspark decodes the pair cross-tokenizer "
                    "(greedy through text re-tokenization, sampling through the shared-token intersection). "
                    f"Acceptance head: {'yes' if d.acceptance_head else 'no'}.")
    else:
        tok_line = (f"Tokenizer sha256 (shared): `{t.tokenizer_sha256}`. Acceptance head: "
                    f"{'yes' if d.acceptance_head else 'no'}.")
    engines = [
        f"vLLM, from inside this folder (`{VLLM_FILE}` holds the arguments):",
        "",
        "```bash",
        vllm_serve_command(m),
        "```",
        "",
        f"SGLang: `./{SGLANG_FILE}` (STANDALONE speculative decoding with this draft).",
    ] if not cross else [
        "vLLM and SGLang: not applicable (their draft models must share the target's vocabulary), so this "
        f"bundle has no `{VLLM_FILE}` / `{SGLANG_FILE}`.",
    ]
    lines = [
        f"# {m.name}: a speculative-decoding draft for {t.name}",
        "",
        f"Made by `dspark export` on {m.created_at}. The draft in `{DRAFT_DIR}/` proposes tokens; the target "
        "verifies them, so outputs are exactly the target's (greedy: token-identical; sampling: the "
        "target's distribution).",
        "",
        "## Pair",
        "",
        "| | name | resolves to | identity |",
        "|---|---|---|---|",
        f"| target | `{t.name}` ({t.kind}) | `{t.resolves_to}`{' (copied into `target/`)' if t.included else ''} | "
        f"{'revision ' + t.revision if t.revision else 'weights sha256 ' + (t.weight_sha256 or 'unknown')} |",
        f"| draft | `{d.name}` | `{DRAFT_DIR}/` ({d.architecture or 'unknown architecture'}, "
        f"{d.parameters if d.parameters is not None else '?'} parameters, quantization {d.quantization}) | "
        f"weights sha256 {d.weight_sha256} |",
        "",
        tok_line,
        "",
        "## Decoding policy",
        "",
        f"- dspark draft length: `{p.draft_length}` ({p.kind}"
        f"{''.join(f', {k}={_fmt(v)}' for k, v in p.params.items())})",
        f"- fixed K for vLLM / SGLang: {p.num_speculative_tokens} ({p.num_speculative_tokens_source})"
        + (" (not used: cross-tokenizer pair)" if cross else ""),
        "",
        "## Measured",
        "",
    ]
    measured = m.metrics.measured()
    if measured:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in measured.items()]
        if m.metrics.projected:
            lines += ["", "Speedups are PROJECTED from measured acceptance (Leviathan's model), not measured here."]
    else:
        lines.append("Nothing measured: this bundle was exported from --target/--draft, not from a "
                     "`dspark select` result. Run `dspark select` to measure acceptance and speedup.")
    if m.selection and m.selection.warnings:
        lines += ["", "Warnings from selection:", ""] + [f"- {w}" for w in m.selection.warnings]
    lines += [
        "",
        "## Serve",
        "",
        f"dspark (OpenAI-compatible, draft length `{p.draft_length}`):",
        "",
        "```bash",
        "dspark verify-bundle .          # hashes, weight names, one decode against the target alone",
        "dspark serve-bundle . --port 8000",
        "```",
        "",
        *engines,
        "",
        "## Versions",
        "",
        ", ".join(f"{k} {v}" for k, v in m.versions.items()),
        "",
        "Every file's sha256 is in `dspark-bundle.yaml`; `dspark verify-bundle` checks them.",
        "",
    ]
    return "\n".join(lines)
