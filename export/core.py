"""`export_model`: a Hugging Face T5 checkpoint -> a validated ONNX folder in optimum's layout.

Fixed order (as CTranslate2's converters): refuse existing output -> export -> validate against
torch -> write manifest -> atomic rename. Nothing half-written is ever left at the target.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from models import MODELS_DIR, known_names, lookup

from .errors import CheckpointError, ExportError, OutputExistsError, PairMismatchError

FORMAT_VERSION = 1
ONNX_FILES = ["encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx"]
TOKENIZER_FILES = [
    "spiece.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
]
PAIR_KEYS = ["vocab_size", "pad_token_id", "eos_token_id", "decoder_start_token_id"]


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
    src: Path, tmp: Path, dtype: str, opset: int | None, device: str, quiet: bool
) -> dict:
    """Export + validate one model into tmp; returns its manifest."""
    from optimum.exporters.onnx import onnx_export_from_model
    from tqdm.auto import tqdm

    from .validate import check_onnx, torch_reference, validate_folder

    cfg = read_config(src)
    steps = tqdm(total=4 if dtype == "fp32" else 5, desc=src.name, disable=quiet, unit="step")
    steps.set_postfix_str("load")
    model = load_torch_model(src)
    # PyTorch reference outputs first, so the torch weights can go before ONNX Runtime loads
    # the exported files (t5-3b: 11 GB of torch weights + a 6 GB decoder would not fit 24 GB).
    ref = torch_reference(model, _sample_ids(src, cfg))
    steps.update()
    steps.set_postfix_str("export")
    onnx_export_from_model(
        model,
        tmp,
        task="text2text-generation-with-past",
        opset=opset,
        do_validation=False,
        no_post_process=True,
        device=device,
    )
    del model
    gc.collect()
    for extra in tmp.glob("decoder_model_merged*"):
        extra.unlink()
    steps.update()
    if dtype == "fp16":
        from .fp16 import convert_file

        steps.set_postfix_str("fp16")
        for f in ONNX_FILES:
            convert_file(tmp / f)
        steps.update()
    steps.set_postfix_str("validate")
    check_onnx(tmp, ONNX_FILES)
    validation = validate_folder(ref, tmp, "fp32" if dtype == "int8" else dtype)
    steps.update()
    if dtype == "int8":
        # For assistants: their numbers never reach the output (the main model verifies every
        # token), so int8 weights only change the acceptance rate. The fp32 graph was validated
        # strictly above; the int8 differences are recorded for information.
        from onnxruntime.quantization import QuantType, quantize_dynamic

        steps.set_postfix_str("int8")
        for f in ONNX_FILES:
            quantize_dynamic(
                tmp / f, tmp / f, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"]
            )
        validation["int8"] = validate_folder(ref, tmp, "int8", strict=False)
        steps.update()
    steps.set_postfix_str("manifest")
    for name in TOKENIZER_FILES + ["generation_config.json"]:
        if (src / name).is_file():
            shutil.copy2(src / name, tmp / name)
    if not (tmp / "spiece.model").is_file():
        raise CheckpointError(f"{src} has no spiece.model: the engine tokenises with sentencepiece")
    files = sorted(p.name for p in tmp.iterdir() if p.is_file() and p.name != "stairs.json")
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": str(src),
        "dtype": dtype,
        "opset": opset,
        "files": {
            f: {"sha256": _sha256(tmp / f), "bytes": (tmp / f).stat().st_size} for f in files
        },
        "onnx": {
            "encoder": ONNX_FILES[0],
            "decoder": ONNX_FILES[1],
            "decoder_with_past": ONNX_FILES[2],
        },
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
    steps.update()
    steps.close()
    return manifest


def _place(tmp: Path, out: Path, force: bool) -> None:
    """Move a complete tmp folder onto out; an old folder is removed only after the move works."""
    old = None
    if out.exists():
        if not force:
            raise OutputExistsError(f"{out} exists; use --force to replace it")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
) -> ExportResult:
    """Export MODEL (hub name or local folder) and, if any, its assistant to validated ONNX folders.

    assistant: "auto" takes the registered assistant of a known model, None exports none,
    anything else is a hub name or folder. Output defaults to models/<name>/ (assistant beside it).
    dtype: fp32, fp16 (overflow-prone parts kept fp32) or int8 (dynamic weight quantization; meant
    for assistants). assistant_dtype: the assistant's dtype (default: dtype).
    """
    for d in (dtype, assistant_dtype):
        if d not in ("fp32", "fp16", "int8", None):
            raise ExportError(f"dtype must be fp32, fp16 or int8, not {d!r}")
    t0 = time.perf_counter()
    src, name = resolve_source(model)
    out = Path(output) if output else MODELS_DIR / name
    if assistant == "auto":
        entry = lookup(model)
        assistant = entry["assistant"] if entry else None
    # Refuse before any work: existing outputs and mismatched pairs.
    targets = [(src, out)]
    if assistant:
        a_src, a_name = resolve_source(assistant)
        check_pair(read_config(src), read_config(a_src))
        targets.append(
            (a_src, out.parent / a_name if a_src != src else out.parent / (a_name + "-assistant"))
        )
    for _, target in targets:
        if target.exists() and not force:
            raise OutputExistsError(f"{target} exists; use --force to replace it")

    manifests = {}
    for i, (s, target) in enumerate(targets):
        d = dtype if i == 0 else (assistant_dtype or dtype)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            _log(quiet, f"exporting {s} -> {target} ({d})")
            manifests[str(target)] = _export_one(s, tmp, d, opset, device, quiet)
            if len(targets) == 2:
                other = targets[1][1] if target == targets[0][1] else targets[0][1]
                role = "assistant" if target == targets[0][1] else "main"
                manifests[str(target)][role] = os.path.relpath(other, target)
                (tmp / "stairs.json").write_text(json.dumps(manifests[str(target)], indent=2))
            _place(tmp, target, force)
        except BaseException:  # Ctrl-C included: never leave a half-written folder
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return ExportResult(
        main=out,
        assistant=targets[1][1] if assistant else None,
        seconds=time.perf_counter() - t0,
        manifests=manifests,
    )
