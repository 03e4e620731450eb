"""`stairs-bench profile --main DIR [--assistant DIR] [--batch-sizes 1,8,16] [--tokens 1,4]`:
where one call's time goes, next to what it cannot go below.

For each call shape the engine makes (rows x new tokens; a call of one token in all gets the
masked pad the engine adds), ONNX Runtime's own per-node profile of the masked decoder
(`SessionOptions.enable_profiling`), grouped by op kind and by layer part (self-attention, the
key/value writes into the buffer, cross-attention, feed-forward, LM head, layer norms, position
bias, the embedding and masks), and the encoder's and the assistant's decoder's the same way.
Beside it the floor: the graph's weight bytes and the key/values the call reads (every row's
cached slots and encoder positions) over this machine's measured weight-streaming rate (an ORT
MatMul of a few rows by a weight far larger than the caches), and its FLOPs over measured GEMM
throughput. Wall times come from a session without profiling; shares from the
profiled one. Each call runs as the engine's caches run it (the key/value buffers bound as the
kv_cache outputs, so the graph writes in place). Feeds are synthetic with the shapes the engine
feeds (the values do not change the kernels' work).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.common import (
    LOCAL_RESULTS,
    default_out,
    graph_bytes,
    machine,
    make_parser,
    write_atomic,
    wrote,
)
from engine import layout
from engine.model import MIN_TOKENS
from engine.providers import session_options

PROG = "stairs-bench profile"
DECODER = layout.DECODER_FILE
ENCODER = layout.ENCODER_FILE
PARTS = ("self-attention", "kv writes", "cross-attention", "feed-forward", "LM head",
         "layer norms", "position bias", "embedding and masks")  # fmt: skip


@dataclass(frozen=True)
class Shape:
    """One call: rows x new tokens, past slots already cached, source (encoder) length."""

    rows: int
    tokens: int
    past: int
    source: int

    @property
    def label(self) -> str:
        return f"{self.rows} x {self.tokens}"


def engine_shape(rows: int, tokens: int, past: int, source: int) -> Shape:
    """The shape the engine's cache feeds for rows x tokens (BatchCache.run's pad rule)."""
    if rows * tokens < MIN_TOKENS:
        tokens = MIN_TOKENS
    return Shape(rows, tokens, past, source)


def session(path: Path, threads: int, profile_dir: str | None = None) -> ort.InferenceSession:
    """A CPU session with the engine's options (engine.providers), profiling into profile_dir
    if given."""
    so = session_options(threads)
    if profile_dir is not None:
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(profile_dir) / path.stem)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _dtype(onnx_type: str):
    return {"tensor(float)": np.float32, "tensor(float16)": np.float16,
            "tensor(int64)": np.int64, "tensor(bool)": np.bool_}[onnx_type]  # fmt: skip


def widths(shape: Shape) -> tuple[int, int]:
    """(self slots, encoder positions) of a call of shape, rounded up as the engine's cache
    holds them."""
    return layout.slot_width(shape.past + shape.tokens), layout.enc_width(shape.source)


def decoder_feed(sess: ort.InferenceSession, shape: Shape) -> dict:
    """A feed of the masked decoder for shape: every row has `past` cached slots and its new
    tokens in the next ones; capacity and encoder width as `widths`."""
    b, t, p = shape.rows, shape.tokens, shape.past
    cap, s = widths(shape)
    rng = np.random.default_rng(0)
    slots = np.broadcast_to(p + np.arange(t), (b, t)).copy()
    mask = np.zeros((b, t, cap), bool)
    mask[:, :, :p] = True
    mask[:, np.arange(t), p + np.arange(t)] = True
    values = {
        layout.INPUT_IDS: np.full((b, t), 5, np.int64),
        layout.POSITIONS: slots,
        layout.NEW_SLOTS: slots,
        layout.PAST_POSITIONS: np.broadcast_to(np.arange(cap), (b, cap)).copy(),
        layout.ATTENTION_MASK: mask,
        layout.ENCODER_ATTENTION_MASK: np.arange(s)[None, :].repeat(b, 0) < shape.source,
    }
    past = _past_inputs(sess)
    feed = {}
    for i in sess.get_inputs():
        dt = _dtype(i.type)
        if i.name in values:
            feed[i.name] = values[i.name].astype(dt)
        else:  # past (cap slots) or cross (source) key/values [B, H, L, D]
            length = cap if i.name in past else s
            feed[i.name] = rng.standard_normal((b, i.shape[1], length, i.shape[3])).astype(dt)
    return feed


def encoder_feed(sess: ort.InferenceSession, shape: Shape) -> dict:
    """The encoder's feed: rows prompts of `source` tokens."""
    n = (shape.rows, shape.source)
    types = {i.name: _dtype(i.type) for i in sess.get_inputs()}
    feed = {layout.INPUT_IDS: np.full(n, 5, types[layout.INPUT_IDS])}
    if layout.ATTENTION_MASK in types:
        feed[layout.ATTENTION_MASK] = np.ones(n, types[layout.ATTENTION_MASK])
    return feed


