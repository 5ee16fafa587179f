"""Speculative decoding with a draft whose tokenizer differs from the target's ("cross-tokenizer").

A draft from another model family (another vocabulary) cannot hand its token ids to the target; text
is what the two share. This decoder keeps the target's committed token ids as the source of truth and
moves text between the vocabularies with `dspark.decode.tokenmap` (the exact bytes of every token).

Greedy (temperature 0), any two tokenizers:
1. Draft: the draft decodes greedily until its text encodes to k target tokens (at most about
   k * r of its own tokens, r its running count of draft tokens per target token), stopping early at
   one of its special tokens or, with a confidence policy, at a low-confidence token. Their bytes are
   the proposed text.
2. Re-tokenize: the text is encoded with the target's tokenizer, starting at the committed boundary
   (the committed ids are never re-tokenized; `tokenmap.TokenBytes.encode_bytes` returns ids whose
   bytes are exactly the text), and at most k proposals are kept.
3. Verify: one target forward over [pending token, proposals]; `verify_greedy` accepts the longest
   prefix equal to the target's argmax, plus one target token (recovered or bonus). The output is
   the target's own greedy output whatever the draft proposed.
4. Resync the draft: its drafted tokens whose bytes are a prefix of the committed text stay; the rest of
   the committed text is encoded for the draft together with a short tail window of its previous
   tokens (so a word the target finished differently is re-tokenized whole); the draft's KV cache
   keeps the longest common token prefix and the next draft forward feeds the rest.
Both KV caches are reused across steps (crop + re-feed); the prefix is never recomputed.

Sampling (temperature > 0), lossless: token-level intersection (Timor et al. 2025, "lossless
speculative decoding for heterogeneous vocabularies"). The intersection is the set of byte strings that
are a token of both vocabularies, mapped 1:1 (draft id <-> target id). The draft samples from its
warped distribution restricted to the intersection and renormalised; the proposal is the matching target
id, and q (the draft's distribution over TARGET ids) is zero outside the intersection. Standard
speculative sampling (`verify_sampling`) then emits every token from the target's warped
distribution p exactly, for any q. Cost: a draft token x is accepted with probability min(1, p(x)/q(x)),
so the acceptance per position is sum_x min(p(x), q(x)) <= p(intersection): the target's mass on
tokens outside the intersection is always rejected. With a small intersection (e.g. a 512-token
sentencepiece vocabulary against a 4096-token byte-level one: mostly single characters shared) the
acceptance is bounded by how often the target's next token is one of those strings; the output
stays exact, only the speedup shrinks (`intersection_size` and `intersection_fraction` report it).
A position where the draft has no mass on the intersection ends the step's drafting.

Batching: each request is decoded on its own (batch size 1 internally: the rows of a batch are
decoded one after another; `batch_size` is accepted for interface compatibility and only checked).
Re-tokenization and byte bookkeeping are per request, and correctness comes first. A server's
continuous batching uses `session()` (CrossDecodeSession: the engine's DecodeSession interface), whose
steps advance each request in turn, each with its own KV caches.

Stats (DecodeStats, mode "cross-tokenizer"): drafted / accepted / recovered / bonus count TARGET
tokens (the proposals the target verified), so mean accepted tokens includes the bonus token exactly as
in the same-tokenizer decoder; draft_forwards counts the draft's own forwards. Draft-length policies
plan in target tokens; the cost per drafted token they observe is the draft's time (forwards plus
re-tokenization) per target token proposed.

Constraints (TokenConstraint, in target ids): greedy proposals are cut before the first token the
constraint disallows; sampling masks the draft's distribution with the constraint before sampling
(so q stays a proper proposal distribution and the output stays exact).
"""

from __future__ import annotations

import math
import time
from typing import Callable, Iterator, Sequence

import torch

from dspark.decode.constraints import TokenConstraint, fit_mask
from dspark.decode.fastpath import LeanLlama
from dspark.decode.fastpath import supports as fastpath_supports
from dspark.decode.policy import DraftLengthPolicy, PolicyContext, PolicyFactory, StepFeedback
from dspark.decode.requests import (check_constraints, check_prompts, checked_policy_factory, collect_results,
                                    make_policies, per_prompt_configs, resolve_stop_ids, stop_ids_for, timed_call)
