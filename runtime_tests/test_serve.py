"""stairs-serve: the OpenAI-compatible server answers exactly Engine.generate's greedy text, over
a real socket with the openai client, streaming or not, under concurrent load, and refuses or
recovers from bad requests, overload, timeouts, failures, disconnects and SIGTERM."""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import importlib.util
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest


def _installed(module: str):
    """module, imported; the tests skip only where it is not installed at all: an installed
    one that fails to import fails them (a broken [serve] extra must not pass as a skip)."""
    if importlib.util.find_spec(module) is None:
        why = f"{module} is not installed (pip install 'stairs[test]')"
        pytest.skip(why, allow_module_level=True)
    return importlib.import_module(module)


for _name in ("fastapi", "uvicorn", "prometheus_client"):
    _installed(_name)
openai = _installed("openai")
httpx = _installed("httpx")

from fastapi.testclient import TestClient

from serve import ServeConfig, Server, create_app, free_port
from serve.cli import main, parse_args

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    'def list_files(path):\n    """Return the names of the files in path."""\n',
    "import os\n\n\ndef read_config(filename):\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n",
    "def fibonacci(n):\n",
]
STRATEGY = ("assisted", {"draft_tokens": 4})
HANG_S = 300  # a guard against hangs only: nothing here asserts a speed (bench/ measures that)


@pytest.fixture(scope="module")
def ref(eng):
    """Engine.generate(greedy) text of a prompt, memoised."""
    memo = {}

    def text(prompt, n):
        key = (json.dumps(prompt), n)
        if key not in memo:
            memo[key] = eng.generate(prompt, strategy="greedy", max_new_tokens=n)
        return memo[key]

    return text


@pytest.fixture(scope="module")
def server(eng):
    app = create_app(eng, strategy=STRATEGY[0], options=STRATEGY[1], max_queue=64)
    srv = Server(app, "127.0.0.1", free_port()).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(
        base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=HANG_S
    )


@pytest.fixture(scope="module")
def model(eng):
    return eng.name


def metrics(url: str) -> dict[str, float]:
    """Prometheus samples of the server: {'name{labels}': value}."""
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_idle(eng) -> None:
    end = time.monotonic() + HANG_S
    while eng.health().busy and time.monotonic() < end:
        time.sleep(0.02)
    assert not eng.health().busy, f"the scheduler still holds requests after {HANG_S} s (hung)"


def wait_for(cond, what: str) -> None:
    """Poll cond until true; fail only if it never becomes true (a hang guard)."""
    end = time.monotonic() + HANG_S
    while not cond():
        assert time.monotonic() < end, f"{what}: not after {HANG_S} s (hung)"
        time.sleep(0.02)


# -- Generation on its own: a fake schedule callable, no app -------------------------------------


class FakeStream:
    """Stands in for an engine handle: fixed token lists, then its result."""

    def __init__(self, steps: list[list[int]]):
        self.steps, self.cancelled = steps, False

    def tokens(self):
        yield from self.steps

    def result(self, timeout=None):
        ids = [t for step in self.steps for t in step]
        return SimpleNamespace(token_ids=ids, stats=SimpleNamespace(new_tokens=len(ids)))

    def stats(self):
        return None

    def cancel(self):
        self.cancelled = True


def test_generation_streams_without_the_app():
    """Generation takes only a schedule callable, a tokenizer, the timeout, the slots and a
    metrics hook: it streams each prompt's text in deltas, cuts at a stop string (cancelling the
    rest), holds the slots one prompt at a time, and reports each first token to the hook."""
    from serve.generation import Choice, Generation

    eos, pieces = 1, {2: "he", 3: "l", 4: "lo", 5: " wo", 6: "rld"}
    tokenizer = SimpleNamespace(
        eos_id=eos, decode=lambda ids: "".join(pieces.get(i, "") for i in ids)
    )
    steps = {10: [[2, 3], [4, eos]], 20: [[5], [6]]}
    streams, scheduled = {}, []

    def schedule(ids, max_new_tokens):
        scheduled.append((ids, max_new_tokens))
        streams[ids[0]] = FakeStream(steps[ids[0]])
        return streams[ids[0]]

    async def run():
        slots, ttft = asyncio.Semaphore(1), []
        choices = [Choice(0, [10]), Choice(1, [20])]
        gen = Generation(
            schedule, tokenizer, choices, 8, ["rld"], timeout=HANG_S, slots=slots, ttft=ttft.append
        )
        gen.start()
        got = [(ch.index, delta) async for ch, delta in gen.deltas()]
        for _ in range(500):  # the last slot comes back on the loop right after the last event
            if not slots.locked():
                break
            await asyncio.sleep(0.01)
        return choices, got, ttft, slots

    choices, got, ttft, slots = asyncio.run(run())
    assert [d for i, d in got if i == 0] == ["hel", "lo", ""]
    assert [d for i, d in got if i == 1] == [" wo", ""]
    assert [(ch.sent, ch.finish, ch.count) for ch in choices] == [
        ("hello", "stop", 4),
        (" wo", "stop", 2),
    ]
    assert sorted(scheduled) == [([10], 8), ([20], 8)]
    assert streams[20].cancelled and not streams[10].cancelled
    assert len(ttft) == 2 and all(0 <= s < HANG_S for s in ttft)
    assert not slots.locked()


