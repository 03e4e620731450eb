"""`stairs-bench batch`: aggregate tokens/s and per-request latency at each batch size, the
engine's batched strategies against HF generate with padding and CTranslate2 translate_batch.

Every method gets the same prompts split into batches of B; for each batch, every method runs on
it in turn (the order rotated from batch to batch), so machine drift hits all methods alike. A
request's latency is the wall time of its batch, since a batch's results return together.
Writes results.json, results.md and batch_throughput.png into --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench import core, report
from bench.common import (
    default_out,
    ensure_exported,
    expected_errors,
    machine,
    make_parser,
    quiet_start,
    read_prompt_ids,
    warn,
    warn_not_quiet,
    write_atomic,
    wrote,
)
from bench.peers import max_rss_mb, strip
from bench.quiet import Monitor, QuietPolicy, add_quiet_arguments, check_quiet_arguments
from bench.workload import (
    EPILOG,
    Workload,
    add_workload_arguments,
    check_counts,
    exit_status,
    workload_kwargs,
)
from engine.options import MAX_BATCH_SIZE

DEFAULT_SIZES = (1, 2, 4, 8, 16)
QUICK_SIZES = (1, 2, 4)
ENGINE_REF = "stairs/greedy"  # mismatches are counted against these at batch 1
HF_REF = "hf/greedy"


@dataclass
class BatchMethod:
    """One line of the plot: fn(list of prompts' ids) -> (generated ids sans EOS or an error
    text, per prompt; summed engine Stats or None). sizes: the batch sizes it runs at (None: all)."""

    name: str
    fn: object
    kind: str = "engine"
    sizes: tuple | None = None
    rss: object = None  # a function -> peak RSS MiB of its worker process, if it has one
    close: object = None  # a function stopping its worker process, if it has one
    error: str | None = None
    # per batch size: batch seconds, per-prompt outputs, stats, failed prompt count
    seconds: dict = field(default_factory=dict)
    # CPU seconds of this process (the engine's, not a peer worker's) during each batch call:
    # for a peer it shows whether an engine thread pool kept spinning while the peer ran
    host_cpu: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)


def engine_batch_method(eng, spec: str, max_new: int, max_batch_tokens=None) -> BatchMethod:
    """Engine.generate_batch with one strategy spec; a prompt's typed error becomes its text.
    max_batch_tokens: the engine's bound on rows x tokens of one main call (None: its default)."""
    from engine import EngineError, InputError
    from engine.options import check_count
    from engine.strategies import NEEDS_ASSISTANT

    name, opts = core.parse_strategy(spec)
    if name in NEEDS_ASSISTANT and eng.assistant is None:
        raise InputError(f"bench spec {spec!r} needs an assistant")
    check_count("max_new_tokens", max_new, eng.limits.max_new_tokens, "Engine.limits")

    def fn(batch):
        res = eng.generate_batch(
            batch,
            strategy=name,
            max_new_tokens=max_new,
            max_batch_tokens=max_batch_tokens,
            **opts,
        )
        outs, stats = [], None
        for r in res:
            if isinstance(r, EngineError):
                outs.append(f"{type(r).__name__}: {r}")
                continue
            outs.append(strip(r.token_ids))
            stats = r.stats if stats is None else stats + r.stats
        return outs, stats

    return BatchMethod(f"stairs/{spec}", fn)


def single_method(eng, max_new: int) -> BatchMethod:
    """The single-request path (Engine.generate, greedy) at batch 1: what generate_batch at
    batch 1 is measured against."""

    def fn(batch):
        r = eng.generate(batch[0], strategy="greedy", max_new_tokens=max_new)
        return [strip(r.token_ids)], r.stats

    return BatchMethod("stairs/greedy (generate)", fn, sizes=(1,))


def peer_batch_methods(peers, hf_main: Path, threads: int, max_new: int, workdir: Path, log):
    """HF generate with padding and CTranslate2 float32 translate_batch; a peer that cannot be
    built becomes a method with its error (reported, never hidden)."""
    out = []
    if "hf" in peers:
        try:
            from bench.peers import HF

            hf = HF(hf_main, None, threads)
            out.append(BatchMethod(HF_REF, lambda b: (hf.greedy_batch(b, max_new), None), "peer"))
        except Exception as exc:  # noqa: BLE001
            out.append(BatchMethod(HF_REF, None, "peer", error=f"{type(exc).__name__}: {exc}"))
            log(f"peer {HF_REF} skipped: {exc}")
    for peer, ctype in (("ct2", "float32"), ("ct2-int8", "int8")):
        if peer in peers:
            out.append(_ct2_method(hf_main, threads, ctype, max_new, workdir, log))
    return out


