"""fp16 conversion that keeps T5's overflow-prone parts in fp32.

T5 activations overflow fp16 (transformers issues 9295, 11461). Like onnxruntime's T5 mixed
precision helper, we keep layer norms (Pow/ReduceMean/Sqrt/Div), residual Adds, the feed-forward
output projection (wo) and the logits projection in fp32 and convert the rest.

Attention masks add a large negative number to masked scores (float32's min in the exported
graphs). The converter clips constants to float16's range, so the mask term becomes -65504, not
-inf, and the score Add and Softmax stay fp32: a fully masked row (a padding query of the masked
decoder) gives uniform weights, never NaN.
"""

from __future__ import annotations

from pathlib import Path

from engine.layout import LOGITS

from .graphs import save_graph

# Ops that stay fp32: RMS layer norm pieces, residual adds, softmax.
FP32_OPS = ["Pow", "ReduceMean", "Sqrt", "Div", "Add", "Softmax", "Reciprocal"]


def fp32_nodes(graph) -> list[str]:
    """Names of MatMuls that must stay fp32: the FF output projection and the LM head (by name,
    or as the MatMul writing the logits: the masked decoder's tied head has no lm_head module)."""
    keep = []
    for node in graph.node:
        if node.op_type == "MatMul" and (
            "DenseReluDense/wo" in node.name or "lm_head" in node.name or LOGITS in node.output
        ):
            keep.append(node.name)
    return keep


def convert_file(path: Path) -> None:
    """Convert one ONNX file to mixed fp16 in place (external data for files over 2 GB)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    # A file that already had external data (over 2 GB in fp32) keeps it: protobuf caps at 2 GB.
    large = any(path.parent.glob(path.name + "*data"))
    if large:
        # The converter needs value types to place its casts; in-memory inference caps at 2 GB,
        # so infer by path first and let the converter skip its own pass.
        onnx.shape_inference.infer_shapes_path(str(path), str(path))
    model = onnx.load(str(path), load_external_data=True)
    keep = fp32_nodes(model.graph)
    model16 = convert_float_to_float16(
        model,
        keep_io_types=True,
        op_block_list=FP32_OPS,
        node_block_list=keep,
        disable_shape_infer=large,
    )
    _restore_fp32_weights(model16.graph, set(keep))
    _drop_round_trips(model16.graph)
    del model
    # The converter appends its input casts at the end; the ONNX checker wants topological order.
    OnnxModel(model16).topological_sort()
    save_graph(model16, path, large)


def _restore_fp32_weights(graph, names: set[str]) -> None:
    """The converter halves every initializer, blocked nodes' weights too: give those back fp32."""
    import numpy as np
    from onnx import numpy_helper

    wanted = {i for n in graph.node if n.name in names for i in n.input}
    users: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    for k, init in enumerate(graph.initializer):
        if init.name in wanted and init.data_type == 10 and users.get(init.name) == 1:
            arr = numpy_helper.to_array(init).astype(np.float32)
            graph.initializer[k].CopyFrom(numpy_helper.from_array(arr, init.name))


def _drop_round_trips(graph) -> None:
    """The converter casts every fp32 node's output to fp16 and back before the next fp32 node
    (and before fp32 graph outputs such as the logits): that would round, and overflow, exactly
    the values kept fp32. Cast(fp32)(Cast(fp16)(x)) becomes Cast(fp32)(x)."""
    from onnx import TensorProto

    def cast_to(node) -> int | None:
        if node.op_type != "Cast":
            return None
        return next((a.i for a in node.attribute if a.name == "to"), None)

    producer = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        src = producer.get(node.input[0]) if cast_to(node) == TensorProto.FLOAT else None
        if src is not None and cast_to(src) == TensorProto.FLOAT16:
            node.input[0] = src.input[0]
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    dead = [n for n in graph.node if cast_to(n) is not None and n.output[0] not in used]
    for n in dead:
        graph.node.remove(n)
