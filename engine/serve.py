"""`stairs-serve`: an OpenAI-compatible completions server with continuous batching.

Every prompt is `Engine.submit`ted to the engine's one scheduler, so concurrent requests share
main calls. `create_app(engine, ...)` builds the ASGI app (FastAPI); `main` is the thin command
line over it (uvicorn). Needs the `[serve]` extra: fastapi, uvicorn, prometheus_client; `import
engine` never imports this module.

Endpoints: POST /v1/completions (OpenAI's schema, greedy only, SSE streaming), GET /v1/models,
/health, /ready, /metrics (Prometheus). The engine's blocking generators run in a thread per
prompt that hands each step's tokens to the event loop, so the loop never blocks on a model.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hmac
import importlib
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import anyio
import prometheus_client as prom
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from . import batch
from . import options as opt
from .api import Engine
from .errors import CancelledError, EngineError, InputError

API_KEY_ENV = "STAIRS_API_KEY"
MAX_BODY_BYTES = 8 << 20  # a request body is read into memory: bound it
MAX_PROMPTS = 64  # prompts in one request (each is one scheduler request)
MAX_STOPS = 4  # OpenAI's limit on stop sequences
MAX_STOP_CHARS = 256
POLL_S = 0.25  # how often a waiting non-streaming request checks that its client is still there
RETRY_AFTER_S = 1
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_MAX_QUEUE = 256
DRAIN_TIMEOUT_S = 60.0
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


# -- request schema ---------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """OpenAI's /v1/completions request. Unknown fields and wrong types are refused (400); the
    sampling fields are accepted only at their greedy values."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    best_of: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    echo: bool = False
    suffix: str | None = None
    seed: int | None = None  # greedy is deterministic: any seed gives the same text
    user: str | None = None


FIELD_TYPES = {
    "prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids",
    "stop": "a string, a list of strings or null",
}


class ApiError(Exception):
    """An error answered as OpenAI does: {"error": {message, type, param, code}}."""

    TYPES: ClassVar[dict] = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
    }

    def __init__(
        self, status: int, message: str, param: str | None = None, code=None, headers=None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "server_error" if self.status >= 500 else "error")
        if self.status == 429:
            kind = "rate_limit_error"
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _validation_message(exc: ValidationError) -> tuple[str, str | None]:
    """(message, field) of the first problem pydantic found, naming the field."""
    err = exc.errors()[0]
    loc = [str(x) for x in err.get("loc", ())]
    kind = err.get("type", "")
    if kind == "json_invalid":
        return f"malformed JSON body: {err.get('msg', '')}", None
    if not loc:
        return f"the body must be a JSON object ({err.get('msg', '')})", None
    name = loc[0]
    if kind == "extra_forbidden":
        return f"unknown field {'.'.join(loc)!r}", name
    if kind == "missing":
        return f"field {'.'.join(loc)!r} is required", name
    if name in FIELD_TYPES:
        return f"field {name!r} must be {FIELD_TYPES[name]}", name
    return f"field {'.'.join(loc)!r}: {err.get('msg', 'bad value')}", name


def _greedy_only(req: CompletionRequest) -> None:
    """400 for anything but greedy decoding of one completion per prompt."""
    neutral = {
        "temperature": (None, 0),
        "top_p": (None, 1),
        "frequency_penalty": (None, 0),
        "presence_penalty": (None, 0),
        "best_of": (None, 1),
        "logprobs": (None,),
        "suffix": (None,),
    }
    for name, ok in neutral.items():
        v = getattr(req, name)
        if v not in ok:
            allowed = " or ".join("absent" if x is None else repr(x) for x in ok)
            raise ApiError(
                400,
                f"only greedy decoding is served (token-exact to the main model): {name} must be "
                f"{allowed}, not {v!r}",
                name,
            )
    if req.n != 1:
        raise ApiError(400, f"only greedy decoding is served: n must be 1, not {req.n}", "n")
    if req.echo:
        raise ApiError(400, "echo is not supported", "echo")
    if req.logit_bias:
        raise ApiError(
            400, "only greedy decoding is served: logit_bias must be empty", "logit_bias"
        )


