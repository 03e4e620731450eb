"""stairs-serve against clients that hold connections without requests, huge prompts and dead
workers, over real sockets and real processes: legitimate requests keep being served exactly."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="stairs-serve needs the [serve] extra (fastapi)")
httpx = pytest.importorskip("httpx")

from conftest import PROMPTS, PYCODE_MAIN, T5_TOKENIZER, need_shared
from test_serve import HANG_S, TEXTS, metrics, model, raw_request, ref, start_process, wait_for

__all__ = ["model", "ref"]  # test_serve's fixtures, used here

from engine.tokenizer import WINDOW_CONTEXT, Tokenizer
from serve import Server, create_app, free_port

CLOSE = {"Connection": "close"}  # every request on a connection of its own


def _closed_by_server(s: socket.socket) -> bool:
    """Whether the server has closed s (reads until EOF or a reset; HANG_S is a hang guard)."""
    s.settimeout(HANG_S)
    try:
        while s.recv(65536):
            pass
    except OSError:
        pass
    return True


class SlowHeaders(threading.Thread):
    """A client that sends a request's headers one byte every 0.2 s until the server closes."""

    def __init__(self, srv: Server):
        super().__init__(daemon=True)
        self.sock = socket.create_connection((srv.host, srv.port), timeout=HANG_S)
        self.sock.sendall(b"G")  # the first byte at once: a request has begun
        self.head = f"ET /ready HTTP/1.1\r\nHost: {srv.host}\r\nX-Pad: {'a' * 4000}\r\n\r\n"
        self.closed = threading.Event()
        self.stop = threading.Event()

    def run(self):
        try:
            for ch in self.head:
                if self.stop.wait(0.2):
                    return
                self.sock.sendall(ch.encode())
        except OSError:
            self.closed.set()


def _completion(url: str, model: str, prompt: str) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": 8}
    return httpx.post(url + "/v1/completions", json=body, headers=CLOSE, timeout=HANG_S)


def test_idle_and_slow_header_connections_are_closed(eng, model):
    """A connection that sends nothing is closed after idle_timeout, one that sends its headers
    a byte at a time after header_timeout; each is counted by reason in /metrics."""
    app = create_app(eng, strategy="greedy", idle_timeout=2.0, header_timeout=1.0)
    srv = Server(app, "127.0.0.1", free_port()).start()
    slow = [SlowHeaders(srv) for _ in range(4)]
    idle = [socket.create_connection((srv.host, srv.port)) for _ in range(4)]
    try:
        for t in slow:
            t.start()
        assert all(_closed_by_server(s) for s in idle)
        for t in slow:
            assert t.closed.wait(HANG_S), "a slow-header connection was never closed"
        seen = metrics(srv.url)
        assert seen['stairs_connections_closed_total{reason="idle_timeout"}'] >= 4
        assert seen['stairs_connections_closed_total{reason="header_timeout"}'] == 4
        assert httpx.get(srv.url + "/ready", timeout=HANG_S).status_code == 200
    finally:
        for t in slow:
            t.stop.set()
        srv.stop()


def test_requests_are_served_while_twice_the_limit_of_sockets_hang(eng, model, ref):
    """2x max_connections sockets that send nothing or their headers slowly (deadlines far
    away) do not lock anyone out: each new connection past the limit closes the oldest one with
    no request in progress, so every legitimate request is answered, exactly."""
    app = create_app(
        eng, strategy="greedy", max_connections=8, idle_timeout=HANG_S, header_timeout=HANG_S
    )
    srv = Server(app, "127.0.0.1", free_port()).start()
    slow = [SlowHeaders(srv) for _ in range(8)]
    for t in slow:
        t.start()
    idle = [socket.create_connection((srv.host, srv.port)) for _ in range(8)]
    try:
        for i in range(6):
            assert httpx.get(srv.url + "/ready", headers=CLOSE, timeout=HANG_S).status_code == 200
            r = _completion(srv.url, model, TEXTS[i % len(TEXTS)])
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == ref(TEXTS[i % len(TEXTS)], 8).text
        evicted = metrics(srv.url)['stairs_connections_closed_total{reason="evicted"}']
        assert evicted >= 8, evicted
    finally:
        for t in slow:
            t.stop.set()
        for s in idle:
            s.close()
        srv.stop()


