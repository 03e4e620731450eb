"""bench helpers: tree_sim on hand-written rank sequences, the CTranslate2 worker's errors."""

from __future__ import annotations

import numpy as np
import pytest

from bench.tree_sim import best_tree, linear, path_probs, replay


def flat(ms):
    return lambda *a, **k: ms


def test_replay_linear_counts_calls_and_tokens():
    # K=2: accepts (0, 0) then stops at depth 2 -> 3 tokens; (0, 5) -> 2 tokens; last 1 token
    ranks = [np.array([0, 0, 1, 0, 5, 0])]
    r = replay(ranks, linear(2), flat(10.0), flat(1.0), encoder_ms=0.0)
    assert r["tokens_per_main_call"] == 2.0  # 6 tokens in 3 calls
    assert r["ms_per_prompt"] == 3 * (10.0 + 1.0 + 1.0)  # each round: verify + 2 draft calls


def test_replay_tree_accepts_second_choices():
    ranks = [np.array([1, 0, 1, 0])]
    # linear: miss at 0 (1 token), accept 1 at 1 (2 tokens), last token (1) -> 4 in 3 calls
    assert replay(ranks, linear(3), flat(1), flat(0), 0)["tokens_per_main_call"] == 4 / 3
    tree = {(0,), (1,), (1, 0), (1, 0, 1)}
    assert replay(ranks, tree, flat(1), flat(0), 0)["tokens_per_main_call"] == 4.0  # one call


def test_best_tree_takes_the_likeliest_paths():
    cnt, n = path_probs([np.array([1, 0, 1, 0, 1, 2, 2, 2])])
    assert best_tree(cnt, n, 1) == {(1,)}  # rank 1 is the commonest first rank here
    tree = best_tree(cnt, n, 3)
    assert (1,) in tree and len(tree) == 3
    assert all(x[:-1] in tree for x in tree if len(x) > 1)  # a tree: every parent is in it


def test_ct2_worker_reports_a_failing_child(tmp_path):
    pytest.importorskip("ctranslate2")
    from bench.peers import CT2Worker

    with pytest.raises(RuntimeError, match="config.json|No such file|not"):
        CT2Worker(tmp_path / "missing-model", 1, "float32", tmp_path)
