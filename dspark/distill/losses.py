"""Distillation objectives between a target distribution p and a draft distribution q.

Conventions (used by every function here):
- p is the TARGET (teacher), q is the DRAFT (student). Gradients flow into q only when the caller
  detaches p (the cached target never has a graph anyway).
- Objectives are computed on a shared *support* of B buckets: two log-distributions `logp`, `logq`
  of shape [N, B] whose rows each sum to 1. Two ways to build that support:
  * `topk_support` (offline cache): B = K + 1. The first K buckets are the target's top-K token ids;
    the last bucket is the TAIL: every other token of the vocabulary collapsed into one outcome.
    p_tail = 1 - sum_k p(top_k) (stored by the cache, computed in float32 when collecting), floored
    at TAIL_FLOOR = 1e-9 unless the top-K covers the whole vocabulary (so a tail rounded to 0 cannot
    make reverse KL infinite);
    q_tail = sum of q over all ids NOT in the target's top-K (computed exactly from the draft's full
    logits with a masked logsumexp, not as 1 - sum, so it keeps its precision and gradient when it is
    tiny). The cached top-K log-probs are stored in float16; the K + 1 target buckets are
    renormalised in log space so rounding cannot make them sum to anything but 1.
  * `full_support` (on-policy / online, and tests): B = V, both full softmaxes.
- Every objective maps (logp [N, B], logq [N, B]) -> per-position values [N]; `masked_mean`
  reduces them over the valid positions.

What the tail bucket costs (the bucketed distributions are p and q pushed through the map
"x -> x if x in top-K else TAIL", so the data-processing inequality applies):
- KL_bucket(p||q) <= KL_full(p||q), KL_bucket(q||p) <= KL_full(q||p), JSD_bucket <= JSD_full:
  the top-K objectives are lower bounds of the full ones and are exact when the tail is empty.
- 0 <= TVD_full - TVD_bucket <= min(p_tail, q_tail): the two differ only on the tail ids, where
  0.5 * sum_{x in tail} |p(x) - q(x)| <= 0.5 * (p_tail + q_tail) and the bucket keeps
  0.5 * |p_tail - q_tail|. Equivalently the bucketed expected acceptance overestimates the true
  one by at most min(p_tail, q_tail); `acceptance_bounds` returns both ends.

JSD(beta) follows GKD (Agarwal et al. 2023) and trl's `generalized_jsd_loss`: with the mixture
m = beta * p + (1 - beta) * q, JSD_beta = beta * KL(p||m) + (1 - beta) * KL(q||m); beta = 0 is
forward KL(p||q), beta = 1 is reverse KL(q||p). trl special-cases the endpoints (the raw formula
tends to 0 at both ends); dspark divides the interior by beta * (1 - beta), so
    jsd(beta) = JSD_beta / (beta * (1 - beta))  for 0 < beta < 1,
which tends to KL(p||q) as beta -> 0 and to KL(q||p) as beta -> 1: the family is continuous and its
endpoints ARE the KLs. At a fixed beta this only rescales trl's value by a constant (e.g. x4 at
beta = 0.5), i.e. it is absorbed by the learning rate.

TVD(p, q) = 0.5 * sum |p - q| and the expected acceptance sum_x min(p, q) = 1 - TVD: the probability
that speculative sampling accepts a token drafted from q when the target samples from p.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import torch

from dspark.errors import DsparkError

# A finite stand-in for -inf when masking logits: logsumexp over an all-masked row stays finite
# (so its gradient is 0, not NaN) and exp() of it underflows to exactly 0 in float32.
_MASKED_LOGIT = -1e30
# Smallest target tail mass used when the top-K ids do not cover the vocabulary (see topk_support).
TAIL_FLOOR = 1e-9
_LOG_ZERO = -1e4


# ---------------------------------------------------------------------------------------------
# Building the shared support
# ---------------------------------------------------------------------------------------------

def slice_vocab(logits: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """[..., V_padded] -> [..., vocab_size]: drop embedding rows past the tokenizer's vocabulary
    (models pad their output layer to a multiple of 64/128; those columns are not real tokens)."""
    if vocab_size is None or vocab_size == logits.shape[-1]:
        return logits
    if vocab_size > logits.shape[-1]:
        raise DsparkError(f"vocab_size {vocab_size} is larger than the logits' last dimension "
                          f"{logits.shape[-1]}")
    return logits[..., :vocab_size]


def tail_mass(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """[N, K] top-K log-probs -> [N] probability outside them, 1 - sum exp, clamped at 0 (the cache
    stores this value computed in float32 before the log-probs are rounded to float16)."""
    return (1.0 - topk_logprobs.float().exp().sum(-1)).clamp_min(0.0)


def _safe_log(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x.clamp_min(torch.finfo(x.dtype).tiny).log(), torch.full_like(x, -math.inf))


def topk_support(topk_logprobs: torch.Tensor, topk_ids: torch.Tensor, draft_logits: torch.Tensor,
                 tail: torch.Tensor | None = None, vocab_size: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Target top-K + tail bucket vs the draft collapsed onto the same K + 1 outcomes.

    Args:
        topk_logprobs: [N, K] target log-probs of its top-K tokens (any float dtype).
        topk_ids: [N, K] their token ids (distinct within a row), each < vocab size.
        draft_logits: [N, V] draft logits (V may include padded columns: pass `vocab_size`).
        tail: [N] target probability outside the top-K; None -> 1 - sum exp(topk_logprobs).
        vocab_size: number of real token columns of `draft_logits`.
    Returns:
        (logp [N, K+1], logq [N, K+1]) float32; bucket K is the tail. Rows of both sum to 1.
    """
    logits = slice_vocab(draft_logits, vocab_size).float()
    n, v = logits.shape
    ids = topk_ids.long()
    if ids.shape != topk_logprobs.shape or ids.shape[0] != n:
        raise DsparkError(f"shape mismatch: top-K log-probs {tuple(topk_logprobs.shape)}, ids "
                          f"{tuple(ids.shape)}, draft logits {tuple(draft_logits.shape)}")
    if ids.numel() and (int(ids.max()) >= v or int(ids.min()) < 0):
        raise DsparkError(f"target token id {int(ids.max())} is outside the draft's vocabulary of {v} "
                          "ids: target and draft must share a tokenizer")
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    logq_top = logits.gather(-1, ids) - lse
    rest = logits.scatter(-1, ids, _MASKED_LOGIT)
    logq_tail = torch.logsumexp(rest, dim=-1, keepdim=True) - lse
    empty_tail = logq_tail < _MASKED_LOGIT / 2  # K covers the whole vocabulary: no tail at all
    logq_tail = torch.where(empty_tail, torch.full_like(logq_tail, -math.inf), logq_tail)

    lp_top = topk_logprobs.float()
    p_tail = tail_mass(lp_top) if tail is None else tail.float().clamp_min(0.0)
    # A peaked target can round its tail to exactly 0 while the draft still puts mass there, which
    # would make reverse KL infinite: floor it (moves TVD / acceptance by at most TAIL_FLOOR).
    p_tail = torch.where(empty_tail.squeeze(-1), torch.zeros_like(p_tail), p_tail.clamp_min(TAIL_FLOOR))
    logp = torch.cat([lp_top, _safe_log(p_tail).unsqueeze(-1)], dim=-1)
    logp = logp - torch.logsumexp(logp, dim=-1, keepdim=True)
    return logp, torch.cat([logq_top, logq_tail], dim=-1)


