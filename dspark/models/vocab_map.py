"""A reduced draft vocabulary: the V_d most frequent target tokens and the maps between the two id
spaces, in the convention of vLLM's `speculators` (so a head or draft using it loads in vLLM).

speculators (vllm-project/speculators, `src/speculators/train/vocab_mapping.py`,
`build_vocab_mappings_from_distribution`) and vLLM (`llama_eagle3.py`, `compute_logits`) use:
    d2t [V_d] int64   an OFFSET: target_id = draft_id + d2t[draft_id]
    t2d [V]   bool    True for the target ids that are in the draft vocabulary
The kept target ids are sorted ascending, so draft id order follows target id order. Tokens are
ranked by (count descending, id ascending); when fewer than V_d tokens were seen, the lowest unseen
target ids fill the rest (speculators does the same).

Used by the EAGLE-3 head (`dspark.models.eagle3`: its LM head scores only the draft vocabulary) and
meant for any draft with a reduced output layer: nothing here is specific to heads.
Files: `save_vocab_map` / `load_vocab_map` write `d2t` and `t2d` as safetensors (atomic write).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from dspark.errors import DataError, DsparkError

D2T = "d2t"
T2D = "t2d"


@dataclass(frozen=True)
class VocabMap:
    """The maps between a target vocabulary of `target_vocab_size` ids and a draft vocabulary of
    `draft_vocab_size` ids (see the module docstring for the convention)."""

    d2t: torch.Tensor  # [V_d] int64 offsets
    t2d: torch.Tensor  # [V] bool

    def __post_init__(self) -> None:
        check_vocab_map(self.d2t, self.t2d)

    @property
    def draft_vocab_size(self) -> int:
        return int(self.d2t.shape[0])

    @property
    def target_vocab_size(self) -> int:
        return int(self.t2d.shape[0])

    @property
    def is_identity(self) -> bool:
        return self.draft_vocab_size == self.target_vocab_size

    @property
    def target_ids(self) -> torch.Tensor:
        """[V_d] int64: the target id of each draft id (ascending)."""
        return torch.arange(self.draft_vocab_size, dtype=torch.long) + self.d2t

    def to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Draft ids [...] -> target ids [...] (same shape)."""
        return draft_ids + self.d2t.to(draft_ids.device)[draft_ids]

    def to_draft(self, target_ids: torch.Tensor) -> torch.Tensor:
        """Target ids [...] -> draft ids [...], -1 where the target id is not in the draft vocabulary."""
        table = torch.full((self.target_vocab_size,), -1, dtype=torch.long, device=target_ids.device)
        table[self.target_ids.to(target_ids.device)] = torch.arange(self.draft_vocab_size, device=target_ids.device)
        return table[target_ids]

    def scatter_logits(self, draft_logits: torch.Tensor, fill: float = float("-inf")) -> torch.Tensor:
        """[..., V_d] draft logits -> [..., V] over target ids, `fill` outside the draft vocabulary
        (what vLLM's `compute_logits` returns for the verifier)."""
        out = draft_logits.new_full((*draft_logits.shape[:-1], self.target_vocab_size), fill)
        out[..., self.target_ids.to(draft_logits.device)] = draft_logits
        return out

    def gather_logits(self, target_logits: torch.Tensor) -> torch.Tensor:
        """[..., V] target logits -> [..., V_d]: the columns of the draft vocabulary."""
        return target_logits.index_select(-1, self.target_ids.to(target_logits.device))


