"""int8/int4 weight-only quantization of exported graphs (docs/quantization.md: what was measured).

Every MatMul with a constant weight becomes ONNX Runtime's `MatMulNBits` (blockwise weight scales
along K). No scale spans rows: with accuracy_level 4 the activations are quantized per row and
per block of K, so a row's logits do not depend on what else shares the call (the engine's
exactness rule). onnxruntime's `quantize_dynamic` (DynamicQuantizeLinear + MatMulInteger) scales
activations per tensor, so a main may not use it; for an assistant (whose numbers never reach the
output) weight-only measured faster too, with the same acceptance, so it is not used at all.
"""

from __future__ import annotations

import logging
from pathlib import Path

from engine.layout import LOGITS

from .errors import OptionError
from .graphs import EXTERNAL_BYTES, save_graph

# A main's settings: the fastest 1- and 5-token masked decoder calls among those whose greedy
# continuations are >= 80% the fp32 main's on 32, 64 and 128 prompts (int8: the feed-forward
# output projection stays fp32; int4 cannot reach 80% on the pycode main: its most faithful fast
# setting).
WEIGHT_ONLY = {
    "int8": {"bits": 8, "block_size": 16, "symmetric": False, "accuracy_level": 4, "keep": ["wo"]},
    "int4": {"bits": 4, "block_size": 32, "symmetric": False, "accuracy_level": 4, "keep": []},
}
# An assistant's: the fastest 1-token draft call (acceptance measured the same as the others').
ASSISTANT = {
    "int8": {"bits": 8, "block_size": 128, "symmetric": True, "accuracy_level": 4, "keep": []},
    "int4": {"bits": 4, "block_size": 128, "symmetric": True, "accuracy_level": 4, "keep": []},
}
# Parts that may be kept fp32 by name: the feed-forward output projection and the LM head.
KEEPABLE = ("wo", "lm_head")
# MatMulNBits takes power-of-two blocks of at least 16 along K.
BLOCK_SIZES = (16, 32, 64, 128, 256)


def check_overrides(dtype: str, overrides: dict | None) -> dict:
    """A main's changes to its WEIGHT_ONLY settings (block_size, keep), checked before any model
    loads: a big main trades fidelity for memory with them (docs/quantization.md)."""
    if overrides is not None and not isinstance(overrides, dict):
        raise OptionError(f"quantization must be a dict (block_size, keep), not {overrides!r}")
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(overrides) - {"block_size", "keep"})
    if unknown:
        raise OptionError(f"unknown quantization setting(s) {unknown}: block_size, keep")
    if overrides and dtype not in WEIGHT_ONLY:
        raise OptionError(
            f"--block-size and --keep-fp32 set a quantized main's weights: they need --dtype "
            f"int8 or int4, not {dtype}"
        )
    out = {}
    bs = overrides.get("block_size")
    if bs is not None:
        if isinstance(bs, bool) or bs not in BLOCK_SIZES:
            raise OptionError(
                f"--block-size must be one of {', '.join(map(str, BLOCK_SIZES))}, not {bs!r}"
            )
        out["block_size"] = int(bs)
    if "keep" in overrides:
        out["keep"] = _keep_list(overrides["keep"])
    return out


def _keep_list(keep) -> list[str]:
    """keep as a sorted list of KEEPABLE names: a list/tuple ([] keeps nothing), or the
    command line's comma string ("none" alone keeps nothing; an empty string is refused)."""
    what = f"--keep-fp32 takes a comma list of {', '.join(KEEPABLE)}, or none alone, not {keep!r}"
    if isinstance(keep, str):
        names = [k.strip() for k in keep.split(",")]
        if names == ["none"]:
            return []
        if "" in names or "none" in names:
            raise OptionError(what)
    elif isinstance(keep, (list, tuple)):
        names = list(keep)
    else:
        raise OptionError(what)
    if not all(isinstance(k, str) and k in KEEPABLE for k in names):
        raise OptionError(what)
    return sorted(set(names))


def _kept_nodes(graph, keep) -> list[str]:
    """Names of the MatMuls of `keep` ("wo": DenseReluDense/wo; "lm_head": the MatMul writing
    the logits, tied heads included)."""
    names = []
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        wo = "wo" in keep and "DenseReluDense/wo" in node.name
        head = "lm_head" in keep and ("lm_head" in node.name or LOGITS in node.output)
        if wo or head:
            names.append(node.name)
    return names


def _quiet_quantizer():
    """Import the quantizer without its module-level logging.basicConfig(INFO) changing the
    root logger, and with its per-node INFO lines silenced."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    logging.getLogger(mnq.__name__).setLevel(logging.WARNING)
    return mnq


def _save(model, path: Path) -> None:
    """Write model to path, with one external data file beside it above EXTERNAL_BYTES."""
    size = sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer)
    save_graph(model, path, size > EXTERNAL_BYTES)


def weight_only(
    path: Path,
    bits: int = 8,
    block_size: int = 32,
    symmetric: bool = True,
    accuracy_level: int = 4,
    keep: list[str] | tuple = (),
) -> int:
    """Replace every MatMul of path with a constant weight by MatMulNBits (in place), except the
    parts named in keep (KEEPABLE). Returns the number of MatMulNBits nodes."""
    import onnx

    mnq = _quiet_quantizer()
    model = onnx.load(str(path), load_external_data=True)
    exclude = _kept_nodes(model.graph, keep)
    q = mnq.MatMulNBitsQuantizer(
        model,
        bits=bits,
        block_size=block_size,
        is_symmetric=symmetric,
        accuracy_level=accuracy_level,
        nodes_to_exclude=exclude,
        op_types_to_quantize=("MatMul",),
    )
    q.process()
    out = q.model.model
    _save(out, path)
    return sum(n.op_type == "MatMulNBits" for n in out.graph.node)


def settings(dtype: str, assistant: bool, overrides: dict | None = None) -> dict | None:
    """The quantization a folder of dtype gets (None for fp32/fp16), a main's with its checked
    overrides: the manifest records it."""
    if dtype not in WEIGHT_ONLY:
        return None
    table, changed = (ASSISTANT, {}) if assistant else (WEIGHT_ONLY, overrides or {})
    return {"method": "weight_only", "op": "MatMulNBits", **table[dtype], **changed}


def quantize_file(path: Path, how: dict) -> int:
    """Quantize one graph in place as `settings` says; returns the number of MatMulNBits."""
    args = {k: how[k] for k in ("bits", "block_size", "symmetric", "accuracy_level", "keep")}
    return weight_only(path, **args)
