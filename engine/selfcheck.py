"""Exact on this machine: a row's logits are the same bits whatever shares its main call.

The same rows (random prompts, histories and new tokens) run alone and in many call shapes: 1
to N requests, histories fed in one call or in chunks of 1 and 3 tokens, other rows of other
lengths (ragged pasts, other encoder lengths), rewound slots (holes behind the mask), one-token
rows (padded as the engine pads them), a long neighbour, and a tree row whose first path is
compared with that path fed alone. Each check compares its rows with np.array_equal and keeps
the largest absolute difference. It runs through the model's own cache back end, so it checks
this CPU, provider, ONNX Runtime build and graph as loaded (`stairs-verify --exact DIR`,
`Engine.self_check`, `stairs-serve --self-check`; the tests import it too).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from .device_cache import make_cache
from .errors import EngineError
from .stats import Counter

SIZES = (1, 2, 5, 8)  # rows per call: one alone, then a few, then a full small batch
SHAPES = ((None, False), (1, True), (3, False))  # (history chunk or whole, rewound slots)


@dataclass(frozen=True)
class Check:
    """One call shape: its rows compared bit for bit with the same rows alone."""

    name: str
    rows: int
    max_abs_diff: float
    identical: bool

    def line(self) -> str:
        """One line of the report: verdict, shape, rows, max abs diff, bit-identical."""
        verdict = "OK" if self.identical else "DIFFERS"
        return (
            f"{verdict:8s} {self.name}: {self.rows} rows, max abs diff {self.max_abs_diff:.3g},"
            f" bit-identical {'yes' if self.identical else 'no'}"
        )


class Row:
    """One request: prompt ids, history tokens (decoder start first), new tokens."""

    def __init__(self, rng, vocab: int, new: int):
        self.prompt = rng.integers(2, vocab, rng.integers(1, 40)).tolist() + [1]
        self.history = [0] + rng.integers(2, vocab, rng.integers(0, 20)).tolist()
        self.new = rng.integers(2, vocab, new).tolist()

    def with_new(self, new: list[int]) -> Row:
        """The same prompt and history with other new tokens."""
        copy = object.__new__(Row)
        copy.prompt, copy.history, copy.new = self.prompt, self.history, new
        return copy


def _cache(model, rows: list[Row]):
    cache, c = make_cache(model), Counter()
    for r in rows:
        cache.add(r, *model.encode(r.prompt, c, device=cache.on_device))
    return cache


def _feed(cache, rows: list[Row], lists: list[list[int]], parents=None) -> np.ndarray:
    """One call: row i gets lists[i] (possibly empty); returns logits [N, T, V]."""
    counts = np.array([len(x) for x in lists])
    tokens = np.zeros((len(rows), max(1, counts.max())), np.int64)
    for i, x in enumerate(lists):
        tokens[i, : len(x)] = x
    return np.asarray(cache.run(tokens, counts, Counter(), parents))


def alone(model, row: Row) -> np.ndarray:
    """The reference: the row alone, its history in one call, then its new tokens."""
    cache = _cache(model, [row])
    _feed(cache, [row], [row.history])
    return _feed(cache, [row], [row.new])[0, : len(row.new)]


def together(model, rows: list[Row], chunk: int | None, holes: bool) -> list[np.ndarray]:
    """All rows in every call: histories in chunks (None: whole), optional rewound slots."""
    cache = _cache(model, rows)
    done = [0] * len(rows)
    while any(d < len(r.history) for d, r in zip(done, rows)):
        step = [r.history[d : d + (chunk or len(r.history))] for d, r in zip(done, rows)]
        _feed(cache, rows, step)
        done = [d + len(s) for d, s in zip(done, step)]
    if holes:  # three junk tokens on every other row (the first included), then rewound:
        junk = [[] if i % 2 else [7, 8, 9] for i in range(len(rows))]  # zeroed slots, masked
        _feed(cache, rows, junk)
        for r in rows:
            cache.rewind(r, len(r.history))
    out = _feed(cache, rows, [r.new for r in rows])
    return [out[i, : len(r.new)] for i, r in enumerate(rows)]


def compare(name: str, want: list[np.ndarray], got: list[np.ndarray]) -> Check:
    """A Check of rows got against want: all bit-identical, and the largest difference."""
    diff = max(float(np.abs(a.astype(np.float64) - b).max()) for a, b in zip(want, got))
    same = all(np.array_equal(a, b) for a, b in zip(want, got))
    return Check(name, len(want), diff, same)


def shapes(model, seed: int = 0, sizes=SIZES) -> list[Check]:
    """For each size n: n random rows alone, then together in each of SHAPES."""
    rng = np.random.default_rng(seed)
    checks = []
    for n in sizes:
        rows = [Row(rng, model.vocab_size, int(rng.integers(1, 7))) for _ in range(n)]
        ref = [alone(model, r) for r in rows]
        for chunk, holes in SHAPES:
            if n == 1 and chunk is None and not holes:  # the very calls of the reference
                continue
            how = "whole" if chunk is None else f"in {chunk}-token chunks"
            name = f"{n} rows, history {how}" + (", rewound slots" if holes else "")
            checks.append(compare(name, ref, together(model, rows, chunk, holes)))
    return checks


def long_neighbour(model, seed: int = 3) -> list[Check]:
    """Rows beside a long one (150-token history, 200-token prompt): the call's capacity and
    encoder width grow from 32 and 48 to 160+ and 208; every other row's bits must stay."""
    rng = np.random.default_rng(seed)
    rows = [Row(rng, model.vocab_size, int(rng.integers(1, 7))) for _ in range(3)]
    long = Row(rng, model.vocab_size, 3)
    long.history = [0] + rng.integers(2, model.vocab_size, 150).tolist()
    long.prompt = rng.integers(2, model.vocab_size, 200).tolist() + [1]
    ref = [alone(model, r) for r in rows]
    out = []
    for chunk, holes in ((None, False), (3, True)):
        got = together(model, [*rows, long], chunk, holes)[:3]
        out.append(compare(f"3 rows beside a long one (chunk {chunk})", ref, got))
    return out


