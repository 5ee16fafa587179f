"""Text in and out of the server: prompts (plain or chat) to token ids, and generated ids back to text
as it streams, with OpenAI `stop` strings.

Streaming and non-streaming share one `TextStream`, so the concatenated deltas are the final text:
each push decodes every generated id (tokenizer.decode, special tokens skipped) and emits the new
suffix, holding back (a) trailing U+FFFD, an incomplete UTF-8 sequence of a byte-level tokenizer
that the next token may complete, and (b) a trailing piece that could be the start of a stop
string. A stop string ends the text just before it (OpenAI: the stop sequence is not returned).
"""

from __future__ import annotations

from typing import Any, Sequence

from dspark.errors import DsparkError

REPLACEMENT = "\ufffd"


def encode_prompt(tokenizer, text: str) -> list[int]:
    """A completion prompt: the tokenizer's own special tokens added (e.g. BOS), like vLLM."""
    return list(tokenizer(text)["input_ids"])


def plain_chat_text(messages: Sequence[dict[str, str]]) -> str:
    """The fallback for tokenizers without a chat template: one 'role: content' line per message,
    then 'assistant:' for the model to continue."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def chat_text(tokenizer, messages: Sequence[dict[str, str]]) -> tuple[str, bool]:
    """(text, add_special_tokens) of a chat: the tokenizer's chat template (with the generation
    prompt) when it has one, which writes BOS itself where the model wants one; else
    `plain_chat_text` with the tokenizer's special tokens."""
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja raises its own errors for conversations a template rejects
            raise DsparkError(f"the model's chat template rejected these messages: {e}") from None
        return text, False
    return plain_chat_text(messages), True


def chat_prompt(tokenizer, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids for a chat (see `chat_text`)."""
    text, special = chat_text(tokenizer, messages)
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


# Pre-tokenizers that drop characters (whitespace, a split pattern "removed"): a token then stands
# for more text than its own characters, so no character count bounds the token count.
_DROPPING_PRE_TOKENIZERS = ("Whitespace", "BertPreTokenizer", "removed")


def max_token_chars(tokenizer) -> int | None:
    """The most characters of (normalized) text one token stands for, or None when the tokenizer
    gives no such bound (not a fast tokenizer, or its pre-tokenizer drops characters). A token's
    vocabulary string is never shorter than the text it covers: byte-level BPE spells each byte as
    one character, SentencePiece a space as '▁' and a byte as '<0x0A>', an added token is its text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or any(name in str(backend.pre_tokenizer) for name in _DROPPING_PRE_TOKENIZERS):
        return None
    return max((len(t) for t in tokenizer.get_vocab()), default=0) or None


class PromptTooLong(DsparkError):
    """A prompt with more tokens than the context holds, found before tokenizing it."""

    def __init__(self, chars: int, max_chars: int, context: int):
        super().__init__(f"This model's maximum context length is {context} tokens, but the prompt has {chars} "
                         f"characters, so at least {-(-chars // max_chars)} tokens (no token of this tokenizer "
                         f"covers more than {max_chars} characters)")


class PromptEncoder:
    """Prompt texts to token ids for a model with a context of `context` tokens. Tokenizing is
    O(text) CPU work, so a text that cannot fit (more characters than `context` tokens of the
    longest token can cover) is refused with PromptTooLong before it is tokenized."""

    def __init__(self, tokenizer, context: int):
        self.tokenizer, self.context = tokenizer, int(context)
        self.max_chars = max_token_chars(tokenizer)

    def check_length(self, text: str) -> None:
        if self.max_chars is None or len(text) <= self.context * self.max_chars:
            return  # the cheap case: it may fit
        normalizer = self.tokenizer.backend_tokenizer.normalizer  # counted after normalization (which may shrink it)
        chars = len(normalizer.normalize_str(text)) if normalizer is not None else len(text)
        if -(-chars // self.max_chars) >= self.context:
            raise PromptTooLong(chars, self.max_chars, self.context)

    def completion(self, text: str) -> list[int]:
        self.check_length(text)
        return encode_prompt(self.tokenizer, text)

    def chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        text, special = chat_text(self.tokenizer, messages)
        self.check_length(text)
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])


def _stop_prefix_len(text: str, end: int, stops: Sequence[str]) -> int:
    """Length of the longest suffix of text[:end] that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, end), best, -1):
            if text.endswith(s[:k], 0, end):
                best = k
                break
    return best


class TextStream:
    """Generated ids -> text deltas for one choice (module docstring)."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = (), incremental: bool = True):
        """incremental=False (no stop strings only): `push` just collects ids and `finish` decodes them
        once, for a client that waits for the whole text (per-push decoding is quadratic in length)."""
        self.tokenizer = tokenizer
        self.stops = [s for s in stop if s]
        if not incremental and self.stops:
            raise DsparkError("stop strings are found while decoding: a TextStream with stops must be incremental")
        self.incremental = incremental
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False  # a stop string was found
        self._searched = 0
        self._longest = max((len(s) for s in self.stops), default=0)

    def push(self, ids: Sequence[int]) -> str:
        """Add generated ids; return the text that is now safe to send (may be '')."""
        if self.stopped:
            return ""
        self.ids.extend(int(i) for i in ids)
        if not self.incremental:
            return ""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stops:
            start = max(0, self._searched - self._longest + 1)
            hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                text = text[:min(hits)]
                self.stopped = True
            self._searched = len(text)
        self.text = text
        if self.stopped:
            return self._flush()
        safe = len(text.rstrip(REPLACEMENT))
        safe -= _stop_prefix_len(text, safe, self.stops)
        if safe <= self.sent:
            return ""
        delta = text[self.sent:safe]
        self.sent = safe
        return delta

    def finish(self) -> str:
        """The rest of the text (held-back characters included) once generation has ended."""
        if not self.incremental:
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._flush()

    def _flush(self) -> str:
        delta = self.text[self.sent:]
        self.sent = len(self.text)
        return delta
