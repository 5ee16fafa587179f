"""The hidden-state cache: the target's features (three layers' hidden states) for every row of a
logits cache, so a head trains offline when the target is too large to run in the training loop.

It is LARGE: each position costs 3 x hidden_size values (2 bytes each in bfloat16), e.g.
3 x 8192 x 2 = 48 KB per position for a 70B Llama, against ~0.4 KB for the logits cache's top-64
log-probs: the storage estimate prints before anything is computed.

Layout (mirrors the logits cache it belongs to, one part per logits-cache part):
    HIDDEN/manifest.json                 strict schema (`HiddenManifest`), written atomically
    HIDDEN/data/<logits part>.safetensors  features [positions, 3H] (bfloat16 / float16 / float32),
                                           offsets [rows + 1] int64, prompt_index [rows] int64,
                                           prompt_len [rows] int64: row r's features are
                                           features[offsets[r]:offsets[r + 1]] over prompt + continuation
    HIDDEN/target/config.json + parts.safetensors   the target's config, embedding, LM head and final
                                           norm (`eagle3.target_parts`, in the cache's dtype): a head is
                                           built from these without loading the target again
Parts are written atomically (temp file + rename); a killed run re-run with the same arguments
skips the parts already written (each is reopened and checked) and ends with the same files.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch

from dspark.config.base import StrictModel
from dspark.errors import DataError, DsparkError

FORMAT = "dspark-hidden-cache"
MANIFEST = "manifest.json"
DATA_DIR = "data"
TARGET_DIR = "target"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class HiddenPart(StrictModel):
    file: str  # relative to the hidden cache folder
    source: str  # the logits-cache part it covers
    rows: int
    positions: int
    bytes: int


class HiddenManifest(StrictModel):
    format: Literal["dspark-hidden-cache"] = FORMAT
    format_version: int = 1
    created_by: str
    status: Literal["collecting", "complete"]
    logits_cache_manifest_sha256: str
    target: dict[str, Any]  # the logits cache's TargetIdentity
    layer_ids: list[int]
    hidden_size: int
    dtype: str
    parts: list[HiddenPart] = []

    def identity(self) -> dict[str, Any]:
        return {"logits_cache_manifest_sha256": self.logits_cache_manifest_sha256, "target": self.target,
                "layer_ids": self.layer_ids, "hidden_size": self.hidden_size, "dtype": self.dtype}


def bytes_per_position(hidden_size: int, dtype: str) -> int:
    return 3 * hidden_size * DTYPES[dtype].itemsize


def read_hidden_manifest(folder: str | os.PathLike) -> HiddenManifest:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise DataError(f"{str(folder)!r} is not a hidden-state cache: it has no {MANIFEST} "
                        "(make one with `dspark train-head --offline`)")
    try:
        return HiddenManifest.parse(json.loads(path.read_text(encoding="utf-8")), where=str(path))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


def _part_file(source: str) -> str:
    return f"{DATA_DIR}/{Path(source).stem}.safetensors"


def _check_part(path: Path, rows: int, width: int) -> int:
    """Open a written part; its positions, or DataError when it is not what this run writes."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            offsets = f.get_tensor("offsets")
            shape = f.get_slice("features").get_shape()
    except (SafetensorError, OSError, KeyError) as e:
        raise DataError(f"hidden-state part {str(path)!r} is unreadable ({e}): delete it and re-run") from None
    if offsets.shape[0] != rows + 1 or shape[1] != width or int(offsets[-1]) != shape[0]:
        raise DataError(f"hidden-state part {str(path)!r} does not match this run ({offsets.shape[0] - 1} rows, "
                        f"width {shape[1]}): delete it and re-run")
    return int(shape[0])


def row_positions(logits_cache) -> int:
    """Prompt + continuation tokens over every row of a logits cache (its token columns only)."""
    import pyarrow.compute as pc

    from dspark.distill.cache import read_part_table

    total = 0
    for part in logits_cache.manifest.parts:
        table = read_part_table(logits_cache.path / part.file, columns=["prompt_ids", "continuation_ids"],
                                expect_bytes=part.bytes)
        for col in ("prompt_ids", "continuation_ids"):
            total += int(pc.sum(pc.list_value_length(table.column(col))).as_py() or 0)
    return total


