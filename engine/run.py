"""State of one generation: caches, output tokens, stop rule, argmax with NaN checks."""

from __future__ import annotations

import time

import numpy as np

from .errors import NonFiniteLogitsError
from .model import Cache, T5Model
from .stats import Counter


class Run:
    """One generation: what strategies share. seq = [decoder start] + emitted tokens."""

    def __init__(
        self, main: T5Model, draft: T5Model | None, input_ids: np.ndarray, max_new_tokens: int
    ):
        self.main_model, self.draft_model = main, draft
        self.input_ids = input_ids  # [1, S]
        self.max_new_tokens = max_new_tokens
        self.counter = Counter()
        self.seq: list[int] = [main.start_id]
        self.done = False
        self._t0 = time.perf_counter()
        self._main: Cache | None = None
        self._draft: Cache | None = None

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - (len(self.seq) - 1)

    def _cache(self, model: T5Model) -> Cache:
        t = time.perf_counter()
        enc, mask = model.encode(self.input_ids, self.counter)
        self.counter.encoder_s += time.perf_counter() - t
        return Cache(model, enc, mask, self.counter)

    def main_cache(self) -> Cache:
        """The main model's cache (runs its encoder on first use)."""
        if self._main is None:
            self._main = self._cache(self.main_model)
        return self._main

    def draft_cache(self) -> Cache:
        """The assistant's cache (runs its encoder on first use)."""
        if self.draft_model is None:
            raise ValueError("this strategy needs an assistant: Engine.load(..., assistant=DIR)")
        if self._draft is None:
            self._draft = self._cache(self.draft_model)
        return self._draft

    def argmax(self, logits: np.ndarray, model: str) -> np.ndarray:
        """Greedy ids of logits [R, V]; NaN/+inf rows raise, naming the model and step."""
        ids = logits.argmax(-1)
        # argmax picks NaN or +inf when present, so checking the picked values is enough.
        if not np.isfinite(logits[np.arange(len(ids)), ids]).all():
            raise NonFiniteLogitsError(model, len(self.seq) - 1)
        return ids

    def emit(self, tokens) -> list[int]:
        """Append tokens to the output, cut at EOS and max_new_tokens; returns what was kept."""
        out, done = cut(tokens, self.remaining, self.main_model.eos_id)
        self.seq.extend(out)
        self.done = self.done or done
        return out

    def stats(self):
        """Frozen statistics so far."""
        self.counter.new_tokens = len(self.seq) - 1
        self.counter.batch_rows = self.counter.main_calls  # alone: every call is its own
        self.counter.total_s = time.perf_counter() - self._t0
        return self.counter.freeze()


def cut(tokens, remaining: int, eos: int) -> tuple[list[int], bool]:
    """The tokens a generation keeps: at most `remaining`, none after the first EOS; and
    whether it is done (EOS kept, or nothing left to emit). Shared by Run and the scheduler."""
    out = [int(t) for t in tokens[:remaining]]
    if eos in out:
        return out[: out.index(eos) + 1], True
    return out, len(out) >= remaining
