"""stairs-export: files, manifest, validation, refusals, atomicity."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from conftest import PYCODE_DRAFT, PYCODE_MAIN, make_tiny_t5

from export import (
    CheckpointError,
    OutputExistsError,
    PairMismatchError,
    ValidationError,
    export_model,
)
from export.cli import main as export_cli

ONNX = [
    "encoder_model.onnx",
    "decoder_model.onnx",
    "decoder_with_past_model.onnx",
    "decoder_masked_model.onnx",
    "cross_kv_model.onnx",
]
FILES = ONNX + [
    "spiece.model",
    "config.json",
    "generation_config.json",
    "stairs.json",
]
MASKED_CASES = {
    "cross_kv",
    "a: ragged rows",
    "b: masked holes",
    "c: tree branches",
    "d: first step, no past",
}


@pytest.mark.parametrize("variant", ["v1_0", "v1_1"])
def test_tiny_export_files_and_manifest(tiny_models, variant):
    folder = tiny_models[variant]["main"]
    for f in FILES:
        assert (folder / f).is_file(), f
    m = json.loads((folder / "stairs.json").read_text())
    cfg = json.loads((folder / "config.json").read_text())
    assert m["format_version"] == 2 and m["dtype"] == "fp32"
    assert m["d_kv"] == 16 and m["num_heads"] == 4 and m["vocab_size"] == cfg["vocab_size"]
    assert (m["pad_token_id"], m["eos_token_id"], m["decoder_start_token_id"]) == (0, 1, 0)
    assert m["feed_forward_proj"] == cfg["feed_forward_proj"]
    for f in ONNX:
        assert m["files"][f]["bytes"] == (folder / f).stat().st_size
        assert m["files"][f]["sha256"] == hashlib.sha256((folder / f).read_bytes()).hexdigest()
        assert 0 <= m["validation"]["max_abs_diff"][f] < 1e-3
    assert m["onnx"]["decoder_masked"] == "decoder_masked_model.onnx"
    assert m["onnx"]["cross_kv"] == "cross_kv_model.onnx"
    # every case of the masked decoder's validation ran, within the fp32 tolerance
    assert set(m["validation"]["masked_cases"]) == MASKED_CASES
    assert max(m["validation"]["masked_cases"].values()) < 1e-3
    assert sorted(m["files"]) == sorted(p.name for p in folder.iterdir() if p.name != "stairs.json")
    assert m["assistant"] == f"../{tiny_models[variant]['random'].name}"
    assert not list(folder.parent.glob(".*tmp-*"))


def test_pycode_pair_export(pycode_pair):
    main, draft = pycode_pair
    for folder in (main, draft):
        m = json.loads((folder / "stairs.json").read_text())
        assert m["vocab_size"] == 8192
        assert max(m["validation"]["max_abs_diff"].values()) < 1e-3
        for f in ("decoder_masked_model.onnx", "cross_kv_model.onnx"):
            assert m["files"][f]["bytes"] == (folder / f).stat().st_size
            assert f in m["validation"]["max_abs_diff"]
    assert json.loads((main / "stairs.json").read_text())["num_layers"] == 6
    assert json.loads((draft / "stairs.json").read_text())["num_decoder_layers"] == 2


def test_refuses_existing_output_unless_force(tiny_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(OutputExistsError):
        export_model(str(tiny_models["v1_1"]["hf"]), out, assistant=None, quiet=True)
    assert (
        export_cli([str(tiny_models["v1_1"]["hf"]), "-o", str(out), "--assistant", "none", "-q"])
        == 2
    )
    export_model(str(tiny_models["v1_1"]["hf"]), out, assistant=None, force=True, quiet=True)
    assert (out / "stairs.json").is_file()  # an empty folder is replaced
    export_model(str(tiny_models["v1_1"]["hf"]), out, assistant=None, force=True, quiet=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # and so is a previous export


def test_interrupted_export_leaves_nothing(tiny_models, tmp_path, monkeypatch):
    import export.validate

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(export.validate, "validate_folder", boom)
    with pytest.raises(KeyboardInterrupt):
        export_model(str(tiny_models["v1_1"]["hf"]), tmp_path / "out", assistant=None, quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_validation_failure_is_typed(tiny_models, tmp_path, monkeypatch):
    import export.validate

    real = export.validate._session

    class Off:  # an ONNX Runtime session whose encoder output is off by 0.5
        def __init__(self, path):
            self.s = real(path)
            self.enc = path.name == "encoder_model.onnx"

        def __getattr__(self, name):
            return getattr(self.s, name)

        def run(self, names, feed):
            out = self.s.run(names, feed)
            return [out[0] + 0.5, *out[1:]] if self.enc else out

    monkeypatch.setattr(export.validate, "_session", Off)
    with pytest.raises(ValidationError) as err:
        export_model(str(tiny_models["v1_1"]["hf"]), tmp_path / "out", assistant=None, quiet=True)
    assert err.value.file == "encoder_model.onnx" and err.value.output == "last_hidden_state"
    assert err.value.max_diff == pytest.approx(0.5, abs=1e-3)
    assert list(tmp_path.iterdir()) == []


def test_masked_validation_failure_is_typed(tiny_models, tmp_path, monkeypatch):
    import export.masked

    real = export.masked._Graphs.cross_kv

    def off(self, enc):  # the cross key/value graph's output off by 0.5
        return {k: v + 0.5 for k, v in real(self, enc).items()}

    monkeypatch.setattr(export.masked._Graphs, "cross_kv", off)
    with pytest.raises(ValidationError) as err:
        export_model(str(tiny_models["v1_1"]["hf"]), tmp_path / "out", assistant=None, quiet=True)
    assert err.value.file == "cross_kv_model.onnx" and err.value.output == "cross_kv"
    assert err.value.max_diff == pytest.approx(0.5, abs=1e-3)
    assert list(tmp_path.iterdir()) == []


def test_pair_mismatch_names_the_difference(tmp_path):
    a = make_tiny_t5(tmp_path / "a", "v1_1", seed=1)
    b = make_tiny_t5(tmp_path / "b", "v1_1", seed=1, vocab_size=8000, eos_token_id=2)
    with pytest.raises(PairMismatchError, match=r"vocab_size: main 8192 vs assistant 8000.*eos"):
        export_model(str(a), tmp_path / "out", assistant=str(b), quiet=True)
    assert not (tmp_path / "out").exists()


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="Known: .*t5-3b"):
        export_model("no-such-model", tmp_path / "x", quiet=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        export_model(str(tmp_path / "empty"), tmp_path / "x", quiet=True)
    bad = make_tiny_t5(tmp_path / "bad", "v1_1", seed=1)
    (bad / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="cannot load"):
        export_model(str(bad), tmp_path / "x", assistant=None, quiet=True)
    assert not (tmp_path / "x").exists()


def _logits_head_is_fp32(graph) -> bool:
    """The MatMul writing `logits` reads fp32 (casts to fp32 or fp32 weights) and only casts to
    fp32 lie between it and the output."""
    import onnx

    fp32 = onnx.TensorProto.FLOAT
    producer = {o: n for n in graph.node for o in n.output}
    weights = {i.name: i.data_type for i in graph.initializer}
    node = producer["logits"]
    while node.op_type == "Cast":
        if node.attribute[0].i != fp32:
            return False
        node = producer[node.input[0]]
    if node.op_type != "MatMul":
        return False
    for i in node.input:
        src = producer.get(i)
        if weights.get(i, fp32) != fp32 or (
            src is not None and not (src.op_type == "Cast" and src.attribute[0].i == fp32)
        ):
            return False
    return True


@pytest.mark.parametrize("variant", ["v1_1", "v1_0"])
def test_fp16_export_keeps_overflow_parts_fp32(tmp_path, variant):
    import onnx
    import onnxruntime as ort

    hf = make_tiny_t5(tmp_path / "hf", variant, seed=3)
    res = export_model(str(hf), tmp_path / "fp16", assistant=None, dtype="fp16", quiet=True)
    m = json.loads((res.main / "stairs.json").read_text())
    assert m["dtype"] == "fp16"
    # validated within 5% of the logits' scale; nonzero because it really is half precision
    for f in ONNX:
        assert 0 < m["validation"]["max_abs_diff"][f] < 1.0, f
    assert set(m["validation"]["masked_cases"]) == MASKED_CASES
    for f in ("decoder_with_past_model.onnx", "decoder_masked_model.onnx"):
        graph = onnx.load(str(res.main / f)).graph
        assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.initializer)
        assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # logits fp32
        # the logits projection runs in fp32 and its output reaches `logits` without an fp16
        # round trip (tied heads too: the masked decoder has no lm_head module there)
        assert _logits_head_is_fp32(graph), f
    # A padding row (its mask allows no slot) must stay finite: float32's min in the mask would
    # be -inf in fp16 and softmax NaN.
    sess = ort.InferenceSession(
        str(res.main / "decoder_masked_model.onnx"), providers=["CPUExecutionProvider"]
    )
    feed = {
        "input_ids": np.array([[5, 6], [7, 0]], np.int64),
        "positions": np.array([[0, 1], [0, 0]], np.int64),
        "past_positions": np.zeros((2, 0), np.int64),
        "attention_mask": np.array([[[1, 0], [1, 1]], [[1, 0], [0, 0]]], np.int64),
        "encoder_attention_mask": np.array([[1, 1, 1], [1, 1, 0]], np.int64),
    }
    cross = ort.InferenceSession(
        str(res.main / "cross_kv_model.onnx"), providers=["CPUExecutionProvider"]
    )
    enc = np.random.default_rng(0).standard_normal((2, 3, m["d_model"])).astype(np.float32)
    feed.update(
        zip([o.name for o in cross.get_outputs()], cross.run(None, {"encoder_hidden_states": enc}))
    )
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            feed[i.name] = np.zeros((2, m["num_heads"], 0, m["d_kv"]), np.float32)
    logits, *presents = sess.run(None, feed)
    assert np.isfinite(logits).all() and all(np.isfinite(p).all() for p in presents)
    from engine import Engine

    eng = Engine.load(res.main)
    ids = eng.generate([5, 6, 7, 1], max_new_tokens=8).token_ids
    assert 1 <= len(ids) <= 8


def test_registry_resolves_known_pairs():
    from models import lookup

    assert lookup("t5-3b")["assistant"] == "t5-small"
    assert lookup("google/flan-t5-xl")["assistant"] == "flan-t5-small"
    assert lookup("nothing") is None


def test_shared_models_exist_for_export_tests():
    if not PYCODE_MAIN.is_dir():
        pytest.skip("../shared absent")
    assert (PYCODE_DRAFT / "spiece.model").is_file()
    assert np.isfinite(1.0)


def test_int8_assistant_keeps_output_exact(tmp_path):
    from engine import Engine

    main = make_tiny_t5(tmp_path / "hf-main", "v1_1", seed=5)
    res = export_model(
        str(main),
        tmp_path / "onnx" / "main",
        assistant=str(main),
        assistant_dtype="int8",
        quiet=True,
    )
    m = json.loads((res.assistant / "stairs.json").read_text())
    assert m["dtype"] == "int8" and m["validation"]["int8"]["max_abs_diff"]
    assert max(m["validation"]["max_abs_diff"].values()) < 1e-3  # fp32 graph validated first
    import onnx

    for f in ("decoder_masked_model.onnx", "cross_kv_model.onnx"):
        assert f in m["validation"]["max_abs_diff"]
        assert 0 < m["validation"]["int8"]["max_abs_diff"][f] < np.inf  # really quantized
        ops = {n.op_type for n in onnx.load(str(res.assistant / f)).graph.node}
        assert "MatMulInteger" in ops
    assert set(m["validation"]["int8"]["masked_cases"]) == MASKED_CASES
    assert json.loads((res.main / "stairs.json").read_text())["dtype"] == "fp32"
    eng = Engine.load(res.main, assistant=res.assistant)
    rng = np.random.default_rng(1)
    accepted = 0
    for _ in range(6):
        prompt = [int(t) for t in rng.integers(3, 8000, 20)] + [1]
        ref = eng.generate(prompt, max_new_tokens=16).token_ids
        out = eng.generate(prompt, strategy="assisted", max_new_tokens=16, draft_tokens=4)
        assert out.token_ids == ref
        accepted += out.stats.accepted
    assert accepted > 0  # the int8 copy of the main model still agrees with it mostly
