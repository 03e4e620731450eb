"""What `stairs-bench run` and `stairs-bench batch` share: the workload flags (models, prompts,
sizes, strategies, peers, output), their checks, the options record both build once from them,
and the exit status of a run. Plain `stairs-bench` takes both modes' flags (cli.py).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import LOCAL_RESULTS, default_out, out_help
from bench.core import BATCH_STRATEGIES, DEFAULT_STRATEGIES, engine_mismatches
from bench.quiet import QuietPolicy

MAX_COUNT = 100_000  # a bound on -n, token and round counts (a typo, not a workload)
# (run's help, batch's help) of the flags whose meaning differs between the modes
PEERS_HELP = (
    "comma list of hf, optimum, ct2, or none (default: all; --quick: hf only)",
    "comma list of hf, ct2, ct2-int8 (CTranslate2 int8), or none (default: hf,ct2)",
)
QUICK_HELP = (
    (
        "3 prompts, 16 new tokens, 5 strategies, tiny sweeps, the hf peer only unless --peers"
        " names others, no wait for a quiet machine"
    ),
    (
        "8 prompts, 16 new tokens, at most 3 batch sizes <= 4 (default 1,2,4), no wait for a"
        " quiet machine"
    ),
)


def add_workload_arguments(p: argparse.ArgumentParser, mode: str) -> None:
    """The flags both modes take; mode 'run', 'batch' or 'either' (plain stairs-bench, where
    --batch-sizes picks batch mode) picks the help of those that differ."""

    def pick(run_text: str, batch_text: str, either: str | None = None) -> str:
        if mode == "either":
            return either or f"{run_text}; batch mode: {batch_text}"
        return run_text if mode == "run" else batch_text

    _add_input_arguments(p, mode, pick)
    _add_method_arguments(p, pick)


def _add_input_arguments(p: argparse.ArgumentParser, mode: str, pick) -> None:
    """The models, prompts, sizes and threads."""
    p.add_argument(
        "--main", metavar="DIR", default="models/pycode-t5-main", help="exported main folder"
    )
    p.add_argument(
        "--assistant",
        metavar="DIR" if mode == "batch" else "DIR[,DIR]",
        default="models/pycode-t5-draft",
        help=pick(
            "exported assistant folder; a comma list gives each its engine rows, labelled @NAME",
            "exported assistant folder",
            "exported assistant folder; a comma list gives each its engine rows, labelled @NAME"
            " (batch mode: one folder)",
        ),
    )
    p.add_argument(
        "--prompts",
        metavar="FILE.jsonl",
        default="../shared/prompts/pycode_public.jsonl",
        help="JSONL file, one object a line with a 'context', 'prompt' or 'text' field",
    )
    quick_n = ("prompts used (--quick: 3)", "prompts used (--quick: 8)")
    p.add_argument(
        "-n", type=int, default=40, help=pick(*quick_n, "prompts used (--quick: 3, batch mode 8)")
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        metavar="N",
        default=64,
        help="new tokens per prompt (--quick: 16)",
    )
    p.add_argument(
        "--threads", type=int, metavar="T", default=2, help="intra-op threads of every session"
    )
    p.add_argument(
        "--provider",
        default="cpu",
        help="the engine's execution provider: cpu, cuda, coreml or auto",
    )


def _add_method_arguments(p: argparse.ArgumentParser, pick) -> None:
    """The strategies and peers compared, the output and how much to say."""
    run_specs, batch_specs = ";".join(DEFAULT_STRATEGIES), ";".join(BATCH_STRATEGIES)
    p.add_argument(
        "--strategies",
        metavar="SPECS",
        help="engine strategy specs, ';' between them when a spec has options, e.g."
        " 'greedy;assisted:draft_tokens=4;stairs:batch_size=7' (default: "
        + pick(run_specs, batch_specs)
        + ")",
    )
    p.add_argument("--peers", metavar="LIST", help=pick(*PEERS_HELP))
    p.add_argument(
        "--out",
        metavar="DIR",
        help=pick(
            out_help("run"),
            out_help("batch"),
            f"output folder (default: {LOCAL_RESULTS}/run-DATE-TIME, batch mode"
            f" {LOCAL_RESULTS}/batch-DATE-TIME; new for each run, untracked)",
        ),
    )
    p.add_argument("--quick", action="store_true", help=pick(*QUICK_HELP))
    p.add_argument("-q", "--quiet", action="store_true", help="less output (warnings still shown)")


def check_counts(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """p.error (exit 2) for a count flag out of range, before anything loads."""
    for name in ("n", "max_new_tokens", "threads", "rounds", "sweep_prompts"):
        if hasattr(a, name) and not 1 <= getattr(a, name) <= MAX_COUNT:
            flag = "-n" if name == "n" else "--" + name.replace("_", "-")
            p.error(f"{flag} must be between 1 and {MAX_COUNT}")


def parse_strategies(text: str | None) -> tuple[str, ...] | None:
    """--strategies: ';' separates specs; a lone spec with options keeps its commas
    ('assisted:draft_tokens=4,schedule=heuristic'); None: the mode's default."""
    if not text:
        return None
    sep = ";" if ";" in text or ":" in text else ","
    return tuple(s for s in text.split(sep) if s.strip()) or None


