"""`stairs-generate`: thin command line over Engine.generate."""

from __future__ import annotations

import argparse
import json
import sys


def strategy_options(strategy: str, draft_tokens=None, batch_size=None, layout=None,
                     schedule=None, threshold=None) -> dict:
    """Map generic CLI settings onto the keyword options a strategy takes."""
    opts: dict = {}
    if strategy in ("assisted", "lookup", "staged") and draft_tokens:
        opts["draft_tokens"] = draft_tokens
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
    p.add_argument("--strategy", default="greedy", choices=sorted(STRATEGIES))
    p.add_argument("--draft-tokens", type=int, help="K: draft tokens per round")
    p.add_argument("--batch-size", type=int, help="stairs rows (default K+1, else 7)")
    p.add_argument("--layout", choices=["past", "full"], help="stairs layout")
    p.add_argument("--schedule", choices=["constant", "heuristic"], help="assisted K schedule")
    p.add_argument("--threshold", type=float, help="stop drafting below this confidence")
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
        opts = strategy_options(a.strategy, a.draft_tokens, a.batch_size, a.layout, a.schedule,
                                a.threshold)
        for prompt in prompts:
            res = eng.generate(prompt, a.strategy, a.max_new_tokens, a.max_input_tokens,
                               a.truncation, **opts)
            if a.json:
                print(json.dumps({"strategy": a.strategy, "token_ids": res.token_ids,
                                  "text": res.text, "stats": res.stats.as_dict()}))
            else:
                print(res.text)
    except (EngineError, OSError) as exc:
        print(f"stairs-generate: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
