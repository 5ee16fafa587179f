"""The scheduler (batch keys, batching, stop strings, cancellation, decoder failures) and the
Prometheus rendering; the last test batches real requests through the real decoder."""

from __future__ import annotations

import collections
import queue
import threading
from dataclasses import dataclass

import pytest

from dspark.decode.types import DecodeResult, DecodeStats, GenerationConfig
from dspark.serve.metrics import Counter, Histogram, ServerMetrics
from dspark.serve.scheduler import Job, Scheduler, batch_key, take_batch
from tests.serve.test_text import ByteTokenizer


@dataclass
class Event:
    row: int
    token_ids: list
    result: DecodeResult | None = None
    stats: DecodeStats | None = None


class ScriptedSession:
    """Each row emits its prompt's scripted blocks, one block per step, with live stats (3 drafts per
    step); rows join with `add` and leave with `cancel`, like the decoder's session."""

    def __init__(self, dec: "ScriptedDecoder"):
        self.dec = dec
        self.rows: dict = {}  # row id -> (script key, blocks left, stats)
        self.admitted: list[list[int]] = []
        dec.sessions.append(self.admitted)

    def add(self, prompts, configs, constraints=None, policies=None, row_ids=None):
        for p, rid in zip(prompts, row_ids):
            self.admitted.append(list(p))
            self.rows[rid] = (p[0], list(self.dec.blocks[p[0]]), DecodeStats(prompt_tokens=len(p)))
        return row_ids

    def step(self):
        events = []
        for rid, (key, script, st) in list(self.rows.items()):
            if self.dec.fail_after is not None and self.dec.steps >= self.dec.fail_after:
                raise RuntimeError("device lost")
            self.dec.steps += 1
            block = script.pop(0)
            st.verify_steps += 1
            st.drafted += 3
            st.accepted += len(block) - 1
            st.recovered += 1
            st.generated += len(block)
            if script:
                events.append(Event(rid, block, None, st))
            else:
                del self.rows[rid]
                toks = [t for b in self.dec.blocks[key] for t in b]
                events.append(Event(rid, block, DecodeResult(toks, "length", st), st))
        return events

    def cancel(self, rid) -> bool:
        if rid in self.rows:
            self.dec.cancelled.append(rid)
        return self.rows.pop(rid, None) is not None


class ScriptedDecoder:
    """Hands out ScriptedSessions, recording what each admitted and which rows were cancelled."""

    def __init__(self, blocks: dict[int, list[list[int]]], fail_after: int | None = None):
        self.blocks, self.fail_after = blocks, fail_after
        self.sessions: list[list[list[int]]] = []
        self.cancelled: list = []
        self.steps = 0

    def session(self):
        return ScriptedSession(self)


def _job(prompt, sink, temperature=0.0, seed=None, stop=(), stream=True):
    cfg = GenerationConfig(max_new_tokens=64, temperature=temperature, seed=seed)
    return Job(prompt_ids=prompt, config=cfg, emit=lambda item: sink.put((prompt[0], item)), stop=tuple(stop),
               stream=stream)


def _drain(sink: queue.Queue) -> dict[int, list]:
    out = collections.defaultdict(list)
    while not sink.empty():
        k, item = sink.get()
        out[k].append(item)
    return out


def test_batch_keys_group_compatible_sampling_only():
    sink = queue.Queue()
    g1, g2 = _job([1], sink), _job([2], sink)
    s1, s2 = _job([3], sink, temperature=0.7), _job([4], sink, temperature=0.7)
    seeded1, seeded2 = _job([5], sink, temperature=0.7, seed=1), _job([6], sink, temperature=0.7, seed=1)
    assert batch_key(g1) == batch_key(g2) and batch_key(s1) == batch_key(s2)
    assert batch_key(seeded1) != batch_key(seeded2)  # a seeded request is decoded alone
    pending = collections.deque([s1, g1, seeded1, g2, s2, seeded2])
    assert take_batch(pending, 8) == [s1, s2]
    assert take_batch(pending, 1) == [g1]
    assert list(pending) == [seeded1, g2, seeded2]
    assert take_batch(pending, 8) == [seeded1]


def _scheduler(decoder, **kw):
    metrics = ServerMetrics("auto")
    return Scheduler(decoder, ByteTokenizer(), policy="auto", metrics=metrics, **kw), metrics


def _run_until_finished(sched: Scheduler, metrics: ServerMetrics, n: int, timeout_s: float = 10.0) -> None:
    """Start the scheduler on the jobs already queued, wait until n requests finished, stop it."""
    sched.start()
    try:
        for _ in range(int(timeout_s / 0.05)):
            if metrics.requests.total() == n:
                break
            threading.Event().wait(0.05)
    finally:
        sched.stop()


