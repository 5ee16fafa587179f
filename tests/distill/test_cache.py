"""The logits cache format: round trip, validation errors naming the file, training batches,
held-out split, data-parallel sharding of batches, merging shard caches."""

import json

import numpy as np
import pytest
import torch

from dspark.distill.cache import (MANIFEST, LogitsCache, collate, in_split, is_heldout, merge_caches,
                                  read_manifest)
from dspark.errors import DataError, DsparkError
from tests.distill.helpers import synthetic_rows, write_synthetic_cache


def rows_equal(a, b):
    return (a.prompt_index == b.prompt_index and a.prompt_id == b.prompt_id
            and all(np.array_equal(getattr(a, f), getattr(b, f))
                    for f in ("prompt_ids", "continuation_ids", "topk_ids", "topk_logprobs", "tail")))


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_round_trip_is_exact(tmp_path, compression):
    rows = synthetic_rows(10, k=4)
    write_synthetic_cache(tmp_path, rows, k=4, per_part=3, compression=compression)
    cache = LogitsCache(tmp_path)
    back = list(cache.rows())
    assert len(back) == len(cache) == 10 and len(cache.manifest.parts) == 4
    assert all(rows_equal(a, b) for a, b in zip(rows, back))
    assert back[0].topk_logprobs.dtype == np.float16 and back[0].topk_ids.dtype == np.int32
    assert cache.num_positions == sum(r.num_positions for r in rows)
    assert cache.bytes_per_position > 0
    cache.verify()


