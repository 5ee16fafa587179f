"""The on-disk logits cache: what `dspark collect` writes and `dspark distill` trains from.

Layout of a cache folder:
    CACHE/manifest.json                      strict schema (`CacheManifest`), written atomically
    CACHE/data/s00000-of-00001-c000000.parquet   one part per chunk of prompts (shard, chunk)
    CACHE/data/s00000-of-00001-c000000.parquet.json   sidecar: rows, positions, bytes, sha256

One row per prompt (parquet, written with page checksums):
    prompt_index     int64            index of the prompt in the resolved prompt list (all shards)
    prompt_id        string           the task's stable prompt id
    prompt_ids       list<int32>      [P]  prompt tokens as the target saw them
    continuation_ids list<int32>      [T]  the target's own continuation (stop token included)
    topk_ids         list<int32>      [T*K] row-major: position t's K ids are [t*K, (t+1)*K)
    topk_logprobs    list<float16>    [T*K] target log-softmax (temperature 1) of those ids, sorted
                                      descending per position
    tail             list<float32>    [T]  1 - sum_k p(top_k), computed in float32 before rounding
Position t holds the target's distribution for continuation token t given prompt + continuation[:t].

Every part is written to a temp file and renamed (a crash leaves either the whole part or nothing);
the manifest says `collecting` until the last part is in, then `complete` with the list of parts,
their sizes and sha256. The reader refuses incomplete caches, checks each part's size against the
manifest (truncation) and reads with parquet page checksums (corruption): either problem is a one-
line DataError naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np

from dspark.config.base import StrictModel
from dspark.errors import DataError, DsparkError
from dspark.io import atomic_write_bytes, atomic_write_json, check_out_folder, sha256_file

FORMAT = "dspark-logits-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DATA_DIR = "data"
COMPRESSIONS = ("none", "zstd", "lz4", "snappy")
DEFAULT_COMPRESSION = "zstd"
HELDOUT_SALT = "dspark-heldout:"

CacheSplit = Literal["all", "train", "heldout"]
SPLITS: tuple[str, ...] = ("all", "train", "heldout")


# ---------------------------------------------------------------------------------------------
# Manifest schema
# ---------------------------------------------------------------------------------------------

class TargetIdentity(StrictModel):
    """Which target made the cache. `weight_hash` (sha256 over the safetensors files, or over the
    parameters of an in-memory model) or `revision` (hub commit) pins the exact weights."""

    name: str
    resolves_to: str
    kind: str
    weight_hash: str | None = None
    revision: str | None = None
    vocab_size: int


class SourceInfo(StrictModel):
    task: str | None = None
    data: str | None = None
    description: str
    split: str
    num_prompts: int | None = None  # the requested limit (None: all)
    total_prompts: int  # prompts resolved before sharding
    prompts_sha256: str  # over (id, rendered text) of every resolved prompt, all shards


class GenerationInfo(StrictModel):
    engine: str
    k: int
    temperature: float
    max_new_tokens: int
    seed: int
    stop_token_ids: list[int]
    dtype: str  # the target's compute dtype
    logprobs: Literal["raw"] = "raw"  # log-softmax of the logits at temperature 1, whatever sampled


class StorageInfo(StrictModel):
    logprobs_dtype: Literal["float16"] = "float16"
    ids_dtype: Literal["int32"] = "int32"
    tail_dtype: Literal["float32"] = "float32"
    compression: str = DEFAULT_COMPRESSION
    prompts_per_part: int


class ShardInfo(StrictModel):
    count: int  # N of --shard I/N
    indices: list[int]  # which shards this folder holds (one for a shard run, all once merged)


class PartInfo(StrictModel):
    file: str  # relative to the cache folder
    shard: int
    chunk: int
    rows: int
    positions: int
    bytes: int
    sha256: str


class Counts(StrictModel):
    prompts: int  # prompts assigned to the shards this folder holds
    rows: int
    positions: int
    bytes: int


class CacheManifest(StrictModel):
    format: Literal["dspark-logits-cache"] = FORMAT
    format_version: int = FORMAT_VERSION
    created_by: str
    status: Literal["collecting", "complete"]
    target: TargetIdentity
    tokenizer_hash: str
    source: SourceInfo
    generation: GenerationInfo
    storage: StorageInfo
    shards: ShardInfo
    counts: Counts | None = None
    bytes_per_position: float | None = None
    parts: list[PartInfo] = []

    def identity(self) -> dict[str, Any]:
        """Everything that decides the cache's content (compared on resume and merge). Paths are
        left out where a content hash stands for them, so shard runs on machines that keep the
        same weights or data at different paths still agree: the target is its weight hash or
        revision (its path only when it has neither), the prompts are their sha256."""
        t = self.target
        target = {"weight_hash": t.weight_hash, "revision": t.revision, "vocab_size": t.vocab_size}
        if t.weight_hash is None and t.revision is None:
            target.update(name=t.name, resolves_to=t.resolves_to)
        source = self.source.model_dump(exclude={"description", "data"})
        return {"target": target, "tokenizer_hash": self.tokenizer_hash, "source": source,
                "generation": self.generation.model_dump(), "storage": self.storage.model_dump(),
                "shards.count": self.shards.count}


def identity_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, value in a, value in b) for every leaf that differs, in a's key order (the
    identity lists the most telling keys first: target, tokenizer, source, settings)."""
    out = []
    for key in list(a) + [k for k in b if k not in a]:
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out.extend(identity_diff(va, vb, f"{prefix}{key}."))
        elif va != vb:
            out.append((f"{prefix}{key}", va, vb))
    return out


