"""`stairs-bench load`: stairs-serve under load, continuous batching vs one request at a time.

For each mode (a `stairs-serve` process: `batched`, `single` = `--max-active 1`, `shared` =
batched with `--shared-thread-pool`) and each number of concurrent clients, the clients stream
completions back to back for a fixed time; reported: completion tokens/s, time to first token
and per-token latency p50/p90/p99. Writes results.json, results.md and load.png into --out.
Every answer is also checked against the first answer the same prompt got (mismatches are
counted: greedy output never depends on load).

    stairs-bench load --main models/pycode-t5-main --assistant models/pycode-t5-draft \\
        --clients 1,2,4,8,16,32 --duration 20 --out results/load
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import (
    PUBLIC_PROMPTS,
    ROOT,
    default_out,
    make_parser,
    out_help,
    quiet_start,
    warn_not_quiet,
    write_atomic,
    wrote,
)
from bench.quiet import Monitor, NotQuietError, add_quiet_arguments, check_quiet_arguments

PROG = "stairs-bench load"
# shared: batched on one process-wide ORT pool (stairs-serve --shared-thread-pool)
MODES = {"batched": [], "single": ["--max-active", "1"], "shared": ["--shared-thread-pool"]}
MAX_CLIENTS = 1024


def _counts(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated integers expected") from None
    if not out or not all(1 <= c <= MAX_CLIENTS for c in out):
        raise argparse.ArgumentTypeError(f"client counts must be from 1 to {MAX_CLIENTS}")
    return sorted(set(out))  # one level each: its quiet window is its own


def start_server(args, mode: str, port: int) -> subprocess.Popen:
    """A stairs-serve process for mode; returns once /ready answers."""
    import httpx

    cmd = [sys.executable, "-m", "serve", "--main", args.main, "--port", str(port)]
    if args.assistant:
        cmd += ["--assistant", args.assistant]
    cmd += ["--strategy", args.strategy, "--threads", str(args.threads), "--no-verify"]
    cmd += ["--drain-grace", "0"]  # no load balancer to tell: stop at once
    cmd += ["--max-queue", str(4 * max(args.clients)), *MODES[mode]]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    end = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"stairs-serve exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if time.monotonic() > end:
            proc.kill()
            raise RuntimeError("stairs-serve did not become ready in 300 s")
        time.sleep(0.25)


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def one_request(client, url: str, body: dict) -> dict:
    """Stream one completion: text, tokens, time to first text, per-token latency."""
    t0 = time.perf_counter()
    first, text, usage = None, "", None
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                return {"error": ev["error"]["message"]}
            if ev.get("usage"):
                usage = ev["usage"]
            for c in ev.get("choices", []):
                if c["text"] and first is None:
                    first = time.perf_counter()
                text += c["text"]
    end = time.perf_counter()
    n = usage["completion_tokens"] if usage else 0
    return {
        "text": text,
        "tokens": n,
        "ttft": (first or end) - t0,
        "tpot": (end - first) / (n - 1) if first is not None and n > 1 else None,
    }


async def run_level(port: int, model: str, prompts: list[str], clients: int, args) -> dict:
    """clients concurrent loops for args.duration seconds; requests started before the end count."""
    import httpx

    url = f"http://127.0.0.1:{port}/v1/completions"
    results: list[tuple[str, dict]] = []
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=args.request_timeout, limits=limits) as client:
        t0 = time.perf_counter()
        stop_at = t0 + args.duration

        async def loop(c: int) -> None:
            i = c
            while time.perf_counter() < stop_at:
                p = prompts[i % len(prompts)]
                i += clients
                body = {"model": model, "prompt": p, "max_tokens": args.max_tokens}
                body.update(stream=True, stream_options={"include_usage": True})
                try:
                    res = await one_request(client, url, body)
                except httpx.HTTPError as exc:
                    res = {"error": f"{type(exc).__name__}: {exc}"}
                results.append((p, res))

        await asyncio.gather(*(loop(c) for c in range(clients)))
        wall = time.perf_counter() - t0
    ok = [r for _, r in results if "error" not in r]
    tokens = sum(r["tokens"] for r in ok)

    def pct(key):
        v = [r[key] for r in ok if r.get(key) is not None]
        return {f"p{q}": float(np.percentile(v, q)) if v else None for q in (50, 90, 99)}

    return {
        "clients": clients,
        "requests": len(results),
        "errors": [r["error"] for _, r in results if "error" in r][:5],
        "n_errors": len(results) - len(ok),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_s": pct("ttft"),
        "tpot_s": pct("tpot"),
        "texts": [(p, r["text"]) for p, r in results if "error" not in r],
    }


def markdown(res: dict) -> str:
    from bench.report import quiet_lines

    s = res["settings"]
    lines = [
        (
            f"# stairs-serve load: {s['strategy']}, {s['max_tokens']} tokens per request, "
            f"{s['duration']} s per level, {s['threads']} threads"
        ),
        "",
        *quiet_lines(res),
        (
            "| mode | clients | requests | tok/s | x single | TTFT p50 ms | p90 | p99 | "
            "per-token p50 ms | p90 | p99 | errors | mismatches | others CPU/s |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    single = {r["clients"]: r["tokens_per_s"] for r in res["rows"] if r["mode"] == "single"}

    def ms(v):
        return f"{1000 * v:.0f}" if isinstance(v, float) else "–"

    for r in res["rows"]:
        base = single.get(r["clients"])
        x = f"{r['tokens_per_s'] / base:.2f}" if base else "–"
        t, p = r["ttft_s"], r["tpot_s"]
        others = f"{r['others_cpu_per_s']:.2f}" if "others_cpu_per_s" in r else "–"
        lines.append(
            f"| {r['mode']} | {r['clients']} | {r['requests']} | {r['tokens_per_s']:.0f} | {x} "
            f"| {ms(t['p50'])} | {ms(t['p90'])} | {ms(t['p99'])} | {ms(p['p50'])} | "
            f"{ms(p['p90'])} | {ms(p['p99'])} | {r['n_errors']} | {r['mismatches']} | "
            f"{others} |"
        )
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for i, mode in enumerate(MODES):
        rows = [r for r in res["rows"] if r["mode"] == mode]
        if not rows:
            continue
        c = [r["clients"] for r in rows]
        a.plot(c, [r["tokens_per_s"] for r in rows], "o-", color=f"C{i}", label=mode)
        for q, style in (("p50", "o-"), ("p99", "x--")):
            v = [1000 * (r["ttft_s"][q] or float("nan")) for r in rows]
            b.plot(c, v, style, color=f"C{i}", label=f"{mode} {q}")
    for ax, title in ((a, "completion tokens/s"), (b, "time to first token (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    b.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    """`stairs-bench load`'s flags."""
    p = make_parser(PROG, __doc__)
    p.add_argument("--main", required=True, help="exported main folder the server loads")
    p.add_argument("--assistant", help="exported assistant folder (default: none)")
    p.add_argument(
        "--strategy",
        default="auto",
        choices=["auto", "greedy", "assisted", "lookup"],
        help="the server's --strategy",
    )
    p.add_argument(
        "--clients",
        type=_counts,
        default="1,2,4,8,16,32",
        metavar="N,N,...",
        help="concurrent clients at each level",
    )
    p.add_argument("--duration", type=float, default=20.0, help="seconds per level")
    p.add_argument("--max-tokens", type=int, default=64, help="completion tokens per request")
    p.add_argument("--threads", type=int, default=2, help="the server's --threads")
    p.add_argument("--prompts", default=str(PUBLIC_PROMPTS), help="JSONL prompts file")
    p.add_argument("-n", type=int, default=40, help="prompts used, round robin")
    p.add_argument("--modes", default="batched,single", help="batched, single and/or shared")
    p.add_argument(
        "--request-timeout", type=float, default=300.0, help="seconds one request may take"
    )
    p.add_argument("--out", help=out_help("load"))
    add_quiet_arguments(p, "60")
    return p


