"""stairs-bench: the CTranslate2 worker's errors, the quiet-machine monitor, the runs, the
command's subcommands, their help and default output folders."""

from __future__ import annotations

import json

import pytest


def test_ct2_worker_reports_a_failing_child(tmp_path):
    pytest.importorskip("ctranslate2")
    from bench.peers import CT2Worker

    with pytest.raises(RuntimeError, match="config.json|No such file|not"):
        CT2Worker(tmp_path / "missing-model", 1, "float32", tmp_path)


def _snapshot_after(pid: int, since, cpu_s: float, exclude: set):
    """A snapshot once pid has used cpu_s CPU seconds more than in `since` (polled, whatever
    share of the CPU it gets; a hang guard only)."""
    import time

    from bench import quiet

    base = since.procs[pid].cpu_s if pid in since.procs else 0.0
    end = time.monotonic() + 300
    while True:
        snap = quiet.snapshot(exclude=exclude)
        if pid in snap.procs and snap.procs[pid].cpu_s - base >= cpu_s:
            return snap
        assert time.monotonic() < end, f"pid {pid} used no CPU in 300 s"
        time.sleep(0.05)


def test_quiet_snapshot_counts_a_busy_process_and_excludes_given_pids():
    import os
    import subprocess
    import sys

    from bench import quiet

    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        me = {os.getpid()}
        before = _snapshot_after(busy.pid, quiet.snapshot(exclude=me), 0.0, me)  # it runs
        after = _snapshot_after(busy.pid, before, 0.2, me)
        # Counted as another process when only this one is excluded ...
        assert quiet.others_cpu(before, after).get(busy.pid, 0.0) >= 0.2
        # ... and not when its pid is excluded (as the bench excludes its own CT2 workers).
        tree = quiet.snapshot()
        assert busy.pid in tree.own  # default: this process and its descendants
        b2 = quiet.snapshot(exclude=me | {busy.pid})
        a2 = _snapshot_after(busy.pid, b2, 0.1, me | {busy.pid})
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


# ---- batch mode (stairs-bench batch): tables, plot, interleaving, the batched peers ----


def batch_results(mismatch: int = 0) -> dict:
    """Hand-written batch-mode results: two sizes, an engine row, CT2 and a failed HF row."""
    rows = [
        {"method": "stairs/greedy", "kind": "engine", "batch_size": 1, "tokens_per_s": 150.0,
         "p50_ms": 400.0, "p90_ms": 500.0, "mismatches_vs_engine_greedy_b1": 0,
         "failed_prompts": 0, "x_ct2_float32": 1.5},
        {"method": "stairs/greedy", "kind": "engine", "batch_size": 4, "tokens_per_s": 300.0,
         "p50_ms": 800.0, "p90_ms": 900.0, "mismatches_vs_engine_greedy_b1": mismatch,
         "failed_prompts": 0, "x_ct2_float32": 1.2},
        {"method": "ct2/float32", "kind": "peer", "batch_size": 1, "tokens_per_s": 100.0,
         "p50_ms": 600.0, "p90_ms": 700.0, "mismatches_vs_engine_greedy_b1": 0,
         "failed_prompts": 0, "x_ct2_float32": 1.0},
        {"method": "ct2/float32", "kind": "peer", "batch_size": 4, "tokens_per_s": 250.0,
         "p50_ms": 1000.0, "p90_ms": 1100.0, "mismatches_vs_engine_greedy_b1": 0,
         "failed_prompts": 0, "x_ct2_float32": 1.0},
        {"method": "hf/greedy", "kind": "peer", "batch_size": 1, "error": "ImportError: no torch"},
    ]  # fmt: skip
    return {
        "mode": "batch",
        "settings": {"prompts": 8, "max_new_tokens": 16, "threads": 2, "batch_sizes": [1, 4]},
        "machine": {"platform": "test", "onnxruntime": "x"},
        "rows": rows,
        "memory": [
            {"batch_size": 1, "process_max_rss_mb": 900.0, "ct2/float32_worker_max_rss_mb": 300.0},
            {"batch_size": 4, "process_max_rss_mb": 950.0, "ct2/float32_worker_max_rss_mb": 320.0},
        ],
        "errors": {"hf/greedy": "ImportError: no torch"},
    }


