"""Fixtures of the integration tests: live servers (see ``live_server.py``), Redis key prefixes, the drifting world."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from finrec import pipeline
from finrec.data.synthetic.generate import WorldConfig, generate_world
from finrec.testing import drop_redis_keys, redis_unavailable
from live_server import Server, ServerFactory, clean_settings

#: 6 months of data; from month 7 (right after the data) demand shifts from deposits to loans.
DRIFTING_WORLD = WorldConfig(users=6_000, products=60, months=6, seed=11, drift_month=7, drift_strength=4.0)


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


@pytest.fixture(scope="session")
def drifting_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:data:`DRIFTING_WORLD` in Parquet, made once for the closed-loop and scheduler tests."""
    out = tmp_path_factory.mktemp("worlds") / "drifting"
    generate_world(DRIFTING_WORLD, out, progress=False)
    return out


@pytest.fixture(scope="session")
def drifting_champion(drifting_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The two-stage model on the default settings trained on ``drifting_world`` before its drift: the champion
    whose drift the closed-loop and scheduler tests detect. Registering it copies it, so tests share it."""
    root = tmp_path_factory.mktemp("drifting-champion")
    pipeline.train(drifting_world, root / "m1", clean_settings(root / "ws"), progress=False)
    return root / "m1"
