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
from export.masked import DECODER_FILE

# What stairs-export writes by default: each weight once (optimum's decoders only with --optimum).
ONNX = ["encoder_model.onnx", "decoder_masked_model.onnx", "cross_kv_model.onnx"]
OPTIMUM = ["decoder_model.onnx", "decoder_with_past_model.onnx"]
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
def test_each_buffer_written_by_slices_and_each_query_attending_alone(tiny_models, variant):
    """The key/value writes are ScatterNDs (a ScatterElements copies the whole bound buffer onto
    itself every call); each attention product has one query row (format 3's metadata)."""
    import onnx

    proto = onnx.load(str(tiny_models[variant]["main"] / DECODER_FILE), load_external_data=False)
    graph = proto.graph
    writer = {o: n.op_type for n in graph.node for o in n.output}
    full = [o.name for o in graph.output if o.name.startswith("kv_cache.")]
    assert full and {writer[o] for o in full} == {"ScatterND"}
    assert {p.key: p.value for p in proto.metadata_props}["stairs.attention_query_rows"] == "1"
    squeezed = [n for n in graph.node if n.op_type == "Squeeze"]  # [B, H, T, 1, D] -> 4-D
    assert len(squeezed) == len(full)  # one per attention: a self and a cross per layer


@pytest.mark.parametrize("variant", ["v1_0", "v1_1"])
def test_tiny_export_files_and_manifest(tiny_models, variant):
    folder = tiny_models[variant]["main"]
    for f in FILES:
        assert (folder / f).is_file(), f
    for f in OPTIMUM:
        assert not (folder / f).exists(), f
    m = json.loads((folder / "stairs.json").read_text())
    cfg = json.loads((folder / "config.json").read_text())
    assert m["format_version"] == 3 and m["dtype"] == "fp32"
    assert m["d_kv"] == 16 and m["num_heads"] == 4 and m["vocab_size"] == cfg["vocab_size"]
    assert (m["pad_token_id"], m["eos_token_id"], m["decoder_start_token_id"]) == (0, 1, 0)
    assert m["feed_forward_proj"] == cfg["feed_forward_proj"]
    for f in ONNX:
        assert m["files"][f]["bytes"] == (folder / f).stat().st_size
        assert m["files"][f]["sha256"] == hashlib.sha256((folder / f).read_bytes()).hexdigest()
        assert 0 <= m["validation"]["max_abs_diff"][f] < 1e-3
    assert sorted(m["validation"]["max_abs_diff"]) == sorted(ONNX)
    assert m["onnx"] == {
        "encoder": "encoder_model.onnx",
        "decoder_masked": "decoder_masked_model.onnx",
        "cross_kv": "cross_kv_model.onnx",
    }
    assert m["quantization"] is None
    # every case of the masked decoder's validation ran, within the fp32 tolerance
    assert set(m["validation"]["masked_cases"]) == MASKED_CASES
    assert max(m["validation"]["masked_cases"].values()) < 1e-3
    assert sorted(m["files"]) == sorted(p.name for p in folder.iterdir() if p.name != "stairs.json")
    assert m["assistant"] == f"../{tiny_models[variant]['random'].name}"
    assert not list(folder.parent.glob(".*tmp-*"))
    # the assistant is int8 unless told otherwise (its numbers never reach the output)
    a = json.loads((tiny_models[variant]["random"] / "stairs.json").read_text())
    assert a["dtype"] == "int8" and a["quantization"]["op"] == "MatMulNBits"
    assert max(a["validation"]["max_abs_diff"].values()) < 1e-3  # fp32 graphs validated first


