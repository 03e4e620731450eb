"""bench helpers: tree_sim on hand-written rank sequences, the CTranslate2 worker's errors."""

from __future__ import annotations

import numpy as np
import pytest

from bench.tree_sim import best_tree, linear, path_probs, replay


def flat(ms):
    return lambda *a, **k: ms


def test_replay_linear_counts_calls_and_tokens():
    # K=2: accepts (0, 0) then stops at depth 2 -> 3 tokens; (0, 5) -> 2 tokens; last 1 token
    ranks = [np.array([0, 0, 1, 0, 5, 0])]
    r = replay(ranks, linear(2), flat(10.0), flat(1.0), encoder_ms=0.0)
    assert r["tokens_per_main_call"] == 2.0  # 6 tokens in 3 calls
    assert r["ms_per_prompt"] == 3 * (10.0 + 1.0 + 1.0)  # each round: verify + 2 draft calls


def test_replay_tree_accepts_second_choices():
    ranks = [np.array([1, 0, 1, 0])]
    # linear: miss at 0 (1 token), accept 1 at 1 (2 tokens), last token (1) -> 4 in 3 calls
    assert replay(ranks, linear(3), flat(1), flat(0), 0)["tokens_per_main_call"] == 4 / 3
    tree = {(0,), (1,), (1, 0), (1, 0, 1)}
    assert replay(ranks, tree, flat(1), flat(0), 0)["tokens_per_main_call"] == 4.0  # one call


def test_best_tree_takes_the_likeliest_paths():
    cnt, n = path_probs([np.array([1, 0, 1, 0, 1, 2, 2, 2])])
    assert best_tree(cnt, n, 1) == {(1,)}  # rank 1 is the commonest first rank here
    tree = best_tree(cnt, n, 3)
    assert (1,) in tree and len(tree) == 3
    assert all(x[:-1] in tree for x in tree if len(x) > 1)  # a tree: every parent is in it


def test_ct2_worker_reports_a_failing_child(tmp_path):
    pytest.importorskip("ctranslate2")
    from bench.peers import CT2Worker

    with pytest.raises(RuntimeError, match="config.json|No such file|not"):
        CT2Worker(tmp_path / "missing-model", 1, "float32", tmp_path)


def test_quiet_snapshot_counts_a_busy_process_and_excludes_given_pids():
    import os
    import subprocess
    import sys
    import time

    from bench import quiet

    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)  # let it start
        me = {os.getpid()}
        before = quiet.snapshot(exclude=me)
        time.sleep(1.0)
        after = quiet.snapshot(exclude=me)
        # Counted as another process when only this one is excluded ...
        assert quiet.others_cpu(before, after).get(busy.pid, 0.0) > 0.2
        # ... and not when its pid is excluded (as the bench excludes its own CT2 workers).
        tree = quiet.snapshot()
        assert busy.pid in tree.own  # default: this process and its descendants
        b2 = quiet.snapshot(exclude=me | {busy.pid})
        time.sleep(0.3)
        a2 = quiet.snapshot(exclude=me | {busy.pid})
        assert busy.pid not in quiet.others_cpu(b2, a2)
        assert a2.procs[busy.pid].cpu_s > before.procs[busy.pid].cpu_s
    finally:
        busy.kill()
        busy.wait()


def fake_snap(t, cpu, load1=0.1, uptime=1000.0):
    """A snapshot in which pid 4242 ('spinner') has used `cpu` seconds; pid 1 is ours."""
    from bench.quiet import Proc, Snapshot

    procs = {
        1: Proc(ppid=0, start_s=1.0, cpu_s=t, name="bench"),
        4242: Proc(ppid=0, start_s=5.0, cpu_s=cpu, name="spinner"),
    }
    return Snapshot(t=t, uptime_s=uptime + t, load1=load1, procs=procs, own=frozenset({1}))