# -- the openai client against a live server ----------------------------------------------------


def test_completion_equals_greedy(client, model, ref, eng):
    for prompt in TEXTS[:2]:
        r = client.completions.create(model=model, prompt=prompt, max_tokens=24)
        want = ref(prompt, 24)
        assert r.object == "text_completion" and r.model == model
        assert r.choices[0].text == want.text
        eos = want.token_ids[-1] == eng.tokenizer.eos_id
        assert r.choices[0].finish_reason == ("stop" if eos else "length")
        assert r.choices[0].logprobs is None
        n_in = len(eng.tokenizer.encode(prompt)) + 1
        assert r.usage.prompt_tokens == n_in
        assert r.usage.completion_tokens == len(want.token_ids)
        assert r.usage.total_tokens == n_in + len(want.token_ids)
        st = r.model_extra["stairs"]
        assert st["strategy"] == "assisted" and st["main_calls"] >= 1
        assert 0 <= st["acceptance_rate"] <= 1 and st["tokens_per_main_call"] >= 1


class _Gated:
    """A handle whose stream stops after its first text until gate is set: the request cannot
    end before the client has its first chunk, however the machine schedules the threads."""

    def __init__(self, handle, gate: threading.Event, decode):
        self.handle, self.gate, self.decode = handle, gate, decode

    def tokens(self):
        seq, held = [], False
        for toks in self.handle.tokens():
            yield toks
            seq += toks
            text = self.decode(seq)
            if not held and text and not text.endswith("\ufffd"):  # a first chunk went out
                held = True
                assert self.gate.wait(HANG_S), "the client never got its first chunk"

    def __getattr__(self, name):
        return getattr(self.handle, name)


def test_streaming_equals_greedy_and_arrives_while_generating(
    client, model, ref, server, eng, monkeypatch
):
    prompt, n = TEXTS[0], 96
    state, gate, real_submit = server.state, threading.Event(), eng.submit
    gated = lambda *a, **kw: _Gated(real_submit(*a, **kw), gate, eng.tokenizer.decode)
    monkeypatch.setattr(eng, "submit", gated)
    chunks, inflight_at_first = [], None
    try:
        for c in client.completions.create(model=model, prompt=prompt, max_tokens=n, stream=True):
            if inflight_at_first is None:
                inflight_at_first = state.inflight  # the request is still generating
                gate.set()
            chunks.append(c)
    finally:
        gate.set()
    want = ref(prompt, n)
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert inflight_at_first == 1  # sent as tokens were accepted, not all at the end
    assert sum(bool(c.choices[0].text) for c in chunks) > 3
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert len({c.id for c in chunks}) == 1


