"""The speculative decoding loop: draft, verify, roll back, record, ask the policy, repeat.

Pieces (each replaceable on its own): `verify.py` (pure accept/reject maths), `sampling.py` (warping),
`policy.py` (how many tokens to draft), `constraints.py` (the structured-output hook), `types.py`
(settings, stats, results and the terms drafted / accepted / recovered / bonus). This module owns
the models' KV caches and the batch bookkeeping.

One step for a batch of B active requests (row i has committed tokens s_i = prompt + generated):
1. Plan: each row's policy says how many drafts it wants (k_i, capped so that a step can never
   overshoot max_new_tokens or the context); the batch drafts K = max_i k_i tokens for every row.
   When every row of a batch (B >= 2) is adaptive, the decoder's `BatchPlanner` picks K instead,
   for the batch's tokens per second (policy.py); each row's early exits still apply.
2. Draft: K draft forwards (the first one also feeds the row's not-yet-cached tokens). Drafting
   stops once every row has reached its k_i or exited early (low confidence / low predicted
   acceptance, a drafted stop token, a finished constraint). Every unconstrained row whose plan
   allows it (`DraftPlan.take_extra`: adaptive policies; a static K verifies exactly K) then
   verifies all K drafts computed for it (within its length limits): the batch pays for K drafts
   and a K + 1 verify width for every row anyway, so the extra drafts cost nothing and add tokens
   when accepted. A constrained row verifies only the drafts it made under its grammar.
3. Verify: one target forward over [last committed token, d_1..d_K] gives K + 1 distributions;
   `verify_greedy` / `verify_sampling` return each row's accepted count n_i (of the drafts it
   verifies) and the recovered-or-bonus token. Verification is exact whatever was drafted, so
   batching never changes a greedy output (how many tokens a step yields may differ).
4. Commit, truncating at a stop token; roll both caches back; finished rows leave the batch.

Forwards: Llama-family models (llama, mistral, qwen2) run through `fastpath.LeanLlama` (the model's
own weights, never copied; preallocated KV buffers, precomputed rotary tables: the same function as
the HF forward with far less per-call overhead, which dominates small models); other models through
their HF forward with the base model and lm_head called separately (logits only where needed).

KV caches: one cache per model (the lean KVBuffer, or a transformers `DynamicCache`), holding every
row. Rows accept different numbers of tokens, so the cache is a sequence of *slots* shared by all
rows, and each row marks which slots hold its tokens (`_Slots.valid`). Rejected drafts of a row
become masked holes; the slots at the end that no row uses any more are cropped (`crop(-n)`).
Prompts of different lengths are left padded the same way (holes at the start). Each row carries its
own position ids (its count of valid tokens), and every forward gets an explicit 4-D attention mask
[B, 1, T, S]: key slot valid for the row AND causal in slot order. Holes cost a little attention
width, never a recomputation: the prefix is never fed twice. At B = 1 there are no holes at all. A
padding query attends to itself only (an all-masked softmax row would give NaN and poison its slot).
(The alternative, cropping every row to the batch's smallest accepted length and re-feeding the
others' surplus tokens, recomputes tokens every step and still needs padding masks.)

Invariants per row: the target has cached every committed token but the last one (the "pending"
token fed at the start of the next verify); the draft has cached a prefix of the committed tokens
and catches up by feeding the rest with its first draft forward.

Vocabulary: both models' logits are sliced to `common_vocab_size` (tokenizer length or the smaller
embedding size; see verify.py). Without a draft model the same loop runs with K = 0: target-only
decoding, one token per target forward (mean accepted tokens 1.0).

Stats (per request, `DecodeStats`): drafted / accepted count only the positions the output used:
if a stop token is accepted mid-block, the drafts after it are neither drafted nor accepted, so
accepted + recovered + bonus == generated always. Forward counts and times are those of the batch
forwards the request took part in (shared by its rows); total_time_s is the request's wall time from
the start of its batch to its last token (batch throughput = sum of generated / the generate call's
wall time). Forward times are measured with torch.cuda.synchronize on CUDA.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from dspark.decode.acceptance_head import AcceptanceHead, has_acceptance_head, load_acceptance_head
from dspark.decode.constraints import TokenConstraint, fit_mask
from dspark.decode.fastpath import KV_CAPACITY, KVBuffer, LeanLlama
from dspark.decode.fastpath import supports as fastpath_supports
from dspark.decode.policy import BatchPlanner, DraftLengthPolicy, DraftPlan, PolicyContext, PolicyFactory, StepFeedback
from dspark.decode.requests import (check_constraints, check_prompts, checked_policy_factory, collect_results,
                                    make_policies, per_prompt_configs, resolve_stop_ids, stop_ids_for, timed_call)
from dspark.decode.sampling import make_generator, warp_logits
from dspark.decode.types import DecodeResult, DecodeStats, GenerationConfig, commit_step
from dspark.decode.verify import check_same_tokenizer, common_vocab_size, verify_greedy, verify_sampling
from dspark.errors import DsparkError

OnTokens = Callable[[int, list[int]], None]


@dataclass
class TokenEvent:
    """One streamed update: `row` (index into the prompts passed in) got `token_ids` appended;
    `result` is set on the request's last event. `stats`: the request's DecodeStats so far (a live
    object the decoder keeps updating: copy it to keep a snapshot)."""

    row: int
    token_ids: list[int]
    result: DecodeResult | None = None
    stats: DecodeStats | None = None


class _Runner:
    """One model's per-step call: the lean Llama-family forward (fastpath.py) when the model has that
    structure, else the HF forward with the base model and lm_head called separately, so logits are
    only computed for the positions that need them."""

    def __init__(self, model: torch.nn.Module, role: str, lean: bool = True):
        self.model = model
        self.role = role
        cfg = model.config
        self.config = cfg
        base = model.get_decoder() if hasattr(model, "get_decoder") else None
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.split = base is not None and head is not None and base is not model
        self.base, self.head = base, head
        self.vocab = int(getattr(head, "out_features", 0) or cfg.vocab_size)
        self.max_positions = getattr(cfg, "max_position_embeddings", None) or 1 << 30
        self.hidden_size = getattr(cfg, "hidden_size", None)
        self.lean = LeanLlama(model) if lean and fastpath_supports(model) else None
        attn = getattr(cfg, "_attn_implementation", None) or "sdpa"
        if self.lean is None and attn not in ("sdpa", "eager"):
            raise DsparkError(f"{role} model uses attention implementation {attn!r}; the speculative decoder "
                              "supports 'sdpa' and 'eager' (load it with attn_implementation='sdpa')")
        self.additive_mask = attn == "eager" and self.lean is None
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device

    def new_cache(self, batch: int, capacity: int = KV_CAPACITY):
        """An empty KV cache for `batch` rows (`capacity`: the lean buffer's first size, in slots)."""
        if self.lean is not None:
            return self.lean.new_cache(batch, capacity)
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        cache = DynamicCache(config=self.config)
        if any(type(layer) is not DynamicLayer for layer in cache.layers):
            kinds = sorted({type(layer).__name__ for layer in cache.layers})
            raise DsparkError(f"{self.role} model has cache layers {kinds}; the speculative decoder supports "
                              "full-attention models (DynamicLayer) only")
        return cache

    @staticmethod
    def crop(cache, new_length: int, old_length: int) -> None:
        if isinstance(cache, KVBuffer):
            cache.crop(new_length)
        else:
            cache.crop(new_length - old_length)  # transformers 5: a negative count drops that many slots

    @staticmethod
    def select(cache, idx: torch.Tensor) -> None:
        if isinstance(cache, KVBuffer):
            cache.select(idx)
        else:
            cache.batch_select_indices(idx)

    @staticmethod
    def layers_kv(cache, length: int) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Per layer (keys, values) [B, kv_heads, length, head_dim], or None for an empty layer."""
        if isinstance(cache, KVBuffer):
            return [(k[:, :, :length], v[:, :, :length]) for k, v in zip(cache.k, cache.v)]
        out = []
        for layer in cache.layers:
            ok = layer.is_initialized and layer.keys is not None and layer.keys.numel() > 0
            out.append((layer.keys, layer.values) if ok else None)
        return out

    @staticmethod
    def set_layers_kv(cache, kv: list[tuple[torch.Tensor, torch.Tensor] | None], batch: int, length: int) -> None:
        """Replace the cache's contents: kv per layer as returned by `layers_kv` (None: nothing cached)."""
        if isinstance(cache, KVBuffer):
            cap = max(length, cache.capacity)
            for i, (k, v) in enumerate(zip(cache.k, cache.v)):
                nk = k.new_zeros(batch, k.shape[1], cap, k.shape[3])
                nv = v.new_zeros(batch, v.shape[1], cap, v.shape[3])
                if kv[i] is not None:
                    nk[:, :, :length] = kv[i][0]
                    nv[:, :, :length] = kv[i][1]
                cache.k[i], cache.v[i] = nk, nv
            cache.length = length
            return
        for layer, item in zip(cache.layers, kv):
            if item is None:
                if layer.is_initialized:
                    layer.reset()  # nothing cached: the next update starts over at the right batch size
                continue
            if not layer.is_initialized:
                layer.lazy_initialization(*item)
            layer.keys, layer.values = item

    def __call__(self, ids, pos, mask, cache, n_logits: int, want_hidden: bool):
        """ids, pos: [B, T] long; mask: bool [B, 1, T, S] or None (attend to every slot: only for one-token
        steps without holes) -> (logits [B, n_logits, V] or None, final hidden [B, H] or None)."""
        if self.lean is not None:
            return self.lean(ids, pos, mask, cache, n_logits, want_hidden)
        if self.additive_mask and mask is not None:
            mask = torch.zeros(mask.shape, dtype=self.dtype, device=mask.device).masked_fill_(
                ~mask, torch.finfo(self.dtype).min)
        if self.split:
            h = self.base(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache,
                          use_cache=True).last_hidden_state
            logits = self.head(h[:, -n_logits:]) if n_logits else None
            return logits, (h[:, -1] if want_hidden else None)
        if want_hidden:
            raise DsparkError(f"{self.role} model exposes no base model / lm_head split (get_decoder, "
                              "get_output_embeddings); an acceptance head needs its hidden states")
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                         logits_to_keep=max(n_logits, 1))
        return (out.logits[:, -n_logits:] if n_logits else None), None


