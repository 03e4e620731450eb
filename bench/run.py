"""run_bench: the whole benchmark as a library function (the CLI only maps arguments)."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

from bench import core, report
from bench.quiet import Monitor, NotQuietError, describe_check
from engine.cli import read_prompts
from engine.verify import read_manifest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def ensure_exported(main: Path, assistant: Path, log) -> None:
    """Export the ../shared pycode pair on first use, so the defaults work on a fresh clone."""
    if main.is_dir() and assistant.is_dir():
        return
    src = SHARED / "models" / main.name
    src_a = SHARED / "models" / assistant.name
    if not src.is_dir():
        raise FileNotFoundError(f"{main} does not exist: export it with stairs-export")
    from export import export_model

    log(f"exporting {src} and {src_a} (first run)")
    export_model(str(src), main, assistant=str(src_a) if src_a.is_dir() else None, quiet=True)


# Measured alone by default: the peers' greedy rows and the engine's greedy and auto rows, so that
# the headline ratios can be computed alone against alone.
ALONE_DEFAULT = (
    "hf/greedy",
    "optimum/greedy",
    "ct2/float32",
    "ct2/int8",
    "stairs/greedy",
    "stairs/auto",
)


def select_alone(methods: list, spec: str | None) -> list:
    """The methods to measure alone: spec 'default', 'all', 'none' or ';'-separated method
    names (or their beginnings, e.g. 'stairs/auto')."""
    from engine import InputError

    live = [m for m in methods if m.fn is not None]
    if spec == "none":
        return []
    if spec == "all":
        return live
    wanted = ALONE_DEFAULT if spec in (None, "default") else [w for w in spec.split(";") if w]
    if spec not in (None, "default"):
        names = [m.name for m in methods]
        unknown = [w for w in wanted if not any(n.startswith(w) for n in names)]
        if unknown:
            raise InputError(f"--alone names no method: {', '.join(unknown)} (methods: {names})")
    return [m for m in live if any(m.name.startswith(w) for w in wanted)]


def measure_alone(methods: list, prompts, rounds: int, progress, watch) -> dict:
    """Each method by itself on all prompts, nothing else running in between (one warm-up call
    before each block; rounds go A B A B); median round. name -> tokens/s etc."""
    n = len(prompts)
    secs = {m.name: [] for m in methods}
    outs = {m.name: [] for m in methods}
    bar = progress(total=rounds * n * len(methods), desc="alone", unit="gen")
    for r in range(rounds):
        for m in methods:
            m.fn(prompts[0])
            for ids in prompts:
                with watch(m.name):
                    t = time.perf_counter()
                    toks, _ = m.fn(ids)
                    secs[m.name].append(time.perf_counter() - t)
                if r == 0:
                    outs[m.name].append(toks)
                bar.update()
    bar.close()
    res = {}
    for m in methods:
        per_round = [sum(secs[m.name][r * n : (r + 1) * n]) for r in range(rounds)]
        total = statistics.median(per_round)
        tokens = sum(map(len, outs[m.name]))
        res[m.name] = {
            "seconds": total,
            "round_seconds": per_round,
            "tokens": tokens,
            "tokens_per_s": tokens / total,
            # Same prompts, greedy: the tokens must equal the interleaved run's.
            "outputs_differ": sum(a != b for a, b in zip(outs[m.name], m.outputs)),
        }
    return res


ALONE_REFS = {
    "hf_greedy": "hf/greedy",
    "ct2_float32": "ct2/float32",
    "engine_greedy": "stairs/greedy",
}


def add_alone(rows: list[dict], alone: dict) -> None:
    """Put each alone figure next to its interleaved row, with ratios alone against alone."""
    for r in rows:
        a = alone.get(r["method"])
        if a:
            r["tokens_per_s_alone"] = a["tokens_per_s"]
            r["seconds_alone"] = a["seconds"]
            r["alone_outputs_differ"] = a["outputs_differ"]
    refs = {}
    for key, name in ALONE_REFS.items():
        ref = next(
            (r for r in rows if r["method"].split("@")[0] == name and "tokens_per_s_alone" in r),
            None,
        )
        if ref:
            refs[key] = ref["tokens_per_s_alone"]
    for r in rows:
        if "tokens_per_s_alone" in r:
            for key, tps in refs.items():
                r[f"speedup_alone_vs_{key}"] = r["tokens_per_s_alone"] / tps


def add_quiet(rows: list[dict], summary: dict) -> None:
    """Per row: other processes' CPU-s per s while it ran, interleaved and alone; quiet or not."""
    ms = summary["methods"]
    for r in rows:
        flags = []
        for phase, key in (
            ("interleaved", "others_cpu_per_s"),
            ("alone", "others_cpu_per_s_alone"),
        ):
            w = ms.get(phase, {}).get(r["method"])
            if w:
                r[key] = w["others_cpu_per_s"]
                flags.append(w["quiet"])
        if flags:
            r["quiet"] = all(flags)


