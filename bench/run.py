"""`stairs-bench run`: engine strategies against the real peers (HF transformers generate,
optimum's ORTModelForSeq2SeqLM, CTranslate2), one prompt at a time, side by side in one run.

Every method runs on every prompt in turn (interleaved, so machine drift hits all alike), then
the default ones again alone; the table gives tok/s, latency, main calls, acceptance and
mismatches, then sweeps of the stairs batch size and the assisted draft length. Writes
results.json, results.md and plots into --out.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from bench import core, report
from bench.common import (
    default_out,
    ensure_exported,
    expected_errors,
    machine,
    make_parser,
    note,
    quiet_start,
    read_prompt_ids,
    save,
    warn_not_quiet,
    write_atomic,
    wrote,
)
from bench.quiet import Monitor, QuietPolicy, add_quiet_arguments, check_quiet_arguments
from bench.workload import (
    EPILOG,
    Workload,
    add_workload_arguments,
    check_counts,
    exit_status,
    workload_kwargs,
)

QUICK_STRATEGIES = (
    "greedy",
    "assisted:draft_tokens=4",
    "stairs:batch_size=3",
    "lookup",
    "staged",
)
QUICK_PEERS = ("hf",)


@dataclass(frozen=True)
class RunOptions(Workload):
    """One `stairs-bench run`, built once (RunOptions.create) from the flags or by a caller."""

    strategies: tuple[str, ...] = tuple(core.DEFAULT_STRATEGIES)
    peers: tuple[str, ...] = tuple(core.DEFAULT_PEERS)
    rounds: int = 1  # interleaved rounds, the median reported
    sweeps: bool = True
    sweep_prompts: int = 10
    alone: str = "default"  # methods also measured alone: see select_alone

    @classmethod
    def create(cls, **kw) -> RunOptions:
        """The options with --quick applied, the defaults where strategies, peers or out are
        None, and every strategy spec parsed (a typo fails before any model loads)."""
        kw = {
            k: v for k, v in kw.items() if v is not None or k not in ("strategies", "peers", "out")
        }
        if kw.get("quick"):
            kw.update(n=3, max_new_tokens=16, rounds=1, sweep_prompts=2)
            kw.setdefault("strategies", QUICK_STRATEGIES)
            kw.setdefault("peers", QUICK_PEERS)
        if kw.get("out") is None:  # made only when used: default_out creates it
            kw["out"] = default_out("run")
        opts = cls(**kw)
        for spec in opts.strategies:
            core.parse_strategy(spec)
        return opts

    @property
    def assistants(self) -> list[Path | None]:
        """Several assistants (a comma list) give one set of engine rows each, labelled @name."""
        return [Path(a) for a in str(self.assistant).split(",")] if self.assistant else [None]

    def settings(self, ids: list[list[int]], alone: list) -> dict:
        """results.json's settings record."""
        return {
            "main": str(self.main),
            "assistant": ",".join(map(str, self.assistants)),
            "prompts": len(ids),
            "max_new_tokens": self.max_new_tokens,
            "threads": self.threads,
            "rounds": self.rounds,
            "provider": self.provider,
            "quick": self.quick,
            "mean_input_tokens": sum(map(len, ids)) / len(ids),
            "alone": [m.name for m in alone],
            "quiet_threshold": self.policy.threshold,
            "quiet_load": self.policy.load,
            "wait_quiet": self.policy.wait_s,
        }


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


def run_bench(opts: RunOptions) -> dict:
    """Benchmark engine strategies and peers side by side; write results.json/.md and plots.

    Other processes' CPU time is accounted around every timed call (bench.quiet): a run where
    they used more than the policy's threshold CPU-s per s during a method, or where the load
    average (less our share) exceeded its load limit at the start and was not falling, is
    marked not quiet in results["quiet"]. With policy.require, NotQuietError is raised before
    the timed runs if the machine does not become quiet within policy.wait_s."""
    monitor = Monitor(opts.policy.threshold, opts.policy.load)
    engines, ids = _load_engines(opts)
    methods = _bench_methods(opts, engines)
    alone_methods = select_alone(methods, opts.alone)
    quiet_start(monitor, opts.policy, opts.log)
    t0 = time.perf_counter()
    table, alone_res, quiet_summary = _measure(methods, alone_methods, ids, opts, monitor)
    results = {
        "settings": opts.settings(ids, alone_methods),
        "machine": machine(),
        "quiet": quiet_summary,
        "rows": table,
        "alone": alone_res,
    }
    if opts.sweeps:  # with the last assistant given
        results["sweeps"] = _sweeps(engines[-1], ids[: opts.sweep_prompts], opts)
    results["seconds"] = time.perf_counter() - t0
    _write_results(results, opts.out, opts.log)
    return results


def _measure(methods: list, alone_methods: list, ids, opts: RunOptions, monitor: Monitor):
    """Interleaved rounds, then the alone runs; return the table, alone figures, quiet summary."""
    core.interleave(methods, ids, opts.rounds, opts.progress, monitor.watch)
    monitor.phase = "alone"
    alone_res = measure_alone(alone_methods, ids, opts.rounds, opts.progress, monitor.watch)
    quiet_summary = monitor.summary()
    table = core.rows(methods, len(ids), opts.rounds)
    add_alone(table, alone_res)
    add_quiet(table, quiet_summary)
    return table, alone_res, quiet_summary


