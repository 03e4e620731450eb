"""`export_model`: a Hugging Face T5 checkpoint -> a validated ONNX folder: the encoder, the masked
decoder and the cross key/value graph (each weight once), optimum's two decoder files on request.

Fixed order (as CTranslate2's converters): check options and outputs -> export -> validate against
torch -> write manifest -> rename into place. Main and assistant are exported into temporary
folders beside their targets and swapped in together, so a failure, Ctrl-C or SIGTERM leaves the
previous folders exactly as they were; --force only ever replaces an empty folder or a previous
stairs export, never a source checkpoint or anything else.
"""

from __future__ import annotations

import errno
import gc
import hashlib
import json
import os
import secrets
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from models import MODELS_DIR, known_names, lookup

from .errors import (
    CheckpointError,
    ConversionError,
    ExportError,
    OptionError,
    OutputConflictError,
    OutputExistsError,
    OutputWriteError,
    PairMismatchError,
    Terminated,
)
from .masked import CROSS_FILE, DECODER_FILE, ENCODER_FILE, mark_export_id
from .quantize import check_overrides, settings

# 2: adds the masked, positioned decoder and the cross key/value graph (export/masked.py) that
# the batch scheduler loads; format 1 folders lack them and still load for one-prompt decoding.
# Since the engine runs every request on the masked graph, optimum's two decoder files are
# written only with optimum=True (`--optimum`), for other tools; the manifest lists what is there.
FORMAT_VERSION = 2
OPTIMUM_FILES = ["decoder_model.onnx", "decoder_with_past_model.onnx"]
ONNX_FILES = [ENCODER_FILE, *OPTIMUM_FILES]  # optimum's layout (what optimum=True adds to ours)
MASKED_FILES = [DECODER_FILE, CROSS_FILE]
DTYPES = ("fp32", "fp16", "int8", "int4")
# An assistant's numbers never reach the output (the main checks every token): int8 by default.
ASSISTANT_DTYPE = "int8"
TOKENIZER_FILES = [
    "spiece.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
]
PAIR_KEYS = ["vocab_size", "pad_token_id", "eos_token_id", "decoder_start_token_id"]
# T5's attention mask is built with aten::triu, which torch.onnx exports from opset 14 on
# (tried: 13 and below fail inside torch.onnx or ONNX Runtime).
MIN_OPSET = 14
# Files a previous export may hold besides those its manifest lists (stairs-tune writes the second).
OWN_EXTRAS = {"stairs.json", "stairs-tune.json"}


@dataclass
class ExportResult:
    """What one export produced: the main folder and, if any, the assistant's."""

    main: Path
    assistant: Path | None = None
    seconds: float = 0.0
    manifests: dict = field(default_factory=dict)


def _log(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, flush=True)


