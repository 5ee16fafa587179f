"""Distilling a draft whose tokenizer differs from the target's (cross-tokenizer distillation).

The logits cache holds the target's continuations and its top-K log-probs in TARGET ids; a draft
from another family cannot read either. What the two models share is text (`dspark.decode.tokenmap`:
the exact bytes of every token of both vocabularies), so each cached row is re-tokenized for the draft
and two terms are trained:

1. Sequence level (Kim & Rush 2016, sequence-level KD): cross-entropy of the draft on ITS tokenization
   of the target's continuation. The draft prompt is built as the cross-tokenizer decoder builds it
   (the draft's leading special ids + the prompt text encoded with the draft's dummy prefix); the
   continuation's text is encoded in runs between special target tokens, a special mapped to the
   draft's special of the same role (eos -> eos) when it has one, as the decoder's resync does. This is
   the greedy decoder's signal: a drafted text is accepted while it spells the target's greedy text.
2. Token level, where it is defined: at an ALIGNED position the draft's distribution over the
   intersection (the byte strings that are a token of both vocabularies, `tokenmap.intersection`) is
   pushed toward the target's. The cross decoder's sampling path drafts from the draft's distribution
   restricted to the intersection and renormalised, q_I = q[I] / q(I) (`_draft_sampling`), so a drafted
   token is accepted with probability sum_{x in I} min(p(x), q_I(x)) <= p(I): that is the held-out
   expected acceptance here (`intersection_support`, the same q_I in log space:
   log_softmax(draft_logits[I])), and the test suite checks it against the real decoder's acceptance.

Alignment rule (`align_positions`). Target position t predicts continuation token t from the prompt
plus the bytes of tokens 0..t-1; draft position u predicts the draft's continuation token u likewise.
They are aligned when both prefixes spell the same bytes: the byte offset before target token t equals
the byte offset before draft token u (a target token boundary that is also a draft token boundary).
Offset 0 (right after the prompt) is always aligned; a target boundary inside a draft token is not
(the draft never conditions on that prefix in its own tokenization), and is left out of the token
term. Zero-length tokens (specials) share the offset of the text before them: of the positions with
one offset, the LAST on each side is taken (after the special on both sides: what the decoder compares
once it has committed the special). Every aligned position counts, whether or not the target's own
next token is in the intersection: the acceptance there is the target's whole shared mass, not only its
sampled token; positions are weighted by the target's mass on the intersection (below), so a position
whose next token is unshared (e.g. the target's eos) weighs what it can yield.

Loss support at an aligned position (the cache keeps the target's top-K ids S0 and its tail mass):
S = S0 cap I. Target: p over S, the top-K ids outside I get 0 (never accepted whatever the draft
does), the tail bucket stands for I minus S (the tail is assumed to lie in I; 0 when S covers I), then
renormalised: p_I. Draft: q_I over S and over I minus S. The objective (fkl, rkl, jsd, tvd of
`dspark.distill.losses`) of (p_I, q_I) is finite (q_I > 0 on S; both are 0 outside I) and its minimiser
q_I = p_I maximises sum_I min(p, q_I) (it is >= p on I). Positions are weighted by their intersection
mass p(S) (+ the tail when I minus S is not empty), detached. The held-out acceptance uses p as cached
(no renormalisation) with `losses.acceptance_bounds`: lower = sum over S of min(p, q_I) (the tail gives
nothing), upper = lower + min(p_tail, q_I(I minus S)); `expected_acceptance` is the upper one, as for
same-tokenizer drafts.

Why this and not ULD or GOLD (read: trl `trl/experimental/gold/gold_trainer.py`, `ULDLoss`):
- ULD (Boizard et al. 2024) pairs the i-th answer token of the student with the i-th of the teacher
  (truncating to the shorter) and compares SORTED probability vectors (an L1 / Wasserstein-1 distance
  that ignores which token carries which probability). Neither suits speculation: position i of two
  tokenizations is usually not the same text, and acceptance depends on token identity (sorted vectors
  can match exactly while sum min(p, q) is 0).
- GOLD (trl, "extended ULD") aligns by byte offsets: it walks both tokenizations and closes a group
  where both sides reach the same byte boundary, which is the rule above; it then merges each group
  into one row (the first position's distribution times the conditional probabilities of the group's
  actual later tokens) and uses a hybrid loss: JSD on tokens whose strings match in both vocabularies,
  sorted L1 on the rest. dspark keeps the alignment, keeps only the group starts (their distributions
  are exactly the ones the decoder compares: next token given the same text; a merged row is a scaled
  marginal that no decoder samples from), matches vocabularies by exact BYTES (tokenmap; GOLD matches
  token strings, so 'Ġx' and '▁x' differ), and drops the sorted term: outside the intersection nothing
  is ever accepted, so it cannot buy acceptance. The sequence-level cross-entropy (ULD's and GOLD's
  `crossentropy_weight` term, on the target's continuation) carries the greedy signal.

What is not covered: on-policy batches (they would need the target to score the draft's samples
re-tokenized) and the acceptance head (the decoder's `learned` policy is for same-tokenizer drafts) are
refused for cross-tokenizer drafts. In sampling mode the decoder conditions the draft on intersection
tokens it drafted (often not its own tokenization of that text); training uses its own tokenization.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from dspark.decode.factory import CROSS_TOKENIZER as MODE
from dspark.distill.losses import TAIL_FLOOR, Objective, _flatten, acceptance_bounds, masked_mean, parse_objective
from dspark.errors import DataError, DsparkError

# Measured on tiny-code <- tiny-code-draft-xbpe (README "Cross-tokenizer drafts"): 0 buys the most greedy
# acceptance and loses sampled acceptance; 3 keeps most of the greedy gain and the sampled acceptance.
DEFAULT_TOKEN_WEIGHT = 3.0
# A finite stand-in for -inf when masking logits before a logsumexp (as in losses.py): an all-masked
# row stays finite, so its gradient is 0, not NaN.
_MASKED_LOGIT = -1e30


# ---------------------------------------------------------------------------------------------
# The pair's vocabularies
# ---------------------------------------------------------------------------------------------

@dataclass
class VocabBridge:
    """What the two tokenizers share. tmap / dmap: `tokenmap.TokenBytes` of target and draft;
    inter_d / inter_t: [M] long, the intersection as parallel draft / target ids; t2i: [V_t] long, the
    index into the intersection of each target id, -1 outside it; draft_vocab: the draft's real token
    columns (its logits are sliced to them)."""

    tmap: Any
    dmap: Any
    inter_d: torch.Tensor
    inter_t: torch.Tensor
    t2i: torch.Tensor
    draft_vocab: int

    @property
    def size(self) -> int:
        return int(self.inter_d.shape[0])

    def to(self, device) -> "VocabBridge":
        return VocabBridge(self.tmap, self.dmap, self.inter_d.to(device), self.inter_t.to(device),
                           self.t2i.to(device), self.draft_vocab)


def vocab_bridge(target_tokenizer, draft_tokenizer, target_vocab: int, draft_vocab: int) -> VocabBridge:
    """Byte maps and intersection of a pair (ids past either model's vocabulary left out, as the
    decoder does). Raises IncompatibleTokenizersError for a tokenizer whose tokens are not byte strings
    (WordPiece)."""
    from dspark.decode.tokenmap import intersection, token_bytes

    tmap, dmap = token_bytes(target_tokenizer), token_bytes(draft_tokenizer)
    d_ids, t_ids = intersection(tmap, dmap)
    pairs = [(d, t) for d, t in zip(d_ids, t_ids) if d < draft_vocab and t < target_vocab]
    t2i = torch.full((max(target_vocab, len(tmap)),), -1, dtype=torch.long)
    for i, (_, t) in enumerate(pairs):
        t2i[t] = i
    return VocabBridge(tmap, dmap, torch.tensor([d for d, _ in pairs], dtype=torch.long),
                       torch.tensor([t for _, t in pairs], dtype=torch.long), t2i, int(draft_vocab))


# ---------------------------------------------------------------------------------------------
# Re-tokenization and alignment (pure, on id lists)
# ---------------------------------------------------------------------------------------------

def align_positions(target_lengths: Sequence[int], draft_lengths: Sequence[int]) -> list[tuple[int, int]]:
    """Aligned (target position t, draft position u) pairs (module docstring): the byte offset before
    target token t equals the byte offset before draft token u; of several positions at one offset
    (zero-length tokens), the last on each side. Inputs: the byte length of each continuation token
    on each side. Returns pairs in increasing order."""
    def last_at(lengths: Sequence[int]) -> dict[int, int]:
        offsets = itertools.accumulate(lengths, initial=0)
        return {off: i for i, off in zip(range(len(lengths)), offsets)}

    t_at, d_at = last_at(target_lengths), last_at(draft_lengths)
    return sorted((t, d_at[off]) for off, t in t_at.items() if off in d_at)


def draft_prompt_ids(bridge: VocabBridge, prompt_ids: Sequence[int]) -> list[int] | None:
    """The draft's prompt for a target prompt, as the cross decoder builds it: the draft's leading
    special ids, then the prompt's text (the target tokenizer's dummy prefix removed) encoded with the
    draft's own dummy prefix. None when the text has no draft encoding (within the draft model's rows)."""
    tm, dm = bridge.tmap, bridge.dmap
    text = tm.text_bytes(prompt_ids)
    if tm.prefix and text.startswith(tm.prefix):
        text = text[len(tm.prefix):]
    body = dm.encode_bytes(dm.prefix + text) if text else []
    ids = None if body is None else list(dm.lead_ids) + body
    return ids if ids is not None and all(i < bridge.draft_vocab for i in ids) else None


@dataclass
class CrossRow:
    """One cached row seen by the draft. draft_ids [P + U]: the draft prompt (P ids) and the draft's
    continuation (U ids); target_positions: the target continuation positions covered (T'); aligned:
    (target position, draft continuation index) pairs."""

    draft_ids: list[int]
    prompt_len: int
    target_positions: int
    aligned: list[tuple[int, int]]


def retokenize(bridge: VocabBridge, prompt_ids: Sequence[int], continuation_ids: Sequence[int]) -> CrossRow | None:
    """A target (prompt, continuation) for the draft (module docstring). The continuation's text runs
    between special target tokens are encoded with `encode_bytes`; a special maps to the draft's special
    of the same role, or to nothing. A run with no draft encoding (within the draft model's rows) ends
    the row there. None: the prompt has no draft encoding."""
    prompt = draft_prompt_ids(bridge, prompt_ids)
    if prompt is None:
        return None
    tp, dp = bridge.tmap.pieces, bridge.dmap.pieces
    t_len: list[int] = []
    d_ids: list[int] = []
    run: list[bytes] = []
    for t in list(continuation_ids) + [None]:
        piece = tp[t] if t is not None and 0 <= t < len(tp) else None
        if piece is not None:
            run.append(piece)
            continue
        if run:
            enc = bridge.dmap.encode_bytes(b"".join(run))
            if enc is None or any(i >= bridge.draft_vocab for i in enc):
                break
            t_len.extend(len(p) for p in run)
            d_ids.extend(enc)
            run = []
        if t is not None:
            t_len.append(0)
            role = bridge.tmap.role(t)
            did = bridge.dmap.specials.get(role) if role else None
            if did is not None and did < bridge.draft_vocab:
                d_ids.append(did)
    d_len = [len(dp[i]) if 0 <= i < len(dp) and dp[i] is not None else 0 for i in d_ids]
    return CrossRow(draft_ids=prompt + d_ids, prompt_len=len(prompt), target_positions=len(t_len),
                    aligned=align_positions(t_len, d_len))


def fit_row(row: CrossRow, max_length: int | None) -> CrossRow:
    """Fit into the draft's context: drop prompt ids from the left (keeping one, which the first
    prediction needs), then continuation ids from the end (and the aligned pairs past them)."""
    n = len(row.draft_ids)
    if max_length is None or n <= max_length:
        return row
    u = n - row.prompt_len
    keep_p = max(1, max_length - u)
    keep_u = max(0, min(u, max_length - keep_p))
    ids = row.draft_ids[row.prompt_len - keep_p: row.prompt_len + keep_u]
    return CrossRow(ids, keep_p, row.target_positions, [(t, j) for t, j in row.aligned if j < keep_u])


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------

@dataclass
class CrossBatch:
    """A training batch for a cross-tokenizer draft. B rows, L = longest draft sequence, U = longest
    draft continuation, A = most aligned positions in a row, K = the cache's top-K.

    input_ids [B, L] long, attention_mask [B, L] long   the draft's prompt + continuation, right-padded
    positions [B, U] long     index into L of the logits predicting draft continuation token u
    loss_mask [B, U] bool     real draft continuation positions; labels [B, U] long their tokens
    align_index [B, A] long   aligned positions as indices into U; align_mask [B, A] bool
    topk_ids [B, A, K] long (TARGET ids), topk_logprobs [B, A, K] float32, tail [B, A] float32:
                              the target's cached distribution at those positions
    target_positions: real target continuation positions in the batch (for the aligned fraction)
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor
    loss_mask: torch.Tensor
    labels: torch.Tensor
    align_index: torch.Tensor
    align_mask: torch.Tensor
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    tail: torch.Tensor
    target_positions: int

    def to(self, device) -> "CrossBatch":
        return CrossBatch(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()})