def manifest_hash(path: str | os.PathLike) -> str:
    """sha256 of a cache's manifest file (recorded as provenance by distill)."""
    return sha256_file(Path(path) / MANIFEST)


def read_manifest(folder: str | os.PathLike) -> CacheManifest:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise DataError(f"{str(folder)!r} is not a logits cache: it has no {MANIFEST} "
                        "(make one with `dspark collect`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if isinstance(data, dict) and data.get("format") == FORMAT and data.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path}: cache format version {data.get('format_version')!r} is not supported "
                        f"(this dspark reads version {FORMAT_VERSION}); re-collect it")
    try:
        return CacheManifest.parse(data, where=str(path))
    except DsparkError as e:
        raise DataError(str(e)) from None


def write_manifest(folder: str | os.PathLike, manifest: CacheManifest) -> Path:
    return atomic_write_json(Path(folder) / MANIFEST, manifest.model_dump(mode="json"))


# ---------------------------------------------------------------------------------------------
# Rows and parts
# ---------------------------------------------------------------------------------------------

@dataclass
class CacheRow:
    """One cached prompt. Shapes: prompt_ids [P], continuation_ids [T], topk_ids / topk_logprobs
    [T, K], tail [T]."""

    prompt_index: int
    prompt_id: str
    prompt_ids: np.ndarray
    continuation_ids: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    tail: np.ndarray

    @property
    def num_positions(self) -> int:
        return int(self.continuation_ids.shape[0])


def bytes_per_position_estimate(k: int) -> int:
    """Uncompressed bytes one cached position costs: K float16 log-probs + K int32 ids + a float32
    tail + the int32 continuation token."""
    return k * (2 + 4) + 4 + 4


def part_name(shard: int, count: int, chunk: int) -> str:
    return f"{DATA_DIR}/s{shard:05d}-of-{count:05d}-c{chunk:06d}.parquet"


_PART = re.compile(r"^s(\d{5})-of-(\d{5})-c(\d{6})\.parquet$")


