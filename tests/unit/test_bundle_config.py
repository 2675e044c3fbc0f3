"""A bundle's config and its candidate sources are read strictly: a typo or a damaged file is a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from finrec.candidates.source_set import SourceSet
from finrec.errors import ArtifactError
from finrec.twostage.bundle import BundleConfig


def test_config_round_trips_and_refuses_unknown_keys_and_bad_values() -> None:
    cfg = BundleConfig(n_candidates=50, grades={"click": 2}, min_grade=2)
    assert BundleConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ArtifactError, match="unknown keys"):
        BundleConfig.from_dict({**cfg.to_dict(), "n_candidatez": 3})
    with pytest.raises(ArtifactError, match="index"):
        BundleConfig.from_dict({**cfg.to_dict(), "index": "annoy"})
    with pytest.raises(ValueError, match="demote_below"):
        BundleConfig(demote_below=1.5)


def test_damaged_sources_are_refused_with_a_hint(tmp_path: Path) -> None:
    (tmp_path / "sources.json").write_text("{not json")
    with pytest.raises(ArtifactError) as err:
        SourceSet.load(tmp_path)
    assert err.value.hint and "retrain" in err.value.hint
    (tmp_path / "sources.json").write_text('{"sources": [{"name": "x", "kind": "magic", "dir": "00_x"}]}')
    with pytest.raises(ArtifactError, match="unknown candidate source kind"):
        SourceSet.load(tmp_path)