def test_jobs_queued_together_are_decoded_together_and_finish_with_stats():
    dec = ScriptedDecoder({1: [[1], [2]], 3: [[3, 4]]})
    sched, metrics = _scheduler(dec, max_batch_size=8, batch_window_s=0.0)
    sink = queue.Queue()
    jobs = [_job([1, 0], sink), _job([3, 0], sink)]
    sched.submit(jobs)  # queued before the thread starts: one batch, deterministically
    _run_until_finished(sched, metrics, 2)
    assert dec.sessions == [[[1, 0], [3, 0]]] and sched.batches == 1
    out = _drain(sink)
    done1 = out[1][-1][1]
    assert [i[1] for i in out[1][:-1]] == ["he", "llo"] and done1.text == "hello"
    assert (done1.finish_reason, done1.prompt_tokens, done1.completion_tokens) == ("length", 2, 2)
    assert done1.speculative["drafted"] == 6 and done1.speculative["partial"] is False
    assert dec.cancelled == []  # finished rows left the batch on their own
    assert out[3][-1][1].text == " world"
    assert metrics.generation_tokens.total() == 4 and metrics.batch_size.count == 1


def test_non_streaming_jobs_get_only_their_outcome():
    """A client that waits for the whole text gets no per-step text events (each would wake the HTTP
    event loop), and the same final text; a stop string still cuts it."""
    dec = ScriptedDecoder({1: [[1], [2], [3]], 3: [[1], [2], [3]]})
    sched, metrics = _scheduler(dec, max_batch_size=8, batch_window_s=0.0)
    sink = queue.Queue()
    sched.submit([_job([1, 0], sink, stream=False), _job([3, 0], sink, stream=False, stop=("o w",))])
    _run_until_finished(sched, metrics, 2)
    out = _drain(sink)
    assert [i[0] for i in out[1]] == ["done"] and out[1][0][1].text == "hello wor"
    assert [i[0] for i in out[3]] == ["done"] and out[3][0][1].text == "hell"
    assert out[3][0][1].finish_reason == "stop"


def test_stop_string_answers_early_with_exact_stats_and_leaves_the_batch():
    dec = ScriptedDecoder({1: [[1, 2], [3], [4], [4], [4]], 3: [[3], [4], [4], [4], [4]]})
    sched, metrics = _scheduler(dec)
    sink = queue.Queue()
    a, b = _job([1], sink, stop=["o w"]), _job([3], sink)
    sched.run_batch([a, b])
    items = _drain(sink)[1]
    done = items[-1][1]
    assert "".join(i[1] for i in items if i[0] == "text") == done.text == "hell"
    assert done.finish_reason == "stop" and done.completion_tokens == 3
    spec = done.speculative
    # two verify steps: blocks [1, 2] (one accepted draft + one recovered) and [3], 3 drafts each
    assert (spec["verify_steps"], spec["accepted"], spec["drafted"], spec["partial"]) == (2, 1, 6, False)
    assert spec["mean_accepted_tokens"] == pytest.approx(1.5)
    assert dec.cancelled == [a.id]  # its row left the batch; the other ran to its end
    assert metrics.drafted.total() == 6 + 15 and metrics.verify_steps.total() == 2 + 5


def test_jobs_arriving_mid_batch_join_the_running_batch():
    dec = ScriptedDecoder({1: [[1]] * 6, 3: [[3]] * 2, 5: [[4]] * 2, 7: [[5]] * 2})
    sched, metrics = _scheduler(dec, max_batch_size=2)
    sink = queue.Queue()
    first = _job([1], sink)
    late = [_job([3], sink), _job([5], sink), _job([7], sink, temperature=0.5)]
    real_step = ScriptedSession.step

    def step(self):
        if dec.steps == 1:  # after the first step: three requests arrive
            sched.submit(late)
        return real_step(self)

    ScriptedSession.step = step
    try:
        sched.run_batch([first])
    finally:
        ScriptedSession.step = real_step
    # the two greedy late jobs joined the running batch one at a time (max 2 rows); the sampled one
    # has another key: it waits for its own batch
    assert dec.sessions == [[[1], [3], [5]]]
    out = _drain(sink)
    assert all(out[k][-1][0] == "done" for k in (1, 3, 5)) and 7 not in out
    assert sched.queue_depth() == 1 and metrics.batch_size.count == 3


def test_cancelled_job_gets_nothing_and_decoder_failure_fails_the_rest():
    dec = ScriptedDecoder({1: [[1], [2], [3]], 3: [[3], [4], [4]]}, fail_after=2)
    sched, _ = _scheduler(dec)
    sink = queue.Queue()
    a, b = _job([1], sink), _job([3], sink)
    b.cancel()
    sched.run_batch([a, b])
    out = _drain(sink)
    assert 3 not in out  # cancelled before its batch: never decoded, never told
    assert dec.sessions == [[[1]]]
    assert out[1][-1][0] == "error" and out[1][-1][1] == 500 and "device lost" in out[1][-1][3]


