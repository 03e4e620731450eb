"""`stairs-generate`: thin command line over Engine.generate."""

from __future__ import annotations

import argparse
import json
import sys


def strategy_options(
    strategy: str,
    draft_tokens=None,
    batch_size=None,
    layout=None,
    schedule=None,
    threshold=None,
    branches=None,
) -> dict:
    """Map generic CLI settings onto the keyword options a strategy takes."""
    opts: dict = {}
    if strategy in ("assisted", "lookup", "staged", "tree") and draft_tokens:
        opts["draft_tokens"] = draft_tokens
    if strategy == "tree" and branches:
        opts["branches"] = branches
    if strategy == "stairs":
        if batch_size or draft_tokens:
            opts["batch_size"] = batch_size or draft_tokens + 1
        if layout:
            opts["layout"] = layout
    if strategy == "assisted" and schedule:
        opts["schedule"] = schedule
    if strategy in ("assisted", "stairs") and threshold is not None:
        opts["threshold"] = threshold
    return opts


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    from engine import STRATEGIES, Engine, EngineError

    p = argparse.ArgumentParser(prog="stairs-generate", description=__doc__)
    p.add_argument("prompt", nargs="?", help="text prompt (or use --prompts)")
    p.add_argument("--main", required=True, help="exported main model folder")
    p.add_argument("--assistant", help="exported assistant model folder")
    p.add_argument("--strategy", default="greedy", choices=["auto", *sorted(STRATEGIES)])
    p.add_argument("--draft-tokens", type=int, help="K: draft tokens per round")
    p.add_argument("--batch-size", type=int, help="stairs rows (default K+1, else 7)")
    p.add_argument("--layout", choices=["past", "full"], help="stairs layout")
    p.add_argument("--schedule", choices=["constant", "heuristic"], help="assisted K schedule")
    p.add_argument("--threshold", type=float, help="stop drafting below this confidence")
    p.add_argument("--branches", type=int, help="tree: number of branches")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-input-tokens", type=int)
    p.add_argument("--truncation", choices=["left", "right"])
    p.add_argument("--provider", default="cpu", help="cpu, cuda, coreml or auto")
    p.add_argument("--threads", type=int)
    p.add_argument("--prompts", help="JSONL file; each line's 'context', 'prompt' or 'text'")
    p.add_argument("-n", type=int, help="only the first N prompts of --prompts")
    p.add_argument("--json", action="store_true", help="print token ids, text and stats as JSON")
    a = p.parse_args(argv)
    if (a.prompt is None) == (a.prompts is None):
        p.error("give either a PROMPT or --prompts FILE")
    try:
        eng = Engine.load(a.main, a.assistant, provider=a.provider, threads=a.threads)
        if a.prompts:
            with open(a.prompts) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            prompts = [r.get("context") or r.get("prompt") or r.get("text") for r in rows][: a.n]
        else:
            prompts = [a.prompt]
        opts = strategy_options(
            a.strategy, a.draft_tokens, a.batch_size, a.layout, a.schedule, a.threshold, a.branches
        )
        for prompt in prompts:
            res = eng.generate(
                prompt, a.strategy, a.max_new_tokens, a.max_input_tokens, a.truncation, **opts
            )
            if a.json:
                print(
                    json.dumps(
                        {
                            "strategy": a.strategy,
                            "token_ids": res.token_ids,
                            "text": res.text,
                            "stats": res.stats.as_dict(),
                        }
                    )
                )
            else:
                print(res.text)
    except (EngineError, OSError) as exc:
        print(f"stairs-generate: error: {exc}", file=sys.stderr)
        return 2
    return 0


def tune_main(argv: list[str] | None = None) -> int:
    """`stairs-tune`: calibrate strategy='auto' for a pair on this machine."""
    from engine import Engine, EngineError

    p = argparse.ArgumentParser(prog="stairs-tune", description=tune_main.__doc__)
    p.add_argument("--main", required=True)
    p.add_argument("--assistant")
    p.add_argument("--prompts", required=True, help="JSONL: 'context', 'prompt' or 'text'")
    p.add_argument("-n", type=int, default=8, help="calibration prompts")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-input-tokens", type=int, default=256)
    p.add_argument("--provider", default="cpu")
    p.add_argument("--threads", type=int)
    a = p.parse_args(argv)
    try:
        eng = Engine.load(a.main, a.assistant, provider=a.provider, threads=a.threads)
        with open(a.prompts) as f:
            rows = [json.loads(line) for line in f if line.strip()][: a.n]
        ids = [
            eng.encode(
                r.get("context") or r.get("prompt") or r["text"], a.max_input_tokens, "left"
            )[0].tolist()
            for r in rows
        ]
        res = eng.calibrate(ids, a.max_new_tokens)
    except (EngineError, OSError) as exc:
        print(f"stairs-tune: error: {exc}", file=sys.stderr)
        return 2
    for c in sorted(res["candidates"], key=lambda c: c["seconds"]):
        print(f"{c['strategy']:9s} {json.dumps(c['options']):45s} {c['speedup_vs_greedy']:.2f}x")
    print(f"auto = {res['strategy']} {res['options']} ({res['speedup_vs_greedy']:.2f}x greedy)")
    if res.get("assistant_threads"):
        print(f"assistant threads = {res['assistant_threads']} (faster than {a.threads} here)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