def test_a_not_quiet_run_is_marked_in_results_and_report():
    from bench import quiet, report
    from bench.run import add_quiet

    m = quiet.Monitor(threshold=0.10, load_threshold=0.5, snap=lambda: fake_snap(0.0, 0.0))
    m.record("stairs/greedy", fake_snap(0.0, 0.0), fake_snap(1.0, 0.02))  # 0.02 CPU-s/s: quiet
    m.record("ct2/float32", fake_snap(1.0, 0.02), fake_snap(2.0, 0.52))  # 0.50 CPU-s/s: not
    s = m.summary()
    assert not s["ok"]
    assert s["methods"]["interleaved"]["stairs/greedy"]["quiet"]
    assert not s["methods"]["interleaved"]["ct2/float32"]["quiet"]
    assert any("ct2/float32" in r and "spinner (pid 4242)" in r for r in s["reasons"])
    rows = [
        {"method": "stairs/greedy", "kind": "engine", "tokens_per_s": 100.0, "p50_ms": 1.0,
         "p90_ms": 2.0, "mismatches": 0, "reference": "stairs/greedy"},
        {"method": "ct2/float32", "kind": "peer", "tokens_per_s": 50.0, "p50_ms": 1.0,
         "p90_ms": 2.0, "mismatches": 0, "reference": "stairs/greedy"},
    ]  # fmt: skip
    add_quiet(rows, s)
    assert rows[0]["quiet"] and not rows[1]["quiet"]
    res = {
        "settings": {"prompts": 1, "max_new_tokens": 4, "threads": 1, "rounds": 1},
        "machine": {"platform": "test", "onnxruntime": "x"},
        "quiet": s,
        "rows": rows,
    }
    md = report.markdown(res)
    assert "Machine was NOT quiet" in md and "**0.50**" in md
    # A quiet run says so instead.
    m2 = quiet.Monitor(snap=lambda: fake_snap(0.0, 0.0))
    m2.record("stairs/greedy", fake_snap(0.0, 0.0), fake_snap(1.0, 0.0))
    assert m2.summary()["ok"]
    assert "Machine was quiet" in report.markdown({**res, "quiet": m2.summary()})


def test_quiet_start_check_uses_the_load_average_less_our_share():
    from bench import quiet

    snaps = iter([fake_snap(0.0, 0.0), fake_snap(0.0, 0.0), fake_snap(0.01, 0.0, load1=3.0)])
    m = quiet.Monitor(threshold=0.10, load_threshold=0.5, snap=lambda: next(snaps))
    c = m.check(0.0)
    assert not c["quiet"] and c["load_excess"] > 0.5  # others idle, but load 3 on an idle us
    m.start_check = c
    assert not m.summary()["ok"] and "at the start" in m.summary()["reasons"][0]


def test_alone_ratios_are_alone_against_alone():
    from bench.run import add_alone

    rows = [
        {"method": "hf/greedy", "tokens_per_s": 50.0},
        {"method": "ct2/float32", "tokens_per_s": 20.0},
        {"method": "stairs/greedy", "tokens_per_s": 100.0},
        {"method": "stairs/lookup", "tokens_per_s": 150.0},
    ]
    alone = {
        "hf/greedy": {"tokens_per_s": 60.0, "seconds": 1.0, "outputs_differ": 0},
        "ct2/float32": {"tokens_per_s": 300.0, "seconds": 1.0, "outputs_differ": 0},
        "stairs/greedy": {"tokens_per_s": 120.0, "seconds": 1.0, "outputs_differ": 0},
    }
    add_alone(rows, alone)
    assert rows[2]["speedup_alone_vs_hf_greedy"] == 2.0
    assert rows[2]["speedup_alone_vs_ct2_float32"] == 0.4
    assert "tokens_per_s_alone" not in rows[3]


@pytest.mark.parametrize(
    "args",
    [["--quiet-threshold", "-1"], ["--wait-quiet", "99999"], ["--quiet-load", "nan"], ["-n", "0"]],
)
def test_bench_cli_rejects_bad_quiet_options_before_loading(args, tmp_path, capsys):
    from bench.cli import main

    with pytest.raises(SystemExit) as e:
        main([*args, "--main", str(tmp_path / "absent"), "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    assert args[0] in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
