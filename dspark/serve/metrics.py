"""Server metrics in the Prometheus text exposition format (version 0.0.4), without a client library.

Counters and histograms are updated from the scheduler thread and the request handlers, so every
instrument takes a lock. Derived gauges (acceptance rate, mean accepted tokens, draft length) are
computed from the counters at scrape time, over every request since start-up, with the terms of
dspark.decode.types.
"""

from __future__ import annotations

import bisect
import math
import threading
from typing import Callable, Iterable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Labels = tuple[tuple[str, str], ...]


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt_labels(labels: Labels, extra: Labels = ()) -> str:
    items = labels + extra
    if not items:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in items) + "}"


def _fmt_value(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if float(v).is_integer():
        return str(int(v))
    return repr(float(v))


class Counter:
    def __init__(self, name: str, help: str, labelnames: tuple[str, ...] = ()):
        self.name, self.help, self.labelnames = name, help, labelnames
        self._values: dict[Labels, float] = {}
        self._lock = threading.Lock()
        if not labelnames:
            self._values[()] = 0.0

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError(f"counter {self.name} cannot decrease")
        key = tuple((k, str(labels[k])) for k in self.labelnames)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        key = tuple((k, str(labels[k])) for k in self.labelnames)
        with self._lock:
            return self._values.get(key, 0.0)

    def total(self) -> float:
        with self._lock:
            return sum(self._values.values())

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        with self._lock:
            items = sorted(self._values.items())
        for labels, v in items:
            yield f"{self.name}{_fmt_labels(labels)} {_fmt_value(v)}"


class Gauge:
    """A gauge read from a callable at scrape time (queue depth, derived ratios)."""

    def __init__(self, name: str, help: str, read: Callable[[], float], labels: Labels = ()):
        self.name, self.help, self.read, self.labels = name, help, read, labels

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} gauge"
        yield f"{self.name}{_fmt_labels(self.labels)} {_fmt_value(float(self.read()))}"


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help = name, help
        self.bounds = tuple(sorted(buckets))
        self._counts = [0] * (len(self.bounds) + 1)  # last: above every bound (+Inf only)
        self._sum = 0.0
        self._n = 0
        self._lock = threading.Lock()

    def observe(self, v: float) -> None:
        i = bisect.bisect_left(self.bounds, v)
        with self._lock:
            self._counts[i] += 1
            self._sum += v
            self._n += 1

    @property
    def count(self) -> int:
        with self._lock:
            return self._n

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        with self._lock:
            counts, total, n = list(self._counts), self._sum, self._n
        cum = 0
        for bound, c in zip(self.bounds, counts):
            cum += c
            yield f"{self.name}_bucket{_fmt_labels((('le', _fmt_value(bound)),))} {cum}"
        yield f'{self.name}_bucket{{le="+Inf"}} {n}'
        yield f"{self.name}_sum {_fmt_value(total)}"
        yield f"{self.name}_count {n}"


class ServerMetrics:
    """Every instrument the server exposes. `queue_depth` / `running` are read from the scheduler."""

    def __init__(self, draft_length: str, queue_depth: Callable[[], int] = lambda: 0,
                 running: Callable[[], int] = lambda: 0):
        self.http_requests = Counter("dspark_http_requests_total", "HTTP requests by route and status code.",
                                     ("route", "status"))
        self.requests = Counter("dspark_requests_total", "Generation requests finished, by finish reason.",
                                ("finish_reason",))
        self.aborted = Counter("dspark_requests_aborted_total",
                               "Generation requests that ended without a result, by cause: invalid (refused by the "
                               "decoder), error, shutdown, client_gone (the client closed the connection).",
                               ("cause",))
        self.prompt_tokens = Counter("dspark_prompt_tokens_total", "Prompt tokens of finished requests.")
        self.generation_tokens = Counter("dspark_generation_tokens_total", "Tokens generated for finished requests.")
        self.drafted = Counter("dspark_drafted_tokens_total", "Drafted tokens the target verified.")
        self.accepted = Counter("dspark_accepted_tokens_total", "Drafted tokens the target accepted.")
        self.verify_steps = Counter("dspark_verify_steps_total", "Target verify forwards.")
        self.emitted = Counter("dspark_emitted_tokens_total",
                               "Tokens emitted by verify steps (accepted + recovered + bonus).")
        self.latency = Histogram("dspark_request_latency_seconds", "Request latency, arrival to last token.",
                                 LATENCY_BUCKETS)
        self.ttft = Histogram("dspark_time_to_first_token_seconds", "Arrival to first generated token.",
                              LATENCY_BUCKETS)
        self.queue_time = Histogram("dspark_queue_time_seconds", "Arrival to the start of its batch.",
                                    LATENCY_BUCKETS)
        self.batch_size = Histogram("dspark_batch_size", "Requests decoded together per batch.", BATCH_BUCKETS)
        self._gauges = [
            Gauge("dspark_queue_depth", "Requests waiting for a batch.", queue_depth),
            Gauge("dspark_running_requests", "Requests being decoded.", running),
            Gauge("dspark_acceptance_rate", "accepted / drafted since start-up.", self.acceptance_rate),
            Gauge("dspark_mean_accepted_tokens",
                  "Tokens per target verify forward since start-up (bonus included; target-only = 1).",
                  self.mean_accepted_tokens),
            Gauge("dspark_draft_length", "Mean drafted tokens per verify step since start-up.", self.mean_draft_length),
            Gauge("dspark_draft_length_policy_info", "The draft-length policy in use.", lambda: 1,
                  (("policy", draft_length),)),
        ]

    def acceptance_rate(self) -> float:
        d = self.drafted.total()
        return self.accepted.total() / d if d else 0.0

    def mean_accepted_tokens(self) -> float:
        s = self.verify_steps.total()
        return self.emitted.total() / s if s else 0.0

    def mean_draft_length(self) -> float:
        s = self.verify_steps.total()
        return self.drafted.total() / s if s else 0.0

    def render(self) -> str:
        parts: list[str] = []
        for inst in (self.http_requests, self.requests, self.aborted, self.prompt_tokens, self.generation_tokens,
                     self.drafted, self.accepted, self.verify_steps, self.emitted, *self._gauges, self.latency,
                     self.ttft, self.queue_time, self.batch_size):
            parts.extend(inst.render())
        return "\n".join(parts) + "\n"