def test_optimum_flag_adds_optimums_decoder_files(tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    hf = tiny_models["v1_1"]["hf"]
    assert export_cli([str(hf), "-o", str(out), "--assistant", "none", "--optimum", "-q"]) == 0
    m = json.loads((out / "stairs.json").read_text())
    for f in ONNX + OPTIMUM:
        assert m["files"][f]["bytes"] == (out / f).stat().st_size
        assert 0 <= m["validation"]["max_abs_diff"][f] < 1e-3, f  # validated against PyTorch
    assert m["onnx"]["decoder"] == "decoder_model.onnx"
    assert m["onnx"]["decoder_with_past"] == "decoder_with_past_model.onnx"
    assert sorted(m["files"]) == sorted(p.name for p in out.iterdir() if p.name != "stairs.json")
    # the same files and config without the flag, less optimum's two
    plain = tiny_models["v1_1"]["main"]
    assert sorted(json.loads((plain / "stairs.json").read_text())["files"]) == sorted(
        set(m["files"]) - set(OPTIMUM)
    )
    assert json.loads((plain / "config.json").read_text()) == json.loads(
        (out / "config.json").read_text()
    )


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


def _masked_feed(folder, rows: int, t: int, past: int, src: int, seed: int = 0) -> dict:
    """A feed of decoder_masked_model.onnx as the engine's batch cache builds it: rows of t new
    tokens after `past` cached slots (random key/values, the last cached slot of row 0 masked out
    as a rejected draft), cross key/values from the folder's own cross_kv graph on random encoder
    states, the last source position of the last row padding. A graph with a `new_slots` input
    takes the new tokens in its one buffer (slots past.., mask [N, T, C]); an older one after it
    (mask [N, T, P + T])."""
    import onnxruntime as ort

    m = json.loads((folder / "stairs.json").read_text())
    rng = np.random.default_rng(seed)
    h, d = m["num_heads"], m["d_kv"]
    dec = ort.InferenceSession(
        str(folder / "decoder_masked_model.onnx"), providers=["CPUExecutionProvider"]
    )
    in_place = "new_slots" in {i.name for i in dec.get_inputs()}
    slots = past + t if in_place else past
    mask = np.ones((rows, t, past + t), np.int64)
    mask[:, :, past:] = np.tril(np.ones((t, t), np.int64))
    mask[0, :, past - 1] = 0
    enc_mask = np.ones((rows, src), np.int64)
    enc_mask[-1, -1] = 0
    positions = past + np.tile(np.arange(t), (rows, 1)).astype(np.int64)
    feed = {
        "input_ids": rng.integers(3, m["vocab_size"], (rows, t)).astype(np.int64),
        "positions": positions,
        "past_positions": np.tile(np.arange(slots), (rows, 1)).astype(np.int64),
        "attention_mask": mask,
        "encoder_attention_mask": enc_mask,
    }
    if in_place:
        feed["new_slots"] = positions.copy()
    cross = ort.InferenceSession(
        str(folder / "cross_kv_model.onnx"), providers=["CPUExecutionProvider"]
    )
    enc = rng.standard_normal((rows, src, m["d_model"])).astype(np.float32)
    names = [o.name for o in cross.get_outputs()]
    feed.update(zip(names, cross.run(None, {"encoder_hidden_states": enc})))
    for i in range(m["num_decoder_layers"]):
        for kv in ("key", "value"):
            kv_past = rng.standard_normal((rows, h, slots, d), np.float32)
            kv_past[:, :, past:] = 0.0  # the new tokens' slots (in-place graphs)
            feed[f"past_key_values.{i}.decoder.{kv}"] = kv_past
    return feed


def _masked_logits(folder, feed: dict) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(
        str(folder / "decoder_masked_model.onnx"), providers=["CPUExecutionProvider"]
    )
    return sess.run(["logits"], feed)[0]


def _input_types(graph, node) -> set[int]:
    """Element types of node's inputs that ONNX shape inference knows."""
    types = {i.name: i.data_type for i in graph.initializer}
    for v in [*graph.input, *graph.value_info, *graph.output]:
        types[v.name] = v.type.tensor_type.elem_type
    return {types[i] for i in node.input if i in types}


@pytest.mark.parametrize("variant", ["v1_1", "v1_0"])
def test_fp16_export_keeps_overflow_parts_fp32(tiny_models, tmp_path, variant):
    import onnx

    from export.fp16 import FP32_OPS

    hf, fp32 = tiny_models[variant]["hf"], tiny_models[variant]["main"]
    res = export_model(str(hf), tmp_path / "fp16", assistant=None, dtype="fp16", quiet=True)
    m = json.loads((res.main / "stairs.json").read_text())
    assert m["dtype"] == "fp16"
    # validated within 5% of the logits' scale; nonzero because it really is half precision
    for f in ONNX:
        assert 0 < m["validation"]["max_abs_diff"][f] < 1.0, f
    assert set(m["validation"]["masked_cases"]) == MASKED_CASES
    for f in ("encoder_model.onnx", "decoder_masked_model.onnx"):
        graph = onnx.shape_inference.infer_shapes(onnx.load(str(res.main / f))).graph
        assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.initializer)
        # layer norms (Pow, ReduceMean, Sqrt), residual and mask Adds, softmax and the
        # feed-forward output projection (wo) run on fp32 inputs
        kept = [n for n in graph.node if n.op_type in FP32_OPS or "DenseReluDense/wo" in n.name]
        assert {"Pow", "ReduceMean", "Sqrt", "Add", "MatMul"} <= {n.op_type for n in kept}, f
        half = [n.name for n in kept if onnx.TensorProto.FLOAT16 in _input_types(graph, n)]
        assert not half, (f, half)
        norms = [n for n in kept if n.op_type in ("Pow", "ReduceMean", "Sqrt", "MatMul")]
        assert all(onnx.TensorProto.FLOAT in _input_types(graph, n) for n in norms), f
        if f == "decoder_masked_model.onnx":
            assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
            # the logits projection runs in fp32 and its output reaches `logits` without an
            # fp16 round trip (tied heads too: the masked decoder has no lm_head module there)
            assert _logits_head_is_fp32(graph), f
    # Same feed through the fp16 and the fp32 export: close, and a padding row (its mask allows
    # no slot) stays finite (float32's min in the mask would be -inf in fp16 and softmax NaN).
    feed = _masked_feed(fp32, rows=2, t=2, past=3, src=4)
    feed["attention_mask"][1, 1] = 0  # row 1's second token: padding
    ref, got = _masked_logits(fp32, feed), _masked_logits(res.main, feed)
    assert np.isfinite(got).all()
    real = [(0, 0), (0, 1), (1, 0)]
    diff = max(float(np.max(np.abs(got[r, t] - ref[r, t]))) for r, t in real)
    scale = max(float(np.max(np.abs(ref[r, t]))) for r, t in real)
    assert 0 < diff <= 5e-2 * max(1.0, scale), (diff, scale)
    assert all(int(np.argmax(got[r, t])) == int(np.argmax(ref[r, t])) for r, t in real)


