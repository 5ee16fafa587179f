"""The scheduler: one thread that owns the decoder and feeds it batches of concurrent requests.

Requests (`Job`s) queue up; when the decoder is free the scheduler waits up to `batch_window_s` for
companions (or until `max_batch_size` are waiting), then takes the oldest job and every waiting job
that may share its batch, oldest first, and decodes them together with `SpeculativeDecoder.stream`.
Rows of one batch must share their sampling settings (the decoder samples a batch with one
generator), so the batch key is:
- greedy: ("greedy",), all greedy requests batch together (batching never changes a greedy output);
- sampling with a seed: a batch of its own, so a seeded request's draws do not depend on what else
  was running;
- sampling without a seed: (temperature, top_p, top_k).
The decoder decodes a batch to the end; requests that arrive meanwhile wait for the next batch.

Each job's events go to its `emit` callback (thread-safe; the HTTP side bridges it into asyncio):
("text", delta) as text becomes safe to send, then ("done", Outcome) or ("error", status, type, msg).

Speculative stats: a request that runs to its end (eos, length, grammar) reports the decoder's
DecodeStats. A request ended by a `stop` string is answered at once while the decoder's row may go on;
it reports what the events up to the stop show exactly: verify steps, accepted drafts (each non-final
step emits its accepted drafts plus one recovered-or-bonus token) and mean accepted tokens; the drafted
count is not visible in events, so drafted and acceptance_rate are null there ("partial": true).
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from dspark.errors import DsparkError
from dspark.serve.metrics import ServerMetrics
from dspark.serve.text import TextStream

log = logging.getLogger("dspark.serve")

Emit = Callable[[tuple], None]


@dataclass
class Outcome:
    """One finished choice."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    speculative: dict


@dataclass
class Job:
    """One choice to generate. `constraint`: a fresh per-request TokenConstraint (grammar) or None."""

    prompt_ids: list[int]
    config: Any  # GenerationConfig
    emit: Emit
    constraint: Any = None
    stop: tuple[str, ...] = ()
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    id: int = field(default_factory=itertools.count().__next__)

    def cancel(self) -> None:
        """The client went away: stop sending, and let the batch end early if nobody else needs it."""
        self.cancelled.set()


def batch_key(job: Job) -> tuple:
    cfg = job.config
    if cfg.greedy:
        return ("greedy",)
    if cfg.seed is not None:
        return ("seeded", job.id)
    return ("sample", cfg.temperature, cfg.top_p, cfg.top_k)


def take_batch(pending: "collections.deque[Job]", max_batch_size: int) -> list[Job]:
    """Remove and return the oldest job and the waiting jobs with its batch key, oldest first."""
    key = batch_key(pending[0])
    batch, keep = [], collections.deque()
    while pending:
        job = pending.popleft()
        if len(batch) < max_batch_size and batch_key(job) == key:
            batch.append(job)
        else:
            keep.append(job)
    pending.extend(keep)
    return batch


def speculative_from_stats(stats, policy: str) -> dict:
    return {"draft_length": policy, "drafted": stats.drafted, "accepted": stats.accepted,
            "acceptance_rate": stats.acceptance_rate, "mean_accepted_tokens": stats.mean_accepted_tokens,
            "verify_steps": stats.verify_steps, "target_forwards": stats.target_forwards,
            "draft_forwards": stats.draft_forwards, "partial": False}