def parse_part_name(name: str) -> tuple[int, int, int] | None:
    m = _PART.match(name)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def _schema():
    import pyarrow as pa

    return pa.schema([
        ("prompt_index", pa.int64()),
        ("prompt_id", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("continuation_ids", pa.list_(pa.int32())),
        ("topk_ids", pa.list_(pa.int32())),
        ("topk_logprobs", pa.list_(pa.float16())),
        ("tail", pa.list_(pa.float32())),
    ])


def _list_array(arrays: Sequence[np.ndarray], np_dtype, dtype):
    """Build a list<dtype> arrow column from per-row numpy arrays without Python-level loops over
    elements (flat values + offsets)."""
    import pyarrow as pa

    lengths = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = (np.concatenate([np.asarray(a, dtype=np_dtype).reshape(-1) for a in arrays]) if arrays
            else np.zeros(0, dtype=np_dtype))
    return pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), pa.array(flat, type=dtype))


def rows_to_table(rows: Sequence[CacheRow]):
    import pyarrow as pa

    for r in rows:
        t = r.continuation_ids.shape[0]
        if r.topk_ids.shape != r.topk_logprobs.shape or r.topk_ids.shape[0] != t or r.tail.shape != (t,):
            raise ValueError(f"row {r.prompt_id!r}: inconsistent shapes continuation {r.continuation_ids.shape}, "
                             f"ids {r.topk_ids.shape}, logprobs {r.topk_logprobs.shape}, tail {r.tail.shape}")
    return pa.Table.from_arrays([
        pa.array([r.prompt_index for r in rows], type=pa.int64()),
        pa.array([r.prompt_id for r in rows], type=pa.string()),
        _list_array([r.prompt_ids for r in rows], np.int32, pa.int32()),
        _list_array([r.continuation_ids for r in rows], np.int32, pa.int32()),
        _list_array([r.topk_ids for r in rows], np.int32, pa.int32()),
        _list_array([r.topk_logprobs for r in rows], np.float16, pa.float16()),
        _list_array([r.tail for r in rows], np.float32, pa.float32()),
    ], schema=_schema())