def parse_peers(text: str | None) -> tuple[str, ...] | None:
    """--peers: a comma list, 'none' for none; None: the mode's default."""
    if text is None:
        return None
    return () if text == "none" else tuple(text.split(","))


@dataclass(frozen=True)
class Workload:
    """What both modes run: the models, prompts and sizes, the methods, where to write, how
    much to say, and the quiet-machine policy."""

    main: Path = Path("models/pycode-t5-main")
    assistant: str | None = "models/pycode-t5-draft"
    prompts: str = "../shared/prompts/pycode_public.jsonl"
    n: int = 40
    max_new_tokens: int = 64
    threads: int = 2
    provider: str = "cpu"
    strategies: tuple[str, ...] = ()
    peers: tuple[str, ...] = ()
    out: Path = field(default_factory=lambda: default_out("run"))
    quick: bool = False
    quiet: bool = False  # less output; warnings are shown anyway
    policy: QuietPolicy = field(default_factory=QuietPolicy)

    def log(self, msg: str) -> None:
        if not self.quiet:
            print(msg, flush=True)

    def progress(self, **kw):
        """A tqdm progress bar, hidden with quiet."""
        from tqdm.auto import tqdm

        return tqdm(disable=self.quiet, **kw)


def workload_kwargs(a: argparse.Namespace, policy: QuietPolicy) -> dict:
    """The Workload fields from parsed flags (None where the mode's default applies)."""
    return {
        "main": Path(a.main),
        "assistant": a.assistant,
        "prompts": a.prompts,
        "n": a.n,
        "max_new_tokens": a.max_new_tokens,
        "threads": a.threads,
        "provider": a.provider,
        "strategies": parse_strategies(a.strategies),
        "peers": parse_peers(a.peers),
        "out": Path(a.out) if a.out else None,
        "quick": a.quick,
        "quiet": a.quiet,
        "policy": policy,
    }


def exit_status(res: dict | int, policy: QuietPolicy, prog: str = "stairs-bench") -> int:
    """0 done; 1 an engine cell differs from its main's own greedy or failed (each named on
    stderr); 2 an expected error (res), or a required quiet machine that was not."""
    if isinstance(res, int):
        return res
    bad = engine_mismatches(res["rows"])
    for line in bad:
        print(f"{prog}: mismatch: {line}", file=sys.stderr)
    if bad:
        return 1
    if policy.require and not res["quiet"]["ok"]:
        print(f"{prog}: error: --require-quiet: the machine was not quiet", file=sys.stderr)
        return 2
    return 0


EPILOG = """exit status: 0 done; 1 an engine row's tokens differ from its main's own greedy
(each such cell printed); 2 an error, or --require-quiet on a busy machine"""
