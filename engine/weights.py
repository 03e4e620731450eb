"""Weights written once per machine, then memory-mapped: a cold start in about a second and
one copy of each weight per machine, whatever the number of processes.

ONNX Runtime can save a graph after its optimizations, with the weights its kernels prepacked
(`session.save_external_prepacked_constant_initializers`) in an external file; a session made
from that file with optimizations off maps the file instead of copying and repacking every
weight. Those layouts belong to one ORT build and one CPU, so each entry is keyed by the ORT
version, the provider, the CPU's instruction set, the optimization level and the source files'
sha256: a key that does not match builds a new entry, never runs a wrong layout.

The cache also remembers completed sha256 hashes, keyed by a file's device, inode, size,
mtime and ctime (any write changes ctime), so a start checks gigabytes of weights by stat alone
while a modified file is still hashed again and caught. `stairs-verify DIR` always hashes a
model folder, and `stairs-verify --cache` every entry and remembered hash (verify_cache): a
change the stat does not show (bit rot) is caught there, not at a load.

Layout under the cache root ($STAIRS_CACHE_DIR, else $XDG_CACHE_HOME/stairs, else
~/.cache/stairs): graphs/<stem>-<key>/ {model.onnx, model.onnx.data, entry.json},
hashes/<stat key>.json, locks/<entry>.lock. Everything is written to a temporary name and
renamed when complete; two processes building one entry take turns on its lock, and the
temporary folders of a killed build are removed by the next build or open once that lock is
free. A new entry removes those it supersedes (same graph path and host, same ORT build and
CPU, other file contents).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import stat
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort

from . import verify as checked
from .errors import ModelFileError

log = logging.getLogger("stairs")

CACHE_ENV = "STAIRS_CACHE_DIR"
FORMAT = 1  # bump when the layout of an entry changes
MODEL = "model.onnx"
DATA = "model.onnx.data"
ENTRY = "entry.json"
# A hash is remembered only for a file whose last change is this old: a write in the same
# timestamp tick as the stat could otherwise leave size, mtime and ctime unchanged (racy git).
RACY_S = 3.0  # FAT keeps mtime in 2 s steps; ext4/xfs/btrfs in ns
MIN_EXTERNAL_BYTES = 1024  # initializers at least this large go to the mapped data file
_ENTRY_NAME = re.compile(r".+-[0-9a-f]{24}")  # <stem>-<key digest>
# what a build (.tmp-) or a removal (.old-) of entry writes beside it; mkdtemp's random names
_LEFTOVER = re.compile(r"\.(?P<entry>.+-[0-9a-f]{24})\.(?:tmp|old)-[a-z0-9_]+")
_MEMO_NAME = re.compile(r"[0-9a-f]{32}\.json")
# causes already warned about (root, exception type, errno): a read-only cache fails every
# graph alike, and one line says it (ORT's own errors name a graph's path: keyed by type)
_WARNED: set[tuple] = set()
_WARNED_LOCK = threading.Lock()


class StaleEntry(Exception):
    """A cache entry that is incomplete, altered or for another key: built again."""


def default_root() -> Path:
    """$STAIRS_CACHE_DIR, else $XDG_CACHE_HOME/stairs, else ~/.cache/stairs."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "stairs"


def cpu_signature() -> str:
    """What prepacked layouts depend on: the architecture and the instruction-set flags."""
    flags = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.split(":")[0].strip() in ("flags", "Features"):
                flags = " ".join(sorted(line.split(":", 1)[1].split()))
                break
    raw = f"{platform.machine()}|{flags or platform.processor() or platform.platform()}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _build_info() -> str:
    """The ORT build (same version, other build flags: other kernels), where it says."""
    try:
        return str(ort.get_build_info())
    except Exception:  # noqa: BLE001 - an ORT without it: its module file's size and mtime
        st = os.stat(ort.__file__)
        return f"{st.st_size}:{st.st_mtime_ns}"