def quiet_start(
    monitor, wait_quiet: float, require_quiet: bool, log, prog: str = "stairs-bench"
) -> dict:
    """Wait up to wait_quiet s for a quiet machine; NotQuietError if required, else a warning."""
    log(f"checking that the machine is quiet (waiting up to {wait_quiet:.0f} s)")
    start = monitor.wait_quiet(wait_quiet, log)
    if not start["quiet"]:
        if require_quiet:
            raise NotQuietError(
                f"machine not quiet after {monitor.waited_s:.0f} s: " + describe_check(start)
            )
        warn(f"machine not quiet at the start: {describe_check(start)}", prog)
    return start


def warn(msg: str, prog: str = "stairs-bench") -> None:
    """Always shown, -q or not: a noisy run must not pass unnoticed."""
    print(f"{prog}: WARNING: {msg}", file=sys.stderr, flush=True)


QUICK_STRATEGIES = [
    "greedy",
    "assisted:draft_tokens=4",
    "stairs:batch_size=3",
    "lookup",
    "staged",
]


def run_bench(
    main="models/pycode-t5-main",
    assistant="models/pycode-t5-draft",
    prompts="../shared/prompts/pycode_public.jsonl",
    n=40,
    max_new_tokens=64,
    threads=2,
    rounds=1,
    provider="cpu",
    strategies=None,
    peers=("hf", "optimum", "ct2"),
    sweeps=True,
    sweep_prompts=10,
    out="results/latest",
    quick=False,
    quiet=False,
    alone="default",
    quiet_threshold=0.10,
    quiet_load=0.5,
    wait_quiet=0.0,
    require_quiet=False,
) -> dict:
    """Benchmark engine strategies and peers side by side; write results.json/.md and plots.

    Other processes' CPU time is accounted around every timed call (bench.quiet): a run where
    they used more than quiet_threshold CPU-s per s during a method, or where the load average
    (less our share) exceeded quiet_load at the start, is marked not quiet in results["quiet"].
    wait_quiet: seconds to wait for a quiet machine first; require_quiet: raise NotQuietError
    if it does not become quiet (checked before the timed runs).
    Over 60 lines: its 20 arguments and the settings record are flat lists; phases are helpers."""
    from tqdm.auto import tqdm

    monitor = Monitor(quiet_threshold, quiet_load)
    log = (lambda msg: None) if quiet else (lambda msg: print(msg, flush=True))
    progress = lambda **kw: tqdm(disable=quiet, **kw)
    if quick:
        n, max_new_tokens, rounds, sweep_prompts = 3, 16, 1, 2
        strategies = strategies or list(QUICK_STRATEGIES)
        peers = [p for p in peers if p == "hf"]
    strategies = strategies or core.DEFAULT_STRATEGIES
    for spec in strategies:  # a typo in a spec fails before any model loads
        core.parse_strategy(spec)
    # Several assistants (comma list) give one set of engine rows each, labelled @name.
    assistants = [Path(a) for a in str(assistant).split(",")] if assistant else [None]
    main, out = Path(main), Path(out)
    engines, ids = _load_engines(main, assistants, prompts, n, provider, threads, log)
    methods = _bench_methods(
        engines, assistants, strategies, peers, main, threads, max_new_tokens, out, log
    )
    alone_methods = select_alone(methods, alone)
    quiet_start(monitor, wait_quiet, require_quiet, log)
    t0 = time.perf_counter()
    table, alone_res, quiet_summary = _measure(
        methods, alone_methods, ids, rounds, progress, monitor
    )
    settings = {
        "main": str(main),
        "assistant": ",".join(map(str, assistants)),
        "prompts": len(ids),
        "max_new_tokens": max_new_tokens,
        "threads": threads,
        "rounds": rounds,
        "provider": provider,
        "quick": quick,
        "mean_input_tokens": sum(map(len, ids)) / len(ids),
        "alone": [m.name for m in alone_methods],
        "quiet_threshold": quiet_threshold,
        "quiet_load": quiet_load,
        "wait_quiet": wait_quiet,
    }
    results = {
        "settings": settings,
        "machine": core.machine(),
        "quiet": quiet_summary,
        "rows": table,
        "alone": alone_res,
    }
    if sweeps:  # with the last assistant given
        results["sweeps"] = _sweeps(
            engines[-1], ids[:sweep_prompts], max_new_tokens, quick, progress
        )
    results["seconds"] = time.perf_counter() - t0
    _write_results(results, out, log)
    return results


