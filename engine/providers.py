"""Execution providers: parse the user's choice, build sessions, detect silent fallback."""

from __future__ import annotations

import logging

import onnxruntime as ort

from .errors import ProviderError

log = logging.getLogger("stairs")

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}
AUTO_ORDER = ["cuda", "coreml", "cpu"]


def available() -> list[str]:
    """Short names of the providers this onnxruntime build was compiled with."""
    have = set(ort.get_available_providers())
    return [k for k, v in PROVIDERS.items() if v in have]


def resolve(provider: str) -> str:
    """'auto' -> the best available; anything else is checked against what is compiled in."""
    name = provider.lower()
    if name == "auto":
        return next(p for p in AUTO_ORDER if p in available())
    if name not in PROVIDERS:
        raise ProviderError(
            f"unknown provider {provider!r}; choose from auto, {', '.join(PROVIDERS)} "
            f"(available here: {', '.join(available())})"
        )
    if name not in available():
        raise ProviderError(
            f"provider {name!r} is not available in this onnxruntime build "
            f"(available: {', '.join(available())})"
        )
    return name


def provider_list(name: str, options: dict | None = None) -> list:
    """The providers argument of InferenceSession: the chosen one (with options), CPU last."""
    options = dict(options or {})
    if name == "cpu":
        return ["CPUExecutionProvider"]
    if name == "coreml":
        # MLProgram handles T5's ops; dynamic shapes fall back to the CPU, which we report.
        options.setdefault("ModelFormat", "MLProgram")
        options.setdefault("MLComputeUnits", "ALL")
    return [(PROVIDERS[name], {k: str(v) for k, v in options.items()}), "CPUExecutionProvider"]


_global_pool: int | None = None  # size of the process-wide pool once set (0 = ORT's default)


def _use_global_pool(threads: int | None) -> bool:
    """Set up one process-wide intra-op pool (the first call's size wins); whether it exists.

    Opt-in: once it exists ORT refuses per-session pools for every later session of the process
    (optimum's, another library's), so those must set use_per_session_threads=False too.
    """
    global _global_pool
    if _global_pool is None:
        try:
            from onnxruntime.capi import _pybind_state

            _pybind_state.set_global_thread_pool_sizes(threads or 0, 1)
            _global_pool = threads or 0
        except Exception:  # noqa: BLE001 - an ORT without it: per-session pools
            _global_pool = -1
    return _global_pool >= 0


def process_pool_exists() -> bool:
    """Whether the process-wide pool exists: then every session runs on it, whatever it asks."""
    return _global_pool is not None and _global_pool >= 0


def shared_pool_in_use(threads: int | None) -> bool:
    """Whether the process-wide pool exists with this size (what shared_pool=True then gets)."""
    return _global_pool == (threads or 0)


def session_options(threads: int | None, shared_pool: bool = False) -> ort.SessionOptions:
    """Session options: all graph optimisations; per-session pools that spin only while their
    own run lasts, or the one process-wide pool (shared_pool=True; also every session after it
    exists, as ORT requires)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if process_pool_exists() or (shared_pool and _use_global_pool(threads)):
        so.use_per_session_threads = False
        if not shared_pool_in_use(threads) or not shared_pool:
            log.warning(
                "the process-wide ORT pool (%s threads) serves this session too: ORT allows no"
                " per-session pool once it exists",
                _global_pool or "default",
            )
    else:
        if shared_pool:
            log.warning("shared_thread_pool: this ORT cannot set up a process-wide pool")
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        # A sleeping worker is woken for each of a call's ~100 parallel ops (greedy B=1: 1.23x
        # faster spinning); a pool still spinning after its run starves the next session.
        so.add_session_config_entry("session.intra_op.allow_spinning", "1")
        so.add_session_config_entry("session.force_spinning_stop", "1")
    return so


def check_loaded(session, name: str, wanted: str, path: str, explicit: bool) -> None:
    """Raise (explicit choice) or log (auto) when the session silently fell back to another EP."""
    got = session.get_providers()
    if got and got[0] != PROVIDERS[wanted]:
        msg = f"{path}: asked for {PROVIDERS[wanted]} but the session runs on {got[0]}"
        if explicit:
            raise ProviderError(msg + f" (available: {', '.join(available())})")
        log.warning(msg)
    else:
        log.info("%s runs on %s", name, got[0] if got else "?")
