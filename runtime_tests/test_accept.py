"""The accept rule on hand-written arrays: a chain's agreeing prefix, a tree's agreeing path."""

import numpy as np

from engine import accept
from engine.accept import accept_path


def test_accept_counts_leading_matches_only():
    assert accept([5, 6, 7], [5, 6, 7, 8]) == 3
    assert accept([5, 6, 7], [5, 9, 7, 8]) == 1  # a later match after a miss does not count
    assert accept([5, 6, 7], [4, 6, 7, 8]) == 0
    assert accept([], [4]) == 0
    assert accept(np.array([1, 2]), np.array([1, 2])) == 2


def test_accept_path_chain_is_the_agreeing_prefix():
    row = [9, 5, 6, 7]
    assert accept_path(row, None, [5, 6, 1, 1]) == [0, 1, 2]
    assert accept_path(row, None, [4, 6, 7, 1]) == [0]
    assert accept_path(row, [0, 1, 2], [5, 6, 7, 8]) == [0, 1, 2, 3]  # a chain as a tree


def test_accept_path_tree_follows_the_matching_branch():
    # pending 9; path A = 5, 6 (indices 1, 2); path B = 7, 8 (indices 3, 4)
    row, parents = [9, 5, 6, 7, 8], [0, 1, 0, 3]
    assert accept_path(row, parents, [7, 0, 0, 8, 2]) == [0, 3, 4]  # B fully
    assert accept_path(row, parents, [5, 3, 0, 0, 0]) == [0, 1]  # A's first only
    assert accept_path(row, parents, [1, 0, 0, 0, 0]) == [0]  # neither
