"""The Engine: load a main/assistant pair, generate token-exact greedy output, fast."""

from __future__ import annotations

import numbers
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import options as opt
from . import scheduler as sch
from .errors import EngineError, InputError, PairMismatchError
from .handles import Handle, Worker
from .layout import PAIR_KEYS, TUNE_FILE
from .model import T5Model
from .stats import Stats
from .strategies import NEEDS_ASSISTANT, STRATEGIES
from .tokenizer import text_pieces
from .weights import WeightsCache


@dataclass(frozen=True)
class GenerationResult:
    """token_ids: generated ids after the decoder start (EOS included if generated);
    strategy: the one that ran ('auto' resolved); options: every option it ran with."""

    token_ids: list[int]
    text: str
    stats: Stats
    strategy: str
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Health:
    """What the scheduler behind submit() is doing: requests generating (active) and queued
    (waiting), main calls made so far (main_calls) and the (rows, padded tokens) of the latest
    ones (recent_calls, oldest first, at most 4096)."""

    active: int
    waiting: int
    main_calls: int
    recent_calls: tuple[tuple[int, int], ...]

    @property
    def busy(self) -> bool:
        """Whether any request is waiting or generating."""
        return bool(self.active or self.waiting)


@dataclass(frozen=True)
class Plan:
    """A generation, fully validated by Engine.plan: nothing of it has run yet."""

    ids: np.ndarray  # [1, S]
    strategy: str
    options: dict  # with the strategy's defaults
    max_new_tokens: int
    auto_k: dict | None = None  # strategy auto: draft tokens by the number of active requests


def _load_config(config, settings: dict) -> opt.LoadConfig:
    """The LoadConfig of an Engine.load call: config, or one made of the keyword settings
    (InputError if both are given, or a value is bad)."""
    if config is None:
        return opt.LoadConfig(**settings)
    if not isinstance(config, opt.LoadConfig):
        raise InputError(f"config must be an engine.LoadConfig, not {config!r}")
    given = [k for k, v in settings.items() if not _same(v, getattr(_DEFAULT_LOAD, k))]
    if given:
        raise InputError(
            f"give the load settings as config=LoadConfig(...) or as keyword arguments, not"
            f" both (config and {', '.join(given)})"
        )
    return config


def _same(a, b) -> bool:
    """a is b's value, of b's type (so 1 is not taken for True)."""
    return type(a) is type(b) and a == b


_DEFAULT_LOAD = opt.LoadConfig()


def _check_folders(main, assistant, limits) -> None:
    """Types of Engine.load's folders and limits, before any file is read."""
    if limits is not None and not isinstance(limits, opt.Limits):
        raise InputError(f"limits must be an engine.options.Limits, not {limits!r}")
    for name, v, none_ok in (("main", main, False), ("assistant", assistant, True)):
        if not (isinstance(v, (str, Path)) or (v is None and none_ok)):
            raise InputError(f"{name} must be a folder path (str or Path), not {v!r}")


