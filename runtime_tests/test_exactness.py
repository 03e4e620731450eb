"""Every strategy emits exactly the main model's greedy tokens (the product's promise)."""

from __future__ import annotations

import numpy as np
import pytest

from engine import Engine

N_PROMPTS = 50
NEW = 64
K_VALUES = [1, 4]  # every row is bit-identical by construction (test_shape_invariance)

# (strategy, options for draft length K)
CASES = {
    "assisted": lambda k: {"draft_tokens": k},
    "assisted-heuristic": lambda k: {"draft_tokens": k, "schedule": "heuristic"},
    "assisted-threshold": lambda k: {"draft_tokens": k, "threshold": 0.4},
    "stairs": lambda k: {"batch_size": k + 1},
    "lookup": lambda k: {"draft_tokens": k},
    "staged": lambda k: {"draft_tokens": k},
    "tree": lambda k: {"draft_tokens": k, "branches": 2},
}


@pytest.fixture(scope="module")
def pycode_engine(pycode_pair):
    main, draft = pycode_pair
    return Engine.load(main, assistant=draft, threads=2)


@pytest.fixture(scope="module")
def greedy_ref(pycode_engine, pycode_prompts):
    return [
        pycode_engine.generate(p, max_new_tokens=NEW).token_ids for p in pycode_prompts[:N_PROMPTS]
    ]


@pytest.mark.parametrize("k", K_VALUES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_strategy_equals_greedy_on_pycode(pycode_engine, pycode_prompts, greedy_ref, case, k):
    strategy = case.split("-")[0]
    accepted = 0
    for prompt, ref in zip(pycode_prompts[:N_PROMPTS], greedy_ref):
        res = pycode_engine.generate(
            prompt, strategy=strategy, max_new_tokens=NEW, **CASES[case](k)
        )
        assert res.token_ids == ref
        assert res.stats.new_tokens == len(ref)
        accepted += res.stats.accepted
    assert accepted > 0  # the pair agrees ~82%: some drafts must be accepted


def test_greedy_equals_hf_generate(pycode_engine, pycode_prompts, greedy_ref):
    torch = pytest.importorskip("torch")
    from conftest import PYCODE_MAIN
    from transformers import T5ForConditionalGeneration

    model = T5ForConditionalGeneration.from_pretrained(PYCODE_MAIN, dtype=torch.float32).eval()
    for prompt, ref in zip(pycode_prompts[:20], greedy_ref):
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]), do_sample=False, num_beams=1, max_new_tokens=NEW
            )
        hf = out[0, 1:].tolist()  # drop the decoder start token
        while hf and hf[-1] == model.config.pad_token_id and len(hf) > len(ref):
            hf.pop()
        assert hf == ref


@pytest.mark.parametrize("variant", ["v1_0", "v1_1"])
@pytest.mark.parametrize("strategy", ["assisted", "stairs", "staged", "tree", "lookup"])
def test_tiny_self_and_random_assistant(tiny_models, variant, strategy):
    """Main as its own assistant: every draft accepted. A random assistant: none accepted."""
    m = tiny_models[variant]
    selfie = Engine.load(m["main"], assistant=m["main"])
    rand = Engine.load(m["main"], assistant=m["random"])
    rng = np.random.default_rng(0)
    for i in range(12):
        prompt = [int(t) for t in rng.integers(3, 8000, rng.integers(3, 40))] + [1]
        ref = selfie.generate(prompt, max_new_tokens=24).token_ids
        opts = {"batch_size": 5} if strategy == "stairs" else {"draft_tokens": 4}
        a = selfie.generate(prompt, strategy=strategy, max_new_tokens=24, **opts)
        b = rand.generate(prompt, strategy=strategy, max_new_tokens=24, **opts)
        assert a.token_ids == ref and b.token_ids == ref
        if strategy in ("assisted", "stairs", "staged", "tree"):
            assert a.stats.drafted > 0 and a.stats.accepted == a.stats.drafted
            assert b.stats.drafted > 0
            if strategy != "tree":  # a second branch of a random draft may hit by chance
                assert b.stats.accepted == 0
                assert b.stats.main_calls == len(ref)  # nothing skipped: one call per token


def test_tree_side_paths_stay_exact(pycode_engine, pycode_prompts, greedy_ref):
    """With 3 branches a winning side path emits only its slot-exact first token and is
    re-proposed as a chain: exact, and never fewer tokens per main call than one branch."""
    tree = linear = None
    for prompt, ref in zip(pycode_prompts[:10], greedy_ref):
        a = pycode_engine.generate(
            prompt, strategy="tree", max_new_tokens=NEW, draft_tokens=4, branches=3
        )
        b = pycode_engine.generate(
            prompt, strategy="tree", max_new_tokens=NEW, draft_tokens=4, branches=1
        )
        assert a.token_ids == ref and b.token_ids == ref
        tree = a.stats if tree is None else tree + a.stats
        linear = b.stats if linear is None else linear + b.stats
    assert tree.tokens_per_main_call >= linear.tokens_per_main_call


def test_auto_calibrates_stores_and_stays_exact(pycode_pair, pycode_prompts, greedy_ref, tmp_path):
    """calibrate() stores auto's draft-length table (batch 1 included) in a copy of the main
    folder, so no other test depends on it; a fresh engine runs it, exactly."""
    import shutil

    from engine import scheduler

    main = shutil.copytree(pycode_pair[0], tmp_path / "main")
    draft = pycode_pair[1]
    eng = Engine.load(main, assistant=draft, threads=2)
    assert eng.auto_table() == scheduler.DEFAULT_AUTO_K["fp32"]  # untuned default
    res = eng.calibrate(pycode_prompts[:2], max_new_tokens=16)
    assert res["strategy"] != "greedy" and len(res["candidates"]) > 10
    assert res["assistant_threads"] in (1, None) and 1 in res["batch_auto_k"]
    # measured at batch 1 only: above it the default's entries, none longer than batch 1's
    k1 = res["batch_auto_k"][1]
    above = {n: min(k, k1) for n, k in scheduler.DEFAULT_AUTO_K["fp32"].items() if n > 1}
    assert {n: k for n, k in res["batch_auto_k"].items() if n > 1} == above
    fresh = Engine.load(main, assistant=draft, threads=2)  # reads stairs-tune.json
    assert fresh.auto_table() == res["batch_auto_k"]
    assert fresh.assistant.threads == (res["assistant_threads"] or 2)
    for prompt, ref in zip(pycode_prompts[:N_PROMPTS], greedy_ref):
        out = fresh.generate(prompt, strategy="auto", max_new_tokens=NEW)
        assert out.token_ids == ref and out.strategy == "assisted"
        assert out.options["auto_draft_tokens"] == res["batch_auto_k"]
    other = Engine.load(main, assistant=draft, threads=1)  # another setting: not this tuning
    assert other.auto_table() == scheduler.DEFAULT_AUTO_K["fp32"]
    assert not (pycode_pair[0] / "stairs-tune.json").exists()