# -- server state and metrics -----------------------------------------------------------------


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (one per app)."""

    def __init__(self, state: State):
        r = self.registry = prom.CollectorRegistry()
        self.requests = prom.Counter(
            "stairs_requests", "completion requests by outcome (HTTP status; 499: client left)",
            ["status"], registry=r,
        )  # fmt: skip
        self.prompt_tokens = prom.Counter(
            "stairs_prompt_tokens", "prompt tokens of served requests", registry=r
        )
        self.completion_tokens = prom.Counter(
            "stairs_completion_tokens", "tokens generated for served requests", registry=r
        )
        self.drafted = prom.Counter("stairs_draft_tokens", "draft tokens proposed", registry=r)
        self.accepted = prom.Counter("stairs_accepted_tokens", "draft tokens accepted", registry=r)
        self.acceptance = prom.Histogram(
            "stairs_acceptance_rate", "acceptance rate per prompt (drafting strategies)",
            buckets=[i / 10 for i in range(11)], registry=r,
        )  # fmt: skip
        self.main_calls = prom.Counter("stairs_main_calls", "main decoder calls", registry=r)
        self.rows = prom.Histogram(
            "stairs_rows_per_main_call", "requests sharing one main decoder call",
            buckets=ROW_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttft = prom.Histogram(
            "stairs_time_to_first_token_seconds", "from request received to first token",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.tpot = prom.Histogram(
            "stairs_time_per_output_token_seconds", "mean time between tokens, per prompt",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.duration = prom.Histogram(
            "stairs_request_duration_seconds", "whole request", buckets=LATENCY_BUCKETS, registry=r
        )
        queue = prom.Gauge(
            "stairs_queue_depth", "prompts in the server (waiting or generating)", registry=r
        )
        queue.set_function(lambda: state.inflight)
        active = prom.Gauge("stairs_scheduler_active", "requests in the main batch", registry=r)
        active.set_function(lambda: len(state.scheduler.active))
        waiting = prom.Gauge("stairs_scheduler_waiting", "requests not yet admitted", registry=r)
        waiting.set_function(lambda: len(state.scheduler.waiting))
        self._seen = 0

    def scrape(self, scheduler: batch.Scheduler) -> bytes:
        """Prometheus text; first the main calls made since the last scrape are observed."""
        fresh = min(scheduler.call_count - self._seen, len(scheduler.calls))
        new = list(scheduler.calls)[len(scheduler.calls) - fresh :] if fresh > 0 else []
        self._seen = scheduler.call_count
        for rows, _tokens in new:
            self.rows.observe(rows)
        self.main_calls.inc(len(new))
        return prom.generate_latest(self.registry)


@dataclass
class State:
    """What the app shares between requests."""

    engine: Engine
    model_name: str
    strategy: str  # what each request is submitted with ("auto": draft length by load)
    options: dict
    ran: str  # what that runs (auto: assisted or lookup) and with which options
    ran_options: dict
    max_queue: int
    timeout: float
    api_key: str | None
    max_active: int | None
    created: int = field(default_factory=lambda: int(time.time()))
    inflight: int = 0  # prompts accepted and not finished
    draining: bool = False
    slots: asyncio.Semaphore | None = None  # max_active; made on the event loop

    def __post_init__(self):
        self.metrics = Metrics(self)

    @property
    def scheduler(self) -> batch.Scheduler:
        return self.engine.batching()

    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        )
        if not ok:
            raise ApiError(
                401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
            )  # fmt: skip


def warm_up(engine: Engine, strategy: str, options: dict | None) -> tuple[str, dict]:
    """One 1-token request through the scheduler with the server's strategy: validates it
    (InputError; any strategy, auto = draft length by load), loads the
    batched sessions, and returns what actually ran (strategy, options)."""
    opt.check_strategy(strategy)  # every strategy runs batched
    h = engine.submit([engine.main.eos_id], strategy=strategy, max_new_tokens=1, **(options or {}))
    res = h.result(timeout=600)
    return res.strategy, res.options


# -- one request's generation ------------------------------------------------------------------


@dataclass
class Choice:
    """One prompt of a request: its tokens as they come and the text shown so far."""

    index: int
    ids: list[int]
    seq: list[int] = field(default_factory=list)
    sent: str = ""  # text already given to the client (streaming)
    finish: str | None = None  # "stop" / "length" once the text is final
    count: int | None = None  # tokens generated when it finished (a stop may leave more behind)
    stats: Any = None
    ended: bool = False  # the engine is done with it (its last event came)
    handle: Any = None
    started: bool = False
    t_first: float | None = None
    t_last: float | None = None


def _first_stop(text: str, stops: list[str]) -> int:
    """Index of the earliest stop string in text, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def _held(text: str, stops: list[str]) -> int:
    """Characters at the end of text that may begin a stop string (not shown yet)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class Generation:
    """The prompts of one request under the scheduler, as an async stream of text deltas."""

    def __init__(self, state: State, choices: list[Choice], max_tokens: int, stops: list[str]):
        self.state, self.choices, self.max_tokens, self.stops = state, choices, max_tokens, stops
        self.loop = asyncio.get_running_loop()
        # (choice index, "tokens" | "end" | "error", payload), filled on the loop's thread;
        # a deque and an Event rather than wait_for(queue.get()), which can lose an item
        self.events: collections.deque = collections.deque()
        self.wake = asyncio.Event()
        self.t0 = time.perf_counter()
        self.tasks: list[asyncio.Task] = []
        self.decode = state.engine.main.tokenizer.decode
        self.poll: Request | None = None  # polled for a disconnect while waiting

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._start(ch)) for ch in self.choices]

    async def _start(self, ch: Choice) -> None:
        """Submit one prompt (after a free slot when max_active is set); a thread pumps it."""
        st = self.state
        if st.slots is not None:
            await st.slots.acquire()
        try:
            ch.handle = st.engine.submit(
                ch.ids, strategy=st.strategy, max_new_tokens=self.max_tokens, **st.options
            )
        except Exception as exc:  # noqa: BLE001 - reported to the client as its answer
            self._release()
            self._put((ch.index, "error", exc))
            return
        ch.started = True
        threading.Thread(target=self._pump, args=(ch,), name="stairs-serve", daemon=True).start()

    def _put(self, item) -> None:
        self.events.append(item)
        self.wake.set()

    def _release(self) -> None:
        if self.state.slots is not None:
            self.state.slots.release()

    def _pump(self, ch: Choice) -> None:
        """Thread: hand the handle's token lists to the event loop as the scheduler emits them."""

        def put(item):
            try:
                self.loop.call_soon_threadsafe(self._put, item)
            except RuntimeError:  # the loop is gone: nobody is listening any more
                ch.handle.cancel()

        try:
            for toks in ch.handle.tokens():
                put((ch.index, "tokens", toks))
            put((ch.index, "end", ch.handle.result()))
        except CancelledError:  # cancelled here (stop string, timeout, client gone)
            put((ch.index, "end", None))
        except BaseException as exc:  # noqa: BLE001 - the request's own error, for its client
            put((ch.index, "error", exc))
        finally:
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._release)

    def cancel(self) -> None:
        """Stop every prompt: the rows are freed at the scheduler's next step."""
        for t in self.tasks:
            if not t.done():
                self.loop.call_soon_threadsafe(t.cancel)
        for ch in self.choices:
            if ch.handle is not None:
                ch.handle.cancel()

    async def deltas(self) -> AsyncIterator[tuple[Choice, str]]:
        """(choice, new text) as text becomes final, (choice, "") when a choice finishes; ends
        when every prompt is done. ApiError 504 after the timeout, 500 if the engine failed;
        ClientGone when self.poll (a Request, or None) finds its client gone."""
        deadline = self.t0 + self.state.timeout
        polled = time.perf_counter()
        while not all(ch.ended for ch in self.choices):
            now = time.perf_counter()
            left = deadline - now
            if left <= 0:
                raise ApiError(
                    504, f"request timed out after {self.state.timeout:g} s", code="timeout"
                )
            if self.poll is not None and now - polled >= POLL_S:
                polled = now
                if await self.poll.is_disconnected():
                    raise ClientGone()
            if not self.events:
                self.wake.clear()
                wait = min(left, POLL_S) if self.poll is not None else left
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), wait)
                continue
            index, kind, payload = self.events.popleft()
            ch = self.choices[index]
            if kind == "error":
                ch.ended = True
                if isinstance(payload, InputError):
                    raise ApiError(400, str(payload), "prompt")
                msg = str(payload) or type(payload).__name__
                raise ApiError(500, f"generation failed: {msg}", code="engine_error")
            if kind == "tokens":
                now = time.perf_counter()
                if ch.t_first is None:
                    ch.t_first = now
                    self.state.metrics.ttft.observe(now - self.t0)
                ch.t_last = now
                ch.seq += payload
                if ch.finish is None:
                    delta = self._advance(ch, final=False)
                    if delta:
                        yield ch, delta
                continue
            # "end": the engine's result (None: cancelled); the text is final now
            ch.ended = True
            ch.stats = payload.stats if payload is not None else _stats_so_far(ch.handle)
            if ch.finish is None:
                if payload is not None:
                    ch.seq = list(payload.token_ids)
                delta = self._advance(ch, final=True)
                if delta:
                    yield ch, delta
            yield ch, ""

    def _advance(self, ch: Choice, final: bool) -> str:
        """The text of ch that became final since the last call (stop strings applied)."""
        text = self.decode(ch.seq)
        cut = _first_stop(text, self.stops) if self.stops else -1
        if cut >= 0:
            text, ch.finish = text[:cut], "stop"
            ch.count = len(ch.seq)
            ch.handle.cancel()  # the rest is not wanted: free the rows
        elif final:
            eos = self.state.engine.main.eos_id
            ch.finish = "stop" if ch.seq and ch.seq[-1] == eos else "length"
            ch.count = len(ch.seq)
        else:
            if text.endswith("\ufffd"):  # a UTF-8 character is still incomplete
                return ""
            if self.stops:
                text = text[: len(text) - _held(text, self.stops)]
        if len(text) > len(ch.sent) and text.startswith(ch.sent):
            delta, ch.sent = text[len(ch.sent) :], text
            return delta
        if not text.startswith(ch.sent):  # the decoded text changed its past: resync
            ch.sent = text
        return ""


