"""This process's resident memory, measured (never estimated): for the reports that promise a peak
(`dspark bench --json`, `dspark select`'s peak_memory_mb) and benchmarks/bench_memory.py.

Linux: /proc/self/status gives the resident size now (VmRSS) and its peak (VmHWM); writing "5" to
/proc/self/clear_refs resets the peak to the current size, so a peak can cover one span of work.
Where those files are missing (not Linux) the readings are None.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MB = 1024 * 1024


def status_bytes(field: str) -> int | None:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM, RssAnon, ...) in bytes, or None."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            text = fh.read()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.M)
    return int(m.group(1)) * 1024 if m else None


def release_memory() -> None:
    """Return freed memory to the OS (glibc keeps it otherwise), so the next RSS reading means
    what is in use."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak() -> bool:
    """Reset the peak resident size (VmHWM) to the current one; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


@dataclass
class RssWindow:
    """The peak resident size over a span of work. `start()` frees what it can, records the resident
    size (the baseline) and resets the peak; `peak_bytes()` reads the peak since then. Where the
    reset is unavailable the peak is since process start, and `method` says so."""

    baseline_bytes: int | None = None
    method: str = "peak RSS (VmHWM)"

    def start(self) -> "RssWindow":
        release_memory()
        if not reset_peak():
            self.method = "peak RSS (VmHWM, since process start)"
        self.baseline_bytes = status_bytes("VmRSS")
        return self

    @staticmethod
    def peak_bytes() -> int | None:
        return status_bytes("VmHWM")

    def growth_bytes(self) -> int | None:
        """Peak minus baseline: what the span added at its highest."""
        peak = self.peak_bytes()
        if peak is None or self.baseline_bytes is None:
            return None
        return max(0, peak - self.baseline_bytes)

    def report(self, weights_bytes: int) -> dict:
        """The `memory` block of a report: baseline and peak RSS, the weights the span loaded, and
        (peak - baseline) / weights (1.0 would be the weights alone; KV caches, activations,
        tokenizers and the runtime's own allocations come on top)."""
        peak, growth = self.peak_bytes(), self.growth_bytes()
        return {"method": self.method,
                "baseline_rss_mb": None if self.baseline_bytes is None else self.baseline_bytes / MB,
                "peak_rss_mb": None if peak is None else peak / MB,
                "weights_mb": weights_bytes / MB,
                "peak_growth_over_weights": None if growth is None or not weights_bytes else growth / weights_bytes}


class MemoryProbe:
    """Peak memory over a span on one device: CPU, the resident size (RssWindow); CUDA,
    torch.cuda.max_memory_allocated. Both minus the reading at `start()`."""

    def __init__(self, device: str):
        import torch

        self.cuda = torch.device(device).type == "cuda"
        self.device = device
        self.base = 0
        self.window = RssWindow()
        self.method = "torch.cuda.max_memory_allocated" if self.cuda else "peak RSS (VmHWM) delta"

    def start(self) -> None:
        if self.cuda:
            import torch

            release_memory()
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        self.window.start()
        self.method = self.window.method + " delta"

    def peak_mb(self) -> float | None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            return max(0, torch.cuda.max_memory_allocated(self.device) - self.base) / MB
        growth = self.window.growth_bytes()
        return None if growth is None else growth / MB
