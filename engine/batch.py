"""Continuous batching: every active request's verify row in one main decoder call.

Built on the masked, positioned decoder graph (`decoder_masked_model.onnx`: an explicit
self-attention mask and positions in, the new tokens' key/values out) and the cross key/value
graph (`cross_kv_model.onnx`), so rows of different lengths share a call and a rewind is a length.

Shapes: N active rows (one per request and model), T new tokens per row this step (padded to the
longest), C cache capacity in slots, S encoder length (padded), H heads, D d_kv, V vocab.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .accept import accept
from .errors import CancelledError, EngineError, InputError, ModelFileError, NonFiniteLogitsError
from .model import T5Model
from .options import MAX_DRAFT_TOKENS, MEMORY_SAFETY, available_memory
from .run import cut
from .stats import Counter
from .strategies import NEEDS_ASSISTANT
from .strategies.lookup import PromptLookup
from .tokenizer import text_pieces

MASKED_FILE = "decoder_masked_model.onnx"
CROSS_FILE = "cross_kv_model.onnx"
CHUNK = 32  # cache capacity grows in steps of this many slots (one copy every CHUNK tokens)
KV = ("key", "value")
STEP_FEEDS = (
    "input_ids",
    "positions",
    "past_positions",
    "attention_mask",
    "encoder_attention_mask",
)
DEFAULT_BATCH_TOKENS = 256
# strategy="auto" when batched: draft tokens per request by the number of active requests (the
# largest key <= N applies; 0 = speculation off). The default keeps speculating: on 2 CPU cores it
# loses at most 2-4% at 8-16 requests on the 48M pycode main but gains 29% at 8 on a t5-large
# shape (README, "Batched"); `stairs-tune --batch-sizes` measures the table for a pair, and
# turns speculation off where it loses there.
DEFAULT_AUTO_K = {1: 4, 4: 3}
DEFAULT_AUTO_K_CUDA = {1: 4}  # H100: speculation paid at every batch size measured (1-16)
MAX_BATCH_TOKENS = 65536


class MaskedDecoder:
    """The masked decoder and cross key/value sessions of one exported folder, checked."""

    def __init__(self, model: T5Model):
        self.model = model
        missing = [f for f in (MASKED_FILE, CROSS_FILE) if not (model.folder / f).is_file()]
        if missing:
            raise ModelFileError(
                f"{model.folder}: missing {', '.join(missing)}; batching needs the masked decoder"
                " graphs (export the folder again with this version of stairs-export)"
            )
        self.dec = model.open_session(MASKED_FILE)
        self.cross = model.open_session(CROSS_FILE)
        layers = range(model.num_decoder_layers)
        self.self_names = [f"past_key_values.{i}.decoder.{kv}" for i in layers for kv in KV]
        self.cross_names = [f"cross_key_values.{i}.{kv}" for i in layers for kv in KV]
        ins = {i.name: i.type for i in self.dec.get_inputs()}
        outs = [o.name for o in self.dec.get_outputs()]
        want_in = {*STEP_FEEDS, *self.self_names, *self.cross_names}
        want_out = ["logits", *(n.replace("past_key_values", "present") for n in self.self_names)]
        if set(ins) != want_in or outs != want_out:
            raise ModelFileError(
                f"{model.folder / MASKED_FILE}: not this engine's masked decoder for"
                f" {model.num_decoder_layers} layers (inputs or outputs differ)"
            )
        cross_in = [i.name for i in self.cross.get_inputs()]
        if (
            cross_in != ["encoder_hidden_states"]
            or [o.name for o in self.cross.get_outputs()] != self.cross_names
        ):
            raise ModelFileError(
                f"{model.folder / CROSS_FILE}: not this engine's cross key/value graph for"
                f" {model.num_decoder_layers} layers"
            )
        self.mask_dtype = {"tensor(bool)": np.bool_, "tensor(float)": np.float32}.get(
            ins["attention_mask"], np.int64
        )

    def cross_kv(self, enc: np.ndarray, counter: Counter) -> list[np.ndarray]:
        """Cross-attention key/values of encoder states enc [B, S, M]: 2 per layer, [B, H, S, D]."""
        t = time.perf_counter()
        out = self.cross.run(None, {"encoder_hidden_states": enc})
        counter.session_s += time.perf_counter() - t
        return out


class BatchCache:
    """Decoder state of many rows of one model; the only place its key/values change.

    Active rows are packed at the front (row r belongs to owners[r]), so every feed is a
    contiguous view arr[:N] of preallocated arrays: no past is copied between calls, and a
    rewind sets a row's length. Self key/values [R, H, C, D] per layer, cross key/values
    [R, H, S, D] with enc_mask [R, S]. A device back end would keep these methods on OrtValues.
    """

    def __init__(self, dec: MaskedDecoder, rows: int = 1):
        self.dec, self.h, self.d = dec, dec.model.num_heads, dec.model.d_kv
        self.owners: list = []
        self.self_kv: list[np.ndarray] = []
        self._alloc(rows, CHUNK, 1)

    def _alloc(self, rows: int, cap: int, enc_len: int) -> None:
        """(Re)allocate rows x cap slots x enc_len, keeping the active rows' contents."""
        n, old = len(self.owners), self.self_kv  # [] after shrink(): nothing to keep
        kv = [np.zeros((rows, self.h, cap, self.d), np.float32) for _ in self.dec.self_names]
        cross = [
            np.zeros((rows, self.h, enc_len, self.d), np.float32) for _ in self.dec.cross_names
        ]
        enc_mask = np.zeros((rows, enc_len), np.int64)
        lengths, trunk = np.zeros(rows, np.int64), np.zeros(rows, np.int64)
        pos = np.tile(np.arange(cap), (rows, 1))  # [R, C], writable (tree rows set their own)
        parent = pos - 1  # [R, C]: a plain sequence, each slot's parent the slot before
        if n:
            c = self.capacity
            for a, b in zip(kv, old):
                a[:n, :, :c] = b[:n]
            for a, b in zip(cross, self.cross):
                a[:n, :, : self.enc_len] = b[:n]
            enc_mask[:n, : self.enc_len] = self.enc_mask[:n]
            lengths[:n], trunk[:n] = self.lengths[:n], self.trunk[:n]
            pos[:n, :c], parent[:n, :c] = self.pos[:n], self.parent[:n]
        self.self_kv, self.cross, self.enc_mask = kv, cross, enc_mask
        self.lengths, self.trunk, self.pos, self.parent = lengths, trunk, pos, parent
        self.capacity, self.enc_len = cap, enc_len

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
        for a, b in zip(self.cross, cross):
            a[n, :, :s] = b
            a[n, :, s:] = 0.0
        for a in self.self_kv:  # a masked slot must hold finite numbers: the mask is additive
            a[n] = 0.0
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
            for a in (*self.self_kv, *self.cross):
                a[r] = a[last]
            for a in (self.enc_mask, self.lengths, self.trunk, self.pos, self.parent):
                a[r] = a[last]
            self.owners[r] = self.owners[last]
        self.owners.pop()

    def length(self, owner) -> int:
        """Slots of owner's row in use."""
        return int(self.lengths[self.owners.index(owner)])

    def rewind(self, owner, length: int) -> None:
        """Keep owner's first `length` slots (a plain sequence): rejected drafts are dropped by
        the length (their slots zeroed, so nothing non-finite lingers behind the mask)."""
        r = self.owners.index(owner)
        self._cut(r, min(length, int(self.lengths[r])))

    def keep(self, owner, slots: list[int]) -> None:
        """Commit a path of a tree: owner's row keeps its trunk plus `slots` (ascending, each the
        child of the one before), moved down to follow the trunk; every other branch is dropped.
        Moves at most one draft's worth of slots (no past is copied)."""
        r = self.owners.index(owner)
        base = int(self.trunk[r])
        for j, s in enumerate(slots):
            if s != base + j:
                for a in self.self_kv:
                    a[r, :, base + j] = a[r, :, s]
        self._cut(r, base + len(slots))

    def _cut(self, r: int, length: int) -> None:
        """Row r becomes a plain sequence of `length` slots; slots past it are zeroed."""
        old = int(self.lengths[r])
        for a in self.self_kv:
            a[r, :, length:old] = 0.0
        lo = min(int(self.trunk[r]), length)
        self.pos[r, lo:old] = np.arange(lo, old)
        self.parent[r, lo:old] = np.arange(lo - 1, old - 1)
        self.lengths[r] = self.trunk[r] = length

    def nbytes(self, rows: int | None = None, cap: int | None = None, enc: int | None = None):
        """Bytes of the arrays for rows x cap slots x enc (default: as allocated now)."""
        rows = len(self.lengths) if rows is None else rows
        cap = self.capacity if cap is None else cap
        enc = self.enc_len if enc is None else enc
        layers = len(self.dec.self_names)  # 2 per layer, as cross
        return rows * layers * self.h * self.d * 4 * (cap + enc)

    def shrink(self) -> None:
        """Back to a small allocation once no row is active (memory goes back, and later calls
        stop attending over a long request's capacity)."""
        if not self.owners and (self.capacity > CHUNK or len(self.lengths) > 1):
            self.self_kv = []
            self._alloc(1, CHUNK, 1)

    def run(
        self,
        tokens: np.ndarray,
        counts: np.ndarray,
        counter: Counter,
        parents: list | None = None,
    ) -> np.ndarray:
        """Decoder on tokens [N, T] after each row's cached slots; row r's first counts[r]
        tokens are real, the rest padding (never cached). Returns logits [N, T, V].

        parents[r] (optional, None = a plain continuation): the slot of each real token's
        parent, new token i taking slot lengths[r] + i. A token then attends to the row's trunk
        and its own ancestors only, at position parent's + 1: a tree of drafts in one row. Its
        slots stay uncommitted until keep() (or rewind()) picks one path."""
        n, t = tokens.shape
        need = int((self.lengths[:n] + t).max())
        if need > self.capacity:
            self._alloc(len(self.lengths), -(-need // CHUNK) * CHUNK, self.enc_len)
        c, lengths = self.capacity, self.lengths[:n].copy()
        # mask [N, T, C + T]: each row's cached slots, then causal over its new tokens
        mask = np.empty((n, t, c + t), self.dec.mask_dtype)
        mask[:, :, :c] = (np.arange(c) < lengths[:, None])[:, None, :]
        mask[:, :, c:] = np.tril(np.ones((t, t), bool))
        positions = lengths[:, None] + np.arange(t)  # [N, T]
        for r, par in enumerate(parents or ()):
            if par is not None:
                self._tree_row(r, par, mask[r], positions[r])
        feed = {
            "input_ids": tokens,
            "positions": positions,
            "past_positions": self.pos[:n],  # [N, C]
            "attention_mask": mask,
            "encoder_attention_mask": self.enc_mask[:n],
        }
        feed.update((k, a[:n]) for k, a in zip(self.dec.self_names, self.self_kv))
        feed.update((k, a[:n]) for k, a in zip(self.dec.cross_names, self.cross))
        t0 = time.perf_counter()
        out = self.dec.dec.run(None, feed)
        counter.session_s += time.perf_counter() - t0
        # the real new tokens' key/values go into their slots: [H, T_r, D] per row and layer
        for r in range(n):
            lo, k = int(lengths[r]), int(counts[r])
            for a, p in zip(self.self_kv, out[1:]):
                a[r, :, lo : lo + k] = p[r, :, :k]
            if parents is None or parents[r] is None:
                if self.trunk[r] == lo:  # a plain sequence stays one
                    self.trunk[r] = lo + k
            else:
                self.pos[r, lo : lo + k] = positions[r, :k]
                self.parent[r, lo : lo + k] = parents[r]
        self.lengths[:n] += counts
        return out[0]

    def _tree_row(self, r: int, parents, mask: np.ndarray, positions: np.ndarray) -> None:
        """Row r's mask [T, C + T] and positions [T] for new tokens with these parent slots:
        each sees the trunk and its ancestors (walked through the uncommitted slots)."""
        c, lo, base = self.capacity, int(self.lengths[r]), int(self.trunk[r])
        mask[: len(parents), :c] = np.arange(c) < base
        mask[: len(parents), c:] = False
        for i, p in enumerate(parents):
            p = int(p)
            mask[i, c + i] = True
            positions[i] = (positions[p - lo] if p >= lo else self.pos[r, p]) + 1 if p >= 0 else 0
            while p >= base:  # ancestors among the uncommitted slots, old and new
                if p >= lo:
                    mask[i, c + p - lo] = True
                    p = int(parents[p - lo])
                else:
                    mask[i, p] = True
                    p = int(self.parent[r, p])


@dataclass(eq=False)  # identity: requests are found in the caches' owner lists
class Request:
    """One request under the scheduler. seq = [decoder start] + emitted tokens."""

    ids: list[int]  # encoder input
    strategy: str
    options: dict
    max_new_tokens: int
    seq: list[int]
    counter: Counter = field(default_factory=Counter)
    done: bool = False
    cancelled: bool = False
    error: Exception | None = None
    k: int = 0  # current draft length (per branch)
    auto_k: dict | None = None  # strategy auto: draft length by active requests (else k)
    branches: int = 1  # tree: paths drafted per step
    threshold: float | None = None  # assisted/stairs: stop drafting below this confidence
    stage2_tokens: int = 0  # staged: n-gram tokens the assistant checks per call
    want: int = 0  # draft length this step
    draft: list[int] = field(default_factory=list)  # linear drafts this step
    paths: list[list[int]] = field(default_factory=list)  # tree: B paths this step
    fed: list[list[int]] = field(default_factory=list)  # tree: assistant slots of each path
    stage2: list[int] = field(default_factory=list)  # staged: n-gram tokens in this call
    lookup: PromptLookup | None = None  # lookup's drafter, staged's second stage
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # token lists, None at end
    finished: threading.Event = field(default_factory=threading.Event)
    t0: float = field(default_factory=time.perf_counter)
    t_end: float | None = None

    @property
    def remaining(self) -> int:
        """Tokens it may still emit."""
        return self.max_new_tokens - (len(self.seq) - 1)

    def max_length(self) -> int:
        """The most decoder slots it can need: output, pending token and a full draft tree."""
        k = max(self.k, *(self.auto_k or {0: 0}).values())
        return self.max_new_tokens + 2 + self.branches * k

    def width(self, k: int) -> int:
        """Tokens of its main-call row with k draft tokens per path."""
        return 1 + self.branches * k

    def finish(self, error: Exception | None = None) -> None:
        """End it (once): record the error, the time, and tell every reader."""
        if self.finished.is_set():
            return
        self.error = self.error or error
        self.done, self.t_end = True, time.perf_counter()
        self.out.put(None)
        self.finished.set()

    def draft_len(self, active: int) -> int:
        """Draft tokens this step: k, or with auto the table's entry for `active` requests."""
        if self.auto_k is None:
            return self.k
        return self.auto_k[max([n for n in self.auto_k if n <= active], default=min(self.auto_k))]

    def stats(self):
        """Frozen statistics (total_s: from submission to its end, or to now)."""
        self.counter.new_tokens = len(self.seq) - 1
        self.counter.total_s = (self.t_end or time.perf_counter()) - self.t0
        return self.counter.freeze()


class Scheduler:
    """Packs every active request's verify row into one main call per step (continuous batching).

    A step: retire finished or cancelled requests -> admit waiting ones (encoders batched) ->
    draft (the assistant's steps batched over requests) -> verify (one main call) -> accept and
    rewind per request. A main call holds at most max_batch_tokens rows x padded tokens (drafts
    are shortened to fit; a request alone always joins, so nothing waits forever); a request
    joins only if the caches' worst case with it fits in memory_bytes (None: the machine's
    available memory).
    """

    def __init__(
        self,
        main: MaskedDecoder,
        assistant: MaskedDecoder | None,
        max_batch_tokens: int = DEFAULT_BATCH_TOKENS,
        memory_bytes: int | None = None,
    ):
        self.main_model = main.model
        self.asst_model = assistant.model if assistant is not None else None
        self.main = BatchCache(main)
        self.asst = BatchCache(assistant) if assistant is not None else None
        self.max_batch_tokens, self.memory_bytes = max_batch_tokens, memory_bytes
        self.waiting: list[Request] = []
        self.active: list[Request] = []
        # (rows, padded tokens) of the latest main calls; call_count counts all of them
        self.calls: collections.deque[tuple[int, int]] = collections.deque(maxlen=4096)
        self.call_count = 0

    def add(self, req: Request) -> None:
        """Queue a request; it joins at the next step the token budget and memory allow."""
        o, name = req.options, req.strategy
        # stairs: its staircase's rows are prefixes of one draft; under the causal mask the
        # longest row alone gives every row's target, so it is one row here (either layout)
        req.k = o["batch_size"] - 1 if name == "stairs" else int(o.get("draft_tokens", 0))
        req.branches = o["branches"] if name == "tree" else 1
        req.threshold = o.get("threshold")
        if name == "lookup":
            req.lookup = PromptLookup(np.asarray(req.ids), o["max_ngram"], o["min_ngram"])
        elif name == "staged":
            req.lookup = PromptLookup(np.asarray(req.ids), o["max_ngram"])
            req.stage2_tokens = o["stage2_tokens"]
        self.waiting.append(req)

    @property
    def busy(self) -> bool:
        """Whether any request is waiting or active."""
        return bool(self.waiting or self.active)

    def step(self) -> None:
        """One scheduler step. A failure while admitting fails only the joining requests; one
        inside a draft or verify call fails the requests that call served."""
        self._retire()
        self._admit()
        try:
            if self.active:
                self._draft()
                self._verify()
        except Exception as exc:  # noqa: BLE001 - a broken call must not hang its callers
            for r in self.active:
                r.error = r.error or as_engine_error(exc)
        self._retire()

    def fail_all(self, exc: Exception) -> None:
        """End every waiting and active request with exc (the worker's last resort)."""
        for r in [*self.waiting, *self.active]:
            r.error = r.error or as_engine_error(exc)
        for r in self.waiting:
            r.finish()
        self.waiting.clear()
        self._retire()

    # -- phases ---------------------------------------------------------------------------------

    def _fits(self, joining: list[Request], r: Request) -> bool:
        """Whether the caches' worst case (every request at its longest) fits with r joined."""
        reqs = [*self.active, *joining, r]
        cap = max(q.max_length() for q in reqs)
        enc = max(len(q.ids) for q in reqs)
        rows = 1 << (len(reqs) - 1).bit_length()  # the caches double their rows
        need = self.main.nbytes(rows, cap, enc)
        now = self.main.nbytes()
        if self.asst is not None:
            need += self.asst.nbytes(rows, cap, enc)
            now += self.asst.nbytes()
        logits = rows * (1 + max(q.max_length() - q.max_new_tokens for q in reqs))
        need += logits * self.main_model.vocab_size * 4
        budget = self.memory_bytes or ((available_memory() or 1 << 62) + now)
        return need * MEMORY_SAFETY <= budget

    def _admit(self) -> None:
        rows = len(self.active)
        width = max((r.width(r.draft_len(rows)) for r in self.active), default=0)
        joining: list[Request] = []
        while self.waiting:
            r = self.waiting[0]
            if r.cancelled:
                self.waiting.pop(0).finish(CancelledError("cancelled before it started"))
                continue
            w = max(width, r.width(r.draft_len(rows + 1)))
            alone = not rows and not joining
            if (rows + 1) * w > self.max_batch_tokens and not alone:
                break
            if not self._fits(joining, r):
                if not alone:
                    break  # waits for memory to free up
                self.waiting.pop(0).finish(
                    InputError(
                        f"the decoder caches for this request ({len(r.ids)} input tokens, up to"
                        f" {r.max_new_tokens} new) do not fit in the memory available; lower"
                        " max_new_tokens or the input, or set Engine.limits.memory_bytes"
                    )
                )
                continue
            self.waiting.pop(0)
            joining.append(r)
            rows, width = rows + 1, w
        if not joining:
            return
        try:
            self._encode(joining)
        except Exception as exc:  # noqa: BLE001 - only the joining requests fail
            for r in joining:
                for cache in (self.main, self.asst):
                    if cache is not None and r in cache.owners:
                        cache.remove(r)
                r.finish(as_engine_error(exc))
            return
        self.active.extend(joining)

    def _encode(self, joining: list[Request]) -> None:
        """Encoders of the joining requests, batched (padded), and their cross key/values. The
        assistant's only for requests that draft now (auto may start with speculation off)."""
        t = time.perf_counter()
        n = len(self.active) + len(joining)
        self._encode_into(self.main_model, self.main, joining)
        drafting = [r for r in joining if r.strategy in NEEDS_ASSISTANT and r.draft_len(n) > 0]
        if drafting and self.asst is not None:
            self._encode_into(self.asst_model, self.asst, drafting)
        dt = time.perf_counter() - t
        for r in joining:
            r.counter.encoder_s += dt

    @staticmethod
    def _encode_into(model: T5Model, cache: BatchCache, reqs: list[Request]) -> None:
        s = max(len(r.ids) for r in reqs)
        ids = np.full((len(reqs), s), model.pad_id, np.int64)  # [B, S]
        mask = np.zeros((len(reqs), s), np.int64)
        for i, r in enumerate(reqs):
            ids[i, : len(r.ids)], mask[i, : len(r.ids)] = r.ids, 1
        c = Counter()
        enc = model._run("encoder", {"input_ids": ids, "attention_mask": mask}, c)[0]
        cross = cache.dec.cross_kv(enc, c)  # 2 per layer, [B, H, S, D]
        cache.reserve(len(cache.owners) + len(reqs), s)
        for i, r in enumerate(reqs):
            cache.add(r, [a[i, :, : len(r.ids)] for a in cross], mask[i, : len(r.ids)])
            r.counter.session_s += c.session_s

    def _draft(self) -> None:
        # the token budget caps every row's draft: N rows x (1 + B x K) tokens per main call
        n_active = len(self.active)
        cap = max(0, self.max_batch_tokens // n_active - 1)
        for r in self.active:
            r.draft, r.paths, r.fed = [], [], []
            r.want = min(r.draft_len(n_active), cap // r.branches, r.remaining - 1)
            if r.strategy == "lookup":
                t = time.perf_counter()
                r.draft = r.lookup.propose(r.seq, r.want)
                r.counter.draft_s += time.perf_counter() - t
        if self.asst is None:
            return
        # auto turned speculation on for requests whose assistant has not run yet: encode them
        late = [
            r
            for r in self.active
            if r.strategy in NEEDS_ASSISTANT and r.want and r not in self.asst.owners
        ]
        if late:
            t = time.perf_counter()
            self._encode_into(self.asst_model, self.asst, late)
            for r in late:
                r.counter.encoder_s += time.perf_counter() - t
        # row i of every assistant call is cache row i; its owners all draft with the assistant
        rows = list(self.asst.owners)
        t, c = time.perf_counter(), Counter()
        while True:
            # one assistant call per round: every drafting row's next tokens (a tree: a token
            # per path, each after its own path)
            feeds = [self._draft_feed(r) for r in rows]
            if not any(f for f, _ in feeds):
                break
            tokens, counts = self._pack([f for f, _ in feeds], self.asst_model.pad_id)
            tree = [p for _, p in feeds] if any(p is not None for _, p in feeds) else None
            logits = self.asst.run(tokens, counts, c, tree)  # [N', T, V]
            for r, (f, _), x in zip(rows, feeds, logits):
                if f:
                    self._draft_take(r, x[: len(f)], len(f))
        dt = time.perf_counter() - t
        for r in rows:
            if r.want:
                r.counter.draft_s += dt
                r.counter.session_s += c.session_s

    def _draft_feed(self, r: Request) -> tuple[list[int], list[int] | None]:
        """The tokens r's assistant row takes this round, with their parent slots for a tree
        (None: they continue the row). Nothing once its draft is complete."""
        if r.error is not None or not r.want:
            return [], None
        seen = self.asst.length(r)
        if r.strategy == "tree":
            if not r.paths:  # depth 0: what the assistant has not seen (1 or 2 tokens)
                return r.seq[seen:], None
            if len(r.paths[0]) >= r.want:
                return [], None
            # depth d: each path's last token after that path (depth 1: after the trunk)
            parents = [f[-1] if f else seen - 1 for f in r.fed]
            for b, f in enumerate(r.fed):
                f.append(seen + b)
            return [p[-1] for p in r.paths], parents
        if len(r.draft) >= r.want:
            return [], None
        g = []  # staged: n-gram tokens the assistant checks in this call
        if r.strategy == "staged":
            g = r.lookup.propose(r.seq + r.draft, min(r.stage2_tokens, r.want - len(r.draft) - 1))
        r.stage2 = g
        return (r.seq + r.draft)[seen:] + g, None

    def _draft_take(self, r: Request, logits: np.ndarray, fed: int) -> None:
        """r's assistant logits [F, V] for the tokens fed: extend its draft or paths."""
        r.counter.draft_calls += 1
        if r.strategy == "tree" and not r.paths:  # depth 0: the top-b tokens start the paths
            last = logits[-1]  # [V]
            if not np.isfinite(last[last.argmax()]):  # as Run.argmax: a NaN wins argmax
                r.error = NonFiniteLogitsError("assistant", len(r.seq) - 1)
                return
            first = np.argpartition(-last, r.branches)[: r.branches]
            first = first[np.argsort(-last[first])]  # best first: path 0 is the greedy draft
            r.paths, r.fed = [[int(x)] for x in first], [[] for _ in first]
            return
        # read: a tree's next token on each of its B paths [B, V]; a linear draft's token after
        # the unseen tokens, then after each of the n-gram tokens g [G + 1, V]
        g = [] if r.strategy == "tree" else r.stage2
        if r.strategy != "tree":
            logits = logits[fed - len(g) - 1 :]
        a = logits.argmax(-1)
        if not np.isfinite(logits[np.arange(len(a)), a]).all():
            r.error = NonFiniteLogitsError("assistant", len(r.seq) - 1)
            return
        if r.strategy == "tree":
            for p, tok in zip(r.paths, a):
                p.append(int(tok))
            return
        m = accept(g, a)
        if len(g) > m:  # staged: the assistant's rejected n-gram tokens leave its row
            self.asst.rewind(r, self.asst.length(r) - len(g) + m)
        tok = int(a[m])
        r.draft += [*g[:m], tok]
        if r.threshold is not None:
            x = logits[m]
            if 1.0 / np.exp(x - x[tok]).sum() < r.threshold:  # softmax probability of tok
                r.want = len(r.draft)

    def _verify(self) -> None:
        owners = list(self.main.owners)
        # verify: row r = its pending token + its drafts (a tree: + every path, each after the
        # pending token), all rows in one main call
        rows, tree, at_paths = [], [], {}
        for r in owners:
            if r.error is not None:  # failed while drafting: retired after this step
                rows.append([])
                tree.append(None)
            elif r.paths:
                lo, k = self.main.length(r), len(r.paths[0])
                # row offsets of the pending token + path b, [K+1] each: path b's token t sits
                # at 1 + b*K + t, its parent one entry before it
                at_paths[r] = [np.r_[0, 1 + b * k + np.arange(k)] for b in range(len(r.paths))]
                rows.append([r.seq[-1], *(x for p in r.paths for x in p)])
                tree.append([lo - 1, *(lo + int(a[t]) for a in at_paths[r] for t in range(k))])
            else:
                rows.append([r.seq[-1], *r.draft])
                tree.append(None)
        tokens, counts = self._pack(rows, self.main_model.pad_id)  # [N, T], [N]
        t, c = time.perf_counter(), Counter()
        logits = self.main.run(tokens, counts, c, tree if any(tree) else None)  # [N, T, V]
        targets = logits.argmax(-1)  # [N, T]
        dt = time.perf_counter() - t
        self.calls.append(tokens.shape)
        self.call_count += 1
        for i, r in enumerate(owners):
            if r.error is not None:
                continue
            real = int(counts[i])
            if not np.isfinite(logits[i, np.arange(real), targets[i, :real]]).all():
                r.error = NonFiniteLogitsError("main", len(r.seq) - 1)
                continue
            draft, at = r.draft, np.arange(real)  # at: row positions of the pending + draft
            if r.paths:  # accept: the path with the longest agreeing prefix wins
                n_b = [accept(p, targets[i, a]) for p, a in zip(r.paths, at_paths[r])]
                j = int(np.argmax(n_b))
                draft, at = r.paths[j], at_paths[r][j]
            # accept: the longest agreeing prefix of the draft, plus the main model's next token
            n = accept(draft, targets[i, at])
            # rewind: both caches keep seq + draft[:n] (a tree: that path's slots, moved down)
            if r.paths:
                lo = self.main.length(r) - real
                self.main.keep(r, [lo + int(x) for x in at[: n + 1]])
                self.asst.keep(r, r.fed[j][:n])
            else:
                self.main.rewind(r, len(r.seq) + n)
                if self.asst is not None and r in self.asst.owners:
                    self.asst.rewind(r, len(r.seq) + n)
            rc = r.counter
            rc.main_calls += 1
            rc.batch_rows += len(owners)
            rc.drafted += len(draft)
            rc.accepted += n
            rc.verify_s += dt
            rc.session_s += c.session_s
            if r.options.get("schedule") == "heuristic" and draft:  # HF's: +2 after full accept
                r.k = min(r.k + 2, MAX_DRAFT_TOKENS) if n == len(draft) else max(1, r.k - 1)
            self._emit(r, [*draft[:n], int(targets[i, at[n]])])

    @staticmethod
    def _pack(rows: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded ids [N, T] and real lengths [N] of token lists."""
        counts = np.array([len(x) for x in rows], np.int64)
        tokens = np.full((len(rows), max(1, int(counts.max()))), pad, np.int64)
        for i, x in enumerate(rows):
            tokens[i, : len(x)] = x
        return tokens, counts

    def _emit(self, r: Request, tokens: list[int]) -> None:
        out, done = cut(tokens, r.remaining, self.main_model.eos_id)
        r.seq.extend(out)
        r.done = r.done or done
        r.out.put(out)

    def _retire(self) -> None:
        for r in [r for r in self.active if r.done or r.cancelled or r.error is not None]:
            self.active.remove(r)
            for cache in (self.main, self.asst):
                if cache is not None and r in cache.owners:
                    cache.remove(r)
            r.finish(CancelledError("cancelled") if r.cancelled and not r.done else None)
        if not self.active:
            for cache in (self.main, self.asst):
                if cache is not None:
                    cache.shrink()


def as_engine_error(exc: Exception) -> EngineError:
    """exc as an EngineError (ORT raises its own types), the original kept as the cause."""
    if isinstance(exc, EngineError):
        return exc
    err = EngineError(f"{type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


class Handle:
    """A submitted request: iterate for text pieces, tokens() for token lists, result() to wait,
    cancel() to stop it. One reader streams; result() may be called by any number of threads."""

    def __init__(self, req: Request, worker: Worker, decode, make_result):
        self._req, self._worker, self._decode = req, worker, decode
        self._make_result = make_result  # (token ids, stats) -> GenerationResult

    def tokens(self) -> Iterator[list[int]]:
        """Each step's accepted tokens as they come (EOS included if generated); raises the
        request's error at the end, CancelledError if it was cancelled."""
        while True:
            item = self._req.out.get()
            if item is None:
                self._req.out.put(None)  # the end stays visible to any later reader
                if self._req.error is not None:
                    raise self._req.error
                return
            yield item

    def __iter__(self) -> Iterator[str]:
        """Text pieces as tokens are accepted (held back while a UTF-8 character is partial)."""
        return text_pieces(self.tokens(), self._decode)

    def result(self, timeout: float | None = None):
        """Wait for the GenerationResult; raises the request's error (CancelledError if it was
        cancelled), TimeoutError if it is still running after timeout seconds."""
        if not self._req.finished.wait(timeout):
            raise TimeoutError(f"generation still running after {timeout} s")
        if self._req.error is not None:
            raise self._req.error
        return self._make_result(self._req.seq[1:], self._req.stats())

    def stats(self):
        """Statistics so far (also of a cancelled or failed request)."""
        return self._req.stats()

    def cancel(self) -> None:
        """Stop the request; its rows are freed at the next step."""
        self._req.cancelled = True
        self._worker.wake()

    @property
    def done(self) -> bool:
        """Whether it has ended (finished, failed or cancelled)."""
        return self._req.finished.is_set()


class Worker:
    """A background thread stepping one Scheduler while any request is waiting or active."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self._cv = threading.Condition()
        self._incoming: list[Request] = []
        self._thread: threading.Thread | None = None

    def submit(self, reqs: list[Request]) -> None:
        """Hand requests over (all join the same step when the budget allows)."""
        with self._cv:
            self._incoming.extend(reqs)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="stairs-batch", daemon=True)
                self._thread.start()
            self._cv.notify()

    def wake(self) -> None:
        """Make the loop look at its requests now (after a cancel)."""
        with self._cv:
            self._cv.notify()

    def _loop(self) -> None:
        s = self.scheduler
        while True:
            with self._cv:
                while not self._incoming and not s.busy:
                    self._cv.wait(timeout=30)
                    if not self._incoming and not s.busy:
                        self._thread = None
                        return
                for r in self._incoming:
                    s.add(r)
                self._incoming.clear()
            try:
                s.step()
            except Exception as exc:  # noqa: BLE001 - never leave a caller waiting forever
                s.fail_all(exc)
