"""The device back end of the cache interface: key/values as ORT OrtValues on the decoder
session's device (CUDA, or the CPU provider, where the whole path is tested).

Buffers are preallocated (rows x capacity, as the numpy back end) and never leave the device:
the decoder binds each layer's buffer both as its past input and as its `kv_cache.*` output, so
the graph's own scatter writes the new tokens into their slots in place; moves (a row leaving,
a tree path kept), zeroing and growth run as small graphs on the same device (engine/kvops,
written by export.kvops). Only the main's greedy picks come back to the host (the assistant's
logits, which drafters read, do too). A rewind is a length; the slots it drops, and
the slots the graph wrote for pads, are zeroed as the numpy back end zeroes them (noted, then
one kvops run before the next operation), so both back ends hold the same bits at every step.
Every ORT run ends with a stream synchronize (ORT's default), which orders the kvops and
decoder sessions on CUDA.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from . import layout as lay
from .cache import BatchCache
from .errors import ModelFileError
from .model import T5Model
from .strategies.base import pick

KVOPS = Path(__file__).parent / "kvops"


class Buffer:
    """A float32 OrtValue [R, ...] on a device, with what binding its rows needs (worked out
    once: a step binds every layer's buffer, and ORT's accessors cost microseconds each)."""

    __slots__ = ("device", "device_id", "ptr", "row", "tail", "value")

    def __init__(self, value: ort.OrtValue, device_id: int = 0):
        # ORT's python API names an OrtValue's device type, not its id
        self.value, self.device, self.device_id = value, value.device_name().lower(), device_id
        self.tail = list(value.shape()[1:])
        self.ptr = value.data_ptr()
        self.row = int(np.prod(self.tail, dtype=np.int64)) * 4

    def rows(self, lo: int, hi: int) -> Slab:
        """Rows lo..hi, to bind."""
        return Slab(self, lo, hi)

    def numpy(self) -> np.ndarray:
        """A host copy."""
        return self.value.numpy()


@dataclass(frozen=True)
class Slab:
    """Rows lo..hi of a Buffer, bound by address: no copy."""

    buf: Buffer
    lo: int
    hi: int

    def bind(self, binding, name: str, output: bool = False) -> None:
        """Bind these rows as input (or output) `name` of an IO binding."""
        b = self.buf
        shape = [self.hi - self.lo, *b.tail]
        bind = binding.bind_output if output else binding.bind_input
        bind(name, b.device, b.device_id, np.float32, shape, b.ptr + self.lo * b.row)


KV_WIDTHS = (1, 2, 4, 8, 16, 32, 64)  # buffers per kvops run (export.kvops writes each)


class KVOps:
    """The moves, zeroing and padded copies of one model's buffers, as sessions on its device
    (model.kvops; each graph opened on first use)."""

    def __init__(self, model: T5Model):
        self.model = model
        self._role("greedy")

    @classmethod
    def of(cls, model: T5Model) -> KVOps:
        """The model's KVOps, opened on first use (once: the worker and a caller's generate may
        make their first device cache at the same time)."""
        with _OPEN_LOCK:
            if model.kvops is None:
                model.kvops = cls(model)
        return model.kvops

    def _role(self, name: str) -> str:
        """The session role of graph `name`, opened once."""
        role = f"kvops.{name}"
        if role in self.model.sessions:
            return role
        with _OPEN_LOCK:
            if role not in self.model.sessions:
                make_options, plist, _ = self.model._session_args
                self.model.sessions[role] = ort.InferenceSession(
                    str(KVOPS / f"{name}.onnx"), make_options(), providers=plist
                )
        return role

    def run(self, name: str, data: list[Slab], out: list[Slab], **host) -> None:
        """Op `name` on every data slab (the host index arrays shared), each result written
        into its out slab: the widest graph first, so a model's layers take one or two runs
        (each run is a launch and a stream synchronize on a GPU)."""
        i = 0
        while i < len(data):
            k = max(w for w in KV_WIDTHS if w <= len(data) - i)
            feed = {**{f"data{j}": data[i + j] for j in range(k)}, **host}
            outs = {f"out{j}": out[i + j] for j in range(k)}
            self.model.run(self._role(f"{name}_{k}"), feed, _NO_COUNT, outs)
            i += k

    def alloc(self, shape: tuple) -> Buffer:
        """An uninitialized float32 buffer on the model's device."""
        m = self.model
        value = ort.OrtValue.ortvalue_from_shape_and_type(
            list(shape), np.float32, m.device, m.device_id
        )
        return Buffer(value, m.device_id)


_OPEN_LOCK = threading.RLock()


class _NoCount:
    session_s = 0.0


_NO_COUNT = _NoCount()


