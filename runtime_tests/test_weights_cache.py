"""The weights cache (engine.weights): prepacked graphs written once and mapped by every later
load, remembered hashes, and the bad cases: a stale key, a damaged entry, a cache that cannot
be written, two builders at once, a model file changed after its hash was remembered."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import unshare_works

from engine import Engine, InputError, ModelFileError, weights
from engine import verify as checked

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("greedy", "assisted", "stairs", "lookup")


@pytest.fixture
def folder(tiny_models, tmp_path):
    """A private copy of the tiny v1.1 main (tests modify files) and its random assistant."""
    main = shutil.copytree(tiny_models["v1_1"]["main"], tmp_path / "main")
    return main, tiny_models["v1_1"]["random"]


def _tokens(eng, prompts, strategy="greedy"):
    return [eng.generate(p, max_new_tokens=12, strategy=strategy).token_ids for p in prompts]


def _entries(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "graphs").iterdir()) if (root / "graphs").is_dir() else []


def _mapped(eng) -> bool:
    """Every session of the main runs a graph from the cache."""
    root = eng.main.weights_cache.root.resolve()
    return all(
        Path(s._model_path).resolve().is_relative_to(root) for s in eng.main.sessions.values()
    )


def test_second_load_maps_the_prepacked_graphs_same_logits(pycode_pair, pycode_prompts, tmp_path):
    """First load builds one entry per graph, the second maps them: every strategy's tokens
    and the decoder's logits are the plain sessions' bits."""
    main, draft = pycode_pair
    cache = tmp_path / "cache"
    plain = Engine.load(main, assistant=draft, threads=2, weights_cache=False)
    first = Engine.load(main, assistant=draft, threads=2, weights_cache=cache)
    assert len(_entries(cache)) == 6 and _mapped(first)  # 3 graphs x main and assistant
    built = {p: p.stat().st_ino for p in (cache / "graphs").glob("*/entry.json")}
    second = Engine.load(main, assistant=draft, threads=2, weights_cache=cache)
    assert len(_entries(cache)) == 6 and _mapped(second)
    assert {p: p.stat().st_ino for p in (cache / "graphs").glob("*/entry.json")} == built
    prompts = pycode_prompts[:4]
    for s in STRATEGIES:
        assert _tokens(second, prompts, s) == _tokens(plain, prompts, s), s
    feed = _decoder_feed(plain, prompts[0])
    assert feed["input_ids"].shape[1] > 2
    a = plain.main.sessions["decoder"].run(["logits"], feed)[0]
    b = second.main.sessions["decoder"].run(["logits"], feed)[0]
    assert np.array_equal(a, b)


def _decoder_feed(eng, prompt) -> dict:
    """The feed of the widest decoder call a generation makes (captured at the call site, on
    the cache path that feeds every array by value rather than binding it)."""
    seen, run, full = [], eng.main.run, eng.main.has_full

    def capture(role, feed, counter=None):
        if role == "decoder":
            seen.append({k: np.array(v) for k, v in feed.items()})
        return run(role, feed, counter)

    eng.main.run, eng.main.has_full = capture, False
    try:
        eng.generate(prompt, max_new_tokens=12, strategy="assisted")
    finally:
        del eng.main.run
        eng.main.has_full = full
    return max(seen, key=lambda f: f["input_ids"].size)


def test_remembered_hashes_skip_the_reading(folder, tmp_path, monkeypatch):
    """A second load reads no file to hash it: sizes and stat keys only."""
    monkeypatch.setattr(weights, "RACY_S", 0.0)
    cache = tmp_path / "cache"
    Engine.load(folder[0], weights_cache=cache)
    calls = []
    real = checked.sha256_file
    monkeypatch.setattr(checked, "sha256_file", lambda p, *a: calls.append(p) or real(p, *a))
    Engine.load(folder[0], weights_cache=cache)
    assert calls == []
    Engine.load(folder[0], weights_cache=False)  # without the cache: every listed file hashed
    assert len(calls) >= 5


def test_model_file_modified_after_its_hash_was_remembered_is_refused(
    folder, tmp_path, monkeypatch
):
    """One byte changed in place, the size and mtime put back: ctime moved, so the file is
    hashed again and refused."""
    monkeypatch.setattr(weights, "RACY_S", 0.0)
    cache = tmp_path / "cache"
    Engine.load(folder[0], weights_cache=cache)
    path = folder[0] / "decoder_masked_model.onnx"
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        byte = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([byte[0] ^ 1]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ModelFileError, match="sha256 differs"):
        Engine.load(folder[0], weights_cache=cache)


def test_stale_key_builds_a_new_entry(folder, tmp_path, monkeypatch):
    """Another ORT version (or CPU) is another key: a new entry, the old one never mapped."""
    cache = tmp_path / "cache"
    prompts = [[5, 6, 7, 1], [9, 1]]
    want = _tokens(Engine.load(folder[0], weights_cache=False), prompts)
    Engine.load(folder[0], weights_cache=cache)
    before = _entries(cache)
    monkeypatch.setattr(weights.ort, "__version__", "99.0.0")
    eng = Engine.load(folder[0], weights_cache=cache)
    after = _entries(cache)
    assert len(after) == 2 * len(before) and set(before) < set(after) and _mapped(eng)
    assert _tokens(eng, prompts) == want
    # an entry whose entry.json names another key is not mapped either: rebuilt in place
    monkeypatch.undo()
    entry = cache / "graphs" / before[0]
    meta = json.loads((entry / "entry.json").read_text())
    meta["key"]["onnxruntime"] = "0.0.1"
    (entry / "entry.json").write_text(json.dumps(meta))
    eng = Engine.load(folder[0], weights_cache=cache)
    assert json.loads((entry / "entry.json").read_text())["key"]["onnxruntime"] != "0.0.1"
    assert _tokens(eng, prompts) == want and _entries(cache) == after


def _source(cache: Path, entry: str) -> Path:
    """The graph an entry was built from (entry.json's source: host:path)."""
    meta = json.loads((cache / "graphs" / entry / "entry.json").read_text())
    return Path(meta["source"].split(":", 1)[1])


def _reexport(graph: Path, note: str) -> None:
    """The same function under other bytes (a doc string), swapped in with its manifest entry
    as stairs-export does."""
    import hashlib

    import onnx

    model = onnx.load(str(graph))
    model.doc_string = note
    onnx.save(model, str(graph) + ".new")
    os.replace(str(graph) + ".new", graph)
    manifest = json.loads((graph.parent / "stairs.json").read_text())
    data = graph.read_bytes()
    manifest["files"][graph.name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (graph.parent / "stairs.json").write_text(json.dumps(manifest))


def test_reexported_graph_replaces_its_entry(folder, tmp_path, monkeypatch):
    """A graph exported again to the same path: its new entry replaces the old one (which no
    load would ask for again). The assistant's entries (same graph names, other folder), another
    ORT build's, and one being built (its lock held) stay."""
    monkeypatch.setattr(weights, "RACY_S", 0.0)
    cache, decoder = tmp_path / "cache", folder[0] / "decoder_masked_model.onnx"
    prompts = [[5, 6, 7, 1], [9, 1]]
    want = _tokens(Engine.load(folder[0], weights_cache=False), prompts)
    Engine.load(folder[0], assistant=folder[1], weights_cache=cache)
    first = _entries(cache)
    assert len(first) == 6  # three graphs each of main and assistant
    old_dec = [
        e
        for e in first
        if e.startswith("decoder_masked_model-") and _source(cache, e) == decoder.resolve()
    ]
    monkeypatch.setattr(weights.ort, "__version__", "99.0.0")  # another environment's entries
    Engine.load(folder[0], assistant=folder[1], weights_cache=cache)
    monkeypatch.undo()
    monkeypatch.setattr(weights, "RACY_S", 0.0)
    other_build = sorted(set(_entries(cache)) - set(first))
    assert len(old_dec) == 1 and len(other_build) == len(first)
    _reexport(decoder, "exported again")
    eng = Engine.load(folder[0], weights_cache=cache)
    now = _entries(cache)
    new_dec = sorted(set(now) - set(first) - set(other_build))
    assert len(new_dec) == 1 and new_dec[0].startswith("decoder_masked_model-")
    assert old_dec[0] not in now  # superseded: removed
    assert set(other_build) <= set(now) and set(first) - set(old_dec) <= set(now)
    assert _mapped(eng) and _tokens(eng, prompts) == want
    assert not [p for p in (cache / "graphs").iterdir() if p.name.startswith(".")]
    # an entry whose lock another process holds is left for a later build to remove
    lock = cache / "locks" / f"{new_dec[0]}.lock"
    with weights._locked(lock) as held:
        assert held
        _reexport(decoder, "and again")
        Engine.load(folder[0], weights_cache=cache)
    assert new_dec[0] in _entries(cache) and len(_entries(cache)) == len(now) + 1


def test_build_refuses_a_graph_changed_since_it_was_hashed(folder, tmp_path, monkeypatch):
    """A process that hashed the old file (read the manifest before an export replaced it) must
    not build an entry of the new weights under the old hashes: the plain graph instead."""
    from engine.providers import session_options

    monkeypatch.setattr(weights, "RACY_S", 0.0)
    cache = weights.WeightsCache(tmp_path / "cache")
    decoder = folder[0] / "decoder_masked_model.onnx"
    old = weights.sources(folder[0], decoder.name, None, cache.sha256, False)
    _reexport(decoder, "exported again")
    args = (decoder, old, "cpu", lambda: session_options(1), ["CPUExecutionProvider"])
    assert cache.session(*args) is None  # the caller opens the plain graph
    assert _entries(tmp_path / "cache") == []


def _flip_start_embedding(data: Path) -> None:
    """Change one byte that the outputs rest on: the top byte of the first weight of the
    decoder start token's embedding row (a Gather's table: ORT maps it as written, without the
    check it makes of prepacked MatMul weights, which most other bytes feed)."""
    import onnx

    graph = onnx.load(str(data.parent / "model.onnx"), load_external_data=False).graph
    inits = {i.name: i for i in graph.initializer}
    gathers = [
        inits[n.input[0]] for n in graph.node if n.op_type == "Gather" and n.input[0] in inits
    ]
    table = next(t for t in gathers if len(t.dims) == 2)  # the embedding table (not a bucket list)
    at = int(next(e.value for e in table.external_data if e.key == "offset")) + 3  # float32 LE
    with open(data, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))


def _load_unchecked(folder, cache: Path, data: Path, good: str, monkeypatch):
    """Engine.load with the entry's data file taken for its recorded hash (no detection)."""
    real = weights.WeightsCache.sha256

    def sha256(self, path, ours=False):
        return good if Path(path) == data else real(self, path, ours)

    with monkeypatch.context() as m:
        m.setattr(weights.WeightsCache, "sha256", sha256)
        eng = Engine.load(folder, weights_cache=cache)
    assert _mapped(eng)
    return eng


@pytest.mark.parametrize("damage", ["truncate", "alter"])
def test_damaged_entry_is_rebuilt(folder, tmp_path, monkeypatch, damage):
    """A data file cut short, or one byte changed at the same size (one these prompts' tokens
    rest on: mapped unchecked, it changes them): detected and built again, a new file with the
    good hash, the plain load's tokens."""
    monkeypatch.setattr(weights, "RACY_S", 0.0)
    cache = tmp_path / "cache"
    prompts = [[5, 6, 7, 1], [9, 1]]
    want = _tokens(Engine.load(folder[0], weights_cache=False), prompts)
    assert _tokens(Engine.load(folder[0], weights_cache=cache), prompts) == want
    data = next(p for p in (cache / "graphs").glob("decoder_masked_model-*/model.onnx.data"))
    size, good, inode = data.stat().st_size, checked.sha256_file(data), data.stat().st_ino
    if damage == "truncate":
        os.truncate(data, size // 2)
    else:
        _flip_start_embedding(data)
        assert data.stat().st_size == size
        unchecked = _load_unchecked(folder[0], cache, data, good, monkeypatch)
        assert _tokens(unchecked, prompts) != want  # the byte matters to these prompts
    eng = Engine.load(folder[0], weights_cache=cache)
    assert _mapped(eng)
    assert data.stat().st_ino != inode and checked.sha256_file(data) == good  # rebuilt
    assert _tokens(eng, prompts) == want
    assert not [p for p in (cache / "graphs").iterdir() if p.name.startswith(".")]


LOAD = """
import json, os, resource, signal, subprocess, sys
from pathlib import Path
folder, cache, mode = sys.argv[1:4]
if mode == "read-only":  # a read-only file system over the cache folder (own mount namespace)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", cache], check=True)
elif mode == "full":  # 256 KiB of room: the first large weight does not fit
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", cache], check=True)
elif mode == "file-size-limit":  # the same, without root: writes past 256 KiB fail
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, 256 << 10))
from engine import Engine
eng = Engine.load(folder, weights_cache=cache)
tokens = [eng.generate(p, max_new_tokens=12).token_ids for p in ([5, 6, 7, 1], [9, 1])]
left = sorted(str(p.relative_to(cache)) for p in Path(cache).rglob("*"))
paths = [s._model_path for s in eng.main.sessions.values()]
print(json.dumps({"tokens": tokens, "left": left, "paths": paths}))
"""


def _load_in_subprocess(folder, cache, mode, unshare=False):
    cmd = [sys.executable, "-c", LOAD, str(folder), str(cache), mode]
    done = subprocess.run(
        ["unshare", "-m", *cmd] if unshare else cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1]), done.stderr


@pytest.mark.parametrize("mode", ["read-only", "full"])
def test_cache_that_cannot_be_written_falls_back_to_the_plain_graph(folder, tmp_path, mode):
    """A read-only or full cache folder: one warning line, the plain sessions, the same tokens,
    nothing half-written left behind."""
    want = _tokens(Engine.load(folder[0], weights_cache=False), [[5, 6, 7, 1], [9, 1]])
    cache = tmp_path / "cache"
    cache.mkdir()
    root = os.geteuid() == 0
    if root and unshare_works():
        out, err = _load_in_subprocess(folder[0], cache, mode, unshare=True)
    elif mode == "full":
        out, err = _load_in_subprocess(folder[0], cache, "file-size-limit")
    elif not root:
        cache.chmod(0o555)
        try:
            out, err = _load_in_subprocess(folder[0], cache, "plain")
        finally:
            cache.chmod(0o755)
    else:
        pytest.skip("root here without a private mount namespace: cannot make a read-only cache")
    assert out["tokens"] == want
    assert "weights cache" in err and "loading the plain graph" in err
    # the decoder's weights do not fit: plain (a small graph may have fit, then it is whole)
    assert not Path(out["paths"][1]).is_relative_to(cache)
    assert not [p for p in out["left"] if ".tmp-" in p or ".old-" in p], out["left"]
    entries = {p.split("/")[1] for p in out["left"] if p.count("/") == 1 and "graphs/" in p}
    assert all(f"graphs/{e}/entry.json" in out["left"] for e in entries), out["left"]


def test_two_processes_building_one_cache_at_once(folder, tmp_path):
    """Two cold loads started together: both run the same tokens, one entry per graph, no
    temporary left."""
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-c", LOAD, str(folder[0]), str(cache), "plain"]
    procs = [
        subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-3000:]
        outs.append(json.loads(stdout.splitlines()[-1]))
    assert outs[0]["tokens"] == outs[1]["tokens"]
    assert outs[0]["paths"] == outs[1]["paths"]
    assert len(_entries(cache)) == 3
    assert not [p for p in (cache / "graphs").iterdir() if p.name.startswith(".")]


def test_weights_cache_argument_is_checked(folder):
    for bad in (1, "", 0.5, ["x"]):
        with pytest.raises(InputError, match="weights_cache"):
            Engine.load(folder[0], weights_cache=bad)


def test_a_file_changed_just_now_is_not_remembered(tmp_path, monkeypatch):
    """A file whose last change is younger than RACY_S is hashed again at every look: a write
    in the same timestamp tick could otherwise leave its stat key unchanged."""
    cache = weights.WeightsCache(tmp_path / "cache")
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 1000)
    calls = []
    real = checked.sha256_file
    monkeypatch.setattr(checked, "sha256_file", lambda p, *a: calls.append(p) or real(p, *a))
    assert cache.sha256(path) == cache.sha256(path) == real(path)
    assert len(calls) == 2  # not remembered: changed under RACY_S ago
    monkeypatch.setattr(weights, "RACY_S", 0.0)
    cache.sha256(path)
    cache.sha256(path)
    assert len(calls) == 3  # remembered once settled


