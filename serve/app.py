"""The ASGI app of stairs-serve (FastAPI): create_app(engine, config) and its endpoints.

Every prompt is scheduled on the engine's one scheduler (serve.backend: Engine.submit), so
concurrent requests share main calls. Endpoints: POST /v1/completions (OpenAI's schema, greedy
only, SSE streaming), GET /v1/models, /health, /ready, /metrics (Prometheus). Only the engine's
public API is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import socket
import time
import uuid
import weakref
from dataclasses import dataclass, field

import anyio
import prometheus_client as prom
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from engine import Engine, InputError, selfcheck

from .backend import Backend
from .config import DRAIN_TIMEOUT_S, ServeConfig
from .errors import ApiError, ClientGone
from .generation import Choice, Generation
from .metrics import Metrics
from .schema import MAX_PROMPTS, CompletionRequest, greedy_only, stops_of, validation_message

MAX_BODY_BYTES = 8 << 20  # a request body is read into memory: bound it
RETRY_AFTER_S = 1
CLOSE = {"Connection": "close"}  # the rest of an unread body is not wanted


@dataclass
class State:
    """What the app shares between requests. Generation reaches the scheduler only through
    backend; engine is read for the tokenizer, limits and weights-cache entries."""

    engine: Engine
    backend: Backend
    config: ServeConfig
    model_name: str
    ran: str  # what the strategy runs (auto: assisted or lookup) and with which options
    ran_options: dict
    created: int = field(default_factory=lambda: int(time.time()))
    inflight: int = 0  # prompts accepted and not finished
    draining: bool = False
    slots: asyncio.Semaphore | None = None  # max_active; made on the event loop

    def __post_init__(self):
        self.metrics = Metrics(self.backend.health, lambda: self.inflight)

    @property
    def strategy(self) -> str:
        """What each request is submitted with ("auto": draft length by load)."""
        return self.config.strategy

    @property
    def timeout(self) -> float:
        return self.config.timeout

    @property
    def max_queue(self) -> int:
        return self.config.max_queue

    def check_auth(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), key.encode()
        )
        if not ok:
            raise ApiError(
                401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
            )  # fmt: skip


def warm_up(backend: Backend, eos_id: int) -> tuple[str, dict]:
    """One 1-token request through the scheduler with the server's strategy: validates it
    (InputError), loads the batched sessions, and returns what actually ran (strategy, options)."""
    res = backend.schedule([eos_id], 1).result(timeout=600)
    return res.strategy, res.options


# -- the app ----------------------------------------------------------------------------------


def create_app(engine: Engine, config: ServeConfig | None = None, **settings) -> FastAPI:
    """The ASGI app serving engine; everything is validated (InputError) and the batched
    sessions loaded before it returns. config: a ServeConfig; settings: ServeConfig's fields
    (strategy=..., max_queue=..., api_key=...) given instead of it or over it.

    With an API key /v1/* and /metrics need it, and the interactive docs (/docs, /redoc,
    /openapi.json) are off.
    """
    if not isinstance(engine, Engine):
        raise InputError(f"engine must be an engine.Engine, not {type(engine).__name__}")
    if config is None:
        config = ServeConfig.of(settings)
    elif not isinstance(config, ServeConfig):
        raise InputError(f"config must be a ServeConfig, not {type(config).__name__}")
    elif settings:
        config = config.replace(**settings)
    engine.start(max_batch_tokens=config.max_batch_tokens)
    backend = Backend(engine, config.strategy, config.options)
    ran, ran_options = warm_up(backend, engine.tokenizer.eos_id)
    state = State(engine, backend, config, config.model_name or engine.name, ran, ran_options)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if config.max_active is not None:
            state.slots = asyncio.Semaphore(config.max_active)
        yield
        # shutdown (uvicorn has already waited for the open connections): let what is still
        # inside the scheduler finish, bounded
        state.draining = True
        end = time.monotonic() + DRAIN_TIMEOUT_S
        while (state.inflight or backend.health().busy) and time.monotonic() < end:
            await asyncio.sleep(0.05)

    docs = config.api_key is None
    app = FastAPI(
        title="stairs-serve",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.stairs = state
    app.add_exception_handler(ApiError, _api_error)
    _add_info_routes(app, state)
    _add_completions(app, state)
    return app


async def _api_error(request: Request, exc: ApiError):
    return exc.response()


def _add_info_routes(app: FastAPI, state: State) -> None:
    @app.get("/health")
    async def health():
        # which graphs map a weights-cache entry (its folder's name: /health needs no key, so
        # no local paths) and which run the plain graph (null)
        entries = state.engine.weights_entries()
        named = {
            m: {f: e and os.path.basename(e) for f, e in g.items()} if g else g
            for m, g in entries.items()
        }
        return {"status": "ok", "weights_cache": named}

    @app.get("/ready")
    async def ready():
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {
            "status": "ready",
            "model": state.model_name,
            "strategy": state.strategy,
            "runs": state.ran,
            "options": state.ran_options,
            "pid": os.getpid(),  # which worker answered, under --workers
        }

    @app.get("/metrics")
    async def metrics(request: Request):
        state.check_auth(request)
        return Response(state.metrics.scrape(), media_type=prom.CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        state.check_auth(request)
        card = {"id": state.model_name, "object": "model", "created": state.created}
        return {"object": "list", "data": [{**card, "owned_by": "stairs"}]}


def _add_completions(app: FastAPI, state: State) -> None:
    schema = {"application/json": {"schema": CompletionRequest.model_json_schema()}}

    @app.post(
        "/v1/completions", openapi_extra={"requestBody": {"required": True, "content": schema}}
    )
    async def completions(request: Request):
        try:
            return await _complete(state, request)
        except ApiError as exc:
            state.metrics.requests.labels(str(exc.status)).inc()
            return exc.response()
        except ClientGone:
            state.metrics.requests.labels("499").inc()
            return Response(status_code=499)


def build_app(config: ServeConfig) -> FastAPI:
    """Load the pair of config (batched only: each weight resident once) and build its app: what
    the command line and each Ray replica run."""
    if config.main is None:
        raise InputError("main (the exported main model folder) is required")
    eng = Engine.load(config.main, config.assistant, config=config.load)
    if config.self_check:  # EngineError (the server exits 2) unless every row is exact here
        selfcheck.require(eng)
    return create_app(eng, config)


# -- one request -------------------------------------------------------------------------------


def _check_json(request: Request) -> None:
    """415 unless the body is declared JSON: a text/plain or form POST is one any web page can
    send to a local server without a CORS preflight."""
    given = request.headers.get("content-type", "")
    if given.split(";", 1)[0].strip().lower() != "application/json":
        raise ApiError(
            415, f"Content-Type must be application/json, not {given or 'absent'!r}",
            code="unsupported_media_type",
        )  # fmt: skip


async def _read_body(request: Request, seconds: float) -> bytes:
    """The body, at most MAX_BODY_BYTES (413) and within seconds (408); ClientGone if the client
    hangs up while sending it."""
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes", headers=CLOSE)
    chunks, n = [], 0
    try:
        with anyio.fail_after(seconds):
            async for chunk in request.stream():
                n += len(chunk)
                if n > MAX_BODY_BYTES:
                    raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes", headers=CLOSE)
                chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone() from None
    except TimeoutError:
        raise ApiError(
            408, f"request body not received within {seconds:g} s", code="body_timeout",
            headers=CLOSE,
        ) from None  # fmt: skip
    return b"".join(chunks)


def _prompts(state: State, req: CompletionRequest, max_tokens: int) -> list[list[int]]:
    """Encoder ids of every prompt (as Engine.encode makes them), each checked."""
    p = req.prompt
    if isinstance(p, str) or (p and isinstance(p[0], int)):
        p = [p]
    if not p:
        raise ApiError(400, "prompt is empty", "prompt")
    if len(p) > min(MAX_PROMPTS, state.max_queue):
        raise ApiError(
            400, f"prompt has {len(p)} entries; at most {min(MAX_PROMPTS, state.max_queue)}",
            "prompt",
        )  # fmt: skip
    eng = state.engine
    tok = eng.tokenizer
    limit = min(tok.max_input_tokens, eng.limits.max_input_tokens)
    out = []
    for i, x in enumerate(p):
        where = "prompt" if len(p) == 1 else f"prompt[{i}]"
        if isinstance(x, str):
            if not x.strip():
                raise ApiError(400, f"{where} is empty", "prompt")
            body, fits = tok.encode_limited(x, limit - 1)  # bounded work, whatever its size
            ids = body + [tok.eos_id]
            if not fits:
                size = f"{len(ids)} tokens" if body else f"{len(x)} characters"
                raise ApiError(
                    400, f"{where} is {size}, over the input limit of {limit} tokens",
                    "prompt", code="context_length_exceeded",
                )  # fmt: skip
        else:
            ids = list(x)
            if not ids:
                raise ApiError(400, f"{where} is an empty list of token ids", "prompt")
        if len(ids) > limit:
            raise ApiError(
                400, f"{where} is {len(ids)} tokens, over the input limit of {limit} tokens",
                "prompt", code="context_length_exceeded",
            )  # fmt: skip
        try:  # ids in range, sizes, memory (the strategy itself was checked at start)
            eng.plan(ids, "greedy", max_tokens)
        except InputError as exc:
            raise ApiError(400, f"{where}: {exc}", "prompt") from None
        out.append(ids)
    return out


async def _parse(state: State, request: Request) -> tuple[CompletionRequest, int]:
    """The checked request and its max_tokens; refused (401, 503, 415, 408, 413, 400, 404) or
    ClientGone before anything is generated."""
    state.check_auth(request)
    if state.draining:
        raise ApiError(503, "server is shutting down", headers={"Retry-After": str(RETRY_AFTER_S)})
    _check_json(request)
    body = await _read_body(request, state.config.body_timeout)
    try:
        req = CompletionRequest.model_validate_json(body)
    except ValidationError as exc:
        msg, name = validation_message(exc)
        raise ApiError(400, msg, name) from None
    if req.model != state.model_name:
        raise ApiError(
            404, f"model {req.model!r} does not exist; this server serves {state.model_name!r}",
            "model", code="model_not_found",
        )  # fmt: skip
    greedy_only(req)
    max_tokens = 16 if req.max_tokens is None else req.max_tokens  # OpenAI's default
    ceiling = state.engine.limits.max_new_tokens
    if not 1 <= max_tokens <= ceiling:
        raise ApiError(
            400, f"max_tokens must be from 1 to {ceiling}, not {max_tokens}", "max_tokens"
        )
    return req, max_tokens


async def _complete(state: State, request: Request):
    """POST /v1/completions: validate, admit (429 when full), generate, answer."""
    req, max_tokens = await _parse(state, request)
    stops = stops_of(req)
    # tokenising a long prompt takes a while: not on the event loop, which serves the streams
    prompts = await anyio.to_thread.run_sync(_prompts, state, req, max_tokens)
    if state.inflight + len(prompts) > state.max_queue:
        raise ApiError(
            429, f"server busy: {state.inflight} prompts in flight (max {state.max_queue}); retry",
            code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)},
        )  # fmt: skip
    choices = [Choice(i, ids) for i, ids in enumerate(prompts)]
    gen = Generation(
        state.backend.schedule, state.engine.tokenizer, choices, max_tokens, stops,
        timeout=state.timeout, slots=state.slots, ttft=state.metrics.ttft.observe,
    )  # fmt: skip
    state.inflight += len(choices)
    gen.start()
    meta = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": state.model_name,
    }
    gen.poll = request.is_disconnected
    if req.stream:
        return await _stream(state, gen, meta, req)
    try:
        async for _ch, _delta in gen.deltas():
            pass
    except BaseException:
        gen.cancel()
        raise
    finally:
        state.inflight -= len(choices)
    body = {
        **meta,
        "choices": [
            {"text": ch.sent, "index": ch.index, "logprobs": None, "finish_reason": ch.finish}
            for ch in choices
        ],
        "usage": _usage(choices),
        "stairs": _stairs_stats(state, choices),
    }
    _record(state, gen, "200")
    return JSONResponse(body)


async def _stream(state: State, gen: Generation, meta: dict, req: CompletionRequest):
    """SSE as OpenAI streams completions; errors before the first text keep their status."""
    it = gen.deltas()
    try:
        first = await it.__anext__()
    except StopAsyncIteration:
        first = None
    except BaseException:
        gen.cancel()
        state.inflight -= len(gen.choices)
        raise
    gen.poll = None  # from here starlette watches the connection (and cancels us)
    close = _Closer(state, gen)
    usage = req.stream_options is not None and req.stream_options.include_usage
    body = _events(state, meta, it, first, close, usage)
    # a stream that is never iterated (client gone before it began) is closed when collected
    weakref.finalize(body, close, "499")
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body, media_type="text/event-stream", headers=headers)


class _Closer:
    """Once: free a stream's rows and count its outcome (also for a stream never started)."""

    def __init__(self, state: State, gen: Generation):
        self.state, self.gen, self.closed = state, gen, False

    def __call__(self, outcome: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.gen.cancel()
        self.state.inflight -= len(self.gen.choices)
        if outcome == "200":
            _record(self.state, self.gen, outcome)
        else:
            self.state.metrics.requests.labels(outcome).inc()


def _chunk(state: State, meta: dict, ch: Choice, text: str) -> str:
    """One SSE event: new text of ch, or (text "") its end with finish_reason and statistics."""
    finish = None if text else ch.finish
    c = {"text": text, "index": ch.index, "logprobs": None, "finish_reason": finish}
    body = {**meta, "choices": [c]}
    if finish is not None:
        body["stairs"] = _stairs_stats(state, [ch])
    return f"data: {json.dumps(body)}\n\n"


async def _events(state: State, meta: dict, it, first, close: _Closer, usage: bool):
    """The SSE body: first (already taken from it), the rest of it, usage if asked, [DONE]."""
    try:
        if first is not None:
            yield _chunk(state, meta, *first)
            async for ch, delta in it:
                yield _chunk(state, meta, ch, delta)
        if usage:
            body = {**meta, "choices": [], "usage": _usage(close.gen.choices)}
            yield f"data: {json.dumps(body)}\n\n"
        close("200")  # before the last event: a client that saw it finds it counted
        yield "data: [DONE]\n\n"
    except ApiError as exc:  # after the headers: the error goes into the stream
        close(str(exc.status))
        yield f"data: {json.dumps(exc.body())}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        close("499")  # no-op unless the client left


def _usage(choices: list[Choice]) -> dict:
    prompt = sum(len(ch.ids) for ch in choices)
    done = sum(ch.count if ch.count is not None else len(ch.seq) for ch in choices)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


def _stairs_stats(state: State, choices: list[Choice]) -> dict:
    """The engine's statistics of these prompts, summed (the extra key of a response)."""
    st = [ch.stats for ch in choices if ch.stats is not None]
    calls = sum(s.main_calls for s in st)
    drafted = sum(s.drafted for s in st)
    return {
        "strategy": state.strategy,
        "runs": state.ran,
        "replica": f"{socket.gethostname()}:{os.getpid()}",  # which server (Ray: replica)
        "main_calls": calls,
        "acceptance_rate": sum(s.accepted for s in st) / drafted if drafted else 0.0,
        "tokens_per_main_call": sum(s.new_tokens for s in st) / calls if calls else 0.0,
        "mean_batch_rows": sum(s.batch_rows for s in st) / calls if calls else 0.0,
    }


def _record(state: State, gen: Generation, status: str) -> None:
    m = state.metrics
    m.requests.labels(status).inc()
    m.duration.observe(time.perf_counter() - gen.t0)
    usage = _usage(gen.choices)
    m.prompt_tokens.inc(usage["prompt_tokens"])
    m.completion_tokens.inc(usage["completion_tokens"])
    for ch in gen.choices:
        if ch.stats is not None and ch.stats.drafted:
            m.drafted.inc(ch.stats.drafted)
            m.accepted.inc(ch.stats.accepted)
            m.acceptance.observe(ch.stats.acceptance_rate)
        if ch.t_first is not None and len(ch.seq) > 1:
            m.tpot.observe((ch.t_last - ch.t_first) / (len(ch.seq) - 1))
