"""`stairs-bench`: maps arguments onto bench.run.run_bench."""

from __future__ import annotations

import argparse
import sys

from bench.run import run_bench


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(prog="stairs-bench", description=__doc__)
    p.add_argument("--main", default="models/pycode-t5-main", help="exported main folder")
    p.add_argument("--assistant", default="models/pycode-t5-draft")
    p.add_argument("--prompts", default="../shared/prompts/pycode_public.jsonl")
    p.add_argument("-n", type=int, default=40, help="number of prompts")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds (median reported)")
    p.add_argument("--provider", default="cpu")
    p.add_argument(
        "--strategies",
        help="comma list of specs, ';' between them when a spec has "
        "options, e.g. 'greedy;assisted:draft_tokens=4;stairs:batch_size=7'",
    )
    p.add_argument("--peers", default="hf,optimum,ct2", help="hf,optimum,ct2 or none")
    p.add_argument("--no-sweeps", action="store_true")
    p.add_argument("--sweep-prompts", type=int, default=10)
    p.add_argument("--out", default="results/latest")
    p.add_argument("--quick", action="store_true", help="3 prompts, 16 tokens, tiny sweeps")
    p.add_argument("-q", "--quiet", action="store_true")
    a = p.parse_args(argv)
    strategies = None
    if a.strategies:
        strategies = a.strategies.split(";") if ";" in a.strategies else a.strategies.split(",")
    try:
        run_bench(
            a.main,
            a.assistant,
            a.prompts,
            a.n,
            a.max_new_tokens,
            a.threads,
            a.rounds,
            a.provider,
            strategies,
            [] if a.peers == "none" else a.peers.split(","),
            not a.no_sweeps,
            a.sweep_prompts,
            a.out,
            a.quick,
            a.quiet,
        )
    except Exception as exc:
        from engine import EngineError

        if isinstance(exc, (EngineError, FileNotFoundError)):
            print(f"stairs-bench: error: {exc}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
