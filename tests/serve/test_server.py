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
