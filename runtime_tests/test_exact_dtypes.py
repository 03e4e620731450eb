"""Token-exact whatever the main's dtype: the pycode main exported fp16, int8 and int4 (with the
pycode draft assisting) gives its own greedy tokens under every strategy at batch 1, 3 and 8
over prompts of mixed lengths, and under submit() with a request joining mid-way and one
cancelled mid-draft. Whole token lists are compared with the main's own greedy generate()."""

from __future__ import annotations

import time

import pytest

from bench import exact
from engine import CancelledError, Engine
from engine.strategies.base import auto_entry

DTYPES = ("fp16", "int8", "int4")
NEW = 12  # tokens per prompt: enough for several drafts to be accepted and rejected
N_PROMPTS = 8
STRATEGIES = exact.STRATEGIES  # the settings python -m bench.exact measures
IDS = [name + "".join(f"-{k}={v}" for k, v in opts.items()) for name, opts in STRATEGIES]
HANG_S = 300  # a guard against hangs only


def mixed(prompts: list[list[int]], n: int) -> list[list[int]]:
    """n public prompts of mixed lengths (5 to 130 ids): prompt i keeps its last
    4 + (i * 37) % 126 ids and the final EOS, so rows of other lengths share calls."""
    return [p[:-1][-(4 + (i * 37) % 126) :] + p[-1:] for i, p in enumerate(prompts[:n])]


@pytest.fixture(scope="module", params=DTYPES)
def case(request, pycode_dtypes, pycode_pair, pycode_prompts):
    """(dtype, engine, prompts, each prompt's own greedy tokens) for one dtype of the main."""
    eng = Engine.load(pycode_dtypes[request.param], assistant=pycode_pair[1], threads=2)
    prompts = mixed(pycode_prompts, N_PROMPTS)
    assert len({len(p) for p in prompts}) == N_PROMPTS
    own = [eng.generate(p, max_new_tokens=NEW).token_ids for p in prompts]
    assert all(len(o) == NEW for o in own), own  # no early EOS: every step is compared
    return request.param, eng, prompts, own


def _diff(got: list[list[int]], want: list[list[int]]) -> str:
    bad = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
    return "; ".join(f"prompt {i}: {got[i]} != greedy {want[i]}" for i in bad)


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("strategy", STRATEGIES, ids=IDS)
def test_every_strategy_and_batch_gives_the_mains_own_greedy(case, strategy, batch):
    dtype, eng, prompts, own = case
    name, opts = strategy
    got, accepted = [], 0
    for i in range(0, len(prompts), batch):
        res = eng.generate_batch(prompts[i : i + batch], strategy=name, max_new_tokens=NEW, **opts)
        got += [r.token_ids for r in res]
        accepted += sum(r.stats.accepted for r in res)
    assert got == own, f"{dtype} {name} {opts} B={batch}: " + _diff(got, own)
    drafts = name != "greedy" and (name != "auto" or auto_entry(eng.auto_table(), batch))
    if drafts:  # drafts were accepted, so the accepting path really ran
        assert accepted > 0, f"{dtype} {name}: nothing accepted"


@pytest.mark.parametrize("strategy", STRATEGIES, ids=IDS)
def test_submit_with_a_late_joiner_and_a_cancel_mid_draft(case, strategy):
    """Three requests start, a fourth is cancelled after its first tokens (its long budget keeps
    it drafting), a fifth joins once the first has streamed tokens: every finished one equals
    its own greedy, the streamed tokens too, and the cancelled one's tokens are its prefix."""
    dtype, eng, prompts, own = case
    name, opts = strategy
    kw = {"strategy": name, **opts}
    first = [eng.submit(p, max_new_tokens=NEW, **kw) for p in prompts[:3]]
    victim = eng.submit(prompts[3], max_new_tokens=2000, **kw)
    pieces = victim.tokens()
    cut = list(next(pieces))
    victim.cancel()
    streamed, late = [], None
    for toks in first[0].tokens():
        streamed += toks
        if late is None:
            late = eng.submit(prompts[4], max_new_tokens=NEW, **kw)
    got = [streamed] + [h.result(timeout=HANG_S).token_ids for h in (*first[1:], late)]
    assert late.result(timeout=HANG_S).stats.mean_batch_rows > 1, "the joiner ran alone"
    want = [own[0], own[1], own[2], own[4]]
    assert got == want, f"{dtype} {name} {opts}: " + _diff(got, want)
    assert first[0].result(timeout=HANG_S).token_ids == own[0]
    with pytest.raises(CancelledError):  # the stream ends cancelled, and so does result()
        for toks in pieces:  # what it emitted before the cancel took effect
            cut += toks
    with pytest.raises(CancelledError):
        victim.result(timeout=HANG_S)
    n = min(len(cut), NEW)
    assert n and cut[:n] == own[3][:n], f"{dtype} {name}: the cancelled row gave {cut}"
    assert _idle(eng), "the cancelled row was never freed"


def _idle(eng) -> bool:
    """Whether the scheduler lets go of every request (polled; a hang guard only)."""
    end = time.monotonic() + HANG_S
    while eng.health().busy and time.monotonic() < end:
        time.sleep(0.02)
    return not eng.health().busy


def test_auto_follows_the_mains_dtype_and_stays_exact(case):
    """Untuned, auto's table is the main dtype's (fp16 as fp32): a cheaper main stops
    speculating at fewer requests, and a batch past that point is still its own greedy."""
    from engine import scheduler

    dtype, eng, prompts, own = case
    table = eng.auto_table()
    assert table == scheduler.DEFAULT_AUTO_K["fp32" if dtype == "fp16" else dtype]
    off = min(n for n, k in table.items() if k == 0)
    res = eng.generate_batch(prompts[:off], strategy="auto", max_new_tokens=NEW)
    assert [r.token_ids for r in res] == own[:off]
    assert all(r.stats.drafted == 0 for r in res), [r.stats for r in res]
