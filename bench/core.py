"""The interleaved benchmark's machinery (methods run prompt by prompt in turn, the table rows,
the sweeps), and what every engine benchmark shares: strategy specs, the default method lists,
the engine cells that fail a run."""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DEFAULT_STRATEGIES = [
    "greedy",
    "assisted:draft_tokens=3",
    "assisted:draft_tokens=4",
    "assisted:draft_tokens=5,schedule=heuristic",
    "stairs:batch_size=3",
    "stairs:batch_size=7",
    "tree:draft_tokens=4,branches=2",
    "lookup",
    "staged",
    "auto",
]
NO_ASSISTANT = ("greedy", "lookup")
DEFAULT_PEERS = ["hf", "optimum", "ct2"]
# batch mode: the engine's batched strategies, and the peers that batch (HF with padding,
# CTranslate2 float32 and int8 translate_batch)
BATCH_STRATEGIES = [
    "greedy",
    "assisted:draft_tokens=4",
    "assisted:draft_tokens=5,schedule=heuristic",
    "lookup",
]
BATCH_DEFAULT_PEERS = ["hf", "ct2"]
BATCH_PEERS = ("hf", "ct2", "ct2-int8")


def parse_strategy(spec: str) -> tuple[str, dict]:
    """'assisted:draft_tokens=4,schedule=heuristic' -> ('assisted', {...}), checked against
    the engine's option schema (engine.options): a typo fails here, before anything runs."""
    from engine.options import parse_spec

    return parse_spec(spec)


@dataclass
class Method:
    """One row of the table: a name and a function ids -> (generated ids sans EOS, stats)."""

    name: str
    fn: object
    kind: str = "engine"
    seconds: list = field(default_factory=list)
    tokens: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    stats: list = field(default_factory=list)
    error: str | None = None


def engine_method(eng, spec: str, max_new: int, label: str = "") -> Method:
    from bench.peers import strip
    from engine import InputError
    from engine.options import check_count
    from engine.strategies import NEEDS_ASSISTANT

    name, opts = parse_strategy(spec)
    if name in NEEDS_ASSISTANT and eng.assistant is None:
        raise InputError(f"bench spec {spec!r} needs an assistant")
    check_count("max_new_tokens", max_new, eng.limits.max_new_tokens, "Engine.limits")
    if name == "auto":  # show what auto resolves to: a draft length by active requests
        spec = f"auto=k{eng.auto_table()}".replace(" ", "")

    def fn(ids):
        r = eng.generate(ids, strategy=name, max_new_tokens=max_new, **opts)
        return strip(r.token_ids), r.stats

    return Method(f"stairs/{spec}{label}", fn)


def peer_methods(
    peers: list[str],
    hf_main: Path,
    hf_asst: Path | None,
    onnx_main: Path,
    onnx_asst: Path | None,
    threads: int,
    max_new: int,
    workdir: Path,
    log,
) -> list[Method]:
    """Build the peers that can run here; a missing package becomes a row with a note."""
    out: list[Method] = []
    if "hf" in peers:
        _hf_methods(out, log, hf_main, hf_asst, threads, max_new)
    if "optimum" in peers:
        _optimum_methods(out, log, onnx_main, onnx_asst, threads, max_new)
    if "ct2" in peers:
        for ctype in ("float32", "int8"):

            def build(ctype=ctype):
                from bench.peers import CT2Worker

                ct = CT2Worker(hf_main, threads, ctype, workdir)
                return lambda ids: (ct.greedy(ids, max_new), None)

            _add_peer(out, log, f"ct2/{ctype}", build)
    return out


def _failed_peer(name: str, exc: Exception) -> Method:
    """A peer row that could not run, with the exception as its note."""
    return Method(name, None, "peer", error=f"{type(exc).__name__}: {exc}")


def _add_peer(out: list[Method], log, name: str, build) -> None:
    """Append the peer build() makes, or a row saying why it could not be built."""
    try:
        fn = build()
        out.append(Method(name, fn, "peer"))
    except Exception as exc:  # noqa: BLE001 - missing package or failing peer: report, never hide
        out.append(_failed_peer(name, exc))
        log(f"peer {name} skipped: {exc}")


