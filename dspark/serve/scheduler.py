"""The scheduler: one thread that owns the decoder and runs continuous batching.

Requests (`Job`s) queue up. When the decoder is idle the scheduler waits up to `batch_window_s`
(default 0: measured, a wait only delayed lone requests, since late arrivals join at the next step
anyway) for companions (or until `max_batch_size` are waiting), opens a decode session (`decoder.session()`, a
running batch) with the oldest job and every waiting job that may share its batch, and steps it.
Between any two decode steps it admits more waiting jobs with the batch's key into the running
batch (each new prompt is prefilled alone and joins the others' KV caches), up to
`max_batch_size` rows; finished rows leave at once. So a request arriving mid-batch starts within
one step instead of waiting for the longest request of the batch to finish.

Rows of one batch must share their sampling settings (the decoder samples a batch with one
generator), so the batch key is:
- greedy: ("greedy",), all greedy requests batch together (batching never changes a greedy output);
- sampling with a seed: a batch of its own, so a seeded request's draws do not depend on what else
  was running;
- sampling without a seed: (temperature, top_p, top_k).
Fairness: a running batch admits only jobs that arrived before the oldest waiting job with another
key; once such a job waits, the batch drains and that job's key runs next.

Each job's events go to its `emit` callback (thread-safe; the HTTP side bridges it into asyncio):
("text", delta) as text becomes safe to send (streaming jobs only), then exactly one final event,
("done", Outcome) or ("error", status, type, msg). Every job taken from the queue gets its final
event whatever goes wrong: an exception while admitting a job fails that job (400 for a DsparkError,
else 500), one in a decode step fails the batch's rows, and `stop()` (server shutdown) fails waiting
and running jobs with 503 (running ones after the current step). A client that went away
(`Job.cancel`) is told nothing and its row leaves the batch.

Speculative stats: every decoder event carries the request's live DecodeStats, so a request ended
by a `stop` string (answered at once; its row is then dropped from the batch) reports the exact
counts of the steps it took, like one that ran to its end (eos, length, grammar).
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
from dspark.serve.metrics import ServerMetrics, spec_decode_request_metrics
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
    # False: the client waits for the whole text, so no ("text", delta) events are sent (each would
    # wake the HTTP event loop once per decode step for nothing)
    stream: bool = True
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    id: int = field(default_factory=itertools.count().__next__)
    answered: bool = False  # its final event ("done" / "error") was sent

    def cancel(self) -> None:
        """The client went away: stop sending, and let the batch end early if nobody else needs it."""
        self.cancelled.set()

    def reply(self, item: tuple) -> None:
        """Send the final event once (a later one is dropped); a cancelled job is sent nothing."""
        if self.answered:
            return
        self.answered = True
        if not self.cancelled.is_set():
            self.emit(item)


SHUTTING_DOWN = "the server is shutting down"


def fail_job(job: Job, metrics: ServerMetrics, status: int, kind: str, message: str, cause: str) -> None:
    """Answer `job` with an error (once) and count it by cause: invalid, error, shutdown, client_gone."""
    if not job.answered:
        metrics.aborted.inc(cause=cause)
    job.reply(("error", status, kind, message))


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
            "draft_forwards": stats.draft_forwards, "mode": getattr(stats, "mode", None), "partial": False,
            **spec_decode_request_metrics(stats.drafted_per_position, stats.accepted_per_position)}


class _Row:
    """A job inside a running batch."""

    def __init__(self, job: Job, tokenizer, policy: str, metrics: ServerMetrics):
        self.job, self.policy, self.metrics = job, policy, metrics
        self.text = TextStream(tokenizer, job.stop, incremental=job.stream or bool(job.stop))
        self.done = False
        self.steps = self.accepted = self.emitted = 0
        self.first_token_at: float | None = None

    def fail(self, status: int, kind: str, message: str, cause: str) -> None:
        self.done = True
        fail_job(self.job, self.metrics, status, kind, message, cause)

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
        if delta and self.job.stream:
            self.job.emit(("text", delta))
        if ev.result is not None:
            reason = "stop" if self.text.stopped else ev.result.finish_reason
            self._finish(reason, speculative_from_stats(ev.result.stats, self.policy), ev.result.stats)
        elif self.text.stopped:
            if ev.stats is not None:
                self._finish("stop", speculative_from_stats(ev.stats, self.policy), ev.stats)
            else:
                spec = {"draft_length": self.policy, "drafted": None, "accepted": self.accepted,
                        "acceptance_rate": None,
                        "mean_accepted_tokens": self.emitted / self.steps if self.steps else 0.0,
                        "verify_steps": self.steps, "target_forwards": None, "draft_forwards": None,
                        "mode": None, "partial": True}
                self._finish("stop", spec, None)

    def _finish(self, reason: str, spec: dict, stats) -> None:
        tail = self.text.finish()
        if tail and self.job.stream:
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
            m.observe_spec_decode(stats.drafted_per_position, stats.accepted_per_position)
        else:
            m.verify_steps.inc(self.steps)
            m.emitted.inc(self.emitted)
        self.job.reply(("done", Outcome(self.text.text, list(self.text.ids), reason, n_prompt, n_gen, spec)))


class Scheduler:
    """Owns the decoder's thread."""

    def __init__(self, decoder, tokenizer, *, policy: str, metrics: ServerMetrics, max_batch_size: int = 8,
                 batch_window_s: float = 0.0):
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
        """Refuse new jobs, fail the waiting ones and (after its current step) the running batch with
        503, and wait for the thread. Idempotent."""
        with self._cond:
            self._stopping = True
            left = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for job in left:
            fail_job(job, self.metrics, 503, "server_error", SHUTTING_DOWN, "shutdown")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue jobs (all choices of one request are queued together, so they can share a batch)."""
        with self._cond:
            if self._stopping:
                raise DsparkError(SHUTTING_DOWN)
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

    def _more(self, key: tuple, room: int) -> list[Job]:
        """Waiting jobs that may join the running batch with `key` (oldest first, at most `room`): those
        that arrived before the oldest waiting job of another key."""
        if room <= 0:
            return []
        with self._cond:
            if self._stopping or not self._pending:
                return []
            take, keep = [], collections.deque()
            blocked = False
            while self._pending:
                job = self._pending.popleft()
                if not blocked and len(take) < room and batch_key(job) == key:
                    take.append(job)
                else:
                    blocked = blocked or batch_key(job) != key
                    keep.append(job)
            self._pending.extend(keep)
            return take

    def _add(self, session, rows: dict, jobs: list[Job]):
        """Admit `jobs` into `session` (rows: job id -> _Row); a job that cannot be admitted is failed
        alone. Returns the session to go on with: a fresh one when a failed admission may have left
        an empty session half set up (e.g. its sampling generator)."""
        now = time.perf_counter()
        for job in jobs:
            self.metrics.queue_time.observe(now - job.arrived)
            if job.cancelled.is_set():
                fail_job(job, self.metrics, 499, "invalid_request_error", "client closed the request", "client_gone")
                continue
            row = _Row(job, self.tokenizer, self.policy, self.metrics)
            try:
                session.add([job.prompt_ids], [job.config], [job.constraint], row_ids=[job.id])
            except DsparkError as e:
                row.fail(400, "invalid_request_error", str(e), "invalid")
                continue
            except Exception as e:  # noqa: BLE001 - any failure must reach the request, not hang it
                log.exception("admitting a request failed")
                row.fail(500, "server_error", f"admitting the request failed: {type(e).__name__}: {e}", "error")
                if not rows:
                    session = self.decoder.session()
                continue
            rows[job.id] = row
        self._running = len(rows)
        if jobs:
            self.metrics.batch_size.observe(len(rows))
        return session

    def run_batch(self, batch: list[Job]) -> None:
        """Decode `batch` in one session, admitting waiting jobs with its key between steps, until no
        row is left; every job taken gets its final event, whatever fails."""
        self.batches += 1
        taken = list(batch)
        rows: dict[int, _Row] = {}
        try:
            key = batch_key(batch[0])
            session = self._add(self.decoder.session(), rows, batch)
            while rows:
                if self._stopping:
                    for r in rows.values():
                        r.fail(503, "server_error", SHUTTING_DOWN, "shutdown")
                    return
                for ev in session.step():
                    row = rows.get(ev.row)
                    if row is None or row.done:
                        continue
                    try:
                        row.on_event(ev)
                    except Exception as e:  # noqa: BLE001 - e.g. the tokenizer failing on this row's text
                        log.exception("finishing a request failed")
                        row.fail(500, "server_error", f"{type(e).__name__}: {e}", "error")
                for jid, row in list(rows.items()):
                    if row.done or row.job.cancelled.is_set():
                        if not row.job.answered:  # its client went away mid-decode
                            fail_job(row.job, self.metrics, 499, "invalid_request_error", "client closed the request",
                                     "client_gone")
                        session.cancel(jid)  # a no-op for rows the decoder finished itself
                        del rows[jid]
                more = self._more(key, self.max_batch_size - len(rows))
                taken.extend(more)
                session = self._add(session, rows, more)
        except Exception as e:
            log.exception("decoding failed")
            for job in taken:
                fail_job(job, self.metrics, 500, "server_error", f"decoding failed: {type(e).__name__}: {e}", "error")
        finally:
            self._running = 0
