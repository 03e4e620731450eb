"""staged: the assistant is itself sped up by a second-stage n-gram drafter (arXiv 2308.04623).

Stage 2 (prompt lookup over the input and output) proposes tokens to the assistant; the assistant
checks them in one multi-token call, keeps the matching prefix plus its own next token; the result
goes to the main model as in `assisted`.
"""

from __future__ import annotations

import numpy as np

from ..accept import accept
from ..run import Run
from .lookup import PromptLookup
from .speculative import LinearVerifier, speculate


class StagedDrafter:
    """Assistant drafts, accelerated by n-gram proposals it verifies itself."""

    def __init__(self, run: Run, stage2_tokens: int = 4, max_ngram: int = 3):
        self.run, self.cache = run, run.draft_cache()
        self.lookup = PromptLookup(run.input_ids, max_ngram)
        self.stage2_tokens = stage2_tokens

    def propose(self, seq: list[int], k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            g = self.lookup.propose(seq + out, min(self.stage2_tokens, k - len(out) - 1))
            feed = (seq + out)[self.cache.length :] + g
            logits = self.cache.feed(np.array([feed], dtype=np.int64))[0]  # [F, V]
            self.run.counter.draft_calls += 1
            a = self.run.argmax(logits[len(feed) - len(g) - 1 :], "assistant")  # [G+1]
            m = accept(g, a)
            self.cache.rewind(self.cache.length - len(g) + m)
            out += g[:m] + [int(a[m])]
        return out[:k]

    def commit(self, length: int) -> None:
        self.cache.rewind(min(self.cache.length, length))


def generate(run: Run, draft_tokens: int = 6, stage2_tokens: int = 4, max_ngram: int = 3):
    """Staged speculation: n-gram -> assistant -> main."""
    return speculate(
        run, StagedDrafter(run, stage2_tokens, max_ngram), LinearVerifier(run), draft_tokens
    )
