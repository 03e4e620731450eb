"""Request handles and the worker thread behind Engine.submit: many callers, one scheduler."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from .scheduler import Request, Scheduler
from .tokenizer import text_pieces


class Handle:
    """A submitted request: iterate for text pieces, tokens() for token lists, result() to wait,
    cancel() to stop it. One reader streams; result() may be called by any number of threads."""

    def __init__(self, req: Request, worker: Worker, decode, make_result):
        self._req, self._worker, self._decode = req, worker, decode
        self._make_result = make_result  # (token ids, stats) -> GenerationResult

    def tokens(self) -> Iterator[list[int]]:
        """Each step's accepted tokens as they come (EOS included if generated); raises the
        request's error at the end, CancelledError if it was cancelled."""
        while True:
            item = self._req.out.get()
            if item is None:
                self._req.out.put(None)  # the end stays visible to any later reader
                if self._req.error is not None:
                    raise self._req.error
                return
            yield item

    def __iter__(self) -> Iterator[str]:
        """Text pieces as tokens are accepted (held back while a UTF-8 character is partial)."""
        return text_pieces(self.tokens(), self._decode)

    def result(self, timeout: float | None = None):
        """Wait for the GenerationResult; raises the request's error (CancelledError if it was
        cancelled), TimeoutError if it is still running after timeout seconds."""
        if not self._req.finished.wait(timeout):
            raise TimeoutError(f"generation still running after {timeout} s")
        if self._req.error is not None:
            raise self._req.error
        return self._make_result(self._req.seq[1:], self._req.stats())

    def stats(self):
        """Statistics so far (also of a cancelled or failed request)."""
        return self._req.stats()

    def cancel(self) -> None:
        """Stop the request; its rows are freed at the next step."""
        self._req.cancelled = True
        self._worker.wake()

    @property
    def done(self) -> bool:
        """Whether it has ended (finished, failed or cancelled)."""
        return self._req.finished.is_set()


class Worker:
    """A background thread stepping one Scheduler while any request is waiting or active."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self._cv = threading.Condition()
        self._incoming: list[Request] = []
        self._thread: threading.Thread | None = None

    def submit(self, reqs: list[Request]) -> None:
        """Hand requests over (all join the same step when the budget allows)."""
        with self._cv:
            self._incoming.extend(reqs)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="stairs-batch", daemon=True)
                self._thread.start()
            self._cv.notify()

    def wake(self) -> None:
        """Make the loop look at its requests now (after a cancel)."""
        with self._cv:
            self._cv.notify()

    def _loop(self) -> None:
        s = self.scheduler
        while True:
            with self._cv:
                while not self._incoming and not s.busy:
                    self._cv.wait(timeout=30)
                    if not self._incoming and not s.busy:
                        self._thread = None
                        return
                for r in self._incoming:
                    s.add(r)
                self._incoming.clear()
            try:
                s.step()
            except Exception as exc:  # noqa: BLE001 - never leave a caller waiting forever
                s.fail_all(exc)
