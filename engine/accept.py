"""The accept rule, shared by every strategy: the longest drafted path the main model agrees
with, plus the main model's own next token."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def accept(draft: Sequence[int] | np.ndarray, target: Sequence[int] | np.ndarray) -> int:
    """How many leading draft tokens equal the main model's greedy targets.

    draft [K]; target [K] or [K+1] (target[i] is the main model's token after draft[:i]).
    """
    k = len(draft)
    if k == 0:
        return 0
    eq = np.asarray(draft) == np.asarray(target)[:k]
    return int(np.cumprod(eq).sum())


def accept_path(row: Sequence[int], parents: Sequence[int] | None, targets) -> list[int]:
    """Row indices of the longest agreeing path, from 0 (the pending token).

    row: [pending, *drafts]; parents: each draft's parent index in row (None: a chain);
    targets[i]: the main model's token after row[i] and its ancestors. The main model then
    adds targets[path[-1]] itself."""
    if parents is None:
        return list(range(accept(row[1:], targets) + 1))
    children: dict[int, list[int]] = {}
    for i, p in enumerate(parents, 1):
        children.setdefault(p, []).append(i)
    path = [0]
    while True:
        want = targets[path[-1]]
        nxt = [c for c in children.get(path[-1], ()) if row[c] == want]
        if not nxt:
            return path
        path.append(nxt[0])