def cross_batch(batch, bridge: VocabBridge, pad_id: int = 0, max_length: int | None = None) -> CrossBatch:
    """A `cache.CacheBatch` (target ids, collated without truncation) -> a CrossBatch for the draft."""
    rows = []
    b = batch.input_ids.shape[0]
    lm = batch.loss_mask.cpu()
    for i in range(b):
        t = int(lm[i].sum())
        p = int(batch.positions[i, 0]) + 1 if t else int(batch.attention_mask[i].sum())
        ids = batch.input_ids[i].tolist()
        row = retokenize(bridge, ids[:p], ids[p:p + t])
        if row is None:  # no draft encoding of the prompt: the row trains nothing
            row = CrossRow([pad_id], 1, 0, [])
        rows.append(fit_row(row, max_length))
    L = max(len(r.draft_ids) for r in rows)
    U = max(len(r.draft_ids) - r.prompt_len for r in rows)
    A = max(len(r.aligned) for r in rows)
    k = batch.topk_ids.shape[-1]
    input_ids = torch.full((b, L), pad_id, dtype=torch.long)
    attn = torch.zeros((b, L), dtype=torch.long)
    positions = torch.zeros((b, U), dtype=torch.long)
    loss_mask = torch.zeros((b, U), dtype=torch.bool)
    labels = torch.zeros((b, U), dtype=torch.long)
    align_index = torch.zeros((b, A), dtype=torch.long)
    align_mask = torch.zeros((b, A), dtype=torch.bool)
    topk_ids = torch.zeros((b, A, k), dtype=torch.long)
    topk_lp = torch.zeros((b, A, k), dtype=torch.float32)
    tail = torch.zeros((b, A), dtype=torch.float32)
    for i, r in enumerate(rows):
        n, p = len(r.draft_ids), r.prompt_len
        u = n - p
        input_ids[i, :n] = torch.tensor(r.draft_ids, dtype=torch.long)
        attn[i, :n] = 1
        positions[i, :u] = torch.arange(p - 1, p - 1 + u)
        loss_mask[i, :u] = True
        labels[i, :u] = input_ids[i, p:n]
        if r.aligned:
            ts = torch.tensor([t for t, _ in r.aligned], dtype=torch.long)
            a = len(r.aligned)
            align_index[i, :a] = torch.tensor([j for _, j in r.aligned], dtype=torch.long)
            align_mask[i, :a] = True
            topk_ids[i, :a] = batch.topk_ids[i, ts].long()
            topk_lp[i, :a] = batch.topk_logprobs[i, ts].float()
            tail[i, :a] = batch.tail[i, ts].float()
    return CrossBatch(input_ids, attn, positions, loss_mask, labels, align_index, align_mask, topk_ids, topk_lp,
                      tail, target_positions=sum(r.target_positions for r in rows))


