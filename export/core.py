"""`export_model`: a Hugging Face T5 checkpoint -> a validated ONNX folder: the encoder, the masked
decoder and the cross key/value graph (each weight once), optimum's two decoder files on request.

Fixed order (as CTranslate2's converters): check options and outputs -> export -> validate against
torch -> write manifest -> rename into place. The output side (target checks, temporary folders,
signals, the swap) is export.output's; the folder's names are engine.layout's.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from engine.layout import (
    CONFIG_FILE,
    CROSS_FILE,
    DECODER_FILE,
    ENCODER_FILE,
    FORMAT_VERSION,
    GENERATION_CONFIG_FILE,
    MANIFEST,
    MANIFEST_EXPORT_ID,
    OPTIMUM_FILES,
    PAIR_KEYS,
    SPIECE_FILE,
    TOKENIZER_FILES,
    sha256_file,
)
from models import MODELS_DIR, known_names, lookup

# stages by module: each is looked up when it runs, so a test may replace one
from . import fp16, masked, quantize, stream, validate
from . import memory as mem
from .errors import (
    CheckpointError,
    ExportError,
    OptionError,
    OutputConflictError,
    PairMismatchError,
)
from .graphs import check_opset, mark_export_id
from .output import (
    absolute,
    as_export_error,
    check_target,
    discard,
    make_dirs,
    make_tmp,
    signals_raise,
    stage,
    swap_in,
)

# Optimum's layout (what optimum=True adds to ours: its decoders, for other tools; the engine
# runs every request on the masked decoder).
ONNX_FILES = [ENCODER_FILE, *OPTIMUM_FILES]
MASKED_FILES = [DECODER_FILE, CROSS_FILE]
DTYPES = ("fp32", "fp16", "int8", "int4")
# An assistant's numbers never reach the output (the main checks every token): int8 by default.
ASSISTANT_DTYPE = "int8"


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
        if not (path / CONFIG_FILE).is_file():
            raise CheckpointError(f"{path} has no {CONFIG_FILE}: not a Hugging Face model folder")
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
        return json.loads((src / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {src / CONFIG_FILE}: {exc}") from exc


def check_pair(main_cfg: dict, asst_cfg: dict) -> None:
    """Refuse a pair whose vocabulary or special ids differ, naming each difference."""
    diffs = [
        f"{k}: main {main_cfg.get(k)} vs assistant {asst_cfg.get(k)}"
        for k in PAIR_KEYS
        if main_cfg.get(k) != asst_cfg.get(k)
    ]
    if diffs:
        raise PairMismatchError("main and assistant are not a pair: " + "; ".join(diffs))


def load_torch_model(src: Path, streamed: bool = False):
    """Load T5 in float32 (bf16/fp16 checkpoints are upcast), with a clear error when broken. A
    safetensors checkpoint is read tensor by tensor (export.stream.load_model), so its file and
    the float32 model are never in memory together; streamed, its weights stay in the file and
    each module reads its own as it runs (export.stream.reference_model: for the references of a
    streamed export, which never holds the model)."""
    import torch
    from transformers import T5ForConditionalGeneration

    try:
        ckpt = stream.Checkpoint.find(src)
        if ckpt is not None:
            load = stream.reference_model if streamed else stream.load_model
            return load(src, ckpt).eval()
        model = T5ForConditionalGeneration.from_pretrained(
            src, dtype=torch.float32, low_cpu_mem_usage=True
        )
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"cannot load the checkpoint in {src}: {exc}") from exc
    return model.eval()


def _sample_ids(src: Path, cfg: dict) -> list[int]:
    """Real text through the checkpoint's own tokenizer (random ids if it has none)."""
    spm = src / SPIECE_FILE
    if spm.is_file():
        import sentencepiece as spmlib

        ids = spmlib.SentencePieceProcessor(model_file=str(spm)).encode(validate.SAMPLE_TEXT)
        ids = [i for i in ids if i < cfg["vocab_size"]]
        return ids[-255:] + [cfg["eos_token_id"]]
    import numpy as np

    return [int(i) for i in np.random.default_rng(0).integers(3, cfg["vocab_size"], 24)] + [1]


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

    cfg = read_config(src)
    steps = tqdm(total=4 if dtype == "fp32" else 5, desc=src.name, disable=quiet, unit="step")
    stage(steps, "load")
    model = load_torch_model(src, streamed=not optimum)
    # PyTorch reference outputs first, so the torch weights can go before ONNX Runtime loads
    # the exported files (t5-3b: 11 GB of torch weights + a 6 GB decoder would not fit 24 GB).
    ref = validate.torch_reference(model, _sample_ids(src, cfg), decoders=optimum)
    masked_ref = masked.masked_reference(model)
    steps.update()
    stage(steps, "export")
    held = [model]  # _write_graphs frees the model: no reference may stay here
    del model
    files = _write_graphs(held, src, tmp, opset, device, optimum)
    steps.update()
    if dtype == "fp16":
        stage(steps, "fp16")
        for f in files:
            fp16.convert_file(tmp / f)
        steps.update()
    stage(steps, "validate")
    validate.check_onnx(tmp, files)
    validation = validate.validate_folder(ref, tmp, "fp32" if quant else dtype, decoders=optimum)
    _add_masked(validation, masked.check_masked_decoder(masked_ref, tmp, validation["rtol"]))
    steps.update()
    if quant:
        # The fp32 graphs were validated strictly above; the quantized differences are recorded
        # (non-finite outputs still fail).
        stage(steps, dtype)
        for f in files:
            quantize.quantize_file(tmp / f, quant)
        validation[dtype] = validate.validate_folder(
            ref, tmp, dtype, strict=False, decoders=optimum
        )
        _add_masked(validation[dtype], masked.check_masked_decoder(masked_ref, tmp, None))
        steps.update()
    masked.check_in_place(tmp / DECODER_FILE)  # the graph as written, after any rewrite
    stage(steps, "manifest")
    manifest = _write_manifest(src, tmp, cfg, dtype, opset, files, validation, quant)
    steps.update()
    steps.close()
    return manifest


