"""stairs-export never loses user data: --force limits, source overlap, atomic pairs, SIGTERM,
umask, opset range and write failures (typed one-line errors, exit 2, nothing left behind)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, make_tiny_t5, unshare_works

from export import (
    CheckpointError,
    ConversionError,
    OptionError,
    OutputConflictError,
    OutputExistsError,
    OutputWriteError,
    Terminated,
    export_model,
)
from export.cli import main as export_cli


def tiny(folder: Path, seed: int) -> Path:
    return make_tiny_t5(folder, "v1_1", seed=seed, d_model=32, layers=1)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """Two tiny checkpoints that form a pair: {"main": dir, "asst": dir}, never written to."""
    base = tmp_path_factory.mktemp("src")
    return {"main": tiny(base / "main", 1), "asst": tiny(base / "asst", 2)}


@pytest.fixture(scope="module")
def other_asst(tmp_path_factory):
    """Another assistant whose folder is also named 'asst' (so it lands on the same target)."""
    return tiny(tmp_path_factory.mktemp("other") / "asst", 3)


def snapshot(folder: Path) -> dict:
    """Every file below folder (hidden ones too) -> sha256; folders -> 'dir'."""
    out = {}
    for p in sorted(folder.rglob("*")):
        key = str(p.relative_to(folder))
        out[key] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def leftovers(*folders: Path) -> list[Path]:
    return [p for f in folders for pat in (".*tmp-*", ".*old-*") for p in f.glob(pat)]


def cli(capsys, *argv) -> tuple[int, list[str]]:
    rc = export_cli([*map(str, argv), "-q"])
    err = capsys.readouterr().err
    return rc, [line for line in err.splitlines() if line.startswith("stairs-export")]


def one_error_line(lines: list[str]) -> str:
    assert len(lines) == 1 and lines[0].startswith("stairs-export: error: "), lines
    return lines[0]


def test_force_refuses_a_folder_with_user_files(src, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "thesis.txt").write_text("four years of work")
    (out / "sub" / "data.csv").write_text("a,b\n1,2\n")
    before = snapshot(tmp_path)
    with pytest.raises(
        OutputExistsError, match=r"no readable stairs.json.*In the way: sub/, thesis\.txt \("
    ):
        export_model(str(src["main"]), out, assistant=None, force=True, quiet=True)
    rc, lines = cli(capsys, src["main"], "-o", out, "--assistant", "none", "--force")
    assert rc == 2 and "thesis.txt" in one_error_line(lines)
    assert snapshot(tmp_path) == before and not leftovers(tmp_path)


@pytest.mark.parametrize("where", ["source", "inside", "containing"])
def test_output_overlapping_the_source_is_refused(src, where, capsys):
    main = src["main"]
    out = {"source": main, "inside": main / "onnx", "containing": main.parent}[where]
    before = snapshot(main.parent)
    with pytest.raises(OutputConflictError, match="source checkpoint"):
        export_model(str(main), out, assistant=None, force=True, quiet=True)
    rc, lines = cli(capsys, main, "-o", out, "--assistant", "none", "--force")
    assert rc == 2 and "source checkpoint" in one_error_line(lines)
    assert snapshot(main.parent) == before and not leftovers(main.parent, main)


def test_assistant_target_is_checked_too(src, tmp_path):
    # The assistant lands beside -o, named after its source: here that is its source folder.
    before = snapshot(src["asst"].parent)
    with pytest.raises(OutputConflictError, match="is the source checkpoint"):
        export_model(
            str(src["main"]), src["asst"].parent / "x", assistant=str(src["asst"]), force=True
        )
    # -o named like the assistant: both would share one folder.
    with pytest.raises(OutputConflictError, match="both be written"):
        export_model(str(src["main"]), tmp_path / "asst", assistant=str(src["asst"]), force=True)
    assert snapshot(src["asst"].parent) == before and list(tmp_path.iterdir()) == []


def test_force_replaces_only_a_previous_export(src, tmp_path):
    out = tmp_path / "out"
    export_model(str(src["main"]), out, assistant=None, quiet=True)
    (out / "stairs-tune.json").write_text("{}")  # written by stairs-tune: part of the export
    (out / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(OutputExistsError, match=r"did not write.*In the way: notes\.txt \("):
        export_model(str(src["asst"]), out, assistant=None, force=True, quiet=True)
    assert snapshot(tmp_path) == before
    (out / "notes.txt").unlink()
    export_model(str(src["asst"]), out, assistant=None, force=True, quiet=True)
    m = json.loads((out / "stairs.json").read_text())
    assert m["source"] == str(src["asst"])
    assert sorted(p.name for p in out.iterdir()) == sorted([*m["files"], "stairs.json"])
    new_sha = hashlib.sha256((out / "encoder_model.onnx").read_bytes()).hexdigest()
    assert new_sha != before["out/encoder_model.onnx"]  # really the other model
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    # an empty folder is replaced too
    (tmp_path / "empty").mkdir()
    export_model(str(src["main"]), tmp_path / "empty", assistant=None, force=True, quiet=True)
    assert (tmp_path / "empty" / "stairs.json").is_file()


@pytest.fixture
def previous_pair(src, tmp_path):
    """A pair exported to tmp_path/models/{main,asst} and its snapshot."""
    res = export_model(str(src["main"]), tmp_path / "models" / "main", str(src["asst"]), quiet=True)
    assert res.assistant == tmp_path / "models" / "asst"
    return tmp_path / "models", snapshot(tmp_path / "models")


def broken_assistant(tmp_path: Path, src) -> Path:
    """A copy of the assistant (same folder name, so the same target) with a garbage checkpoint."""
    bad = tmp_path / "broken" / "asst"
    shutil.copytree(src["asst"], bad)
    (bad / "model.safetensors").write_bytes(b"\x00garbage" * 64)
    return bad


def test_pair_failure_keeps_the_previous_pair(src, tmp_path, previous_pair, capsys):
    models, before = previous_pair
    bad = broken_assistant(tmp_path, src)
    # Another main model, so a replaced main folder would show (the same one exports identically).
    with pytest.raises(CheckpointError, match="cannot load"):
        export_model(str(src["asst"]), models / "main", str(bad), force=True, quiet=True)
    rc, lines = cli(capsys, src["asst"], "-o", models / "main", "--assistant", bad, "--force")
    assert rc == 2 and "cannot load" in one_error_line(lines)
    assert snapshot(models) == before and not leftovers(models)


def test_failed_swap_is_rolled_back(src, other_asst, previous_pair, monkeypatch):
    models, before = previous_pair
    real = Path.rename

    def rename(self, target):  # the second new folder cannot be renamed in
        if ".tmp-" in self.name and Path(target) == models / "asst":
            raise OSError(errno.EACCES, "Permission denied", str(target))
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OutputWriteError, match="permission denied") as err:
        export_model(str(src["asst"]), models / "main", str(other_asst), force=True, quiet=True)
    assert isinstance(err.value.__cause__, OSError)
    assert snapshot(models) == before and not leftovers(models)


def test_signal_during_swap_is_rolled_back(src, other_asst, previous_pair, monkeypatch):
    models, before = previous_pair
    real = Path.rename

    def rename(self, target):  # SIGTERM arrives right after the new main folder is in place
        done = real(self, target)
        if ".tmp-" in self.name and Path(target) == models / "main":
            os.kill(os.getpid(), signal.SIGTERM)
        return done

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(Terminated):
        export_model(str(src["asst"]), models / "main", str(other_asst), force=True, quiet=True)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handler restored
    assert snapshot(models) == before and not leftovers(models)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
    "sig, exc",
    [(signal.SIGTERM, Terminated), (signal.SIGINT, KeyboardInterrupt)],
    ids=["term", "int"],
)
def test_signal_swallowed_by_a_finalizer_still_stops(src, tmp_path, monkeypatch, sig, exc):
    """Python ignores an exception raised in a __del__ or weakref callback (CI once sent SIGTERM
    while an import's module-lock callback ran): the export still stops at its next stage, for
    SIGTERM and for Ctrl-C alike."""
    import export.masked

    class Finalizer:
        def __del__(self):
            os.kill(os.getpid(), sig)
            time.sleep(0.05)  # the handler runs (and raises) here, inside __del__

    real = export.masked.masked_reference
    validated = []

    def reference(model):
        Finalizer()  # dropped at once: the signal arrives inside its __del__
        return real(model)

    monkeypatch.setattr(export.masked, "masked_reference", reference)
    monkeypatch.setattr("export.validate.validate_folder", lambda *a, **k: validated.append(1))
    models = tmp_path / "models"
    # a shell's background job ignores SIGINT (so would the export): give it Python's default
    # handler, as an interactive terminal does
    prev = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(exc) as err:
            export_model(str(src["main"]), models / "main", None, quiet=True)
        assert type(err.value) is exc  # Ctrl-C stays a KeyboardInterrupt: exit 130, not 143
        assert signal.getsignal(signal.SIGINT) == signal.default_int_handler  # restored
    finally:
        signal.signal(signal.SIGINT, prev)
    assert not validated and not models.exists()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


SLOW_CLI = """
import sys, time
import export.validate as v
real = v.validate_folder
def slow(*a, **k):  # time for the test to send SIGTERM mid-export
    time.sleep(60)
    return real(*a, **k)
v.validate_folder = slow
from export.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("previous", [False, True], ids=["fresh", "over-previous-pair"])
def test_sigterm_leaves_nothing(src, tmp_path, previous, request):
    if previous:
        models, before = request.getfixturevalue("previous_pair")
    else:
        models, before = tmp_path / "new" / "models", None
    argv = [src["main"], "-o", models / "main", "--assistant", src["asst"], "-q", "--force"]
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_CLI, *map(str, argv)],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (models.is_dir() and list(models.glob(".main.tmp-*"))):
            assert proc.poll() is None and time.monotonic() < deadline, "no temp folder appeared"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "interrupted (SIGTERM)" in err and "Traceback" not in err
    if previous:
        assert snapshot(models) == before and not leftovers(models)
    else:
        assert not (tmp_path / "new").exists()  # folders the export created went too


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_folder_follows_umask(src, tmp_path, umask):
    old = os.umask(umask)
    try:
        res = export_model(str(src["main"]), tmp_path / "out", assistant=None, quiet=True)
    finally:
        os.umask(old)
    assert res.main.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (res.main / "stairs.json").stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.fixture
