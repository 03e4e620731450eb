"""The device cache back end (engine.device_cache) on the CPU provider: key/values as ORT
OrtValues updated in place by the decoder graph, moved by the kvops graphs. It must give the
numpy back end's logits bit for bit and every strategy's greedy tokens."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from engine import Engine, InputError, ModelFileError
from engine.cache import BatchCache
from engine.device_cache import KVOPS, DeviceCache
from engine.stats import Counter

NEW = 32
SIZES = [1, 2, 5, 8]
STRATEGIES = [
    ("greedy", {}),
    ("assisted", {"draft_tokens": 4}),
    ("assisted", {"draft_tokens": 5, "schedule": "heuristic"}),
    ("stairs", {"batch_size": 5, "threshold": 0.5}),
    ("tree", {"draft_tokens": 3, "branches": 2}),
    ("lookup", {}),
    ("staged", {}),
]


@pytest.fixture(scope="module")
def prompts(pycode_prompts):
    rng = np.random.default_rng(7)  # mixed lengths: rows of 4-129 encoder tokens share calls
    order, keep = rng.permutation(len(pycode_prompts))[:16], rng.integers(4, 130, 16)
    return [pycode_prompts[i][-int(k) :] for i, k in zip(order, keep)]


@pytest.fixture(scope="module")
def dev(pycode_pair):
    main, draft = pycode_pair
    return Engine.load(main, assistant=draft, threads=2, kv_cache="device")


@pytest.fixture(scope="module")
def ref(eng, prompts):
    """Each prompt's greedy tokens on the numpy back end."""
    return [eng.generate(p, max_new_tokens=NEW).token_ids for p in prompts]


def test_kvops_graphs_are_what_export_writes():
    from export.kvops import graphs

    written = graphs()
    assert {p.name for p in KVOPS.glob("*.onnx")} == set(written), "stale or missing graphs"
    for name, data in written.items():
        assert (KVOPS / name).read_bytes() == data, f"{name}: run python -m export.kvops"


def test_kvops_run_many_buffers_in_few_runs(dev, monkeypatch):
    """7 buffers of two shapes take 3 runs (widths 4, 2, 1), each buffer moved as numpy would."""
    import onnxruntime as ort

    from engine.device_cache import Buffer, KVOps

    model = dev.main
    ops = KVOps.of(model)
    rng = np.random.default_rng(0)
    hosts = [rng.standard_normal((3, 2, 5 + i % 2, 4)).astype(np.float32) for i in range(7)]
    bufs = [Buffer(ort.OrtValue.ortvalue_from_numpy(h.copy())) for h in hosts]
    roles, run = [], model.run
    monkeypatch.setattr(model, "run", lambda role, *a: roles.append(role) or run(role, *a))
    slabs = [b.rows(0, 3) for b in bufs]
    ops.run("move", slabs, slabs, src=np.array([[2]]), dst=np.array([[0]]))
    assert roles == ["kvops.move_4", "kvops.move_2", "kvops.move_1"]
    for h, b in zip(hosts, bufs):
        h[0] = h[2]
        assert np.array_equal(b.numpy(), h)


def test_device_back_end_is_chosen_and_the_caches_are_ort_values(dev, eng):
    assert dev.main.kv_cache == dev.assistant.kv_cache == "device"
    assert eng.main.kv_cache == "numpy"  # auto on the CPU
    sched = dev._scheduler()
    assert isinstance(sched.main, DeviceCache) and isinstance(sched.asst, DeviceCache)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("strategy, options", STRATEGIES)
def test_every_strategy_and_batch_size_equals_numpy_greedy(dev, prompts, ref, size, strategy,
                                                          options):  # fmt: skip
    """A small token budget makes later requests join while earlier ones run (and rows leave
    as each request ends): joins, removals and row moves on the device."""
    out = []
    for i in range(0, len(prompts), size):
        out += dev.generate_batch(
            prompts[i : i + size],
            strategy=strategy,
            max_new_tokens=NEW,
            max_batch_tokens=max(8, 3 * size),
            **options,
        )
    assert [r.token_ids for r in out] == ref


