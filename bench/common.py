"""What every stairs-bench subcommand shares: where things are, atomic writes and the default
output folder, the help formatter, the exported pair, graph weight bytes, prompt ids, the
machine record and the quiet-machine policy at the start and end of a run.

A leaf of bench/ (the standard library, engine and bench.quiet only), so that no subcommand
imports another's module for a helper.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

from bench.quiet import Monitor, NotQuietError, QuietPolicy
from engine.layout import GRAPH_FILES

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
PUBLIC_PROMPTS = SHARED / "prompts" / "pycode_public.jsonl"
# Every default output folder lives here, ignored by git: a benchmark run leaves the checkout
# clean, and results are committed only by naming a folder with --out.
LOCAL_RESULTS = Path("results") / "local"
MAX_SOURCE = 255  # the pair's prompt convention: the last 255 ids of the context, then EOS


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written (their examples keep their lines), and every option's default
    after its help unless the help already states it or there is none to state."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def make_parser(prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """An argument parser of one subcommand, `stairs-bench NAME`."""
    return argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog, formatter_class=HelpFormatter
    )


def default_out(kind: str) -> Path:
    """A new folder for this run under results/local/, made here so two runs never share it:
    KIND-YYYYmmdd-HHMMSS (a suffix -2, -3... when a run of the same second has it already)."""
    base = LOCAL_RESULTS / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    base.parent.mkdir(parents=True, exist_ok=True)
    out, k = base, 1
    while True:
        try:
            out.mkdir()
            return out
        except FileExistsError:
            k += 1
            out = base.with_name(f"{base.name}-{k}")


def out_help(kind: str, what: str = "output folder") -> str:
    """--out's help: the default folder a run of kind gets."""
    return f"{what} (default: {LOCAL_RESULTS}/{kind}-DATE-TIME, new for each run, untracked)"


def wrote(prog: str, report: Path, *beside: str) -> None:
    """The run's last line: where its report is, whatever -q says (a run must say where it
    wrote)."""
    extra = f" ({', '.join(beside)} beside it)" if beside else ""
    print(f"{prog}: wrote {report}{extra}", flush=True)


def write_atomic(path: Path, data) -> None:
    """Write path through a temporary file beside it and a rename, so an interrupted run never
    leaves half a file (or loses the previous one). data: text, bytes, or a function writing a
    path (the temporary name keeps path's suffix: savefig takes its format from it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}.{threading.get_ident()}"  # unique per writer
    tmp = path.with_name(f".{path.stem}.{tag}.tmp{path.suffix}")
    try:
        if isinstance(data, str):
            tmp.write_text(data)
        elif isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            data(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save(results: dict, out: Path) -> None:
    """results.json in out, written atomically."""
    write_atomic(Path(out) / "results.json", json.dumps(results, indent=2, default=str))


def ensure_exported(main: Path, assistant: Path | None, log) -> None:
    """Export the ../shared pycode pair on first use, so the defaults work on a fresh clone."""
    if main.is_dir() and (assistant is None or assistant.is_dir()):
        return
    src = SHARED / "models" / main.name
    src_a = SHARED / "models" / assistant.name if assistant is not None else None
    if not src.is_dir():
        raise FileNotFoundError(f"{main} does not exist: export it with stairs-export")
    from export import export_model

    log(f"exporting {src} and {src_a} (first run)")
    has_a = src_a is not None and src_a.is_dir()
    export_model(str(src), main, assistant=str(src_a) if has_a else None, quiet=True)


def graph_bytes(path: Path) -> int:
    """Bytes of one graph file and its external data file."""
    data = path.with_name(path.name + "_data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def weight_bytes(folder: Path | None) -> int:
    """Bytes of the graphs the engine loads from folder (their external data included)."""
    return 0 if folder is None else sum(graph_bytes(Path(folder) / g) for g in GRAPH_FILES)


def prompt_ids(texts: list[str], encode, eos: int) -> list[list[int]]:
    """The pair's convention for a prompt's encoder ids: encode(context)[-255:] + [eos]."""
    return [list(encode(text))[-MAX_SOURCE:] + [eos] for text in texts]


def read_prompt_ids(path, n: int, encode, eos: int) -> list[list[int]]:
    """The first n prompts of a JSONL file (engine.cli.read_prompts) as encoder ids."""
    from engine.cli import read_prompts

    return prompt_ids(read_prompts(path, n), encode, eos)


def machine() -> dict:
    """What ran the benchmark."""
    import numpy as np
    import onnxruntime

    info = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    info["CT2_USE_MKL"] = os.environ.get("CT2_USE_MKL", "default")
    for pkg in ("torch", "transformers", "optimum", "ctranslate2"):
        try:
            info[pkg] = __import__(pkg).__version__
        except Exception:  # noqa: BLE001 - a version is optional
            info[pkg] = None
    return info


def warn(msg: str, prog: str = "stairs-bench") -> None:
    """Always shown, -q or not: a noisy run must not pass unnoticed."""
    print(f"{prog}: WARNING: {msg}", file=sys.stderr, flush=True)


def note(msg: str, prog: str = "stairs-bench") -> None:
    """A choice the run made for the user (e.g. what --quick leaves out), shown whatever -q
    says, so that nothing is dropped silently."""
    print(f"{prog}: note: {msg}", file=sys.stderr, flush=True)


def quiet_start(monitor: Monitor, policy: QuietPolicy, log, prog: str = "stairs-bench") -> dict:
    """Wait up to policy.wait_s for a quiet machine; NotQuietError if required, else a warning
    naming the measure that failed."""
    log(f"checking that the machine is quiet (waiting up to {policy.wait_s:.0f} s)")
    start = monitor.wait_quiet(policy.wait_s, log)
    if not start["quiet"]:
        failed = monitor.why(start)
        if policy.require:
            raise NotQuietError(f"machine not quiet after {monitor.waited_s:.0f} s: {failed}")
        warn(f"machine not quiet at the start: {failed}", prog)
    return start


def warn_not_quiet(summary: dict, prog: str = "stairs-bench") -> None:
    """The end-of-run warning when a run's quiet summary failed, with its reasons."""
    if not summary["ok"]:
        warn(
            "machine was NOT quiet; these figures are not a fair comparison:\n  "
            + "\n  ".join(summary["reasons"]),
            prog,
        )


def expected_errors(prog: str, fn) -> object:
    """fn(), or exit status 2 with one line on stderr for the errors a user can fix (a busy
    machine under --require-quiet, a bad input or model, a missing file); others propagate."""
    from engine import EngineError

    try:
        return fn()
    except (NotQuietError, EngineError, FileNotFoundError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