def _measure(methods: list, alone_methods: list, ids, rounds: int, progress, monitor):
    """Interleaved rounds, then the alone runs; return the table, alone figures, quiet summary."""
    core.interleave(methods, ids, rounds, progress, monitor.watch)
    monitor.phase = "alone"
    alone_res = measure_alone(alone_methods, ids, rounds, progress, monitor.watch)
    quiet_summary = monitor.summary()
    table = core.rows(methods, len(ids), rounds)
    add_alone(table, alone_res)
    add_quiet(table, quiet_summary)
    return table, alone_res, quiet_summary


def _load_engines(main: Path, assistants: list, prompts, n: int, provider, threads: int, log):
    """Load the main with each assistant; return the engines and the prompts' token ids."""
    from engine import Engine

    ensure_exported(main, assistants[0], log)
    engines = [Engine.load(main, a, provider=provider, threads=threads) for a in assistants]
    sp = engines[0].tokenizer
    # The pair's convention: spiece.encode(context)[-255:] + [eos].
    ids = [sp.encode(text)[-255:] + [sp.eos_id] for text in read_prompts(prompts, n)]
    return engines, ids


def _bench_methods(
    engines, assistants, strategies, peers, main: Path, threads: int, max_new: int, out: Path, log
) -> list:
    """Engine rows per strategy (and per assistant), then the peers."""
    eng, assistant = engines[0], assistants[0]
    hf_main = Path((read_manifest(main) or {}).get("source", main))
    hf_asst = Path((read_manifest(assistant) or {}).get("source", "")) if assistant else None
    workdir = out / "work"
    workdir.mkdir(parents=True, exist_ok=True)
    methods = []
    for e, a in zip(engines, assistants):
        label = f"@{a.name}" if len(engines) > 1 else ""
        methods += [
            core.engine_method(e, s, max_new, label)
            for s in strategies
            if e is eng or core.parse_strategy(s)[0] not in core.NO_ASSISTANT
        ]
    methods += core.peer_methods(
        list(peers), hf_main, hf_asst, main, assistant, threads, max_new, workdir, log
    )
    return methods


def _sweeps(eng, sw_ids, max_new: int, quick: bool, progress) -> dict:
    """Speed-up against stairs batch size and assisted draft length."""
    return {
        "batch_size": core.sweep(
            eng,
            sw_ids,
            max_new,
            "stairs",
            "batch_size",
            [2, 3] if quick else list(range(2, 11)),
            progress,
        ),
        "draft_tokens": core.sweep(
            eng,
            sw_ids,
            max_new,
            "assisted",
            "draft_tokens",
            [1, 2] if quick else list(range(1, 11)),
            progress,
        ),
    }


def _write_results(results: dict, out: Path, log) -> None:
    """Write results.json, results.md and the plots; warn if the machine was not quiet."""
    core.save(results, out)
    core.write_atomic(out / "results.md", report.markdown(results))
    results["plots"] = report.plots(results, out)
    core.save(results, out)
    log((out / "results.md").read_text())
    quiet_summary = results["quiet"]
    if not quiet_summary["ok"]:
        warn(
            "machine was NOT quiet; these figures are not a fair comparison:\n  "
            + "\n  ".join(quiet_summary["reasons"])
        )
