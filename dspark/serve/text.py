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


def chat_prompt(tokenizer, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids for a chat: the tokenizer's chat template (with the generation prompt) when it has
    one, else `plain_chat_text` with the tokenizer's special tokens."""
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja raises its own errors for conversations a template rejects
            raise DsparkError(f"the model's chat template rejected these messages: {e}") from None
        # The template writes BOS itself where the model wants one.
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return encode_prompt(tokenizer, plain_chat_text(messages))


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