class _Slots:
    """A model's batched KV cache plus which cache slot holds which row's token (see module docstring)."""

    def __init__(self, runner: _Runner, batch: int, capacity: int = KV_CAPACITY):
        self.runner = runner
        self.cache = runner.new_cache(batch, capacity)
        self.device = runner.device
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=self.device)
        self.length = 0  # slots in the cache
        self.pos: list[int] = [0] * batch  # valid tokens per row (= next position id)
        self.holes = False  # some slot below `length` is invalid for some row
        self._tri: dict[int, torch.Tensor] = {}

    def _ensure(self, slots: int) -> None:
        if slots > self.valid.shape[1]:
            grown = torch.zeros(self.valid.shape[0], max(slots, 2 * self.valid.shape[1]), dtype=torch.bool,
                                device=self.device)
            grown[:, : self.length] = self.valid[:, : self.length]
            self.valid = grown

    def _causal(self, t: int) -> torch.Tensor:
        m = self._tri.get(t)
        if m is None:
            m = self._tri[t] = torch.ones(t, t, dtype=torch.bool, device=self.device).tril()
        return m

    def feed(self, chunks: list[list[int]], n_logits: int, want_hidden: bool):
        """Append one chunk of tokens per row (right-aligned, shorter rows padded with holes) and run
        the model. Returns the runner's (logits [B, n_logits, V], hidden [B, H])."""
        t = max(len(c) for c in chunks)
        ids, pos, real = [], [], []
        padded = False
        for i, c in enumerate(chunks):
            n, p0 = len(c), self.pos[i]
            pad = t - n
            padded = padded or pad > 0
            ids.append([0] * pad + list(c))
            pos.append([0] * pad + list(range(p0, p0 + n)))
            real.append([False] * pad + [True] * n)
            self.pos[i] = p0 + n
        dev = self.device
        ids_t = torch.tensor(ids, dtype=torch.long, device=dev)
        pos_t = torch.tensor(pos, dtype=torch.long, device=dev)
        real_t = torch.tensor(real, dtype=torch.bool, device=dev) if padded else None
        return self._run(ids_t, pos_t, real_t, t, n_logits, want_hidden)

    def feed_tensor(self, ids: torch.Tensor, n_logits: int, want_hidden: bool):
        """Append ids [B, T] (all real tokens) and run the model (the hot path: no Python per row)."""
        t = ids.shape[1]
        if len(self.pos) == 1:
            pos = torch.arange(self.pos[0], self.pos[0] + t, device=self.device)[None]
        else:
            pos = torch.tensor(self.pos, dtype=torch.long, device=self.device)[:, None] + \
                torch.arange(t, device=self.device)
        self.pos = [p + t for p in self.pos]
        return self._run(ids, pos, None, t, n_logits, want_hidden)

    def _run(self, ids, pos, real, t, n_logits, want_hidden):
        s0 = self.length
        s = s0 + t
        self._ensure(s)
        if real is None:
            self.valid[:, s0:s] = True
        else:
            self.valid[:, s0:s] = real
            self.holes = True
        if t == 1 and not self.holes:
            mask = None  # one query that may see every slot: no mask needed
        else:
            mask = self.valid[:, None, :s].expand(-1, t, -1).clone()
            new = mask[:, :, s0:]
            new &= self._causal(t)
            # a padding query attends to itself only (an all-masked row would give NaN and poison its slot)
            new |= torch.eye(t, dtype=torch.bool, device=self.device)
            mask = mask[:, None]
        self.length = s
        return self.runner(ids, pos, mask, self.cache, n_logits, want_hidden)

    def keep(self, new_pos: list[int]) -> None:
        """Roll rows back: row i keeps only its first new_pos[i] valid tokens; drop slots no row uses."""
        if new_pos == self.pos:
            return
        n = self.length
        if len(new_pos) == 1 and not self.holes:
            new_len = new_pos[0]  # one row without holes: slot index == position
        else:
            v = self.valid[:, :n]
            limit = torch.tensor(new_pos, dtype=torch.int32, device=self.device)[:, None]
            v &= v.to(torch.int32).cumsum(dim=1) <= limit
            used = v.any(dim=0).nonzero()
            new_len = int(used[-1].item()) + 1 if used.numel() else 0
            self.holes = not bool(v[:, :new_len].all())
        self.pos = list(new_pos)
        if new_len < n:
            self.runner.crop(self.cache, new_len, n)
            self.valid[:, new_len:n] = False
            self.length = new_len

    def select(self, rows: list[int]) -> None:
        """Keep only these batch rows (finished requests leave the batch), then drop the leading slots
        no remaining row uses (the prompts of rows that left)."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.runner.select(self.cache, idx)
        self.valid = self.valid.index_select(0, idx)
        self.pos = [self.pos[r] for r in rows]
        used = self.valid[:, : self.length].any(dim=0).nonzero()
        first = int(used[0].item()) if used.numel() else self.length
        if first > 0:
            n = self.length - first
            kv = [None if item is None else (item[0][:, :, first:], item[1][:, :, first:])
                  for item in self.runner.layers_kv(self.cache, self.length)]
            self.runner.set_layers_kv(self.cache, kv, len(rows), n)
            shifted = torch.zeros_like(self.valid)
            shifted[:, :n] = self.valid[:, first: self.length]
            self.valid = shifted
            self.length = n
        self.holes = not bool(self.valid[:, : self.length].all())

    def absorb(self, others: list["_Slots"]) -> None:
        """Append the rows of `others` (single-row caches without holes, e.g. freshly prefilled prompts)
        to this batch. Rows are right-aligned on the slot axis: the side that is shorter gets leading
        holes, so no token is recomputed and nobody's positions change."""
        if not others:
            return
        b, s = len(self.pos), self.length
        lens = [o.length for o in others]
        new_len = max([s] + lens)
        old = self.runner.layers_kv(self.cache, s) if b and s else None
        news = [o.runner.layers_kv(o.cache, o.length) if o.length else None for o in others]
        merged = []
        for i in range(len(self.runner.layers_kv(self.cache, 0))):
            parts = ([] if old is None or old[i] is None else [old[i]]) + \
                [n[i] for n in news if n is not None and n[i] is not None]
            if not parts:
                merged.append(None)
                continue
            k0 = parts[0][0]
            k = k0.new_zeros(b + len(others), k0.shape[1], new_len, k0.shape[3])
            v = torch.zeros_like(k)
            if old is not None and old[i] is not None:
                k[:b, :, new_len - s:] = old[i][0]
                v[:b, :, new_len - s:] = old[i][1]
            for j, n in enumerate(news):
                if n is not None and n[i] is not None:
                    k[b + j, :, new_len - lens[j]:] = n[i][0][0]
                    v[b + j, :, new_len - lens[j]:] = n[i][1][0]
            merged.append((k, v))
        if isinstance(self.cache, KVBuffer) or any(m is not None for m in merged):
            self.runner.set_layers_kv(self.cache, merged, b + len(others), new_len)
        valid = torch.zeros(b + len(others), max(new_len, self.valid.shape[1]), dtype=torch.bool,
                            device=self.device)
        valid[:b, new_len - s:new_len] = self.valid[:, :s]
        for j, n in enumerate(lens):
            valid[b + j, new_len - n:new_len] = True
        self.valid = valid
        self.pos = self.pos + [o.pos[0] for o in others]
        self.length = new_len
        self.holes = not bool(self.valid[:, :new_len].all())