def _stats_so_far(handle):
    """Stats of a request that result() will not give (cancelled: CancelledError)."""
    return handle.stats()


class ClientGone(Exception):
    """The client closed its connection before the answer was complete."""


# -- the app ----------------------------------------------------------------------------------


def create_app(
    engine: Engine,
    *,
    strategy: str = "auto",
    options: dict | None = None,
    model_name: str | None = None,
    max_batch_tokens: int | None = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_active: int | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    api_key: str | None = None,
) -> FastAPI:
    """The ASGI app serving engine; everything is validated (InputError) and the batched
    sessions loaded before it returns.

    strategy/options: what every request runs (any strategy; auto resolved now).
    max_batch_tokens: rows x padded tokens of one main call. max_queue: prompts in the server at
    once, beyond it 429. max_active: prompts generating at once (None: all; 1 serves one at a
    time, for comparison). timeout: seconds per request, then 504. api_key: required bearer key
    (hmac-compared) on /v1/* and /metrics.
    """
    if not isinstance(engine, Engine):
        raise InputError(f"engine must be an engine.Engine, not {type(engine).__name__}")
    for name, v in (("max_queue", max_queue), ("max_active", max_active)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise InputError(f"{name} must be an integer >= 1, not {v!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise InputError(f"timeout must be a number of seconds > 0, not {timeout!r}")
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
        raise InputError("api_key must be a non-empty string or None")
    options = dict(options or {})
    _start_worker(engine, max_batch_tokens)
    ran, ran_options = warm_up(engine, strategy, options)
    state = State(
        engine=engine,
        model_name=model_name or engine.main.folder.name,
        strategy=strategy,
        options=options,
        ran=ran,
        ran_options=ran_options,
        max_queue=max_queue,
        timeout=float(timeout),
        api_key=api_key,
        max_active=max_active,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if max_active is not None:
            state.slots = asyncio.Semaphore(max_active)
        yield
        # shutdown (uvicorn has already waited for the open connections): let what is still
        # inside the scheduler finish, bounded
        state.draining = True
        end = time.monotonic() + DRAIN_TIMEOUT_S
        while (state.inflight or state.scheduler.busy) and time.monotonic() < end:
            await asyncio.sleep(0.05)

    app = FastAPI(title="stairs-serve", lifespan=lifespan)
    app.state.stairs = state

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

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
        }

    @app.get("/metrics")
    async def metrics(request: Request):
        state.check_auth(request)
        return Response(state.metrics.scrape(state.scheduler), media_type=prom.CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        state.check_auth(request)
        card = {"id": state.model_name, "object": "model", "created": state.created}
        return {"object": "list", "data": [{**card, "owned_by": "stairs"}]}

    @app.post(
        "/v1/completions",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": CompletionRequest.model_json_schema()}},
            }
        },
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

    return app


def _start_worker(engine: Engine, max_batch_tokens: int | None) -> None:
    """Load the batched sessions now (not on the first request) with the server's token budget."""
    engine.batching(max_batch_tokens)


async def _read_body(request: Request) -> bytes:
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > MAX_BODY_BYTES:
            raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
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
    tok = eng.main.tokenizer
    limit = min(tok.max_input_tokens, eng.limits.max_input_tokens)
    out = []
    for i, x in enumerate(p):
        where = "prompt" if len(p) == 1 else f"prompt[{i}]"
        if isinstance(x, str):
            if not x.strip():
                raise ApiError(400, f"{where} is empty", "prompt")
            ids = tok.encode(x) + [tok.eos_id]
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


def _stops(req: CompletionRequest) -> list[str]:
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"stop has {len(stops)} strings; at most {MAX_STOPS}", "stop")
    for s in stops:
        if not s or len(s) > MAX_STOP_CHARS:
            raise ApiError(
                400, f"each stop string must have 1 to {MAX_STOP_CHARS} characters", "stop"
            )
    return stops


async def _complete(state: State, request: Request):
    """POST /v1/completions: validate, admit (429 when full), generate, answer."""
    state.check_auth(request)
    if state.draining:
        raise ApiError(503, "server is shutting down", headers={"Retry-After": str(RETRY_AFTER_S)})
    body = await _read_body(request)
    try:
        req = CompletionRequest.model_validate_json(body)
    except ValidationError as exc:
        msg, name = _validation_message(exc)
        raise ApiError(400, msg, name) from None
    if req.model != state.model_name:
        raise ApiError(
            404, f"model {req.model!r} does not exist; this server serves {state.model_name!r}",
            "model", code="model_not_found",
        )  # fmt: skip
    _greedy_only(req)
    max_tokens = 16 if req.max_tokens is None else req.max_tokens  # OpenAI's default
    ceiling = state.engine.limits.max_new_tokens
    if not 1 <= max_tokens <= ceiling:
        raise ApiError(
            400, f"max_tokens must be from 1 to {ceiling}, not {max_tokens}", "max_tokens"
        )
    stops = _stops(req)
    # tokenising a long prompt takes a while: not on the event loop, which serves the streams
    prompts = await anyio.to_thread.run_sync(_prompts, state, req, max_tokens)
    if state.inflight + len(prompts) > state.max_queue:
        raise ApiError(
            429, f"server busy: {state.inflight} prompts in flight (max {state.max_queue}); retry",
            code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)},
        )  # fmt: skip
    choices = [Choice(i, ids) for i, ids in enumerate(prompts)]
    gen = Generation(state, choices, max_tokens, stops)
    state.inflight += len(choices)
    gen.start()
    meta = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": state.model_name,
    }
    gen.poll = request
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
    n = len(gen.choices)

    def chunk(ch: Choice, text: str, finish: str | None = None) -> str:
        c = {"text": text, "index": ch.index, "logprobs": None, "finish_reason": finish}
        body = {**meta, "choices": [c]}
        if finish is not None:
            body["stairs"] = _stairs_stats(state, [ch])
        return f"data: {json.dumps(body)}\n\n"

    def render(ch: Choice, delta: str) -> str:
        return chunk(ch, delta) if delta else chunk(ch, "", ch.finish)

    try:
        first = await it.__anext__()
    except StopAsyncIteration:
        first = None
    except BaseException:
        gen.cancel()
        state.inflight -= n
        raise
    gen.poll = None  # from here starlette watches the connection (and cancels us)
    closed = False

    def close(outcome: str) -> None:
        """Once: free the rows, count the outcome (also for a stream never started)."""
        nonlocal closed
        if closed:
            return
        closed = True
        gen.cancel()
        state.inflight -= n
        if outcome == "200":
            _record(state, gen, outcome)
        else:
            state.metrics.requests.labels(outcome).inc()

    async def events():
        try:
            if first is not None:
                yield render(*first)
                async for ch, delta in it:
                    yield render(ch, delta)
            if req.stream_options is not None and req.stream_options.include_usage:
                usage = {**meta, "choices": [], "usage": _usage(gen.choices)}
                yield f"data: {json.dumps(usage)}\n\n"
            close("200")  # before the last event: a client that saw it finds it counted
            yield "data: [DONE]\n\n"
        except ApiError as exc:  # after the headers: the error goes into the stream
            close(str(exc.status))
            yield f"data: {json.dumps(exc.body())}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            close("499")  # no-op unless the client left

    body = events()
    # a stream that is never iterated (client gone before it began) is closed when collected
    weakref.finalize(body, close, "499")
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body, media_type="text/event-stream", headers=headers)


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


