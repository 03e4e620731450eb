"""`stairs-bench`: maps arguments onto bench.run.run_bench, or with --batch-sizes onto
bench.batch.run_batch_bench."""

from __future__ import annotations

import argparse
import sys

from bench.core import DEFAULT_PEERS, engine_mismatches
from bench.quiet import NotQuietError, add_quiet_arguments, check_quiet_arguments
from bench.run import run_bench


def _parser() -> argparse.ArgumentParser:
    """The stairs-bench argument parser."""
    p = argparse.ArgumentParser(
        prog="stairs-bench",
        description=__doc__,
        epilog="exit status: 0 done; 1 an engine row's tokens differ from its main's own greedy"
        " (each such cell printed); 2 an error, or --require-quiet on a busy machine",
    )
    _add_workload_arguments(p)
    _add_mode_arguments(p)
    add_quiet_arguments(p, "default 60, --quick 0")
    return p


def _add_workload_arguments(p: argparse.ArgumentParser) -> None:
    """Flags naming the models, prompts, sizes and methods to compare."""
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
    p.add_argument(
        "--peers",
        help="hf,optimum,ct2 or none (default all; batch mode: hf,ct2 and ct2-int8, the batched"
        " ones)",
    )


def _add_mode_arguments(p: argparse.ArgumentParser) -> None:
    """Flags for batch mode, the sweeps, the alone runs and the output."""
    p.add_argument(
        "--batch-sizes",
        metavar="B,B,...",
        help="batch mode: aggregate tokens/s and latency at each batch size (e.g. 1,2,4,8,16) for"
        " the engine's batched strategies (default greedy;assisted:draft_tokens=4;"
        "assisted:draft_tokens=5,schedule=heuristic;lookup), HF generate with padding and"
        " CTranslate2 float32 translate_batch; --rounds, --alone and the sweeps do not apply",
    )
    p.add_argument(
        "--no-single",
        action="store_true",
        help="batch mode: leave out Engine.generate (one prompt at a time) at batch 1",
    )
    p.add_argument(
        "--extra-mains",
        metavar="DIR[,DIR]",
        help="batch mode: other exports of the main (e.g. --dtype int8, int4), every strategy"
        " again on each, with mismatches against its own greedy; peer ct2-int8 for CTranslate2"
        " int8",
    )
    p.add_argument(
        "--shared-thread-pool",
        action="store_true",
        help="batch mode: Engine.load(shared_thread_pool=True), one process-wide ORT pool for"
        " main and assistant",
    )
    p.add_argument("--no-sweeps", action="store_true")
    p.add_argument("--sweep-prompts", type=int, default=10)
    p.add_argument(
        "--max-batch-tokens",
        type=int,
        metavar="N",
        help="batch mode: the engine's bound on rows x tokens of one main call (default: engine's)",
    )
    p.add_argument("--out", help="output folder (default results/latest; batch mode results/batch)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="3 prompts, 16 tokens, tiny sweeps; batch mode: 8 prompts, 16 tokens, sizes <= 4",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="less output (warnings still shown)")
    p.add_argument(
        "--alone",
        default="default",
        help="methods also measured alone after the interleaved rounds: 'default' (peers' greedy"
        " rows, engine greedy and auto), 'all', 'none' or ';'-separated method names",
    )


def _check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> list[int] | None:
    """Reject out-of-range and mode-mismatched flags; return the parsed --batch-sizes."""
    for name in ("n", "max_new_tokens", "threads", "rounds", "sweep_prompts"):
        if not 1 <= getattr(a, name) <= 100_000:
            flag = "-n" if name == "n" else "--" + name.replace("_", "-")
            p.error(f"{flag} must be between 1 and 100000")
    if a.max_batch_tokens is not None and not 1 <= a.max_batch_tokens <= 65536:
        p.error("--max-batch-tokens must be between 1 and 65536")
    if a.batch_sizes is None:  # batch-mode flags would otherwise be silently ignored
        for flag, on in (
            ("--no-single", a.no_single),
            ("--shared-thread-pool", a.shared_thread_pool),
            ("--max-batch-tokens", a.max_batch_tokens is not None),
            ("--extra-mains", a.extra_mains is not None),
        ):
            if on:
                p.error(f"{flag} needs --batch-sizes (batch mode)")
    sizes = None
    if a.batch_sizes is not None:
        from engine.options import parse_sizes

        try:
            sizes = parse_sizes(a.batch_sizes)
        except ValueError as exc:
            p.error(f"--batch-sizes: {exc}")
    return sizes


def _common_kwargs(a: argparse.Namespace) -> dict:
    """Keyword arguments both run_bench and run_batch_bench take from the same flags."""
    strategies = None
    if a.strategies:
        # ';' separates specs; a lone spec with options keeps its commas ('assisted:k=4,schedule=x')
        sep = ";" if ";" in a.strategies or ":" in a.strategies else ","
        strategies = [s for s in a.strategies.split(sep) if s.strip()]
    return {
        "main": a.main,
        "assistant": a.assistant,
        "prompts": a.prompts,
        "n": a.n,
        "max_new_tokens": a.max_new_tokens,
        "threads": a.threads,
        "provider": a.provider,
        "strategies": strategies,
        "quick": a.quick,
        "quiet": a.quiet,
        "quiet_threshold": a.quiet_threshold,
        "quiet_load": a.quiet_load,
        "wait_quiet": a.wait_quiet,
        "require_quiet": a.require_quiet,
    }


def _run(a: argparse.Namespace, sizes: list[int] | None) -> dict | int:
    """Run the chosen mode; return its result, or exit status 2 on an expected error."""
    common = _common_kwargs(a)
    peers = None if a.peers is None else [] if a.peers == "none" else a.peers.split(",")
    try:
        if sizes is not None:
            from bench.batch import run_batch_bench

            return run_batch_bench(
                **common,
                peers=peers,
                batch_sizes=sizes,
                out=a.out or "results/batch",
                max_batch_tokens=a.max_batch_tokens,
                single=not a.no_single,
                shared_thread_pool=a.shared_thread_pool,
                extra_mains=a.extra_mains.split(",") if a.extra_mains else (),
            )
        return run_bench(
            **common,
            rounds=a.rounds,
            peers=DEFAULT_PEERS if peers is None else peers,
            sweeps=not a.no_sweeps,
            sweep_prompts=a.sweep_prompts,
            out=a.out or "results/latest",
            alone=a.alone,
        )
    except NotQuietError as exc:
        print(f"stairs-bench: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from engine import EngineError

        if isinstance(exc, (EngineError, FileNotFoundError)):
            print(f"stairs-bench: error: {exc}", file=sys.stderr)
            return 2
        raise


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = _parser()
    a = p.parse_args(argv)
    sizes = _check_args(p, a)
    check_quiet_arguments(p, a, default_wait=0.0 if a.quick else 60.0)
    res = _run(a, sizes)
    if isinstance(res, int):
        return res
    bad = engine_mismatches(res["rows"])
    for line in bad:
        print(f"stairs-bench: mismatch: {line}", file=sys.stderr)
    if bad:
        return 1
    if a.require_quiet and not res["quiet"]["ok"]:
        print("stairs-bench: error: --require-quiet: the machine was not quiet", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
