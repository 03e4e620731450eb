"""Damaged, tampered or escaping model folders fail as ModelFileError naming the file."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from engine import Engine, ModelFileError
from engine.cli import verify_main
from engine.model import T5Model
from engine.scheduler import DEFAULT_AUTO_K
from engine.verify import sha256_file


@pytest.fixture
def folder(tiny_models, tmp_path) -> Path:
    """A private copy of the tiny exported v1.1 main folder, free to damage."""
    dst = tmp_path / "model"
    shutil.copytree(tiny_models["v1_1"]["main"], dst)
    return dst


def restamp(folder: Path, name: str) -> None:
    """Record the file's current size and hash in stairs.json, as if exported that way."""
    path = folder / "stairs.json"
    m = json.loads(path.read_text())
    m["files"][name] = {
        "sha256": sha256_file(folder / name),
        "bytes": (folder / name).stat().st_size,
    }
    path.write_text(json.dumps(m))


def edit_manifest(folder: Path, change) -> None:
    path = folder / "stairs.json"
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m))


def identity_model() -> bytes:
    """A valid ONNX model that has nothing to do with T5: y = x."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    return helper.make_model(graph).SerializeToString()


def deep(n: int = 10_000) -> bytes:
    return b"[" * n + b"]" * n


BINARY = bytes(range(256)) * 4
CONFIG_KEYS = "vocab_size|pad_token_id|eos_token_id|num_heads|d_kv|num_layers|d_model"


def _config(folder: Path, **changes) -> bytes:
    c = json.loads((folder / "config.json").read_text())
    c.update(changes)
    return json.dumps(c).encode()


def _files_list(folder: Path) -> bytes:
    m = json.loads((folder / "stairs.json").read_text())
    m["files"] = sorted(m["files"])
    return json.dumps(m).encode()


def _no_bytes(folder: Path) -> bytes:
    m = json.loads((folder / "stairs.json").read_text())
    del m["files"]["encoder_model.onnx"]["bytes"]
    return json.dumps(m).encode()


# (file, new content from the folder, expected message after the file name)
DAMAGE = {
    "config-binary": ("config.json", lambda f: BINARY, "not UTF-8"),
    "config-empty": ("config.json", lambda f: b"{}", f"({CONFIG_KEYS}) missing"),
    "config-list": ("config.json", lambda f: b"[1, 2]", "expected a JSON object, found array"),
    "config-deep": ("config.json", lambda f: deep(), "nested too deeply"),
    "config-not-json": ("config.json", lambda f: b'{"vocab_size": ', "not valid JSON"),
    "config-vocab-str": (
        "config.json",
        lambda f: _config(f, vocab_size="8192"),
        "vocab_size '8192' is not an integer",
    ),
    "config-heads-bool": (
        "config.json",
        lambda f: _config(f, num_heads=True),
        "num_heads True is not an integer",
    ),
    "config-eos-range": (
        "config.json",
        lambda f: _config(f, eos_token_id=10**6),
        "eos_token_id 1000000 is not below vocab_size",
    ),
    "stairs-binary": ("stairs.json", lambda f: BINARY, "not UTF-8"),
    "stairs-files-list": ("stairs.json", _files_list, "'files' must be an object"),
    "stairs-no-bytes": ("stairs.json", _no_bytes, "'encoder_model.onnx' has no valid 'bytes'"),
    "stairs-list": ("stairs.json", lambda f: b"[]", "expected a JSON object"),
    "tokcfg-list": ("tokenizer_config.json", lambda f: b"[]", "expected a JSON object"),
    "tokcfg-binary": ("tokenizer_config.json", lambda f: BINARY, "not UTF-8"),
    "tokcfg-deep": ("tokenizer_config.json", lambda f: deep(), "nested too deeply"),
    "decoder-unrelated": (
        "decoder_masked_model.onnx",
        lambda f: identity_model(),
        r"not this engine's masked decoder for 2 layers \(inputs or outputs differ\)",
    ),
    "cross-unrelated": (
        "cross_kv_model.onnx",
        lambda f: identity_model(),
        "not this engine's cross key/value graph for 2 layers",
    ),
    "encoder-unrelated": (
        "encoder_model.onnx",
        lambda f: identity_model(),
        (
            r"not this engine's T5 encoder; inputs x \(want input_ids, attention_mask\);"
            " missing first output last_hidden_state"
        ),
    ),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_file_is_a_model_file_error(folder, case):
    name, content, message = DAMAGE[case]
    (folder / name).write_bytes(content(folder))
    if name != "stairs.json":
        restamp(folder, name)  # the manifest agrees: the content itself must be refused
    with pytest.raises(ModelFileError) as err:
        T5Model(folder)
    text = str(err.value)
    assert str(folder / name) in text
    assert __import__("re").search(message, text), text


def test_other_models_decoder_is_refused(folder, tiny_models):
    """A real masked decoder, but of the 1-layer assistant: the layer count does not match."""
    name = "decoder_masked_model.onnx"
    shutil.copy(tiny_models["v1_1"]["random"] / name, folder / name)
    restamp(folder, name)
    with pytest.raises(ModelFileError, match=f"{name}: not this engine's masked decoder for 2"):
        T5Model(folder)


def test_decoder_replaced_without_manifest_is_caught_by_size(folder):
    (folder / "decoder_masked_model.onnx").write_bytes(identity_model())
    with pytest.raises(ModelFileError, match="decoder_masked_model.onnx: .* bytes, manifest"):
        T5Model(folder)


def test_missing_path_file_and_optimum_folder_say_what_they_are(folder, tmp_path):
    """One clear line each: no such folder, a file, and an optimum export without stairs'
    masked decoder (it names the stairs-export command that makes a full folder)."""
    with pytest.raises(ModelFileError, match=r"nope: no such folder$"):
        Engine.load(tmp_path / "nope")
    with pytest.raises(ModelFileError, match="config.json: not a folder"):
        Engine.load(folder / "config.json")
    (folder / "decoder_masked_model.onnx").unlink()
    (folder / "decoder_with_past_model.onnx").write_bytes(identity_model())
    with pytest.raises(ModelFileError) as err:
        T5Model(folder)
    assert "an optimum export without stairs' masked decoder graph" in str(err.value)
    assert f"stairs-export SOURCE_CHECKPOINT -o {folder}" in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_model_max_length_falls_back_to_default(folder, caplog):
    path = folder / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["model_max_length"] = True
    path.write_text(json.dumps(cfg))
    restamp(folder, path.name)
    with caplog.at_level(logging.WARNING, logger="stairs"):
        eng = Engine.load(folder)
    assert eng.main.tokenizer.max_input_tokens == 512
    assert "model_max_length True is not a positive integer" in caplog.text
    assert eng.generate("def f(x):" * 20, max_new_tokens=2).token_ids  # not "over True"


TUNE_ENTRIES = {
    "no-options": {"strategy": "assisted"},
    "strategy-list": {"strategy": ["assisted"], "options": {}},
    "bad-option": {"strategy": "assisted", "options": {"draft_tokens": "many"}},
    "bad-threads": {"strategy": "assisted", "options": {}, "assistant_threads": True},
    "not-object": [1, 2],
}


@pytest.mark.parametrize("entry", [None, *TUNE_ENTRIES])
def test_corrupt_tune_file_is_ignored_with_warning(folder, tiny_models, caplog, entry):
    """stairs-tune.json is a cache: damage is logged and auto falls back to its default."""
    assistant = tiny_models["v1_1"]["random"]
    path = folder / "stairs-tune.json"
    if entry is None:
        path.write_bytes(BINARY)
        warning = "stairs-tune.json: not UTF-8"
    else:
        key = f"{assistant.resolve().name}|cpu|None"
        path.write_text(json.dumps({key: TUNE_ENTRIES[entry]}))
        warning = "ignoring damaged entry"
    with caplog.at_level(logging.WARNING, logger="stairs"):
        eng = Engine.load(folder, assistant=assistant)
        assert eng.auto_table() == DEFAULT_AUTO_K["fp32"]  # the untuned default
    assert eng.assistant.threads is None
    assert warning in caplog.text


def test_tune_file_outside_is_not_read(folder, tiny_models, secret, caplog):
    key = f"{tiny_models['v1_1']['random'].resolve().name}|cpu|None"
    secret.write_text(json.dumps({key: {"strategy": "lookup", "options": {}}}))
    os.symlink(secret, folder / "stairs-tune.json")
    with caplog.at_level(logging.WARNING, logger="stairs"):
        eng = Engine.load(folder, assistant=tiny_models["v1_1"]["random"])
        assert eng.auto_table() == DEFAULT_AUTO_K["fp32"]
    assert "resolves outside the model folder" in caplog.text


def _flip_initializer_bytes(path: Path) -> None:
    """Change one initializer's data in place: the file keeps its size and stays valid ONNX."""
    data = bytearray(path.read_bytes())
    model = onnx.load_model_from_string(bytes(data))
    for init in model.graph.initializer:
        raw = init.raw_data
        if len(raw) >= 256 and data.count(raw) == 1:
            at = data.find(raw)
            arr = numpy_helper.to_array(init)
            new = np.random.default_rng(0).standard_normal(arr.shape).astype(arr.dtype).tobytes()
            data[at : at + len(raw)] = new
            path.write_bytes(bytes(data))
            return
    raise AssertionError("no initializer found to tamper with")