# -- running it -------------------------------------------------------------------------------


class Server:
    """uvicorn with a drain: on SIGTERM/SIGINT /ready turns 503 and new requests get 503 while
    the open ones finish; then the process exits 0."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 8000, **uvicorn_kw):
        import uvicorn

        state: State = app.state.stairs

        class _Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                state.draining = True
                super().handle_exit(sig, frame)
                # drained by the time run() returns: exit 0 rather than re-raise the signal
                getattr(self, "_captured_signals", []).clear()

        kw = {"log_level": "warning", "timeout_graceful_shutdown": DRAIN_TIMEOUT_S}
        kw.update(uvicorn_kw)
        self.server = _Server(uvicorn.Config(app, host=host, port=port, **kw))
        self.host, self.port, self.state = host, port, state
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        """Serve in this thread until a signal (or stop())."""
        self.server.run()

    def start(self) -> Server:
        """Serve in a background thread; returns once the socket accepts connections."""
        self._thread = threading.Thread(target=self.server.run, name="stairs-uvicorn", daemon=True)
        self._thread.start()
        end = time.monotonic() + 60
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > end:
                raise RuntimeError(f"server on {self.host}:{self.port} did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30) -> None:
        """Graceful stop of a start()ed server: drain, then join the thread."""
        self.state.draining = True
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on host right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """stairs-serve's arguments; api_key falls back to $STAIRS_API_KEY."""
    from .cli import _count, _Parser, add_option_flags

    p = _Parser(prog="stairs-serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--main", required=True, help="exported main model folder")
    p.add_argument("--assistant", help="exported assistant model folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every one)")
    p.add_argument("--port", type=_count(65535), default=8000, help="TCP port")
    p.add_argument(
        "--strategy",
        default="auto",
        choices=opt.STRATEGY_NAMES,
        help="what every request runs (auto: assisted, or lookup without an assistant, its"
        " draft length by the number of active requests)",
    )
    add_option_flags(p)
    p.add_argument(
        "--max-batch-tokens",
        type=_count(batch.MAX_BATCH_TOKENS),
        default=batch.DEFAULT_BATCH_TOKENS,
        help="rows x padded tokens of one main call",
    )
    p.add_argument(
        "--max-queue",
        type=_count(1 << 20),
        default=DEFAULT_MAX_QUEUE,
        help="prompts in the server at once (waiting or generating); beyond it 429",
    )
    p.add_argument(
        "--max-active", type=_count(1 << 20), help="prompts generating at once (1: one at a time)"
    )
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per request")
    p.add_argument("--threads", type=_count(1024), help="ORT threads (default: ORT's choice)")
    p.add_argument("--provider", default="cpu", help="cpu, cuda, coreml or auto")
    p.add_argument(
        "--shared-thread-pool",
        action="store_true",
        help="one process-wide ORT thread pool for main and assistant (stairs-bench, 2 cores:"
        " faster for one request at a time, slower at 4+; the server must be the process's"
        " only ORT user)",
    )
    p.add_argument("--model-name", help="the model id clients send (default: the main folder's)")
    p.add_argument(
        "--api-key", help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV} if set)"
    )
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the files")
    p.add_argument("--ray", action="store_true", help="serve as a Ray Serve deployment")
    p.add_argument("--replicas", type=_count(1024), default=1, help="--ray: replicas (engines)")
    p.add_argument(
        "--ray-address",
        help="--ray: the cluster to join ('auto': the local one; default: start one)",
    )
    a = p.parse_args(argv)
    if not 0 < a.timeout < float("inf"):
        p.error("--timeout must be a number of seconds > 0")
    a.api_key = a.api_key or os.environ.get(API_KEY_ENV) or None
    return a