def test_unverified_load_keys_the_cache_by_the_files_not_the_manifest(folder, tmp_path):
    """verify=False: the manifest's hashes are not checked, so they never name the entry (a
    file edited in place would otherwise map the old weights)."""
    manifest = checked.read_manifest(folder[0])
    fake = {"files": {k: {**v, "sha256": "0" * 64} for k, v in manifest["files"].items()}}
    hasher = weights.WeightsCache(tmp_path / "cache").sha256
    real = checked.sha256_file(folder[0] / "decoder_masked_model.onnx")
    got = weights.sources(folder[0], "decoder_masked_model.onnx", fake, hasher, verified=False)
    assert got == {"decoder_masked_model.onnx": real}
    got = weights.sources(folder[0], "decoder_masked_model.onnx", fake, hasher, verified=True)
    assert got == {"decoder_masked_model.onnx": "0" * 64}


def test_entry_that_onnx_runtime_rejects_is_rebuilt(folder, tmp_path, monkeypatch):
    """An entry whose files match its entry.json but that ORT cannot load (another build, a
    damaged graph with its hash rewritten): built again, the same tokens, no error."""
    monkeypatch.setattr(weights, "RACY_S", 0.0)
    cache = tmp_path / "cache"
    prompts = [[5, 6, 7, 1], [9, 1]]
    want = _tokens(Engine.load(folder[0], weights_cache=cache), prompts)
    entry = next((cache / "graphs").glob("decoder_masked_model-*"))
    (entry / "model.onnx").write_bytes(b"not an onnx graph")
    meta = json.loads((entry / "entry.json").read_text())
    meta["files"]["model.onnx"] = {"bytes": 17, "sha256": checked.sha256_file(entry / "model.onnx")}
    (entry / "entry.json").write_text(json.dumps(meta))
    eng = Engine.load(folder[0], weights_cache=cache)
    assert _mapped(eng) and _tokens(eng, prompts) == want
    assert (entry / "model.onnx").stat().st_size > 17


