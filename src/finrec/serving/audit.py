"""Append-only audit log of every recommendation answer.

A bank must be able to show, later, what a customer was shown and why. Each answer becomes one JSON line:
``request`` (a keyed hash of the answer's request id), ``ts`` (unix seconds) and ``time`` (ISO 8601 UTC; both
filled in by :meth:`AuditLog.append` when absent), ``customer``, ``model_version``, ``arm`` (may be null),
``items`` (``product_id``, ``rank``, ``score``, ``reasons``), ``removed`` (counts per guardrail rule) and
``kind`` (``"customer"`` or ``"prospect"``).

The raw customer id is never written: ``customer`` is a keyed hash (HMAC-SHA256, 32 hex characters; null for a
prospect), so whoever holds the key can find a customer's records (``finrec audit --user ID`` computes the same
hash) while the log alone reveals no ids. Losing the key makes old records unfindable by id.

Each line is one ``os.write`` on a descriptor opened with ``O_APPEND``: on a local Linux filesystem this keeps lines
from several worker processes and threads whole without a lock file (not on NFS). Create one :class:`AuditLog` per
worker process, after any fork: the fsync thread does not survive a fork.

The file only grows: rotate it with the platform's usual tool (logrotate: rename, then restart the workers so they
reopen it; ``copytruncate`` can lose lines written during the copy). Lookups scan it linearly.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import os
import secrets
import stat
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from finrec.errors import ArtifactError, FinrecError

log = logging.getLogger(__name__)
KEY_BYTES = 32
_fsync = getattr(os, "fdatasync", os.fsync)  # the file size is all the metadata an append needs on disk


def load_or_create_key(path: Path) -> bytes:
    """Read the pseudonymisation key (hex text), creating a random one with permissions 0600 if missing.

    Raises
    ------
    ArtifactError
        The file exists but cannot be read or does not hold at least 32 bytes of hex.
    """
    path = Path(path)
    hint = f"delete {path} to create a new key, but records written under the old key can then no longer be found"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_hex(KEY_BYTES).encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            # link, not replace: when several workers start at once the first key wins and all of them read it;
            # with replace, early workers would hash with a key that is then overwritten.
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    try:
        mode = path.stat().st_mode
        key = bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"key file {path} is unreadable or not hex: {e}", hint=hint) from e
    if len(key) < KEY_BYTES:
        raise ArtifactError(f"key file {path} holds {len(key)} bytes, need at least {KEY_BYTES}", hint=hint)
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        raise ArtifactError(f"key file {path} may be read or changed by every user (mode {stat.S_IMODE(mode):04o})",
                            hint=f"chmod 600 {path}; and since others could read it, consider the pseudonyms "
                            "made with it known")  # fmt: skip
    return key


def read_existing_key(audit_path: Path, key_path: Path) -> bytes:
    """The key of an existing audit log, for reading it (never creates one: a new key would match no record).

    Raises
    ------
    FinrecError
        No audit log at ``audit_path``, or no key at ``key_path`` (each with a hint), or a damaged key.
    """
    if not Path(audit_path).is_file():
        raise FinrecError(f"no audit log at {audit_path}", hint="pass --audit-log (the audit.jsonl of a service), "
                          "or point FINREC_WORKSPACE / serve.audit_log at the service's")  # fmt: skip
    if not Path(key_path).is_file():
        raise FinrecError(f"no audit key at {key_path}: the customers in {audit_path} cannot be matched",
                          hint="the key (audit.key) sits next to the service's audit log; copy it there "
                          "or set serve.audit_key_file")  # fmt: skip
    return load_or_create_key(key_path)  # it exists: only read, and refused clearly if damaged


def pseudonymise_request(request_id: str, key: bytes) -> str:
    """Keyed hash of an answer's request id, as the audit log holds it.

    The event store keeps raw customer ids beside the request ids of the answers they follow; were the log to
    hold the raw request id too, joining the two would name the customer behind every pseudonym. With the
    keyed hash only a key holder (monitoring, ``finrec audit``) can join them.

    >>> pseudonymise_request("r-1", b"k" * 32) != pseudonymise_request("r-1", b"j" * 32)
    True
    """
    return hmac.digest(key, b"request\x1f" + request_id.encode(), "sha256").hex()[:32]


def pseudonymise(user_id: str, key: bytes) -> str:
    """Keyed hash of a customer id: stable for one key, meaningless without it.

    >>> pseudonymise("c1", b"k" * 32) == pseudonymise("c1", b"k" * 32) != pseudonymise("c1", b"j" * 32)
    True
    """
    return hmac.digest(key, user_id.encode(), "sha256").hex()[:32]


def _default(obj: Any) -> Any:
    # Numbers become Python numbers; other numpy kinds (datetime64, complex, ...) their text, so none can fail.
    if isinstance(obj, np.ndarray):
        return obj.tolist() if obj.dtype.kind in "biufUO" else obj.astype(str).tolist()
    if isinstance(obj, np.integer | np.floating | np.bool_):
        return obj.item()
    if isinstance(obj, np.generic):
        return str(obj)
    raise TypeError(f"audit record holds a {type(obj).__name__}, which has no JSON form")


def _finite(obj: Any) -> Any:
    """Copy of a JSON-ready structure with NaN and infinities as None (slow path, rare)."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.ndarray | np.generic):
        return _finite(_default(obj))
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# One encoder, built once: json.dumps with any option builds a new one per call. allow_nan=False turns a NaN
# into an exception, so the common all-finite record takes the fast C path and only odd ones pay for _finite.
# ASCII output, so a lone surrogate in some reason text cannot make the .encode() below fail. Records are built
# fresh per request and hold no cycles, so the cycle check is skipped (a cycle would still raise RecursionError).
_encode = json.JSONEncoder(separators=(",", ":"), check_circular=False, allow_nan=False, default=_default).encode