def tree(model, seed: int = 1) -> Check:
    """A tree row (pending + two paths under a tree mask) beside a plain row: the first path
    sits in the slots a plain row would give it, so its logits equal that path fed alone. (The
    second path sits in other slots: the scheduler emits none of its logits but the pending
    token's, and proposes its tokens again as a plain chain.)"""
    rng = np.random.default_rng(seed)
    row, other = Row(rng, model.vocab_size, 1), Row(rng, model.vocab_size, 4)
    a, b = rng.integers(2, model.vocab_size, (2, 3)).tolist()
    cache = _cache(model, [row, other])
    _feed(cache, [row, other], [row.history, other.history])
    lo = len(row.history)
    nodes = [row.new[0], *a, *b]  # parents as slots: pending after the trunk, paths after it
    parents = [lo - 1, lo, lo + 1, lo + 2, lo, lo + 4, lo + 5]
    got = _feed(cache, [row, other], [nodes, other.new], [parents, None])[0]
    ref = alone(model, row.with_new([row.new[0], *a]))
    return compare("a tree row's first path beside a plain row", [ref], [got[:4]])


def run(model, sizes=SIZES, seed: int = 0) -> list[Check]:
    """Every check on a loaded engine.model.T5Model (its provider, threads and cache back end)."""
    return [*shapes(model, seed, sizes), *long_neighbour(model), tree(model)]


def passed(checks: list[Check]) -> bool:
    """Whether every row of every check was bit-identical."""
    return bool(checks) and all(c.identical for c in checks)


def require(engine, out=None) -> list[Check]:
    """Engine.self_check with its report written to out (default stderr); EngineError unless
    every row is bit-identical here (stairs-serve --self-check refuses to serve then)."""
    out = sys.stderr if out is None else out
    checks = engine.self_check()
    for c in checks:
        print(f"self-check: {c.line()}", file=out, flush=True)
    if not passed(checks):
        bad = sum(not c.identical for c in checks)
        raise EngineError(
            f"self-check: {bad} of {len(checks)} call shapes change a row's logits on this machine"
            f" ({engine.main.folder}, provider {engine.main.provider}): output would not be exact"
        )
    return checks