def build_app(cfg: dict) -> FastAPI:
    """Load the pair and build the app from a plain config (the keys of APP_CONFIG): what the
    command line and each Ray replica run."""
    unknown = sorted(set(cfg) - set(APP_CONFIG))
    if unknown:
        raise InputError(f"unknown setting(s) {unknown}; known: {', '.join(APP_CONFIG)}")
    c = {**APP_CONFIG, **cfg}
    eng = Engine.load(  # batched only: each weight resident once
        c["main"],
        c["assistant"],
        provider=c["provider"],
        threads=c["threads"],
        shared_thread_pool=c["shared_thread_pool"],
        verify=c["verify"],
        single_request=False,
    )
    return create_app(
        eng,
        strategy=c["strategy"],
        options=c["options"],
        model_name=c["model_name"],
        max_batch_tokens=c["max_batch_tokens"],
        max_queue=c["max_queue"],
        max_active=c["max_active"],
        timeout=c["timeout"],
        api_key=c["api_key"],
    )


# build_app's settings and their defaults (serve_config.yaml's args take these, plus replicas)
APP_CONFIG = {
    "main": None,
    "assistant": None,
    "provider": "cpu",
    "threads": None,
    "shared_thread_pool": False,
    "verify": True,
    "strategy": "auto",
    "options": None,
    "model_name": None,
    "max_batch_tokens": None,
    "max_queue": DEFAULT_MAX_QUEUE,
    "max_active": None,
    "timeout": DEFAULT_TIMEOUT_S,
    "api_key": None,
}


