"""Batched and continuous generation: every request equals its own single-request greedy tokens,
whatever shares its batch."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from engine import CancelledError, Engine, EngineError, InputError, ModelFileError

N_PROMPTS = 50
NEW = 48


@pytest.fixture(scope="module")
def prompts(pycode_prompts):
    # mixed lengths: the public prompts are all 128-129 tokens, so each keeps only its last
    # 4-129 tokens (EOS included) and every batch mixes short and long encoder inputs
    rng = np.random.default_rng(0)
    order, keep = rng.permutation(N_PROMPTS), rng.integers(4, 130, N_PROMPTS)
    return [pycode_prompts[i][-int(k) :] for i, k in zip(order, keep)]


@pytest.fixture(scope="module")
def ref(eng, prompts):
    return [eng.generate(p, max_new_tokens=NEW).token_ids for p in prompts]


def _batched(eng, prompts, size, **kw):
    out = []
    for i in range(0, len(prompts), size):
        out += eng.generate_batch(prompts[i : i + size], max_new_tokens=NEW, **kw)
    return out


@pytest.mark.parametrize("size", [2, 5, 8])
@pytest.mark.parametrize(
    "strategy, options",
    [
        ("greedy", {}),
        ("assisted", {"draft_tokens": 4}),
        ("assisted", {"draft_tokens": 5, "schedule": "heuristic"}),
        ("lookup", {}),
        ("tree", {"draft_tokens": 3, "branches": 2}),  # a tree of drafts in one row
        ("stairs", {"batch_size": 5, "threshold": 0.5}),  # confidence-stopped drafts
        ("staged", {}),  # the assistant checks n-gram proposals: ragged assistant rows
    ],
)
def test_batches_equal_single_greedy(eng, prompts, ref, size, strategy, options):
    out = _batched(eng, prompts, size, strategy=strategy, **options)
    assert [r.token_ids for r in out] == ref
    rows = sum(r.stats.batch_rows for r in out) / sum(r.stats.main_calls for r in out)
    assert rows > 1.2  # calls really were shared
    if strategy != "greedy":
        assert sum(r.stats.accepted for r in out) > 0


def test_mixed_strategies_join_and_cancel_mid_flight(eng, prompts, ref):
    """Concurrent submit() callers with different strategies share main calls; requests join
    while others run; a cancelled one stops and frees its row; the rest stay exact."""
    kinds = [("greedy", {}), ("assisted", {"draft_tokens": 3}), ("lookup", {})]
    first = [
        eng.submit(p, strategy=kinds[i % 3][0], max_new_tokens=NEW, **kinds[i % 3][1])
        for i, p in enumerate(prompts[:6])
    ]
    victim = eng.submit(prompts[6], max_new_tokens=NEW)
    pieces = iter(victim.tokens())
    next(pieces)  # it has started
    victim.cancel()
    late, streamed = [], []
    for toks in first[0].tokens():  # join while the first ones are generating
        streamed += toks
        if not late:
            late = [
                eng.submit(p, strategy="assisted", max_new_tokens=NEW, draft_tokens=4)
                for p in prompts[7:12]
            ]
    results = [h.result(timeout=120) for h in first[1:] + late]
    assert [r.token_ids for r in results] == ref[1:6] + ref[7:12]
    assert streamed == ref[0] == first[0].result(timeout=120).token_ids
    assert max(r.stats.mean_batch_rows for r in results) > 1.5
    with pytest.raises(CancelledError):  # ends (cancelled) instead of hanging
        victim.result(timeout=60)
    assert victim.done and len(eng._worker.scheduler.active) == 0


def test_streamed_text_equals_result(eng, prompts, ref):
    h = eng.submit(prompts[0], strategy="assisted", max_new_tokens=NEW)
    text = "".join(h)
    assert text == eng.main.tokenizer.decode(ref[0])


def test_threads_submitting_together_stay_exact(eng, prompts, ref):
    got = {}

    def worker(i):
        got[i] = eng.submit(prompts[i], max_new_tokens=NEW).result(timeout=120).token_ids

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(8)] == ref[:8]


def test_bad_prompt_fails_alone_and_empty_batch_is_refused(eng, prompts, ref):
    out = eng.generate_batch([prompts[0], [10**9], prompts[1]], max_new_tokens=NEW)
    assert isinstance(out[1], InputError)
    assert [out[0].token_ids, out[2].token_ids] == ref[:2]
    with pytest.raises(InputError):
        eng.generate_batch([], max_new_tokens=NEW)
    with pytest.raises(InputError):
        eng.generate_batch("one string", max_new_tokens=NEW)
    with pytest.raises(InputError, match="branches"):
        eng.submit(prompts[0], strategy="tree", branches=0)  # checked before it runs


def test_every_strategy_shares_one_main_call(eng, prompts, ref):
    """Six requests, one per strategy, in one scheduler: each step is one main call carrying
    all of them (a tree as one row), and every request stays exact."""
    kinds = [
        ("greedy", {}),
        ("assisted", {"draft_tokens": 4, "threshold": 0.3}),
        ("stairs", {}),
        ("tree", {"branches": 3, "draft_tokens": 2}),
        ("lookup", {}),
        ("staged", {"draft_tokens": 5}),
    ]
    sched = eng._scheduler()
    reqs = []
    for p, (name, options) in zip(prompts[20:26], kinds):
        reqs.append(eng._request(eng.plan(p, name, NEW, **options)))
        sched.add(reqs[-1])
    while sched.busy:
        sched.step()
    assert [r.seq[1:] for r in reqs] == ref[20:26]
    calls = [r.counter.main_calls for r in reqs]
    assert sched.call_count == max(calls) and sum(calls) > 2 * sched.call_count  # shared calls
    assert all(r.counter.accepted > 0 for r in reqs[1:])
    assert max(t for _, t in sched.calls) >= 7  # the tree row: pending + 3 paths x 2


def test_tree_row_equals_its_paths_fed_alone(eng, prompts, ref):
    """The cache's tree interface: two paths in one row give each path's logits as a plain row
    does, and keep() leaves the row as if only the kept path had been fed."""
    sched = eng._scheduler()
    cache = sched.main
    a, b, d = (eng._request(eng.plan(prompts[0], "greedy", 8)) for _ in range(3))
    sched._encode(cache, [a, b, d])
    start, (t1, t2, x, *good) = eng.main.start_id, ref[0][:7]
    other = [(t + 7) % 500 + 3 for t in good[:3]]  # a wrong path
    c = a.counter
    cache.run(np.array([[start, t1, t2]] * 3), np.array([3, 3, 3]), c)
    # row a: pending x, then path `other` and path `good`, both after x; rows b, d: each path
    # alone after x
    tokens = np.array([[x, *other, *good[:3]], [x, *good[:3], 0, 0, 0], [x, *other, 0, 0, 0]])
    logits = cache.run(tokens, np.array([7, 4, 4]), c, [[2, 3, 4, 5, 3, 7, 8], None, None])
    np.testing.assert_allclose(logits[0, [0, 4, 5, 6]], logits[1, :4], atol=1e-4)
    np.testing.assert_allclose(logits[0, :4], logits[2, :4], atol=1e-4)
    cache.keep(a, 3, [3, 7, 8])  # trunk of 3, then pending + good[:2]
    cache.rewind(b, 6)
    cache.remove(d)
    assert cache.length(a) == cache.length(b) == 6
    assert list(cache.pos[0, :8]) == list(range(8)) and cache.trunk[0] == 6
    nxt = cache.run(np.array([[good[2]], [good[2]]]), np.array([1, 1]), c)
    np.testing.assert_allclose(nxt[0], nxt[1], atol=1e-4)
    assert int(nxt[0, 0].argmax()) == good[3]


@pytest.mark.parametrize("budget", [8, 24])
def test_token_budget_is_never_exceeded(eng, prompts, ref, budget):
    sched = eng._scheduler(budget)
    reqs = []
    for i, p in enumerate(prompts[:10]):
        kind = [("greedy", {}), ("assisted", {"draft_tokens": 6}), ("tree", {"branches": 3})][i % 3]
        reqs.append(eng._request(eng.plan(p, kind[0], NEW, **kind[1])))
        sched.add(reqs[-1])
    while sched.busy:
        sched.step()
    assert [r.seq[1:] for r in reqs] == ref[:10]
    assert max(rows * tokens for rows, tokens in sched.calls) <= budget


@pytest.mark.parametrize("variant", ["v1_0", "v1_1"])
@pytest.mark.parametrize("assistant", ["self", "random"])
def test_tiny_self_and_random_assistant_batched(tiny_models, variant, assistant):
    m = tiny_models[variant]
    eng = Engine.load(m["main"], assistant=m["main"] if assistant == "self" else m["random"])
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 300, int(n)).tolist() + [1] for n in rng.integers(3, 40, 7)]
    ref = [eng.generate(p, max_new_tokens=20).token_ids for p in prompts]
    for strategy, options in [
        ("assisted", {"draft_tokens": 3}),
        ("tree", {"draft_tokens": 3, "branches": 2}),
        ("staged", {"draft_tokens": 4}),
    ]:
        out = eng.generate_batch(prompts, strategy=strategy, max_new_tokens=20, **options)
        assert [r.token_ids for r in out] == ref, strategy
        acc = sum(r.stats.accepted for r in out) / max(1, sum(r.stats.drafted for r in out))
        assert acc == 1.0 if assistant == "self" else acc < 0.5


def test_folder_without_the_masked_graphs_is_refused_in_one_line(tiny_models, tmp_path):
    """The engine runs one decoder graph: a folder without it says what is missing at load."""
    import json
    import shutil

    folder = shutil.copytree(tiny_models["v1_1"]["main"], tmp_path / "m")
    manifest = json.loads((folder / "stairs.json").read_text())
    for name in ("decoder_masked_model.onnx", "cross_kv_model.onnx"):
        (folder / name).unlink()
        del manifest["files"][name]
    (folder / "stairs.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFileError, match="missing decoder_masked_model.onnx, cross_kv_model"):
        Engine.load(folder)


def test_auto_speculates_by_batch_size(eng, prompts, ref, monkeypatch):
    """Batched auto drafts by the number of active requests: on alone, off while 8 share calls
    (the assistant's encoder then waits until a request drafts)."""
    assert eng.auto_table()[1] > 0
    monkeypatch.setattr(eng, "auto_table", lambda: {1: 4, 8: 0})
    big = eng.generate_batch(prompts[:8], strategy="auto", max_new_tokens=NEW)
    one = eng.generate_batch(prompts[:1], strategy="auto", max_new_tokens=NEW)
    assert [r.token_ids for r in big] == ref[:8] and one[0].token_ids == ref[0]
    assert one[0].stats.drafted > 2 * one[0].stats.main_calls
    assert sum(r.stats.drafted for r in big) < sum(r.stats.main_calls for r in big)


def test_cli_batch_equals_one_at_a_time(pycode_pair, tmp_path, capsys):
    import json

    from conftest import PROMPTS

    from engine.cli import main as generate_cli

    main, draft = pycode_pair
    f = tmp_path / "p.jsonl"
    f.write_text("".join(PROMPTS.read_text().splitlines(keepends=True)[:5]))
    args = ["--main", str(main), "--assistant", str(draft), "--prompts", str(f), "--json"]
    args += ["--strategy", "assisted", "--max-new-tokens", "16"]
    assert generate_cli(args) == 0
    one = [json.loads(x)["token_ids"] for x in capsys.readouterr().out.splitlines()]
    assert generate_cli(args + ["--batch", "3"]) == 0
    three = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["token_ids"] for r in three] == one and [r["prompt"] for r in three] == [
        1,
        2,
        3,
        4,
        5,
    ]
    assert three[0]["stats"]["mean_batch_rows"] > 1