def test_sse_wire_format(server, model, ref):
    body = {"model": model, "prompt": TEXTS[1], "max_tokens": 12, "stream": True}
    body["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=HANG_S) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e[len("data: ") :]) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    text = "".join(p["choices"][0]["text"] for p in payloads if p["choices"])
    assert text == ref(TEXTS[1], 12).text
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 12


def test_list_prompt_and_token_ids(client, model, ref, pycode_prompts):
    prompts = [TEXTS[2], TEXTS[3], TEXTS[0]]
    r = client.completions.create(model=model, prompt=prompts, max_tokens=16)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [ref(p, 16).text for p in prompts]
    ids = pycode_prompts[5]
    r = client.completions.create(model=model, prompt=ids, max_tokens=16)
    assert r.choices[0].text == ref(ids, 16).text and r.usage.prompt_tokens == len(ids)
    # streamed, the choices interleave by index
    out = {0: "", 1: ""}
    stream = client.completions.create(model=model, prompt=prompts[:2], max_tokens=16, stream=True)
    for c in stream:
        out[c.choices[0].index] += c.choices[0].text
    assert [out[0], out[1]] == [ref(p, 16).text for p in prompts[:2]]


def test_stop_strings_cut_exactly(client, model, ref):
    prompt, n = TEXTS[0], 48
    full = ref(prompt, n).text
    stop = "TypeError"
    assert stop in full  # the case below really cuts
    want = full[: full.index(stop)]
    r = client.completions.create(model=model, prompt=prompt, max_tokens=n, stop=stop)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < len(ref(prompt, n).token_ids)  # it stopped early
    # a list: the earliest match wins, also when streamed; a stop never seen changes nothing
    stops = ["never appears", "(path", stop]
    want = full[: full.index("(path")]
    r = client.completions.create(model=model, prompt=prompt, max_tokens=n, stop=stops)
    assert r.choices[0].text == want
    s = client.completions.create(model=model, prompt=prompt, max_tokens=n, stop=stops, stream=True)
    chunks = list(s)
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"
    r = client.completions.create(model=model, prompt=prompt, max_tokens=n, stop="\x00never")
    assert r.choices[0].text == full


def test_models_health_ready(client, model, server, eng):
    assert [m.id for m in client.models.list().data] == [model]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and set(health["weights_cache"]) == {"main", "assistant"}
    for graphs in health["weights_cache"].values():  # each graph's entry (its name), or null
        assert all(e is None or e.startswith(f[: -len(".onnx")] + "-") for f, e in graphs.items())
        assert eng.weights_entries()["main"].keys() == graphs.keys()
    ready = httpx.get(server.url + "/ready")
    assert ready.status_code == 200 and ready.json()["model"] == model


def test_load_32_clients_exact_and_counted(server, model, ref, pycode_prompts, eng):
    """32 concurrent clients x 4 requests (half streamed), mixed prompts and lengths: every answer
    is its own prompt's greedy text (no request sees another's tokens), no 5xx, and /metrics
    counts exactly what was sent."""
    clients, per_client, n = 32, 4, 16
    prompts = [pycode_prompts[i] for i in range(0, 64, 4)]  # 16 prompts, ids as given
    for p in prompts:
        ref(p, n)
    before = metrics(server.url)
    calls_before = eng.health().main_calls
    errors, results = [], []

    def run(c: int) -> None:
        cl = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=HANG_S)
        try:
            for j in range(per_client):
                p = prompts[(c * per_client + j) % len(prompts)]
                if j % 2:
                    s = cl.completions.create(model=model, prompt=p, max_tokens=n, stream=True)
                    text = "".join(x.choices[0].text for x in s)
                else:
                    text = (
                        cl.completions.create(model=model, prompt=p, max_tokens=n).choices[0].text
                    )
                results.append((p, text))
        except Exception as exc:  # noqa: BLE001 - collected and failed on below
            errors.append(repr(exc))

    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG_S)
    assert not any(t.is_alive() for t in threads), f"clients still running after {HANG_S} s (hung)"
    assert errors == []
    assert len(results) == clients * per_client
    bad = [p for p, text in results if text != ref(p, n).text]
    assert bad == []
    after = metrics(server.url)

    def delta(key):
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta('stairs_requests_total{status="200"}') == clients * per_client
    statuses = {k for k in after if k.startswith("stairs_requests_total")}
    assert all(delta(k) == 0 for k in statuses if k != 'stairs_requests_total{status="200"}')
    want_tokens = sum(len(ref(p, n).token_ids) for p, _ in results)
    assert delta("stairs_completion_tokens_total") == want_tokens
    assert delta("stairs_prompt_tokens_total") == sum(len(p) for p, _ in results)
    assert delta("stairs_time_to_first_token_seconds_count") == clients * per_client
    h = eng.health()
    rows = [r for r, _ in h.recent_calls[len(h.recent_calls) - (h.main_calls - calls_before) :]]
    assert sum(rows) / len(rows) > 2  # concurrent requests really shared main calls
    assert delta("stairs_rows_per_main_call_count") == len(rows)


# -- robustness --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tc(eng):
    """The same engine behind an in-process app (no socket) for the error cases."""
    app = create_app(eng, strategy="auto", max_queue=8)  # batched auto: draft length by load
    with TestClient(app) as c:
        yield c


@pytest.mark.parametrize(
    "body, status, words",
    [
        ("{not json", 400, ["malformed JSON"]),
        ('["a list"]', 400, ["JSON object"]),
        ({"model": None, "prompt": "x = 1"}, 400, ["'model'", "required"]),
        ({"prompt": "x", "max_tokens": 4, "colour": "red"}, 400, ["unknown field 'colour'"]),
        ({"prompt": "x", "max_tokens": "16"}, 400, ["'max_tokens'"]),
        ({"prompt": "x", "max_tokens": 4.5}, 400, ["'max_tokens'"]),
        ({"prompt": "x", "stream": "yes"}, 400, ["'stream'"]),
        ({"prompt": 5}, 400, ["'prompt'", "list of strings"]),
        ({"prompt": [1, "a"]}, 400, ["'prompt'"]),
        ({"prompt": "x", "stop": 3}, 400, ["'stop'"]),
        ({"prompt": "x", "temperature": 0.7}, 400, ["only greedy", "temperature"]),
        ({"prompt": "x", "top_p": 0.9}, 400, ["only greedy", "top_p"]),
        ({"prompt": "x", "n": 2}, 400, ["n must be 1"]),
        ({"prompt": "x", "max_tokens": 0}, 400, ["max_tokens must be from 1 to 4096"]),
        ({"prompt": "x", "max_tokens": 5000}, 400, ["max_tokens must be from 1 to 4096"]),
        ({"prompt": "   "}, 400, ["prompt is empty"]),
        ({"prompt": []}, 400, ["prompt is empty"]),
        ({"prompt": [[]]}, 400, ["empty list of token ids"]),
        ({"prompt": [10**9]}, 400, ["out of range"]),
        ({"prompt": ["ok", ""]}, 400, ["prompt[1] is empty"]),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, ["at most 4"]),
        ({"prompt": "x", "stop": ""}, 400, ["stop string"]),
        ({"prompt": ["x"] * 9}, 400, ["at most 8"]),
        ({"prompt": "x", "model": "gpt-4"}, 404, ["'gpt-4' does not exist"]),
    ],
)
def test_bad_requests_name_the_field(tc, model, body, status, words):
    if isinstance(body, dict):
        body = {k: v for k, v in {"model": model, **body}.items() if v is not None}
        body = json.dumps(body)
    r = tc.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    for w in words:
        assert w in err["message"], err
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_temperature_zero_and_user_are_accepted(tc, model, ref):
    body = {"model": model, "prompt": TEXTS[3], "max_tokens": 8, "temperature": 0, "user": "u1"}
    r = tc.post("/v1/completions", json={**body, "top_p": 1, "seed": 7})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == ref(TEXTS[3], 8).text
    assert r.json()["stairs"]["strategy"] == "auto"
    assert tc.get("/ready").json()["runs"] == "assisted"