def _past_inputs(sess: ort.InferenceSession) -> set[str]:
    """The decoder's cache inputs (layout.past_names; fewer layers than inputs, surely)."""
    return set(layout.past_names(len(sess.get_inputs())))


def outputs(sess: ort.InferenceSession) -> list[str]:
    """The graph's outputs but its kv_cache.* buffers (layout.full_names): what a cache
    copying the new key/values itself asks for."""
    full = set(layout.full_names(len(sess.get_outputs())))
    return [o.name for o in sess.get_outputs() if o.name not in full]


def runner(sess: ort.InferenceSession, feed: dict):
    """One call as the engine's caches make it: a graph with kv_cache outputs gets each bound
    to its past input's array (the graph writes the new tokens in place) and only its logits
    fetched; others return their outputs()."""
    names = outputs(sess)
    layers = (len(sess.get_outputs()) - len(names)) // 2  # the kv_cache.* pairs
    if not layers:
        return lambda: sess.run(names, feed)
    bind = sess.io_binding()
    for name, value in feed.items():
        bind.bind_cpu_input(name, value)
    for out, past in zip(layout.full_names(layers), layout.past_names(layers), strict=True):
        a = feed[past]
        bind.bind_output(out, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)
    bind.bind_output(layout.LOGITS, "cpu")

    def run():
        sess.run_with_iobinding(bind)
        return bind.get_outputs()[0].numpy()

    return run


def wall_ms(sess: ort.InferenceSession, feed: dict, runs: int) -> float:
    """Median wall milliseconds of one run (after two warm-up runs)."""
    run, times = runner(sess, feed), []
    for i in range(runs + 2):
        t0 = time.perf_counter()
        run()
        if i >= 2:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def node_times(sess_path: Path, feed: dict, threads: int, runs: int) -> list[tuple]:
    """(node, op kind, output type, median microseconds per run) of every node in execution
    order, from ORT's profile of runs runs (after two warm-up runs)."""
    with tempfile.TemporaryDirectory() as tmp:
        sess = session(sess_path, threads, tmp)
        run = runner(sess, feed)
        for _ in range(runs + 2):
            run()
        events = json.loads(Path(sess.end_profiling()).read_text())
    per: dict[str, tuple] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            out = e["args"].get("output_type_shape") or [{}]
            kind = next(iter(out[0]), "") if out else ""
            per.setdefault(e["name"][: -len("_kernel_time")], (e["args"]["op_name"], kind, []))
            per[e["name"][: -len("_kernel_time")]][2].append(e["dur"])
    return [(n, op, kind, statistics.median(d[2:] or d)) for n, (op, kind, d) in per.items()]


NORMS = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization")
MATMULS = ("MatMul", "FusedMatMul", "MatMulNBits", "Gemm", "MatMulInteger")


