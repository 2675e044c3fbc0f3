"""The next ``GET /recommend`` reflects a feedback event, within one second of sending it.

One ``finrec serve`` with ``clock = data`` (service time continues from the end of the synthetic data, so events
sent without a timestamp are stamped at service time and the guardrails' windows see them and the data's own
recent events alike), the default ``memory://`` online store and SQLite event store. For each kind of event a
customer who has not been sent any event yet is chosen; their answer for ``k=50`` holds every product they may be
shown (the tiny catalogue has 40), so the answer's product set *is* the allowed set:

* a ``decline`` of P rests P (cooling-off): P is gone, ``excluded.cooling_off`` is one more, nothing else moved;
* three ``impression`` events of Q reach the frequency cap (3 per 7 days by default): Q is gone, counted under
  ``frequency_cap``;
* an ``approve`` of R makes R held: R is gone, counted under ``held``;
* a ``click`` removes nothing, but it changes the customer's features (click counts, recency, category affinity,
  history and so embedding, pair history), so the same products come back with other scores, while the answer
  without the click was the same twice in a row and another customer's answer is unchanged.

Each time is measured from just before the POST is sent to the arrival of the next GET's answer, on one
keep-alive connection, and must be under a second. Only the first answer after the event is looked at: no
polling.

With several workers (``--workers 2``) the event and the next request usually reach different processes. With a
Redis online store (shared) every answer after a decline rests the product, whichever worker gives it; with the
default ``memory://`` store each worker only knows the events it received itself (and those in the event store
when it started), so the other worker still shows the product. An answer does not say which worker gave it, so
the tests read each worker's own Prometheus sample file (``PROMETHEUS_MULTIPROC_DIR``, which ``finrec serve
--workers N`` sets for its workers) before and after each request: the worker whose request count went up
answered. These tests run on the machine's clock (the default): with ``clock = data`` each worker's clock starts
when that worker has loaded, so their service times differ by up to their start-up skew.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from live_server import ADMIN, Server, ServerFactory, redis_store_url

pytestmark = pytest.mark.integration

K = 50
WITHIN_SECONDS = 1.0

Answer = dict[str, Any]


@pytest.fixture(scope="module")
def server(tiny_model: Path, tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tiny_model, tiny_world, tmp_path_factory.mktemp("freshness"), env={"FINREC_SERVE__CLOCK": "data"})
    try:
        ready = srv.wait_ready()
        assert ready["clock"] == "data", ready
        yield srv
    finally:
        srv.kill_if_running()


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=ADMIN, timeout=30) as c:  # one keep-alive connection
        yield c


def _recommend(client: httpx.Client, user: str) -> Answer:
    r = client.get(f"/recommend/{user}", params={"k": K})
    assert r.status_code == 200, r.text
    return dict(r.json())


def _products(answer: Answer) -> list[str]:
    return [item["product_id"] for item in answer["items"]]


def _scores(answer: Answer) -> dict[str, float]:
    return {item["product_id"]: item["score"] for item in answer["items"]}


@pytest.fixture(scope="module")
def fresh_customer(client: httpx.Client) -> Callable[[int], tuple[str, Answer]]:
    """``pick(n)``: a customer no test has sent an event for, with at least ``n`` products to show, and the answer."""
    candidates = iter(str(u) for u in range(1, 2001))

    def pick(n: int) -> tuple[str, Answer]:
        for user in candidates:
            answer = _recommend(client, user)
            if len(answer["items"]) >= n:
                assert len(answer["items"]) < K  # the whole allowed set, not a cut
                return user, answer
        raise AssertionError(f"no customer left with {n} products to show")

    return pick


def _event(user: str, product: str, event_type: str) -> dict[str, str]:
    return {"event_id": uuid.uuid4().hex, "user_id": user, "product_id": product, "event_type": event_type}


def _post_then_recommend(client: httpx.Client, user: str, events: list[dict[str, str]]) -> tuple[Answer, float]:
    """POST the events (no timestamp: stamped at service time), then GET; the answer and the seconds from send."""
    t0 = time.perf_counter()
    r = client.post("/events", json=events)
    answer = _recommend(client, user)
    elapsed = time.perf_counter() - t0
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == len(events) and not r.json()["rejected"], r.text
    return answer, elapsed


def _only_changed(before: Answer, after: Answer, guardrail: str) -> None:
    """``after`` removed exactly one more product than ``before``, under ``guardrail``."""
    expected = dict(before["excluded"])
    expected[guardrail] += 1
    assert after["excluded"] == expected


def test_a_decline_rests_the_product_in_the_next_answer(
    client: httpx.Client, fresh_customer: Callable[[int], tuple[str, Answer]]
) -> None:
    user, before = fresh_customer(2)
    declined = _products(before)[0]  # the top product
    after, elapsed = _post_then_recommend(client, user, [_event(user, declined, "decline")])
    assert declined not in _products(after)
    assert elapsed < WITHIN_SECONDS, f"{elapsed:.3f} s"
    assert set(_products(after)) == set(_products(before)) - {declined}
    _only_changed(before, after, "cooling_off")


def test_three_impressions_reach_the_frequency_cap_in_the_next_answer(
    client: httpx.Client, fresh_customer: Callable[[int], tuple[str, Answer]]
) -> None:
    user, before = fresh_customer(2)
    shown = _products(before)[1]
    after, elapsed = _post_then_recommend(client, user, [_event(user, shown, "impression") for _ in range(3)])
    assert shown not in _products(after)
    assert elapsed < WITHIN_SECONDS, f"{elapsed:.3f} s"
    assert set(_products(after)) == set(_products(before)) - {shown}
    _only_changed(before, after, "frequency_cap")


def test_an_approval_makes_the_product_held_in_the_next_answer(
    client: httpx.Client, fresh_customer: Callable[[int], tuple[str, Answer]]
) -> None:
    user, before = fresh_customer(2)
    approved = _products(before)[-1]
    after, elapsed = _post_then_recommend(client, user, [_event(user, approved, "approve")])
    assert approved not in _products(after)
    assert elapsed < WITHIN_SECONDS, f"{elapsed:.3f} s"
    assert set(_products(after)) == set(_products(before)) - {approved}
    _only_changed(before, after, "held")


def test_a_click_changes_the_scores_in_the_next_answer_and_removes_nothing(
    client: httpx.Client, fresh_customer: Callable[[int], tuple[str, Answer]]
) -> None:
    user, before = fresh_customer(2)
    bystander, bystander_before = fresh_customer(2)
    # Without a live event a customer's features are the snapshot's: the same answer every time.
    assert _scores(_recommend(client, user)) == _scores(before)
    clicked = _products(before)[-1]
    after, elapsed = _post_then_recommend(client, user, [_event(user, clicked, "click")])
    assert elapsed < WITHIN_SECONDS, f"{elapsed:.3f} s"
    assert set(_products(after)) == set(_products(before))  # a click removes nothing
    assert after["excluded"] == before["excluded"]
    assert _scores(after) != _scores(before), "the click did not change the customer's answer"
    assert _scores(_recommend(client, bystander)) == _scores(bystander_before)  # only the clicking customer's


# -- several workers ----------------------------------------------------------------------------------------------
RECOMMEND_ROUTE = "/recommend/{user_id}"
MIN_ANSWERS = 20
MAX_ANSWERS = 200  # fresh connections until both workers have answered; the kernel picks the worker


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rpartition(")")[2].split()[1])  # the field after the state; the name may hold spaces


def _metrics_dir(worker: int) -> Path:
    """The worker's ``PROMETHEUS_MULTIPROC_DIR`` (set by ``finrec serve`` for its workers, so in their environ)."""
    environ = dict(
        item.split(b"=", 1) for item in Path(f"/proc/{worker}/environ").read_bytes().split(b"\0") if b"=" in item
    )
    return Path(environ[b"PROMETHEUS_MULTIPROC_DIR"].decode())


