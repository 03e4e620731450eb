"""Export benchmark: a random-weight model with a real config (default t5-3b) exported in fp32 and
fp16; records wall time and peak RSS of each export (each in a child process: its own peak).

    python -m bench.export_bench [--config ../shared/models/configs/t5-3b.json] [--dtypes fp32,fp16]
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

from bench.core import write_atomic

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

BUILD = """
import json, sys, shutil, torch
from transformers import T5Config, T5ForConditionalGeneration
cfg = T5Config(**{k: v for k, v in json.load(open(sys.argv[1])).items() if k != "architectures"})
torch.manual_seed(0)
model = T5ForConditionalGeneration(cfg).eval()
model.save_pretrained(sys.argv[2])
shutil.copy(sys.argv[3], sys.argv[2] + "/spiece.model")
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default=str(SHARED / "models" / "configs" / "t5-3b.json"))
    p.add_argument("--dtypes", default="fp32,fp16")
    p.add_argument("--workdir", default=None, help="scratch folder (needs ~25 GB for t5-3b)")
    p.add_argument("--out", default="results/export_bench.json")
    a = p.parse_args(argv)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="stairs-export-bench-"))
    hf = work / "hf"
    results = {"config": a.config, "runs": []}
    try:
        sec, rss = child(
            BUILD, a.config, str(hf), str(SHARED / "models" / "t5-small-tokenizer" / "spiece.model")
        )
        results["build"] = {"seconds": sec, "peak_rss_gib": rss}
        print(f"built random model in {sec:.0f} s (peak RSS {rss:.1f} GiB)", flush=True)
        for dtype in a.dtypes.split(","):
            out = work / f"onnx-{dtype}"
            sec, rss = child(EXPORT, str(hf), str(out), dtype)
            manifest = json.loads((out / "stairs.json").read_text())
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
    finally:
        shutil.rmtree(work, ignore_errors=True)
        write_atomic(Path(a.out), json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