def test_incomplete_cache_is_refused(tmp_path):
    write_synthetic_cache(tmp_path, synthetic_rows(4))
    m = json.loads((tmp_path / MANIFEST).read_text())
    m["status"] = "collecting"
    (tmp_path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(DataError, match="incomplete.*re-run the same `dspark collect`"):
        LogitsCache(tmp_path)


def test_missing_or_bad_manifest(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        LogitsCache(tmp_path / "nope")
    with pytest.raises(DataError, match="no manifest.json"):
        LogitsCache(tmp_path)
    write_synthetic_cache(tmp_path, synthetic_rows(4))
    m = json.loads((tmp_path / MANIFEST).read_text())
    m["surprise"] = 1
    (tmp_path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(DataError, match="unknown key 'surprise'"):
        read_manifest(tmp_path)
    m.pop("surprise")
    m["format_version"] = 99
    (tmp_path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(DataError, match="version 99 is not supported"):
        read_manifest(tmp_path)


def test_truncated_part_is_a_one_line_error_naming_the_file(tmp_path):
    m = write_synthetic_cache(tmp_path, synthetic_rows(6))
    part = tmp_path / m.parts[1].file
    part.write_bytes(part.read_bytes()[:-40])
    with pytest.raises(DataError) as e:
        LogitsCache(tmp_path)
    msg = str(e.value)
    assert str(part) in msg and "truncated" in msg and "\n" not in msg


def test_corrupted_part_is_detected_on_read(tmp_path):
    """Same size, flipped bytes in the data pages: parquet page checksums catch it on read."""
    m = write_synthetic_cache(tmp_path, synthetic_rows(6, k=8), k=8, compression="none")
    part = tmp_path / m.parts[0].file
    data = bytearray(part.read_bytes())
    for i in range(200, 260):  # inside the first column chunks' data pages, not the footer
        data[i] ^= 0xFF
    part.write_bytes(bytes(data))
    cache = LogitsCache(tmp_path)  # opening only checks sizes
    with pytest.raises(DataError) as e:
        list(cache.rows())
    assert str(part) in str(e.value) and "corrupted" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError, match="corrupted"):
        cache.verify()


def test_a_file_that_is_not_parquet(tmp_path):
    m = write_synthetic_cache(tmp_path, synthetic_rows(3))
    part = tmp_path / m.parts[0].file
    size = part.stat().st_size
    part.write_bytes(b"x" * size)
    with pytest.raises(DataError, match="corrupted"):
        list(LogitsCache(tmp_path).rows())


def test_heldout_split_is_deterministic_and_disjoint(tmp_path):
    write_synthetic_cache(tmp_path, synthetic_rows(60), per_part=7)
    cache = LogitsCache(tmp_path)
    held = [r.prompt_id for r in cache.rows("heldout", heldout_percent=20)]
    train = [r.prompt_id for r in cache.rows("train", heldout_percent=20)]
    assert set(held).isdisjoint(train) and len(held) + len(train) == 60
    assert 0 < len(held) < 30
    assert held == [pid for pid in (f"row-{i}" for i in range(60)) if is_heldout(pid, 20)]
    assert cache.split_sizes(20) == {"all": 60, "train": len(train), "heldout": len(held)}
    # independent of the task's own train/eval hash (same sha1 family, different salt)
    from dspark.tasks import split_of

    ids = [f"p{i}" for i in range(2000)]
    train_ids = [i for i in ids if split_of(i) == "train"]
    assert sum(is_heldout(i, 10) for i in train_ids) > 0.05 * len(train_ids)
    with pytest.raises(DsparkError, match="unknown cache split"):
        list(cache.rows("validation"))
    assert in_split("x", "all", 50)


def test_batches_align_positions_with_labels(tmp_path):
    rows = synthetic_rows(9, k=4)
    write_synthetic_cache(tmp_path, rows)
    cache = LogitsCache(tmp_path)
    seen = []
    for b in cache.batches(4, split="all", shuffle=True, seed=3):
        B, T = b.loss_mask.shape
        assert b.topk_ids.shape == (B, T, 4) and b.topk_logprobs.dtype == torch.float32
        # the logits at `positions` predict the next input token, which is the label
        nxt = b.input_ids.gather(1, (b.positions + 1).clamp(max=b.input_ids.shape[1] - 1))
        assert torch.equal(nxt[b.loss_mask], b.labels[b.loss_mask])
        assert torch.equal(b.labels[b.loss_mask], b.topk_ids[..., 0][b.loss_mask].long())
        assert b.attention_mask.sum() == sum(len(r.prompt_ids) + len(r.continuation_ids)
                                             for r in rows if r.prompt_id in b.prompt_id)
        seen += b.prompt_id
    assert sorted(seen) == sorted(r.prompt_id for r in rows)
    order = lambda s, e: [pid for b in cache.batches(2, split="all", seed=s, epoch=e) for pid in b.prompt_id]  # noqa: E731
    assert order(1, 0) == order(1, 0) and order(1, 0) != order(1, 1)


def test_batches_split_across_ranks_disjoint_and_equal(tmp_path):
    write_synthetic_cache(tmp_path, synthetic_rows(23), per_part=4)
    cache = LogitsCache(tmp_path)
    per_rank = [[b for b in cache.batches(3, split="all", seed=0, rank=r, world_size=3, shuffle_window=2)]
                for r in range(3)]
    ids = [[pid for b in bs for pid in b.prompt_id] for bs in per_rank]
    assert len({len(bs) for bs in per_rank}) == 1  # same number of steps on every rank
    assert [len(b.prompt_id) for b in per_rank[0]] == [len(b.prompt_id) for b in per_rank[1]]
    assert set(ids[0]).isdisjoint(ids[1]) and set(ids[1]).isdisjoint(ids[2])
    assert sum(map(len, ids)) >= 23 - 3 * 6  # at most world_size - 1 rows dropped per window
    assert cache.count_batches(3, split="all", world_size=3, shuffle_window=2) == len(per_rank[0])
    for split, seed in (("train", 1), ("heldout", 2)):
        got = len(list(cache.batches(2, split=split, heldout_percent=30, seed=seed, epoch=1)))
        assert cache.count_batches(2, split=split, heldout_percent=30, seed=seed, epoch=1) == got
    with pytest.raises(DsparkError, match="rank 3"):
        next(cache.batches(2, rank=3, world_size=3))


def test_collate_truncates_prompt_from_the_left():
    rows = synthetic_rows(3, k=4)
    r = rows[0]
    p, t = len(r.prompt_ids), len(r.continuation_ids)
    b = collate([r], max_length=t + 1)
    assert b.input_ids.shape[1] == t + 1 and b.loss_mask.sum() == t
    assert b.input_ids[0, 0] == int(r.prompt_ids[-1])
    b = collate([r], max_length=2)
    assert b.loss_mask.sum() == 1 and b.input_ids.shape[1] == 2


def test_check_compatible(tmp_path):
    write_synthetic_cache(tmp_path, synthetic_rows(3))
    cache = LogitsCache(tmp_path)
    cache.check_compatible(target_name="synthetic", tokenizer_hash="cd" * 32, weight_hash="ab" * 32)
    with pytest.raises(DataError, match="different tokenizer"):
        cache.check_compatible(tokenizer_hash="00" * 32)
    with pytest.raises(DataError, match="target weights"):
        cache.check_compatible(weight_hash="11" * 32)
    with pytest.raises(DataError, match="made by target 'synthetic'"):
        cache.check_compatible(target_name="other-model")


def test_merge_shard_caches(tmp_path):
    rows = synthetic_rows(10)
    a, b = tmp_path / "a", tmp_path / "b"
    write_synthetic_cache(a, [r for r in rows if r.prompt_index % 2 == 0], shard=(0, 2), per_part=2)
    write_synthetic_cache(b, [r for r in rows if r.prompt_index % 2 == 1], shard=(1, 2), per_part=2)
    merged = merge_caches([b, a], tmp_path / "m")
    assert merged.shards.indices == [0, 1] and merged.counts.rows == 10
    back = sorted(LogitsCache(tmp_path / "m").rows(), key=lambda r: r.prompt_index)
    assert all(rows_equal(x, y) for x, y in zip(rows, back))
    LogitsCache(tmp_path / "m").verify()
    with pytest.raises(DsparkError, match="already exists"):
        merge_caches([a, b], tmp_path / "m")
    with pytest.raises(DataError, match="shard\\(s\\) 1 of 2 are missing"):
        merge_caches([a], tmp_path / "m2")
    with pytest.raises(DataError, match="shard 0/2 is in both"):
        merge_caches([a, a], tmp_path / "m3")
    c = tmp_path / "c"
    write_synthetic_cache(c, rows[:3], shard=(1, 2), weight_hash="99" * 32)
    with pytest.raises(DataError, match="target.weight_hash differs"):
        merge_caches([a, c], tmp_path / "m4")
    # the same weights under another name or path (another machine) merge fine
    d = tmp_path / "d"
    write_synthetic_cache(d, [r for r in rows if r.prompt_index % 2 == 1], shard=(1, 2), per_part=2,
                          target_name="/other/machine/copy")
    assert merge_caches([a, d], tmp_path / "m5").counts.rows == 10


def test_merge_caches_cli_out_that_is_a_file_is_one_line(tmp_path):
    """It was a NotADirectoryError traceback."""
    from typer.testing import CliRunner

    from dspark.cli import app

    rows = synthetic_rows(4)
    a, b = tmp_path / "a", tmp_path / "b"
    write_synthetic_cache(a, [r for r in rows if r.prompt_index % 2 == 0], shard=(0, 2))
    write_synthetic_cache(b, [r for r in rows if r.prompt_index % 2 == 1], shard=(1, 2))
    f = tmp_path / "merged.txt"
    f.write_text("keep")
    res = CliRunner().invoke(app, ["merge-caches", str(a), str(b), "--out", str(f)])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert res.output.strip() == f"error: --out {str(f)!r} is a file: pass a folder for the merged cache"
    assert f.read_text() == "keep"