def full_support(target_logits: torch.Tensor, draft_logits: torch.Tensor, vocab_size: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Both full distributions on the common vocabulary.

    Args:
        target_logits: [N, Vt] target logits.
        draft_logits: [N, Vd] draft logits.
        vocab_size: real token columns shared by both (default min(Vt, Vd): padded columns past
            the shorter embedding are not tokens).
    Returns:
        (logp [N, V], logq [N, V]) float32 log-softmaxes.
    """
    v = vocab_size if vocab_size is not None else min(target_logits.shape[-1], draft_logits.shape[-1])
    t = slice_vocab(target_logits, v).float()
    d = slice_vocab(draft_logits, v).float()
    return torch.log_softmax(t, dim=-1), torch.log_softmax(d, dim=-1)


# ---------------------------------------------------------------------------------------------
# Objectives on a shared support: (logp [N, B], logq [N, B]) -> [N]
# ---------------------------------------------------------------------------------------------

def _plogratio(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """[N, B] -> [N]: sum_b p_b (log p_b - log q_b) with 0 log 0 = 0. Zero-probability buckets
    are replaced before the arithmetic so no inf - inf reaches autograd (NaN gradients)."""
    p = logp.exp()
    live = p > 0
    lp = torch.where(live, logp, torch.zeros_like(logp))
    lq = torch.where(live, logq, torch.zeros_like(logq))
    return (p * (lp - lq)).sum(-1)


def forward_kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p||q) = sum p log(p/q): [N, B], [N, B] -> [N]. Mode-covering; the usual KD loss."""
    return _plogratio(logp, logq)


def reverse_kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(q||p) = sum q log(q/p): [N, B], [N, B] -> [N]. Mode-seeking."""
    return _plogratio(logq, logp)


def mixture_logprobs(logp: torch.Tensor, logq: torch.Tensor, beta: float) -> torch.Tensor:
    """log(beta * p + (1 - beta) * q): [N, B], [N, B] -> [N, B], for 0 < beta < 1."""
    # Clamp so a bucket empty in both (-inf, -inf) has a finite mixture: logaddexp's gradient at
    # (-inf, -inf) is NaN, and exp(-1e4) is exactly 0 in float32 so no value changes.
    a = logp.clamp_min(_LOG_ZERO) + math.log(beta)
    b = logq.clamp_min(_LOG_ZERO) + math.log1p(-beta)
    return torch.logaddexp(a, b)


def generalized_jsd(logp: torch.Tensor, logq: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """JSD(beta), scaled to be continuous in beta: [N, B], [N, B] -> [N].

    beta = 0 -> KL(p||q), beta = 1 -> KL(q||p); otherwise
    (beta * KL(p||m) + (1 - beta) * KL(q||m)) / (beta * (1 - beta)), m = beta p + (1 - beta) q.
    """
    if not 0.0 <= beta <= 1.0:
        raise DsparkError(f"jsd beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(logp, logq)
    if beta == 1.0:
        return reverse_kl(logp, logq)
    logm = mixture_logprobs(logp, logq, beta)
    raw = beta * _plogratio(logp, logm) + (1.0 - beta) * _plogratio(logq, logm)
    return raw / (beta * (1.0 - beta))


def tvd(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Total variation 0.5 * sum |p - q|: [N, B], [N, B] -> [N], in [0, 1]."""
    return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)