def _modes(p: argparse.ArgumentParser, a: argparse.Namespace) -> list[str]:
    """Check --modes and the numeric flags; return the modes to run."""
    modes = [m for m in a.modes.split(",") if m]
    if not modes or any(m not in MODES for m in modes):
        p.error(f"--modes: comma-separated from {', '.join(MODES)}")
    if not 0 < a.duration <= 3600 or not 1 <= a.max_tokens <= 4096 or not 1 <= a.n <= 100_000:
        p.error("--duration (0, 3600], --max-tokens [1, 4096], -n [1, 100000]")
    return modes


def _run_mode(
    a, mode: str, port: int, monitor: Monitor, model: str, prompts, first_text, rows
) -> None:
    """Serve with one mode on port and append a row per client count to rows."""
    proc = start_server(a, mode, port)
    try:
        for c in a.clients:
            with monitor.watch(f"{mode} clients={c}"):
                r = asyncio.run(run_level(port, model, prompts, c, a))
            r["others_cpu_per_s"] = monitor.windows[monitor.phase][
                f"{mode} clients={c}"
            ].others_per_s
            texts = r.pop("texts")
            r["mismatches"] = sum(first_text.setdefault(p_, t) != t for p_, t in texts)
            r["mode"] = mode
            rows.append(r)
            print(
                f"{mode:8s} clients={c:3d} requests={r['requests']:4d} "
                f"tok/s={r['tokens_per_s']:7.1f} ttft p50={r['ttft_s']['p50']} "
                f"p99={r['ttft_s']['p99']} errors={r['n_errors']} mismatches={r['mismatches']}",
                flush=True,
            )
    finally:
        stop_server(proc)


