"""The strategy table: every strategy is a drafter in its own file; all are token-exact to
`greedy` because the scheduler verifies every proposal with the main model.

Adding a strategy: one file with a Drafter subclass and its Strategy, one entry here, its tests.
"""

from . import assisted, greedy, lookup, staged, stairs, tree
from .base import MAX_DRAFT_TOKENS, CacheRow, Drafter, Strategy

STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        greedy.STRATEGY,
        assisted.STRATEGY,
        stairs.STRATEGY,
        tree.STRATEGY,
        lookup.STRATEGY,
        staged.STRATEGY,
    )
}
NEEDS_ASSISTANT = {name for name, s in STRATEGIES.items() if s.needs_assistant}

__all__ = ["MAX_DRAFT_TOKENS", "NEEDS_ASSISTANT", "STRATEGIES", "CacheRow", "Drafter", "Strategy"]