def write_part(folder: str | os.PathLike, shard: int, count: int, chunk: int, rows: Sequence[CacheRow],
               compression: str = DEFAULT_COMPRESSION) -> PartInfo:
    """Serialise `rows` to parquet in memory, then write it atomically, then its sidecar."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if compression not in COMPRESSIONS:
        raise DsparkError(f"unknown compression {compression!r} (valid: {', '.join(COMPRESSIONS)})")
    table = rows_to_table(rows)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=None if compression == "none" else compression,
                   write_page_checksum=True)
    data = sink.getvalue().to_pybytes()
    rel = part_name(shard, count, chunk)
    atomic_write_bytes(Path(folder) / rel, data)
    info = PartInfo(file=rel, shard=shard, chunk=chunk, rows=len(rows),
                    positions=int(sum(r.num_positions for r in rows)), bytes=len(data),
                    sha256=hashlib.sha256(data).hexdigest())
    atomic_write_json(Path(folder) / (rel + ".json"), info.model_dump())
    return info


def _bad_part(path: Path, why: str) -> DataError:
    return DataError(f"cache part {str(path)!r} is {why}: delete it and re-run the same `dspark collect` "
                     "command to collect it again")


def part_info_from_file(folder: str | os.PathLike, rel: str) -> PartInfo:
    """A part's info from its sidecar, or (sidecar lost in a crash between the two renames)
    recomputed from the part itself."""
    path = Path(folder) / rel
    parsed = parse_part_name(path.name)
    if parsed is None:
        raise DataError(f"unexpected file {str(path)!r} in the cache's data folder")
    side = Path(str(path) + ".json")
    size = path.stat().st_size
    if side.is_file():
        try:
            info = PartInfo.parse(json.loads(side.read_text(encoding="utf-8")), where=str(side))
        except (ValueError, DsparkError):
            info = None
        if info is not None and info.bytes == size and info.file == rel:
            return info
    table = read_part_table(path, columns=["continuation_ids"])
    import pyarrow.compute as pc

    positions = int(pc.sum(pc.list_value_length(table.column("continuation_ids"))).as_py() or 0)
    info = PartInfo(file=rel, shard=parsed[0], chunk=parsed[2], rows=table.num_rows, positions=positions,
                    bytes=size, sha256=sha256_file(path))
    atomic_write_json(side, info.model_dump())
    return info


def read_part_table(path: Path, columns: list[str] | None = None, expect_bytes: int | None = None):
    """Read one part with page-checksum verification; any failure is one DataError naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        raise DataError(f"cache part {str(path)!r} is missing (the cache folder is incomplete)")
    if expect_bytes is not None and path.stat().st_size != expect_bytes:
        raise _bad_part(path, f"truncated or changed ({path.stat().st_size} bytes, the manifest says "
                              f"{expect_bytes})")
    try:
        pf = pq.ParquetFile(path, page_checksum_verification=True)
        table = pf.read(columns=columns)
    except (pa.ArrowException, OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise _bad_part(path, f"corrupted ({first})") from None
    expected = _schema()
    want = expected if columns is None else _schema_subset(expected, columns)
    if not table.schema.equals(want):
        raise _bad_part(path, "not a dspark cache part (unexpected columns or types)")
    return table


def _schema_subset(schema, columns: list[str]):
    import pyarrow as pa

    return pa.schema([schema.field(c) for c in columns])


def _list_column(table, name: str, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(offsets [R+1], flat values) of a list column."""
    col = table.column(name).combine_chunks()
    offsets = col.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
    values = col.values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    base = offsets[0]
    return offsets - base, values[base:] if base else values


@dataclass
class PartData:
    """A part decoded to numpy (flat values + offsets), so rows are cheap slices."""

    prompt_index: np.ndarray
    prompt_id: list[str]
    cols: dict[str, tuple[np.ndarray, np.ndarray]]
    k: int

    @classmethod
    def from_table(cls, table, k: int) -> "PartData":
        cols = {
            "prompt_ids": _list_column(table, "prompt_ids", np.int32),
            "continuation_ids": _list_column(table, "continuation_ids", np.int32),
            "topk_ids": _list_column(table, "topk_ids", np.int32),
            "topk_logprobs": _list_column(table, "topk_logprobs", np.float16),
            "tail": _list_column(table, "tail", np.float32),
        }
        return cls(prompt_index=table.column("prompt_index").to_numpy().astype(np.int64),
                   prompt_id=table.column("prompt_id").to_pylist(), cols=cols, k=k)

    def __len__(self) -> int:
        return len(self.prompt_id)

    def _get(self, name: str, i: int) -> np.ndarray:
        off, val = self.cols[name]
        return val[off[i]:off[i + 1]]

    def row(self, i: int) -> CacheRow:
        t = int(self._get("continuation_ids", i).shape[0])
        return CacheRow(prompt_index=int(self.prompt_index[i]), prompt_id=self.prompt_id[i],
                        prompt_ids=self._get("prompt_ids", i), continuation_ids=self._get("continuation_ids", i),
                        topk_ids=self._get("topk_ids", i).reshape(t, self.k),
                        topk_logprobs=self._get("topk_logprobs", i).reshape(t, self.k),
                        tail=self._get("tail", i))


# ---------------------------------------------------------------------------------------------
# Held-out split
# ---------------------------------------------------------------------------------------------

def is_heldout(prompt_id: str, percent: float) -> bool:
    """Deterministic held-out membership by a salted hash of the prompt id. The salt keeps it
    independent of the task's own train/eval split (same hash family), which would otherwise make
    the held-out set of a train-split cache empty."""
    if percent <= 0:
        return False
    bucket = int(hashlib.sha1((HELDOUT_SALT + prompt_id).encode("utf-8")).hexdigest()[:8], 16) % 10000
    return bucket < percent * 100


def in_split(prompt_id: str, split: str, heldout_percent: float) -> bool:
    if split == "all":
        return True
    h = is_heldout(prompt_id, heldout_percent)
    return h if split == "heldout" else not h


# ---------------------------------------------------------------------------------------------
# Training batches
# ---------------------------------------------------------------------------------------------

@dataclass
class CacheBatch:
    """A training batch (torch). B rows, L = longest prompt + continuation, T = longest continuation.

    input_ids [B, L] long      prompt + continuation, right-padded with `pad_id`
    attention_mask [B, L] long 1 on real tokens
    positions [B, T] long      index into L of the logits that predict continuation token t
                               (= prompt length - 1 + t); 0 on padding
    loss_mask [B, T] bool      True on real continuation positions
    labels [B, T] long         the continuation tokens (0 on padding)
    topk_ids [B, T, K] long, topk_logprobs [B, T, K] float32, tail [B, T] float32 (target side)
    prompt_index [B] long, prompt_id list[str]
    Use: logits = draft(input_ids, attention_mask).logits;
         draft_logits = logits.gather(1, positions[..., None].expand(-1, -1, V))  # [B, T, V]
         loss = topk_loss(obj, topk_logprobs, topk_ids, draft_logits, tail, loss_mask)
    """

    input_ids: Any
    attention_mask: Any
    positions: Any
    loss_mask: Any
    labels: Any
    topk_ids: Any
    topk_logprobs: Any
    tail: Any
    prompt_index: Any
    prompt_id: list[str]

    @property
    def num_positions(self) -> int:
        return int(self.loss_mask.sum())

    def to(self, device) -> "CacheBatch":
        moved = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in self.__dict__.items()}
        return CacheBatch(**moved)


def truncate_row(row: CacheRow, max_length: int | None) -> CacheRow:
    """Fit prompt + continuation into `max_length` tokens: drop prompt tokens from the left first
    (keeping at least one, which the first prediction needs), then continuation positions from the
    end."""
    if max_length is None:
        return row
    p, t = row.prompt_ids.shape[0], row.continuation_ids.shape[0]
    if p + t <= max_length:
        return row
    keep_p = max(1, max_length - t)
    keep_t = max(0, min(t, max_length - keep_p))
    return CacheRow(row.prompt_index, row.prompt_id, row.prompt_ids[p - keep_p:], row.continuation_ids[:keep_t],
                    row.topk_ids[:keep_t], row.topk_logprobs[:keep_t], row.tail[:keep_t])


def collate(rows: Sequence[CacheRow], pad_id: int = 0, max_length: int | None = None) -> CacheBatch:
    """Rows -> one right-padded CacheBatch (see its docstring for shapes)."""
    import torch

    rows = [truncate_row(r, max_length) for r in rows]
    b = len(rows)
    k = rows[0].topk_ids.shape[1] if rows and rows[0].topk_ids.ndim == 2 else 0
    lens = [r.prompt_ids.shape[0] + r.continuation_ids.shape[0] for r in rows]
    L = max(lens) if rows else 0
    T = max((r.continuation_ids.shape[0] for r in rows), default=0)
    input_ids = torch.full((b, L), pad_id, dtype=torch.long)
    attn = torch.zeros((b, L), dtype=torch.long)
    positions = torch.zeros((b, T), dtype=torch.long)
    loss_mask = torch.zeros((b, T), dtype=torch.bool)
    labels = torch.zeros((b, T), dtype=torch.long)
    topk_ids = torch.zeros((b, T, k), dtype=torch.long)
    topk_lp = torch.zeros((b, T, k), dtype=torch.float32)
    tail = torch.zeros((b, T), dtype=torch.float32)
    for i, r in enumerate(rows):
        p, t = r.prompt_ids.shape[0], r.continuation_ids.shape[0]
        input_ids[i, :p] = torch.from_numpy(r.prompt_ids.astype(np.int64))
        input_ids[i, p:p + t] = torch.from_numpy(r.continuation_ids.astype(np.int64))
        attn[i, :p + t] = 1
        positions[i, :t] = torch.arange(p - 1, p - 1 + t)
        loss_mask[i, :t] = True
        labels[i, :t] = input_ids[i, p:p + t]
        topk_ids[i, :t] = torch.from_numpy(r.topk_ids.astype(np.int64))
        topk_lp[i, :t] = torch.from_numpy(r.topk_logprobs.astype(np.float32))
        tail[i, :t] = torch.from_numpy(r.tail.astype(np.float32))
    return CacheBatch(input_ids=input_ids, attention_mask=attn, positions=positions, loss_mask=loss_mask,
                      labels=labels, topk_ids=topk_ids, topk_logprobs=topk_lp, tail=tail,
                      prompt_index=torch.tensor([r.prompt_index for r in rows], dtype=torch.long),
                      prompt_id=[r.prompt_id for r in rows])


# ---------------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------------

class LogitsCache:
    """A complete logits cache opened for reading.

    Opening checks the manifest (strict schema, `complete`) and every part's existence and size;
    reading a part verifies its parquet page checksums; `verify()` also checks every sha256.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise DataError(f"logits cache {str(self.path)!r} does not exist (make one with `dspark collect`)")
        self.manifest = read_manifest(self.path)
        if self.manifest.status != "complete":
            raise DataError(f"logits cache {str(self.path)!r} is incomplete (collection was interrupted): "
                            "re-run the same `dspark collect` command to finish it")
        for part in self.manifest.parts:
            f = self.path / part.file
            if not f.is_file():
                raise DataError(f"cache part {str(f)!r} is missing (the manifest lists it)")
            if f.stat().st_size != part.bytes:
                raise _bad_part(f, f"truncated or changed ({f.stat().st_size} bytes, the manifest says "
                                   f"{part.bytes})")
        self._index: list[tuple[int, str]] | None = None

    # -- facts --------------------------------------------------------------------------------
    @property
    def k(self) -> int:
        return self.manifest.generation.k

    @property
    def num_rows(self) -> int:
        return sum(p.rows for p in self.manifest.parts)

    @property
    def num_positions(self) -> int:
        return sum(p.positions for p in self.manifest.parts)

    @property
    def bytes_per_position(self) -> float:
        total = sum(p.bytes for p in self.manifest.parts)
        return total / self.num_positions if self.num_positions else 0.0

    def __len__(self) -> int:
        return self.num_rows

    def check_compatible(self, target_name: str | None = None, tokenizer_hash: str | None = None,
                         weight_hash: str | None = None, revision: str | None = None) -> None:
        """DataError when the cache was made by another target or tokenizer than the one given."""
        t = self.manifest.target
        where = f"logits cache {str(self.path)!r}"
        if tokenizer_hash is not None and tokenizer_hash != self.manifest.tokenizer_hash:
            raise DataError(f"{where} was made with a different tokenizer (hash {self.manifest.tokenizer_hash[:12]}, "
                            f"this one {tokenizer_hash[:12]}): collect a new cache for this target")
        if weight_hash is not None and t.weight_hash is not None and weight_hash != t.weight_hash:
            raise DataError(f"{where} was made by target weights {t.weight_hash[:12]} ({t.name}), not "
                            f"{weight_hash[:12]}: collect a new cache for this target")
        if revision is not None and t.revision is not None and revision != t.revision:
            raise DataError(f"{where} was made by target revision {t.revision}, not {revision}")
        if (target_name is not None and weight_hash is None and revision is None
                and target_name not in (t.name, t.resolves_to)):
            raise DataError(f"{where} was made by target {t.name!r} ({t.resolves_to}), not {target_name!r}")

    # -- reading ------------------------------------------------------------------------------
    def read_part(self, part: PartInfo) -> PartData:
        table = read_part_table(self.path / part.file, expect_bytes=part.bytes)
        if table.num_rows != part.rows:
            raise _bad_part(self.path / part.file,
                            f"inconsistent ({table.num_rows} rows, the manifest says {part.rows})")
        return PartData.from_table(table, self.k)

    def rows(self, split: CacheSplit = "all", heldout_percent: float = 5.0) -> Iterator[CacheRow]:
        """Every row of `split`, in manifest order (shard, chunk, prompt order)."""
        _check_split(split)
        for part in self.manifest.parts:
            data = self.read_part(part)
            for i in range(len(data)):
                if in_split(data.prompt_id[i], split, heldout_percent):
                    yield data.row(i)

    def split_sizes(self, heldout_percent: float = 5.0) -> dict[str, int]:
        """Rows per split (reads only the prompt_id column)."""
        held = sum(is_heldout(pid, heldout_percent) for _, pid in self._ids())
        return {"all": self.num_rows, "train": self.num_rows - held, "heldout": held}

    def _ids(self) -> list[tuple[int, str]]:
        if self._index is None:
            out = []
            for pi, part in enumerate(self.manifest.parts):
                table = read_part_table(self.path / part.file, columns=["prompt_id"], expect_bytes=part.bytes)
                out.extend((pi, pid) for pid in table.column("prompt_id").to_pylist())
            self._index = out
        return self._index

    def batches(self, batch_size: int, split: CacheSplit = "train", heldout_percent: float = 5.0,
                shuffle: bool = True, seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1,
                pad_id: int = 0, max_length: int | None = None, shuffle_window: int = 8) -> Iterator[CacheBatch]:
        """Torch batches for training.

        Parts are visited in a seeded order (seed + epoch) in windows of `shuffle_window` parts;
        rows of a window are shuffled together, so memory stays bounded by the window while the
        order is well mixed. Data parallel: every rank computes the same window order and takes
        rows rank::world_size of it after trimming the window to a multiple of world_size, so all
        ranks see disjoint rows and the SAME number of batches (collective ops cannot hang).
        """
        _check_split(split)
        if batch_size < 1:
            raise DsparkError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise DsparkError(f"rank {rank} is outside world_size {world_size}")
        rng = np.random.default_rng([seed, epoch])
        parts = list(self.manifest.parts)
        order = rng.permutation(len(parts)) if shuffle else np.arange(len(parts))
        window = max(1, shuffle_window)
        for w in range(0, len(order), window):
            datas = [self.read_part(parts[i]) for i in order[w:w + window]]
            refs = [(d, i) for d in datas for i in range(len(d))
                    if in_split(d.prompt_id[i], split, heldout_percent)]
            if shuffle:
                refs = [refs[i] for i in rng.permutation(len(refs))]
            refs = refs[: len(refs) - len(refs) % world_size][rank::world_size]
            for s in range(0, len(refs), batch_size):
                chunk = refs[s:s + batch_size]
                yield collate([d.row(i) for d, i in chunk], pad_id=pad_id, max_length=max_length)

    def count_batches(self, batch_size: int, split: CacheSplit = "train", heldout_percent: float = 5.0,
                      shuffle: bool = True, seed: int = 0, epoch: int = 0, world_size: int = 1,
                      shuffle_window: int = 8) -> int:
        """How many batches `batches(...)` yields per rank with these arguments (for schedules and
        `--epochs`), from the prompt-id column only."""
        _check_split(split)
        per_part: dict[int, int] = {}
        for pi, pid in self._ids():
            per_part[pi] = per_part.get(pi, 0) + int(in_split(pid, split, heldout_percent))
        rng = np.random.default_rng([seed, epoch])
        n = len(self.manifest.parts)
        order = rng.permutation(n) if shuffle else np.arange(n)
        window = max(1, shuffle_window)
        total = 0
        for w in range(0, n, window):
            rows = sum(per_part.get(int(i), 0) for i in order[w:w + window])
            total += -(-(rows // world_size) // batch_size)
        return total

    def verify(self) -> None:
        """Check every part's sha256 against the manifest (reads everything)."""
        for part in self.manifest.parts:
            f = self.path / part.file
            if sha256_file(f) != part.sha256:
                raise _bad_part(f, "corrupted (sha256 differs from the manifest)")
            self.read_part(part)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DsparkError(f"unknown cache split {split!r} (valid: {', '.join(SPLITS)})")


def open_cache(path: str | os.PathLike) -> LogitsCache:
    return LogitsCache(path)


# ---------------------------------------------------------------------------------------------
# Merge
# ---------------------------------------------------------------------------------------------

def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link (free on one filesystem: caches are large) or copy via temp + rename."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        atomic_write_bytes(dst, src.read_bytes())


def merge_caches(inputs: Sequence[str | os.PathLike], out: str | os.PathLike) -> CacheManifest:
    """Join the outputs of `--shard I/N` runs into one cache at `out`.

    All inputs must be complete, made with the same target / tokenizer / source / settings and the
    same N, and together hold every shard exactly once. Parts are hard-linked when possible.
    """
    from dspark import __version__

    if not inputs:
        raise DsparkError("merge needs at least one shard cache")
    out = check_out_folder(out, "the merged cache")
    caches = [LogitsCache(p) for p in inputs]
    first = caches[0].manifest
    ident = first.identity()
    seen: dict[int, Path] = {}
    for c in caches:
        diff = identity_diff(ident, c.manifest.identity())
        if diff:
            key, a, b = diff[0]
            raise DataError(f"cannot merge {str(c.path)!r} with {str(caches[0].path)!r}: {key} differs "
                            f"({b!r} vs {a!r})")
        for i in c.manifest.shards.indices:
            if i in seen:
                raise DataError(f"shard {i}/{first.shards.count} is in both {str(seen[i])!r} and {str(c.path)!r}")
            seen[i] = c.path
    missing = sorted(set(range(first.shards.count)) - set(seen))
    if missing:
        raise DataError(f"cannot merge: shard(s) {', '.join(map(str, missing))} of {first.shards.count} are missing")
    if (out / MANIFEST).exists() or (out.exists() and any(out.iterdir())):
        raise DsparkError(f"merge output {str(out)!r} already exists and is not empty: choose a new folder")
    parts: list[PartInfo] = []
    for c in caches:
        for p in c.manifest.parts:
            _link_or_copy(c.path / p.file, out / p.file)
            atomic_write_json(out / (p.file + ".json"), p.model_dump())
            parts.append(p)
    parts.sort(key=lambda p: (p.shard, p.chunk))
    counts = Counts(prompts=sum(c.manifest.counts.prompts for c in caches if c.manifest.counts),
                    rows=sum(p.rows for p in parts), positions=sum(p.positions for p in parts),
                    bytes=sum(p.bytes for p in parts))
    merged = first.model_copy(update={
        "created_by": f"dspark {__version__}", "status": "complete",
        "shards": ShardInfo(count=first.shards.count, indices=sorted(seen)), "parts": parts, "counts": counts,
        "bytes_per_position": (counts.bytes / counts.positions) if counts.positions else None})
    write_manifest(out, CacheManifest.parse(merged.model_dump(mode="json"), where=str(out / MANIFEST)))
    return merged


__all__ = [
    "FORMAT", "FORMAT_VERSION", "CacheBatch", "CacheManifest", "CacheRow", "Counts", "GenerationInfo",
    "LogitsCache", "PartInfo", "ShardInfo", "SourceInfo", "StorageInfo", "TargetIdentity",
    "bytes_per_position_estimate", "collate", "identity_diff", "in_split", "is_heldout", "manifest_hash",
    "merge_caches", "open_cache", "read_manifest", "write_manifest", "write_part",
]
