"""Who may call what: named API keys with scopes, checked on every request, and a rate limit per key.

A caller sends its key in the ``X-API-Key`` header. The service keeps only SHA-256 hashes of the keys: from the
settings (``[[auth.keys]]`` with ``sha256``) or computed at start-up from a key read from an environment variable
or a file, so no key ever sits in a settings file. A key is at least :data:`MIN_KEY_LENGTH` characters; a shorter
or empty one stops the service at start-up. Each key has a name (logged, and recorded by admin actions) and
scopes:

* ``recommend``: ``GET /recommend/{user_id}``, ``POST /recommend``;
* ``recommend:explain``: the same answers with what the guardrails removed (``excluded``) and the rule-based
  reasons, which reveal facts about the customer (credit, income, age, consent);
* ``events``: customer-side events (impression, view, click, apply) naming an answer's ``request_id``;
* ``events:trusted``: every event, ownership events (approve, decline, hold, close) included: the bank's core
  systems;
* ``monitor``: ``/dashboard``, ``/dashboard.json``, ``/metrics``;
* ``admin``: ``/admin/*``.

Examples
--------
>>> table = KeyTable([Principal("web", frozenset({"recommend"}), hash_key("k" * 32))])
>>> table.authenticate("k" * 32).name, table.authenticate("wrong")
('web', None)
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from finrec.config import SCOPES, FinrecSettings
from finrec.errors import ConfigError

log = logging.getLogger("finrec.serving")

MIN_KEY_LENGTH = 32
ALL_SCOPES = frozenset(SCOPES)
#: The name recorded for callers of a service started with ``--no-auth``.
NO_AUTH_NAME = "no-auth"


def hash_key(key: str) -> str:
    """SHA-256 of a key, as hex: what the settings hold instead of the key."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A random key of 43 URL-safe characters (256 bits)."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the key's name and scopes (``key_hash`` is the SHA-256 of the key)."""

    name: str
    scopes: frozenset[str]
    key_hash: str = ""
    rate_per_second: float | None = None
    burst: int = 200

    def may(self, scope: str) -> bool:
        return scope in self.scopes


class RateLimiter:
    """A token bucket per key name, in this process: ``rate`` requests per second, ``burst`` at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, last refill, monotonic)

    def take(self, who: Principal) -> float:
        """0 if the request may go ahead, else the seconds until it may."""
        if who.rate_per_second is None:
            return 0.0
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(who.name, (float(who.burst), now))
            tokens = min(float(who.burst), tokens + (now - last) * who.rate_per_second)
            if tokens >= 1:
                self._buckets[who.name] = (tokens - 1, now)
                return 0.0
            self._buckets[who.name] = (tokens, now)
            return (1 - tokens) / who.rate_per_second


class KeyTable:
    """The keys a service accepts, by hash. ``disabled``: every caller is :data:`NO_AUTH_NAME` with every scope."""

    def __init__(self, principals: Iterable[Principal], disabled: bool = False) -> None:
        self.principals = list(principals)
        self.disabled = disabled
        self.limiter = RateLimiter()

    @classmethod
    def from_settings(cls, settings: FinrecSettings, environ: Mapping[str, str] | None = None) -> KeyTable:
        """The keys of ``settings`` (``[[auth.keys]]``, and ``serve.api_key`` as ``admin`` with every scope).

        Raises
        ------
        ConfigError
            A key is empty or shorter than 32 characters, its variable is unset, its file is missing or readable
            by other users, or two keys are the same.
        """
        environ = os.environ if environ is None else environ
        if settings.auth.disabled:
            return cls([], disabled=True)
        out: list[Principal] = []
        if settings.serve.api_key is not None:
            key = settings.serve.api_key.get_secret_value()
            _check_length(key, "serve.api_key (FINREC_SERVE__API_KEY)")
            out.append(Principal("admin", ALL_SCOPES, hash_key(key)))
        for k in settings.auth.keys:
            if k.sha256 is not None:
                digest = k.sha256
            elif k.env is not None:
                if k.env not in environ:
                    raise ConfigError(f"API key {k.name!r}: the environment variable {k.env} is not set",
                                      hint=f"set {k.env} to the key (at least {MIN_KEY_LENGTH} characters), "
                                      "or give the key's sha256 in the settings instead")  # fmt: skip
                key = environ[k.env].strip()
                _check_length(key, f"API key {k.name!r} (variable {k.env})")
                digest = hash_key(key)
            else:
                assert k.file is not None
                key = read_secret_file(k.file, f"API key {k.name!r}")
                _check_length(key, f"API key {k.name!r} (file {k.file})")
                digest = hash_key(key)
            out.append(Principal(k.name, frozenset(k.scopes), digest, k.rate_per_second, k.burst))
        hashes = [p.key_hash for p in out]
        if len(set(hashes)) != len(hashes):
            raise ConfigError("two API keys are the same key", hint="give every caller a key of its own")
        names = [p.name for p in out]
        if len(set(names)) != len(names):
            raise ConfigError(f"API key names must be unique (got {names}; serve.api_key is named 'admin')",
                              hint="rename the [[auth.keys]] entry called 'admin'")  # fmt: skip
        return cls(out)

    def authenticate(self, presented: str | None) -> Principal | None:
        """The caller owning ``presented``, or None. Compares hashes in constant time, against every key."""
        if self.disabled:
            return Principal(NO_AUTH_NAME, ALL_SCOPES)
        if not presented:
            return None
        digest = hash_key(presented)
        found = None
        for p in self.principals:
            if hmac.compare_digest(digest, p.key_hash):
                found = p
        return found

    def __len__(self) -> int:
        return len(self.principals)


def _check_length(key: str, what: str) -> None:
    if len(key) < MIN_KEY_LENGTH:
        raise ConfigError(
            f"{what} is {'empty' if not key else f'{len(key)} characters long'}: a key must have at least "
            f"{MIN_KEY_LENGTH} characters",
            hint="make one with `finrec keygen` (a random key and its sha256)",
        )


def read_secret_file(path: Path, what: str) -> str:
    """The first line of a secret file, refused when other users may read or write it."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}",
                          hint="check the path and that the service's user may read it") from None  # fmt: skip
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        raise ConfigError(f"{what}: {path} may be read or changed by every user (mode {stat.S_IMODE(mode):04o})",
                          hint=f"chmod 600 {path}")  # fmt: skip
    return text.splitlines()[0].strip() if text else ""


def ensure_dev_key(path: Path) -> str:
    """The development key kept at ``path`` (made with mode 0600 when missing)."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, new_key().encode() + b"\n")
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # several starts at once: the first key wins
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return read_secret_file(path, "the development key")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address to listen on) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