def _to_line(record: dict[str, Any]) -> bytes:
    try:
        text = _encode(record)
    except ValueError:
        text = _encode(_finite(record))
    return text.encode() + b"\n"


@dataclass
class AuditQuery:
    """Records of one customer, oldest first (file order), and how many unreadable lines were skipped."""

    records: list[dict[str, Any]] = field(default_factory=list)
    skipped_lines: int = 0


def read_records(path: Path, key: bytes, user_id: str, limit: int = 100, since: float | None = None) -> AuditQuery:
    """The last ``limit`` records of ``user_id`` with ``ts >= since``, oldest first; a missing file gives none.

    Streams the file line by line. A line that is not a whole JSON object (a torn write at the end, a corrupt
    line) is skipped and counted. Only lines holding the customer's pseudonym are parsed, which keeps a scan
    of a large file cheap.
    """
    pseudonym = pseudonymise(user_id, key)
    needle = f'"customer":"{pseudonym}"'.encode()
    found: deque[dict[str, Any]] = deque(maxlen=max(limit, 0))
    skipped = 0
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the with below; only the open may raise FileNotFoundError
    except FileNotFoundError:
        return AuditQuery()
    with f:
        for line in f:
            if not (line.startswith(b"{") and line.endswith(b"}\n")):
                skipped += 1
                continue
            if needle not in line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                skipped += 1
                continue
            if rec.get("customer") == pseudonym and (since is None or rec.get("ts", -math.inf) >= since):
                found.append(rec)
    if skipped:
        log.warning("skipped %d unreadable line(s) in audit log %s", skipped, path)
    return AuditQuery(list(found), skipped)


class AuditLog:
    """Appends audit records to a JSONL file; thread-safe, and safe to share between processes.

    Parameters
    ----------
    path
        The log file, created (mode 0600, parents too) if missing.
    key
        Pseudonymisation key, from :func:`load_or_create_key`.
    fsync_interval
        At most this many seconds between fsyncs, done by a daemon thread. A thread rather than a lazy fsync in
        ``append``: an fsync takes milliseconds that no request should wait for, and a lazy one would leave the
        last records of a quiet period unsynced. ``0`` syncs every record (slow; for tests or strict setups).
    """

    def __init__(self, path: Path, key: bytes, fsync_interval: float = 1.0) -> None:
        self.path = Path(path)
        self.key = key
        self.fsync_interval = fsync_interval
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        # Held around each write so close() can never let a write hit a reused descriptor number.
        self._lock = threading.Lock()
        self._written = self._synced = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if fsync_interval > 0:
            self._thread = threading.Thread(target=self._sync_loop, name="finrec-audit-fsync", daemon=True)
            self._thread.start()

    def append(self, record: dict[str, Any], user_id: str | None) -> None:
        """Write one record for ``user_id`` (None for a prospect); the raw id is replaced by its pseudonym.

        A ``request_id`` is written as its keyed hash ``request`` (:func:`pseudonymise_request`). Raises
        ValueError if the log is closed or ``record`` has a ``user_id``/``customer_id`` key, TypeError if a
        value has no JSON form (numpy values do).
        """
        if "user_id" in record or "customer_id" in record:
            raise ValueError("audit records must not carry a raw customer id; pass it as user_id instead")
        rec = dict(record)
        if "ts" not in rec:
            now = time.time()
            rec["ts"] = round(now, 3)
            rec["time"] = datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        rec["customer"] = None if user_id is None else pseudonymise(user_id, self.key)
        if isinstance(rec.get("request_id"), str):  # never a join key with the event store's raw customer ids
            rec["request"] = pseudonymise_request(rec.pop("request_id"), self.key)
        line = _to_line(rec)
        with self._lock:
            if self._fd is None:
                raise ValueError(f"audit log {self.path} is closed")
            n = os.write(self._fd, line)
            if n < len(line):  # only on a full disk or a signal; readers skip the torn line
                os.write(self._fd, line[n:])
            self._written += 1
            if self.fsync_interval <= 0:
                _fsync(self._fd)

    def _sync_loop(self) -> None:
        # Not under the lock: appends go on during the fsync. close() joins this thread before closing the fd.
        while not self._stop.wait(self.fsync_interval):
            written = self._written
            if written != self._synced and self._fd is not None:
                try:
                    _fsync(self._fd)
                    self._synced = written
                except OSError:  # keep the thread alive: the disk may recover, and close() syncs again
                    log.exception("fsync of audit log %s failed", self.path)

    def find(self, user_id: str, limit: int = 100, since: float | None = None) -> list[dict[str, Any]]:
        """The last ``limit`` records of ``user_id`` (``ts >= since``), oldest first; see :func:`read_records`."""
        return read_records(self.path, self.key, user_id, limit, since).records

    def close(self) -> None:
        """Sync and close the file; later calls do nothing."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if self._fd is not None:
                _fsync(self._fd)
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