def nothing_loads(monkeypatch):
    """An option must be refused before any model is looked up or loaded: both raise here."""
    import export.core

    def no_load(*a, **k):
        raise AssertionError("a model was looked up or loaded before the options were checked")

    monkeypatch.setattr(export.core, "load_torch_model", no_load)
    monkeypatch.setattr(export.core, "resolve_source", no_load)


@pytest.mark.parametrize("opset", [5, 13, 24, 99])
def test_opset_out_of_range_is_refused_before_loading(src, tmp_path, opset, capsys, nothing_loads):
    with pytest.raises(OptionError, match="between 14 and 23"):
        export_model(str(src["main"]), tmp_path / "out", assistant=None, opset=opset)
    rc = export_cli([str(src["main"]), "-o", str(tmp_path / "o"), "--opset", str(opset), "-q"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("stairs-export: error: --opset")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--dtype", "int8", "--block-size", "24"], "--block-size must be one of 16, 32"),
        (["--dtype", "int8", "--block-size", "8"], "--block-size must be one of"),
        (["--dtype", "int4", "--block-size", "48"], "--block-size must be one of"),
        (["--dtype", "int4", "--keep-fp32", "wo,attention"], "--keep-fp32 takes a comma list"),
        (["--dtype", "int8", "--keep-fp32", ""], "none alone, not ''"),
        (["--dtype", "int8", "--keep-fp32", "none,wo"], "none alone, not 'none,wo'"),
        (["--block-size", "32"], "need --dtype int8 or int4, not fp32"),
        (["--dtype", "fp16", "--keep-fp32", "none"], "need --dtype int8 or int4, not fp16"),
    ],
)
def test_bad_quantization_flags_refused_before_loading(
    src, tmp_path, flags, words, capsys, nothing_loads
):
    rc, lines = cli(capsys, src["main"], "-o", tmp_path / "o", *flags)
    assert rc == 2 and words in one_error_line(lines), lines
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "quantization, words",
    [
        ({"bs": 1}, "unknown quantization setting(s) ['bs']"),
        (5, "must be a dict"),
        ({"keep": 5}, "--keep-fp32 takes"),
        ({"keep": ["wo", 3]}, "--keep-fp32 takes"),
        ({"block_size": True}, "--block-size must be"),
        ({"block_size": "32"}, "--block-size must be"),
    ],
)
def test_bad_quantization_values_refused_by_the_api(
    src, tmp_path, quantization, words, nothing_loads
):
    with pytest.raises(OptionError) as err:
        export_model(str(src["main"]), tmp_path / "o", dtype="int8", quantization=quantization)
    assert words in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_quantization_overrides_reach_only_the_main():
    from export.quantize import ASSISTANT, WEIGHT_ONLY, check_overrides, settings

    over = check_overrides("int8", {"block_size": 64, "keep": "none"})
    assert over == {"block_size": 64, "keep": []}
    assert settings("int8", False, over) == {
        "method": "weight_only", "op": "MatMulNBits", **WEIGHT_ONLY["int8"], **over
    }  # fmt: skip
    assert settings("int8", True, over) == {
        "method": "weight_only", "op": "MatMulNBits", **ASSISTANT["int8"]
    }  # fmt: skip
    assert check_overrides("int4", {"keep": "wo,lm_head,wo"}) == {"keep": ["lm_head", "wo"]}
    assert check_overrides("int8", {"keep": ()}) == {"keep": []}
    assert check_overrides("fp32", {"block_size": None}) == {}  # nothing set: nothing to refuse


