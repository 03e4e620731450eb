"""Running the app: uvicorn with bounded connections and a drain on SIGTERM."""

from __future__ import annotations

import socket
import threading
import time

from fastapi import FastAPI

from .app import State
from .config import DRAIN_TIMEOUT_S
from .connections import guarded_protocol


class Server:
    """uvicorn serving a create_app app, with its config's connection bound and drain.

    max_connections: open connections served at once; beyond it uvicorn answers 503. A
    connection that sends no request within idle_timeout, or not its headers within
    header_timeout of their first byte, is closed, and past the limit a new connection closes
    the oldest one with no request in progress (serve.connections).
    On SIGTERM/SIGINT: draining at once (/ready 503, new completions 503 with Retry-After) while
    the listener stays open drain_grace seconds (a load balancer sees /ready fail and takes the
    replica out); then uvicorn stops accepting, waits for the open requests (at most
    DRAIN_TIMEOUT_S) and the process exits 0. A second signal stops at once.
    """

    def __init__(self, app: FastAPI, host: str | None = None, port: int | None = None, **kw):
        import uvicorn

        state: State = app.state.stairs
        cfg = state.config
        host = cfg.host if host is None else host
        port = cfg.port if port is None else port

        class _Server(uvicorn.Server):
            drain_end: float | None = None

            def handle_exit(self, sig, frame):
                if state.draining or cfg.drain_grace <= 0:
                    state.draining = True
                    super().handle_exit(sig, frame)
                else:  # the first signal: drain, keep the listener open for the grace
                    state.draining = True
                    self.drain_end = time.monotonic() + cfg.drain_grace
                # drained by the time run() returns: exit 0 rather than re-raise the signal
                self._captured_signals.clear()

            async def on_tick(self, counter: int) -> bool:
                if self.drain_end is not None and time.monotonic() >= self.drain_end:
                    self.should_exit = True
                return await super().on_tick(counter)

        protocol = guarded_protocol(
            idle_timeout=cfg.idle_timeout,
            header_timeout=cfg.header_timeout,
            write_timeout=cfg.body_timeout,
            max_connections=cfg.max_connections,
            on_close=state.metrics.count_closed,
        )
        # uvicorn's limit counts the connection asking too: N open ones are served, the N+1st 503
        options = {
            "log_level": "warning",
            "timeout_graceful_shutdown": DRAIN_TIMEOUT_S,
            "limit_concurrency": cfg.max_connections + 1,
            "timeout_keep_alive": cfg.idle_timeout + 1,  # the protocol's own deadline first
            "http": protocol,
            "ws": "none",  # no websockets: an upgrade would leave the protocol's bookkeeping
        }
        options.update(kw)
        self.server = _Server(uvicorn.Config(app, host=host, port=port, **options))
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
        """Graceful stop of a start()ed server (no grace): drain, then join the thread."""
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
