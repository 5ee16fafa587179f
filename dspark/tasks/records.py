"""One row of user data (a JSON object, a parquet row, a hub dataset row) -> a `PromptRecord`.

The accepted fields, tried in this order (the first one present and not null wins):

  messages     a list of {"role", "content"} chat turns (roles: system, user, assistant, tool).
               Trailing assistant turns are dropped (the target writes the reply); at least one
               user turn must remain. Rendered with the tokenizer's chat template when it has one.
  prompt       text the model continues verbatim (completion style, no chat template).
  text         the same as `prompt`.
  question     one user turn (chat style: the chat template applies when the tokenizer has one).
  instruction  one user turn (Alpaca style); a non-empty `input` field is appended after a blank line.
  turns        a list of user turns (MT-Bench / Spec-Bench); the first turn is the prompt.

Any other fields are ignored. A row's split depends only on its content (`content_key`), so it
never moves when files are added, renamed or reordered, and a duplicated prompt can't sit in both
train and eval.
"""

from __future__ import annotations

import json
from typing import Any

from dspark.errors import DataError
from dspark.tasks.base import PromptRecord

PROMPT_FIELDS: tuple[str, ...] = ("messages", "prompt", "text", "question", "instruction", "turns")
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _nonempty_str(value: Any, fld: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field {fld!r} must be a string, got {_type_name(value)}")
    if not value.strip():
        raise DataError(f"{where}: field {fld!r} is empty")
    return value


def chat_messages(value: Any, where: str, fld: str = "messages") -> tuple[dict, ...]:
    """Validate chat turns and drop trailing assistant turns (the reply the target should write)."""
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(f"{where}: field {fld!r} must be a non-empty list of {{role, content}} objects, "
                        f"got {_type_name(value) if value != [] else 'an empty list'}")
    turns = []
    for i, m in enumerate(value, 1):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: {fld}[{i}] must be an object with 'role' and 'content'")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise DataError(f"{where}: {fld}[{i}] has role {role!r} (valid roles: {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise DataError(f"{where}: {fld}[{i}] content must be a string, got {_type_name(content)}")
        turns.append({"role": role, "content": content})
    while turns and turns[-1]["role"] == "assistant":
        turns.pop()
    if not any(t["role"] == "user" for t in turns):
        raise DataError(f"{where}: field {fld!r} has no user turn")
    return tuple(turns)


def record_from_row(row: Any, rid: str, source: str, where: str) -> PromptRecord:
    """Build a record from one row; `where` names the row in errors ("data.jsonl line 3")."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with a prompt field, got {_type_name(row)}")
    fld = next((f for f in PROMPT_FIELDS if row.get(f) is not None), None)
    if fld is None:
        have = ", ".join(sorted(map(str, row))) or "no fields"
        raise DataError(f"{where}: record has none of the fields {', '.join(PROMPT_FIELDS)} (it has: {have})")
    value = row[fld]
    meta: dict[str, Any] = {"field": fld}
    if row.get("id") is not None:
        meta["id"] = row["id"]
    if fld == "messages":
        return PromptRecord(id=rid, messages=chat_messages(value, where), source=source, meta=meta)
    if fld in ("prompt", "text"):
        return PromptRecord(id=rid, prompt=_nonempty_str(value, fld, where), source=source, meta=meta)
    if fld == "question":
        content = _nonempty_str(value, fld, where)
    elif fld == "instruction":
        content = _nonempty_str(value, fld, where)
        extra = row.get("input")
        if extra is not None and not isinstance(extra, str):
            raise DataError(f"{where}: field 'input' must be a string, got {_type_name(extra)}")
        if extra and extra.strip():
            content = f"{content}\n\n{extra}"
    else:  # turns
        if not isinstance(value, list) or not value:
            raise DataError(f"{where}: field 'turns' must be a non-empty list of strings")
        content = _nonempty_str(value[0], "turns[1]", where)
    return PromptRecord(id=rid, messages=({"role": "user", "content": content},), source=source, meta=meta)


def content_key(record: PromptRecord) -> str:
    """What the split of a user-data record is decided by: its content, not its position."""
    if record.prompt is not None:
        return "p:" + record.prompt
    return "m:" + json.dumps(list(record.messages or ()), sort_keys=True, ensure_ascii=False)


def plain_text(record: PromptRecord) -> str:
    """The record as text without any tokenizer (for `documents`): the prompt or a transcript."""
    return record.render(None)
