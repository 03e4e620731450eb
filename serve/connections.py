"""Deadlines for connections that have not sent a request, and room for those that have.

uvicorn's own limits start once a request's headers are in: a socket that sends nothing, or its
headers a byte at a time, holds a connection slot for ever, so enough of them lock every client
out before any key is checked. This protocol, a subclass of the one uvicorn would pick, closes a
connection that sends no byte of a request within the idle deadline, or whose headers are not
complete within the header deadline from their first byte, or whose response has waited past
the write deadline for a client that stopped reading. Past the limit, a new connection or a
new request closes the connection idle the longest (never one with a request in progress), so
a request that has arrived is never crowded out by connections that send none. Closed means
aborted: a graceful close would wait for output a client may never read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from uvicorn.protocols.http.auto import AutoHTTPProtocol

IDLE, HEADER, EVICTED, STALLED = "idle_timeout", "header_timeout", "evicted", "write_timeout"
REASONS = (IDLE, HEADER, EVICTED, STALLED)


class GuardedProtocol(AutoHTTPProtocol):
    """uvicorn's HTTP protocol with the deadlines and the limit above; guarded_protocol makes
    a subclass per server with its settings (each server's connections in its own table)."""

    _idle_s = _header_s = _write_s = 5.0
    _max_connections = 1024
    _waiting: ClassVar[dict] = {}  # open connections of the server, the longest idle first
    _deadline = _stall = _kind = None

    @staticmethod
    def _on_close(reason: str) -> None:
        pass

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._waiting[self] = None
        self._arm(self._idle_s, IDLE)
        if len(self._waiting) > self._max_connections:
            self._evict_one()

    def connection_lost(self, exc) -> None:
        self._waiting.pop(self, None)
        self._disarm()
        if self._stall is not None:
            self._stall.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._busy():
            if self._kind != HEADER:
                self._arm(self._header_s, HEADER)  # the first byte of a request
            if len(self.connections) > self._max_connections:  # room before uvicorn's 503 check
                self._evict_one()
        super().data_received(data)
        if self._busy():
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self in self._waiting:  # idle again: the most recently active, evicted last
            del self._waiting[self]
            self._waiting[self] = None
        if not self._busy():
            self._arm(self._idle_s, IDLE)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall is None:
            self._stall = self.loop.call_later(self._write_s, self._expire, STALLED)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def _busy(self) -> bool:
        """Whether a request's headers are in and its response is not complete."""
        return self.cycle is not None and not self.cycle.response_complete

    def _evict_one(self) -> None:
        """Close the connection idle the longest (none with a request in progress)."""
        oldest = next((c for c in self._waiting if c is not self and not c._busy()), None)
        if oldest is not None:
            oldest._expire(EVICTED)

    def _arm(self, seconds: float, kind: str) -> None:
        self._disarm()
        self._kind = kind
        self._deadline = self.loop.call_later(seconds, self._expire, kind)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self._kind = None

    def _expire(self, reason: str) -> None:
        if reason != STALLED and self._busy():
            return
        self._disarm()
        self._waiting.pop(self, None)
        self.connections.discard(self)  # uvicorn's limit counts it no more, from now
        self._on_close(reason)
        # abort, not close: close waits for buffered output a client may never read
        self.transport.abort()


def guarded_protocol(
    *,
    idle_timeout: float,
    header_timeout: float,
    write_timeout: float,
    max_connections: int,
    on_close: Callable[[str], None] = lambda reason: None,
) -> type:
    """A GuardedProtocol class for uvicorn.Config(http=...) with these deadlines and limit;
    on_close(reason) is called for each connection it closes (one of REASONS). write_timeout:
    how long a response may wait for a client that stopped reading (its socket buffers full)."""
    settings = {
        "_idle_s": idle_timeout, "_header_s": header_timeout, "_write_s": write_timeout,
        "_max_connections": max_connections, "_on_close": staticmethod(on_close),
        "_waiting": {},
    }  # fmt: skip
    return type("GuardedProtocol", (GuardedProtocol,), settings)
