"""What the HTTP layer needs of the engine to generate, as TGI's backend trait has it:
schedule(prompt) -> stream and health(). Generation and the metrics see nothing else of it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

from engine import Engine, Health


class Stream(Protocol):
    """One scheduled prompt (engine.Engine.submit's handle fits)."""

    def tokens(self) -> Iterator[list[int]]:
        """Each step's new tokens; raises the request's error (CancelledError) at the end."""
        ...

    def result(self, timeout: float | None = None) -> Any:
        """The result (token_ids, stats) once it ends."""
        ...

    def stats(self) -> Any:
        """Statistics so far (also of a cancelled request)."""
        ...

    def cancel(self) -> None: ...


Schedule = Callable[[list[int], int], Stream]  # (encoder ids, max_new_tokens) -> its stream


class Backend:
    """The engine's shared scheduler, with the strategy and options every request runs."""

    def __init__(self, engine: Engine, strategy: str, options: dict):
        self.engine, self.strategy, self.options = engine, strategy, options

    def schedule(self, ids: list[int], max_new_tokens: int) -> Stream:
        """Queue one prompt; InputError if the engine refuses it."""
        # engine.submit is looked up per call: a test may stand in for it after the app is made
        return self.engine.submit(
            ids, strategy=self.strategy, max_new_tokens=max_new_tokens, **self.options
        )

    def health(self) -> Health:
        """The scheduler's state now (active, waiting, main calls)."""
        return self.engine.health()
