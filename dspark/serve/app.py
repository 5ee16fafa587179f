"""The OpenAI-compatible HTTP app: FastAPI routes in front of the scheduler thread.

Routes: GET /v1/models, GET /v1/models/{id}, POST /v1/completions, POST /v1/chat/completions (both
with `stream: true` as server-sent events), GET /health, GET /metrics (Prometheus text).
Every error is answered with OpenAI's body {"error": {"message", "type", "param", "code"}}:
malformed JSON and invalid fields 400, unknown model 404, missing/wrong API key 401, a body over
`max_body_bytes` 413, an internal failure 500, shutting down 503 (a stream ends with a final
`data: {"error": ...}` event instead). With an API key, /v1/* needs `Authorization: Bearer KEY`;
/health and /metrics stay open (like vLLM) so probes and scrapers need no secret.

The event loop only moves bytes: JSON parsing and validation, tokenization and grammar compilation
run in the threadpool, and a prompt that cannot fit the context is refused before it is tokenized.
A non-streaming request whose client disconnects is cancelled (its row leaves the batch).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from dspark.errors import DsparkError
from dspark.serve.metrics import CONTENT_TYPE, ServerMetrics, merge_spec_decode_metrics
from dspark.serve.protocol import ApiError, ChatRequest, CompletionRequest, clip, error_body, parse_request
from dspark.serve.runner import DEFAULT_MAX_BODY_MB
from dspark.serve.runtime import ServeRuntime
from dspark.serve.scheduler import Job, Outcome, Scheduler
from dspark.serve.text import PromptEncoder, PromptTooLong

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")


# -- errors --------------------------------------------------------------------------------------


def _json_error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def check_api_key(api_key: str | None) -> None:
    """A key clients can send: a bearer token is visible ASCII, so a key with spaces around it or a
    non-ASCII character could never authenticate. The key itself is never echoed."""
    if api_key is None:
        return
    if not api_key.strip():
        raise DsparkError("--api-key must not be empty")
    if api_key != api_key.strip():
        raise DsparkError("--api-key has leading or trailing whitespace, which no client sends: remove it")
    bad = next((i for i, c in enumerate(api_key) if not "!" <= c <= "~"), None)
    if bad is not None:
        raise DsparkError(f"--api-key may hold only visible ASCII characters ('!' to '~', no spaces); character "
                          f"{bad + 1} of {len(api_key)} is not one")


async def read_body(request: Request, limit: int) -> bytes:
    """The whole request body, or ApiError 413 as soon as it is known to exceed `limit` bytes (from
    Content-Length before reading anything, else while reading)."""
    def too_large() -> ApiError:
        return ApiError(413, f"the request body exceeds this server's limit of {limit} bytes "
                             f"({limit / 2**20:g} MiB, --max-body-mb)", code="request_too_large")

    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large()
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large()
        chunks.append(chunk)
    return b"".join(chunks)


async def _disconnected(request: Request) -> None:
    """Returns once the client has closed the connection (the body is read, so the next ASGI message
    is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


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
            raise ApiError(404, f"The model `{clip(model)}` does not exist; this server serves `{self.rt.model_id}`",
                           param="model", code="model_not_found")

    def config(self, req, prompt_len: int, limit: int | None, default_limit: int):
        from dspark.decode import GenerationConfig

        ctx = self.rt.context_length  # the prompt itself fits: check_ids
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

    def constraint(self, req):
        """A fresh grammar constraint for one choice, or None (CPU work: runs in the threadpool)."""
        rf = req.response_format
        if rf is None or rf.type == "text":
            return None
        from dspark.decode.grammar import GrammarSpec

        try:
            spec = (GrammarSpec.json_object() if rf.type == "json_object"
                    else GrammarSpec.from_json_schema(rf.json_schema.schema_))
            return self.rt.make_constraint(spec)
        except DsparkError as e:
            raise ApiError(400, str(e), param="response_format", code="invalid_response_format") from None

    def encode(self, fn, arg, param: str) -> list[int]:
        """Token ids of a prompt (fn: PromptEncoder.completion or .chat; CPU work: runs in the threadpool)."""
        try:
            return self.check_ids(fn(arg), param)
        except PromptTooLong as e:
            raise ApiError(400, str(e), param=param, code="context_length_exceeded") from None
        except DsparkError as e:
            raise ApiError(400, str(e), param=param) from None

    def completion_prompts(self, prompt, encoder: PromptEncoder) -> list[list[int]]:
        """The token ids of each prompt of a completion request: a text, a list of texts, one token-id
        list or a list of them (CPU work: runs in the threadpool)."""
        if isinstance(prompt, str):
            items: list = [prompt]
        elif all(isinstance(x, int) for x in prompt):
            items = [list(prompt)]
        else:
            items = list(prompt)
        return [self.encode(encoder.completion, t, "prompt") if isinstance(t, str)
                else self.check_ids(list(t), "prompt") for t in items]

    def check_ids(self, ids: list[int], param: str) -> list[int]:
        """A prompt's ids: non-empty, leaving room for one generated token, inside the vocabulary."""
        if not ids:
            raise ApiError(400, "the prompt encodes to no tokens", param=param)
        ctx = self.rt.context_length
        if len(ids) >= ctx:
            raise ApiError(400, f"This model's maximum context length is {ctx} tokens, but the prompt has "
                                f"{len(ids)} tokens (at most {ctx - 1} leave room for one generated token)",
                           param=param, code="context_length_exceeded")
        limit = self.rt.vocab_limit
        bad = next((t for t in ids if not isinstance(t, int) or t < 0 or t >= limit), None)
        if bad is not None:
            raise ApiError(400, f"prompt token id {bad!r} is outside the vocabulary [0, {limit})", param=param)
        return ids

    async def jobs(self, req, prompts: list[list[int]], limit, default_limit: int):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        jobs = []
        for i, ids in enumerate(prompts):
            cfg = self.config(req, len(ids), limit, default_limit)
            jobs.append(Job(prompt_ids=ids, config=cfg, emit=_sink(loop, queue, i),
                            constraint=await run_in_threadpool(self.constraint, req), stop=tuple(req.stop),
                            stream=bool(req.stream)))
        try:
            self.scheduler.submit(jobs)
        except DsparkError as e:
            raise ApiError(503, str(e), type="server_error") from None
        return jobs, queue

    async def collect(self, jobs: list[Job], queue: asyncio.Queue, request: Request) -> list[Outcome]:
        """Every job's outcome; the jobs are cancelled if the client disconnects first."""
        outcomes: list[Outcome | None] = [None] * len(jobs)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            while any(o is None for o in outcomes):
                get = asyncio.ensure_future(queue.get())
                await asyncio.wait((get, gone), return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    raise ApiError(499, "the client closed the connection", code="client_closed_request")
                idx, item = get.result()
                if item[0] == "done":
                    outcomes[idx] = item[1]
                elif item[0] == "error":
                    raise ApiError(item[1], item[3], type=item[2])
        finally:
            gone.cancel()
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
               batch_window_s: float = 0.0, max_body_bytes: int = int(DEFAULT_MAX_BODY_MB * 2**20)) -> FastAPI:
    """The FastAPI app; the scheduler thread starts and stops with the app's lifespan (and
    `app.state.scheduler.stop()` fails every waiting and running request with 503 at shutdown)."""
    check_api_key(api_key)
    if max_body_bytes < 1:
        raise DsparkError(f"--max-body-mb must be > 0, got {max_body_bytes / 2**20:g}")
    scheduler_box: dict[str, Scheduler] = {}
    metrics = ServerMetrics(runtime.policy, queue_depth=lambda: scheduler_box["s"].queue_depth(),
                            running=lambda: scheduler_box["s"].running(), model_name=runtime.model_id)
    scheduler = Scheduler(runtime.decoder, runtime.tokenizer, policy=runtime.policy, metrics=metrics,
                          max_batch_size=max_batch_size, batch_window_s=batch_window_s)
    scheduler_box["s"] = scheduler
    handler = _Handler(runtime, scheduler)
    encoder = PromptEncoder(runtime.tokenizer, runtime.context_length)

    async def parse_body(request: Request, model):
        raw = await read_body(request, max_body_bytes)
        return await run_in_threadpool(parse_request, raw, request.headers.get("content-type"), model)

    @asynccontextmanager
    async def lifespan(_app):
        scheduler.start()
        try:
            yield
        finally:
            await run_in_threadpool(scheduler.stop)

    app = FastAPI(title="dspark", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runtime, app.state.scheduler, app.state.metrics = runtime, scheduler, metrics

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
    async def completions(request: Request):
        req = await parse_body(request, CompletionRequest)
        handler.check_model(req.model)
        prompts = await run_in_threadpool(handler.completion_prompts, req.prompt, encoder)
        jobs, queue = await handler.jobs(req, prompts, req.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS)
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
        outs = await handler.collect(jobs, queue, request)
        return {**base, "choices": [{"index": i, "text": o.text, "logprobs": None, "finish_reason": o.finish_reason}
                                    for i, o in enumerate(outs)],
                "usage": _usage(outs), "speculative": merge_speculative([o.speculative for o in outs])}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await parse_body(request, ChatRequest)
        handler.check_model(req.model)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        ids = await run_in_threadpool(handler.encode, encoder.chat, messages, "messages")
        jobs, queue = await handler.jobs(req, [ids], req.token_limit, runtime.context_length)
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
        outs = await handler.collect(jobs, queue, request)
        return {**base, "choices": [{"index": i, "message": {"role": "assistant", "content": o.text},
                                     "logprobs": None, "finish_reason": o.finish_reason}
                                    for i, o in enumerate(outs)],
                "usage": _usage(outs), "speculative": merge_speculative([o.speculative for o in outs])}

    app.add_middleware(_AuthAndCount, api_key=api_key, metrics=metrics)
    return app
