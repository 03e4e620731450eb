"""`stairs-bench`: every benchmark of the engine, one subcommand each.

  run        engine strategies against HF, optimum and CTranslate2, one prompt at a time
  batch      aggregate tokens/s and latency at each batch size, against HF and CTranslate2
  load       stairs-serve under concurrent streaming clients: batched against one at a time
  exact      the exactness table: every strategy x batch size x main dtype
  memory     peak RSS of Engine.load and one generation against the weights' bytes
  coldstart  Engine.load to first token, plain against the weights cache; serving memory
  profile    where one call's time goes, per layer part and op kind, beside its floor
  gpu        the device cache's tables (exactness, step cost, throughput) on CUDA or the CPU
  export     wall time and peak RSS of stairs-export on a random-weight model (t5-3b)

`stairs-bench SUBCOMMAND --help` shows a subcommand's flags. With no subcommand, the flags
below are `stairs-bench run`'s, or with --batch-sizes `stairs-bench batch`'s.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from bench import batch, run
from bench.common import make_parser
from bench.quiet import add_quiet_arguments, check_quiet_arguments
from bench.workload import EPILOG, add_workload_arguments, check_counts

SUBCOMMANDS = {
    "run": "bench.run",
    "batch": "bench.batch",
    "load": "bench.load",
    "exact": "bench.exact",
    "memory": "bench.memory",
    "coldstart": "bench.coldstart",
    "profile": "bench.profile",
    "gpu": "bench.gpu.run",
    "export": "bench.export_bench",
}
USAGE = (
    "stairs-bench {" + ",".join(SUBCOMMANDS) + "} [flags]\n"
    "       stairs-bench [flags]   (stairs-bench run; with --batch-sizes, stairs-bench batch)"
)
# batch mode's own flags: given without --batch-sizes they would be silently ignored
BATCH_ONLY = ("no_single", "shared_thread_pool", "max_batch_tokens", "extra_mains")


def subcommand(name: str):
    """The module of subcommand name (its main(argv) and parser())."""
    return importlib.import_module(SUBCOMMANDS[name])


def parser() -> argparse.ArgumentParser:
    """Plain stairs-bench: run's flags and batch mode's, --batch-sizes choosing between them."""
    p = make_parser("stairs-bench", __doc__, EPILOG)
    p.usage = USAGE
    add_workload_arguments(p, "either")
    run.add_run_arguments(p)
    batch.add_batch_arguments(p, either=True)
    add_quiet_arguments(p, "60; --quick: 0")
    return p


def _either(argv: list[str]) -> int:
    """Plain stairs-bench: run, or batch mode with --batch-sizes."""
    p = parser()
    a = p.parse_args(argv)
    check_counts(p, a)
    sizes = None
    if a.batch_sizes is None:
        for name in BATCH_ONLY:
            if getattr(a, name) is not None and getattr(a, name) is not False:
                p.error(f"--{name.replace('_', '-')} needs --batch-sizes (batch mode)")
    else:
        sizes = batch.check_batch_arguments(p, a)
    policy = check_quiet_arguments(p, a, default_wait=0.0 if a.quick else 60.0)
    if sizes is None:
        return run.execute(a, policy)
    return batch.execute(a, policy, sizes)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: `stairs-bench SUBCOMMAND ...`, or plain `stairs-bench ...`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUBCOMMANDS:
        return subcommand(argv[0]).main(argv[1:])
    return _either(argv)


if __name__ == "__main__":
    sys.exit(main())
