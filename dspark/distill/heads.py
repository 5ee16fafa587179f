"""Training an EAGLE-3 head (`dspark.models.eagle3`) toward its target: the loop behind
`dspark train-head`.

Data: the rows of a logits cache (`dspark collect`: prompt + the target's own continuation). Per
training step a batch of rows becomes a `HeadBatch`:
- online (small targets): the target runs on the batch under no_grad and gives the three layers'
  hidden states and its full logits (the teacher);
- offline (large targets): the features come from a hidden-state cache (`hidden_cache`, collected
  once) and the teacher is the logits cache's top-K + tail.
Index i of a row pairs the target's features at position i with the token at i + 1; unrolled step s
at index i scores the token at i + 2 + s, whose teacher is the target's distribution at position
i + 1 + s (`shift`). Only teacher positions that predict a continuation token count (the positions
`dspark distill` trains on), unless `loss_on_prompt`.

Objective per step: any `dspark.distill.losses` objective (default forward KL) between the target's
distribution RESTRICTED to the draft vocabulary and renormalised (as speculators and SpecForge do:
the head cannot put mass elsewhere) and the head's. Steps are summed with weight `ttt_decay ** s`
(speculators' `ttt_step_loss_decay`, default 1.0; 3 steps by default, speculators' `--ttt-steps`).

Evaluation (every `eval_every` steps, on the continuation positions of the cache's held-out rows,
whatever the loss trains on; no decoding): per unrolled step s, the expected acceptance E[sum_x min(p, q)] of speculative sampling with the FULL target
distribution p (tokens outside the draft vocabulary are never proposed, so they accept nothing), the
greedy match rate, and the objective. Per anchor position the acceptances of steps 0..k-1 chain into
the expected tokens per target step of a K-token draft chain: 1 + sum_{k=1..K} prod_{s<k} a_s
(sampling) and 1 + the number of leading greedy matches (greedy). Teacher forcing on the target's own
greedy continuation makes the greedy figure what greedy decoding would accept from that anchor (the
head sees exactly the tokens and its own features it would see at decode time); it averages over
every anchor, where a decoder visits only some. `chain_metrics_for_draft` computes the same figures
for a separate draft model on the same rows.

Checkpoints (`dspark.distill.checkpoint`, trained parameters + AdamW state + history) every
`checkpoint_every` steps; a re-run with the same settings resumes exactly (same batches, same
learning rates: tested against an uninterrupted run). Data parallel under torchrun: every rank reads
a disjoint share of each batch window and the head is wrapped in DistributedDataParallel, as
`dspark distill` does (`dspark.distill.parallel`); DeepSpeed is not wired for heads.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from dspark.distill import checkpoint as ckpt
from dspark.distill.cache import identity_diff
from dspark.distill.losses import (Objective, acceptance_bounds, expected_acceptance, full_support, masked_mean,
                                   parse_objective)
from dspark.distill.train import _batch_stream, cosine_lr, ranks_agree, total_steps
from dspark.errors import DataError, DsparkError

DEFAULT_HEAD_LR = 1e-3
DEFAULT_TTT_STEPS = 3  # speculators' --ttt-steps default
DEFAULT_TTT_DECAY = 1.0  # speculators' --ttt-step-loss-decay default (EAGLE-3's own code used 0.8)

ProgressFn = Callable[[int, int, dict[str, Any]], None]


@dataclass(frozen=True)
class HeadTrainConfig:
    """Settings of one head's training. Exactly one of `steps` / `epochs` (None for both: one epoch)."""

    objective: str = "fkl"
    ttt_steps: int = DEFAULT_TTT_STEPS
    ttt_decay: float = DEFAULT_TTT_DECAY
    steps: int | None = None
    epochs: float | None = None
    lr: float = DEFAULT_HEAD_LR
    batch_size: int = 8
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int | None = None  # None: about 10 evaluations per run
    checkpoint_every: int | None = None  # None: same as eval_every
    heldout_percent: float = 10.0
    eval_max_rows: int | None = None
    max_length: int | None = None  # None: the target's context
    seed: int = 0
    loss_on_prompt: bool = False

    def identity(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("eval_every", "checkpoint_every", "eval_max_rows"):
            d.pop(k)
        d["objective"] = parse_objective(self.objective).spec
        return d


def validate_head_config(cfg: HeadTrainConfig) -> HeadTrainConfig:
    """Raise DsparkError naming the first bad setting (before any model or data is loaded)."""
    parse_objective(cfg.objective)
    if cfg.ttt_steps < 1:
        raise DsparkError(f"--ttt-steps must be >= 1, got {cfg.ttt_steps}")
    if not 0.0 < cfg.ttt_decay <= 1.0:
        raise DsparkError(f"--ttt-decay must be in (0, 1], got {cfg.ttt_decay}")
    if cfg.steps is not None and cfg.epochs is not None:
        raise DsparkError(f"give --steps or --epochs, not both (got steps {cfg.steps} and epochs {cfg.epochs})")
    if cfg.steps is not None and cfg.steps < 1:
        raise DsparkError(f"--steps must be >= 1, got {cfg.steps}")
    if cfg.epochs is not None and not cfg.epochs > 0:
        raise DsparkError(f"--epochs must be > 0, got {cfg.epochs}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise DsparkError(f"--lr must be a positive number, got {cfg.lr}")
    if cfg.batch_size < 1:
        raise DsparkError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if not 0.0 < cfg.heldout_percent < 100.0:
        raise DsparkError(f"--heldout-percent must be in (0, 100), got {cfg.heldout_percent}")
    for name in ("eval_every", "checkpoint_every", "eval_max_rows", "max_length"):
        v = getattr(cfg, name)
        if v is not None and v < 1:
            raise DsparkError(f"{name.replace('_', '-')} must be >= 1, got {v}")
    return cfg


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------

@dataclass
class HeadBatch:
    """One batch as the head trains on it. B rows, L tokens, T = L - 1 head indices, A anchors.

    features [B, T, 3H]   target features of position i (index i)
    tokens [B, T]          the token at i + 1; positions [B, T] = i + 1; valid [B, T] bool
    teach [B, L] bool      teacher positions that count in the loss / metrics
    anchors [B, A] long    the indices whose chains reach a teacher position (`select_anchors`),
    anchor_valid [B, A]    left-packed per row; False on padding
    target_logits [B, L, V] (online) or topk_ids / topk_logprobs [B, L, K] + tail [B, L] (offline):
                           the target's distribution at each position (zeros where not teach)
    """

    features: torch.Tensor
    tokens: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor
    teach: torch.Tensor
    anchors: torch.Tensor
    anchor_valid: torch.Tensor
    target_logits: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    tail: torch.Tensor | None = None

    @property
    def num_positions(self) -> int:
        return int(self.teach.sum())


def select_anchors(teach: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """teach [B, L] -> (anchors [B, A] long, anchor_valid [B, A] bool): per row, in order, the head
    indices i whose chain of `steps` steps scores at least one teacher position (i + 1 + s)."""
    b, l = teach.shape
    t = l - 1
    used = torch.zeros(b, t, dtype=torch.bool, device=teach.device)
    for s in range(steps):
        part = teach[:, 1 + s:]
        used[:, :part.shape[1]] |= part
    count = used.sum(1)
    a = max(int(count.max()) if b else 0, 1)
    order = torch.sort((~used).to(torch.int8), dim=1, stable=True).indices[:, :a]  # used indices first, in order
    valid = torch.arange(a, device=teach.device)[None, :] < count[:, None]
    return torch.where(valid, order, torch.zeros_like(order)), valid


def at_step(x: torch.Tensor, anchors: torch.Tensor, s: int) -> torch.Tensor:
    """Per-position target data [B, L, ...] -> what unrolled step s needs at each anchor:
    x[:, anchors + 1 + s] ([B, A, ...]; clamped at the last position, which is never a teacher)."""
    idx = (anchors + 1 + s).clamp(max=x.shape[1] - 1)
    return x.gather(1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(*idx.shape, *x.shape[2:]))


def step_mask(hb: "HeadBatch", s: int) -> torch.Tensor:
    """[B, A] bool: the anchors whose step s scores a teacher position."""
    return hb.anchor_valid & at_step(hb.teach, hb.anchors, s)


def teach_mask(batch, loss_on_prompt: bool) -> torch.Tensor:
    """[B, L] bool: the teacher positions of a CacheBatch that count (those predicting a
    continuation token, or every position predicting a real token with `loss_on_prompt`)."""
    b, l = batch.input_ids.shape
    teach = torch.zeros(b, l, dtype=torch.bool, device=batch.input_ids.device)
    if loss_on_prompt:
        lengths = batch.attention_mask.sum(-1)
        teach = torch.arange(l, device=teach.device)[None, :] < (lengths[:, None] - 1)
    else:
        rows = torch.arange(b, device=teach.device)[:, None].expand_as(batch.positions)
        teach[rows[batch.loss_mask], batch.positions[batch.loss_mask]] = True
    return teach


def _scatter_positions(values: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, length: int):
    """[B, T_c, ...] values at `positions` [B, T_c] (where mask) -> [B, length, ...], zeros elsewhere."""
    out = values.new_zeros((values.shape[0], length, *values.shape[2:]))
    rows = torch.arange(values.shape[0], device=values.device)[:, None].expand_as(positions)
    out[rows[mask], positions[mask]] = values[mask]
    return out


class OnlineFeatures:
    """Features and teacher from the target run in the loop (no_grad, its own dtype)."""

    kind = "online"

    def __init__(self, target_model, layer_ids: Sequence[int]):
        self.target = target_model
        self.layer_ids = tuple(layer_ids)

    @torch.no_grad()
    def __call__(self, batch, loss_on_prompt: bool, steps: int) -> HeadBatch:
        from dspark.models.eagle3 import capture_features

        feats, logits = capture_features(self.target, batch.input_ids, batch.attention_mask, self.layer_ids)
        return _head_batch(batch, feats.float(), loss_on_prompt, steps, target_logits=logits.float())


class OfflineFeatures:
    """Features from a hidden-state cache, teacher from the logits cache's top-K + tail."""

    kind = "offline"

    def __init__(self, hidden_cache):
        self.hidden = hidden_cache

    def __call__(self, batch, loss_on_prompt: bool, steps: int) -> HeadBatch:
        if loss_on_prompt:
            raise DsparkError("--loss-on-prompt needs the target's distribution at prompt positions: train online")
        feats = self.hidden.batch_features(batch).to(batch.input_ids.device)
        l = batch.input_ids.shape[1]
        return _head_batch(batch, feats, False, steps,
                           topk_ids=_scatter_positions(batch.topk_ids, batch.positions, batch.loss_mask, l),
                           topk_logprobs=_scatter_positions(batch.topk_logprobs, batch.positions, batch.loss_mask, l),
                           tail=_scatter_positions(batch.tail, batch.positions, batch.loss_mask, l))


def _head_batch(batch, feats: torch.Tensor, loss_on_prompt: bool, steps: int, **teacher) -> HeadBatch:
    b, l = batch.input_ids.shape
    teach = teach_mask(batch, loss_on_prompt)
    anchors, anchor_valid = select_anchors(teach, steps)
    return HeadBatch(features=feats[:, :-1], tokens=batch.input_ids[:, 1:],
                     positions=torch.arange(1, l, device=feats.device)[None].expand(b, l - 1),
                     valid=batch.attention_mask[:, 1:].bool(), teach=teach, anchors=anchors,
                     anchor_valid=anchor_valid, **teacher)


# ---------------------------------------------------------------------------------------------
# Per-step distributions
# ---------------------------------------------------------------------------------------------

def draft_vocab_topk_support(topk_logprobs: torch.Tensor, draft_topk: torch.Tensor, draft_logits: torch.Tensor,
                             tail: torch.Tensor, restrict: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`losses.topk_support` for a draft with a reduced vocabulary.

    Args:
        topk_logprobs: [N, K] target log-probs of its top-K tokens.
        draft_topk: [N, K] their DRAFT ids, -1 where the token is outside the draft vocabulary.
        draft_logits: [N, V_d]; tail: [N] target mass outside the top-K.
        restrict: True -> the target's top-K outside the draft vocabulary are dropped and p
            renormalised (the training objective); False -> p as it is (acceptance: those ids have q = 0).
    Returns:
        (logp [N, K+1], logq [N, K+1]) float32; bucket K = the tail (for q: its mass on draft ids
        outside the top-K). With the full vocabulary this equals `topk_support`.
    """
    logits = draft_logits.float()
    inside = draft_topk >= 0
    ids = draft_topk.clamp_min(0)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    neg_inf = torch.tensor(-math.inf, device=logits.device)
    logq_top = torch.where(inside, logits.gather(-1, ids) - lse, neg_inf)
    # scatter_add, not scatter: an outside id clamped to 0 must not overwrite a real hit on draft id 0
    hit = torch.zeros_like(logits, dtype=torch.int32).scatter_add(-1, ids, inside.to(torch.int32)) > 0
    logq_tail = torch.logsumexp(logits.masked_fill(hit, -1e30), dim=-1, keepdim=True) - lse
    logq_tail = torch.where(logq_tail < -1e29, neg_inf, logq_tail)  # the top-K cover the draft vocabulary
    lp = topk_logprobs.float()
    if restrict:
        lp = torch.where(inside, lp, neg_inf)
    p_tail = tail.float().clamp_min(1e-9)
    logp = torch.cat([lp, p_tail.log().unsqueeze(-1)], dim=-1)
    if restrict:
        logp = logp - torch.logsumexp(logp, dim=-1, keepdim=True)
    return logp, torch.cat([logq_top, logq_tail], dim=-1)


def step_distributions(hb: HeadBatch, s: int, logits: torch.Tensor, vmap, restrict: bool,
                       mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp [N, B], logq [N, B], greedy match [N] bool) of unrolled step s on the masked anchors.
    logits: [N, V_d] the head's logits there (N = mask.sum()). restrict=True: p restricted to the
    draft vocabulary and renormalised (the objective); False: the full-vocabulary p (acceptance)."""
    lq = logits.float()
    ids = vmap.target_ids.to(lq.device)
    if hb.target_logits is not None:
        t = at_step(hb.target_logits, hb.anchors, s)[mask]
        match = ids[lq.argmax(-1)] == t.argmax(-1)
        if restrict:
            logp, logq = full_support(t.index_select(-1, ids), lq)
        else:
            logp = torch.log_softmax(t.float(), dim=-1).index_select(-1, ids)
            logq = torch.log_softmax(lq, dim=-1)
        return logp, logq, match
    top_ids = at_step(hb.topk_ids, hb.anchors, s)[mask]
    lp, tail = at_step(hb.topk_logprobs, hb.anchors, s)[mask], at_step(hb.tail, hb.anchors, s)[mask]
    match = ids[lq.argmax(-1)] == top_ids[:, 0]
    logp, logq = draft_vocab_topk_support(lp, vmap.to_draft(top_ids), lq, tail, restrict)
    return logp, logq, match


def head_loss(obj: Objective, hb: HeadBatch, logits: Sequence[torch.Tensor], vmap, decay: float) -> torch.Tensor:
    """Sum over unrolled steps s of decay**s * (mean objective of step s); logits[s] [N_s, V_d] are
    the head's logits at the anchors `step_mask(hb, s)` selects (`_Unroll`)."""
    total = None
    for s, lg in enumerate(logits):
        logp, logq, _ = step_distributions(hb, s, lg, vmap, restrict=True, mask=step_mask(hb, s))
        term = (decay ** s) * masked_mean(obj(logp, logq))
        total = term if total is None else total + term
    return total


class _Unroll(torch.nn.Module):
    """The head's training forward as one module (what DistributedDataParallel wraps): unrolled
    hidden states -> logits at the scored anchors only (the LM head is the large part)."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, hb: HeadBatch, steps: int) -> list[torch.Tensor]:
        hidden = self.head.unroll(hb.features, hb.tokens, hb.positions, hb.valid, steps, hb.anchors)
        return [self.head.logits(h[step_mask(hb, s)]) for s, h in enumerate(hidden)]


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

@dataclass
class ChainTotals:
    """Per unrolled step sums + chained expected tokens over anchors that have all S steps."""

    steps: int
    positions: list[int] = field(default_factory=list)
    acceptance: list[float] = field(default_factory=list)
    acceptance_lower: list[float] = field(default_factory=list)
    greedy: list[float] = field(default_factory=list)
    objective: list[float] = field(default_factory=list)
    anchors: int = 0
    tokens: list[float] = field(default_factory=list)  # K = 1..S, sampling
    greedy_tokens: list[float] = field(default_factory=list)  # K = 1..S, greedy

    def __post_init__(self):
        for name in ("positions", "acceptance", "acceptance_lower", "greedy", "objective"):
            setattr(self, name, [0] * self.steps)
        self.tokens, self.greedy_tokens = [0.0] * self.steps, [0.0] * self.steps

    def add_step(self, s: int, accept: torch.Tensor, lower: torch.Tensor, match: torch.Tensor, objective: torch.Tensor):
        self.positions[s] += int(accept.numel())
        self.acceptance[s] += float(accept.sum())
        self.acceptance_lower[s] += float(lower.sum())
        self.greedy[s] += float(match.float().sum())
        self.objective[s] += float(objective.sum())

    def add_chains(self, accept: torch.Tensor, match: torch.Tensor) -> None:
        """accept / match [N, S] of anchors with all steps."""
        if accept.numel() == 0:
            return
        self.anchors += int(accept.shape[0])
        run_a = torch.cumprod(accept.double(), dim=-1)  # P(first k drafts all accepted)
        run_g = torch.cumprod(match.double(), dim=-1)
        for k in range(self.steps):
            self.tokens[k] += float((1.0 + run_a[:, :k + 1].sum(-1)).sum())
            self.greedy_tokens[k] += float((1.0 + run_g[:, :k + 1].sum(-1)).sum())

    def result(self) -> dict[str, Any]:
        def per(xs):
            return [round(x / max(n, 1), 6) for x, n in zip(xs, self.positions)]

        a = max(self.anchors, 1)
        return {"expected_acceptance": per(self.acceptance), "expected_acceptance_lower": per(self.acceptance_lower),
                "greedy_match": per(self.greedy), "objective": per(self.objective), "positions": self.positions,
                "anchors": self.anchors, "tokens_per_step": [round(x / a, 6) for x in self.tokens],
                "greedy_tokens_per_step": [round(x / a, 6) for x in self.greedy_tokens]}


def _accumulate(tot: ChainTotals, obj: Objective, per_step: Callable[[int, torch.Tensor], tuple],
                hb: HeadBatch, bucketed: bool) -> None:
    """Add one batch. per_step(s, mask [B, A]) -> (logp, logq, match, logp_restricted, logq_restricted)
    on the masked anchors of step s; bucketed: the supports end with a tail bucket (cached top-K),
    whose acceptance is an upper bound with `acceptance_bounds`."""
    full = step_mask(hb, 0) & step_mask(hb, tot.steps - 1)  # anchors that have every step
    acc_cols, match_cols = [], []
    for s in range(tot.steps):
        mask = step_mask(hb, s)
        logp, logq, match, rp, rq = per_step(s, mask)
        if bucketed:
            lower, upper = acceptance_bounds(logp, logq)
        else:
            lower = upper = expected_acceptance(logp, logq)
        tot.add_step(s, upper, lower, match, obj(rp, rq))
        sel = full[mask]  # those anchors among this step's entries (same row-major order)
        acc_cols.append(upper[sel])
        match_cols.append(match[sel])
    tot.add_chains(torch.stack(acc_cols, -1), torch.stack(match_cols, -1))


@torch.no_grad()
def evaluate_head(head, source, cache, cfg: HeadTrainConfig, vmap, *, pad_id: int = 0,
                  max_length: int | None = None, max_rows: int | None = None) -> dict[str, Any]:
    """Per-unrolled-step metrics of `head` on the cache's held-out rows (see the module docstring)."""
    obj = parse_objective(cfg.objective)
    device = next(head.parameters()).device
    was = head.training
    head.eval()
    tot = ChainTotals(cfg.ttt_steps)
    rows = 0
    try:
        for batch in cache.batches(cfg.batch_size, split="heldout", heldout_percent=cfg.heldout_percent,
                                   shuffle=False, pad_id=pad_id, max_length=max_length):
            if max_rows is not None and rows >= max_rows:
                break
            rows += batch.input_ids.shape[0]
            # continuation positions only, whatever the loss trains on: they are what decoding drafts
            hb = source(batch.to(device), False, cfg.ttt_steps)
            step_logits = _Unroll(head)(hb, cfg.ttt_steps)

            def per_step(s, mask, step_logits=step_logits):
                logits = step_logits[s]
                logp, logq, match = step_distributions(hb, s, logits, vmap, restrict=False, mask=mask)
                rp, rq, _ = step_distributions(hb, s, logits, vmap, restrict=True, mask=mask)
                return logp, logq, match, rp, rq

            _accumulate(tot, obj, per_step, hb, bucketed=hb.target_logits is None)
    finally:
        head.train(was)
    if sum(tot.positions) == 0:
        raise DataError(f"the logits cache {str(cache.path)!r} has no held-out rows at --heldout-percent "
                        f"{cfg.heldout_percent:g} ({cache.num_rows} rows in all)")
    return tot.result()


@torch.no_grad()
def chain_metrics_for_draft(draft_model, target_model, cache, *, steps: int, objective: str = "fkl",
                            batch_size: int = 8, heldout_percent: float = 10.0, pad_id: int = 0,
                            max_length: int | None = None, max_rows: int | None = None,
                            vocab_size: int | None = None) -> dict[str, Any]:
    """The same figures as `evaluate_head` for a separate draft model (same tokenizer) on the same
    held-out rows, against the target's full distribution: teacher-forced on the target's
    continuation, so depth s of a chain from anchor i is the draft's own distribution at position
    i + 1 + s (a separate draft conditions on the real prefix)."""
    obj = parse_objective(objective)
    device = next(draft_model.parameters()).device
    tot = ChainTotals(steps)
    rows = 0
    for batch in cache.batches(batch_size, split="heldout", heldout_percent=heldout_percent, shuffle=False,
                               pad_id=pad_id, max_length=max_length):
        if max_rows is not None and rows >= max_rows:
            break
        rows += batch.input_ids.shape[0]
        b = batch.to(device)
        t_logits = target_model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
        d_logits = draft_model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
        hb = _head_batch(b, t_logits.new_zeros(b.input_ids.shape[0], b.input_ids.shape[1], 0), False, steps,
                         target_logits=t_logits)

        def per_step(s, mask, hb=hb, d_logits=d_logits):
            t = at_step(hb.target_logits, hb.anchors, s)[mask]
            logp, logq = full_support(t, at_step(d_logits, hb.anchors, s)[mask], vocab_size)
            match = logp.argmax(-1) == logq.argmax(-1)
            return logp, logq, match, logp, logq

        _accumulate(tot, obj, per_step, hb, bucketed=False)
    return tot.result()


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

@dataclass
class HeadTrainResult:
    head: Any
    steps: int
    resumed_from: int | None
    before: dict[str, Any]
    after: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    positions_seen: int = 0
    weights_sha256: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "resumed_from": self.resumed_from, "before": self.before, "after": self.after,
                "seconds": round(self.seconds, 2), "positions_seen": self.positions_seen,
                "weights_sha256": self.weights_sha256, "history": self.history}


def train_head(head, source, cache, cfg: HeadTrainConfig, checkpoint_dir: str | Path, *, pad_id: int = 0,
               run_identity: dict[str, Any] | None = None, dist=None, progress: ProgressFn | None = None,
               log: Callable[[str], None] | None = None) -> HeadTrainResult:
    """Train `head` (an `Eagle3Head`) on `cache` with features from `source` (`OnlineFeatures` /
    `OfflineFeatures`); resume from `checkpoint_dir` when it holds a checkpoint of the same run."""
    validate_head_config(cfg)
    log = log or (lambda _m: None)
    t0 = time.perf_counter()
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    main = rank == 0
    obj = parse_objective(cfg.objective)
    vmap = head.vocab_map
    device = next(head.parameters()).device
    max_length = cfg.max_length or int(head.config.layer.max_position_embeddings)
    steps, per_epoch = total_steps(cache, cfg, world)
    eval_every = cfg.eval_every or max(1, steps // 10)
    ckpt_every = cfg.checkpoint_every or eval_every
    warmup = int(cfg.warmup_fraction * steps)

    trainable = head.trainable()
    params = [p for p in trainable.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    identity = json.loads(json.dumps({"run": run_identity or {}, "config": cfg.identity(), "world_size": world,
                                      "head": head.config.to_speculators()}))
    root = Path(checkpoint_dir)
    latest = ckpt.load_latest(root)
    start, resumed_from, history, before, positions_seen = 0, None, [], None, 0
    if latest is not None:
        diff = identity_diff(latest.state.get("identity", {}), identity)
        if diff:
            key, old, new = diff[0]
            raise DataError(f"checkpoint {str(root)!r} belongs to another run ({key}: {old!r} there, {new!r} now): "
                            "re-run with the same arguments to resume, or delete it / choose another --out")
        ckpt.restore(latest, trainable, optimizer)
        start = resumed_from = latest.step
        history = list(latest.state.get("history", []))
        before = latest.state.get("before")
        positions_seen = int(latest.state.get("positions_seen", 0))
        log(f"resuming from step {start} of {steps} ({latest.folder})")

    forward: torch.nn.Module = _Unroll(head)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        forward = DDP(forward, device_ids=[device.index] if device.type == "cuda" else None)

    def evaluate() -> dict[str, Any]:
        return evaluate_head(head, source, cache, cfg, vmap, pad_id=pad_id, max_length=max_length,
                             max_rows=cfg.eval_max_rows)

    def save(step: int) -> None:
        if main:
            state = {"identity": identity, "history": history, "before": before, "total_steps": steps,
                     "positions_seen": positions_seen}
            ckpt.save_checkpoint(root, step, trainable, optimizer, state)

    def curve_point(step: int, ev: dict[str, Any], **extra) -> dict[str, Any]:
        return {"step": step, **extra, **{k: v for k, v in ev.items() if k != "positions"}}

    if before is None and main:
        before = evaluate()
        history.append(curve_point(0, before))
    if progress and main:
        progress(start, steps, {"expected_acceptance": (history[-1] if history else {}).get("expected_acceptance")})

    stream = _batch_stream(cache, cfg, start, per_epoch, rank, world, pad_id, max_length)
    loss_ema = None
    head.train()
    for step in range(start, steps):
        lr = cosine_lr(step, steps, cfg.lr, warmup, cfg.min_lr_ratio)
        for g in optimizer.param_groups:
            g["lr"] = lr
        hb = source(next(stream).to(device), cfg.loss_on_prompt, cfg.ttt_steps)
        loss = head_loss(obj, hb, forward(hb, cfg.ttt_steps), vmap, cfg.ttt_decay)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        positions_seen += hb.num_positions
        value = float(loss.detach())
        loss_ema = value if loss_ema is None else 0.9 * loss_ema + 0.1 * value
        done = step + 1
        if main and (done % eval_every == 0 or done == steps):
            history.append(curve_point(done, evaluate(), loss=round(loss_ema, 6), lr=lr,
                                       seconds=round(time.perf_counter() - t0, 2)))
        if done % ckpt_every == 0 or done == steps:
            save(done)
        if progress and main:
            progress(done, steps, {"loss": loss_ema, "expected_acceptance": history[-1].get("expected_acceptance")})

    digest = ranks_agree(trainable, None, dist)
    head.eval()
    last = history[-1] if main and history else {}
    after = {k: v for k, v in last.items() if k not in ("step", "loss", "lr", "seconds")}
    return HeadTrainResult(head=head, steps=steps, resumed_from=resumed_from, before=before or {}, after=after,
                           history=history, seconds=time.perf_counter() - t0, positions_seen=positions_seen,
                           weights_sha256=digest)


__all__ = ["DEFAULT_HEAD_LR", "DEFAULT_TTT_DECAY", "DEFAULT_TTT_STEPS", "ChainTotals", "HeadBatch",
           "HeadTrainConfig", "HeadTrainResult", "OfflineFeatures", "OnlineFeatures", "chain_metrics_for_draft",
           "at_step", "draft_vocab_topk_support", "evaluate_head", "head_loss", "select_anchors", "step_distributions",
           "step_mask", "teach_mask",
           "train_head", "validate_head_config"]