# ---------------------------------------------------------------------------------------------
# The intersection support
# ---------------------------------------------------------------------------------------------

def intersection_logprobs(draft_logits: torch.Tensor, inter_d: torch.Tensor) -> torch.Tensor:
    """log q_I: [N, V_d] draft logits, [M] intersection draft ids -> [N, M], the draft's distribution
    restricted to the intersection and renormalised (the decoder's q[I] / q(I) at temperature 1, in log
    space so tiny probabilities keep their gradient)."""
    return torch.log_softmax(draft_logits.float()[:, inter_d], dim=-1)


@dataclass
class IntersectionSupport:
    """Top-K + tail buckets of one set of aligned positions, over TARGET ids (bucket K: the tail).

    logp [N, K+1]: the target as cached (rows sum to 1); logq [N, K+1]: q_I on the top-K ids in I,
    0 on those outside I, q_I(I minus S) in the tail bucket (rows sum to 1); logp_in [N, K+1]: the
    target restricted to I and renormalised (the loss's p_I); mass_lower / mass_upper [N]: the target's
    mass on I, p(S) and p(S) + tail (when I minus S is not empty); valid [N]: rows where p_I exists."""

    logp: torch.Tensor
    logq: torch.Tensor
    logp_in: torch.Tensor
    mass_lower: torch.Tensor
    mass_upper: torch.Tensor
    valid: torch.Tensor


