"""Self-tuning: pick the fastest strategy and settings for a pair on this device, measured.

A short calibration times every candidate against greedy, interleaved prompt by prompt, on the
user's prompts, and stores the winner in the main model's folder (`stairs-tune.json`), keyed by
assistant, provider and threads; strategy="auto" uses it.
"""

from __future__ import annotations

import json
import logging
import time

log = logging.getLogger("stairs")
TUNE_FILE = "stairs-tune.json"

CANDIDATES = (
    [("assisted", {"draft_tokens": k}) for k in (2, 3, 4, 5, 6, 8)]
    + [("assisted", {"draft_tokens": 5, "schedule": "heuristic"})]
    + [("tree", {"draft_tokens": k, "branches": 2}) for k in (3, 4, 6)]
    + [("staged", {"draft_tokens": k}) for k in (4, 6, 8)]
    + [("stairs", {"batch_size": b}) for b in (3, 5)]
    + [("lookup", {"draft_tokens": 7})]
)
NO_ASSISTANT = [("lookup", {"draft_tokens": k}) for k in (3, 5, 7, 10)]


def key(engine) -> str:
    """What a tuning is valid for: the assistant, the provider and the thread count."""
    a = engine.assistant
    return f"{a.folder.resolve().name if a else '-'}|{engine.main.provider}|{engine.threads}"


def calibrate(engine, prompts, max_new_tokens: int = 64, save: bool = True) -> dict:
    """Time greedy and every candidate on prompts (interleaved); return and store the fastest."""
    cands = CANDIDATES if engine.assistant is not None else NO_ASSISTANT
    cands = [("greedy", {})] + list(cands)
    seconds = [0.0] * len(cands)
    engine.generate(prompts[0], max_new_tokens=4)  # warm-up
    for p in prompts:
        for i, (name, opts) in enumerate(cands):
            t = time.perf_counter()
            engine.generate(p, strategy=name, max_new_tokens=max_new_tokens, **opts)
            seconds[i] += time.perf_counter() - t
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
    if save:
        path = engine.main.folder / TUNE_FILE
        try:
            stored = json.loads(path.read_text()) if path.is_file() else {}
            stored[result["key"]] = result
            path.write_text(json.dumps(stored, indent=2))
        except OSError as exc:  # read-only model folder: keep the result in memory only
            log.warning("cannot store tuning in %s: %s", path, exc)
    return result


def load(engine) -> dict | None:
    """The stored tuning for this engine's pair, provider and threads, if any."""
    path = engine.main.folder / TUNE_FILE
    try:
        return json.loads(path.read_text()).get(key(engine)) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def default(engine) -> tuple[str, dict]:
    """Untuned choice: assisted with K=4 (best here on CPU) or, alone, prompt lookup."""
    return ("assisted", {"draft_tokens": 4}) if engine.assistant else ("lookup", {})
