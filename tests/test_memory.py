"""dspark.memory reads real resident memory: a peak window sees an allocation that has since been
freed, and starts over at the next `start()`."""

from __future__ import annotations

import pytest
import torch

from dspark.memory import MB, RssWindow, reset_peak, status_bytes

pytestmark = pytest.mark.skipif(status_bytes("VmRSS") is None or not reset_peak(),
                                reason="needs Linux /proc/self/status and /proc/self/clear_refs")


def test_window_peak_covers_a_freed_allocation_and_restarts():
    window = RssWindow().start()
    block = torch.ones(64 * MB // 4)  # 64 MiB, written, so resident
    del block  # the peak remembers it
    grown = window.growth_bytes()
    # not all of it: the kernel may drop some of this process's file-backed pages meanwhile
    assert 40 * MB <= grown < 80 * MB
    report = window.report(weights_bytes=32 * MB)
    assert report["peak_growth_over_weights"] == pytest.approx(grown / (32 * MB))
    assert report["peak_rss_mb"] * MB >= window.baseline_bytes + grown - MB
    assert window.start().growth_bytes() < 16 * MB  # a new window: the old peak is gone
