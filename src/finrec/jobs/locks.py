"""Job locks: at most one runner of a job at a time, across schedulers, service workers and cron.

A :class:`JobLock` hands out a :class:`Lease` for a job name, or ``None`` at once when someone else holds it
(never waits: a scheduler that finds a job taken moves on, a cron run exits 75). The lease also keeps the
job's *last start* time, read and written only by its holder, so a runner that takes the lock right after
another one finished sees that the job is no longer due and does not run it a second time.

* :class:`FileJobLock` (the embedded default): ``flock`` on ``<folder>/<job>.lock``; the last start is kept in
  ``<job>.last`` beside it. The kernel releases the lock when its holder dies, so a crash never leaves a job
  locked. Every runner must see the same folder (one machine, or shared storage with working ``flock``).
* :class:`RedisJobLock`: ``SET key token NX PX ttl``, renewed by a thread every third of the ttl while the job
  runs and released only by its holder (a compare-and-delete script). A crashed holder's lock expires after
  ``lock_seconds``. The last start is a Redis key too, so schedulers on different machines agree.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Protocol

from finrec.errors import ConfigError

#: Job names are file and key names: letters, digits and dashes.
_ALLOWED = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")


def runner_id() -> str:
    """Who runs a job, as recorded in the history: host and process id (no user data)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _check_job(job: str) -> str:
    if not job or set(job) - _ALLOWED:
        raise ValueError(f"job names are lower-case letters, digits and dashes, got {job!r}")
    return job


class Lease(Protocol):
    """A held job lock. Use as a context manager or call :meth:`release`."""

    def last_start(self) -> float | None:
        """When the job last started (Unix seconds), by any runner; None if never."""
        ...

    def mark_start(self, when: float) -> None:
        """Record that the job starts now (``when``), before it runs."""
        ...

    def release(self) -> None:
        """Let the next runner take the job (idempotent)."""
        ...

    def __enter__(self) -> Lease: ...

    def __exit__(self, *exc: object) -> None: ...


class JobLock(Protocol):
    """Hands out :class:`Lease` objects, one holder per job at a time."""

    def try_acquire(self, job: str) -> Lease | None:
        """The job's lease, or None at once if another runner holds it."""
        ...

    def peek_last_start(self, job: str) -> float | None:
        """The job's last start without taking the lock (a hint for "is it due"; decide under the lease)."""
        ...


class _FileLease:
    def __init__(self, fd: int, last: Path) -> None:
        self._fd: int | None = fd
        self._last = last

    def last_start(self) -> float | None:
        return _read_last(self._last)

    def mark_start(self, when: float) -> None:
        tmp = self._last.with_suffix(".tmp")
        tmp.write_text(json.dumps({"started": when, "by": runner_id()}))
        os.replace(tmp, self._last)

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> _FileLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_last(path: Path) -> float | None:
    try:
        value = json.loads(path.read_text()).get("started")
    except (OSError, ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, int | float) else None


class FileJobLock:
    """``flock`` locks in ``folder`` (created); see the module docstring."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the job lock folder {self.folder}: {exc.strerror}",
                              hint="set schedule.lock to a writable file:///folder") from None  # fmt: skip

    def try_acquire(self, job: str) -> _FileLease | None:
        path = self.folder / f"{_check_job(job)}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return _FileLease(fd, self.folder / f"{job}.last")

    def peek_last_start(self, job: str) -> float | None:
        return _read_last(self.folder / f"{_check_job(job)}.last")


# Delete / extend the key only while it still holds our token: an expired lock taken over by another runner
# must not be released or renewed by the old holder.
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
_RENEW = ("if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) "
          "else return 0 end")


class _RedisLease:
    def __init__(self, client: Any, prefix: str, job: str, token: str, ttl_ms: int) -> None:
        self._client, self._key, self._last = client, f"{prefix}:lock:{job}", f"{prefix}:last:{job}"
        self._token, self._ttl_ms = token, ttl_ms
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew, name=f"finrec-lock-{job}", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(self._ttl_ms / 3000):
            with contextlib.suppress(Exception):  # a blip: the next renewal tries again before the ttl ends
                self._client.eval(_RENEW, 1, self._key, self._token, self._ttl_ms)

    def last_start(self) -> float | None:
        value = self._client.get(self._last)
        return None if value is None else float(value)

    def mark_start(self, when: float) -> None:
        self._client.set(self._last, repr(float(when)))

    def release(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            with contextlib.suppress(Exception):
                self._client.eval(_RELEASE, 1, self._key, self._token)

    def __enter__(self) -> _RedisLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class RedisJobLock:
    """Locks under ``<prefix>:lock:<job>`` in Redis at ``url``; see the module docstring."""

    def __init__(self, url: str, lock_seconds: float = 600.0, prefix: str = "finrec:jobs") -> None:
        try:
            import redis
        except ImportError:  # pragma: no cover - the redis extra
            raise ConfigError("a redis:// job lock needs the redis package",
                              hint="pip install 'finrec[redis]', or set schedule.lock to a file:// folder") from None
        self._client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10)
        self._ttl_ms = int(lock_seconds * 1000)
        self._prefix = prefix
        try:
            self._client.ping()
        except redis.RedisError as exc:
            raise ConfigError(f"cannot reach the Redis of the job locks: {type(exc).__name__}",
                              hint="start Redis or fix schedule.lock (or serve.event_store, whose Redis it "
                              "defaults to)") from None  # fmt: skip

    def try_acquire(self, job: str) -> _RedisLease | None:
        token = f"{runner_id()}:{uuid.uuid4().hex}"
        if not self._client.set(f"{self._prefix}:lock:{_check_job(job)}", token, nx=True, px=self._ttl_ms):
            return None
        return _RedisLease(self._client, self._prefix, job, token, self._ttl_ms)

    def peek_last_start(self, job: str) -> float | None:
        value = self._client.get(f"{self._prefix}:last:{_check_job(job)}")
        return None if value is None else float(value)


def open_job_lock(url: str | None, workspace: Path, event_store: str | None = None,
                  lock_seconds: float = 600.0) -> JobLock:  # fmt: skip
    """The lock of ``schedule.lock`` (see :class:`finrec.config.ScheduleSettings`)."""
    if url is None:
        if event_store and event_store.startswith(("redis://", "rediss://")):
            return RedisJobLock(event_store.split("?", 1)[0], lock_seconds)
        return FileJobLock(Path(workspace) / "scheduler" / "locks")
    if url.startswith("file://"):
        return FileJobLock(Path(url[len("file://"):]))
    return RedisJobLock(url, lock_seconds)


def wait_free(lock: JobLock, job: str, timeout: float) -> Lease | None:
    """Try to take ``job`` for up to ``timeout`` seconds (for a one-off run that may wait); None if still held."""
    deadline = time.monotonic() + timeout
    while True:
        lease = lock.try_acquire(job)
        if lease is not None or time.monotonic() >= deadline:
            return lease
        time.sleep(0.5)
