"""Validation of event batches: each bad item is rejected on its own, naming the field, and never sinks the batch."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finrec.events.schema import FIELDS, Duplicate, Event, parse_events

NOW = 1_700_000_000
PRODUCTS = {"P-1", "P-2", "42"}


def known(product_id: str) -> bool:
    return product_id in PRODUCTS


def good(event_id: Any = "e-1", **fields: Any) -> dict[str, Any]:
    return {"event_id": event_id, "user_id": "C-1", "product_id": "P-1", "event_type": "click", **fields}


def test_good_events_parse_with_ids_as_text_and_times_as_unix_seconds() -> None:
    items = [
        good("e-1", timestamp="2023-11-14T22:13:20Z", position=1, request_id="r-1", channel="app"),
        {"event_id": 7, "user_id": 123, "product_id": 42, "event_type": "approve", "timestamp": NOW - 10.9},
        good("e-3", timestamp="2023-11-14T22:13:20"),  # naive is UTC
        good("e-4", timestamp="2023-11-15T00:13:20+02:00"),
        good("  e-5  ", arm="explore", model_version="v3", channel="  "),  # no timestamp: now; blank channel: none
        good("e-6", timestamp=None, position=None),
    ]
    accepted, rejected, duplicates = parse_events(items, known, now=NOW)
    assert rejected == [] and duplicates == []
    assert accepted[0] == Event("e-1", "C-1", "P-1", "click", NOW, position=1, request_id="r-1", channel="app")
    assert accepted[1] == Event("7", "123", "42", "approve", NOW - 11)  # ints become text; fractions go to the past
    assert [e.ts for e in accepted[2:4]] == [NOW, NOW]
    assert accepted[4] == Event("e-5", "C-1", "P-1", "click", NOW, arm="explore", model_version="v3")
    assert accepted[5].ts == NOW and accepted[5].position is None


def test_timestamps_within_the_tolerance_are_accepted() -> None:
    items = [good("a", timestamp=NOW + 300), good("b", timestamp=NOW + 301), good("c", timestamp=946_684_800)]
    accepted, rejected, _ = parse_events(items, known, now=NOW, future_tolerance_seconds=300)
    assert [e.event_id for e in accepted] == ["a", "c"]
    assert [r.index for r in rejected] == [1]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("event_id", None, "event_id: is null"),
        ("event_id", 1.5, "event_id: expected a string or an integer, got a number"),
        ("event_id", True, "event_id: expected a string or an integer, got a boolean"),
        ("event_id", "   ", "event_id: is empty"),
        ("event_id", "x" * 129, "event_id: is 129 characters long; use at most 128"),
        pytest.param("event_id", 10**200, "event_id: is 129 characters long", id="event_id-huge-int"),
        ("event_id", "e\x00-1", "event_id: 'e\\x00-1' contains control"),
        ("user_id", ["C-1"], "user_id: expected a string or an integer, got an array"),
        ("user_id", {"id": 1}, "user_id: expected a string or an integer, got an object"),
        ("product_id", "P-404", "product_id: 'P-404' is not in the product catalogue"),
        ("event_type", "purchase", "event_type: 'purchase' is not a known event type; use one of impression"),
        ("event_type", "Clik", "did you mean 'click'?"),
        ("event_type", 3, "event_type: expected a string, got a number"),
        ("timestamp", NOW + 3600, "timestamp: 1700003600 is in the future"),
        ("timestamp", (NOW + 1) * 1000, "looks like milliseconds"),
        ("timestamp", "2999-01-01T00:00:00Z", "is in the future"),
        ("timestamp", math.nan, "timestamp: nan is not a time"),
        ("timestamp", math.inf, "timestamp: inf is not a time"),
        ("timestamp", -5, "timestamp: -5 is before 2000-01-01"),
        ("timestamp", 19_000, "is before 2000-01-01"),  # days, not seconds
        ("timestamp", "yesterday", "timestamp: 'yesterday' is not an ISO 8601 date and time"),
        ("timestamp", "1700000000", "unix seconds must be a JSON number, not text"),
        ("timestamp", True, "timestamp: expected text or a number, got a boolean"),
        ("position", 0, "position: 0 is outside 1..100000"),
        ("position", -1, "position: -1 is outside"),
        ("position", True, "position: expected an integer, got a boolean"),
        ("position", 2.0, "position: expected an integer, got a number"),
        ("channel", 5, "channel: expected a string, got a number"),
        ("request_id", "r" * 200, "request_id: is 200 characters long"),
        ("model_version", ["v1"], "model_version: expected a string, got an array"),
        ("timestmp", NOW, "timestmp: is not a known field; did you mean 'timestamp'?"),
        ("score", 0.5, "score: is not a known field; the fields are event_id"),
    ],
)
def test_bad_field_is_rejected_by_name_and_the_rest_of_the_batch_is_kept(field: str, value: Any, message: str) -> None:
    items = [good("first"), {**good("bad"), field: value}, good("last")]
    accepted, rejected, duplicates = parse_events(items, known, now=NOW)
    assert [e.event_id for e in accepted] == ["first", "last"]
    assert duplicates == [] and len(rejected) == 1
    (rejection,) = rejected
    assert rejection.index == 1
    assert rejection.event_id == (None if field == "event_id" else "bad")
    assert len(rejection.errors) == 1 and message in rejection.errors[0], rejection.errors
    assert "pydantic" not in rejection.errors[0] and "http" not in rejection.errors[0]


@pytest.mark.parametrize("missing", ["event_id", "user_id", "product_id", "event_type"])
def test_missing_required_field_is_named(missing: str) -> None:
    item = good()
    del item[missing]
    _, rejected, _ = parse_events([item], known, now=NOW)
    assert len(rejected[0].errors) == 1
    assert rejected[0].errors[0].startswith(f"{missing}: is missing; ")


def test_every_problem_of_an_item_is_reported_at_once() -> None:
    item = {"event_id": "e", "user_id": None, "product_id": "P-9", "event_type": "buy", "position": 0, "x": 1}
    _, rejected, _ = parse_events([item], known, now=NOW)
    fields_named = sorted(message.split(":")[0] for message in rejected[0].errors)
    assert fields_named == ["event_type", "position", "product_id", "user_id", "x"]


@pytest.mark.parametrize("item", [None, 5, "event", [good()], True])
def test_an_item_that_is_not_an_object_is_rejected_alone(item: Any) -> None:
    accepted, rejected, _ = parse_events([good("a"), item, good("b")], known, now=NOW)
    assert [e.event_id for e in accepted] == ["a", "b"]
    assert rejected[0].index == 1 and rejected[0].event_id is None
    assert rejected[0].errors[0].startswith("item: expected a JSON object")


def test_within_batch_duplicates_keep_the_first_valid_copy_and_are_not_errors() -> None:
    items = [
        good("a", channel="app"),
        good("b", event_type="nope"),  # invalid: rejected, so does not claim "b"
        good("a", channel="web"),  # same id, other content: still a duplicate of index 0
        good("b"),
        good(7),
        good("7"),  # 7 and "7" are the same id once read as text
        good("a", position=0),  # an invalid copy is rejected, not counted as a duplicate
    ]
    accepted, rejected, duplicates = parse_events(items, known, now=NOW)
    assert [(e.event_id, e.channel) for e in accepted] == [("a", "app"), ("b", None), ("7", None)]
    assert duplicates == [Duplicate(2, "a", 0), Duplicate(5, "7", 4)]
    assert [r.index for r in rejected] == [1, 6]


def test_an_empty_batch_is_fine_and_an_oversize_batch_raises() -> None:
    assert parse_events([], known, now=NOW) == ([], [], [])
    assert len(parse_events([good(i) for i in range(10)], known, now=NOW, max_batch=10).accepted) == 10
    with pytest.raises(ValueError, match="holds 11 events but at most 10 are accepted per request; split"):
        parse_events([good(i) for i in range(11)], known, now=NOW, max_batch=10)
    with pytest.raises(ValueError, match="expected a JSON array"):
        parse_events({"event_id": "e"}, known, now=NOW)  # type: ignore[arg-type]


def test_a_full_batch_parses_quickly() -> None:
    """A loose bound (the target is well under 20 ms) so a busy CI machine does not fail it."""
    items = [good(i, timestamp="2023-11-14T22:00:00Z", position=1 + i % 10, request_id=f"r{i}") for i in range(1000)]
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        accepted, _, _ = parse_events(items, known, now=NOW)
        best = min(best, time.perf_counter() - start)
    assert len(accepted) == 1000 and best < 0.1


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)
# Items close to valid reach the deeper checks: known field names with arbitrary values.
NEAR_VALID = st.fixed_dictionaries(
    {"event_id": st.integers(0, 5) | st.sampled_from(["a", "b", " a "])},
    optional={name: JSON | st.sampled_from(["click", "P-1", "2023-01-01", "C-1"]) for name in FIELDS - {"event_id"}},
)


@settings(max_examples=300, deadline=None)
@given(st.lists(JSON | NEAR_VALID | st.builds(good, st.sampled_from(["a", "b", 1])), max_size=12))
def test_parse_never_raises_and_every_item_lands_exactly_once(items: list[Any]) -> None:
    accepted, rejected, duplicates = parse_events(items, known, now=NOW)
    rejected_at = [r.index for r in rejected]
    duplicate_at = [d.index for d in duplicates]
    assert len(set(rejected_at) | set(duplicate_at)) == len(rejected_at) + len(duplicate_at)
    assert len(accepted) + len(rejected) + len(duplicates) == len(items)
    assert len({e.event_id for e in accepted}) == len(accepted)
    assert all(r.errors for r in rejected)
    assert all(d.first_index < d.index for d in duplicates)
