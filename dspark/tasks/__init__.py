"""Task data: built-in tasks (`code`, `chat`, `summarize`, `math`), local files and hub datasets.

Later stages get prompts through `resolve_prompts(task, data, split, limit)`; see `data` for the
accepted file formats and `records` for the accepted fields.
"""

from dspark.tasks.base import EVAL_PERCENT, SPLITS, PromptRecord, Split, SplitArg, Task, split_of
from dspark.tasks.data import DataSource, load_data
from dspark.tasks.records import PROMPT_FIELDS
from dspark.tasks.registry import TASKS, get_task
from dspark.tasks.resolve import describe_sources, resolve_prompts, resolve_source, source_prompts

__all__ = [
    "EVAL_PERCENT", "SPLITS", "PromptRecord", "Split", "SplitArg", "Task", "split_of",
    "DataSource", "load_data", "PROMPT_FIELDS", "TASKS", "get_task",
    "describe_sources", "resolve_prompts", "resolve_source", "source_prompts",
]