class _Row:
    """A job inside a running batch."""

    def __init__(self, job: Job, tokenizer, policy: str, metrics: ServerMetrics):
        self.job, self.policy, self.metrics = job, policy, metrics
        self.text = TextStream(tokenizer, job.stop)
        self.done = False
        self.steps = self.accepted = self.emitted = 0
        self.first_token_at: float | None = None

    def fail(self, status: int, kind: str, message: str) -> None:
        self.done = True
        if not self.job.cancelled.is_set():
            self.job.emit(("error", status, kind, message))

    def on_event(self, ev) -> None:
        if self.job.cancelled.is_set():
            self.done = True
            return
        if ev.token_ids and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
            self.metrics.ttft.observe(self.first_token_at - self.job.arrived)
        self.steps += 1
        self.emitted += len(ev.token_ids)
        if ev.result is None:
            self.accepted += max(len(ev.token_ids) - 1, 0)
        delta = self.text.push(ev.token_ids)
        if delta:
            self.job.emit(("text", delta))
        if ev.result is not None:
            reason = "stop" if self.text.stopped else ev.result.finish_reason
            self._finish(reason, speculative_from_stats(ev.result.stats, self.policy), ev.result.stats)
        elif self.text.stopped:
            spec = {"draft_length": self.policy, "drafted": None, "accepted": self.accepted,
                    "acceptance_rate": None,
                    "mean_accepted_tokens": self.emitted / self.steps if self.steps else 0.0,
                    "verify_steps": self.steps, "target_forwards": None, "draft_forwards": None,
                    "partial": True}
            self._finish("stop", spec, None)

    def _finish(self, reason: str, spec: dict, stats) -> None:
        tail = self.text.finish()
        if tail:
            self.job.emit(("text", tail))
        self.done = True
        m = self.metrics
        n_prompt, n_gen = len(self.job.prompt_ids), len(self.text.ids)
        m.requests.inc(finish_reason=reason)
        m.prompt_tokens.inc(n_prompt)
        m.generation_tokens.inc(n_gen)
        m.latency.observe(time.perf_counter() - self.job.arrived)
        if stats is not None:
            m.drafted.inc(stats.drafted)
            m.accepted.inc(stats.accepted)
            m.verify_steps.inc(stats.verify_steps)
            m.emitted.inc(stats.accepted + stats.recovered + stats.bonus)
        else:
            m.verify_steps.inc(self.steps)
            m.emitted.inc(self.emitted)
        self.job.emit(("done", Outcome(self.text.text, list(self.text.ids), reason, n_prompt, n_gen, spec)))


class Scheduler:
    """Owns the decoder's thread."""

    def __init__(self, decoder, tokenizer, *, policy: str, metrics: ServerMetrics, max_batch_size: int = 8,
                 batch_window_s: float = 0.01):
        if max_batch_size < 1:
            raise DsparkError(f"--max-batch-size must be >= 1, got {max_batch_size}")
        if batch_window_s < 0:
            raise DsparkError(f"batch window must be >= 0 seconds, got {batch_window_s}")
        self.decoder, self.tokenizer, self.policy, self.metrics = decoder, tokenizer, policy, metrics
        self.max_batch_size, self.batch_window_s = max_batch_size, batch_window_s
        self._pending: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._running = 0
        self._thread: threading.Thread | None = None
        self.batches = 0

    # -- state read by /health and /metrics ------------------------------------------------------

    def queue_depth(self) -> int:
        with self._cond:
            return len(self._pending)

    def running(self) -> int:
        return self._running

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    # -- life cycle ------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="dspark-scheduler", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            left = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for job in left:
            job.emit(("error", 503, "server_error", "the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue jobs (all choices of one request are queued together, so they can share a batch)."""
        with self._cond:
            if self._stopping:
                raise DsparkError("the server is shutting down")
            self._pending.extend(jobs)
            self._cond.notify_all()

    # -- the thread ------------------------------------------------------------------------------

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            deadline = time.perf_counter() + self.batch_window_s
            while len(self._pending) < self.max_batch_size and not self._stopping:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._cond.wait(left)
            if self._stopping:
                return None
            batch = take_batch(self._pending, self.max_batch_size)
            self._running = len(batch)
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self.run_batch(batch)
            except Exception:  # keep serving: the batch's jobs were already failed
                log.exception("batch failed")
            finally:
                self._running = 0

    def run_batch(self, batch: list[Job]) -> None:
        start = time.perf_counter()
        self.batches += 1
        self.metrics.batch_size.observe(len(batch))
        rows = []
        for job in batch:
            self.metrics.queue_time.observe(start - job.arrived)
            if not job.cancelled.is_set():
                rows.append(_Row(job, self.tokenizer, self.policy, self.metrics))
        if not rows:
            return
        try:
            events = self.decoder.stream([r.job.prompt_ids for r in rows], [r.job.config for r in rows],
                                         [r.job.constraint for r in rows])
        except DsparkError as e:
            for r in rows:
                r.fail(400, "invalid_request_error", str(e))
            return
        try:
            for ev in events:
                row = rows[ev.row]
                if not row.done:
                    row.on_event(ev)
                if all(r.done or r.job.cancelled.is_set() for r in rows):
                    break
        except Exception as e:
            log.exception("decoding failed")
            for r in rows:
                if not r.done:
                    r.fail(500, "server_error", f"decoding failed: {type(e).__name__}: {e}")
        finally:
            events.close()