def test_joins_and_cancels_mid_flight(dev, prompts, ref):
    first = [dev.submit(p, strategy="tree", max_new_tokens=NEW) for p in prompts[:4]]
    victim = dev.submit(prompts[4], strategy="assisted", max_new_tokens=NEW)
    pieces = iter(victim.tokens())
    next(pieces)
    victim.cancel()
    late = []
    for _ in first[0].tokens():
        if not late:
            late = [dev.submit(p, strategy="staged", max_new_tokens=NEW) for p in prompts[5:9]]
    results = [h.result(timeout=120) for h in first + late]
    assert [r.token_ids for r in results] == ref[:4] + ref[5:9]
    assert victim.done and not dev._worker.scheduler.active


@pytest.mark.parametrize("variant", ["v1_0", "v1_1"])
def test_tiny_models_device_equals_numpy(tiny_models, variant):
    m = tiny_models[variant]
    host = Engine.load(m["main"], assistant=m["random"], weights_cache=False)
    dev = Engine.load(m["main"], assistant=m["random"], weights_cache=False, kv_cache="device")
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 300, int(n)).tolist() + [1] for n in rng.integers(1, 40, 8)]
    ref = [host.generate(p, max_new_tokens=20).token_ids for p in prompts]
    for strategy, options in STRATEGIES:
        for size in SIZES:
            out = []
            for i in range(0, len(prompts), size):
                out += dev.generate_batch(
                    prompts[i : i + size], strategy=strategy, max_new_tokens=20, **options
                )
            assert [r.token_ids for r in out] == ref, (strategy, size)


def _caches(m):
    """The numpy back end copying the new key/values back itself, the numpy back end whose
    arrays the graph writes in place, and the device back end, on one model."""
    copying = BatchCache(m)
    copying.in_place_writes = False
    host = BatchCache(m)
    assert host.in_place_writes
    return copying, host, DeviceCache(m)


def _add(caches, owner, ids, c) -> None:
    for cache in caches:
        cross, mask = cache.model.encode(ids, c, device=cache.on_device)
        cache.add(owner, cross, mask)


def _run(caches, c, tokens, counts, parents=None) -> None:
    """One call on every cache: the same logits bits."""
    a = caches[0].run(tokens, counts, c, parents)
    for cache in caches[1:]:
        assert np.array_equal(a, cache.run(tokens, counts, c, parents))


