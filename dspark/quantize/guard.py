"""The acceptance guard: does quantizing a draft cost acceptance?

Measured without decoding: the target writes greedy continuations of held-out prompts once; then,
teacher-forced on prompt + continuation, every continuation position gives the target's p and each
draft's q, and the draft's expected acceptance there is sum_x min(p(x), q(x)) (the probability a
token sampled from q is accepted, `dspark.decode.verify.expected_acceptance`). The guard compares
the mean over all positions for the quantized draft with the same mean for the unquantized one and
flags a drop larger than a threshold (absolute, default 0.05). Greedy agreement (argmax q ==
argmax p, the greedy decoder's acceptance) is reported next to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from dspark.decode.verify import expected_acceptance
from dspark.errors import DsparkError

DEFAULT_THRESHOLD = 0.05
DEFAULT_PROMPTS = 16
DEFAULT_TOKENS = 32


@dataclass(frozen=True)
class AcceptanceEstimate:
    """Means over `positions` teacher-forced positions."""

    expected_acceptance: float
    greedy_agreement: float
    positions: int


@dataclass(frozen=True)
class GuardVerdict:
    before: float
    after: float
    drop: float
    threshold: float
    passed: bool
    message: str


def position_acceptance(target_logits: torch.Tensor, draft_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: expected acceptance sum_x min(p, q) and greedy agreement (1.0 where the
    argmaxes match), with p = softmax(target_logits), q = softmax(draft_logits).

    target_logits, draft_logits: [N, V] (same V) -> ([N] float32, [N] float32)."""
    if target_logits.shape != draft_logits.shape:
        raise DsparkError(f"logit shapes differ: target {tuple(target_logits.shape)}, "
                          f"draft {tuple(draft_logits.shape)}")
    p = target_logits.float().softmax(-1)
    q = draft_logits.float().softmax(-1)
    agree = (target_logits.argmax(-1) == draft_logits.argmax(-1)).float()
    return expected_acceptance(p, q), agree


def guard_verdict(before: float, after: float, threshold: float = DEFAULT_THRESHOLD) -> GuardVerdict:
    """Flag `after` (quantized) when it is more than `threshold` (absolute) below `before`."""
    if not 0.0 <= threshold <= 1.0:
        raise DsparkError(f"guard threshold must be in [0, 1], got {threshold}")
    drop = before - after
    passed = drop <= threshold
    if passed:
        msg = (f"expected acceptance {after:.3f} vs {before:.3f} unquantized (drop {drop:+.3f}, "
               f"threshold {threshold:.3f}): ok")
    else:
        msg = (f"ACCEPTANCE DROP: expected acceptance fell from {before:.3f} (unquantized) to {after:.3f} "
               f"(drop {drop:.3f} > threshold {threshold:.3f}); this quantized draft will accept fewer tokens")
    return GuardVerdict(before, after, drop, threshold, passed, msg)


def _last_logits(model, ids: list[int], start: int, vocab: int) -> torch.Tensor:
    """Logits predicting ids[start:], i.e. at positions start-1 .. len-2: [len - start, vocab]."""
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    logits = model(input_ids=x, use_cache=False, logits_to_keep=len(ids) - start + 1).logits[0]
    return logits[:-1, :vocab].float()


def teacher_forced_acceptance(target_model, drafts: Mapping[str, torch.nn.Module], sequences: Sequence[Sequence[int]],
                              starts: Sequence[int], vocab: int) -> dict[str, AcceptanceEstimate]:
    """Mean expected acceptance and greedy agreement of each draft over the positions
    sequences[i][starts[i]:] (the target's continuation of prompt i), teacher-forced.

    sequences: token ids (prompt + continuation); starts: index of each continuation's first token
    (>= 1); vocab: the logit columns both models share."""
    sums = {name: [0.0, 0.0] for name in drafts}
    n = 0
    with torch.inference_mode():
        for ids, s in zip(sequences, starts):
            ids = list(ids)
            if not 1 <= s < len(ids):
                continue
            p_logits = _last_logits(target_model, ids, s, vocab)
            for name, model in drafts.items():
                acc, agree = position_acceptance(p_logits, _last_logits(model, ids, s, vocab))
                sums[name][0] += float(acc.sum())
                sums[name][1] += float(agree.sum())
            n += len(ids) - s
    if n == 0:
        raise DsparkError("the acceptance guard has no positions to measure: the target wrote nothing for the "
                          "held-out prompts")
    return {name: AcceptanceEstimate(a / n, g / n, n) for name, (a, g) in sums.items()}


def fit_prompts(prompts: Sequence[Sequence[int]], context: int, new_tokens: int) -> list[list[int]]:
    """Prompts shortened (oldest tokens dropped, the first kept: usually BOS) so that prompt +
    new_tokens fits the context."""
    room = context - new_tokens
    if room < 2:
        raise DsparkError(f"guard: {new_tokens} new tokens do not fit the context of {context} tokens")
    return [list(p) if len(p) <= room else [p[0]] + list(p[len(p) - room + 1:]) for p in prompts]


def target_continuations(target_model, tokenizer, prompts: Sequence[Sequence[int]], new_tokens: int,
                         batch_size: int = 8) -> list[list[int]]:
    """The target's greedy continuations (dspark's decoder, target alone; eos ends one early)."""
    from dspark.decode.engine import SpeculativeDecoder
    from dspark.decode.types import GenerationConfig

    dec = SpeculativeDecoder(target_model, None, tokenizer)
    res = dec.generate([list(p) for p in prompts], GenerationConfig(max_new_tokens=new_tokens), batch_size=batch_size)
    return [r.token_ids for r in res]
