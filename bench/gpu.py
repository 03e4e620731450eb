"""GPU checks through the engine's public API: token exactness, main-step cost, throughput.

    python -m bench.gpu exact --main DIR --assistant DIR --prompts FILE.jsonl [-n 40] [--cpu-ref]
    python -m bench.gpu speed --main DIR --assistant DIR --prompts FILE.jsonl [-n 20] [--io-binding]
    python -m bench.gpu cost --main DIR [--sizes 1,2,4,8,16]

Each writes a JSON (--out) and prints markdown tables. Prompts are encoder ids as in the tests:
spiece.encode(context)[-255:] + [eos].
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from bench.core import write_atomic

EXACT_STRATEGIES = [
    "assisted:draft_tokens=4",
    "assisted:draft_tokens=5,schedule=heuristic",
    "stairs:batch_size=4",
    "stairs:batch_size=7",
    "tree:draft_tokens=4,branches=2",
    "lookup",
    "staged",
]
SPEED_STRATEGIES = [
    "greedy",
    "assisted:draft_tokens=4",
    "assisted:draft_tokens=5,schedule=heuristic",
    "assisted:draft_tokens=8",
    "stairs:batch_size=4",
    "stairs:batch_size=7",
    "tree:draft_tokens=4,branches=2",
    "lookup",
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_prompts(path: Path, spm_path: Path, n: int, eos: int = 1) -> list[list[int]]:
    """The first n prompts' encoder ids: sentencepiece of the context, last 255, then EOS."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_path))
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [sp.encode(r["context"])[-255:] + [eos] for r in rows[:n]]


def load_engine(
    args,
    provider: str,
    options: dict | None = None,
    io_binding: bool = False,
    assistant_provider: str | None = None,
    assistant_threads: int | None = None,
):
    """Engine.load on `provider`; CUDA libraries preloaded first (nvidia-* pip packages)."""
    import onnxruntime as ort

    from engine import Engine

    if provider == "cuda" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    threads = args.threads if provider == "cpu" else None
    eng = Engine.load(
        args.main,
        assistant=args.assistant,
        provider=provider,
        threads=threads,
        provider_options=options,
        io_binding=io_binding,
        assistant_provider=assistant_provider,
        assistant_threads=assistant_threads,
    )
    for role, model in (("main", eng.main), ("assistant", eng.assistant)):
        if model is not None:
            log(f"{role}: {model.sessions['decoder'].get_providers()}")
    return eng


