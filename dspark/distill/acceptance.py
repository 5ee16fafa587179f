"""Training the acceptance head (`--acceptance-head`): per drafted position, predict the probability
that the target accepts the draft's token, from the draft's last hidden state.

Supervision: at a cached position the draft's distribution q and the target's p (top-K + tail
buckets, `losses.topk_support`) give the exact speculative-sampling acceptance probability of a
token drafted from q, sum_x min(p(x), q(x)) (the bucketed value: it overestimates the full-vocabulary
one by at most min(p_tail, q_tail), see `losses.acceptance_bounds`). The head is trained with binary
cross-entropy against these soft targets (BCE is minimised at prediction = target, so the head learns
the conditional expectation of the acceptance given h).

The hidden state is the draft's final (post-norm) hidden state at the position whose logits produce
the drafted token, which is exactly what the decoder feeds the head (`dspark.decode.engine`). It is
detached: the head reads the draft, it never changes it. The head trains alongside the draft, on the
same batches, with its own Adam optimizer at a constant learning rate so it keeps tracking the draft
as the draft changes; the files it is saved to are the decoder's format (`dspark.decode.acceptance_head`).
"""

from __future__ import annotations

import torch

from dspark.decode.acceptance_head import AcceptanceHead
from dspark.distill.losses import _flatten, expected_acceptance, topk_support

DEFAULT_HEAD_LR = 3e-3


def acceptance_targets(topk_logprobs: torch.Tensor, topk_ids: torch.Tensor, draft_logits: torch.Tensor,
                       tail: torch.Tensor, mask: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """Soft acceptance targets of the real positions.

    Args: topk_logprobs, topk_ids [B, T, K]; draft_logits [B, T, V]; tail [B, T]; mask [B, T] bool.
    Returns: [N] float32 in [0, 1], N = mask.sum(), no gradient.
    """
    with torch.no_grad():
        lp, ids, logits, tl = _flatten(mask, topk_logprobs, topk_ids, draft_logits.detach(), tail,
                                       last_dims=(1, 1, 1, 0))
        logp, logq = topk_support(lp, ids, logits, tail=tl, vocab_size=vocab_size)
        return expected_acceptance(logp, logq).clamp(0.0, 1.0)


class HeadLogits(torch.nn.Module):
    """The head's logits as a module's forward, so DistributedDataParallel (which synchronises only
    what runs through forward) can wrap the training computation: h [N, H] -> logits [N]."""

    def __init__(self, head: AcceptanceHead):
        super().__init__()
        self.head = head

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head.logits(h)


def head_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE with soft targets: `head` maps hidden [N, H] (detached) to logits [N] (a HeadLogits,
    possibly DDP-wrapped); targets [N] in [0, 1] -> scalar."""
    logits = head(hidden.detach().float())
    if logits.numel() == 0:
        return logits.sum()
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, targets.float())


def init_head(hidden_size: int, mlp_hidden_size: int = 0, seed: int = 0) -> AcceptanceHead:
    """A fresh head whose initial prediction is 0.5 everywhere-ish (small weights, zero bias), seeded
    so every data-parallel rank starts from the same head."""
    gen = torch.Generator().manual_seed(seed)
    head = AcceptanceHead(hidden_size, mlp_hidden_size)
    with torch.no_grad():
        for p in head.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / p.shape[1]) ** 0.5 * 0.1)
            else:
                p.zero_()
    return head


__all__ = ["DEFAULT_HEAD_LR", "HeadLogits", "acceptance_targets", "head_loss", "init_head"]
