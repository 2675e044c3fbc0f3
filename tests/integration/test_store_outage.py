"""Finding 4 of the security review, on a live server: an online store (Redis) that stalls, dies and comes back empty.

The service runs with its event log in SQLite and its online features in a Redis server of the test's own (a
``redis-server`` on a free port, no persistence), which the test pauses (SIGSTOP) and kills (SIGKILL):

* while the store stalls, ``/recommend`` answers 503 with ``Retry-After`` and its request id once the store's
  short timeout passes, and ``/health`` is answered meanwhile: the stalled call does not hold the event loop;
* while it is down, declines are still accepted (the event log is the record) and recommendations answer 503;
* once it is back, empty, the service catches up from the log: no accepted decline is missing from the answers.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from live_server import ADMIN, Server, ServerFactory, free_port

pytestmark = pytest.mark.integration


class RedisProcess:
    """A throwaway ``redis-server`` on 127.0.0.1 (no snapshots, no AOF: a restart comes back empty)."""

    def __init__(self, port: int, workdir: Path) -> None:
        self.port, self.workdir = port, workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.workdir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                import redis

                if redis.Redis(port=self.port, socket_timeout=1).ping():
                    return
            except Exception:
                time.sleep(0.1)
        raise AssertionError("redis-server did not start")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server (Debian package redis-server)")
    pytest.importorskip("redis")
    server = RedisProcess(free_port(), tmp_path)
    server.start()
    yield server
    server.kill()


def _decline(srv: Server, user: str, product: str) -> httpx.Response:
    event = {"event_id": f"d-{uuid.uuid4().hex}", "user_id": user, "product_id": product, "event_type": "decline"}
    return httpx.post(f"{srv.url}/events", json=[event], headers=ADMIN, timeout=60)


def _shown(srv: Server, user: str) -> list[str]:
    r = httpx.get(f"{srv.url}/recommend/{user}", params={"k": 50}, headers=ADMIN, timeout=60)
    assert r.status_code == 200, r.text
    return [it["product_id"] for it in r.json()["items"]]


def test_online_store_stalls_dies_and_comes_back_empty_without_losing_an_accepted_event(
    server_factory: ServerFactory, tiny_model: Path, tiny_world: Path, own_redis: RedisProcess
) -> None:
    srv = server_factory(tiny_model, tiny_world, env={
        "FINREC_SERVE__ONLINE_STORE": f"redis://127.0.0.1:{own_redis.port}/0",
        "FINREC_SERVE__STORE_TIMEOUT_SECONDS": "3", "FINREC_SERVE__BREAKER_RESET_SECONDS": "2"})  # fmt: skip
    srv.wait_ready()
    user = next(u for u in map(str, range(1, 300)) if len(_shown(srv, u)) >= 3)
    first, second = _shown(srv, user)[:2]
    assert _decline(srv, user, first).json()["accepted"] == 1
    assert first not in _shown(srv, user)

    # Stalled: the recommendation waits for the store's timeout, then 503; /health is answered meanwhile.
    own_redis.signal(signal.SIGSTOP)
    result: dict[str, httpx.Response] = {}
    slow = threading.Thread(target=lambda: result.update(r=httpx.get(
        f"{srv.url}/recommend/{user}", headers={**ADMIN, "X-Request-ID": "stalled-1"}, timeout=60)))  # fmt: skip
    slow.start()
    time.sleep(0.3)  # the recommendation is in flight (waiting on Redis) before /health is asked
    health = httpx.get(f"{srv.url}/health", timeout=60)
    answered_first = slow.is_alive()
    slow.join()
    assert health.status_code == 200 and answered_first, "a stalled store call held up /health"
    r = result["r"]
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
    assert r.json()["request_id"] == "stalled-1" and r.json()["hint"] and "Traceback" not in r.text

    # Dead: declines are still accepted into the event log; recommendations answer 503, /ready says why.
    own_redis.signal(signal.SIGCONT)
    own_redis.kill()
    r = _decline(srv, user, second)
    assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
    r = httpx.get(f"{srv.url}/recommend/{user}", headers=ADMIN, timeout=60)
    assert r.status_code == 503 and r.json()["request_id"], r.text
    ready = httpx.get(f"{srv.url}/ready", timeout=60)
    assert ready.status_code == 503 and ready.json()["stores"]["online_store"] != "ok"

    # Back, and empty: the service catches up from the event log, and both declines hold.
    own_redis.start()
    deadline = time.monotonic() + 120
    while httpx.get(f"{srv.url}/ready", timeout=60).status_code != 200:
        assert time.monotonic() < deadline, f"the service never caught up: {srv.output()[-2000:]}"
        time.sleep(0.5)
    shown = _shown(srv, user)
    assert first not in shown and second not in shown, (first, second, shown)
    assert srv.interrupt() == 0, srv.output()[-2000:]
