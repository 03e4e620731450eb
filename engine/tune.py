"""Self-tuning: pick the fastest strategy and settings for a pair on this device, measured.

A short calibration times every strategy's candidates against greedy, interleaved prompt by
prompt, on the user's prompts, then whether the assistant is faster on one thread, then the
draft length that serves batches of 1 (and of each --batch-sizes) fastest; it stores them in the
main model's folder (`stairs-tune.json`), keyed by assistant, provider and threads.
strategy="auto" runs that draft-length table.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from . import verify
from .errors import InputError, ModelFileError
from .layout import TUNE_FILE
from .options import validate
from .providers import process_pool_exists
from .scheduler import beyond_measured, default_auto_k

log = logging.getLogger("stairs")


def _candidates(with_assistant: bool) -> list[tuple[str, dict]]:
    """Every strategy's stairs-tune candidates (from the strategy table), checked against the
    option schema: the assistant's strategies only when there is one."""
    from .strategies import STRATEGIES

    return [
        (name, validate(name, dict(opts)))
        for name, s in STRATEGIES.items()
        if with_assistant or not s.needs_assistant
        for opts in s.candidates
    ]


def key(engine) -> str:
    """What a tuning is valid for: the assistant, the provider, the thread count and whether
    the sessions run on the process-wide pool (timings differ between pools by up to 1.2x)."""
    a = engine.assistant
    shared = process_pool_exists()
    return _key(a.folder if a else None, engine.main.provider, engine.threads, shared)


def _key(assistant, provider: str, threads: int | None, shared: bool = False) -> str:
    base = f"{Path(assistant).resolve().name if assistant else '-'}|{provider}|{threads}"
    return base + ("|shared" if shared else "")


def _time(engine, prompts, cands, max_new_tokens: int) -> list[float]:
    """Seconds of each candidate over all prompts, interleaved prompt by prompt."""
    seconds = [0.0] * len(cands)
    for p in prompts:
        for i, (name, opts) in enumerate(cands):
            t = time.perf_counter()
            engine.generate(p, strategy=name, max_new_tokens=max_new_tokens, **opts)
            seconds[i] += time.perf_counter() - t
    return seconds


def _assistant_threads(engine, prompts, best: tuple, max_new_tokens: int) -> int | None:
    """1 if the assistant runs the best candidate faster on one thread (its ops are too short
    to share; measured 0.34 vs 0.45 ms per draft step on 2 AMD cores), else None (= threads)."""
    a = engine.assistant
    # on the process-wide pool every session runs on that pool: there is nothing to choose
    if a is None or a.provider != "cpu" or engine.threads == 1 or process_pool_exists():
        return None
    from .model import T5Model

    models = {a.threads: a}
    for n in (1, engine.threads):
        if n not in models:
            models[n] = T5Model(a.folder, "cpu", n, name=a.name)
    secs = dict.fromkeys(models, 0.0)
    for n, model in models.items():  # warm-up
        engine.assistant = model
        engine.generate(prompts[0], max_new_tokens=4, strategy=best[0], **best[1])
    for p in prompts:
        for n, model in models.items():
            engine.assistant = model
            secs[n] += _time(engine, [p], [best], max_new_tokens)[0]
    choice = 1 if secs[1] < 0.98 * secs[engine.threads] else engine.threads
    engine.assistant = models[choice]
    return 1 if choice == 1 else None


def _read_all(main) -> dict:
    """Every tuning stored in the main folder's stairs-tune.json; {} if absent. The file is a
    cache: a damaged one is logged as a warning and ignored (auto then uses its default), but
    one that resolves outside the folder is refused (calibrate would write through it)."""
    path = verify.inside(main, TUNE_FILE)
    if not path.is_file():
        return {}
    try:
        return verify.read_json(path, dict)
    except ModelFileError as exc:
        log.warning("ignoring %s (run stairs-tune again to replace it)", exc)
        return {}