def test_requests_in_progress_are_never_evicted(eng, model):
    """Connections whose requests are in progress count against max_connections: past it a
    new request is a 503, and an idle connection is closed rather than one of them."""
    app = create_app(eng, strategy="greedy", max_connections=2, body_timeout=HANG_S)
    srv = Server(app, "127.0.0.1", free_port()).start()
    busy = [raw_request(srv, b'{"model": "x", "pro', 1000) for _ in range(2)]
    try:
        wait_for(lambda: len(srv.server.server_state.tasks) == 2, "both requests are in")
        idle = socket.create_connection((srv.host, srv.port))
        with socket.create_connection((srv.host, srv.port), timeout=HANG_S) as third:
            third.sendall(f"GET /health HTTP/1.1\r\nHost: {srv.host}\r\n\r\n".encode())
            assert third.recv(65536).startswith(b"HTTP/1.1 503")
        assert _closed_by_server(idle)
        for s in busy:
            s.settimeout(0.5)  # still open: nothing was sent to them
            with pytest.raises(TimeoutError):
                s.recv(1)
    finally:
        for s in busy:
            s.close()
    wait_for(lambda: httpx.get(srv.url + "/health").status_code == 200, "served again")
    srv.stop()


def test_a_request_past_the_limit_closes_an_idle_connection(eng, model):
    """A connection opened while every other one had a request in progress is not crowded out
    once they turn idle (keep-alive, as SDK pools leave them): its request closes the one idle
    the longest instead of meeting uvicorn's 503."""
    app = create_app(eng, strategy="greedy", max_connections=2, body_timeout=HANG_S)
    srv = Server(app, "127.0.0.1", free_port()).start()
    busy = [raw_request(srv, b'{"model": "x", "pro', 27) for _ in range(2)]
    try:
        wait_for(lambda: len(srv.server.server_state.tasks) == 2, "both requests are in")
        late = socket.create_connection((srv.host, srv.port), timeout=HANG_S)
        for s in busy:  # the bodies end: each is answered (400) and stays open, idle
            s.sendall(b'mpt": 1}')
            assert s.recv(65536).startswith(b"HTTP/1.1 400")
        wait_for(lambda: not srv.server.server_state.tasks, "both answered")
        late.sendall(f"GET /ready HTTP/1.1\r\nHost: {srv.host}\r\n\r\n".encode())
        assert late.recv(65536).startswith(b"HTTP/1.1 200")
        assert metrics(srv.url)['stairs_connections_closed_total{reason="evicted"}'] >= 1
        late.close()
    finally:
        for s in busy:
            s.close()
        srv.stop()


def test_a_client_that_never_reads_is_closed(eng, model):
    """Pipelined requests whose answers are never read fill the socket's buffers: after
    body_timeout of that the connection is aborted (write_timeout), its requests end, and the
    server answers others."""
    app = create_app(eng, strategy="greedy", body_timeout=1.0, max_connections=4)
    srv = Server(app, "127.0.0.1", free_port()).start()
    c = socket.socket()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c.connect((srv.host, srv.port))
    try:
        c.sendall(f"GET /ready HTTP/1.1\r\nHost: {srv.host}\r\n\r\n".encode() * 20000)
        seen = lambda: metrics(srv.url).get(
            'stairs_connections_closed_total{reason="write_timeout"}'
        )
        wait_for(seen, "the stalled connection is closed")
        wait_for(lambda: not srv.server.server_state.tasks, "its requests ended")
        assert httpx.get(srv.url + "/ready", headers=CLOSE, timeout=HANG_S).status_code == 200
    finally:
        c.close()
        srv.stop()


def test_an_upgrade_request_leaves_the_limit_working(eng, model):
    """A WebSocket upgrade request is answered as plain HTTP (no websockets are served), and
    afterwards idle sockets past the limit are still closed for new requests."""
    app = create_app(eng, strategy="greedy", max_connections=4, idle_timeout=HANG_S)
    srv = Server(app, "127.0.0.1", free_port()).start()
    try:
        with socket.create_connection((srv.host, srv.port), timeout=HANG_S) as ws:
            ws.sendall(
                f"GET /ready HTTP/1.1\r\nHost: {srv.host}\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n".encode()
            )
            assert ws.recv(65536).startswith(b"HTTP/1.1 200")
            idle = [socket.create_connection((srv.host, srv.port)) for _ in range(5)]
            r = httpx.get(srv.url + "/ready", headers=CLOSE, timeout=HANG_S)
            assert r.status_code == 200
            for s in idle:
                s.close()
    finally:
        srv.stop()


# -- prompts far over the input limit ---------------------------------------------------------


