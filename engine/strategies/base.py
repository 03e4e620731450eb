"""What every strategy is: a drafter that proposes tokens for the main model to check.

The scheduler asks each request's drafter, every step, for a proposal (tokens after the pending
token, and their parents when they form a tree), verifies all rows in one main call, accepts
the longest agreeing path (engine.accept.accept_path) and tells the drafter what was kept.
Drafters that use the assistant take part in its batched rounds: feed() says what to run,
take() reads the logits. A strategy is one file: its Drafter subclass and a Strategy entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from ..errors import NonFiniteLogitsError

MAX_DRAFT_TOKENS = 64


def pick(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Greedy ids of logits [..., V] and whether each pick is non-finite (argmax picks NaN or
    +inf when present, so checking picks suffices)."""
    ids = logits.argmax(-1)
    flat = logits.reshape(-1, logits.shape[-1])  # one flat gather, the cheapest on the host
    top = flat[np.arange(len(flat)), ids.reshape(-1)]
    return ids, ~np.isfinite(top).reshape(ids.shape)


def auto_entry(table: dict[int, int], active: int) -> int:
    """auto's draft length for `active` requests: the entry of the largest size <= active (the
    smallest size's below it)."""
    return table[max([n for n in table if n <= active], default=min(table))]


def check_finite(bad: np.ndarray, model: str, step: int) -> None:
    """The one NaN check: raise, naming the model and decoder step, if any pick is bad."""
    if bad.any():
        raise NonFiniteLogitsError(model, step)


def greedy(logits: np.ndarray, model: str, step: int) -> np.ndarray:
    """Greedy ids of logits [R, V], through the one NaN check."""
    ids, bad = pick(logits)
    check_finite(bad, model, step)
    return ids


class CacheRow:
    """A drafter's view of its request's row in the assistant cache."""

    def __init__(self, cache, owner):
        self.cache, self.owner = cache, owner

    def length(self) -> int:
        """Slots in use."""
        return self.cache.length(self.owner)

    def rewind(self, length: int) -> None:
        """Keep the first `length` slots (a plain sequence)."""
        self.cache.rewind(self.owner, length)

    def keep(self, start: int, slots: list[int]) -> None:
        """Keep the first `start` slots and then one path's `slots`."""
        self.cache.keep(self.owner, start, slots)


class Drafter:
    """One request's drafting (here: none, which is greedy). Subclasses propose tokens.

    k: draft tokens per path this step (auto_k: by the number of active requests instead);
    want: what the scheduler allows this step (budget, tokens left)."""

    uses_assistant: ClassVar[bool] = False

    def __init__(self, prompt: list[int], options: dict, auto_k: dict | None = None):
        self.options, self.auto_k = options, auto_k
        self.k = self.initial_k(options)
        self.branches = 1
        self.want = 0
        self.tokens: list[int] = []

    @staticmethod
    def initial_k(options: dict) -> int:
        """Draft length per path before any step."""
        return int(options.get("draft_tokens", 0))

    def draft_len(self, active: int) -> int:
        """Draft tokens per path this step: k, or auto's table entry for `active` requests."""
        return self.k if self.auto_k is None else auto_entry(self.auto_k, active)

    def max_draft(self) -> int:
        """The most draft tokens per path it can ever ask for."""
        schedule = self.options.get("schedule") == "heuristic"
        return max(MAX_DRAFT_TOKENS if schedule else self.k, *(self.auto_k or {0: 0}).values())

    def width(self, k: int) -> int:
        """Tokens of its main-call row with k draft tokens per path."""
        return 1 + self.branches * k

    def begin(self, seq: list[int], want: int) -> None:
        """Start a step after seq (decoder start + emitted tokens), drafting up to `want`."""
        self.seq, self.want, self.tokens = seq, want, []

    def feed(self, seen: int) -> tuple[list[int], list[int] | None]:
        """Tokens for its assistant row this round (after `seen` slots) and their parent slots
        if they form a tree; nothing once its draft is complete."""
        return [], None

    def take(self, logits: np.ndarray, row: CacheRow, step: int) -> None:
        """The assistant's logits [F, V] for the tokens fed this round."""

    def proposal(self) -> tuple[list[int], list[int] | None]:
        """The tokens to verify after the pending token, and for a tree each token's parent as
        an index into [pending, *tokens] (None: a chain)."""
        return self.tokens, None

    def commit(self, length: int, path: list[int], row: CacheRow | None) -> None:
        """After the main call: seq[:length] is right; path holds the accepted row indices.
        Assistant drafters rewind their row here."""
        if row is not None:
            row.rewind(min(row.length(), length))

    def update(self, drafted: int, accepted: int) -> None:
        """Bookkeeping after a step (a draft-length schedule)."""


@dataclass(frozen=True)
class Strategy:
    """One row of the strategy table: its drafter, options with defaults, whether it needs the
    assistant, the main row it makes (tokens for n new tokens), and stairs-tune's candidates."""

    name: str
    drafter: type[Drafter]
    defaults: dict
    needs_assistant: bool = False
    candidates: tuple = field(default_factory=tuple)

    def main_tokens(self, options: dict, n: int) -> int:
        """Tokens in its main-call row at most (pending + every drafted path)."""
        d = self.drafter([], options)
        return 1 + d.branches * min(d.max_draft(), n)

    def assistant_tokens(self, options: dict) -> tuple[int, int]:
        """Assistant tokens per round at most, and slots it keeps beyond the output (a linear
        draft: the unseen tokens, its n-gram tokens if staged)."""
        return 2 + options.get("stage2_tokens", 0), 0
