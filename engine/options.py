"""The one schema of strategy options, load settings and size ceilings, shared by the API and
every command.

Everything a caller controls is checked here before any model runs: each strategy option's type,
range and default (`validate`), how a pair is loaded (`LoadConfig`), the ceilings on
`max_new_tokens` and `max_input_tokens` (`Limits`), and an estimate of the memory a generation
needs against what the machine has (`check_memory`). Every failure is an `InputError` naming
the setting, the bad value and the allowed range.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from pathlib import PurePath

from .errors import InputError
from .layout import MAX_THREADS, enc_width
from .strategies import MAX_DRAFT_TOKENS, STRATEGIES

# Hard ceilings (per Engine: Engine.load(..., limits=Limits(max_new_tokens=N)) or eng.limits).
MAX_NEW_TOKENS = 4096
MAX_INPUT_TOKENS = 8192
# An estimate of a generation's working memory is multiplied by this before it is compared with
# what the machine has: ORT's arena and numpy temporaries come on top of the tensors counted.
MEMORY_SAFETY = 1.5
# Engine.load(kv_cache=...): where decoder key/values live (engine.cache, engine.device_cache).
KV_CACHES = ("auto", "numpy", "device")


@dataclass(frozen=True)
class Option:
    """One strategy option: type (int, float or str), inclusive bounds or choices, help."""

    name: str
    type: type
    help: str
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] | None = None
    nullable: bool = False  # None is allowed (and means "off")

    def describe(self) -> str:
        """The allowed values, as error messages and --help show them."""
        if self.choices:
            allowed = " or ".join(repr(c) for c in self.choices)
        else:
            kind = "an integer" if self.type is int else "a number"
            allowed = f">= {self.min:g} and <= {self.max:g} ({kind})"
        return allowed + (" (or None)" if self.nullable else "")

    def check(self, value, strategy: str):
        """value if it is allowed, else InputError naming option, value and range."""
        if value is None and self.nullable:
            return None
        ok = False
        if self.choices is not None:
            ok = isinstance(value, str) and value in self.choices
        elif isinstance(value, bool):  # bool is an int in python, never a count here
            ok = False
        elif self.type is int:
            ok = isinstance(value, numbers.Integral) and self.min <= value <= self.max
            value = int(value) if ok else value
        elif self.type is float:
            ok = (
                isinstance(value, numbers.Real)
                and math.isfinite(value)
                and self.min <= value <= self.max
            )
            value = float(value) if ok else value
        if not ok:
            raise InputError(
                f"bad option for strategy {strategy!r}: {self.name}={value!r}; "
                f"must be {self.describe()}"
            )
        return value

    def parse(self, text: str, strategy: str):
        """Convert command-line text (bench specs, flags) to the option's type, then check."""
        if self.nullable and text.lower() in ("none", ""):
            return None
        try:
            value = self.type(text)
        except ValueError:
            raise InputError(
                f"bad option for strategy {strategy!r}: {self.name}={text!r}; "
                f"must be {self.describe()}"
            ) from None
        return self.check(value, strategy)


OPTIONS = {
    o.name: o
    for o in [
        Option("draft_tokens", int, "K: draft tokens per round", 1, MAX_DRAFT_TOKENS),
        Option("batch_size", int, "stairs rows (batch_size - 1 draft tokens)", 2, 64),
        Option("branches", int, "tree: paths drafted and verified per round", 1, 16),
        Option(
            "schedule",
            str,
            "assisted: K fixed or HF's heuristic",
            choices=("constant", "heuristic"),
        ),
        Option(
            "layout",
            str,
            "stairs: accepted for old callers; both verify as one row",
            choices=("past", "full"),
        ),
        Option("threshold", float, "stop drafting below this confidence", 0, 1, nullable=True),
        Option("max_ngram", int, "longest n-gram matched", 1, 16),
        Option("min_ngram", int, "shortest n-gram matched", 1, 16),
        Option("stage2_tokens", int, "staged: n-gram tokens the assistant checks per call", 1, 32),
    ]
}

# Strategy -> {option: default}, from the strategy table (each strategy's own file).
STRATEGY_OPTIONS: dict[str, dict] = {name: dict(s.defaults) for name, s in STRATEGIES.items()}
STRATEGY_NAMES = ["auto", *STRATEGY_OPTIONS]


def check_strategy(strategy) -> str:
    """strategy if known (auto included), else InputError listing the known ones."""
    if not isinstance(strategy, str) or strategy not in STRATEGY_NAMES:
        raise InputError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGY_NAMES)}")
    return strategy


