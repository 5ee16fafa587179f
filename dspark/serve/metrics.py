"""Server metrics in the Prometheus text exposition format (version 0.0.4), without a client library.

Counters and histograms are updated from the scheduler thread and the request handlers, so every
instrument takes a lock. Derived gauges (acceptance rate, mean accepted tokens, draft length) are
computed from the counters at scrape time, over every request since start-up, with the terms of
dspark.decode.types.

Alongside the `dspark_*` series the speculative counters are exposed under vLLM's names and labels
(vllm/v1/spec_decode/metrics.py, `SpecDecodingProm`, read at vllm-project/vllm commit ee4ceaae:
counters `vllm:spec_decode_num_drafts`, `..._num_draft_tokens`, `..._num_accepted_tokens`,
`..._num_accepted_tokens_per_pos` with labels model_name, engine (+ position); the `_total` suffix is
what prometheus_client appends to a counter's samples), so dashboards and benchmark tools built for
vLLM read dspark unchanged. They are updated when a request finishes, like the `dspark_*` counters.
The same quantities per request (`spec_decode_request_metrics`) follow vLLM's per-request acceptance
metrics (docs/features/speculative_decoding/acceptance_metrics.md).
"""

from __future__ import annotations

import bisect
import math
import threading
from typing import Callable, Iterable

# labels of every vLLM-named series; dspark serves one model on one engine (vLLM's engine index 0)
VLLM_LABELS = ("model_name", "engine")
VLLM_ENGINE = "0"
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


def acceptance_histogram(drafted_per_position: list[int], accepted_per_position: list[int]) -> list[int]:
    """Verify steps that accepted exactly j drafted tokens, j = 0..P (vLLM's per-request
    `acceptance_histogram`; the bonus token is not counted), from dspark's per-position counts
    (dspark.decode.types.DecodeStats): drafted_per_position[j] = steps that drafted a token at position
    j; accepted_per_position[j] = steps whose first j + 1 drafts were all accepted (verification stops
    at the first rejection). Both [P] -> [P + 1]: h[0] = d[0] - a[0], h[j] = a[j-1] - a[j], a[P] = 0."""
    if not drafted_per_position:
        return [0]
    a = list(accepted_per_position) + [0]
    return [drafted_per_position[0] - a[0]] + [a[j - 1] - a[j] for j in range(1, len(a))]


def _spec_decode_fields(steps: int, drafted: int, accepted: int, histogram: list[int],
                        accepted_per_position: list[int]) -> dict:
    """vLLM's per-request field names. Mean acceptance length counts the bonus token and only steps
    that drafted (vLLM: 1 + accepted / steps; 1.0 when nothing was drafted)."""
    return {"mean_acceptance_length": 1.0 + accepted / steps if steps else 1.0,
            "draft_acceptance_rate": accepted / drafted if drafted else 0.0,
            "acceptance_histogram": histogram, "accepted_per_position": accepted_per_position,
            "num_spec_steps": steps, "num_draft_tokens": drafted, "num_accepted_draft_tokens": accepted}


SPEC_DECODE_FIELDS = tuple(_spec_decode_fields(0, 0, 0, [0], []))


def spec_decode_request_metrics(drafted_per_position: list[int], accepted_per_position: list[int]) -> dict:
    """One request's speculative stats as vLLM reports them per request: mean_acceptance_length,
    draft_acceptance_rate, acceptance_histogram, num_spec_steps (verify steps that drafted at least one
    token, = its share of `vllm:spec_decode_num_drafts`), num_draft_tokens, num_accepted_draft_tokens,
    plus accepted_per_position (its share of `vllm:spec_decode_num_accepted_tokens_per_pos`).
    vLLM's `acceptance_histogram_by_draft_length` and `num_spec_tokens` are not given: per-position
    counts do not say which steps drafted how many, and dspark's draft length is not one fixed K."""
    steps = drafted_per_position[0] if drafted_per_position else 0
    return _spec_decode_fields(steps, sum(drafted_per_position), sum(accepted_per_position),
                               acceptance_histogram(drafted_per_position, accepted_per_position),
                               list(accepted_per_position))


def _add_padded(lists: list[list[int]]) -> list[int]:
    n = max(len(x) for x in lists)
    return [sum(x[i] for x in lists if i < len(x)) for i in range(n)]


def merge_spec_decode_metrics(specs: list[dict]) -> dict:
    """The vLLM-named fields over several choices of one request (counts and histograms summed,
    ratios recomputed); every field None when one choice has none (its stats were partial)."""
    if any(s.get("num_spec_steps") is None for s in specs):
        return dict.fromkeys(SPEC_DECODE_FIELDS)
    return _spec_decode_fields(sum(s["num_spec_steps"] for s in specs), sum(s["num_draft_tokens"] for s in specs),
                               sum(s["num_accepted_draft_tokens"] for s in specs),
                               _add_padded([s["acceptance_histogram"] for s in specs]),
                               _add_padded([s["accepted_per_position"] for s in specs]))


class ServerMetrics:
    """Every instrument the server exposes. `queue_depth` / `running` are read from the scheduler;
    `model_name` is the `model_name` label of the vLLM-named series (the served model id)."""

    def __init__(self, draft_length: str, queue_depth: Callable[[], int] = lambda: 0,
                 running: Callable[[], int] = lambda: 0, model_name: str = ""):
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
        # vLLM's names and help texts (vllm/v1/spec_decode/metrics.py, SpecDecodingProm)
        self.vllm_labels = {"model_name": model_name, "engine": VLLM_ENGINE}
        self.vllm_drafts = Counter("vllm:spec_decode_num_drafts_total", "Number of spec decoding drafts.",
                                   VLLM_LABELS)
        self.vllm_draft_tokens = Counter("vllm:spec_decode_num_draft_tokens_total", "Number of draft tokens.",
                                         VLLM_LABELS)
        self.vllm_accepted_tokens = Counter("vllm:spec_decode_num_accepted_tokens_total",
                                            "Number of accepted tokens.", VLLM_LABELS)
        self.vllm_accepted_per_pos = Counter("vllm:spec_decode_num_accepted_tokens_per_pos_total",
                                             "Accepted tokens per draft position.", VLLM_LABELS + ("position",))
        for c in (self.vllm_drafts, self.vllm_draft_tokens, self.vllm_accepted_tokens):
            c.inc(0, **self.vllm_labels)  # present from start-up at 0, as vLLM's are

    def observe_spec_decode(self, drafted_per_position: list[int], accepted_per_position: list[int]) -> None:
        """A finished request's speculative counts into the vLLM-named counters (a "draft" is a verify
        step that drafted at least one token; position i counts the steps whose first i + 1 drafts were
        all accepted: vLLM's `SpecDecodingStats.observe_draft`). Positions appear as they are drafted."""
        s = spec_decode_request_metrics(drafted_per_position, accepted_per_position)
        self.vllm_drafts.inc(s["num_spec_steps"], **self.vllm_labels)
        self.vllm_draft_tokens.inc(s["num_draft_tokens"], **self.vllm_labels)
        self.vllm_accepted_tokens.inc(s["num_accepted_draft_tokens"], **self.vllm_labels)
        for pos, n in enumerate(s["accepted_per_position"]):
            self.vllm_accepted_per_pos.inc(n, **self.vllm_labels, position=str(pos))

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
                     self.ttft, self.queue_time, self.batch_size, self.vllm_drafts, self.vllm_draft_tokens,
                     self.vllm_accepted_tokens, self.vllm_accepted_per_pos):
            parts.extend(inst.render())
        return "\n".join(parts) + "\n"
