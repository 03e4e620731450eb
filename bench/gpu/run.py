"""`stairs-bench gpu`: the device cache's tables in one run: exactness, main step cost,
throughput per back end.

    stairs-bench gpu --pair pycode=MAIN,ASSISTANT [--pair t5-large=MAIN,ASSISTANT ...]
        --prompts FILE.jsonl [--out DIR] [--provider cuda|cpu] [-n 16] [--max-new-tokens 48]
        [--budget-s 450] [--bandwidth 4.8e12] [--threads N]

Per pair, each section written to DIR/results.json as it finishes (a run stopped by its time
limit keeps what it measured), DIR/results.md at the end:
  exact   CPU greedy of every prompt, then on the provider every strategy x batch size 1, 2, 5,
          8 on the device and numpy back ends: mismatches against the provider's own greedy
          and against the CPU's; per-row logits bit-identity across 20 call shapes (CUDA: TF32
          on and off).
  cost    main step ms at 1/4/8/16 rows x 1 and 5 tokens: numpy back end (key/values cross
          the bus), device back end, resident bound, CUDA graph replay (if ORT captures this
          graph), and the floor: decoder weight bytes / --bandwidth.
  speed   tokens/s at batch 1-16, greedy and each strategy, device vs numpy back end,
          interleaved chunk by chunk; x greedy of the same back end.
Pairs after the first run smaller (sizes 1 and 8, fewer strategies): a big main's time is short.
Prompts: spiece.encode(context)[-255:] + [eos], the first n of the file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench.common import default_out, make_parser, out_help, read_prompt_ids, write_atomic, wrote
from bench.core import parse_strategy
from bench.quiet import Monitor, describe_check
from engine.layout import SPIECE_FILE

PROG = "stairs-bench gpu"

STRATEGIES = [
    "greedy",
    "assisted:draft_tokens=4",
    "assisted:draft_tokens=5,schedule=heuristic",
    "stairs:batch_size=4",
    "tree:draft_tokens=4,branches=2",
    "lookup",
    "staged",
]
BIG_STRATEGIES = ["greedy", "assisted:draft_tokens=5,schedule=heuristic", "tree", "lookup"]
SPEED_STRATEGIES = [
    "greedy",
    "assisted:draft_tokens=4",
    "assisted:draft_tokens=5,schedule=heuristic",
    "lookup",
    "auto",
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_prompts(path: Path, spm_path: Path, n: int, eos: int = 1) -> list[list[int]]:
    """The first n prompts' encoder ids: sentencepiece of the context, last 255, then EOS."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_path))
    return read_prompt_ids(path, n, sp.encode, eos)


def load(pair: tuple[str, str], provider: str, kv_cache: str, threads, tf32=None):
    """Engine.load of the pair; CUDA libraries preloaded first (nvidia-* pip packages)."""
    import onnxruntime as ort

    from engine import Engine

    if provider == "cuda" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    opts = None if tf32 is None or provider != "cuda" else {"use_tf32": str(tf32)}
    return Engine.load(
        pair[0],
        assistant=pair[1],
        provider=provider,
        threads=threads if provider == "cpu" else None,
        provider_options=opts,
        kv_cache=kv_cache,
        weights_cache=provider == "cpu",
    )


def batched(eng, prompts, spec: str, size: int, max_new: int) -> tuple[list, float]:
    """generate_batch over prompts in chunks of size: token ids per prompt, seconds."""
    name, opts = parse_strategy(spec)
    outs, sec = [], 0.0
    for i in range(0, len(prompts), size):
        t = time.perf_counter()
        res = eng.generate_batch(
            prompts[i : i + size], strategy=name, max_new_tokens=max_new, **opts
        )
        sec += time.perf_counter() - t
        outs += [getattr(r, "token_ids", None) for r in res]
    return outs, sec


def mismatches(outs: list, ref: list) -> int:
    return sum(a != b for a, b in zip(outs, ref, strict=True))