def _ct2_method(hf_main: Path, threads: int, ctype: str, max_new: int, workdir: Path, log):
    """CTranslate2 translate_batch of one compute type in its own worker process."""
    name = f"ct2/{ctype}"
    try:
        from bench.peers import CT2Worker

        ct = CT2Worker(hf_main, threads, ctype, workdir)
    except Exception as exc:  # noqa: BLE001 - reported, never hidden
        log(f"peer {name} skipped: {exc}")
        return BatchMethod(name, None, "peer", error=f"{type(exc).__name__}: {exc}")
    fn = lambda b: (ct.greedy_batch(b, max_new, len(b)), None)
    return BatchMethod(name, fn, "peer", rss=ct.max_rss_mb, close=ct.close)


# Pause before every timed call: threads that spin after their own call (the engine's shared
# pool, a CTranslate2 worker's) would run in the next method's window. Without it the shared
# pool kept ~0.13 CPU-s/s busy while CTranslate2 float32 ran (223 vs 284 tok/s, 2026-12-03).
SETTLE_S = 0.1


def run_sizes(methods, prompts, sizes, monitor=None, progress=None, on_size=None) -> None:
    """For each batch size B: a warm-up call per method on the first batch, then batch by batch
    every method on that batch (order rotated per batch), each call timed. A method that raises
    is marked failed and left out from then on; the others go on."""
    watch = monitor.watch if monitor else (lambda name: contextlib.nullcontext())
    if progress is None:
        from tqdm.auto import tqdm

        progress = lambda **kw: tqdm(disable=True, **kw)
    for b in sizes:
        batches = [prompts[i : i + b] for i in range(0, len(prompts), b)]
        live = [m for m in methods if m.fn is not None and (m.sizes is None or b in m.sizes)]
        if monitor:
            monitor.phase = f"batch {b}"
        for m in live:
            _call(m, batches[0])  # first calls at a new shape allocate arenas, page in weights
        bar = progress(total=len(batches) * len(live), desc=f"batch {b}", unit="batch")
        for i, batch in enumerate(batches):
            k = i % len(live) if live else 0
            for m in live[k:] + live[:k]:
                if m.fn is None:
                    continue
                time.sleep(SETTLE_S)  # the previous method's spinning threads go quiet first
                with watch(m.name):
                    t, c = time.perf_counter(), time.process_time()
                    got = _call(m, batch)
                    dt, dc = time.perf_counter() - t, time.process_time() - c
                if got is not None:
                    outs, st = got
                    m.seconds.setdefault(b, []).append(dt)
                    m.host_cpu.setdefault(b, []).append(dc)
                    m.outputs.setdefault(b, []).extend(outs)
                    if st is not None:
                        m.stats[b] = st if b not in m.stats else m.stats[b] + st
                bar.update()
        bar.close()
        if on_size:
            on_size(b, live)


def _call(m: BatchMethod, batch):
    """m.fn(batch), or None with the method marked failed (and left out from then on)."""
    try:
        outs, st = m.fn(batch)
        if len(outs) != len(batch):
            raise RuntimeError(f"returned {len(outs)} results for {len(batch)} prompts")
    except Exception as exc:  # noqa: BLE001 - one failing method must not lose the others
        m.error = f"at batch size {len(batch)}: {type(exc).__name__}: {exc}"
        m.fn = None
        warn(f"{m.name} failed {m.error}")
        return None
    return outs, st


def reference(methods, name: str):
    """The per-prompt outputs of `name` at batch 1, or None."""
    m = next((m for m in methods if m.name == name), None)
    return m.outputs.get(1) if m else None


