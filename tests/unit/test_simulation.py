"""The closed-loop simulation: customers react as the ground truth says, and the driver hides no failure.

The planted answer is the ground truth itself: realised approvals must match the true expected approvals
(``sum view_prob * propensity``) within the noise of the draws, views must fall with position as
``k ** -0.9``, approvals must become holdings that change utility exactly as ``COMP`` says, and an injected
drift must move conversion of the drifted categories the way its vector points. The driver runs against an
in-process fake service (httpx.MockTransport) that fails in every way a real one can.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from finrec.cli.simulate import simulate
from finrec.config import FinrecSettings
from finrec.data.synthetic import params as P
from finrec.data.synthetic.generate import WorldConfig, generate_world
from finrec.errors import ArtifactError, FinrecError
from finrec.simulation import SimulatedCustomers, run_simulation

T_SERVE = 1_712_000_000  # 2024-04-01, after the worlds below end: the time a live service answers


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sim") / "world"
    generate_world(WorldConfig(users=400, products=30, months=2, seed=5), out, progress=False)
    return out


@pytest.fixture(scope="module")
def drift_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sim") / "drift"
    generate_world(WorldConfig(users=200, products=30, months=2, seed=5, drift_month=2, drift_strength=1.5), out,
                   progress=False)  # fmt: skip
    return out


def _random_slates(c: SimulatedCustomers, n: int, size: int, seed: int) -> list[tuple[str, list[str]]]:
    rng = np.random.default_rng(seed)
    pids = np.asarray(c.truth.products["product_id"]).astype(str)
    return [(u, rng.choice(pids, size, replace=False).tolist()) for u in c.callers(n, rng)]


# -- the reaction model -------------------------------------------------------------------------


def test_realised_approvals_match_the_true_expected_conversions(world: Path) -> None:
    c = SimulatedCustomers.from_world(world, seed=1)
    expected = realised = 0.0
    for i, (user, slate) in enumerate(_random_slates(c, 3000, 10, seed=2)):
        r = c.react(user, slate, T_SERVE, stream=i)
        expected += r.expected_conversions
        realised += r.count("approve")
    # Approvals of a slate are a sum of independent Bernoulli draws whose means add up to the expectation, so
    # their variance is below it: a 4-sigma band around the truth (expected is about 200 here).
    assert expected > 100
    assert abs(realised - expected) < 4 * math.sqrt(expected), (realised, expected)


def test_expected_conversions_are_view_prob_times_propensity(world: Path) -> None:
    c = SimulatedCustomers.from_world(world, seed=1)
    truth = c.truth
    user, slate = _random_slates(c, 1, 8, seed=3)[0]
    held, owned = c.holds(user)[None, :], c.held_products(user)
    r = c.react(user, slate, T_SERVE, stream=0)
    month, day = c.month_of(T_SERVE), c.day_of(T_SERVE)
    prop = truth.propensity([int(user)] * len(slate), [int(p) for p in slate], held=np.repeat(held, len(slate), 0),
                            month=month, day=day)  # fmt: skip
    prop[[p in owned for p in slate]] = 0.0
    assert r.expected_conversions == pytest.approx(float((truth.view_prob(np.arange(1, 9)) * prop).sum()))


def test_position_bias_follows_the_truth(world: Path) -> None:
    c = SimulatedCustomers.from_world(world, seed=4)
    shown, viewed = np.zeros(11), np.zeros(11)
    for i, (user, slate) in enumerate(_random_slates(c, 3000, 10, seed=5)):
        for e in c.react(user, slate, T_SERVE, stream=i).events:
            if e["event_type"] == "impression":
                shown[e["position"]] += 1
            elif e["event_type"] == "view":
                viewed[e["position"]] += 1
    rate = viewed[1:] / shown[1:]
    truth = c.truth.view_prob(np.arange(1, 11))
    assert rate[0] == 1.0  # the first slot is always looked at (1 ** -0.9)
    assert rate[0] > rate[4] > rate[9]
    tolerance = 4 * np.sqrt(truth * (1 - truth) / shown[1:]) + 1e-9  # 4 binomial standard errors per position
    assert (np.abs(rate - truth) <= tolerance).all(), (rate, truth)


def test_every_step_has_its_predecessor_and_steps_are_ordered_in_time(world: Path) -> None:
    c = SimulatedCustomers.from_world(world, seed=6)
    before = {"view": "impression", "click": "view", "apply": "click", "approve": "apply", "decline": "apply"}
    for i, (user, slate) in enumerate(_random_slates(c, 400, 10, seed=7)):
        events = c.react(user, slate, T_SERVE + 0.7, stream=i).events
        assert [e["timestamp"] for e in events] == sorted(e["timestamp"] for e in events)
        assert all(e["timestamp"] >= T_SERVE for e in events)
        seen = {(e["product_id"], e["event_type"]) for e in events}
        for e in events:
            if e["event_type"] in before:
                assert (e["product_id"], before[e["event_type"]]) in seen
        assert sum(e["event_type"] == "impression" for e in events) == len(slate)


def test_approved_products_become_holdings_that_change_utility_as_the_truth_says(world: Path) -> None:
    c = SimulatedCustomers.from_world(world, seed=8)
    truth = c.truth
    # A customer who holds no card (a switch category) and their two cards most likely to convert.
    cat = P.CAT["credit_card"]
    cards = np.flatnonzero(truth.products["category"] == cat)
    users = np.flatnonzero(c.held[:, cat] == 0)
    prop = truth.propensity_matrix(truth.users["user_id"][users], month=c.month_of(T_SERVE))[:, cards]
    row = int(np.argmax(prop.max(axis=1)))
    best, second = cards[np.argsort(-prop[row])[:2]]
    u = users[row : row + 1]
    user = str(truth.users["user_id"][u[0]])
    card, other = str(truth.products["product_id"][best]), str(truth.products["product_id"][second])
    month = c.month_of(T_SERVE)
    before = c.utility(u, np.array([second]), c.holds(user)[None, :], month)
    _react_until_approved(c, user, card, first_stream=0)
    assert c.holds(user)[cat] == 1 and card in c.held_products(user)
    assert c.approved[-1] == (user, card)
    after = c.utility(u, np.array([second]), c.holds(user)[None, :], month)
    assert after - before == pytest.approx(P.COMP[cat, cat])  # saturation, exactly the truth's coefficient
    assert all(c.react(user, [card], T_SERVE, stream=s).count("apply") == 0 for s in range(10**6, 10**6 + 300))
    # A second card replaces the first: the reaction closes it.
    r = _react_until_approved(c, user, other, first_stream=2 * 10**6)
    assert [e["product_id"] for e in r.events if e["event_type"] == "close"] == [card]
    assert other in c.held_products(user) and card not in c.held_products(user)


def _react_until_approved(c: SimulatedCustomers, user: str, product: str, first_stream: int) -> Any:
    for stream in range(first_stream, first_stream + 50_000):
        r = c.react(user, [product], T_SERVE, stream=stream)
        if r.count("approve"):
            return r
    pytest.fail(f"customer {user} was never approved for {product}")


def test_holdings_start_from_the_end_of_the_worlds_data(world: Path) -> None:
    from finrec.simulation.customers import read_holding_events

    c = SimulatedCustomers.from_world(world)
    truth = c.truth
    np.testing.assert_array_equal(c.held, truth.held_matrix(read_holding_events(world), truth.users["user_id"]))
    assert c.held.sum() > 0


def test_injected_drift_moves_conversion_the_way_the_drift_vector_points(world: Path) -> None:
    truth = SimulatedCustomers.from_world(world).truth
    assert truth.info.drift_month is None and truth.info.drift_strength == 0.0
    assert np.abs(truth.coef.drift_shift).sum() > 0  # a world without --drift-month still has the direction
    cat = truth.products["category"]
    loans = [str(p) for p in truth.products["product_id"][np.isin(cat, [P.CAT[c] for c in P.LOAN_CATEGORIES])]]
    deposits = [str(p) for p in truth.products["product_id"][np.isin(cat, [P.CAT[c] for c in P.DEPOSIT_CATEGORIES])]]
    result = {}
    for strength in (0.0, 2.0):
        c = SimulatedCustomers.from_world(world, seed=9, drift_strength=strength)
        rng = np.random.default_rng(10)
        tally = {"loans": [0.0, 0], "deposits": [0.0, 0]}
        for i, user in enumerate(c.callers(800, rng)):
            for name, pool in (("loans", loans), ("deposits", deposits)):
                slate = rng.choice(pool, 3, replace=False).tolist()
                r = c.react(user, slate, T_SERVE, stream=2 * i + (name == "loans"))
                tally[name][0] += r.expected_conversions
                tally[name][1] += r.count("approve")
        result[strength] = tally
    # Loans gain and deposits lose, in the truth (expected) and in what customers do (realised).
    assert result[2.0]["loans"][0] > 1.5 * result[0.0]["loans"][0]
    assert result[2.0]["deposits"][0] < 0.6 * result[0.0]["deposits"][0]
    assert result[2.0]["loans"][1] > result[0.0]["loans"][1]
    assert result[2.0]["deposits"][1] < result[0.0]["deposits"][1]


def test_the_worlds_own_drift_applies_from_its_drift_month(drift_world: Path) -> None:
    c = SimulatedCustomers.from_world(drift_world)
    start = c.truth.info.start
    assert c.month_of(_unix(start)) == 0 and c.month_of(_unix("2024-02-01") - 1) == 0
    assert c.month_of(_unix("2024-02-01")) == 1
    assert c.drift_applied(0) == 0.0 and c.drift_applied(1) == 1.5  # drift_month 2 is 0-based month 1
    off = SimulatedCustomers.from_world(drift_world, drift_strength=0.0)
    u, p = np.zeros(30, dtype=np.int64), np.arange(30)
    held = np.zeros((1, len(P.CATEGORIES)))
    shift = c.utility(u, p, held, 1) - off.utility(u, p, held, 1)
    np.testing.assert_allclose(shift, 1.5 * np.asarray(c.truth.coef.drift_shift)[c.truth.products["category"]])


def test_reactions_are_deterministic_for_a_seed(world: Path) -> None:
    def run(seed: int) -> list[list[dict[str, Any]]]:
        c = SimulatedCustomers.from_world(world, seed=seed)
        return [c.react(u, s, T_SERVE, stream=i).events for i, (u, s) in enumerate(_random_slates(c, 300, 5, 11))]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_unknown_products_get_no_reaction(world: Path) -> None:
    c = SimulatedCustomers.from_world(world)
    r = c.react("1", ["no-such-product", "1"], T_SERVE)
    assert r.unknown_products == ["no-such-product"]
    assert {e["product_id"] for e in r.events} == {"1"}
    assert [e["position"] for e in r.events if e["event_type"] == "impression"] == [2]


def _unix(day: str) -> int:
    import pandas as pd

    return int(pd.Timestamp(day, tz="UTC").timestamp())


# -- the driver, against a fake service ---------------------------------------------------------


class FakeService:
    """Answers like finrec serve, except that it fails on purpose: every 7th request 500, unknown ids 404,
    and it rejects every ``decline`` event with a message."""

    def __init__(self, products: list[str]) -> None:
        self.products = products
        self.calls = 0
        self.events: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/ready":
            return httpx.Response(200, json={"status": "ready", "customers": 400, "products": 30})
        if path.startswith("/recommend/"):
            self.calls += 1
            user = path.rsplit("/", 1)[1]
            if self.calls % 7 == 0:
                return httpx.Response(500, json={"error": "internal error", "hint": "a bug"})
            if int(user) % 5 == 0:
                return httpx.Response(404, json={"error": f"customer {user!r} is not known", "hint": "check the id"})
            k = int(request.url.params["k"])
            items = [{"product_id": p, "rank": i + 1, "score": 1.0} for i, p in enumerate(self.products[:k])]
            version = "v1" if self.calls % 2 else "v2"
            return httpx.Response(200, json={"request_id": request.headers["X-Request-ID"], "user_id": user,
                                             "model_version": version, "experiment": None, "arm": None,
                                             "served_at": T_SERVE, "k": k, "items": items, "excluded": {}})  # fmt: skip
        if path == "/events":
            batch = json.loads(request.content)
            rejected = [{"index": i, "event_id": e["event_id"], "errors": ["event_type: no declines here"]}
                        for i, e in enumerate(batch) if e["event_type"] == "decline"]  # fmt: skip
            self.events += [e for e in batch if e["event_type"] != "decline"]
            return httpx.Response(200, json={"received": len(batch), "accepted": len(batch) - len(rejected),
                                             "duplicates": 0, "rejected": rejected})  # fmt: skip
        return httpx.Response(404, json={"error": "no route"})


def test_the_driver_counts_every_outcome_and_keeps_the_servers_words(world: Path) -> None:
    customers = SimulatedCustomers.from_world(world, seed=3)
    fake = FakeService([str(p) for p in customers.truth.products["product_id"]])
    report = run_simulation("http://fake", world, minutes=0.02, rate=150, k=5, seed=3, concurrency=4,
                            progress=False, customers=customers, transport=httpx.MockTransport(fake))  # fmt: skip
    d = report.to_dict()
    run, failures = d["run"], d["failures"]
    assert run["planned"] == run["sent"] == fake.calls > 100
    assert run["answered"] + run["failed"] == run["sent"]
    by_kind = failures["by_stage"]["recommend"]
    assert by_kind["http_5xx"] == fake.calls // 7 and by_kind["http_4xx"] > 0
    assert run["failed"] == by_kind["http_5xx"] + by_kind["http_4xx"]
    messages = {(m["stage"], m["kind"], m["status"]): m["message"] for m in failures["messages"]}
    assert messages[("recommend", "http_5xx", 500)] == "internal error (hint: a bug)"
    assert any(s == ("recommend", "http_4xx", 404) and "is not known" in m for s, m in messages.items())
    # Per-model tallies add up to the totals, and every posted event is either accepted or reported rejected.
    assert {r["model_version"] for r in d["by_model"]} == {"v1", "v2"}
    totals = d["totals"]
    assert sum(r["answers"] for r in d["by_model"]) == totals["answers"] == run["answered"]
    assert totals["impressions"] == 5 * run["answered"]
    assert totals["events_posted"] == len(fake.events) + totals["declines"]
    assert totals["events_accepted"] == len(fake.events)
    assert failures["by_stage"].get("events", {}).get("rejected", 0) == totals["declines"] == totals["events_rejected"]
    assert sum(r["answers"] for r in d["timeline"]["rows"]) == run["answered"]
    assert all(e["event_id"].rsplit("-", 1)[0] == e["request_id"] for e in fake.events)
    assert all(e["model_version"] in ("v1", "v2") and e["channel"] == "simulation" for e in fake.events)
    json.dumps(d, allow_nan=False)
    report.figure()  # draws without a display


def test_the_driver_names_connection_failures(world: Path) -> None:
    customers = SimulatedCustomers.from_world(world)

    def flaky(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/ready":
            return httpx.Response(200, json={"status": "ready"})
        raise httpx.ConnectError("connection refused", request=request)

    report = run_simulation("http://fake", world, minutes=0.01, rate=100, progress=False, customers=customers,
                            transport=httpx.MockTransport(flaky))  # fmt: skip
    assert report.failed == report.sent > 0 and report.failures["recommend"] == {"connection": report.sent}
    assert report.messages[0]["message"] == "ConnectError: connection refused"


def test_a_connection_reset_once_is_sent_again_and_a_reset_twice_is_a_failure(world: Path) -> None:
    """A kept-alive connection the service closes as a request goes out is reset: the loop sends that request once
    more (events keep their ids, so the service would drop a duplicate) and says so; a second reset is a failure."""
    customers = SimulatedCustomers.from_world(world, seed=3)
    fake = FakeService([str(p) for p in customers.truth.products["product_id"]])
    seen: Counter[str] = Counter()
    lock = threading.Lock()

    def resetting(times: int) -> Any:
        def handler(request: httpx.Request) -> httpx.Response:
            key = f"{request.method} {request.url.path} {request.headers.get('X-Request-ID')} {request.content!r}"
            with lock:
                seen[key] += 1
                n = seen[key]
            if request.url.path != "/ready" and zlib.crc32(key.encode()) % 3 == 0 and n <= times:
                raise httpx.ReadError("[Errno 104] Connection reset by peer", request=request)
            return fake(request)

        return handler

    report = run_simulation("http://fake", world, minutes=0.02, rate=150, k=5, seed=3, concurrency=4, progress=False,
                            customers=customers, transport=httpx.MockTransport(resetting(1)))  # fmt: skip
    assert "connection" not in report.failures["recommend"] and "connection" not in report.failures.get("events", {})
    assert report.failed == report.failures["recommend"]["http_5xx"] + report.failures["recommend"]["http_4xx"]
    resent = sum(n - 1 for n in seen.values())
    assert resent > 10 and any(note.startswith(f"{resent} requests were sent again") for note in report.notes)
    assert len({e["event_id"] for e in fake.events}) == len(fake.events)  # each event accepted once

    seen.clear()
    report = run_simulation("http://fake", world, minutes=0.02, rate=150, k=5, seed=4, concurrency=4, progress=False,
                            customers=customers, transport=httpx.MockTransport(resetting(2)))  # fmt: skip
    reset_twice = sum(1 for key, n in seen.items() if key.startswith("GET") and n == 2)
    assert report.failures["recommend"]["connection"] == reset_twice
    assert report.failures["recommend"]["connection"] > 0
    assert any(m["message"].startswith("ReadError: [Errno 104]") for m in report.messages)


# -- the command ----------------------------------------------------------------------------------


def _invoke(args: list[str]) -> Any:
    app = typer.Typer()
    app.command()(simulate)
    app.command("noop", hidden=True)(lambda: None)  # two commands: `simulate` is then a subcommand, as in finrec
    return CliRunner().invoke(app, ["simulate", *args], obj={"settings": FinrecSettings()})


def test_every_option_is_explained() -> None:
    result = _invoke(["--help"])
    assert result.exit_code == 0
    for option in ("--url", "--data", "--minutes", "--rate", "--k", "--seed", "--concurrency", "--drift-strength",
                   "--consenting-only", "--window-seconds", "--timeout", "--output", "--plot"):  # fmt: skip
        assert option in result.output


def _error_of(result: Any) -> FinrecError:
    # finrec.cli.main prints a FinrecError as one message with its hint and exits with its code (2).
    assert isinstance(result.exception, FinrecError), result.output
    assert result.exception.exit_code == 2 and result.exception.hint
    return result.exception


def test_an_unreachable_service_is_one_clear_error(world: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    exc = _error_of(_invoke(["--url", f"http://127.0.0.1:{port}", "--data", str(world), "--minutes", "0.01",
                             "--no-progress"]))  # fmt: skip
    assert "cannot reach the service" in exc.message and "finrec serve" in (exc.hint or "")


def test_a_world_without_ground_truth_is_one_clear_error(tmp_path: Path) -> None:
    exc = _error_of(_invoke(["--data", str(tmp_path), "--minutes", "0.01"]))
    assert isinstance(exc, ArtifactError) and "ground truth" in exc.message


@pytest.mark.parametrize(("args", "says"), [
    (["--minutes", "0"], "--minutes must be a positive"),
    (["--rate", "-1"], "--rate must be a positive"),
    (["--k", "51"], "--k must be between 1 and 50"),
    (["--drift-strength", "nan"], "drift strength nan"),
])  # fmt: skip
def test_bad_numbers_are_one_clear_error(world: Path, args: list[str], says: str) -> None:
    exc = _error_of(_invoke(["--data", str(world), *args]))
    assert says in exc.message


def test_a_value_of_the_wrong_type_is_a_usage_error() -> None:
    result = _invoke(["--rate", "fast"])
    assert result.exit_code == 2 and "--rate" in result.output