def resolve_source(model: str) -> tuple[Path, str]:
    """A local HF folder, or a registered/hub name fetched to the HF cache. Returns (path, name)."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} has no config.json: not a Hugging Face model folder")
        return path.resolve(), path.resolve().name
    entry = lookup(model)
    if entry is None and "/" not in model:
        raise CheckpointError(
            f"'{model}' is neither a folder nor a known model. Known: {', '.join(known_names())}"
        )
    hub = entry["hub"] if entry else model
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(hub, allow_patterns=["*.json", "*.model", "*.safetensors"])
    except Exception as exc:  # offline, unknown repo, auth: all end here
        raise CheckpointError(f"cannot download '{hub}' from the hub: {exc}") from exc
    return Path(local), (entry["name"] if entry else hub.split("/")[-1])


def read_config(src: Path) -> dict:
    """config.json of a checkpoint, with a clear error if it is missing or corrupt."""
    try:
        return json.loads((src / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {src / 'config.json'}: {exc}") from exc


def check_pair(main_cfg: dict, asst_cfg: dict) -> None:
    """Refuse a pair whose vocabulary or special ids differ, naming each difference."""
    diffs = [
        f"{k}: main {main_cfg.get(k)} vs assistant {asst_cfg.get(k)}"
        for k in PAIR_KEYS
        if main_cfg.get(k) != asst_cfg.get(k)
    ]
    if diffs:
        raise PairMismatchError("main and assistant are not a pair: " + "; ".join(diffs))


def load_torch_model(src: Path):
    """Load T5 in float32 (bf16/fp16 checkpoints are upcast), with a clear error when broken."""
    import torch
    from transformers import T5ForConditionalGeneration

    try:
        model = T5ForConditionalGeneration.from_pretrained(
            src, dtype=torch.float32, low_cpu_mem_usage=True
        )
    except Exception as exc:
        raise CheckpointError(f"cannot load the checkpoint in {src}: {exc}") from exc
    return model.eval()


def _sample_ids(src: Path, cfg: dict) -> list[int]:
    """Real text through the checkpoint's own tokenizer (random ids if it has none)."""
    from .validate import SAMPLE_TEXT

    spm = src / "spiece.model"
    if spm.is_file():
        import sentencepiece as spmlib

        ids = spmlib.SentencePieceProcessor(model_file=str(spm)).encode(SAMPLE_TEXT)
        ids = [i for i in ids if i < cfg["vocab_size"]]
        return ids[-255:] + [cfg["eos_token_id"]]
    import numpy as np

    return [int(i) for i in np.random.default_rng(0).integers(3, cfg["vocab_size"], 24)] + [1]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _export_one(
    src: Path,
    tmp: Path,
    dtype: str,
    opset: int | None,
    device: str,
    quiet: bool,
    optimum: bool = False,
    quant: dict | None = None,
) -> dict:
    """Export + validate one model into tmp; returns its manifest. An int8/int4 model is validated
    strictly in fp32 first, then quantized weight-only as quant says (export.quantize.settings)
    and its differences recorded."""
    from tqdm.auto import tqdm

    from .masked import check_in_place, check_masked_decoder, masked_reference
    from .quantize import quantize_file
    from .validate import check_onnx, torch_reference, validate_folder

    cfg = read_config(src)
    steps = tqdm(total=4 if dtype == "fp32" else 5, desc=src.name, disable=quiet, unit="step")
    _stage(steps, "load")
    model = load_torch_model(src)
    # PyTorch reference outputs first, so the torch weights can go before ONNX Runtime loads
    # the exported files (t5-3b: 11 GB of torch weights + a 6 GB decoder would not fit 24 GB).
    ref = torch_reference(model, _sample_ids(src, cfg))
    masked_ref = masked_reference(model)
    steps.update()
    _stage(steps, "export")
    files = _write_graphs(model, tmp, opset, device, optimum)
    del model
    gc.collect()
    steps.update()
    if dtype == "fp16":
        from .fp16 import convert_file

        _stage(steps, "fp16")
        for f in files:
            convert_file(tmp / f)
        steps.update()
    _stage(steps, "validate")
    check_onnx(tmp, files)
    validation = validate_folder(ref, tmp, "fp32" if quant else dtype, decoders=optimum)
    _add_masked(validation, check_masked_decoder(masked_ref, tmp, validation["rtol"]))
    steps.update()
    if quant:
        # The fp32 graphs were validated strictly above; the quantized differences are recorded
        # (non-finite outputs still fail).
        _stage(steps, dtype)
        for f in files:
            quantize_file(tmp / f, quant)
        validation[dtype] = validate_folder(ref, tmp, dtype, strict=False, decoders=optimum)
        _add_masked(validation[dtype], check_masked_decoder(masked_ref, tmp, None))
        steps.update()
    check_in_place(tmp / DECODER_FILE)  # the graph as written, after any rewrite
    _stage(steps, "manifest")
    manifest = _write_manifest(src, tmp, cfg, dtype, opset, files, validation, quant)
    steps.update()
    steps.close()
    return manifest


def _write_graphs(model, tmp: Path, opset: int | None, device: str, optimum: bool) -> list[str]:
    """The ONNX graphs of model into tmp: the encoder, the masked decoder and the cross key/value
    graph; optimum's two decoder files (and its encoder) when optimum. Returns their names."""
    from .masked import export_encoder, export_masked_decoder

    if optimum:
        from optimum.exporters.onnx import onnx_export_from_model

        onnx_export_from_model(
            model,
            tmp,
            task="text2text-generation-with-past",
            opset=opset,
            do_validation=False,
            no_post_process=True,
            device=device,
        )
        for extra in tmp.glob("decoder_model_merged*"):
            extra.unlink()
    else:
        export_encoder(model, tmp, opset)
        _save_configs(model, tmp)
    export_masked_decoder(model, tmp, opset)
    return (ONNX_FILES if optimum else [ENCODER_FILE]) + MASKED_FILES