def expected_acceptance(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """sum_x min(p, q) = 1 - TVD: [N, B], [N, B] -> [N]. The probability that speculative sampling
    accepts a token drafted from q for a target sampling from p."""
    return torch.minimum(logp.exp(), logq.exp()).sum(-1)


def acceptance_bounds(logp: torch.Tensor, logq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds of the FULL-vocabulary acceptance from a top-K + tail support (last bucket = tail):
    [N, K+1], [N, K+1] -> (lower [N], upper [N]). lower = sum over the top-K ids only (tail ids
    accept nothing); upper = the bucketed acceptance = lower + min(p_tail, q_tail)."""
    m = torch.minimum(logp.exp(), logq.exp())
    lower = m[..., :-1].sum(-1)
    return lower, lower + m[..., -1]


# ---------------------------------------------------------------------------------------------
# Reduction and convenience wrappers
# ---------------------------------------------------------------------------------------------

def masked_mean(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """[N] per-position values, [N] bool mask (True = real position) -> scalar mean over the real
    positions; 0 (still differentiable) when there are none."""
    if mask is None:
        return values.mean() if values.numel() else values.sum()
    mask = mask.to(torch.bool)
    count = mask.sum()
    return torch.where(mask, values, torch.zeros_like(values)).sum() / count.clamp_min(1)


def _flatten(mask: torch.Tensor | None, *tensors: torch.Tensor, last_dims: tuple[int, ...]):
    """Flatten leading dims ([B, T, ...] -> [B*T, ...]) and keep only rows where mask is True.
    Selecting rows BEFORE the math keeps garbage in padded rows (ids 0, log-probs 0, ...) from ever
    producing inf/NaN values or gradients."""
    flat = [t.reshape(-1, *t.shape[t.dim() - d:]) if d else t.reshape(-1)
            for t, d in zip(tensors, last_dims)]
    if mask is None:
        return flat
    keep = mask.reshape(-1).to(torch.bool)
    if keep.shape[0] != flat[0].shape[0]:
        raise DsparkError(f"mask has {keep.shape[0]} positions but the inputs have {flat[0].shape[0]}")
    return [t[keep] for t in flat]


def topk_loss(objective: "Objective | str", topk_logprobs: torch.Tensor, topk_ids: torch.Tensor,
              draft_logits: torch.Tensor, tail: torch.Tensor | None = None, mask: torch.Tensor | None = None,
              vocab_size: int | None = None) -> torch.Tensor:
    """Mean objective over the real positions, offline (cached) form.

    Args:
        topk_logprobs, topk_ids: [..., K]; draft_logits: [..., V]; tail: [...] or None;
        mask: [...] bool (True = real position) or None.
    Returns: scalar.
    """
    obj = parse_objective(objective) if isinstance(objective, str) else objective
    if tail is None:
        tail = tail_mass(topk_logprobs)
    lp, ids, logits, tl = _flatten(mask, topk_logprobs, topk_ids, draft_logits, tail, last_dims=(1, 1, 1, 0))
    logp, logq = topk_support(lp, ids, logits, tail=tl, vocab_size=vocab_size)
    return masked_mean(obj(logp, logq))


def full_loss(objective: "Objective | str", target_logits: torch.Tensor, draft_logits: torch.Tensor,
              mask: torch.Tensor | None = None, vocab_size: int | None = None) -> torch.Tensor:
    """Mean objective over the real positions, full-vocabulary (online) form.

    Args: target_logits [..., Vt]; draft_logits [..., Vd]; mask [...] bool or None. Returns: scalar.
    """
    obj = parse_objective(objective) if isinstance(objective, str) else objective
    t, d = _flatten(mask, target_logits, draft_logits, last_dims=(1, 1))
    logp, logq = full_support(t, d, vocab_size=vocab_size)
    return masked_mean(obj(logp, logq))


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Objective:
    """A parsed objective: callable (logp [N, B], logq [N, B]) -> per-position loss [N]."""

    name: str
    fn: Callable[..., torch.Tensor]
    beta: float | None = None

    @property
    def spec(self) -> str:
        """Canonical text form, e.g. 'jsd:0.5' (what provenance records)."""
        return self.name if self.beta is None else f"{self.name}:{self.beta:g}"

    def __call__(self, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
        if self.beta is None:
            return self.fn(logp, logq)
        return self.fn(logp, logq, self.beta)


@dataclass(frozen=True)
class ObjectiveSpec:
    fn: Callable[..., torch.Tensor]
    description: str
    default_beta: float | None = None  # not None: takes a ':BETA' parameter in [0, 1]


OBJECTIVES: dict[str, ObjectiveSpec] = {
    "fkl": ObjectiveSpec(forward_kl, "forward KL(p_target || q_draft)"),
    "rkl": ObjectiveSpec(reverse_kl, "reverse KL(q_draft || p_target)"),
    "jsd": ObjectiveSpec(generalized_jsd, "generalised JSD(beta): 0 = forward KL, 1 = reverse KL", 0.5),
    "tvd": ObjectiveSpec(tvd, "total variation = 1 - expected acceptance (optimises acceptance directly)"),
}

_SPEC = re.compile(r"^\s*([a-z]+)\s*(?::\s*(.*?)\s*)?$")


def valid_objectives() -> str:
    return ", ".join(f"{k}[:BETA]" if v.default_beta is not None else k for k, v in OBJECTIVES.items())


def parse_objective(text: str) -> Objective:
    """'fkl' | 'rkl' | 'jsd' | 'jsd:0.3' | 'tvd' -> Objective; anything else -> DsparkError."""
    m = _SPEC.match(str(text).lower())
    name = m.group(1) if m else None
    if name not in OBJECTIVES:
        raise DsparkError(f"unknown objective {text!r} (valid: {valid_objectives()})")
    spec = OBJECTIVES[name]
    arg = m.group(2)
    if spec.default_beta is None:
        if arg is not None:
            raise DsparkError(f"objective {name!r} takes no parameter, got {text!r} (valid: {valid_objectives()})")
        return Objective(name, spec.fn)
    if arg is None or arg == "":
        return Objective(name, spec.fn, spec.default_beta)
    try:
        beta = float(arg)
    except ValueError:
        raise DsparkError(f"objective {text!r}: beta must be a number in [0, 1], got {arg!r}") from None
    if not (0.0 <= beta <= 1.0) or math.isnan(beta):
        raise DsparkError(f"objective {text!r}: beta must be in [0, 1], got {beta}")
    return Objective(name, spec.fn, beta)


parse = parse_objective
