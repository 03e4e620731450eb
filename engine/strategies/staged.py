"""staged: the assistant is itself sped up by an n-gram second stage (arXiv 2308.04623).

Prompt lookup proposes tokens to the assistant; the assistant checks them in its own call, keeps
the agreeing prefix plus its own next token; the draft then goes to the main model.
"""

from __future__ import annotations

import numpy as np

from ..accept import accept
from .assisted import AssistantDrafter
from .base import CacheRow, Strategy, greedy
from .lookup import PromptLookup


class StagedDrafter(AssistantDrafter):
    """Assistant drafts, each round also checking up to stage2_tokens n-gram tokens."""

    def __init__(self, prompt: list[int], options: dict, auto_k: dict | None = None):
        super().__init__(prompt, options, auto_k)
        self.lookup = PromptLookup(prompt, options["max_ngram"])
        self.stage2: list[int] = []

    def feed(self, seen: int) -> tuple[list[int], list[int] | None]:
        if len(self.tokens) >= self.want:
            return [], None
        room = min(self.options["stage2_tokens"], self.want - len(self.tokens) - 1)
        self.stage2 = self.lookup.propose(self.seq + self.tokens, room)
        return (self.seq + self.tokens)[seen:] + self.stage2, None

    def take(self, logits: np.ndarray, row: CacheRow, step: int) -> None:
        g = self.stage2
        # the assistant's token after the unseen tokens, then after each n-gram token [G+1, V]
        a = greedy(logits[len(logits) - len(g) - 1 :], "assistant", step)
        m = accept(g, a)
        if len(g) > m:  # its rejected n-gram tokens leave the row
            row.rewind(row.length() - len(g) + m)
        self.tokens += [*g[:m], int(a[m])]


STRATEGY = Strategy(
    "staged",
    StagedDrafter,
    {"draft_tokens": 6, "stage2_tokens": 4, "max_ngram": 3},
    needs_assistant=True,
    candidates=tuple({"draft_tokens": k} for k in (4, 6, 8)),
)