class SpeculativeDecoder:
    """Lossless speculative decoding of a target model with an optional draft model.

    target_model / draft_model: Hugging Face causal LMs (transformers 5, full attention, 'sdpa' or
    'eager'); draft_model None decodes with the target alone through the same loop.
    tokenizer: the target's tokenizer (its length bounds the vocabulary; its eos is a default stop
    token); may be None for models without one (then stop ids come from the model's generation config).
    draft_length: a `parse_draft_length` form ("auto", "4", "static:4", "confidence:0.4", "goodput",
    "learned"), a PolicyFactory, or a callable PolicyContext -> DraftLengthPolicy; default "auto".
    device: moves both models there (default: the target's device).
    draft_tokenizer: the draft's tokenizer if loaded separately: must equal the target's
    (IncompatibleTokenizersError otherwise).
    acceptance_head: an AcceptanceHead, or a draft folder to load `acceptance_head.*` from; None
    looks in `draft_model.name_or_path` if that is a folder.
    stop_token_ids: the default stop ids for requests whose config names none (default: the
    tokenizer's eos and the target's generation_config eos).
    lean: use the lean Llama-family forward (fastpath.py) for models that have that structure
    (default); False always calls the Hugging Face forward. The lean path reads the model's own
    parameters (no copy): in-place weight updates are seen; build a new decoder after moving a model
    to another dtype or device.

    Side effects: both models are put in eval mode (and moved to `device` if given).

    Public attributes (read-only; the CLI, server and selection read them):
    vocab: ids [0, vocab) can be emitted (common_vocab_size of both models and the tokenizer);
    embed_limit: prompt ids must be below it (the smaller embedding size); device;
    default_stop_ids; context_length: the target's maximum positions; policy_factory / policy_context;
    acceptance_head (None if absent); target / draft: the per-model runners (`.max_positions`, `.lean`).
    """

    def __init__(self, target_model: torch.nn.Module, draft_model: torch.nn.Module | None = None,
                 tokenizer=None, draft_length: str | int | PolicyFactory = "auto", *,
                 device: str | torch.device | None = None, draft_tokenizer=None,
                 acceptance_head: AcceptanceHead | str | Path | None = None,
                 stop_token_ids: Sequence[int] | None = None, lean: bool = True):
        if device is not None:
            device = torch.device(device)
            target_model.to(device)
            if draft_model is not None:
                draft_model.to(device)
        check_same_tokenizer(tokenizer, draft_tokenizer)
        self.target_model, self.draft_model, self.tokenizer = target_model.eval(), draft_model, tokenizer
        self.target = _Runner(target_model, "target", lean)
        self.device = self.target.device
        self.draft = None
        if draft_model is not None:
            draft_model.eval()
            self.draft = _Runner(draft_model, "draft", lean)
            if self.draft.device != self.device:
                raise DsparkError(f"target is on {self.device} but draft is on {self.draft.device}: "
                                  "pass device= to place both")
        tok_len = len(tokenizer) if tokenizer is not None else None
        self.vocab = common_vocab_size(self.target.vocab, self.draft.vocab if self.draft else None, tok_len)
        self.embed_limit = min(self.target.vocab, self.draft.vocab if self.draft else self.target.vocab)
        self.acceptance_head = self._load_head(acceptance_head)
        self.policy_context = PolicyContext(has_draft=self.draft is not None,
                                            has_acceptance_head=self.acceptance_head is not None)
        self.policy_factory = checked_policy_factory(draft_length, self.policy_context)
        # one K for a batch of adaptive rows, from costs measured across every batch of this decoder
        self.batch_planner = BatchPlanner()
        self.default_stop_ids = resolve_stop_ids(stop_token_ids, tokenizer, target_model)

    @property
    def context_length(self) -> int:
        """Prompt + generated tokens never exceed this (the target's max_position_embeddings)."""
        return int(self.target.max_positions)

    # -- setup ------------------------------------------------------------------------------------

    def _load_head(self, head) -> AcceptanceHead | None:
        if self.draft is None:
            return None
        if head is None:
            folder = getattr(self.draft_model, "name_or_path", None)
            if not folder or not has_acceptance_head(folder):
                return None
            head = folder
        if isinstance(head, (str, Path)):
            head = load_acceptance_head(head, self.draft.hidden_size)
        if self.draft.hidden_size is not None and head.hidden_size != self.draft.hidden_size:
            raise DsparkError(f"acceptance head expects hidden size {head.hidden_size}, the draft has "
                              f"{self.draft.hidden_size}")
        return head.to(device=self.device, dtype=torch.float32).eval()

    def _policies(self, draft_length, n: int) -> list[DraftLengthPolicy]:
        return make_policies(self.policy_factory, self.policy_context, draft_length, n)

    def _check_prompts(self, prompts) -> list[list[int]]:
        return check_prompts(prompts, self.target.max_positions, self.embed_limit)

    def _configs(self, config, n: int) -> list[GenerationConfig]:
        return per_prompt_configs(config, n)

    # -- public API -------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], config: GenerationConfig | Sequence[GenerationConfig]
                 = GenerationConfig(), constraints: Sequence[TokenConstraint | None] | None = None, *,
                 draft_length: str | int | PolicyFactory | Sequence | None = None,
                 batch_size: int | None = None, on_tokens: OnTokens | None = None) -> list[DecodeResult]:
        """Decode every prompt (token ids, prompt included BOS) and return one DecodeResult per prompt,
        in input order (token_ids: generated ids only, a final stop token included).

        config: one GenerationConfig for all, or one per prompt (rows decoded together must share
        temperature / top_k / top_p / seed). constraints: None or one TokenConstraint-or-None per prompt.
        draft_length: overrides the decoder's policy (one form for all, or one per prompt).
        batch_size: decode at most this many prompts together (default: all at once).
        on_tokens(row, new_ids): called as tokens are committed (row = index into prompts)."""
        events = self.stream(prompts, config, constraints, draft_length=draft_length, batch_size=batch_size)
        return collect_results(events, len(prompts), on_tokens)

    def stream(self, prompts: Sequence[Sequence[int]], config: GenerationConfig | Sequence[GenerationConfig]
               = GenerationConfig(), constraints: Sequence[TokenConstraint | None] | None = None, *,
               draft_length: str | int | PolicyFactory | Sequence | None = None,
               batch_size: int | None = None) -> Iterator[TokenEvent]:
        """Like `generate`, but yields TokenEvents as tokens are committed (a server streams these).
        All inputs are checked before the first event."""
        prompts = self._check_prompts(prompts)
        n = len(prompts)
        configs = self._configs(config, n)
        policies = self._policies(draft_length, n)
        constraints = check_constraints(constraints, n)
        if batch_size is not None and batch_size < 1:
            raise DsparkError(f"batch_size must be >= 1, got {batch_size}")
        bs = batch_size or max(n, 1)
        groups = [list(range(s, min(s + bs, n))) for s in range(0, n, bs)]
        for g in groups:
            head = configs[g[0]]
            for r in g[1:]:
                c = configs[r]
                if not (c.greedy and head.greedy) and \
                        (c.temperature, c.top_k, c.top_p, c.seed) != (head.temperature, head.top_k, head.top_p, head.seed):
                    raise DsparkError(f"prompts {g[0]} and {r} are in one batch but have different sampling "
                                      "settings (temperature/top_k/top_p/seed); use batch_size=1 or equal settings")

        def events() -> Iterator[TokenEvent]:
            for g in groups:
                yield from self._decode_batch([prompts[r] for r in g], [configs[r] for r in g],
                                              [constraints[r] for r in g], [policies[r] for r in g], g)

        return events()

    # -- the loop ---------------------------------------------------------------------------------

    def _stop_ids(self, cfg: GenerationConfig) -> tuple[int, ...]:
        return stop_ids_for(cfg, self.default_stop_ids)

    def _timed(self, fn, *args):
        return timed_call(self.device, fn, *args)

    def _decode_batch(self, prompts, configs, constraints, policies, row_ids) -> Iterator[TokenEvent]:
        session = DecodeSession(self)
        session.add(prompts, configs, constraints, policies, row_ids)
        while session.active:
            yield from session.step()

    def session(self) -> "DecodeSession":
        """An open batch for continuous batching: `add` requests at any time between `step`s (a server
        admits new requests into the running batch instead of waiting for it to finish)."""
        return DecodeSession(self)