def _timing_fields(m: BatchMethod, b: int, n: int, outs: list) -> dict:
    """Tokens/s, latency percentiles and failures of method m at batch size b."""
    secs = m.seconds[b]
    tokens = sum(len(o) for o in outs if isinstance(o, list))
    # every request of a batch waits for the whole batch
    lat = np.repeat(secs, [min(b, n - i * b) for i in range(len(secs))])
    fields = {
        "seconds": float(sum(secs)),
        "batches": len(secs),
        "tokens": tokens,
        "tokens_per_s": tokens / sum(secs),
        "p50_ms": float(np.percentile(lat, 50) * 1e3),
        "p90_ms": float(np.percentile(lat, 90) * 1e3),
        "failed_prompts": sum(isinstance(o, str) for o in outs),
        "this_process_cpu_per_s": sum(m.host_cpu.get(b, [])) / sum(secs),
    }
    errs = [o for o in outs if isinstance(o, str)]
    if errs:
        fields["first_error"] = errs[0]
    return fields


def _stats_fields(st, outs: list) -> dict:
    """The engine Stats columns of one row."""
    fields = {
        "main_calls": st.main_calls,
        "mean_batch_rows": st.mean_batch_rows,
        "acceptance_rate": st.acceptance_rate,
        "tokens_per_main_call": st.tokens_per_main_call,
    }
    if st.main_calls:  # where a request's time goes: its shared calls' wall time
        fields["verify_ms_per_call"] = st.verify_s / st.main_calls * 1e3
        fields["draft_ms_per_call"] = st.draft_s / st.main_calls * 1e3
        served = sum(isinstance(o, list) for o in outs)  # stats: served ones only
        fields["encoder_ms_per_request"] = st.encoder_s / max(1, served) * 1e3
    return fields


def _add_ct2_ratios(rows: list[dict]) -> None:
    """Add each row's tokens/s relative to CTranslate2 float32 and int8 at the same size."""
    ct2 = {
        r["batch_size"]: r["tokens_per_s"]
        for r in rows
        if r["method"] == "ct2/float32" and "tokens_per_s" in r
    }
    ct2_int8 = {
        r["batch_size"]: r["tokens_per_s"]
        for r in rows
        if r["method"] == "ct2/int8" and "tokens_per_s" in r
    }
    for r in rows:
        if "tokens_per_s" in r and r["batch_size"] in ct2:
            r["x_ct2_float32"] = r["tokens_per_s"] / ct2[r["batch_size"]]
        if "tokens_per_s" in r and r["batch_size"] in ct2_int8:
            r["x_ct2_int8"] = r["tokens_per_s"] / ct2_int8[r["batch_size"]]


def batch_rows(methods, n: int, sizes, quiet_summary=None) -> list[dict]:
    """One row per method and batch size: tokens/s, latency, mismatches, ratios."""
    refs = {
        "engine_greedy_b1": reference(methods, ENGINE_REF),
        "hf_greedy_b1": reference(methods, HF_REF),
    }
    # a quantized main's methods (stairs/SPEC@NAME) against its own greedy at batch 1
    own = {m.name.rpartition("@")[2]: reference(methods, f"{ENGINE_REF}@{m.name.rpartition('@')[2]}")
           for m in methods if "@" in m.name}  # fmt: skip
    windows = (quiet_summary or {}).get("methods", {})
    rows = []
    for m in methods:
        for b in sizes:
            if m.sizes is not None and b not in m.sizes:
                continue
            row = {"method": m.name, "kind": m.kind, "batch_size": b}
            if m.close is not None:  # runs in a worker process of its own (CTranslate2)
                row["worker"] = True
            outs = m.outputs.get(b, [])
            if len(outs) != n:  # never built, or failed at or before this size
                row["error"] = m.error or "did not run"
                rows.append(row)
                continue
            row.update(_timing_fields(m, b, n, outs))
            label = m.name.rpartition("@")[2] if "@" in m.name else None
            mine = {"own_greedy_b1": own.get(label)} if label else {}
            for key, ref in {**refs, **mine}.items():
                if ref is not None:
                    row[f"mismatches_vs_{key}"] = sum(
                        isinstance(o, list) and o != r for o, r in zip(outs, ref)
                    )
            st = m.stats.get(b)
            if st is not None:
                row.update(_stats_fields(st, outs))
            w = windows.get(f"batch {b}", {}).get(m.name)
            if w:
                row["others_cpu_per_s"] = w["others_cpu_per_s"]
                row["quiet"] = w["quiet"]
            rows.append(row)
    _add_ct2_ratios(rows)
    return rows