def parts(nodes: list[tuple], sublayers: tuple[str, ...]) -> list[str]:
    """The layer part of each node, in execution order: each block's layer norms open its
    sublayers in order (decoder: self-attention, cross-attention, feed-forward) and the nodes
    after one belong to its sublayer; float scatters are the key/value writes, the relative
    bias lookups and clips the position bias, matmuls after the final norm the LM head."""
    out, norms, current, final = [], 0, "embedding and masks", False
    for name, op, kind, _us in nodes:
        if op in NORMS:
            final = final or "final_layer_norm" in name
            if not final:
                current = sublayers[norms % len(sublayers)]
                norms += 1
            out.append("layer norms")
        elif final and op in MATMULS:
            out.append("LM head")
        elif op in ("ScatterElements", "ScatterND"):
            out.append("kv writes" if kind.startswith("float") else "position bias")
        elif "relative_attention_bias" in name or op == "Clip":
            out.append("position bias")
        else:
            out.append(current)
    return out


def matmul_weights(path: Path) -> int:
    """Weight elements every token multiplies (constant second inputs of MatMul/Gemm, and
    MatMulNBits' K x N)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dims = {t.name: list(t.dims) for t in graph.initializer}
    total = 0
    for node in graph.node:
        if node.op_type in ("MatMul", "Gemm") and node.input[1] in dims:
            total += int(np.prod(dims[node.input[1]]))
        elif node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            total += attrs["K"] * attrs["N"]
    return total


def _kv_dims(sess: ort.InferenceSession) -> tuple[int, int, int, int]:
    """(layers, heads, d_kv, bytes per element) of the decoder's key/value inputs."""
    names = _past_inputs(sess)
    past = [i for i in sess.get_inputs() if i.name in names]
    size = np.dtype(_dtype(past[0].type)).itemsize
    return len(past) // 2, past[0].shape[1], past[0].shape[3], size


def cache_bytes(sess: ort.InferenceSession, shape: Shape) -> int:
    """Key/value bytes one masked-decoder call reads: every row's self slots and encoder
    positions (as `widths` holds them; the mask hides slots, the matmuls still read them),
    keys and values, every layer."""
    layers, heads, d_kv, size = _kv_dims(sess)
    return 2 * layers * shape.rows * heads * d_kv * sum(widths(shape)) * size


def decoder_flops(path: Path, sess: ort.InferenceSession, shape: Shape) -> float:
    """Multiply-adds x 2 of one masked-decoder call: every new token through every weight, and
    attention (each query alone) over the capacity's slots and the source."""
    layers, heads, d_kv, _ = _kv_dims(sess)
    queries = shape.rows * shape.tokens * heads
    attention = 4 * layers * queries * d_kv * sum(widths(shape))
    return 2.0 * shape.rows * shape.tokens * matmul_weights(path) + attention


def measured_rates(threads: int, runs: int = 10) -> dict:
    """This machine through ORT's MatMul on `threads` threads: the weight-streaming rate (4
    rows by a 256 MiB fp32 weight, far past the caches, as a decoder call streams its weights),
    bytes/s, and GEMM throughput (512 x 2048 by 2048 x 2048), FLOP/s."""
    from onnx import TensorProto, helper, numpy_helper

    def probe(m: int, k: int, n: int) -> float:
        w = np.random.default_rng(0).standard_normal((k, n), np.float32)
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"])], "probe",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
            [numpy_helper.from_array(w, "w")],
        )  # fmt: skip
        model = helper.make_model(graph, opset_imports=[helper.make_operatorsetid("", 17)])
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "probe.onnx"
            path.write_bytes(model.SerializeToString())
            sess = session(path, threads)
        return wall_ms(sess, {"x": np.ones((m, k), np.float32)}, runs) / 1e3

    stream_s = probe(4, 8192, 8192)
    gemm_s = probe(512, 2048, 2048)
    return {"stream_bytes_per_s": 8192 * 8192 * 4 / stream_s,
            "gemm_flops_per_s": 2 * 512 * 2048 * 2048 / gemm_s}  # fmt: skip


def _floor(weights: int, cache: int, flops: float, rates: dict) -> dict:
    """What a call cannot go below, ms: its weights and the key/values it reads streamed once
    (each part alone too), or its FLOPs at the GEMM rate; ms is the larger."""
    stream = rates["stream_bytes_per_s"] / 1e3
    floor = {"weights_ms": weights / stream, "cache_ms": cache / stream,
             "bytes_ms": (weights + cache) / stream,
             "flops_ms": flops / rates["gemm_flops_per_s"] * 1e3}  # fmt: skip
    floor["ms"] = max(floor["bytes_ms"], floor["flops_ms"])
    return floor