def _check(caches) -> None:
    """Every active row's every slot the same bits (rewound and pad slots zeroed on all)."""
    copying, host, dev = caches
    assert copying.owners == host.owners == dev.owners
    for o in host.owners:
        assert copying.length(o) == host.length(o) == dev.length(o)
    dev._flush()
    rows = len(host.owners)
    for a, b, d in zip(copying.self_kv, host.self_kv, dev.self_kv):
        assert np.array_equal(a[:rows], b[:rows])
        assert np.array_equal(a[:rows], d.numpy()[:rows])


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8", "int4"])
def test_logits_and_key_values_bit_identical_through_every_cache_operation(
    eng, pycode_dtypes, prompts, dtype
):
    """One script of adds, ragged and tree calls, keeps, rewinds, removals, row reuse and
    growth on every back end (numpy copying the new key/values back, numpy written in place,
    device), for each dtype of the main: every call's logits np.array_equal, and every active
    row's buffers the same bits, slot for slot (the dropped ones and the pads' zeroed on all)."""
    model = eng.main if dtype == "fp32" else Engine.load(pycode_dtypes[dtype], threads=2).main
    caches = _caches(model)
    host, dev = caches[1:]
    rng, c = np.random.default_rng(11), Counter()
    for o in range(3):
        _add(caches, o, prompts[o], c)
    _run(caches, c, rng.integers(3, 8000, (3, 1)) * 0, np.array([1, 1, 1]))  # decoder start
    for _ in range(20):  # ragged rows: 1-4 real tokens, then rewinds to a random length
        _run(caches, c, rng.integers(3, 8000, (3, 4)), rng.integers(1, 5, 3))
        for o in range(3):
            keep = int(rng.integers(max(1, host.length(o) - 3), host.length(o) + 1))
            for cache in caches:
                cache.rewind(o, keep)
    _check(caches)
    lo = [host.length(o) for o in range(3)]  # a tree in row 1: two paths of two tokens
    tree = [None, [lo[1] - 1, lo[1], lo[1], lo[1] + 1, lo[1] + 2], None]
    _run(caches, c, rng.integers(3, 8000, (3, 5)), np.array([2, 5, 3]), tree)
    for cache in caches:
        cache.keep(1, lo[1], [lo[1], lo[1] + 2, lo[1] + 4])  # the second path: slots move
        cache.rewind(0, lo[0] + 1)
    _check(caches)
    for cache in caches:
        cache.remove(0)  # the last row moves into row 0
    _add(caches, 3, prompts[3], c)  # takes the freed row at the back
    _add(caches, 4, prompts[9], c)  # rows double: storage grows
    _run(caches, c, rng.integers(3, 8000, (4, 2)), np.array([1, 2, 2, 1]))
    for _ in range(12):  # past the first capacity (32 slots): growth keeps every row
        _run(caches, c, rng.integers(3, 8000, (4, 6)), np.array([6, 5, 6, 4]))
    assert caches[0].capacity == host.capacity == dev.capacity > 64
    _check(caches)
    assert dev.lengths[dev.owners.index(4)] > 0
    for cache in caches:
        cache.remove(4)
    _add(caches, 5, prompts[5], c)  # a reused row starts empty: its self key/values zeroed
    r = dev.owners.index(5)
    assert all(not a.numpy()[r].any() for a in dev.self_kv)
    assert all(not a[r].any() for a in host.self_kv)
    _run(caches, c, rng.integers(3, 8000, (4, 3)), np.array([3, 1, 2, 3]))
    _check(caches)


def test_bad_kv_cache_values_are_refused_before_loading(pycode_pair):
    main, _draft = pycode_pair
    with pytest.raises(InputError, match="kv_cache must be one of auto, numpy, device"):
        Engine.load(main, kv_cache="gpu")
    from serve.config import ServeConfig

    with pytest.raises(InputError, match="kv_cache"):
        ServeConfig(main=str(main), kv_cache="host")


def test_a_graph_without_kv_cache_outputs_keeps_numpy(tiny_models, tmp_path):
    """Folders exported before the device cache load as before (numpy back end); asking for the
    device cache on them says what to do in one line."""
    import onnx

    folder = shutil.copytree(tiny_models["v1_1"]["main"], tmp_path / "old")
    path = folder / "decoder_masked_model.onnx"
    proto = onnx.load(str(path))
    keep = [o for o in proto.graph.output if not o.name.startswith("kv_cache.")]
    del proto.graph.output[:]
    proto.graph.output.extend(keep)
    onnx.save(proto, str(path))
    manifest = json.loads((folder / "stairs.json").read_text())
    del manifest["files"]["decoder_masked_model.onnx"]
    (folder / "stairs.json").write_text(json.dumps(manifest))
    eng = Engine.load(folder, weights_cache=False)
    assert eng.main.kv_cache == "numpy" and not eng.main.has_full
    want = Engine.load(tiny_models["v1_1"]["main"], weights_cache=False)
    assert (
        eng.generate([5, 6, 7, 1], max_new_tokens=4).token_ids
        == want.generate([5, 6, 7, 1], max_new_tokens=4).token_ids
    )
    with pytest.raises(ModelFileError, match="no kv_cache outputs.*stairs-export"):
        Engine.load(folder, weights_cache=False, kv_cache="device")


def test_cli_kv_cache_flag(pycode_pair, capsys):
    from engine.cli import main as cli

    m, d = pycode_pair
    args = ["--main", str(m), "--assistant", str(d), "--json", "--max-new-tokens", "16"]
    out = {}
    for kv in ("numpy", "device"):
        assert cli([*args, "--strategy", "assisted", "--kv-cache", kv, "def f(x):\n"]) == 0
        out[kv] = json.loads(capsys.readouterr().out)["token_ids"]
    assert out["numpy"] == out["device"] and out["numpy"]