class DecodeSession:
    """A running batch of requests on one decoder (see the module docstring for one step).

    `add(prompts, configs, ...)` prefills each new prompt on its own (batch 1: no padding compute)
    and appends it to the batch's KV caches (`_Slots.absorb`); `step()` runs one draft-verify step
    for every active row and returns its TokenEvents; finished rows leave the batch. Rows may join
    between any two steps; their output does not depend on when they joined or with whom (greedy).
    All rows share one sampling setting (temperature / top_k / top_p / seed: one generator draws
    for the whole batch), fixed by the first `add`; `accepts(config)` says whether a config fits.
    Each request's stats are live on its events (`TokenEvent.stats`), final on its last one.
    """

    def __init__(self, decoder: SpeculativeDecoder):
        self.dec = decoder
        self.cfg0: GenerationConfig | None = None
        self.gen = None
        self.prompts: list[list[int]] = []
        self.configs: list[GenerationConfig] = []
        self.constraints: list[TokenConstraint | None] = []
        self.policies: list[DraftLengthPolicy] = []
        self.row_ids: list = []
        self.stop_sets: list[set[int]] = []
        self.stats: list[DecodeStats] = []
        self.seqs: list[list[int]] = []
        self.gen_counts: list[int] = []
        self.started: list[float] = []
        self.draft_ok: list[bool] = []
        self.rows: list[int] = []  # batch row -> local request index
        self.tgt = _Slots(decoder.target, 0)
        self.dft = _Slots(decoder.draft, 0) if decoder.draft else None

    @property
    def active(self) -> int:
        return len(self.rows)

    def accepts(self, config: GenerationConfig) -> bool:
        """Whether a request with `config` may join (greedy rows ignore top_k / top_p / seed)."""
        c0 = self.cfg0
        if c0 is None or (c0.greedy and config.greedy):
            return True
        return (config.temperature, config.top_k, config.top_p, config.seed) == \
            (c0.temperature, c0.top_k, c0.top_p, c0.seed)

    def cancel(self, row_id) -> bool:
        """Drop an unfinished request from the batch (its client left, or a stop string ended it);
        False if it is not active."""
        for bi, r in enumerate(self.rows):
            if self.row_ids[r] == row_id:
                keep = [b for b in range(len(self.rows)) if b != bi]
                with torch.inference_mode():
                    self.tgt.select(keep)
                    if self.dft is not None:
                        self.dft.select(keep)
                self._release(self.rows.pop(bi))
                return True
        return False

    def add(self, prompts, configs, constraints=None, policies=None, row_ids=None) -> list:
        """Admit requests (token-id prompts; one GenerationConfig each or one for all). constraints:
        None or one TokenConstraint-or-None each; policies: None (the decoder's draft length) or one
        DraftLengthPolicy each; row_ids: what their events' `row` is (default: local indices).
        Prompts are checked as `SpeculativeDecoder.stream` checks them. Returns the row ids."""
        dec = self.dec
        prompts = dec._check_prompts(prompts)
        n = len(prompts)
        configs = dec._configs(configs, n)
        constraints = check_constraints(constraints, n)
        policies = dec._policies(None, n) if policies is None else list(policies)
        if row_ids is None:
            row_ids = list(range(len(self.prompts), len(self.prompts) + n))
        row_ids = list(row_ids)
        if not (len(constraints) == len(policies) == len(row_ids) == n):
            raise DsparkError(f"add: {n} prompts need as many constraints, policies and row ids")
        for c in configs:
            if self.cfg0 is None:
                self.cfg0 = c
                self.gen = None if c.greedy else make_generator(c.seed, dec.device)
            elif not self.accepts(c):
                raise DsparkError("a batch shares one sampling setting (temperature/top_k/top_p/seed); this "
                                  "request's differs from the batch's: decode it in another session")
        with torch.inference_mode():
            joined = [self._admit(p, cfg, con, pol, rid)
                      for p, cfg, con, pol, rid in zip(prompts, configs, constraints, policies, row_ids)]
            # one merge for all of them: merging row by row would copy the batch's cache once per row
            self.tgt.absorb([t for t, _ in joined])
            if self.dft is not None:
                self.dft.absorb([d for _, d in joined])
            self.rows.extend(range(len(self.prompts) - len(joined), len(self.prompts)))
        return row_ids

    def _admit(self, prompt, cfg, con, pol, rid) -> tuple["_Slots", "_Slots | None"]:
        """Register one request and prefill it alone; returns its one-row caches (target, draft) for
        `add` to merge into the batch."""
        dec = self.dec
        st = DecodeStats(prompt_tokens=len(prompt))
        ok = dec.draft is not None and len(prompt) - 1 <= dec.draft.max_positions
        self.prompts.append(prompt)
        self.configs.append(cfg)
        self.constraints.append(con)
        self.policies.append(pol)
        self.row_ids.append(rid)
        self.stop_sets.append(set(dec._stop_ids(cfg)))
        self.stats.append(st)
        self.seqs.append(list(prompt))
        self.gen_counts.append(0)
        self.started.append(time.perf_counter())
        self.draft_ok.append(ok)
        if hasattr(pol, "inherit_costs"):  # forward costs belong to the decoder: start from its measurements
            pol.inherit_costs(dec.batch_planner)
        # prefill everything but the last prompt token (it is fed, as the pending token, by the first
        # step), alone: a padded batch prefill would compute the padding too. These caches only carry
        # the prompt into the batch's (`absorb`): sized to it, not to KV_CAPACITY, they add no second
        # copy of the batch's KV at the merge
        t_one = _Slots(dec.target, 1, capacity=len(prompt))
        if len(prompt) > 1:
            _, dt = dec._timed(t_one.feed, [prompt[:-1]], 0, False)
            st.target_forwards += 1
            st.target_time_s += dt
        d_one = None
        if self.dft is not None:
            d_one = _Slots(dec.draft, 1, capacity=len(prompt))
            if ok and len(prompt) > 1:
                _, dd = dec._timed(d_one.feed, [prompt[:-1]], 0, False)
                st.draft_forwards += 1
                st.draft_time_s += dd
        return t_one, d_one

    def step(self) -> list[TokenEvent]:
        """One draft-verify step for every active row; [] when none is active."""
        if not self.rows:
            return []
        with torch.inference_mode():
            return self._step()

    def _step(self) -> list[TokenEvent]:
        dec = self.dec
        dev, V = dec.device, dec.vocab
        cfg0, gen = self.cfg0, self.gen
        greedy = cfg0.greedy
        draft = dec.draft
        ctx_t = dec.target.max_positions
        ctx_d = draft.max_positions if draft else 0
        tgt, dft = self.tgt, self.dft
        rows, seqs, configs, policies = self.rows, self.seqs, self.configs, self.policies
        constraints, stats, gen_counts = self.constraints, self.stats, self.gen_counts
        stop_sets, draft_ok, prompts, row_ids = self.stop_sets, self.draft_ok, self.prompts, self.row_ids
        nb = len(rows)
        limits = []
        for r in rows:
            L = len(seqs[r])
            remaining = min(configs[r].max_new_tokens - gen_counts[r], ctx_t - L)
            # the most drafts this row may verify: never past max_new_tokens or either context
            limits.append(max(min(remaining - 1, ctx_d - L + 1), 0) if draft and draft_ok[r] else 0)
        plans = self._plans([policies[r] for r in rows], limits)
        caps = [min(plans[bi].max_tokens, limits[bi]) for bi in range(nb)]
        K = max(caps)
        cons = [constraints[r] for r in rows]
        has_cons = any(c is not None for c in cons)
        cmasks: list[list[torch.Tensor]] = [[] for _ in range(nb)]
        dead = [False] * nb  # constraint allows nothing after this row's drafts
        drafts = torch.zeros(nb, 0, dtype=torch.long, device=dev)
        qs = None
        nd = [0] * nb
        draft_forwards, draft_s = 0, 0.0
        seq_len_before = [len(seqs[r]) for r in rows]

        if K > 0:
            # per-row control in Python: one small host read per draft step, no tensor bookkeeping
            drafting = [k > 0 for k in caps]
            min_conf = [p.min_confidence for p in plans]
            min_acc = [p.min_acceptance for p in plans]
            use_conf = any(c > 0 for c in min_conf)
            use_head = dec.acceptance_head is not None and any(a > 0 for a in min_acc)
            cum = [1.0] * nb
            cols: list[torch.Tensor] = []
            qcols: list[torch.Tensor] = []
            chunks = [seqs[r][dft.pos[bi]:] if draft_ok[r] else [] for bi, r in enumerate(rows)]
            tok = None
            for j in range(K):
                if j == 0:
                    (logits, hidden), dt = dec._timed(dft.feed, chunks, 1, use_head)
                else:
                    (logits, hidden), dt = dec._timed(dft.feed_tensor, tok[:, None], 1, use_head)
                draft_forwards += 1
                draft_s += dt
                logits = _fit(logits[:, -1], V)
                if has_cons:
                    allow = torch.ones(nb, V, dtype=torch.bool, device=dev)
                    for bi, c in enumerate(cons):
                        if c is None or not drafting[bi]:
                            continue
                        m = _next_mask(c, V, dev)
                        if m is None:
                            dead[bi] = True
                            drafting[bi] = False
                            continue
                        cmasks[bi].append(m)
                        allow[bi] = m
                    logits = logits.masked_fill(~allow, float("-inf"))
                conf = None
                if greedy:
                    tok = logits.argmax(dim=-1)
                    if use_conf:
                        conf = logits.softmax(dim=-1).gather(1, tok[:, None]).squeeze(1)
                else:
                    q = warp_logits(logits, cfg0.temperature, cfg0.top_k, cfg0.top_p)
                    tok = torch.multinomial(q, 1, generator=gen).squeeze(1)
                    qcols.append(q)
                    if use_conf:
                        conf = q.gather(1, tok[:, None]).squeeze(1)
                cols.append(tok)
                tl = tok.tolist()
                cl = conf.tolist() if conf is not None else None
                hl = dec.acceptance_head(hidden.float()).tolist() if use_head else None
                for bi, r in enumerate(rows):
                    if not drafting[bi]:
                        continue
                    nd[bi] += 1
                    c = cons[bi]
                    if c is not None:
                        c.advance(tl[bi])
                    go = j + 1 < caps[bi] and tl[bi] not in stop_sets[r]
                    if cl is not None and cl[bi] < min_conf[bi]:
                        go = False
                    if hl is not None:
                        cum[bi] *= hl[bi]
                        if cum[bi] < min_acc[bi]:
                            go = False
                    drafting[bi] = go
                if not any(drafting):
                    break
            K = len(cols)
            drafts = torch.stack(cols, dim=1)
            if qcols:
                qs = torch.stack(qcols, dim=1)
            # The batch paid for K draft forwards and verifies K + 1 positions for every row anyway,
            # so a row that planned fewer drafts (or stopped early) verifies all K it was given: free
            # tokens whenever they are accepted. Constrained rows keep their own count (their masks
            # were computed only while they drafted).
            for bi in range(nb):
                if cons[bi] is None and plans[bi].take_extra and nd[bi] < min(K, limits[bi]):
                    nd[bi] = min(K, limits[bi])

        # the mask for the position after each row's last draft (the recovered / bonus position)
        if has_cons:
            for bi, c in enumerate(cons):
                if c is None or dead[bi]:
                    continue
                m = _next_mask(c, V, dev)
                if m is None:
                    dead[bi] = True
                else:
                    cmasks[bi].append(m)

        # verify: one target forward over [pending, d_1..d_K]
        pending = torch.tensor([seqs[r][-1] for r in rows], dtype=torch.long, device=dev)[:, None]
        (tlogits, _), verify_s = dec._timed(tgt.feed_tensor, torch.cat([pending, drafts], dim=1), K + 1,
                                             False)
        tlogits = _fit(tlogits, V)
        if has_cons:
            tmask = torch.ones(nb, K + 1, V, dtype=torch.bool, device=dev)
            for bi, ms in enumerate(cmasks):
                for jj, m in enumerate(ms[: K + 1]):
                    tmask[bi, jj] = m
            tlogits = tlogits.masked_fill(~tmask, float("-inf"))
            # a position whose mask allows nothing (dead row) must not produce NaN probabilities
            tlogits = torch.where(tmask.any(-1, keepdim=True), tlogits, torch.zeros_like(tlogits))
        nd_tensor = torch.tensor(nd, dtype=torch.long, device=dev)
        if greedy:
            res = verify_greedy(drafts, tlogits, nd_tensor)
        else:
            p = warp_logits(tlogits, cfg0.temperature, cfg0.top_k, cfg0.top_p)
            res = verify_sampling(drafts, qs if qs is not None else torch.zeros(nb, 0, V, device=dev), p,
                                  gen, nd_tensor)
        dec.batch_planner.observe(nb, K + 1, draft_forwards, draft_s, verify_s)
        n_acc = res.n_accepted.tolist()
        nxt = res.next_token.tolist()
        dlist = drafts.tolist()

        # commit
        now = time.perf_counter()
        t_keep, d_keep, survivors = [], [], []
        events: list[TokenEvent] = []
        for bi, r in enumerate(rows):
            st = stats[r]
            n, k = n_acc[bi], nd[bi]
            com = commit_step(dlist[bi][:n], k, None if (dead[bi] and n == k) else nxt[bi], stop_sets[r])
            block, accepted_c, drafted_c, extra = com.tokens, com.accepted, com.drafted, com.extra
            reason = "stop" if com.stopped else None
            st.record_step(com, verify_s, draft_forwards, draft_s)
            c = cons[bi]
            if c is not None:
                c.rollback(k - accepted_c)
                if extra:
                    c.advance(block[-1])
                if reason is None and c.is_finished():
                    reason = "stop"
                elif reason is None and dead[bi] and n == k:
                    reason = "dead_end"  # nothing may follow, yet the constraint is unfinished
            policies[r].observe(StepFeedback(drafted=drafted_c, accepted=accepted_c,
                                             draft_forwards=draft_forwards, draft_s=draft_s, verify_s=verify_s,
                                             verify_width=K + 1, batch_rows=nb))
            seqs[r].extend(block)
            gen_counts[r] += len(block)
            st.generated = gen_counts[r]
            if reason is None and not block:
                reason = "dead_end"  # the constraint allows no further token
            if reason is None and (gen_counts[r] >= configs[r].max_new_tokens or len(seqs[r]) >= ctx_t):
                reason = "length"
            if reason is not None:
                st.total_time_s = now - self.started[r]
                result = DecodeResult(token_ids=seqs[r][len(prompts[r]):], finish_reason=reason, stats=st)
                events.append(TokenEvent(row_ids[r], block, result, st))
            else:
                survivors.append(bi)
                events.append(TokenEvent(row_ids[r], block, None, st))
            # the target keeps the pending token + the accepted drafts; the draft had cached the
            # committed tokens + d_1..d_{K-1}
            t_keep.append(tgt.pos[bi] - K + accepted_c)
            if dft is not None:
                if K == 0:
                    d_keep.append(dft.pos[bi])
                elif draft_ok[r]:
                    d_keep.append(seq_len_before[bi] + min(accepted_c, K - 1))
                else:
                    d_keep.append(0)
        tgt.keep(t_keep)
        if dft is not None:
            dft.keep(d_keep)
        if len(survivors) < nb:
            kept = set(survivors)
            for bi, r in enumerate(rows):
                if bi not in kept:
                    self._release(r)
            self.rows = [rows[bi] for bi in survivors]
            tgt.select(survivors)
            if dft is not None:
                dft.select(survivors)
        return events

    def _plans(self, pols: list[DraftLengthPolicy], limits: list[int]) -> list[DraftPlan]:
        """Each row's plan: its own policy's, or, for a batch of adaptive rows, the batch planner's K
        with each row's early exits (a row's curve is flat past its limit: it cannot verify more)."""
        if len(pols) < 2 or not all(getattr(p, "batchable", False) for p in pols) or max(limits) == 0:
            return [p.plan() for p in pols]
        k_max = min(max(p.k_max for p in pols), max(limits))
        curves = []
        for p, lim in zip(pols, limits):
            c = p.expected_curve(k_max)
            curves.append([c[min(k, lim)] for k in range(k_max + 1)])
        allow_zero = all(getattr(p, "allow_zero", True) for p in pols)
        k = self.dec.batch_planner.choose(curves, k_max, allow_zero)
        return [p.batch_plan(k) for p in pols]

    def _release(self, r: int) -> None:
        """Drop a finished request's tokens, grammar matcher and policy: a server's session may run
        for as long as traffic keeps it non-empty, so it must not keep every past request."""
        self.prompts[r] = self.seqs[r] = []
        self.constraints[r] = self.policies[r] = None


def _fit(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """[..., V_model] -> float32 [..., vocab] (no copy when already so)."""
    if logits.shape[-1] != vocab:
        logits = logits[..., :vocab]
    return logits if logits.dtype == torch.float32 else logits.float()


def _next_mask(c: TokenConstraint, vocab: int, device) -> torch.Tensor | None:
    """The constraint's mask for the next position, or None when nothing may follow."""
    if c.is_finished():
        return None
    m = fit_mask(c.allowed(), vocab, device)
    return m if bool(m.any()) else None
