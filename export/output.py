"""The output side of an export: refusing unsafe targets, the temporary folders beside them,
signals while exporting, the swap into place and the cleanup; and the one-line typed error for a
failure from outside the exporter.

Main and assistant are exported into temporary folders beside their targets and swapped in
together, so a failure, Ctrl-C or SIGTERM leaves the previous folders exactly as they were;
--force only ever replaces an empty folder or a previous stairs export, never a source
checkpoint or anything else.
"""

from __future__ import annotations

import errno
import json
import secrets
import shutil
import signal
import threading
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

from engine.layout import MANIFEST, OWN_EXTRAS

from .errors import (
    ConversionError,
    ExportError,
    OutputConflictError,
    OutputExistsError,
    OutputWriteError,
    Terminated,
)
from .memory import release


def _entry_list(paths: list[Path], limit: int = 5) -> str:
    shown = [p.name + ("/" if p.is_dir() and not p.is_symlink() else "") for p in paths[:limit]]
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(shown) + more


def _foreign_entries(folder: Path) -> list[Path]:
    """Entries of folder that a previous stairs export did not write: all of them when it has no
    readable stairs.json listing its files."""
    try:
        ours = set(json.loads((folder / MANIFEST).read_text())["files"]) | OWN_EXTRAS
    except (OSError, ValueError, KeyError, TypeError):
        ours = set()
    return [
        p
        for p in sorted(folder.iterdir())
        if not (p.name in ours and p.is_file() and not p.is_symlink())
    ]


def check_target(target: Path, sources: list[Path], force: bool) -> None:
    """Refuse a target that is, contains or lies inside a source checkpoint, or that exists and may
    not be replaced (no --force, not a folder, or holding anything but a previous stairs export).
    Called before anything is written."""
    where = target.resolve()
    for src in sources:
        src = src.resolve()
        if where == src:
            raise OutputConflictError(f"{target} is the source checkpoint: choose another -o")
        if src in where.parents:
            raise OutputConflictError(
                f"{target} lies inside the source checkpoint {src}: choose another -o"
            )
        if where in src.parents:
            raise OutputConflictError(
                f"{target} contains the source checkpoint {src}: choose another -o"
            )
    if target.is_symlink():
        raise OutputExistsError(f"{target} is a symbolic link: give a real folder as -o")
    if not target.exists():
        return
    if not target.is_dir():
        raise OutputExistsError(f"{target} is a file, not a folder: choose another -o")
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the current folder was deleted: it cannot be the target
        cwd = None
    if where == cwd:
        # Swapping it would leave the shell in a deleted folder that looks empty.
        raise OutputExistsError(
            f"{target} is the current folder; it cannot be replaced. Give a folder inside it "
            "(-o ./NAME) or another -o"
        )
    if not force:
        raise OutputExistsError(f"{target} exists; use --force to replace it")
    foreign = _foreign_entries(target)
    if foreign:
        what = (
            "holds files its previous stairs export did not write"
            if (target / MANIFEST).is_file() and (target / MANIFEST) not in foreign
            else "is neither empty nor a previous stairs export (no readable stairs.json)"
        )
        raise OutputExistsError(
            f"{target} {what}; --force will not replace it. In the way: {_entry_list(foreign)} "
            "(move them or choose another -o)"
        )


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def as_export_error(exc: Exception, target: Path | None = None) -> ExportError:
    """A one-line typed error for a failure outside the exporter's own checks (the original
    stays as __cause__ when raised `from exc`)."""
    # Library errors may wrap the disk's OSError; other OSErrors in the chain may be unrelated
    # (caught and handled inside the library), so only these errnos count there.
    disk = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)
    os_err = exc if isinstance(exc, OSError) and exc.errno else None
    os_err = os_err or next(
        (e for e in _chain(exc) if isinstance(e, OSError) and e.errno in disk), None
    )
    text = " ".join(str(exc).split())
    where = getattr(os_err, "filename", None) or target or "the output folder"
    if (
        os_err is not None
        and os_err.errno in (errno.ENOSPC, errno.EDQUOT)
        or ("No space left on device" in text)
    ):
        return OutputWriteError(
            f"no space left on the device while writing {where}: free space or choose another -o"
        )
    if os_err is not None and os_err.errno in (errno.EACCES, errno.EPERM):
        return OutputWriteError(f"permission denied: {where}")
    if os_err is not None and os_err.errno == errno.EROFS:
        return OutputWriteError(f"read-only file system: {where} (choose another -o)")
    if os_err is not None:
        return OutputWriteError(f"cannot write {where}: {os_err.strerror}")
    if len(text) > 300:
        text = text[:297] + "..."
    return ConversionError(f"export to {where} failed: {type(exc).__name__}: {text}")


# The first SIGTERM or Ctrl-C of an export, set by its handler (main thread only; a plain list:
# a lock taken in a handler could deadlock against a second signal). Python swallows an exception
# raised while a __del__ or weakref callback runs (an import's module-lock callback, say), so each
# stage checks it too. One process-wide flag: exports running on other threads stop too.
_PENDING: list[BaseException | None] = [None]