@dataclass(frozen=True)
class BatchOptions(Workload):
    """One `stairs-bench batch`, built once (BatchOptions.create) from the flags or by a
    caller."""

    strategies: tuple[str, ...] = tuple(core.BATCH_STRATEGIES)
    peers: tuple[str, ...] = tuple(core.BATCH_DEFAULT_PEERS)
    out: Path = field(default_factory=lambda: default_out("batch"))
    batch_sizes: tuple[int, ...] = DEFAULT_SIZES
    single: bool = True  # also Engine.generate greedy (one request at a time) at batch 1
    max_batch_tokens: int | None = None  # Engine.generate_batch's bound (None: the engine's)
    shared_thread_pool: bool = False  # Engine.load(shared_thread_pool=True)
    # other exports of the same main (--dtype int8, int4): every strategy again on each,
    # labelled @folder name, with mismatches against its own greedy at batch 1
    extra_mains: tuple[str, ...] = ()

    @classmethod
    def create(cls, **kw) -> BatchOptions:
        """The options with --quick applied (8 prompts, 16 tokens, at most 3 sizes <= 4), the
        defaults where strategies, peers, out or batch_sizes are None, and the sizes, peers and
        specs checked (InputError before any model loads)."""
        from engine import InputError

        kw = {
            k: v for k, v in kw.items() if v is not None or k in ("assistant", "max_batch_tokens")
        }
        given = kw.get("batch_sizes", DEFAULT_SIZES)
        sizes = sorted(set(given))
        if kw.get("quick"):
            kw.update(n=8, max_new_tokens=16)
            sizes = [b for b in sizes if b <= 4][:3] or list(QUICK_SIZES)
        if not sizes or not all(isinstance(b, int) and 1 <= b <= MAX_BATCH_SIZE for b in sizes):
            raise InputError(f"batch sizes must be integers 1-{MAX_BATCH_SIZE}, got {given!r}")
        kw["batch_sizes"] = tuple(sizes)
        if kw.get("out") is None:  # made only when used: default_out creates it
            kw["out"] = default_out("batch")
        opts = cls(**kw)
        bad = ", ".join(p for p in opts.peers if p not in core.BATCH_PEERS)
        if bad:
            peers = ", ".join(core.BATCH_PEERS)
            raise InputError(f"batch mode runs the peers {peers} (or none), not {bad}")
        for spec in opts.strategies:
            core.parse_strategy(spec)
        return opts

    @property
    def asst(self) -> Path | None:
        return Path(self.assistant) if self.assistant else None

    def settings(self, ids: list[list[int]], shared_pool: bool) -> dict:
        """results.json's settings record; shared_pool: whether the sessions got one (ORT may
        refuse a shared pool once its environment exists)."""
        return {
            "main": str(self.main),
            "assistant": str(self.asst) if self.asst else None,
            "prompts": len(ids),
            "max_new_tokens": self.max_new_tokens,
            "threads": self.threads,
            "provider": self.provider,
            "batch_sizes": list(self.batch_sizes),
            "strategies": list(self.strategies),
            "peers": list(self.peers),
            "quick": self.quick,
            "max_batch_tokens": self.max_batch_tokens,
            "shared_thread_pool": shared_pool,
            "generate_row": self.single,
            "mean_input_tokens": sum(map(len, ids)) / len(ids),
            "quiet_threshold": self.policy.threshold,
            "quiet_load": self.policy.load,
            "wait_quiet": self.policy.wait_s,
        }


def run_batch_bench(opts: BatchOptions) -> dict:
    """Batched engine strategies against HF padded generate and CTranslate2 translate_batch
    (float32; int8 with peer ct2-int8) at each batch size; writes results.json, results.md,
    batch_throughput.png. The machine is watched as in run_bench (bench.quiet); with
    opts.policy.require, NotQuietError is raised before the timed runs if it never became
    quiet."""
    from engine.providers import shared_pool_in_use

    monitor = Monitor(opts.policy.threshold, opts.policy.load)
    opts = _check_prompts(opts)
    eng, ids = _load_batch_engine(opts)
    methods = _methods(opts, eng)
    quiet_start(monitor, opts.policy, opts.log)
    t0 = time.perf_counter()
    sizes = list(opts.batch_sizes)
    memory = _time_batches(methods, ids, sizes, monitor, opts.progress, opts.log)
    quiet_summary = monitor.summary()
    shared = opts.shared_thread_pool and shared_pool_in_use(opts.threads)
    results = {
        "mode": "batch",
        "settings": opts.settings(ids, shared),
        "machine": machine(),
        "quiet": quiet_summary,
        "rows": batch_rows(methods, len(ids), sizes, quiet_summary),
        "memory": memory,
        "errors": {m.name: m.error for m in methods if m.error},
        "seconds": time.perf_counter() - t0,
    }
    _write_batch_results(results, opts.out, opts.log)
    return results


