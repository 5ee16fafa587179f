"""What each token id of a tokenizer means as raw bytes, and text -> ids for any byte string.

Cross-tokenizer speculation (dspark.decode.cross) moves text between two vocabularies, so it needs
the exact bytes of every token, not `tokenizer.decode`, which strips sentencepiece's leading space,
joins some vocabularies with spaces and turns half a UTF-8 character into U+FFFD. The forms handled:
- byte-level BPE (GPT-2, Llama 3, Qwen, the built-in tiny family): a token's characters are bytes
  through GPT-2's printable byte alphabet ('Ġ' is a space, 'Ċ' a newline);
- sentencepiece-style (Llama 2, Mistral, stories260K): '▁' is a space, `<0xNN>` is a byte-fallback
  token for byte NN; encoding prepends a "dummy" space ('▁') to the text (`TokenBytes.prefix`);
- literal vocabularies (BPE / Unigram / WordLevel without those markers): a token is its string.
Special tokens (bos, eos, pad, unk and added tokens marked special) have no bytes: they are never
proposed as text, and a special token ends a proposal. WordPiece ('##' continuations, spaces implied
between words) cannot be mapped to bytes exactly and is refused.

`encode_bytes` turns any byte string into ids whose bytes are exactly that string: the tokenizer's own
encoding when it round-trips, otherwise a greedy longest match over the vocabulary's byte strings
for the parts that do not (a leading fragment sentencepiece would prefix with a space, half a UTF-8
character at the end). The result may be a tokenization the tokenizer itself would not produce;
that is fine for drafting and verification, which only need the bytes to be right.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from typing import Sequence

from dspark.errors import IncompatibleTokenizersError

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
SPM_SPACE = "\u2581"  # '▁'


@functools.lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: printable character -> the byte it stands for."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _components(node) -> list[dict]:
    """Every component dict of a tokenizer.json part (flattening Sequence nodes)."""
    if not isinstance(node, dict):
        return []
    out = [node]
    for key in ("normalizers", "pretokenizers", "decoders", "processors"):
        for child in node.get(key) or []:
            out.extend(_components(child))
    return out


def tokenizer_kind(tokenizer) -> str:
    """"byte-level", "sentencepiece" or "literal" (see the module docstring); raises
    IncompatibleTokenizersError for forms whose tokens are not exact byte strings (WordPiece)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        vocab = tokenizer.get_vocab()
        if any(SPM_SPACE in t for t in vocab):
            return "sentencepiece"
        return "literal"
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    parts = [c for key in ("normalizer", "pre_tokenizer", "decoder") for c in _components(spec.get(key))]
    types = {c.get("type") for c in parts}
    if model.get("type") == "WordPiece" or "WordPiece" in types or model.get("continuing_subword_prefix"):
        raise IncompatibleTokenizersError(
            f"tokenizer {type(tokenizer).__name__} uses WordPiece-style continuation prefixes, whose tokens are not "
            "exact byte strings; cross-tokenizer drafting supports byte-level BPE, sentencepiece-style and literal "
            "vocabularies")
    if "ByteLevel" in types:
        return "byte-level"
    if "Metaspace" in types or "ByteFallback" in types or model.get("byte_fallback") or any(
            SPM_SPACE in json.dumps(c.get("pattern", "")) + str(c.get("content", "")) + str(c.get("prepend", ""))
            for c in parts):
        return "sentencepiece"
    return "literal"


