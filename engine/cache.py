"""The decoder state of many rows of one model: the numpy back end of the cache interface.

Rows of different lengths share one masked-decoder call (an explicit mask and positions), so a
rewind is a length and a tree of drafts fits in one row. Shapes: N active rows, T new tokens per
row (padded to the longest, at least MIN_TOKENS), C capacity in slots, S encoder length
(padded), H heads, D d_kv, V vocab.
"""

from __future__ import annotations

import functools

import numpy as np

from . import layout as lay
from .model import MIN_TOKENS, T5Model
from .stats import Counter
from .strategies.base import pick


class BatchCache:
    """Decoder state of many rows of one model; the only place its key/values change.

    Active rows are packed at the front (row r belongs to owners[r]), so every feed is a
    contiguous view arr[:N] of preallocated arrays: no past is copied between calls (the
    graph writes the new tokens into the bound arrays), and a rewind sets a row's length.
    Self key/values [R, H, C, D] per layer, cross key/values [R, H, S, D] with enc_mask
    [R, S]. engine.device_cache.DeviceCache keeps them on the decoder's device instead (its
    _storage methods).
    """

    on_device = False  # key/values as host numpy arrays
    device_memory = False  # whether they take device (not host) memory

    def __init__(self, model: T5Model, rows: int = 1):
        self.model, self.h, self.d = model, model.num_heads, model.d_kv
        # the graph writes the new key/values into the bound arrays (graphs with kv_cache
        # outputs, on the CPU provider); else they come back as outputs and are copied in here
        self.in_place_writes = model.has_full and model.provider == "cpu"
        self.owners: list = []
        self.self_kv: list[np.ndarray] = []
        self._alloc(rows, lay.SLOT_CHUNK, 1)

    def _alloc(self, rows: int, cap: int, enc_len: int) -> None:
        """(Re)allocate rows x cap slots x enc_len (rounded up: layout.enc_width), keeping the
        active rows' contents."""
        n, enc_len = len(self.owners), lay.enc_width(enc_len)
        self._new_storage(rows, cap, enc_len)
        enc_mask = np.zeros((rows, enc_len), np.int64)
        lengths, trunk = np.zeros(rows, np.int64), np.zeros(rows, np.int64)
        pos = np.tile(np.arange(cap), (rows, 1))  # [R, C], writable (tree rows set their own)
        parent = pos - 1  # [R, C]: a plain sequence, each slot's parent the slot before
        if n:
            c = self.capacity
            enc_mask[:n, : self.enc_len] = self.enc_mask[:n]
            lengths[:n], trunk[:n] = self.lengths[:n], self.trunk[:n]
            pos[:n, :c], parent[:n, :c] = self.pos[:n], self.parent[:n]
        self.enc_mask, self.lengths, self.trunk, self.pos, self.parent = (
            enc_mask,
            lengths,
            trunk,
            pos,
            parent,
        )
        self.capacity, self.enc_len = cap, enc_len

    # -- storage: numpy arrays here; engine.device_cache.DeviceCache overrides these ------------

    def _new_storage(self, rows: int, cap: int, enc_len: int) -> None:
        """Fresh key/value arrays; the active rows keep their contents (none after shrink())."""
        n, old = len(self.owners), self.self_kv
        self._binding = None  # bound to the old arrays
        kv = [np.zeros((rows, self.h, cap, self.d), np.float32) for _ in self.model.self_names]
        cross = [
            np.zeros((rows, self.h, enc_len, self.d), np.float32) for _ in self.model.cross_names
        ]
        if n:
            for a, b in zip(kv, old):
                a[:n, :, : self.capacity] = b[:n]
            for a, b in zip(cross, self.cross):
                a[:n, :, : self.enc_len] = b[:n]
        self.self_kv, self.cross = kv, cross

    def _put_row(self, n: int, cross: list, s: int) -> None:
        """Row n takes these cross key/values ([H, s, D] each) and an empty self cache."""
        for a, b in zip(self.cross, cross):
            a[n, :, :s] = b
            a[n, :, s:] = 0.0
        for a in self.self_kv:  # a masked slot must hold finite numbers: the mask is additive
            a[n] = 0.0

    def _move_row(self, src: int, dst: int) -> None:
        """Row src's key/values into row dst."""
        for a in (*self.self_kv, *self.cross):
            a[dst] = a[src]

    def _move_slots(self, r: int, src: list[int], dst: list[int]) -> None:
        """Row r's self key/values in slots src into slots dst (ascending; dst[j] <= src[j])."""
        for s, d in zip(src, dst):
            for a in self.self_kv:
                a[r, :, d] = a[r, :, s]

    def _clear(self, r: int, lo: int, hi: int) -> None:
        """Slots lo..hi of row r no longer hold anything: zeroed."""
        if hi <= lo:  # nothing to clear (a plain step's rewind): skip the per-layer loop
            return
        for a in self.self_kv:
            a[r, :, lo:hi] = 0.0

    def _call(self, feed: dict, lengths: np.ndarray, counts: np.ndarray, counter, reduce: bool):
        """The decoder on feed (host arrays) and the first N rows' key/values; the real new
        tokens' key/values go into their slots ([H, T_r, D] per row and layer). Logits, or
        with reduce their greedy picks (see run)."""
        if self.in_place_writes:
            logits = self._call_in_place(feed, lengths, counts, counter)
            return pick(logits) if reduce else logits
        n = len(lengths)
        feed.update((k, a[:n]) for k, a in zip(self.model.self_names, self.self_kv))
        feed.update((k, a[:n]) for k, a in zip(self.model.cross_names, self.cross))
        out = self.model.run("decoder", feed, counter)
        for r in range(n):
            lo, k = int(lengths[r]), int(counts[r])
            for a, p in zip(self.self_kv, out[1:]):
                a[r, :, lo : lo + k] = p[r, :, :k]
        return pick(out[0]) if reduce else out[0]

    def _call_in_place(self, feed: dict, lengths, counts, counter) -> np.ndarray:
        """The decoder writing the new key/values into the bound arrays itself (_bound_call):
        no buffer is copied; the pads' slots are zeroed after (the path above never writes
        them)."""
        n, t = len(lengths), feed[lay.INPUT_IDS].shape[1]
        logits = np.empty((n, t, self.model.vocab_size), np.float32)  # ORT writes it: no copy
        self._bound_call(feed, n, counter, logits)
        self._clear_pads(lengths, counts, t)
        return logits

    def _bound_call(self, feed: dict, n: int, counter, host_logits: np.ndarray | None = None):
        """The decoder with each layer's first n rows bound both as its past input and as its
        kv_cache output (the graph's scatter writes every new token, pads included, into its
        slot in place); the binding is kept while the arrays and n stay. The logits: written
        into host_logits [n, T, V] when given, else an OrtValue the session allocated."""
        logits = None if host_logits is None else _Host(host_logits, n)
        binding, outputs = self._binding, {lay.LOGITS: logits}
        if binding is None or self._binding_rows != n:  # arrays or rows changed
            feed, outputs = self._bound_io(feed, n, logits)
            binding, self._binding = self.model.sessions["decoder"].io_binding(), None
        got = self.model.run("decoder", feed, counter, outputs, binding)
        # kept while n stays; its logits output still names this call's array, so the next
        # call binds its own before running (nothing reads the kept one's outputs)
        self._binding, self._binding_rows = binding, n
        return got[0] if host_logits is None else host_logits

    def _bound_io(self, feed: dict, n: int, logits=None) -> tuple[dict, dict]:
        """feed with each layer's first n rows added, and the outputs: the logits (logits:
        where to write them, None: allocated by the session), each kv_cache.* written into the
        array it came from."""
        m = self.model
        arrays = zip((*m.self_names, *m.cross_names), (*self.self_kv, *self.cross))
        feed.update((k, self._rows_of(a, n)) for k, a in arrays)
        outputs = {lay.LOGITS: logits}
        outputs.update((k, self._rows_of(a, n)) for k, a in zip(m.full_names, self.self_kv))
        return feed, outputs

    @staticmethod
    def _rows_of(array: np.ndarray, n: int):
        """The first n rows of a key/value array, to bind by address."""
        return _Host(array, n)

    def _clear_pads(self, lengths: np.ndarray, counts: np.ndarray, t: int) -> None:
        """Zero the slots a bound call wrote for each row's pads (as the copying path never
        writes them), so both paths hold the same bits."""
        for r in range(len(lengths)):
            self._clear(r, int(lengths[r] + counts[r]), int(lengths[r]) + t)

    # -- rows ---------------------------------------------------------------------------------

    def reserve(self, rows: int, enc_len: int) -> None:
        """Room for `rows` active rows and encoder length enc_len, in one reallocation (rows
        round up to a power of two, as add() doubles them)."""
        want = max(len(self.lengths), 1 << (rows - 1).bit_length())
        if want > len(self.lengths) or enc_len > self.enc_len:
            self._alloc(want, self.capacity, max(enc_len, self.enc_len))

    def add(self, owner, cross: list[np.ndarray], enc_mask: np.ndarray) -> None:
        """A new row for owner: its cross key/values (2 per layer, [H, S, D]) and mask [S]."""
        n, s = len(self.owners), len(enc_mask)
        rows = len(self.lengths) * (2 if n == len(self.lengths) else 1)
        if rows > len(self.lengths) or s > self.enc_len:
            self._alloc(rows, self.capacity, max(s, self.enc_len))
        self._put_row(n, cross, s)
        self.enc_mask[n] = 0
        self.enc_mask[n, :s] = enc_mask
        self.lengths[n] = self.trunk[n] = 0
        # a row left by a request that failed mid-tree may hold tree positions: start plain
        self.pos[n] = np.arange(self.capacity)
        self.parent[n] = self.pos[n] - 1
        self.owners.append(owner)

    def remove(self, owner) -> None:
        """Free owner's row: the last active row moves into it (one row copied)."""
        r, last = self.owners.index(owner), len(self.owners) - 1
        if r != last:
            self._move_row(last, r)
            for a in (self.enc_mask, self.lengths, self.trunk, self.pos, self.parent):
                a[r] = a[last]
            self.owners[r] = self.owners[last]
        self.owners.pop()

    def length(self, owner) -> int:
        """Slots of owner's row in use."""
        return int(self.lengths[self.owners.index(owner)])

    def rewind(self, owner, length: int) -> None:
        """Keep owner's first `length` slots (a plain sequence): rejected drafts are dropped by
        the length (_clear: zeroed here, so nothing non-finite lingers behind the mask)."""
        r = self.owners.index(owner)
        self._cut(r, min(length, int(self.lengths[r])))

    def keep(self, owner, start: int, slots: list[int]) -> None:
        """Commit one path: owner's row keeps its first `start` slots, then `slots` (ascending,
        each the child of the one before) moved down to follow them; everything else is
        dropped. A plain continuation (slots start, start+1, ...) moves nothing: a rewind."""
        r = self.owners.index(owner)
        moved = [(s, start + j) for j, s in enumerate(slots) if s != start + j]
        if moved:
            self._move_slots(r, *map(list, zip(*moved)))
        self._cut(r, start + len(slots))

    def _cut(self, r: int, length: int) -> None:
        """Row r becomes a plain sequence of `length` slots; slots past it are cleared."""
        old = int(self.lengths[r])
        self._clear(r, length, old)
        lo = min(int(self.trunk[r]), length)
        self.pos[r, lo:old] = np.arange(lo, old)
        self.parent[r, lo:old] = np.arange(lo - 1, old - 1)
        self.lengths[r] = self.trunk[r] = length

    def nbytes(self, rows: int | None = None, cap: int | None = None, enc: int | None = None):
        """Bytes of the arrays for rows x cap slots x enc (default: as allocated now)."""
        rows = len(self.lengths) if rows is None else rows
        cap = self.capacity if cap is None else cap
        enc = self.enc_len if enc is None else lay.enc_width(enc)
        layers = len(self.model.self_names)  # 2 per layer, as cross
        return rows * layers * self.h * self.d * 4 * (cap + enc)

    def reset(self) -> None:
        """Forget every row and start over small (after a failed operation; nothing kept)."""
        self.owners = []
        self.self_kv = []
        self._alloc(1, lay.SLOT_CHUNK, 1)

    def shrink(self) -> None:
        """Back to a small allocation once no row is active (memory goes back to the host, or to
        ORT's device arena, which keeps it; later calls stop attending over a long capacity)."""
        if not self.owners and (self.capacity > lay.SLOT_CHUNK or len(self.lengths) > 1):
            self.reset()

    def run(
        self,
        tokens: np.ndarray,
        counts: np.ndarray,
        counter: Counter,
        parents: list | None = None,
        reduce: bool = False,
    ):
        """Decoder on tokens [N, T] after each row's cached slots; row r's first counts[r]
        tokens are real, the rest padding (never kept: past the row's length). Returns logits
        [N, T, V]; with reduce, what accepting needs: greedy ids [N, T] and whether each pick is NaN/inf
        (a device back end then copies [N, T] instead of the logits).

        parents[r] (optional, None = a plain continuation): the slot of each real token's
        parent, new token i taking slot lengths[r] + i. A token then attends to the row's trunk
        and its own ancestors only, at position parent's + 1: a tree of drafts in one row. Its
        slots stay uncommitted until keep() (or rewind()) picks one path."""
        # the shape rule: >= 2 tokens per row (older graphs), or per call (model.min_tokens)
        want = MIN_TOKENS if tokens.size < MIN_TOKENS else self.model.min_tokens
        if tokens.shape[1] < want:
            pad = np.full((len(tokens), want - tokens.shape[1]), self.model.pad_id)
            tokens = np.concatenate([tokens, pad], axis=1)
        n, t = tokens.shape
        need = int((self.lengths[:n] + t).max())
        if need > self.capacity:
            self._alloc(len(self.lengths), lay.slot_width(need), self.enc_len)
        lengths = self.lengths[:n].copy()
        slots = lengths[:, None] + np.arange(t)  # [N, T]: new token i takes slot lo + i
        positions = slots.copy()  # a tree row's tokens take their depth instead
        mask, cols = self._mask(lengths, t)
        for r, par in enumerate(parents or ()):
            if par is not None:
                self._tree_row(r, par, mask[r], positions[r], cols[r])
        feed = {
            lay.INPUT_IDS: tokens,
            lay.POSITIONS: positions,
            lay.PAST_POSITIONS: self.pos[:n],  # [N, C]
            lay.ATTENTION_MASK: mask,
            lay.ENCODER_ATTENTION_MASK: self.enc_mask[:n],
        }
        if self.model.in_place:
            feed[lay.NEW_SLOTS] = slots
        logits = self._call(feed, lengths, counts, counter, reduce)
        for r in range(n):
            lo, k = int(lengths[r]), int(counts[r])
            if parents is None or parents[r] is None:
                if self.trunk[r] == lo:  # a plain sequence stays one
                    self.trunk[r] = lo + k
            else:
                self.pos[r, lo : lo + k] = positions[r, :k]
                self.parent[r, lo : lo + k] = parents[r]
        self.lengths[:n] += counts
        return logits

    def _mask(self, lengths: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Attention mask of a plain call and the mask column of each new token [N, T]: each
        row's cached slots, then causal over its new tokens. In-place graphs (one buffer): the
        new tokens' columns are their slots, mask [N, T, C]; older graphs take the new tokens
        after the capacity, mask [N, T, C + T]."""
        n, c = len(lengths), self.capacity
        width = c if self.model.in_place else c + t
        mask = np.zeros((n, t, width), self.model.mask_dtype)
        mask[:, :, :c] = (np.arange(c) < lengths[:, None])[:, None, :]
        cols = (lengths[:, None] if self.model.in_place else np.full((n, 1), c)) + np.arange(t)
        causal = _causal(t)  # [1, T, T]
        mask[np.arange(n)[:, None, None], np.arange(t)[None, :, None], cols[:, None, :]] = causal
        return mask, cols

    def _tree_row(self, r: int, parents, mask, positions: np.ndarray, cols: np.ndarray) -> None:
        """Row r's mask [T, width] and positions [T] for new tokens with these parent slots:
        each sees the trunk and its ancestors (walked through the uncommitted slots); cols[i]
        is new token i's mask column."""
        lo, base = int(self.lengths[r]), int(self.trunk[r])
        mask[: len(parents)] = False
        mask[: len(parents), :base] = True
        for i, p in enumerate(parents):
            p = int(p)
            mask[i, cols[i]] = True
            positions[i] = (positions[p - lo] if p >= lo else self.pos[r, p]) + 1 if p >= 0 else 0
            while p >= base:  # ancestors among the uncommitted slots, old and new
                if p >= lo:
                    mask[i, cols[p - lo]] = True
                    p = int(parents[p - lo])
                else:
                    mask[i, p] = True
                    p = int(self.parent[r, p])


@functools.lru_cache(maxsize=64)
def _causal(t: int) -> np.ndarray:
    """[1, t, t]: new token i sees new tokens 0..i (read-only, shared by every call)."""
    causal = np.tril(np.ones((t, t), bool))[None]
    causal.flags.writeable = False
    return causal


class _Host:
    """The first n rows of a C-contiguous float32 host array, bound by address (no copy)."""

    __slots__ = ("array", "n")

    def __init__(self, array: np.ndarray, n: int):
        self.array, self.n = array, n

    def bind(self, binding, name: str, output: bool = False) -> None:
        """Bind these rows as input (or output) `name` of an IO binding."""
        bind = binding.bind_output if output else binding.bind_input
        bind(name, "cpu", 0, np.float32, [self.n, *self.array.shape[1:]], self.array.ctypes.data)
