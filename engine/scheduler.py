"""The one path: every request, alone or with others, runs as steps of a Scheduler.

A step: retire finished requests -> admit waiting ones (each prompt's encoder alone) -> draft
(every drafter's proposal; the assistant's rounds batched over requests) -> verify (one main
call: each request's pending token and proposal) -> accept and rewind per request. Shapes: N
rows, T tokens per row, V vocab.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from .accept import accept_path
from .cache import BatchCache
from .device_cache import device_free_bytes, make_cache
from .errors import CancelledError, EngineError, InputError, NonFiniteLogitsError
from .layout import SLOT_CHUNK
from .model import T5Model
from .options import MEMORY_SAFETY, available_memory
from .stats import Counter
from .strategies import CacheRow, Drafter
from .strategies.base import check_finite

DEFAULT_BATCH_TOKENS = 256
MAX_BATCH_TOKENS = 65536
# strategy="auto": draft tokens per request by the number of active requests (the largest key
# <= N applies; 0 = speculation off), by the main's dtype. On 2 CPU cores a verify call of N rows
# x K+1 tokens turns compute-bound as N grows, the sooner the cheaper the main's weights: greedy
# was fastest from 8 requests (fp32; within 4% at 5-7), 4 (int8) and 2 (int4) in
# results/onepath-final, and even at 8 on a t5-large shape. `stairs-tune --batch-sizes`
# measures the table for a pair.
DEFAULT_AUTO_K = {"fp32": {1: 4, 2: 3, 5: 0}, "int8": {1: 4, 2: 3, 4: 0}, "int4": {1: 3, 2: 0}}
DEFAULT_AUTO_K_CUDA = {1: 4}  # H100: speculation paid at every batch size measured (1-16)


def default_auto_k(main: T5Model) -> dict[int, int]:
    """auto's untuned table for this main: by its provider and its dtype (stairs.json's; fp16
    and unknown as fp32)."""
    if main.provider == "cuda":
        return dict(DEFAULT_AUTO_K_CUDA)
    dtype = (main.manifest or {}).get("dtype")
    return dict(
        DEFAULT_AUTO_K.get(dtype if isinstance(dtype, str) else "fp32", DEFAULT_AUTO_K["fp32"])
    )


def beyond_measured(measured: dict[int, int], default: dict[int, int]) -> dict[int, int]:
    """A measured table, then the default's entries above its largest size, none drafting
    more than the largest measured size did: a table measured at batch 1 alone must not
    speculate at 16 requests where the default turns it off, nor where batch 1 did not."""
    if not measured:
        return dict(default)
    top = max(measured)
    return {**measured, **{n: min(k, measured[top]) for n, k in default.items() if n > top}}


def cut(tokens, remaining: int, eos: int) -> tuple[list[int], bool]:
    """The tokens a generation keeps: at most `remaining`, none after the first EOS; and
    whether it is done (EOS kept, or nothing left to emit)."""
    out = [int(t) for t in tokens[:remaining]]
    if eos in out:
        return out[: out.index(eos) + 1], True
    return out, len(out) >= remaining


@dataclass(eq=False)  # identity: requests are found in the caches' owner lists
class Request:
    """One request under the scheduler. seq = [decoder start] + emitted tokens."""

    ids: list[int]  # encoder input
    drafter: Drafter
    max_new_tokens: int
    seq: list[int]
    counter: Counter = field(default_factory=Counter)
    done: bool = False
    cancelled: bool = False
    error: Exception | None = None
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
        d = self.drafter
        return self.max_new_tokens + 2 + d.branches * d.max_draft()

    def finish(self, error: Exception | None = None) -> None:
        """End it (once): record the error, the time, and tell every reader."""
        if self.finished.is_set():
            return
        self.error = self.error or error
        self.done, self.t_end = True, time.perf_counter()
        self.out.put(None)
        self.finished.set()

    def stats(self):
        """Frozen statistics (total_s: from submission to its end, or to now)."""
        self.counter.new_tokens = len(self.seq) - 1
        self.counter.total_s = (self.t_end or time.perf_counter()) - self.t0
        return self.counter.freeze()


def as_engine_error(exc: Exception) -> EngineError:
    """exc as an EngineError (ORT raises its own types), the original kept as the cause."""
    if isinstance(exc, EngineError):
        return exc
    err = EngineError(f"{type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


def _width(r: Request, active: int, floor: int) -> int:
    """Tokens r's main-call row takes with `active` requests (at least floor: the pad)."""
    return max(floor, r.drafter.width(r.drafter.draft_len(active)))