def section_exact(args, pair, prompts, big: bool) -> dict:
    """CPU greedy reference; each back end x strategy x size on the provider; invariance."""
    from bench.gpu.cost import invariance

    cpu = load(pair, "cpu", "numpy", args.threads)
    cpu_ref = [list(cpu.generate(p, max_new_tokens=args.max_new_tokens).token_ids) for p in prompts]
    del cpu
    res = {"cells": [], "invariance": []}
    # TF32 (ORT's CUDA default) on for both back ends, off for the device one; a big main: the
    # device back end with TF32 on only (its time is short)
    combos = [(None, "device"), (None, "numpy")]
    if args.provider == "cuda":
        combos = [(1, "device")] if big else [(1, "device"), (1, "numpy"), (0, "device")]
    for tf32, kv in combos:
        eng = load(pair, args.provider, kv, args.threads, tf32)
        own, _ = batched(eng, prompts, "greedy", 1, args.max_new_tokens)
        res["invariance"].append({"tf32": tf32, **invariance(eng.main, kv)})
        cells = _exact_cells(args, eng, prompts, big, {"own": own, "cpu": cpu_ref})
        res["cells"] += [{"tf32": tf32, "kv_cache": kv, **c} for c in cells]
        log(f"exact tf32={tf32} {kv}: {sum(c['vs_own_greedy'] for c in cells)} mismatches")
        if len(cells) < (len(BIG_STRATEGIES) * 2 if big else len(STRATEGIES) * 4):
            res["partial"] = "time budget spent"
        del eng
    return res


def _exact_cells(args, eng, prompts, big: bool, refs: dict) -> list[dict]:
    """Every strategy x batch size on eng, against its own greedy and the CPU's (until the
    deadline)."""
    sizes, specs = ([1, 8], BIG_STRATEGIES) if big else ([1, 2, 5, 8], STRATEGIES)
    cells = []
    for spec in specs:
        for size in sizes:
            if time.perf_counter() > args.deadline:
                return cells
            outs, sec = batched(eng, prompts, spec, size, args.max_new_tokens)
            cells.append({"strategy": spec, "size": size, "seconds": sec,
                          "vs_own_greedy": mismatches(outs, refs["own"]),
                          "vs_cpu_greedy": mismatches(outs, refs["cpu"])})  # fmt: skip
    return cells


def section_cost(args, pair, big: bool) -> dict:
    """Step costs of the main on the provider (see bench.gpu.cost.cost_table)."""
    from bench.gpu.cost import cost_table

    eng = load(pair, args.provider, "device", args.threads)
    rows = [1, 16] if big else [1, 4, 8, 16]
    cuda = args.provider == "cuda"
    return cost_table(eng.main, rows, [1, 5], args.reps, args.bandwidth, cuda, args.deadline)


def section_speed(args, pair, prompts, big: bool) -> dict:
    """tok/s per back end, strategy and batch size, the methods interleaved chunk by chunk."""
    engines = {kv: load(pair, args.provider, kv, args.threads) for kv in ("device", "numpy")}
    sizes = [1, 8, 16] if big else [1, 2, 4, 8, 16]
    specs = BIG_STRATEGIES[:2] if big else SPEED_STRATEGIES
    for eng in engines.values():  # warm-up: sessions, kernels, caches at the largest size
        for spec in specs:
            batched(eng, prompts[: max(sizes)], spec, max(sizes), 8)
    cells = []
    for size in sizes:
        if time.perf_counter() > args.deadline:
            return {"cells": cells, "partial": "time budget spent"}
        acc = {(kv, s): [0, 0.0] for kv in engines for s in specs}
        for i in range(0, len(prompts), size):
            chunk = prompts[i : i + size]
            for (kv, spec), a in acc.items():
                outs, sec = batched(engines[kv], chunk, spec, size, args.max_new_tokens)
                a[0] += sum(len(o or []) for o in outs)
                a[1] += sec
        for (kv, spec), (tokens, sec) in acc.items():
            greedy = acc[(kv, "greedy")]
            cells.append(
                {
                    "size": size,
                    "kv_cache": kv,
                    "strategy": spec,
                    "tok_s": tokens / sec,
                    "x_greedy": (tokens / sec) / max(greedy[0] / greedy[1], 1e-9),
                }
            )
        log(f"speed batch {size} done")
    return {"cells": cells}


def markdown(res: dict) -> str:
    """The tables of results.json as markdown."""
    from bench.gpu.report import tables

    return tables(res)


