"""Request ids that prove which answer, to whom and when: events can then be trusted to follow a real answer.

Every recommendation answer gets a ``request_id`` of the form ``<base>.<issued>.<tag>``: ``base`` is the
caller's ``X-Request-ID`` (when it is at most 64 characters) or a random id, ``issued`` the answer's time on the
service clock in whole seconds, and ``tag`` 24 hex characters of an HMAC-SHA256 over both and the customer's id,
with a key only the service holds (``serve.request_key_file``). A customer-side event (impression, view, click,
apply) must carry one: the service recomputes the tag with the event's ``user_id`` and accepts the event only if
it matches and the answer is younger than ``serve.request_id_max_age_days``. No state is kept, so every worker
and host that shares the key checks any answer's id, across restarts too.

>>> signer = RequestSigner(b"k" * 32)
>>> rid = signer.issue("abc", "42", 1_700_000_000.7)
>>> rid.startswith("abc.1700000000.")
True
>>> signer.check(rid, "42", now=1_700_000_100, max_age_seconds=3600) is None
True
>>> signer.check(rid, "43", now=1_700_000_100, max_age_seconds=3600)
'was not issued by this service for this customer'
"""

from __future__ import annotations

import hmac
import secrets

TAG_HEX = 24
MAX_BASE = 64


class RequestSigner:
    """Issues and checks signed request ids with one secret key (at least 32 bytes)."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key if key is not None else secrets.token_bytes(32)

    def _tag(self, base: str, issued: int, user_id: str | None) -> str:
        msg = f"{base}\x1f{issued}\x1f{user_id if user_id is not None else ''}".encode()
        return hmac.digest(self._key, msg, "sha256").hex()[:TAG_HEX]

    def issue(self, base: str | None, user_id: str | None, issued: float) -> str:
        """The request id of an answer to ``user_id`` (None: a prospect, whose id no customer's event can cite)."""
        if not base or len(base) > MAX_BASE:
            base = secrets.token_hex(16)
        t = int(issued)
        return f"{base}.{t}.{self._tag(base, t, user_id)}"

    def check(self, request_id: str, user_id: str, now: float, max_age_seconds: float) -> str | None:
        """None if ``request_id`` names an answer this service gave ``user_id`` recently enough, else what is wrong."""
        base, _, rest = request_id.rpartition(".")
        base, _, issued_text = base.rpartition(".")
        tag = rest
        if not base or not issued_text.isdigit() or len(tag) != TAG_HEX:
            return "is not a request_id this service issued (it gives them as <id>.<time>.<tag>)"
        issued = int(issued_text)
        if not hmac.compare_digest(tag, self._tag(base, issued, user_id)):
            return "was not issued by this service for this customer"
        age = now - issued
        if age > max_age_seconds:
            return (f"names an answer given {age / 86_400:.1f} days ago, older than the "
                    f"{max_age_seconds / 86_400:g} days accepted (serve.request_id_max_age_days)")  # fmt: skip
        if age < -3600:
            return "names an answer from the future: it was not issued by this service's clock"
        return None
