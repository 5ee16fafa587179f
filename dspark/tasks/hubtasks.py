"""Built-in tasks whose default source is a hub dataset: `chat`, `summarize`, `math`.

Their train / eval splits are the dataset's own published splits (ultrachat's train_sft / test_sft,
CNN/DailyMail's train / test, GSM8K's train / test), so "eval" is what the field evaluates on.
They need the dataset downloaded once (network) or in the local cache; offline without it they
raise a one-line DataError that says so and points at `--data FILE`.

Prompts are chat style (a user turn), so an instruction-tuned target sees its chat template.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

from dspark.errors import DataError
from dspark.tasks.base import PromptRecord, Split, check_limit
from dspark.tasks.hub import cached_num_rows, load_hub_rows
from dspark.tasks.records import chat_messages, record_from_row


def _field(row: dict, name: str, where: str) -> str:
    value = row.get(name)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: expected a non-empty string field {name!r}")
    return value


def chat_record(row: dict, rid: str, source: str, where: str) -> PromptRecord:
    return PromptRecord(id=rid, messages=chat_messages(row.get("messages"), where), source=source,
                        meta={"field": "messages"})


def chat_document(row: dict) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in row.get("messages") or ())


SUMMARIZE_PREFIX = "Summarize: "


def summarize_record(row: dict, rid: str, source: str, where: str) -> PromptRecord:
    article = _field(row, "article", where)
    return PromptRecord(id=rid, messages=({"role": "user", "content": SUMMARIZE_PREFIX + article},),
                        source=source, meta={"field": "article", "reference": row.get("highlights")})


def summarize_document(row: dict) -> str:
    return f"{row.get('article', '')}\n\n{row.get('highlights', '')}".strip()


def math_record(row: dict, rid: str, source: str, where: str) -> PromptRecord:
    rec = record_from_row({"question": _field(row, "question", where)}, rid, source, where)
    return PromptRecord(id=rec.id, messages=rec.messages, source=source,
                        meta={"field": "question", "reference": row.get("answer")})


def math_document(row: dict) -> str:
    return f"{row.get('question', '')}\n{row.get('answer', '')}".strip()


@dataclass(frozen=True, eq=False)
class HubTask:
    """A task read from one hub dataset; `splits` maps dspark's split to the dataset's split."""

    name: str
    description: str
    dataset: str
    config: str | None
    splits: dict[str, str]
    to_record: Callable[[dict, str, str, str], PromptRecord]
    to_document: Callable[[dict], str]

    def describe_source(self) -> str:
        cfg = f" ({self.config})" if self.config else ""
        return f"hub:{self.dataset}{cfg} train={self.splits['train']} eval={self.splits['eval']}"

    def _rows(self, split: Split) -> Iterator[tuple[int, dict[str, Any]]]:
        if split not in self.splits:
            raise DataError(f"unknown split {split!r} for task {self.name!r} (valid: {', '.join(self.splits)})")
        yield from enumerate(load_hub_rows(self.dataset, self.splits[split], config=self.config))

    def prompts(self, split: Split = "eval", limit: int | None = None) -> list[PromptRecord]:
        limit = check_limit(limit)
        hf_split = self.splits.get(split, split)
        out = []
        for i, row in self._rows(split):
            where = f"{self.dataset} {hf_split} row {i + 1}"
            out.append(self.to_record(row, f"{self.dataset}:{hf_split}:{i}", f"hub:{self.dataset}", where))
            if limit is not None and len(out) >= limit:
                break
        return out

    def documents(self, split: Split = "train") -> Iterator[str]:
        for _i, row in self._rows(split):
            text = self.to_document(row)
            if text:
                yield text

    def cached_counts(self) -> dict[str, int | None]:
        """Rows per split in the local cache (None: not cached). Never touches the network."""
        return {s: cached_num_rows(self.dataset, hf, config=self.config) for s, hf in self.splits.items()}

    def info(self, count: bool = True) -> dict:
        cached = self.cached_counts()
        available = all(n is not None for n in cached.values())
        return {"name": self.name, "kind": "built-in", "description": self.description,
                "source": self.describe_source(), "available": available,
                "counts": cached if available and count else None,
                "note": "" if available else "not cached here: needs network once, or use --data FILE"}


def chat_task() -> HubTask:
    return HubTask(
        name="chat", description="Multi-turn chat: the conversation so far, the target writes the next reply",
        dataset="HuggingFaceH4/ultrachat_200k", config=None,
        splits={"train": "train_sft", "eval": "test_sft"},
        to_record=chat_record, to_document=chat_document)


def summarize_task() -> HubTask:
    return HubTask(
        name="summarize", description="News summarization: 'Summarize: <article>' as a user turn",
        dataset="abisee/cnn_dailymail", config="3.0.0",
        splits={"train": "train", "eval": "test"},
        to_record=summarize_record, to_document=summarize_document)


def math_task() -> HubTask:
    return HubTask(
        name="math", description="Grade-school math word problems (the question as a user turn)",
        dataset="openai/gsm8k", config="main",
        splits={"train": "train", "eval": "test"},
        to_record=math_record, to_document=math_document)


__all__ = ["HubTask", "chat_task", "summarize_task", "math_task"]
