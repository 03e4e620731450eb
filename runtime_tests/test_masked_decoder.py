"""The masked, positioned decoder graph and the cross key/value graph (export/masked.py) against
Hugging Face: ragged rows, holes, tree branches and an empty past, and greedy decoding."""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import PYCODE_MAIN, make_tiny_t5, need_shared
from transformers import T5ForConditionalGeneration

from export.errors import OptionError, ValidationError
from export.masked import (
    CROSS_FILE,
    DECODER_FILE,
    export_masked_decoder,
    validate_masked_decoder,
)

CASES = {
    "cross_kv",
    "a: ragged rows",
    "b: masked holes",
    "c: tree branches",
    "d: first step, no past",
}


def _load(folder) -> T5ForConditionalGeneration:
    return T5ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=["v1_0", "v1_1"])
def tiny(request, tmp_path_factory):
    """(HF model, folder holding its two masked graphs) for one variant."""
    base = tmp_path_factory.mktemp(f"masked-{request.param}")
    model = _load(make_tiny_t5(base / "hf", request.param, seed=1))
    files = export_masked_decoder(model, base / "onnx")
    assert files == [DECODER_FILE, CROSS_FILE]
    return model, base / "onnx"


def _greedy(model, folder, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Greedy tokens of several prompts decoded together with the masked graph: cross key/values
    once, then one token per row per call, each present appended to the past."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    dec = ort.InferenceSession(str(folder / DECODER_FILE), opts, providers=["CPUExecutionProvider"])
    cross = ort.InferenceSession(str(folder / CROSS_FILE), opts, providers=["CPUExecutionProvider"])
    b, s = len(prompts), max(len(p) for p in prompts)
    ids = np.zeros((b, s), np.int64)
    enc_mask = np.zeros((b, s), np.int64)
    for r, p in enumerate(prompts):  # right-padded prompts of different lengths
        ids[r, : len(p)], enc_mask[r, : len(p)] = p, 1
    with torch.no_grad():
        enc = model.encoder(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(enc_mask)
        ).last_hidden_state.numpy()
    cross_names = [o.name for o in cross.get_outputs()]
    feed = dict(zip(cross_names, cross.run(None, {"encoder_hidden_states": enc})))
    feed["encoder_attention_mask"] = enc_mask
    past_names = [i.name for i in dec.get_inputs() if i.name.startswith("past_key_values.")]
    cfg = model.config
    # one buffer: slot `step` is the new token's, written by the graph before it attends
    buf = {n: np.zeros((b, cfg.num_heads, steps, cfg.d_kv), np.float32) for n in past_names}
    out = [[cfg.decoder_start_token_id] for _ in range(b)]
    for step in range(steps):
        feed["input_ids"] = np.array([[row[-1]] for row in out], np.int64)
        feed["positions"] = np.full((b, 1), step, np.int64)
        feed["new_slots"] = feed["positions"]
        feed["past_positions"] = np.tile(np.arange(step + 1), (b, 1))
        feed["attention_mask"] = np.ones((b, 1, step + 1), np.int64)
        feed.update((n, a[:, :, : step + 1]) for n, a in buf.items())
        logits, *presents = dec.run(None, feed)
        assert np.isfinite(logits).all()
        for r, tok in enumerate(logits[:, -1].argmax(-1)):
            out[r].append(int(tok))
        for n, new in zip(past_names, presents):
            buf[n][:, :, step] = new[:, :, 0]
    return out


def _check_greedy(model, folder, prompts, steps=20):
    ours = _greedy(model, folder, prompts, steps)
    for p, row in zip(prompts, ours):
        with torch.no_grad():
            ref = model.generate(
                input_ids=torch.tensor([p]), do_sample=False, num_beams=1, max_new_tokens=steps
            )[0].tolist()
        # HF stops at EOS; the loop above does not.
        assert row[: len(ref)] == ref
        assert len(ref) == steps + 1 or ref[-1] == model.config.eos_token_id


def test_masked_decoder_matches_hf(tiny):
    model, folder = tiny
    report = validate_masked_decoder(model, folder, tol=1e-4)
    assert set(report) == CASES
    assert all(d < 1e-4 for d in report.values()), report
    sess = ort.InferenceSession(str(folder / DECODER_FILE), providers=["CPUExecutionProvider"])
    layers = model.config.num_decoder_layers
    names = [i.name for i in sess.get_inputs()]
    assert names[:5] == ["input_ids", "positions", "past_positions", "attention_mask", "new_slots"]
    assert names[-1] == "encoder_attention_mask"
    assert len(names) == 6 + 4 * layers
    outs = [o.name for o in sess.get_outputs()]
    # logits, the new tokens' key/values, then each whole buffer after their writes
    assert outs[0] == "logits" and outs[2 * layers] == f"present.{layers - 1}.decoder.value"
    assert outs[2 * layers + 1 :] == [
        f"kv_cache.{i}.decoder.{kv}" for i in range(layers) for kv in ("key", "value")
    ]


def test_greedy_matches_hf_generate(tiny):
    model, folder = tiny
    rng = np.random.default_rng(5)
    prompts = [[int(t) for t in rng.integers(3, 500, n)] + [1] for n in (9, 4, 14)]
    _check_greedy(model, folder, prompts)


def test_validation_catches_another_models_graph(tiny, tmp_path):
    model, folder = tiny
    variant = "v1_0" if model.config.tie_word_embeddings else "v1_1"
    other = _load(make_tiny_t5(tmp_path / "other", variant, seed=7))
    with pytest.raises(ValidationError, match="cross_kv_model.onnx"):
        validate_masked_decoder(other, folder)


def test_bad_opset_writes_nothing(tiny, tmp_path):
    model, _ = tiny
    with pytest.raises(OptionError, match="opset"):
        export_masked_decoder(model, tmp_path / "out", opset=9)
    folder = make_tiny_t5(tmp_path / "hf", "v1_1", seed=3, layers=1)
    bf16 = T5ForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16)
    with pytest.raises(OptionError, match="float32"):
        export_masked_decoder(bf16, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pycode_main_exports_validates_and_decodes(tmp_path, pycode_prompts):
    need_shared()
    model = _load(PYCODE_MAIN)
    export_masked_decoder(model, tmp_path)
    report = validate_masked_decoder(model, tmp_path)
    assert set(report) == CASES
    _check_greedy(model, tmp_path, pycode_prompts[:2])


def test_external_data_is_packed_into_one_file(tmp_path):
    """Above 2 GB torch writes one file per tensor beside the graph; save_exported packs them into
    `<name>_data` (checked here on a small graph saved the same way)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from export.graphs import save_exported

    # 40 x 40 weights: above onnx's 1 KB threshold for external tensors.
    w1, w2 = np.eye(40, dtype=np.float32) * 2, np.eye(40, dtype=np.float32) * 3
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("MatMul", ["h", "w2"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 40])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 40])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    tmp, out = tmp_path / "tmp", tmp_path / "out"
    tmp.mkdir(), out.mkdir()
    onnx.save_model(
        proto,
        str(tmp / "g.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=False,
        size_threshold=0,
    )
    assert len(list(tmp.iterdir())) == 3
    assert save_exported(tmp, "g.onnx", out) == ["g.onnx", "g.onnx_data"]
    assert sorted(p.name for p in out.iterdir()) == ["g.onnx", "g.onnx_data"]
    sess = ort.InferenceSession(str(out / "g.onnx"), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": np.ones((1, 40), np.float32)})[0]
    assert np.allclose(y, 6.0)
    # the files follow the umask (onnx writes external data 0600)
    mask = os.umask(0)
    os.umask(mask)
    assert {(p.stat().st_mode & 0o777) for p in out.iterdir()} == {0o666 & ~mask}


def test_big_graphs_are_written_with_external_data(tmp_path, monkeypatch):
    """Above EXTERNAL_BYTES a graph's weights go to one data file (held once while ORT loads)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from export import graphs

    w = np.eye(40, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 40])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 40])],
        [numpy_helper.from_array(w, "w")],
    )
    tmp, out = tmp_path / "tmp", tmp_path / "out"
    tmp.mkdir(), out.mkdir()
    onnx.save_model(helper.make_model(graph), str(tmp / "g.onnx"))  # weights inside
    monkeypatch.setattr(graphs, "EXTERNAL_BYTES", 1000)
    assert graphs.save_exported(tmp, "g.onnx", out) == ["g.onnx", "g.onnx_data"]
    assert (out / "g.onnx").stat().st_size < 1000 < (out / "g.onnx_data").stat().st_size
