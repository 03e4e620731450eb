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
    specs["greedy.onnx"] = _greedy(helper, TensorProto)
    out = {}
    for name, (nodes, inputs, *outputs) in specs.items():
        outs = outputs[0] if outputs else [f32("out")]
        graph = helper.make_graph(nodes, name.split(".")[0], inputs, outs)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
        )
        out[name] = model.SerializeToString()
    return out


def _greedy(helper, tp) -> tuple:
    """ids = ArgMax(logits) over the vocabulary [N, T]; flag [N, T]: the logits hold NaN or
    +inf, or their maximum is tied (the engine then decides on the host, as numpy would)."""
    one = helper.make_tensor("one", tp.FLOAT, [], [1.0])
    last = helper.make_tensor("last", tp.INT64, [1], [-1])
    nodes = [
        helper.make_node("ArgMax", ["logits"], ["ids"], axis=-1, keepdims=0),
        helper.make_node("ReduceMax", ["logits"], ["top"], axes=[-1], keepdims=1),
        helper.make_node("Equal", ["logits", "top"], ["at_top"]),
        helper.make_node("Cast", ["at_top"], ["at_top_f"], to=tp.FLOAT),
        helper.make_node("Constant", [], ["axis"], value=last),
        helper.make_node("ReduceSum", ["at_top_f", "axis"], ["tops"], keepdims=0),
        helper.make_node("Constant", [], ["one"], value=one),
        helper.make_node("Greater", ["tops", "one"], ["tied"]),
        helper.make_node("IsNaN", ["logits"], ["nan"]),
        helper.make_node("IsInf", ["logits"], ["inf"], detect_negative=0),
        helper.make_node("Or", ["nan", "inf"], ["odd"]),
        helper.make_node("Cast", ["odd"], ["odd_f"], to=tp.FLOAT),
        helper.make_node("ReduceMax", ["odd_f"], ["odd_any"], axes=[-1], keepdims=0),
        helper.make_node("Cast", ["odd_any"], ["odd_b"], to=tp.BOOL),
        helper.make_node("Or", ["tied", "odd_b"], ["flag"]),
    ]
    inputs = [helper.make_tensor_value_info("logits", tp.FLOAT, None)]
    outputs = [
        helper.make_tensor_value_info("ids", tp.INT64, None),
        helper.make_tensor_value_info("flag", tp.BOOL, None),
    ]
    return nodes, inputs, outputs


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