def profile_graph(path: Path, role: str, shapes: list[Shape], threads: int, runs: int,
                  rates: dict) -> list[dict]:  # fmt: skip
    """One record per shape: wall ms, the floor, and ms by layer part and by op kind."""
    sess = session(path, threads)
    decoder = role != "encoder"
    sublayers = ("self-attention", "cross-attention", "feed-forward")
    if not decoder:
        sublayers = ("self-attention", "feed-forward")
    records = []
    for shape in shapes:
        feed = decoder_feed(sess, shape) if decoder else encoder_feed(sess, shape)
        wall = wall_ms(sess, feed, runs)
        nodes = node_times(path, feed, threads, runs)
        by_part: dict[str, float] = {}
        by_op: dict[str, float] = {}
        for (_n, op, _k, us), part in zip(nodes, parts(nodes, sublayers), strict=True):
            by_part[part] = by_part.get(part, 0.0) + us / 1e3
            by_op[op] = by_op.get(op, 0.0) + us / 1e3
        tokens = shape.rows * (shape.tokens if decoder else shape.source)
        if decoder:
            flops, kv = decoder_flops(path, sess, shape), cache_bytes(sess, shape)
        else:
            flops, kv = 2.0 * tokens * matmul_weights(path), 0
        wbytes = graph_bytes(path)
        floor = _floor(wbytes, kv, flops, rates)
        records.append({
            "graph": role, "shape": shape.label, "rows": shape.rows, "tokens": shape.tokens,
            "past": shape.past, "source": shape.source, "wall_ms": wall,
            "kernel_ms": sum(by_op.values()), "nodes": len(nodes),
            "weight_bytes": wbytes, "cache_bytes": kv, "flops": flops,
            "floor": floor, "x_floor": wall / floor["ms"],
            "by_part": by_part, "by_op": dict(sorted(by_op.items(), key=lambda item: -item[1])),
        })  # fmt: skip
    return records


def markdown(result: dict) -> str:
    """The report: per graph, a table by layer part and one by op kind, and the floor."""
    r = result["rates"]
    lines = [
        f"# Where a call's time goes: {result['main']}",
        "",
        (
            f"{result['threads']} threads, {result['past']} cached slots, {result['source']} source"
            f" positions; medians of {result['runs']} runs. Weight streaming"
            f" {r['stream_bytes_per_s'] / 1e9:.1f} GB/s, GEMM {r['gemm_flops_per_s'] / 1e9:.0f}"
            " GFLOP/s (ORT MatMul probes). Floor = max((weight bytes + the key/values the call"
            " reads) / streaming rate, FLOPs / GEMM rate); weights floor: the weights alone."
            " A graph whose weights or key/values fit the CPU's caches can run below it."
            f" Quiet: {result['quiet']}."
        ),
    ]
    for role in dict.fromkeys(rec["graph"] for rec in result["records"]):
        recs = [rec for rec in result["records"] if rec["graph"] == role]
        cols = [p for p in PARTS if any(p in rec["by_part"] for rec in recs)]
        lines += ["", f"## {role} ({recs[0]['weight_bytes'] / 1e6:.1f} MB of weights)", ""]
        lines += ["| rows x tokens | wall ms | key/values read MB | floor ms | x floor |"
                  " weights floor ms | nodes | " + " | ".join(cols) + " |",
                  "|---" * (len(cols) + 7) + "|"]  # fmt: skip
        for rec in recs:
            k, floor = rec["kernel_ms"] or 1.0, rec["floor"]
            cells = [f"{rec['by_part'].get(p, 0):.2f} ({rec['by_part'].get(p, 0) / k:.0%})"
                     for p in cols]  # fmt: skip
            lines.append(
                f"| {rec['shape']} | {rec['wall_ms']:.2f} | {rec['cache_bytes'] / 1e6:.1f} |"
                f" {floor['ms']:.2f} | {rec['x_floor']:.2f} | {floor['weights_ms']:.2f} |"
                f" {rec['nodes']} | " + " | ".join(cells) + " |"
            )
        ops = list(dict.fromkeys(op for rec in recs for op in list(rec["by_op"])[:6]))
        lines += ["", "| rows x tokens | " + " | ".join(ops) + " | the rest |",
                  "|---" * (len(ops) + 2) + "|"]  # fmt: skip
        for rec in recs:
            k = rec["kernel_ms"] or 1.0
            shown = [rec["by_op"].get(op, 0.0) for op in ops]
            cells = [f"{v:.2f} ({v / k:.0%})" for v in shown]
            rest = k - sum(shown)
            lines.append(
                f"| {rec['shape']} | " + " | ".join(cells) + f" | {rest:.2f} ({rest / k:.0%}) |"
            )
    return "\n".join(lines) + "\n"


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1 or max(values) > 256:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated integers from 1 to 256")
    return values