def _stored(main, key: str) -> dict | None:
    """The tuning stored under key in the main folder's stairs-tune.json, if well-formed."""
    from .strategies import STRATEGIES

    try:
        entry = _read_all(main).get(key)
    except ModelFileError as exc:
        log.warning("ignoring %s", exc)
        return None
    if entry is None:
        return None
    threads = entry.get("assistant_threads") if isinstance(entry, dict) else None
    try:
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("strategy"), str)
            and entry["strategy"] in STRATEGIES
            and validate(entry["strategy"], entry.get("options")) is not None
            and (threads is None or (type(threads) is int and threads > 0))
        )
    except InputError:
        ok = False
    if not ok:
        log.warning("ignoring damaged entry %r of %s", key, Path(main) / TUNE_FILE)
        return None
    return entry


def stored_assistant_threads(main, assistant, provider: str, threads: int | None) -> int | None:
    """The assistant thread count stairs-tune measured best for this pair, if any."""
    return (_stored(main, _key(assistant, provider, threads)) or {}).get("assistant_threads")


BATCH_DRAFT_TOKENS = (0, 2, 3, 4, 5)  # candidates of batched auto per batch size; 0 = greedy


def batch_table(engine, prompts, sizes, max_new_tokens: int = 64) -> dict[int, int]:
    """Batched auto: for each batch size n, the draft length (0 = greedy) that served the
    prompts fastest in batches of n, every candidate timed on each batch in turn."""
    name = "assisted" if engine.assistant is not None else "lookup"
    table = {}
    for n in sizes:
        pool = list(prompts) * -(-n // len(prompts))  # at least one full batch
        secs = dict.fromkeys(BATCH_DRAFT_TOKENS, 0.0)
        for i in range(0, len(pool) - n + 1, n):
            for k in BATCH_DRAFT_TOKENS:
                opts = {"strategy": "greedy"} if k == 0 else {"strategy": name, "draft_tokens": k}
                t = time.perf_counter()
                engine.generate_batch(pool[i : i + n], max_new_tokens=max_new_tokens, **opts)
                secs[k] += time.perf_counter() - t
        table[int(n)] = min(secs, key=secs.get)
    return table


def calibrate(engine, prompts, max_new_tokens: int = 64, save: bool = True, batch_sizes=()) -> dict:
    """Time greedy and every candidate on prompts (interleaved); return and store the fastest.
    batch_sizes: also measure batched auto's draft length at each size (batch_table)."""
    cands = [("greedy", {})] + _candidates(engine.assistant is not None)
    engine.generate(prompts[0], max_new_tokens=4)  # warm-up
    seconds = _time(engine, prompts, cands, max_new_tokens)
    table = [
        {"strategy": n, "options": o, "seconds": s, "speedup_vs_greedy": seconds[0] / s}
        for (n, o), s in zip(cands, seconds)
    ]
    best = min(table[1:], key=lambda r: r["seconds"])
    result = {
        "key": key(engine),
        "strategy": best["strategy"],
        "options": best["options"],
        "speedup_vs_greedy": best["speedup_vs_greedy"],
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "candidates": table,
    }
    # Then the assistant's thread count, on the winner only (the ranking barely depends on it).
    result["assistant_threads"] = _assistant_threads(
        engine, prompts, (best["strategy"], best["options"]), max_new_tokens
    )
    # what strategy="auto" runs: the draft length by the number of requests, batch 1 included
    sizes = sorted({1, *batch_sizes})
    measured = batch_table(engine, prompts, sizes, max_new_tokens)
    result["batch_auto_k"] = beyond_measured(measured, default_auto_k(engine.main))
    if save:
        path = engine.main.folder / TUNE_FILE
        try:
            stored = _read_all(engine.main.folder)
            stored[result["key"]] = result
            path.write_text(json.dumps(stored, indent=2))
        except OSError as exc:  # read-only model folder: keep the result in memory only
            log.warning("cannot store tuning in %s: %s", path, exc)
    return result


def load(engine) -> dict | None:
    """The stored tuning for this engine's pair, provider and threads, if any."""
    return _stored(engine.main.folder, key(engine))