class Engine:
    """A main T5 model and optionally its assistant, each an exported ONNX folder.

    limits (engine.options.Limits): ceilings on max_new_tokens (4096), max_input_tokens (8192)
    and the memory a generation may use (the machine's available memory); set with
    Engine.load(..., limits=Limits(...)) or by assigning eng.limits.
    """

    def __init__(
        self,
        main: T5Model,
        assistant: T5Model | None = None,
        threads: int | None = None,
        limits: opt.Limits | None = None,
    ):
        self.main, self.assistant, self.threads = main, assistant, threads
        self.limits = limits or opt.Limits()
        self._worker: Worker | None = None  # behind submit(), started on first use
        self._lock = threading.Lock()
        if assistant is not None:
            diffs = [
                f"{k}: main {main.config.get(k)} vs assistant {assistant.config.get(k)}"
                for k in PAIR_KEYS
                if main.config.get(k) != assistant.config.get(k)
            ]
            if diffs:
                raise PairMismatchError(
                    f"{main.folder} and {assistant.folder} are not a pair: " + "; ".join(diffs)
                )

    @classmethod
    def load(
        cls,
        main: str | Path,
        assistant: str | Path | None = None,
        provider: str = _DEFAULT_LOAD.provider,
        threads: int | None = None,
        provider_options: dict | None = None,
        assistant_provider: str | None = None,
        shared_thread_pool: bool = _DEFAULT_LOAD.shared_thread_pool,
        assistant_threads: int | None = None,
        io_binding: bool = _DEFAULT_LOAD.io_binding,
        limits: opt.Limits | None = None,
        verify: bool = _DEFAULT_LOAD.verify,
        weights_cache: bool | str | Path = _DEFAULT_LOAD.weights_cache,
        kv_cache: str = _DEFAULT_LOAD.kv_cache,
        config: opt.LoadConfig | None = None,
    ) -> Engine:
        """Load exported folders (encoder, masked decoder, cross key/values: each weight once);
        provider is cpu, cuda, coreml or auto (the assistant's may differ).

        The load settings come as keyword arguments or as one config=LoadConfig(...), not both:
        beside config=, a keyword that differs from its default is refused (one left at its
        default cannot be told from an absent one). engine.options.LoadConfig says what each
        setting does. shared_thread_pool: one process-wide
        ORT pool that spins (2 cores: faster for 1-2 requests, level at 4-16); once it exists
        ORT refuses per-session pools, so every later session of the process joins it
        (engine.providers warns). assistant_threads: the small assistant's ops can be too short
        to gain from a second thread. weights_cache: where each graph's optimized, prepacked
        form is written once and then memory-mapped by every load and process (True:
        $STAIRS_CACHE_DIR or ~/.cache/stairs; see engine.weights). kv_cache "auto": device on
        CUDA, numpy on the CPU, where it measured faster. limits: ceilings for generate
        (engine.options.Limits).
        """
        settings = {
            "provider": provider,
            "threads": threads,
            "provider_options": provider_options,
            "assistant_provider": assistant_provider,
            "shared_thread_pool": shared_thread_pool,
            "assistant_threads": assistant_threads,
            "io_binding": io_binding,
            "verify": verify,
            "weights_cache": weights_cache,
            "kv_cache": kv_cache,
        }
        cfg = _load_config(config, settings)
        _check_folders(main, assistant, limits)
        return cls._open(main, assistant, cfg, limits)

    @classmethod
    def _open(cls, main, assistant, cfg: opt.LoadConfig, limits) -> Engine:
        """Engine.load's sessions, its arguments checked."""
        common = {"shared_thread_pool": cfg.shared_thread_pool, "io_binding": cfg.io_binding}
        common["weights_cache"] = WeightsCache.of(cfg.weights_cache)
        common["kv_cache"], common["verify"] = cfg.kv_cache, cfg.verify
        m = T5Model(main, cfg.provider, cfg.threads, cfg.provider_options, "main", **common)
        if assistant is None:
            return cls(m, None, cfg.threads, limits)
        a_threads = cfg.assistant_threads
        # what stairs-tune measured, else the main's count; with one shared pool, its size
        if a_threads is None and not cfg.shared_thread_pool:
            from .tune import stored_assistant_threads

            a_threads = stored_assistant_threads(main, assistant, m.provider, cfg.threads)
        a_threads = cfg.threads if a_threads is None else a_threads
        a_prov = cfg.assistant_provider or cfg.provider
        a = T5Model(assistant, a_prov, a_threads, cfg.provider_options, "assistant", **common)
        return cls(m, a, cfg.threads, limits)

    def self_check(self, sizes=None) -> list:
        """Whether exactness holds on this machine, provider and ONNX Runtime build: the main's
        rows alone against the same rows inside calls of 1-8 rows, chunked, padded, rewound, a
        long neighbour, a tree (engine.selfcheck). One selfcheck.Check per call shape
        (max_abs_diff, identical); exact here when every one is identical."""
        from . import selfcheck

        return selfcheck.run(self.main, sizes or selfcheck.SIZES)

    def calibrate(
        self, prompts, max_new_tokens: int = 64, save: bool = True, batch_sizes=()
    ) -> dict:
        """Measure every candidate strategy on prompts, and auto's draft length at batch size 1
        and each of batch_sizes; store them (auto uses the table from then on)."""
        from . import tune

        return tune.calibrate(self, prompts, max_new_tokens, save, batch_sizes)

    def encode(
        self,
        prompt: str | Sequence[int],
        max_input_tokens: int | None = None,
        truncation: str | None = None,
    ) -> np.ndarray:
        """Encoder input ids [1, S]: text gets sentencepiece + EOS; a list of ids is used as is.

        truncation 'left'/'right' cuts text or ids to max_input_tokens (a final EOS is kept).
        """
        tok, ceiling = self.main.tokenizer, self.limits.max_input_tokens
        max_input_tokens = opt.check_count(
            "max_input_tokens",
            max_input_tokens,
            ceiling,
            "Engine.load(..., limits=Limits(max_input_tokens=N))",
            allow_none=True,
        )
        limit = max_input_tokens or min(tok.max_input_tokens, ceiling)
        if truncation not in (None, "left", "right"):
            raise InputError(f"truncation must be 'left', 'right' or None, not {truncation!r}")
        if isinstance(prompt, str):
            if not prompt.strip():
                raise InputError("empty prompt")
            keep = {"left": "end", "right": "start"}.get(truncation)
            body, fits = tok.encode_limited(prompt, limit - 1, keep)  # EOS is the last id
            if not fits and keep is None:
                how = _raise_or_truncate(limit, ceiling)
                size = f"{len(body) + 1} tokens" if body else f"{len(prompt)} characters"
                raise InputError(f"prompt is {size}, over the limit of {limit}; {how}")
            ids = body + [tok.eos_id]
        else:
            ids = self._ids(prompt)
        if len(ids) > limit and truncation is not None:
            # keep the final EOS where there is one; cut the body on the chosen side
            tail = ids[-1:] if ids[-1] == tok.eos_id else []
            body, keep = ids[: len(ids) - len(tail)], limit - len(tail)
            ids = (body[len(body) - keep :] if truncation == "left" else body[:keep]) + tail
        if len(ids) > limit:
            how = _raise_or_truncate(limit, ceiling)
            raise InputError(f"prompt is {len(ids)} tokens, over the limit of {limit}; {how}")
        return np.array([ids], dtype=np.int64)

    def _ids(self, prompt) -> list[int]:
        """A sequence of int token ids, checked: no bytes, floats, bools, None or NaN."""
        if isinstance(prompt, np.ndarray):
            if prompt.ndim == 2 and prompt.shape[0] == 1:
                prompt = prompt[0]
            if prompt.ndim != 1 or not np.issubdtype(prompt.dtype, np.integer):
                raise InputError(
                    f"an array prompt must be 1-D (or [1, S]) integer ids, got shape "
                    f"{prompt.shape} of {prompt.dtype}"
                )
        elif isinstance(prompt, (bytes, bytearray, memoryview)) or not isinstance(prompt, Sequence):
            raise InputError(
                "prompt must be text (str) or a list of int token ids, not "
                f"{type(prompt).__name__}" + (" (decode bytes first)" if prompt is not None else "")
            )
        if not len(prompt):
            raise InputError("empty list of input ids")
        for pos, i in enumerate(prompt):
            if isinstance(i, bool) or not isinstance(i, numbers.Integral):
                raise InputError(f"token ids must be integers; position {pos} is {i!r}")
        ids = [int(i) for i in prompt]
        bad = [i for i in ids if not 0 <= i < self.main.vocab_size]
        if bad:
            raise InputError(f"input ids out of range [0, {self.main.vocab_size}): {bad[:5]}")
        return ids

    def plan(
        self,
        prompt,
        strategy: str = "greedy",
        max_new_tokens: int = 64,
        max_input_tokens: int | None = None,
        truncation: str | None = None,
        **options,
    ) -> Plan:
        """Validate a generation (strategy, options, sizes, prompt, memory) without running it.
        'auto' becomes adaptive speculation: assisted (lookup without an assistant) with the
        draft length by the number of active requests (auto_table()), off where it loses."""
        opt.check_strategy(strategy)
        options = opt.validate(strategy, options)
        table = None
        if strategy == "auto":
            table = self.auto_table()
            strategy = "assisted" if self.assistant is not None else "lookup"
            options = {**options, "draft_tokens": max(1, max(table.values()))}
        options = opt.with_defaults(strategy, options)
        if strategy in NEEDS_ASSISTANT and self.assistant is None:
            raise InputError(
                f"strategy {strategy!r} needs an assistant: Engine.load(main, assistant=DIR)"
            )
        max_new_tokens = opt.check_count(
            "max_new_tokens",
            max_new_tokens,
            self.limits.max_new_tokens,
            "Engine.load(..., limits=Limits(max_new_tokens=N))",
        )
        ids = self.encode(prompt, max_input_tokens, truncation)
        opt.check_memory(
            self.main,
            self.assistant,
            strategy,
            options,
            ids.shape[1],
            max_new_tokens,
            self.limits.memory_bytes,
        )
        if table is not None:
            options = {**options, "auto_draft_tokens": table}
        return Plan(ids, strategy, options, max_new_tokens, table)

    def generate(
        self,
        prompt: str | Sequence[int],
        strategy: str = "greedy",
        max_new_tokens: int = 64,
        max_input_tokens: int | None = None,
        truncation: str | None = None,
        **options,
    ) -> GenerationResult:
        """Generate exactly the main model's greedy tokens with the chosen strategy (a batch
        of one on the scheduler). Everything is validated (InputError) before any model runs."""
        return self.execute(
            self.plan(prompt, strategy, max_new_tokens, max_input_tokens, truncation, **options)
        )

    def execute(self, plan: Plan) -> GenerationResult:
        """Run a generation that plan() validated."""
        req = self._alone(plan)
        for _ in req:
            pass
        return self._result(plan, req.request.seq[1:], req.request.stats())

    def stream(
        self,
        prompt: str | Sequence[int],
        strategy: str = "greedy",
        max_new_tokens: int = 64,
        max_input_tokens: int | None = None,
        truncation: str | None = None,
        **options,
    ) -> Iterator[str]:
        """Yield text pieces as tokens are accepted (held back while a UTF-8 byte is partial).

        Validated when called (InputError); the models run as the iterator is consumed."""
        plan = self.plan(prompt, strategy, max_new_tokens, max_input_tokens, truncation, **options)
        return text_pieces(self._alone(plan), self.main.tokenizer.decode)

    def _alone(self, plan: Plan) -> _Alone:
        """One request on a private scheduler, stepped in the caller's thread."""
        sched = self._scheduler()
        req = self._request(plan)
        sched.add(req)
        return _Alone(sched, req)

    # -- many requests at once ------------------------------------------------------------------

    def _scheduler(self, max_batch_tokens: int | None = None) -> sch.Scheduler:
        """A new Scheduler on this engine's models."""
        return sch.Scheduler(
            self.main, self.assistant, _batch_tokens(max_batch_tokens), self.limits.memory_bytes
        )

    def auto_table(self) -> dict[int, int]:
        """'auto': draft tokens per request by the number of active requests (0 = off); what
        stairs-tune stored for this pair (above its sizes, scheduler.beyond_measured), else
        scheduler.default_auto_k. A damaged stored table is ignored with a warning."""
        from . import tune

        default = sch.default_auto_k(self.main)
        stored = (tune.load(self) or {}).get("batch_auto_k")
        if stored is None:
            return dict(default)
        try:
            table = {int(n): int(k) for n, k in stored.items()}
            if table and all(n >= 1 and 0 <= k <= opt.MAX_DRAFT_TOKENS for n, k in table.items()):
                return sch.beyond_measured(table, default)  # tables stored before the merge too
        except (AttributeError, TypeError, ValueError):
            pass
        tune.log.warning("ignoring damaged batch_auto_k %r in %s", stored, TUNE_FILE)
        return dict(default)

    def _request(self, plan: Plan) -> sch.Request:
        strategy = STRATEGIES[plan.strategy]
        ids = plan.ids[0].tolist()
        return sch.Request(
            ids=ids,
            drafter=strategy.drafter(ids, plan.options, plan.auto_k),
            max_new_tokens=plan.max_new_tokens,
            seq=[self.main.start_id],
        )

    def _result(self, plan: Plan, ids: list[int], stats: Stats) -> GenerationResult:
        return GenerationResult(
            ids, self.main.tokenizer.decode(ids), stats, plan.strategy, plan.options
        )

    def generate_batch(
        self,
        prompts: Sequence,
        *,
        strategy: str = "greedy",
        max_new_tokens: int = 64,
        max_input_tokens: int | None = None,
        truncation: str | None = None,
        max_batch_tokens: int | None = None,
        **options,
    ) -> list[GenerationResult | EngineError]:
        """Generate for many prompts at once, in order: every step packs all requests' rows
        into one main call (every strategy runs as steps of one scheduler).
        strategy="auto" speculates adaptively: draft length by the number of active requests
        (auto_table()), speculation off at batch sizes where it loses.

        A prompt that fails gets its typed error in its place; the others are served. Each
        result equals generate() on that prompt alone. Per-request stats: main_calls counts
        the calls it took part in, batch_rows the requests that shared them (mean_batch_rows),
        and the phase seconds are the wall time of those shared calls (not divided).
        max_batch_tokens bounds rows x padded tokens of one main call (default 256).
        """
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise InputError("prompts must be a list of prompts (text or lists of ids)")
        if not prompts:
            raise InputError("empty batch: give at least one prompt")

        out: list = [None] * len(prompts)
        plans = {}
        for i, p in enumerate(prompts):
            try:
                plans[i] = self.plan(
                    p, strategy, max_new_tokens, max_input_tokens, truncation, **options
                )
            except EngineError as exc:
                out[i] = exc
        for i, res in zip(plans, self.execute_batch(list(plans.values()), max_batch_tokens)):
            out[i] = res
        return out

    def execute_batch(
        self, plans: Sequence[Plan], max_batch_tokens: int | None = None
    ) -> list[GenerationResult | EngineError]:
        """Run plans that plan() validated together, sharing main calls; results in order (a
        request that fails gets its typed error in its place)."""
        sched = self._scheduler(max_batch_tokens)
        reqs = [self._request(p) for p in plans]
        for r in reqs:
            sched.add(r)
        while sched.busy:
            sched.step()
        return [r.error or self._result(p, r.seq[1:], r.stats()) for p, r in zip(plans, reqs)]

    def _batching(self, max_batch_tokens: int | None = None) -> sch.Scheduler:
        """The shared scheduler behind submit(), created on first use; max_batch_tokens, if
        given, sets its token budget."""
        if self._worker is None:
            sched = self._scheduler(max_batch_tokens)
            with self._lock:
                self._worker = self._worker or Worker(sched)
        elif max_batch_tokens is not None:
            self._worker.scheduler.max_batch_tokens = _batch_tokens(max_batch_tokens)
        self._worker.scheduler.memory_bytes = self.limits.memory_bytes  # eng.limits may change
        return self._worker.scheduler

    def start(self, *, max_batch_tokens: int | None = None) -> None:
        """Load the scheduler behind submit() now (not at the first request); max_batch_tokens,
        if given, sets its token budget (rows x padded tokens of one main call)."""
        self._batching(max_batch_tokens)

    def health(self) -> Health:
        """A snapshot of the scheduler behind submit() (started if it was not)."""
        s = self._batching()
        calls = tuple(s.calls)
        return Health(len(s.active), len(s.waiting), s.call_count, calls)

    def weights_entries(self) -> dict[str, dict[str, str | None] | None]:
        """For main and assistant (None without one): each graph file -> the weights-cache
        entry folder its session maps, or None where it runs the plain graph."""
        models = {"main": self.main, "assistant": self.assistant}
        return {k: None if m is None else dict(m.cache_entries) for k, m in models.items()}

    @property
    def tokenizer(self):
        """The main model's tokenizer (encode, decode, eos_id, max_input_tokens)."""
        return self.main.tokenizer

    @property
    def name(self) -> str:
        """The main model's folder name (what a server calls the model)."""
        return self.main.folder.name

    def submit(
        self,
        prompt: str | Sequence[int],
        *,
        strategy: str = "greedy",
        max_new_tokens: int = 64,
        max_input_tokens: int | None = None,
        truncation: str | None = None,
        **options,
    ):
        """Queue one request on the engine's shared scheduler and return its Handle at once:
        iterate it for text pieces, handle.result() waits for the GenerationResult,
        handle.cancel() stops it. Thread-safe: concurrent callers share main calls.
        Validated now (InputError); any strategy."""
        plan = self.plan(prompt, strategy, max_new_tokens, max_input_tokens, truncation, **options)
        req = self._request(plan)
        self._batching()
        handle = Handle(
            req,
            self._worker,
            self.main.tokenizer.decode,
            lambda ids, st: self._result(plan, ids, st),
        )
        self._worker.submit([req])
        return handle


def _batch_tokens(n: int | None) -> int:
    """max_batch_tokens checked (None: the default)."""
    if n is None:
        return sch.DEFAULT_BATCH_TOKENS
    return opt.check_count("max_batch_tokens", n, sch.MAX_BATCH_TOKENS, "a smaller value")


class _Alone:
    """Iterates one request's accepted token lists while stepping its own scheduler."""

    def __init__(self, sched, request):
        self.sched, self.request = sched, request

    def __iter__(self) -> Iterator[list[int]]:
        while self.sched.busy:
            self.sched.step()
            while not self.request.out.empty():
                item = self.request.out.get()
                if item is None:
                    if self.request.error is not None:
                        raise self.request.error
                    return
                yield item


def _raise_or_truncate(limit: int, ceiling: int) -> str:
    """What to do about a prompt over limit."""
    how = "pass truncation='left' or 'right'"
    if limit < ceiling:
        how += f" or raise max_input_tokens (up to {ceiling})"
    return how