def _save_configs(model, tmp: Path) -> None:
    """config.json, generation_config.json and the tokenizer files, as optimum's exporter writes
    them beside its graphs (float32 config; tokenizer_config.json's model_max_length)."""
    from optimum.utils.save_utils import maybe_save_preprocessors

    model.config.save_pretrained(tmp)
    gen = getattr(model, "generation_config", None)
    try:
        if gen is not None:
            gen.save_pretrained(tmp)
    except ValueError:  # transformers refuses to save an invalid one; the source's copy serves
        gen = None
    maybe_save_preprocessors(model.config._name_or_path, tmp)


def _write_manifest(
    src: Path,
    tmp: Path,
    cfg: dict,
    dtype: str,
    opset: int | None,
    onnx_files: list[str],
    validation: dict,
    quant: dict | None,
) -> dict:
    """Give every graph one new export id (in its metadata: the engine refuses a folder whose
    graphs name different exports), copy the tokenizer files, write stairs.json (every file
    with sha256 and size, the graphs written, dtype and quantization settings, the export id)
    and return it. Called after every rewrite of the graphs."""
    export_id = uuid.uuid4().hex
    for f in onnx_files:
        mark_export_id(tmp / f, export_id)
    for name in TOKENIZER_FILES + ["generation_config.json"]:
        if (src / name).is_file():
            shutil.copy2(src / name, tmp / name)
    if not (tmp / "spiece.model").is_file():
        raise CheckpointError(f"{src} has no spiece.model: the engine tokenises with sentencepiece")
    files = sorted(p.name for p in tmp.iterdir() if p.is_file() and p.name != "stairs.json")
    roles = dict(zip(["encoder", "decoder", "decoder_with_past"], ONNX_FILES))
    roles |= {"decoder_masked": MASKED_FILES[0], "cross_kv": MASKED_FILES[1]}
    manifest = {
        "format_version": FORMAT_VERSION,
        "export_id": export_id,
        "source": str(src),
        "dtype": dtype,
        "quantization": quant,
        "opset": opset,
        "files": {
            f: {"sha256": _sha256(tmp / f), "bytes": (tmp / f).stat().st_size} for f in files
        },
        "onnx": {role: f for role, f in roles.items() if f in onnx_files},
        "d_model": cfg["d_model"],
        "d_kv": cfg["d_kv"],
        "num_heads": cfg["num_heads"],
        "num_layers": cfg["num_layers"],
        "num_decoder_layers": cfg.get("num_decoder_layers") or cfg["num_layers"],
        "vocab_size": cfg["vocab_size"],
        "pad_token_id": cfg["pad_token_id"],
        "eos_token_id": cfg["eos_token_id"],
        "decoder_start_token_id": cfg["decoder_start_token_id"],
        "feed_forward_proj": cfg.get("feed_forward_proj", "relu"),
        "validation": validation,
        "assistant": None,
    }
    (tmp / "stairs.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def _add_masked(validation: dict, cases: dict) -> None:
    """Record the masked graphs' max abs differences beside the other files' (per case too)."""
    cross = MASKED_FILES[1]
    validation["max_abs_diff"][cross] = cases["cross_kv"]
    validation["max_abs_diff"][MASKED_FILES[0]] = max(
        d for case, d in cases.items() if case != "cross_kv"
    )
    validation["masked_cases"] = cases


def max_opset() -> int:
    """The newest opset torch.onnx's TorchScript exporter (the one optimum uses) writes."""
    try:
        from torch.onnx._constants import ONNX_MAX_OPSET

        return int(ONNX_MAX_OPSET)
    except (ImportError, AttributeError, TypeError, ValueError):  # moved: torch 2.13's value
        return 23


def check_options(
    dtype: str, assistant_dtype: str | None, opset: int | None, quantization: dict | None = None
) -> dict:
    """Refuse out-of-range options before any model is looked up or loaded; returns the main's
    checked quantization overrides."""
    for d in (dtype, assistant_dtype):
        if d is not None and d not in DTYPES:
            raise OptionError(f"dtype must be {', '.join(DTYPES)}, not {d!r}")
    if opset is not None:
        check_opset(opset)
    return check_overrides(dtype, quantization)


def check_opset(opset, option: str = "--opset") -> None:
    """Refuse an opset outside MIN_OPSET..max_opset() (stairs-export's and the masked decoder's
    export share this range); option names it in the message."""
    hi = max_opset()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= hi:
        raise OptionError(
            f"{option} must be between {MIN_OPSET} and {hi}, not {opset!r} (T5 needs opset "
            f"{MIN_OPSET} or newer; {hi} is the newest this torch.onnx writes)"
        )


def _entry_list(paths: list[Path], limit: int = 5) -> str:
    shown = [p.name + ("/" if p.is_dir() and not p.is_symlink() else "") for p in paths[:limit]]
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(shown) + more


def _foreign_entries(folder: Path) -> list[Path]:
    """Entries of folder that a previous stairs export did not write: all of them when it has no
    readable stairs.json listing its files."""
    try:
        ours = set(json.loads((folder / "stairs.json").read_text())["files"]) | OWN_EXTRAS
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
            if (target / "stairs.json").is_file() and (target / "stairs.json") not in foreign
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


@contextmanager
def _signals_raise():
    """While exporting, SIGTERM (timeout, systemd, CI) raises Terminated as Ctrl-C raises
    KeyboardInterrupt, so the same cleanup runs, and each is remembered for _stage. Only in the
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
    finally:
        for sig in ours:
            if signal.getsignal(sig) is handler:  # not one the export's own code installed since
                signal.signal(sig, prev[sig])
        _PENDING[0] = None


# The first SIGTERM or Ctrl-C of an export, set by its handler (main thread only; a plain list:
# a lock taken in a handler could deadlock against a second signal). Python swallows an exception
# raised while a __del__ or weakref callback runs (an import's module-lock callback, say), so each
# stage checks it too. One process-wide flag: exports running on other threads stop too.
_PENDING: list[BaseException | None] = [None]


def _stage(steps, name: str) -> None:
    """Start an export stage (steps: its progress bar, or None): first raise again a SIGTERM
    (Terminated) or Ctrl-C (KeyboardInterrupt) whose raise was swallowed."""
    if _PENDING[0] is not None:
        raise type(_PENDING[0])(*_PENDING[0].args)
    if steps is not None:
        steps.set_postfix_str(name)


@contextmanager
def _signals_held():
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
    with _signals_held() as caught:
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


def _make_dirs(folder: Path) -> list[Path]:
    """mkdir -p folder; returns the folders it created, outermost first (removed on failure)."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    missing.reverse()
    for d in missing:
        d.mkdir(exist_ok=True)
    return missing


def _make_tmp(target: Path) -> Path:
    """An empty folder beside target; mkdir honours the umask (tempfile.mkdtemp would be 0700)."""
    while True:
        tmp = target.with_name(f".{target.name}.tmp-{secrets.token_hex(4)}")
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


def export_model(
    model: str,
    output: str | Path | None = None,
    assistant: str | None = "auto",
    dtype: str = "fp32",
    opset: int | None = None,
    device: str = "cpu",
    force: bool = False,
    quiet: bool = False,
    assistant_dtype: str | None = None,
    optimum: bool = False,
    quantization: dict | None = None,
) -> ExportResult:
    """Export MODEL (hub name or local folder) and, if any, its assistant to validated ONNX folders.

    assistant: "auto" takes the registered assistant of a known model, None exports none,
    anything else is a hub name or folder. Output defaults to models/<name>/ (assistant beside it).
    dtype (the main's): fp32, fp16 (overflow-prone parts kept fp32), int8 or int4 (weight-only
    MatMulNBits: no scale spans rows, so a row's logits do not depend on its batch).
    assistant_dtype: the assistant's, int8 unless given (its numbers never reach the output;
    weight-only too, at the settings of its fastest draft call, export.quantize). optimum: write
    optimum's decoder_model.onnx and decoder_with_past_model.onnx too (the engine needs neither).
    quantization: an int8/int4 main's changes to its settings, {"block_size": 16, 32, 64, 128
    or 256, "keep": a list of "wo", "lm_head" ([] keeps nothing)} (docs/quantization.md).
    opset: 14 to the newest torch.onnx writes. force: replace outputs that are empty or previous
    stairs exports.
    Every failure is an ExportError (Ctrl-C a KeyboardInterrupt, SIGTERM a Terminated) and leaves
    the previous output folders exactly as they were.
    """
    overrides = check_options(dtype, assistant_dtype, opset, quantization)
    with _signals_raise():
        try:
            args = (model, output, assistant, dtype, opset, device, force, quiet, assistant_dtype)
            return _export(*args, optimum=optimum, overrides=overrides)
        except ExportError:
            raise
        except Exception as exc:
            raise as_export_error(exc, Path(output) if output else None) from exc


def _absolute(path: Path) -> Path:
    """path made absolute with '.' and '..' resolved, so the temp folder lands beside the real
    target; a last component that is a name is kept as given (a symbolic link there is refused
    by check_target, not followed)."""
    path = path.expanduser()
    if path.name in ("", ".."):  # "." (pathlib drops it to ""), "..", "/", "a/.."
        return path.resolve()
    return path.parent.resolve() / path.name


def _plan(model, output, assistant, force) -> tuple[Path, list[tuple[Path, Path]]]:
    """Resolve the sources and their output folders, refusing before any work: unsafe or
    existing outputs and mismatched pairs. Returns (main output, [(source, target)], main first)."""
    src, name = resolve_source(model)
    out = _absolute(Path(output) if output else MODELS_DIR / name)
    if assistant == "auto":
        entry = lookup(model)
        assistant = entry["assistant"] if entry else None
    targets = [(src, out)]
    if assistant:
        a_src, a_name = resolve_source(assistant)
        check_pair(read_config(src), read_config(a_src))
        targets.append(
            (a_src, out.parent / a_name if a_src != src else out.parent / (a_name + "-assistant"))
        )
        if targets[1][1].resolve() == out.resolve():
            raise OutputConflictError(
                f"main and assistant would both be written to {out}: choose another -o"
            )
    for _, target in targets:
        check_target(target, [s for s, _ in targets], force)
    return out, targets


def _export_targets(
    targets, tmps, created, dtype, opset, device, quiet, assistant_dtype, optimum, overrides
) -> dict:
    """Export each (source, target) into a new temporary folder beside its target; appends the
    folders to tmps and the parents it made to created (for the caller's cleanup). Returns the
    manifests by target."""
    manifests: dict = {}
    for i, (s, target) in enumerate(targets):
        d = dtype if i == 0 else (assistant_dtype or ASSISTANT_DTYPE)
        created += _make_dirs(target.parent)
        tmps.append(_make_tmp(target))
        _log(quiet, f"exporting {s} -> {target} ({d})")
        try:
            manifests[str(target)] = _export_one(
                s,
                tmps[-1],
                d,
                opset,
                device,
                quiet,
                optimum=optimum,
                quant=settings(d, i == 1, overrides),  # a main's or an assistant's
            )
        except ExportError:
            raise
        except Exception as exc:  # optimum, torch.onnx, ONNX Runtime, the disk
            raise as_export_error(exc, target) from exc
    return manifests


def _link_pair(targets, tmps: list[Path], manifests: dict) -> None:
    """Name in each manifest of a main/assistant pair the other's folder (relative to its own)
    and write both stairs.json again."""
    (_, main_out), (_, asst_out) = targets
    manifests[str(main_out)]["assistant"] = os.path.relpath(asst_out, main_out)
    manifests[str(asst_out)]["main"] = os.path.relpath(main_out, asst_out)
    for tmp, (_, target) in zip(tmps, targets):
        (tmp / "stairs.json").write_text(json.dumps(manifests[str(target)], indent=2))


def _discard(tmps: list[Path], created: list[Path]) -> None:
    """Remove the temporary folders and the parents made for them (each only if still empty)."""
    with _signals_held():  # a second Ctrl-C must not cut the cleanup short
        for tmp in tmps:
            shutil.rmtree(tmp, ignore_errors=True)
        for d in reversed(created):
            try:
                d.rmdir()  # only if still empty: something else may have landed there
            except OSError:
                pass


def _export(
    model,
    output,
    assistant,
    dtype,
    opset,
    device,
    force,
    quiet,
    assistant_dtype,
    optimum=False,
    overrides=None,
):
    """export_model's body: its arguments, already checked. Refusals, exports into temporary
    folders, pairing and the swap, with one cleanup for all of them."""
    t0 = time.perf_counter()
    out, targets = _plan(model, output, assistant, force)
    tmps: list[Path] = []
    created: list[Path] = []
    try:
        manifests = _export_targets(
            targets, tmps, created, dtype, opset, device, quiet, assistant_dtype, optimum, overrides
        )
        if len(targets) == 2:
            _link_pair(targets, tmps, manifests)
        _stage(None, "swap")
        swap_in(
            [(tmp, target) for tmp, (_, target) in zip(tmps, targets)],
            [s for s, _ in targets],
            force,
        )
    except BaseException:  # Ctrl-C and SIGTERM included: never leave a half-written folder
        _discard(tmps, created)
        raise
    return ExportResult(
        main=out,
        assistant=targets[1][1] if len(targets) == 2 else None,
        seconds=time.perf_counter() - t0,
        manifests=manifests,
    )