class DeviceCache(BatchCache):
    """BatchCache whose key/values live on the decoder's device (see the module docstring)."""

    on_device = True

    def __init__(self, model: T5Model, rows: int = 1):
        if not model.has_full:
            raise ModelFileError(f"{model.folder}: its decoder graph has no kv_cache outputs")
        self.ops = KVOps.of(model)
        self.device_memory = model.device != "cpu"
        self._pending: list[tuple[int, int, int]] = []  # rewound slots to zero (see _clear)
        super().__init__(model, rows)

    def _new_storage(self, rows: int, cap: int, enc_len: int) -> None:
        """New buffers; the active rows' contents padded into them on the device."""
        n, old_kv, old_cross = len(self.owners), self.self_kv, getattr(self, "cross", [])
        if n:
            self._flush()
        self._pending.clear()  # without rows, nothing is left to zero
        self._binding = None  # bound to the old buffers
        kv = [self.ops.alloc((rows, self.h, cap, self.d)) for _ in self.model.self_names]
        cross = [self.ops.alloc((rows, self.h, enc_len, self.d)) for _ in self.model.cross_names]
        if n:
            for new, old, grow in (
                (kv, old_kv, cap - self.capacity),
                (cross, old_cross, enc_len - self.enc_len),
            ):
                pads = np.array([0, 0, 0, 0, 0, 0, grow, 0], np.int64)
                self.ops.run("pad", _rows(old, 0, n), _rows(new, 0, n), pads=pads)
        self.self_kv, self.cross = kv, cross

    def _put_row(self, n: int, cross: list, s: int) -> None:
        """Row n: the cross key/values ([1, H, s, D] OrtValues) padded to the buffer's length,
        and its self key/values zeroed."""
        self._flush()
        pads = np.array([0, 0, 0, 0, 0, 0, self.enc_len - s, 0], np.int64)
        src = [Buffer(b, self.model.device_id).rows(0, 1) for b in cross]
        self.ops.run("pad", src, _rows(self.cross, n, n + 1), pads=pads)
        rows = _rows(self.self_kv, 0, n + 1)
        self.ops.run("zero", rows, rows, idx=np.array([[n]], np.int64))

    def _move_row(self, src: int, dst: int) -> None:
        """Row src into row dst, in place."""
        self._flush()
        rows = _rows([*self.self_kv, *self.cross], 0, max(src, dst) + 1)
        s, d = np.array([[src]], np.int64), np.array([[dst]], np.int64)
        self.ops.run("move", rows, rows, src=s, dst=d)

    def _move_slots(self, r: int, src: list[int], dst: list[int]) -> None:
        """Row r's slots src into slots dst, every head, in place."""
        self._flush()
        s, d = self._head_slots(0, src), self._head_slots(0, dst)  # row 0 of the one-row slab
        rows = _rows(self.self_kv, r, r + 1)
        self.ops.run("move", rows, rows, src=s, dst=d)

    def _head_slots(self, row: int, slots) -> np.ndarray:
        """ScatterND index prefixes [H * len(slots), 3]: (row, head, slot) for every head."""
        heads = np.repeat(np.arange(self.h), len(slots))
        return np.stack([np.full_like(heads, row), heads, np.tile(slots, self.h)], 1).astype(
            np.int64
        )

    def _clear(self, r: int, lo: int, hi: int) -> None:
        """Slots lo..hi of row r zeroed, as the numpy back end zeroes them (so both back ends
        hold the same bits): noted here, done for every row in one run before the next op."""
        if hi > lo:
            self._pending.append((r, lo, hi))

    def _flush(self) -> None:
        """Zero every noted slot range (one kvops run over the self key/values)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        idx = np.concatenate([self._head_slots(r, np.arange(lo, hi)) for r, lo, hi in pending])
        rows = _rows(self.self_kv, 0, max(r for r, _, _ in pending) + 1)
        self.ops.run("zero", rows, rows, idx=idx)

    def _call(self, feed: dict, lengths: np.ndarray, counts: np.ndarray, counter, reduce: bool):
        """The decoder with each layer's buffer bound as past input and kv_cache output
        (BatchCache._bound_call); logits to the host, or with reduce only the greedy picks (see
        _picks)."""
        self._flush()
        logits = self._bound_call(feed, len(lengths), counter)
        self._clear_pads(lengths, counts, feed[lay.INPUT_IDS].shape[1])
        return self._picks(logits, counts, counter) if reduce else logits.numpy()

    @staticmethod
    def _rows_of(buffer: Buffer, n: int) -> Slab:
        """The first n rows of a buffer, to bind by address."""
        return buffer.rows(0, n)

    def _picks(self, logits: ort.OrtValue, counts: np.ndarray, counter):
        """Greedy ids [N, T] and bad picks, reduced on the device (kvops greedy graph: ArgMax,
        and a flag for a NaN/+inf or a tied maximum). A flag on any real token copies the
        logits to the host instead, so ties and NaN resolve exactly as numpy's argmax does."""
        out = {"ids": None, "flag": None}
        ids, flag = self.model.run("kvops.greedy", {lay.LOGITS: logits}, counter, out)
        ids, flag = ids.numpy(), flag.numpy()
        real = np.arange(flag.shape[1]) < counts[:, None]
        if (flag & real).any():
            return pick(logits.numpy())
        return ids, np.zeros(ids.shape, bool)


def device_free_bytes(model: T5Model) -> int | None:
    """Free memory on a CUDA model's device (cudaMemGetInfo through the CUDA runtime ORT
    loaded), or None when it cannot be read: then only Limits.memory_bytes bounds the device
    caches. ORT's arena keeps what it freed, so this errs on the side of refusing."""
    lib = _cudart() if model.device == "cuda" else None
    if lib is None:
        return None
    free, total, prev = ctypes.c_size_t(), ctypes.c_size_t(), ctypes.c_int()
    if lib.cudaGetDevice(ctypes.byref(prev)) or lib.cudaSetDevice(model.device_id):
        return None
    rc = lib.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total))
    lib.cudaSetDevice(prev.value)
    return free.value if rc == 0 else None


@functools.cache
def _cudart():
    """The CUDA runtime library, looked up once (admission asks at every join), or None."""
    for name in ("libcudart.so", "libcudart.so.13", "libcudart.so.12"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def make_cache(model: T5Model) -> BatchCache:
    """The cache back end the model was loaded with (model.kv_cache: numpy or device)."""
    return DeviceCache(model) if model.kv_cache == "device" else BatchCache(model)


def _rows(buffers: list[Buffer], lo: int, hi: int) -> list[Slab]:
    """Rows lo..hi of each buffer."""
    return [b.rows(lo, hi) for b in buffers]
