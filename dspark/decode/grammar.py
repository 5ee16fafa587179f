"""Structured outputs through xgrammar: JSON schema, any JSON object, regex and EBNF constraints.

Usage (the decoder sees only the `TokenConstraint` protocol: allowed / advance / rollback / is_finished):

    spec = grammar_from_options(json_schema_file="person.json")  # CLI; or regex=..., grammar_file=...
    spec = GrammarSpec.from_json_schema({"type": "object"})       # server; or GrammarSpec.json_object()
    c = make_constraint(spec, tokenizer, vocab_size=model.config.vocab_size)  # one per request
    while not c.is_finished():
        next_id = int(apply_mask(next_logits, c.allowed()).argmax())  # allowed(): [vocab_size] bool
        c.advance(next_id)       # the stop token (tokenizer eos) is allowed once the grammar can end
    c.rollback(n)                # undo the last n advances (rejected drafts): masks restored exactly
TokenizerInfo and xgrammar's GrammarCompiler are built once per (tokenizer, vocab_size, stop ids) and
xgrammar caches each compiled grammar, so building a constraint per request is cheap.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from dspark.errors import DsparkError

try:
    import xgrammar as xgr
except ImportError:  # the optional `grammar` extra; only structured outputs need it
    xgr = None


def _require_xgrammar() -> None:
    if xgr is None:
        raise DsparkError("structured outputs need xgrammar: pip install 'dspark[grammar]'")

GrammarKind = Literal["json_schema", "json_object", "regex", "ebnf"]
GRAMMAR_KINDS: tuple[str, ...] = ("json_schema", "json_object", "regex", "ebnf")

# xgrammar errors start with "[hh:mm:ss] /project/cpp/file.cc:123: "; users need only the reason.
_XGR_PREFIX = re.compile(r"^\s*\[[0-9:]+\]\s+\S+:\d+:\s*")
_CHECK_PREFIX = re.compile(r"^Check failed: .*? is false:\s*")

# "any JSON object" as a schema rather than xgrammar's builtin JSON grammar: the builtin root also
# admits arrays, and the schema route gives the same whitespace control as json_schema.
_ANY_OBJECT_SCHEMA = '{"type": "object"}'


def _xgr_reason(exc: BaseException) -> str:
    """One line of an xgrammar error, without its timestamp and C++ source location."""
    text = str(exc).strip()
    first = next((line for line in text.splitlines() if line.strip()), type(exc).__name__)
    return _CHECK_PREFIX.sub("", _XGR_PREFIX.sub("", first)).strip()


# JSON-schema keywords whose values map names to schemas, and those whose values are data (never schemas)
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples"})


def remote_ref(schema: Any) -> str | None:
    """The first `$ref` that does not point into the schema itself (not '#...'), else None: xgrammar
    cannot fetch a remote schema and would silently allow anything in its place. Iterative, so any
    depth is safe."""
    stack: list[tuple[Any, bool]] = [(schema, False)]  # (node, node is a name -> schema map)
    while stack:
        node, is_map = stack.pop()
        if isinstance(node, list):
            stack.extend((v, False) for v in node)
        elif isinstance(node, dict):
            if is_map:
                stack.extend((v, False) for v in node.values())
                continue
            ref = node.get("$ref")
            if isinstance(ref, str) and not ref.startswith("#"):
                return ref
            stack.extend((v, k in _SCHEMA_MAPS) for k, v in node.items() if k not in _DATA_KEYWORDS)
    return None


def _one_line(text: str, limit: int = 80) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


@dataclass(frozen=True)
class GrammarSpec:
    """What the output must match; tokenizer-independent, hashable, cheap to send to a server.

    kind: "json_schema" (source: the schema as JSON text), "json_object" (any JSON object; source
    unused), "regex" (source: the pattern) or "ebnf" (source: xgrammar EBNF with a `root` rule).
    any_whitespace: JSON kinds only. False (default) pins the separators to ", " and ": " with no
    other whitespace: small models otherwise tend to loop on whitespace and never close the object.
    origin: where the source came from (a file path), used only in error messages.
    Build through the classmethods or `grammar_from_options`: they validate the source.
    """

    kind: GrammarKind
    source: str = ""
    any_whitespace: bool = False
    origin: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in GRAMMAR_KINDS:
            raise DsparkError(f"unknown grammar kind {self.kind!r}; valid kinds: {', '.join(GRAMMAR_KINDS)}")

    @property
    def where(self) -> str:
        """How error messages name this grammar: the file it came from, or the value itself."""
        if self.origin:
            return self.origin
        return repr(_one_line(self.source)) if self.source else self.kind

    def to_xgrammar(self) -> xgr.Grammar:
        """The tokenizer-independent xgrammar Grammar; DsparkError if the source is invalid."""
        _require_xgrammar()
        try:
            if self.kind == "json_schema":
                return xgr.Grammar.from_json_schema(self.source, any_whitespace=self.any_whitespace)
            if self.kind == "json_object":
                return xgr.Grammar.from_json_schema(
                    _ANY_OBJECT_SCHEMA, any_whitespace=self.any_whitespace, strict_mode=False
                )
            if self.kind == "regex":
                return xgr.Grammar.from_regex(self.source)
            return xgr.Grammar.from_ebnf(self.source)
        except RuntimeError as exc:
            label = {"json_schema": "JSON schema", "json_object": "JSON object grammar",
                     "regex": "regex", "ebnf": "EBNF grammar"}[self.kind]
            raise DsparkError(f"invalid {label} {self.where}: {_xgr_reason(exc)}") from None

    @classmethod
    def from_json_schema(
        cls, schema: dict[str, Any] | str, *, any_whitespace: bool = False, origin: str | None = None
    ) -> GrammarSpec:
        """From a JSON schema given as a dict or as JSON text; validated now."""
        where = origin or "schema"
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise DsparkError(f"invalid JSON schema {where}: not JSON ({exc})") from None
        if not isinstance(schema, dict):
            raise DsparkError(
                f"invalid JSON schema {where}: must be a JSON object, got {type(schema).__name__}"
            )
        ref = remote_ref(schema)
        if ref is not None:
            raise DsparkError(f"invalid JSON schema {where}: $ref {_one_line(ref)!r} points outside the schema; "
                              "only local references ('#/$defs/...') are resolved")
        try:
            source = json.dumps(schema)
        except (TypeError, ValueError) as exc:
            raise DsparkError(f"invalid JSON schema {where}: {exc}") from None
        spec = cls("json_schema", source, any_whitespace=any_whitespace, origin=origin)
        spec.to_xgrammar()
        return spec

    @classmethod
    def json_object(cls, *, any_whitespace: bool = False) -> GrammarSpec:
        """Any JSON object (OpenAI's response_format {"type": "json_object"})."""
        return cls("json_object", "", any_whitespace=any_whitespace)

    @classmethod
    def from_regex(cls, pattern: str) -> GrammarSpec:
        """The whole output must match `pattern` (xgrammar regex syntax); validated now."""
        if not pattern:
            raise DsparkError("invalid regex '': the pattern must not be empty")
        spec = cls("regex", pattern)
        spec.to_xgrammar()
        return spec

    @classmethod
    def from_ebnf(cls, text: str, *, origin: str | None = None) -> GrammarSpec:
        """From xgrammar EBNF text (GBNF-like, start rule `root`); validated now."""
        if not text.strip():
            raise DsparkError(f"invalid EBNF grammar {origin or repr(text)}: it is empty")
        spec = cls("ebnf", text, origin=origin)
        spec.to_xgrammar()
        return spec


def _read_text(path: str | os.PathLike, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise DsparkError(f"cannot read {what} file {str(path)!r}: {reason}") from None


def json_schema_from_file(path: str | os.PathLike, *, any_whitespace: bool = False) -> GrammarSpec:
    """A json_schema spec from a .json file; DsparkError naming the file if unreadable or invalid."""
    text = _read_text(path, "JSON schema")
    origin = repr(str(path))
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DsparkError(f"invalid JSON schema file {origin}: not JSON ({exc})") from None
    return GrammarSpec.from_json_schema(schema, any_whitespace=any_whitespace, origin=f"file {origin}")


def ebnf_from_file(path: str | os.PathLike) -> GrammarSpec:
    """An ebnf spec from a grammar file; DsparkError naming the file if unreadable or invalid."""
    return GrammarSpec.from_ebnf(_read_text(path, "grammar"), origin=f"file {str(path)!r}")


def grammar_from_options(
    json_schema_file: str | os.PathLike | None = None,
    regex: str | None = None,
    grammar_file: str | os.PathLike | None = None,
) -> GrammarSpec | None:
    """The CLI's `--json-schema FILE | --regex R | --grammar FILE`: at most one; None when none given."""
    given = {
        "--json-schema": json_schema_file,
        "--regex": regex,
        "--grammar": grammar_file,
    }
    chosen = [flag for flag, value in given.items() if value is not None]
    if len(chosen) > 1:
        raise DsparkError(f"give at most one of --json-schema, --regex, --grammar; got {', '.join(chosen)}")
    if json_schema_file is not None:
        return json_schema_from_file(json_schema_file)
    if regex is not None:
        return GrammarSpec.from_regex(regex)
    if grammar_file is not None:
        return ebnf_from_file(grammar_file)
    return None


def apply_mask(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Disallowed tokens get -inf.

    logits: [..., V] float; allowed: [V] or [..., V] bool (broadcast) -> [..., V] (a new tensor).
    """
    if logits.shape[-1] != allowed.shape[-1]:
        raise ValueError(f"logits have {logits.shape[-1]} columns but the mask has {allowed.shape[-1]}")
    return logits.masked_fill(~allowed, float("-inf"))


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """xgrammar's packed bitmask to a bool mask: bit j of word w is token 32*w + j.

    bitmask: [W] int32, W >= ceil(vocab_size / 32) -> [vocab_size] bool (new memory, same device).
    On a little-endian CPU the int32 words are already bytes in token order, so numpy's
    unpackbits does it in one call (several times faster than torch's shift-and-mask, which
    allocates [W, 32] int32 intermediates); elsewhere the torch path runs. In the torch path the
    arithmetic shift smears int32's sign bit, but `& 1` keeps only the bit shifted into place.
    """
    if bitmask.device.type == "cpu" and sys.byteorder == "little":
        words = bitmask.contiguous().numpy()
        bits = np.unpackbits(words.view(np.uint8), count=vocab_size, bitorder="little")
        return torch.from_numpy(bits).view(torch.bool)
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    return ((bitmask.unsqueeze(-1) >> shifts) & 1).reshape(-1)[:vocab_size].bool()


class XGrammarConstraint:
    """One request's grammar state over an xgrammar GrammarMatcher; satisfies `TokenConstraint`.

    allowed() is memoised per state and the masks of the last `mask_history` states are kept, so
    the draft-then-verify pattern (advance K drafted tokens, roll back the rejected ones, ask
    again) does not recompute masks. The returned tensor is shared: treat it as read-only.
    After the stop token was accepted (is_finished()), allowed() permits only the stop tokens, so
    batched code that still masks a finished row never sees an all -inf row.
    """

    def __init__(
        self,
        compiled: xgr.CompiledGrammar,
        vocab_size: int,
        *,
        device: torch.device | str = "cpu",
        mask_history: int = 32,
    ) -> None:
        if compiled.tokenizer_info.vocab_size != vocab_size:
            raise ValueError(
                f"grammar compiled for vocab size {compiled.tokenizer_info.vocab_size}, asked for {vocab_size}"
            )
        self._matcher = xgr.GrammarMatcher(compiled)
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.stop_token_ids: tuple[int, ...] = tuple(self._matcher.stop_token_ids)
        self._stop_set = frozenset(self.stop_token_ids)
        # xgrammar fills this CPU int32 buffer in place; reused for every fill (no per-step allocation).
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self._mask_history = max(0, int(mask_history))
        self._current: torch.Tensor | None = None
        # _history[i] is the mask of the state before the (steps - len(_history) + i)-th advance.
        self._history: list[torch.Tensor | None] = []
        self._steps = 0
        # Tracked here because every matcher query is a foreign call (~µs) on the per-token path.
        self._finished = False
        self._stop_only: torch.Tensor | None = None

    @property
    def num_advanced(self) -> int:
        """Tokens consumed so far (the most rollback() can undo)."""
        return self._steps

    def allowed(self) -> torch.Tensor:
        """[vocab_size] bool on `device`: True for tokens allowed at the next position."""
        if self._current is None:
            self._current = self._compute_mask()
        return self._current

    def _compute_mask(self) -> torch.Tensor:
        if self._finished:
            if self._stop_only is None:
                stop_only = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
                stop_only[list(self.stop_token_ids)] = True
                self._stop_only = stop_only
            return self._stop_only
        self._matcher.fill_next_token_bitmask(self._bitmask)
        mask = unpack_bitmask(self._bitmask[0], self.vocab_size)
        return mask if mask.device == self.device else mask.to(self.device)

    def advance(self, token_id: int) -> None:
        """Consume one token; ValueError (a decoder bug, not user input) if the grammar forbids it."""
        token_id = int(token_id)
        if self._finished:
            raise ValueError(f"token id {token_id} advanced after the grammar finished")
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} outside the vocabulary [0, {self.vocab_size})")
        if not self._matcher.accept_token(token_id):
            raise ValueError(f"token id {token_id} is not allowed by the grammar at step {self._steps}")
        if self._mask_history:
            self._history.append(self._current)
            if len(self._history) > self._mask_history:
                del self._history[0]
        self._current = None
        self._steps += 1
        if token_id in self._stop_set:
            self._finished = self._matcher.is_terminated()

    def rollback(self, n: int) -> None:
        """Undo the last n advances (0 <= n <= num_advanced); the masks are then exactly as before."""
        n = int(n)
        if n < 0 or n > self._steps:
            raise ValueError(f"cannot roll back {n} tokens: {self._steps} were advanced")
        if n == 0:
            return
        self._matcher.rollback(n)
        self._steps -= n
        if self._finished:
            self._finished = self._matcher.is_terminated()
        if n <= len(self._history):
            self._current = self._history[-n]
            del self._history[-n:]
        else:
            self._current = None
            self._history.clear()

    def is_finished(self) -> bool:
        """True once the stop token was consumed after a complete match: the request is done."""
        return self._finished

    def is_complete(self) -> bool:
        """True when the tokens so far already form a full match (the stop token is then allowed)."""
        return self._finished or self._matcher.is_completed()


def _tokenizer_info(tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...] | None) -> xgr.TokenizerInfo:
    """xgrammar's view of `tokenizer` with masks of `vocab_size` (the model's, maybe padded).

    xgrammar reads special tokens like "<|pad|>" or "<s>" as their literal text, so a grammar that
    allows free text would let the model emit them; an empty string is how xgrammar marks a token
    as never-allowed, the same way it treats the padded ids past the tokenizer's vocabulary.
    Stop tokens are matched by id, so blanking them too is harmless.
    """
    try:
        base = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids) if stop_token_ids else None
        )
    except ValueError as exc:
        raise DsparkError(f"tokenizer {type(tokenizer).__name__} is not supported for grammars: {exc}") from None
    encoded: list[str] = [""] * vocab_size
    for token, idx in tokenizer.get_vocab().items():
        if idx < vocab_size:
            encoded[idx] = token
    for idx in getattr(tokenizer, "all_special_ids", []) or []:
        if idx is not None and 0 <= idx < vocab_size:
            encoded[idx] = ""
    return xgr.TokenizerInfo.from_vocab_and_metadata(encoded, base.dump_metadata())


class GrammarCompilerCache:
    """xgrammar TokenizerInfo + GrammarCompiler, built once per (tokenizer, vocab_size, stop ids).

    Keyed weakly by the tokenizer object, so dropping a tokenizer frees its compiler. Compiled
    grammars are cached inside each xgrammar GrammarCompiler. Thread-safe.
    """

    def __init__(self, max_threads: int | None = None) -> None:
        _require_xgrammar()
        self._max_threads = max_threads or max(1, min(8, os.cpu_count() or 1))
        self._by_tokenizer: weakref.WeakKeyDictionary[Any, dict[tuple, xgr.GrammarCompiler]] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()

    def compiler(
        self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int] | None = None
    ) -> xgr.GrammarCompiler:
        if vocab_size < 1:
            raise DsparkError(f"vocab_size must be >= 1, got {vocab_size}")
        stops = _resolve_stops(tokenizer, vocab_size, stop_token_ids)
        key = (int(vocab_size), stops)
        with self._lock:
            per_tok = self._by_tokenizer.setdefault(tokenizer, {})
            compiler = per_tok.get(key)
            if compiler is None:
                info = _tokenizer_info(tokenizer, int(vocab_size), stops)
                compiler = xgr.GrammarCompiler(info, max_threads=self._max_threads)
                per_tok[key] = compiler
            return compiler

    def compile(
        self, spec: GrammarSpec, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int] | None = None
    ) -> xgr.CompiledGrammar:
        compiler = self.compiler(tokenizer, vocab_size, stop_token_ids)
        try:
            if spec.kind == "json_schema":
                return compiler.compile_json_schema(spec.source, any_whitespace=spec.any_whitespace)
            if spec.kind == "json_object":
                return compiler.compile_json_schema(
                    _ANY_OBJECT_SCHEMA, any_whitespace=spec.any_whitespace, strict_mode=False
                )
            if spec.kind == "regex":
                return compiler.compile_regex(spec.source)
            return compiler.compile_grammar(spec.source)
        except RuntimeError as exc:
            raise DsparkError(f"cannot compile {spec.kind} grammar {spec.where}: {_xgr_reason(exc)}") from None

    def make_constraint(
        self,
        spec: GrammarSpec,
        tokenizer: Any,
        vocab_size: int,
        *,
        stop_token_ids: Sequence[int] | None = None,
        device: torch.device | str = "cpu",
        mask_history: int = 32,
    ) -> XGrammarConstraint:
        compiled = self.compile(spec, tokenizer, vocab_size, stop_token_ids)
        constraint = XGrammarConstraint(compiled, int(vocab_size), device=device, mask_history=mask_history)
        # The first mask is needed for the first step anyway (it is memoised). Empty, no output can
        # ever match: refuse now rather than end the request at once as a dead end.
        if not bool(constraint.allowed().any()):
            raise DsparkError(f"{spec.kind} grammar {spec.where} can never be satisfied: no token of this "
                              "tokenizer can start a matching output")
        return constraint


def _resolve_stops(
    tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int] | None
) -> tuple[int, ...]:
    """The ids that end a grammar-complete output: given ones, else the tokenizer's eos."""
    if stop_token_ids:
        stops = tuple(sorted({int(t) for t in stop_token_ids}))
    else:
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise DsparkError("the tokenizer has no eos token; pass stop_token_ids for grammar-constrained decoding")
        stops = (int(eos),)
    bad = [t for t in stops if not 0 <= t < vocab_size]
    if bad:
        raise DsparkError(f"stop token ids {bad} are outside the vocabulary [0, {vocab_size})")
    return stops


_DEFAULT_CACHE: GrammarCompilerCache | None = None
_DEFAULT_CACHE_LOCK = threading.Lock()


def default_compiler_cache() -> GrammarCompilerCache:
    """The process-wide cache that `make_constraint` uses (created on first use)."""
    global _DEFAULT_CACHE
    with _DEFAULT_CACHE_LOCK:
        if _DEFAULT_CACHE is None:
            _DEFAULT_CACHE = GrammarCompilerCache()
        return _DEFAULT_CACHE


def make_constraint(
    spec: GrammarSpec,
    tokenizer: Any,
    vocab_size: int,
    *,
    stop_token_ids: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
    mask_history: int = 32,
) -> XGrammarConstraint:
    """A fresh per-request constraint; masks are [vocab_size] (the model's logits width, which may
    exceed len(tokenizer): padded ids are never allowed). Stop tokens default to the tokenizer's eos.
    Uses a process-wide GrammarCompilerCache."""
    return default_compiler_cache().make_constraint(
        spec, tokenizer, vocab_size, stop_token_ids=stop_token_ids, device=device, mask_history=mask_history
    )


@torch.no_grad()
def constrained_greedy_reference(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    constraint: XGrammarConstraint,
    max_new_tokens: int,
) -> list[int]:
    """The target's own constrained greedy decoding, one token per forward with the model's KV
    cache, as HF `generate` would run it: the ground truth a grammar-aware speculative decoder
    must equal under greedy. Returns the generated ids, the stop token included when the grammar
    finished. `model(ids, cache=..., use_cache=True)` must return `.logits` [1, T, V] and `.cache`."""
    device = next(model.parameters()).device
    step_input = torch.tensor([list(prompt_ids)], device=device)
    cache = None
    out: list[int] = []
    while len(out) < max_new_tokens and not constraint.is_finished():
        result = model(step_input, cache=cache, use_cache=True)
        cache = result.cache
        logits = result.logits[0, -1].float()
        allowed = constraint.allowed().to(logits.device)
        next_id = int(apply_mask(logits, allowed).argmax())
        constraint.advance(next_id)
        out.append(next_id)
        step_input = torch.tensor([[next_id]], device=device)
    return out
