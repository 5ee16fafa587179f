"""On-policy distillation (`--on-policy LAMBDA`, DistillSpec / GKD): a fraction LAMBDA of the training
batches are continuations the DRAFT samples from the batch's prompts, scored by the target online.

Why: the offline cache holds the target's own continuations, but at decode time the draft is judged
on the prefixes it drafts itself; training on its own samples closes that train/test mismatch
(Agarwal et al. 2023, Zhou et al. 2023). The target's full distribution is available online, so these
batches use the full-vocabulary objective (`losses.full_loss`), not the top-K + tail one.

Which steps are on-policy depends only on (seed, step), and the draft samples with a generator seeded
from (seed, step): an interrupted run that resumes from a checkpoint replays the same decisions.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import torch

from dspark.distill.cache import CacheBatch, CacheRow, collate


def is_onpolicy_step(seed: int, step: int, fraction: float) -> bool:
    """Deterministic Bernoulli(fraction) draw for a training step."""
    if fraction <= 0.0:
        return False
    if fraction >= 1.0:
        return True
    digest = hashlib.sha256(f"onpolicy:{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0 ** 64 < fraction


def batch_prompts(batch: CacheBatch) -> list[list[int]]:
    """The prompt of every row of a (right-padded) cache batch: its first (real tokens - continuation)
    tokens."""
    lengths = (batch.attention_mask.sum(-1) - batch.loss_mask.sum(-1)).tolist()
    return [batch.input_ids[i, :int(n)].tolist() for i, n in enumerate(lengths)]


@torch.no_grad()
def sample_continuations(model: torch.nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                         temperature: float = 1.0, generator: torch.Generator | None = None,
                         stop_token_ids: Sequence[int] = (), pad_id: int = 0,
                         vocab_size: int | None = None) -> list[list[int]]:
    """Sample a continuation per prompt from `model` (batched, left-padded, KV cache).

    Each continuation ends at its first stop token (kept) or after max_new_tokens. Sampling is from
    softmax(logits[:vocab_size] / temperature); temperature 0 is greedy.
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    b = len(prompts)
    L = max(len(p) for p in prompts)
    ids = torch.full((b, L), pad_id, dtype=torch.long)
    mask = torch.zeros((b, L), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, L - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    was_training = model.training
    model.eval()
    try:
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                    logits_to_keep=1)
        logits = out.logits[:, -1]
        last = pos[:, -1]
        stop = torch.tensor(sorted(set(int(s) for s in stop_token_ids)), dtype=torch.long, device=device)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        gens: list[list[int]] = [[] for _ in range(b)]
        for step in range(max_new_tokens):
            lg = logits.float() if vocab_size is None else logits[:, :vocab_size].float()
            if temperature == 0.0:
                nxt = lg.argmax(-1)
            else:
                probs = torch.softmax(lg / temperature, dim=-1)
                nxt = torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(device)
            for i in (~done).nonzero().flatten().tolist():
                gens[i].append(int(nxt[i]))
            if stop.numel():
                done |= torch.isin(nxt, stop)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=device)], dim=1)
            last = last + 1
            out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last[:, None], cache=cache,
                        use_cache=True)
            logits = out.logits[:, -1]
    finally:
        model.train(was_training)
    return gens


def onpolicy_batch(prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], pad_id: int = 0,
                   max_length: int | None = None) -> CacheBatch:
    """A right-padded training batch over prompt + sampled continuation (no target top-K: K = 0)."""
    rows = [CacheRow(prompt_index=i, prompt_id=f"onpolicy-{i}", prompt_ids=np.asarray(p, dtype=np.int32),
                     continuation_ids=np.asarray(c, dtype=np.int32),
                     topk_ids=np.zeros((len(c), 0), dtype=np.int32), topk_logprobs=np.zeros((len(c), 0), np.float16),
                     tail=np.zeros(len(c), dtype=np.float32))
            for i, (p, c) in enumerate(zip(prompts, continuations))]
    return collate(rows, pad_id=pad_id, max_length=max_length)


@torch.no_grad()
def target_logits(target_model: torch.nn.Module, batch: CacheBatch) -> torch.Tensor:
    """The target's logits at the batch's continuation positions: [B, T, V] (no gradient)."""
    from dspark.distill.evaluate import DraftForward

    device = next(target_model.parameters()).device
    _, logits = DraftForward(target_model)(batch.input_ids.to(device), batch.attention_mask.to(device),
                                           batch.positions.to(device))
    return logits


__all__ = ["batch_prompts", "is_onpolicy_step", "onpolicy_batch", "sample_continuations", "target_logits"]