def _stat_key(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _write_json(path: Path, value: dict) -> None:
    """Write JSON to a temporary file beside path, then rename it over path."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(value, f, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class WeightsCache:
    """Prepacked graphs and remembered hashes under one root directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @classmethod
    def of(cls, setting) -> WeightsCache | None:
        """Engine.load's weights_cache: True = the default root, a path = that root,
        False = none (plain sessions, every hash computed)."""
        if setting is False or setting is None:
            return None
        return cls(default_root() if setting is True else setting)

    # -- hashes ------------------------------------------------------------------------------

    def sha256(self, path: str | Path, ours: bool = False) -> str:
        """sha256 of a file; remembered by stat key, so an unchanged file is not read again
        (any write changes its ctime, so a modified file is always hashed again). ours: a file
        this process just wrote in its private temporary folder, remembered at once."""
        path = Path(path)
        before = os.stat(path)
        memo = self.root / "hashes" / (hashlib.sha256(_stat_key(before).encode()).hexdigest()[:32])
        memo = memo.with_suffix(".json")
        with contextlib.suppress(OSError, ValueError, TypeError):
            rec = json.loads(memo.read_text())
            if rec["stat"] == _stat_key(before) and checked._SHA256.fullmatch(rec["sha256"]):
                return rec["sha256"]
        digest = checked.sha256_file(path)
        after = os.stat(path)
        settled = ours or time.time() - after.st_ctime_ns / 1e9 >= RACY_S
        if _stat_key(after) == _stat_key(before) and settled:
            try:  # best effort: a read-only or full cache only costs the next start a hash
                memo.parent.mkdir(parents=True, exist_ok=True)
                rec = {"stat": _stat_key(before), "sha256": digest, "path": os.path.abspath(path)}
                _write_json(memo, rec)
            except OSError:
                pass
        return digest

    # -- prepacked graphs --------------------------------------------------------------------

    def key(self, graph: Path, sha: dict[str, str], provider: str) -> dict:
        """Everything that makes a prepacked graph valid for this process."""
        return {
            "format": FORMAT,
            "onnxruntime": ort.__version__,
            "build": _build_info(),
            "provider": provider,
            "cpu": cpu_signature(),
            "optimization": "ORT_ENABLE_ALL",
            "graph": graph.name,
            "sources": sha,
        }

    def _entry(self, graph: Path, sha: dict[str, str], provider: str) -> tuple[Path, dict]:
        key = self.key(graph, sha, provider)
        return self.root / "graphs" / f"{graph.stem}-{_digest(key)}", key

    def entry(self, graph: Path, sha: dict[str, str], provider: str) -> Path:
        """The folder of graph's entry for these source hashes and provider (may not exist)."""
        return self._entry(graph, sha, provider)[0]

    def mapped(self, graph: Path, sha: dict[str, str], provider: str, make_options, providers):
        """A session on graph's complete prepacked entry, or None (missing, stale, not usable):
        never builds, so many graphs can be opened at once (page faults in parallel)."""
        if provider != "cpu":
            return None
        entry, key = self._entry(graph, sha, provider)
        try:
            sess = self._open(entry, key, make_options, providers)
        except Exception:  # noqa: BLE001 - session() then builds it, or says why not
            return None
        self.drop_leftovers()
        return sess

    def session(self, graph: Path, sha: dict[str, str], provider: str, make_options, providers):
        """A session on graph's prepacked form (built first if missing or stale), or None when
        the cache cannot be used here (read-only, full, provider without prepacking): the caller
        then opens the plain graph. make_options() gives fresh SessionOptions."""
        if provider != "cpu":  # prepacking is the CPU provider's; others keep the plain path
            return None
        entry, key = self._entry(graph, sha, provider)
        with contextlib.suppress(Exception):  # any failure: built again below, once
            sess = self._open(entry, key, make_options, providers)
            self.drop_leftovers()
            return sess
        try:
            (self.root / "locks").mkdir(parents=True, exist_ok=True)
            with _locked(self.root / "locks" / f"{entry.name}.lock"):
                try:  # another process may have built it meanwhile
                    return self._open(entry, key, make_options, providers)
                except Exception as exc:  # noqa: BLE001 - missing, damaged or unloadable
                    if os.path.lexists(entry):  # not simply missing: say what is rebuilt, why
                        log.warning("weights cache: building %s again (%s)", entry, _words(exc))
                self._build(graph, entry, key, make_options, providers)
                return self._open(entry, key, make_options, providers)  # before any prune of it
        except Exception as exc:  # noqa: BLE001 - OSError, ORT's own errors: the plain path
            self._unusable(graph, exc)
            return None

    def _unusable(self, graph: Path, exc: Exception) -> None:
        """Say once per process and cause that the cache cannot be used (a read-only root fails
        every graph alike); each graph is named at info level."""
        reason = _words(exc.strerror if isinstance(exc, OSError) and exc.strerror else exc)
        cause = (str(self.root), type(exc).__name__, getattr(exc, "errno", None))
        with _WARNED_LOCK:
            first = cause not in _WARNED
            _WARNED.add(cause)
        if first:
            log.warning(
                "weights cache %s not usable (%s); loading the plain graphs (first: %s; said once"
                " per cause)",
                self.root,
                reason,
                graph,
            )
        else:
            log.info(
                "%s: weights cache %s not usable (%s); the plain graph", graph, self.root, reason
            )

    def _open(self, entry: Path, key: dict, make_options, providers):
        """A session on a complete entry for key; StaleEntry if it is missing or damaged."""
        try:
            meta = json.loads((entry / ENTRY).read_text())
        except (OSError, ValueError) as exc:
            raise StaleEntry(f"{entry}: no complete entry") from exc
        if not isinstance(meta, dict) or meta.get("key") != key:
            raise StaleEntry(f"{entry}: written for another key")
        files = meta.get("files")
        for name in (MODEL, DATA):
            info = files.get(name) if isinstance(files, dict) else None
            info = info if isinstance(info, dict) else {}
            path = entry / name
            try:
                ok = path.stat().st_size == info.get("bytes") and self.sha256(path) == info.get(
                    "sha256"
                )
            except OSError:
                ok = False
            if not ok:
                raise StaleEntry(f"{path}: truncated, altered or missing")
        so = make_options()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return ort.InferenceSession(str(entry / MODEL), so, providers=providers)

    def _build(self, graph: Path, entry: Path, key: dict, make_options, providers) -> None:
        """Optimize graph once with prepacked weights saved beside it, into a temporary folder
        renamed to entry when complete (a stale entry is moved aside and removed just before);
        a graph changed while it was read is not kept. Then the entries it supersedes go. The
        caller holds entry's lock, so earlier builds' temporary folders of it are stale."""
        entry.parent.mkdir(parents=True, exist_ok=True)
        self.drop_leftovers(held=entry.name)
        tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}.tmp-"))
        try:
            t0 = time.perf_counter()
            so = make_options()
            so.optimized_model_filepath = str(tmp / MODEL)
            so.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", DATA
            )
            so.add_session_config_entry(
                "session.optimized_model_external_initializers_min_size_in_bytes",
                str(MIN_EXTERNAL_BYTES),
            )
            so.add_session_config_entry(
                "session.save_external_prepacked_constant_initializers", "1"
            )
            sources_before = _source_stats(graph)
            # The key's hashes may be older than the file (exported again since this process
            # read its manifest): an entry must hold the weights its key names, never others.
            if sources(graph.parent, graph.name, None, self.sha256, False) != key["sources"]:
                raise StaleEntry(f"{graph} changed since it was hashed")
            ort.InferenceSession(str(graph), so, providers=providers)  # writes tmp, then freed
            if _source_stats(graph) != sources_before:  # changed under the build: never keep it
                raise StaleEntry(f"{graph} changed while it was prepacked")
            if not (tmp / DATA).is_file():  # a graph without large weights: an empty data file
                (tmp / DATA).touch()
            files = {n: {"bytes": (tmp / n).stat().st_size, "sha256": self.sha256(tmp / n, True)}
                     for n in (MODEL, DATA)}  # fmt: skip
            source = f"{platform.node()}:{graph.resolve()}"  # hosts may share a cache root
            _write_json(tmp / ENTRY, {"key": key, "files": files, "source": source})
            if os.path.lexists(entry):  # stale, or a link (moved aside itself, never followed)
                _remove(entry)
            os.replace(tmp, entry)
            log.info("%s: prepacked into %s in %.1f s", graph, entry, time.perf_counter() - t0)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._prune_superseded(source, entry, key)

    def _prune_superseded(self, source: str, entry: Path, key: dict) -> None:
        """Remove the entries that this build supersedes: built from the same graph path on this
        host by the same ORT build on the same CPU, from other file contents (the model was
        exported again), each in the folder its key names (nothing else is touched).
        No load asks for them again, and a t5-3b-shape main's take 22 GB. Entries of other builds
        stay (another environment may share the root), as does one whose lock is held. A
        process that maps one keeps its mapping; another folder holding the old contents
        builds it again."""
        rest = {k: v for k, v in key.items() if k != "sources"}
        removed = 0
        stem = entry.name.rsplit("-", 1)[0]
        for other in entry.parent.glob(f"{glob.escape(stem)}-*"):
            try:
                meta = json.loads((other / ENTRY).read_text())
                ours = other.name == f"{stem}-{_digest(meta['key'])}"
                old = dict(meta["key"])
                superseded = meta.get("source") == source and old.pop("sources") != key["sources"]
            except (OSError, ValueError, KeyError, TypeError, RecursionError):
                continue
            if other == entry or not ours or not superseded or old != rest:
                continue
            try:  # best effort: an entry left behind costs disk, never a wrong layout
                with _locked(self.root / "locks" / f"{other.name}.lock", wait=False) as held:
                    if held:
                        _remove(other)
                        removed += 1
            except OSError as exc:
                log.warning("weights cache: could not remove %s (%s)", other, exc.strerror)
        if removed:
            log.info("weights cache: removed %d superseded entries of %s", removed, source)

    def drop_leftovers(self, held: str | None = None) -> int:
        """Remove the temporary folders that killed builds and removals left under graphs/
        (.<entry>.tmp-*, .<entry>.old-*): those whose entry lock nobody holds (a live build holds
        it while it writes). held: an entry whose lock the caller holds. Only real folders named
        so are removed, never through a symlink; returns how many."""
        graphs = self.root / "graphs"
        try:
            names = os.listdir(graphs)
        except OSError:
            return 0
        removed = 0
        for name in sorted({m["entry"] for n in names if (m := _LEFTOVER.fullmatch(n))}):
            try:  # best effort: a leftover costs disk, never a wrong layout
                if name == held:
                    removed += _remove_leftovers(graphs, name)
                    continue
                with _locked(self.root / "locks" / f"{name}.lock", wait=False) as free:
                    if free:
                        removed += _remove_leftovers(graphs, name)
            except OSError:
                continue
        if removed:
            log.info("weights cache: removed %d temporary folders of stopped builds", removed)
        return removed

    def _remove_bad(self, entry: Path, ino: int) -> str | None:
        """Remove an entry found bad (None), or say why it stays: a build holds its lock, or
        it was replaced (another inode) since it was checked."""
        try:
            (self.root / "locks").mkdir(parents=True, exist_ok=True)
            with _locked(self.root / "locks" / f"{entry.name}.lock", wait=False) as free:
                if not free:
                    return BUSY
                if os.lstat(entry).st_ino != ino:
                    return REPLACED
                _remove(entry)
                return None
        except OSError as exc:
            return f"cannot remove it ({exc.strerror or exc})"

    def _check_hashes(self, fresh: dict[str, str]) -> tuple[int, int]:
        """Drop each remembered hash that a load would trust but that its file no longer has
        (a change the stat does not show), and those that cannot be checked (unreadable, or
        no file at its path or in an entry has its stat: gone, moved or changed; the next load
        of a moved file hashes it again). fresh: sha256 by stat key of the entries' files, just
        hashed (a build remembers them under its temporary path). Returns (wrong, stale)."""
        wrong = stale = 0
        folder = self.root / "hashes"
        for name in sorted(os.listdir(folder)) if folder.is_dir() else []:
            memo = folder / name
            if not _MEMO_NAME.fullmatch(name) or not memo.is_file() or memo.is_symlink():
                continue  # not one the cache wrote
            try:
                rec = json.loads(memo.read_text())
                digest = fresh.get(rec["stat"]) or _hash_if(rec["path"], rec["stat"])
            except (OSError, ValueError, KeyError, TypeError, RecursionError):
                digest = None
            if digest is None or digest != rec["sha256"]:
                with contextlib.suppress(OSError):
                    memo.unlink()
                wrong, stale = wrong + (digest is not None), stale + (digest is None)
        return wrong, stale


