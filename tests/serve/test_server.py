"""The OpenAI-compatible server, driven by the official `openai` client against a real uvicorn server."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest

MODEL = "tiny-pair"
PROMPTS = ["def add(a, b):", "import os\n", "class Stack:\n", "for i in range(10):",
           "# read a file\n", "def main():\n    ", "x = [", "while True:\n"]


def _direct_greedy(runtime, prompt: str, n: int) -> str:
    """What the decoder itself produces for the prompt (the server must not change it)."""
    from dspark.decode import GenerationConfig

    ids = runtime.tokenizer(prompt)["input_ids"]
    out = runtime.decoder.generate([ids], GenerationConfig(max_new_tokens=n))[0].token_ids
    return runtime.tokenizer.decode(out, skip_special_tokens=True)


def test_models_and_health(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].max_model_len == 1024
    health = httpx.get(server.base_url + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL


def test_completion_equals_decoder_and_reports_stats(client, runtime):
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.model == MODEL
    assert r.choices[0].text == _direct_greedy(runtime, PROMPTS[0], 12)
    assert r.choices[0].finish_reason in ("length", "stop")
    n_prompt = len(runtime.tokenizer(PROMPTS[0])["input_ids"])
    assert r.usage.prompt_tokens == n_prompt and 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == n_prompt + r.usage.completion_tokens
    spec = r.speculative
    assert spec["partial"] is False and spec["draft_length"] == "auto"
    assert 0 <= spec["accepted"] <= spec["drafted"]
    assert spec["acceptance_rate"] == pytest.approx(spec["accepted"] / spec["drafted"] if spec["drafted"] else 0.0)
    assert spec["verify_steps"] >= 1 and spec["mean_accepted_tokens"] >= 1.0


def test_chat_plain_fallback(client, runtime):
    from dspark.serve.text import plain_chat_text

    msgs = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "sum a list"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == _direct_greedy(runtime, plain_chat_text(msgs), 10)
    assert r.usage.prompt_tokens == len(runtime.tokenizer(plain_chat_text(msgs))["input_ids"])
    assert r.speculative["verify_steps"] >= 1


def test_streaming_equals_non_streaming(client):
    full = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=24, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == full.choices[0].finish_reason
    assert finals[0].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens
    # the drafted counts themselves depend on measured timings (the auto policy), not on streaming
    spec = chunks[-1].speculative
    assert set(spec) == set(full.speculative) and 0 <= spec["accepted"] <= spec["drafted"]
    assert spec["verify_steps"] >= 1 and spec["partial"] is False

    msgs = [{"role": "user", "content": "print hello"}]
    chat = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0)
    stream = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0,
                                                 stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == chat.choices[0].message.content
    assert stream[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_stop_strings(client):
    full = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=30, temperature=0)
    text = full.choices[0].text
    assert len(text) > 6, text
    stop = text[3:5]  # occurs in the output, so the stopped text is what precedes its first occurrence
    expected = text[:text.find(stop)]
    r = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=30, temperature=0, stop=[stop, "@@@"])
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=PROMPTS[2], max_tokens=30, temperature=0, stop=stop, stream=True) if c.choices)
    assert streamed == expected


def test_json_schema_and_json_object(client):
    schema = {"type": "object", "properties": {"lang": {"enum": ["python", "c", "rust"]}, "typed": {"type": "boolean"}},
              "required": ["lang", "typed"], "additionalProperties": False}
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "describe the language as JSON"}], max_tokens=40,
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "lang", "schema": schema}})
    obj = json.loads(r.choices[0].message.content)
    assert set(obj) == {"lang", "typed"} and obj["lang"] in ("python", "c", "rust") and isinstance(obj["typed"], bool)
    assert r.choices[0].finish_reason == "stop"
    # streaming through the grammar gives the same text
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "describe the language as JSON"}], max_tokens=40,
        temperature=0, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "lang", "schema": schema}}) if c.choices)
    assert streamed == r.choices[0].message.content

    r = client.completions.create(model=MODEL, prompt="config = ", max_tokens=60, temperature=0,
                                  extra_body={"response_format": {"type": "json_object"}})
    text = r.choices[0].text
    assert text.startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def _status(fn) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as exc:
        fn()
    return exc.value.status_code, exc.value.body


def test_bad_requests_get_openai_errors_and_server_keeps_serving(client, server):
    code, body = _status(lambda: client.completions.create(model="gpt-4", prompt="x"))
    assert code == 404 and body["code"] == "model_not_found" and body["param"] == "model"
    code, body = _status(lambda: client.completions.create(model=MODEL, prompt="x", max_tokens=-3))
    assert code == 400 and body["param"] == "max_tokens" and set(body) == {"message", "type", "param", "code"}
    code, body = _status(lambda: client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                                temperature=-0.1))
    assert code == 400 and body["param"] == "temperature"
    code, body = _status(lambda: client.completions.create(model=MODEL, prompt="x = 1\n" * 600, max_tokens=4))
    assert code == 400 and body["code"] == "context_length_exceeded"
    code, body = _status(lambda: client.completions.create(model=MODEL, prompt="x", max_tokens=1023))  # 2 prompt tokens + 1023 > 1024
    assert code == 400 and body["param"] == "max_tokens"
    code, body = _status(lambda: client.completions.create(model=MODEL, prompt="x", n=2))
    assert code == 400 and body["param"] == "n"
    code, body = _status(lambda: client.completions.create(model=MODEL, prompt="x", extra_body={"beam_width": 3}))
    assert code == 400 and "beam_width" in body["message"]
    code, body = _status(lambda: client.completions.create(
        model=MODEL, prompt="x", extra_body={"response_format": {"type": "json_schema",
                                                                 "json_schema": {"schema": {"type": "nonsense"}}}}))
    assert code == 400 and body["param"] == "response_format"
    code, body = _status(lambda: client.completions.create(model=MODEL, prompt=[[5, 99999]]))
    assert code == 400 and "outside the vocabulary" in body["message"]

    raw = httpx.post(server.base_url + "/v1/completions", content=b'{"model": "tiny-pair", "prompt": ',
                     headers={"content-type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error"]["code"] == "invalid_json"
    raw = httpx.get(server.base_url + "/v1/nothing-here")
    assert raw.status_code == 404 and "error" in raw.json()

    ok = client.completions.create(model=MODEL, prompt="def f():", max_tokens=3, temperature=0)
    assert ok.usage.completion_tokens >= 1


def test_eight_concurrent_clients_equal_sequential(client, server, runtime):
    sequential = [client.completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0).choices[0].text
                  for p in PROMPTS]
    batches_before = server.app.state.scheduler.batches
    results: list[str | None] = [None] * len(PROMPTS)
    errors: list[BaseException] = []
    start = threading.Barrier(len(PROMPTS))

    def worker(i: int) -> None:
        try:
            start.wait()
            r = client.completions.create(model=MODEL, prompt=PROMPTS[i], max_tokens=16, temperature=0)
            results[i] = r.choices[0].text
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert results == sequential
    # they were decoded in fewer batches than requests, i.e. really together
    assert server.app.state.scheduler.batches - batches_before < len(PROMPTS)


def test_sampling_with_seed_is_reproducible(client):
    kw = dict(model=MODEL, prompt=PROMPTS[3], max_tokens=12, temperature=0.9, top_p=0.95, seed=1234)
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    assert a == b


def test_metrics_scrape(client, server):
    client.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=5, temperature=0)
    r = httpx.get(server.base_url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    lines = r.text.splitlines()
    values = {}
    for line in lines:
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values['dspark_http_requests_total{route="/v1/completions",status="200"}'] >= 1
    assert sum(v for k, v in values.items() if k.startswith("dspark_requests_total{")) >= 1
    assert values["dspark_generation_tokens_total"] >= 5 and values["dspark_prompt_tokens_total"] >= 1
    assert 0.0 <= values["dspark_acceptance_rate"] <= 1.0
    assert values["dspark_mean_accepted_tokens"] >= 1.0
    assert values["dspark_draft_length"] > 0 and values['dspark_draft_length_policy_info{policy="auto"}'] == 1
    assert values["dspark_queue_depth"] == 0
    n = values["dspark_request_latency_seconds_count"]
    assert n >= 1 and values['dspark_request_latency_seconds_bucket{le="+Inf"}'] == n
    assert "# TYPE dspark_time_to_first_token_seconds histogram" in lines
    assert "# TYPE dspark_batch_size histogram" in lines


# -- hardening: nothing hangs, blocks the event loop, or answers 500 -------------------------------------------


def _post(server, path: str, body: bytes | dict, timeout: float = 60) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.base_url + path, content=raw, headers={"content-type": "application/json"},
                      timeout=timeout)


def test_out_of_range_seed_is_a_400_not_a_hang(client):
    """seed >= 2**64 made torch's manual_seed raise inside the scheduler: the request never got an answer."""
    code, body = _status(lambda: client.with_options(timeout=60).completions.create(
        model=MODEL, prompt="x", max_tokens=3, temperature=0.5, seed=2**64))
    assert code == 400 and body["param"] == "seed"
    r = client.completions.create(model=MODEL, prompt="x", max_tokens=3, temperature=0.5, seed=2**63 - 1)
    assert r.usage.completion_tokens >= 1