@pytest.mark.parametrize(
    "exc, kind, text",
    [
        (OSError(errno.EACCES, "Permission denied"), OutputWriteError, "permission denied"),
        (OSError(errno.ENOSPC, "No space left on device"), OutputWriteError, "no space left"),
        (OSError(errno.EROFS, "Read-only file system"), OutputWriteError, "read-only file system"),
        (RuntimeError("torch.onnx broke\n  on two lines"), ConversionError, "RuntimeError"),
    ],
    ids=["EACCES", "ENOSPC", "EROFS", "RuntimeError"],
)
def test_write_and_conversion_failures(src, tmp_path, monkeypatch, capsys, exc, kind, text):
    import torch.onnx

    def failing_export(module, args, f, **kw):  # half a file written, then the failure
        Path(f).write_bytes(b"partial")
        raise exc

    monkeypatch.setattr(torch.onnx, "export", failing_export)
    out = tmp_path / "new" / "out"
    with pytest.raises(kind, match=text) as err:
        export_model(str(src["main"]), out, assistant=None, quiet=True)
    assert err.value.__cause__ is exc and "\n" not in str(err.value)
    rc, lines = cli(capsys, src["main"], "-o", out, "--assistant", "none")
    assert rc == 2 and text in one_error_line(lines)
    assert list(tmp_path.iterdir()) == []  # temp folder and the created parent both gone


