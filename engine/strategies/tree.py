"""tree: a draft tree verified path-per-row (arXiv 2308.04623, the stairs batch with branches).

The assistant's top-b tokens at the first position each start a branch, continued greedily by
the assistant (all branches in one batched call per depth). The main decoder verifies every
root-to-leaf path as its own row on the shared past, in one call; the row with the longest
accepted prefix wins. No tree mask or tree positions are needed: each row is a plain sequence.
Shapes: B branches, K depth, V vocab.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np

from ..accept import accept
from ..run import Run


def draft_tree(run: Run, draft, seq: list[int], k: int, b: int) -> np.ndarray:
    """Paths [B, K]: top-b first tokens, each continued greedily by the assistant."""
    logits = draft.feed(np.array([seq[draft.length :]], dtype=np.int64))[0, -1]  # [V]
    run.argmax(logits[None], "assistant")  # NaN/inf check
    first = np.argpartition(-logits, b)[:b]
    first = first[np.argsort(-logits[first])]  # best first: row 0 is the plain greedy draft
    paths = [first]
    for _ in range(k - 1):
        logits = draft.feed(paths[-1][:, None].astype(np.int64))  # [B, 1, V]
        paths.append(run.argmax(logits[:, -1], "assistant"))
    run.counter.draft_calls += k
    return np.stack(paths, axis=1)  # [B, K]


def generate(run: Run, draft_tokens: int = 4, branches: int = 2) -> Iterator[list[int]]:
    """Tree speculation with `branches` paths of `draft_tokens` each."""
    if draft_tokens < 1 or branches < 1:  # checked now, not at the first step of the loop
        raise ValueError("draft_tokens and branches must be >= 1")
    return _loop(run, draft_tokens, branches)


def _loop(run: Run, draft_tokens: int, branches: int) -> Iterator[list[int]]:
    main, draft, c = run.main_cache(), run.draft_cache(), run.counter
    while not run.done:
        t0 = time.perf_counter()
        k = min(draft_tokens, run.remaining - 1)
        # draft: B paths of K tokens (none when only one token is left)
        paths = draft_tree(run, draft, run.seq, k, branches) if k else np.zeros((1, 0), np.int64)
        t1 = time.perf_counter()
        # verify: row j = pending token + path j, on the shared past             ids [B, K+1]
        ids = np.concatenate([np.full((len(paths), 1), run.seq[-1]), paths], axis=1)
        targets = run.argmax(main.feed(ids).reshape(-1, main.model.vocab_size), "main")
        targets = targets.reshape(len(paths), k + 1)  # [B, K+1]
        # accept: the longest matching path wins
        n_row = [accept(p, t) for p, t in zip(paths, targets)]
        j = int(np.argmax(n_row))
        n = n_row[j]
        # rewind: main and assistant keep seq + path j[:n]
        main.rewind(len(run.seq) + n, row=j)
        draft.rewind(min(draft.length, len(run.seq) + n), row=j if k > 1 else 0)
        c.main_calls += 1
        c.drafted += k
        c.accepted += n
        c.draft_s += t1 - t0
        c.verify_s += time.perf_counter() - t1
        yield run.emit([int(x) for x in paths[j, :n]] + [int(targets[j, n])])