def test_tune_measures_batched_auto_per_size(tiny_models, tmp_path):
    import shutil

    from engine.cli import tune_main

    main = shutil.copytree(tiny_models["v1_1"]["main"], tmp_path / "main")
    f = tmp_path / "p.jsonl"
    f.write_text('{"text": "def f(x):"}\n{"text": "import os"}\n')
    args = ["--main", str(main), "--assistant", str(main), "--prompts", str(f), "-n", "2"]
    assert tune_main(args + ["--max-new-tokens", "8", "--batch-sizes", "1,2"]) == 0
    eng = Engine.load(main, assistant=main)
    table = eng.auto_table()
    assert {1, 2} <= set(table) and all(0 <= k <= 5 for k in table.values())
    assert {n: k for n, k in table.items() if n > 2} == {5: 0}  # the default's, beyond 2
    out = eng.generate_batch([[5, 6, 1], [7, 1]], strategy="auto", max_new_tokens=8)
    assert [r.token_ids for r in out] == [
        eng.generate(p, max_new_tokens=8).token_ids for p in ([5, 6, 1], [7, 1])
    ]


def test_handle_can_be_read_after_result_and_by_many(eng, prompts, ref):
    h = eng.submit(prompts[0], max_new_tokens=NEW)
    results = []
    threads = [threading.Thread(target=lambda: results.append(h.result(60))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.token_ids for r in results] == [ref[0]] * 3
    assert [t for toks in h.tokens() for t in toks] == ref[0]  # streaming after result() ends


def test_a_failing_encoder_fails_only_the_joining_requests(eng, prompts, ref, monkeypatch):
    sched = eng._scheduler()
    ok = eng._request(eng.plan(prompts[0], "greedy", NEW))
    sched.add(ok)
    sched.step()  # ok is active now
    real = eng.assistant.run

    def broken(role, feed, counter):
        if role == "encoder":
            raise RuntimeError("encoder exploded")
        return real(role, feed, counter)

    monkeypatch.setattr(eng.assistant, "run", broken)
    bad = eng._request(eng.plan(prompts[1], "assisted", NEW))
    sched.add(bad)
    while sched.busy:
        sched.step()
    assert isinstance(bad.error, EngineError) and "encoder exploded" in str(bad.error)
    assert bad.finished.is_set() and ok.error is None and ok.seq[1:] == ref[0]
    assert not sched.main.owners and not sched.asst.owners  # no orphaned rows


def test_batch_memory_is_bounded(eng, prompts, ref):
    """Requests wait while the caches' worst case would not fit; one that cannot fit alone fails
    with InputError; the others are served, exact."""
    sched = eng._scheduler()
    reqs = [eng._request(eng.plan(p, "greedy", NEW)) for p in prompts[:6]]
    cap, enc = max(r.max_length() for r in reqs), max(len(r.ids) for r in reqs)
    two_rows = sched.main.nbytes(2, cap, enc) + sched.asst.nbytes(2, cap, enc)
    sched.memory_bytes = int(1.6 * (two_rows + 2 * 2 * eng.main.vocab_size * 4))
    for r in reqs:
        sched.add(r)
    while sched.busy:
        sched.step()
    assert [r.seq[1:] for r in reqs] == ref[:6]
    assert max(rows for rows, _ in sched.calls) == 2
    sched.memory_bytes = 1 << 20
    lone = eng._request(eng.plan(prompts[0], "greedy", NEW))
    sched.add(lone)
    sched.step()
    assert isinstance(lone.error, InputError) and "do not fit" in str(lone.error)


def test_auto_default_by_dtype_and_measured_tables_extended():
    from types import SimpleNamespace as NS

    from engine.scheduler import DEFAULT_AUTO_K, beyond_measured, default_auto_k

    fp32 = DEFAULT_AUTO_K["fp32"]
    assert default_auto_k(NS(provider="cpu", manifest=None)) == fp32  # no stairs.json
    for dtype in ("fp16", "fp8", ["int4"], None):  # fp16, unknown and damaged: as fp32
        assert default_auto_k(NS(provider="cpu", manifest={"dtype": dtype})) == fp32
    assert default_auto_k(NS(provider="cpu", manifest={"dtype": "int4"})) == {1: 3, 2: 0}
    assert default_auto_k(NS(provider="cuda", manifest={"dtype": "int4"})) == {1: 4}
    assert beyond_measured({1: 5}, fp32) == {1: 5, 2: 3, 5: 0}
    assert beyond_measured({1: 2}, fp32) == {1: 2, 2: 2, 5: 0}  # never longer than measured
    assert beyond_measured({1: 0}, fp32) == {1: 0, 2: 0, 5: 0}  # lost at 1: off above too
    assert beyond_measured({1: 4, 8: 3}, fp32) == {1: 4, 8: 3}  # measured past the default
    assert beyond_measured({}, fp32) == fp32


def test_damaged_auto_table_is_ignored(eng, monkeypatch):
    from engine import scheduler, tune

    for bad in ([1, 2], {"8": "x"}, {"1": 99}):
        monkeypatch.setattr(tune, "load", lambda e, bad=bad: {"batch_auto_k": bad})
        assert eng.auto_table() == scheduler.DEFAULT_AUTO_K["fp32"]


def test_rewound_and_reused_slots_hold_zeros(eng, prompts, ref):
    """Mid-generation, every slot past a row's length holds zeros (rejected drafts rewound
    away, a tree's losing paths dropped) and every used slot holds key/values."""
    sched = eng._scheduler()
    reqs = [
        eng._request(eng.plan(p, name, NEW, **o))
        for p, (name, o) in zip(
            prompts[:3], [("assisted", {"draft_tokens": 6}), ("tree", {}), ("staged", {})]
        )
    ]
    for r in reqs:
        sched.add(r)
    for _ in range(6):
        sched.step()
    for c in (sched.main, sched.asst):
        for i, o in enumerate(c.owners):
            n = c.length(o)
            assert all(not a[i, :, n:].any() for a in c.self_kv)
            assert all(np.abs(a[i, :, :n]).sum(axis=(0, 2)).all() for a in c.self_kv)
    while sched.busy:
        sched.step()
    assert [r.seq[1:] for r in reqs] == ref[:3]


def test_a_failed_tree_row_leaves_nothing_behind(eng, prompts, ref):
    """A tree request that fails after its tree call (non-finite main logits) retires with its
    error; the next request in that row starts plain and is exact."""
    from engine.errors import NonFiniteLogitsError

    # the next prompt no longer than the victim's: its row is reused, not reallocated
    v, o = sorted(range(6), key=lambda i: -len(prompts[i]))[:2]
    sched = eng._scheduler()
    victim = eng._request(eng.plan(prompts[v], "tree", NEW, branches=2, draft_tokens=3))
    sched.add(victim)
    run = sched.main.run

    def poisoned(tokens, counts, counter, parents=None, reduce=False):
        ids, bad = run(tokens, counts, counter, parents, reduce)
        if parents is not None and victim.counter.main_calls >= 2:
            bad = bad.copy()
            bad[0] = True  # row 0's logits were NaN
        return ids, bad

    sched.main.run = poisoned
    while sched.busy:
        sched.step()
    assert isinstance(victim.error, NonFiniteLogitsError) and victim.counter.main_calls == 2
    sched.main.run = run
    ok = eng._request(eng.plan(prompts[o], "greedy", NEW))
    sched.add(ok)
    sched.step()
    c = sched.main
    assert (c.pos[0] == np.arange(c.capacity)).all() and c.trunk[0] == c.length(ok)
    while sched.busy:
        sched.step()
    assert ok.error is None and ok.seq[1:] == ref[o]


def test_engine_loads_each_weight_once(eng, prompts, ref):
    """One decoder graph: the encoder, the masked decoder and the cross key/value graph are the
    only sessions; generate/stream/generate_batch are one path, exact for every strategy."""
    for model in (eng.main, eng.assistant):
        assert set(model.sessions) == {"encoder", "decoder", "cross"}
        graphs = ["encoder_model.onnx", "decoder_masked_model.onnx", "cross_kv_model.onnx"]
        for s, graph in zip(model.sessions.values(), graphs, strict=True):
            path = Path(s._model_path)  # the graph, or its prepacked entry in the weights cache
            assert path.name == graph or path.parent.name.startswith(graph[: -len(".onnx")] + "-")
    assert "".join(eng.stream(prompts[0], max_new_tokens=NEW)) == eng.tokenizer.decode(ref[0])
    for strategy in ("tree", "stairs", "staged"):
        assert eng.generate(prompts[1], strategy=strategy, max_new_tokens=NEW).token_ids == ref[1]
