"""Temporal split: history before a cutoff, labels after it; evaluation on a later window.

::

    |-- retrieval windows (features at each cutoff, labels in the next L days) --|-- ranker --|-- evaluation --|
    start                                                                  rank_cutoff   eval_cutoff        end

The retriever learns from the earliest windows, the ranker from the window just
before evaluation (with the retriever's scores as a feature, out of sample), and
evaluation uses the last ``eval_days``. Short datasets get proportionally
shorter windows so that every dataset the contract allows can be split.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

DAY = 86_400


@dataclass(frozen=True)
class TemporalSplit:
    """Cutoffs in Unix seconds. Features at a cutoff use only events strictly before it."""

    start: int
    end: int  # last event time + 1 s
    eval_cutoff: int
    rank_cutoff: int
    retrieval_cutoffs: tuple[int, ...]  # ascending; labels of cutoff c are in [c, c + label_seconds)
    label_seconds: int

    @classmethod
    def plan(
        cls, start: int, last: int, eval_days: float = 60, label_days: float = 60, max_retrieval_windows: int = 4
    ) -> TemporalSplit:
        """Plan cutoffs for events spanning ``start`` .. ``last``.

        If the span is shorter than evaluation plus three label windows, every window
        shrinks in proportion (evaluation keeps 20% of the span, each label window 20%).
        """
        end = last + 1
        span = end - start
        ev, lab = eval_days * DAY, label_days * DAY
        if span < ev + 3 * lab:
            ev = lab = max(span * 0.2, 1.0)
        eval_cutoff = int(end - ev)
        rank_cutoff = int(eval_cutoff - lab)
        cutoffs: list[int] = []
        c = rank_cutoff - lab
        while c > start and len(cutoffs) < max_retrieval_windows:
            cutoffs.append(int(c))
            c -= lab
        if not cutoffs:
            cutoffs = [int(start + (rank_cutoff - start) / 2)]
        return cls(start, int(end), eval_cutoff, rank_cutoff, tuple(sorted(cutoffs)), int(lab))

    def to_dict(self) -> dict[str, object]:
        return asdict(self)
