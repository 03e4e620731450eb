"""`stairs-bench export`: a random-weight model with a real config (default t5-3b) exported in
fp32 and fp16; records wall time and peak RSS of each export (each in a child process: its own
peak).

    stairs-bench export [--config ../shared/models/configs/t5-3b.json] [--dtypes fp32,fp16]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import LOCAL_RESULTS, SHARED, default_out, make_parser, write_atomic, wrote
from engine.layout import MANIFEST, SPIECE_FILE

PROG = "stairs-bench export"

BUILD = """
import json, sys, shutil, torch
from transformers import T5Config, T5ForConditionalGeneration
cfg = T5Config(**{k: v for k, v in json.load(open(sys.argv[1])).items() if k != "architectures"})
torch.manual_seed(0)
model = T5ForConditionalGeneration(cfg).eval()
model.save_pretrained(sys.argv[2])
shutil.copy(sys.argv[3], sys.argv[2] + "/" + sys.argv[4])
"""
# Each child prints its own peak resident memory (KiB on Linux) as its last line.
PEAK = "\nimport resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"

EXPORT = """
import sys
from export import export_model
export_model(sys.argv[1], sys.argv[2], assistant=None, dtype=sys.argv[3], force=True, quiet=True)
"""


def child(code: str, *args: str) -> tuple[float, float]:
    """Run code in a fresh interpreter; returns (seconds, peak RSS GiB of that child alone)."""
    t = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code + PEAK, *args], check=True, stdout=subprocess.PIPE, text=True
    )
    return time.perf_counter() - t, int(done.stdout.strip().splitlines()[-1]) / 2**20


def parser() -> argparse.ArgumentParser:
    """`stairs-bench export`'s flags."""
    p = make_parser(PROG, __doc__)
    p.add_argument(
        "--config",
        default=str(SHARED / "models" / "configs" / "t5-3b.json"),
        help="the Hugging Face model config (JSON) to build with random weights",
    )
    p.add_argument("--dtypes", default="fp32,fp16", help="comma list of stairs-export --dtype")
    p.add_argument(
        "--workdir", help="scratch folder (default: a new temporary one; ~25 GB for t5-3b)"
    )
    p.add_argument(
        "--out",
        help=f"results file (default: {LOCAL_RESULTS}/export-DATE-TIME/export_bench.json, untracked)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """`stairs-bench export ...`: builds the model, exports it in each dtype, writes --out."""
    a = parser().parse_args(argv)
    out = Path(a.out) if a.out else default_out("export") / "export_bench.json"
    work = Path(a.workdir or tempfile.mkdtemp(prefix="stairs-export-bench-"))
    results = {"config": a.config, "runs": []}
    try:
        _measure(a, work, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        write_atomic(out, json.dumps(results, indent=2))
        wrote(PROG, out)
    return 0


def _measure(a: argparse.Namespace, work: Path, results: dict) -> None:
    """Build the random model, then export and measure it in each dtype (into results)."""
    hf = work / "hf"
    spiece = SHARED / "models" / "t5-small-tokenizer" / SPIECE_FILE
    sec, rss = child(BUILD, a.config, str(hf), str(spiece), SPIECE_FILE)
    results["build"] = {"seconds": sec, "peak_rss_gib": rss}
    print(f"built random model in {sec:.0f} s (peak RSS {rss:.1f} GiB)", flush=True)
    for dtype in a.dtypes.split(","):
        out = work / f"onnx-{dtype}"
        sec, rss = child(EXPORT, str(hf), str(out), dtype)
        manifest = json.loads((out / MANIFEST).read_text())
        size = sum(f.stat().st_size for f in out.iterdir()) / 2**30
        run = {
            "dtype": dtype,
            "seconds": sec,
            "peak_rss_gib": rss,
            "folder_gib": size,
            "max_abs_diff": manifest["validation"]["max_abs_diff"],
        }
        results["runs"].append(run)
        print(json.dumps(run), flush=True)
        shutil.rmtree(out)


if __name__ == "__main__":  # python -m bench.export_bench: stairs-bench export
    raise SystemExit(main())
