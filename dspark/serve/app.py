"""The OpenAI-compatible HTTP app: FastAPI routes in front of the scheduler thread.

Routes: GET /v1/models, GET /v1/models/{id}, POST /v1/completions, POST /v1/chat/completions (both
with `stream: true` as server-sent events), GET /health, GET /metrics (Prometheus text).
Every error is answered with OpenAI's body {"error": {"message", "type", "param", "code"}}:
malformed JSON and invalid fields 400, unknown model 404, missing/wrong API key 401, shutting
down 503. With an API key, /v1/* needs `Authorization: Bearer KEY`; /health and /metrics stay open
(like vLLM) so probes and scrapers need no secret.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from dspark.errors import DsparkError
from dspark.serve.metrics import CONTENT_TYPE, ServerMetrics, merge_spec_decode_metrics
from dspark.serve.protocol import ApiError, ChatRequest, CompletionRequest, UnsupportedParameter, error_body
from dspark.serve.runtime import ServeRuntime
from dspark.serve.scheduler import Job, Outcome, Scheduler
from dspark.serve.text import chat_prompt, encode_prompt

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")


# -- errors --------------------------------------------------------------------------------------


def _validation_error(exc: RequestValidationError) -> ApiError:
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        why = (err.get("ctx") or {}).get("error") or err.get("msg")
        return ApiError(400, f"malformed JSON body: {why}", code="invalid_json")
    if not loc and err.get("type") == "model_attributes_type":
        if isinstance(err.get("input"), (bytes, str)):
            return ApiError(400, "the request body is not JSON (send Content-Type: application/json)",
                            code="invalid_json")
        return ApiError(400, f"the request body must be a JSON object, got {type(err.get('input')).__name__}",
                        code="invalid_json")
    if err.get("type") == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {'.'.join(loc)}", param=".".join(loc),
                        code="unknown_parameter")
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, UnsupportedParameter):
        return ApiError(400, str(cause), param=cause.param, code="unsupported_parameter")
    if err.get("type") == "missing":
        return ApiError(400, f"missing required parameter {'.'.join(loc)!r}", param=".".join(loc) or None,
                        code="missing_required_parameter")
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    param = ".".join(loc) or None
    shown = f"{param}: " if param else ""
    value = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], (dict, list)) else ""
    return ApiError(400, f"invalid value for {shown}{msg}{value}", param=param, code="invalid_value")


def _json_error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


class _AuthAndCount:
    """ASGI middleware: bearer-token check on /v1/*, and HTTP request counts by route and status."""

    def __init__(self, app, api_key: str | None, metrics: ServerMetrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        route = next((r for r in ROUTES if path == r or path.startswith(r + "/")), "other")
        status_box = {"status": 500}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status_box["status"] = message["status"]
            await send(message)

        try:
            if self.api_key is not None and path.startswith("/v1"):
                headers = dict(scope.get("headers") or [])
                auth = headers.get(b"authorization", b"").decode("latin-1")
                scheme, _, token = auth.partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                    resp = JSONResponse(error_body("Incorrect or missing API key: send `Authorization: Bearer <key>`",
                                                   "invalid_request_error", None, "invalid_api_key"), status_code=401)
                    return await resp(scope, receive, counting_send)
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.http_requests.inc(route=route, status=str(status_box["status"]))


# -- helpers -------------------------------------------------------------------------------------


def _sink(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int):
    def emit(item: tuple) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (index, item))
        except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
            pass
    return emit


def merge_speculative(specs: list[dict]) -> dict:
    """One request's speculative stats over its choices (counts summed, ratios recomputed)."""
    if len(specs) == 1:
        return dict(specs[0])
    steps = sum(s["verify_steps"] for s in specs)
    drafted = None if any(s["drafted"] is None for s in specs) else sum(s["drafted"] for s in specs)
    accepted = sum(s["accepted"] for s in specs)

    def total(key):
        return None if any(s[key] is None for s in specs) else sum(s[key] for s in specs)

    return {"draft_length": specs[0]["draft_length"], "drafted": drafted, "accepted": accepted,
            "acceptance_rate": (accepted / drafted if drafted else 0.0) if drafted is not None else None,
            "mean_accepted_tokens": (sum(s["mean_accepted_tokens"] * s["verify_steps"] for s in specs) / steps
                                     if steps else 0.0),
            "verify_steps": steps, "target_forwards": total("target_forwards"),
            "draft_forwards": total("draft_forwards"), "partial": any(s["partial"] for s in specs),
            **merge_spec_decode_metrics(specs)}


def _usage(outcomes: list[Outcome]) -> dict:
    p = sum(o.prompt_tokens for o in outcomes)
    c = sum(o.completion_tokens for o in outcomes)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class _Handler:
    """Turns validated requests into scheduler jobs and jobs' events into OpenAI responses."""

    def __init__(self, runtime: ServeRuntime, scheduler: Scheduler):
        self.rt, self.scheduler = runtime, scheduler

    def check_model(self, model: str) -> None:
        if model != self.rt.model_id:
            raise ApiError(404, f"The model `{model}` does not exist; this server serves `{self.rt.model_id}`",
                           param="model", code="model_not_found")

    def config(self, req, prompt_len: int, limit: int | None, default_limit: int, param: str):
        from dspark.decode import GenerationConfig

        ctx = self.rt.context_length
        if prompt_len >= ctx:
            raise ApiError(400, f"This model's maximum context length is {ctx} tokens, but the prompt has "
                                f"{prompt_len} tokens (at most {ctx - 1} leave room for one generated token)",
                           param=param, code="context_length_exceeded")
        max_tokens = limit if limit is not None else min(default_limit, ctx - prompt_len)
        if prompt_len + max_tokens > ctx:
            raise ApiError(400, f"This model's maximum context length is {ctx} tokens; the prompt has {prompt_len} "
                                f"and max_tokens asks for {max_tokens} more ({prompt_len + max_tokens} in all)",
                           param="max_tokens", code="context_length_exceeded")
        greedy = req.temperature == 0
        try:
            # Greedy ignores top-p/top-k/seed; normalising them lets every greedy request share a batch.
            return GenerationConfig(max_new_tokens=max_tokens, temperature=req.temperature,
                                    top_p=1.0 if greedy else req.top_p, top_k=0 if greedy else req.top_k,
                                    seed=None if greedy else req.seed, ignore_eos=req.ignore_eos)
        except DsparkError as e:
            raise ApiError(400, str(e)) from None

    async def constraint(self, req):
        rf = req.response_format
        if rf is None or rf.type == "text":
            return None
        from dspark.decode.grammar import GrammarSpec

        try:
            spec = (GrammarSpec.json_object() if rf.type == "json_object"
                    else GrammarSpec.from_json_schema(rf.json_schema.schema_))
            return await run_in_threadpool(self.rt.make_constraint, spec)
        except DsparkError as e:
            raise ApiError(400, str(e), param="response_format", code="invalid_response_format") from None

    def check_ids(self, ids: list[int], param: str) -> list[int]:
        if not ids:
            raise ApiError(400, "the prompt encodes to no tokens", param=param)
        limit = self.rt.vocab_limit
        bad = next((t for t in ids if not isinstance(t, int) or t < 0 or t >= limit), None)
        if bad is not None:
            raise ApiError(400, f"prompt token id {bad!r} is outside the vocabulary [0, {limit})", param=param)
        return ids

    async def jobs(self, req, prompts: list[list[int]], limit, default_limit: int, param: str):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        jobs = []
        for i, ids in enumerate(prompts):
            cfg = self.config(req, len(ids), limit, default_limit, param)
            jobs.append(Job(prompt_ids=ids, config=cfg, emit=_sink(loop, queue, i),
                            constraint=await self.constraint(req), stop=tuple(req.stop), stream=bool(req.stream)))
        try:
            self.scheduler.submit(jobs)
        except DsparkError as e:
            raise ApiError(503, str(e), type="server_error") from None
        return jobs, queue

    async def collect(self, jobs: list[Job], queue: asyncio.Queue) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(jobs)
        try:
            while any(o is None for o in outcomes):
                idx, item = await queue.get()
                if item[0] == "done":
                    outcomes[idx] = item[1]
                elif item[0] == "error":
                    raise ApiError(item[1], item[3], type=item[2])
        finally:
            for j in jobs:
                j.cancel()
        return outcomes  # type: ignore[return-value]

    async def stream(self, jobs: list[Job], queue: asyncio.Queue, chunk, final_chunk, include_usage: bool,
                     head_chunks: list[dict]) -> AsyncIterator[str]:
        outcomes: list[Outcome | None] = [None] * len(jobs)
        try:
            for c in head_chunks:
                yield _sse(c)
            while any(o is None for o in outcomes):
                idx, item = await queue.get()
                if item[0] == "text":
                    yield _sse(chunk(idx, item[1]))
                elif item[0] == "done":
                    outcomes[idx] = item[1]
                    yield _sse(final_chunk(idx, item[1]))
                else:
                    yield _sse(error_body(item[3], item[2]))
                    break
            else:
                if include_usage:
                    done = [o for o in outcomes if o is not None]
                    yield _sse(final_chunk(None, None, usage=_usage(done),
                                           speculative=merge_speculative([o.speculative for o in done])))
            yield "data: [DONE]\n\n"
        finally:
            for j in jobs:
                j.cancel()


# -- the app -------------------------------------------------------------------------------------


def create_app(runtime: ServeRuntime, *, api_key: str | None = None, max_batch_size: int = 8,
               batch_window_s: float = 0.0) -> FastAPI:
    """The FastAPI app; the scheduler thread starts and stops with the app's lifespan."""
    if api_key is not None and not api_key.strip():
        raise DsparkError("--api-key must not be empty")
    scheduler_box: dict[str, Scheduler] = {}
    metrics = ServerMetrics(runtime.policy, queue_depth=lambda: scheduler_box["s"].queue_depth(),
                            running=lambda: scheduler_box["s"].running(), model_name=runtime.model_id)
    scheduler = Scheduler(runtime.decoder, runtime.tokenizer, policy=runtime.policy, metrics=metrics,
                          max_batch_size=max_batch_size, batch_window_s=batch_window_s)
    scheduler_box["s"] = scheduler
    handler = _Handler(runtime, scheduler)

    @asynccontextmanager
    async def lifespan(_app):
        scheduler.start()
        try:
            yield
        finally:
            await run_in_threadpool(scheduler.stop)

    app = FastAPI(title="dspark", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runtime, app.state.scheduler, app.state.metrics = runtime, scheduler, metrics

    @app.exception_handler(RequestValidationError)
    async def _on_validation(_req, exc: RequestValidationError):
        return _json_error(_validation_error(exc))

    @app.exception_handler(ApiError)
    async def _on_api_error(_req, exc: ApiError):
        return _json_error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(_req, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(error_body(str(exc.detail), kind, None, code), status_code=exc.status_code)

    @app.exception_handler(DsparkError)
    async def _on_dspark(_req, exc: DsparkError):
        return _json_error(ApiError(400, str(exc)))

    @app.exception_handler(Exception)
    async def _on_any(_req, exc: Exception):
        return _json_error(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))

    def model_card() -> dict:
        return {"id": runtime.model_id, "object": "model", "created": runtime.created, "owned_by": "dspark",
                "max_model_len": runtime.context_length, "draft_length": runtime.policy, **runtime.info}

    @app.get("/health")
    async def health():
        ok = scheduler.alive
        body = {"status": "ok" if ok else "unavailable", "model": runtime.model_id,
                "queue_depth": scheduler.queue_depth(), "running": scheduler.running()}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        handler.check_model(model_id)
        return model_card()

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        handler.check_model(req.model)
        p = req.prompt
        if isinstance(p, str):
            texts: list = [p]
        elif all(isinstance(x, int) for x in p):
            texts = [list(p)]
        else:
            texts = list(p)
        tok = runtime.tokenizer
        prompts = [handler.check_ids(encode_prompt(tok, t) if isinstance(t, str) else list(t), "prompt")
                   for t in texts]
        jobs, queue = await handler.jobs(req, prompts, req.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS, "prompt")
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": created, "model": runtime.model_id}
        if req.stream:
            def chunk(i, text):
                return {**base, "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": None}]}

            def final_chunk(i, o, usage=None, speculative=None):
                if o is None:
                    return {**base, "choices": [], "usage": usage, "speculative": speculative}
                return {**base, "choices": [{"index": i, "text": "", "logprobs": None, "finish_reason": o.finish_reason}],
                        "usage": _usage([o]), "speculative": o.speculative}

            include = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(handler.stream(jobs, queue, chunk, final_chunk, include, []),
                                     media_type="text/event-stream")
        outs = await handler.collect(jobs, queue)
        return {**base, "choices": [{"index": i, "text": o.text, "logprobs": None, "finish_reason": o.finish_reason}
                                    for i, o in enumerate(outs)],
                "usage": _usage(outs), "speculative": merge_speculative([o.speculative for o in outs])}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        handler.check_model(req.model)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            ids = await run_in_threadpool(chat_prompt, runtime.tokenizer, messages)
        except DsparkError as e:
            raise ApiError(400, str(e), param="messages") from None
        handler.check_ids(ids, "messages")
        jobs, queue = await handler.jobs(req, [ids], req.token_limit, runtime.context_length, "messages")
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "chat.completion", "created": created, "model": runtime.model_id}
        if req.stream:
            cbase = {**base, "object": "chat.completion.chunk"}

            def chunk(i, text):
                return {**cbase, "choices": [{"index": i, "delta": {"content": text}, "logprobs": None,
                                              "finish_reason": None}]}

            def final_chunk(i, o, usage=None, speculative=None):
                if o is None:
                    return {**cbase, "choices": [], "usage": usage, "speculative": speculative}
                return {**cbase, "choices": [{"index": i, "delta": {}, "logprobs": None,
                                              "finish_reason": o.finish_reason}],
                        "usage": _usage([o]), "speculative": o.speculative}

            head = [{**cbase, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                           "logprobs": None, "finish_reason": None}]}]
            include = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(handler.stream(jobs, queue, chunk, final_chunk, include, head),
                                     media_type="text/event-stream")
        outs = await handler.collect(jobs, queue)
        return {**base, "choices": [{"index": i, "message": {"role": "assistant", "content": o.text},
                                     "logprobs": None, "finish_reason": o.finish_reason}
                                    for i, o in enumerate(outs)],
                "usage": _usage(outs), "speculative": merge_speculative([o.speculative for o in outs])}

    app.add_middleware(_AuthAndCount, api_key=api_key, metrics=metrics)
    return app