def test_lone_surrogates_are_400s_naming_the_field(server):
    for path, body, param in [
        ("/v1/completions", b'{"model": "tiny-pair", "prompt": "x\\ud800"}', "prompt"),
        ("/v1/completions", b'{"model": "tiny-pair\\ud800", "prompt": "x"}', "model"),
        ("/v1/chat/completions", b'{"model": "tiny-pair", "messages": [{"role": "user", "content": "\\udfff"}]}',
         "messages.0.content"),
    ]:
        r = _post(server, path, body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_body_size_is_capped_before_the_body_is_read(runtime):
    """A Content-Length over the limit is refused at once (nothing read); a chunked body when it gets
    there. Before, any size was read and parsed on the event loop."""
    import socket

    from dspark.serve.app import create_app
    from dspark.serve.runner import start_in_thread

    small = start_in_thread(create_app(runtime, max_body_bytes=1024), "127.0.0.1", 0)
    try:
        with socket.create_connection(("127.0.0.1", small.port), timeout=30) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000000000\r\n\r\n")
            answer = b""
            while b"}}" not in answer:  # the whole JSON error body, sent without reading the request's
                chunk = s.recv(4096)
                assert chunk, answer
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 413") and b"request_too_large" in answer

        def chunks():
            yield b'{"model": "tiny-pair", "prompt": "'
            for _ in range(8):
                yield b"x" * 200
            yield b'"}'

        r = httpx.post(small.base_url + "/v1/completions", content=chunks(), timeout=30,
                       headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        ok = httpx.post(small.base_url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1},
                        timeout=60)
        assert ok.status_code == 200
    finally:
        small.stop()


def test_prompt_that_cannot_fit_is_refused_before_it_is_tokenized(server, monkeypatch):
    """An 8 MB prompt was tokenized on the event loop (31 s with every client frozen): a prompt with
    more characters than the context's tokens can cover is refused without tokenizing it."""
    import dspark.serve.text as text

    def must_not_tokenize(*_a, **_k):
        raise AssertionError("tokenized a prompt that cannot fit")

    monkeypatch.setattr(text, "encode_prompt", must_not_tokenize)
    r = _post(server, "/v1/completions", {"model": MODEL, "prompt": "x" * 2_000_000})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    assert "2000000 characters, so at least" in err["message"]


@pytest.mark.parametrize("stage", ["tokenize", "compile"])
def test_event_loop_answers_while_a_request_is_tokenized_or_its_grammar_compiled(server, monkeypatch, stage):
    """Tokenization and grammar compilation run in the threadpool: /health answers while they work
    (here: while they are held until /health has answered; on the event loop this deadlocked)."""
    from dspark.serve.runtime import ServeRuntime
    from dspark.serve.text import PromptEncoder

    entered, release = threading.Event(), threading.Event()
    target, name = (PromptEncoder, "completion") if stage == "tokenize" else (ServeRuntime, "make_constraint")
    real = getattr(target, name)

    def held(self, *args):
        entered.set()
        release.wait(60)
        return real(self, *args)

    monkeypatch.setattr(target, name, held)
    body = {"model": MODEL, "prompt": "def f():", "max_tokens": 2, "temperature": 0}
    if stage == "compile":
        body["response_format"] = {"type": "json_object"}
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(r=_post(server, "/v1/completions", body)))
    t.start()
    try:
        assert entered.wait(60)
        health = httpx.get(server.base_url + "/health", timeout=10)
    finally:
        release.set()
        t.join(60)
    assert health.status_code == 200 and result["r"].status_code == 200