def validate(strategy: str, options: dict) -> dict:
    """The given options, checked for strategy (no defaults added); raises InputError.

    For 'auto' each option is checked on its own (type and range); the resolved strategy checks
    the rest once stairs-tune's choice is known.
    """
    check_strategy(strategy)
    if not isinstance(options, dict):
        raise InputError(f"options must be a dict, not {type(options).__name__}")
    takes = set(OPTIONS) if strategy == "auto" else set(STRATEGY_OPTIONS[strategy])
    out = {}
    for name, value in options.items():
        if name not in takes:
            what = ", ".join(sorted(takes)) or "no options"
            raise InputError(f"bad option for strategy {strategy!r}: {name!r} (it takes {what})")
        out[name] = OPTIONS[name].check(value, strategy)
    if strategy == "lookup":
        full = {**STRATEGY_OPTIONS["lookup"], **out}
        if full["min_ngram"] > full["max_ngram"]:
            raise InputError(
                f"bad option for strategy 'lookup': min_ngram={full['min_ngram']} is above "
                f"max_ngram={full['max_ngram']}; must be min_ngram <= max_ngram"
            )
    return out


def with_defaults(strategy: str, options: dict) -> dict:
    """Every option the strategy takes: validated options over its defaults."""
    return {**STRATEGY_OPTIONS[strategy], **validate(strategy, options)}


def parse_spec(spec: str) -> tuple[str, dict]:
    """'assisted:draft_tokens=4,schedule=heuristic' -> ('assisted', {...}), checked."""
    if not isinstance(spec, str):
        raise InputError(f"a strategy spec must be a string, not {type(spec).__name__}")
    name, _, rest = spec.strip().partition(":")
    check_strategy(name)
    opts: dict = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq:
            raise InputError(f"strategy spec {spec!r}: {item!r} is not option=value")
        if key not in OPTIONS:
            validate(name, {key: None})  # raises, naming what the strategy takes
        if key in opts:
            raise InputError(f"strategy spec {spec!r}: {key} is given twice")
        opts[key] = OPTIONS[key].parse(value.strip(), name)
    return name, validate(name, opts)


def flag_options(strategy: str, given: dict) -> dict:
    """Options given as command-line flags, checked against the strategy (InputError).

    given: {option: value or None}; None means not given. An option the strategy does not take
    is an error, not ignored; stairs takes --draft-tokens K as batch_size K + 1."""
    given = {k: v for k, v in given.items() if v is not None}
    if strategy == "stairs" and "draft_tokens" in given:
        if "batch_size" in given:
            raise InputError("stairs: give --batch-size or --draft-tokens, not both")
        k = OPTIONS["draft_tokens"].check(given.pop("draft_tokens"), strategy)
        given["batch_size"] = k + 1
    return validate(strategy, given)


