"""Generation statistics: a mutable counter while running, a frozen dataclass when done."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Stats:
    """What one generation did and where its seconds went."""

    new_tokens: int = 0
    main_calls: int = 0  # main decoder calls this generation took part in (encoder not counted)
    batch_rows: int = 0  # requests sharing those calls, summed (= main_calls when alone)
    draft_calls: int = 0  # drafter model calls (0 for model-free drafters)
    drafted: int = 0  # draft tokens proposed to the main model
    accepted: int = 0  # draft tokens the main model agreed with
    encoder_s: float = 0.0  # both encoders
    draft_s: float = 0.0  # drafting phase, python included
    verify_s: float = 0.0  # main decoder phase, python included
    session_s: float = 0.0  # summed InferenceSession.run time, every model
    total_s: float = 0.0  # wall time of the whole generation

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_main_call(self) -> float:
        return self.new_tokens / self.main_calls if self.main_calls else 0.0

    @property
    def mean_batch_rows(self) -> float:
        """Requests per main call on average: 1.0 alone, N when N requests shared each call."""
        return self.batch_rows / self.main_calls if self.main_calls else 0.0

    @property
    def overhead_s(self) -> float:
        """Wall time outside InferenceSession.run: python, numpy, feeds, argmax."""
        return self.total_s - self.session_s

    def as_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(
            acceptance_rate=self.acceptance_rate,
            mean_batch_rows=self.mean_batch_rows,
            overhead_s=self.overhead_s,
            tokens_per_main_call=self.tokens_per_main_call,
        )
        return d

    def __add__(self, other: Stats) -> Stats:
        return Stats(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        )


class Counter:
    """Mutable twin of Stats, filled during one generation."""

    __slots__ = [f.name for f in fields(Stats)]
    _DEFAULTS = tuple((f.name, f.default) for f in fields(Stats))  # made per call: kept cheap

    def __init__(self) -> None:
        for name, value in self._DEFAULTS:
            setattr(self, name, value)

    def freeze(self) -> Stats:
        return Stats(**{name: getattr(self, name) for name in self.__slots__})