def intersection_support(topk_logprobs: torch.Tensor, topk_ids: torch.Tensor, tail: torch.Tensor,
                         draft_logits: torch.Tensor, bridge: VocabBridge) -> IntersectionSupport:
    """The module docstring's buckets. topk_logprobs / topk_ids [N, K] (target ids, distinct in a row),
    tail [N], draft_logits [N, V_d] (padded columns allowed) -> IntersectionSupport."""
    if bridge.size == 0:
        raise DataError("the target's and the draft's vocabularies share no token: the token-level term is empty")
    lq = intersection_logprobs(draft_logits[..., :bridge.draft_vocab], bridge.inter_d)  # [N, M]
    n, m = lq.shape
    idx = bridge.t2i[topk_ids.long().clamp(0, bridge.t2i.shape[0] - 1)]  # [N, K]: index into I or -1
    inside = idx >= 0
    logq_top = torch.where(inside, lq.gather(-1, idx.clamp_min(0)), torch.full_like(lq[:, :1], -torch.inf))
    # q_I on the intersection outside the row's top-K (ids outside I go to a spare column M, so no
    # two writes of the scatter share an index)
    hit = torch.zeros(n, m + 1, dtype=torch.bool, device=lq.device).scatter(
        -1, torch.where(inside, idx, torch.full_like(idx, m)), True)[:, :m]
    rest = torch.logsumexp(lq.masked_fill(hit, _MASKED_LOGIT), dim=-1, keepdim=True)
    empty_rest = hit.all(-1, keepdim=True)
    logq = torch.cat([logq_top, torch.where(empty_rest, torch.full_like(rest, -torch.inf), rest)], dim=-1)

    lp_top = topk_logprobs.float()
    p_tail = tail.float().clamp_min(0.0).unsqueeze(-1)
    logp = torch.cat([lp_top, torch.log(p_tail)], dim=-1)
    logp = logp - torch.logsumexp(logp, dim=-1, keepdim=True)
    # p_I: 0 outside I; the tail bucket stands for I minus S (floored so reverse KL stays finite)
    tail_in = torch.where(empty_rest, torch.zeros_like(p_tail), p_tail.clamp_min(TAIL_FLOOR))
    raw_in = torch.cat([torch.where(inside, lp_top, torch.full_like(lp_top, -torch.inf)), torch.log(tail_in)], dim=-1)
    mass_in = torch.logsumexp(raw_in, dim=-1, keepdim=True)
    valid = torch.isfinite(mass_in).squeeze(-1)
    # a row with no target mass on I has no p_I: give it q_I's own values (every objective 0, finite)
    logp_in = torch.where(valid.unsqueeze(-1), raw_in - mass_in, logq.detach())
    lower = torch.where(inside, lp_top.exp(), torch.zeros_like(lp_top)).sum(-1)
    upper = lower + torch.where(empty_rest, torch.zeros_like(p_tail), p_tail).squeeze(-1)
    return IntersectionSupport(logp, logq, logp_in, lower, upper.clamp(max=1.0), valid)


