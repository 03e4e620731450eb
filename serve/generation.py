"""One request's prompts under the engine's scheduler, as an async stream of text deltas.

The engine's blocking handles run in a thread per prompt that hands each step's tokens to the
event loop, so the loop never blocks on a model; stop strings are applied exactly to the text.
Generation is given only what it uses (a schedule callable, the tokenizer, the timeout, the slots,
a metrics hook), so it runs without the app.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from engine import CancelledError, InputError

from .backend import Schedule
from .errors import ApiError, ClientGone

POLL_S = 0.25  # how often a waiting non-streaming request checks that its client is still there


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


def _ignore(_seconds: float) -> None:
    pass


class Generation:
    """The prompts of one request under the scheduler, as an async stream of text deltas.

    schedule: (ids, max_new_tokens) -> stream (serve.backend); tokenizer: decode(ids) and eos_id;
    timeout: seconds from now until 504; slots: a semaphore bounding the prompts in the
    scheduler (None: no bound); ttft: called with the seconds to each prompt's first token.
    """

    def __init__(
        self,
        schedule: Schedule,
        tokenizer,
        choices: list[Choice],
        max_tokens: int,
        stops: list[str],
        *,
        timeout: float,
        slots: asyncio.Semaphore | None = None,
        ttft: Callable[[float], None] = _ignore,
    ):
        self.schedule, self.choices, self.max_tokens, self.stops = (
            schedule, choices, max_tokens, stops,
        )  # fmt: skip
        self.decode, self.eos_id = tokenizer.decode, tokenizer.eos_id
        self.timeout, self.slots, self.ttft = timeout, slots, ttft
        self.loop = asyncio.get_running_loop()
        # (choice index, "tokens" | "end" | "error", payload), filled on the loop's thread;
        # a deque and an Event rather than wait_for(queue.get()), which can lose an item
        self.events: collections.deque = collections.deque()
        self.wake = asyncio.Event()
        self.t0 = time.perf_counter()
        self.tasks: list[asyncio.Task] = []
        # awaited while waiting: True once the client is gone (a Request's is_disconnected)
        self.poll: Callable[[], Awaitable[bool]] | None = None

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._start(ch)) for ch in self.choices]

    async def _start(self, ch: Choice) -> None:
        """Schedule one prompt (after a free slot when there are slots); a thread pumps it."""
        if self.slots is not None:
            await self.slots.acquire()
        try:
            ch.handle = self.schedule(ch.ids, self.max_tokens)
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
        if self.slots is not None:
            self.slots.release()

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
        ClientGone when self.poll (None: not polled) finds its client gone."""
        deadline = self.t0 + self.timeout
        polled = time.perf_counter()
        while not all(ch.ended for ch in self.choices):
            now = time.perf_counter()
            left = deadline - now
            if left <= 0:
                raise ApiError(504, f"request timed out after {self.timeout:g} s", code="timeout")
            if self.poll is not None and now - polled >= POLL_S:
                polled = now
                if await self.poll():
                    raise ClientGone()
            if not self.events:
                self.wake.clear()
                wait = min(left, POLL_S) if self.poll is not None else left
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), wait)
                continue
            for out in self._event(*self.events.popleft()):
                yield out

    def _event(self, index: int, kind: str, payload) -> list[tuple[Choice, str]]:
        """What one event from a pump makes final: deltas, then (choice, "") at its end."""
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
                self.ttft(now - self.t0)
            ch.t_last = now
            ch.seq += payload
            delta = self._advance(ch, final=False) if ch.finish is None else ""
            return [(ch, delta)] if delta else []
        # "end": the engine's result (None: cancelled); the text is final now
        ch.ended = True
        ch.stats = payload.stats if payload is not None else _stats_so_far(ch.handle)
        out = []
        if ch.finish is None:
            if payload is not None:
                ch.seq = list(payload.token_ids)
            delta = self._advance(ch, final=True)
            if delta:
                out.append((ch, delta))
        return [*out, (ch, "")]

    def _advance(self, ch: Choice, final: bool) -> str:
        """The text of ch that became final since the last call (stop strings applied)."""
        text = self.decode(ch.seq)
        cut = _first_stop(text, self.stops) if self.stops else -1
        if cut >= 0:
            text, ch.finish = text[:cut], "stop"
            ch.count = len(ch.seq)
            ch.handle.cancel()  # the rest is not wanted: free the rows
        elif final:
            ch.finish = "stop" if ch.seq and ch.seq[-1] == self.eos_id else "length"
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