def test_prompt_over_the_input_limit(tc, model, eng):
    limit = min(eng.tokenizer.max_input_tokens, eng.limits.max_input_tokens)
    r = tc.post("/v1/completions", json={"model": model, "prompt": "x = 1\n" * 2000})
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert f"over the input limit of {limit} tokens" in msg
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_openai_client_sees_a_400(client, model):
    with pytest.raises(openai.BadRequestError, match="only greedy"):
        client.completions.create(model=model, prompt="x", temperature=1.0)


def test_api_key(eng, model, monkeypatch):
    app = create_app(eng, strategy="greedy", api_key="s3cret")
    with TestClient(app) as c:
        body = {"model": model, "prompt": "x = 1\n", "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "s3cret"}):
            r = c.post("/v1/completions", json=body, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert "API key" in r.json()["error"]["message"]
            assert c.get("/v1/models", headers=headers).status_code == 401
            assert c.get("/metrics", headers=headers).status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert c.post("/v1/completions", json=body, headers=ok).status_code == 200
        assert c.get("/v1/models", headers=ok).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 200
    # the command line takes the key from --api-key or the environment; binds loopback by default
    monkeypatch.setenv("STAIRS_API_KEY", "from-env")
    a = parse_args(["--main", "m"])
    assert isinstance(a, ServeConfig)  # the command line builds the one config object
    assert a.api_key == "from-env" and a.host == "127.0.0.1" and a.port == 8000
    assert parse_args(["--main", "m", "--api-key", "flag"]).api_key == "flag"
    monkeypatch.delenv("STAIRS_API_KEY")
    assert parse_args(["--main", "m"]).api_key is None
    # one shared ORT pool is opt-in (per-session pools by default)
    assert parse_args(["--main", "m"]).shared_thread_pool is False
    assert parse_args(["--main", "m", "--shared-thread-pool"]).shared_thread_pool is True


def test_queue_full_429_then_disconnect_frees_rows(eng, model):
    """max_queue=1: a second request while one streams gets 429 + Retry-After; the streaming
    client then leaves and its rows are freed at the next step, long before max_tokens."""
    app = create_app(eng, strategy="greedy", max_queue=1)
    srv = Server(app, "127.0.0.1", free_port()).start()
    state = srv.state
    try:
        body = {"model": model, "prompt": TEXTS[0], "max_tokens": 2000, "stream": True}
        calls = eng.health().main_calls
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=HANG_S) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert state.inflight == 1 and eng.health().active == 1
            busy = httpx.post(srv.url + "/v1/completions", json={**body, "stream": False})
            assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
            assert "server busy" in busy.json()["error"]["message"]
        # the stream is closed here, mid-generation
        wait_idle(eng)
        assert eng.health().main_calls - calls < 2000  # greedy: 2000 tokens take 2000 calls
        wait_for(lambda: state.inflight == 0, "the left stream's prompts are freed")
        m = metrics(srv.url)
        assert m['stairs_requests_total{status="429"}'] == 1
        assert m['stairs_requests_total{status="499"}'] == 1
        ok = httpx.post(
            srv.url + "/v1/completions", json={**body, "stream": False, "max_tokens": 4}
        )
        assert ok.status_code == 200
    finally:
        srv.stop()


def test_non_streaming_client_that_leaves_is_cancelled(server, model, eng):
    """The client gives up (its read timeout is the way it leaves, not a speed limit): the
    request is cancelled before its end and counted as 499."""
    before = metrics(server.url).get('stairs_requests_total{status="499"}', 0.0)
    calls = eng.health().main_calls
    body = {"model": model, "prompt": TEXTS[2], "max_tokens": 4000}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
    wait_idle(eng)
    assert eng.health().main_calls - calls < 800  # 4000 tokens need 800+ calls (5 per call)
    wait_for(
        lambda: metrics(server.url).get('stairs_requests_total{status="499"}', 0.0) > before,
        "the request is counted as cancelled",
    )


def test_timeout_504_frees_rows(eng, model):
    app = create_app(eng, strategy="greedy", timeout=1.0)
    with TestClient(app) as c:
        calls = eng.health().main_calls
        r = c.post("/v1/completions", json={"model": model, "prompt": TEXTS[1], "max_tokens": 3000})
        assert r.status_code == 504 and "timed out after 1 s" in r.json()["error"]["message"]
        at_504 = eng.health().main_calls
        wait_idle(eng)
        assert eng.health().main_calls - at_504 < 10  # freed at the next step
        assert at_504 - calls < 3000  # cut short: 3000 tokens need 3000 greedy calls
        r = c.post("/v1/completions", json={"model": model, "prompt": TEXTS[1], "max_tokens": 2})
        assert r.status_code == 200
        wait_idle(eng)
        assert 'stairs_requests_total{status="504"} 1.0' in c.get("/metrics").text


def test_timeout_after_the_first_text_is_an_error_event(eng, model, monkeypatch):
    """Streamed, the status went out with the first text, so a timeout after it comes as an
    error event, then [DONE], and the rows are freed. The generation's clock stands still until
    the client has the first chunk, then jumps past the timeout: no machine's speed decides
    which of the two cases this is."""
    from serve import generation

    now = [time.perf_counter()]
    monkeypatch.setattr(generation, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    srv = Server(create_app(eng, strategy="greedy", timeout=1.0), "127.0.0.1", free_port())
    srv.start()
    try:
        body = {"model": model, "prompt": TEXTS[1], "max_tokens": 3000, "stream": True}
        events = []
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=HANG_S) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line:
                    events.append(line)
                    now[0] += 1000.0  # past the deadline once the first chunk is here
        assert "choices" in json.loads(events[0][6:]) and events[-1] == "data: [DONE]"
        err = json.loads(events[-2][6:])["error"]
        assert "timed out after 1 s" in err["message"] and err["code"] == "timeout"
        wait_idle(eng)
        assert metrics(srv.url)['stairs_requests_total{status="504"}'] == 1
        assert srv.state.inflight == 0
    finally:
        srv.stop()


def test_engine_failure_500_and_the_server_goes_on(eng, model, ref, monkeypatch):
    """A request whose handle fails (Engine.submit's handle raises, as the engine's do for an
    error inside the scheduler) gets 500 with the message; the next ones are served exactly."""
    marker = 4242
    real_submit = eng.submit

    class FailingHandle:
        def __init__(self, handle):
            self.handle = handle

        def tokens(self):
            yield from ()
            raise RuntimeError("RuntimeError: injected failure")

        def result(self, timeout=None):
            raise RuntimeError("RuntimeError: injected failure")

        def stats(self):
            return self.handle.stats()

        def cancel(self):
            self.handle.cancel()

    def submit(prompt, **kw):
        handle = real_submit(prompt, **kw)
        if isinstance(prompt, list) and marker in prompt:
            handle.cancel()
            return FailingHandle(handle)
        return handle

    app = create_app(eng, strategy="greedy")
    monkeypatch.setattr(eng, "submit", submit)
    with TestClient(app) as c:
        r = c.post("/v1/completions", json={"model": model, "prompt": [5, marker, 1]})
        assert r.status_code == 500
        assert "RuntimeError: injected failure" in r.json()["error"]["message"]
        body = {"model": model, "prompt": TEXTS[3], "max_tokens": 8}
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == ref(TEXTS[3], 8).text
        r = c.post("/v1/completions", json={**body, "prompt": [5, marker, 1], "stream": True})
        assert r.status_code == 500  # failed before its first token: a status, not a stream
        m = c.get("/metrics").text
        assert 'stairs_requests_total{status="500"} 2.0' in m


def test_one_at_a_time_mode(eng, model, ref):
    """max_active=1 (the benchmark's baseline) serves concurrent requests one after another."""
    app = create_app(eng, strategy="greedy", max_active=1)
    srv = Server(app, "127.0.0.1", free_port()).start()
    try:
        calls = eng.health().main_calls
        out = {}

        def one(i):
            body = {"model": model, "prompt": TEXTS[i], "max_tokens": 8}
            out[i] = httpx.post(srv.url + "/v1/completions", json=body, timeout=HANG_S).json()

        threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert [out[i]["choices"][0]["text"] for i in range(3)] == [
            ref(TEXTS[i], 8).text for i in range(3)
        ]
        h = eng.health()
        fresh = h.recent_calls[len(h.recent_calls) - (h.main_calls - calls) :]
        assert fresh and {rows for rows, _ in fresh} == {1}
    finally:
        srv.stop()


def start_process(pycode_pair, *flags: str) -> tuple[subprocess.Popen, str]:
    """`python -m serve` on a free port with the pair (greedy); returns once /ready is 200."""
    main, draft = pycode_pair
    port = free_port()
    cmd = [sys.executable, "-m", "serve", "--main", str(main), "--assistant", str(draft)]
    cmd += ["--strategy", "greedy", "--port", str(port), "--threads", "1", "--no-verify", *flags]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + HANG_S
    while True:
        assert proc.poll() is None, proc.stdout.read().decode()
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert time.monotonic() < end, "the server did not become ready"
        time.sleep(0.2)


def _ready_status(url: str) -> int | None:
    """/ready's status, or None once the listener is closed."""
    try:
        return httpx.get(url + "/ready", timeout=HANG_S).status_code
    except httpx.TransportError:
        return None


def test_sigterm_drains_with_a_grace_then_exits(pycode_pair, ref):
    """Issue 18.5. stairs-serve as a process: on SIGTERM mid-stream the listener stays open for
    --drain-grace: /ready answers 503 (a load balancer takes the replica out), /health 200, new
    completions 503 with Retry-After. The grace is long here, so these fit in it however slow
    the machine; a second SIGTERM ends it: the listener closes, the open stream finishes
    exactly, and the process exits 0."""
    proc, url = start_process(pycode_pair, "--drain-grace", str(HANG_S))
    try:
        name = Path(pycode_pair[0]).name
        body = {"model": name, "prompt": TEXTS[0], "max_tokens": 128, "stream": True}
        text = ""
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=HANG_S) as r:
            lines = r.iter_lines()
            first = next(lines)
            text += json.loads(first[len("data: ") :])["choices"][0]["text"]
            proc.send_signal(signal.SIGTERM)
            wait_for(lambda: _ready_status(url) == 503, "/ready answers 503 after SIGTERM")
            got = httpx.get(url + "/ready", timeout=HANG_S)
            assert (got.status_code, got.json()) == (503, {"status": "draining"})
            assert httpx.get(url + "/health", timeout=HANG_S).status_code == 200
            late = httpx.post(url + "/v1/completions", json=body, timeout=HANG_S)
            assert late.status_code == 503 and late.headers["retry-after"] == "1"
            proc.send_signal(signal.SIGTERM)  # the grace ends at once
            wait_for(lambda: _ready_status(url) is None, "the listener closes")
            rest = [ln for ln in lines if ln]
        assert rest[-1] == "data: [DONE]" and len(rest) > 3  # went on after the signals
        text += "".join(json.loads(ln[6:])["choices"][0]["text"] for ln in rest[:-1])
        assert text == ref(TEXTS[0], 128).text
        assert proc.wait(HANG_S) == 0
        log = proc.stdout.read().decode()
        assert re.search(r"stairs-serve: .* on http://127\.0\.0\.1:\d+", log), log
        assert "Traceback" not in log, log
    finally:
        if proc.poll() is None:
            proc.kill()  # the workers die with it (parent-death signal)
            proc.wait()