def run(args) -> dict:
    """Every section of every pair, results.json rewritten after each."""
    t0 = time.perf_counter()
    args.deadline = t0 + (args.budget_s or float("inf"))
    res = {
        "provider": args.provider,
        "prompts": args.n,
        "max_new_tokens": args.max_new_tokens,
        "bandwidth": args.bandwidth,
        "pairs": {},
    }
    try:
        import onnxruntime

        res["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    for k, (name, pair) in enumerate(args.pair):
        big = k > 0
        prompts = load_prompts(args.prompts, Path(pair[0]) / SPIECE_FILE, args.n // (1 + big))
        out = res["pairs"][name] = {"main": pair[0], "assistant": pair[1]}
        for section, fn in (
            ("exact", section_exact),
            ("cost", section_cost),
            ("speed", section_speed),
        ):
            if section not in args.sections:
                continue
            if args.budget_s and time.perf_counter() - t0 > args.budget_s:
                out[section] = {"skipped": "time budget spent"}
                continue
            t = time.perf_counter()
            try:
                extra = () if section == "cost" else (prompts,)
                out[section] = fn(args, pair, *extra, big)
            except Exception as exc:  # noqa: BLE001 - one failed section is a finding
                out[section] = {"error": f"{type(exc).__name__}: {exc}"}
            out[section]["seconds"] = time.perf_counter() - t
            log(f"{name} {section}: {out[section]['seconds']:.0f} s")
            write_atomic(args.out / "results.json", json.dumps(res, indent=2, default=str))
    res["seconds"] = time.perf_counter() - t0
    return res


def _pair(text: str) -> tuple[str, tuple[str, str]]:
    name, _, folders = text.partition("=")
    main, _, assistant = folders.partition(",")
    if not name or not main or not assistant:
        raise argparse.ArgumentTypeError("--pair NAME=MAIN,ASSISTANT")
    return name, (main, assistant)


def parser() -> argparse.ArgumentParser:
    """`stairs-bench gpu`'s flags."""
    p = make_parser(PROG, __doc__)
    p.add_argument("--pair", type=_pair, action="append", required=True,
                   metavar="NAME=MAIN,ASSISTANT",
                   help="exported pair to measure (repeat: later pairs run smaller)")  # fmt: skip
    p.add_argument("--prompts", type=Path, required=True, help="JSONL prompts file")
    p.add_argument("--out", type=Path, help=out_help("gpu"))
    p.add_argument("--provider", choices=["cuda", "cpu"], default="cuda", help="where to run")
    p.add_argument("-n", type=int, default=16, help="prompts (the later pairs: half)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="new tokens per prompt")
    p.add_argument("--threads", type=int, help="CPU sessions' threads (default: ORT's)")
    p.add_argument("--reps", type=int, default=20, help="timed calls per step-cost point")
    p.add_argument("--bandwidth", type=float, default="4.8e12", help="device bytes/s (H200's)")
    p.add_argument("--budget-s", type=float, default=450, help="seconds; no section starts after")
    p.add_argument("--sections", default="exact,cost,speed", help="which, comma-separated")
    p.add_argument("--wait-quiet", type=float, default=60, help="CPU: seconds to wait for quiet")
    return p


def main(argv: list[str] | None = None) -> int:
    """`stairs-bench gpu ...`: the exit status."""
    p = parser()
    args = p.parse_args(argv)
    if not 1 <= args.n <= 200 or not 1 <= args.max_new_tokens <= 512:
        p.error("-n must be 1-200 and --max-new-tokens 1-512")
    args.sections = args.sections.split(",")
    if set(args.sections) - {"exact", "cost", "speed"}:
        p.error("--sections: exact, cost and/or speed")
    args.out = args.out or default_out("gpu")
    mon = Monitor()  # on a shared CPU machine a busy neighbour makes every figure wrong
    quiet = [] if args.provider == "cuda" else [describe_check(mon.wait_quiet(args.wait_quiet))]
    res = run(args)
    if args.provider == "cpu":
        quiet.append(describe_check(mon.check(2.0)))
        res["quiet_before_after"] = quiet
    write_atomic(args.out / "results.json", json.dumps(res, indent=2, default=str))
    text = markdown(res)
    write_atomic(args.out / "results.md", text)
    print(text)
    wrote(PROG, args.out / "results.md", "results.json")
    return 0


if __name__ == "__main__":  # python -m bench.gpu.run: stairs-bench gpu
    raise SystemExit(main())
