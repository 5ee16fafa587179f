"""Projecting a measured selection onto another machine (`--cost-ratio`, `--hardware`).

Acceptance is a property of the (target, draft, prompts) triple and carries over between machines;
the draft's cost ratio c does not. Leviathan et al.'s model gives the speedup on the other machine
from the measured per-token acceptance a and that machine's c:

    S(a, K, c) = E(a, K) / (K * c + 1),  E(a, K) = (1 - a^(K+1)) / (1 - a),  best K in 1..16

with the verify forward over K + 1 tokens costing one decode step (v = 1: decoding is memory-bound on
a GPU, so a few extra tokens per forward are nearly free). Every projected number is labelled
"projected" in the report; nothing projected is ever presented as measured.

c comes from either
- `--cost-ratio F` (one c for every candidate) or `--cost-ratio NAME=F,NAME=F` (per candidate), or
- `--hardware NAME`: a roofline estimate per candidate from a registry of machines,
      step time(model) = weight bytes / memory bandwidth + layers * launch overhead per layer
  with weight bytes counted as deployed: unquantized floating tensors at 2 bytes (bf16), quantized
  ones at their stored size. The launch overhead (an assumption, 30 us per decoder layer for an
  eager forward) dominates for tiny models; bandwidths are the vendors' published figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from dspark.errors import DsparkError

PROJECTION_K_MAX = 16
LAUNCH_OVERHEAD_S_PER_LAYER = 30e-6


@dataclass(frozen=True)
class Hardware:
    name: str
    description: str
    memory_bandwidth_gbs: float
    launch_overhead_s_per_layer: float = LAUNCH_OVERHEAD_S_PER_LAYER


HARDWARE: dict[str, Hardware] = {h.name: h for h in (
    Hardware("h200", "NVIDIA H200 SXM, HBM3e", 4800.0),
    Hardware("h100", "NVIDIA H100 SXM, HBM3", 3350.0),
    Hardware("a100", "NVIDIA A100 80GB SXM, HBM2e", 2039.0),
    Hardware("l40s", "NVIDIA L40S, GDDR6", 864.0),
    Hardware("a10g", "NVIDIA A10G, GDDR6", 600.0),
    Hardware("l4", "NVIDIA L4, GDDR6", 300.0),
    Hardware("rtx4090", "NVIDIA RTX 4090, GDDR6X", 1008.0),
)}


def get_hardware(name: str) -> Hardware:
    h = HARDWARE.get(str(name).strip().lower())
    if h is None:
        raise DsparkError(f"unknown hardware {name!r} (valid: {', '.join(HARDWARE)})")
    return h


def step_seconds(weight_bytes: float, layers: int, hw: Hardware) -> float:
    """Roofline decode-step time of a model: weights streamed once plus per-layer launch overhead."""
    return weight_bytes / (hw.memory_bandwidth_gbs * 1e9) + max(1, layers) * hw.launch_overhead_s_per_layer


def roofline_cost_ratio(draft_bytes: float, draft_layers: int, target_bytes: float, target_layers: int,
                        hw: Hardware) -> float:
    """c = draft step time / target step time on `hw` (see `step_seconds`)."""
    return step_seconds(draft_bytes, draft_layers, hw) / step_seconds(target_bytes, target_layers, hw)


def parse_cost_ratios(text: str, names: list[str]) -> dict[str, float]:
    """'0.05' -> that c for every name; 'a=0.03,b=0.06' -> per name (every name must be given).
    Values must be > 0."""
    text = str(text).strip()
    if not text:
        raise DsparkError("--cost-ratio is empty: give F or NAME=F,NAME=F")

    def value(v: str, where: str) -> float:
        try:
            c = float(v)
        except ValueError:
            raise DsparkError(f"--cost-ratio {where}: {v!r} is not a number") from None
        if not c > 0:
            raise DsparkError(f"--cost-ratio {where}: must be > 0, got {c}")
        return c

    if "=" not in text:
        c = value(text, text)
        return {n: c for n in names}
    out: dict[str, float] = {}
    for part in text.split(","):
        if "=" not in part:
            raise DsparkError(f"--cost-ratio {text!r}: {part!r} is not NAME=F")
        k, v = (s.strip() for s in part.split("=", 1))
        if k not in names:
            raise DsparkError(f"--cost-ratio names unknown candidate {k!r} (candidates: {', '.join(names)})")
        out[k] = value(v, part)
    missing = [n for n in names if n not in out]
    if missing:
        raise DsparkError(f"--cost-ratio has no value for {', '.join(missing)}: give NAME=F for every candidate, "
                          "or one F for all")
    return out


def project(a: float, c: float, k_max: int = PROJECTION_K_MAX) -> tuple[float, int]:
    """(projected speedup, its K) on a machine where the draft's cost ratio is c and v = 1."""
    from dspark.decode import analysis

    k = analysis.best_k(a, c, 1.0, k_max=k_max)
    return analysis.speedup_bound(a, k, c, 1.0), k


def predicted_curve(a: float, c: float, verify_costs: Mapping[int, float] | float, ks) -> dict[int, float]:
    """Leviathan's speedup bound at each K for this machine's measured c and verify costs."""
    from dspark.decode import analysis

    return {int(k): analysis.speedup_bound(a, int(k), c, verify_costs) for k in ks}