def first_diff(a: list[int], b: list[int]) -> int:
    """Index of the first differing token (len of the shorter if one is a prefix)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def compare(outs: list[list[int]], ref: list[list[int]]) -> dict:
    bad = [i for i, (a, b) in enumerate(zip(outs, ref)) if a != b]
    return {
        "prompts": len(ref),
        "mismatches": len(bad),
        "mismatching_prompts": bad,
        "first_diff_at": [first_diff(outs[i], ref[i]) for i in bad],
    }


def generate_all(eng, prompts, spec: str, max_new: int) -> tuple[list[list[int]], float]:
    from bench.core import parse_strategy

    name, opts = parse_strategy(spec)
    t = time.perf_counter()
    outs = [
        eng.generate(p, strategy=name, max_new_tokens=max_new, **opts).token_ids for p in prompts
    ]
    return outs, time.perf_counter() - t


def cmd_exact(args) -> dict:
    """CUDA greedy vs CPU greedy, and every strategy vs greedy on the same provider."""
    prompts = load_prompts(args.prompts, Path(args.main) / "spiece.model", args.n)
    res = {"prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "runs": []}
    cpu_ref = None
    if args.cpu_ref:
        cpu = load_engine(args, "cpu")
        cpu_ref, sec = generate_all(cpu, prompts, "greedy", args.max_new_tokens)
        res["cpu_greedy_s"] = sec
        log(f"cpu greedy done in {sec:.1f} s")
        del cpu
    settings = [None] if args.provider != "cuda" else [int(v) for v in args.tf32.split(",")]
    for tf32 in settings:
        opts = None if tf32 is None else {"use_tf32": tf32}
        eng = load_engine(args, args.provider, opts)
        ref, sec = generate_all(eng, prompts, "greedy", args.max_new_tokens)
        run = {"provider": args.provider, "use_tf32": tf32, "greedy_s": sec, "rows": []}
        if cpu_ref is not None:
            run["greedy_vs_cpu"] = compare(ref, cpu_ref)
            log(f"tf32={tf32} greedy vs cpu: {run['greedy_vs_cpu']['mismatches']} mismatches")
        for spec in args.strategies.split(";"):
            try:
                outs, sec = generate_all(eng, prompts, spec, args.max_new_tokens)
                row = {"strategy": spec, "seconds": sec, **compare(outs, ref)}
                if cpu_ref is not None:
                    row["vs_cpu_greedy"] = compare(outs, cpu_ref)["mismatches"]
            except Exception as exc:  # noqa: BLE001 (one broken strategy is a finding)
                row = {"strategy": spec, "error": f"{type(exc).__name__}: {exc}"}
            log(f"tf32={tf32} {spec}: {row.get('mismatches', row.get('error'))}")
            run["rows"].append(row)
        res["runs"].append(run)
        del eng
    return res


def print_exact(res: dict) -> None:
    for run in res["runs"]:
        print(
            f"\n### exactness, {run['provider']}, use_tf32={run['use_tf32']}, "
            f"{res['prompts']} prompts x {res['max_new_tokens']} tokens\n"
        )
        if "greedy_vs_cpu" in run:
            g = run["greedy_vs_cpu"]
            print(
                f"greedy vs CPU greedy: {g['mismatches']} mismatching prompts "
                f"{g['mismatching_prompts']} (first diff at {g['first_diff_at']})\n"
            )
        print("| strategy | mismatches vs greedy | vs CPU greedy | first diff at | seconds |")
        print("|---|---|---|---|---|")
        for r in run["rows"]:
            if "error" in r:
                print(f"| {r['strategy']} | failed: {r['error']} |||| ")
                continue
            print(
                f"| {r['strategy']} | {r['mismatches']} | {r.get('vs_cpu_greedy', '-')} | "
                f"{r['first_diff_at']} | {r['seconds']:.1f} |"
            )


def cmd_speed(args) -> dict:
    """Throughput of each strategy, interleaved prompt by prompt (bench.core's loop)."""
    from bench.core import engine_method, interleave, rows

    prompts = load_prompts(args.prompts, Path(args.main) / "spiece.model", args.n)
    opts = None
    if args.provider == "cuda" and args.tf32 is not None:
        opts = {"use_tf32": int(args.tf32)}
    engines = [("@" + args.provider, load_engine(args, args.provider, opts), args.strategies)]
    if args.io_binding:
        eng = load_engine(args, args.provider, opts, True)
        engines.append((f"@{args.provider}-iobind", eng, args.io_binding_strategies))
    if args.cpu_assistant:  # main on the provider, the small assistant on the CPU
        eng = load_engine(args, args.provider, opts, False, "cpu", args.cpu_assistant)
        engines.append(
            (f"@{args.provider}+cpu-asst{args.cpu_assistant}t", eng, args.cpu_strategies)
        )
    methods = [
        engine_method(eng, spec, args.max_new_tokens, label)
        for label, eng, specs in engines
        for spec in specs.split(";")
    ]

    class Bar:  # interleave wants a tqdm-like progress bar
        def __init__(self, **_):
            pass

        def update(self, *_):
            pass

        def close(self):
            pass

    t = time.perf_counter()
    interleave(methods, prompts, args.rounds, Bar)
    out = rows(methods, len(prompts), args.rounds)
    return {
        "provider": args.provider,
        "threads": args.threads if args.provider == "cpu" else None,
        "use_tf32": opts and opts["use_tf32"],
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "rounds": args.rounds,
        "wall_s": time.perf_counter() - t,
        "rows": out,
    }


def print_speed(res: dict) -> None:
    print(
        f"\n### throughput, {res['provider']} (threads {res['threads']}, tf32 {res['use_tf32']}), "
        f"{res['prompts']} prompts x {res['max_new_tokens']} tokens, {res['rounds']} round(s)\n"
    )
    print(
        "| method | tok/s | x greedy | ms/prompt | main calls | accept | tok/main call | "
        "encoders ms | draft ms | verify ms | overhead % | mismatches |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    greedy = {  # x greedy: against the greedy row of the same engine (label after '@')
        r["method"].split("@")[-1]: r["tokens_per_s"]
        for r in res["rows"]
        if r["method"].split("@")[0] == "stairs/greedy" and "tokens_per_s" in r
    }
    for r in res["rows"]:
        if "error" in r:
            print(f"| {r['method']} | failed: {r['error']} |||||||||||")
            continue
        n = res["prompts"]
        # an engine without its own greedy row (assistant on the CPU): the first engine's greedy
        base = greedy.get(r["method"].split("@")[-1], next(iter(greedy.values()), float("nan")))
        r["x_greedy"] = r["tokens_per_s"] / base
        print(
            f"| {r['method']} | {r['tokens_per_s']:.0f} | {r['x_greedy']:.2f}"
            f" | {1e3 * r['seconds'] / n:.1f} | {r.get('main_calls', '-')} | "
            f"{r.get('acceptance_rate', 0):.2f} | {r.get('tokens_per_main_call', 0):.2f} | "
            f"{1e3 * r.get('encoder_s', 0) / n:.1f} | {1e3 * r.get('draft_s', 0) / n:.1f} | "
            f"{1e3 * r.get('verify_s', 0) / n:.1f} | {r.get('overhead_pct', 0):.1f} | "
            f"{r['mismatches']} |"
        )


def iobind_ms(sess, feed: dict, reps: int, device: str, resident: bool) -> float:
    """Median ms of one call through IO binding. resident=False: what the engine's io_binding
    path does per call (bind numpy inputs, outputs on the device, copy them back); True: inputs
    already on the device and outputs left there (the call's own cost, no transfers)."""
    import onnxruntime as ort

    outs = [o.name for o in sess.get_outputs()]
    if resident:
        bind = sess.io_binding()
        for k, v in feed.items():
            bind.bind_ortvalue_input(k, ort.OrtValue.ortvalue_from_numpy(v, device, 0))
        for o in outs:
            bind.bind_output(o, device, 0)

        def once():
            sess.run_with_iobinding(bind)

    else:

        def once():
            b = sess.io_binding()
            for k, v in feed.items():
                b.bind_cpu_input(k, np.ascontiguousarray(v))
            for o in outs:
                b.bind_output(o, device, 0)
            sess.run_with_iobinding(b)
            b.copy_outputs_to_cpu()

    for _ in range(3):
        once()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        once()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts) * 1e3)