def test_same_size_tampering_is_caught(folder, monkeypatch):
    enc = folder / "encoder_model.onnx"
    size = enc.stat().st_size
    _flip_initializer_bytes(enc)
    assert enc.stat().st_size == size
    with pytest.raises(ModelFileError, match="encoder_model.onnx: sha256 differs"):
        T5Model(folder)
    assert T5Model(folder, verify=False).sessions  # the opt-out loads it
    monkeypatch.setenv("STAIRS_VERIFY", "0")
    assert Engine.load(folder).main.sessions
    monkeypatch.setenv("STAIRS_VERIFY", "1")
    with pytest.raises(ModelFileError, match="encoder_model.onnx"):
        Engine.load(folder)


def test_stairs_verify_exit_codes(folder, tmp_path, capsys):
    assert verify_main([str(folder)]) == 0
    out = capsys.readouterr().out
    assert "OK       encoder_model.onnx" in out and "MISMATCH" not in out
    _flip_initializer_bytes(folder / "encoder_model.onnx")
    (folder / "spiece.model").unlink()
    assert verify_main([str(folder)]) == 2
    out = capsys.readouterr().out
    assert "MISMATCH encoder_model.onnx: sha256 differs" in out
    assert "MISMATCH spiece.model: missing" in out
    assert "OK       decoder_masked_model.onnx" in out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert verify_main([str(empty)]) == 2
    assert "no stairs.json" in capsys.readouterr().err