@torch.no_grad()
def _row_features(target_model, rows, layer_ids: Sequence[int], batch_size: int, pad_id: int,
                  device) -> list[torch.Tensor]:
    """Features [P + T, 3H] (float32, CPU) of each cached row, batched by length."""
    from dspark.models.eagle3 import capture_features

    seqs = [list(r.prompt_ids) + list(r.continuation_ids) for r in rows]
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i]), i))
    out: list[torch.Tensor | None] = [None] * len(seqs)
    for s in range(0, len(order), batch_size):
        sel = order[s:s + batch_size]
        width = max(len(seqs[i]) for i in sel)
        ids = torch.full((len(sel), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(sel), width), dtype=torch.long)
        for j, i in enumerate(sel):
            ids[j, :len(seqs[i])] = torch.as_tensor(seqs[i])
            mask[j, :len(seqs[i])] = 1
        feats, _ = capture_features(target_model, ids.to(device), mask.to(device), layer_ids)
        for j, i in enumerate(sel):
            out[i] = feats[j, :len(seqs[i])].float().cpu()
    return out  # type: ignore[return-value]


def _write_part(target_model, logits_cache, part, path: Path, layer_ids: Sequence[int], dtype: str, batch_size: int,
                pad_id: int, device) -> int:
    """Features of one logits-cache part's rows -> one safetensors part (atomic); its positions."""
    from safetensors.torch import save

    from dspark.io import atomic_write_bytes

    data = logits_cache.read_part(part)
    rows = [data.row(i) for i in range(len(data))]
    feats = _row_features(target_model, rows, layer_ids, batch_size, pad_id, device)
    offsets = torch.zeros(len(feats) + 1, dtype=torch.long)
    offsets[1:] = torch.tensor([f.shape[0] for f in feats], dtype=torch.long).cumsum(0)
    tensors = {"features": torch.cat(feats).to(DTYPES[dtype]).contiguous(), "offsets": offsets,
               "prompt_index": torch.tensor([r.prompt_index for r in rows], dtype=torch.long),
               "prompt_len": torch.tensor([len(r.prompt_ids) for r in rows], dtype=torch.long)}
    atomic_write_bytes(path, save(tensors))
    return int(offsets[-1])