def parser() -> argparse.ArgumentParser:
    """`stairs-bench profile`'s flags."""
    p = make_parser(PROG, __doc__.split("\n\n")[0])
    p.add_argument("--main", type=Path, required=True, help="exported main model folder")
    p.add_argument(
        "--assistant",
        type=Path,
        help="exported assistant folder, its decoder profiled too (default: none)",
    )
    p.add_argument("--batch-sizes", type=_ints, default="1,8,16", help="rows per call")
    p.add_argument("--tokens", type=_ints, default="1,4", help="new tokens per row")
    p.add_argument("--past", type=int, default=96, help="slots already cached per row")
    p.add_argument("--source", type=int, default=256, help="encoder positions (255 + EOS)")
    p.add_argument("--threads", type=int, default=2, help="ORT intra-op threads")
    p.add_argument("--runs", type=int, default=20, help="timed runs per shape")
    p.add_argument(
        "--out",
        type=Path,
        help=f"folder (default: {LOCAL_RESULTS}/profile-<main's name>-DATE-TIME, untracked)",
    )
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The checked flags, --out filled in."""
    p = parser()
    a = p.parse_args(argv)
    for name in ("past", "source", "threads", "runs"):
        if not 1 <= getattr(a, name) <= 4096:
            p.error(f"--{name} must be from 1 to 4096")
    for folder in (a.main, a.assistant):
        if folder is not None and not (folder / DECODER).is_file():
            p.error(f"{folder}: no {DECODER} (export it with stairs-export)")
    a.out = a.out or default_out(f"profile-{a.main.name}")
    return a


def main(argv: list[str] | None = None) -> int:
    """Profile the graphs, print the report and write profile.json and profile.md to --out."""
    from bench.quiet import Monitor

    a = parse_args(argv)
    mon = Monitor()
    before = mon.check(2.0)
    rates = measured_rates(a.threads)
    dec = [engine_shape(b, t, a.past, a.source) for b in a.batch_sizes for t in a.tokens]
    enc = [Shape(b, 0, 0, a.source) for b in sorted({1, max(a.batch_sizes)})]
    records = profile_graph(a.main / DECODER, "main decoder", dec, a.threads, a.runs, rates)
    records += profile_graph(a.main / ENCODER, "encoder", enc, a.threads, a.runs, rates)
    if a.assistant is not None:
        records += profile_graph(
            a.assistant / DECODER, "assistant decoder", dec, a.threads, a.runs, rates
        )
    after = mon.check(2.0)
    result = {
        "main": str(a.main), "assistant": str(a.assistant) if a.assistant else None,
        "threads": a.threads, "past": a.past, "source": a.source, "runs": a.runs,
        "rates": rates, "quiet": bool(before["quiet"] and after["quiet"]),
        "quiet_checks": [before, after], "machine": machine(), "records": records,
    }  # fmt: skip
    text = markdown(result)
    write_atomic(a.out / "profile.json", json.dumps(result, indent=2))
    write_atomic(a.out / "profile.md", text)
    print(text)
    wrote(PROG, a.out / "profile.md", "profile.json")
    return 0


if __name__ == "__main__":  # python -m bench.profile: stairs-bench profile
    raise SystemExit(main())
