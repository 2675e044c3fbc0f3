"""Benchmark: what authentication, the trusted-event check and ``durability = "power"`` cost.

Why: issue 12 adds a key check to every request and a signed ``request_id`` check to every customer-side event,
and offers an fsync per event batch. Each is measured against its own reference in the same run, requests of
the two kinds interleaved so that both see the same machine:

1. ``GET /recommend/{user_id}`` with a key (SHA-256 of the presented key, compared in constant time with every
   configured key, the scope, the rate limiter; and the answer filtered for a key without
   ``recommend:explain``) against ``--no-auth`` (the same route, no key work);
2. ``POST /events`` with a batch of customer-side events from an ``events`` key (each event's request id is
   checked: an HMAC-SHA256 and its age) against the same batch from an ``events:trusted`` key (not checked);
3. appending a batch to the SQLite event store with ``synchronous=NORMAL`` (``process``) against ``FULL``
   (``power``), on this machine's disk.

The app is called in process through ASGI (no sockets), so the figures are the service's own work per request,
not the network's. Medians over many requests, and the ratio.

Usage::

    .venv/bin/python benchmarks/bench_security.py                 # 2k customers, 2,000 requests per kind
    .venv/bin/python benchmarks/bench_security.py --requests 300  # quick check

Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
for _name in [k for k in os.environ if k.startswith("FINREC_")]:
    del os.environ[_name]  # the benchmark's own settings only

from finrec import pipeline  # noqa: E402
from finrec.config import FinrecSettings  # noqa: E402
from finrec.data.synthetic.generate import generate_world  # noqa: E402
from finrec.events.schema import Event  # noqa: E402
from finrec.events.store import open_event_store  # noqa: E402
from finrec.serving.app import create_app  # noqa: E402
from finrec.serving.auth import KeyTable, Principal, hash_key  # noqa: E402
from finrec.serving.service import Service  # noqa: E402
from finrec.testing import TINY_TRAIN, TINY_WORLD  # noqa: E402

KEYS = {"web": ("w" * 40, ["recommend"]), "feedback": ("f" * 40, ["events"]),
        "core": ("c" * 40, ["events:trusted"]), "ops": ("o" * 40, ["monitor"])}  # fmt: skip


async def call(app: Any, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, float]:
    """One request through the ASGI app; (status, seconds)."""
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    if body:
        raw += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    path, _, query = path.partition("?")
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query.encode(), "headers": raw,
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "root_path": ""}  # fmt: skip
    sent = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    t0 = time.perf_counter()
    await app(scope, receive, send)
    return status, time.perf_counter() - t0


def interleaved(a: Callable[[int], float], b: Callable[[int], float], n: int) -> tuple[list[float], list[float]]:
    ta, tb = [], []
    for i in range(n):
        first, second = (a, b) if i % 2 else (b, a)
        r1, r2 = first(i), second(i)
        (ta, tb)[first is b].append(r1)
        (ta, tb)[second is b].append(r2)
    return ta, tb


def row(what: str, a: list[float], b: list[float], unit: float = 1e6) -> str:
    ma, mb = statistics.median(a) * unit, statistics.median(b) * unit
    return f"| {what} | {ma:,.0f} | {mb:,.0f} | {ma - mb:+,.0f} | {ma / mb:.3f} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000, help="requests of each kind")
    ap.add_argument("--batch", type=int, default=20, help="events per POST /events")
    ap.add_argument("--appends", type=int, default=300, help="event-store appends of each kind")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="finrec-bench-security-"))
    world, model = tmp / "world", tmp / "model"
    generate_world(TINY_WORLD, world, progress=False)
    pipeline.train(world, model, FinrecSettings(train=TINY_TRAIN), progress=False)
    keys = [{"name": n, "scopes": s, "sha256": hash_key(k), "rate_per_second": None} for n, (k, s) in KEYS.items()]
    settings = FinrecSettings(workspace=tmp / "ws", serve={"clock": "data", "event_store": "memory://"},
                              auth={"keys": keys})  # fmt: skip
    svc = Service.from_settings(settings, model, world, watch=False)
    with_auth = create_app(settings, service=svc)
    no_auth = create_app(settings, service=svc, keys=KeyTable([], disabled=True))
    for app in (with_auth, no_auth):
        app.state.service = svc  # what the lifespan does; the ASGI calls below do not run it
    loop = asyncio.new_event_loop()
    users = [str(u) for u in range(1, 2001)]

    def recommend(app: Any, headers: dict[str, str]) -> Callable[[int], float]:
        def one(i: int) -> float:
            status, seconds = loop.run_until_complete(call(app, "GET", f"/recommend/{users[i % len(users)]}?k=10",
                                                           headers))  # fmt: skip
            assert status == 200, status
            return seconds

        return one

    for i in range(200):  # warm up both paths
        recommend(with_auth, {"X-API-Key": KEYS["web"][0]})(i)
        recommend(no_auth, {})(i)
    rec_auth, rec_none = interleaved(recommend(with_auth, {"X-API-Key": KEYS["web"][0]}), recommend(no_auth, {}),
                                     args.requests)  # fmt: skip

    # Answers to cite: one per customer with items, made once.
    answers = []
    for u in users:
        status, _ = loop.run_until_complete(call(no_auth, "GET", f"/recommend/{u}?k=5", {}))
        body = svc.recommender.recommend(u, 5).body
        if body["items"]:
            answers.append(body)
        if len(answers) >= 200:
            break

    def events(key: str) -> Callable[[int], float]:
        def one(i: int) -> float:
            a = answers[i % len(answers)]
            batch = [{"event_id": uuid.uuid4().hex, "user_id": a["user_id"], "product_id": a["items"][0]["product_id"],
                      "event_type": "view", "request_id": a["request_id"]} for _ in range(args.batch)]  # fmt: skip
            status, seconds = loop.run_until_complete(call(with_auth, "POST", "/events", {"X-API-Key": KEYS[key][0]},
                                                           json.dumps(batch).encode()))  # fmt: skip
            assert status == 200, status
            return seconds

        return one

    for i in range(100):
        events("feedback")(i)
        events("core")(i)
    ev_checked, ev_trusted = interleaved(events("feedback"), events("core"), args.requests)

    table = KeyTable([Principal(n, frozenset(s), hash_key(k)) for n, (k, s) in KEYS.items()])
    t0 = time.perf_counter()
    for _ in range(100_000):
        table.authenticate(KEYS["web"][0])
    auth_us = (time.perf_counter() - t0) / 100_000 * 1e6
    signer, rid = svc.recommender.signer, answers[0]["request_id"]
    t0 = time.perf_counter()
    for _ in range(100_000):
        signer.check(rid, answers[0]["user_id"], svc.recommender.clock(), 7 * 86_400)
    check_us = (time.perf_counter() - t0) / 100_000 * 1e6
    svc.close()

    def appends(durability: str) -> Callable[[int], float]:
        store = open_event_store(f"sqlite:///{tmp / f'events-{durability}.db'}", durability=durability)

        def one(i: int) -> float:
            batch = [Event(uuid.uuid4().hex, "1", "3", "view", 1_700_000_000) for _ in range(args.batch)]
            t = time.perf_counter()
            store.append(batch)
            return time.perf_counter() - t

        return one

    app_process, app_power = interleaved(appends("process"), appends("power"), args.appends)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; python "
          f"{platform.python_version()}; {args.requests:,} requests of each kind, interleaved; in process (ASGI)")
    print()
    print("| what (median, microseconds) | with | without | cost | ratio |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(row("`GET /recommend`: key (`recommend` scope) vs `--no-auth`", rec_auth, rec_none))
    print(row(f"`POST /events`, {args.batch} customer-side events: `events` key (request ids checked) vs "
              "`events:trusted` (not checked)", ev_checked, ev_trusted))  # fmt: skip
    print(row(f"SQLite append of {args.batch} events: `power` (synchronous=FULL) vs `process` (NORMAL)",
              app_power, app_process))  # fmt: skip
    print()
    print(f"Parts: one key check (SHA-256 and 4 constant-time comparisons) {auth_us:.1f} µs; one request id check "
          f"(HMAC-SHA256 and its age) {check_us:.1f} µs.")


if __name__ == "__main__":
    main()
