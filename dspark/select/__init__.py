"""Candidate selection: score every candidate draft with dspark's decoder on the same held-out
prompts, rank them by an objective, write the report and the winner's selection file.

Public API:
- select(candidates, target, SelectConfig(...), task=... | prompts_file=..., out=...) -> report dict
- SelectConfig, rank_candidates (pure), OBJECTIVES, HARDWARE (projection presets)
Importing this package does not import torch.
"""

from dspark.select.hardware import HARDWARE
from dspark.select.rank import OBJECTIVES, Ranking, rank_candidates

__all__ = ["HARDWARE", "OBJECTIVES", "Ranking", "SelectConfig", "rank_candidates", "select"]


def __getattr__(name):
    if name == "select":
        from dspark.select.run import select

        return select
    if name == "SelectConfig":
        from dspark.select.measure import SelectConfig

        return SelectConfig
    raise AttributeError(name)
