"""The one entry point later stages use for prompts: a built-in task name or user data, never both.

`collect`, `select` and `bench` call `resolve_prompts(task, data, split, limit)`; `dspark tasks`
calls `describe_sources` to list what is available here without touching the network.
"""

from __future__ import annotations

from dspark.errors import DataError, DsparkError
from dspark.tasks.base import SPLITS, PromptRecord, SplitArg, Task, check_limit, check_split
from dspark.tasks.data import DataSource
from dspark.tasks.registry import TASKS, get_task


def resolve_source(task: str | None, data: str | None) -> Task:
    """The task named `task`, or a `DataSource` over `data` (file, folder or hub id)."""
    if task is not None and data is not None:
        raise DsparkError(f"give either a task or data, not both (got task {task!r} and data {data!r})")
    if task is None and data is None:
        raise DsparkError(f"give a task ({', '.join(TASKS)}) or data (a .jsonl/.json/.parquet/.txt file, "
                          f"a folder of them, or a hub dataset id owner/name)")
    return get_task(task) if task is not None else DataSource(data)


def source_prompts(source: Task, split: SplitArg = "eval", limit: int | None = None) -> list[PromptRecord]:
    """`split` None / "all": train then eval. Raises DataError rather than return nothing."""
    split = check_split(split)
    limit = check_limit(limit)
    if isinstance(source, DataSource):
        return source.prompts(split, limit)  # splits by content, and raises when empty itself
    out: list[PromptRecord] = []
    for s in SPLITS if split is None else (split,):
        if limit is not None and len(out) >= limit:
            break
        out.extend(source.prompts(s, None if limit is None else limit - len(out)))
    if not out:
        raise DataError(f"task {source.name!r} ({source.describe_source()}) has no prompts in split "
                        f"{split or 'all'!r}")
    return out


def resolve_prompts(task: str | None, data: str | None, split: SplitArg = "eval",
                    limit: int | None = None) -> list[PromptRecord]:
    """Prompts from exactly one of a built-in task name or user data (file, folder, hub id)."""
    check_split(split)
    check_limit(limit)
    return source_prompts(resolve_source(task, data), split, limit)


def describe_sources(data: str | None = None, count: bool = True) -> list[dict]:
    """One `info` dict per built-in task (or, with `data`, for that data only). Offline-safe."""
    if data is not None:
        return [DataSource(data).info(count)]
    return [get_task(name).info(count) for name in TASKS]
