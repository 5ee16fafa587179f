"""The reduced draft vocabulary (`dspark.models.vocab_map`): speculators' d2t / t2d convention."""

from __future__ import annotations

import pytest
import torch

from dspark.errors import DataError, DsparkError
from dspark.models.vocab_map import (VocabMap, build_vocab_map, count_tokens, coverage, identity_map, load_vocab_map,
                                     save_vocab_map)


def test_most_frequent_ids_sorted_with_offsets():
    # counts: id 5 most frequent, then 2, then 7 and 1 tied (lower id first)
    counts = torch.tensor([0, 3, 9, 0, 0, 20, 0, 3, 0, 0])
    vmap = build_vocab_map(counts, 3)
    assert vmap.target_ids.tolist() == [1, 2, 5]  # ascending target ids
    assert vmap.d2t.tolist() == [1 - 0, 2 - 1, 5 - 2]  # offsets: target = draft + d2t[draft]
    assert vmap.t2d.nonzero().flatten().tolist() == [1, 2, 5]
    assert vmap.draft_vocab_size == 3 and vmap.target_vocab_size == 10


def test_unseen_tokens_fill_with_lowest_ids():
    counts = torch.zeros(8, dtype=torch.long)
    counts[6] = 4
    assert build_vocab_map(counts, 3).target_ids.tolist() == [0, 1, 6]


def test_round_trip_between_id_spaces():
    counts = torch.arange(50) % 7
    vmap = build_vocab_map(counts, 20)
    draft = torch.arange(20)
    assert torch.equal(vmap.to_draft(vmap.to_target(draft)), draft)
    outside = (~vmap.t2d).nonzero().flatten()
    assert (vmap.to_draft(outside) == -1).all()
    logits = torch.randn(2, 20)
    full = vmap.scatter_logits(logits)
    assert torch.equal(vmap.gather_logits(full), logits)
    assert torch.isinf(full[:, outside]).all()


def test_save_load_round_trip(tmp_path):
    vmap = build_vocab_map(torch.randint(0, 100, (300,)), 64)
    path = save_vocab_map(vmap, tmp_path / "vocab.safetensors")
    back = load_vocab_map(path)
    assert torch.equal(back.d2t, vmap.d2t) and torch.equal(back.t2d, vmap.t2d)


def test_inconsistent_maps_are_refused(tmp_path):
    vmap = build_vocab_map(torch.arange(10), 4)
    t2d = vmap.t2d.clone()
    t2d[0] = ~t2d[0]
    with pytest.raises(DataError, match="t2d marks"):
        VocabMap(vmap.d2t, t2d)
    with pytest.raises(DataError, match="increasing"):
        VocabMap(torch.tensor([3, 0]), torch.ones(5, dtype=torch.bool))
    with pytest.raises(DsparkError, match="draft vocabulary size"):
        build_vocab_map(torch.arange(10), 11)
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(DataError, match="unreadable"):
        load_vocab_map(tmp_path / "bad.safetensors")


def test_counts_and_coverage():
    counts = count_tokens([[1, 1, 2], [3], []], 5)
    assert counts.tolist() == [0, 2, 1, 1, 0]
    vmap = build_vocab_map(counts, 2)
    assert vmap.target_ids.tolist() == [1, 2]
    assert coverage(vmap, counts) == pytest.approx(3 / 4)
    assert identity_map(5).is_identity and coverage(identity_map(5), counts) == 1.0
    with pytest.raises(DataError, match="outside the vocabulary"):
        count_tokens([[7]], 5)
