"""Exact by construction: a row's logits are the same bits whatever shares its main call.

The same rows (random prompts, histories and new tokens) are run alone and in many call shapes:
1 to 16 requests, histories fed in one call or in chunks of 1 and 3 tokens, other rows of other
lengths (ragged pasts, other encoder lengths), rewound slots (holes behind the mask), one-token
rows (the cache pads every row to MIN_TOKENS), and a tree row whose paths are compared with each
path fed alone. Every comparison is np.array_equal on the logits.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.cache import BatchCache
from engine.model import T5Model
from engine.stats import Counter


class Row:
    """One request: prompt ids, history tokens (decoder start first), new tokens."""

    def __init__(self, rng, vocab: int, new: int):
        self.prompt = rng.integers(2, vocab, rng.integers(1, 40)).tolist() + [1]
        self.history = [0] + rng.integers(2, vocab, rng.integers(0, 20)).tolist()
        self.new = rng.integers(2, vocab, new).tolist()


def _cache(model: T5Model, rows: list[Row]) -> BatchCache:
    cache, c = BatchCache(model), Counter()
    for r in rows:
        cache.add(r, *model.encode(r.prompt, c))
    return cache


def _feed(cache: BatchCache, rows: list[Row], lists: list[list[int]], parents=None):
    """One call: row i gets lists[i] (possibly empty); returns logits [N, T, V]."""
    counts = np.array([len(x) for x in lists])
    tokens = np.zeros((len(rows), max(1, counts.max())), np.int64)
    for i, x in enumerate(lists):
        tokens[i, : len(x)] = x
    return cache.run(tokens, counts, Counter(), parents)


def alone(model: T5Model, row: Row) -> np.ndarray:
    """The reference: the row alone, its history in one call, then its new tokens."""
    cache = _cache(model, [row])
    _feed(cache, [row], [row.history])
    return _feed(cache, [row], [row.new])[0, : len(row.new)]


def together(model: T5Model, rows: list[Row], chunk: int | None, holes: bool) -> list:
    """All rows in every call: histories in chunks (None: whole), optional rewound slots."""
    cache = _cache(model, rows)
    done = [0] * len(rows)
    while any(d < len(r.history) for d, r in zip(done, rows)):
        step = [r.history[d : d + (chunk or len(r.history))] for d, r in zip(done, rows)]
        _feed(cache, rows, step)
        done = [d + len(s) for d, s in zip(done, step)]
    if holes:  # three junk tokens on every other row, then rewound: zeroed slots behind the mask
        junk = [[7, 8, 9] if i % 2 else [] for i in range(len(rows))]
        _feed(cache, rows, junk)
        for i, r in enumerate(rows):
            cache.rewind(r, len(r.history))
    out = _feed(cache, rows, [r.new for r in rows])
    return [out[i, : len(r.new)] for i, r in enumerate(rows)]


def check_model(folder, seed: int = 0, sizes=(1, 2, 5, 16)) -> int:
    """Assert bit-identity for every row in every call shape; returns the rows compared."""
    model = T5Model(folder, threads=2)
    rng = np.random.default_rng(seed)
    compared = 0
    for n in sizes:
        rows = [Row(rng, model.vocab_size, int(rng.integers(1, 7))) for _ in range(n)]
        ref = [alone(model, r) for r in rows]
        for chunk, holes in ((None, False), (1, True), (3, False)):
            got = together(model, rows, chunk, holes)
            for i, (a, b) in enumerate(zip(ref, got)):
                assert np.array_equal(a, b), (
                    f"{folder}: row {i} of {n} (chunk {chunk}, holes {holes}): max diff "
                    f"{np.abs(a - b).max():.3g}"
                )
                compared += 1
    return compared


def check_long_neighbour(folder, seed: int = 3) -> None:
    """Rows beside a long one (150-token history, 200-token prompt): the call's capacity and
    encoder length grow from 32 and ~40 to 160+ and 201, every other row's bits stay."""
    model = T5Model(folder, threads=2)
    rng = np.random.default_rng(seed)
    rows = [Row(rng, model.vocab_size, int(rng.integers(1, 7))) for _ in range(3)]
    long = Row(rng, model.vocab_size, 3)
    long.history = [0] + rng.integers(2, model.vocab_size, 150).tolist()
    long.prompt = rng.integers(2, model.vocab_size, 200).tolist() + [1]
    ref = [alone(model, r) for r in rows]
    for chunk, holes in ((None, False), (3, True)):
        got = together(model, [*rows, long], chunk, holes)
        for i, (a, b) in enumerate(zip(ref, got)):
            assert np.array_equal(a, b), f"{folder}: row {i} beside a long row (chunk {chunk})"


def check_tree(folder, seed: int = 1) -> None:
    """A tree row (pending + two paths under a tree mask) beside a plain row: the first path
    sits in the slots a plain row would give it, so its logits equal that path fed alone, bit
    for bit. (The second path sits in other slots: the scheduler emits none of its logits
    but the pending token's, and proposes its tokens again as a plain chain.)"""
    model = T5Model(folder, threads=2)
    rng = np.random.default_rng(seed)
    row, other = Row(rng, model.vocab_size, 1), Row(rng, model.vocab_size, 4)
    a, b = rng.integers(2, model.vocab_size, (2, 3)).tolist()
    cache = _cache(model, [row, other])
    _feed(cache, [row, other], [row.history, other.history])
    lo = len(row.history)
    tree = [row.new[0], *a, *b]  # parents as slots: pending after the trunk, paths after it
    parents = [lo - 1, lo, lo + 1, lo + 2, lo, lo + 4, lo + 5]
    got = _feed(cache, [row, other], [tree, other.new], [parents, None])[0]
    ref = alone(model, _with_new(row, [row.new[0], *a]))
    assert np.array_equal(ref, got[:4]), f"{folder}: tree path {a}"


def _with_new(row: Row, new: list[int]) -> Row:
    copy = object.__new__(Row)
    copy.prompt, copy.history, copy.new = row.prompt, row.history, new
    return copy


@pytest.mark.parametrize("variant", ["v1_0", "v1_1"])
def test_tiny_rows_bit_identical_in_any_call_shape(tiny_models, variant):
    assert check_model(tiny_models[variant]["main"]) == 3 * (1 + 2 + 5 + 16)
    check_long_neighbour(tiny_models[variant]["main"])
    check_tree(tiny_models[variant]["main"])


def test_pycode_rows_bit_identical_in_any_call_shape(pycode_pair):
    assert check_model(pycode_pair[0], sizes=(1, 5, 16)) == 3 * (1 + 5 + 16)
    check_long_neighbour(pycode_pair[0])
    check_tree(pycode_pair[0])


@pytest.mark.parametrize("dtype", ["fp16", "int8", "int4"])
def test_quantized_and_fp16_mains_bit_identical(tiny_models, tmp_path, dtype):
    from export import export_model

    if dtype in ("int4",) and "int4" not in _export_dtypes():
        pytest.skip("this export has no int4")
    hf = tiny_models["v1_1"]["hf"]
    res = export_model(str(hf), tmp_path / f"main-{dtype}", dtype=dtype, quiet=True)
    assert check_model(res.main, sizes=(1, 2, 5)) == 3 * (1 + 2 + 5)
    check_long_neighbour(res.main)
    check_tree(res.main)


def _export_dtypes() -> tuple:
    from export import core

    return tuple(getattr(core, "DTYPES", ("fp32", "fp16", "int8")))
