"""stairs: the staircase batch of arXiv 2407.19947, folded into one row.

Row i of the staircase is pending + d[:i]; under the causal mask the longest row alone gives every
row's target, so the scheduler verifies it as one row of batch_size tokens (either layout).
"""

from .assisted import AssistantDrafter
from .base import Strategy


class StairsDrafter(AssistantDrafter):
    """batch_size - 1 assistant drafts, verified as the staircase's longest row."""

    @staticmethod
    def initial_k(options: dict) -> int:
        return options["batch_size"] - 1


STRATEGY = Strategy(
    "stairs",
    StairsDrafter,
    {"batch_size": 7, "layout": "past", "threshold": None},
    needs_assistant=True,
    candidates=({"batch_size": 3}, {"batch_size": 5}),
)