class WorkerCounts:
    """Requests per worker pid and route, read from each worker's own counter file."""

    def __init__(self, directory: Path, workers: set[int]) -> None:
        self.directory = directory
        self.workers = workers

    def read(self, route: str) -> dict[int, float]:
        from prometheus_client.multiprocess import MultiProcessCollector

        counts = dict.fromkeys(self.workers, 0.0)
        for pid in self.workers:
            path = self.directory / f"counter_{pid}.db"
            if not path.exists():
                continue
            for fam in MultiProcessCollector.merge([str(path)], accumulate=False):
                counts[pid] += sum(s.value for s in fam.samples
                                   if s.name == "finrec_requests_total" and s.labels.get("route") == route)  # fmt: skip
        return counts

    def who_answers(self, route: str, request: Callable[[], httpx.Response]) -> tuple[int, httpx.Response]:
        """Send one request (nothing else may be in flight) and name the worker that answered it."""
        before = self.read(route)
        response = request()
        deadline = time.monotonic() + 5  # a request is counted just after its answer is sent
        while time.monotonic() < deadline:
            after = self.read(route)
            risen = [pid for pid in self.workers if after[pid] > before[pid]]
            if risen:
                assert len(risen) == 1 and after[risen[0]] == before[risen[0]] + 1, (before, after)
                return risen[0], response
            time.sleep(0.005)
        raise AssertionError(f"no worker counted the request to {route}: {before}")