STOPPED = """
import sys, time
from engine import Engine, weights
real = weights.ort.InferenceSession

def written_then_stopped(path, so=None, **kw):  # a build whose files are written, then killed
    sess = real(path, so, **kw)
    if so is not None and so.optimized_model_filepath:
        print("written", flush=True)
        time.sleep(600)
    return sess

weights.ort.InferenceSession = written_then_stopped
Engine.load(sys.argv[1], weights_cache=sys.argv[2])
"""


def _leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "graphs").iterdir() if p.name.startswith("."))


def test_killed_build_leaves_no_temporary_folder_for_long(folder, tmp_path):
    """A build SIGKILLed after writing its temporary folder: the next build or open removes it
    (its lock is free), never one whose lock a live build holds, nor anything else (a link of
    that name, its target, a name not the cache's)."""
    import signal

    cache = tmp_path / "cache"
    cmd = [sys.executable, "-c", STOPPED, str(folder[0]), str(cache)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout.readline() == b"written\n"
        (tmp,) = _leftovers(cache)
        assert ".tmp-" in tmp and (cache / "graphs" / tmp / "model.onnx").is_file()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert _leftovers(cache) == [tmp]  # nothing cleans up after a SIGKILL
    eng = Engine.load(folder[0], weights_cache=cache)  # builds the entries: the leftover goes
    assert _mapped(eng) and _leftovers(cache) == []
    # one whose lock is held (a build in progress) stays; a link named so and its target, and a
    # name the cache never makes, stay for good
    dec = next(e for e in _entries(cache) if e.startswith("decoder_masked_model-"))
    live, link = cache / "graphs" / f".{dec}.tmp-abc123de", cache / "graphs" / f".{dec}.old-zz9"
    live.mkdir()
    (live / "model.onnx").write_bytes(b"being written")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"x")
    link.symlink_to(outside)
    foreign = cache / "graphs" / ".notes.tmp-abc"
    foreign.mkdir()
    with weights._locked(cache / "locks" / f"{dec}.lock") as held:
        assert held
        assert _mapped(Engine.load(folder[0], weights_cache=cache))  # opens every entry
        assert (live / "model.onnx").is_file()
    assert _mapped(Engine.load(folder[0], weights_cache=cache))
    assert not live.exists() and link.is_symlink() and (outside / "keep").read_bytes() == b"x"
    assert _leftovers(cache) == sorted([link.name, foreign.name])