def _ops(path) -> set[str]:
    import onnx

    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_quantized_main_is_weight_only_and_rows_independent(tiny_models, tmp_path, dtype):
    import onnx

    from export.quantize import WEIGHT_ONLY

    hf, fp32 = tiny_models["v1_0"]["hf"], tiny_models["v1_0"]["main"]
    res = export_model(str(hf), tmp_path / dtype, assistant=None, dtype=dtype, quiet=True)
    m = json.loads((res.main / "stairs.json").read_text())
    want = WEIGHT_ONLY[dtype]
    assert m["dtype"] == dtype
    assert m["quantization"] == {"method": "weight_only", "op": "MatMulNBits", **want}
    assert want["bits"] == {"int8": 8, "int4": 4}[dtype]
    assert sorted(m["files"]) == sorted(
        p.name for p in res.main.iterdir() if p.name != "stairs.json"
    )
    assert max(m["validation"]["max_abs_diff"].values()) < 1e-3  # fp32 graphs validated first
    for f in ONNX:
        assert 0 < m["validation"][dtype]["max_abs_diff"][f] < np.inf, f  # really quantized
        ops = _ops(res.main / f)
        assert "MatMulNBits" in ops and not ops & {"DynamicQuantizeLinear", "MatMulInteger"}, f
        graph = onnx.load(str(res.main / f)).graph
        weights = {i.name for i in graph.initializer}
        plain = [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]
        assert all("wo" in want["keep"] and "DenseReluDense/wo" in n for n in plain), plain
    assert set(m["validation"][dtype]["masked_cases"]) == MASKED_CASES
    # the engine's exactness rule: a row's logits do not depend on the rest of the call (other
    # rows, or more tokens after its own: the first 2 of a 4-token call)
    batch = _masked_feed(res.main, rows=4, t=2, past=5, src=6, seed=3)
    together = _masked_logits(res.main, batch)
    for r in (0, 2, 3):
        alone = {k: v[r : r + 1] for k, v in batch.items()}
        assert np.array_equal(_masked_logits(res.main, alone)[0], together[r])
    longer = _masked_feed(res.main, rows=4, t=4, past=5, src=6, seed=3)
    if "new_slots" in longer:  # one buffer: the same slots whatever the call's token count
        first2 = dict(longer)
        for k in ("input_ids", "positions", "new_slots", "attention_mask"):
            first2[k] = longer[k][:, :2]
        got = _masked_logits(res.main, first2)
        assert np.array_equal(got, _masked_logits(res.main, longer)[:, :2])
    # and it is still the model: the fp32 export's next token on the unmasked rows' last token
    ref = _masked_logits(fp32, batch)
    got = _masked_logits(res.main, batch)
    assert np.isfinite(got).all()
    agree = np.mean(np.argmax(got, -1) == np.argmax(ref, -1))
    assert agree >= (0.75 if dtype == "int8" else 0.5), agree


