"""Hot model reloads on a real server under concurrent load, and how ``finrec serve`` starts and stops.

``finrec serve`` runs as a subprocess, as an operator runs it (uvicorn with uvloop and httptools, JSON logs on
stderr). Eight keep-alive clients ask for recommendations without pause while the admin endpoint swaps the model
every second between two bundles trained with different seeds, and once offers a corrupt bundle. A reload must
never fail or delay a request into an error, every answer must come from one of the two models (never a mix or a
half-loaded one), a corrupt bundle must be refused while the old model keeps serving, and the server must stop
cleanly on Ctrl-C. Start-up failures (no model, busy port) must be one clear message and exit code 2.

Traffic goes to 127.0.0.1 only; every loop is bounded in time and count.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from finrec.config import FinrecSettings
from finrec.testing import TINY_TRAIN
from live_server import ADMIN, ServerFactory, free_port, metric, server_env

pytestmark = pytest.mark.integration

N_CLIENTS = 8
LOAD_SECONDS = 10.0
MAX_REQUESTS_PER_CLIENT = 50_000  # a bound in count as well as in time


@pytest.fixture(scope="module")
def bundle_b(tiny_world: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second bundle on the same data, trained with another seed: another model with another version."""
    from finrec import pipeline

    out = tmp_path_factory.mktemp("models") / "seed1"
    with pytest.MonkeyPatch.context() as mp:
        for name in [k for k in os.environ if k.startswith("FINREC_")]:
            mp.delenv(name)
        settings = FinrecSettings(train={**TINY_TRAIN, "seed": 1})
    manifest = pipeline.train(tiny_world, out, settings, progress=False)
    if manifest["metrics"]["model_version"] == _version(tiny_model):  # versions have one-second resolution
        manifest["metrics"]["model_version"] += "-b"
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
    return out


def _version(bundle: Path) -> str:
    return str(json.loads((bundle / "manifest.json").read_text())["metrics"]["model_version"])


def _assert_json_logs(stderr: str) -> None:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines, "the server logged nothing"
    for ln in lines:
        try:
            assert isinstance(json.loads(ln), dict), ln
        except ValueError:
            raise AssertionError(f"stderr line is not JSON: {ln!r}") from None
    assert "Traceback" not in stderr


def test_hot_reloads_under_concurrent_load_never_fail_a_request(
    server_factory: ServerFactory, tiny_model: Path, bundle_b: Path, tiny_world: Path, tmp_path: Path
) -> None:
    version_a, version_b = _version(tiny_model), _version(bundle_b)
    assert version_a != version_b
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_model, corrupt)
    # Broken before LightGBM reads anything: a corrupt LightGBM file adds a raw line to stderr (test below).
    (corrupt / "two_tower" / "two_tower.json").write_text('{"format": ')

    # Reloads load only from under the models folder: here the test session's folder, which holds every bundle.
    srv = server_factory(tiny_model, tiny_world, env={"FINREC_SERVE__MODELS_ROOT": str(tmp_path.parent)})
    assert srv.wait_ready()["model_version"] == version_a

    stop = threading.Event()
    versions: Counter[str] = Counter()
    failures: list[str] = []
    lock = threading.Lock()

    def client_loop(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=srv.url, headers=ADMIN, timeout=30) as c:  # one keep-alive connection per client
            for _ in range(MAX_REQUESTS_PER_CLIENT):
                if stop.is_set():
                    return
                try:
                    r = c.get(f"/recommend/{rng.randint(1, 2000)}", params={"k": 10})
                except httpx.HTTPError as exc:
                    with lock:
                        failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                with lock:
                    if r.status_code == 200:
                        versions[r.json()["model_version"]] += 1
                    else:
                        failures.append(f"{r.status_code}: {r.text[:200]}")

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(N_CLIENTS)]
    for t in threads:
        t.start()
    plan = [bundle_b, tiny_model, bundle_b, corrupt, tiny_model, bundle_b, tiny_model, bundle_b, tiny_model]
    expected = {tiny_model: version_a, bundle_b: version_b}
    serving = version_a
    t_end = time.monotonic() + LOAD_SECONDS
    try:
        with httpx.Client(base_url=srv.url, headers=ADMIN, timeout=60) as admin:
            for target in plan:
                time.sleep(max(0.0, min(1.0, t_end - time.monotonic())))
                r = admin.post("/admin/reload", headers=ADMIN, json={"model_dir": str(target)})
                if target == corrupt:
                    assert r.status_code == 422, r.text
                    assert r.json()["error"].startswith("refused: ")
                else:
                    assert r.status_code == 200, r.text
                    assert r.json()["previous_version"] == serving
                    serving = expected[target]
                    assert r.json()["model_version"] == serving
                assert admin.get("/ready").json()["model_version"] == serving
                assert admin.get("/recommend/7").json()["model_version"] == serving
            time.sleep(max(0.0, t_end - time.monotonic()))
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)

    assert not failures, failures[:10]
    assert set(versions) == {version_a, version_b}, versions
    assert sum(versions.values()) > 100, versions  # the load was real
    metrics = httpx.get(f"{srv.url}/metrics", headers=ADMIN, timeout=10).text
    assert metric(metrics, "finrec_model_reloads_total", outcome="ok") == len(plan) - 1
    assert metric(metrics, "finrec_model_reloads_total", outcome="refused") == 1
    assert metric(metrics, "finrec_model_info", model_version=serving) == 1
    assert metric(metrics, "finrec_model_info", model_version=version_b) == 0
    served = metric(metrics, "finrec_requests_total", route="/recommend/{user_id}", method="GET", status="200")
    assert served >= sum(versions.values())
    assert metric(metrics, "finrec_requests_total", route="/recommend/{user_id}", method="GET", status="500") == 0

    assert srv.interrupt(timeout=30) == 0, srv.output()
    _assert_json_logs(srv.stderr_path.read_text())
    assert "serving model" in srv.stdout_path.read_text()