def _write_results(a, out: Path, prompts, rows: list[dict], monitor: Monitor) -> dict:
    """Write results.json, results.md and load.png; return the results."""
    import onnxruntime

    res = {
        "settings": {
            "main": a.main,
            "assistant": a.assistant,
            "strategy": a.strategy,
            "duration": a.duration,
            "max_tokens": a.max_tokens,
            "threads": a.threads,
            "prompts": len(prompts),
            "cpus": os.cpu_count(),
            "onnxruntime": onnxruntime.__version__,
        },
        "rows": rows,
        "quiet": monitor.summary(),
    }
    write_atomic(out / "results.json", json.dumps(res, indent=1))
    write_atomic(out / "results.md", markdown(res))
    write_atomic(out / "load.png", lambda f: plot(res, f))
    print(markdown(res))
    return res


def main(argv: list[str] | None = None) -> int:
    """`stairs-bench load ...`: the exit status."""
    p = parser()
    a = p.parse_args(argv)
    policy = check_quiet_arguments(p, a, default_wait=60.0)
    modes = _modes(p, a)
    from engine.cli import read_prompts
    from serve import free_port

    prompts = read_prompts(a.prompts, a.n)
    model = Path(a.main).name
    out = Path(a.out) if a.out else default_out("load")
    rows, first_text = [], {}
    # the server is a child process: its CPU counts as ours, everything else as others'
    monitor = Monitor(policy.threshold, policy.load)
    try:
        quiet_start(monitor, policy, print, PROG)
    except NotQuietError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    for mode in modes:
        _run_mode(a, mode, free_port(), monitor, model, prompts, first_text, rows)
    res = _write_results(a, out, prompts, rows, monitor)
    warn_not_quiet(res["quiet"], PROG)
    wrote(PROG, out / "results.md", "results.json", "load.png")
    if policy.require and not res["quiet"]["ok"]:
        print(f"{PROG}: error: --require-quiet: the machine was not quiet", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # python -m bench.load: stairs-bench load
    raise SystemExit(main())