def test_batch_table_shows_each_method_at_each_size_against_ct2():
    from bench import report

    md = report.batch_markdown(batch_results())
    assert "| stairs/greedy | 150 (1.50x) | 300 (1.20x) |" in md  # the tok/s pivot
    assert "| 4 | stairs/greedy | 300 | 1.20 | – | 800 | 900 | 0 | – | – |" in md
    assert "| 1 | hf/greedy | failed: ImportError: no torch" in md
    assert "B=4: stairs/greedy 300 tok/s = 1.20x CT2 float32 (250)" in md
    assert "| 4 | 950 | 320 |" in md  # peak RSS per size, the CT2 worker's own column
    assert "Quiet: not recorded" in md
    # A mismatch is shown in bold, never as a plain count.
    assert "| **2** |" in report.batch_markdown(batch_results(mismatch=2))


def test_batch_plot_draws_one_line_per_method(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench import report

    made = []
    real_savefig = plt.Figure.savefig

    def spy(fig, *a, **k):
        made.append([line.get_label() for line in fig.axes[0].get_lines()])
        return real_savefig(fig, *a, **k)

    plt.Figure.savefig = spy
    try:
        assert report.batch_plots(batch_results(mismatch=1), tmp_path) == ["batch_throughput.png"]
    finally:
        plt.Figure.savefig = real_savefig
    png = tmp_path / "batch_throughput.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert made == [["stairs/greedy (output differs)", "ct2/float32"]]  # failed hf: no line
    assert not list(tmp_path.glob(".*tmp*"))  # written beside and renamed
    assert report.batch_plots({**batch_results(), "rows": []}, tmp_path / "none") == []


def test_batch_runs_interleave_methods_batch_by_batch():
    from bench.batch import BatchMethod, batch_rows, run_sizes

    calls = []

    def fake(name, bad=False):
        def fn(batch):
            calls.append((name, tuple(p[0] for p in batch)))
            outs = [[p[0], 7] for p in batch]
            if bad and len(batch) > 1:
                outs[0] = [9]
            return outs, None

        return fn

    def boom(batch):
        if len(batch) > 1:
            raise RuntimeError("out of memory")
        return [[p[0], 7] for p in batch], None

    ms = [
        BatchMethod("stairs/greedy", fake("a")),
        BatchMethod("hf/greedy", fake("b", bad=True), "peer"),
        BatchMethod("x/boom", boom, "peer"),
    ]
    prompts = [[i] for i in range(5)]
    run_sizes(ms, prompts, [1, 2])
    # batch 1: 2 warm-ups + 5 x 2 calls; batch 2: 2 warm-ups (boom fails its own), then batch by
    # batch, the method order rotated: both methods on (0, 1) before either sees (2, 3)
    assert len(calls) == 12 + 2 + 6
    assert calls[14:] == [
        ("a", (0, 1)), ("b", (0, 1)), ("b", (2, 3)), ("a", (2, 3)), ("a", (4,)), ("b", (4,)),
    ]  # fmt: skip
    rows = {(r["method"], r["batch_size"]): r for r in batch_rows(ms, 5, [1, 2])}
    r = rows["stairs/greedy", 2]
    assert r["tokens"] == 10 and r["batches"] == 3
    assert r["mismatches_vs_engine_greedy_b1"] == 0 and r["mismatches_vs_hf_greedy_b1"] == 0
    assert rows["hf/greedy", 2]["mismatches_vs_engine_greedy_b1"] == 2  # one per pair of 2
    assert "out of memory" in rows["x/boom", 2]["error"]
    assert "tokens_per_s" in rows["x/boom", 1]  # what it measured before failing is kept


def test_batch_rows_show_this_process_cpu_while_a_worker_peer_runs(monkeypatch):
    """A peer in a worker process waits here without CPU; a pool left spinning in this process
    would show in its this_process_cpu_per_s (process CPU over wall time of its calls), and the
    report names the worst. The clocks are the test's, so no machine's speed enters."""
    from types import SimpleNamespace

    from bench import batch
    from bench.batch import BatchMethod, batch_rows, run_sizes
    from bench.report import _peer_leak_lines

    clock = {"wall": 0.0, "cpu": 0.0}
    fake = SimpleNamespace(
        perf_counter=lambda: clock["wall"], process_time=lambda: clock["cpu"], sleep=lambda s: None
    )
    monkeypatch.setattr(batch, "time", fake)

    def burn(cpu_s, wall_s):
        def fn(prompts):
            clock["cpu"] += cpu_s
            clock["wall"] += wall_s
            return [[p[0]] for p in prompts], None

        return fn

    ms = [
        BatchMethod("stairs/greedy", burn(0.02, 0.02)),
        BatchMethod("ct2/float32", burn(0, 0.02), "peer", close=id),
        BatchMethod("ct2/int8", burn(0.01, 0.02), "peer", close=id),  # leaks: the worst
    ]
    run_sizes(ms, [[i] for i in range(3)], [1])
    rows = {r["method"]: r for r in batch_rows(ms, 3, [1])}
    cpu = {k: r["this_process_cpu_per_s"] for k, r in rows.items()}
    assert "worker" not in rows["stairs/greedy"] and rows["ct2/float32"]["worker"]
    assert cpu == pytest.approx({"stairs/greedy": 1.0, "ct2/int8": 0.5, "ct2/float32": 0.0})
    (line,) = [x for x in _peer_leak_lines(list(rows.values())) if x]
    assert "ct2/int8 at B=1" in line


@pytest.mark.parametrize(
    "args, msg",
    [
        (["--batch-sizes", "1,0"], "--batch-sizes"),
        (["--batch-sizes", "1,x"], "--batch-sizes"),
        (["--batch-sizes", "1", "--max-batch-tokens", "0"], "--max-batch-tokens"),
        (["--shared-thread-pool"], "--shared-thread-pool needs --batch-sizes"),
        (["--no-single"], "--no-single needs --batch-sizes"),
    ],
)
def test_batch_cli_rejects_bad_options_before_loading(args, msg, tmp_path, capsys):
    from bench.cli import main

    with pytest.raises(SystemExit) as e:
        main([*args, "--main", str(tmp_path / "absent"), "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_batch_mode_refuses_unbatched_peers_and_too_few_prompts(tmp_path, capsys):
    from bench.cli import main

    out = tmp_path / "out"
    assert main(["--batch-sizes", "1", "--peers", "optimum", "--out", str(out)]) == 2
    assert "batch mode runs the peers hf, ct2" in capsys.readouterr().err
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"context": "def f(x):"}\n{"context": "import os"}\n')
    args = ["--batch-sizes", "1,4", "--prompts", str(prompts), "--out", str(out)]
    assert main(args) == 2
    assert "batch size 4 is more than the 2 prompts" in capsys.readouterr().err
    assert not out.exists()


def test_ct2_batched_worker_equals_its_batch_1_greedy(tmp_path, pycode_prompts):
    pytest.importorskip("ctranslate2")
    from conftest import PYCODE_MAIN

    from bench.peers import CT2Worker

    prompts = pycode_prompts[:3]
    assert len({len(p) for p in prompts}) > 1  # different lengths: the batch is padded
    ct = CT2Worker(PYCODE_MAIN, 1, "float32", tmp_path)
    try:
        one = [ct.greedy(p, 12) for p in prompts]
        assert ct.greedy_batch(prompts, 12, 3) == one
        assert ct.greedy_batch(prompts, 12, 2) == one  # split into calls of at most 2
        assert all(len(o) > 0 for o in one)
        assert ct.max_rss_mb() > 10  # the worker's own peak, in MiB
    finally:
        ct.close()
    assert not ct.proc.is_alive()
    # the converted model only: the conversion's temporary folders are gone
    assert [p.name for p in tmp_path.iterdir()] == ["ct2-float32"]


def test_hf_padded_batch_equals_hf_batch_1_greedy(pycode_prompts):
    pytest.importorskip("torch")
    from conftest import PYCODE_MAIN

    from bench.peers import HF

    prompts = pycode_prompts[:3]
    assert len({len(p) for p in prompts}) > 1
    hf = HF(PYCODE_MAIN, None, 1)
    one = [hf.greedy(p, 12) for p in prompts]
    assert hf.greedy_batch(prompts, 12) == one
    assert all(len(o) > 0 for o in one)


def test_batch_bench_end_to_end_on_a_tiny_model(tiny_models, tmp_path, monkeypatch, capsys):
    from bench import batch
    from bench.cli import main

    m = tiny_models["v1_1"]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        "".join(f'{{"context": "def f{i}(x):\\n    return x + {i}"}}\n' for i in range(5))
    )
    out = tmp_path / "out"
    common = ["--main", str(m["main"]), "--assistant", str(m["random"]), "--prompts", str(prompts)]
    common += ["-n", "5", "--max-new-tokens", "6", "--threads", "1", "--wait-quiet", "0", "-q"]
    args = [*common, "--batch-sizes", "1,2", "--peers", "hf", "--out", str(out)]
    args += ["--strategies", "greedy;assisted:draft_tokens=3;lookup"]
    assert main(args) == 0
    res = __import__("json").loads((out / "results.json").read_text())
    rows = {(r["method"], r["batch_size"]): r for r in res["rows"]}
    assert set(rows) == {
        *((f"stairs/{s}", b) for s in ("greedy", "assisted:draft_tokens=3", "lookup") for b in (1, 2)),
        ("stairs/greedy (generate)", 1), ("hf/greedy", 1), ("hf/greedy", 2),
    }  # fmt: skip
    for r in res["rows"]:  # every method, every size: HF's tokens and the engine's agree
        assert r["mismatches_vs_engine_greedy_b1"] == 0 and r["mismatches_vs_hf_greedy_b1"] == 0
        assert r["failed_prompts"] == 0 and r["tokens"] > 0
    assert (
        rows["stairs/greedy", 2]["batches"] == 3 and rows["stairs/greedy", 2]["mean_batch_rows"] > 1
    )
    assert [mm["batch_size"] for mm in res["memory"]] == [1, 2]
    assert "| stairs/greedy |" in (out / "results.md").read_text()
    assert (out / "batch_throughput.png").stat().st_size > 1000

    # --no-single: no generate() row
    out3 = tmp_path / "out3"
    args = [*common, "--batch-sizes", "1", "--peers", "none", "--out", str(out3), "--no-single"]
    assert main([*args, "--strategies", "greedy;tree:draft_tokens=2,branches=2"]) == 0
    res = __import__("json").loads((out3 / "results.json").read_text())
    assert [r["method"] for r in res["rows"]] == [
        "stairs/greedy",
        "stairs/tree:draft_tokens=2,branches=2",
    ]
    assert res["settings"]["generate_row"] is False
    assert all(r["mismatches_vs_engine_greedy_b1"] == 0 for r in res["rows"])
    assert all(r["verify_ms_per_call"] > 0 and r["encoder_ms_per_request"] > 0 for r in res["rows"])

    # --require-quiet: a machine that never becomes quiet stops the run before the timed calls.
    class Noisy(batch.Monitor):
        def check(self, seconds=1.0):
            return {**super().check(0.0), "quiet": False}

    monkeypatch.setattr(batch, "Monitor", Noisy)
    out2 = tmp_path / "out2"
    args = [*common, "--batch-sizes", "1", "--peers", "none", "--out", str(out2), "--require-quiet"]
    assert main(args) == 2
    assert "machine not quiet" in capsys.readouterr().err
    assert not (out2 / "results.json").exists()


def test_write_atomic_keeps_the_previous_file_when_writing_fails(tmp_path):
    from bench.common import save, write_atomic

    save({"a": 1}, tmp_path)
    target = tmp_path / "results.json"

    def broken(path):
        path.write_text('{"half')
        raise KeyboardInterrupt  # as Ctrl-C in the middle of a write

    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, broken)
    assert target.read_text() == '{\n  "a": 1\n}'
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary left
    write_atomic(tmp_path / "sub" / "x.png", lambda p: p.write_bytes(b"png"))
    assert (tmp_path / "sub" / "x.png").read_bytes() == b"png"
    write_atomic(tmp_path / "sub" / "b.bin", b"\x00\x01")
    assert (tmp_path / "sub" / "b.bin").read_bytes() == b"\x00\x01"