@pytest.fixture
def two_workers(server_factory: ServerFactory) -> Iterator[Callable[..., tuple[Server, WorkerCounts]]]:
    """``start(model_dir, data, env)``: a server with two workers, both loaded, and their request counts."""
    if not Path("/proc/self/environ").exists():
        pytest.skip("needs Linux's /proc to tell the workers apart")
    started: list[Path] = []

    def start(model_dir: Path, data: Path, env: dict[str, str],
              root_args: tuple[str, ...] = ()) -> tuple[Server, WorkerCounts]:  # fmt: skip
        srv = server_factory(model_dir, data, "--workers", "2", env=env, root_args=root_args)
        srv.wait_ready()
        workers = srv.wait_workers(2)
        assert len(workers) == 2, workers
        assert all(_parent(pid) == srv.proc.pid for pid in workers), "the workers are not the server's children"
        directory = _metrics_dir(next(iter(workers)))
        started.append(directory)
        return srv, WorkerCounts(directory, workers)

    yield start
    for directory in started:  # finrec serve leaves its metrics folder behind; it is this test's to remove
        if directory.parent == Path(tempfile.gettempdir()) and directory.name.startswith("finrec-metrics-"):
            shutil.rmtree(directory, ignore_errors=True)


def _answers_after_a_decline(srv: Server, counts: WorkerCounts) -> tuple[int, str, list[tuple[int, list[str]]]]:
    """Decline a product once, then ask over fresh connections until both workers answered (at least 20 times).

    Returns the worker that took the decline, the product, and (worker, products) per answer.
    """
    with httpx.Client(base_url=srv.url, headers=ADMIN, timeout=30) as client:
        for user in map(str, range(1, 201)):
            products = _products(_recommend(client, user))
            if products:
                break
        else:
            raise AssertionError("no customer among the first 200 has a product to show")
    declined = products[0]

    def post() -> httpx.Response:
        return httpx.post(f"{srv.url}/events", json=[_event(user, declined, "decline")], headers=ADMIN, timeout=30)

    took_it, r = counts.who_answers("/events", post)
    assert r.status_code == 200 and r.json()["accepted"] == 1, r.text

    def get() -> httpx.Response:  # a new connection each time (httpx.get opens and closes its own)
        return httpx.get(f"{srv.url}/recommend/{user}", params={"k": K}, headers={"Connection": "close", **ADMIN},
                         timeout=30)

    answers: list[tuple[int, list[str]]] = []
    while len(answers) < MAX_ANSWERS:
        pid, r = counts.who_answers(RECOMMEND_ROUTE, get)
        assert r.status_code == 200, r.text
        answers.append((pid, _products(r.json())))
        if len(answers) >= MIN_ANSWERS and {p for p, _ in answers} == counts.workers:
            break
    assert {p for p, _ in answers} == counts.workers, f"one worker gave all {len(answers)} answers"
    return took_it, declined, answers