def _hf_methods(out: list[Method], log, hf_main, hf_asst, threads: int, max_new: int) -> None:
    """Append HF transformers generate: greedy, and assisted variants when there is an assistant."""
    try:
        from bench.peers import HF

        hf = HF(hf_main, hf_asst, threads)
    except Exception as exc:  # noqa: BLE001 - a failing peer is reported
        out.append(_failed_peer("hf/greedy", exc))
        return
    _add_peer(out, log, "hf/greedy", lambda: lambda ids: (hf.greedy(ids, max_new), None))
    if hf_asst is None:
        return
    _add_peer(
        out, log, "hf/assisted-default", lambda: lambda ids: (hf.assisted(ids, max_new), None)
    )
    _add_peer(
        out,
        log,
        "hf/assisted-heuristic-5",
        lambda: lambda ids: (hf.assisted(ids, max_new, 5, "heuristic"), None),
    )
    _add_peer(
        out,
        log,
        "hf/assisted-constant-4",
        lambda: lambda ids: (hf.assisted(ids, max_new, 4, "constant"), None),
    )


def _optimum_methods(
    out: list[Method], log, onnx_main, onnx_asst, threads: int, max_new: int
) -> None:
    """Append Optimum ORTModelForSeq2SeqLM greedy, and assisted where it can run."""
    try:
        from bench.peers import Optimum

        opt = Optimum(onnx_main, onnx_asst, threads)
        _add_peer(out, log, "optimum/greedy", lambda: lambda ids: (opt.greedy(ids, max_new), None))
        if onnx_asst is not None:
            try:  # optimum cannot run assisted generation on T5: record why
                opt.greedy([5, 6, 1], 4, assistant=True)
                _add_peer(
                    out,
                    log,
                    "optimum/assisted",
                    lambda: lambda ids: (opt.greedy(ids, max_new, True), None),
                )
            except Exception as exc:  # noqa: BLE001 - a failing peer is reported
                out.append(_failed_peer("optimum/assisted", exc))
    except Exception as exc:  # noqa: BLE001 - a failing peer is reported
        out.append(_failed_peer("optimum/greedy", exc))


def interleave(
    methods: list[Method], prompts: list[list[int]], rounds: int, progress, watch=None
) -> None:
    """Run every method on every prompt, A B C A B C ..., so machine drift hits all alike.
    watch(name): an optional context manager entered around each timed call, outside its
    timing (bench.quiet.Monitor.watch accounts other processes' CPU there)."""
    watch = watch or (lambda name: contextlib.nullcontext())
    live = [m for m in methods if m.fn is not None]
    for m in live:  # warm-up: first calls allocate arenas and page in weights
        m.fn(prompts[0])
    bar = progress(total=rounds * len(prompts) * len(live), desc="bench", unit="gen")
    for r in range(rounds):
        for i, ids in enumerate(prompts):
            for m in live:
                with watch(m.name):
                    t = time.perf_counter()
                    toks, stats = m.fn(ids)
                    m.seconds.append(time.perf_counter() - t)
                m.tokens.append(len(toks))
                if r == 0:
                    m.outputs.append(toks)
                    m.stats.append(stats)
                bar.update()
    bar.close()


