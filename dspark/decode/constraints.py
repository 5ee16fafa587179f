"""The hook through which a structured-output constraint (dspark/decode/grammar.py: xgrammar)
steers the speculative decoder. The decoder only calls this Protocol; it knows no grammar.

How the decoder drives a constraint (one object per request, already advanced over nothing: the
constraint covers the generated tokens only, never the prompt):
1. Drafting: before each drafted position it calls `allowed()`, sets the draft's disallowed logits
   to -inf, picks the draft token, then `advance(token)`. After the row's last draft it calls
   `allowed()` once more, for the bonus position. A drafted token that finishes the constraint
   (`is_finished()`) ends that row's drafting.
2. Verify: the masks collected in step 1 are applied to the target's logits (disallowed -> -inf,
   before temperature / top-k / top-p), position by position.
3. After verify: `rollback(k - accepted)` undoes the rejected drafts, then `advance(next)` consumes
   the recovered or bonus token. `is_finished()` then ends the request (finish reason "stop").
So under greedy the output equals the target's own constrained greedy decoding (each position
masked with the constraint's state after the tokens before it).

The mask returned by `allowed()` may be shorter or longer than the model's vocabulary: ids beyond its
length are disallowed, entries beyond the model's vocabulary are ignored. A mask with no allowed
token before the constraint is finished ends the request with finish reason "dead_end" (the output
does not match the constraint) rather than sampling from nothing.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class TokenConstraint(Protocol):
    def allowed(self) -> torch.Tensor:
        """bool [vocab]: the tokens allowed at the NEXT position given the tokens advanced so far."""
        ...

    def advance(self, token_id: int) -> None:
        """Consume one token (it must be allowed)."""
        ...

    def rollback(self, n: int) -> None:
        """Undo the last n advances (n >= 0)."""
        ...

    def is_finished(self) -> bool:
        """The constraint is complete: generation stops."""
        ...


def fit_mask(mask: torch.Tensor, vocab: int, device: torch.device | str) -> torch.Tensor:
    """Resize a constraint mask to the decoder's vocabulary.

    mask: bool [Vc] -> bool [vocab] on `device`: ids >= Vc are disallowed, entries >= vocab dropped."""
    mask = mask.to(device=device, dtype=torch.bool).reshape(-1)
    n = mask.shape[0]
    if n == vocab:
        return mask
    if n > vocab:
        return mask[:vocab]
    out = torch.zeros(vocab, dtype=torch.bool, device=device)
    out[:n] = mask
    return out
