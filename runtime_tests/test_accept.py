"""The accept helper and the staircase batches, on hand-written arrays."""

import numpy as np

from engine import accept, full_staircase, staircase


def test_accept_counts_leading_matches_only():
    assert accept([5, 6, 7], [5, 6, 7, 8]) == 3
    assert accept([5, 6, 7], [5, 9, 7, 8]) == 1  # a later match after a miss does not count
    assert accept([5, 6, 7], [4, 6, 7, 8]) == 0
    assert accept([], [4]) == 0
    assert accept(np.array([1, 2]), np.array([1, 2])) == 2


def test_staircase_rows_share_the_past():
    ids, last = staircase(9, [5, 6, 7], pad=0)
    assert ids.tolist() == [[9, 0, 0, 0], [9, 5, 0, 0], [9, 5, 6, 0], [9, 5, 6, 7]]
    assert last.tolist() == [0, 1, 2, 3]
    ids, last = staircase(9, [], pad=0)
    assert ids.tolist() == [[9]] and last.tolist() == [0]


def test_full_staircase_rows_carry_the_sequence():
    ids, last = full_staircase([0, 3, 4], [5, 6], pad=0)
    assert ids.tolist() == [[0, 3, 4, 0, 0], [0, 3, 4, 5, 0], [0, 3, 4, 5, 6]]
    assert last.tolist() == [2, 3, 4]
