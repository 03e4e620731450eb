"""`stairs-bench exact`: the exactness table. Every strategy at batch sizes 1, 2, 5 and 8,
on the pycode main exported fp32, fp16, int8 and int4 (weight-only), against that main's own
greedy `generate` (0 mismatches is the product's promise), plus the share of continuations
identical to the fp32 main's greedy. Public API only: export.export_model, Engine.

Prompts: the public ones, mixed in length (prompt i keeps its last 4 + (i * 37) % 126 tokens
and the final EOS, so rows of 5 to 130 input tokens share calls). The mains are exported once
into --models and reused by later runs. Writes results.json and results.md to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.common import (
    LOCAL_RESULTS,
    PUBLIC_PROMPTS,
    SHARED,
    default_out,
    make_parser,
    out_help,
    write_atomic,
    wrote,
)
from engine.layout import MANIFEST

PROG = "stairs-bench exact"
STRATEGIES = [
    ("greedy", {}),
    ("assisted", {"draft_tokens": 4}),
    ("assisted", {"draft_tokens": 5, "schedule": "heuristic"}),
    ("stairs", {"batch_size": 5}),
    ("tree", {"draft_tokens": 3, "branches": 2}),
    ("lookup", {}),
    ("staged", {}),
    ("auto", {}),
]
DTYPES = ("fp32", "fp16", "int8", "int4")


def prompts(engine, n: int) -> list[list[int]]:
    """n public prompts as encoder ids, mixed in length."""
    rows = [json.loads(x) for x in PUBLIC_PROMPTS.open()][:n]
    out = []
    for i, r in enumerate(rows):
        ids = engine.encode(r["context"], 255, "left")[0].tolist()
        keep = 4 + (i * 37) % 126
        out.append(ids[:-1][-keep:] + ids[-1:])
    return out


def folders(models: Path, dtypes, log) -> dict:
    """The pycode main in each dtype (exported once into models) and the int8 assistant."""
    from export import export_model

    found = {}
    for d in dtypes:
        main = models / f"pycode-t5-main-{d}"
        asst = models / "pycode-t5-draft"
        if not (main / MANIFEST).is_file():
            log(f"exporting the pycode main as {d}")
            export_model(
                str(SHARED / "models" / "pycode-t5-main"),
                main,
                assistant=str(SHARED / "models" / "pycode-t5-draft"),
                dtype=d,
                quiet=True,
                force=True,
            )
            if (main.parent / "pycode-t5-draft").is_dir() and not asst.is_dir():
                (main.parent / "pycode-t5-draft").rename(asst)
        found[d] = (main, asst if asst.is_dir() else main.parent / "pycode-t5-draft")
    return found


def one_dtype(main, asst, ids, new: int, sizes, ref32) -> dict:
    """Mismatches of every strategy x batch size against this main's own greedy."""
    from engine import Engine

    eng = Engine.load(main, assistant=asst, threads=2)
    own = [eng.generate(p, max_new_tokens=new).token_ids for p in ids]
    res = {"identical_to_fp32": sum(a == b for a, b in zip(own, ref32 or own)), "rows": []}
    for name, opts in STRATEGIES:
        for b in sizes:
            t = time.perf_counter()
            got = []
            for i in range(0, len(ids), b):
                got += eng.generate_batch(ids[i : i + b], strategy=name, max_new_tokens=new, **opts)
            bad = sum(g.token_ids != o for g, o in zip(got, own))
            res["rows"].append({"strategy": name, "options": opts, "batch": b,
                                "mismatches": bad, "seconds": time.perf_counter() - t})  # fmt: skip
    return res, own


def markdown(results: dict) -> str:
    """The exactness table: one row per strategy, a column per dtype x batch size."""
    s = results["settings"]
    dts, sizes = s["dtypes"], s["batch_sizes"]
    lines = [
        (
            f"Mismatches against each main's own greedy `generate` ({s['prompts']} public"
            f" prompts, mixed lengths, {s['new_tokens']} new tokens; `stairs-bench exact`)."
        ),
        "",
        "| strategy | " + " | ".join(f"{d} B={b}" for d in dts for b in sizes) + " |",
        "|---|" + "---|" * (len(dts) * len(sizes)),
    ]
    for name, opts in STRATEGIES:
        label = name + (":" + ",".join(f"{k}={v}" for k, v in opts.items()) if opts else "")
        cells = []
        for d in dts:
            for b in sizes:
                row = next(r for r in results[d]["rows"]
                           if r["strategy"] == name and r["options"] == opts and r["batch"] == b)  # fmt: skip
                cells.append(str(row["mismatches"]))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    n = s["prompts"]
    share = ", ".join(f"{d} {results[d]['identical_to_fp32']}/{n}" for d in dts)
    lines += ["", f"Greedy continuations identical to the fp32 main's: {share}."]
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    """`stairs-bench exact`'s flags."""
    p = make_parser(PROG, __doc__)
    p.add_argument("-n", type=int, default=50, help="public prompts")
    p.add_argument("--max-new-tokens", type=int, default=48, help="new tokens per prompt")
    p.add_argument("--batch-sizes", default="1,2,5,8", help="comma list of batch sizes")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma list of the main's dtypes")
    p.add_argument(
        "--models",
        default=str(LOCAL_RESULTS / "exact-models"),
        help="folder of the exported mains, made on first use and reused",
    )
    p.add_argument("--out", help=out_help("exact"))
    return p


def main(argv: list[str] | None = None) -> int:
    """`stairs-bench exact ...`: 0 when every cell is 0 mismatches, else 1."""
    a = parser().parse_args(argv)
    out, dtypes = Path(a.out) if a.out else default_out("exact"), a.dtypes.split(",")
    sizes = [int(x) for x in a.batch_sizes.split(",")]
    out.mkdir(parents=True, exist_ok=True)
    found = folders(Path(a.models), dtypes, print)
    from engine import Engine

    ids = prompts(Engine.load(found[dtypes[0]][0]), a.n)
    results = {"settings": {"prompts": len(ids), "new_tokens": a.max_new_tokens,
                            "batch_sizes": sizes, "dtypes": dtypes}}  # fmt: skip
    ref32 = None
    for d in dtypes:
        print(f"{d}: every strategy x batch sizes {sizes}", flush=True)
        results[d], own = one_dtype(*found[d], ids, a.max_new_tokens, sizes, ref32)
        ref32 = ref32 or (own if d == "fp32" else None)
    write_atomic(out / "results.json", json.dumps(results, indent=2))
    write_atomic(out / "results.md", markdown(results))
    print(markdown(results))
    wrote(PROG, out / "results.md", "results.json")
    bad = sum(r["mismatches"] for d in dtypes for r in results[d]["rows"])
    return 0 if bad == 0 else 1


if __name__ == "__main__":  # python -m bench.exact: stairs-bench exact
    raise SystemExit(main())
