"""Was the machine quiet? CPU time of every other process and the load average, around each call.

A benchmark shares the CPU with whatever else runs, and peers suffer unequally (CTranslate2's
OpenMP threads collapse under contention far more than ONNX Runtime's), so a noisy run is not a
fair comparison. The Monitor snapshots /proc before and after every timed call and adds up the
CPU seconds used by processes that are not this one or its children (the CTranslate2 workers).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
LOAD_TAU_S = 60.0  # the 1-minute load average's time constant


class NotQuietError(RuntimeError):
    """The machine did not become quiet in time and the caller required it."""


@dataclass(frozen=True)
class Proc:
    ppid: int
    start_s: float  # seconds after boot
    cpu_s: float  # utime + stime, all threads
    name: str


@dataclass(frozen=True)
class Snapshot:
    """Every process's CPU time at one moment; `own` are the pids excluded from `others`."""

    t: float  # time.monotonic()
    uptime_s: float
    load1: float
    procs: dict[int, Proc]
    own: frozenset[int]
    load5: float | None = None  # the 5-minute load average, to tell a falling load1

    @property
    def own_cpu_s(self) -> float:
        return sum(self.procs[p].cpu_s for p in self.own if p in self.procs)


def read_procs(proc: Path = Path("/proc")) -> dict[int, Proc]:
    """pid -> Proc for every process readable now (those that exit while read are skipped)."""
    out = {}
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            text = (d / "stat").read_text()
        except OSError:
            continue
        # The name may hold spaces and parentheses: the fields follow the last ')'.
        name = text[text.index("(") + 1 : text.rindex(")")]
        f = text[text.rindex(")") + 2 :].split()
        out[int(d.name)] = Proc(
            ppid=int(f[1]),
            start_s=int(f[19]) / CLK_TCK,
            cpu_s=(int(f[11]) + int(f[12])) / CLK_TCK,
            name=name,
        )
    return out


def descendants(procs: dict[int, Proc], roots) -> set[int]:
    """The roots and every process below them."""
    children: dict[int, list[int]] = {}
    for pid, p in procs.items():
        children.setdefault(p.ppid, []).append(pid)
    out, todo = set(), [r for r in roots if r in procs]
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.add(pid)
            todo += children.get(pid, [])
    return out


def _read_floats(path: str, count: int = 1, default: float = 0.0) -> list[float]:
    """The first count numbers of a /proc file (default each where it cannot be read)."""
    try:
        with open(path) as f:
            fields = f.read().split()[:count]
        return [float(x) for x in fields] + [default] * (count - len(fields))
    except (OSError, ValueError):
        return [default] * count


def snapshot(exclude=None) -> Snapshot:
    """Now. exclude: pids not counted as others; None: this process and its descendants."""
    procs = read_procs()
    own = descendants(procs, [os.getpid()]) if exclude is None else set(exclude)
    load1, load5 = _read_floats("/proc/loadavg", 2)
    return Snapshot(
        t=time.monotonic(),
        uptime_s=_read_floats("/proc/uptime")[0],
        load1=load1,
        procs=procs,
        own=frozenset(own),
        load5=load5,
    )


def others_cpu(before: Snapshot, after: Snapshot) -> dict[int, float]:
    """CPU seconds each other process used between two snapshots (pid -> seconds, > 0 only).

    A process that started in between counts whole; one that exited in between is lost for that
    window (its parent only sees it when it reaps it, as a lump that may span earlier windows).
    """
    own = before.own | after.own
    out = {}
    for pid, p in after.procs.items():
        if pid in own:
            continue
        b = before.procs.get(pid)
        if b is not None and abs(b.start_s - p.start_s) < 0.05:
            used = p.cpu_s - b.cpu_s
        elif p.start_s >= before.uptime_s - 0.05:  # new since `before`
            used = p.cpu_s
        else:  # was there before but not visible: leave it out rather than count its life
            continue
        if used > 0:
            out[pid] = used
    return out


