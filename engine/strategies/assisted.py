"""assisted: the assistant drafts K tokens greedily, the main model checks them in one call.

schedule 'heuristic' is Hugging Face's: K + 2 after a full accept, else K - 1 (capped);
threshold stops a draft at a token whose assistant probability is below it.
"""

from __future__ import annotations

import numpy as np

from .base import MAX_DRAFT_TOKENS, CacheRow, Drafter, Strategy, greedy


class AssistantDrafter(Drafter):
    """A linear draft from the assistant, one token per round."""

    uses_assistant = True

    def feed(self, seen: int) -> tuple[list[int], list[int] | None]:
        if len(self.tokens) >= self.want:
            return [], None
        return (self.seq + self.tokens)[seen:], None  # what it has not seen, then its drafts

    def take(self, logits: np.ndarray, row: CacheRow, step: int) -> None:
        tok = int(greedy(logits[-1:], "assistant", step)[0])
        self.tokens.append(tok)
        threshold = self.options.get("threshold")
        if threshold is not None:
            x = logits[-1]
            if 1.0 / np.exp(x - x[tok]).sum() < threshold:  # softmax probability of tok
                self.want = len(self.tokens)

    def update(self, drafted: int, accepted: int) -> None:
        if self.options.get("schedule") == "heuristic" and drafted:
            full = accepted == drafted
            self.k = min(self.k + 2, MAX_DRAFT_TOKENS) if full else max(1, self.k - 1)


STRATEGY = Strategy(
    "assisted",
    AssistantDrafter,
    {"draft_tokens": 5, "schedule": "constant", "threshold": None},
    needs_assistant=True,
    candidates=(
        *({"draft_tokens": k} for k in (2, 3, 4, 5, 6, 8)),
        *({"draft_tokens": k, "schedule": "heuristic"} for k in (4, 5, 6)),
        {"draft_tokens": 10, "threshold": 0.4},
    ),
)