def _write_graphs(
    held: list, src, tmp: Path, opset: int | None, device: str, optimum: bool
) -> list:
    """The ONNX graphs of the model in held into tmp, the model freed on the way: the encoder,
    the masked decoder and the cross key/value graph; optimum's two decoder files (and its
    encoder) when optimum. A safetensors checkpoint's graphs are traced from a hollow model and
    its weights streamed in (export.stream), so the model and its graphs are never in memory
    together. Returns the file names."""
    model = held.pop()
    ckpt = None if optimum else stream.Checkpoint.find(src)
    if ckpt is None:
        files = _traced_graphs(model, tmp, opset, device, optimum)
        del model
        gc.collect()
        return files
    _save_configs(model, tmp)
    cfg = model.config
    del model
    gc.collect()
    hollow, by_class = stream.hollow_model(cfg, ckpt)
    weights = stream.Weights(ckpt, by_class)
    masked.export_encoder(hollow, tmp, opset, weights)
    masked.export_masked_decoder(hollow, tmp, opset, weights)
    return [ENCODER_FILE] + MASKED_FILES


def _traced_graphs(model, tmp: Path, opset: int | None, device: str, optimum: bool) -> list[str]:
    """_write_graphs from the loaded model itself (its weights copied into each graph)."""
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
        masked.export_encoder(model, tmp, opset)
        _save_configs(model, tmp)
    masked.export_masked_decoder(model, tmp, opset)
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
    for name in (*TOKENIZER_FILES, GENERATION_CONFIG_FILE):
        if (src / name).is_file():
            shutil.copy2(src / name, tmp / name)
    if not (tmp / SPIECE_FILE).is_file():
        raise CheckpointError(
            f"{src} has no {SPIECE_FILE}: the engine tokenises with sentencepiece"
        )
    files = sorted(p.name for p in tmp.iterdir() if p.is_file() and p.name != MANIFEST)
    roles = dict(zip(["encoder", "decoder", "decoder_with_past"], ONNX_FILES))
    roles |= {"decoder_masked": MASKED_FILES[0], "cross_kv": MASKED_FILES[1]}
    manifest = {
        "format_version": FORMAT_VERSION,
        MANIFEST_EXPORT_ID: export_id,
        "source": str(src),
        "dtype": dtype,
        "quantization": quant,
        "opset": opset,
        "files": {
            f: {"sha256": sha256_file(tmp / f), "bytes": (tmp / f).stat().st_size} for f in files
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
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def _add_masked(validation: dict, cases: dict) -> None:
    """Record the masked graphs' max abs differences beside the other files' (per case too)."""
    cross = MASKED_FILES[1]
    validation["max_abs_diff"][cross] = cases["cross_kv"]
    validation["max_abs_diff"][MASKED_FILES[0]] = max(
        d for case, d in cases.items() if case != "cross_kv"
    )
    validation["masked_cases"] = cases


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
    return quantize.check_overrides(dtype, quantization)


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
    memory_check: bool = True,
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
    stairs exports. memory_check: refuse (MemoryNeedError) before any model loads when the
    machine has clearly less memory available than the export needs (export.memory).
    Every failure is an ExportError (Ctrl-C a KeyboardInterrupt, SIGTERM a Terminated) and leaves
    the previous output folders exactly as they were.
    """
    overrides = check_options(dtype, assistant_dtype, opset, quantization)
    with signals_raise():
        try:
            args = (model, output, assistant, dtype, opset, device, force, quiet, assistant_dtype)
            return _export(*args, optimum=optimum, overrides=overrides, memory_check=memory_check)
        except ExportError:
            raise
        except Exception as exc:
            raise as_export_error(exc, Path(output) if output else None) from exc


def _plan(model, output, assistant, force) -> tuple[Path, list[tuple[Path, Path]]]:
    """Resolve the sources and their output folders, refusing before any work: unsafe or
    existing outputs and mismatched pairs. Returns (main output, [(source, target)], main first)."""
    src, name = resolve_source(model)
    out = absolute(Path(output) if output else MODELS_DIR / name)
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
        created += make_dirs(target.parent)
        tmps.append(make_tmp(target))
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
                quant=quantize.settings(d, i == 1, overrides),  # a main's or an assistant's
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
        (tmp / MANIFEST).write_text(json.dumps(manifests[str(target)], indent=2))


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
    memory_check=True,
):
    """export_model's body: its arguments, already checked. Refusals, exports into temporary
    folders, pairing and the swap, with one cleanup for all of them."""
    t0 = time.perf_counter()
    out, targets = _plan(model, output, assistant, force)
    if memory_check:
        mem.check([(s, not optimum and stream.Checkpoint.present(s)) for s, _ in targets])
    tmps: list[Path] = []
    created: list[Path] = []
    try:
        manifests = _export_targets(
            targets, tmps, created, dtype, opset, device, quiet, assistant_dtype, optimum, overrides
        )
        if len(targets) == 2:
            _link_pair(targets, tmps, manifests)
        stage(None, "swap")
        swap_in(
            [(tmp, target) for tmp, (_, target) in zip(tmps, targets)],
            [s for s, _ in targets],
            force,
        )
    except BaseException:  # Ctrl-C and SIGTERM included: never leave a half-written folder
        discard(tmps, created)
        raise
    return ExportResult(
        main=out,
        assistant=targets[1][1] if len(targets) == 2 else None,
        seconds=time.perf_counter() - t0,
        manifests=manifests,
    )