# LightGBM aborts the process on a truncated model file and prints raw lines on a garbled one; the bundle's
# checksums are verified first, so a damaged ranker.txt never reaches its parser.


@pytest.mark.parametrize(
    "damage",
    ["garbage", "truncated"],
)  # fmt: skip
def test_reload_of_a_damaged_ranker_file_is_refused_the_server_survives_and_logs_stay_json(
    server_factory: ServerFactory, tiny_model: Path, tiny_world: Path, tmp_path: Path, damage: str
) -> None:
    damaged = tmp_path / damage
    shutil.copytree(tiny_model, damaged)
    ranker = damaged / "ranker" / "ranker.txt"
    if damage == "garbage":
        ranker.write_text("not a LightGBM model\n")
    else:  # a copy cut short, e.g. by a full disk
        ranker.write_bytes(ranker.read_bytes()[: ranker.stat().st_size // 3])
    srv = server_factory(tiny_model, tiny_world, env={"FINREC_SERVE__MODELS_ROOT": str(tmp_path.parent)})
    version = srv.wait_ready()["model_version"]
    try:
        r = httpx.post(f"{srv.url}/admin/reload", headers=ADMIN, json={"model_dir": str(damaged)}, timeout=60)
    except httpx.TransportError as exc:
        raise AssertionError(f"the server died during the reload: {srv.output()[-2000:]}") from exc
    assert r.status_code == 422 and r.json()["error"].startswith("refused: ")
    assert httpx.get(f"{srv.url}/recommend/1", headers=ADMIN, timeout=10).json()["model_version"] == version
    assert srv.interrupt() == 0
    _assert_json_logs(srv.stderr_path.read_text())


def test_idle_keep_alive_connections_are_closed_by_the_server_after_the_setting(
    server_factory: ServerFactory, tiny_model: Path, tiny_world: Path
) -> None:
    """``serve.keep_alive_seconds`` reaches uvicorn: an idle connection is closed after it and not before. (Its
    default, 75 s, outlasts the idle timeouts of clients and proxies, so they close first and never send on a
    connection the server is closing; uvicorn's own 5 s equals httpx's and raced it, a reset in CI.)"""
    srv = server_factory(tiny_model, tiny_world, env={"FINREC_SERVE__KEEP_ALIVE_SECONDS": "2"})
    srv.wait_ready()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=60) as conn:
        conn.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = conn.recv(65536)
        idle_from = time.monotonic()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        closed = conn.recv(65536)  # blocks until the server closes the idle connection (or 60 s)
        idle = time.monotonic() - idle_from
    assert closed == b"" and idle >= 1.9, (closed[:200], idle)


def test_serve_without_a_model_bundle_exits_2_with_a_clear_message(tiny_world: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    res = subprocess.run(
        [sys.executable, "-m", "finrec", "serve", "--model-dir", str(missing), "--data", str(tiny_world),
         "--port", str(free_port())],
        capture_output=True, text=True, env=server_env(tmp_path / "ws"), timeout=120,
    )  # fmt: skip
    text = res.stdout + res.stderr
    assert res.returncode == 2, text
    assert "error:" in text and "no-such-model" in text and "manifest.json" in text
    assert "hint:" in text and "Traceback" not in text


def test_serve_on_a_busy_port_exits_2_naming_the_port(tiny_model: Path, tiny_world: Path, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = subprocess.run(
            [sys.executable, "-m", "finrec", "serve", "--model-dir", str(tiny_model), "--data", str(tiny_world),
             "--port", str(port)],
            capture_output=True, text=True, env=server_env(tmp_path / "ws"), timeout=120,
        )  # fmt: skip
    text = res.stdout + res.stderr
    assert res.returncode == 2, text
    assert f"127.0.0.1:{port}" in text and "--port" in text and "Traceback" not in text