@pytest.fixture
def secret(tmp_path) -> Path:
    """A file outside the model folder whose size must never be told."""
    path = tmp_path / "outside" / "secret"
    path.parent.mkdir()
    path.write_bytes(b"s" * 631)
    return path


@pytest.mark.parametrize("name", ["encoder_model.onnx", "config.json", "tokenizer_config.json"])
def test_symlink_outside_is_refused(folder, secret, name):
    (folder / name).unlink()
    os.symlink(secret, folder / name)
    with pytest.raises(ModelFileError, match="resolves outside the model folder") as err:
        T5Model(folder)
    assert "631" not in str(err.value) and str(secret) not in str(err.value)


@pytest.mark.parametrize("entry", ["../outside/secret", "{secret}", "link"])
def test_manifest_entry_outside_is_refused(folder, secret, entry):
    os.symlink(secret, folder / "link")
    entry = entry.format(secret=secret)
    edit_manifest(folder, lambda m: m["files"].update({entry: {"sha256": "0" * 64, "bytes": 1}}))
    with pytest.raises(
        ModelFileError, match="outside the model folder|leaves the model folder"
    ) as err:
        T5Model(folder)
    assert "631" not in str(err.value)
    assert verify_main([str(folder)]) == 2


def test_external_data_outside_is_refused_by_onnxruntime(folder, tmp_path):
    """ORT itself refuses an external-data location that leaves the model's folder."""
    x = helper.make_tensor_value_info("input_ids", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [4])
    w = numpy_helper.from_array(np.arange(4, dtype=np.float32), "w")
    (tmp_path / "x.onnx_data").write_bytes(w.raw_data)
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in {"location": "../x.onnx_data", "offset": "0", "length": "16"}.items():
        w.external_data.add(key=k, value=v)
    graph = helper.make_graph(
        [helper.make_node("Add", ["input_ids", "w"], ["last_hidden_state"])], "g", [x], [y], [w]
    )
    (folder / "encoder_model.onnx").write_bytes(helper.make_model(graph).SerializeToString())
    restamp(folder, "encoder_model.onnx")
    with pytest.raises(ModelFileError, match="encoder_model.onnx: cannot load"):
        T5Model(folder)


def test_missing_listed_file_and_intact_folder(folder):
    eng = Engine.load(folder)  # the intact copy loads, hashes checked
    assert eng.main.manifest["files"]["encoder_model.onnx"]["bytes"] > 0
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelFileError, match="tokenizer.json: missing"):
        T5Model(folder)


def test_calibrate_replaces_a_corrupt_tune_file(folder, tiny_models, caplog):
    (folder / "stairs-tune.json").write_bytes(BINARY)
    eng = Engine.load(folder, assistant=tiny_models["v1_1"]["random"])
    with caplog.at_level(logging.WARNING, logger="stairs"):
        res = eng.calibrate([[5, 6, 7, 1]], max_new_tokens=4)
    assert "stairs-tune.json: not UTF-8" in caplog.text
    stored = json.loads((folder / "stairs-tune.json").read_text())
    assert stored[res["key"]]["strategy"] == res["strategy"]
    fresh = Engine.load(folder, assistant=tiny_models["v1_1"]["random"])
    assert fresh.auto_table() == res["batch_auto_k"]