def _hash_if(path: str, key: str) -> str | None:
    """sha256 of the regular file at path if its stat key is key, else None."""
    st = os.stat(path)
    if _stat_key(st) != key or not stat.S_ISREG(st.st_mode):
        return None
    digest = checked.sha256_file(path)
    return digest if _stat_key(os.stat(path)) == key else None


def _digest(key: dict) -> str:
    """The folder-name digest of an entry's key."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def _words(exc) -> str:
    """An exception's text on one line, at most 200 characters."""
    return " ".join(str(exc).split())[:200]


def _remove_leftovers(graphs: Path, name: str) -> int:
    """Remove entry name's temporary folders (listed again: the caller holds its lock)."""
    removed = 0
    for other in os.listdir(graphs):
        m = _LEFTOVER.fullmatch(other)
        if m and m["entry"] == name and stat.S_ISDIR(os.lstat(graphs / other).st_mode):
            shutil.rmtree(graphs / other, ignore_errors=True)
            removed += 1
    return removed


def _remove(entry: Path) -> None:
    """Remove one of the cache's own entry folders (or a link in its place: the link itself is
    moved): renamed aside first, so no reader ever sees it half removed."""
    aside = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}.old-"))
    os.replace(entry, aside / "entry")
    shutil.rmtree(aside, ignore_errors=True)


