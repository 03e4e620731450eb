"""Exact by construction: a row's logits are the same bits whatever shares its main call.

engine.selfcheck (what `stairs-verify --exact` and `stairs-serve --self-check` run) feeds the
same random rows alone and in many call shapes: 1 to 16 requests, histories in one call or in
chunks of 1 and 3 tokens, other rows of other lengths, rewound slots, one-token rows (padded as
the engine pads them), a long neighbour, and a tree row whose first path is compared with that
path fed alone. Every comparison is np.array_equal on the logits. Checked on tiny T5 v1.0/v1.1
(fp32, and v1.1 fp16/int8/int4) and on the pycode main in fp32, fp16, int8 and int4, through
plain sessions and through the default load path (the weights cache's prepacked graphs).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import Engine, selfcheck
from engine.model import T5Model


def check_model(model, seed: int = 0, sizes=selfcheck.SIZES) -> int:
    """Assert bit-identity for every row in every call shape; returns the rows compared."""
    checks = selfcheck.run(model, sizes, seed)
    bad = [c.line() for c in checks if not c.identical]
    assert not bad, f"{model.folder}: " + "; ".join(bad)
    return sum(c.rows for c in checks)


def _cached(folder, cache: Path) -> T5Model:
    """The main as Engine.load maps it by default: every graph from the weights cache."""
    model = Engine.load(folder, threads=2, weights_cache=cache).main
    root = cache.resolve()
    assert all(Path(s._model_path).resolve().is_relative_to(root) for s in model.sessions.values())
    return model


# rows of selfcheck.run besides the sizes': 3 beside a long one (twice), one tree row
EXTRA = 3 + 3 + 1


def checked(sizes) -> int:
    """Rows compared for these sizes: three call shapes each (one row's whole-history call is
    the reference itself, so it is not one), and the long-neighbour and tree checks."""
    return 3 * sum(sizes) - (1 in sizes) + EXTRA


@pytest.mark.parametrize("variant", ["v1_0", "v1_1"])
def test_tiny_rows_bit_identical_in_any_call_shape(tiny_models, variant):
    model = T5Model(tiny_models[variant]["main"], threads=2)
    assert check_model(model, sizes=(1, 2, 5, 16)) == checked((1, 2, 5, 16))


@pytest.mark.parametrize("load", ["plain", "weights-cache"])
def test_pycode_rows_bit_identical_in_any_call_shape(pycode_pair, tmp_path, load):
    main = pycode_pair[0]
    model = T5Model(main, threads=2) if load == "plain" else _cached(main, tmp_path / "cache")
    assert check_model(model, sizes=(1, 5, 16)) == checked((1, 5, 16))


@pytest.mark.parametrize("load", ["plain", "weights-cache"])
@pytest.mark.parametrize("dtype", ["fp16", "int8", "int4"])
def test_pycode_fp16_and_quantized_mains_bit_identical(pycode_dtypes, tmp_path, dtype, load):
    main = pycode_dtypes[dtype]
    model = T5Model(main, threads=2) if load == "plain" else _cached(main, tmp_path / "cache")
    assert check_model(model) == checked(selfcheck.SIZES)


@pytest.mark.parametrize("dtype", ["fp16", "int8", "int4"])
def test_tiny_fp16_and_quantized_mains_bit_identical(tiny_models, tmp_path, dtype):
    from export import export_model

    hf = tiny_models["v1_1"]["hf"]
    res = export_model(str(hf), tmp_path / f"main-{dtype}", dtype=dtype, quiet=True)
    assert check_model(T5Model(res.main, threads=2), sizes=(1, 2, 5)) == checked((1, 2, 5))
