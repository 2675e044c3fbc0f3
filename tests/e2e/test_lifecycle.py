"""The model lifecycle on a registry-backed service: gate, promotion, rollback, experiments, following aliases.

The champion is the tiny two-stage model; the deliberately weaker model is a popularity bundle trained on the same
world (``[train] model = "popularity"``). Both are evaluated offline on the same window, so the gate has a real
comparison to make.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from finrec import pipeline
from finrec.config import FinrecSettings
from finrec.experiments.assignment import assign_arm
from finrec.lifecycle.compare import evaluate_versions
from finrec.monitoring.conversion import iter_events
from finrec.registry import CHALLENGER, CHAMPION, ModelRegistry
from finrec.serving.app import create_app
from finrec.serving.service import Service
from finrec.testing import TEST_API_KEY, TINY_TRAIN

KEY = TEST_API_KEY  # serve.api_key: the key named `admin`, with every scope
ADMIN = {"X-API-Key": KEY}
EXPERIMENT = {"name": "pop-vs-champion", "arms": {"control": {"model": "champion", "weight": 1},
                                                 "treatment": {"model": "challenger", "weight": 1}}}  # fmt: skip


@pytest.fixture(scope="module")
def popularity_model(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "popularity"
    pipeline.train(tiny_world, out, FinrecSettings(train={**TINY_TRAIN, "model": "popularity"}), progress=False)
    return out


@pytest.fixture(scope="module")
def registry_root(tiny_world: Path, tiny_model: Path, popularity_model: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Path:  # fmt: skip
    """A registry with the two-stage champion (v1) and the popularity challenger (v2), both evaluated together."""
    root = tmp_path_factory.mktemp("registry")
    reg = ModelRegistry(root)
    reg.register(tiny_model, alias=None)
    reg.promote("v1")
    reg.register(popularity_model)  # challenger
    evaluate_versions(reg, ["v1", "v2"], tiny_world, FinrecSettings(train=TINY_TRAIN), progress=False)
    return root


def settings_for(workspace: Path, root: Path, experiments: list[dict[str, Any]] | None = None) -> FinrecSettings:
    with pytest.MonkeyPatch.context() as mp:  # the settings must not pick up the caller's FINREC_* variables
        for name in [k for k in os.environ if k.startswith("FINREC_")]:
            mp.delenv(name)
        return FinrecSettings(workspace=workspace, serve={"api_key": KEY, "clock": "data"},
                              registry={"root": root, "poll_seconds": 0.2}, experiments=experiments or [])  # fmt: skip


def copy_registry(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def lifecycle(registry_root: Path, tiny_world: Path, tmp_path: Path) -> Iterator[tuple[TestClient, Service, Path]]:
    root = copy_registry(registry_root, tmp_path / "registry")  # each test moves aliases on its own copy
    settings = settings_for(tmp_path / "ws", root)
    service = Service.from_settings(settings, data_dir=tiny_world)
    with TestClient(create_app(settings, service=service), raise_server_exceptions=False, headers=ADMIN) as client:
        yield client, service, root
    service.close()


def answer(client: TestClient, user: str) -> dict[str, Any]:
    r = client.get(f"/recommend/{user}", params={"k": 5})
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_offline_gate_finds_popularity_worse_than_the_two_stage_champion(registry_root: Path) -> None:
    reg = ModelRegistry(registry_root)
    champion, challenger = reg.entry("v1"), reg.entry("v2")
    (key,) = champion["evaluations"]
    assert key in challenger["evaluations"]  # same data, same window
    for metric in ("ndcg@10", "true_conversion@10"):  # worse on logged relevance and on the ground truth
        value = lambda e: e["evaluations"][key]["metrics"][metric]["mean"]  # noqa: E731, B023
        assert value(challenger) < value(champion)


def test_a_worse_challenger_is_refused_with_the_margin_and_nothing_changes(
    lifecycle: tuple[TestClient, Service, Path],
) -> None:
    client, service, root = lifecycle
    before = answer(client, "1")["model_version"]
    r = client.post("/admin/promote", json={"version": "challenger"}, headers=ADMIN)
    assert r.status_code == 409, r.text
    body = r.json()
    assert "worse than the champion v1 on true_conversion@10" in body["error"]  # auto: the truth on a synthetic world
    assert body["error"] and body["gate"]["relative_change"] < 0
    assert "--force" in body["hint"]
    assert answer(client, "1")["model_version"] == before
    assert ModelRegistry(root).resolve(CHAMPION) == "v1"


def test_forced_promotion_then_rollback_switch_the_serving_model_at_once(
    lifecycle: tuple[TestClient, Service, Path],
) -> None:
    client, service, root = lifecycle
    reg = ModelRegistry(root)
    v1, v2 = reg.entry("v1")["model_version"], reg.entry("v2")["model_version"]
    assert answer(client, "1")["model_version"] == v1
    r = client.post("/admin/promote", json={"version": "challenger", "force": True, "reason": "drill"}, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["forced"] and r.json()["model_version"] == "v2"
    assert answer(client, "1")["model_version"] == v2  # the very next answer
    r = client.post("/admin/rollback", json={"reason": "bad model"}, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert answer(client, "1")["model_version"] == v1
    actions = [h["action"] for h in reg.history()]
    assert actions[-2:] == ["promote", "rollback"]
    assert [h["by"] for h in reg.history()[-2:]] == ["admin", "admin"]  # the key's name, not "api"
    ready = client.get("/ready").json()
    assert ready["source"] == "registry" and ready["models"] == {"champion": v1}


def test_promoting_a_version_whose_bundle_cannot_load_is_409_and_the_alias_stays(
    lifecycle: tuple[TestClient, Service, Path],
) -> None:
    client, service, root = lifecycle
    reg = ModelRegistry(root)
    before = answer(client, "1")["model_version"]
    (reg.path("v2") / "model.json").write_text("{not json")  # registered fine, broken since
    for r in (client.post("/admin/promote", json={"version": "challenger", "force": True}),
              client.post("/admin/rollback", json={"to": "v2"})):  # fmt: skip
        assert r.status_code == 409, r.text
        assert "v2 cannot be" in r.json()["error"] and "unchanged" in r.json()["hint"]
        assert str(root) not in r.text  # no server paths in an answer
    assert reg.resolve(CHAMPION) == "v1" and [h["action"] for h in reg.history()][-1] != "promote"
    assert answer(client, "1")["model_version"] == before


def test_admin_registry_operations_need_the_key_and_validate_input(lifecycle: tuple[TestClient, Service, Path]) -> None:
    client, _, _ = lifecycle
    assert client.post("/admin/promote", json={}, headers={"X-API-Key": ""}).status_code == 401
    r = client.post("/admin/promote", json={"version": "v9"}, headers=ADMIN)
    assert r.status_code == 404 and "v9" in r.json()["error"]
    r = client.post("/admin/promote", json={"version": "v1", "extra": 1}, headers=ADMIN)
    assert r.status_code == 422
    r = client.post("/admin/reload", json={"model_dir": "/elsewhere"}, headers=ADMIN)
    assert r.status_code == 400 and "follows the model registry" in r.json()["error"]
    models = client.get("/admin/models", headers=ADMIN).json()
    assert models["source"] == "registry" and models["aliases"] == {CHAMPION: "v1", CHALLENGER: "v2"}


def test_a_second_process_follows_a_promotion_made_elsewhere(
    registry_root: Path, tiny_world: Path, tmp_path: Path
) -> None:
    """Two services on one registry: a promotion made through the registry (CLI, another replica) reaches both."""
    root = copy_registry(registry_root, tmp_path / "registry")
    reg = ModelRegistry(root)
    services = [Service.from_settings(settings_for(tmp_path / f"ws{i}", root), data_dir=tiny_world) for i in (0, 1)]
    try:
        reg.promote(CHALLENGER, force=True, reason="test")
        target = reg.entry("v2")["model_version"]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(s.recommender.model.version != target for s in services):
            time.sleep(0.05)
        assert [s.recommender.model.version for s in services] == [target, target]
        reg.rollback()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(s.recommender.model.version == target for s in services):
            time.sleep(0.05)
        assert all(s.recommender.model.version == reg.entry("v1")["model_version"] for s in services)
    finally:
        for s in services:
            s.close()


def test_experiment_arms_serve_their_models_and_events_carry_the_arm(
    registry_root: Path, tiny_world: Path, tmp_path: Path
) -> None:
    root = copy_registry(registry_root, tmp_path / "registry")
    reg = ModelRegistry(root)
    settings = settings_for(tmp_path / "ws", root, [EXPERIMENT])
    exp = settings.experiments[0]
    version_of = {"control": reg.entry("v1")["model_version"], "treatment": reg.entry("v2")["model_version"]}
    service = Service.from_settings(settings, data_dir=tiny_world)
    try:
        with TestClient(create_app(settings, service=service), headers=ADMIN) as client:
            arms: dict[str, int] = {}
            for user in range(1, 401):
                body = answer(client, str(user))
                arm = assign_arm(str(user), exp)
                assert (body["experiment"], body["arm"]) == (exp.name, arm)
                assert body["model_version"] == version_of[arm]
                arms[arm] = arms.get(arm, 0) + 1
            assert 160 <= arms["control"] <= 240  # 400 customers split 1:1 (binomial sd 10)
            assert answer(client, "7")["arm"] == answer(client, "7")["arm"]  # the same arm on every visit
            # Events that leave out arm and model_version get those of the answer they name.
            user, body = next((str(u), b) for u in range(1, 401) if (b := answer(client, str(u)))["items"])
            eid = f"t-{uuid.uuid4().hex}"
            r = client.post("/events", json=[{"event_id": eid, "user_id": user, "event_type": "click",
                                              "product_id": body["items"][0]["product_id"],
                                              "request_id": body["request_id"]}])  # fmt: skip
            assert r.status_code == 200, r.text
        stored = [e for _, e in iter_events(service.recommender.events) if e.event_id == eid]
        assert [(e.arm, e.model_version) for e in stored] == [(body["arm"], body["model_version"])]
    finally:
        service.close()


def test_an_experiment_needing_a_missing_challenger_is_served_by_the_champion(
    tiny_model: Path, tiny_world: Path, tmp_path: Path
) -> None:
    reg = ModelRegistry(tmp_path / "registry")
    reg.register(tiny_model, alias=None)
    reg.promote("v1")
    settings = settings_for(tmp_path / "ws", reg.root, [EXPERIMENT])
    service = Service.from_settings(settings, data_dir=tiny_world)
    try:
        with TestClient(create_app(settings, service=service), headers=ADMIN) as client:
            bodies = [answer(client, str(u)) for u in range(1, 41)]
        assert {b["model_version"] for b in bodies} == {reg.entry("v1")["model_version"]}
        assert {b["arm"] for b in bodies} == {"control", "treatment"}  # still assigned: analysis sees the truth
    finally:
        service.close()
