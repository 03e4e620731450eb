"""What an export needs in memory, checked before any model loads, and what it used.

Measured peaks (/usr/bin/time -v, 2026-12-07, docs/benchmarks.md): a safetensors checkpoint,
streamed (export.stream: references read module by module, graphs traced hollow, weights
written and quantized one at a time), peaks while ONNX Runtime validates the fp32 masked
decoder (`graph_bytes`: about half the weights) plus ~0.5 GiB of Python, torch and ONNX
Runtime (t5-large shape 0.70x, t5-3b shape 0.57x, fp32, int8 or int4); one traced with its
weights (a .bin checkpoint, --optimum) at 1.7-3.3x.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import resource
import sys
from pathlib import Path

from engine.options import available_memory

from .errors import CheckpointError, MemoryNeedError

GIB = 1 << 30
BASE_BYTES = GIB // 2  # Python, torch, ONNX Runtime and the references
TRACED = 1.7  # the lowest measured: a lower bound, so a refusal is never a close call
CLEARLY = 0.9  # refuse only when what is available is below this share of the need


def _meta_model(src: Path):
    """A T5 of src's config on the meta device: nothing is read but config.json."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    try:
        cfg = T5Config.from_pretrained(src)
    except Exception as exc:
        raise CheckpointError(f"cannot read {src}/config.json: {exc}") from exc
    with torch.device("meta"):
        return T5ForConditionalGeneration(cfg)


def float32_bytes(src: Path) -> int:
    """Bytes of src's parameters in float32 (tied ones once), counted on the meta device."""
    return _weight_bytes(_meta_model(src))


def _weight_bytes(model) -> int:
    return 4 * sum(p.numel() for p in model.parameters())  # tied ones once


def graph_bytes(model) -> int:
    """Float32 bytes of the largest graph a streamed export holds at once (ONNX Runtime's
    validation): the masked decoder (its stack less the cross keys/values, which are the cross
    graph's, an untied head, the embedding) or the encoder (its stack, the embedding)."""
    part = {"encoder": 0, "decoder": 0, "shared": 0}
    for name, p in model.named_parameters():  # tied ones once
        top = name.split(".")[0]
        if top == "decoder" and re.search(r"EncDecAttention\.[kv]\.", name):
            continue
        part["decoder" if top == "lm_head" else top] += 4 * p.numel()
    return max(part["encoder"], part["decoder"]) + part["shared"]


def need(src: Path, streamed: bool) -> tuple[int, int]:
    """(bytes an export of src is expected to peak at, its float32 weight bytes)."""
    model = _meta_model(src)
    weights = _weight_bytes(model)
    held = graph_bytes(model) if streamed else int(weights * TRACED)
    return held + BASE_BYTES, weights


def check(sources: list[tuple[Path, bool]]) -> None:
    """MemoryNeedError, one line naming the need, when the machine has clearly less memory
    available than the largest of these exports (source, streamed) needs; exports run one at a
    time, so the largest sets the need."""
    have = available_memory()
    if have is None:
        return
    (peak, weights), src = max((need(s, streamed), s) for s, streamed in sources)
    if have < CLEARLY * peak:
        raise MemoryNeedError(
            f"this export needs about {peak / GIB:.1f} GiB of memory ({src.name}:"
            f" {weights / GIB:.1f} GiB of float32 weights), and the machine has"
            f" {have / GIB:.1f} GiB available; free memory or pass --no-memory-check"
        )


def peak_bytes() -> int:
    """This process's peak resident memory so far (VmHWM) in bytes."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()


def release() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing):
    freed weights otherwise stay resident between stages and under the next one's peak."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