def token_loss(objective: Objective, sup: IntersectionSupport) -> torch.Tensor:
    """Mean objective of (p_I, q_I) over aligned positions, weighted by their intersection mass
    (detached): [N] buckets -> scalar; 0 (with a graph) when no position has mass on I."""
    w = (sup.mass_upper * sup.valid).detach()
    values = objective(sup.logp_in, sup.logq)
    values = torch.where(w > 0, values, torch.zeros_like(values))
    return (w * values).sum() / w.sum().clamp_min(1e-12)


# ---------------------------------------------------------------------------------------------
# The loss and the held-out evaluation
# ---------------------------------------------------------------------------------------------

def _aligned_rows(batch: CrossBatch, logits: torch.Tensor):
    """[B, U, V] logits -> the aligned positions' ([N, V] logits, [N, K] top-K log-probs, [N, K] ids,
    [N] tail)."""
    idx = batch.align_index[..., None].expand(-1, -1, logits.shape[-1])
    al = logits.gather(1, idx)
    return _flatten(batch.align_mask, al, batch.topk_logprobs, batch.topk_ids, batch.tail, last_dims=(1, 1, 1, 0))


def cross_loss(objective: Objective | str, logits: torch.Tensor, batch: CrossBatch, bridge: VocabBridge,
               token_weight: float = DEFAULT_TOKEN_WEIGHT) -> torch.Tensor:
    """Sequence-level cross-entropy over the draft's continuation tokens + token_weight x the
    token-level term at aligned positions. logits: [B, U, V_d] at `batch.positions`. Returns a scalar."""
    obj = parse_objective(objective) if isinstance(objective, str) else objective
    logits = logits[..., :bridge.draft_vocab]
    lg, lb = _flatten(batch.loss_mask, logits, batch.labels, last_dims=(1, 0))
    ce = masked_mean(torch.nn.functional.cross_entropy(lg.float(), lb, reduction="none"))
    if token_weight == 0:
        return ce
    al, lp, ids, tl = _aligned_rows(batch, logits)
    if al.shape[0] == 0:
        return ce
    return ce + token_weight * token_loss(obj, intersection_support(lp, ids, tl, al, bridge))


