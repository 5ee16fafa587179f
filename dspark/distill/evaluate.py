"""Measuring a draft against its target, two ways.

- `evaluate_heldout` (during training, no decoding): on the cache's held-out rows, the expected
  acceptance E[sum_x min(p, q)] over the top-K + tail buckets (and its lower bound, which gives the
  tail no credit), the greedy match rate (draft argmax == target argmax: the per-token acceptance of
  greedy speculative decoding), the objective's value, and the acceptance head's BCE when there is one.
- `measure_decoder` (before and after training): mean accepted tokens per verify step of dspark's
  real speculative decoder, greedy, static draft length K, on held-out prompts (a draft with another
  tokenizer through the cross-tokenizer decoder: `make_decoder` picks it).
A draft with another tokenizer has its own held-out metrics: `dspark.distill.cross`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from dspark.distill.losses import Objective, _flatten, acceptance_bounds, parse_objective, topk_support
from dspark.errors import DataError


class DraftForward(torch.nn.Module):
    """A causal LM split as the decoder runs it: base model -> final hidden states, gathered at the
    continuation positions, -> lm_head. Computing the head only on the positions that are scored
    skips the (large-vocabulary) projection of every prompt token.

    forward(input_ids [B, L], attention_mask [B, L], positions [B, T]) -> (hidden [B, T, H], logits [B, T, V]).
    Wrapped as one module so DistributedDataParallel sees (and synchronises) the whole computation.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        base = model.get_decoder() if hasattr(model, "get_decoder") else None
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if base is None or head is None or base is model:
            raise DataError(f"draft model {type(model).__name__} exposes no base model / lm_head split "
                            "(get_decoder, get_output_embeddings): dspark distils causal LMs that have one")
        self.base, self.head = base, head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor):
        h = self.base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        hs = h.gather(1, positions[..., None].expand(-1, -1, h.shape[-1]))
        return hs, self.head(hs)


@dataclass
class HeldoutTotals:
    positions: int = 0
    acceptance: float = 0.0
    acceptance_lower: float = 0.0
    greedy_match: float = 0.0
    objective: float = 0.0
    head_bce: float = 0.0
    head_abs_error: float = 0.0

    def mean(self, has_head: bool) -> dict[str, float]:
        n = max(self.positions, 1)
        out = {"expected_acceptance": self.acceptance / n, "expected_acceptance_lower": self.acceptance_lower / n,
               "greedy_match": self.greedy_match / n, "objective": self.objective / n, "positions": self.positions}
        if has_head:
            out.update(head_bce=self.head_bce / n, head_abs_error=self.head_abs_error / n)
        return out


@torch.no_grad()
def evaluate_heldout(forward: DraftForward, cache, objective: Objective | str, *, heldout_percent: float,
                     batch_size: int = 8, vocab_size: int | None = None, pad_id: int = 0,
                     max_length: int | None = None, head=None, max_rows: int | None = None) -> dict[str, float]:
    """Mean per-position metrics over the cache's held-out rows (see the module docstring)."""
    obj = parse_objective(objective) if isinstance(objective, str) else objective
    was_training = forward.training
    forward.eval()
    device = next(forward.parameters()).device
    tot = HeldoutTotals()
    rows = 0
    try:
        for batch in cache.batches(batch_size, split="heldout", heldout_percent=heldout_percent, shuffle=False,
                                   pad_id=pad_id, max_length=max_length):
            if max_rows is not None and rows >= max_rows:
                break
            rows += batch.input_ids.shape[0]
            b = batch.to(device)
            hidden, logits = forward(b.input_ids, b.attention_mask, b.positions)
            lp, ids, lg, tl, hs = _flatten(b.loss_mask, b.topk_logprobs, b.topk_ids, logits, b.tail, hidden,
                                           last_dims=(1, 1, 1, 0, 1))
            logp, logq = topk_support(lp, ids, lg, tail=tl, vocab_size=vocab_size)
            lower, upper = acceptance_bounds(logp, logq)
            v = lg.shape[-1] if vocab_size is None else vocab_size
            match = (lg[:, :v].argmax(-1) == ids[:, 0]).float()
            tot.positions += int(lower.shape[0])
            tot.acceptance += float(upper.sum())
            tot.acceptance_lower += float(lower.sum())
            tot.greedy_match += float(match.sum())
            tot.objective += float(obj(logp, logq).sum())
            if head is not None:
                pred = head.logits(hs.float())
                target = upper.clamp(0.0, 1.0)
                tot.head_bce += float(torch.nn.functional.binary_cross_entropy_with_logits(
                    pred, target, reduction="sum"))
                tot.head_abs_error += float((torch.sigmoid(pred) - target).abs().sum())
    finally:
        forward.train(was_training)
    if tot.positions == 0:
        raise DataError(f"the logits cache {str(cache.path)!r} has no held-out rows at --heldout-percent "
                        f"{heldout_percent:g} ({cache.num_rows} rows in all): collect more prompts or raise "
                        "--heldout-percent")
    return tot.mean(head is not None)


def fit_prompt(ids: Sequence[int], context: int | None, max_new_tokens: int) -> list[int]:
    """Keep the last tokens of a prompt so prompt + max_new_tokens fits the context."""
    ids = list(ids)
    if context is None or len(ids) + max_new_tokens < context:
        return ids
    return ids[len(ids) - (context - max_new_tokens - 1):]


def measure_decoder(target_model, draft_model, tokenizer, prompts: Sequence[Sequence[int]], *, k: int = 4,
                    max_new_tokens: int = 64, stop_token_ids: Sequence[int] | None = None,
                    batch_size: int | None = 8, draft_tokenizer=None, temperature: float = 0.0,
                    seed: int = 0) -> dict[str, Any]:
    """Mean accepted tokens (bonus included) of speculative decoding with a static draft length `k`,
    over `prompts` (target token ids), with dspark's real decoder: greedy, or sampled at `temperature`
    from `seed`. `draft_tokenizer`: the draft's own tokenizer when it differs (the pair then decodes
    cross-tokenizer)."""
    from functools import reduce

    from dspark.decode import make_decoder
    from dspark.decode.types import GenerationConfig

    if not prompts:
        raise DataError("no held-out prompts to measure the decoder on")
    was_training = draft_model.training
    draft_model.eval()
    try:
        dec = make_decoder(target_model, draft_model, tokenizer, str(k), draft_tokenizer=draft_tokenizer,
                           stop_token_ids=stop_token_ids)
        context = dec.target.max_positions
        ids = [fit_prompt(p, context, max_new_tokens) for p in prompts]
        with torch.no_grad():
            cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                                   seed=seed if temperature > 0 else None)
            results = dec.generate(ids, cfg, batch_size=batch_size)
    finally:
        draft_model.train(was_training)
    stats = reduce(lambda a, b: a.merge(b), [r.stats for r in results])
    return {"mean_accepted_tokens": stats.mean_accepted_tokens, "acceptance_rate": stats.acceptance_rate,
            "k": k, "prompts": len(ids), "generated_tokens": stats.generated, "verify_steps": stats.verify_steps,
            "max_new_tokens": max_new_tokens, "mode": dec.mode, "temperature": temperature}


__all__ = ["DraftForward", "evaluate_heldout", "fit_prompt", "measure_decoder"]