@pytest.mark.parametrize("target", ["dangling", "folder"])
def test_symlink_at_an_entry_path_is_replaced(folder, tmp_path, target):
    """A symlink where an entry belongs (dangling, or to a folder outside) is replaced as any
    stale entry: the link itself, never its target; the graph is mapped again."""
    cache = tmp_path / "cache"
    Engine.load(folder[0], weights_cache=cache)
    entry = next((cache / "graphs").glob("decoder_masked_model-*"))
    shutil.rmtree(entry)
    outside = tmp_path / "outside"
    if target == "folder":
        outside.mkdir()
        (outside / "keep").write_bytes(b"x")
    entry.symlink_to(outside)
    eng = Engine.load(folder[0], weights_cache=cache)
    assert _mapped(eng) and entry.is_dir() and not entry.is_symlink()
    assert eng.weights_entries()["main"]["decoder_masked_model.onnx"] == str(entry)
    if target == "folder":
        assert [p.name for p in outside.iterdir()] == ["keep"]
    assert _leftovers(cache) == []


def test_weights_entries_name_the_mapped_entries(folder, tmp_path):
    """Engine.weights_entries(): each graph's entry folder, whether built at this load or
    mapped; None for a plain graph, and for a missing assistant."""
    from engine.model import GRAPHS

    cache = tmp_path / "cache"
    for _ in ("built", "mapped"):
        eng = Engine.load(folder[0], assistant=folder[1], weights_cache=cache)
        got = eng.weights_entries()
        assert set(got) == {"main", "assistant"}
        for name, model in (("main", eng.main), ("assistant", eng.assistant)):
            assert set(got[name]) == set(GRAPHS.values())
            for role, fname in GRAPHS.items():
                entry = Path(got[name][fname])
                assert entry.parent == cache / "graphs" and entry.name.startswith(fname[:-5])
                assert Path(model.sessions[role]._model_path) == entry / "model.onnx"
    plain = Engine.load(folder[0], weights_cache=False).weights_entries()
    assert plain == {"main": dict.fromkeys(GRAPHS.values()), "assistant": None}


