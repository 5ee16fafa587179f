"""The stage behind `dspark generate`: read prompts, load a target (and its draft), decode, report.

Every user mistake is a one-line DsparkError, found before any model loads where it can be:
generation settings, the draft-length form, the grammar (its file is read and compiled first),
the prompts file. Loading and pairing come next (a missing model; a draft with another tokenizer is
decoded cross-tokenizer, dspark.decode.cross), and prompt length last (it needs the tokenizer and the
target's context).

Draft defaults (`DEFAULT_DRAFTS`, an explicit registry): the built-in target `tiny-code` decodes
with `tiny-code-draft-s` when no `--draft` is given; any other target needs `--draft D` or
`--no-draft` (choosing a draft for an arbitrary model is what `dspark select` is for).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from dspark.decode.policy import parse_draft_length
from dspark.decode.types import DecodeResult, DecodeStats, GenerationConfig
from dspark.errors import DataError, DsparkError

DEFAULT_DRAFTS: dict[str, str] = {"tiny-code": "tiny-code-draft-s"}

PROMPT_FILE_SUFFIXES = (".txt", ".jsonl")

# The per-prompt stats `generate --json` prints (DecodeStats property / field names).
# `mode`: "same-tokenizer" or "cross-tokenizer" (a draft with another tokenizer; counts in target tokens).
STATS_FIELDS = ("target_forwards", "drafted", "accepted", "acceptance_rate", "mean_accepted_tokens",
                "tokens_per_s", "mode")


# -- prompts ----------------------------------------------------------------------------------------

def read_prompts_file(path: str | Path) -> list[str]:
    """Prompts from a .txt file (one per line; blank lines are skipped) or a .jsonl file (one object
    per line with a non-empty string field `prompt`; blank lines are skipped)."""
    p = Path(path)
    if p.suffix.lower() not in PROMPT_FILE_SUFFIXES:
        raise DataError(f"prompts file {str(p)!r} must end in .txt (one prompt per line) or .jsonl "
                        f"(objects with a 'prompt' field), got {p.suffix or 'no suffix'!r}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise DataError(f"cannot read prompts file {str(p)!r}: {reason}") from None
    prompts: list[str] = []
    if p.suffix.lower() == ".txt":
        prompts = [line for line in text.splitlines() if line.strip()]
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p.name} line {n}: not JSON ({e.msg})") from None
            if not isinstance(obj, dict) or "prompt" not in obj:
                raise DataError(f"{p.name} line {n}: needs an object with a 'prompt' field")
            value = obj["prompt"]
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{p.name} line {n}: 'prompt' must be a non-empty string, got {value!r}")
            prompts.append(value)
    if not prompts:
        raise DataError(f"prompts file {str(p)!r} has no prompts")
    return prompts


def check_prompt_texts(prompts: Sequence[str]) -> list[str]:
    """Reject empty prompt texts (an empty prompt gives the model nothing to continue)."""
    out = list(prompts)
    if not out:
        raise DsparkError("no prompts given: pass --prompt TEXT or --prompts FILE")
    for i, t in enumerate(out):
        if not isinstance(t, str) or not t.strip():
            raise DsparkError(f"prompt {i} is empty ({t!r}): give a non-empty prompt")
    return out


def prompt_source(prompt: str | None, prompts_file: str | Path | None) -> list[str]:
    """Exactly one of --prompt TEXT and --prompts FILE."""
    if (prompt is None) == (prompts_file is None):
        raise DsparkError("give exactly one of --prompt TEXT or --prompts FILE")
    return check_prompt_texts([prompt] if prompt is not None else read_prompts_file(prompts_file))


def encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids with the tokenizer's special tokens (e.g. BOS), the way the models were trained.
    (Too long a prompt is the decoder's one-line error, not the tokenizer's warning.)"""
    with quiet_transformers():
        return [list(tokenizer(t)["input_ids"]) for t in texts]


# -- models -----------------------------------------------------------------------------------------

@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' weight-loading progress bars and warnings (restored afterwards): a
    command's stderr is for its own progress and its one-line errors."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def resolve_draft_name(target: str, draft: str | None, no_draft: bool) -> str | None:
    """The draft to load: --draft, else the target's default (DEFAULT_DRAFTS), None for --no-draft."""
    if no_draft:
        if draft is not None:
            raise DsparkError(f"give --draft {draft} or --no-draft, not both")
        return None
    if draft is not None:
        return draft
    if target in DEFAULT_DRAFTS:
        return DEFAULT_DRAFTS[target]
    known = ", ".join(f"{t} -> {d}" for t, d in DEFAULT_DRAFTS.items())
    raise DsparkError(f"target {target!r} has no default draft: pass --draft D or --no-draft "
                      f"(defaults exist for: {known})")