def test_constraints_that_cannot_be_satisfied(client):
    """A remote $ref was dropped silently; a constraint that allows nothing first is refused; one that
    dead-ends mid-way finishes as "dead_end", never as "stop"."""
    def fmt(schema):
        return {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}}

    code, body = _status(lambda: client.completions.create(
        model=MODEL, prompt="x", max_tokens=5, extra_body=fmt({"$ref": "https://example.com/s.json"})))
    assert code == 400 and body["param"] == "response_format" and "only local references" in body["message"]
    dead = fmt({"type": "string", "pattern": "a[^\\s\\S]"})  # after '"a' no character can follow
    r = client.completions.create(model=MODEL, prompt="x", max_tokens=20, temperature=0, extra_body=dead)
    assert r.choices[0].finish_reason == "dead_end" and r.choices[0].text == '"a'
    chunks = list(client.completions.create(model=MODEL, prompt="x", max_tokens=20, temperature=0, stream=True,
                                            extra_body=dead))
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["dead_end"]


def _counter(server, name: str) -> float:
    lines = httpx.get(server.base_url + "/metrics", timeout=30).text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name))


def test_non_streaming_request_of_a_client_that_left_is_cancelled(server):
    """It decoded on to max_tokens (and counted as finished) after its client had gone."""
    sched = server.app.state.scheduler
    before = _counter(server, 'dspark_requests_aborted_total{cause="client_gone"}')
    finished = _counter(server, "dspark_requests_total")
    body = {"model": MODEL, "prompt": "def f():", "max_tokens": 1000, "temperature": 0, "ignore_eos": True}
    with httpx.Client(base_url=server.base_url) as c:
        with pytest.raises(httpx.ReadTimeout):
            # the client gives up while the request is running (the timeout only ends the wait)
            c.post("/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
    for _ in range(600):
        if _counter(server, 'dspark_requests_aborted_total{cause="client_gone"}') > before and sched.running() == 0:
            break
        threading.Event().wait(0.1)
    assert _counter(server, 'dspark_requests_aborted_total{cause="client_gone"}') == before + 1
    assert _counter(server, "dspark_requests_total") == finished  # it never ran to its end


def test_shutdown_ends_requests_in_flight_with_openai_errors(runtime):
    """At shutdown (SIGTERM) running requests got a cut connection or a plain-text 500 once uvicorn's
    graceful timeout cancelled them: now a 503 error body, and a stream's last event is an error."""
    from dspark.serve.app import create_app
    from dspark.serve.runner import start_in_thread

    srv = start_in_thread(create_app(runtime), "127.0.0.1", 0)
    sched = srv.server.config.app.state.scheduler
    body = {"model": MODEL, "prompt": "def f():", "max_tokens": 1000, "temperature": 0, "ignore_eos": True}
    plain: dict = {}
    t = threading.Thread(target=lambda: plain.update(r=httpx.post(srv.base_url + "/v1/completions", json=body,
                                                                  timeout=120)))
    events: list[str] = []
    try:
        with httpx.stream("POST", srv.base_url + "/v1/completions", json={**body, "stream": True}, timeout=120) as s:
            lines = s.iter_lines()
            events.append(next(lines))  # the stream is running
            t.start()
            for _ in range(600):
                if sched.running() == 2:
                    break
                threading.Event().wait(0.05)
            assert sched.running() == 2
            threading.Thread(target=srv.stop).start()
            events.extend(line for line in lines if line)
        t.join(120)
    finally:
        srv.stop()
    r = plain["r"]
    assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
    assert "shutting down" in r.json()["error"]["message"]
    assert events[-1] == "data: [DONE]" and json.loads(events[-2][len("data: "):])["error"]["type"] == "server_error"
