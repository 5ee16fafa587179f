"""Constants and helpers shared by the distill tests."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STORIES = REPO.parent / "shared" / "models" / "stories260K"
STOP = [1, 2]  # stories260K ends a story with BOS (1); 2 is EOS

STORY_STARTS = ["Once upon a time", "The dog", "Lily liked to play", "Tom saw a big", "One day, a",
                "The sun was", "A little bird", "Sam and Mia", "There was a", "The cat said"]


def story_prompts(n: int = 10):
    from dspark.tasks import PromptRecord

    return [PromptRecord(id=f"story-{i}", prompt=STORY_STARTS[i % len(STORY_STARTS)] + ("" if i < 10 else f" {i}"))
            for i in range(n)]


def synthetic_rows(n: int, k: int = 4, vocab: int = 50, seed: int = 0, start: int = 0):
    """Rows with random but valid content: sorted top-K log-probs, distinct ids, tail mass."""
    import numpy as np

    from dspark.distill.cache import CacheRow

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(start, start + n):
        p, t = int(rng.integers(1, 9)), int(rng.integers(1, 7))
        logits = rng.normal(size=(t, vocab)) * 2
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        ids = np.argsort(-logp, axis=-1)[:, :k].astype(np.int32)
        lp = np.take_along_axis(logp, ids, -1)
        tail = np.clip(1 - np.exp(lp).sum(-1), 0, None).astype(np.float32)
        rows.append(CacheRow(prompt_index=i, prompt_id=f"row-{i}", prompt_ids=rng.integers(0, vocab, p).astype(np.int32),
                             continuation_ids=ids[:, 0].copy(), topk_ids=ids, topk_logprobs=lp.astype(np.float16),
                             tail=tail))
    return rows


def write_synthetic_cache(folder, rows, k: int = 4, per_part: int = 3, shard=(0, 1), compression="zstd",
                          target_name="synthetic", weight_hash="ab" * 32):
    """A complete cache written with the real part writer and manifest schema."""
    from dspark.distill.cache import (CacheManifest, Counts, GenerationInfo, ShardInfo, SourceInfo, StorageInfo,
                                      TargetIdentity, write_manifest, write_part)

    parts = [write_part(folder, shard[0], shard[1], c, rows[i:i + per_part], compression=compression)
             for c, i in enumerate(range(0, len(rows), per_part))]
    counts = Counts(prompts=len(rows), rows=len(rows), positions=sum(p.positions for p in parts),
                    bytes=sum(p.bytes for p in parts))
    m = CacheManifest(created_by="test", status="complete",
                      target=TargetIdentity(name=target_name, resolves_to=target_name, kind="memory",
                                            weight_hash=weight_hash, vocab_size=50),
                      tokenizer_hash="cd" * 32,
                      source=SourceInfo(description="synthetic", split="train", total_prompts=len(rows) * shard[1],
                                        prompts_sha256="ef" * 32),
                      generation=GenerationInfo(engine="hf", k=k, temperature=0.0, max_new_tokens=6, seed=0,
                                                stop_token_ids=[1], dtype="float32"),
                      storage=StorageInfo(compression=compression, prompts_per_part=per_part),
                      shards=ShardInfo(count=shard[1], indices=[shard[0]]), counts=counts, parts=parts,
                      bytes_per_position=counts.bytes / counts.positions)
    write_manifest(folder, m)
    return m
