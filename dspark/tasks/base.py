"""Task data types shared by built-in tasks and user data.

A task yields two things:
- `documents(split)`: raw text for pre-training / tokenizer training (only tasks that have it);
- `prompts(split, limit)`: `PromptRecord`s, the prompts a target continues (collect) or a decoder
  is scored on (select, bench).
Splits are deterministic and disjoint: a record is in `train` or `eval` by a hash of its source id
(for the code task: the file), never by position, so adding files does not reshuffle the split.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterator, Literal, Protocol

from dspark.errors import DsparkError

Split = Literal["train", "eval"]
SPLITS: tuple[str, ...] = ("train", "eval")
# What callers may ask for: one split, or every record ("all" / None).
SplitArg = Literal["train", "eval", "all"] | None
SPLIT_CHOICES: tuple[str, ...] = ("train", "eval", "all")
EVAL_PERCENT = 10


@dataclass(frozen=True)
class PromptRecord:
    """One prompt. Exactly one of `prompt` (plain text) or `messages` (chat turns) is set."""

    id: str
    prompt: str | None = None
    # dicts are unhashable: hashing uses the other fields (equal records still hash equal)
    messages: tuple[dict, ...] | None = field(default=None, hash=False)
    source: str = ""
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def render(self, tokenizer=None) -> str:
        """The text the model sees: the chat template when the tokenizer has one, else a plain
        `role: content` transcript ending with `assistant:`."""
        if self.prompt is not None:
            return self.prompt
        msgs = list(self.messages or ())
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        lines = [f"{m['role']}: {m['content']}" for m in msgs]
        return "\n".join(lines) + "\nassistant:"


def split_of(key: str, eval_percent: int = EVAL_PERCENT) -> Split:
    """Deterministic split by a stable hash of `key` (never Python's salted `hash`)."""
    bucket = int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16) % 100
    return "eval" if bucket < eval_percent else "train"


def check_split(split: str | None) -> str | None:
    """Validate a requested split; "all" is normalised to None (= every record)."""
    if split is None or split == "all":
        return None
    if split not in SPLITS:
        raise DsparkError(f"unknown split {split!r} (valid splits: {', '.join(SPLIT_CHOICES)})")
    return split


def check_limit(limit: int | None) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise DsparkError(f"limit must be a positive integer or unset, got {limit!r}")
    return limit


class Task(Protocol):
    name: str
    description: str

    def prompts(self, split: Split = "eval", limit: int | None = None) -> list[PromptRecord]: ...

    def documents(self, split: Split = "train") -> Iterator[str]: ...

    def describe_source(self) -> str: ...

    def info(self, count: bool = True) -> dict:
        """{name, kind, description, source, available, counts ({train, eval} prompts, or None when
        not counted or not available), note}. Never touches the network."""
        ...
