"""Batched generation (Engine.generate_batch) on one provider: throughput and token exactness.

    python -m bench.gpu_batch --main DIR --assistant DIR --prompts FILE.jsonl [-n 32]
        [--sizes 1,4,8,16] [--strategies "greedy;assisted:draft_tokens=4;lookup;auto"]
        [--provider cuda|cpu] [--threads N] [--ref OTHER.json] [--budget-s S] [--out FILE.json]

The prompts run in chunks of each batch size (one generate_batch call per chunk); tok/s is all
new tokens over the summed wall time. Every request is compared with single-request
generate() greedy on the same engine (and with --ref's tokens, e.g. the CUDA run's, if given).
The JSON is rewritten after every measurement, so a run stopped by its time limit keeps what
it measured; --budget-s skips the measurements that would start after that many seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench.core import write_atomic
from bench.gpu import compare, load_engine, load_prompts, log

STRATEGIES = "greedy;assisted:draft_tokens=4;lookup;auto"


def write_json(path: Path | None, res: dict) -> None:
    """Write res to path through a temp file and a rename (a partial file never shows)."""
    if path is None:
        return
    write_atomic(path, json.dumps(res, indent=2, default=str))


def run_batched(eng, prompts, spec: str, size: int, max_new: int) -> dict:
    """generate_batch over prompts in chunks of size; tokens, seconds and per-request stats."""
    from bench.core import parse_strategy

    name, opts = parse_strategy(spec)
    outs, errors, stats, sec = [], [], [], 0.0
    for i in range(0, len(prompts), size):
        chunk = prompts[i : i + size]
        t = time.perf_counter()
        res = eng.generate_batch(chunk, strategy=name, max_new_tokens=max_new, **opts)
        sec += time.perf_counter() - t
        for r in res:
            if isinstance(r, Exception):
                errors.append(f"{type(r).__name__}: {r}")
                outs.append([])
            else:
                outs.append(list(r.token_ids))
                stats.append(r.stats)
    tokens = sum(len(o) for o in outs)
    calls = sum(s.main_calls for s in stats)
    drafted = sum(s.drafted for s in stats)
    return {
        "outs": outs,
        "errors": errors,
        "seconds": sec,
        "tokens": tokens,
        "tok_s": tokens / sec if sec else 0.0,
        "tok_per_main_call": tokens / calls if calls else 0.0,
        "mean_batch_rows": sum(s.batch_rows for s in stats) / calls if calls else 0.0,
        "accept": sum(s.accepted for s in stats) / drafted if drafted else 0.0,
    }


def measure(args) -> dict:
    """Single-request greedy reference, then every (batch size, strategy) measurement."""
    t_start = time.perf_counter()
    prompts = load_prompts(args.prompts, Path(args.main) / "spiece.model", args.n)
    sizes = [int(s) for s in args.sizes.split(",")]
    specs = [s for s in args.strategies.split(";") if s]
    from bench.core import parse_strategy

    for spec in specs:  # a typo fails here, before any model loads
        parse_strategy(spec)
    opts = {"use_tf32": int(args.tf32)} if args.provider == "cuda" and args.tf32 else None
    eng = load_engine(args, args.provider, opts)
    res = {
        "provider": args.provider,
        "threads": args.threads,
        "tf32": args.tf32,
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "auto_table": eng.auto_table(),
        "rows": [],
    }
    try:
        import onnxruntime

        res["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    other = None
    if args.ref:
        other = json.loads(args.ref.read_text())
        res["ref_from"] = f"{args.ref} ({other['provider']})"
        other = other["single_greedy"]["outs"]
    # warm-up: sessions, kernels and the batch caches at the largest size (not timed)
    t = time.perf_counter()
    w = prompts[: max(sizes)]
    for spec in specs:
        run_batched(eng, w, spec, len(w), 8)
    eng.generate(prompts[0], max_new_tokens=8)
    res["warmup_s"] = time.perf_counter() - t
    log(f"warm-up {res['warmup_s']:.1f} s")
    t = time.perf_counter()
    ref = [list(eng.generate(p, max_new_tokens=args.max_new_tokens).token_ids) for p in prompts]
    sec = time.perf_counter() - t
    tokens = sum(len(o) for o in ref)
    res["single_greedy"] = {"outs": ref, "seconds": sec, "tokens": tokens, "tok_s": tokens / sec}
    if other is not None:
        res["single_greedy"]["vs_ref"] = compare(ref, other)
    log(f"single greedy: {tokens / sec:.0f} tok/s")
    write_json(args.out, res)
    for size in sizes:
        for spec in specs:
            if args.budget_s and time.perf_counter() - t_start > args.budget_s:
                log(f"budget spent: skipping batch {size} {spec}")
                res["rows"].append({"size": size, "strategy": spec, "skipped": "budget"})
                continue
            try:
                row = run_batched(eng, prompts, spec, size, args.max_new_tokens)
                outs = row.pop("outs")
                row.update(compare(outs, ref))
                if other is not None:
                    row["vs_ref"] = compare(outs, other)["mismatches"]
            except Exception as exc:  # noqa: BLE001 - one broken run is a finding, not the end
                row = {"error": f"{type(exc).__name__}: {exc}"}
            row = {"size": size, "strategy": spec, **row}
            res["rows"].append(row)
            log(
                f"batch {size} {spec}: {row.get('tok_s', 0):.0f} tok/s, "
                f"{row.get('mismatches', row.get('error'))} mismatching"
            )
            write_json(args.out, res)
    return res


def print_table(res: dict) -> None:
    """The rows as a markdown table."""
    g = res["single_greedy"]
    ref = res.get("ref_from")
    print(
        f"\n### generate_batch, {res['provider']} (threads {res['threads']}, tf32 {res['tf32']}),"
        f" {res['prompts']} prompts x {res['max_new_tokens']} tokens; single-request greedy"
        f" {g['tok_s']:.0f} tok/s; auto table {res['auto_table']}"
    )
    if "vs_ref" in g:
        print(f"single greedy vs {ref}: {g['vs_ref']['mismatches']} mismatching prompts")
    print(
        "\n| batch | strategy | tok/s | x single greedy | tok/main call | rows/call | accept |"
        " mismatching vs single greedy | first diff at | errors |" + (" vs ref |" if ref else "")
    )
    print("|---|---|---|---|---|---|---|---|---|---|" + ("---|" if ref else ""))
    for r in res["rows"]:
        if "tok_s" not in r:
            print(f"| {r['size']} | {r['strategy']} | {r.get('error', r.get('skipped'))} |")
            continue
        print(
            f"| {r['size']} | {r['strategy']} | {r['tok_s']:.0f} | {r['tok_s'] / g['tok_s']:.2f} |"
            f" {r['tok_per_main_call']:.2f} | {r['mean_batch_rows']:.1f} | {r['accept']:.2f} |"
            f" {r['mismatches']} | {r['first_diff_at']} | {len(r['errors'])} |"
            + (f" {r.get('vs_ref', '-')} |" if ref else "")
        )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(
        prog="python -m bench.gpu_batch", description=__doc__.split("\n")[0]
    )
    p.add_argument("--main", required=True)
    p.add_argument("--assistant")
    p.add_argument("--prompts", type=Path, required=True)
    p.add_argument("-n", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sizes", default="1,4,8,16")
    p.add_argument("--strategies", default=STRATEGIES)
    p.add_argument("--provider", choices=["cpu", "cuda"], default="cuda")
    p.add_argument("--threads", type=int, default=None, help="CPU engine threads")
    p.add_argument("--tf32", default=None, help="CUDA use_tf32 (default: ORT's)")
    p.add_argument("--ref", type=Path, help="another run's JSON: compare with its single greedy")
    p.add_argument("--budget-s", type=float, default=0, help="start no measurement after this")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if not 1 <= args.n <= 10_000 or not 1 <= args.max_new_tokens <= 4096:
        p.error("-n must be in 1..10000 and --max-new-tokens in 1..4096")
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        p.error("--sizes must be comma-separated integers")
    if not sizes or not all(1 <= s <= 1024 for s in sizes):
        p.error("--sizes must be in 1..1024")
    t = time.perf_counter()
    res = measure(args)
    res["seconds"] = time.perf_counter() - t
    write_json(args.out, res)
    print_table(res)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