@dataclass
class Window:
    """Other processes' CPU time summed over all the calls of one method in one phase."""

    calls: int = 0
    wall_s: float = 0.0
    others_cpu_s: float = 0.0
    own_cpu_s: float = 0.0
    load1_first: float | None = None
    load1_last: float | None = None
    by_name: dict = field(default_factory=dict)

    def add(self, before: Snapshot, after: Snapshot) -> None:
        used = others_cpu(before, after)
        self.calls += 1
        self.wall_s += after.t - before.t
        self.others_cpu_s += sum(used.values())
        self.own_cpu_s += after.own_cpu_s - before.own_cpu_s
        if self.load1_first is None:
            self.load1_first = before.load1
        self.load1_last = after.load1
        for pid, s in used.items():
            key = f"{after.procs[pid].name} (pid {pid})"
            self.by_name[key] = self.by_name.get(key, 0.0) + s

    @property
    def others_per_s(self) -> float:
        return self.others_cpu_s / self.wall_s if self.wall_s > 0 else 0.0

    def top(self, k: int = 3) -> list[tuple[str, float]]:
        """The k other processes that used the most CPU, with their seconds."""
        return sorted(self.by_name.items(), key=lambda kv: -kv[1])[:k]

    def as_dict(self, threshold: float) -> dict:
        return {
            "calls": self.calls,
            "wall_s": self.wall_s,
            "others_cpu_s": self.others_cpu_s,
            "others_cpu_per_s": self.others_per_s,
            "own_cpu_per_s": self.own_cpu_s / self.wall_s if self.wall_s > 0 else 0.0,
            "load1_before": self.load1_first,
            "load1_after": self.load1_last,
            "top_others": [[n, round(s, 3)] for n, s in self.top()],
            "quiet": self.others_per_s <= threshold,
        }


def _top_text(top) -> str:
    return ", ".join(f"{n} {s:.1f} s" for n, s in top) or "no single process"


class Monitor:
    """Accounts other processes' CPU per method and phase, and judges whether the run was quiet.

    threshold: other processes' CPU seconds per wall second allowed during a method.
    load_threshold: 1-minute load average, less this process tree's own estimated share,
    allowed at the start of the run.
    """

    def __init__(self, threshold: float = 0.10, load_threshold: float = 0.5, snap=snapshot):
        self.threshold = threshold
        self.load_threshold = load_threshold
        self.snap = snap
        self.phase = "interleaved"
        self.windows: dict[str, dict[str, Window]] = {}
        self.start_check: dict | None = None
        self.waited_s = 0.0
        self.born = snap()  # our own CPU since here estimates our share of the load average

    @contextlib.contextmanager
    def watch(self, name: str):
        """Snapshot around one timed call of method `name` (outside its timed region)."""
        before = self.snap()
        try:
            yield
        finally:
            self.record(name, before, self.snap())

    def record(self, name: str, before: Snapshot, after: Snapshot) -> None:
        self.windows.setdefault(self.phase, {}).setdefault(name, Window()).add(before, after)

    def own_load(self, now: Snapshot) -> float:
        """This process tree's estimated share of the 1-minute load average: its CPU rate since
        the Monitor was made, decayed as the kernel's average decays."""
        dt = now.t - self.born.t
        if dt <= 0:
            return 0.0
        rate = max(0.0, now.own_cpu_s - self.born.own_cpu_s) / dt
        return rate * (1 - math.exp(-dt / LOAD_TAU_S))

    def check(self, seconds: float = 1.0) -> dict:
        """Watch the machine for `seconds` with this process idle: is it quiet now?

        Quiet: other processes' CPU within the threshold, and the load average (less our share)
        within load_threshold: a load this process cannot attribute (earlier work winding down,
        another container's) is not quiet either."""
        w = Window()
        before = self.snap()
        time.sleep(seconds)
        after = self.snap()
        w.add(before, after)
        own = self.own_load(after)
        c = {
            "seconds": w.wall_s,
            "others_cpu_per_s": w.others_per_s,
            "top_others": [[n, round(s, 3)] for n, s in w.top()],
            "load1": after.load1,
            "own_load_estimate": own,
            "load_excess": after.load1 - own,
        }
        if after.load5 is not None:
            c["load5"] = after.load5
        c["quiet"] = not check_findings(c, self.threshold, self.load_threshold)
        return c

    def why(self, c: dict) -> str:
        """A start check's failed measures with their values and limits (every measure when
        none failed)."""
        return "; ".join(check_findings(c, self.threshold, self.load_threshold)) or describe_check(
            c
        )

    def wait_quiet(self, max_wait_s: float, log=print, window_s: float = 1.0) -> dict:
        """Check until quiet or max_wait_s passed; the last check is the run's start check."""
        t0 = time.monotonic()
        said = False
        while True:
            c = self.check(window_s)
            if c["quiet"] or time.monotonic() - t0 + window_s > max_wait_s:
                break
            if not said:
                log(f"waiting up to {max_wait_s:.0f} s for a quiet machine: {self.why(c)}")
                said = True
        self.waited_s = time.monotonic() - t0
        self.start_check = c
        return c

    def summary(self) -> dict:
        """Everything recorded, with the verdict and the reasons for it."""
        reasons = []
        c = self.start_check
        if c is not None and not c["quiet"]:
            reasons.append(f"at the start: {self.why(c)}")
        phases = {}
        for phase, ws in self.windows.items():
            phases[phase] = {name: w.as_dict(self.threshold) for name, w in ws.items()}
            for name, w in ws.items():
                if w.others_per_s > self.threshold:
                    reasons.append(
                        f"{name} ({phase}): other processes used {w.others_per_s:.2f} CPU-s/s"
                        f" (threshold {self.threshold:.2f}): {_top_text(w.top())}"
                    )
        return {
            "ok": not reasons,
            "threshold": self.threshold,
            "load_threshold": self.load_threshold,
            "start": c,
            "waited_s": self.waited_s,
            "reasons": reasons,
            "methods": phases,
        }