def collect_hidden(target_model, logits_cache, out: str | os.PathLike, layer_ids: Sequence[int], *,
                   dtype: str = "bfloat16", batch_size: int = 8, pad_id: int = 0,
                   progress: Callable[[int, int], None] | None = None,
                   log: Callable[[str], None] | None = None) -> HiddenManifest:
    """Compute (or resume computing) the hidden-state cache of `logits_cache` into `out`."""
    from safetensors.torch import save

    from dspark import __version__
    from dspark.distill.cache import identity_diff, manifest_hash
    from dspark.distill.collect import human_bytes
    from dspark.io import atomic_write_bytes, atomic_write_json
    from dspark.models.eagle3 import target_parts

    log = log or (lambda _m: None)
    if dtype not in DTYPES:
        raise DsparkError(f"hidden-state dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    config, parts_w = target_parts(target_model)
    hidden = int(parts_w["embed_tokens"].shape[1])
    out = Path(out)
    lc_manifest = logits_cache.manifest
    manifest = HiddenManifest(created_by=f"dspark {__version__}", status="collecting",
                              logits_cache_manifest_sha256=manifest_hash(logits_cache.path),
                              target=lc_manifest.target.model_dump(), layer_ids=list(layer_ids),
                              hidden_size=hidden, dtype=dtype)
    if (out / MANIFEST).is_file():
        old = read_hidden_manifest(out)
        diff = identity_diff(old.identity(), manifest.identity())
        if diff:
            key, a, b = diff[0]
            raise DataError(f"{str(out)!r} holds a hidden-state cache made with other arguments ({key}: {a!r} there, "
                            f"{b!r} now): choose another folder or delete it")
        if old.status == "complete":
            log(f"{out}: hidden-state cache already complete")
            return old
    elif out.exists() and any(out.iterdir()):
        raise DsparkError(f"{str(out)!r} exists and is not a hidden-state cache: choose a new or empty folder")
    width = 3 * hidden
    bpp = bytes_per_position(hidden, dtype)
    lc_bpp = logits_cache.bytes_per_position
    positions = row_positions(logits_cache)
    log(f"storage estimate: {human_bytes(positions * bpp)} ({positions:,} prompt + continuation positions x 3 "
        f"layers x {hidden} x {DTYPES[dtype].itemsize} B = {bpp:,} B/position; the logits cache holds "
        f"{lc_bpp:,.0f} B per continuation position: {bpp / max(lc_bpp, 1e-9):,.0f}x less)")
    (out / DATA_DIR).mkdir(parents=True, exist_ok=True)
    (out / TARGET_DIR).mkdir(exist_ok=True)
    atomic_write_json(out / TARGET_DIR / "config.json", config.to_dict())
    atomic_write_bytes(out / TARGET_DIR / "parts.safetensors",
                       save({k: v.to(DTYPES[dtype]).contiguous() for k, v in parts_w.items()}))
    atomic_write_json(out / MANIFEST, manifest.model_dump(mode="json"))

    device = next(target_model.parameters()).device
    done: list[HiddenPart] = []
    total = len(lc_manifest.parts)
    t0 = time.perf_counter()
    for n, part in enumerate(lc_manifest.parts):
        rel = _part_file(part.file)
        path = out / rel
        positions = (_check_part(path, part.rows, width) if path.is_file() else
                     _write_part(target_model, logits_cache, part, path, layer_ids, dtype, batch_size, pad_id, device))
        done.append(HiddenPart(file=rel, source=part.file, rows=part.rows, positions=positions,
                               bytes=path.stat().st_size))
        manifest = manifest.model_copy(update={"parts": list(done)})
        atomic_write_json(out / MANIFEST, manifest.model_dump(mode="json"))
        if progress:
            progress(n + 1, total)
    manifest = manifest.model_copy(update={"status": "complete"})
    atomic_write_json(out / MANIFEST, manifest.model_dump(mode="json"))
    size = sum(p.bytes for p in done)
    log(f"hidden-state cache {out}: {sum(p.positions for p in done):,} positions, {human_bytes(size)} "
        f"({time.perf_counter() - t0:.1f} s)")
    return manifest


class HiddenCache:
    """A complete hidden-state cache opened for reading, checked against its logits cache."""

    def __init__(self, path: str | os.PathLike, logits_cache=None):
        from dspark.distill.cache import manifest_hash

        self.path = Path(path)
        self.manifest = read_hidden_manifest(self.path)
        if self.manifest.status != "complete":
            raise DataError(f"hidden-state cache {str(self.path)!r} is incomplete: re-run the command that made it")
        if logits_cache is not None and manifest_hash(logits_cache.path) != self.manifest.logits_cache_manifest_sha256:
            raise DataError(f"hidden-state cache {str(self.path)!r} was made from another logits cache than "
                            f"{str(logits_cache.path)!r}")
        from safetensors import safe_open

        self._index: dict[int, tuple[str, int, int, int]] = {}  # prompt_index -> (file, start, end, prompt_len)
        for part in self.manifest.parts:
            f = self.path / part.file
            if not f.is_file() or f.stat().st_size != part.bytes:
                raise DataError(f"hidden-state part {str(f)!r} is missing or changed (the manifest says {part.bytes} "
                                "bytes): re-run the command that made it")
            with safe_open(str(f), framework="pt") as h:
                offsets, index, plen = h.get_tensor("offsets"), h.get_tensor("prompt_index"), h.get_tensor("prompt_len")
            for r in range(index.shape[0]):
                self._index[int(index[r])] = (part.file, int(offsets[r]), int(offsets[r + 1]), int(plen[r]))

    @property
    def layer_ids(self) -> tuple[int, ...]:
        return tuple(self.manifest.layer_ids)

    def target_parts(self) -> tuple[Any, dict[str, torch.Tensor]]:
        """(target config, embed / lm_head / norm weights) saved at collection (see the module docstring)."""
        from safetensors.torch import load_file
        from transformers import AutoConfig

        d = json.loads((self.path / TARGET_DIR / "config.json").read_text(encoding="utf-8"))
        config = AutoConfig.for_model(d.pop("model_type"), **d)
        return config, {k: v.float() for k, v in load_file(str(self.path / TARGET_DIR / "parts.safetensors")).items()}

    def batch_features(self, batch) -> torch.Tensor:
        """A CacheBatch's rows -> features [B, L, 3H] float32 aligned with its input_ids (rows
        truncated to max_length keep the slice they kept of prompt + continuation)."""
        from safetensors import safe_open

        b, l = batch.input_ids.shape
        out = torch.zeros(b, l, 3 * self.manifest.hidden_size)
        lengths = batch.attention_mask.sum(-1).tolist()
        kept_t = batch.loss_mask.sum(-1).tolist()
        by_file: dict[str, list[tuple[int, int, int]]] = {}
        for i, pi in enumerate(batch.prompt_index.tolist()):
            if pi not in self._index:
                raise DataError(f"hidden-state cache {str(self.path)!r} has no row for prompt {pi}: it was made "
                                "from another logits cache")
            file, start, end, plen = self._index[pi]
            keep_p = int(lengths[i]) - int(kept_t[i])
            lo = start + plen - keep_p
            by_file.setdefault(file, []).append((i, lo, lo + int(lengths[i])))
        for file, items in by_file.items():
            with safe_open(str(self.path / file), framework="pt") as h:
                feats = h.get_slice("features")
                for i, lo, hi in items:
                    out[i, :hi - lo] = feats[lo:hi].float()
        return out


__all__ = ["HiddenCache", "HiddenManifest", "bytes_per_position", "collect_hidden", "read_hidden_manifest",
           "row_positions"]