def test_quantization_knobs_reach_the_graphs_and_manifest(tiny_models, tmp_path):
    import onnx

    # v1.1: an untied LM head, so "nothing kept" quantizes the head's own MatMul too
    hf = tiny_models["v1_1"]["hf"]
    out = tmp_path / "lean"
    argv = [str(hf), "-o", str(out), "--assistant", "none", "--dtype", "int8"]
    assert export_cli([*argv, "--block-size", "32", "--keep-fp32", "none", "-q"]) == 0
    m = json.loads((out / "stairs.json").read_text())
    assert m["quantization"]["block_size"] == 32 and m["quantization"]["keep"] == []
    assert m["quantization"]["bits"] == 8  # the rest of the int8 default stays
    for f in ONNX:
        graph = onnx.load(str(out / f)).graph
        weights = {i.name for i in graph.initializer}
        plain = [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]
        assert plain == [], (f, plain)  # nothing kept fp32
        blocks = {
            next(a.i for a in n.attribute if a.name == "block_size")
            for n in graph.node
            if n.op_type == "MatMulNBits"
        }
        assert blocks == {32}, (f, blocks)
    heads = export_model(
        str(hf), tmp_path / "head", assistant=None, dtype="int4", quantization={"keep": ["lm_head"]}
    )
    m = json.loads((heads.main / "stairs.json").read_text())
    assert m["quantization"]["keep"] == ["lm_head"] and m["quantization"]["block_size"] == 32
    graph = onnx.load(str(heads.main / DECODER_FILE)).graph
    weights = {i.name for i in graph.initializer}
    kept = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    assert len(kept) == 1, kept
    assert "lm_head" in kept[0].name or kept[0].output[0] == "logits", kept[0]
    # the engine runs it, exact per row: a prompt alone and beside another give the same tokens
    from engine import Engine

    eng = Engine.load(heads.main)
    prompts = [[5, 9, 23, 1], [7, 300, 41, 8, 2, 1]]
    alone = [eng.generate(p, max_new_tokens=6).token_ids for p in prompts]
    assert [r.token_ids for r in eng.generate_batch(prompts, max_new_tokens=6)] == alone


def test_quantized_main_loads_in_the_engine(tiny_models, tmp_path):
    from engine import Engine

    hf = tiny_models["v1_1"]["hf"]
    res = export_model(
        str(hf), tmp_path / "onnx" / "main", assistant=str(hf), dtype="int8", quiet=True
    )
    eng = Engine.load(res.main, assistant=res.assistant)
    prompt = [int(t) for t in np.random.default_rng(4).integers(3, 8000, 20)] + [1]
    ref = eng.generate(prompt, max_new_tokens=12).token_ids
    assert 1 <= len(ref) <= 12
    out = eng.generate(prompt, strategy="assisted", max_new_tokens=12, draft_tokens=3)
    assert out.token_ids == ref


def test_registry_resolves_known_pairs():
    from models import lookup

    assert lookup("t5-3b")["assistant"] == "t5-small"
    assert lookup("google/flan-t5-xl")["assistant"] == "flan-t5-small"
    assert lookup("nothing") is None


def test_shared_models_exist_for_export_tests():
    if not PYCODE_MAIN.is_dir():
        pytest.skip("../shared absent")
    # a pair: one tokenizer, the same vocabulary and special ids (Engine.load's pair check)
    spiece = [(d / "spiece.model").read_bytes() for d in (PYCODE_MAIN, PYCODE_DRAFT)]
    assert spiece[0] and spiece[0] == spiece[1]
    main, draft = (json.loads((d / "config.json").read_text()) for d in (PYCODE_MAIN, PYCODE_DRAFT))
    for key in ("vocab_size", "pad_token_id", "eos_token_id", "decoder_start_token_id"):
        assert main.get(key) == draft.get(key), key


