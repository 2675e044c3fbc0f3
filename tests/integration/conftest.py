"""Fixtures of the integration tests: live servers (see ``live_server.py``) and Redis key prefixes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from finrec.testing import drop_redis_keys, redis_unavailable
from live_server import Server, ServerFactory


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[ServerFactory]:
    """``start(model_dir, data, *args, env=None)``: a ``finrec serve`` subprocess, killed with its workers at the end.

    Each server gets its own folder (and so its own workspace) under the test's ``tmp_path``.
    """
    started: list[Server] = []

    def start(model_dir: Path, data: Path, *args: str, env: Mapping[str, str] | None = None,
              root_args: Sequence[str] = ()) -> Server:  # fmt: skip
        srv = Server(model_dir, data, tmp_path / f"server{len(started)}", args, env, root_args)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.kill_if_running()


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A fresh key prefix in Redis database 15 (its keys are deleted afterwards); skips when no Redis answers."""
    if reason := redis_unavailable():
        pytest.skip(reason)
    prefix = f"finrec-test-{uuid.uuid4().hex}"
    yield prefix
    drop_redis_keys(prefix)