def rows(methods: list[Method], prompts: int, rounds: int) -> list[dict]:
    """Table rows: medians over rounds, speed-ups, latency, acceptance, mismatches."""
    by = {m.name: m for m in methods}
    own = next((m for m in methods if m.name.split("@")[0] == "stairs/greedy" and m.fn), None)
    ref = by.get("hf/greedy")
    if not (ref and ref.fn):
        ref = next(m for m in methods if m.name.split("@")[0] == "stairs/greedy")
    out = []
    for m in methods:
        if m.fn is None:
            out.append({"method": m.name, "kind": m.kind, "error": m.error})
            continue
        per_round = [sum(m.seconds[r * prompts : (r + 1) * prompts]) for r in range(rounds)]
        toks = sum(m.tokens[:prompts])
        total = statistics.median(per_round)
        lat = np.array(m.seconds).reshape(rounds, prompts)
        lat = np.median(lat, axis=0)
        row = {
            "method": m.name,
            "kind": m.kind,
            "seconds": total,
            "tokens": toks,
            "tokens_per_s": toks / total,
            "round_seconds": per_round,
            "p50_ms": float(np.percentile(lat, 50) * 1e3),
            "p90_ms": float(np.percentile(lat, 90) * 1e3),
            "mismatches": sum(a != b for a, b in zip(m.outputs, ref.outputs)),
            "reference": ref.name,
        }
        if m.kind == "engine" and own is not None:  # the promise: the main's own greedy tokens
            row["mismatches_vs_engine_greedy"] = sum(a != b for a, b in zip(m.outputs, own.outputs))
        st = [s for s in m.stats if s is not None]
        if st:
            tot = st[0]
            for s in st[1:]:
                tot = tot + s
            row.update(
                main_calls=tot.main_calls,
                draft_calls=tot.draft_calls,
                acceptance_rate=tot.acceptance_rate,
                tokens_per_main_call=tot.tokens_per_main_call,
                session_s=tot.session_s,
                engine_total_s=tot.total_s,
                overhead_pct=100 * tot.overhead_s / tot.total_s,
                encoder_s=tot.encoder_s,
                draft_s=tot.draft_s,
                verify_s=tot.verify_s,
            )
        out.append(row)
    base = {r["method"].split("@")[0]: r["tokens_per_s"] for r in out if "tokens_per_s" in r}
    for r in out:
        if "tokens_per_s" in r:
            if "hf/greedy" in base:
                r["speedup_vs_hf_greedy"] = r["tokens_per_s"] / base["hf/greedy"]
            if "stairs/greedy" in base:
                r["speedup_vs_engine_greedy"] = r["tokens_per_s"] / base["stairs/greedy"]
    return out


def sweep(eng, prompts, max_new: int, name: str, key: str, values, progress) -> list[dict]:
    """Speed-up over engine greedy for each setting, all interleaved prompt by prompt."""
    methods = [engine_method(eng, "greedy", max_new)]
    methods += [engine_method(eng, f"{name}:{key}={v}", max_new) for v in values]
    interleave(methods, prompts, 1, progress)
    g = sum(methods[0].seconds)
    res = []
    for v, m in zip(values, methods[1:]):
        st = m.stats[0]
        for s in m.stats[1:]:
            st = st + s
        res.append(
            {
                key: v,
                "speedup_vs_engine_greedy": g / sum(m.seconds),
                "tokens_per_s": sum(m.tokens) / sum(m.seconds),
                "acceptance_rate": st.acceptance_rate,
                "tokens_per_main_call": st.tokens_per_main_call,
            }
        )
    return res


# each engine row's count against its own main's greedy, by mode: an extra main (batch), the main
# (batch), the main (interleaved)
OWN_GREEDY_KEYS = (
    "mismatches_vs_own_greedy_b1",
    "mismatches_vs_engine_greedy_b1",
    "mismatches_vs_engine_greedy",
)


def engine_mismatches(rows: list[dict]) -> list[str]:
    """The engine cells of the main tables whose tokens differ from their main's own greedy, or
    that failed, one line each (peers are other implementations: their mismatches are
    reported, never a failure; sweeps record no tokens)."""
    out = []
    for r in rows:
        if r.get("kind") != "engine":
            continue
        key = next((k for k in OWN_GREEDY_KEYS if k in r), None)
        where = f" at B={r['batch_size']}" if "batch_size" in r else ""
        if key and r[key]:
            out.append(f"{r['method']}{where}: {r[key]} prompts differ from the main's own greedy")
        if r.get("error") or r.get("failed_prompts"):  # a prompt that never ran proves nothing
            why = r.get("error") or r.get("first_error")
            out.append(f"{r['method']}{where}: failed ({why})")
    return out