def test_int8_assistant_keeps_output_exact(tmp_path):
    from engine import Engine

    main = make_tiny_t5(tmp_path / "hf-main", "v1_1", seed=5)
    # no assistant_dtype: an assistant is int8 by default, whatever the main's dtype
    res = export_model(str(main), tmp_path / "onnx" / "main", assistant=str(main), quiet=True)
    m = json.loads((res.assistant / "stairs.json").read_text())
    assert m["dtype"] == "int8" and m["validation"]["int8"]["max_abs_diff"]
    assert m["quantization"]["method"] == "weight_only" and m["quantization"]["bits"] == 8
    assert max(m["validation"]["max_abs_diff"].values()) < 1e-3  # fp32 graph validated first
    import onnx

    for f in ("decoder_masked_model.onnx", "cross_kv_model.onnx"):
        assert f in m["validation"]["max_abs_diff"]
        assert 0 < m["validation"]["int8"]["max_abs_diff"][f] < np.inf  # really quantized
        ops = {n.op_type for n in onnx.load(str(res.assistant / f)).graph.node}
        assert "MatMulNBits" in ops
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


def _graph_digest(folder) -> dict:
    """sha256 of each graph (its export id taken out of the metadata) and data file."""
    import onnx

    out = {}
    for name in ONNX:
        proto = onnx.load(str(folder / name), load_external_data=False)
        keep = [p for p in proto.metadata_props if p.key != "stairs.export_id"]
        del proto.metadata_props[:]
        proto.metadata_props.extend(keep)
        out[name] = hashlib.sha256(proto.SerializeToString()).hexdigest()
    for data in sorted(folder.glob("*_data")):
        out[data.name] = hashlib.sha256(data.read_bytes()).hexdigest()
    return out


@pytest.mark.parametrize("variant", ["v1_0", "v1_1"])
def test_streamed_export_equals_the_traced_one(tmp_path, variant, monkeypatch):
    """A safetensors checkpoint (here bf16, in shards) is traced hollow and its weights streamed
    in (export.stream); a .bin checkpoint of the same model through the real model's trace: the
    same graphs byte for byte (export id aside), inline and as external data, and the same
    float32 config."""
    import torch
    from transformers import T5ForConditionalGeneration

    from export import graphs

    tiny = make_tiny_t5(tmp_path / "tiny", variant, seed=3)
    model = T5ForConditionalGeneration.from_pretrained(tiny).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "st", max_shard_size="200KB")
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    for src in ("st", "bin"):
        (tmp_path / src / "spiece.model").write_bytes((tiny / "spiece.model").read_bytes())
    assert (tmp_path / "st" / "model.safetensors.index.json").is_file()
    assert not list((tmp_path / "bin").glob("*.safetensors*"))
    for external in (False, True):
        if external:  # every graph's weights in a data file, as a big model's are
            monkeypatch.setattr(graphs, "EXTERNAL_BYTES", 1000)
        out = {}
        for src in ("st", "bin"):
            out[src] = tmp_path / f"out-{src}-{external}"
            export_model(str(tmp_path / src), out[src], assistant=None, quiet=True)
        a, b = _graph_digest(out["st"]), _graph_digest(out["bin"])
        assert a == b
        assert bool([k for k in a if k.endswith("_data")]) == external
        configs = [json.loads((out[k] / "config.json").read_text()) for k in ("st", "bin")]
        assert configs[0] == configs[1] and configs[0]["dtype"] == "float32"


def test_streamed_export_names_a_missing_tensor(tmp_path):
    """from_pretrained would fill a missing weight with random numbers and refuses integers; the
    streamed load refuses both, naming the tensor. A stale shard index beside model.safetensors
    is ignored, as from_pretrained ignores it."""
    import torch
    from safetensors.torch import load_file, save_file

    src = make_tiny_t5(tmp_path / "m", "v1_1", seed=1)
    (src / "model.safetensors.index.json").write_text('{"weight_map": {"x": "gone.safetensors"}}')
    export_model(str(src), tmp_path / "ok", assistant=None, quiet=True)
    tensors = load_file(src / "model.safetensors")
    head = tensors.pop("lm_head.weight")
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="no weights for lm_head.weight"):
        export_model(str(src), tmp_path / "x", assistant=None, quiet=True)
    tensors["lm_head.weight"] = head.to(torch.int8)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lm_head.weight is I8 .*needs floats"):
        export_model(str(src), tmp_path / "x", assistant=None, quiet=True)
    assert not (tmp_path / "x").exists()


