"""`dspark collect`: the target continues each prompt, and its top-K log-probs at every
continuation position go into a logits cache (see `dspark.distill.cache`).

Sequence-level distillation data: the continuation is the TARGET's own (greedy at temperature 0,
otherwise sampled with a generator seeded per prompt id, so a re-run or a resumed run draws the same
tokens whatever the batch composition). One teacher-forced forward over prompt + continuation then
gives the distribution at every continuation position, stored as the log-softmax at temperature 1
("raw", whatever temperature sampled: matching the raw distribution matches every temperature).

Work is split in chunks of `prompts_per_part` prompts; each chunk becomes one atomically written
part file, so a killed run (even SIGKILL) re-run with the same arguments skips the committed chunks
and ends with the same cache as an uninterrupted run. `--shard I/N` takes every N-th prompt
(prompt index % N == I); `merge_caches` joins the N outputs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from dspark.distill.cache import (DATA_DIR, MANIFEST, CacheManifest, CacheRow, Counts, GenerationInfo, PartInfo,
                                  ShardInfo, SourceInfo, StorageInfo, TargetIdentity, bytes_per_position_estimate,
                                  identity_diff, parse_part_name, part_info_from_file, read_manifest,
                                  write_manifest, write_part)
from dspark.errors import DataError, DsparkError

DEFAULT_K = 64
DEFAULT_PROMPTS_PER_PART = 128


# ---------------------------------------------------------------------------------------------
# Target
# ---------------------------------------------------------------------------------------------

@dataclass
class CollectTarget:
    """What collection needs of a target: a loaded HF causal LM (None for engines that load their
    own), its tokenizer, and its identity for the manifest."""

    model: Any
    tokenizer: Any
    identity: TargetIdentity
    tokenizer_hash: str
    device: str = "cpu"
    dtype: str = "float32"
    path: str | None = None  # a folder or hub id an external engine can load

    @property
    def context_length(self) -> int | None:
        cfg = getattr(self.model, "config", None)
        return getattr(cfg, "max_position_embeddings", None) if cfg is not None else None


def safetensors_hash(folder: str | os.PathLike) -> str:
    """sha256 over the folder's *.safetensors files: sha256 of 'name sha256\\n' lines, sorted."""
    from dspark.io import sha256_file

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise DsparkError(f"model folder {str(folder)!r} has no .safetensors files to fingerprint")
    lines = "".join(f"{f.name} {sha256_file(f)}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def parameters_hash(model) -> str:
    """sha256 over an in-memory model's parameters (name, dtype, shape, bytes), in name order."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _hub_revision(local_path: Path | None) -> str | None:
    """The commit of a hub-cache snapshot folder (.../snapshots/<commit>)."""
    if local_path is not None and local_path.parent.name == "snapshots":
        return local_path.name
    return None


def target_from_loaded(loaded) -> CollectTarget:
    """A `dspark.models.LoadedModel` -> CollectTarget (weights fingerprinted: hub snapshots by their
    commit, local and built-in folders by sha256 over their safetensors files)."""
    from dspark.models import tokenizer_hash

    r = loaded.resolved
    revision = _hub_revision(r.local_path)
    weight_hash = None
    if revision is None and r.local_path is not None:
        weight_hash = safetensors_hash(r.local_path)
    ident = TargetIdentity(name=r.name, resolves_to=r.resolves_to, kind=r.kind, weight_hash=weight_hash,
                           revision=revision, vocab_size=int(loaded.vocab_size))
    return CollectTarget(model=loaded.model, tokenizer=loaded.tokenizer, identity=ident,
                         tokenizer_hash=tokenizer_hash(loaded.tokenizer), device=loaded.device,
                         dtype=loaded.dtype, path=str(r.local_path or r.resolves_to))


def target_from_model(model, tokenizer, name: str = "in-memory") -> CollectTarget:
    """An in-memory (model, tokenizer) pair -> CollectTarget, identified by a hash of its
    parameters (used by tests and by callers that build or modify models themselves)."""
    from dspark.models import tokenizer_hash

    model.eval()
    p = next(model.parameters())
    ident = TargetIdentity(name=name, resolves_to=name, kind="memory", weight_hash=parameters_hash(model),
                           vocab_size=int(model.get_input_embeddings().weight.shape[0]))
    return CollectTarget(model=model, tokenizer=tokenizer, identity=ident, tokenizer_hash=tokenizer_hash(tokenizer),
                         device=str(p.device), dtype=str(p.dtype).removeprefix("torch."))


def check_target_available(name: str) -> None:
    """Fail at once (before prompts are read or anything is written) when `name` cannot be loaded
    on this machine: a missing built-in/local folder, or a hub model that is not cached while
    offline. Online, an uncached hub id is left to `load_model` (it may download)."""
    from dspark.models import is_offline, resolve_model
    from dspark.models.loading import not_available_error

    r = resolve_model(name)
    if not r.available and (r.kind in ("builtin", "local") or is_offline()):
        raise not_available_error(r)


def load_target(name: str, device: str = "cpu", dtype: str = "float32", engine: str = "hf") -> CollectTarget:
    """Load a target by name for collection. Engines that load the model themselves (vllm) get
    only the tokenizer and identity here."""
    from dspark.models import load_model, load_tokenizer, resolve_model, tokenizer_hash

    if get_engine_class(engine).loads_model_itself:
        r = resolve_model(name)
        check_target_available(name)
        tok = load_tokenizer(name)
        revision = _hub_revision(r.local_path)
        weight_hash = safetensors_hash(r.local_path) if (revision is None and r.local_path) else None
        vocab = _config_vocab_size(r.local_path) or len(tok)
        ident = TargetIdentity(name=r.name, resolves_to=r.resolves_to, kind=r.kind, weight_hash=weight_hash,
                               revision=revision, vocab_size=vocab)
        return CollectTarget(model=None, tokenizer=tok, identity=ident, tokenizer_hash=tokenizer_hash(tok),
                             device=device, dtype=dtype, path=str(r.local_path or r.resolves_to))
    return target_from_loaded(load_model(name, device=device, dtype=dtype))


def _config_vocab_size(folder: Path | None) -> int | None:
    import json

    if folder is None or not (folder / "config.json").is_file():
        return None
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")


def default_stop_token_ids(target: CollectTarget) -> tuple[int, ...]:
    """EOS ids from the generation config and the tokenizer."""
    ids: set[int] = set()
    gc = getattr(target.model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(e) for e in eos)
    if getattr(target.tokenizer, "eos_token_id", None) is not None:
        ids.add(int(target.tokenizer.eos_token_id))
    return tuple(sorted(ids))


# ---------------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EngineSettings:
    k: int
    max_new_tokens: int
    temperature: float
    stop_token_ids: tuple[int, ...]
    batch_size: int = 8


@dataclass
class Scored:
    """One prompt's result. continuation_ids [T] int32; topk_ids [T, K] int32; topk_logprobs
    [T, K] float32 (sorted descending); tail [T] float32."""

    continuation_ids: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    tail: np.ndarray


@dataclass
class EngineTimes:
    generate_s: float = 0.0
    score_s: float = 0.0


class Engine(Protocol):
    """Generates the target's continuations and scores them: prompts (token ids) + one seed per
    prompt -> one `Scored` per prompt, in order. `times` accumulates seconds spent."""

    name: str
    loads_model_itself: bool
    times: EngineTimes

    def run(self, prompts: Sequence[Sequence[int]], seeds: Sequence[int]) -> list[Scored]: ...


def prompt_seed(seed: int, prompt_id: str) -> int:
    """A per-prompt sampling seed that depends only on the run seed and the prompt id."""
    digest = hashlib.sha256(f"{seed}:{prompt_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def topk_with_tail(logits, k: int):
    """[..., V] logits -> (logprobs [..., K] float32 sorted descending, ids [..., K] int64,
    tail [...] float32 = 1 - sum exp(top-K), accumulated in float64)."""
    import torch

    logprobs = torch.log_softmax(logits.float(), dim=-1)
    values, ids = logprobs.topk(k, dim=-1)
    tail = (1.0 - values.double().exp().sum(-1)).clamp_min(0.0).float()
    return values, ids, tail


class HFEngine:
    """Batched generation and scoring with a transformers model (any device torch supports).

    Generation: prompts left-padded, KV cache, explicit position ids (so padding does not shift
    RoPE positions), greedy argmax or sampling from softmax(logits / T) with one torch.Generator
    per prompt. Scoring: one forward over prompt + continuation (left-padded) keeping only the
    logits of the last T_max + 1 positions (`logits_to_keep`), from which top-K + tail are taken.
    """

    name = "hf"
    loads_model_itself = False

    def __init__(self, target: CollectTarget, settings: EngineSettings):
        if target.model is None:
            raise DsparkError("the hf engine needs a loaded target model")
        self.model = target.model
        self.settings = settings
        self.device = next(self.model.parameters()).device
        tok = target.tokenizer
        self.pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else 0)
        self.times = EngineTimes()

    def _left_pad(self, seqs: Sequence[Sequence[int]]):
        import torch

        L = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), L), dtype=torch.long)
        for i, s in enumerate(seqs):
            if len(s):
                ids[i, L - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
                mask[i, L - len(s):] = 1
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        return ids.to(self.device), mask.to(self.device), pos.to(self.device)

    def _pick(self, logits, generators) -> "Any":
        import torch

        if self.settings.temperature == 0.0:
            return logits.argmax(-1)
        probs = torch.softmax(logits.float() / self.settings.temperature, dim=-1)
        return torch.stack([torch.multinomial(probs[i], 1, generator=g)[0] for i, g in enumerate(generators)])

    def generate(self, prompts: Sequence[Sequence[int]], seeds: Sequence[int]) -> list[list[int]]:
        """Continuations (stop token included), one per prompt."""
        import torch
        from transformers import DynamicCache

        s = self.settings
        b = len(prompts)
        ids, mask, pos = self._left_pad(prompts)
        generators = None
        if s.temperature > 0:
            generators = [torch.Generator(device=self.device).manual_seed(int(seed)) for seed in seeds]
        stop = torch.tensor(sorted(s.stop_token_ids), dtype=torch.long, device=self.device)
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                         logits_to_keep=1)
        logits = out.logits[:, -1]
        last_pos = pos[:, -1]
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        gens: list[list[int]] = [[] for _ in range(b)]
        for step in range(s.max_new_tokens):
            nxt = self._pick(logits, generators)
            for i in (~done).nonzero().flatten().tolist():
                gens[i].append(int(nxt[i]))
            if stop.numel():
                done |= torch.isin(nxt, stop)
            if bool(done.all()) or step == s.max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=self.device)], dim=1)
            last_pos = last_pos + 1
            out = self.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last_pos[:, None],
                             cache=cache, use_cache=True)
            logits = out.logits[:, -1]
        return gens

    def score(self, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]) -> list[Scored]:
        """Top-K + tail of the target at every continuation position (one forward)."""
        seqs = [list(p) + list(c) for p, c in zip(prompts, continuations)]
        ids, mask, pos = self._left_pad(seqs)
        t_max = max(len(c) for c in continuations)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                         logits_to_keep=t_max + 1)
        # Left padding right-aligns every sequence: continuation token t of row b (length T_b) is
        # predicted by window position T_max - T_b + t; the last window position predicts nothing.
        values, top_ids, tail = topk_with_tail(out.logits[:, :-1], self.settings.k)
        values, top_ids, tail = values.cpu().numpy(), top_ids.cpu().numpy(), tail.cpu().numpy()
        res = []
        for i, c in enumerate(continuations):
            lo = t_max - len(c)
            res.append(Scored(continuation_ids=np.asarray(c, dtype=np.int32),
                              topk_ids=top_ids[i, lo:].astype(np.int32), topk_logprobs=values[i, lo:],
                              tail=tail[i, lo:]))
        return res

    def run(self, prompts: Sequence[Sequence[int]], seeds: Sequence[int]) -> list[Scored]:
        import torch

        with torch.inference_mode():
            t0 = time.perf_counter()
            conts = self.generate(prompts, seeds)
            t1 = time.perf_counter()
            scored = self.score(prompts, conts)
            t2 = time.perf_counter()
        self.times.generate_s += t1 - t0
        self.times.score_s += t2 - t1
        return scored


class VLLMEngine:
    """Generation and scoring with vLLM: the scale-out path for large targets (e.g. 70B with tensor
    parallelism on a GPU node). NOT TESTED in dspark's test suite: vLLM needs a CUDA GPU and is
    not installed on the development machines; selecting it without vllm importable is a
    DsparkError.

    How it maps onto the same contract as the hf engine:
    - `vllm.LLM(model=path, dtype=..., seed=..., max_logprobs=K, tensor_parallel_size=
      $DSPARK_VLLM_TP or 1)` loads the target itself (so `collect` only loads the tokenizer).
    - Generation: `SamplingParams(temperature=T, max_tokens=..., seed=prompt_seed(...),
      stop_token_ids=...)` per prompt (temperature 0 is greedy); prompts are passed as token ids
      (`TokensPrompt`), the stop token is kept in the continuation like the hf engine does.
    - Scoring: a second request over prompt + continuation with `prompt_logprobs=K` and
      `max_tokens=1`. vLLM returns, for every prompt position j >= 1, the top-K tokens of the
      distribution predicting token j (plus the actual token when it is outside the top-K, which
      is dropped here). These are log-softmax of the raw logits (vLLM's default logprobs mode,
      before temperature), the same "raw" distribution the hf engine stores. The tail is
      1 - sum exp(top-K).
    Numbers differ from the hf engine at the level of kernel numerics (bf16 attention, batching),
    so a cache records its engine and a resume must use the same one.
    """

    name = "vllm"
    loads_model_itself = True

    def __init__(self, target: CollectTarget, settings: EngineSettings, seed: int = 0):
        require_vllm()
        from vllm import LLM

        if target.path is None:
            raise DsparkError("the vllm engine needs the target's folder or hub id")
        self.settings = settings
        self.times = EngineTimes()
        tp = int(os.environ.get("DSPARK_VLLM_TP", "1"))
        dtype = "auto" if target.dtype in ("auto", None) else target.dtype
        self.llm = LLM(model=target.path, dtype=dtype, seed=seed, max_logprobs=max(settings.k, 1),
                       tensor_parallel_size=tp)

    def run(self, prompts: Sequence[Sequence[int]], seeds: Sequence[int]) -> list[Scored]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        s = self.settings
        t0 = time.perf_counter()
        gen_params = [SamplingParams(temperature=s.temperature, max_tokens=s.max_new_tokens, seed=int(seed),
                                     stop_token_ids=list(s.stop_token_ids)) for seed in seeds]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], gen_params,
                                 use_tqdm=False)
        conts = [list(o.outputs[0].token_ids) for o in outs]
        t1 = time.perf_counter()
        score_params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=s.k)
        scored_outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p) + c) for p, c in zip(prompts, conts)],
                                        score_params, use_tqdm=False)
        res = []
        for p, c, o in zip(prompts, conts, scored_outs):
            ids = np.zeros((len(c), s.k), dtype=np.int32)
            lps = np.full((len(c), s.k), -np.inf, dtype=np.float32)
            for t in range(len(c)):
                entry = o.prompt_logprobs[len(p) + t]  # dict token id -> Logprob, predicting token len(p)+t
                best = sorted(entry.items(), key=lambda kv: kv[1].logprob, reverse=True)[: s.k]
                for j, (tid, lp) in enumerate(best):
                    ids[t, j], lps[t, j] = tid, lp.logprob
            tail = np.clip(1.0 - np.exp(lps.astype(np.float64)).sum(-1), 0.0, None).astype(np.float32)
            res.append(Scored(np.asarray(c, dtype=np.int32), ids, lps, tail))
        self.times.generate_s += t1 - t0
        self.times.score_s += time.perf_counter() - t1
        return res


ENGINES: dict[str, type] = {"hf": HFEngine, "vllm": VLLMEngine}


def require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise DsparkError("engine 'vllm' needs the vllm package, which is not installed here (install it on a "
                          "CUDA machine: pip install vllm); use --engine hf (valid engines: "
                          f"{', '.join(ENGINES)})")


def get_engine_class(name: str) -> type:
    try:
        cls = ENGINES[name]
    except KeyError:
        raise DsparkError(f"unknown engine {name!r} (valid engines: {', '.join(ENGINES)})") from None
    if name == "vllm":
        require_vllm()
    return cls


def make_engine(name: str, target: CollectTarget, settings: EngineSettings, seed: int = 0) -> Engine:
    cls = get_engine_class(name)
    if cls is VLLMEngine:
        return VLLMEngine(target, settings, seed=seed)
    return cls(target, settings)


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EncodedPrompt:
    index: int  # position in the full resolved list (all shards)
    id: str
    text: str
    ids: tuple[int, ...]


def encode_prompts(prompts: Sequence[Any], tokenizer) -> list[EncodedPrompt]:
    """PromptRecords -> token ids. Chat-templated text already carries its special tokens."""
    out = []
    seen: set[str] = set()
    for i, rec in enumerate(prompts):
        if rec.id in seen:
            raise DataError(f"prompt id {rec.id!r} appears twice: prompt ids must be unique")
        seen.add(rec.id)
        text = rec.render(tokenizer)
        templated = rec.messages is not None and bool(getattr(tokenizer, "chat_template", None))
        ids = tokenizer(text, add_special_tokens=not templated)["input_ids"]
        if not ids:
            raise DataError(f"prompt {rec.id!r} is empty after tokenization")
        out.append(EncodedPrompt(i, rec.id, text, tuple(int(x) for x in ids)))
    return out


def prompts_sha256(encoded: Sequence[EncodedPrompt]) -> str:
    h = hashlib.sha256()
    for p in encoded:
        h.update(f"{len(p.id)}:{p.id}{len(p.text)}:{p.text}".encode("utf-8"))
    return h.hexdigest()


def parse_shard(text: str | tuple[int, int] | None) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N."""
    if text is None:
        return (0, 1)
    if isinstance(text, tuple):
        i, n = text
    else:
        try:
            a, b = str(text).split("/")
            i, n = int(a), int(b)
        except ValueError:
            raise DsparkError(f"bad shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise DsparkError(f"bad shard {i}/{n}: expected I/N with 0 <= I < N, e.g. 0/4")
    return int(i), int(n)


def shard_prompts(encoded: Sequence[EncodedPrompt], shard: tuple[int, int]) -> list[EncodedPrompt]:
    i, n = shard
    return [p for p in encoded if p.index % n == i]


# ---------------------------------------------------------------------------------------------
# Collection
# ---------------------------------------------------------------------------------------------

@dataclass
class CollectResult:
    out: str
    status: str  # "collected" | "resumed" | "already-complete"
    manifest: CacheManifest
    chunks_total: int = 0
    chunks_done_before: int = 0
    new_rows: int = 0
    new_positions: int = 0
    truncated_prompts: int = 0
    generate_s: float = 0.0
    score_s: float = 0.0
    write_s: float = 0.0
    total_s: float = 0.0
    storage_estimate_bytes: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.new_positions / self.total_s if self.total_s > 0 else 0.0

    @property
    def write_fraction(self) -> float:
        return self.write_s / self.total_s if self.total_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        c = self.manifest.counts
        return {"out": self.out, "status": self.status, "rows": c.rows if c else 0,
                "positions": c.positions if c else 0, "bytes": c.bytes if c else 0,
                "bytes_per_position": self.manifest.bytes_per_position,
                "storage_estimate_bytes": self.storage_estimate_bytes,
                "chunks_total": self.chunks_total, "chunks_done_before": self.chunks_done_before,
                "new_rows": self.new_rows, "new_positions": self.new_positions,
                "truncated_prompts": self.truncated_prompts,
                "seconds": {"generate": round(self.generate_s, 3), "score": round(self.score_s, 3),
                            "write": round(self.write_s, 3), "total": round(self.total_s, 3)},
                "tokens_per_s": round(self.tokens_per_s, 1), "write_fraction": round(self.write_fraction, 4),
                "target": self.manifest.target.name, "k": self.manifest.generation.k,
                "shards": self.manifest.shards.model_dump()}


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def _clean_temp_files(data_dir: Path) -> None:
    """Remove temp files a killed writer left (dspark.io names them '.<name>.<random>.tmp')."""
    for f in data_dir.glob(".*.tmp"):
        try:
            f.unlink()
        except FileNotFoundError:
            pass


def _existing_parts(out: Path, shard: tuple[int, int], chunks: list[list[EncodedPrompt]]) -> dict[int, PartInfo]:
    data_dir = out / DATA_DIR
    _clean_temp_files(data_dir)
    done: dict[int, PartInfo] = {}
    for f in sorted(data_dir.glob("*.parquet")):
        parsed = parse_part_name(f.name)
        if parsed is None or (parsed[0], parsed[1]) != shard:
            raise DataError(f"unexpected file {str(f)!r} in the cache's data folder (shard {shard[0]}/{shard[1]})")
        info = part_info_from_file(out, f"{DATA_DIR}/{f.name}")
        chunk = parsed[2]
        if chunk >= len(chunks) or info.rows != len(chunks[chunk]):
            raise DataError(f"cache part {str(f)!r} does not match this run's prompts ({info.rows} rows): delete it "
                            "and re-run")
        done[chunk] = info
    return done


def _fit_prompt(ids: tuple[int, ...], context: int | None, max_new_tokens: int) -> tuple[tuple[int, ...], bool]:
    """Keep the last `context - max_new_tokens` prompt tokens when the whole would not fit."""
    if context is None or len(ids) + max_new_tokens <= context:
        return ids, False
    return ids[len(ids) - (context - max_new_tokens):], True


def validate_args(*, k: int, max_new_tokens: int, temperature: float, batch_size: int,
                  shard: tuple[int, int] | str | None, engine: str, prompts_per_part: int = DEFAULT_PROMPTS_PER_PART
                  ) -> tuple[int, int]:
    """Check every option that needs no model or data (so bad input fails before any work);
    returns the parsed shard."""
    if k < 1:
        raise DsparkError(f"--top-k must be >= 1, got {k}")
    if max_new_tokens < 1:
        raise DsparkError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or temperature != temperature:
        raise DsparkError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if batch_size < 1:
        raise DsparkError(f"--batch-size must be >= 1, got {batch_size}")
    if prompts_per_part < 1:
        raise DsparkError(f"prompts_per_part must be >= 1, got {prompts_per_part}")
    get_engine_class(engine)
    return parse_shard(shard)


ProgressFn = Callable[[int, int, int], None]  # (prompts done, prompts total, positions done)


def collect(target: CollectTarget, prompts: Sequence[Any], out: str | os.PathLike, *, k: int = DEFAULT_K,
            max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0, batch_size: int = 8,
            shard: tuple[int, int] | str | None = None, engine: str = "hf",
            stop_token_ids: Sequence[int] | None = None, prompts_per_part: int = DEFAULT_PROMPTS_PER_PART,
            compression: str = "zstd", task: str | None = None, data: str | None = None,
            source_description: str | None = None, split: str = "train", num_prompts: int | None = None,
            progress: ProgressFn | None = None, log: Callable[[str], None] | None = None) -> CollectResult:
    """Collect (or resume collecting) a logits cache into `out`. See the module docstring.

    `prompts` are the resolved PromptRecords of ALL shards (the shard is taken here, so every
    shard run agrees on the list and its hash). Returns what was done, with timings.
    """
    from dspark import __version__

    import pyarrow as pa
    import pyarrow.parquet  # noqa: F401

    # pyarrow imports pandas on its first array conversion (~1 s here): a once-per-process cost,
    # paid before the clock starts so the reported write time measures writing parts.
    pa.array([0], type=pa.int32())
    t_start = time.perf_counter()
    log = log or (lambda _msg: None)
    shard = validate_args(k=k, max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size,
                          shard=shard, engine=engine, prompts_per_part=prompts_per_part)
    vocab = target.identity.vocab_size
    if k > vocab:
        raise DsparkError(f"--top-k {k} is larger than the target's vocabulary ({vocab} ids)")
    context = target.context_length
    if context is not None and context <= max_new_tokens:
        raise DsparkError(f"--max-new-tokens {max_new_tokens} does not fit the target's context of {context} tokens")
    if not prompts:
        raise DataError("no prompts to collect from: the task or data source is empty")


    encoded = encode_prompts(prompts, target.tokenizer)
    mine = shard_prompts(encoded, shard)
    chunks = [mine[i:i + prompts_per_part] for i in range(0, len(mine), prompts_per_part)]
    stops = tuple(sorted(set(int(x) for x in (stop_token_ids if stop_token_ids is not None
                                               else default_stop_token_ids(target)))))
    manifest = CacheManifest(
        created_by=f"dspark {__version__}", status="collecting", target=target.identity,
        tokenizer_hash=target.tokenizer_hash,
        source=SourceInfo(task=task, data=data, description=source_description or (task or data or "prompts"),
                          split=split, num_prompts=num_prompts, total_prompts=len(encoded),
                          prompts_sha256=prompts_sha256(encoded)),
        generation=GenerationInfo(engine=engine, k=k, temperature=float(temperature), max_new_tokens=max_new_tokens,
                                  seed=seed, stop_token_ids=list(stops), dtype=target.dtype),
        storage=StorageInfo(compression=compression, prompts_per_part=prompts_per_part),
        shards=ShardInfo(count=shard[1], indices=[shard[0]]))

    out = Path(out)
    status = "collected"
    if (out / MANIFEST).is_file():
        old = read_manifest(out)
        diff = identity_diff(old.identity(), manifest.identity())
        old_shard = "+".join(map(str, old.shards.indices)) + f"/{old.shards.count}"
        if old_shard != f"{shard[0]}/{shard[1]}":
            diff = [("shard", old_shard, f"{shard[0]}/{shard[1]}")] + [d for d in diff if d[0] != "shards.count"]
        if diff:
            shown = "; ".join(f"{key}: cache has {a!r}, this run {b!r}" for key, a, b in diff[:3])
            raise DataError(f"{str(out)!r} holds a cache made with different arguments ({shown}): re-run with the "
                            "same arguments to resume, or choose another --out")
        if old.status == "complete":
            log(f"{out}: already complete ({old.counts.rows if old.counts else 0} rows), nothing to do")
            return CollectResult(out=str(out), status="already-complete", manifest=old, chunks_total=len(chunks),
                                 chunks_done_before=len(chunks), total_s=time.perf_counter() - t_start)
        status = "resumed"
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DsparkError(f"--out {str(out)!r} exists and is not a logits cache: choose a new or empty folder")
    (out / DATA_DIR).mkdir(parents=True, exist_ok=True)
    write_manifest(out, manifest)

    done = _existing_parts(out, shard, chunks)
    todo = [c for c in range(len(chunks)) if c not in done]
    bpp = bytes_per_position_estimate(k)
    remaining_prompts = sum(len(chunks[c]) for c in todo)
    estimate = remaining_prompts * max_new_tokens * bpp
    log(f"storage estimate: up to {human_bytes(estimate)} ({remaining_prompts:,} prompts x <= {max_new_tokens} "
        f"positions x {bpp} B/position before compression)"
        + (f"; resuming: {len(done)} of {len(chunks)} parts already written" if done else ""))

    settings = EngineSettings(k=k, max_new_tokens=max_new_tokens, temperature=float(temperature),
                              stop_token_ids=stops, batch_size=batch_size)
    eng = make_engine(engine, target, settings, seed=seed) if todo else None
    result = CollectResult(out=str(out), status=status, manifest=manifest, chunks_total=len(chunks),
                           chunks_done_before=len(done), storage_estimate_bytes=estimate)
    prompts_done = sum(len(chunks[c]) for c in done)
    if progress:
        progress(prompts_done, len(mine), 0)
    for c in todo:
        chunk = chunks[c]
        fitted = []
        for p in chunk:
            ids, cut = _fit_prompt(p.ids, context, max_new_tokens)
            fitted.append(ids)
            result.truncated_prompts += int(cut)
        seeds = [prompt_seed(seed, p.id) for p in chunk]
        # Batches of similar length waste less padding; the order depends only on the chunk, so
        # a resumed run forms exactly the same batches.
        order = sorted(range(len(chunk)), key=lambda i: (len(fitted[i]), i))
        scored: dict[int, Scored] = {}
        for s in range(0, len(order), batch_size):
            sel = order[s:s + batch_size]
            for i, sc in zip(sel, eng.run([fitted[i] for i in sel], [seeds[i] for i in sel])):
                scored[i] = sc
            result.new_positions += sum(scored[i].continuation_ids.shape[0] for i in sel)
            if progress:
                progress(prompts_done + len(scored), len(mine), result.new_positions)
        rows = [CacheRow(prompt_index=p.index, prompt_id=p.id, prompt_ids=np.asarray(fitted[i], dtype=np.int32),
                         continuation_ids=scored[i].continuation_ids, topk_ids=scored[i].topk_ids,
                         topk_logprobs=scored[i].topk_logprobs.astype(np.float16), tail=scored[i].tail)
                for i, p in enumerate(chunk)]
        tw = time.perf_counter()
        done[c] = write_part(out, shard[0], shard[1], c, rows, compression=compression)
        result.write_s += time.perf_counter() - tw
        result.new_rows += len(rows)
        prompts_done += len(chunk)

    parts = [done[c] for c in range(len(chunks))]
    counts = Counts(prompts=len(mine), rows=sum(p.rows for p in parts), positions=sum(p.positions for p in parts),
                    bytes=sum(p.bytes for p in parts))
    manifest = manifest.model_copy(update={"status": "complete", "parts": parts, "counts": counts,
                                           "bytes_per_position": (counts.bytes / counts.positions)
                                           if counts.positions else None})
    tw = time.perf_counter()
    write_manifest(out, manifest)
    result.write_s += time.perf_counter() - tw
    result.manifest = manifest
    if eng is not None:
        result.generate_s, result.score_s = eng.times.generate_s, eng.times.score_s
    result.total_s = time.perf_counter() - t_start
    return result


class RichProgress:
    """A rich progress bar over prompts with tokens/s (continuation positions per second)."""

    def __init__(self, console=None, description: str = "collect"):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("prompts"), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                                  TimeRemainingColumn(), console=console, transient=False)
        self._description = description
        self._task = None
        self._t0 = 0.0
        self._positions0 = 0

    def __enter__(self) -> "RichProgress":
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def __call__(self, done: int, total: int, positions: int) -> None:
        if self._task is None:
            self._task = self._progress.add_task(self._description, total=total, completed=done, rate="")
            self._t0 = time.perf_counter()
            return
        elapsed = time.perf_counter() - self._t0
        rate = f"{positions / elapsed:,.0f} tok/s" if elapsed > 0 else ""
        self._progress.update(self._task, completed=done, rate=rate)


def run_collect(target: str, out: str | os.PathLike, *, task: str | None = None, data: str | None = None,
                num_prompts: int | None = None, split: str = "train", k: int = DEFAULT_K, max_new_tokens: int = 128,
                temperature: float = 0.0, seed: int = 0, batch_size: int = 8, shard: str | None = None,
                device: str = "auto", dtype: str = "auto", engine: str = "hf",
                prompts_per_part: int = DEFAULT_PROMPTS_PER_PART, console=None, show_progress: bool = True,
                log: Callable[[str], None] | None = None) -> CollectResult:
    """What `dspark collect` does, in the order that makes bad input fail before any work: the
    options, then whether the target exists here (offline `llama3-70b` fails at once), then the
    prompts, then loading the target, then collection with a progress bar."""
    from dspark.io import check_out_folder
    from dspark.tasks import resolve_source, source_prompts

    check_out_folder(out, "the logits cache")
    shard_t = validate_args(k=k, max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size,
                            shard=shard, engine=engine, prompts_per_part=prompts_per_part)
    check_target_available(target)
    source = resolve_source(task, data)
    prompts = source_prompts(source, split, num_prompts)
    tgt = load_target(target, device=device, dtype=dtype, engine=engine)
    if data is not None and Path(data).exists():
        data = str(Path(data).resolve())  # the same file from another working directory is the same source
    kwargs = dict(k=k, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, batch_size=batch_size,
                  shard=shard_t, engine=engine, prompts_per_part=prompts_per_part, task=task, data=data,
                  source_description=source.describe_source(), split=split, num_prompts=num_prompts, log=log)
    if not show_progress:
        return collect(tgt, prompts, out, **kwargs)
    with RichProgress(console=console, description=f"collect {tgt.identity.name}") as bar:
        return collect(tgt, prompts, out, progress=bar, **kwargs)


__all__ = ["CollectResult", "CollectTarget", "ENGINES", "Engine", "EngineSettings", "HFEngine", "Scored",
           "VLLMEngine", "check_target_available", "collect", "default_stop_token_ids", "encode_prompts",
           "get_engine_class", "load_target", "make_engine", "parse_shard", "prompt_seed", "run_collect",
           "validate_args", "shard_prompts",
           "target_from_loaded", "target_from_model", "topk_with_tail"]