def _source_stats(graph: Path) -> list[str]:
    """Stat keys of a graph and its external data files (fname*data)."""
    return [_stat_key(p.stat()) for p in sorted(graph.parent.glob(graph.name + "*"))]


@contextlib.contextmanager
def _locked(path: Path, wait: bool = True):
    """An exclusive advisory lock on path for the block; yields whether it is held (wait=False:
    False at once when another holder has it). The lock file is never followed through a
    symlink."""
    import fcntl

    fd = os.open(path, os.O_RDONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # releases the lock


def sources(
    folder: Path, fname: str, manifest: dict | None, hasher, verified: bool
) -> dict[str, str]:
    """sha256 of a graph file and its external data files (fname*data, as stairs-export names
    them): from the manifest when its hashes were checked at this load, else computed
    (remembered) by hasher, so an unverified load never maps an entry of an older file."""
    names = [fname] + sorted(
        p.name for p in folder.glob(fname + "*") if p.name != fname and p.name.endswith("data")
    )
    listed = (manifest or {}).get("files", {}) if verified else {}
    out = {}
    for name in names:
        path = checked.inside(folder, name)
        if name in listed:
            out[name] = listed[name]["sha256"]
            continue
        if not path.is_file():  # a FIFO or device would hang the hash
            raise ModelFileError(f"{path}: not a regular file")
        try:
            out[name] = hasher(path)
        except OSError as exc:
            raise ModelFileError(f"{path}: cannot read ({exc.strerror})") from exc
    return out


# -- stairs-verify --cache ---------------------------------------------------------------------


BUSY, REPLACED = "a build holds its lock", "replaced while it was checked"


@dataclass
class CacheReport:
    """What verify_cache found: per entry (name, status, why) with status ok, removed, busy
    (found mid-rebuild: a build holds it or replaced it), bad (left: it could not be removed)
    or skipped (not an entry); remembered hashes whose file has another
    hash now (wrong) or that cannot be checked (stale: no file has their stat now), both
    dropped; and the temporary folders of stopped builds removed."""

    root: Path
    entries: list[tuple[str, str, str]] = field(default_factory=list)
    wrong_hashes: int = 0
    stale_hashes: int = 0
    leftovers: int = 0

    @property
    def ok(self) -> bool:
        """Every entry and every remembered hash was good."""
        return not self.wrong_hashes and all(
            s in ("ok", "skipped", "busy") for _, s, _ in self.entries
        )


def verify_cache(root: str | Path, echo=None) -> CacheReport:
    """Hash every entry's files against its entry.json (bytes, sha256), whatever their stat
    says; remove the bad entries (not one a build holds) and drop the remembered hashes whose
    file no longer has that hash. echo(line), if given, gets each entry's line when checked."""
    cache = WeightsCache(root)
    report = CacheReport(cache.root)
    fresh: dict[str, str] = {}  # stat key -> sha256 hashed here
    graphs = cache.root / "graphs"
    for name in sorted(os.listdir(graphs)) if graphs.is_dir() else []:
        path = graphs / name
        if name.startswith("."):  # a stopped build's leftovers: drop_leftovers below
            continue
        if not _ENTRY_NAME.fullmatch(name) or path.is_symlink() or not path.is_dir():
            status, why = "skipped", "not a cache entry, left alone"
        else:
            ino = os.lstat(path).st_ino
            why = _check_entry(path, fresh)
            left = why and cache._remove_bad(path, ino)
            status = "ok" if why is None else "bad" if left else "removed"
            if left in (BUSY, REPLACED):  # mid-rebuild: the build that holds it replaces it
                status = "busy"
            why = f"{why}; left: {left}" if left else why
        report.entries.append((name, status, why or ""))
        if echo:
            echo(f"{status:8s} {name}" + (f": {why}" if why else ""))
    report.wrong_hashes, report.stale_hashes = cache._check_hashes(fresh)
    report.leftovers = cache.drop_leftovers()
    return report


def _check_entry(entry: Path, fresh: dict[str, str]) -> str | None:
    """Why entry's files disagree with its entry.json, or None; every file is hashed (fresh:
    stat key -> sha256, filled for the files unchanged while hashed)."""
    try:
        meta = json.loads((entry / ENTRY).read_text())
        files = meta["files"]
        if entry.name != f"{entry.name.rsplit('-', 1)[0]}-{_digest(meta['key'])}":
            return f"{ENTRY} names another key than its folder (altered)"
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return f"{ENTRY} missing, unreadable or incomplete"
    for name in (MODEL, DATA):
        info = files.get(name) if isinstance(files, dict) else None
        info = info if isinstance(info, dict) else {}
        try:
            before = os.stat(entry / name)
            if before.st_size != info.get("bytes"):
                return (f"{name}: {before.st_size} bytes, {ENTRY} says {info.get('bytes')}"
                        " (truncated or replaced)")  # fmt: skip
            digest = checked.sha256_file(entry / name)
            if _stat_key(os.stat(entry / name)) == _stat_key(before):
                fresh[_stat_key(before)] = digest
            if digest != info.get("sha256"):
                return f"{name}: sha256 differs from {ENTRY} (altered or damaged)"
        except OSError as exc:
            return f"{name}: cannot read ({exc.strerror or exc})"
    return None


def verify_cache_main(root: str | Path | None = None) -> int:
    """`stairs-verify --cache [DIR]` (DIR: default_root()): verify_cache with one line per entry
    and a summary; 0 when everything was good, 2 when anything was bad (and removed)."""
    root = Path(root) if root else default_root()
    if not root.is_dir():
        print(f"stairs-verify: error: {root}: no weights cache there", file=sys.stderr)
        return 2
    try:
        r = verify_cache(root, echo=print)
    except OSError as exc:
        print(f"stairs-verify: error: {root}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    entries = [e for e in r.entries if e[1] != "skipped"]
    good = sum(status == "ok" for _, status, _ in entries)
    removed = sum(status == "removed" for _, status, _ in entries)
    print(
        f"{good}/{len(entries)} entries ok in {root}, {removed} removed; remembered hashes"
        f" dropped: {r.wrong_hashes} wrong, {r.stale_hashes} stale; {r.leftovers} temporary"
        " folders of stopped builds removed"
    )
    return 0 if r.ok else 2
