"""tree: the assistant's top-b first tokens each start a path, continued greedily; every path
is verified in one main row under a tree mask, and the longest agreeing path wins.

The assistant drafts the tree in one row too: depth 0 gives the top-b tokens, then each round
feeds every path's last token after its own path. A side path sits in other slots than a plain
row would give it, so the main call only emits its first token (computed from the pending
token's own slot); the next step's tree, drafted after that token, holds the rest of that path
as its first path, so every emitted token comes from a computation a plain row would repeat
bit for bit. Shapes: B branches, K depth.
"""

from __future__ import annotations

import numpy as np

from .base import CacheRow, Drafter, Strategy, greedy


class TreeDrafter(Drafter):
    """B paths of K tokens from the assistant."""

    uses_assistant = True

    def __init__(self, prompt: list[int], options: dict, auto_k: dict | None = None):
        super().__init__(prompt, options, auto_k)
        self.branches = options["branches"]
        self.paths: list[list[int]] = []
        self.fed: list[list[int]] = []  # each path's assistant slots
        self.start = 0  # the assistant row's committed length once depth 0 ran

    def begin(self, seq: list[int], want: int) -> None:
        super().begin(seq, want)
        self.paths, self.fed = [], []

    def feed(self, seen: int) -> tuple[list[int], list[int] | None]:
        if not self.want:
            return [], None
        if not self.paths:  # depth 0: what the assistant has not seen (1 or 2 tokens)
            return self.seq[seen:], None
        if len(self.paths[0]) >= self.want:
            return [], None
        # depth d: each path's last token after that path (depth 1: after the trunk)
        parents = [f[-1] if f else seen - 1 for f in self.fed]
        for b, f in enumerate(self.fed):
            f.append(seen + b)
        return [p[-1] for p in self.paths], parents

    def take(self, logits: np.ndarray, row: CacheRow, step: int) -> None:
        if not self.paths:  # depth 0: the top-b tokens start the paths, best first
            last = logits[-1]
            greedy(last[None], "assistant", step)
            first = np.argpartition(-last, self.branches)[: self.branches]
            first = first[np.argsort(-last[first])]
            self.paths, self.fed = [[int(x)] for x in first], [[] for _ in first]
            self.start = row.length()
            return
        for p, tok in zip(self.paths, greedy(logits, "assistant", step)):
            p.append(int(tok))

    def proposal(self) -> tuple[list[int], list[int] | None]:
        if not self.paths:
            return [], None
        k = len(self.paths[0])
        # path b's token t sits at row index 1 + b*K + t; its parent is the entry before it
        parents = [0 if t == 0 else 1 + b * k + t - 1 for b in range(len(self.paths))
                   for t in range(k)]  # fmt: skip
        return [x for p in self.paths for x in p], parents

    def commit(self, length: int, path: list[int], row: CacheRow | None) -> None:
        if row is None:
            return
        if not self.paths or len(path) < 2:  # a chain, or nothing past the pending token kept
            row.rewind(min(row.length(), length))
            return
        # the main call kept path 0's first n tokens (a side path emits only its first token)
        row.keep(self.start, self.fed[0][: len(path) - 1])


class _TreeStrategy(Strategy):
    def assistant_tokens(self, options: dict) -> tuple[int, int]:
        b, k = options["branches"], options["draft_tokens"]
        return max(2, b), b * (k - 1)  # a token per path per round; the row keeps every path


STRATEGY = _TreeStrategy(
    "tree",
    TreeDrafter,
    {"draft_tokens": 4, "branches": 2},
    needs_assistant=True,
    candidates=tuple({"draft_tokens": k, "branches": 2} for k in (3, 4, 6)),
)