def _check_prompts(opts: BatchOptions) -> BatchOptions:
    """InputError unless there are prompts for the largest batch and the engine batches;
    the options with single off when batch 1 is not measured."""
    from dataclasses import replace

    from engine import Engine, InputError
    from engine.cli import read_prompts

    texts = read_prompts(opts.prompts, opts.n)
    top = max(opts.batch_sizes)
    if top > len(texts):
        raise InputError(f"batch size {top} is more than the {len(texts)} prompts: use -n >= {top}")
    if not hasattr(Engine, "generate_batch"):
        raise InputError("this engine has no Engine.generate_batch: batch mode needs it")
    return replace(opts, single=opts.single and 1 in opts.batch_sizes)


def _load_batch_engine(opts: BatchOptions):
    """Export the pair if needed, load the engine; return it and the prompts' token ids."""
    from engine import Engine

    if opts.asst is not None:
        ensure_exported(opts.main, opts.asst, opts.log)
    eng = Engine.load(
        opts.main,
        opts.asst,
        provider=opts.provider,
        threads=opts.threads,
        shared_thread_pool=opts.shared_thread_pool,
    )
    sp = eng.tokenizer
    return eng, read_prompt_ids(opts.prompts, opts.n, sp.encode, sp.eos_id)


def _methods(opts: BatchOptions, eng) -> list[BatchMethod]:
    """The engine's methods (every strategy on each main, the generate row), then the peers."""
    new = opts.max_new_tokens
    methods = _engine_methods(opts, eng)
    if opts.single:
        methods.append(single_method(eng, new))
    hf_main, workdir = _peer_inputs(opts.main, opts.out)
    methods += peer_batch_methods(opts.peers, hf_main, opts.threads, new, workdir, opts.log)
    return methods


def _engine_methods(opts: BatchOptions, eng) -> list[BatchMethod]:
    """Every strategy on the main, then again on each extra export of it (labelled @folder)."""
    from engine import Engine

    new, cap = opts.max_new_tokens, opts.max_batch_tokens
    methods = [engine_batch_method(eng, s, new, cap) for s in opts.strategies]
    for extra in opts.extra_mains:
        e = Engine.load(extra, opts.asst, provider=opts.provider, threads=opts.threads)
        for s in opts.strategies:
            m = engine_batch_method(e, s, new, cap)
            m.name += f"@{Path(extra).name}"
            methods.append(m)
    return methods


def _peer_inputs(main: Path, out: Path) -> tuple[Path, Path]:
    """The HF source of the main export, and the peers' work folder (created)."""
    from engine.verify import read_manifest

    hf_main = Path((read_manifest(main) or {}).get("source", main))
    workdir = out / "work"
    workdir.mkdir(parents=True, exist_ok=True)
    return hf_main, workdir


def _time_batches(methods, ids, sizes, monitor: Monitor, progress, log) -> list[dict]:
    """Run every method at every size, closing peer workers after; return peak memory per size."""
    memory = []

    def on_size(b, live):
        mem = {"batch_size": b, "process_max_rss_mb": max_rss_mb()}
        for m in live:
            if m.rss is not None and m.fn is not None:
                with contextlib.suppress(Exception):
                    mem[f"{m.name}_worker_max_rss_mb"] = m.rss()
        memory.append(mem)
        log(f"batch {b} done; peak RSS so far {mem['process_max_rss_mb']:.0f} MiB")

    try:
        if 1 not in sizes:  # mismatches are counted against batch 1: run the references untimed
            refs = [m for m in methods if m.name in (ENGINE_REF, HF_REF) and m.fn is not None]
            run_sizes(refs, ids, [1], None, progress)
        run_sizes(methods, ids, sizes, monitor, progress, on_size)
    finally:
        for m in methods:
            if m.close is not None:
                m.close()
    return memory


