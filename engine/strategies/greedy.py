"""greedy: the main model alone with past key/values; every other strategy must equal it."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np

from ..run import Run


def generate(run: Run) -> Iterator[list[int]]:
    """One main decoder call per token."""
    main, c = run.main_cache(), run.counter
    while not run.done:
        t = time.perf_counter()
        logits = main.feed(np.array([[run.seq[-1]]], dtype=np.int64))  # [1, 1, V]
        tok = run.argmax(logits[0], "main")  # [1]
        c.main_calls += 1
        c.verify_s += time.perf_counter() - t
        yield run.emit(tok)
