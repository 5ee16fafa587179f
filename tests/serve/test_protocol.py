"""Request bodies -> validated requests (dspark.serve.protocol.parse_request): every bad body is an
OpenAI 400 naming the field, never a 500 and never an event-loop stall."""

from __future__ import annotations

import json

import pytest

from dspark.serve.protocol import (MAX_SCHEMA_BYTES, MAX_SCHEMA_DEPTH, ApiError, ChatRequest, CompletionRequest,
                                   json_depth, lone_surrogate, parse_request)

JSON = "application/json"


def _error(body: bytes | dict, model=CompletionRequest, content_type: str | None = JSON) -> ApiError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(ApiError) as e:
        parse_request(raw, content_type, model)
    assert e.value.status == 400
    return e.value


def test_lone_surrogates_are_refused_by_the_field_that_holds_them():
    """"\\ud800" is valid JSON but not Unicode text: it reached the tokenizer (or the error body that
    echoes a model name) and came back as a 500."""
    e = _error(b'{"model": "tiny-pair", "prompt": "x\\ud800y"}')
    assert e.param == "prompt" and "lone surrogate (U+D800)" in e.message
    assert _error(b'{"model": "tiny\\udfff", "prompt": "x"}').param == "model"
    e = _error(b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a\\udc00"}]}]}',
               ChatRequest)
    assert e.param == "messages.0.content.0.text"
    e = _error(b'{"model": "m", "prompt": "x", "\\ud800": 1}')
    assert e.param is None and "a key of the body" in e.message
    e = _error('{"model": "m", "prompt": "x\\ud800"}'.encode("utf-16"))  # a UTF-16 body is checked too
    assert e.param == "prompt"
    # a surrogate pair is one character outside the BMP: fine
    pair = parse_request(b'{"model": "m", "prompt": "x\\ud83d\\ude00"}', JSON, CompletionRequest)
    assert pair.prompt == "x\U0001F600"
    assert lone_surrogate({"a": [1, {"b": ["ok", "no\ud800"]}]}) == ("a.1.b.1", "\ud800")
    assert lone_surrogate({"a": ["fine", 2, {"c": None}]}) is None


def test_malformed_bodies_are_400s():
    assert _error(b'{"model": "m", "prompt": ').code == "invalid_json"
    assert "nested too deeply" in _error(b"[" * 100_000).message  # json's RecursionError was a 500
    assert "must be a JSON object, got list" in _error(b"[1, 2]").message
    assert "not JSON" in _error(b"model=m", content_type="application/x-www-form-urlencoded").message
    assert _error(b"\xff\xfe\xfa").code == "invalid_json"  # not UTF-8/16/32
    e = _error({"model": "m", "prompt": "x", "beam_width": 3})
    assert e.code == "unknown_parameter" and e.param == "beam_width"
    assert _error({"model": "m"}).param == "prompt"
    e = _error({"model": "m", "prompt": "x", "temperature": "hot" * 1_000_000})  # the value is not echoed whole
    assert e.param == "temperature" and len(e.message) < 300
    assert parse_request(b'{"model": "m", "prompt": "x"}', None, CompletionRequest).prompt == "x"


def test_seed_range_is_checked_at_the_edge():
    """A seed torch refuses (>= 2**64) made the scheduler raise where nobody listened: the request hung."""
    for seed in (2**64, 2**63, -1):
        e = _error({"model": "m", "prompt": "x", "temperature": 0.5, "seed": seed})
        assert e.param == "seed"
    assert parse_request(json.dumps({"model": "m", "prompt": "x", "seed": 2**63 - 1}).encode(), JSON,
                         CompletionRequest).seed == 2**63 - 1


def _nested(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def test_json_schemas_are_capped_in_depth_and_size():
    """A schema 300 objects deep took ~6 s to compile (on the event loop, before): refused by name."""
    def fmt(schema):
        return {"model": "m", "prompt": "x",
                "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}}

    e = _error(fmt(_nested(300)))
    assert e.param == "response_format.json_schema.schema" and f"at most {MAX_SCHEMA_DEPTH}" in e.message
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(2000)}}
    e = _error(fmt(wide))
    assert e.param == "response_format.json_schema.schema" and f"at most {MAX_SCHEMA_BYTES} are allowed" in e.message
    ok = _nested(MAX_SCHEMA_DEPTH // 2 - 1)
    assert json_depth(ok) <= MAX_SCHEMA_DEPTH
    req = parse_request(json.dumps(fmt(ok)).encode(), JSON, CompletionRequest)
    assert req.response_format.json_schema.schema_ == ok
    assert json_depth(1) == 0 and json_depth({}) == 1 and json_depth({"a": [1, {"b": []}]}) == 4


@pytest.mark.parametrize("prompt", ["x", ["a", "b"], [1, 2], [[1], [2, 3]]])
def test_prompt_shapes(prompt):
    req = parse_request(json.dumps({"model": "m", "prompt": prompt}).encode(), JSON, CompletionRequest)
    assert req.prompt == prompt


@pytest.mark.parametrize("prompt,needle", [([], "empty list"), ([1, "a"], "a list of token ids"), (5, "got int"),
                                           ([True], "a list of token ids"), ([[1, 2.5]], "token-id lists")])
def test_bad_prompt_shapes(prompt, needle):
    e = _error({"model": "m", "prompt": prompt})
    assert e.param == "prompt" and needle in e.message