def test_the_drain_grace_ends_by_itself(pycode_pair):
    """Without a second signal the listener closes once --drain-grace has passed, and with no
    request open the process exits 0 (it would wait for a signal forever otherwise)."""
    proc, url = start_process(pycode_pair, "--drain-grace", "1")
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(HANG_S) == 0
        assert _ready_status(url) is None
        log = proc.stdout.read().decode()  # the drain is logged, not silent
        assert "SIGTERM: draining (prompts in flight: 0); the listener closes in 1 s" in log, log
        assert "stopped (prompts unfinished: 0)" in log, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- hostile clients (issue 18) ----------------------------------------------------------------


class LogRecords(logging.Handler):
    """The records logged on uvicorn's error logger (where 'Exception in ASGI application'
    goes), attached after uvicorn configured its logging."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        logging.getLogger("uvicorn.error").addHandler(self)

    def emit(self, record):
        self.records.append(record)

    def close(self):
        logging.getLogger("uvicorn.error").removeHandler(self)
        super().close()


def raw_request(srv: Server, body: bytes, length: int, ctype="application/json") -> socket.socket:
    """A socket that sent a POST /v1/completions announcing length bytes, and body."""
    s = socket.create_connection((srv.host, srv.port), timeout=HANG_S)
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {srv.host}\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    )
    s.sendall(head.encode() + body)
    return s


def test_client_hanging_up_mid_body_is_a_499(eng, model):
    """Issue 18.1: Content-Length 1000, 20 bytes sent, then the client closes: no traceback
    (uvicorn's 'Exception in ASGI application'), counted as 499."""
    srv = Server(create_app(eng, strategy="greedy"), "127.0.0.1", free_port())
    logs = LogRecords()
    srv.start()
    try:
        raw_request(srv, b'{"model": "x", "pro', 1000).close()

        def seen():
            counted = metrics(srv.url).get('stairs_requests_total{status="499"}', 0.0)
            return counted or any(r.levelno >= logging.ERROR for r in logs.records)

        wait_for(seen, "the request is counted or logged")
        errors = [r.getMessage() for r in logs.records if r.levelno >= logging.ERROR]
        assert errors == []
        assert metrics(srv.url)['stairs_requests_total{status="499"}'] == 1
        assert srv.state.inflight == 0
    finally:
        logs.close()
        srv.stop()


def test_slow_body_408(eng, model):
    """A body that stops coming (slowloris) is answered 408 after body_timeout and the
    connection closed (the bound on connections: test_serve_hostile.py)."""
    app = create_app(eng, strategy="greedy", body_timeout=1.0)
    srv = Server(app, "127.0.0.1", free_port()).start()
    try:
        with raw_request(srv, b'{"model": "x", "pro', 1000) as s:
            answer = s.recv(65536)  # a hang guard of HANG_S, not a speed
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            assert b"request body not received within 1 s" in answer
            while s.recv(65536):  # then the server closes the connection
                pass
        m = metrics(srv.url)
        assert m['stairs_requests_total{status="408"}'] == 1
        # nothing leaks: no prompt in flight, the scheduler idle, the server holds no connection
        assert m["stairs_queue_depth"] == 0 and srv.state.inflight == 0 and not eng.health().busy
        conns = srv.server.server_state.connections
        wait_for(lambda: not conns, "the server lets go of its connections")
    finally:
        srv.stop()


def test_content_type_must_be_json(tc, model, ref):
    """Issue 18.3: a text/plain or form POST (what any web page may send to a local server
    without a CORS preflight) is 415; application/json with parameters is served."""
    body = json.dumps({"model": model, "prompt": TEXTS[3], "max_tokens": 2})
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "", "application/jsonx"):
        r = tc.post("/v1/completions", content=body, headers={"content-type": ctype})
        assert r.status_code == 415, (ctype, r.text)
        assert "application/json" in r.json()["error"]["message"]
    for ctype in ("application/json; charset=utf-8", "Application/JSON"):
        r = tc.post("/v1/completions", content=body, headers={"content-type": ctype})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == ref(TEXTS[3], 2).text