def _write_batch_results(results: dict, out: Path, log) -> None:
    """Write batch_throughput.png, results.json and results.md; warn if not quiet; say where
    the report is."""
    results["plots"] = report.batch_plots(results, out)
    write_atomic(out / "results.json", json.dumps(results, indent=2, default=str))
    md = report.batch_markdown(results)
    write_atomic(out / "results.md", md)
    log(md)
    warn_not_quiet(results["quiet"])
    wrote("stairs-bench", out / "results.md", "results.json", *results["plots"])


def add_batch_arguments(p: argparse.ArgumentParser, either: bool = False) -> None:
    """The flags of batch mode only; either: plain stairs-bench, where --batch-sizes picks it
    (no default) and every such flag says it is batch mode's."""
    tag = "batch mode: " if either else ""
    p.add_argument(
        "--batch-sizes",
        metavar="B,B,...",
        default=None if either else ",".join(map(str, DEFAULT_SIZES)),
        help=tag
        + "aggregate tokens/s and latency at each batch size"
        + (
            " (e.g. 1,2,4,8,16) for the engine's batched strategies, HF generate with padding and"
            " CTranslate2 float32 translate_batch; --rounds, --alone and the sweeps do not apply"
            if either
            else ""
        ),
    )
    p.add_argument(
        "--no-single",
        action="store_true",
        help=tag + "leave out Engine.generate (one prompt at a time) at batch 1",
    )
    p.add_argument(
        "--extra-mains",
        metavar="DIR[,DIR]",
        help=tag + "other exports of the main (e.g. --dtype int8, int4), every strategy again on"
        " each, with mismatches against its own greedy; peer ct2-int8 for CTranslate2 int8",
    )
    p.add_argument(
        "--shared-thread-pool",
        action="store_true",
        help=tag + "Engine.load(shared_thread_pool=True), one process-wide ORT pool for main and"
        " assistant",
    )
    p.add_argument(
        "--max-batch-tokens",
        type=int,
        metavar="N",
        help=tag + "the engine's bound on rows x tokens of one main call (default: the engine's)",
    )


def check_batch_arguments(p: argparse.ArgumentParser, a: argparse.Namespace) -> list[int]:
    """p.error (exit 2) for a bad batch flag; the parsed --batch-sizes."""
    from engine.options import parse_sizes

    if a.max_batch_tokens is not None and not 1 <= a.max_batch_tokens <= 65536:
        p.error("--max-batch-tokens must be between 1 and 65536")
    try:
        return parse_sizes(a.batch_sizes)
    except ValueError as exc:
        p.error(f"--batch-sizes: {exc}")


def parser(prog: str = "stairs-bench batch") -> argparse.ArgumentParser:
    """`stairs-bench batch`'s flags."""
    p = make_parser(prog, __doc__, EPILOG)
    add_workload_arguments(p, "batch")
    add_batch_arguments(p)
    add_quiet_arguments(p, "60; --quick: 0")
    return p


def execute(a: argparse.Namespace, policy: QuietPolicy, sizes: list[int]) -> int:
    """Run batch mode with checked flags; the exit status."""
    res = expected_errors(
        "stairs-bench",
        lambda: run_batch_bench(
            BatchOptions.create(
                **workload_kwargs(a, policy),
                batch_sizes=tuple(sizes),
                single=not a.no_single,
                max_batch_tokens=a.max_batch_tokens,
                shared_thread_pool=a.shared_thread_pool,
                extra_mains=tuple(a.extra_mains.split(",")) if a.extra_mains else (),
            )
        ),
    )
    return exit_status(res, policy)


def main(argv: list[str] | None = None) -> int:
    """`stairs-bench batch ...`: the exit status."""
    p = parser()
    a = p.parse_args(argv)
    check_counts(p, a)
    sizes = check_batch_arguments(p, a)
    return execute(a, check_quiet_arguments(p, a, default_wait=0.0 if a.quick else 60.0), sizes)


if __name__ == "__main__":  # python -m bench.batch: stairs-bench batch
    raise SystemExit(main())
