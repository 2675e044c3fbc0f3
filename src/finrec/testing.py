"""Small fixed worlds shared by the test suite and the docs' examples."""

from __future__ import annotations

from functools import cache

from finrec.data.synthetic.generate import WorldConfig

#: 6k customers, 60 products, 6 months: about a second to generate, rich enough for statistics.
SMALL_WORLD = WorldConfig(users=6_000, products=60, months=6, seed=11)

#: 2k customers, 40 products, 4 months: every stage trains (no fallback) in about 3 s, for the service's tests.
TINY_WORLD = WorldConfig(users=2_000, products=40, months=4, seed=3)

#: Training settings that keep :data:`TINY_WORLD`'s model quick to train (shorter windows, fewer epochs).
#: ``serve = "stack"``: the service tests exercise the whole path (candidates, ranker, reasons, live features).
TINY_TRAIN = {"max_epochs": 8, "eval_days": 30, "label_days": 30, "serve": "stack"}

#: The Redis database the test suites use (keys under a unique prefix per test, deleted afterwards).
REDIS_TEST_URL = "redis://127.0.0.1:6379/15"


@cache
def redis_unavailable() -> str | None:
    """Why tests of the Redis backends cannot run here, or None if a server answers at 127.0.0.1:6379."""
    try:
        import redis
    except ImportError:
        return "redis-py is not installed (pip install -e '.[redis]')"
    try:
        with redis.Redis.from_url(REDIS_TEST_URL, socket_connect_timeout=1, socket_timeout=2) as client:
            client.ping()
    except redis.RedisError as exc:
        return f"no Redis server answers at 127.0.0.1:6379 (start one with `redis-server`): {exc}"
    return None


def drop_redis_keys(prefix: str) -> None:
    """Delete every key under ``prefix:`` in the test database."""
    import redis

    with redis.Redis.from_url(REDIS_TEST_URL) as client:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)


#: An API key for the test suites (40 characters; as ``serve.api_key`` it is the ``admin`` key with every scope).
TEST_API_KEY = "finrec-test-key-0123456789abcdefghijklmn"
#: The header that sends :data:`TEST_API_KEY`.
TEST_HEADERS = {"X-API-Key": TEST_API_KEY}
