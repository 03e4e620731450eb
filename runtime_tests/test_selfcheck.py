"""Exact on the user's machine: `stairs-verify --exact DIR`, Engine.self_check and
`stairs-serve --self-check` pass on exported folders here, and fail (exit 2, refuse to serve) on
a graph whose attention multiplies a row's queries together (a one-token row then runs a
one-query product beside rows of more) while its metadata still says each query runs alone."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from engine import Engine, EngineError, selfcheck
from engine.cli import verify_main


def _per_query_unsqueezes(made: dict, squeeze) -> tuple[dict, object]:
    """{output: input} bypassing the per-query Unsqueezes of the attention ending at `squeeze`
    (its weights x values, scores and bias), and the Transpose of its keys; made: each output's
    node."""
    bypass = {squeeze.output[0]: squeeze.input[0]}
    values = made[squeeze.input[0]]  # MatMul(weights, Unsqueeze(v))
    w = made[values.input[0]]
    while w.op_type != "Add":  # back through Softmax and Cast to scores + Unsqueeze(bias)
        w = made[w.input[0]]
    scores = made[w.input[0]]  # MatMul(Unsqueeze(q), Transpose(Unsqueeze(k)))
    keys = made[scores.input[1]]
    for u in (made[values.input[1]], made[w.input[1]], made[scores.input[0]], made[keys.input[0]]):
        assert u.op_type == "Unsqueeze", u.op_type
        bypass[u.output[0]] = u.input[0]
    return bypass, keys


def unpadded_copy(src: Path, dst: Path) -> Path:
    """A copy of src whose decoder attention multiplies each row's queries in one product (the
    per-query Unsqueezes and Squeezes bypassed, the keys' Transpose back to 4-D); its metadata
    still says each query runs alone, so the engine pads only one-token calls. stairs.json is
    updated: the folder is valid, only no longer exact."""
    import onnx

    dst = Path(shutil.copytree(src, dst))
    path = dst / "decoder_masked_model.onnx"
    proto = onnx.load(str(path))
    bypass, made = {}, {o: n for n in proto.graph.node for o in n.output}
    for n in [n for n in proto.graph.node if n.op_type == "Squeeze"]:
        more, keys = _per_query_unsqueezes(made, n)
        bypass.update(more)
        keys.attribute[0].ints[:] = [0, 1, 3, 2]
    assert bypass, "no per-query attention found in the graph"
    kept = [n for n in proto.graph.node if n.output[0] not in bypass]
    for n in kept:
        n.input[:] = [bypass.get(i, i) for i in n.input]
    del proto.graph.node[:]
    proto.graph.node.extend(kept)
    del proto.graph.value_info[:]  # shapes of the old attention
    onnx.save(proto, str(path))
    return _listed(dst, path)


def _listed(dst: Path, path: Path) -> Path:
    """dst with stairs.json listing path's new bytes (the folder stays valid)."""
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


def test_a_format_2_folder_runs_with_a_warning_to_export_it_again(tiny_models, tmp_path, caplog):
    import onnx

    dst = Path(shutil.copytree(tiny_models["v1_1"]["main"], tmp_path / "old"))
    path = dst / "decoder_masked_model.onnx"
    proto = onnx.load(str(path), load_external_data=False)
    for p in proto.metadata_props:
        if p.key == "stairs.attention_query_rows":
            assert p.value == "1"  # what the exporter writes now
            p.value = "2"
    onnx.save_model(proto, str(path))
    with caplog.at_level("WARNING", logger="stairs"):
        eng = Engine.load(_listed(dst, path), threads=2)
    assert eng.main.min_tokens == 1
    assert "export it again with stairs-export" in caplog.text and "format 3" in caplog.text
    assert len(eng.generate([5, 6, 7, 1], max_new_tokens=3).token_ids) == 3


def test_a_folder_of_a_newer_format_is_refused_before_any_graph_loads(tiny_models, tmp_path):
    from engine import ModelFileError

    dst = Path(shutil.copytree(tiny_models["v1_1"]["main"], tmp_path / "newer"))
    manifest = json.loads((dst / "stairs.json").read_text())
    assert manifest["format_version"] == 3
    for version, words in ((4, "newer stairs-export"), ("3", "not a number")):
        manifest["format_version"] = version
        (dst / "stairs.json").write_text(json.dumps(manifest))
        with pytest.raises(ModelFileError, match=words):
            Engine.load(dst, threads=2)
    manifest["format_version"] = 2  # older formats load
    (dst / "stairs.json").write_text(json.dumps(manifest))
    assert Engine.load(dst, threads=2).main.min_tokens == 1


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