def check_cross_config(cfg) -> None:
    """DsparkError for training settings a cross-tokenizer draft cannot use (module docstring)."""
    if cfg.on_policy > 0:
        raise DsparkError(f"--on-policy {cfg.on_policy:g} needs a draft that shares the target's tokenizer: a draft "
                          "with another tokenizer is distilled offline from the cache (leave out --on-policy)")
    if cfg.acceptance_head:
        raise DsparkError("--acceptance-head predicts same-tokenizer acceptance (the `learned` draft length); a draft "
                          "with another tokenizer is decoded cross-tokenizer: leave out --acceptance-head")


@dataclass
class CrossDistill:
    """What the training loop needs to train a cross-tokenizer draft (dspark.distill.train): the pair's
    bridge, the token-level weight and the draft's context."""

    bridge: VocabBridge
    token_weight: float = DEFAULT_TOKEN_WEIGHT
    max_length: int | None = None
    pad_id: int = 0

    def batch(self, cache_batch) -> CrossBatch:
        return cross_batch(cache_batch, self.bridge, pad_id=self.pad_id, max_length=self.max_length)

    def loss(self, objective: Objective, logits: torch.Tensor, batch: CrossBatch) -> torch.Tensor:
        return cross_loss(objective, logits, batch, self.bridge.to(logits.device), self.token_weight)

    def identity(self) -> dict[str, Any]:
        """What decides the trained weights besides the training settings."""
        return {"mode": MODE, "token_weight": self.token_weight, "intersection_size": self.bridge.size}

    @torch.no_grad()
    def evaluate(self, forward, cache, objective: Objective | str, *, heldout_percent: float, batch_size: int = 8,
                 max_rows: int | None = None) -> dict[str, float]:
        """Held-out metrics on the cache's held-out rows (module docstring): expected_acceptance (and
        _lower) = mean over aligned positions of sum_I min(p, q_I), the decoder's sampling acceptance;
        intersection_mass (and _lower) = mean p(I) there; aligned_fraction = aligned / target positions;
        greedy_match = draft argmax == the draft's token of the target's text, over draft continuation
        positions; ce = the sequence-level cross-entropy; objective = the token-level term."""
        obj = parse_objective(objective) if isinstance(objective, str) else objective
        was_training = forward.training
        forward.eval()
        device = next(forward.parameters()).device
        bridge = self.bridge.to(device)
        sums = dict.fromkeys(("acc", "acc_lo", "mass", "mass_lo", "obj", "w", "ce", "match"), 0.0)
        aligned = target_positions = draft_positions = rows = 0
        try:
            for cb in cache.batches(batch_size, split="heldout", heldout_percent=heldout_percent, shuffle=False,
                                    pad_id=0, max_length=None):
                if max_rows is not None and rows >= max_rows:
                    break
                rows += cb.input_ids.shape[0]
                b = self.batch(cb).to(device)
                _, logits = forward(b.input_ids, b.attention_mask, b.positions)
                logits = logits[..., :bridge.draft_vocab].float()
                lg, lb = _flatten(b.loss_mask, logits, b.labels, last_dims=(1, 0))
                sums["ce"] += float(torch.nn.functional.cross_entropy(lg, lb, reduction="sum"))
                sums["match"] += float((lg.argmax(-1) == lb).sum())
                draft_positions += int(lb.shape[0])
                target_positions += b.target_positions
                al, lp, ids, tl = _aligned_rows(b, logits)
                if al.shape[0] == 0:
                    continue
                sup = intersection_support(lp, ids, tl, al, bridge)
                lower, upper = acceptance_bounds(sup.logp, sup.logq)
                w = sup.mass_upper * sup.valid
                sums["acc"] += float(upper.sum())
                sums["acc_lo"] += float(lower.sum())
                sums["mass"] += float(sup.mass_upper.sum())
                sums["mass_lo"] += float(sup.mass_lower.sum())
                sums["obj"] += float((w * torch.where(w > 0, obj(sup.logp_in, sup.logq), torch.zeros_like(w))).sum())
                sums["w"] += float(w.sum())
                aligned += int(al.shape[0])
        finally:
            forward.train(was_training)
        if aligned == 0:
            raise DataError(f"the logits cache {str(cache.path)!r} has no aligned held-out positions at "
                            f"--heldout-percent {heldout_percent:g} ({cache.num_rows} rows in all): collect more "
                            "prompts or raise --heldout-percent")
        n = aligned
        return {"expected_acceptance": sums["acc"] / n, "expected_acceptance_lower": sums["acc_lo"] / n,
                "intersection_mass": sums["mass"] / n, "intersection_mass_lower": sums["mass_lo"] / n,
                "aligned_fraction": aligned / max(target_positions, 1),
                "greedy_match": sums["match"] / max(draft_positions, 1), "ce": sums["ce"] / max(draft_positions, 1),
                "objective": sums["obj"] / max(sums["w"], 1e-12), "positions": aligned}


__all__ = ["CrossBatch", "CrossDistill", "CrossRow", "DEFAULT_TOKEN_WEIGHT", "IntersectionSupport", "MODE",
           "VocabBridge", "align_positions", "check_cross_config", "cross_batch", "cross_loss", "draft_prompt_ids",
           "fit_row", "intersection_logprobs", "intersection_support", "retokenize", "token_loss", "vocab_bridge"]