def test_greedy_picks_on_the_device_resolve_ties_and_nan_as_numpy(eng, monkeypatch):
    """The main's logits are reduced on the device (ids and a flag per token); a tie or a
    NaN/+inf on a real token sends the logits to the host, so the picks are numpy's."""
    import onnxruntime as ort

    from engine import device_cache
    from engine.strategies.base import pick

    dev, host_calls = DeviceCache(eng.main), []
    monkeypatch.setattr(device_cache, "pick", lambda x: host_calls.append(1) or pick(x))
    logits = np.random.default_rng(0).standard_normal((3, 4, 50)).astype(np.float32)
    counts = np.array([4, 4, 3])
    clean = logits.copy()
    clean[2, 3, 5] = np.inf  # a pad position: ignored
    ids, bad = dev._picks(ort.OrtValue.ortvalue_from_numpy(clean), counts, Counter())
    assert np.array_equal(ids, clean.argmax(-1)) and not bad.any() and not host_calls
    for pos, value in (((0, 1, [7, 30]), 9.0), ((1, 2, [11]), np.nan), ((1, 0, [3]), np.inf)):
        odd = logits.copy()
        odd[pos] = value
        ids, bad = dev._picks(ort.OrtValue.ortvalue_from_numpy(odd), counts, Counter())
        want_ids, want_bad = pick(odd)
        assert np.array_equal(ids, want_ids) and np.array_equal(bad, want_bad)
        assert host_calls and bad.any() == (value != 9.0)
        host_calls.clear()


def test_export_checks_that_the_graph_can_update_in_place(tiny_models, tmp_path):
    """stairs-export refuses a decoder graph where a node reads a past buffer after the
    kv_cache output bound to the same memory was written (checked on the final graph)."""
    import onnx
    from onnx import helper

    from export.errors import ConversionError
    from export.masked import check_in_place

    path = tiny_models["v1_0"]["main"] / "decoder_masked_model.onnx"
    check_in_place(path)
    proto = onnx.load(str(path))
    proto.graph.node.append(helper.make_node("Identity", ["past_key_values.1.decoder.value"],
                                             ["late"]))  # fmt: skip
    proto.graph.output.append(helper.make_tensor_value_info("late", onnx.TensorProto.FLOAT, None))
    onnx.save(proto, str(tmp_path / "late.onnx"))
    with pytest.raises(ConversionError, match="read past_key_values.1.decoder.value after"):
        check_in_place(tmp_path / "late.onnx")


def test_a_failing_cache_operation_fails_its_requests_and_nothing_hangs(dev, prompts, ref,
                                                                       monkeypatch):  # fmt: skip
    """A device cache operation that raises (out of device memory) fails the requests still in
    that cache with a typed error, the finished one keeps its result, and the scheduler serves
    the next request exactly."""
    from engine import EngineError

    real, calls = DeviceCache.remove, []

    def remove_once(self, owner):
        calls.append(owner)
        if len(calls) == 1:
            raise RuntimeError("out of device memory")
        return real(self, owner)

    monkeypatch.setattr(DeviceCache, "remove", remove_once)
    sched = dev._scheduler()
    reqs = [dev._request(dev.plan(p, "assisted", n)) for p, n in zip(prompts, (6, NEW, NEW))]
    for r in reqs:
        sched.add(r)
    while sched.busy:
        sched.step()
    assert all(r.finished.is_set() for r in reqs) and reqs[0].error is None
    assert reqs[0].seq[1:] == ref[0][:6]
    assert all(isinstance(r.error, EngineError) and "device memory" in str(r.error)
               for r in reqs[1:])  # fmt: skip
    ok = dev._request(dev.plan(prompts[3], "tree", NEW))
    sched.add(ok)
    while sched.busy:
        sched.step()
    assert ok.error is None and ok.seq[1:] == ref[3]
