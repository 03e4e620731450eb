"""Exact on the user's machine: `stairs-verify --exact DIR`, Engine.self_check and
`stairs-serve --self-check` pass on exported folders here, and fail (exit 2, refuse to serve) on
a graph whose one-token rows are not padded: its attention's extra query row removed while its
metadata still says the engine need not pad them."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from engine import Engine, EngineError, selfcheck
from engine.cli import verify_main


def unpadded_copy(src: Path, dst: Path) -> Path:
    """A copy of src whose decoder attention runs a single query row for a one-token row (the
    Concat that adds a copy of the first query row, and its bias row, bypassed); its metadata
    still says 2 query rows, so the engine pads only one-token calls. stairs.json is updated:
    the folder is valid, only no longer exact."""
    import onnx

    dst = Path(shutil.copytree(src, dst))
    path = dst / "decoder_masked_model.onnx"
    proto = onnx.load(str(path))
    made_by = {o: n for n in proto.graph.node for o in n.output}
    bypass = {}
    for n in proto.graph.node:
        axis = [a.i for a in n.attribute if a.name == "axis"]
        if n.op_type == "Concat" and axis == [2] and len(n.input) == 2:
            first, extra = n.input
            src = made_by.get(extra)
            if src is not None and src.op_type == "Slice" and src.input[0] == first:
                bypass[n.output[0]] = first  # cat([x, x[:, :, :1]], dim=2) -> x
    assert bypass, "no extra query row found in the graph"
    for n in proto.graph.node:
        n.input[:] = [bypass.get(i, i) for i in n.input]
    onnx.save(proto, str(path))
    manifest = json.loads((dst / "stairs.json").read_text())
    data = path.read_bytes()
    manifest["files"][path.name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (dst / "stairs.json").write_text(json.dumps(manifest))
    return dst


@pytest.fixture(scope="module")
def unpadded(tiny_models, tmp_path_factory):
    return unpadded_copy(tiny_models["v1_1"]["main"], tmp_path_factory.mktemp("sc") / "unpadded")


def test_verify_exact_passes_on_the_exported_pycode_main(pycode_pair, capsys):
    assert verify_main(["--exact", str(pycode_pair[0]), "--threads", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    checks = [ln for ln in out if ln.startswith(("OK ", "DIFFERS "))]
    # every size x shape but one row's whole history (the reference's own calls), and 3 more
    assert len(checks) == len(selfcheck.SIZES) * len(selfcheck.SHAPES) - 1 + 3
    assert all("max abs diff 0, bit-identical yes" in ln for ln in checks), out
    assert out[-1].startswith(f"{len(checks)}/{len(checks)} call shapes bit-identical")
    assert "exact here" in out[-1] and "NOT" not in out[-1]


def test_verify_exact_fails_on_a_graph_whose_one_token_rows_are_not_padded(unpadded, capsys):
    eng = Engine.load(unpadded, threads=2)
    assert eng.main.min_tokens == 1  # the engine trusts the metadata: no pad per row
    assert len(eng.generate([5, 6, 7, 1], max_new_tokens=4).token_ids) == 4  # it still runs
    assert verify_main(["--exact", str(unpadded), "--threads", "2"]) == 2
    out = capsys.readouterr().out.splitlines()
    bad = [ln for ln in out if ln.startswith("DIFFERS ")]
    assert bad and all("bit-identical no" in ln and "max abs diff 0," not in ln for ln in bad)
    assert any("1-token chunks" in ln for ln in bad)  # rows of one token beside others
    assert "NOT exact here" in out[-1]


def test_self_check_api_and_require(tiny_models, unpadded, capsys):
    good = Engine.load(tiny_models["v1_1"]["main"], threads=2)
    checks = good.self_check()
    assert selfcheck.passed(checks) and all(c.max_abs_diff == 0 for c in checks)
    assert selfcheck.passed(selfcheck.require(good))
    with pytest.raises(EngineError, match="call shapes change a row's logits"):
        selfcheck.require(Engine.load(unpadded, threads=2))
    assert "DIFFERS" in capsys.readouterr().err


def test_serve_self_check_refuses_to_serve_where_rows_are_not_exact(tiny_models, unpadded, capsys):
    from serve import ServeConfig
    from serve.app import build_app
    from serve.cli import main as serve_main
    from serve.cli import parse_args

    assert parse_args(["--main", "m", "--self-check"]).self_check is True
    assert parse_args(["--main", "m"]).self_check is False
    app = build_app(ServeConfig(main=str(tiny_models["v1_1"]["main"]), self_check=True))
    assert app.state.stairs.engine is not None
    assert "self-check: OK" in capsys.readouterr().err
    assert serve_main(["--main", str(unpadded), "--self-check", "--threads", "2"]) == 2
    err = capsys.readouterr().err
    assert "self-check: DIFFERS" in err and "stairs-serve: error: self-check:" in err