def test_metrics_text_format():
    c = Counter("x_total", "help text", ("route",))
    c.inc(route='/a"b')
    c.inc(2, route="/c")
    assert list(c.render()) == ["# HELP x_total help text", "# TYPE x_total counter",
                                'x_total{route="/a\\"b"} 1', 'x_total{route="/c"} 2']
    h = Histogram("lat_seconds", "h", (0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    lines = list(h.render())
    assert 'lat_seconds_bucket{le="0.1"} 2' in lines and 'lat_seconds_bucket{le="1"} 3' in lines
    assert 'lat_seconds_bucket{le="+Inf"} 4' in lines and "lat_seconds_count 4" in lines
    m = ServerMetrics("static:4")
    m.drafted.inc(10)
    m.accepted.inc(7)
    m.verify_steps.inc(4)
    m.emitted.inc(11)
    text = m.render()
    assert "dspark_acceptance_rate 0.7\n" in text and "dspark_mean_accepted_tokens 2.75\n" in text
    assert "dspark_draft_length 2.5\n" in text and 'dspark_draft_length_policy_info{policy="static:4"} 1' in text
    with pytest.raises(ValueError):
        c.inc(-1, route="/a")


def test_real_decoder_batch_equals_one_by_one(runtime):
    """Four greedy requests decoded as one batch give exactly what each gives alone."""
    prompts = ["def add(a, b):", "import sys\n", "class A:\n    def", "x = 1\ny ="]
    ids = [runtime.tokenizer(p)["input_ids"] for p in prompts]
    alone = [runtime.decoder.generate([i], GenerationConfig(max_new_tokens=12))[0].token_ids for i in ids]
    sched = Scheduler(runtime.decoder, runtime.tokenizer, policy=runtime.policy, metrics=ServerMetrics("auto"))
    sink = queue.Queue()
    jobs = [Job(prompt_ids=i, config=GenerationConfig(max_new_tokens=12),
                emit=lambda item, k=k: sink.put((k, item))) for k, i in enumerate(ids)]
    sched.run_batch(jobs)
    out = _drain(sink)
    assert [out[k][-1][1].token_ids for k in range(4)] == alone
    assert sched.batches == 1


def test_any_failure_answers_the_jobs_it_concerns():
    """An exception anywhere in the scheduler fails the request(s) it concerns with an error event;
    before, one raised while admitting a job (a seed torch refuses) left its client waiting forever."""
    dec = ScriptedDecoder({1: [[1], [2]], 3: [[3], [4]], 5: [[5]]})
    real_add = ScriptedSession.add

    def add(self, prompts, configs, constraints=None, policies=None, row_ids=None):
        if prompts[0][0] == 3:
            raise ValueError("Overflow when unpacking long")
        return real_add(self, prompts, configs, constraints, policies, row_ids)

    sched, metrics = _scheduler(dec)
    sink = queue.Queue()
    ScriptedSession.add = add
    try:
        sched.run_batch([_job([1], sink), _job([3], sink), _job([5], sink)])
    finally:
        ScriptedSession.add = real_add
    out = _drain(sink)
    assert out[3] == [("error", 500, "server_error", "admitting the request failed: ValueError: Overflow when "
                                                        "unpacking long")]
    assert out[1][-1][0] == "done" and out[5][-1][0] == "done"  # the others were decoded
    assert metrics.aborted.total() == 1

    # the decoder cannot even open a session: every job of the batch is told
    class Broken(ScriptedDecoder):
        def session(self):
            raise RuntimeError("CUDA error: out of memory")

    sched, metrics = _scheduler(Broken({}))
    sched.run_batch([_job([1], sink), _job([3], sink)])
    out = _drain(sink)
    assert [out[k][-1][:2] for k in (1, 3)] == [("error", 500)] * 2 and "out of memory" in out[1][-1][3]

    # turning one row's tokens into text fails: that row fails, the other finishes
    class Picky(ByteTokenizer):
        def decode(self, ids, skip_special_tokens=False):
            if 4 in ids:
                raise KeyError(4)
            return super().decode(ids, skip_special_tokens)

    dec = ScriptedDecoder({1: [[1], [2]], 3: [[3], [4]]})
    sched = Scheduler(dec, Picky(), policy="auto", metrics=ServerMetrics("auto"))
    sched.run_batch([_job([1], sink), _job([3], sink)])
    out = _drain(sink)
    assert out[3][-1][:2] == ("error", 500) and out[1][-1][0] == "done"
    assert sum(1 for k in out for item in out[k] if item[0] in ("done", "error")) == 2  # one final event each


def test_stop_fails_waiting_and_running_jobs_with_503():
    """At shutdown the running batch is failed after its current step, not decoded to its end."""
    dec = ScriptedDecoder({1: [[1]] * 50, 3: [[3]] * 50})
    sched, metrics = _scheduler(dec)
    sink = queue.Queue()
    running, waiting = _job([1], sink), _job([3], sink, temperature=0.5)  # another key: it waits
    real_step = ScriptedSession.step

    def step(self):
        if dec.steps == 2:
            threading.Thread(target=sched.stop).start()  # the HTTP side's shutdown, from another thread
            while not sched._stopping:
                threading.Event().wait(0.01)
        return real_step(self)

    sched.submit([waiting])
    ScriptedSession.step = step
    try:
        sched.run_batch([running])
    finally:
        ScriptedSession.step = real_step
    out = _drain(sink)
    assert out[1][-1] == ("error", 503, "server_error", "the server is shutting down") and dec.steps < 10
    assert out[3] == [("error", 503, "server_error", "the server is shutting down")]
    assert metrics.aborted.total() == 2
