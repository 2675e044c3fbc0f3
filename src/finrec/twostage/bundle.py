"""The model bundle's own settings: a typed, validated record of how the bundle scores.

:class:`BundleConfig` is written into ``model.json`` and read back with unknown keys refused and
every value checked, so a bundle never runs on a silently restated default. It holds what scoring
needs at any later time (batch, evaluation, the API), not the training settings (those are in the
manifest).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from finrec.errors import ArtifactError

INDEX_KINDS = ("exact", "hnsw", "ivf")


@dataclass(frozen=True)
class BundleConfig:
    """How a bundle scores.

    Parameters
    ----------
    n_candidates
        Candidates the two-tower retrieves per customer (each other source adds a share of it).
    demote_below
        Approval odds below which a product goes below every other candidate.
    index
        Candidate index of the two-tower: ``exact``, ``hnsw`` or ``ivf``.
    history_length
        Recent products in the user tower's history.
    split
        The temporal split the bundle was trained on (its evaluation window), as a dict.
    grades, min_grade
        Event grades and the lowest grade that is a positive (what candidate sources learn from).
    sources_cutoff, sources_events
        Where the bundle's candidate sources were fitted: before ``sources_cutoff``, on the first
        ``sources_events`` events. Scoring at another cutoff refits them there.
    """

    n_candidates: int = 100
    demote_below: float = 0.2
    index: str = "exact"
    history_length: int = 20
    split: dict[str, Any] | None = None
    grades: dict[str, int] = field(default_factory=dict)
    min_grade: int = 2
    sources_cutoff: int | None = None
    sources_events: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if not 1 <= self.n_candidates <= 100_000:
            problems.append(f"n_candidates {self.n_candidates} is not in 1..100000")
        if not 0.0 <= self.demote_below <= 1.0:
            problems.append(f"demote_below {self.demote_below} is not in [0, 1]")
        if self.index not in INDEX_KINDS:
            problems.append(f"index {self.index!r} is not one of {INDEX_KINDS}")
        if not 1 <= self.history_length <= 1_000:
            problems.append(f"history_length {self.history_length} is not in 1..1000")
        if self.min_grade < 0:
            problems.append(f"min_grade {self.min_grade} is negative")
        if problems:
            raise ValueError("; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BundleConfig:
        """Read a bundle's config; unknown keys and invalid values are refused with an ArtifactError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ArtifactError(f"the bundle's config has unknown keys {unknown}",
                                hint="this bundle was written by another finrec version; retrain it")  # fmt: skip
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise ArtifactError(f"the bundle's config is invalid: {exc}", hint="retrain with `finrec train`") from None

    def with_sources_fit(self, cutoff: int, n_events: int) -> BundleConfig:
        return replace(self, sources_cutoff=int(cutoff), sources_events=int(n_events))

    def sources_fitted_at(self, cutoff: int, n_events: int) -> bool:
        """Whether the bundle's candidate sources were fitted before ``cutoff`` on exactly ``n_events`` events
        (then they are used as they are; elsewhere they are refitted, or refused where they cannot be)."""
        return (int(cutoff), int(n_events)) == (self.sources_cutoff, self.sources_events)
