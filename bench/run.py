"""run_bench: the whole benchmark as a library function (the CLI only maps arguments)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from bench import core, report

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def _ensure_exported(main: Path, assistant: Path, log) -> None:
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
) -> dict:
    """Benchmark engine strategies and peers side by side; write results.json/.md and plots."""
    from tqdm.auto import tqdm

    from engine import Engine

    log = (lambda msg: None) if quiet else (lambda msg: print(msg, flush=True))
    progress = lambda **kw: tqdm(disable=quiet, **kw)
    if quick:
        n, max_new_tokens, rounds, sweep_prompts = 3, 16, 1, 2
        strategies = strategies or [
            "greedy",
            "assisted:draft_tokens=4",
            "stairs:batch_size=3",
            "lookup",
            "staged",
        ]
        peers = [p for p in peers if p == "hf"]
    strategies = strategies or core.DEFAULT_STRATEGIES
    # Several assistants (comma list) give one set of engine rows each, labelled @name.
    assistants = [Path(a) for a in str(assistant).split(",")] if assistant else [None]
    main, assistant, out = Path(main), assistants[0], Path(out)
    _ensure_exported(main, assistant, log)
    engines = [Engine.load(main, a, provider=provider, threads=threads) for a in assistants]
    eng = engines[0]
    sp = eng.main.tokenizer
    rows = [json.loads(line) for line in Path(prompts).read_text().splitlines() if line.strip()]
    # The pair's convention: spiece.encode(context)[-255:] + [eos].
    ids = [
        sp.encode(r.get("context") or r.get("prompt") or r["text"])[-255:] + [sp.eos_id]
        for r in rows[:n]
    ]
    manifest = eng.main.manifest or {}
    hf_main = Path(manifest.get("source", main))
    hf_asst = Path((eng.assistant.manifest or {}).get("source", "")) if eng.assistant else None
    workdir = out / "work"
    workdir.mkdir(parents=True, exist_ok=True)
    methods = []
    for e, a in zip(engines, assistants):
        label = f"@{a.name}" if len(engines) > 1 else ""
        methods += [
            core.engine_method(e, s, max_new_tokens, label)
            for s in strategies
            if e is eng or core.parse_strategy(s)[0] not in core.NO_ASSISTANT
        ]
    methods += core.peer_methods(
        list(peers), hf_main, hf_asst, main, assistant, threads, max_new_tokens, workdir, log
    )
    t0 = time.perf_counter()
    core.interleave(methods, ids, rounds, progress)
    results = {
        "settings": {
            "main": str(main),
            "assistant": ",".join(map(str, assistants)),
            "prompts": len(ids),
            "max_new_tokens": max_new_tokens,
            "threads": threads,
            "rounds": rounds,
            "provider": provider,
            "quick": quick,
            "mean_input_tokens": sum(map(len, ids)) / len(ids),
        },
        "machine": core.machine(),
        "rows": core.rows(methods, len(ids), rounds),
    }
    if sweeps:
        sw_ids = ids[:sweep_prompts]
        eng = engines[-1]  # sweeps with the last assistant given
        results["sweeps"] = {
            "batch_size": core.sweep(
                eng,
                sw_ids,
                max_new_tokens,
                "stairs",
                "batch_size",
                [2, 3] if quick else list(range(2, 11)),
                progress,
            ),
            "draft_tokens": core.sweep(
                eng,
                sw_ids,
                max_new_tokens,
                "assisted",
                "draft_tokens",
                [1, 2] if quick else list(range(1, 11)),
                progress,
            ),
        }
        results["cost_curve"] = core.cost_curve(
            eng.main, [1, 2, 4] if quick else [*range(1, 17), 20, 24], reps=5 if quick else 30
        )
        if eng.assistant is not None:  # would a tree-attention verify pay? (bench/tree_sim.py)
            from bench import tree_sim

            log("tree simulation")
            results["tree_sim"] = tree_sim.simulate(
                eng, sw_ids, max_new_tokens, results["cost_curve"], (4, 6) if quick else None
            )
    results["seconds"] = time.perf_counter() - t0
    core.save(results, out)
    (out / "results.md").write_text(report.markdown(results))
    results["plots"] = report.plots(results, out)
    core.save(results, out)
    log((out / "results.md").read_text())
    return results