def test_load_bench_records_whether_the_machine_was_quiet(
    pycode_pair, tmp_path, capsys, monkeypatch
):
    from bench import load

    main, _ = pycode_pair
    servers = []
    start = load.start_server

    def spy(*args):
        servers.append(start(*args))
        return servers[-1]

    monkeypatch.setattr(load, "start_server", spy)
    out = tmp_path / "load"
    argv = ["--main", str(main), "--strategy", "greedy", "--clients", "1", "--duration", "1"]
    argv += ["--max-tokens", "4", "-n", "2", "--modes", "batched", "--wait-quiet", "0"]
    assert load.main([*argv, "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    [row] = res["rows"]
    assert row["requests"] >= 1 and row["mismatches"] == 0 and row["n_errors"] == 0
    # the level is watched, and the server (our child, busy all along) counts as ours
    level = res["quiet"]["methods"]["interleaved"]["batched clients=1"]
    assert row["others_cpu_per_s"] == level["others_cpu_per_s"]
    assert res["quiet"]["start"] is not None and level["own_cpu_per_s"] > 0
    assert not any(f"(pid {servers[0].pid})" in name for name, _ in level["top_others"])
    md = (out / "results.md").read_text()
    assert ("Machine was quiet" in md) == res["quiet"]["ok"]
    assert "others CPU/s" in md and sorted(p.name for p in out.iterdir()) == [
        "load.png",
        "results.json",
        "results.md",
    ]
    with pytest.raises(SystemExit) as e:
        load.main([*argv, "--wait-quiet", "-1", "--out", str(tmp_path / "never")])
    assert e.value.code == 2 and "--wait-quiet" in capsys.readouterr().err


def test_coldstart_bench_on_a_tiny_model(tiny_models, tmp_path):
    """stairs-bench coldstart end to end (warm runs only: a cold run drops the machine's page
    cache): every mode measured in its own process, the same text from each, the cache's entries
    built under --out, and a report naming the modes."""
    from bench import coldstart

    main = tiny_models["v1_1"]["main"]
    out = tmp_path / "cs"
    argv = ["--model", f"tiny={main}", "--repeat", "1", "--cold-repeat", "0", "--new", "6"]
    assert coldstart.main([*argv, "--wait-quiet", "0", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    (m,) = res["models"]
    assert set(m["modes"]) == {"plain warm", "build warm", "cache warm"}
    assert m["tokens_identical"] and m["text"]
    assert all(r["load_s"] > 0 and r["mem_done_Pss"] > 0 for r in m["modes"].values())
    assert len(list((out / "work" / "cache-tiny" / "graphs").iterdir())) == 3
    assert "| tiny |" in (out / "results.md").read_text()


def test_gpu_bench_runs_every_section_on_the_cpu(tiny_models, tmp_path):
    """stairs-bench gpu (the device cache's tables) end to end on the CPU provider: both back ends
    exact (0 mismatches against their own and the CPU's greedy), logits bit-identical across
    call shapes, and a step-cost and a throughput row per back end."""
    from conftest import PROMPTS

    from bench import gpu

    m = tiny_models["v1_1"]
    pair = f"tiny={m['main']},{m['random']}"
    argv = ["--pair", pair, "--prompts", str(PROMPTS), "--provider", "cpu", "-n", "3"]
    argv += ["--max-new-tokens", "6", "--reps", "1", "--wait-quiet", "0", "--budget-s", "0"]
    assert gpu.main([*argv, "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())["pairs"]["tiny"]
    assert {c["kv_cache"] for c in res["exact"]["cells"]} == {"device", "numpy"}
    assert all(c["vs_own_greedy"] == c["vs_cpu_greedy"] == 0 for c in res["exact"]["cells"])
    inv = res["exact"]["invariance"]
    assert all(i["bit_identical"] == i["rows_compared"] > 0 for i in inv)
    assert all(isinstance(p["device_ms"], float) for p in res["cost"]["points"])
    assert all(isinstance(p["resident_ms"], float) for p in res["cost"]["points"])
    assert {c["kv_cache"] for c in res["speed"]["cells"]} == {"device", "numpy"}
    assert "tokens/s" in (tmp_path / "results.md").read_text()


def test_bench_exits_1_naming_each_engine_cell_that_differs_from_its_own_greedy(
    tmp_path, monkeypatch, capsys
):
    """stairs-bench's status carries the promise: an engine row whose tokens differ from its
    main's own greedy fails the run and is named; a peer's differences (another
    implementation) are reported in the table only. Batch mode: an extra main's rows against
    that main's greedy, not the fp32 main's."""
    from bench import batch, cli, core, run

    def method(name, outs, kind="engine"):
        return core.Method(name, id, kind, seconds=[1.0] * 2, tokens=[3, 3], outputs=outs)

    table = core.rows(
        [
            method("hf/greedy", [[1], [2]], "peer"),
            method("stairs/greedy", [[1], [2]]),
            method("stairs/lookup", [[1], [9]]),
            method("ct2/int8", [[7], [2]], "peer"),
        ],
        2,
        1,
    )
    by = {r["method"]: r for r in table}
    assert by["stairs/lookup"]["mismatches_vs_engine_greedy"] == 1
    assert by["ct2/int8"]["mismatches"] == 1 and "mismatches_vs_engine_greedy" not in by["ct2/int8"]
    monkeypatch.setattr(run, "run_bench", lambda opts: {"rows": table, "quiet": {"ok": True}})
    argv = ["--main", str(tmp_path), "--out", str(tmp_path / "out"), "--wait-quiet", "0"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "mismatch: stairs/lookup: 1 prompts differ" in err and "ct2" not in err
    by["stairs/lookup"]["mismatches_vs_engine_greedy"] = 0
    assert cli.main(argv) == 0
    rows = [
        {"method": "stairs/greedy", "kind": "engine", "batch_size": 1,
         "mismatches_vs_engine_greedy_b1": 0},
        {"method": "stairs/auto@m-int8", "kind": "engine", "batch_size": 4,
         "mismatches_vs_engine_greedy_b1": 5, "mismatches_vs_own_greedy_b1": 2},
    ]  # fmt: skip
    monkeypatch.setattr(
        batch, "run_batch_bench", lambda opts: {"rows": rows, "quiet": {"ok": True}}
    )
    assert cli.main([*argv, "--batch-sizes", "1,4"]) == 1
    assert "stairs/auto@m-int8 at B=4: 2 prompts differ" in capsys.readouterr().err
    rows[1]["mismatches_vs_own_greedy_b1"] = 0  # 5 against the fp32 main: a quantized main's own
    assert cli.main([*argv, "--batch-sizes", "1,4"]) == 0


def test_a_failed_engine_cell_fails_the_bench_and_a_peer_never_does():
    """A batch cell that never ran, or whose prompts raised, proves nothing: it is a failure
    line like a mismatch; a peer's failures and mismatches are reported, never one."""
    from bench.core import engine_mismatches

    rows = [
        {"method": "stairs/greedy", "kind": "engine", "batch_size": 1, "failed_prompts": 0,
         "mismatches_vs_engine_greedy_b1": 0},
        {"method": "stairs/assisted", "kind": "engine", "batch_size": 4, "error": "boom"},
        {"method": "stairs/lookup", "kind": "engine", "batch_size": 8, "failed_prompts": 2,
         "first_error": "InputError: x", "mismatches_vs_engine_greedy_b1": 0},
        {"method": "ct2", "kind": "peer", "batch_size": 4, "error": "gone", "mismatches": 3},
    ]  # fmt: skip
    assert engine_mismatches(rows) == [
        "stairs/assisted at B=4: failed (boom)",
        "stairs/lookup at B=8: failed (InputError: x)",
    ]


# ---- the command: subcommands, help, where a run writes, what its report claims ----


def _parsers():
    """Every parser stairs-bench has: plain stairs-bench's and each subcommand's."""
    from bench import cli

    return {"stairs-bench": cli.parser()} | {
        name: cli.subcommand(name).parser() for name in cli.SUBCOMMANDS
    }


def test_every_subcommand_has_a_module_with_main_and_parser():
    import importlib

    from bench import cli

    assert list(cli.SUBCOMMANDS) == [
        "run", "batch", "load", "exact", "memory", "coldstart", "profile", "gpu", "export",
    ]  # fmt: skip
    for name, module in cli.SUBCOMMANDS.items():
        mod = importlib.import_module(module)
        assert callable(mod.main) and mod.parser().prog == f"stairs-bench {name}"


def test_help_gives_every_option_a_text_and_its_default():
    import argparse

    for name, p in _parsers().items():
        text = " ".join(p.format_help().split())  # unwrapped
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag = action.option_strings[-1]
            assert action.help, f"{name} {flag}: no help text"
            if action.default not in (None, False, []):
                assert "default" in p._get_formatter()._get_help_string(action), (name, flag)
        assert "%(" not in text and "(default: None)" not in text, name


def test_subcommand_help_exits_0_and_plain_help_lists_the_subcommands(capsys):
    from bench import cli

    for argv in (["--help"], *([name, "--help"] for name in cli.SUBCOMMANDS)):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 0, argv
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in cli.SUBCOMMANDS)


def test_default_output_is_a_new_untracked_folder(tmp_path, monkeypatch):
    """A run without --out writes under results/local/ (git-ignored), a new folder each time,
    and says where (the last line)."""
    import shutil
    import subprocess
    from pathlib import Path

    from bench import batch, common, run

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)  # default_out makes the folder: not in the checkout
    out = run.RunOptions.create(quick=True).out
    assert out.parts[:2] == ("results", "local") and out.name.startswith("run-")
    assert out.is_dir()
    assert batch.BatchOptions.create(quick=True).out.name.startswith("batch-")
    assert run.RunOptions.create(quick=True, out=tmp_path / "given").out == tmp_path / "given"
    assert len(list((tmp_path / "results" / "local").iterdir())) == 2  # none for a given --out
    if shutil.which("git") and (root / ".git").exists():
        ignored = subprocess.run(
            ["git", "check-ignore", "-q", str(out / "results.md")], cwd=root, check=False
        )
        assert ignored.returncode == 0, f"{out} is not ignored by .gitignore"
    first = common.default_out("run")
    assert common.default_out("run") != first  # a run of the same second gets its own


def test_quick_says_what_it_leaves_out_and_honours_given_peers(capsys, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from bench import run

    monkeypatch.chdir(tmp_path)  # each create() makes its default output folder

    assert run.RunOptions.create(quick=True).peers == ("hf",)
    assert run.RunOptions.create(quick=True, peers=("hf", "ct2")).peers == ("hf", "ct2")
    assert run.RunOptions.create(quick=True, n=40).n == 3
    run.quick_note(SimpleNamespace(quick=True, peers=None, strategies=None))
    err = capsys.readouterr().err
    assert "hf peer only" in err and "--peers hf,optimum,ct2" in err
    run.quick_note(SimpleNamespace(quick=True, peers="hf,ct2", strategies="greedy"))
    assert "peer" not in capsys.readouterr().err


def test_a_load_over_its_limit_with_idle_others_is_not_quiet_and_says_why():
    """The start check's verdict agrees with its reason: a load average over the limit while
    other processes are idle is not quiet (a load this process cannot attribute: earlier work
    winding down, or another container's), and the reason names the load average and why it
    can stand beside idle processes, not only the idle CPU."""
    from bench import quiet

    def check(load1, load5):
        snaps = iter([fake_snap(0.0, 0.0), fake_snap(0.0, 0.0), fake_snap(0.01, 0.0, load1)])
        m = quiet.Monitor(threshold=0.10, load_threshold=0.5, snap=lambda: next(snaps))
        return m, m.check(0.0) | {"load5": load5}

    for load5 in (3.0, 2.0, 1.0):  # falling, steady or rising: a load the tool cannot see
        m, c = check(2.0, load5)
        failed = quiet.check_findings(c, 0.10, 0.5)
        assert len(failed) == 1 and failed[0].startswith("load average 2.00"), failed
        assert "(limit 0.50)" in failed[0] and "seen here used only 0.00" in failed[0]
        m.start_check = {**c, "quiet": False}
        assert m.summary()["reasons"] == [f"at the start: {failed[0]}"]
    m, c = check(0.3, 0.3)
    assert quiet.check_findings(c, 0.10, 0.5) == []


def test_fastest_alone_line_names_the_rows_it_was_chosen_from():
    from bench import report

    def row(method, kind, tps, alone=None):
        r = {"method": method, "kind": kind, "tokens_per_s": tps}
        return r | ({"tokens_per_s_alone": alone} if alone else {})

    rows = [
        row("hf/greedy", "peer", 50.0, 60.0),
        row("stairs/greedy", "engine", 100.0, 120.0),
        row("stairs/lookup", "engine", 300.0),  # faster, but interleaved only
    ]
    al = [r for r in rows if "tokens_per_s_alone" in r]
    (line,) = [x for x in report._fastest_alone_lines(rows, al) if x]
    assert line.startswith("Engine row measured alone: stairs/greedy, 120 tok/s = 2.00x hf/greedy")
    assert "the other 1 engine rows ran interleaved only" in line and "--alone all" in line
    rows[2]["tokens_per_s_alone"] = 330.0
    al = [r for r in rows if "tokens_per_s_alone" in r]
    (line,) = [x for x in report._fastest_alone_lines(rows, al) if x]
    assert (
        line == "Fastest engine row alone: stairs/lookup, 330 tok/s = 5.50x hf/greedy (all alone)."
    )


def test_bench_functions_are_short_and_name_no_folder_file_by_hand():
    """No function in bench/ over 60 lines; the folder's file names come from engine.layout."""
    import ast
    from pathlib import Path

    from engine import layout

    names = {*layout.GRAPH_FILES, *layout.OPTIMUM_FILES, *layout.TOKENIZER_FILES}
    names |= {layout.MANIFEST, layout.TUNE_FILE, layout.CONFIG_FILE}
    long, literal = [], []
    for path in (Path(__file__).resolve().parents[1] / "bench").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.end_lineno - node.lineno + 1 > 60:
                    long.append(f"{path.name}:{node.lineno} {node.name}")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                literal += [f"{path.name}:{node.lineno} {n}" for n in names if n in node.value]
    assert not long, long
    assert not literal, literal
