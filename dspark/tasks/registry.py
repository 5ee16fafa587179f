"""Explicit registry of built-in tasks; unknown names list the valid ones."""

from __future__ import annotations

from typing import Callable

from dspark.errors import DsparkError
from dspark.tasks.base import Task
from dspark.tasks.code import CodeTask
from dspark.tasks.hubtasks import chat_task, math_task, summarize_task

TASKS: dict[str, Callable[[], Task]] = {
    "code": CodeTask,
    "chat": chat_task,
    "summarize": summarize_task,
    "math": math_task,
}


def get_task(name: str) -> Task:
    try:
        factory = TASKS[name]
    except (KeyError, TypeError):
        raise DsparkError(f"unknown task {name!r} (valid tasks: {', '.join(sorted(TASKS))})") from None
    return factory()
