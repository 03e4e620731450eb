"""`stairs-bench coldstart`: Engine.load -> first token, the plain load against the weights
cache (prepacked weights written once, then memory-mapped), cold and warm; the memory of
several serving processes against one; tokens checked identical throughout.

    stairs-bench coldstart --model pycode=MAIN,ASSISTANT --model t5-large=DIR \\
        --serve t5-large --workers 4 --out results/coldstart

Every measurement runs in a fresh process, one at a time; warm runs of a mode back to back
after one run that only brings its pages in. Cold: the page cache is dropped
(`/proc/sys/vm/drop_caches` as root, else posix_fadvise DONTNEED on every file involved)
before the process starts. Modes: plain (weights_cache=False: every file hashed and loaded by
ONNX Runtime itself), build (the first load on a machine: an empty cache), cache (the cache
built, hashes remembered). Writes results.json and results.md into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import (
    PUBLIC_PROMPTS,
    ROOT,
    default_out,
    machine,
    make_parser,
    out_help,
    weight_bytes,
    write_atomic,
    wrote,
)
from bench.quiet import Monitor, describe_check

PROG = "stairs-bench coldstart"
PROMPT = 'def list_files(path):\n    """Return the names of the files in path."""\n'
CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from engine import Engine
t_import = time.perf_counter() - t0

def smaps():
    out = {}
    for line in open("/proc/self/smaps_rollup"):
        k, _, v = line.partition(":")
        if k in ("Rss", "Pss", "Anonymous"):
            out[k] = int(v.split()[0]) * 1024
    out["File"] = out["Rss"] - out["Anonymous"]
    return out

a = json.loads(sys.argv[1])
t0 = time.perf_counter()
eng = Engine.load(a["main"], assistant=a["assistant"], weights_cache=a["cache"], threads=2)
t_load = time.perf_counter() - t0
mem_load = smaps()
stream = eng.stream(a["prompt"], strategy=a["strategy"], max_new_tokens=a["new"])
first = next(stream)
t_first = time.perf_counter() - t0
text = first + "".join(stream)
import resource
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"import_s": t_import, "load_s": t_load, "first_token_s": t_first,
                  "major_faults": ru.ru_majflt, "minor_faults": ru.ru_minflt,
                  "mem_load": mem_load, "mem_done": smaps(), "text": text}))
"""


SPEED = r"""
import json, sys, time
from engine import Engine
a = json.loads(sys.argv[1])
rows = [json.loads(l) for l in open(a["prompts"]) if l.strip()][: a["n"]]
engines = {"plain": Engine.load(a["main"], assistant=a["assistant"], threads=2, weights_cache=False),
           "cache": Engine.load(a["main"], assistant=a["assistant"], threads=2,
                                weights_cache=a["cache"])}
out = {}
for b in (1, 8):
    for strategy in ("greedy", "assisted"):
        t = {k: [] for k in engines}
        same = True
        for e in engines.values():  # warm-up: first allocations, first page faults
            e.generate_batch([rows[0]["context"]] * b, strategy=strategy, max_new_tokens=8)
        for i in range(0, len(rows) - b + 1, b):  # interleaved batch by batch
            texts = [r["context"] for r in rows[i : i + b]]
            got = {}
            for name in (("plain", "cache") if (i // b) % 2 == 0 else ("cache", "plain")):
                t0 = time.perf_counter()
                res = engines[name].generate_batch(texts, strategy=strategy,
                                                   max_new_tokens=a["new"], max_input_tokens=255)
                t[name].append(sum(len(r.token_ids) for r in res) / (time.perf_counter() - t0))
                got[name] = [r.token_ids for r in res]
            same = same and got["plain"] == got["cache"]
        out[f"B={b} {strategy}"] = {k: sorted(v)[len(v) // 2] for k, v in t.items()}
        out[f"B={b} {strategy}"]["tokens_identical"] = same
print(json.dumps(out))
"""