def describe_check(c: dict) -> str:
    """One line for a start check: every measure, whether it passed or not."""
    load5 = c.get("load5")
    trend = f", 5-min {load5:.2f}" if load5 is not None else ""
    return (
        f"other processes {c['others_cpu_per_s']:.2f} CPU-s/s"
        f" ({_top_text(c.get('top_others') or [])}), load average {c['load1']:.2f}"
        f" (ours ~{c['own_load_estimate']:.2f}, excess {c['load_excess']:.2f}{trend})"
    )


def check_findings(c: dict, threshold: float, load_threshold: float) -> list[str]:
    """The measures that make a start check not quiet, each with its value and limit."""
    failed = []
    others = c["others_cpu_per_s"]
    if others > threshold:
        failed.append(
            f"other processes used {others:.2f} CPU-s/s (limit {threshold:.2f}):"
            f" {_top_text(c.get('top_others') or [])}"
        )
    if c["load_excess"] > load_threshold:
        load5 = f", 5-min {c['load5']:.2f}" if c.get("load5") is not None else ""
        load = (
            f"load average {c['load1']:.2f}{load5}, less ours ~{c['own_load_estimate']:.2f}, is"
            f" {c['load_excess']:.2f} (limit {load_threshold:.2f})"
        )
        if not failed:  # say why a load can stand beside idle processes
            load += (
                f"; other processes seen here used only {others:.2f} CPU-s/s: the load average"
                " trails by a minute (earlier work winding down: --wait-quiet S waits for it),"
                " or the load is another container's"
            )
        failed.append(load)
    return failed


@dataclass(frozen=True)
class QuietPolicy:
    """How a run judges and waits for a quiet machine (the --quiet-* and --*-quiet flags)."""

    threshold: float = 0.10  # other processes' CPU-s per s allowed during a method
    load: float = 0.5  # 1-min load average, less our share, allowed at the start
    wait_s: float = 0.0  # how long to wait for a quiet machine before starting
    require: bool = False  # refuse to run (exit 2) when it is not quiet


def add_quiet_arguments(p, wait_default: str) -> None:
    """The quiet-machine flags every benchmark takes (argparse parser p)."""
    p.add_argument(
        "--quiet-threshold",
        type=float,
        default=0.10,
        metavar="CPU_S_PER_S",
        help="other processes' CPU seconds per second above which a method is not quiet",
    )
    p.add_argument(
        "--quiet-load",
        type=float,
        default=0.5,
        metavar="LOAD",
        help="1-min load average, less our own share, above which the start is not quiet",
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        metavar="S",
        help=f"wait up to S seconds for a quiet machine before starting (default: {wait_default})",
    )
    p.add_argument(
        "--require-quiet",
        action="store_true",
        help="exit 2 if the machine was not quiet (before the runs if it never became quiet)",
    )


def check_quiet_arguments(p, a, default_wait: float) -> QuietPolicy:
    """p.error (exit 2) for a bad quiet flag; fills in the default wait; returns the policy."""
    for name in ("quiet_threshold", "quiet_load"):
        if not (math.isfinite(getattr(a, name)) and getattr(a, name) >= 0):
            p.error(f"--{name.replace('_', '-')} must be a number >= 0")
    if a.wait_quiet is None:
        a.wait_quiet = default_wait
    if not (math.isfinite(a.wait_quiet) and 0 <= a.wait_quiet <= 3600):
        p.error("--wait-quiet must be between 0 and 3600 seconds")
    return QuietPolicy(a.quiet_threshold, a.quiet_load, a.wait_quiet, a.require_quiet)
