"""Validate exported ONNX files against the PyTorch model on real inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.layout import (
    ATTENTION_MASK,
    ENCODER_ATTENTION_MASK,
    ENCODER_FILE,
    ENCODER_HIDDEN_STATES,
    INPUT_IDS,
    LAST_HIDDEN_STATE,
    LOGITS,
    OPTIMUM_DECODER_FILE,
    OPTIMUM_PAST_FILE,
)

from .errors import ValidationError

SAMPLE_TEXT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    a, b = 0, 1\n'


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # Prepacked weight copies would double a t5-3b decoder in RAM during validation.
    opts.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _check(file: str, name: str, got: np.ndarray, ref: np.ndarray, rtol: float, report: dict):
    """Record the max abs difference; raise when it exceeds rtol times the reference's scale."""
    diff = float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64))))
    tol = rtol * max(1.0, float(np.max(np.abs(ref))))
    report.setdefault(file, {})[name] = diff
    if not np.isfinite(diff) or (rtol > 0 and diff > tol):
        raise ValidationError(file, name, diff, tol)


def _legacy(cache):
    """Per layer (self k, self v, cross k, cross v) from any transformers cache object."""
    if hasattr(cache, "to_legacy_cache"):
        return cache.to_legacy_cache()
    return cache


def torch_reference(model, input_ids: list[int], decoders: bool = True) -> dict:
    """PyTorch outputs the ONNX files must reproduce: encoder states and, with decoders (for
    optimum's decoder files), a 3-token first decoder step and the 6-token full sequence (logits
    and key/values), as numpy. Without them the decoder's many key/values are neither computed
    nor held (the masked graphs have their own reference: export.masked.masked_reference)."""
    import torch

    cfg = model.config
    ids = torch.tensor([input_ids])
    mask = torch.ones_like(ids)
    rng = np.random.default_rng(0)
    # A real-looking decoder prefix: start token, then tokens the model itself would not all pick.
    dec = [cfg.decoder_start_token_id] + [int(t) for t in rng.integers(3, cfg.vocab_size, 5)]
    with torch.no_grad():
        enc = model.encoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    ref = {
        "ids": ids.numpy().astype(np.int64),
        "mask": mask.numpy().astype(np.int64),
        "dec": dec,
        "enc": enc.numpy(),
    }
    if not decoders:
        return ref

    def run(seq):
        feed = {"attention_mask": mask, "decoder_input_ids": torch.tensor([seq])}
        return model(encoder_outputs=(enc,), use_cache=True, **feed)

    with torch.no_grad():
        full, first = run(dec), run(dec[:3])
    as_np = lambda kv: [[t.numpy() for t in layer] for layer in _legacy(kv)]
    return ref | {
        "first_logits": first.logits.numpy(),
        "first_kv": as_np(first.past_key_values),
        "full_logits": full.logits.numpy(),
        "full_kv": as_np(full.past_key_values),
    }


def validate_folder(
    ref: dict, folder: Path, dtype: str = "fp32", strict: bool = True, decoders: bool = True
) -> dict:
    """Compare the encoder and, with decoders (optimum's files written), decoder and
    decoder-with-past (3 new tokens at once) with the PyTorch reference. Returns the max abs
    difference per file; raises ValidationError (strict=False only records the differences;
    NaN/inf still raise). The masked graphs are checked by export.masked.check_masked_decoder."""
    rtol = {"fp32": 1e-3, "fp16": 5e-2}.get(dtype, 0.0) if strict else 0.0
    report: dict = {}
    mask_np = ref["mask"]

    sess = _session(folder / ENCODER_FILE)
    enc_ort = sess.run(None, {INPUT_IDS: ref["ids"], ATTENTION_MASK: mask_np})[0]
    _check(ENCODER_FILE, LAST_HIDDEN_STATE, enc_ort, ref["enc"], rtol, report)
    del sess
    if decoders:
        _check_decoders(ref, folder, enc_ort, rtol, report)
    return {
        "max_abs_diff": {f: max(d.values()) for f, d in report.items()},
        "rtol": rtol,
        "decoder_tokens": len(ref["dec"]),
        "input_tokens": int(ref["ids"].shape[1]),
    }


def _check_decoders(ref: dict, folder: Path, enc_ort, rtol: float, report: dict) -> None:
    """validate_folder's part for optimum's decoder_model and decoder_with_past_model (their
    key/values named present.{layer}.{decoder|encoder}.{key|value}, optimum's own names)."""
    dec, mask_np = ref["dec"], ref["mask"]
    # decoder_model: the first 3 decoder tokens, no past; outputs logits and all key/values.
    sess = _session(folder / OPTIMUM_DECODER_FILE)
    names = [o.name for o in sess.get_outputs()]
    outs = sess.run(
        None,
        {
            INPUT_IDS: np.array([dec[:3]], np.int64),
            ENCODER_HIDDEN_STATES: enc_ort,
            ENCODER_ATTENTION_MASK: mask_np,
        },
    )
    _check(OPTIMUM_DECODER_FILE, LOGITS, outs[0], ref["first_logits"], rtol, report)
    past = {}
    for name, arr in zip(names[1:], outs[1:]):
        _check(OPTIMUM_DECODER_FILE, name, arr, _kv_ref(ref["first_kv"], name), rtol, report)
        past[name.replace("present", "past_key_values")] = arr
    del sess

    # decoder_with_past_model: 3 new tokens at once on top of the 3-token past (what verify feeds).
    sess = _session(folder / OPTIMUM_PAST_FILE)
    feed = {INPUT_IDS: np.array([dec[3:]], np.int64), ENCODER_ATTENTION_MASK: mask_np}
    in_names = {i.name for i in sess.get_inputs()}
    feed.update({k: v for k, v in past.items() if k in in_names})
    if ENCODER_HIDDEN_STATES in in_names:
        feed[ENCODER_HIDDEN_STATES] = enc_ort
    outs = sess.run(None, feed)
    names = [o.name for o in sess.get_outputs()]
    _check(OPTIMUM_PAST_FILE, LOGITS, outs[0], ref["full_logits"][:, 3:], rtol, report)
    for name, arr in zip(names[1:], outs[1:]):
        _check(OPTIMUM_PAST_FILE, name, arr, _kv_ref(ref["full_kv"], name), rtol, report)
    del sess


def _kv_ref(kv: list, name: str) -> np.ndarray:
    """The reference of optimum's key/value output `name` in kv (per layer: self k, self v,
    cross k, cross v)."""
    layer, kind, which = name.split(".")[1:4]
    return kv[int(layer)][(0 if kind == "decoder" else 2) + (which == "value")]


def check_onnx(folder: Path, files: list[str]) -> None:
    """Run the ONNX checker on each file by path (works above 2 GB with external data)."""
    import onnx

    for f in files:
        onnx.checker.check_model(str(folder / f))
