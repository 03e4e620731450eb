"""The device cache's small graphs (engine/kvops/*.onnx), written here because the engine does
not import onnx: a move of rows or slots, a zeroing, and a zero-padded copy, each on one
key/value buffer, run on the decoder's own device (engine.device_cache).

    python -m export.kvops engine/kvops
"""

from __future__ import annotations

import sys
from pathlib import Path

OPSET = 17
IR_VERSION = 8


def graphs() -> dict[str, bytes]:
    """File name -> serialized model. data: float [...]; src/dst/idx: int64 [M, k] index
    prefixes (ScatterND's), pads: int64 [2 * rank]."""
    from onnx import TensorProto, helper

    f32 = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
    i64 = lambda n: helper.make_tensor_value_info(n, TensorProto.INT64, None)
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
    specs = {
        # out = data with the entries at dst replaced by those at src (all read first)
        "move.onnx": (
            [
                helper.make_node("GatherND", ["data", "src"], ["picked"]),
                helper.make_node("ScatterND", ["data", "dst", "picked"], ["out"]),
            ],
            [f32("data"), i64("src"), i64("dst")],
        ),
        # out = data with the entries at idx set to 0.0
        "zero.onnx": (
            [
                helper.make_node("GatherND", ["data", "idx"], ["picked"]),
                helper.make_node("Shape", ["picked"], ["shape"]),
                helper.make_node("ConstantOfShape", ["shape"], ["zeros"], value=zero),
                helper.make_node("ScatterND", ["data", "idx", "zeros"], ["out"]),
            ],
            [f32("data"), i64("idx")],
        ),
        # out = data padded with zeros (grows a buffer, or widens a row's cross key/values)
        "pad.onnx": (
            [helper.make_node("Pad", ["data", "pads"], ["out"], mode="constant")],
            [f32("data"), i64("pads")],
        ),
    }
    out = {}
    for name, (nodes, inputs) in specs.items():
        graph = helper.make_graph(nodes, name.split(".")[0], inputs, [f32("out")])
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
        )
        out[name] = model.SerializeToString()
    return out


def main(argv: list[str] | None = None) -> int:
    """Write the graphs into the folder given (engine/kvops)."""
    args = sys.argv[1:] if argv is None else argv
    folder = Path(args[0] if args else Path(__file__).parent.parent / "engine" / "kvops")
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in graphs().items():
        (folder / name).write_bytes(data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
