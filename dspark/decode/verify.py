"""The verifier: pure functions turning (drafted tokens, draft probs q, target probs p) into
(accepted count, recovered-or-bonus token). This is the piece the losslessness tests pin down.

Terms (see dspark/decode/types.py): row i drafted `num_drafts[i]` tokens d_1..d_k; the target scored
k + 1 positions: position j (0-based) is the target's distribution for the token AFTER the prefix
plus d_1..d_j, so position j judges d_{j+1} and position k gives the bonus token.

- Greedy: d_{j+1} is accepted while it equals the target's argmax at position j; the first mismatch
  emits the target's argmax there (the recovered token); if all k match, the argmax at position k
  is the bonus token. The output is exactly the target's own greedy continuation.
- Sampling (Leviathan et al. 2023; Chen et al. 2023): d_{j+1} ~ q_j is accepted with probability
  min(1, p_j(d)/q_j(d)); at the first rejection the recovered token is drawn from
  norm(max(0, p_j - q_j)); if all k are accepted the bonus token is drawn from p_k. Every emitted
  token then follows p exactly (for any q).

Vocabulary: p and q must have the same last dimension V. Target and draft sharing one tokenizer
may still have different embedding sizes (padded vocabularies, e.g. 32000 vs 32064): the engine
slices both logits to `common_vocab_size` (the tokenizer's length, or the smaller model size) before
warping. Ids at or above it exist in no tokenizer and are never emitted; this renormalises the
target over real tokens, which only differs from the raw model if it puts mass on padding rows.
SpeculativeDecoder refuses models with different tokenizers (`check_same_tokenizer`); such pairs go
through dspark.decode.cross (make_decoder picks it), which verifies with these same functions in the
target's vocabulary.

Rows past their own `num_drafts` (the batch drafts max_i k_i tokens for every row) are ignored, so
a row's result depends only on its own drafts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dspark.errors import IncompatibleTokenizersError


@dataclass
class VerifyResult:
    """Per-row outcome of one verify step. All tensors have shape [B] (or [] for unbatched input).

    n_accepted: number of leading drafts accepted (0..num_drafts).
    next_token: the recovered token (if a draft was rejected) or the bonus token (if all accepted).
    is_bonus: True where every draft was accepted (next_token is a bonus token).
    """

    n_accepted: torch.Tensor
    next_token: torch.Tensor
    is_bonus: torch.Tensor


def _batched(draft_tokens: torch.Tensor, *others: torch.Tensor | None):
    unbatched = draft_tokens.dim() == 1
    if unbatched:
        return True, draft_tokens.unsqueeze(0), *[o.unsqueeze(0) if o is not None else None for o in others]
    return False, draft_tokens, *others


def _num_drafts(num_drafts: torch.Tensor | int | None, batch: int, k: int, device) -> torch.Tensor:
    if num_drafts is None:
        return torch.full((batch,), k, dtype=torch.long, device=device)
    if isinstance(num_drafts, int):
        return torch.full((batch,), num_drafts, dtype=torch.long, device=device)
    return num_drafts.to(device=device, dtype=torch.long).reshape(batch)


def _unbatch(unbatched: bool, res: VerifyResult) -> VerifyResult:
    if unbatched:
        return VerifyResult(res.n_accepted[0], res.next_token[0], res.is_bonus[0])
    return res


def _leading_true(flags: torch.Tensor) -> torch.Tensor:
    """flags: [B, K] bool -> [B] long, the length of the all-True prefix of each row."""
    return flags.to(torch.long).cumprod(dim=-1).sum(dim=-1)


def verify_greedy(draft_tokens: torch.Tensor, target_logits: torch.Tensor,
                  num_drafts: torch.Tensor | int | None = None) -> VerifyResult:
    """Greedy verification.

    draft_tokens: [B, K] (or [K]) long; target_logits: [B, K+1, V] (or [K+1, V]) logits (or probs,
    or any scores: only the argmax matters); num_drafts: [B] long or int, each <= K (default K).
    Returns VerifyResult with [B] tensors (or 0-d for unbatched input).
    """
    unbatched, drafts, logits = _batched(draft_tokens, target_logits)
    b, k = drafts.shape
    if logits.shape[:2] != (b, k + 1):
        raise ValueError(f"target_logits must be [B, K+1, V] = [{b}, {k + 1}, V], got {tuple(logits.shape)}")
    nd = _num_drafts(num_drafts, b, k, drafts.device)
    choice = logits.argmax(dim=-1)  # [B, K+1]
    in_range = torch.arange(k, device=drafts.device) < nd[:, None]
    n = _leading_true((drafts == choice[:, :k]) & in_range)
    next_token = choice.gather(1, n[:, None]).squeeze(1)
    return _unbatch(unbatched, VerifyResult(n, next_token, n == nd))


def verify_sampling(draft_tokens: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor,
                    generator: torch.Generator | None = None,
                    num_drafts: torch.Tensor | int | None = None) -> VerifyResult:
    """Exact speculative sampling (rejection sampling against the draft).

    draft_tokens: [B, K] long, d_{j+1} sampled from draft_probs[:, j];
    draft_probs q: [B, K, V] float (the draft's warped distributions, rows sum to 1);
    target_probs p: [B, K+1, V] float (the target's warped distributions);
    generator: the seeded source of the uniform draws and of the recovered/bonus samples;
    num_drafts: [B] long or int, each <= K (default K). Unbatched inputs drop the B axis.
    Returns VerifyResult with [B] tensors (or 0-d for unbatched input).
    """
    unbatched, drafts, q, p = _batched(draft_tokens, draft_probs, target_probs)
    b, k = drafts.shape
    if p.shape[:2] != (b, k + 1) or q.shape[:2] != (b, k) or p.shape[-1] != q.shape[-1]:
        raise ValueError(f"need draft_probs [B, K, V] and target_probs [B, K+1, V] with B={b}, K={k} and one V; "
                         f"got {tuple(q.shape)} and {tuple(p.shape)}")
    device = drafts.device
    nd = _num_drafts(num_drafts, b, k, device)
    p = p.float()
    q = q.float()
    u = torch.rand((b, k), generator=generator, device=device)
    idx = drafts[..., None]
    p_x = p[:, :k].gather(-1, idx).squeeze(-1)
    q_x = q.gather(-1, idx).squeeze(-1)
    # u < p/q without dividing (q_x > 0 for a token the draft sampled)
    accept = (u * q_x < p_x) & (torch.arange(k, device=device) < nd[:, None])
    n = _leading_true(accept)
    is_bonus = n == nd
    rows = torch.arange(b, device=device)
    p_n = p[rows, n]  # [B, V]
    if k > 0:
        q_n = q[rows, n.clamp(max=k - 1)] * (~is_bonus)[:, None].to(q.dtype)
    else:
        q_n = torch.zeros_like(p_n)
    residual = (p_n - q_n).clamp_min(0.0)
    total = residual.sum(-1, keepdim=True)
    # total == 0 only when p_n == q_n up to rounding, where a rejection has ~zero probability: use p
    dist = torch.where(total > 0, residual / total.clamp_min(1e-30), p_n)
    next_token = torch.multinomial(dist, 1, generator=generator).squeeze(-1)
    return _unbatch(unbatched, VerifyResult(n, next_token, is_bonus))


def expected_acceptance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Expected acceptance of a draft at a position: sum_x min(p(x), q(x)) = 1 - TVD(p, q).

    p, q: [..., V] probabilities -> [...]."""
    return torch.minimum(p.float(), q.float()).sum(dim=-1)


def common_vocab_size(target_vocab: int, draft_vocab: int | None = None, tokenizer_len: int | None = None) -> int:
    """The number of leading vocabulary ids both models (and the tokenizer) share.

    Padded embeddings make a model's logit width larger than the tokenizer; ids past the tokenizer's
    length are never real tokens, so both logits are sliced to this size before comparing."""
    sizes = [target_vocab] + [s for s in (draft_vocab, tokenizer_len) if s]
    return min(sizes)


def check_same_tokenizer(target_tokenizer, draft_tokenizer) -> None:
    """Raise IncompatibleTokenizersError unless both tokenizers map the same strings to the same ids
    (the vocabulary, special tokens included). A draft with another tokenizer is decoded by
    dspark.decode.cross.CrossTokenizerDecoder (dspark.decode.make_decoder chooses)."""
    if target_tokenizer is None or draft_tokenizer is None or target_tokenizer is draft_tokenizer:
        return
    tv, dv = target_tokenizer.get_vocab(), draft_tokenizer.get_vocab()
    if tv != dv:
        only_t = len(set(tv.items()) - set(dv.items()))
        only_d = len(set(dv.items()) - set(tv.items()))
        raise IncompatibleTokenizersError(
            f"target and draft tokenizers differ ({len(tv)} vs {len(dv)} tokens; {only_t} target and {only_d} "
            f"draft entries have no identical counterpart): SpeculativeDecoder needs the target's tokenizer; "
            "use dspark.decode.make_decoder (cross-tokenizer decoding) for this pair")
