"""What a bundle tells the serving engines people already run, and its model card. Pure functions of
the manifest: text in, text out.

vLLM (docs "Draft Models"): `speculative_config = {"method": "draft_model", "model": DRAFT,
"num_speculative_tokens": K}`, passed as `LLM(model=TARGET, speculative_config=...)` or
`vllm serve TARGET --speculative-config '<json>'`. Field names as in vllm/config/speculative.py
(`SpeculativeConfig`, read at vllm-project/vllm commit 002e77c1; tests/bundle/test_engines.py keeps
the list). A draft with its own tokenizer gets `use_heterogeneous_vocab: true` (vLLM's token-level
intersection; it requires method "draft_model" and greedy draft sampling). What else vLLM accepts
and dspark could fill:
- `num_speculative_tokens_per_batch_size` ([[bs_lo, bs_hi, K], ...], accepted for every method by
  that SpeculativeConfig; vLLM's docs list it as tested with EAGLE, EAGLE-3 and DFlash): dspark
  measures K at batch size 1 only (`dspark select`), so it is not written; the card says so.
- `draft_tensor_parallel_size`: vLLM's `draft_model` proposer refuses a draft TP other than the
  target's (vllm/v1/spec_decode/draft_model.py `_raise_if_draft_tp_mismatch`), which is the default,
  so it is not written.
SGLang (docs "Standalone Speculative Decoding"; flags checked in python/sglang/srt/server_args.py at
sgl-project/sglang commit 001067ff): `--speculative-algorithm STANDALONE
--speculative-draft-model-path DRAFT --speculative-num-steps K --speculative-eagle-topk 1
--speculative-num-draft-tokens K+1` (a chain of K drafts plus the verified root token). Those server
arguments have no heterogeneous-vocabulary option, so a draft with its own tokenizer gets no
sglang.sh.
Neither engine loads optimum-quanto checkpoints (vLLM's `QuantizationMethods`,
vllm/model_executor/layers/quantization/__init__.py, and SGLang's QUANTIZATION_CHOICES in the
server_args.py above include bitsandbytes and GPTQ, not quanto): such a bundle gets neither file.
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


# checkpoint formats (dspark.quantize.backends.quantization_of) that neither vLLM nor SGLang loads
ENGINE_UNLOADABLE_FORMATS = ("quanto",)


def _cross(m: "BundleManifest") -> bool:
    return m.draft.tokenizer == "different"


def engine_refusals(m: "BundleManifest") -> dict[str, str]:
    """Engine file name -> why the bundle has none (no entry: the file is written)."""
    if m.draft.quantization_format in ENGINE_UNLOADABLE_FORMATS:
        why = (f"the draft is quantized with optimum-quanto ({m.draft.quantization}), which neither vLLM nor "
               "SGLang loads (both load bitsandbytes and GPTQ drafts)")
        return {VLLM_FILE: why, SGLANG_FILE: why}
    if _cross(m):
        return {SGLANG_FILE: "SGLang's draft models must share the target's vocabulary (its server arguments "
                             "have no heterogeneous-vocabulary option)"}
    return {}


def vllm_config(m: "BundleManifest") -> dict:
    """vLLM arguments: `LLM(**json.load(open("vllm.json")))` from inside the bundle folder."""
    spec = {
        "method": "draft_model",
        "model": f"./{DRAFT_DIR}",
        "num_speculative_tokens": m.policy.num_speculative_tokens,
    }
    if _cross(m):
        spec["use_heterogeneous_vocab"] = True
    return {"model": engine_target(m.target), "speculative_config": spec}


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


def engine_lines(m: "BundleManifest") -> list[str]:
    """The card's vLLM / SGLang section: how to launch each, or why this bundle has no file for it."""
    refused = engine_refusals(m)
    out: list[str] = []
    if VLLM_FILE in refused:
        out += [f"vLLM: no `{VLLM_FILE}`: {refused[VLLM_FILE]}.", ""]
    else:
        out += [f"vLLM, from inside this folder (`{VLLM_FILE}` holds the arguments):", "", "```bash",
                vllm_serve_command(m), "```", ""]
        if _cross(m):
            out += ["`use_heterogeneous_vocab: true` makes vLLM draft through the intersection of the two "
                    "vocabularies (its token-level intersection algorithm; needs a vLLM whose "
                    "`SpeculativeConfig` has this field). It supports greedy draft sampling only: leave "
                    "`draft_sample_method` at its default \"greedy\". It is vLLM's algorithm, not dspark's "
                    "cross-tokenizer decoding: the numbers above do not carry over.", ""]
        out += ["vLLM's `draft_model` method runs the draft at the target's tensor-parallel size (it refuses "
                "another), so `draft_tensor_parallel_size` is left unset.", ""]
    if SGLANG_FILE in refused:
        out.append(f"SGLang: no `{SGLANG_FILE}`: {refused[SGLANG_FILE]}.")
    else:
        out.append(f"SGLang: `./{SGLANG_FILE}` (STANDALONE speculative decoding with this draft).")
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def model_card(m: "BundleManifest") -> str:
    """README.md: what the pair is, the numbers, and how to serve it three ways."""
    t, d, p = m.target, m.draft, m.policy
    cross = _cross(m)
    head = (f"yes (in `{m.head_dir}/`, read by dspark's `learned` draft length; engines do not use it)"
            if m.head_dir else "no")
    if cross:
        tok_line = (f"Target tokenizer sha256: `{t.tokenizer_sha256}`; the draft has its own tokenizer (in "
                    f"`{DRAFT_DIR}/`, sha256 `{d.tokenizer_sha256}`): dspark decodes the pair cross-tokenizer "
                    "(greedy through text re-tokenization, sampling through the shared-token intersection). "
                    f"Acceptance head: {head}.")
    else:
        tok_line = f"Tokenizer sha256 (shared): `{t.tokenizer_sha256}`. Acceptance head: {head}."
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
        f"- fixed K for vLLM / SGLang: {p.num_speculative_tokens} ({p.num_speculative_tokens_source}). "
        "`dspark select` measures K at batch size 1 only, not per batch size, so vLLM's batch-size table "
        "`num_speculative_tokens_per_batch_size` is not set.",
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
        *engine_lines(m),
        "",
        "## Versions",
        "",
        ", ".join(f"{k} {v}" for k, v in m.versions.items()),
        "",
        "Every file's sha256 is in `dspark-bundle.yaml`; `dspark verify-bundle` checks them.",
        "",
    ]
    return "\n".join(lines)