@dataclass
class Pair:
    """A loaded target and optional draft (dspark.models.LoadedModel each) and their compatibility."""

    target: Any
    draft: Any | None
    compat: Any | None


def load_pair(target: str, draft: str | None, device: str = "auto", dtype: str = "auto") -> Pair:
    """Load both models on one device and dtype, with their tokenizer compatibility: a draft with
    another tokenizer is decoded cross-tokenizer (dspark.decode.cross), so no pairing is refused here.
    A draft whose tokenizer is the target's (same fingerprint: vocabulary, merges, special tokens)
    shares the target's tokenizer object: a 49k-token BPE holds ~15 MB, kept once."""
    from dspark.memory import release_memory
    from dspark.models import check_pair, load_model

    with quiet_transformers():
        t = load_model(target, device=device, dtype=dtype)
        if draft is None:
            return Pair(t, None, None)
        d = load_model(draft, device=t.device, dtype=t.dtype)
    compat = check_pair(t, d)
    if compat.target_hash == compat.draft_hash:
        d.tokenizer = t.tokenizer
        release_memory()
    return Pair(t, d, compat)


def build_decoder(pair: Pair, draft_length: str = "auto"):
    """The decoder the pair's tokenizers allow (dspark.decode.factory.make_decoder)."""
    from dspark.decode.factory import make_decoder

    return make_decoder(pair.target.model, pair.draft.model if pair.draft else None, pair.target.tokenizer,
                        draft_length, draft_tokenizer=pair.draft.tokenizer if pair.draft else None)


# -- reporting --------------------------------------------------------------------------------------

def stats_summary(stats: DecodeStats) -> dict[str, float | int]:
    """The per-prompt stats `generate --json` prints."""
    return {name: getattr(stats, name) for name in STATS_FIELDS}


def result_row(prompt: str, result: DecodeResult, tokenizer) -> dict[str, Any]:
    return {"prompt": prompt, "text": tokenizer.decode(result.token_ids, skip_special_tokens=True),
            "token_ids": list(result.token_ids), "finish_reason": result.finish_reason,
            "stats": stats_summary(result.stats)}


def stats_line(stats: dict[str, Any]) -> str:
    return (f"{stats['tokens_per_s']:.1f} tok/s, {stats['target_forwards']} target forwards, "
            f"mean accepted tokens {stats['mean_accepted_tokens']:.2f}, "
            f"acceptance {stats['acceptance_rate']:.1%} ({stats['accepted']}/{stats['drafted']} drafts)")


# -- the stage --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GenerateOptions:
    """Everything `dspark generate` takes besides the prompts and model names."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    draft_length: str = "auto"
    batch_size: int | None = None
    json_schema: str | None = None
    regex: str | None = None
    grammar: str | None = None
    device: str = "auto"
    dtype: str = "auto"


def generate(target: str, prompts: Sequence[str], draft: str | None = None, no_draft: bool = False,
             options: GenerateOptions = GenerateOptions()) -> list[dict[str, Any]]:
    """Decode each prompt text; one result row per prompt, in input order (see `result_row`)."""
    from dspark.decode.grammar import grammar_from_options, make_constraint

    texts = check_prompt_texts(prompts)
    config = GenerationConfig(max_new_tokens=options.max_new_tokens, temperature=options.temperature,
                              top_p=options.top_p, top_k=options.top_k, seed=options.seed)
    parse_draft_length(options.draft_length)
    if options.batch_size is not None and options.batch_size < 1:
        raise DsparkError(f"batch size must be >= 1, got {options.batch_size}")
    spec = grammar_from_options(options.json_schema, options.regex, options.grammar)
    draft_name = resolve_draft_name(target, draft, no_draft)

    pair = load_pair(target, draft_name, options.device, options.dtype)
    decoder = build_decoder(pair, options.draft_length)
    tok = pair.target.tokenizer
    ids = encode(tok, texts)
    constraints = None
    if spec is not None:
        constraints = [make_constraint(spec, tok, pair.target.vocab_size,
                                       stop_token_ids=decoder.default_stop_ids or None)
                       for _ in ids]
    results = decoder.generate(ids, config, constraints, batch_size=options.batch_size)
    return [result_row(text, r, tok) for text, r in zip(texts, results)]