def test_a_decline_posted_to_one_worker_rests_the_product_on_every_worker_with_a_redis_online_store(
    two_workers: Callable[..., tuple[Server, WorkerCounts]], tiny_model: Path, tiny_world: Path, redis_prefix: str
) -> None:
    url = redis_store_url(redis_prefix)
    srv, counts = two_workers(tiny_model, tiny_world,
                              {"FINREC_SERVE__EVENT_STORE": url, "FINREC_SERVE__ONLINE_STORE": url})  # fmt: skip
    _, declined, answers = _answers_after_a_decline(srv, counts)
    showing = [pid for pid, products in answers if declined in products]
    assert not showing, f"{len(showing)} of {len(answers)} answers (workers {set(showing)}) show the declined product"
    assert srv.interrupt() == 0, srv.output()[-2000:]


def test_with_the_memory_online_store_a_decline_reaches_only_the_worker_that_took_it(
    two_workers: Callable[..., tuple[Server, WorkerCounts]], tiny_model: Path, tiny_world: Path
) -> None:
    """The contrast: ``memory://`` is per process, so the other worker keeps showing the product (until its
    catch-up with the event log, every ``serve.catch_up_seconds``, here an hour, or a restart). Not a bug, the
    documented limit of that store; shown to prove the test above can tell shared from unshared state."""
    srv, counts = two_workers(tiny_model, tiny_world, {"FINREC_SERVE__ONLINE_STORE": "memory://",
                                                       "FINREC_SERVE__CATCH_UP_SECONDS": "3600"})
    took_it, declined, answers = _answers_after_a_decline(srv, counts)
    for pid, products in answers:
        assert (declined in products) == (pid != took_it), (pid, took_it)
    assert srv.interrupt() == 0, srv.output()[-2000:]


def test_two_workers_both_serve_the_settings_file_given_with_config(
    two_workers: Callable[..., tuple[Server, WorkerCounts]], tiny_model: Path, tiny_world: Path, tmp_path: Path
) -> None:
    """Finding 3 of the security review: `finrec --config FILE serve --workers 2` lost the file in the workers
    (its API key, max_events_per_request and require_marketing_consent). Each worker must answer by the file."""
    from finrec.serving.auth import hash_key

    key = "toml-" + "k" * 40
    config = tmp_path / "finrec.toml"
    config.write_text(f'[serve]\nmax_events_per_request = 5\nrequire_marketing_consent = true\n\n'
                      f'[[auth.keys]]\nname = "from-the-file"\nscopes = ["recommend", "events:trusted"]\n'
                      f'sha256 = "{hash_key(key)}"\n')  # fmt: skip
    srv, counts = two_workers(tiny_model, tiny_world, {}, root_args=("--config", str(config)))
    header = {"X-API-Key": key, "Connection": "close"}
    seen: dict[int, list[tuple[int, int, int]]] = {pid: [] for pid in counts.workers}
    for _ in range(MAX_ANSWERS):
        who, r = counts.who_answers("/recommend", lambda: httpx.post(  # a prospect whose consent is unknown
            f"{srv.url}/recommend", json={"profile": {"age": 40, "income": 60000}, "k": 5}, headers=header,
            timeout=30))  # fmt: skip
        _, batch = counts.who_answers("/events", lambda: httpx.post(
            f"{srv.url}/events", json=[_event("1", "3", "view") for _ in range(6)], headers=header, timeout=30))
        seen[who].append((r.status_code, len(r.json().get("items", [])), batch.status_code))
        if all(len(v) >= 3 for v in seen.values()):
            break
    assert all(len(v) >= 3 for v in seen.values()), seen
    for answers in seen.values():  # the file's key is known, consent is required, and batches of 6 are too big
        assert all(a == (200, 0, 413) for a in answers), seen
    assert srv.interrupt() == 0, srv.output()[-2000:]
