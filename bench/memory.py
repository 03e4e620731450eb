"""`python -m bench.memory --main DIR [--assistant DIR]`: peak RSS of a default Engine.load
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

GRAPHS = ("encoder_model.onnx", "decoder_masked_model.onnx", "cross_kv_model.onnx")
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


def graph_bytes(path: Path) -> int:
    """Bytes of one graph file and its external data file."""
    data = path.with_name(path.name + "_data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def weight_bytes(folder: Path | None) -> int:
    """Bytes of the graphs the engine loads from folder (their external data included)."""
    return 0 if folder is None else sum(graph_bytes(folder / g) for g in GRAPHS)


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


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: prints one JSON line."""
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__)
    p.add_argument("--main", required=True)
    p.add_argument("--assistant")
    p.add_argument("--strategy", default="assisted")
    p.add_argument("--max-new-tokens", type=int, default=48)
    a = p.parse_args(argv)
    asst = Path(a.assistant) if a.assistant else None
    strategy = a.strategy if asst is not None else "greedy"
    print(json.dumps(measure(Path(a.main), asst, strategy, a.max_new_tokens)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
