"""greedy: no drafts; one main token per step (the reference every strategy equals)."""

from .base import Drafter, Strategy

STRATEGY = Strategy("greedy", Drafter, {})
