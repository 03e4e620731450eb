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
import os
from pathlib import Path

from engine.layout import LOGITS

from .errors import ConversionError, OptionError
from .graphs import EXTERNAL_BYTES, append_external, follow_umask, save_graph

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


def weight_only(
    path: Path,
    bits: int = 8,
    block_size: int = 32,
    symmetric: bool = True,
    accuracy_level: int = 4,
    keep: list[str] | tuple = (),
) -> int:
    """Replace every MatMul of path with a constant weight by MatMulNBits (in place), except the
    parts named in keep (KEEPABLE). Returns the number of MatMulNBits nodes.

    ONNX Runtime's quantizer packs each weight; its MatMulNBitsQuantizer.process (which holds
    every float32 weight beside its packed copy: a big decoder twice) is not used. Instead the
    graph is read without its external data and each weight is loaded just before its node is
    packed and written out after, so a graph is never in memory whole. The result is
    process()'s, node for node and tensor for tensor."""
    import onnx

    mnq = _quiet_quantizer()
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    if model.functions or any(
        a.type in (a.GRAPH, a.GRAPHS) for n in graph.node for a in n.attribute
    ):
        raise ConversionError(
            f"{path.name}: a graph with subgraphs or functions is not quantized here"
        )
    config = mnq.DefaultWeightOnlyQuantConfig(
        block_size=block_size,
        is_symmetric=symmetric,
        accuracy_level=accuracy_level,
        op_types_to_quantize=("MatMul",),
        bits=bits,
    )
    spill = _Spill(path, model)
    try:
        nodes = _quantize_nodes(graph, mnq.DefaultWeightOnlyQuantizer(config), keep, spill)
        del graph.node[:]
        graph.node.extend(nodes)
        onnx_model = mnq.ONNXModel(model)
        onnx_model.set_opset_import("com.microsoft", 1)
        onnx_model.clean_initializers()
        spill.finish(model)
    except BaseException:
        spill.abort()
        raise
    return sum(n.op_type == "MatMulNBits" for n in graph.node)


def _quantize_nodes(graph, quantizer, keep, spill: _Spill) -> list:
    """The graph's nodes with each MatMul on a constant weight (not kept) packed by quantizer.
    Each weight is loaded into a scratch graph of its own and its packed tensors written out
    from there, so no weight's bytes ever enter the model's protobuf (whose arena would keep
    them until the end); the model gets their external-data entries only. The float weights
    no node reads any more go in process()'s own clean-up (ONNXModel.clean_initializers)."""
    import onnx

    inits = {t.name: t for t in graph.initializer}
    exclude = set(_kept_nodes(graph, keep))
    made = set(inits)
    nodes = []
    for node in list(graph.node):
        b = inits.get(node.input[1]) if len(node.input) > 1 else None
        dims = list(b.dims) if b is not None else []
        if node.op_type != "MatMul" or node.name in exclude or not _packable(dims):
            nodes.append(node)  # as process() leaves it
            continue
        if len(dims) > 2:  # process() reshapes by the graph's shapes; T5's weights are 2-D
            raise ConversionError(f"{node.name}: a {len(dims)}-D weight is not quantized here")
        scratch = onnx.GraphProto()
        spill.load(scratch.initializer.add(), b)
        out = quantizer.quantize(node, [scratch])
        nodes.extend(out)
        if out == [node]:  # skipped: nothing was packed
            continue
        for t in scratch.initializer[1:]:
            if t.name not in made:  # a weight two MatMuls share: packed once (as process keeps)
                made.add(t.name)
                spill.write(t)
                graph.initializer.add().CopyFrom(t)
        for item in [i for i in graph.input if i.name == b.name]:
            graph.input.remove(item)  # as the quantizer does in the graph holding the weight
    return nodes


def _packable(dims: list[int]) -> bool:
    """Does the quantizer pack a constant MatMul weight of these dims (2-D, or N-D whose leading
    dimensions are all 1; it skips the others)?"""
    return len(dims) >= 2 and all(d == 1 for d in dims[:-2])


