"""The draft -> verify -> accept -> rewind loop that every speculative strategy runs.

A drafter proposes up to K tokens after the sequence; a verifier returns the main model's greedy
token after seq + d[:i] for i = 0..K in one main call. Shapes: K drafts, R = K + 1 rows, V vocab.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Protocol

import numpy as np

from ..accept import accept
from ..options import MAX_DRAFT_TOKENS
from ..run import Run


class Drafter(Protocol):
    def propose(self, seq: list[int], k: int) -> list[int]: ...  # up to k tokens after seq

    def commit(self, length: int) -> None: ...  # seq[:length] is now known to be right


class Verifier(Protocol):
    def targets(self, seq: list[int], draft: list[int]) -> np.ndarray: ...  # [K+1]

    def commit(self, length: int) -> None: ...


def speculate(
    run: Run, drafter: Drafter, verifier: Verifier, k: int, schedule: str = "constant"
) -> Iterator[list[int]]:
    """Run speculative rounds until EOS or max_new_tokens; yields the tokens of each round."""
    if k < 1:
        raise ValueError(f"draft length must be >= 1, got {k}")
    c = run.counter
    while not run.done:
        t0 = time.perf_counter()
        # draft: never more than can still be emitted (the main model adds one token itself)
        d = drafter.propose(run.seq, min(k, run.remaining - 1))  # [K]
        t1 = time.perf_counter()
        # verify: the main model's greedy token after seq + d[:i], i = 0..K, in one call
        t = verifier.targets(run.seq, d)  # [K+1]
        # accept: longest prefix of d the main model agrees with, plus its own next token
        n = accept(d, t)
        # rewind: both caches keep seq + d[:n]
        verifier.commit(len(run.seq) + n)
        drafter.commit(len(run.seq) + n)
        c.main_calls += 1
        c.drafted += len(d)
        c.accepted += n
        c.draft_s += t1 - t0
        c.verify_s += time.perf_counter() - t1
        if schedule == "heuristic" and d:  # HF's schedule: +2 after a full accept, else -1
            # capped, so a long run of full accepts cannot grow the verify call without bound
            k = min(k + 2, MAX_DRAFT_TOKENS) if n == len(d) else max(1, k - 1)
        yield run.emit(d[:n] + [int(t[n])])


class ModelDrafter:
    """The assistant drafts greedily with its own cache; optional stop below a confidence."""

    def __init__(self, run: Run, threshold: float | None = None):
        self.run, self.cache, self.threshold = run, run.draft_cache(), threshold

    def propose(self, seq: list[int], k: int) -> list[int]:
        out: list[int] = []
        feed = seq[self.cache.length :]  # tokens the assistant has not seen yet (1 or 2)
        for _ in range(k):
            logits = self.cache.feed(np.array([feed], dtype=np.int64))[0, -1]  # [V]
            self.run.counter.draft_calls += 1
            tok = int(self.run.argmax(logits[None], "assistant")[0])
            out.append(tok)
            if self.threshold is not None:
                top = 1.0 / np.exp(logits - logits[tok]).sum()  # softmax probability of tok
                if top < self.threshold:
                    break
            feed = [tok]
        return out

    def commit(self, length: int) -> None:
        self.cache.rewind(min(self.cache.length, length))


class LinearVerifier:
    """One row: pending token + all drafts, on top of the shared past."""

    def __init__(self, run: Run):
        self.run, self.cache = run, run.main_cache()

    def targets(self, seq: list[int], draft: list[int]) -> np.ndarray:
        logits = self.cache.feed(np.array([[seq[-1], *draft]], dtype=np.int64))  # [1, K+1, V]
        return self.run.argmax(logits[0], "main")  # [K+1]

    def commit(self, length: int) -> None:
        self.cache.rewind(length)