def test_export_refuses_when_memory_is_clearly_short(tmp_path, monkeypatch, capsys):
    """Before any model loads, an export the machine clearly cannot hold is refused in one line
    naming the need (CLI exit 2); --no-memory-check exports anyway; the summary names the
    peak."""
    import torch
    from transformers import T5ForConditionalGeneration

    import export.core
    from export import MemoryNeedError
    from export import memory as mem

    src = make_tiny_t5(tmp_path / "m", "v1_0", seed=1)
    model = T5ForConditionalGeneration.from_pretrained(src, dtype=torch.float32)
    assert mem.float32_bytes(src) == 4 * sum(p.numel() for p in model.parameters())
    peak, weights = mem.need(src, streamed=True)
    assert weights == mem.float32_bytes(src)
    cross_kv = ("EncDecAttention.k.", "EncDecAttention.v.")
    decoder = [  # the masked decoder graph's weights: the largest a streamed export holds
        p
        for n, p in model.named_parameters()
        if not n.startswith("encoder.") and not any(c in n for c in cross_kv)
    ]
    assert peak == 4 * sum(p.numel() for p in decoder) + mem.BASE_BYTES
    assert mem.need(src, streamed=False)[0] > peak
    monkeypatch.setattr(mem, "available_memory", lambda: int(0.8 * peak))

    def no_load(_):
        raise AssertionError("a model was loaded before the memory check")

    with monkeypatch.context() as m:
        m.setattr(export.core, "load_torch_model", no_load)
        with pytest.raises(MemoryNeedError, match=r"needs about .* GiB of memory \(m: "):
            export_model(str(src), tmp_path / "x", assistant=None, quiet=True)
        assert export_cli([str(src), "-o", str(tmp_path / "x"), "--assistant", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--no-memory-check" in err[0], err
    assert not (tmp_path / "x").exists()
    args = [str(src), "-o", str(tmp_path / "x"), "--assistant", "none", "--no-memory-check", "-q"]
    assert export_cli(args) == 0
    assert ", peak memory " in capsys.readouterr().out
    monkeypatch.setattr(mem, "available_memory", lambda: int(0.95 * peak))  # close: not refused
    export_model(str(src), tmp_path / "y", assistant=None, quiet=True)


def _same(a, b) -> bool:
    """Nested dicts/lists of arrays and plain values equal bit for bit."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    return a == b


@pytest.mark.parametrize("variant", ["v1_0", "v1_1"])
def test_streamed_references_equal_the_loaded_models(tmp_path, variant):
    """The references a streamed export validates against come from a T5 whose modules read
    their weights from the checkpoint as they run (export.stream.reference_model): bit for bit
    the loaded model's, and afterwards it holds no weight."""
    import torch

    from export import masked, stream, validate

    src = make_tiny_t5(tmp_path / "m", variant, seed=5)
    ckpt = stream.Checkpoint.find(src)
    loaded = stream.load_model(src, ckpt).eval()
    streamed = stream.reference_model(src, ckpt).eval()
    ids = [5, 9, 17, 33, 8, 1]
    for fn in (lambda m: validate.torch_reference(m, ids), masked.masked_reference):
        assert _same(fn(loaded), fn(streamed))
    assert all(p.device == torch.device("meta") for p in streamed.parameters())
    assert streamed.config.to_dict() == loaded.config.to_dict()


def _ort_quantized(path, how):
    """What onnxruntime's MatMulNBitsQuantizer.process makes of path, the whole graph loaded."""
    import onnx

    from export import quantize

    mnq = quantize._quiet_quantizer()
    model = onnx.load(str(path))
    q = mnq.MatMulNBitsQuantizer(
        model,
        bits=how["bits"],
        block_size=how["block_size"],
        is_symmetric=how["symmetric"],
        accuracy_level=how["accuracy_level"],
        nodes_to_exclude=quantize._kept_nodes(model.graph, how["keep"]),
        op_types_to_quantize=("MatMul",),
    )
    q.process()
    return q.model.model


@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("external", [False, True])
def test_streamed_quantizer_equals_onnxruntimes(tmp_path, monkeypatch, dtype, external):
    """export.quantize packs one weight at a time from the data file; the graph is the one
    onnxruntime's quantizer makes with every weight loaded: the same nodes, and the same
    initializers in the same order, value for value (inline, or in one data file)."""
    import shutil

    import onnx
    from onnx import numpy_helper

    from export import graphs, quantize

    if external:
        monkeypatch.setattr(graphs, "EXTERNAL_BYTES", 1000)
        monkeypatch.setattr(quantize, "EXTERNAL_BYTES", 1000)
    src = make_tiny_t5(tmp_path / "m", "v1_0", seed=2)
    out = export_model(str(src), tmp_path / "fp32", assistant=None, quiet=True).main
    how = quantize.settings(dtype, False)
    for name in ONNX:
        shutil.copytree(out, tmp_path / "q", dirs_exist_ok=True)
        want = _ort_quantized(tmp_path / "q" / name, how)
        n = quantize.quantize_file(tmp_path / "q" / name, how)
        got = onnx.load(str(tmp_path / "q" / name))
        assert n == sum(x.op_type == "MatMulNBits" for x in want.graph.node) > 0
        assert [x.SerializeToString() for x in got.graph.node] == [
            x.SerializeToString() for x in want.graph.node
        ]
        assert [t.name for t in got.graph.initializer] == [t.name for t in want.graph.initializer]
        for a, b in zip(got.graph.initializer, want.graph.initializer):
            assert _same(numpy_helper.to_array(a), numpy_helper.to_array(b)), a.name
        assert list(got.opset_import) == list(want.opset_import)
        data = [p.name for p in (tmp_path / "q").iterdir() if p.name.startswith(name + "_")]
        assert data == ([name + "_data"] if external else [])


def _constant_in_data_file(path, rng) -> None:
    """A MatMul + Add graph at path whose data file holds the weight and a Constant node's
    value (as optimum saves with convert_attribute)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w")
    c = numpy_helper.from_array(rng.standard_normal((1, 32)).astype(np.float32), "c")
    nodes = [
        helper.make_node("Constant", [], ["c"], value=c),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
        helper.make_node("Add", ["y", "c"], ["out"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 32])
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [out], [w]))
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        location="m.onnx_data",
        size_threshold=100,
        convert_attribute=True,
    )
    assert onnx.load(str(path), load_external_data=False).graph.node[0].attribute[0].t.external_data


def test_streamed_quantizer_carries_constants_and_restores_on_failure(tmp_path, monkeypatch):
    """A graph whose data file holds a Constant node's value too (optimum saves with
    convert_attribute): that value is carried into the new data file, and the graph computes
    what onnxruntime's quantizer's graph computes. A failure midway leaves the graph and its
    data file as they were."""
    import onnx
    import onnxruntime as ort

    from export import quantize

    rng = np.random.default_rng(0)
    path = tmp_path / "m.onnx"
    _constant_in_data_file(path, rng)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    how = quantize.settings("int8", False, {"keep": []})

    def boom(*a):
        raise RuntimeError("disk gone")

    replace = quantize.os.replace

    def staged_boom(src, dst):  # the new graph is written; its rename into place fails
        if str(src).endswith(".new"):
            boom()
        replace(src, dst)

    for where, name, fail in (
        (quantize._Spill, "finish", boom),
        (quantize.os, "replace", staged_boom),
    ):
        with monkeypatch.context() as m:
            m.setattr(where, name, fail)
            with pytest.raises(RuntimeError, match="disk gone"):
                quantize.quantize_file(path, how)
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before, name
    want = _ort_quantized(path, how)
    monkeypatch.setattr(quantize, "EXTERNAL_BYTES", 100)  # the result keeps a data file
    assert quantize.quantize_file(path, how) == 1
    feed = {"x": rng.standard_normal((2, 64)).astype(np.float32)}
    got = ort.InferenceSession(str(path)).run(None, feed)[0]
    ref = ort.InferenceSession(want.SerializeToString()).run(None, feed)[0]
    assert got.tobytes() == ref.tobytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx_data"]
    assert onnx.load(str(path), load_external_data=False).graph.node[0].attribute[0].t.external_data
