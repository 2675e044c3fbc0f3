"""Helpers of the integration tests that run ``finrec serve`` as a subprocess (fixtures are in ``conftest.py``).

A :class:`Server` is started as an operator starts one (``python -m finrec serve``, uvicorn with uvloop and
httptools, JSON logs on stderr), in a session of its own so that it and its worker processes can be stopped as a
group. Only the ``FINREC_*`` variables a test passes reach it. Traffic goes to 127.0.0.1 only.

The Redis helpers use the server at 127.0.0.1:6379, database 15, under a fresh key prefix per test.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from finrec.config import FinrecSettings
from finrec.testing import REDIS_TEST_URL, TEST_API_KEY

#: The servers' ``serve.api_key``: the key named ``admin``, with every scope (recommend, events:trusted, ...).
API_KEY = TEST_API_KEY
ADMIN = {"X-API-Key": API_KEY}


def redis_store_url(prefix: str) -> str:
    """The URL of an event or online store under ``prefix`` in the test database."""
    return f"{REDIS_TEST_URL}?prefix={prefix}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_env(workspace: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without its ``FINREC_*`` variables, plus the test's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINREC_")}
    own = {"FINREC_SERVE__API_KEY": API_KEY, "FINREC_WORKSPACE": str(workspace), "COLUMNS": "200"}
    return env | own | dict(extra or {})


def clean_settings(workspace: Path, **values: Any) -> FinrecSettings:
    """Settings of ``values`` and the defaults alone: this process's ``FINREC_*`` variables are ignored."""
    saved = {k: os.environ.pop(k) for k in [k for k in os.environ if k.startswith("FINREC_")]}
    try:
        return FinrecSettings(workspace=workspace, **values)
    finally:
        os.environ.update(saved)


def metric(text: str, name: str, **labels: str) -> float:
    """Value of one sample of the Prometheus text (0 when absent)."""
    for labels_of, value in samples(text, name):
        if all(labels_of.get(k) == v for k, v in labels.items()):
            return value
    return 0.0


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample called ``name`` in the Prometheus text, as (labels, value)."""
    from prometheus_client.parser import text_string_to_metric_families

    return [(dict(s.labels), float(s.value)) for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name == name]  # fmt: skip


class Server:
    """``finrec serve`` in a subprocess; output goes to files (a full pipe would block the server).

    ``args`` are extra command-line options (``--workers 2``), ``env`` extra variables
    (``FINREC_SERVE__EVENT_STORE``), ``root_args`` options before the command (``--config FILE``). Without
    ``model_dir`` it serves the registry's champion (``FINREC_REGISTRY__ROOT``). ``proc.pid`` is the
    ``python -m finrec serve`` process itself: with one worker uvicorn serves in it, with several it is their
    supervisor.
    """

    def __init__(self, model_dir: Path | None, data: Path, workdir: Path, args: Sequence[str] = (),
                 env: Mapping[str, str] | None = None, root_args: Sequence[str] = ()) -> None:  # fmt: skip
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        self.stdout_path, self.stderr_path = workdir / "stdout.txt", workdir / "stderr.txt"
        self.workspace = workdir / "workspace"  # audit log, event store, clock: never in the repo
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "finrec", *root_args, "serve",
                 *(["--model-dir", str(model_dir)] if model_dir else []),
                 "--data", str(data), "--port", str(self.port), *args],
                stdout=out, stderr=err, env=server_env(self.workspace, env), cwd=workdir,
                start_new_session=True,  # its own process group: workers can be stopped with it
            )  # fmt: skip

    def output(self) -> str:
        return self.stdout_path.read_text() + self.stderr_path.read_text()

    def wait_ready(self, timeout: float = 180) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited early ({self.proc.returncode}): {self.output()}")
            try:
                r = httpx.get(f"{self.url}/ready", timeout=5)
                if r.status_code == 200:
                    return dict(r.json())
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server not ready within {timeout} s: {self.output()}")

    def wait_workers(self, n: int, timeout: float = 180) -> set[int]:
        """Pids of the workers once ``n`` have loaded the model (``finrec_model_info`` has a sample per pid)."""
        deadline = time.monotonic() + timeout
        pids: set[int] = set()
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited early ({self.proc.returncode}): {self.output()}")
            try:
                text = httpx.get(f"{self.url}/metrics", headers=ADMIN, timeout=5).text
                pids = {int(labels["pid"]) for labels, value in samples(text, "finrec_model_info")
                        if "pid" in labels and value == 1}  # fmt: skip
            except httpx.TransportError:
                pass
            if len(pids) >= n:
                return pids
            time.sleep(0.2)
        raise AssertionError(f"{len(pids)} of {n} workers ready within {timeout} s: {self.output()}")

    def interrupt(self, timeout: float = 30) -> int:
        """Ctrl-C, then wait; the exit code (the process is killed, and the test fails, if it hangs)."""
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_if_running()
            raise AssertionError(f"server did not stop within {timeout} s of SIGINT: {self.output()}") from None

    def kill_if_running(self) -> None:
        """SIGKILL the server and every process of its group (its workers) that is still there."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # the group is the server's own (start_new_session)
            self.proc.wait(timeout=10)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # orphaned workers of a server killed alone


#: The ``server_factory`` fixture: ``start(model_dir, data, *args, env=None, root_args=())``.
ServerFactory = Callable[..., Server]