def test_a_huge_prompt_is_refused_without_tokenizing_it(eng, model, monkeypatch):
    """A 7 MB text prompt is refused (400 with the limit) having tokenized at most a bounded
    number of characters; truncation through the API keeps the last tokens the same way."""
    tok = eng.tokenizer
    limit = min(tok.max_input_tokens, eng.limits.max_input_tokens)
    read = []
    encode = type(tok).encode
    monkeypatch.setattr(type(tok), "encode", lambda self, t: read.append(len(t)) or encode(self, t))
    app = create_app(eng, strategy="greedy")
    srv = Server(app, "127.0.0.1", free_port()).start()
    huge = "x = 1\n" * 1_000_000  # 6 MB, under the 8 MB body limit
    try:
        body = {"model": model, "prompt": huge}
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=HANG_S)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert f"over the input limit of {limit} tokens" in r.json()["error"]["message"]
        assert sum(read) <= tok.max_chars(limit), sum(read)
        read.clear()
        got = eng.encode(huge, max_input_tokens=limit, truncation="left")[0].tolist()
        assert sum(read) <= 2 * tok.max_chars(limit) + WINDOW_CONTEXT  # the window, twice
        tail = "x = 1\n" * (limit // 2)  # as many lines as the kept ids hold, and more
        assert got == eng.encode(tail, max_input_tokens=limit, truncation="left")[0].tolist()
    finally:
        srv.stop()


@pytest.mark.parametrize("spiece", [PYCODE_MAIN / "spiece.model", T5_TOKENIZER / "spiece.model"])
def test_cut_windows_give_the_whole_texts_ids(spiece, monkeypatch):
    """The kept end (or start) of a text over max_chars is tokenized alone, cut at a line
    break: its ids equal the whole text's ids, on every public prompt, with windows made small
    enough that every prompt is cut (both T5 tokenizers: byte-fallback and nmt_nfkc)."""
    need_shared()
    tok = Tokenizer(spiece, 32128, 1, 0)
    monkeypatch.setattr(Tokenizer, "max_chars", lambda self, n: 12 * (n + 8))  # 336 for 20
    texts = [json.loads(line)["context"] for line in PROMPTS.read_text().splitlines()]
    checked = 0
    for text in texts:
        if len(text) <= 336:
            continue
        full = tok.encode(text)
        end, fits_end = tok.encode_limited(text, 20, "end")
        start, fits_start = tok.encode_limited(text, 20, "start")
        assert not fits_end and not fits_start
        assert tok.encode_limited(text, 20) == ([], False)  # refused unread
        assert start == full[:20] and end == full[-20:]
        checked += 1
    assert checked >= 150  # 183 of the 200 are over 336 characters


# -- --workers: a dead worker is replaced, the others keep serving -----------------------------


def _worker_pids(log: list[str]) -> list[int]:
    started = re.search(r"workers \(pids ([\d, ]+)\)", "".join(log))
    return [int(p) for p in started.group(1).split(", ")] if started else []


def test_a_killed_worker_is_replaced_while_the_others_serve(pycode_pair, ref):
    """kill -9 of one of two workers under load: the parent logs it (pid and signal) and starts
    a new one; the other keeps serving, so only requests on the killed worker may fail; the new
    worker answers, exactly; SIGTERM then stops all, exit 0."""
    proc, url = start_process(pycode_pair, "--workers", "2", "--drain-grace", "0")
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(iter(proc.stdout.readline, b"")))
    reader.start()
    name = Path(pycode_pair[0]).name
    try:
        wait_for(lambda: len(_worker_pids([x.decode() for x in log])) == 2, "the workers' pids")
        old = _worker_pids([x.decode() for x in log])
        results = _load_while(url, name, lambda: os.kill(old[0], signal.SIGKILL), clients=3)
        errors = [r for r in results if r != "ok"]
        assert len(errors) <= 3, errors  # at most the requests in flight on the killed worker
        assert results[-3:] == ["ok"] * 3
        text = lambda: "".join(x.decode(errors="replace") for x in log)
        wait_for(lambda: re.search(r"worker \d+ started", text()), "a new worker")
        assert f"worker {old[0]} died (killed by SIGKILL)" in text()
        new = int(re.search(r"worker (\d+) started", text()).group(1))
        assert new not in old and Path(f"/proc/{new}").exists()
        _until_answered_by(url, new)
        r = _completion(url, name, TEXTS[1])
        assert r.json()["choices"][0]["text"] == ref(TEXTS[1], 8).text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(HANG_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(HANG_S)


def _load_while(url: str, model: str, act, clients: int) -> list[str]:
    """clients threads send completions in a loop; act() runs once they all have answers, then
    each sends three more; every outcome in order ('ok' or the error)."""
    out, lock = [], threading.Lock()
    acted = threading.Event()

    def client(i: int):
        after = 0
        while after < 3:
            try:
                r = _completion(url, model, TEXTS[i % len(TEXTS)])
                res = "ok" if r.status_code == 200 else f"{r.status_code}"
            except httpx.TransportError as exc:
                res = type(exc).__name__
            with lock:
                out.append(res)
                if len(out) >= 2 * clients and not acted.is_set():
                    acted.set()
                    act()
            after += acted.is_set()

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return out


def _until_answered_by(url: str, pid: int) -> None:
    """Ask /ready on new connections until the worker pid answers one (a hang guard bounds it)."""
    end = time.monotonic() + HANG_S
    while True:
        got = httpx.get(url + "/ready", headers=CLOSE, timeout=HANG_S).json()
        if got["pid"] == pid:
            return
        assert time.monotonic() < end, f"worker {pid} never answered"
