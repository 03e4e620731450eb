"""Integrity of a model folder: safe paths, well-formed metadata, sizes and sha256 hashes.

`stairs-verify DIR` checks every file that DIR's stairs.json lists against its recorded size
and sha256 and prints OK or MISMATCH per file (exit 0 when all match, 2 otherwise).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from .errors import ModelFileError

# sha256_file is looked up here at each call (check_files, engine.weights), so a test can count
# the hashing by replacing engine.verify.sha256_file
from .layout import MANIFEST, sha256_file

MAX_JSON_BYTES = 16 << 20  # metadata files are kilobytes; refuse anything absurdly large
_SHA256 = re.compile(r"[0-9a-f]{64}")


def verify_enabled(verify: bool = True) -> bool:
    """Hash checks run unless verify=False or the environment sets STAIRS_VERIFY=0."""
    return verify and os.environ.get("STAIRS_VERIFY", "1").strip() != "0"


def inside(folder: str | Path, name: str, listed_in: Path | None = None) -> Path:
    """folder/name, refused unless it (symlinks followed) stays inside folder; listed_in: the
    manifest that names it, for the message. The message never describes the outside target,
    so a crafted folder cannot probe the machine."""
    folder = Path(folder)
    rel = Path(name)
    path = folder / rel
    where = f"{listed_in}: entry {name!r}" if listed_in else str(path)
    if "\0" in name:  # no file can have such a name; pathlib would raise a bare ValueError
        raise ModelFileError(f"{listed_in or folder}: entry {name!r} contains a NUL byte; refused")
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise ModelFileError(f"{where} leaves the model folder; refused")
    try:
        ok = path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError):  # symlink loop
        ok = False
    if not ok:
        raise ModelFileError(f"{where} resolves outside the model folder (symlink?); refused")
    return path


def read_json(path: Path, expect: type = dict):
    """Parse a small JSON metadata file; any damage is a ModelFileError naming the file."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if len(data) > MAX_JSON_BYTES:
        raise ModelFileError(f"{path}: over {MAX_JSON_BYTES >> 20} MiB, not a metadata file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ModelFileError(f"{path}: not UTF-8 text (binary or damaged file)") from exc
    try:
        value = json.loads(text)
    except RecursionError as exc:
        raise ModelFileError(f"{path}: JSON nested too deeply") from exc
    except json.JSONDecodeError as exc:
        raise ModelFileError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from exc
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise ModelFileError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(value, expect):
        raise ModelFileError(
            f"{path}: expected a JSON {_json_type(expect)}, found {_json_type(type(value))}"
        )
    return value


def _json_type(t: type) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(t, "number" if t in (int, float) else t.__name__)


def read_manifest(folder: str | Path) -> dict | None:
    """stairs.json of folder, its `files` table checked (safe names, int bytes, sha256), or
    None if the folder has none (a plain optimum export)."""
    folder = Path(folder)
    if not (folder / MANIFEST).exists() and not (folder / MANIFEST).is_symlink():
        return None
    path = inside(folder, MANIFEST)
    manifest = read_json(path, dict)
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ModelFileError(
            f"{path}: 'files' must be an object of file name -> {{sha256, bytes}},"
            f" found {_json_type(type(files))}"
        )
    for name, info in files.items():
        inside(folder, name, path)
        if not isinstance(info, dict):
            raise ModelFileError(f"{path}: entry {name!r} is not an object")
        size = info.get("bytes")
        if not _is_int(size) or size < 0:
            raise ModelFileError(f"{path}: entry {name!r} has no valid 'bytes' (found {size!r})")
        digest = info.get("sha256")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise ModelFileError(f"{path}: entry {name!r} has no valid 'sha256'")
    return manifest


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_files(folder: str | Path, manifest: dict, hashes: bool = True, hasher=None):
    """Yield (name, problem or None) for each file the manifest lists: present, same size,
    and (if hashes) same sha256 by hasher (default sha256_file). Sizes come first so a
    truncated file is named cheaply."""
    hasher = hasher or sha256_file
    folder = Path(folder)
    for name, info in manifest["files"].items():
        path = inside(folder, name)
        if not path.is_file():
            yield name, "missing"
            continue
        try:
            size = path.stat().st_size
            if size != info["bytes"]:
                problem = f"{size} bytes, manifest says {info['bytes']} (truncated or replaced)"
            elif hashes and hasher(path) != info["sha256"]:
                problem = "sha256 differs from the manifest (modified or damaged)"
            else:
                problem = None
        except OSError as exc:
            problem = f"cannot read ({exc.strerror or exc})"
        yield name, problem


def verify_folder(folder: str | Path, hashes: bool = True, hasher=None) -> dict | None:
    """The folder's checked manifest (None if it has none); ModelFileError naming the first
    listed file that is missing, resized or (if hashes) altered (hasher: see check_files)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    for name, problem in check_files(folder, manifest, hashes, hasher) if manifest else ():
        if problem:
            raise ModelFileError(f"{folder / name}: {problem}; export the folder again")
    return manifest


def print_folder_check(folder: str | Path) -> int:
    """`stairs-verify DIR`: print OK or MISMATCH for every file DIR's manifest lists; 0 if all
    match, else 2."""
    folder = Path(folder)
    bad = 0
    try:
        manifest = read_manifest(folder)
        if manifest is None:
            raise ModelFileError(f"{folder}: no {MANIFEST}, nothing to verify against")
        for name, problem in check_files(folder, manifest):
            print(
                f"{'MISMATCH' if problem else 'OK':8s} {name}" + (f": {problem}" if problem else "")
            )
            bad += problem is not None
    except (ModelFileError, OSError) as exc:
        print(f"stairs-verify: error: {exc}", file=sys.stderr)
        return 2
    n = len(manifest["files"])
    print(f"{n - bad}/{n} files match {folder / MANIFEST}")
    return 2 if bad else 0
