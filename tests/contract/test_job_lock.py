"""One contract for every job lock (files, Redis): one holder at a time, the last start kept, no double run."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from finrec.jobs.locks import FileJobLock, JobLock, RedisJobLock
from finrec.testing import REDIS_TEST_URL, drop_redis_keys, redis_unavailable


@pytest.fixture(params=["file", "redis"])
def lock(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobLock]:
    if request.param == "file":
        yield FileJobLock(tmp_path / "locks")
        return
    reason = redis_unavailable()
    if reason:
        pytest.skip(reason)
    prefix = f"test-jobs-{uuid.uuid4().hex[:8]}"
    yield RedisJobLock(REDIS_TEST_URL, lock_seconds=5, prefix=prefix)
    drop_redis_keys(prefix)


def test_one_holder_at_a_time_and_free_again_after_release(lock: JobLock) -> None:
    first = lock.try_acquire("rollup")
    assert first is not None
    assert lock.try_acquire("rollup") is None  # held: the second runner gets nothing, at once
    other = lock.try_acquire("retrain")  # another job is independent
    assert other is not None
    other.release()
    first.release()
    again = lock.try_acquire("rollup")
    assert again is not None
    again.release()


def test_the_last_start_is_seen_by_the_next_holder(lock: JobLock) -> None:
    assert lock.peek_last_start("drift-check") is None
    with lock.try_acquire("drift-check") as lease:  # type: ignore[union-attr]
        assert lease.last_start() is None
        lease.mark_start(1234.5)
    assert lock.peek_last_start("drift-check") == 1234.5
    with lock.try_acquire("drift-check") as lease:  # type: ignore[union-attr]
        assert lease.last_start() == 1234.5


def test_racing_runners_run_a_due_job_once(lock: JobLock) -> None:
    ran: list[int] = []
    barrier = threading.Barrier(6)

    def runner(i: int) -> None:
        barrier.wait()
        for _ in range(20):  # each keeps trying: whoever gets the lock after the run must see it done
            lease = lock.try_acquire("rollup")
            if lease is None:
                continue
            with lease:
                if lease.last_start() is None:  # due only if it never ran
                    lease.mark_start(1.0)
                    ran.append(i)

    threads = [threading.Thread(target=runner, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ran) == 1


def test_job_names_are_checked(lock: JobLock) -> None:
    with pytest.raises(ValueError, match="job names"):
        lock.try_acquire("../etc/passwd")
