"""fp16 conversion that keeps T5's overflow-prone parts in fp32.

T5 activations overflow fp16 (transformers issues 9295, 11461). Like onnxruntime's T5 mixed
precision helper, we keep layer norms (Pow/ReduceMean/Sqrt/Div), residual Adds, the feed-forward
output projection (wo) and the logits projection in fp32 and convert the rest.
"""

from __future__ import annotations

from pathlib import Path

# Ops that stay fp32: RMS layer norm pieces, residual adds, softmax.
FP32_OPS = ["Pow", "ReduceMean", "Sqrt", "Div", "Add", "Softmax", "Reciprocal"]


def fp32_nodes(graph) -> list[str]:
    """Names of MatMuls that must stay fp32: the FF output projection and the LM head."""
    keep = []
    for node in graph.node:
        if node.op_type == "MatMul" and (
            "DenseReluDense/wo" in node.name or "lm_head" in node.name
        ):
            keep.append(node.name)
    return keep


def convert_file(path: Path) -> None:
    """Convert one ONNX file to mixed fp16 in place (external data for files over 2 GB)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

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
    del model
    # The converter appends its input casts at the end; the ONNX checker wants topological order.
    from onnxruntime.transformers.onnx_model import OnnxModel

    OnnxModel(model16).topological_sort()
    for old in path.parent.glob(path.name + "*data"):
        old.unlink()
    onnx.save_model(
        model16,
        str(path),
        save_as_external_data=large,
        all_tensors_to_one_file=True,
        location=path.name + "_data",
    )


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
