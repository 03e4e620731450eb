"""stairs: the staircase batch of the paper (arXiv 2407.19947).

The main decoder runs once on K+1 rows, row i = accepted prefix + the first i draft tokens; row i's
last logits are the ground truth after d[:i], validated in order (accept). Two layouts:
'past' rows share the cached past (broadcast along the batch), 'full' rows carry the whole sequence
with no past, as in the paper.
"""

from __future__ import annotations

import numpy as np

from ..accept import full_staircase, staircase
from ..run import Run
from .speculative import ModelDrafter, speculate


class StaircaseVerifier:
    """Staircase rows on top of the shared past: ids [R, R]."""

    def __init__(self, run: Run):
        self.run, self.cache, self.rows = run, run.main_cache(), 1

    def targets(self, seq: list[int], draft: list[int]) -> np.ndarray:
        ids, last = staircase(seq[-1], draft, self.run.main_model.pad_id)  # [R, R], [R]
        self.rows = len(ids)
        logits = self.cache.feed(ids)  # [R, R, V]
        return self.run.argmax(logits[np.arange(self.rows), last], "main")  # [R]

    def commit(self, length: int) -> None:
        # The last row holds every draft; its first `length` positions are the accepted ones.
        self.cache.rewind(length, row=self.rows - 1)


class FullStaircaseVerifier:
    """The paper's layout: every row is the whole sequence, no past: ids [R, L+K]."""

    def __init__(self, run: Run):
        self.run, self.cache = run, run.main_cache()

    def targets(self, seq: list[int], draft: list[int]) -> np.ndarray:
        ids, last = full_staircase(seq, draft, self.run.main_model.pad_id)  # [R, L+K], [R]
        logits = self.cache.first(ids)[0]  # [R, L+K, V]
        return self.run.argmax(logits[np.arange(len(ids)), last], "main")  # [R]

    def commit(self, length: int) -> None:
        pass


def generate(run: Run, batch_size: int = 7, layout: str = "past", threshold: float | None = None):
    """Stairs with `batch_size` rows (batch_size - 1 draft tokens); layout 'past' or 'full'."""
    if layout not in ("past", "full"):
        raise ValueError(f"layout must be 'past' or 'full', not {layout!r}")
    if batch_size < 2:
        raise ValueError(f"stairs batch_size must be >= 2, got {batch_size}")
    verifier = StaircaseVerifier(run) if layout == "past" else FullStaircaseVerifier(run)
    return speculate(run, ModelDrafter(run, threshold), verifier, batch_size - 1)
