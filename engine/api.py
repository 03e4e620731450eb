"""The Engine: load a main/assistant pair, generate token-exact greedy output, fast."""

from __future__ import annotations

import numbers
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import options as opt
from .errors import EngineError, InputError, PairMismatchError
from .model import T5Model
from .run import Run
from .stats import Stats
from .strategies import NEEDS_ASSISTANT, STRATEGIES
from .tokenizer import text_pieces

PAIR_KEYS = ["vocab_size", "pad_token_id", "eos_token_id", "decoder_start_token_id"]
MAX_THREADS = 1024  # a bound on thread counts (ORT would try to start them all)


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


def _check_load_args(
    main,
    assistant,
    provider,
    threads,
    provider_options,
    assistant_provider,
    assistant_threads,
    flags: dict,
) -> None:
    """Types of Engine.load's arguments, before any file is read or session created."""
    for name, v, none_ok in (("main", main, False), ("assistant", assistant, True)):
        if not (isinstance(v, (str, Path)) or (v is None and none_ok)):
            raise InputError(f"{name} must be a folder path (str or Path), not {v!r}")
    for name, v, none_ok in (
        ("provider", provider, False),
        ("assistant_provider", assistant_provider, True),
    ):
        if not (isinstance(v, str) or (v is None and none_ok)):
            raise InputError(f"{name} must be a string (cpu, cuda, coreml or auto), not {v!r}")
    for name, v in (("threads", threads), ("assistant_threads", assistant_threads)):
        if v is not None and (
            isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 1 <= v <= MAX_THREADS
        ):
            raise InputError(
                f"{name} must be None or an integer from 1 to {MAX_THREADS}, not {v!r}"
            )
    if provider_options is not None and not isinstance(provider_options, dict):
        raise InputError(f"provider_options must be a dict or None, not {provider_options!r}")
    for name, v in flags.items():
        if not isinstance(v, bool):
            raise InputError(f"{name} must be True or False, not {v!r}")


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
        self._auto: tuple[str, dict] | None = None
        self._masked: dict = {}  # role -> batch.MaskedDecoder, loaded on first batched use
        self._worker = None  # batch.Worker behind submit(), started on first use
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
        provider: str = "cpu",
        threads: int | None = None,
        provider_options: dict | None = None,
        assistant_provider: str | None = None,
        shared_thread_pool: bool = False,
        assistant_threads: int | None = None,
        io_binding: bool = False,
        limits: opt.Limits | None = None,
        verify: bool = True,
        single_request: bool = True,
    ) -> Engine:
        """Load exported folders; provider is cpu, cuda, coreml or auto (assistant may differ).

        shared_thread_pool: one process-wide ORT pool (fastest for one request at a time on few
        cores; slower at batch 4+); once it exists ORT refuses per-session pools, so every later
        session of the process joins it (engine.providers warns). assistant_threads: the small
        assistant's ops can be too short to gain from a second thread (None = what stairs-tune
        measured for this pair, else threads; with shared_thread_pool the pool serves both).
        io_binding: run through ORT IO binding (outputs allocated on the provider's device).
        limits: ceilings for generate (engine.options.Limits). verify: check file hashes.
        single_request=False: load only what batched generation needs (encoders, masked decoder,
        cross key/values; each weight resident once, as a server wants): generate() and stream()
        then run every strategy through the scheduler.
        """
        flags = {"shared_thread_pool": shared_thread_pool, "io_binding": io_binding}
        flags["verify"] = verify
        flags["single_request"] = single_request
        _check_load_args(
            main,
            assistant,
            provider,
            threads,
            provider_options,
            assistant_provider,
            assistant_threads,
            flags,
        )
        if limits is not None and not isinstance(limits, opt.Limits):
            raise InputError(f"limits must be an engine.options.Limits, not {limits!r}")
        m = T5Model(
            main,
            provider,
            threads,
            provider_options,
            "main",
            shared_thread_pool,
            io_binding,
            verify=verify,
            decoders=single_request,
        )
        a = None
        if assistant is not None:
            # what stairs-tune measured, else the main's count; with one shared pool, its size
            if assistant_threads is None and not shared_thread_pool:
                from .tune import stored_assistant_threads

                assistant_threads = stored_assistant_threads(main, assistant, m.provider, threads)
            a_threads = threads if assistant_threads is None else assistant_threads
            a = T5Model(
                assistant,
                assistant_provider or provider,
                a_threads,
                provider_options,
                "assistant",
                shared_thread_pool,
                io_binding,
                verify=verify,
                decoders=single_request,
            )
        eng = cls(m, a, threads, limits)
        if not single_request:
            eng._scheduler()  # the masked graphs load (and are checked) now
        return eng

    def calibrate(
        self, prompts, max_new_tokens: int = 64, save: bool = True, batch_sizes=()
    ) -> dict:
        """Measure every candidate strategy on prompts; store and use the fastest for 'auto'
        (batch_sizes: also batched auto's draft length at each of these batch sizes)."""
        from . import tune

        result = tune.calibrate(self, prompts, max_new_tokens, save, batch_sizes)
        self._auto = (result["strategy"], result["options"])
        return result

    def auto_choice(self) -> tuple[str, dict]:
        """What strategy='auto' runs: the stored calibration, else a sensible default."""
        if self._auto is None:
            from . import tune

            stored = tune.load(self)
            self._auto = (stored["strategy"], stored["options"]) if stored else tune.default(self)
        return self._auto

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
            ids = tok.encode(prompt) + [tok.eos_id]
        else:
            ids = self._ids(prompt)
        if len(ids) > limit and truncation is not None:
            # keep the final EOS where there is one; cut the body on the chosen side
            tail = ids[-1:] if ids[-1] == tok.eos_id else []
            body, keep = ids[: len(ids) - len(tail)], limit - len(tail)
            ids = (body[len(body) - keep :] if truncation == "left" else body[:keep]) + tail
        if len(ids) > limit:
            how = "pass truncation='left' or 'right'"
            if limit < ceiling:
                how += f" or raise max_input_tokens (up to {ceiling})"
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
        """Validate a generation (strategy, options, sizes, prompt, memory) without running it."""
        # an engine loaded with single_request=False runs it through the scheduler
        batched = "decoder_with_past" not in self.main.sessions
        return self._plan(
            prompt, strategy, max_new_tokens, max_input_tokens, truncation, options, batched
        )

    def _plan(
        self, prompt, strategy, max_new_tokens, max_input_tokens, truncation, options, batched
    ) -> Plan:
        """plan(); batched: the memory estimate takes the scheduler's shapes (stairs and tree
        in one row)."""
        opt.check_strategy(strategy)
        options = opt.validate(strategy, options)
        if strategy == "auto":
            auto, auto_opts = self.auto_choice()
            try:
                auto_opts = opt.validate(auto, auto_opts)
            except InputError as exc:
                raise InputError(f"stored auto choice {auto!r} {auto_opts}: {exc}") from None
            strategy, options = auto, {**auto_opts, **options}
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
            batched,
        )
        return Plan(ids, strategy, options, max_new_tokens)

    def _start(self, plan: Plan) -> tuple[Run, Iterator[list[int]]]:
        run = Run(self.main, self.assistant, plan.ids, plan.max_new_tokens)
        return run, STRATEGIES[plan.strategy](run, **plan.options)

    def generate(
        self,
        prompt: str | Sequence[int],
        strategy: str = "greedy",
        max_new_tokens: int = 64,
        max_input_tokens: int | None = None,
        truncation: str | None = None,
        **options,
    ) -> GenerationResult:
        """Generate exactly the main model's greedy tokens with the chosen strategy.

        Everything is validated (InputError) before any model runs."""
        return self.execute(
            self.plan(prompt, strategy, max_new_tokens, max_input_tokens, truncation, **options)
        )

    def execute(self, plan: Plan) -> GenerationResult:
        """Run a generation that plan() validated."""
        if "decoder_with_past" not in self.main.sessions:  # loaded with single_request=False
            req = self._scheduled(plan)
            for _ in req:
                pass
            return self._result(plan, req.request.seq[1:], req.request.stats())
        run, it = self._start(plan)
        for _ in it:
            pass
        ids = run.seq[1:]
        return GenerationResult(
            ids, self.main.tokenizer.decode(ids), run.stats(), plan.strategy, plan.options
        )

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
        return self._stream(plan)

    def _stream(self, plan: Plan) -> Iterator[str]:
        if "decoder_with_past" not in self.main.sessions:
            it = self._scheduled(plan)
        else:
            _, it = self._start(plan)
        yield from text_pieces(it, self.main.tokenizer.decode)

    def _scheduled(self, plan: Plan) -> _Scheduled:
        """One request on a private scheduler, run in the caller's thread (the path of an engine
        loaded with single_request=False): iterates the token lists as they are accepted."""
        sched = self._scheduler()
        req = self._request(plan)
        sched.add(req)
        return _Scheduled(sched, req)

    # -- many requests at once ------------------------------------------------------------------

    def _scheduler(self, max_batch_tokens: int | None = None):
        """A new batch.Scheduler on this engine's masked decoder sessions (loaded once)."""
        from . import batch

        max_batch_tokens = _batch_tokens(max_batch_tokens)
        with self._lock:
            for role, model in (("main", self.main), ("assistant", self.assistant)):
                if model is not None and role not in self._masked:
                    self._masked[role] = batch.MaskedDecoder(model)
        return batch.Scheduler(
            self._masked["main"],
            self._masked.get("assistant"),
            max_batch_tokens,
            self.limits.memory_bytes,
        )

    def _batch_plan(
        self, prompt, strategy, max_new_tokens, max_input_tokens, truncation, options, table=None
    ):
        """plan() for a batched request; 'auto' becomes adaptive speculation: the scheduler
        drafts by the number of active requests (table, default auto_table()), off where it
        loses."""
        args = (max_new_tokens, max_input_tokens, truncation)
        if strategy != "auto":
            return self._plan(prompt, strategy, *args, options, batched=True), None
        table = table or self.auto_table()
        name = "assisted" if self.assistant is not None else "lookup"
        opts = {**options, "draft_tokens": max(1, max(table.values()))}
        plan = self._plan(prompt, name, *args, opts, batched=True)
        return Plan(
            plan.ids, name, {**plan.options, "auto_draft_tokens": table}, plan.max_new_tokens
        ), table

    def auto_table(self) -> dict[int, int]:
        """Batched 'auto': draft tokens per request by the number of active requests (0 = off);
        what stairs-tune --batch-sizes stored for this pair, else batch.DEFAULT_AUTO_K (CPU) or
        DEFAULT_AUTO_K_CUDA. A
        damaged stored table is ignored with a warning."""
        from . import batch, tune

        default = (
            batch.DEFAULT_AUTO_K_CUDA if self.main.provider == "cuda" else batch.DEFAULT_AUTO_K
        )
        stored = (tune.load(self) or {}).get("batch_auto_k")
        if stored is None:
            return dict(default)
        try:
            table = {int(n): int(k) for n, k in stored.items()}
            if table and all(n >= 1 and 0 <= k <= opt.MAX_DRAFT_TOKENS for n, k in table.items()):
                return table
        except (AttributeError, TypeError, ValueError):
            pass
        tune.log.warning("ignoring damaged batch_auto_k %r in %s", stored, tune.TUNE_FILE)
        return dict(default)

    def _request(self, plan: Plan, auto_k: dict | None = None):
        from . import batch

        return batch.Request(
            ids=plan.ids[0].tolist(),
            strategy=plan.strategy,
            options=plan.options,
            max_new_tokens=plan.max_new_tokens,
            seq=[self.main.start_id],
            auto_k=auto_k,
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

        sched = self._scheduler(max_batch_tokens)
        table = self.auto_table() if strategy == "auto" else None
        out: list = [None] * len(prompts)
        plans, reqs = {}, {}
        for i, p in enumerate(prompts):
            try:
                plans[i], auto_k = self._batch_plan(
                    p, strategy, max_new_tokens, max_input_tokens, truncation, options, table
                )
                reqs[i] = self._request(plans[i], auto_k)
                sched.add(reqs[i])
            except EngineError as exc:
                out[i] = exc
        while sched.busy:
            sched.step()
        for i, r in reqs.items():
            out[i] = r.error or self._result(plans[i], r.seq[1:], r.stats())
        return out

    def batching(self, max_batch_tokens: int | None = None):
        """The shared batch.Scheduler behind submit(), created on first use (loading the masked
        sessions); max_batch_tokens, if given, sets its token budget. A server calls this at
        start-up and reads the scheduler's active, waiting, calls and call_count for metrics."""
        from . import batch

        if self._worker is None:
            sched = self._scheduler(max_batch_tokens)
            with self._lock:
                self._worker = self._worker or batch.Worker(sched)
        elif max_batch_tokens is not None:
            self._worker.scheduler.max_batch_tokens = _batch_tokens(max_batch_tokens)
        return self._worker.scheduler

    def start(self, *, max_batch_tokens: int | None = None) -> None:
        """Load the scheduler behind submit() now (not at the first request); max_batch_tokens,
        if given, sets its token budget (rows x padded tokens of one main call)."""
        self.batching(max_batch_tokens)

    def health(self) -> Health:
        """A snapshot of the scheduler behind submit() (started if it was not)."""
        s = self.batching()
        calls = tuple(s.calls)
        return Health(len(s.active), len(s.waiting), s.call_count, calls)

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
        """Queue one request on the engine's shared scheduler and return its batch.Handle at
        once: iterate it for text pieces, handle.result() waits for the GenerationResult,
        handle.cancel() stops it. Thread-safe: concurrent callers share main calls.
        Validated now (InputError); any strategy."""
        from . import batch

        plan, auto_k = self._batch_plan(
            prompt, strategy, max_new_tokens, max_input_tokens, truncation, options
        )
        req = self._request(plan, auto_k)
        self.batching()
        handle = batch.Handle(
            req,
            self._worker,
            self.main.tokenizer.decode,
            lambda ids, st: self._result(plan, ids, st),
        )
        self._worker.submit([req])
        return handle


def _batch_tokens(n: int | None) -> int:
    """max_batch_tokens checked (None: the default)."""
    from . import batch

    if n is None:
        return batch.DEFAULT_BATCH_TOKENS
    return opt.check_count("max_batch_tokens", n, batch.MAX_BATCH_TOKENS, "a smaller value")


class _Scheduled:
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