def _load_engines(opts: RunOptions):
    """Load the main with each assistant; return the engines and the prompts' token ids."""
    from engine import Engine

    assistants = opts.assistants
    ensure_exported(opts.main, assistants[0], opts.log)
    engines = [
        Engine.load(opts.main, a, provider=opts.provider, threads=opts.threads) for a in assistants
    ]
    sp = engines[0].tokenizer
    return engines, read_prompt_ids(opts.prompts, opts.n, sp.encode, sp.eos_id)


def _bench_methods(opts: RunOptions, engines: list) -> list:
    """Engine rows per strategy (and per assistant), then the peers."""
    from engine.verify import read_manifest

    assistants = opts.assistants
    eng, assistant = engines[0], assistants[0]
    hf_main = Path((read_manifest(opts.main) or {}).get("source", opts.main))
    hf_asst = Path((read_manifest(assistant) or {}).get("source", "")) if assistant else None
    workdir = opts.out / "work"
    workdir.mkdir(parents=True, exist_ok=True)
    new = opts.max_new_tokens
    methods = []
    for e, a in zip(engines, assistants):
        label = f"@{a.name}" if len(engines) > 1 else ""
        methods += [
            core.engine_method(e, s, new, label)
            for s in opts.strategies
            if e is eng or core.parse_strategy(s)[0] not in core.NO_ASSISTANT
        ]
    methods += core.peer_methods(
        list(opts.peers), hf_main, hf_asst, opts.main, assistant, opts.threads, new, workdir,
        opts.log,
    )  # fmt: skip
    return methods


def _sweeps(eng, sw_ids, opts: RunOptions) -> dict:
    """Speed-up against stairs batch size and assisted draft length."""
    quick, new, progress = opts.quick, opts.max_new_tokens, opts.progress
    sizes = [2, 3] if quick else list(range(2, 11))
    drafts = [1, 2] if quick else list(range(1, 11))
    return {
        "batch_size": core.sweep(eng, sw_ids, new, "stairs", "batch_size", sizes, progress),
        "draft_tokens": core.sweep(eng, sw_ids, new, "assisted", "draft_tokens", drafts, progress),
    }


def _write_results(results: dict, out: Path, log) -> None:
    """Write results.json, results.md and the plots; warn if the machine was not quiet; say
    where the report is."""
    save(results, out)
    write_atomic(out / "results.md", report.markdown(results))
    results["plots"] = report.plots(results, out)
    save(results, out)
    log((out / "results.md").read_text())
    warn_not_quiet(results["quiet"])
    wrote("stairs-bench", out / "results.md", "results.json", *results["plots"])


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of the interleaved run only: rounds, the alone runs, the sweeps."""
    p.add_argument(
        "--rounds",
        type=int,
        metavar="R",
        default=1,
        help="interleaved rounds (median reported; --quick: 1)",
    )
    p.add_argument(
        "--alone",
        metavar="SPEC",
        default="default",
        help="methods also measured alone after the interleaved rounds: 'all', 'none',"
        " ';'-separated method names, or 'default' (the default): the peers' greedy rows,"
        " engine greedy and auto",
    )
    p.add_argument(
        "--no-sweeps",
        action="store_true",
        help="leave out the sweeps (stairs batch size 2-10, assisted draft length 1-10)",
    )
    p.add_argument(
        "--sweep-prompts",
        type=int,
        metavar="N",
        default=10,
        help="prompts each sweep point runs (--quick: 2)",
    )


def parser(prog: str = "stairs-bench run") -> argparse.ArgumentParser:
    """`stairs-bench run`'s flags."""
    p = make_parser(prog, __doc__, EPILOG)
    add_workload_arguments(p, "run")
    add_run_arguments(p)
    add_quiet_arguments(p, "60; --quick: 0")
    return p


def quick_note(a: argparse.Namespace) -> None:
    """Say what --quick leaves out, and how to bring it back."""
    if not a.quick:
        return
    left = "" if a.peers is not None else (
        ", the hf peer only (--peers hf,optimum,ct2 brings back optimum and CTranslate2)"
    )  # fmt: skip
    strategies = "" if a.strategies else f", strategies {';'.join(QUICK_STRATEGIES)}"
    note(f"--quick: 3 prompts, 16 new tokens{strategies}{left}")


def execute(a: argparse.Namespace, policy: QuietPolicy) -> int:
    """Run with checked flags; the exit status."""
    quick_note(a)
    res = expected_errors(
        "stairs-bench",
        lambda: run_bench(
            RunOptions.create(
                **workload_kwargs(a, policy),
                rounds=a.rounds,
                sweeps=not a.no_sweeps,
                sweep_prompts=a.sweep_prompts,
                alone=a.alone,
            )
        ),
    )
    return exit_status(res, policy)


def main(argv: list[str] | None = None) -> int:
    """`stairs-bench run ...`: the exit status."""
    p = parser()
    a = p.parse_args(argv)
    check_counts(p, a)
    return execute(a, check_quiet_arguments(p, a, default_wait=0.0 if a.quick else 60.0))


if __name__ == "__main__":  # python -m bench.run: stairs-bench run
    raise SystemExit(main())