def check_vocab_map(d2t: torch.Tensor, t2d: torch.Tensor) -> None:
    """Raise DataError unless (d2t, t2d) describe the same set of target ids."""
    if d2t.dim() != 1 or t2d.dim() != 1 or d2t.dtype != torch.long or t2d.dtype != torch.bool:
        raise DataError(f"vocabulary map needs d2t [V_d] int64 and t2d [V] bool, got d2t {tuple(d2t.shape)} "
                        f"{d2t.dtype} and t2d {tuple(t2d.shape)} {t2d.dtype}")
    ids = torch.arange(d2t.shape[0], dtype=torch.long) + d2t.cpu()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= t2d.shape[0]):
        raise DataError(f"vocabulary map: d2t points outside the target vocabulary of {t2d.shape[0]} ids")
    if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
        raise DataError("vocabulary map: d2t must map draft ids to strictly increasing target ids")
    if int(t2d.sum()) != d2t.shape[0] or not bool(t2d.cpu()[ids].all()):
        raise DataError(f"vocabulary map: t2d marks {int(t2d.sum())} target ids, d2t maps {d2t.shape[0]} "
                        "different ones")


def count_tokens(sequences: Iterable[Sequence[int]], vocab_size: int) -> torch.Tensor:
    """Token frequencies [vocab_size] int64 over the given id sequences."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for seq in sequences:
        t = torch.as_tensor(list(seq) if not isinstance(seq, torch.Tensor) else seq, dtype=torch.long)
        if t.numel() == 0:
            continue
        if int(t.min()) < 0 or int(t.max()) >= vocab_size:
            raise DataError(f"token id {int(t.max())} is outside the vocabulary of {vocab_size} ids")
        counts += torch.bincount(t, minlength=vocab_size)
    return counts


def build_vocab_map(counts: torch.Tensor, draft_vocab_size: int) -> VocabMap:
    """The `draft_vocab_size` most frequent target ids of `counts` [V] (ties and unseen tokens:
    lowest id first) as a VocabMap."""
    v = int(counts.shape[0])
    if not 1 <= draft_vocab_size <= v:
        raise DsparkError(f"draft vocabulary size must be in [1, {v}] (the target's vocabulary), got "
                          f"{draft_vocab_size}")
    # stable sort on -count keeps ascending ids among equal counts (unseen ids included)
    order = torch.sort(-counts.to(torch.long), stable=True).indices
    keep = torch.sort(order[:draft_vocab_size]).values
    d2t = keep - torch.arange(draft_vocab_size, dtype=torch.long)
    t2d = torch.zeros(v, dtype=torch.bool)
    t2d[keep] = True
    return VocabMap(d2t=d2t, t2d=t2d)


def identity_map(vocab_size: int) -> VocabMap:
    """The full vocabulary (d2t all zero, t2d all True)."""
    return VocabMap(d2t=torch.zeros(vocab_size, dtype=torch.long), t2d=torch.ones(vocab_size, dtype=torch.bool))


def coverage(vmap: VocabMap, counts: torch.Tensor) -> float:
    """Fraction of the counted tokens that the draft vocabulary contains."""
    total = int(counts.sum())
    return float(counts[vmap.t2d].sum()) / total if total else 0.0


def save_vocab_map(vmap: VocabMap, path: str | os.PathLike) -> Path:
    """Write `d2t` and `t2d` to one safetensors file, atomically."""
    from safetensors.torch import save

    from dspark.io import atomic_write_bytes

    return atomic_write_bytes(path, save({D2T: vmap.d2t.contiguous(), T2D: vmap.t2d.contiguous()}))


def load_vocab_map(path: str | os.PathLike) -> VocabMap:
    """Read a file written by `save_vocab_map` (or any safetensors holding `d2t` and `t2d`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise DataError(f"vocabulary map {str(path)!r} is unreadable ({e})") from None
    if D2T not in tensors or T2D not in tensors:
        raise DataError(f"vocabulary map {str(path)!r} needs tensors {D2T!r} and {T2D!r}, has {sorted(tensors)}")
    return VocabMap(d2t=tensors[D2T], t2d=tensors[T2D])


__all__ = ["VocabMap", "build_vocab_map", "check_vocab_map", "count_tokens", "coverage", "identity_map",
           "load_vocab_map", "save_vocab_map"]