READ_ONLY_CLI = """
import subprocess, sys
parent = sys.argv[1]
# in a mount namespace of its own: a read-only tmpfs over parent, gone with the process
subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", parent], check=True)
from export.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_read_only_output_parent(src, tmp_path, capsys):
    """An output whose parent cannot be written: one line, exit 2, nothing written. A 0o555
    folder for an ordinary user; as root (who ignores mode bits: CI) a read-only file system
    mounted over the folder in a private mount namespace, else the immutable attribute."""
    parent = tmp_path / "ro"
    parent.mkdir()
    argv = [src["main"], "-o", parent / "out", "--assistant", "none"]
    if os.geteuid() != 0:
        parent.chmod(0o555)
        try:
            rc, lines = cli(capsys, *argv)
        finally:
            parent.chmod(0o755)
        assert rc == 2 and "permission denied" in one_error_line(lines)
    elif unshare_works():
        proc = subprocess.run(
            ["unshare", "-m", sys.executable, "-c", READ_ONLY_CLI, parent, *argv, "-q"],
            check=False,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        lines = [line for line in proc.stderr.splitlines() if line.startswith("stairs-export")]
        assert proc.returncode == 2, proc.stderr
        assert "read-only file system" in one_error_line(lines)
    else:
        chattr = subprocess.run(["chattr", "+i", parent], check=False, capture_output=True)
        if chattr.returncode != 0:
            pytest.skip("root here, and neither a private read-only mount nor chattr +i works")
        try:
            rc, lines = cli(capsys, *argv)
        finally:
            subprocess.run(["chattr", "-i", parent], check=True)
        assert rc == 2 and "permission denied" in one_error_line(lines)
    assert list(parent.iterdir()) == [] and [p.name for p in tmp_path.iterdir()] == ["ro"]


@pytest.mark.parametrize("case", ["fresh", "previous", "pair-second"])
def test_files_landing_in_the_target_during_export_are_kept(
    src, other_asst, tmp_path, monkeypatch, case
):
    """The target is checked again just before the swap: what arrived there during the export
    (minutes for a large model) stays, the new export is discarded, nothing else changes."""
    import export.core

    if case == "fresh":  # no target at the start; a folder with a file appears
        root, force = tmp_path / "new", False
        main, asst, late = root / "out", None, root / "out"
    else:
        root, force = tmp_path / "models", True
        main = root / "main"
        pair = case == "pair-second"
        export_model(str(src["main"]), main, str(src["asst"]) if pair else None, quiet=True)
        asst = str(other_asst) if pair else None  # lands on root/asst too
        late = root / "asst" if case == "pair-second" else main
    before = snapshot(tmp_path)
    real = export.core._export_one

    def export_then_user_writes(s, tmp, *a, **k):
        manifest = real(s, tmp, *a, **k)
        late.mkdir(parents=True, exist_ok=True)
        (late / "notes.txt").write_text("written during the export")
        return manifest

    monkeypatch.setattr(export.core, "_export_one", export_then_user_writes)
    match = "exists; use --force" if case == "fresh" else r"did not write.*In the way: notes\.txt"
    with pytest.raises(OutputExistsError, match=match):
        export_model(str(src["asst"]), main, asst, force=force, quiet=True)
    assert (late / "notes.txt").read_text() == "written during the export"
    (late / "notes.txt").unlink()
    after = snapshot(tmp_path)
    if case == "fresh":
        assert after == {"new": "dir", "new/out": "dir"}
    else:
        assert after == before  # the previous export(s) untouched, the main one put back
    assert not leftovers(root)


def test_signal_while_removing_the_old_folder_still_succeeds(src, tmp_path, monkeypatch, capsys):
    """Once the new folders are in place the export has succeeded: a signal during the removal
    of the old ones neither undoes it nor reports an interruption."""
    out = tmp_path / "out"
    export_model(str(src["main"]), out, assistant=None, quiet=True)
    real = shutil.rmtree

    def rmtree(path, *a, **k):
        if ".old-" in Path(path).name:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(path, *a, **k)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    rc = export_cli([str(src["asst"]), "-o", str(out), "--assistant", "none", "--force", "-q"])
    captured = capsys.readouterr()
    assert rc == 0 and "interrupted" not in captured.err and "done in" in captured.out
    assert json.loads((out / "stairs.json").read_text())["source"] == str(src["asst"])
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert not leftovers(tmp_path) and [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
@pytest.mark.parametrize("output", [".", "new/.."])
def test_output_naming_the_current_folder_is_refused(
    src, tmp_path, monkeypatch, capsys, output, force
):
    cwd = tmp_path / "here"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    rc, lines = cli(capsys, src["main"], "-o", output, "--assistant", "none", *["--force"] * force)
    assert rc == 2 and "is the current folder" in one_error_line(lines)
    assert snapshot(tmp_path) == {"here": "dir"}  # no temp folder, no 'new' created


def test_relative_output_with_dotdot_lands_beside_the_real_target(src, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = export_model(str(src["main"]), "a/../out", assistant=None, quiet=True)
    assert res.main == tmp_path / "out" and (tmp_path / "out" / "stairs.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no 'a', no temp folder


def test_one_definition_of_the_masked_files_and_opset_range(src, tmp_path):
    """export.core names the masked graphs as export.masked writes them and the engine loads
    them, and both exporters refuse an opset with the same message."""
    import engine.model
    import export.core
    import export.masked

    names = [export.masked.DECODER_FILE, export.masked.CROSS_FILE]
    assert export.core.MASKED_FILES == names
    assert [engine.model.MASKED_FILE, engine.model.CROSS_FILE] == names
    model = export.core.load_torch_model(src["main"])
    with pytest.raises(OptionError) as masked_err:
        export.masked.export_masked_decoder(model, tmp_path / "m", opset=13)
    with pytest.raises(OptionError) as core_err:
        export.core.check_options("fp32", None, 13)
    assert str(masked_err.value) == str(core_err.value).replace("--opset", "opset")
    assert "between 14 and" in str(masked_err.value) and not (tmp_path / "m").exists()


def test_a_signal_reported_as_another_error_still_interrupts():
    """A C extension interrupted by SIGTERM's raise may swallow it and report another error
    (torch did, mid-slice): the export still ends as interrupted, not as that error."""
    import os

    from export import Terminated
    from export.output import signals_raise

    with pytest.raises(Terminated) as info, signals_raise():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises Terminated here
        except Terminated:
            raise TypeError("could not determine the shape of object type") from None
    assert isinstance(info.value.__cause__, TypeError)
