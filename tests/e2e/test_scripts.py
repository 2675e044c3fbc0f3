"""scripts/run_full_pipeline.sh and scripts/start_server.sh: the seed's documented entry points, as written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from live_server import free_port

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
TINY = {"FINREC_GENERATE__USERS": "400", "FINREC_GENERATE__PRODUCTS": "20", "FINREC_GENERATE__MONTHS": "2"}


def script_env(workspace: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINREC_")}
    return env | {"FINREC_WORKSPACE": str(workspace), "COLUMNS": "200"} | extra


def test_start_server_without_a_model_says_what_to_run_first(tmp_path: Path) -> None:
    res = subprocess.run(["bash", str(SCRIPTS / "start_server.sh")], env=script_env(tmp_path / "ws"),
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 2
    assert "no trained model" in res.stderr and "run_full_pipeline.sh" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_the_pipeline_script_then_the_server_script_serve_an_answer_and_swagger(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    res = subprocess.run(["bash", str(SCRIPTS / "run_full_pipeline.sh")], env=script_env(ws, **TINY),
                         capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    for made in ("data/manifest.json", "model/manifest.json", "report.json", "report.html"):
        assert (ws / made).is_file(), made
    assert "valid" in res.stdout and "trained" in res.stdout
    port = free_port()  # 8000 by default; an option of `finrec serve` passes through (8000 may be taken here)
    proc = subprocess.Popen(["bash", str(SCRIPTS / "start_server.sh"), "--port", str(port)], env=script_env(ws),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        key_file = ws / "secrets" / "dev-api-key"
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the server did not answer"
            try:
                key = key_file.read_text().strip()
                req = urllib.request.Request(f"http://127.0.0.1:{port}/recommend/1?k=3", headers={"X-API-Key": key})
                with urllib.request.urlopen(req, timeout=5) as r:
                    body = json.loads(r.read())
                break
            except (OSError, urllib.error.URLError):
                time.sleep(1)
        assert body["user_id"] == "1" and len(body["items"]) <= 3
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/docs", timeout=10) as r:
            assert b"swagger" in r.read().lower()
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.communicate(timeout=60)
