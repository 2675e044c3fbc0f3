"""The security review's findings, one test each, in process (the live-server ones are in tests/integration).

One service per module (the session's tiny model, data clock), served to keys of different scopes:
``web`` (recommend), ``explain`` (recommend, recommend:explain), ``feedback`` (events), ``core``
(events:trusted), ``ops`` (monitor) and ``admin`` (every scope, ``serve.api_key``).
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from finrec.config import FinrecSettings, KeySettings
from finrec.errors import ConfigError
from finrec.events.store import open_event_store
from finrec.serving.app import create_app
from finrec.serving.audit import AuditLog
from finrec.serving.auth import KeyTable, hash_key
from finrec.serving.service import Service
from finrec.testing import TEST_API_KEY

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from fastapi.testclient import TestClient

KEYS = {name: f"{name}-key-{'x' * 32}" for name in ("web", "explain", "feedback", "core", "ops")}
SCOPES = {"web": ["recommend"], "explain": ["recommend", "recommend:explain"], "feedback": ["events"],
          "core": ["events:trusted"], "ops": ["monitor"]}  # fmt: skip


def _clean_settings(**values: Any) -> FinrecSettings:
    with pytest.MonkeyPatch.context() as mp:
        for name in [k for k in os.environ if k.startswith("FINREC_")]:
            mp.delenv(name)
        return FinrecSettings(**values)


@pytest.fixture(scope="module")
def svc(tiny_model: Path, tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    ws = tmp_path_factory.mktemp("security")
    keys = [KeySettings(name=n, scopes=SCOPES[n], sha256=hash_key(k), rate_per_second=None) for n, k in KEYS.items()]
    settings = _clean_settings(workspace=ws, serve={"api_key": TEST_API_KEY, "clock": "data", "max_body_bytes": 65536},
                               auth={"keys": [k.model_dump() for k in keys]})  # fmt: skip
    service = Service.from_settings(settings, tiny_model, tiny_world)
    yield service
    service.close()


@pytest.fixture(scope="module")
def app(svc: Service) -> Any:
    return create_app(svc.settings, service=svc)


def client(app: Any, who: str | None) -> TestClient:
    key = {"admin": TEST_API_KEY, None: None}.get(who, KEYS.get(who or ""))
    return TestClient(app, raise_server_exceptions=False, headers={"X-API-Key": key} if key else {})


@pytest.fixture(scope="module")
def clients(app: Any) -> Iterator[dict[str | None, TestClient]]:
    made = {who: client(app, who) for who in (None, "admin", *KEYS)}
    with made["admin"]:  # runs the lifespan once
        yield made


def answered(clients: dict[str | None, TestClient], user: str, who: str = "explain") -> dict[str, Any]:
    r = clients[who].get(f"/recommend/{user}", params={"k": 50})
    assert r.status_code == 200, r.text
    return dict(r.json())


def event(user: str, product: str, etype: str, **extra: Any) -> dict[str, Any]:
    return {"event_id": f"s-{uuid.uuid4().hex}", "user_id": user, "product_id": product, "event_type": etype, **extra}


def first_with_items(clients: dict[str | None, TestClient], start: int) -> tuple[str, dict[str, Any]]:
    for u in range(start, start + 100):
        body = answered(clients, str(u))
        if len(body["items"]) >= 2:
            return str(u), body
    raise AssertionError("no customer with items")


# -- 1. who may call what -------------------------------------------------------------------------------------


def test_each_route_needs_its_scope(clients: dict[str | None, TestClient]) -> None:
    routes = {"recommend": ("GET", "/recommend/1"), "events": ("POST", "/events"), "monitor": ("GET", "/metrics"),
              "dashboard": ("GET", "/dashboard.json"), "admin": ("GET", "/admin/models")}  # fmt: skip
    allowed = {"web": {"recommend"}, "explain": {"recommend"}, "feedback": {"events"}, "core": {"events"},
               "ops": {"monitor", "dashboard"}, "admin": set(routes)}  # fmt: skip
    for who, ok in allowed.items():
        for name, (method, path) in routes.items():
            r = clients[who].request(method, path, json=[] if method == "POST" else None)
            if name in ok:
                assert r.status_code == 200, (who, name, r.text)
            else:
                assert r.status_code == 403, (who, name, r.text)
                assert who in r.json()["error"] and "scope" in r.json()["error"] and r.json()["request_id"]
    for method, path in routes.values():
        assert clients[None].request(method, path, json=[] if method == "POST" else None).status_code == 401
    assert clients[None].get("/health").status_code == 200 and clients[None].get("/ready").status_code == 200


def test_excluded_counts_and_rule_reasons_only_for_the_explain_scope(clients: dict[str | None, TestClient]) -> None:
    user, full = first_with_items(clients, 600)
    plain = answered(clients, user, "web")
    assert full["excluded"] and sum(full["excluded"].values()) > 0
    assert any(r["kind"] == "rule" for it in full["items"] for r in it["reasons"])
    assert plain["excluded"] is None
    assert all(r["kind"] == "model" for it in plain["items"] for r in it["reasons"])
    assert [it["product_id"] for it in plain["items"]] == [it["product_id"] for it in full["items"]]


def test_short_empty_and_exposed_keys_stop_the_start(tmp_path: Path) -> None:
    for key in ("", "short-key"):
        with pytest.raises(ConfigError, match="at least 32 characters"):
            KeyTable.from_settings(_clean_settings(serve={"api_key": key}))
    with pytest.raises(ConfigError, match="at least 32 characters"):
        KeyTable.from_settings(_clean_settings(auth={"keys": [{"name": "a", "scopes": ["recommend"], "env": "K"}]}),
                               environ={"K": "too short"})  # fmt: skip
    path = tmp_path / "key"
    path.write_text("f" * 40)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="every user"):
        KeyTable.from_settings(_clean_settings(auth={"keys": [{"name": "a", "scopes": ["recommend"], "file": path}]}))
    path.chmod(0o600)
    table = KeyTable.from_settings(_clean_settings(auth={"keys": [{"name": "a", "scopes": ["recommend"],
                                                                   "file": path}]}))  # fmt: skip
    assert table.authenticate("f" * 40).name == "a"  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="cannot be turned off"):
        create_app(_clean_settings(serve={"host": "0.0.0.0"}, auth={"disabled": True}))
    assert KeyTable.from_settings(_clean_settings(auth={"disabled": True})).authenticate(None).name == "no-auth"


def test_a_settings_file_holding_a_key_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from finrec.config import load_settings

    for name in [k for k in os.environ if k.startswith("FINREC_")]:
        monkeypatch.delenv(name)
    f = tmp_path / "finrec.toml"
    f.write_text(f'[serve]\napi_key = "{"k" * 40}"\n')
    with pytest.raises(ConfigError, match="keys never belong in a settings file"):
        load_settings(f)


def test_rate_limit_per_key_answers_429_with_retry_after(svc: Service) -> None:
    settings = svc.settings.model_copy(update={"auth": svc.settings.auth.model_copy(update={"keys": [
        KeySettings(name="slow", scopes=["recommend"], sha256=hash_key("s" * 40), rate_per_second=0.01, burst=2)]})})
    with TestClient(create_app(settings, service=svc), headers={"X-API-Key": "s" * 40}) as c:
        codes = [c.get("/recommend/1").status_code for _ in range(3)]
        r = c.get("/recommend/1")
    assert codes == [200, 200, 429] and r.status_code == 429
    assert int(r.headers["retry-after"]) >= 1 and "slow" in r.json()["error"] and r.json()["hint"]


def test_openapi_says_who_may_call_each_operation_and_documents_400(clients: dict[str | None, TestClient]) -> None:
    doc = clients[None].get("/openapi.json").json()
    assert doc["components"]["securitySchemes"]["ApiKey"] == {"type": "apiKey", "in": "header", "name": "X-API-Key",
                                                              "description": doc["components"]["securitySchemes"]
                                                              ["ApiKey"]["description"]}  # fmt: skip
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            assert "Who may call" in op["description"], (method, path)
            if op["x-scopes"]:
                assert op["security"] == [{"ApiKey": []}] and {"401", "403", "429"} <= set(op["responses"])
            else:
                assert op["security"] == [] and path in ("/health", "/ready")
            if "requestBody" in op:
                assert {"400", "413"} <= set(op["responses"]), (method, path)


def test_unreadable_body_is_a_documented_400_with_a_hint(clients: dict[str | None, TestClient]) -> None:
    r = clients["admin"].post("/events", content=b"\xff\xfe[1]", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["hint"] and "UTF-8" in r.json()["hint"] and r.json()["request_id"]


# -- 2. events that can be trusted ---------------------------------------------------------------------------


def test_ownership_events_need_a_trusted_key(clients: dict[str | None, TestClient]) -> None:
    user, body = first_with_items(clients, 700)
    product = body["items"][0]["product_id"]
    for etype in ("approve", "decline", "hold", "close"):
        r = clients["feedback"].post("/events", json=[event(user, product, etype, request_id=body["request_id"])])
        assert r.status_code == 422, r.text
        [rej] = r.json()["rejected"]
        assert rej["errors"][0].startswith("event_type:") and "events:trusted" in rej["errors"][0]
    assert product in [it["product_id"] for it in answered(clients, user)["items"]]  # nothing changed
    r = clients["core"].post("/events", json=[event(user, product, "decline")])
    assert r.status_code == 200 and r.json()["accepted"] == 1
    assert product not in [it["product_id"] for it in answered(clients, user)["items"]]  # cooling off


def test_customer_events_must_cite_an_answer_given_to_that_customer(clients: dict[str | None, TestClient],
                                                                   svc: Service) -> None:  # fmt: skip
    user, body = first_with_items(clients, 800)
    other, other_body = first_with_items(clients, int(user) + 1)
    product = body["items"][0]["product_id"]
    old = svc.recommender.signer.issue("old", user, svc.recommender.clock() - 8 * 86_400)
    cases = {"missing": event(user, product, "impression"),
             "forged": event(user, product, "click", request_id="made-up-id"),
             "another customer's": event(user, product, "click", request_id=other_body["request_id"]),
             "too old": event(user, product, "view", request_id=old)}  # fmt: skip
    r = clients["feedback"].post("/events", json=list(cases.values()))
    assert r.status_code == 422
    errors = {name: rej["errors"][0] for name, rej in zip(cases, r.json()["rejected"], strict=True)}
    assert "is missing" in errors["missing"] and "request_id" in errors["missing"]
    assert "not a request_id this service issued" in errors["forged"]
    assert "not issued by this service for this customer" in errors["another customer's"]
    assert "days ago" in errors["too old"] and "request_id_max_age_days" in errors["too old"]
    good = [event(user, product, "impression", request_id=body["request_id"]) for _ in range(3)]
    r = clients["feedback"].post("/events", json=good)
    assert r.status_code == 200 and r.json()["accepted"] == 3, r.text
    assert product not in [it["product_id"] for it in answered(clients, user)["items"]]  # frequency cap: 3


def test_events_for_unknown_customers_are_refused_and_nothing_is_stored(clients: dict[str | None, TestClient],
                                                                         svc: Service) -> None:  # fmt: skip
    before = svc.recommender.events.count()
    batch = [event(f"nobody-{i}", "3", "decline") for i in range(50)]
    r = clients["core"].post("/events", json=batch)
    assert r.status_code == 422
    body = r.json()
    assert body["accepted"] == 0 and len(body["rejected"]) == 50
    assert "is not a customer of this service" in body["rejected"][0]["errors"][0]
    assert svc.recommender.events.count() == before
    # A batch mixing known and unknown customers stores the known ones and says what is wrong with the others.
    r = clients["core"].post("/events", json=[event("5", "3", "view"), event("nobody", "3", "view")])
    assert r.status_code == 200 and r.json()["accepted"] == 1 and r.json()["rejected"][0]["index"] == 1


# -- 5. privacy and limits ----------------------------------------------------------------------------------------


def test_body_size_limit_and_few_errors_per_item(clients: dict[str | None, TestClient]) -> None:
    admin = clients["admin"]
    r = admin.post("/events", content=b"[" + b"1," * 40_000 + b"1]", headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["hint"] and r.json()["request_id"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b"["
        for _ in range(2000):
            yield b'"' + b"x" * 100 + b'",'
        yield b"1]"

    r = admin.post("/events", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    item = {**event("5", "3", "view"), **{f"junk{i}": i for i in range(3000)}}
    r = admin.post("/events", json=[item])
    assert r.status_code == 422 and len(r.content) < 4000
    [rej] = r.json()["rejected"]
    assert len(rej["errors"]) <= 5 and rej["error_count"] == 3000
    r = admin.post("/recommend", json={"profile": {f"f{i}": 1 for i in range(500)}})
    assert r.status_code == 422 and len(r.json()["problems"]) <= 20 and r.json()["problem_count"] >= 500


def test_store_files_are_private_and_the_audit_log_cannot_be_joined_with_the_events(svc: Service) -> None:
    ws = svc.settings.workspace
    files = [ws / "events.db", svc.audit_path, ws / "audit" / "audit.key", ws / "secrets" / "request.key"]
    for f in files:
        assert f is not None and f.is_file() and stat.S_IMODE(f.stat().st_mode) == 0o600, f
    assert svc.audit_path is not None
    store = open_event_store(f"sqlite:///{ws / 'events.db'}")
    try:
        cited = {e.request_id for _, e in store.read(limit=100_000) if e.request_id}
    finally:
        store.close()
    assert cited  # earlier tests posted events naming answers
    text = svc.audit_path.read_text()
    assert not any(rid in text for rid in cited)  # no join key between raw customer ids and pseudonyms


def test_a_world_readable_pseudonymisation_key_is_refused(tmp_path: Path) -> None:
    from finrec.errors import ArtifactError
    from finrec.serving.audit import load_or_create_key

    key = tmp_path / "audit.key"
    load_or_create_key(key)
    key.chmod(0o644)
    with pytest.raises(ArtifactError, match="every user"):
        AuditLog(tmp_path / "a.jsonl", load_or_create_key(key))


def test_reload_only_from_the_models_folder(clients: dict[str | None, TestClient], tiny_model: Path) -> None:
    for path in ("/etc", "../../etc", str(tiny_model.parent.parent)):
        r = clients["admin"].post("/admin/reload", json={"model_dir": path})
        assert r.status_code == 400 and "not under the models folder" in r.json()["error"], r.text


def test_dashboard_suppresses_small_fairness_cells_and_shows_no_server_paths(
    clients: dict[str | None, TestClient], svc: Service
) -> None:
    report = clients["ops"].get("/dashboard.json").json()
    text = json.dumps(report)
    for folder in (svc.settings.workspace, svc.model_dir.parent, svc.recommender.model.data.ds.path):
        assert str(Path(folder).resolve()) not in text and str(folder) not in text
    minimum = svc.settings.monitor.min_reported_group_size
    groups = [g for a in report["fairness"]["attributes"].values() for g in a["groups"]]
    assert groups
    for g in groups:
        assert g["answered"] is None or g["answered"] >= minimum
        assert g["decisions"] is None or g["decisions"] >= minimum
        if g["answered"] is None:
            assert g["exposure"]["rate"] is None and "answered" in g["suppressed"]


def test_durability_power_syncs_every_append(tmp_path: Path) -> None:
    from finrec.testing import REDIS_TEST_URL, redis_unavailable

    store = open_event_store(f"sqlite:///{tmp_path / 'e.db'}", durability="power")
    try:
        assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # type: ignore[attr-defined]  # FULL
    finally:
        store.close()
    store = open_event_store(f"sqlite:///{tmp_path / 'p.db'}")
    try:
        assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 1  # type: ignore[attr-defined]  # NORMAL
    finally:
        store.close()
    if redis_unavailable() is None:
        import redis

        with redis.Redis.from_url(REDIS_TEST_URL) as r:
            fsync = r.config_get("appendfsync").get("appendfsync")
            aof = r.info("persistence").get("aof_enabled")
        if not (aof == 1 and fsync == "always"):
            with pytest.raises(ConfigError, match="appendfsync always"):
                open_event_store(f"{REDIS_TEST_URL}?prefix=durability-{uuid.uuid4().hex}", durability="power")


def test_a_failing_store_answers_503_with_retry_after_and_the_request_id(svc: Service, app: Any) -> None:
    from finrec.storage import CircuitBreaker, Guarded

    class Locked:
        def __getattr__(self, name: str) -> Any:
            def fail(*_: Any, **__: Any) -> Any:
                raise sqlite3.OperationalError("database is locked")

            return fail

    rec = svc.recommender
    real_events, real_online = rec.events, rec.live.store
    rec.events = Guarded(Locked(), CircuitBreaker("event store", failures=2, reset_seconds=30))  # type: ignore[assignment]
    rec.live.store = Guarded(Locked(), CircuitBreaker("online store", failures=2, reset_seconds=30))  # type: ignore[assignment]
    follower_store = rec.follower.store if rec.follower is not None else None
    if rec.follower is not None:
        rec.follower.store = rec.live.store
    try:
        with client(app, "admin") as c:
            for _ in range(3):  # the third fails fast: the breakers are open
                r = c.post("/events", json=[event("5", "3", "view")], headers={"X-Request-ID": "outage-1"})
                assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
                assert r.json()["request_id"] == "outage-1" and r.json()["hint"]
                r = c.get("/recommend/5", headers={"X-Request-ID": "outage-2"})
                assert r.status_code == 503 and r.json()["request_id"] == "outage-2", r.text
            r = c.get("/ready")
            assert r.status_code == 503 and r.json()["stores"]["event_store"] != "ok" and "retry-after" in r.headers
    finally:
        rec.events, rec.live.store = real_events, real_online
        if rec.follower is not None and follower_store is not None:
            rec.follower.store = follower_store