def measure_speed(main: Path, assistant: Path | None, cache: Path, a) -> dict:
    """Tokens/s of the plain and the cached engine in one process, interleaved batch by batch
    (medians), at batch 1 and 8, greedy and assisted; tokens compared."""
    args = {"main": str(main), "assistant": str(assistant) if assistant else None,
            "cache": str(cache), "prompts": str(a.prompts), "n": a.speed_prompts, "new": 48}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", SPEED, json.dumps(args)], cwd=ROOT,
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"speed child failed: {done.stderr[-3000:]}")
    res = json.loads(done.stdout.strip().splitlines()[-1])
    for k, r in res.items():
        print(f"  speed {k}: plain {r['plain']:.0f} tok/s, cache {r['cache']:.0f} tok/s,"
              f" identical {r['tokens_identical']}", flush=True)  # fmt: skip
    return res


def drop_page_cache(paths: list[Path]) -> str:
    """Evict the files under paths from the page cache: how it was done."""
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return "drop_caches"
    except OSError:
        pass
    for root in paths:
        for f in [root] if root.is_file() else (p for p in root.rglob("*") if p.is_file()):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return "fadvise"


def run_child(args: dict) -> dict:
    """One load + first token + the rest, in a fresh process."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"child failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_model(name: str, main: Path, assistant: Path | None, cache: Path, a) -> dict:
    """Every mode for one pair: plain warm/cold, build, cache warm/cold (medians of --repeat)."""
    strategy = "assisted" if assistant else "greedy"
    base = {"main": str(main), "assistant": str(assistant) if assistant else None,
            "prompt": PROMPT, "strategy": strategy, "new": a.new}  # fmt: skip
    files = [main, cache] + ([assistant] if assistant else [])
    runs: dict[str, list[dict]] = {}

    def one(mode: str, cold: bool) -> None:
        how = drop_page_cache(files) if cold else "warm"
        r = run_child({**base, "cache": False if mode == "plain" else str(cache)})
        r["page_cache"] = how
        runs.setdefault(f"{mode} {'cold' if cold else 'warm'}", []).append(r)
        print(f"  {name} {mode:5s} {'cold' if cold else 'warm'}: load {r['load_s']:.2f} s, "
              f"first token {r['first_token_s']:.2f} s, page faults {r['major_faults']} major"
              f" {r['minor_faults']} minor", flush=True)  # fmt: skip

    if cache.exists():
        shutil.rmtree(cache)  # ours: made by this benchmark under --out
    # warm runs of one mode back to back (each mode's files must be in the page cache, and a
    # t5-3b-shape folder and its cache entries do not both fit in RAM); the first of each
    # mode only brings its pages in, and is dropped
    for mode in ("plain", "build", "cache"):
        for _ in range(1 if mode == "build" else a.repeat + 1):
            one(mode, False)
        if mode != "build":
            runs[f"{mode} warm"] = runs[f"{mode} warm"][1:]
    for _ in range(a.cold_repeat):
        one("plain", True)
        one("cache", True)
    return summarize(name, main, assistant, runs)


def summarize(name: str, main: Path, assistant: Path | None, runs: dict) -> dict:
    """Medians per mode, and whether every run gave the same tokens."""
    texts = {r["text"] for rs in runs.values() for r in rs}
    modes = {}
    for mode, rs in runs.items():
        med = {k: statistics.median(r.get(k, 0) for r in rs)
               for k in ("load_s", "first_token_s", "major_faults", "minor_faults")}  # fmt: skip
        for when in ("mem_load", "mem_done"):
            for k in ("Anonymous", "File", "Pss"):
                med[f"{when}_{k}"] = statistics.median(r[when][k] for r in rs)
        modes[mode] = {**med, "n": len(rs), "page_cache": rs[0]["page_cache"]}
    return {
        "model": name,
        "weights_bytes": weight_bytes(main) + weight_bytes(assistant),
        "modes": modes,
        "tokens_identical": len(texts) == 1,
        "text": next(iter(texts)),
    }


def measure_serving(name: str, main: Path, cache: Path, workers: int, a) -> dict:
    """stairs-serve with 1 and with N workers, plain and cached: anonymous RSS and PSS of
    every worker after each answered a request (PSS splits a shared page among its users)."""
    out = {}
    for mode in ("cache", "plain"):
        for n in (1, workers):
            out[f"{mode} x{n}"] = serve_memory(main, cache if mode == "cache" else None, n, a)
            r = out[f"{mode} x{n}"]
            print(f"  {name} serve {mode} x{n}: anon {r['anon_total'] / 2**30:.2f} GiB, "
                  f"PSS {r['pss_total'] / 2**30:.2f} GiB", flush=True)  # fmt: skip
    return out


def serve_memory(main: Path, cache: Path | None, n: int, a) -> dict:
    """Start `stairs-serve --workers n`, send 4n concurrent requests, read every worker's
    smaps_rollup, stop it."""
    import concurrent.futures

    import httpx

    from serve.server import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "serve", "--main", str(main), "--port", str(port)]
    cmd += ["--workers", str(n), "--threads", "1", "--strategy", "greedy", "--drain-grace", "0"]
    cmd += ["--weights-cache", str(cache)] if cache else ["--no-weights-cache"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, url, n)
        body = {"model": main.name, "prompt": PROMPT, "max_tokens": 16}
        with concurrent.futures.ThreadPoolExecutor(4 * n) as pool:
            texts = list(pool.map(lambda _: httpx.post(url + "/v1/completions", json=body,
                                                       timeout=600).json()["choices"][0]["text"],
                                  range(4 * n)))  # fmt: skip
        kids = _children(proc.pid)
        mem = [_rollup(k) for k in kids]
    finally:
        proc.terminate()
        proc.wait(120)
    return {
        "workers": n,
        "anon_total": sum(m["Anonymous"] for m in mem),
        "pss_total": sum(m["Pss"] for m in mem),
        "rss_total": sum(m["Rss"] for m in mem),
        "same_text": len(set(texts)) == 1,
    }


def _wait_ready(proc, url: str, n: int) -> None:
    """Until each of the n workers said it serves (its 'stairs-serve: ... on http' line)."""
    import threading

    ready = []

    def read():
        for line in proc.stderr:
            text = line.decode(errors="replace")
            if " on http" in text and "workers (pids" not in text:
                ready.append(text)

    threading.Thread(target=read, daemon=True).start()
    end = time.monotonic() + 1800
    while len(ready) < n:
        if proc.poll() is not None or time.monotonic() > end:
            raise RuntimeError(f"stairs-serve did not start {n} workers ({url})")
        time.sleep(0.5)


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return kids or [pid]


def _rollup(pid: int) -> dict:
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("Rss", "Pss", "Anonymous"):
            out[k] = int(v.split()[0]) * 1024
    return out


def report(res: dict) -> str:
    """results.md: load and first token per model and mode, then serving memory."""
    gib = 2**30
    lines = [
        "# Cold start: Engine.load -> first token, plain vs weights cache",
        "",
        (
            f"Machine: {res['machine'].get('cpu', res['machine']['platform'])}, onnxruntime"
            f" {res['machine']['onnxruntime']}; quiet before: {res['quiet_before']}; after:"
            f" {res['quiet_after']}."
        ),
        "",
        (
            "| model | weights GiB | mode | load s | first token s | anon GiB | file GiB | PSS GiB"
            " | runs | page cache |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in res["models"]:
        for mode, r in m["modes"].items():
            lines.append(
                f"| {m['model']} | {m['weights_bytes'] / gib:.2f} | {mode} | {r['load_s']:.2f} |"
                f" {r['first_token_s']:.2f} | {r['mem_done_Anonymous'] / gib:.2f} |"
                f" {r['mem_done_File'] / gib:.2f} | {r['mem_done_Pss'] / gib:.2f} | {r['n']} |"
                f" {r['page_cache']} |"
            )
        lines.append(f"| {m['model']} | | text identical in every run: {m['tokens_identical']}"
                     " | | | | | | | |")  # fmt: skip
    if res.get("speed"):
        sp = dict(res["speed"])
        lines += ["", (f"## {sp.pop('model')}: tokens/s, plain vs cache, one process, interleaved"
                  " batch by batch (medians)"), "", ("| batch, strategy | plain | cache | ratio |"
                  " tokens identical |"), "|---|---|---|---|---|"]  # fmt: skip
        for k, r in sp.items():
            lines.append(f"| {k} | {r['plain']:.0f} | {r['cache']:.0f} |"
                         f" {r['cache'] / r['plain']:.2f} | {r['tokens_identical']} |")  # fmt: skip
    for name, serving in res.get("serving", {}).items():
        lines += ["", f"## {name}: stairs-serve workers, memory after each answered requests", "",
                  "| mode | workers | anonymous GiB (all) | PSS GiB (all) | RSS GiB (all) |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for mode, r in serving.items():
            lines.append(
                f"| {mode.split()[0]} | {r['workers']} | {r['anon_total'] / gib:.2f} |"
                f" {r['pss_total'] / gib:.2f} | {r['rss_total'] / gib:.2f} |"
            )
    return "\n".join(lines) + "\n"


def _pair(text: str) -> tuple[str, Path, Path | None]:
    name, _, paths = text.partition("=")
    if not name or not paths:
        raise argparse.ArgumentTypeError(f"{text!r}: NAME=MAIN[,ASSISTANT] expected")
    main, _, asst = paths.partition(",")
    return name, Path(main), Path(asst) if asst else None


def parser() -> argparse.ArgumentParser:
    """`stairs-bench coldstart`'s flags."""
    p = make_parser(PROG, __doc__)
    p.add_argument("--model", type=_pair, action="append", required=True,
                   metavar="NAME=MAIN[,ASSISTANT]",
                   help="a pair to measure, named in the report (repeat for more)")  # fmt: skip
    p.add_argument("--serve", action="append", default=[], metavar="NAME",
                   help="also measure --workers serving processes of this model")  # fmt: skip
    p.add_argument("--workers", type=int, default=4, help="serving processes with --serve")
    p.add_argument("--repeat", type=int, default=3, help="warm runs per mode")
    p.add_argument("--cold-repeat", type=int, default=2, help="cold runs per mode")
    p.add_argument("--new", type=int, default=16, help="new tokens per run")
    p.add_argument("--out", type=Path, help=out_help("coldstart"))
    p.add_argument("--speed", metavar="NAME", help="also compare tokens/s of this model's pair")
    p.add_argument("--prompts", type=Path, default=PUBLIC_PROMPTS, help="JSONL prompts (--speed)")
    p.add_argument("--speed-prompts", type=int, default=32, help="prompts --speed runs")
    p.add_argument("--wait-quiet", type=float, default=120, help="seconds to wait for quiet")
    return p


