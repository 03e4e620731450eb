"""`stairs-bench memory --main DIR [--assistant DIR]`: peak RSS of a default Engine.load
after loading and after one generation, against the weight bytes of the graphs it loads
(encoder, masked decoder, cross key/values of main and assistant, external data included).
Each measurement runs in a fresh process, so earlier allocations do not count. Public API only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench.common import make_parser, weight_bytes

PROG = "stairs-bench memory"
CHILD = r"""
import json, sys
from engine import Engine

def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

args = json.loads(sys.argv[1])
eng = Engine.load(args["main"], assistant=args["assistant"], verify=False)
after_load = peak()
res = eng.generate(args["prompt"], strategy=args["strategy"], max_new_tokens=args["new"])
print(json.dumps({"after_load": after_load, "after_generate": peak(),
                  "tokens": len(res.token_ids)}))
"""


def measure(main: Path, assistant: Path | None, strategy: str, new: int) -> dict:
    """Peak RSS after load and after one generation, in a fresh process."""
    prompt = 'def list_files(path):\n    """Return the names of the files in path."""\n'
    args = {"main": str(main), "assistant": str(assistant) if assistant else None,
            "prompt": prompt, "strategy": strategy, "new": new}  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True, check=True
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    w = weight_bytes(main) + weight_bytes(assistant)
    gib = 1024**3
    return {
        "main": str(main),
        "assistant": str(assistant) if assistant else None,
        "strategy": strategy,
        "weights_gib": w / gib,
        "after_load_gib": got["after_load"] / gib,
        "after_generate_gib": got["after_generate"] / gib,
        "ratio_load": got["after_load"] / w,
        "ratio_generate": got["after_generate"] / w,
        "tokens": got["tokens"],
    }


def parser() -> argparse.ArgumentParser:
    """`stairs-bench memory`'s flags."""
    p = make_parser(PROG, __doc__)
    p.add_argument("--main", required=True, help="exported main folder")
    p.add_argument("--assistant", help="exported assistant folder (default: none)")
    p.add_argument(
        "--strategy", default="assisted", help="strategy of the generation (greedy without one)"
    )
    p.add_argument("--max-new-tokens", type=int, default=48, help="new tokens generated")
    return p


def main(argv: list[str] | None = None) -> int:
    """`stairs-bench memory ...`: prints one JSON line (it writes no file)."""
    a = parser().parse_args(argv)
    asst = Path(a.assistant) if a.assistant else None
    strategy = a.strategy if asst is not None else "greedy"
    print(json.dumps(measure(Path(a.main), asst, strategy, a.max_new_tokens)))
    return 0


if __name__ == "__main__":  # python -m bench.memory: stairs-bench memory
    raise SystemExit(main())
