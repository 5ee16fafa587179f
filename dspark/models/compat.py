"""Tokenizer compatibility of a (target, draft) pair, and a stable tokenizer fingerprint.

Speculative decoding verifies the draft's token ids with the target, so what matters is whether an
id means the same string in both: the token->id maps. Embedding matrices are often padded past the
tokenizer (Qwen2.5-7B has 152064 rows, Qwen2.5-0.5B 151936, for one tokenizer), so the model vocab
sizes are separate inputs: same map + different sizes is "same-padded", and the decoder compares
logits over the ids both models have.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dspark.errors import IncompatibleTokenizersError
from dspark.memory import release_memory

if TYPE_CHECKING:
    from dspark.models.loading import LoadedModel

# pad is left out on purpose: pipelines set `pad_token = eos_token` at run time, which changes
# nothing about which string an id means.
_SPECIALS = ("bos", "eos", "unk")


class CompatMode(str, enum.Enum):
    SAME = "same"
    SAME_PADDED = "same-padded"
    DIFFERENT = "different"


@dataclass(frozen=True)
class TokenizerCompat:
    """How a draft's token ids relate to a target's. `common_vocab_size` (same / same-padded only)
    is the number of leading logit columns both models share: min of the two embedding sizes."""

    mode: CompatMode
    shared_tokens: int
    target_tokenizer_size: int
    draft_tokenizer_size: int
    target_vocab_size: int
    draft_vocab_size: int
    common_vocab_size: int | None
    special_token_diffs: list[str] = field(default_factory=list)
    target_hash: str = ""
    draft_hash: str = ""
    message: str = ""

    @property
    def compatible(self) -> bool:
        """True when draft ids can be verified by the target directly (no re-tokenization)."""
        return self.mode is not CompatMode.DIFFERENT

    def require_shared_vocab(self, what: str = "this operation") -> "TokenizerCompat":
        if not self.compatible:
            raise IncompatibleTokenizersError(f"{what} needs target and draft to share a vocabulary: "
                                              f"{self.message}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode.value, "shared_tokens": self.shared_tokens,
                "target_tokenizer_size": self.target_tokenizer_size,
                "draft_tokenizer_size": self.draft_tokenizer_size,
                "target_vocab_size": self.target_vocab_size, "draft_vocab_size": self.draft_vocab_size,
                "common_vocab_size": self.common_vocab_size,
                "special_token_diffs": list(self.special_token_diffs),
                "target_hash": self.target_hash, "draft_hash": self.draft_hash, "message": self.message}


def _special_tokens(tok) -> dict[str, tuple[str | None, int | None]]:
    return {s: (getattr(tok, f"{s}_token", None), getattr(tok, f"{s}_token_id", None)) for s in _SPECIALS}


def _canonical_merges(merges: list) -> list[list[str]]:
    # tokenizers writes merges either as "a b" strings (older) or [a, b] pairs: hash one form.
    return [m.split(" ", 1) if isinstance(m, str) else list(m) for m in merges]


def tokenizer_fingerprint(tok) -> dict[str, Any]:
    """The parts of a tokenizer that decide text -> ids, as plain JSON (no runtime padding or
    truncation settings, no format version)."""
    specials = {k: list(v) for k, v in _special_tokens(tok).items()}
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:  # a slow (python) tokenizer: the vocabulary is what we can see
        return {"class": type(tok).__name__, "vocab": sorted(tok.get_vocab().items()), "specials": specials}
    spec = json.loads(backend.to_str())
    model = dict(spec.get("model") or {})
    if isinstance(model.get("merges"), list):
        model["merges"] = _canonical_merges(model["merges"])
    return {"model": model, "added_tokens": spec.get("added_tokens"), "normalizer": spec.get("normalizer"),
            "pre_tokenizer": spec.get("pre_tokenizer"), "post_processor": spec.get("post_processor"),
            "decoder": spec.get("decoder"), "specials": specials}


def tokenizer_hash(tok) -> str:
    """sha256 of the canonical JSON of `tokenizer_fingerprint` (stored in manifests)."""
    canon = json.dumps(tokenizer_fingerprint(tok), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def shared_token_count(target_vocab: dict[str, int], draft_vocab: dict[str, int]) -> int:
    """Tokens present in both vocabularies with the same id."""
    return sum(1 for t, i in draft_vocab.items() if target_vocab.get(t) == i)


def special_token_diffs(target_tok, draft_tok) -> list[str]:
    t, d = _special_tokens(target_tok), _special_tokens(draft_tok)
    return [f"{s}: target {t[s][0]!r} (id {t[s][1]}) vs draft {d[s][0]!r} (id {d[s][1]})"
            for s in _SPECIALS if t[s] != d[s]]


def check_tokenizers(target_tok, draft_tok, target_vocab_size: int | None = None,
                     draft_vocab_size: int | None = None) -> TokenizerCompat:
    """Classify a pair: "same" (identical token->id maps), "same-padded" (identical maps, different
    embedding sizes), or "different". Vocab sizes default to the tokenizer sizes.

    Differing bos/eos/unk with an identical map (e.g. a base draft for an instruct target) stay
    "same": ids mean the same strings; the target's special tokens govern stopping. They are
    reported in `special_token_diffs`.
    """
    tv, dv = target_tok.get_vocab(), draft_tok.get_vocab()
    tsize, dsize = len(target_tok), len(draft_tok)
    tvs = int(target_vocab_size) if target_vocab_size is not None else tsize
    dvs = int(draft_vocab_size) if draft_vocab_size is not None else dsize
    shared = shared_token_count(tv, dv)
    diffs = special_token_diffs(target_tok, draft_tok)
    if tv == dv:
        mode = CompatMode.SAME if tvs == dvs else CompatMode.SAME_PADDED
        common = min(tvs, dvs)
        if mode is CompatMode.SAME:
            msg = f"same vocabulary ({len(tv)} tokens, {tvs} embedding rows in both)"
        else:
            msg = (f"same vocabulary ({len(tv)} tokens) with padded embeddings (target {tvs} rows, "
                   f"draft {dvs}): compare logits over the first {common} ids")
        if diffs:
            msg += "; special tokens differ (" + "; ".join(diffs) + ")"
    else:
        mode, common = CompatMode.DIFFERENT, None
        msg = (f"different tokenizers: {shared} of the draft's {len(dv)} tokens have the same id in the "
               f"target's {len(tv)}")
    compat = TokenizerCompat(mode=mode, shared_tokens=shared, target_tokenizer_size=tsize,
                             draft_tokenizer_size=dsize, target_vocab_size=tvs, draft_vocab_size=dvs,
                             common_vocab_size=common, special_token_diffs=diffs,
                             target_hash=tokenizer_hash(target_tok), draft_hash=tokenizer_hash(draft_tok),
                             message=msg)
    # the vocabularies and canonical JSON just compared are ~40 MB of Python objects for a 49k-token
    # BPE: freed, glibc would keep them resident under every later peak (the decoder's included)
    del tv, dv
    release_memory()
    return compat


def check_pair(target: "LoadedModel", draft: "LoadedModel") -> TokenizerCompat:
    """`check_tokenizers` on two loaded models, with their embedding sizes."""
    return check_tokenizers(target.tokenizer, draft.tokenizer, target.vocab_size, draft.vocab_size)
