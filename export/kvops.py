"""The device cache's small graphs (engine/kvops/*.onnx), written here because the engine does
not import onnx: a move of rows or slots, a zeroing, and a zero-padded copy, each on 1-64
key/value buffers in one run, and the greedy picks, run on the decoder's own device
(engine.device_cache).

    python -m export.kvops engine/kvops
"""

from __future__ import annotations

import sys
from pathlib import Path

from engine.device_cache import KV_WIDTHS
from engine.layout import LOGITS

OPSET = 17
IR_VERSION = 8


def graphs() -> dict[str, bytes]:
    """File name -> serialized model. move/zero/pad_{k}: the op on k buffers at once (data{i}
    -> out{i}, one ORT run for k layers' key/values); data: float [...]; src/dst/idx: int64
    [M, k] index prefixes (ScatterND's), shared by every buffer; pads: int64 [2 * rank]."""
    from onnx import TensorProto, helper

    specs = {}
    for k in KV_WIDTHS:
        for name, (nodes, host) in _ops(helper, TensorProto, k).items():
            data = [_value(helper, TensorProto.FLOAT, f"data{i}") for i in range(k)]
            outs = [_value(helper, TensorProto.FLOAT, f"out{i}") for i in range(k)]
            host = [_value(helper, TensorProto.INT64, n) for n in host]
            specs[f"{name}_{k}.onnx"] = (nodes, data + host, outs)
    specs["greedy.onnx"] = _greedy(helper, TensorProto)
    out = {}
    for name, (nodes, inputs, outputs) in specs.items():
        graph = helper.make_graph(nodes, name.split(".")[0], inputs, outputs)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
        )
        out[name] = model.SerializeToString()
    return out


def _value(helper, dtype, name: str):
    return helper.make_tensor_value_info(name, dtype, None)


def _ops(helper, tp, k: int) -> dict:
    """Each op's nodes over k buffers, and its host inputs."""
    zero = helper.make_tensor("zero", tp.FLOAT, [1], [0.0])
    node = helper.make_node
    move, clear, pad = [], [], []
    for i in range(k):
        d, o, p = f"data{i}", f"out{i}", f"picked{i}"
        # out = data with the entries at dst replaced by those at src (all read first)
        move += [node("GatherND", [d, "src"], [p]), node("ScatterND", [d, "dst", p], [o])]
        # out = data with the entries at idx set to 0.0
        clear += [
            node("GatherND", [d, "idx"], [p]),
            node("Shape", [p], [f"shape{i}"]),
            node("ConstantOfShape", [f"shape{i}"], [f"zeros{i}"], value=zero),
            node("ScatterND", [d, "idx", f"zeros{i}"], [o]),
        ]
        # out = data padded with zeros (grows a buffer, or widens a row's cross key/values)
        pad.append(node("Pad", [d, "pads"], [o], mode="constant"))
    return {"move": (move, ["src", "dst"]), "zero": (clear, ["idx"]), "pad": (pad, ["pads"])}


def _greedy(helper, tp) -> tuple:
    """ids = ArgMax(logits) over the vocabulary [N, T]; flag [N, T]: the logits hold NaN or
    +inf, or their maximum is tied (the engine then decides on the host, as numpy would)."""
    one = helper.make_tensor("one", tp.FLOAT, [], [1.0])
    last = helper.make_tensor("last", tp.INT64, [1], [-1])
    nodes = [
        helper.make_node("ArgMax", [LOGITS], ["ids"], axis=-1, keepdims=0),
        helper.make_node("ReduceMax", [LOGITS], ["top"], axes=[-1], keepdims=1),
        helper.make_node("Equal", [LOGITS, "top"], ["at_top"]),
        helper.make_node("Cast", ["at_top"], ["at_top_f"], to=tp.FLOAT),
        helper.make_node("Constant", [], ["axis"], value=last),
        helper.make_node("ReduceSum", ["at_top_f", "axis"], ["tops"], keepdims=0),
        helper.make_node("Constant", [], ["one"], value=one),
        helper.make_node("Greater", ["tops", "one"], ["tied"]),
        helper.make_node("IsNaN", [LOGITS], ["nan"]),
        helper.make_node("IsInf", [LOGITS], ["inf"], detect_negative=0),
        helper.make_node("Or", ["nan", "inf"], ["odd"]),
        helper.make_node("Cast", ["odd"], ["odd_f"], to=tp.FLOAT),
        helper.make_node("ReduceMax", ["odd_f"], ["odd_any"], axes=[-1], keepdims=0),
        helper.make_node("Cast", ["odd_any"], ["odd_b"], to=tp.BOOL),
        helper.make_node("Or", ["tied", "odd_b"], ["flag"]),
    ]
    inputs = [helper.make_tensor_value_info(LOGITS, tp.FLOAT, None)]
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