def ray_app(args: dict | None = None):
    """Ray Serve application builder: one Engine and scheduler per replica, each serving the same
    app (`serve run serve_config.yaml`, or `stairs-serve --ray`). args: APP_CONFIG's keys plus
    replicas (default 1); model paths are made absolute here, so every node needs the folders at
    the same path. The API key may also come from $STAIRS_API_KEY on the driver."""
    from ray import serve

    cfg = dict(args or {})
    replicas = cfg.pop("replicas", 1)
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise InputError(f"replicas must be an integer >= 1, not {replicas!r}")
    unknown = sorted(set(cfg) - set(APP_CONFIG))
    if unknown:
        raise InputError(f"unknown arg(s) {unknown}; known: replicas, {', '.join(APP_CONFIG)}")
    if not cfg.get("main"):
        raise InputError("args.main (the exported main model folder) is required")
    for k in ("main", "assistant"):
        if cfg.get(k):
            cfg[k] = str(Path(cfg[k]).resolve())
    cfg.setdefault("api_key", os.environ.get(API_KEY_ENV) or None)
    threads = cfg.get("threads") or 1
    cfg["threads"] = threads
    queue = cfg.get("max_queue", DEFAULT_MAX_QUEUE)
    deployment = serve.deployment(
        _replica_class(),
        name="stairs",
        num_replicas=replicas,
        max_ongoing_requests=queue,  # Ray's default (5) would starve the continuous batch
        ray_actor_options={"num_cpus": threads},
    )
    return deployment.bind(cfg)


