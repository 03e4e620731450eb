"""lookup: prompt-lookup decoding, no assistant model.

Match the last n generated tokens (n = max_ngram .. min_ngram) against earlier output and the
encoder input ids; propose what followed the most recent match.
"""

from __future__ import annotations

import numpy as np

from ..run import Run
from .speculative import LinearVerifier, speculate


class PromptLookup:
    """n-gram drafter over (encoder input ids, generated tokens); no model calls."""

    def __init__(self, source: np.ndarray, max_ngram: int = 3, min_ngram: int = 1):
        self.source = np.asarray(source, dtype=np.int64).ravel()
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, seq: list[int], k: int) -> list[int]:
        if k <= 0:
            return []
        gen = np.asarray(seq[1:], dtype=np.int64)  # generated tokens (decoder start left out)
        for n in range(min(self.max_ngram, len(gen)), self.min_ngram - 1, -1):
            tail = gen[-n:]
            # earlier output first (most recent match), then the encoder input
            for hay in (gen[:-1], self.source):
                if len(hay) < n + 1:
                    continue
                win = np.lib.stride_tricks.sliding_window_view(hay[:-1], n)  # [W, n]
                hits = np.flatnonzero((win == tail).all(axis=1))
                if len(hits):
                    start = hits[-1] + n
                    return [int(t) for t in hay[start : start + k]]
        return []

    def commit(self, length: int) -> None:
        pass


def generate(run: Run, draft_tokens: int = 7, max_ngram: int = 3, min_ngram: int = 1):
    """Prompt lookup drafts verified linearly by the main model."""
    drafter = PromptLookup(run.input_ids, max_ngram, min_ngram)
    return speculate(run, drafter, LinearVerifier(run), draft_tokens)