def test_docs_are_off_with_an_api_key(eng, tc):
    """Issue 18.4: with an API key /docs, /redoc and /openapi.json are off (404, key or not);
    without one they are served."""
    assert tc.get("/docs").status_code == 200 and tc.get("/openapi.json").status_code == 200
    with TestClient(create_app(eng, strategy="greedy", api_key="s3cret")) as c:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert c.get(path).status_code == 404
            assert c.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 404


def _answer_then_closed(s: socket.socket) -> bytes:
    """Everything the server sends on s until it closes the connection (HANG_S: a hang guard)."""
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def test_refusals_over_a_real_socket(eng, model):
    """As a client sees them over TCP (not the in-process TestClient): 415 for a body not
    declared JSON; 413 for a body over the limit, announced by its Content-Length or sent in
    chunks without one, the connection then closed; with an API key no /docs, /redoc or
    /openapi.json (404, key or not) while /v1 needs the key. Nothing is left in flight."""
    from serve.app import MAX_BODY_BYTES

    srv = Server(create_app(eng, strategy="greedy", api_key="s3cret"), "127.0.0.1", free_port())
    srv.start()
    key = {"Authorization": "Bearer s3cret"}
    url = srv.url + "/v1/completions"
    try:
        body = json.dumps({"model": model, "prompt": TEXTS[3], "max_tokens": 2})
        for ctype, status in (("text/plain", 415), ("application/json", 200)):
            headers = {**key, "content-type": ctype}
            r = httpx.post(url, content=body, headers=headers, timeout=HANG_S)
            assert r.status_code == status, r.text
        assert "application/json" in httpx.post(url, content=body, headers=key).text  # 415's
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: {srv.host}\r\nAuthorization: Bearer s3cret"
            "\r\nContent-Type: application/json\r\n"
        )
        with socket.create_connection((srv.host, srv.port), timeout=HANG_S) as s:
            s.sendall(f"{head}Content-Length: {MAX_BODY_BYTES + 1}\r\n\r\n".encode())
            announced = _answer_then_closed(s)
        with socket.create_connection((srv.host, srv.port), timeout=HANG_S) as s:
            s.sendall(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode())
            piece = b" " * (1 << 20)
            for _ in range(MAX_BODY_BYTES // len(piece)):
                s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            s.sendall(b"1\r\n \r\n")  # one byte over the limit
            chunked = _answer_then_closed(s)
        for answer in (announced, chunked):
            assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
            assert f"request body over {MAX_BODY_BYTES} bytes".encode() in answer
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert httpx.get(srv.url + path).status_code == 404
            assert httpx.get(srv.url + path, headers=key).status_code == 404
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        assert httpx.get(srv.url + "/v1/models", headers=key).status_code == 200
        m = httpx.get(srv.url + "/metrics", headers=key).text
        assert 'stairs_requests_total{status="413"} 2.0' in m
        assert 'stairs_requests_total{status="415"} 2.0' in m
        assert srv.state.inflight == 0 and not eng.health().busy
    finally:
        srv.stop()


def test_create_app_checks_its_settings(eng, monkeypatch):
    from engine import InputError

    app = create_app(eng, ServeConfig(strategy="greedy", max_queue=8), max_queue=4)
    assert app.state.stairs.config == ServeConfig(strategy="greedy", max_queue=4)
    # the token budget goes to Engine.start (recorded here, the shared budget left as it is)
    started, real_start = [], eng.start
    monkeypatch.setattr(eng, "start", lambda **kw: (started.append(kw), real_start())[1])
    create_app(eng, strategy="greedy", max_batch_tokens=128)
    assert started == [{"max_batch_tokens": 128}]
    monkeypatch.undo()
    for kw, words in [
        ({"strategy": "beam"}, "unknown strategy"),
        ({"strategy": "lookup", "options": {"branches": 2}}, "branches"),
        ({"max_queue": 0}, "max_queue"),
        ({"max_active": True}, "max_active"),
        ({"timeout": -1}, "timeout"),
        ({"api_key": " "}, "api_key"),
        ({"max_batch_tokens": 0}, "max_batch_tokens"),
    ]:
        with pytest.raises(InputError, match=words):
            create_app(eng, **kw)


def test_command_line_errors(tmp_path, capsys):
    assert main(["--main", str(tmp_path / "absent")]) == 2
    assert capsys.readouterr().err.startswith("stairs-serve: error: ")
    with pytest.raises(SystemExit) as exit_:
        main(["--main", "m", "--strategy", "beam"])  # not a strategy
    assert exit_.value.code == 2
    with pytest.raises(SystemExit):
        main(["--main", "m", "--timeout", "nan"])
    assert "--timeout" in capsys.readouterr().err


def test_serve_config_yaml_is_valid():
    pytest.importorskip("ray", reason="ray is not installed (pip install 'stairs[ray]')")
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from serve.config import RAY_ARGS

    raw = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    app = ServeDeploySchema.model_validate(raw).applications[0]
    assert app.import_path == "serve.cli:ray_app"
    assert set(app.args) <= set(RAY_ARGS)


def test_ray_app_refuses_unknown_args():
    pytest.importorskip("ray", reason="ray is not installed (pip install 'stairs[ray]')")
    from engine import InputError
    from serve.cli import ray_app

    with pytest.raises(InputError, match="unknown setting.*colour"):
        ray_app({"main": "m", "colour": "red"})
    with pytest.raises(InputError, match="replicas must be"):
        ray_app({"main": "m", "replicas": 0})


def test_ray_serve_two_replicas_exact(pycode_pair, ref, pycode_prompts):
    """A local Ray instance, 2 replicas of 1 thread: requests reach both; every answer exact."""
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'stairs[ray]')")
    from ray import serve

    from serve.cli import ray_app

    main, draft = pycode_pair
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        cfg = {"main": str(main), "assistant": str(draft), "threads": 1, "replicas": 2}
        cfg.update(strategy=STRATEGY[0], options=STRATEGY[1], verify=False)
        serve.run(ray_app(cfg), name="stairs", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        cl = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        prompts = [*TEXTS, *pycode_prompts[:12]]
        out = {}

        def one(i):
            r = cl.completions.create(model=Path(main).name, prompt=prompts[i], max_tokens=16)
            out[i] = (r.choices[0].text, r.model_extra["stairs"]["replica"])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert [out[i][0] for i in range(len(prompts))] == [ref(p, 16).text for p in prompts]
        assert len({rep for _, rep in out.values()}) == 2  # both replicas answered
        stream = cl.completions.create(
            model=Path(main).name, prompt=TEXTS[0], max_tokens=24, stream=True
        )
        assert "".join(c.choices[0].text for c in stream) == ref(TEXTS[0], 24).text
    finally:
        serve.shutdown()
        ray.shutdown()


def test_import_engine_does_not_import_fastapi():
    code = (
        "import sys, engine; assert 'fastapi' not in sys.modules and 'uvicorn' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, env={**os.environ})


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _smaps_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def test_workers_share_the_port_and_the_weights(pycode_pair, ref):
    """--workers 2: two engines behind one port give the exact tokens; their weights are pages
    of the one mapped weights cache (shared, not copied); SIGTERM stops all, exit 0."""
    proc, url = start_process(pycode_pair, "--workers", "2", "--drain-grace", "0")
    try:
        kids = _children(proc.pid)
        assert len(kids) == 2, kids
        name = Path(pycode_pair[0]).name
        bodies = [{"model": name, "prompt": t, "max_tokens": 24} for t in TEXTS[:3]] * 2
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            got = list(pool.map(lambda b: httpx.post(url + "/v1/completions", json=b,
                                                     timeout=HANG_S), bodies))  # fmt: skip
        for b, r in zip(bodies, got, strict=True):
            assert (
                r.status_code == 200 and r.json()["choices"][0]["text"] == ref(b["prompt"], 24).text
            )
        # the pycode pair's prepacked weights (~290 MB on disk) are file pages both map
        # (dirty while the page cache has not yet written back the entries just built)
        shared_mb = [(_smaps_kb(k, "Shared_Clean") + _smaps_kb(k, "Shared_Dirty")) / 1024
                     for k in kids]  # fmt: skip
        anon_mb = [_smaps_kb(k, "Anonymous") / 1024 for k in kids]
        assert min(shared_mb) > 150, (shared_mb, anon_mb)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(HANG_S) == 0
        assert not [k for k in kids if Path(f"/proc/{k}").exists()]
    finally:
        if proc.poll() is None:
            proc.kill()  # the workers die with it (parent-death signal)
            proc.wait()


def test_workers_die_with_a_killed_parent(pycode_pair):
    """SIGKILL to the parent of --workers leaves no orphan worker holding the port."""
    proc, _url = start_process(pycode_pair, "--workers", "2", "--drain-grace", "0")
    kids = _children(proc.pid)
    assert len(kids) == 2
    proc.kill()
    proc.wait()
    end = time.monotonic() + HANG_S
    while [k for k in kids if Path(f"/proc/{k}").exists()] and time.monotonic() < end:
        time.sleep(0.1)
    assert not [k for k in kids if Path(f"/proc/{k}").exists()]