from dspark.decode.sampling import make_generator, warp_logits
from dspark.decode.tokenmap import TokenBytes, intersection, token_bytes
from dspark.decode.types import DecodeResult, DecodeStats, GenerationConfig, commit_step
from dspark.decode.verify import common_vocab_size, verify_greedy, verify_sampling
from dspark.errors import DsparkError

MODE = "cross-tokenizer"
# draft tokens kept out of re-tokenization after a resync: enough to re-merge a word the target
# finished differently from the draft, few enough to keep the cache prefix
RESYNC_WINDOW = 3
RATIO_MOMENTUM = 0.8

OnTokens = Callable[[int, list[int]], None]


class _RowCache:
    """One request's KV cache in one model, and the ids it holds."""

    def __init__(self, cache):
        self.cache = cache
        self.ids: list[int] = []


class _RowModel:
    """One model's forward for one request at a time: Llama-family models run through the lean forward
    (fastpath.py), others through the HF forward with a transformers DynamicCache. Each request has its
    own `_RowCache`, so requests of a session can take turns."""

    def __init__(self, model: torch.nn.Module, role: str, lean: bool = True):
        self.model, self.role = model, role
        cfg = model.config
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.vocab = int(getattr(head, "out_features", 0) or cfg.vocab_size)
        self.max_positions = int(getattr(cfg, "max_position_embeddings", None) or 1 << 30)
        self.lean = LeanLlama(model) if lean and fastpath_supports(model) else None
        attn = getattr(cfg, "_attn_implementation", None) or "sdpa"
        if self.lean is None and attn not in ("sdpa", "eager"):
            raise DsparkError(f"{role} model uses attention implementation {attn!r}; the speculative decoder "
                              "supports 'sdpa' and 'eager' (load it with attn_implementation='sdpa')")
        param = next(model.parameters())
        self.device = param.device

    def new_cache(self) -> _RowCache:
        if self.lean is not None:
            return _RowCache(self.lean.new_cache(1))
        from transformers import DynamicCache

        return _RowCache(DynamicCache(config=self.model.config))

    def crop(self, rc: _RowCache, n: int) -> None:
        """Keep the first n cached tokens."""
        old = len(rc.ids)
        if n >= old:
            return
        if self.lean is not None:
            rc.cache.crop(n)
        else:
            rc.cache.crop(n - old)  # transformers 5: a negative count drops that many positions
        del rc.ids[n:]

    def feed(self, rc: _RowCache, ids: Sequence[int], n_logits: int) -> torch.Tensor | None:
        """Append ids to the cache; -> logits [n_logits, V] of the last n_logits positions (None if 0)."""
        t, p0 = len(ids), len(rc.ids)
        dev = self.device
        x = torch.tensor([list(ids)], dtype=torch.long, device=dev)
        pos = torch.arange(p0, p0 + t, device=dev)[None]
        if self.lean is not None:
            mask = None
            if t > 1:  # causal within the new tokens, every cached slot visible
                mask = torch.ones(t, p0 + t, dtype=torch.bool, device=dev).tril(diagonal=p0)[None, None]
            logits, _ = self.lean(x, pos, mask, rc.cache, n_logits, False)
            out = logits[0] if logits is not None else None
        else:
            res = self.model(input_ids=x, position_ids=pos, cache=rc.cache, use_cache=True,
                             logits_to_keep=max(n_logits, 1))
            out = res.logits[0, -n_logits:] if n_logits else None
        rc.ids.extend(int(i) for i in ids)
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fit(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """[..., V_model] -> float32 [..., vocab]."""
    if logits.shape[-1] != vocab:
        logits = logits[..., :vocab]
    return logits if logits.dtype == torch.float32 else logits.float()


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _next_mask(c: TokenConstraint, vocab: int, device) -> torch.Tensor | None:
    if c.is_finished():
        return None
    m = fit_mask(c.allowed(), vocab, device)
    return m if bool(m.any()) else None


class _DraftText:
    """The draft's token sequence for one request: its prompt (the target prompt's text encoded for the
    draft) followed by the committed text. `hard`: ids before it are never re-tokenized (the prompt,
    a special token). `broken`: some committed text has no draft encoding (drafting stops)."""

    def __init__(self, tmap: TokenBytes, dmap: TokenBytes, prompt: Sequence[int]):
        self.dmap = dmap
        self.tmap = tmap
        text = tmap.text_bytes(prompt)
        if tmap.prefix and text.startswith(tmap.prefix):
            text = text[len(tmap.prefix):]  # the target tokenizer's dummy prefix is not the user's text
        body = dmap.encode_bytes(dmap.prefix + text) if text else []
        self.broken = body is None
        self.ids: list[int] = list(dmap.lead_ids) + list(body or [])
        self.hard = len(self.ids)
        n_t = sum(1 for t in prompt if 0 <= t < len(tmap.pieces) and tmap.pieces[t] is not None)
        self.ratio = min(max(len(body or []) / n_t, 0.25), 4.0) if n_t and body else 1.0

    def commit(self, block: Sequence[int], drafted: Sequence[int]) -> None:
        """The target committed `block` (target ids); `drafted`: the draft's ids of this step's proposal."""
        if self.broken:
            return
        tp = self.tmap.pieces
        run: list[bytes] = []
        first = True
        for t in list(block) + [None]:
            piece = tp[t] if t is not None and 0 <= t < len(tp) else None
            if piece is not None:
                run.append(piece)
                continue
            if run:
                self._append(b"".join(run), drafted if first else ())
                first = False
                run = []
                if self.broken:
                    return
            if t is not None:  # a special (or unmappable) target token: map it by role, then a hard boundary
                role = self.tmap.role(t)
                did = self.dmap.specials.get(role) if role else None
                if did is not None:
                    self.ids.append(did)
                self.hard = len(self.ids)
                first = False

    def _append(self, data: bytes, drafted: Sequence[int]) -> None:
        dp = self.dmap.pieces
        acc, j = b"", 0
        while j < len(drafted):
            p = dp[drafted[j]]
            if p is None or not data.startswith(acc + p):
                break
            acc += p
            j += 1
        base = self.ids + list(drafted[:j])
        rest = data[len(acc):]
        if not rest:
            self.ids = base
            return
        start = max(self.hard, len(base) - RESYNC_WINDOW)
        window = self.dmap.join(base[start:])
        ids = self.dmap.encode_bytes((window or b"") + rest) if window is not None else None
        if ids is None:  # the window does not re-encode: encode the new text on its own
            start = len(base)
            ids = self.dmap.encode_bytes(rest)
        if ids is None:
            self.broken = True
            return
        self.ids = base[:start] + ids

    def observe_ratio(self, draft_tokens: int, target_tokens: int) -> None:
        if draft_tokens > 0 and target_tokens > 0:
            obs = min(max(draft_tokens / target_tokens, 0.25), 4.0)
            self.ratio = RATIO_MOMENTUM * self.ratio + (1 - RATIO_MOMENTUM) * obs


class CrossTokenizerDecoder:
    """Lossless speculative decoding with a draft that has its own tokenizer (module docstring).

    target_model / draft_model: Hugging Face causal LMs (full attention, 'sdpa' or 'eager');
    tokenizer / draft_tokenizer: their tokenizers (byte-level BPE, sentencepiece-style or literal; see
    dspark.decode.tokenmap). draft_length: a `parse_draft_length` form or factory (in target tokens;
    `learned` is refused: acceptance heads predict same-tokenizer acceptance). device: moves both
    models there. stop_token_ids: default stop ids (default: the target tokenizer's eos and the target's
    generation_config eos). lean: use the lean Llama-family forward where possible.

    Public attributes (the same as SpeculativeDecoder's): vocab (target ids [0, vocab) can be emitted),
    embed_limit (prompt ids must be below it: the target's embedding size), device, default_stop_ids,
    context_length, policy_factory, policy_context, acceptance_head (always None), target / draft (the
    per-model runners: `.max_positions`, `.lean`, `.vocab`); plus mode ("cross-tokenizer"), compat (the
    dspark.models.compat.TokenizerCompat of the pair), intersection_size and intersection_fraction (of
    the target's vocabulary) for sampling.
    """

    mode = MODE

    def __init__(self, target_model: torch.nn.Module, draft_model: torch.nn.Module, tokenizer, draft_length:
                 str | int | PolicyFactory = "auto", *, draft_tokenizer, device: str | torch.device | None = None,
                 stop_token_ids: Sequence[int] | None = None, lean: bool = True, compat=None):
        if draft_model is None:
            raise DsparkError("cross-tokenizer decoding needs a draft model (use SpeculativeDecoder for target-only)")
        if tokenizer is None or draft_tokenizer is None:
            raise DsparkError("cross-tokenizer decoding needs both tokenizers (tokenizer and draft_tokenizer)")
        if device is not None:
            device = torch.device(device)
            target_model.to(device)
            draft_model.to(device)
        self.target_model, self.draft_model = target_model.eval(), draft_model.eval()
        self.tokenizer, self.draft_tokenizer = tokenizer, draft_tokenizer
        self.target = _RowModel(target_model, "target", lean)
        self.draft = _RowModel(draft_model, "draft", lean)
        self.device = self.target.device
        if self.draft.device != self.device:
            raise DsparkError(f"target is on {self.device} but draft is on {self.draft.device}: pass device= to "
                              "place both")
        self.tmap = token_bytes(tokenizer)
        self.dmap = token_bytes(draft_tokenizer)
        if compat is None:
            from dspark.models.compat import check_tokenizers

            compat = check_tokenizers(tokenizer, draft_tokenizer, self.target.vocab, self.draft.vocab)
        self.compat = compat
        self.vocab = common_vocab_size(self.target.vocab, None, len(tokenizer))
        self.draft_vocab = common_vocab_size(self.draft.vocab, None, len(draft_tokenizer))
        self.embed_limit = self.target.vocab
        d_ids, t_ids = intersection(self.tmap, self.dmap)
        pairs = [(d, t) for d, t in zip(d_ids, t_ids) if d < self.draft_vocab and t < self.vocab]
        self._inter_d = torch.tensor([d for d, _ in pairs], dtype=torch.long, device=self.device)
        self._inter_t = torch.tensor([t for _, t in pairs], dtype=torch.long, device=self.device)
        self.intersection_size = len(pairs)
        self.intersection_fraction = len(pairs) / self.vocab if self.vocab else 0.0
        self.acceptance_head = None
        self.policy_context = PolicyContext(has_draft=True, has_acceptance_head=False)
        self.policy_factory = checked_policy_factory(draft_length, self.policy_context)
        self.default_stop_ids = resolve_stop_ids(stop_token_ids, tokenizer, target_model)

    @property
    def context_length(self) -> int:
        return int(self.target.max_positions)

    # -- input checks (the same rules and messages as SpeculativeDecoder) --------------------------------

    def _check_prompts(self, prompts) -> list[list[int]]:
        return check_prompts(prompts, self.target.max_positions, self.embed_limit)

    def _policies(self, draft_length, n: int) -> list[DraftLengthPolicy]:
        return make_policies(self.policy_factory, self.policy_context, draft_length, n)

    # -- public API --------------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], config: GenerationConfig | Sequence[GenerationConfig]
                 = GenerationConfig(), constraints: Sequence[TokenConstraint | None] | None = None, *,
                 draft_length: str | int | PolicyFactory | Sequence | None = None,
                 batch_size: int | None = None, on_tokens: OnTokens | None = None) -> list[DecodeResult]:
        """Decode every prompt (target token ids); one DecodeResult per prompt, in input order (see
        SpeculativeDecoder.generate for the arguments)."""
        events = self.stream(prompts, config, constraints, draft_length=draft_length, batch_size=batch_size)
        return collect_results(events, len(prompts), on_tokens)

    def stream(self, prompts: Sequence[Sequence[int]], config: GenerationConfig | Sequence[GenerationConfig]
               = GenerationConfig(), constraints: Sequence[TokenConstraint | None] | None = None, *,
               draft_length: str | int | PolicyFactory | Sequence | None = None,
               batch_size: int | None = None):
        """Like `generate`, yielding TokenEvents as tokens are committed; requests are decoded one after
        another (module docstring). All inputs are checked before the first event."""
        prompts = self._check_prompts(prompts)
        n = len(prompts)
        configs = per_prompt_configs(config, n)
        policies = self._policies(draft_length, n)
        constraints = check_constraints(constraints, n)
        if batch_size is not None and batch_size < 1:
            raise DsparkError(f"batch_size must be >= 1, got {batch_size}")

        def events() -> Iterator:
            session = self.session()
            for r in range(n):
                session.add([prompts[r]], [configs[r]], [constraints[r]], [policies[r]], row_ids=[r])
                while session.active:
                    yield from session.step()

        return events()

    def session(self) -> "CrossDecodeSession":
        """An open set of requests for a server's continuous batching (the same interface as
        SpeculativeDecoder.session): `add` requests between `step`s; each step advances every active
        request by one draft-verify step, one request after another."""
        return CrossDecodeSession(self)

    # -- the loop ----------------------------------------------------------------------------------------

    def _stop_ids(self, cfg: GenerationConfig) -> tuple[int, ...]:
        return stop_ids_for(cfg, self.default_stop_ids)

    def _timed(self, fn, *args):
        return timed_call(self.device, fn, *args)

    def _draft_logits(self, rc: _RowCache, seq: list[int]) -> torch.Tensor:
        """Bring the draft's cache to `seq` (keep the common prefix, feed the rest) -> logits [Vd] of the
        last position."""
        d = self.draft
        keep = min(_common_prefix(rc.ids, seq), len(seq) - 1)
        d.crop(rc, keep)
        return _fit(d.feed(rc, seq[keep:], 1)[-1], self.draft_vocab)

    def _draft_greedy(self, rc: _RowCache, dtext: _DraftText, k: int, min_confidence: float, limit: int):
        """Greedy drafting -> (target proposals, draft ids drafted, draft forwards).

        The draft stops as soon as its text encodes to k target tokens (re-encoding a few dozen bytes
        costs far less than a draft forward), at a special token, at a low-confidence token, or after
        k * r draft tokens (r: draft tokens per target token so far). The last proposal may be the first
        part of a longer target token; then the target rejects it and emits the longer one. Waiting for
        one more draft token to be sure would cost a draft forward per step and, measured on the built-in
        pair, gains no acceptance."""
        kd = max(1, min(math.ceil(k * dtext.ratio), limit))
        logits = self._draft_logits(rc, dtext.ids)
        forwards, drafted, data = 1, [], b""
        pieces = self.dmap.pieces
        props: list[int] = []
        for j in range(kd):
            if j > 0:
                logits = _fit(self.draft.feed(rc, [drafted[-1]], 1)[-1], self.draft_vocab)
                forwards += 1
            tok = int(logits.argmax())
            piece = pieces[tok] if tok < len(pieces) else None
            if piece is None:  # a special token (e.g. the draft's eos): the proposed text ends here
                break
            drafted.append(tok)
            data += piece
            props = self.tmap.encode_bytes(data) or []
            if len(props) >= k:
                break
            if min_confidence > 0 and float(logits.softmax(-1)[tok]) < min_confidence:
                break
        cut = next((i for i, t in enumerate(props) if t >= self.vocab), len(props))
        props = props[:cut]
        dtext.observe_ratio(len(drafted), len(props))
        return props[:k], drafted, forwards

    def _draft_sampling(self, rc: _RowCache, dtext: _DraftText, k: int, min_confidence: float,
                        cfg: GenerationConfig, gen,
                        constraint: TokenConstraint | None):
        """Sampling in the token-level intersection -> (target proposals, draft ids, q rows [K, V] over
        target ids, constraint masks, dead, draft forwards)."""
        V = self.vocab
        inter_d, inter_t = self._inter_d, self._inter_t
        logits = self._draft_logits(rc, dtext.ids)
        forwards = 1
        props, drafted, qrows, masks = [], [], [], []
        dead = False
        for j in range(k):
            if j > 0:
                logits = _fit(self.draft.feed(rc, [drafted[-1]], 1)[-1], self.draft_vocab)
                forwards += 1
            q = warp_logits(logits, cfg.temperature, cfg.top_k, cfg.top_p)
            qi = q[inter_d]
            if constraint is not None:
                m = _next_mask(constraint, V, self.device)
                if m is None:
                    dead = True
                    break
                masks.append(m)
                qi = qi * m[inter_t]
            mass = float(qi.sum())
            if not mass > 1e-12:
                break  # no draft mass on (allowed) shared tokens: the target samples this position itself
            qi = qi / mass
            idx = int(torch.multinomial(qi, 1, generator=gen))
            d_tok, t_tok = int(inter_d[idx]), int(inter_t[idx])
            row = torch.zeros(V, dtype=torch.float32, device=self.device)
            row[inter_t] = qi
            drafted.append(d_tok)
            props.append(t_tok)
            qrows.append(row)
            if constraint is not None:
                constraint.advance(t_tok)
            if min_confidence > 0 and float(qi[idx]) < min_confidence:
                break
        if constraint is not None and not dead and len(masks) == len(props):
            m = _next_mask(constraint, V, self.device)
            if m is None:
                dead = True
            else:
                masks.append(m)
        return props, drafted, qrows, masks, dead, forwards

    def _constrain_greedy(self, props: list[int], constraint: TokenConstraint):
        """Cut greedy proposals before the first disallowed one -> (kept, masks, dead)."""
        kept, masks, dead = [], [], False
        for t in props:
            m = _next_mask(constraint, self.vocab, self.device)
            if m is None:
                dead = True
                break
            masks.append(m)
            if not bool(m[t]):
                break
            constraint.advance(t)
            kept.append(t)
        if not dead and len(masks) == len(kept):
            m = _next_mask(constraint, self.vocab, self.device)
            if m is None:
                dead = True
            else:
                masks.append(m)
        return kept, masks, dead

    def _loop(self, prompt: list[int], cfg: GenerationConfig, constraint: TokenConstraint | None,
              policy: DraftLengthPolicy, gen: torch.Generator | None
              ) -> Iterator[tuple[list[int], DecodeResult | None, DecodeStats]]:
        t_start = time.perf_counter()
        dev, V = self.device, self.vocab
        greedy = cfg.greedy
        stops = set(self._stop_ids(cfg))
        st = DecodeStats(prompt_tokens=len(prompt), mode=MODE)
        seq = list(prompt)
        tgt, dft = self.target, self.draft
        ctx_t, ctx_d = tgt.max_positions, dft.max_positions
        t_rc, d_rc = tgt.new_cache(), dft.new_cache()
        dtext = _DraftText(self.tmap, self.dmap, prompt)
        if len(prompt) > 1:
            _, dt = self._timed(tgt.feed, t_rc, prompt[:-1], 0)
            st.target_forwards += 1
            st.target_time_s += dt
        generated = 0
        while True:
            plan = policy.plan()
            remaining = min(cfg.max_new_tokens - generated, ctx_t - len(seq))
            k = max(0, min(plan.max_tokens, remaining - 1))
            d_room = ctx_d - len(dtext.ids)
            if dtext.broken or not dtext.ids or d_room < 2:
                k = 0
            props: list[int] = []
            drafted: list[int] = []
            qrows: list[torch.Tensor] = []
            masks: list[torch.Tensor] = []
            dead = False
            forwards, draft_s = 0, 0.0
            if k > 0:
                _sync(dev)
                t0 = time.perf_counter()
                if greedy:
                    props, drafted, forwards = self._draft_greedy(d_rc, dtext, k, plan.min_confidence, d_room - 1)
                else:
                    props, drafted, qrows, masks, dead, forwards = self._draft_sampling(
                        d_rc, dtext, min(k, d_room - 1), plan.min_confidence, cfg, gen, constraint)
                _sync(dev)
                draft_s = time.perf_counter() - t0
            if constraint is not None:
                if greedy:
                    props, masks, dead = self._constrain_greedy(props, constraint)
                elif k == 0:  # no drafting ran: the mask of the next position only
                    m = _next_mask(constraint, V, dev)
                    dead = m is None
                    masks = [] if m is None else [m]
            K = len(props)

            tlogits, verify_s = self._timed(tgt.feed, t_rc, [seq[-1]] + props, K + 1)
            tlogits = _fit(tlogits, V)
            if constraint is not None:
                tmask = torch.ones(K + 1, V, dtype=torch.bool, device=dev)
                for jj, m in enumerate(masks[: K + 1]):
                    tmask[jj] = m
                tlogits = tlogits.masked_fill(~tmask, float("-inf"))
                tlogits = torch.where(tmask.any(-1, keepdim=True), tlogits, torch.zeros_like(tlogits))
            drafts = torch.tensor([props], dtype=torch.long, device=dev)
            if greedy:
                res = verify_greedy(drafts, tlogits[None])
            else:
                p = warp_logits(tlogits, cfg.temperature, cfg.top_k, cfg.top_p)
                q = torch.stack(qrows)[None] if qrows else torch.zeros(1, 0, V, device=dev)
                res = verify_sampling(drafts, q, p[None], gen)
            n = int(res.n_accepted[0])
            nxt = int(res.next_token[0])

            com = commit_step(props[:n], K, None if (dead and n == K) else nxt, stops)
            block, accepted_c, drafted_c, extra = com.tokens, com.accepted, com.drafted, com.extra
            reason = "stop" if com.stopped else None
            st.record_step(com, verify_s, forwards, draft_s)
            if constraint is not None:
                constraint.rollback(K - accepted_c)
                if extra:
                    constraint.advance(block[-1])
                if reason is None and constraint.is_finished():
                    reason = "stop"
                elif reason is None and dead and n == K:
                    reason = "dead_end"  # nothing may follow, yet the constraint is unfinished
            # goodput's cost model charges K drafts at the observed cost per draft: here that is the
            # draft's time per TARGET token proposed (its own forwards plus re-tokenization)
            policy.observe(StepFeedback(drafted=drafted_c, accepted=accepted_c,
                                        draft_forwards=K if K else forwards, draft_s=draft_s, verify_s=verify_s,
                                        verify_width=K + 1))
            seq.extend(block)
            generated += len(block)
            st.generated = generated
            if reason is None and not block:
                reason = "dead_end"  # the constraint allows no further token
            if reason is None and (generated >= cfg.max_new_tokens or len(seq) >= ctx_t):
                reason = "length"
            if reason is not None:
                st.total_time_s = time.perf_counter() - t_start
                yield block, DecodeResult(token_ids=seq[len(prompt):], finish_reason=reason, stats=st), st
                return
            # the target keeps everything committed but the new pending token
            tgt.crop(t_rc, len(seq) - 1)
            t0 = time.perf_counter()
            dtext.commit(block, drafted)
            st.draft_time_s += time.perf_counter() - t0
            yield block, None, st


