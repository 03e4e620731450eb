"""The accept rule and the staircase batch, shared by every speculative strategy."""

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


def staircase(pending: int, draft: Sequence[int], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Staircase batch for shared-past verification: row i = pending + draft[:i], right-padded.

    Returns ids [K+1, K+1] and last [K+1], the index of each row's last real token (= i). Right
    padding is harmless under the decoder's causal mask.
    """
    k = len(draft)
    ids = np.full((k + 1, k + 1), pad, dtype=np.int64)
    ids[:, 0] = pending
    row = np.asarray(draft, dtype=np.int64)
    for i in range(1, k + 1):
        ids[i, 1 : i + 1] = row[:i]
    return ids, np.arange(k + 1)


def full_staircase(
    seq: Sequence[int], draft: Sequence[int], pad: int
) -> tuple[np.ndarray, np.ndarray]:
    """Staircase batch for no-past verification: row i = whole sequence + draft[:i], right-padded.

    Returns ids [K+1, L+K] and last [K+1] (= L-1+i), L = len(seq).
    """
    L, k = len(seq), len(draft)
    ids = np.full((k + 1, L + k), pad, dtype=np.int64)
    ids[:, :L] = seq
    row = np.asarray(draft, dtype=np.int64)
    for i in range(1, k + 1):
        ids[i, L : L + i] = row[:i]
    return ids, np.arange(k + 1) + L - 1
