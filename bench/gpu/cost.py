"""Main decoder step costs and per-row logits bit-identity, per cache back end (stairs-bench
gpu).

These measure the cache back ends themselves (engine.cache.BatchCache, engine.device_cache
.DeviceCache), below the public API on purpose: a step's cost as each back end runs it, the
bound of a fully resident call, and a CUDA graph replay of it.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from engine.layout import DECODER_FILE, INPUT_IDS, LOGITS

PAST = 64  # cached slots per row when a step is timed
ENC = 129  # encoder length of every row (the public prompts' 128 tokens + EOS)


def _cache(model, kind, rows: int, rng, past: int = PAST):
    """A cache of `kind` (numpy, device, or a cache class) with rows rows of ENC encoder
    tokens, each holding `past` decoded slots."""
    from engine.cache import BatchCache
    from engine.device_cache import DeviceCache
    from engine.stats import Counter

    cls = {"numpy": BatchCache, "device": DeviceCache}.get(kind, kind)
    cache = cls(model)
    c = Counter()
    cache.reserve(rows, ENC)
    for i in range(rows):
        ids = [int(x) for x in rng.integers(3, model.vocab_size, ENC - 1)] + [model.eos_id]
        cross, mask = model.encode(ids, c, device=cache.on_device)
        cache.add(i, cross, mask)
    toks = rng.integers(3, model.vocab_size, (rows, past))
    cache.run(toks, np.full(rows, past), c)
    return cache


def _median_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts) * 1e3)


def step_ms(model, kind: str, rows: int, tokens: int, reps: int, rng) -> float:
    """Median ms of one main step as the back end runs it (feeds built, greedy picks to the host,
    the rejected slots rewound)."""
    from engine.stats import Counter

    cache, c = _cache(model, kind, rows, rng), Counter()
    toks = rng.integers(3, model.vocab_size, (rows, tokens))
    counts = np.full(rows, tokens)

    def once():
        cache.run(toks, counts, c, reduce=True)  # as verification runs it: picks, not logits
        for i in range(rows):
            cache.rewind(i, PAST)

    return _median_ms(once, reps)


def _resident_binding(model, sess, rows: int, tokens: int, rng):
    """An IO binding of one step whose every input already lives on the device (host arrays
    copied once) and whose outputs stay there: the bound of a resident cache."""
    import onnxruntime as ort

    from engine.device_cache import Buffer, DeviceCache
    from engine.stats import Counter

    class Capture(DeviceCache):  # keeps what one step binds
        def _call(self, feed, lengths, counts, counter, reduce):
            self.bound = self._bound_io(dict(feed), len(lengths))
            return super()._call(feed, lengths, counts, counter, reduce)

    cache = _cache(model, Capture, rows, rng)
    cache.run(rng.integers(3, model.vocab_size, (rows, tokens)), np.full(rows, tokens), Counter())
    feed, outputs = cache.bound
    bind = sess.io_binding()
    keep = []  # device copies of the host inputs, alive as long as the binding
    for name, value in feed.items():
        if isinstance(value, np.ndarray):
            value = ort.OrtValue.ortvalue_from_numpy(
                np.ascontiguousarray(value), model.device, model.device_id
            )
            keep.append(value)
            bind.bind_ortvalue_input(name, value)
        else:
            value.bind(bind, name)
    shape = [*feed[INPUT_IDS].shape, model.vocab_size]  # a one-token call runs padded
    logits = ort.OrtValue.ortvalue_from_shape_and_type(
        shape, np.float32, model.device, model.device_id
    )
    keep.append(logits)
    Buffer(logits, model.device_id).rows(0, rows).bind(bind, LOGITS, output=True)
    for name, target in outputs.items():
        if target is not None:
            target.bind(bind, name, output=True)
    return bind, keep, cache


def graph_session(model):
    """A session of the main decoder with ORT's CUDA graphs on (enable_cuda_graph), or a
    string saying why ORT refused (it captures only graphs whose every node runs on CUDA)."""
    import onnxruntime as ort

    try:
        opts = {"device_id": str(model.device_id), "enable_cuda_graph": "1"}
        make_options, _, _ = model._session_args
        path = str(Path(model.folder) / DECODER_FILE)
        return ort.InferenceSession(
            path, make_options(), providers=[("CUDAExecutionProvider", opts)]
        )
    except Exception as exc:  # noqa: BLE001 - the refusal is the finding
        return f"{type(exc).__name__}: {str(exc)[:200]}"


def resident_ms(model, rows: int, tokens: int, reps: int, rng, sess=None, graph_id=None):
    """Median ms of the resident call on sess (default: the engine's decoder session);
    graph_id: replayed as CUDA graph graph_id of a graph_session (captured on its first run).
    A string saying why when ORT refuses."""
    import onnxruntime as ort

    if isinstance(sess, str):
        return sess
    sess = sess or model.sessions["decoder"]
    ro = ort.RunOptions()
    if graph_id is not None:
        ro.add_run_config_entry("gpu_graph_id", str(graph_id))
    bind, _alive, _cache_alive = _resident_binding(model, sess, rows, tokens, rng)  # kept alive
    try:
        return _median_ms(lambda: sess.run_with_iobinding(bind, ro), reps)
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {str(exc)[:200]}"


def weight_bytes(folder: Path) -> int:
    """Bytes of the masked decoder's file(s): its weights, what one step must stream."""
    folder = Path(folder)
    return sum(p.stat().st_size for p in folder.glob(DECODER_FILE + "*"))


def cost_table(
    model, rows_list, tokens_list, reps: int, bandwidth: float, cuda: bool, deadline: float
) -> dict:
    """Every (rows, tokens) point: numpy and device back ends, resident bound, CUDA graph
    (points after the deadline are left out)."""
    rng = np.random.default_rng(0)
    floor = weight_bytes(model.folder) / bandwidth * 1e3
    graphs = graph_session(model) if cuda else None
    points = []
    for rows in rows_list:
        for tokens in tokens_list:
            if time.perf_counter() > deadline:
                break
            pt = {"rows": rows, "tokens": tokens, "floor_ms": floor}
            pt["numpy_ms"] = step_ms(model, "numpy", rows, tokens, reps, rng)
            pt["device_ms"] = step_ms(model, "device", rows, tokens, reps, rng)
            pt["resident_ms"] = resident_ms(model, rows, tokens, reps, rng)
            if cuda:
                gid = len(points) + 1  # one captured graph per shape
                pt["cuda_graph_ms"] = resident_ms(model, rows, tokens, reps, rng, graphs, gid)
            points.append(pt)
    return {"past": PAST, "encoder": ENC, "weight_bytes": weight_bytes(model.folder),
            "bandwidth": bandwidth, "points": points}  # fmt: skip


def invariance(model, kind: str) -> dict:
    """Per-row logits of 16 rows with ragged pasts, fed in 20 call shapes (the first 1, 2, 4,
    8 or 16 rows x 1, 2, 3 or 6 tokens, the widest call with ragged real counts): each real
    token's logits compared with the same token's in the 16 x 6 call."""
    from engine.stats import Counter

    rng, c = np.random.default_rng(1), Counter()
    cache = _cache(model, kind, 16, rng, past=4)
    hist = rng.integers(3, model.vocab_size, (16, 8))
    cache.run(hist, rng.integers(1, 9, 16), c)  # ragged pasts
    base = cache.lengths[:16].copy()
    toks = rng.integers(3, model.vocab_size, (16, 6))

    def call(n, t, counts):
        out = cache.run(toks[:n, :t], counts, c)
        for i in range(n):
            cache.rewind(i, int(base[i]))
        return out

    ref = call(16, 6, np.full(16, 6))
    same = total = 0
    worst = 0.0
    for n in (1, 2, 4, 8, 16):
        for t in (1, 2, 3, 6):
            counts = rng.integers(1, t + 1, n) if (n, t) == (16, 6) else np.full(n, t)
            out = call(n, t, counts)
            for i in range(n):
                a, b = out[i, : counts[i]], ref[i, : counts[i]]
                total += 1
                same += int(np.array_equal(a, b))
                worst = max(worst, float(np.abs(a - b).max()))
    return {"back_end": kind, "rows_compared": total, "bit_identical": same, "max_diff": worst}