def _replica_class():
    from ray import serve

    @serve.ingress()
    class StairsReplica:
        """One replica: loads the pair and serves build_app's app."""

        def __init__(self, cfg: dict):
            self._app = build_app(cfg)

        def __serve_build_asgi_app__(self):
            return self._app

    return StairsReplica


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: load the pair, build the app, serve until SIGTERM."""
    from .cli import strategy_options

    a = parse_args(argv)
    try:
        opts = {k: getattr(a, k) for k in opt.OPTIONS}
        if a.strategy != "auto":
            opts = strategy_options(a.strategy, opts)
        cfg = {
            "main": a.main,
            "assistant": a.assistant,
            "provider": a.provider,
            "threads": a.threads,
            "shared_thread_pool": a.shared_thread_pool,
            "verify": not a.no_verify,
            "strategy": a.strategy,
            "options": {k: v for k, v in opts.items() if v is not None},
            "model_name": a.model_name,
            "max_batch_tokens": a.max_batch_tokens,
            "max_queue": a.max_queue,
            "max_active": a.max_active,
            "timeout": a.timeout,
            "api_key": a.api_key,
        }
        if a.ray:
            return _run_ray(a, cfg)
        app = build_app(cfg)
    except (EngineError, OSError) as exc:
        print(f"stairs-serve: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    st: State = app.state.stairs
    print(
        f"stairs-serve: {st.model_name} ({st.strategy}: {st.ran} {st.ran_options}) on "
        f"http://{a.host}:{a.port}" + (" (API key required)" if a.api_key else ""),
        file=sys.stderr,
        flush=True,
    )
    Server(app, a.host, a.port, log_level="info").run()
    return 0


def _run_ray(a: argparse.Namespace, cfg: dict) -> int:
    """--ray: the same app as a Ray Serve deployment with --replicas replicas."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise InputError("--ray needs Ray Serve: pip install 'stairs[ray]'") from None
    # run as `python -m engine.serve`, this module is __main__: the replicas must get the
    # importable one (FastAPI resolves the routes' annotations in its globals)
    ray_app_ = importlib.import_module("engine.serve").ray_app
    ray.init(address=a.ray_address)
    serve.start(http_options={"host": a.host, "port": a.port})
    serve.run(ray_app_({**cfg, "replicas": a.replicas}), name="stairs", route_prefix="/")
    print(
        f"stairs-serve: {a.replicas} Ray replica(s) on http://{a.host}:{a.port}",
        file=sys.stderr,
        flush=True,
    )

    def stop(sig, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        with contextlib.suppress(Exception):  # Ray may already be going down with the signal
            serve.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
