"""assisted: linear speculative decoding with the assistant model (HF's assisted generation)."""

from __future__ import annotations

from ..run import Run
from .speculative import LinearVerifier, ModelDrafter, speculate


def generate(
    run: Run, draft_tokens: int = 5, schedule: str = "constant", threshold: float | None = None
):
    """Assistant drafts K tokens (K fixed or HF's 'heuristic' schedule, optional confidence stop);
    the main model verifies them as one multi-token row."""
    if schedule not in ("constant", "heuristic"):
        raise ValueError(f"schedule must be 'constant' or 'heuristic', not {schedule!r}")
    return speculate(run, ModelDrafter(run, threshold), LinearVerifier(run), draft_tokens, schedule)