def _event(row, block: list[int], result: DecodeResult | None, stats: DecodeStats):
    """A TokenEvent (the same-tokenizer decoder's type), with the live stats when it carries them."""
    from dspark.decode.engine import TokenEvent

    fields = getattr(TokenEvent, "__dataclass_fields__", {})
    if "stats" in fields:
        return TokenEvent(row, block, result, stats=stats)
    return TokenEvent(row, block, result)


class CrossDecodeSession:
    """Requests in progress on a CrossTokenizerDecoder, for continuous batching (the interface of
    dspark.decode.engine.DecodeSession: active, accepts, add, step, cancel). Each request has its own
    KV caches; `step()` advances every active request by one step, in the order they were added.
    Sampling rows with the same seed draw from one generator (as one batch does in the engine), so
    equal prompts get different, reproducible samples."""

    def __init__(self, decoder: CrossTokenizerDecoder):
        self.dec = decoder
        self._rows: list[tuple[object, Iterator]] = []
        self._gens: dict[int, torch.Generator] = {}
        self._added = 0

    @property
    def active(self) -> int:
        return len(self._rows)

    def accepts(self, config: GenerationConfig) -> bool:
        """Always: requests are decoded one by one, so any settings may share a session."""
        return True

    def cancel(self, row_id) -> bool:
        for i, (rid, steps) in enumerate(self._rows):
            if rid == row_id:
                steps.close()
                self._rows.pop(i)
                return True
        return False

    def add(self, prompts, configs, constraints=None, policies=None, row_ids=None) -> list:
        """Admit requests (checked as `CrossTokenizerDecoder.stream` checks them); returns their row ids."""
        dec = self.dec
        prompts = dec._check_prompts(prompts)
        n = len(prompts)
        configs = per_prompt_configs(configs, n)
        constraints = check_constraints(constraints, n)
        policies = dec._policies(None, n) if policies is None else list(policies)
        if row_ids is None:
            row_ids = list(range(self._added, self._added + n))
        row_ids = list(row_ids)
        if not (len(configs) == len(constraints) == len(policies) == len(row_ids) == n):
            raise DsparkError(f"add: {n} prompts need as many configs, constraints, policies and row ids")
        for p, cfg, con, pol, rid in zip(prompts, configs, constraints, policies, row_ids):
            gen = None
            if not cfg.greedy:
                if cfg.seed is None:
                    gen = make_generator(None, dec.device)
                else:
                    if cfg.seed not in self._gens:
                        self._gens[cfg.seed] = make_generator(cfg.seed, dec.device)
                    gen = self._gens[cfg.seed]
            self._rows.append((rid, dec._loop(p, cfg, con, pol, gen)))
        self._added += n
        return row_ids

    def step(self) -> list:
        """One draft-verify step for every active request; [] when none is active."""
        events = []
        for rid, steps in list(self._rows):
            # inference mode only while a step runs (not across the caller's code between events)
            with torch.inference_mode():
                out = next(steps, None)
            if out is None:
                self.cancel(rid)
                continue
            block, result, st = out
            events.append(_event(rid, block, result, st))
            if result is not None:
                self.cancel(rid)
        return events
