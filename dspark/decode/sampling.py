"""Logit warping and seeded sampling: small pure functions shared by the draft and the verifier.

The warp order is Hugging Face `generate`'s (temperature, then top-k, then top-p), so that
"the target's warped distribution" means the same thing in dspark and in HF. Greedy decoding
(temperature 0) never goes through `warp_logits`: it compares argmaxes instead (see verify.py).

Constraint masks are applied by the caller BEFORE warping (disallowed logits set to -inf), so that
top-k / top-p act on the allowed tokens only, as a constrained HF `generate` does.
"""

from __future__ import annotations

import torch

from dspark.errors import DsparkError


def check_sampling_params(temperature: float, top_k: int, top_p: float) -> None:
    """Raise DsparkError naming the first bad value (temperature >= 0, top_k >= 0, top_p in (0, 1])."""
    if not temperature >= 0:  # also rejects NaN
        raise DsparkError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise DsparkError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not (0.0 < top_p <= 1.0):
        raise DsparkError(f"top_p must be in (0, 1], got {top_p}")


def warp_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Turn logits into the sampling distribution.

    logits: [..., V] (any float dtype; -inf marks disallowed tokens).
    Returns probs: [..., V] float32, each row sums to 1; tokens removed by top-k / top-p get 0.
    temperature > 0 (greedy is handled by argmax, not here); top_k 0 disables it; top_p 1 disables it.
    top-p keeps the smallest set of most likely tokens whose mass reaches top_p (at least one token).
    """
    if not temperature > 0:
        raise DsparkError(f"warp_logits needs temperature > 0 (greedy uses argmax), got {temperature}")
    check_sampling_params(temperature, top_k, top_p)
    scores = logits.float() / temperature
    vocab = scores.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        sorted_probs = sorted_scores.softmax(dim=-1)
        # mass strictly before each token: a token is dropped once the tokens above it already reach top_p
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores.softmax(dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Draw one token per row. probs: [N, V] (rows sum to 1) -> ids [N] (long)."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    """A generator on `device`, seeded with `seed`, or from torch's global RNG when seed is None
    (so unseeded runs still follow `torch.manual_seed`)."""
    gen = torch.Generator(device=device)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    gen.manual_seed(int(seed))
    return gen