def _lie(cache: weights.WeightsCache, path: Path) -> None:
    """Change one byte of path and remember its old hash under its new stat key: what the
    cache sees when a change leaves the stat as it was (bit rot, a write the stat misses)."""
    old = checked.sha256_file(path)
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))
    key = weights._stat_key(path.stat())
    memo = cache.root / "hashes" / (weights.hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")
    memo.write_text(json.dumps({"stat": key, "sha256": old, "path": str(path)}))


def test_stairs_verify_cache_catches_what_the_stat_does_not_show(
    folder, tiny_models, tmp_path, monkeypatch, capsys
):
    """A changed entry file, and a changed model file, whose remembered hashes still match
    their stat: loads trust them; `stairs-verify --cache` hashes everything, removes the bad
    entry and drops the wrong hashes (exit 2), leaves what is not the cache's; then loads
    refuse the model file and rebuild the entry."""
    from engine.cli import verify_main

    monkeypatch.setattr(weights, "RACY_S", 0.0)
    monkeypatch.setenv("STAIRS_CACHE_DIR", str(tmp_path / "cache"))
    cache = weights.WeightsCache(tmp_path / "cache")
    prompts = [[5, 6, 7, 1], [9, 1]]
    want = _tokens(Engine.load(folder[0], weights_cache=cache.root), prompts)
    assert verify_main(["--cache"]) == 0  # the default root
    out = capsys.readouterr().out
    assert sum(line.startswith("ok ") for line in out.splitlines()) == 3, out
    assert "3/3 entries ok" in out
    (cache.root / "graphs" / "mine").mkdir()  # not an entry: never touched
    outside = tmp_path / "outside"
    outside.mkdir()
    (cache.root / "graphs" / ("x-" + "0" * 24)).symlink_to(outside)
    entry = next((cache.root / "graphs").glob("decoder_masked_model-*"))
    _lie(cache, entry / "model.onnx.data")
    built = (entry / "entry.json").stat().st_ino
    Engine.load(folder[0], weights_cache=cache.root)  # trusted: the stat is the remembered one
    assert (entry / "entry.json").stat().st_ino == built
    _lie(cache, folder[0] / "encoder_model.onnx")
    Engine.load(folder[0], weights_cache=cache.root)
    held = next((cache.root / "graphs").glob("cross_kv_model-*"))
    _lie(cache, held / "model.onnx")
    with weights._locked(cache.root / "locks" / f"{held.name}.lock"):
        assert verify_main(["--cache", str(cache.root)]) == 2
    out = capsys.readouterr().out
    assert f"removed  {entry.name}: model.onnx.data: sha256 differs from entry.json" in out
    assert f"busy     {held.name}: model.onnx: sha256 differs" in out and "holds its lock" in out
    assert "skipped  mine: not a cache entry" in out
    assert "1/3 entries ok" in out and "3 wrong" in out  # both entries' and the model's
    assert not entry.exists() and held.is_dir() and (cache.root / "graphs" / "mine").is_dir()
    assert outside.is_dir() and (cache.root / "graphs" / ("x-" + "0" * 24)).is_symlink()
    with pytest.raises(ModelFileError, match="encoder_model.onnx: sha256 differs"):
        Engine.load(folder[0], weights_cache=cache.root)
    assert verify_main(["--cache", str(tmp_path / "nowhere")]) == 2
    assert "no weights cache there" in capsys.readouterr().err
    good = tiny_models["v1_1"]["main"] / "encoder_model.onnx"
    shutil.copy(good, folder[0] / "encoder_model.onnx")  # the model file put right
    eng = Engine.load(folder[0], weights_cache=cache.root)
    assert _mapped(eng) and _tokens(eng, prompts) == want and entry.is_dir()
    report = weights.verify_cache(cache.root)
    assert report.ok and {s for _, s, _ in report.entries} == {"ok", "skipped"}


def test_one_warning_per_cause_and_a_rebuild_says_why(folder, tmp_path, caplog, monkeypatch):
    """A cache that cannot be written: one warning for all six graphs of a pair, none at the
    next load. A first build warns nothing; a damaged entry's rebuild names it and why."""
    import logging

    monkeypatch.setattr(weights, "RACY_S", 0.0)
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    caplog.set_level(logging.WARNING, logger="stairs")
    for _ in range(2):
        eng = Engine.load(folder[0], assistant=folder[1], weights_cache=blocker / "cache")
        assert set(eng.weights_entries()["assistant"].values()) == {None}
    warned = [r.getMessage() for r in caplog.records if "weights cache" in r.getMessage()]
    assert len(warned) == 1, warned
    assert "not usable" in warned[0] and "loading the plain graphs" in warned[0]
    caplog.clear()
    cache = tmp_path / "cache"
    first = Engine.load(folder[0], assistant=folder[1], weights_cache=cache)
    assert not caplog.records  # simply missing: built without a word
    entry = Path(first.weights_entries()["main"]["decoder_masked_model.onnx"])
    os.truncate(entry / "model.onnx.data", 10)
    eng = Engine.load(folder[0], weights_cache=cache)
    assert _mapped(eng)
    (warning,) = [r.getMessage() for r in caplog.records]
    assert f"building {entry} again" in warning and "truncated, altered or missing" in warning