def count_type(ceiling: int):
    """An argparse type: an integer from 1 to ceiling (the commands' count flags)."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not 1 <= value <= ceiling:
            raise argparse.ArgumentTypeError(f"{value} is not from 1 to {ceiling}")
        return value

    return parse


@dataclass(frozen=True)
class Limits:
    """Ceilings of one Engine. memory_bytes: what a generation may use (None: the machine's
    available memory, read at each call)."""

    max_new_tokens: int = MAX_NEW_TOKENS
    max_input_tokens: int = MAX_INPUT_TOKENS
    memory_bytes: int | None = None

    def __post_init__(self):
        for name in ("max_new_tokens", "max_input_tokens", "memory_bytes"):
            v = getattr(self, name)
            if v is None and name == "memory_bytes":
                continue
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise InputError(f"Limits.{name} must be an integer >= 1, got {v!r}")


@dataclass(frozen=True)
class LoadConfig:
    """How Engine.load opens a pair: everything but the folders and the Limits. The commands
    build one from their flags (engine.cli.add_load_flags), a server's ServeConfig derives one.

    provider: cpu, cuda, coreml or auto (assistant_provider: the assistant's, None = the same).
    threads: ORT threads per session (None: ORT's choice); assistant_threads: the assistant's
    (None: what stairs-tune measured for the pair, else threads). provider_options: passed to
    the provider. shared_thread_pool: one process-wide ORT pool. io_binding: run through ORT IO
    binding. verify: check file hashes. weights_cache: True (the default folder), a folder, or
    False (plain sessions); a Path is kept as str. kv_cache: auto, numpy or device.
    """

    provider: str = "cpu"
    threads: int | None = None
    provider_options: dict | None = None
    assistant_provider: str | None = None
    assistant_threads: int | None = None
    shared_thread_pool: bool = False
    io_binding: bool = False
    verify: bool = True
    weights_cache: bool | str = True
    kv_cache: str = "auto"

    def __post_init__(self):
        for name, v in (
            ("provider", self.provider),
            ("assistant_provider", self.assistant_provider),
        ):
            if not ((isinstance(v, str) and v) or (v is None and name == "assistant_provider")):
                raise InputError(
                    f"{name} must be a non-empty string (cpu, cuda, coreml or auto), not {v!r}"
                )
        for name, v in (("threads", self.threads), ("assistant_threads", self.assistant_threads)):
            bad = isinstance(v, bool) or not isinstance(v, numbers.Integral)
            if v is not None and (bad or not 1 <= v <= MAX_THREADS):
                raise InputError(
                    f"{name} must be None or an integer from 1 to {MAX_THREADS}, not {v!r}"
                )
        if self.provider_options is not None and not isinstance(self.provider_options, dict):
            raise InputError(
                f"provider_options must be a dict or None, not {self.provider_options!r}"
            )
        for name in ("shared_thread_pool", "io_binding", "verify"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be True or False, not {getattr(self, name)!r}")
        cache = self.weights_cache
        if isinstance(cache, PurePath):
            object.__setattr__(self, "weights_cache", cache := str(cache))
        if not isinstance(cache, (bool, str)) or cache == "":
            raise InputError(f"weights_cache must be True, False or a folder path, not {cache!r}")
        if not isinstance(self.kv_cache, str) or self.kv_cache not in KV_CACHES:
            raise InputError(
                f"kv_cache must be one of {', '.join(KV_CACHES)}, not {self.kv_cache!r}"
            )


def check_count(name: str, value, ceiling: int, how: str, allow_none: bool = False):
    """An integer 1..ceiling (bools refused); InputError says the ceiling and how to raise it."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise InputError(f"{name} must be an integer >= 1, got {value!r}")
    if value > ceiling:
        raise InputError(
            f"{name}={value} is over the ceiling of {ceiling}; lower it, or raise the ceiling "
            f"with {how}"
        )
    return int(value)


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (MemAvailable), None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _dims(model) -> tuple[int, int, int, int, int, int, int]:
    """(encoder layers, decoder layers, heads, d_kv, d_model, d_ff, vocab) of a T5Model."""
    c = model.config
    return (
        c.get("num_layers", model.num_decoder_layers),
        model.num_decoder_layers,
        model.num_heads,
        model.d_kv,
        c.get("d_model", model.num_heads * model.d_kv),
        c.get("d_ff", 4 * c.get("d_model", model.num_heads * model.d_kv)),
        model.vocab_size,
    )


def _encoder_bytes(model, s: int) -> int:
    # The peak is one layer's attention: the position bias (kept for all layers), scores, the
    # masked scores and their softmax, H*S*S each (measured on pycode: 3.3 GiB at S=4096), plus
    # hidden states and the feed-forward activation of all S positions.
    _, _, h, _, m, ff, _ = _dims(model)
    return 4 * (4 * h * s * s + s * (4 * m + 2 * ff))


def _decoder_bytes(model, s: int, t: int, p: int) -> int:
    # one row of t new tokens on a past of p: self key/values (the cache and the call's
    # present), cross key/values, attention scores and logits.
    _, layers, h, d, _, _, v = _dims(model)
    self_kv = 2 * layers * h * d * (p + t) * 2
    cross_kv = 2 * layers * h * d * enc_width(s)
    scores = h * t * (p + t + s) * 2
    return 4 * (self_kv + cross_kv + scores + t * v)


def estimate_memory(main, assistant, strategy: str, options: dict, s: int, n: int) -> dict:
    """Bytes one request of n new tokens on s input tokens needs, by part (fp32 activations;
    the weights are already loaded), from its strategy's row shapes. options: all of the
    strategy's (with_defaults)."""
    spec = STRATEGIES[strategy]
    p = n + 1  # decoder positions: the start token and n new ones
    parts = {
        "main encoder": _encoder_bytes(main, s),
        "main decoder": _decoder_bytes(main, s, spec.main_tokens(options, n), p),
    }
    if assistant is not None and spec.needs_assistant:
        a_t, extra = spec.assistant_tokens(options)
        parts["assistant encoder"] = _encoder_bytes(assistant, s)
        parts["assistant decoder"] = _decoder_bytes(assistant, s, a_t, p + extra)
    return parts


def check_memory(main, assistant, strategy, options, s: int, n: int, memory: int | None) -> int:
    """InputError if the estimate (times MEMORY_SAFETY) exceeds memory (None: what the machine
    has available now); returns the estimate in bytes."""
    parts = estimate_memory(main, assistant, strategy, options, s, n)
    need = sum(parts.values())
    have = available_memory() if memory is None else memory
    if have is not None and need * MEMORY_SAFETY > have:
        gib = 1024**3
        detail = ", ".join(f"{k} {v / gib:.2f}" for k, v in parts.items())
        raise InputError(
            f"this generation needs an estimated {need / gib:.2f} GiB ({detail}), "
            f"{need * MEMORY_SAFETY / gib:.2f} GiB with the {MEMORY_SAFETY}x margin, and only "
            f"{have / gib:.2f} GiB is available; lower max_input_tokens (the input is {s} tokens: "
            f"truncation='left' cuts it), max_new_tokens ({n}) or the strategy's draft "
            "(batch_size, branches, draft_tokens), or set Engine.limits.memory_bytes"
        )
    return need


MAX_BATCH_SIZE = 1024


def parse_sizes(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4] (sorted, duplicates dropped); ValueError names the bad item."""
    sizes = set()
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit() or not 1 <= int(item) <= MAX_BATCH_SIZE:
            raise ValueError(f"batch sizes must be integers 1-{MAX_BATCH_SIZE}, got {item!r}")
        sizes.add(int(item))
    return sorted(sizes)
