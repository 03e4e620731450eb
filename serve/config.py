"""ServeConfig: every setting of stairs-serve, validated in one place.

The command line (serve.cli.parse_args), create_app's keyword arguments, build_app, Ray's
application args (serve_config.yaml) and each Ray replica all build or carry this one frozen
object; a bad value is an engine.InputError naming the setting.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from engine import InputError, LoadConfig
from engine import options as opt
from engine.layout import MAX_THREADS

API_KEY_ENV = "STAIRS_API_KEY"
DEFAULT_MAX_QUEUE = 256
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_BODY_TIMEOUT_S = 10.0
DEFAULT_HEADER_TIMEOUT_S = 5.0
DEFAULT_IDLE_TIMEOUT_S = 5.0
DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_DRAIN_GRACE_S = 5.0
DRAIN_TIMEOUT_S = 60.0  # after the grace: how long open requests may take to finish
MAX_COUNT = 1 << 20
MAX_WORKERS = 256
_LOAD = LoadConfig()  # the load settings' defaults
# settings of the uvicorn process itself: under Ray its proxy serves HTTP, so Ray args refuse them
SERVER_ONLY = (
    "host", "port", "max_connections", "drain_grace", "ray", "ray_address", "workers",
    "header_timeout", "idle_timeout",
)  # fmt: skip


@dataclass(frozen=True)
class ServeConfig:
    """What stairs-serve loads and how it serves.

    main/assistant: the pair build_app loads. provider/threads/shared_thread_pool/verify/
    weights_cache/kv_cache: how (LOAD_FIELDS; the `load` property is their LoadConfig, which
    checks them).
    strategy/options: what every request runs (any strategy; auto: draft length by load).
    model_name: the id clients send (None: the main folder's name).
    max_batch_tokens: rows x padded tokens of one main call (None: the engine's default).
    max_queue: prompts in the server at once, beyond it 429. max_active: prompts generating at
    once (None: all; 1 serves one at a time). timeout: seconds per request's generation, then
    504. body_timeout: seconds to receive a request body, then 408. api_key: required bearer key.
    host/port/max_connections (beyond it uvicorn answers 503)/drain_grace (seconds /ready is 503
    after SIGTERM before the listener closes)/idle_timeout (seconds a connection may stay open
    without sending a request)/header_timeout (seconds from a request's first byte to the end
    of its headers): the uvicorn process. ray/replicas/ray_address:
    serve as a Ray Serve deployment. workers: uvicorn processes sharing the listening socket,
    each with its own engine (their weights mapped from one weights cache: one copy per machine).
    """

    main: str | None = None
    assistant: str | None = None
    provider: str = _LOAD.provider
    threads: int | None = _LOAD.threads
    shared_thread_pool: bool = _LOAD.shared_thread_pool
    verify: bool = _LOAD.verify
    weights_cache: bool | str = _LOAD.weights_cache
    kv_cache: str = _LOAD.kv_cache
    strategy: str = "auto"
    options: dict = field(default_factory=dict)
    model_name: str | None = None
    max_batch_tokens: int | None = None
    max_queue: int = DEFAULT_MAX_QUEUE
    max_active: int | None = None
    timeout: float = DEFAULT_TIMEOUT_S
    body_timeout: float = DEFAULT_BODY_TIMEOUT_S
    api_key: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    drain_grace: float = DEFAULT_DRAIN_GRACE_S
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S
    header_timeout: float = DEFAULT_HEADER_TIMEOUT_S
    ray: bool = False
    replicas: int = 1
    ray_address: str | None = None
    workers: int = 1
    self_check: bool = False  # engine.selfcheck at load: refuse to serve where rows are not exact

    def __post_init__(self):
        for name in ("main", "assistant"):
            v = getattr(self, name)
            if isinstance(v, Path):
                object.__setattr__(self, name, str(v))
            elif v is not None and (not isinstance(v, str) or not v):
                raise InputError(f"{name} must be a folder path or None, not {v!r}")
        load = self.load  # checks the load settings (InputError)
        for name in LOAD_FIELDS:  # as LoadConfig keeps them (a weights_cache Path as str)
            object.__setattr__(self, name, getattr(load, name))
        if not isinstance(self.host, str) or not self.host:
            raise InputError(f"host must be a non-empty string, not {self.host!r}")
        for name in ("ray", "self_check"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be True or False, not {getattr(self, name)!r}")
        opt.check_strategy(self.strategy)
        object.__setattr__(self, "options", opt.validate(self.strategy, self.options or {}))
        self._check_counts()
        self._check_seconds()
        for name in ("api_key", "model_name", "ray_address"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v.strip()):
                raise InputError(f"{name} must be a non-empty string or None, not {v!r}")

    @property
    def load(self) -> LoadConfig:
        """How build_app loads the pair (Engine.load(main, assistant, config=cfg.load))."""
        return LoadConfig(**{name: getattr(self, name) for name in LOAD_FIELDS})

    def _check_counts(self) -> None:
        counts = {
            "max_batch_tokens": (MAX_COUNT, True),  # its ceiling: Engine.start's check
            "max_queue": (MAX_COUNT, False),
            "max_active": (MAX_COUNT, True),
            "port": (65535, False),
            "max_connections": (MAX_COUNT, False),
            "replicas": (MAX_THREADS, False),
            "workers": (MAX_WORKERS, False),
        }
        for name, (ceiling, none_ok) in counts.items():
            v = getattr(self, name)
            if v is None and none_ok:
                continue
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 1 <= v <= ceiling:
                raise InputError(f"{name} must be an integer from 1 to {ceiling}, not {v!r}")

    def _check_seconds(self) -> None:
        seconds = ("timeout", "body_timeout", "idle_timeout", "header_timeout")
        for name, zero_ok in [(n, False) for n in seconds] + [("drain_grace", True)]:
            v = getattr(self, name)
            ok = not isinstance(v, bool) and isinstance(v, numbers.Real) and math.isfinite(v)
            if not (ok and (v >= 0 if zero_ok else v > 0)):
                bound = ">= 0" if zero_ok else "> 0"
                raise InputError(f"{name} must be a finite number of seconds {bound}, not {v!r}")
            object.__setattr__(self, name, float(v))

    @classmethod
    def of(cls, settings: dict, refuse: tuple[str, ...] = ()) -> ServeConfig:
        """From a plain dict (Ray's args, keyword arguments); InputError names unknown keys and
        those in refuse."""
        known = [f.name for f in fields(cls) if f.name not in refuse]
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise InputError(f"unknown setting(s) {unknown}; known: {', '.join(known)}")
        return cls(**settings)

    def with_env(self) -> ServeConfig:
        """The API key from $STAIRS_API_KEY when none is set."""
        if self.api_key is None and os.environ.get(API_KEY_ENV):
            return replace(self, api_key=os.environ[API_KEY_ENV])
        return self

    def replace(self, **changes) -> ServeConfig:
        """A copy with changes (validated again)."""
        return self.of({**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})


RAY_ARGS = tuple(f.name for f in fields(ServeConfig) if f.name not in SERVER_ONLY)
# ServeConfig's fields that are LoadConfig settings (the others keep LoadConfig's defaults)
_LOADS = {f.name for f in fields(LoadConfig)}
LOAD_FIELDS = tuple(f.name for f in fields(ServeConfig) if f.name in _LOADS)