@contextmanager
def signals_raise():
    """While exporting, SIGTERM (timeout, systemd, CI) raises Terminated as Ctrl-C raises
    KeyboardInterrupt, so the same cleanup runs, and each is remembered for stage. Only in the
    main thread (the only one Python runs handlers in), and only for a signal whose handler is
    Python's default (SIGTERM: none; SIGINT: KeyboardInterrupt): a host's own stays."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    ours = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler}
    prev = {sig: signal.getsignal(sig) for sig in ours}

    def handler(signum, frame):
        exc = Terminated("SIGTERM") if signum == signal.SIGTERM else KeyboardInterrupt()
        _PENDING[0] = _PENDING[0] or exc
        raise exc

    _PENDING[0] = None
    for sig, default in ours.items():
        if prev[sig] == default:
            signal.signal(sig, handler)
    try:
        yield
    except Exception as exc:
        # a C extension that the signal's raise interrupted may report another error instead
        # (torch: "could not determine the shape..."): the signal is still why the export ended
        if _PENDING[0] is not None:
            raise type(_PENDING[0])(*_PENDING[0].args) from exc
        raise
    finally:
        for sig in ours:
            if signal.getsignal(sig) is handler:  # not one the export's own code installed since
                signal.signal(sig, prev[sig])
        _PENDING[0] = None


def stage(steps, name: str) -> None:
    """Start an export stage (steps: its progress bar, or None): first raise again a SIGTERM
    (Terminated) or Ctrl-C (KeyboardInterrupt) whose raise was swallowed."""
    if _PENDING[0] is not None:
        raise type(_PENDING[0])(*_PENDING[0].args)
    release()  # the last stage's freed memory, not under this one's peak
    if steps is not None:
        steps.set_postfix_str(name)


@contextmanager
def signals_held():
    """Record SIGINT/SIGTERM instead of acting on them (a rename sequence must not be cut in
    half); yields the list of those that arrived. Main thread only; elsewhere records nothing."""
    caught: list[int] = []
    prev = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handler = signal.getsignal(sig)
            if handler not in (signal.SIG_IGN, signal.SIG_DFL, None):
                prev[sig] = handler
                signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield caught
    finally:
        for sig, handler in prev.items():
            signal.signal(sig, handler)


class _Rollback(Exception):
    """A signal arrived during the swap: put the previous folders back."""


def swap_in(
    pairs: list[tuple[Path, Path]], sources: Sequence[Path] = (), force: bool = False
) -> None:
    """Rename each complete (tmp, target) into place as one step: each target is checked again
    (check_target with sources and force: the export took minutes, and files may have landed
    there meanwhile) and, if it exists, renamed aside; all are renamed back if a check or a rename
    fails or a signal arrives. The old folders are removed once every new folder is in place."""
    aside: list[tuple[Path, Path]] = []
    placed: list[tuple[Path, Path]] = []
    with signals_held() as caught:
        try:
            for _, target in pairs:
                check_target(target, list(sources), force)
                if target.exists():
                    old = target.with_name(f".{target.name}.old-{secrets.token_hex(4)}")
                    target.rename(old)
                    aside.append((target, old))
            for tmp, target in pairs:
                tmp.rename(target)
                placed.append((tmp, target))
            if caught:
                raise _Rollback
        except BaseException as exc:
            try:
                for tmp, target in reversed(placed):
                    target.rename(tmp)
                for target, old in reversed(aside):
                    old.rename(target)
            except OSError as undo:
                kept = ", ".join(f"{t} -> {o}" for t, o in aside)
                raise OutputWriteError(
                    f"swap failed ({exc!r}) and could not be undone ({undo}); previous folders "
                    f"are kept as: {kept}"
                ) from undo
            if not isinstance(exc, _Rollback):
                raise
        else:
            # The new export is complete and in place: a signal from here on is not acted on
            # (the old folders are still removed, and success is reported, which is the truth).
            for _, old in aside:
                shutil.rmtree(old, ignore_errors=True)
            return
    # Rolled back because of a signal: act on it now, with the handler that was held back.
    signal.raise_signal(caught[0])
    raise KeyboardInterrupt  # that handler did not raise: stop all the same


def make_dirs(folder: Path) -> list[Path]:
    """mkdir -p folder; returns the folders it created, outermost first (removed on failure)."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    missing.reverse()
    for d in missing:
        d.mkdir(exist_ok=True)
    return missing


def make_tmp(target: Path) -> Path:
    """An empty folder beside target; mkdir honours the umask (tempfile.mkdtemp would be 0700)."""
    while True:
        tmp = target.with_name(f".{target.name}.tmp-{secrets.token_hex(4)}")
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


def absolute(path: Path) -> Path:
    """path made absolute with '.' and '..' resolved, so the temp folder lands beside the real
    target; a last component that is a name is kept as given (a symbolic link there is refused
    by check_target, not followed)."""
    path = path.expanduser()
    if path.name in ("", ".."):  # "." (pathlib drops it to ""), "..", "/", "a/.."
        return path.resolve()
    return path.parent.resolve() / path.name


def discard(tmps: list[Path], created: list[Path]) -> None:
    """Remove the temporary folders and the parents made for them (each only if still empty)."""
    with signals_held():  # a second Ctrl-C must not cut the cleanup short
        for tmp in tmps:
            shutil.rmtree(tmp, ignore_errors=True)
        for d in reversed(created):
            try:
                d.rmdir()  # only if still empty: something else may have landed there
            except OSError:
                pass
