"""The model registry: versions, aliases, the promotion gate, rollback, and its failure modes."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finrec.artifacts import write_manifest
from finrec.errors import ArtifactError, FinrecError
from finrec.registry import (
    CHALLENGER,
    CHAMPION,
    ModelRegistry,
    PromotionRefused,
    UnknownVersionError,
    check_gate,
)


def fake_bundle(folder: Path, version: str = "m1", payload: str = "weights") -> Path:
    folder.mkdir(parents=True)
    (folder / "model.json").write_text(json.dumps({"payload": payload}))
    write_manifest(folder, "model", config={"split": {"end": 1}}, inputs={"data_fingerprint": "abc"},
                   metrics={"model_version": version, "training": {"ndcg": 0.1}})  # fmt: skip
    return folder


def evaluation(value: float, key: str = "data@w") -> dict:
    return {"metrics": {"ndcg@10": {"mean": value, "low": value - 0.01, "high": value + 0.01}},
            "evaluated_at": "2026-01-01T00:00:00+00:00", "key": key}  # fmt: skip


@pytest.fixture
def reg(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(tmp_path / "registry", "finrec", gate_metric="ndcg@10", max_regression=0.0)


def register(reg: ModelRegistry, tmp_path: Path, name: str, value: float | None = None, **kw) -> str:
    evs = {} if value is None else {"data@w": evaluation(value)}
    return reg.register(fake_bundle(tmp_path / name, name), evaluations=evs, **kw)


def test_versions_are_numbered_copied_and_verified(reg: ModelRegistry, tmp_path: Path) -> None:
    v1 = register(reg, tmp_path, "a")
    v2 = register(reg, tmp_path, "b")
    assert (v1, v2) == ("v1", "v2") and reg.versions() == ["v1", "v2"]
    assert reg.aliases() == {CHALLENGER: "v2"}  # the newest registration is the challenger
    assert (reg.path("v1") / "model.json").is_file()
    e = reg.entry("v1")
    assert e["model_version"] == "a" and e["data"]["data_fingerprint"] == "abc" and e["training"] == {"ndcg": 0.1}
    # The copy is independent of the source: changing the source changes nothing in the registry.
    (tmp_path / "a" / "model.json").write_text("changed")
    assert json.loads((reg.path("v1") / "model.json").read_text()) == {"payload": "weights"}


def test_a_damaged_bundle_is_refused_and_leaves_nothing_behind(reg: ModelRegistry, tmp_path: Path) -> None:
    bundle = fake_bundle(tmp_path / "bad")
    (bundle / "model.json").write_text("truncated")  # no longer matches its manifest
    with pytest.raises(ArtifactError, match="does not match its manifest"):
        reg.register(bundle)
    assert reg.versions() == [] and reg.aliases() == {}
    versions = reg.home / "versions"
    assert not versions.exists() or not list(versions.iterdir())  # no half-written copy


def test_first_promotion_has_no_gate_and_clears_the_challenger(reg: ModelRegistry, tmp_path: Path) -> None:
    v1 = register(reg, tmp_path, "a", 0.10)
    done = reg.promote()
    assert (done.version, done.previous, done.gate, done.forced) == (v1, None, None, False)
    assert reg.aliases() == {CHAMPION: v1}
    with pytest.raises(FinrecError, match="already the champion"):
        reg.promote(v1)


def test_gate_refuses_a_worse_challenger_and_says_by_how_much(reg: ModelRegistry, tmp_path: Path) -> None:
    register(reg, tmp_path, "a", 0.10)
    reg.promote()
    worse = register(reg, tmp_path, "b", 0.08)
    with pytest.raises(PromotionRefused) as refused:
        reg.promote()
    gate = refused.value.gate
    assert not gate.passed and gate.relative_change == pytest.approx(-0.2)
    assert "20.0% worse" in gate.message and "0.0800 vs 0.1000" in gate.message
    assert reg.resolve(CHAMPION) == "v1" and reg.resolve(CHALLENGER) == worse  # nothing moved
    assert reg.history()[-1]["action"] == "promotion_refused"
    forced = reg.promote(force=True, reason="incident drill")
    assert forced.forced and reg.resolve(CHAMPION) == worse
    assert reg.history()[-1]["reason"] == "incident drill" and reg.history()[-1]["forced"] is True


def test_gate_lets_a_better_or_tolerated_challenger_through(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "r", max_regression=0.05)
    register(reg, tmp_path, "a", 0.100)
    reg.promote()
    register(reg, tmp_path, "b", 0.097)  # 3% worse: within the 5% tolerance
    assert reg.promote().gate.passed
    register(reg, tmp_path, "c", 0.120)
    done = reg.promote()
    assert done.gate.passed and done.gate.relative_change > 0 and "better than" in done.gate.message


def test_gate_refuses_without_a_shared_evaluation(reg: ModelRegistry, tmp_path: Path) -> None:
    register(reg, tmp_path, "a", 0.10)
    reg.promote()
    reg.register(fake_bundle(tmp_path / "b"), evaluations={"other-data@w": evaluation(0.5)})
    with pytest.raises(PromotionRefused, match="no ndcg@10 evaluation on the same data"):
        reg.promote()
    reg.add_evaluation(CHALLENGER, "data@w", evaluation(0.11))  # now comparable, and better
    assert reg.promote().gate.passed


def test_rollback_walks_back_the_champions(reg: ModelRegistry, tmp_path: Path) -> None:
    for name, value in (("a", 0.1), ("b", 0.2), ("c", 0.3)):
        register(reg, tmp_path, name, value)
        reg.promote()
    assert reg.champions() == ["v1", "v2", "v3"]
    assert reg.rollback(reason="bad answers")["version"] == "v2"
    assert reg.resolve(CHAMPION) == "v2"
    assert reg.rollback()["version"] == "v1"
    with pytest.raises(FinrecError, match="nothing to roll back to"):
        reg.rollback()
    assert reg.rollback(to="v3")["version"] == "v3"  # forward again, by name
    assert reg.rollback()["version"] == "v1"
    with pytest.raises(UnknownVersionError, match="v9"):
        reg.rollback(to="v9")


def test_aliases_and_unknown_references(reg: ModelRegistry, tmp_path: Path) -> None:
    register(reg, tmp_path, "a")
    register(reg, tmp_path, "b")
    assert reg.set_alias("shadow", "v1") == "v1" and reg.resolve("shadow") == "v1"
    assert reg.resolve("v2") == "v2" and reg.resolve("v3") is None and reg.resolve("nope") is None
    with pytest.raises(FinrecError, match="moves only by promotion"):
        reg.set_alias(CHAMPION, "v1")
    with pytest.raises(FinrecError, match="not valid"):
        reg.set_alias("v7", "v1")
    with pytest.raises(UnknownVersionError, match="versions: v1, v2"):
        reg.entry("v3")


def test_concurrent_registrations_get_distinct_versions(reg: ModelRegistry, tmp_path: Path) -> None:
    bundles = [fake_bundle(tmp_path / f"b{i}", f"m{i}") for i in range(6)]
    got: list[str] = []
    threads = [threading.Thread(target=lambda b=b: got.append(reg.register(b, alias=None))) for b in bundles]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got, key=lambda v: int(v[1:])) == [f"v{i}" for i in range(1, 7)]
    assert {reg.entry(v)["model_version"] for v in got} == {f"m{i}" for i in range(6)}


def test_a_damaged_alias_file_is_a_clear_error(reg: ModelRegistry, tmp_path: Path) -> None:
    register(reg, tmp_path, "a")
    (reg.home / "aliases.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="restore it from history.jsonl"):
        reg.resolve(CHAMPION)


@settings(max_examples=50, deadline=None)
@given(champ=st.floats(0.001, 1), chal=st.floats(0.001, 1), tol=st.floats(0, 0.5))
def test_gate_passes_exactly_when_the_drop_is_within_tolerance(champ: float, chal: float, tol: float) -> None:
    g = check_gate({"version": "v2", "evaluations": {"k": evaluation(chal)}},
                   {"version": "v1", "evaluations": {"k": evaluation(champ)}}, "ndcg@10", tol)  # fmt: skip
    assert g.passed == (chal >= champ * (1 - tol) - 1e-9)
    assert g.relative_change == pytest.approx((chal - champ) / champ)
