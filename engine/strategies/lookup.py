"""lookup: prompt-lookup decoding, no assistant model.

Match the last n generated tokens (n = max_ngram .. min_ngram) against earlier output and the
encoder input ids; propose what followed the most recent match.
"""

from __future__ import annotations

import numpy as np

from .base import Drafter, Strategy


class PromptLookup:
    """n-gram proposals over (encoder input ids, generated tokens); no model calls."""

    def __init__(self, source, max_ngram: int = 3, min_ngram: int = 1):
        self.source = np.asarray(source, dtype=np.int64).ravel()
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, seq: list[int], k: int) -> list[int]:
        """Up to k tokens after seq (decoder start first)."""
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


class LookupDrafter(Drafter):
    """Drafts what followed the latest match of the output's last n-gram."""

    def __init__(self, prompt: list[int], options: dict, auto_k: dict | None = None):
        super().__init__(prompt, options, auto_k)
        self.lookup = PromptLookup(prompt, options["max_ngram"], options["min_ngram"])

    def begin(self, seq: list[int], want: int) -> None:
        super().begin(seq, want)
        self.tokens = self.lookup.propose(seq, want)


STRATEGY = Strategy(
    "lookup",
    LookupDrafter,
    {"draft_tokens": 7, "max_ngram": 3, "min_ngram": 1},
    candidates=tuple({"draft_tokens": k} for k in (3, 5, 7, 10)),
)