def test_manifest_entry_with_a_nul_byte_is_refused(folder, capsys):
    edit_manifest(folder, lambda m: m["files"].update({"a\0b": {"sha256": "0" * 64, "bytes": 1}}))
    with pytest.raises(ModelFileError, match=r"entry 'a\\x00b' contains a NUL byte"):
        T5Model(folder)
    assert verify_main([str(folder)]) == 2
    assert "NUL byte" in capsys.readouterr().err


GRAPH_FILES = ["encoder_model.onnx", "decoder_masked_model.onnx", "cross_kv_model.onnx"]


def _export_id(path: Path) -> str | None:
    meta = onnx.load(str(path), load_external_data=False).metadata_props
    return {p.key: p.value for p in meta}.get("stairs.export_id")


def _set_export_id(folder: Path, name: str, value: str | None) -> None:
    """Give one graph another export id (None: none, as exported before ids), manifest agreeing."""
    path = folder / name
    proto = onnx.load(str(path), load_external_data=False)
    kept = [p for p in proto.metadata_props if p.key != "stairs.export_id"]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    if value is not None:
        proto.metadata_props.add(key="stairs.export_id", value=value)
    onnx.save_model(proto, str(path))
    restamp(folder, name)


@pytest.fixture(scope="module")
def other_export(tiny_models, tmp_path_factory):
    """The tiny v1.1 main exported again: int4, and fp16 as its own assistant (same shapes)."""
    from export import export_model

    out = tmp_path_factory.mktemp("other") / "int4"
    hf = str(tiny_models["v1_1"]["hf"])
    return export_model(hf, out, assistant=hf, dtype="int4", assistant_dtype="fp16", quiet=True)


def test_every_graph_of_an_export_names_its_id(tiny_models, other_export, tmp_path):
    """fp32, int8, int4 and fp16 folders: each graph carries the id stairs.json records, one
    per folder; the weights cache's prepacked graph keeps it."""
    ids = []
    tiny = tiny_models["v1_1"]
    for folder in (tiny["main"], tiny["random"], other_export.main, other_export.assistant):
        ids.append(json.loads((folder / "stairs.json").read_text())["export_id"])
        assert {_export_id(folder / g) for g in GRAPH_FILES} == {ids[-1]}, folder
    assert len(set(ids)) == len(ids) == 4 and all(len(i) == 32 for i in ids)
    main = tiny_models["v1_1"]["main"]
    eng = Engine.load(main, weights_cache=tmp_path / "cache")
    for sess in eng.main.sessions.values():
        assert Path(sess._model_path).is_relative_to(tmp_path / "cache")
        assert sess.get_modelmeta().custom_metadata_map["stairs.export_id"] == ids[0]


@pytest.mark.parametrize(
    "source,name",
    [("main", "decoder_masked_model.onnx"), ("assistant", "encoder_model.onnx"),
     ("assistant", "cross_kv_model.onnx")],
)  # fmt: skip
def test_graph_of_another_export_is_refused(folder, other_export, source, name):
    """An int4 or fp16 graph of the same model copied with its manifest entry into the fp32
    folder: it would load and run; refused, naming the files and their export ids."""
    src = getattr(other_export, source)
    for path in src.glob(name + "*"):  # the graph and its data file, if any
        shutil.copy(path, folder / path.name)
        restamp(folder, path.name)
    ours = json.loads((folder / "stairs.json").read_text())["export_id"]
    theirs = _export_id(src / name)
    with pytest.raises(ModelFileError, match="files of different exports mixed") as err:
        Engine.load(folder, weights_cache=False)
    text = str(err.value)
    assert f"{name} {theirs}" in text and f"stairs.json {ours}" in text
    other = next(g for g in GRAPH_FILES if g != name)
    assert f"{other} {ours}" in text


def test_folder_exported_before_export_ids_loads(folder):
    """No id anywhere (exported before ids): loads. Some graphs with one, some without:
    refused. Every graph from another export, stairs.json not: refused too."""
    for name in GRAPH_FILES:
        _set_export_id(folder, name, None)
    edit_manifest(folder, lambda m: m.pop("export_id"))
    assert Engine.load(folder, weights_cache=False).generate([5, 6, 1], max_new_tokens=3)
    _set_export_id(folder, "cross_kv_model.onnx", "0" * 32)
    mixed = r"decoder_masked_model.onnx \(none\), cross_kv_model.onnx 0{32}"
    with pytest.raises(ModelFileError, match=mixed):
        T5Model(folder)
    for name in GRAPH_FILES:
        _set_export_id(folder, name, "1" * 32)
    edit_manifest(folder, lambda m: m.update(export_id="2" * 32))
    with pytest.raises(ModelFileError, match=f"stairs.json {'2' * 32}"):
        T5Model(folder)