def _pack(rows: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids [N, T] and real lengths [N] of token lists."""
    counts = np.array([len(x) for x in rows], np.int64)
    tokens = np.full((len(rows), max(1, int(counts.max()))), pad, np.int64)
    for i, x in enumerate(rows):
        tokens[i, : len(x)] = x
    return tokens, counts


class Scheduler:
    """Packs every active request's verify row into one main call per step (continuous
    batching). A main call holds at most max_batch_tokens rows x padded tokens (drafts are
    shortened to fit; a request alone always joins, so nothing waits forever); a request joins
    only if the caches' worst case with it fits in memory_bytes (None: available memory)."""

    def __init__(
        self,
        main: T5Model,
        assistant: T5Model | None,
        max_batch_tokens: int = DEFAULT_BATCH_TOKENS,
        memory_bytes: int | None = None,
    ):
        self.main_model, self.asst_model = main, assistant
        self.main = make_cache(main)
        self.asst = make_cache(assistant) if assistant is not None else None
        self.max_batch_tokens, self.memory_bytes = max_batch_tokens, memory_bytes
        self.waiting: list[Request] = []
        self.active: list[Request] = []
        # (rows, padded tokens) of the latest main calls; call_count counts all of them
        self.calls: collections.deque[tuple[int, int]] = collections.deque(maxlen=4096)
        self.call_count = 0

    def add(self, req: Request) -> None:
        """Queue a request; it joins at the next step the token budget and memory allow."""
        self.waiting.append(req)

    @property
    def busy(self) -> bool:
        """Whether any request is waiting or active."""
        return bool(self.waiting or self.active)

    def step(self) -> None:
        """One scheduler step. A failure while admitting (or encoding for the assistant) fails
        only those requests; one inside a shared draft or verify call fails every active one."""
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
        """End every waiting and active request with exc (the worker's last resort); the
        caches start over, so nothing they hold can fail this again."""
        for r in [*self.waiting, *self.active]:
            r.error = r.error or as_engine_error(exc)
            r.finish()
        self.waiting.clear()
        self.active.clear()
        for cache in (self.main, self.asst):
            if cache is not None:
                _reset(cache)

    # -- admission ------------------------------------------------------------------------------

    def _fits(self, joining: list[Request], r: Request) -> bool:
        """Whether the caches' worst case (every request at its longest) fits with r joined."""
        reqs = [*self.active, *joining, r]
        # a call's capacity: the longest output plus the widest row; never below what the
        # caches hold now (they keep their size until no request is active)
        longest = max(q.max_new_tokens for q in reqs)
        widest = max(q.max_length() - q.max_new_tokens for q in reqs)
        cap = max(longest + widest + SLOT_CHUNK, self.main.capacity)
        enc = max(max(len(q.ids) for q in reqs), self.main.enc_len)
        rows = 1 << (len(reqs) - 1).bit_length()  # the caches double their rows
        need, now = {"host": 0, "device": 0}, {"host": 0, "device": 0}
        for cache in (self.main, self.asst):
            if cache is not None:
                where = "device" if cache.device_memory else "host"
                need[where] += cache.nbytes(rows, cap, enc)
                now[where] += cache.nbytes()
        logits = rows * (1 + max(q.max_length() - q.max_new_tokens for q in reqs))
        need["host"] += logits * self.main_model.vocab_size * 4
        if self.memory_bytes:  # one budget for all of it
            return (need["host"] + need["device"]) * MEMORY_SAFETY <= self.memory_bytes
        host = (available_memory() or 1 << 62) + now["host"]
        free = device_free_bytes(self.main_model) if need["device"] else None
        device = 1 << 62 if free is None else free + now["device"]
        return need["host"] * MEMORY_SAFETY <= host and need["device"] * MEMORY_SAFETY <= device

    def _admit(self) -> None:
        """Move waiting requests into the batch while the token budget and memory allow."""
        for r in [r for r in self.waiting if r.cancelled]:  # not only the head of the queue
            self.waiting.remove(r)
            r.finish(CancelledError("cancelled before it started"))
        rows = len(self.active)
        floor = self.main_model.min_tokens
        width = max((_width(r, rows, floor) for r in self.active), default=0)
        joining: list[Request] = []
        while self.waiting:
            r = self.waiting[0]
            if r.cancelled:
                self.waiting.pop(0).finish(CancelledError("cancelled before it started"))
                continue
            w = max(width, _width(r, rows + 1, floor))
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
            joining.append(self.waiting.pop(0))
            rows, width = rows + 1, w
        if joining:
            self._join(joining)

    def _join(self, joining: list[Request]) -> None:
        """Encoders of the joining requests (each alone) into the main cache, and the
        assistant's for requests that draft now (auto may start with speculation off)."""
        n = len(self.active) + len(joining)
        try:
            self._encode(self.main, joining)
            drafting = [r for r in joining if r.drafter.uses_assistant and r.drafter.draft_len(n)]
            if drafting and self.asst is not None:
                self._encode(self.asst, drafting)
        except Exception as exc:  # noqa: BLE001 - only the joining requests fail
            for r in joining:
                self._release(r)
                r.finish(as_engine_error(exc))
            return
        self.active.extend(joining)

    @staticmethod
    def _encode(cache: BatchCache, reqs: list[Request]) -> None:
        cache.reserve(len(cache.owners) + len(reqs), max(len(r.ids) for r in reqs))
        for r in reqs:
            t, c = time.perf_counter(), Counter()
            cross, mask = cache.model.encode(r.ids, c, device=cache.on_device)
            cache.add(r, cross, mask)
            r.counter.encoder_s += time.perf_counter() - t
            r.counter.session_s += c.session_s

    # -- draft, verify, accept ------------------------------------------------------------------

    def _draft(self) -> None:
        """Every drafter's proposal for this step."""
        n_active = len(self.active)
        cap = max(0, self.max_batch_tokens // n_active - 1)  # every row fits the budget
        for r in self.active:
            d, t = r.drafter, time.perf_counter()
            d.begin(r.seq, min(d.draft_len(n_active), cap // d.branches, r.remaining - 1))
            r.counter.draft_s += time.perf_counter() - t
        if self.asst is None:
            return
        late = [
            r
            for r in self.active
            if r.drafter.uses_assistant and r.drafter.want and r not in self.asst.owners
        ]
        for r in late:  # auto turned speculation on: encode them; a failure fails r alone
            try:
                self._encode(self.asst, [r])
            except Exception as exc:  # noqa: BLE001
                r.error = as_engine_error(exc)
        self._assistant_rounds(list(self.asst.owners))

    def _assistant_rounds(self, rows: list[Request]) -> None:
        """One assistant call per round for every drafting row (row i = cache row i)."""
        t, c = time.perf_counter(), Counter()
        while True:
            feeds = [
                r.drafter.feed(self.asst.length(r)) if r.error is None else ([], None) for r in rows
            ]
            if not any(f for f, _ in feeds):
                break
            tokens, counts = _pack([f for f, _ in feeds], self.asst_model.pad_id)
            tree = [p for _, p in feeds] if any(p is not None for _, p in feeds) else None
            logits = self.asst.run(tokens, counts, c, tree)  # [N, T, V]
            for r, (f, _), x in zip(rows, feeds, logits):
                if not f:
                    continue
                r.counter.draft_calls += 1
                try:
                    r.drafter.take(x[: len(f)], CacheRow(self.asst, r), len(r.seq) - 1)
                except NonFiniteLogitsError as exc:
                    r.error = exc
        dt = time.perf_counter() - t
        for r in rows:
            if r.drafter.want:
                r.counter.draft_s += dt
                r.counter.session_s += c.session_s

    def _verify(self) -> None:
        """One main call: row r = its pending token + its proposal (a tree under its mask)."""
        owners = list(self.main.owners)
        rows, tree, props = [], [], []
        for r in owners:
            toks, parents = r.drafter.proposal() if r.error is None else ([], None)
            lo = self.main.length(r)
            rows.append([r.seq[-1], *toks] if r.error is None else [])
            tree.append(None if parents is None else [lo - 1, *(lo + p for p in parents)])
            props.append(parents)
        tokens, counts = _pack(rows, self.main_model.pad_id)  # [N, T], [N]
        t, c = time.perf_counter(), Counter()
        # each token's greedy id and whether its logits pick NaN/inf: [N, T'] each
        ids, bad = self.main.run(tokens, counts, c, tree if any(tree) else None, reduce=True)
        dt = time.perf_counter() - t
        self.calls.append(ids.shape)  # as run: rows x tokens, a pad included
        self.call_count += 1
        for i, r in enumerate(owners):
            if r.error is None:
                k = counts[i]
                self._accept(r, rows[i], props[i], ids[i, :k], bad[i, :k], dt, c.session_s)
        for r in owners:
            r.counter.batch_rows += len(owners) if r.error is None else 0

    def _accept(self, r: Request, row, parents, targets, bad, dt: float, session_s: float) -> None:
        """Accept r's longest agreeing path, rewind both caches to it, emit its tokens."""
        path = accept_path(row, parents, targets)
        try:  # the one NaN check, on the picks the output rests on (the accepted path's)
            check_finite(bad[path], "main", len(r.seq) - 1)
        except NonFiniteLogitsError as exc:
            r.error = exc
            return
        # Only tokens in their own slots (row index = depth) were computed as a plain row
        # would be: a side path emits only its first token (the next step's tree, drafted after
        # it, holds the rest of that path as its first path).
        exact = next((i for i, j in enumerate(path) if i != j), len(path))
        path = path[:exact]
        n, lo = len(path) - 1, self.main.length(r) - len(row)
        self.main.keep(r, lo, [lo + j for j in path])  # the one rewind
        asst = CacheRow(self.asst, r) if self.asst is not None and r in self.asst.owners else None
        r.drafter.commit(len(r.seq) + n, path, asst)
        drafted = len(row) - 1 if parents is None else (len(row) - 1) // r.drafter.branches
        r.drafter.update(drafted, n)
        rc = r.counter
        rc.main_calls += 1
        rc.drafted += drafted
        rc.accepted += n
        rc.verify_s += dt
        rc.session_s += session_s
        self._emit(r, [row[j] for j in path[1:]] + [int(targets[path[-1]])])

    def _emit(self, r: Request, tokens: list[int]) -> None:
        out, done = cut(tokens, r.remaining, self.main_model.eos_id)
        r.seq.extend(out)
        r.done = r.done or done
        r.out.put(out)

    def _retire(self) -> None:
        gone = [r for r in self.active if r.done or r.cancelled or r.error is not None]
        for r in gone:
            self.active.remove(r)
            self._release(r)
            r.finish(CancelledError("cancelled") if r.cancelled and not r.done else None)
        if not self.active:
            for cache in (self.main, self.asst):
                if cache is not None:
                    self._guard(cache, cache.shrink)

    def _release(self, r: Request) -> None:
        """Free r's rows in both caches."""
        for cache in (self.main, self.asst):
            if cache is not None and r in cache.owners:
                self._guard(cache, cache.remove, r)

    def _guard(self, cache: BatchCache, op, *args) -> None:
        """Run a cache operation; if it fails (a device back end runs graphs: out of device
        memory), the cache's state is unknown: every request in it fails and it starts over."""
        try:
            op(*args)
        except Exception as exc:  # noqa: BLE001 - a broken cache must not hang its callers
            err = as_engine_error(exc)
            for r in cache.owners:
                if not r.done:  # a finished request keeps its result
                    r.error = r.error or err
            _reset(cache)


def _reset(cache: BatchCache) -> None:
    """Start a cache over; if even that fails (no memory for one row), it stays empty and the
    next request that joins fails with the error, while the other cache still starts over."""
    try:
        cache.reset()
    except Exception:  # noqa: BLE001, S110 - the caller is already failing its requests
        pass
