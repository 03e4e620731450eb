"""`stairs-bench gpu`: the device cache's tables (exactness, main step cost, throughput per back
end) on CUDA or the CPU. run: the sections and the command; cost: step costs and per-row
logits bit-identity below the public API; report: the markdown tables; kit/: packing and
running it on a lent GPU machine.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """`stairs-bench gpu ...`."""
    from bench.gpu.run import main as run_main

    return run_main(argv)