def cmd_cost(args) -> dict:
    """Main decoder-with-past call: n rows x 1 token, 1 row x n tokens, n x n; plain run and
    (CUDA) IO binding, engine-style and device-resident."""
    from bench.core import cost_curve, decoder_feed

    args.assistant = None
    eng = load_engine(args, args.provider)
    model = eng.main
    sizes = [int(s) for s in args.sizes.split(",")]
    res = {
        "provider": args.provider,
        "plain": cost_curve(model, sizes, args.past, args.enc_len, args.reps),
    }
    if args.provider == "cuda":
        sess = model.sessions["decoder_with_past"]
        for mode in ("iobind", "resident"):
            pts = []
            for n in sizes:
                pt = {"n": n}
                for key, (b, t) in (("rows", (n, 1)), ("tokens", (1, n))):
                    feed = decoder_feed(model, b, t, args.past, args.enc_len)
                    pt[key] = iobind_ms(sess, feed, args.reps, "cuda", mode == "resident")
                pts.append(pt)
            res[mode] = pts
    return res


def print_cost(res: dict) -> None:
    p = res["plain"]
    print(
        f"\n### main decoder_with_past call, {res['provider']} (past {p['past']}, encoder "
        f"{p['encoder_length']}), ms\n"
    )
    head = "| n | run: n rows x 1 | run: 1 row x n | run: n x n |"
    line = "|---|---|---|---|"
    if "iobind" in res:
        head += " iobind: n rows | iobind: n tokens | resident: n rows | resident: n tokens |"
        line += "---|---|---|---|"
    print(head)
    print(line)
    for i, n in enumerate(r["n"] for r in p["rows"]):
        s = (
            f"| {n} | {p['rows'][i]['ms']:.3f} | {p['tokens'][i]['ms']:.3f} | "
            f"{p['staircase'][i]['ms']:.3f} |"
        )
        if "iobind" in res:
            a, b = res["iobind"][i], res["resident"][i]
            s += f" {a['rows']:.3f} | {a['tokens']:.3f} | {b['rows']:.3f} | {b['tokens']:.3f} |"
        print(s)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("exact", "speed", "cost"):
        s = sub.add_parser(name)
        s.add_argument("--main", required=True)
        s.add_argument("--assistant")
        s.add_argument("--prompts", type=Path)
        s.add_argument("-n", type=int, default=40 if name == "exact" else 20)
        s.add_argument("--max-new-tokens", type=int, default=64)
        s.add_argument("--provider", choices=["cpu", "cuda"], default="cuda")
        s.add_argument("--threads", type=int, default=None, help="CPU engine threads")
        s.add_argument("--out", type=Path)
        if name == "exact":
            s.add_argument("--strategies", default=";".join(EXACT_STRATEGIES))
            s.add_argument("--tf32", default="1", help="use_tf32 values to run, e.g. 1,0")
            s.add_argument("--cpu-ref", action="store_true", help="compare greedy with the CPU")
        if name == "speed":
            s.add_argument("--strategies", default=";".join(SPEED_STRATEGIES))
            s.add_argument("--rounds", type=int, default=1)
            s.add_argument("--tf32", default=None)
            s.add_argument("--io-binding", action="store_true", help="also an io_binding engine")
            s.add_argument("--io-binding-strategies", default="greedy;assisted:draft_tokens=4")
            s.add_argument(
                "--cpu-assistant",
                type=int,
                default=0,
                metavar="THREADS",
                help="also an engine with the assistant on the CPU (this many threads)",
            )
            s.add_argument(
                "--cpu-strategies",
                default="assisted:draft_tokens=4;assisted:draft_tokens=5,schedule=heuristic",
            )
        if name == "cost":
            s.add_argument("--sizes", default="1,2,4,8,16")
            s.add_argument("--past", type=int, default=32)
            s.add_argument("--enc-len", type=int, default=129)
            s.add_argument("--reps", type=int, default=30)
    args = p.parse_args(argv)
    if args.cmd in ("exact", "speed") and args.prompts is None:
        p.error("--prompts is required")
    if not 1 <= getattr(args, "n", 1) <= 10_000:
        p.error("-n must be between 1 and 10000")
    fn, show = {
        "exact": (cmd_exact, print_exact),
        "speed": (cmd_speed, print_speed),
        "cost": (cmd_cost, print_cost),
    }[args.cmd]
    t = time.perf_counter()
    res = fn(args)
    res["seconds"] = time.perf_counter() - t
    try:
        import onnxruntime

        res["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    if args.out:
        write_atomic(args.out, json.dumps(res, indent=2, default=str))
    show(res)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