class _Spill:
    """Where a graph's weights are read from and written to while it is quantized: the old
    data file (renamed aside, its tensors, initializers and node attributes alike, pointed at
    the new name) and a new `name`_data file; `finish` moves what is left across and writes the
    graph (inline when its weights are EXTERNAL_BYTES or less); `abort` puts the old file back."""

    def __init__(self, path: Path, model):
        from onnx import external_data_helper as ext

        self.path, self.dir = path, path.parent
        self.data = path.name + "_data"
        self.old = self.data + ".float"
        tensors = [*model.graph.initializer, *_attribute_tensors(model.graph)]
        external = [t for t in tensors if ext.uses_external_data(t)]
        self.spills = bool(external)  # an inline graph is small: it stays in memory, as before
        self.committed = False  # the new graph is in place (finish): abort keeps it
        if not external:
            return
        if {os.path.normpath(_location(t)) for t in external} != {self.data}:
            raise ConversionError(f"{path.name}: weights outside {self.data}")
        size = (self.dir / self.data).stat().st_size
        os.replace(self.dir / self.data, self.dir / self.old)
        for t in external:
            info = ext.ExternalDataInfo(t)
            offset = info.offset or 0
            _point(t, self.old, offset, size - offset if info.length is None else info.length)
        try:
            (self.dir / self.data).write_bytes(b"")
        except BaseException:
            self.abort()
            raise

    def load(self, into, tensor) -> None:
        """into: a copy of tensor with its bytes inline."""
        from onnx import external_data_helper as ext

        into.CopyFrom(tensor)
        if ext.uses_external_data(into):
            ext.load_external_data_for_tensor(into, str(self.dir))
            into.data_location = into.DEFAULT  # as onnx's load_external_data_for_model
            del into.external_data[:]

    def write(self, tensor) -> None:
        """Move tensor's bytes to the end of the new data file (an inline graph's stay)."""
        if self.spills:
            append_external(tensor, self.data, self.dir)

    def move(self, tensor) -> None:
        """Copy an old-file tensor's bytes to the end of the new file, a block at a time."""
        from onnx import external_data_helper as ext

        info = ext.ExternalDataInfo(tensor)
        with open(self.dir / self.old, "rb") as src, open(self.dir / self.data, "ab") as dst:
            offset = dst.tell()
            src.seek(info.offset)
            left = info.length
            while left:
                block = src.read(min(left, 64 << 20))
                if not block:
                    raise ConversionError(f"{self.path.name}: {tensor.name} runs past its file")
                dst.write(block)
                left -= len(block)
        _point(tensor, self.data, offset, info.length)

    def finish(self, model) -> None:
        """Move the old file's remaining tensors into the new one, write the graph (its
        weights inline when they are EXTERNAL_BYTES or less), then drop the old file."""
        import onnx
        from onnx import external_data_helper as ext

        for t in [*model.graph.initializer, *_attribute_tensors(model.graph)]:
            if _location(t) == self.old:
                self.move(t)
        small = sum(_bytes(t) for t in model.graph.initializer) <= EXTERNAL_BYTES
        if not self.spills:  # nothing on disk was touched: written as before
            save_graph(model, self.path, not small)
            return
        if small:
            ext.load_external_data_for_model(model, str(self.dir))
        staged = self.dir / (self.path.name + ".new")
        onnx.save_model(model, str(staged))  # then one rename: the old graph stays whole till then
        os.replace(staged, self.path)
        self.committed = True
        follow_umask(self.path)
        if small:
            (self.dir / self.data).unlink()  # every tensor is inline now
        else:
            follow_umask(self.dir / self.data)
        (self.dir / self.old).unlink(missing_ok=True)

    def abort(self) -> None:
        """Before the new graph is in place: put the old data file back under its name (the
        graph on disk still reads it) and drop what was staged."""
        (self.dir / (self.path.name + ".new")).unlink(missing_ok=True)
        if not self.committed and (self.dir / self.old).is_file():
            os.replace(self.dir / self.old, self.dir / self.data)


def _attribute_tensors(graph) -> list:
    """The tensors held in node attributes (Constant values; optimum writes big ones to the
    data file too)."""
    out = []
    for node in graph.node:
        for a in node.attribute:
            out += [a.t] if a.type == a.TENSOR else list(a.tensors)
    return out


def _location(tensor) -> str | None:
    from onnx import external_data_helper as ext

    return ext.ExternalDataInfo(tensor).location if ext.uses_external_data(tensor) else None


def _bytes(tensor) -> int:
    """A tensor's data bytes, inline or external (what the inline-or-external choice counts)."""
    from onnx import external_data_helper as ext

    if ext.uses_external_data(tensor):
        return int(ext.ExternalDataInfo(tensor).length)
    return len(tensor.raw_data) or tensor.ByteSize()


def _point(tensor, location: str, offset: int, length: int) -> None:
    """Set tensor's external-data entries (as onnx's set_external_data, without its bytes)."""
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)
    tensor.data_location = tensor.EXTERNAL


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
