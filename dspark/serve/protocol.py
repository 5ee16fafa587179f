"""The OpenAI request bodies the server accepts, how a body becomes one, and the error body.

Unknown request fields are rejected (OpenAI does the same: "Unrecognized request argument supplied");
fields OpenAI defines that dspark cannot honour (n > 1, logprobs, penalties, tools, ...) are accepted
only at their no-op default and otherwise rejected, never silently ignored. Extensions (as in vLLM):
`top_k`, `ignore_eos`, and `response_format` on /v1/completions too.
A string with a lone UTF-16 surrogate ("\\ud800": valid JSON, not valid Unicode text) is refused by
the field that holds it; a JSON schema is capped in nesting depth and size (its compilation time
grows steeply with both).
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dspark.decode.types import SEED_LIMIT

MAX_STOP_STRINGS = 16
# Measured (xgrammar 0.2.9, 2-core CPU): a schema 300 objects deep (600 JSON levels) took ~5 s to check
# and compile, 32 objects deep (64 levels) 0.01 s; 2000 optional properties (57 KB) 46 s, 1100 (27 KB)
# 24 s on a loaded machine, 400 (11 KB) 0.3 s. (Compilation releases the GIL: the event loop stays free.)
MAX_SCHEMA_DEPTH = 64
MAX_SCHEMA_BYTES = 16 * 1024
_SURROGATE = re.compile(r"[\ud800-\udfff]")
# JSON can carry a surrogate only as an escape (UTF-8 cannot encode one): bodies without one skip the walk
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class ApiError(Exception):
    """An error answered with the OpenAI body {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def clip(text: str, limit: int = 100) -> str:
    """A client's value as shown in an error message: at most `limit` characters."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def lone_surrogate(obj: Any) -> tuple[str, str] | None:
    """(where, character) of the first string or object key in a parsed JSON value that holds a lone
    surrogate, else None; `where` is a dotted path ("messages.0.content") or "a key of PATH".
    Iterative (any depth is safe); paths are spelled out only for the string found."""
    def spell(chain) -> str:
        parts = []
        while chain is not None:
            chain, key = chain
            parts.append(str(key))
        return ".".join(reversed(parts))

    stack: list[tuple[Any, Any]] = [(None, obj)]  # (path chain: (parent chain, key) or None, value)
    while stack:
        chain, node = stack.pop()
        if isinstance(node, str):
            m = _SURROGATE.search(node)
            if m:
                return spell(chain) or "the body", m.group()
        elif isinstance(node, dict):
            for k, v in node.items():
                m = _SURROGATE.search(k)
                if m:
                    return f"a key of {spell(chain) or 'the body'}", m.group()
                stack.append(((chain, k), v))
        elif isinstance(node, list):
            stack.extend(((chain, i), v) for i, v in enumerate(node) if isinstance(v, (str, dict, list)))
    return None


def json_depth(obj: Any) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0, {} or [] is 1). Iterative."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, d)
            stack.extend((v, d + 1) for v in (node.values() if isinstance(node, dict) else node))
    return deepest


def validation_error(errors: list[dict]) -> ApiError:
    """pydantic's first error as an OpenAI 400 naming the parameter."""
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ())]
    param = ".".join(loc) or None
    if err.get("type") == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter")
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, UnsupportedParameter):
        return ApiError(400, str(cause), param=cause.param, code="unsupported_parameter")
    if err.get("type") == "missing":
        return ApiError(400, f"missing required parameter {param!r}", param=param, code="missing_required_parameter")
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    shown = f"{param}: " if param else ""
    scalar = "input" in err and not isinstance(err["input"], (dict, list))
    value = f" (got {clip(repr(err['input']))})" if scalar else ""
    return ApiError(400, f"invalid value for {shown}{msg}{value}", param=param, code="invalid_value")


def parse_request(body: bytes, content_type: str | None, model: type[BaseModel]) -> BaseModel:
    """A request body -> the validated request `model`, or ApiError 400 (CPU work: call it off the
    event loop)."""
    if content_type and "json" not in content_type.split(";")[0].lower():
        raise ApiError(400, "the request body is not JSON (send Content-Type: application/json)", code="invalid_json")
    try:
        obj = json.loads(body)
    except RecursionError:
        raise ApiError(400, "malformed JSON body: nested too deeply", code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8/16/32
        raise ApiError(400, f"malformed JSON body: {e}", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(obj).__name__}", code="invalid_json")
    maybe = _SURROGATE_ESCAPE.search(body) or json.detect_encoding(body) != "utf-8"  # (UTF-16/32 bodies: walk)
    bad = lone_surrogate(obj) if maybe else None
    if bad is not None:
        where, char = bad
        raise ApiError(400, f"{where} is not valid Unicode text: it holds a lone surrogate (U+{ord(char):04X}); "
                            "send characters outside the Basic Multilingual Plane as a surrogate pair",
                       param=None if where.startswith(("a key", "the body")) else where, code="invalid_value")
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise validation_error(e.errors()) from None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# field -> the values dspark accepts (its no-op defaults); anything else is refused by name.
UNSUPPORTED_DEFAULTS: dict[str, tuple] = {
    "n": (1,), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": (None, {}),
    "echo": (False,), "logprobs": (None, False), "best_of": (None, 1), "suffix": (None, ""),
    "top_logprobs": (None, 0), "tools": (None, []),
}


class UnsupportedParameter(ValueError):
    def __init__(self, param: str, value):
        super().__init__(f"{param}={value!r} is not supported by dspark's server "
                         f"(allowed: {', '.join(repr(v) for v in UNSUPPORTED_DEFAULTS[param])})")
        self.param = param


def _reject_unsupported(req):
    for name, allowed in UNSUPPORTED_DEFAULTS.items():
        if name in type(req).model_fields:
            value = getattr(req, name)
            if not any(value == a and type(value) is type(a) or (value is None and a is None) for a in allowed):
                raise UnsupportedParameter(name, value)
    return req


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchemaFormat(_Strict):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _bounded(cls, v):
        depth = json_depth(v)
        if depth > MAX_SCHEMA_DEPTH:
            raise ValueError(f"the schema nests {depth} levels deep; at most {MAX_SCHEMA_DEPTH} are allowed")
        size = len(json.dumps(v, separators=(",", ":")))
        if size > MAX_SCHEMA_BYTES:
            raise ValueError(f"the schema is {size} bytes of JSON; at most {MAX_SCHEMA_BYTES} are allowed")
        return v


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format type 'json_schema' needs a 'json_schema' object with a 'schema'")
        return self


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    stop: Union[str, list[str], None] = Field(None, validate_default=True)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if v is None:
            return []
        stops = [v] if isinstance(v, str) else list(v)
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @model_validator(mode="after")
    def _only_defaults(self):
        return _reject_unsupported(self)


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="plain")
    @classmethod
    def _prompt_shape(cls, v):
        # Plain Python, not pydantic's union: a 2M-id list took pydantic ~3 s in one call holding the
        # GIL (trying every member), which stalls the event loop even from the threadpool.
        if isinstance(v, str):
            return v
        if not isinstance(v, list):
            raise ValueError(f"prompt must be a string or a list, got {type(v).__name__}")
        if not v:
            raise ValueError("prompt must not be an empty list")
        if all(type(x) is int for x in v) or all(type(x) is str for x in v) or \
                all(type(x) is list and all(type(t) is int for t in x) for x in v):
            return v
        raise ValueError("prompt must be a string, a list of strings, a list of token ids or a list of "
                         "token-id lists")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: Literal["none"] | None = None
    parallel_tool_calls: bool | None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