def main(argv: list[str] | None = None) -> int:
    """`stairs-bench coldstart ...`: the exit status."""
    a = parser().parse_args(argv)
    a.out = a.out or default_out("coldstart")
    mon = Monitor()
    before = mon.wait_quiet(a.wait_quiet)
    print(f"quiet before: {before['quiet']} ({describe_check(before)})", flush=True)
    res = {"machine": machine(), "quiet_before": describe_check(before), "models": [],
           "serving": {}}  # fmt: skip
    for name, main_dir, asst in a.model:
        cache = a.out / "work" / f"cache-{name}"
        res["models"].append(measure_model(name, main_dir, asst, cache, a))
        if name == a.speed:
            res["speed"] = {"model": name, **measure_speed(main_dir, asst, cache, a)}
        if name in a.serve:
            res["serving"][name] = measure_serving(name, main_dir, cache, a.workers, a)
        write_atomic(a.out / "results.json", json.dumps(res, indent=1))
    after = mon.check(2.0)
    res["quiet_after"] = describe_check(after)
    print(f"quiet after: {after['quiet']} ({describe_check(after)})", flush=True)
    write_atomic(a.out / "results.json", json.dumps(res, indent=1))
    write_atomic(a.out / "results.md", report(res))
    print(report(res))
    wrote(PROG, a.out / "results.md", "results.json")
    return 0


if __name__ == "__main__":  # python -m bench.coldstart: stairs-bench coldstart
    raise SystemExit(main())
