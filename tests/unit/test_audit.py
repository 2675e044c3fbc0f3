"""Audit log: pseudonymity, lookup, the key file, numpy values and whole lines under concurrent writers."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import stat
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from finrec.errors import ArtifactError
from finrec.serving import audit
from finrec.serving.audit import AuditLog, load_or_create_key, pseudonymise, pseudonymise_request, read_records

KEY = bytes(range(32))
#: Records hold a keyed hash of the request id; the tests name records by the ids they wrote.
_IDS: dict[str, str] = {}


def unhash(hashed: str) -> str:
    """The request id whose hash under KEY is ``hashed`` (among those written by ``record``)."""
    return _IDS.get(hashed, hashed)


def record(request_id: str, n_items: int = 3, **extra: object) -> dict:
    _IDS[pseudonymise_request(request_id, KEY)] = request_id
    items = [
        {"product_id": f"P{i}", "rank": i + 1, "score": 0.9 - i / 10, "reasons": ["fits your goals"]}
        for i in range(n_items)
    ]
    return {
        "request_id": request_id,
        "model_version": "m1",
        "arm": None,
        "items": items,
        "removed": {"credit_score": 2},
        "kind": "customer",
        **extra,
    }


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_bytes().splitlines()]


def test_raw_id_never_written_and_find_returns_only_that_customer_in_order(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, KEY) as log:
        for i in range(5):
            log.append(record(f"a{i}"), "customer-alice-123")
            log.append(record(f"b{i}"), "customer-bob-456")
        log.append(record("p0", kind="prospect"), None)
        found = log.find("customer-alice-123")
    data = path.read_bytes()
    assert b"customer-alice-123" not in data and b"customer-bob-456" not in data
    assert [unhash(r["request"]) for r in found] == [f"a{i}" for i in range(5)]
    assert {r["customer"] for r in found} == {pseudonymise("customer-alice-123", KEY)}
    assert lines(path)[-1]["customer"] is None
    assert read_records(path, bytes(32), "customer-alice-123").records == []  # another key finds nothing


def test_record_carries_time_and_rejects_raw_id_fields(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "a.jsonl", KEY) as log:
        before = time.time()
        log.append(record("r1"), "u1")
        with pytest.raises(ValueError, match="raw customer id"):
            log.append({**record("r2"), "user_id": "u1"}, "u1")
    (rec,) = lines(tmp_path / "a.jsonl")
    assert before - 0.01 <= rec["ts"] <= time.time() + 0.01
    assert rec["time"].endswith("Z") and rec["time"].startswith(time.strftime("%Y-", time.gmtime(rec["ts"])))


def test_key_file_created_0600_then_reused(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "audit.key"
    key = load_or_create_key(path)
    assert len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key(path) == key
    assert [p.name for p in path.parent.iterdir()] == ["audit.key"]  # no temporary file left behind


@pytest.mark.parametrize("content", ["not hex at all", "abcd"])
def test_malformed_key_file_is_an_artifact_error_naming_it(tmp_path: Path, content: str) -> None:
    path = tmp_path / "audit.key"
    path.write_text(content)
    with pytest.raises(ArtifactError) as err:
        load_or_create_key(path)
    assert str(path) in err.value.message
    assert err.value.hint is not None and "delete" in err.value.hint


def test_numpy_values_and_nan_serialise(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    extra = {
        "f32": np.float32(0.5),
        "i64": np.int64(7),
        "arr": np.array([1.0, np.nan]),
        "nan": float("nan"),
        "f64nan": np.float64("nan"),
        "f32nan": np.float32("nan"),
        "flag": np.bool_(True),
        "ints": np.arange(3),
        "when": np.datetime64("2024-01-02"),
        "whens": np.array(["2024-01-02"], dtype="datetime64[D]"),
    }
    with AuditLog(path, KEY) as log:
        log.append(record("r1", **extra), "u1")
        log.append(record("r2", f32=np.float32(0.25)), "u1")  # all finite: the fast path
    first, second = lines(path)
    assert (first["f32"], first["i64"], first["arr"], first["nan"]) == (0.5, 7, [1.0, None], None)
    assert (first["f64nan"], first["f32nan"], first["flag"], first["ints"]) == (None, None, True, [0, 1, 2])
    assert (first["when"], first["whens"]) == ("2024-01-02", ["2024-01-02"])
    assert second["f32"] == 0.25
    assert b"NaN" not in path.read_bytes()


def test_concurrent_threads_write_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    with AuditLog(path, KEY, fsync_interval=0.01) as log:

        def work(t: int) -> None:
            for i in range(500):
                log.append(record(f"t{t}-{i}", n_items=10), f"user{t}")

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert [unhash(r["request"]) for r in log.find("user3", limit=1000)] == [f"t3-{i}" for i in range(500)]
    recs = lines(path)
    assert len(recs) == 4000
    assert len({unhash(r["request"]) for r in recs}) == 4000


def _process_writer(path: str, tag: str, n: int) -> None:
    with AuditLog(Path(path), KEY) as log:
        for i in range(n):
            log.append(record(f"{tag}-{i}", n_items=10), tag)


def test_two_processes_append_whole_lines_to_one_file(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    procs = [ctx.Process(target=_process_writer, args=(str(path), tag, 2000)) for tag in ("w1", "w2")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    recs = lines(path)
    assert len(recs) == 4000
    for tag in ("w1", "w2"):
        query = read_records(path, KEY, tag, limit=5000)
        expected = [pseudonymise_request(f"{tag}-{i}", KEY) for i in range(2000)]  # written in other processes
        assert [r["request"] for r in query.records] == expected
        assert query.skipped_lines == 0


def test_torn_last_line_and_corrupt_line_are_skipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    with AuditLog(path, KEY) as log:
        log.append(record("r1"), "u1")
        log.append(record("r2"), "u1")
    whole = path.read_bytes()
    corrupt = whole.splitlines()[0].replace(b'"items":', b'"items"', 1) + b"\n"  # braces intact, JSON broken
    path.write_bytes(corrupt + whole[: len(whole) - 20])  # and the second record cut mid-write
    query = read_records(path, KEY, "u1")
    assert [unhash(r["request"]) for r in query.records] == ["r1"]
    assert query.skipped_lines == 2


def test_missing_file_yields_no_records(tmp_path: Path) -> None:
    assert read_records(tmp_path / "nope.jsonl", KEY, "u1") == audit.AuditQuery([], 0)


def test_limit_keeps_the_newest_and_since_filters(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "a.jsonl", KEY) as log:
        for i in range(10):
            log.append(record(f"r{i}", ts=1000.0 + i), "u1")
        assert [unhash(r["request"]) for r in log.find("u1", limit=3)] == ["r7", "r8", "r9"]
        assert [unhash(r["request"]) for r in log.find("u1", since=1005.0)] == [f"r{i}" for i in range(5, 10)]
        assert [unhash(r["request"]) for r in log.find("u1", limit=2, since=1003.0)] == ["r8", "r9"]
        assert log.find("u1", limit=0) == []


def test_close_syncs_and_is_idempotent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = audit._fsync
    monkeypatch.setattr(audit, "_fsync", lambda fd: (synced.append(fd), real(fd)))
    log = AuditLog(tmp_path / "a.jsonl", KEY, fsync_interval=3600)
    log.append(record("r1"), "u1")
    assert synced == []  # no fsync on the request path
    log.close()
    assert len(synced) == 1
    log.close()
    assert len(synced) == 1
    assert [unhash(r["request"]) for r in read_records(tmp_path / "a.jsonl", KEY, "u1").records] == ["r1"]
    with pytest.raises(ValueError, match="closed"):
        log.append(record("r2"), "u1")


def test_background_thread_syncs_within_the_interval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced = threading.Event()
    real = audit._fsync
    monkeypatch.setattr(audit, "_fsync", lambda fd: (synced.set(), real(fd)))
    with AuditLog(tmp_path / "a.jsonl", KEY, fsync_interval=0.02) as log:
        log.append(record("r1"), "u1")
        assert synced.wait(2.0)


def test_file_is_private(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "sub" / "a.jsonl", KEY) as log:
        log.append(record("r1"), "u1")
    assert stat.S_IMODE(os.stat(tmp_path / "sub" / "a.jsonl").st_mode) == 0o600
