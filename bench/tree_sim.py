"""Would a tree-attention verify pay? Replay the main model's greedy tokens against the assistant.

Along the accepted path every drafted node is on the main model's own greedy continuation, so the
assistant's distribution there is its teacher-forced one: one assistant call over the greedy output
gives, for every position, the rank of the main model's token among the assistant's candidates.
A draft tree is a set of rank paths ((0,) = the assistant's top token, (0, 1) = its second choice
after that, ...); it accepts the longest run of positions whose ranks form a path of the tree.
With measured call costs this predicts tokens/s for the best trees of each size if verified as one
row (a tree mask with per-node depth positions: 1 row x N tokens), against linear drafting.
"""

from __future__ import annotations

import heapq
import time
from collections import Counter

import numpy as np

MAX_DEPTH = 10


def draft_ranks(eng, prompts: list[list[int]], max_new: int) -> list[np.ndarray]:
    """Per prompt: rank of each main greedy token among the assistant's logits (0 = its top)."""
    from engine.model import Cache
    from engine.stats import Counter as Calls

    a, out = eng.assistant, []
    for ids in prompts:
        g = eng.generate(ids, max_new_tokens=max_new).token_ids
        calls = Calls()
        enc, mask = a.encode(np.array([ids], np.int64), calls)
        seq = np.array([[a.start_id, *g[:-1]]], np.int64)
        logits = Cache(a, enc, mask, calls).first(seq)[0][0]  # [T, V], teacher-forced
        picked = logits[np.arange(len(g)), g]
        out.append((logits > picked[:, None]).sum(1))
    return out


def path_probs(ranks: list[np.ndarray], max_rank: int = 4) -> tuple[Counter, int]:
    """How often each rank path (up to MAX_DEPTH) is the main model's continuation."""
    cnt: Counter = Counter()
    n = 0
    for r in ranks:
        r = np.minimum(r, max_rank)
        for p in range(len(r)):
            n += 1
            for d in range(1, min(MAX_DEPTH, len(r) - p) + 1):
                cnt[tuple(int(x) for x in r[p : p + d])] += 1
    return cnt, n


def best_tree(cnt: Counter, n: int, nodes: int, max_rank: int = 4, depth: int = MAX_DEPTH) -> set:
    """The tree of `nodes` nodes, at most `depth` deep, with the most expected accepted tokens
    (greedy is optimal: a child is never likelier than its parent)."""
    tree: set = set()
    heap = [(-cnt[(k,)] / n, (k,)) for k in range(max_rank)]
    heapq.heapify(heap)
    while len(tree) < nodes and heap:
        _, node = heapq.heappop(heap)
        tree.add(node)
        if len(node) < depth:
            for k in range(max_rank):
                heapq.heappush(heap, (-cnt[node + (k,)] / n, node + (k,)))
    return tree


def linear(k: int) -> set:
    return {(0,) * d for d in range(1, k + 1)}


def replay(ranks, tree: set, main_ms, draft_ms, encoder_ms: float) -> dict:
    """Verify calls, tokens per call and predicted ms per prompt for one tree on these ranks."""
    depth = max(map(len, tree))
    # assistant calls per round: level d feeds the nodes of depth d that have children
    parents = {x[:-1] for x in tree}
    rows = [1] + [sum(1 for x in parents if len(x) == d) for d in range(1, depth)]
    round_ms = main_ms(len(tree) + 1) + draft_ms(1, True) + sum(draft_ms(r) for r in rows[1:] if r)
    calls = toks = 0
    for r in ranks:
        p = 0
        while p < len(r):
            n = 0
            while n < len(r) - p and tuple(int(x) for x in r[p : p + n + 1]) in tree:
                n += 1
            step = min(n + 1, len(r) - p)
            calls, toks, p = calls + 1, toks + step, p + step
    ms = (calls * round_ms + encoder_ms * len(ranks)) / len(ranks)
    return {
        "nodes": len(tree),
        "depth": depth,
        "tokens_per_main_call": toks / calls,
        "ms_per_prompt": ms,
        "tokens_per_s": toks / len(ranks) / ms * 1e3,
    }


def _draft_cost(eng, past: int = 48, reps: int = 100) -> dict:
    """Assistant decoder-with-past ms for 1..8 rows x 1 token."""
    from bench.core import call_ms, decoder_feed

    sess = eng.assistant.sessions["decoder_with_past"]
    return {
        b: call_ms(sess, decoder_feed(eng.assistant, b, 1, past, 129), reps) for b in (1, 2, 4, 8)
    }


def simulate(eng, prompts, max_new: int, cost_curve: dict, sizes=None):
    """Predicted tokens/s of linear K and the best trees of each size, from measured costs."""
    sizes = sizes or (4, 6, 8, 10, 12, 16, 20, 24)
    ranks = draft_ranks(eng, prompts, max_new)
    cnt, n = path_probs(ranks)
    toks = cost_curve["tokens"]
    ns, ms = [p["n"] for p in toks], [p["ms"] for p in toks]

    # 1 row x k tokens: a least-squares line through the measured curve (single points are noisy
    # on a shared machine and would make one K look better than its neighbours)
    slope, icpt = np.polyfit(ns, ms, 1)

    def main_ms(k):
        return float(icpt + slope * k)

    dc = _draft_cost(eng)

    # the first assistant call of a round comes after a main call evicted its weights from the
    # caches: measured about 2.4x a warm step inside the engine (1.02 vs 0.42 ms)
    def draft_ms(b, first=False):
        return float(np.interp(b, list(dc), list(dc.values()))) * (2.4 if first else 1.0)

    enc_ms = float(np.mean([_encoders_ms(eng, p) for p in prompts[:3]]))
    res = {
        "top1": float(np.mean(np.concatenate(ranks) == 0)),
        "top2": float(np.mean(np.concatenate(ranks) < 2)),
        "encoders_ms": enc_ms,
        "draft_step_ms": dc,
        "main_ms_fit": [float(icpt), float(slope)],
        "linear": [],
        "tree": [],
    }
    for k in range(2, 9):
        res["linear"].append(
            {"draft_tokens": k, **replay(ranks, linear(k), main_ms, draft_ms, enc_ms)}
        )
    for size in sizes:  # each assistant level costs a call: try depth caps, keep the fastest
        cands = []
        for depth in (3, 4, 5, 6, 8, MAX_DEPTH):
            tree = best_tree(cnt, n, size, depth=depth)
            row = replay(ranks, tree, main_ms, draft_ms, enc_ms)
            row["shape"] = sorted(tree, key=lambda x: (len(x), x))
            cands.append(row)
        res["tree"].append(max(cands, key=lambda r: r["tokens_per_s"]))
    return res


def _encoders_ms(eng, ids) -> float:
    from engine.stats import Counter as Calls

    x = np.array([ids], np.int64)
    t = time.perf_counter()
    eng.main.encode(x, Calls())
    eng.assistant.encode(x, Calls())
    return (time.perf_counter() - t) * 1e3