def _special_ids(tokenizer) -> set[int]:
    ids = set(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    for i, tok in decoder.items():
        if getattr(tok, "special", False):
            ids.add(int(i))
    return ids


def piece_bytes(token: str, kind: str) -> bytes | None:
    """One vocabulary string -> the bytes it stands for (None when it cannot be mapped)."""
    if kind == "byte-level":
        alphabet = byte_level_alphabet()
        try:
            return bytes(alphabet[c] for c in token)
        except KeyError:
            return None  # an added token written in plain text
    if kind == "sentencepiece":
        m = _BYTE_FALLBACK.match(token)
        if m:
            return bytes([int(m.group(1), 16)])
        return token.replace(SPM_SPACE, " ").encode("utf-8")
    return token.encode("utf-8")


@dataclass
class TokenBytes:
    """A tokenizer's ids as bytes. pieces[i]: the bytes of id i (None: special or unmappable);
    by_bytes: the canonical id of each byte string (the tokenizer's own piece over a byte-fallback
    one, then the lowest id); prefix: the dummy text the tokenizer puts in front of any text it
    encodes (b" " for sentencepiece-style, else b""); lead_ids: the special ids it puts in front
    of a text (e.g. BOS) when asked to add special tokens; specials: role ("bos", "eos", ...) -> id."""

    tokenizer: object
    kind: str
    pieces: list[bytes | None]
    by_bytes: dict[bytes, int]
    prefix: bytes
    lead_ids: list[int]
    specials: dict[str, int] = field(default_factory=dict)
    max_len: int = 1

    def __len__(self) -> int:
        return len(self.pieces)

    def join(self, ids: Sequence[int]) -> bytes | None:
        """The bytes of ids (None if any id has none)."""
        out = []
        for i in ids:
            b = self.pieces[i] if 0 <= i < len(self.pieces) else None
            if b is None:
                return None
            out.append(b)
        return b"".join(out)

    def text_bytes(self, ids: Sequence[int]) -> bytes:
        """The bytes of ids, special and unmappable ids skipped."""
        return b"".join(self.pieces[i] for i in ids if 0 <= i < len(self.pieces) and self.pieces[i] is not None)

    def role(self, token_id: int) -> str | None:
        for r, i in self.specials.items():
            if i == token_id:
                return r
        return None

    # -- encoding ----------------------------------------------------------------------------------

    def _tokenize(self, text: str) -> list[int]:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            return list(backend.encode(text, add_special_tokens=False).ids)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _try(self, data: bytes) -> list[int] | None:
        """The tokenizer's own encoding of `data` when its bytes come back exactly."""
        if self.prefix:
            if not data.startswith(self.prefix):
                return None
            data_text = data[len(self.prefix):]
        else:
            data_text = data
        try:
            text = data_text.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if not text and self.prefix:
            return self.greedy(data)
        ids = self._tokenize(text)
        return ids if self.join(ids) == data else None

    def greedy(self, data: bytes) -> list[int] | None:
        """Longest-match tokenization over the byte strings (None if some byte has no token)."""
        out, i, n = [], 0, len(data)
        while i < n:
            for size in range(min(self.max_len, n - i), 0, -1):
                tid = self.by_bytes.get(data[i:i + size])
                if tid is not None:
                    out.append(tid)
                    i += size
                    break
            else:
                return None
        return out

    def encode_bytes(self, data: bytes) -> list[int] | None:
        """Ids whose bytes are exactly `data` (module docstring), or None when no token sequence is."""
        if not data:
            return []
        ids = self._try(data)
        if ids is not None:
            return ids
        head, body = b"", data
        if self.prefix and not data.startswith(self.prefix):
            cut = data.find(self.prefix)
            head, body = (data, b"") if cut < 0 else (data[:cut], data[cut:])
        core, tail = split_incomplete_utf8(body)
        parts: list[int] = []
        for chunk, own in ((head, False), (core, True), (tail, False)):
            if not chunk:
                continue
            got = self._try(chunk) if own else None
            if got is None:
                got = self.greedy(chunk)
            if got is None:
                return None
            parts.extend(got)
        return parts


def split_incomplete_utf8(data: bytes) -> tuple[bytes, bytes]:
    """(the longest prefix, at most 3 bytes shorter, that is valid UTF-8; the rest). A string that is
    invalid further in gives (b"", data): all of it then goes through the greedy byte match."""
    for cut in range(len(data), max(len(data) - 4, -1), -1):
        try:
            data[:cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        return data[:cut], data[cut:]
    return b"", data


def _dummy_prefix(tb: TokenBytes) -> bytes:
    """What the tokenizer adds in front of text: the bytes of encode("a") before the 'a'."""
    try:
        got = tb.join(tb._tokenize("a"))
    except Exception:  # a tokenizer that cannot encode a plain letter: assume no prefix
        return b""
    if got and got.endswith(b"a") and len(got) > 1:
        return got[:-1]
    return b""


def _lead_ids(tokenizer) -> list[int]:
    """The special ids the tokenizer puts in front of a text (e.g. [BOS])."""
    try:
        with_special = list(tokenizer("a")["input_ids"])
        without = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    except Exception:
        return []
    if len(with_special) > len(without) and with_special[len(with_special) - len(without):] == without:
        return with_special[: len(with_special) - len(without)]
    return []


def token_bytes(tokenizer) -> TokenBytes:
    """Build the byte map of a tokenizer (Hugging Face fast or slow tokenizer)."""
    kind = tokenizer_kind(tokenizer)
    vocab = tokenizer.get_vocab()
    size = max(max(vocab.values()) + 1, len(tokenizer))
    specials_set = _special_ids(tokenizer)
    pieces: list[bytes | None] = [None] * size
    by_bytes: dict[bytes, int] = {}
    fallback: dict[bytes, int] = {}
    for tok, i in vocab.items():
        if i in specials_set:
            continue
        b = piece_bytes(tok, kind)
        if not b:
            continue
        pieces[i] = b
        is_fallback = kind == "sentencepiece" and _BYTE_FALLBACK.match(tok) is not None
        table = fallback if is_fallback else by_bytes
        if b not in table or i < table[b]:
            table[b] = i
    for b, i in fallback.items():
        by_bytes.setdefault(b, i)
    specials = {}
    for role in ("bos", "eos", "pad", "unk"):
        tid = getattr(tokenizer, f"{role}_token_id", None)
        if isinstance(tid, int):
            specials[role] = tid
    tb = TokenBytes(tokenizer=tokenizer, kind=kind, pieces=pieces, by_bytes=by_bytes, prefix=b"",
                    lead_ids=_lead_ids(tokenizer), specials=specials,
                    max_len=max((len(b) for b in by_bytes), default=1))
    tb.prefix = _dummy_prefix(tb)
    return tb


def intersection(target: TokenBytes, draft: TokenBytes) -> tuple[list[int], list[int]]:
    """The token-level intersection of two vocabularies (Timor et al. 2025): byte strings that are a
    token of both, as parallel lists (draft ids, target ids), one canonical id per string on each
    side, in the draft's canonical order. Specials and unmappable tokens are left out."""
    d_ids, t_ids = [], []
    for b, di in sorted(draft.by_bytes.items(), key=lambda kv: kv[1]):
        ti = target.by_bytes.get(b)
        if ti is not None:
            d_ids.append(di)
            t_ids.append(ti)
    return d_ids, t_ids
