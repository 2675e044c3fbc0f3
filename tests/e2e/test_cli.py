"""The command line, run as a user runs it: exit codes, messages, never a traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from live_server import free_port


def finrec(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FINREC_")} | (env or {})
    full_env["COLUMNS"] = "200"  # wide console: messages are not wrapped mid-word
    return subprocess.run(
        [sys.executable, "-m", "finrec", *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=300
    )


def assert_clean_failure(res: subprocess.CompletedProcess[str], code: int, *fragments: str) -> None:
    assert res.returncode == code, res.stdout + res.stderr
    text = res.stdout + res.stderr
    assert "Traceback" not in text
    for f in fragments:
        assert f in text, text


def test_help_explains_every_command() -> None:
    res = finrec("--help")
    assert res.returncode == 0
    for cmd in ("generate", "validate", "demo", "config"):
        assert cmd in res.stdout
    for cmd, option in (
        ("generate", "--drift-month"),
        ("validate", "--json"),
        ("demo", "--workspace"),
        ("config", "show"),
    ):
        sub = finrec(cmd, "--help")
        assert sub.returncode == 0 and option in sub.stdout, sub.stdout


def test_generate_then_validate(tmp_path: Path) -> None:
    out = tmp_path / "w"
    res = finrec("generate", "--users", "300", "--products", "20", "--months", "2", "--seed", "5", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "valid" in res.stdout
    assert len(pd.read_parquet(out / "users.parquet")) == 300
    report = tmp_path / "report.json"
    res = finrec("validate", "--data", str(out), "--json", str(report))
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads(report.read_text())["problems"] is not None

    # Existing output is refused with a hint and left alone.
    assert_clean_failure(finrec("generate", "--users", "10", "--out", str(out)), 2, "--overwrite")
    assert len(pd.read_parquet(out / "users.parquet")) == 300


def test_generate_csv_and_invalid_parameters(tmp_path: Path) -> None:
    res = finrec(
        "generate",
        "--users",
        "50",
        "--products",
        "10",
        "--months",
        "1",
        "--format",
        "csv",
        "--out",
        str(tmp_path / "c"),
    )
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "c" / "events.csv").exists()
    assert_clean_failure(finrec("generate", "--start", "2099-01-01", "--out", str(tmp_path / "f")), 2, "in the future")
    assert_clean_failure(finrec("generate", "--products", "3", "--out", str(tmp_path / "f")), 2, "at least 10")
    assert not (tmp_path / "f").exists()


def test_validate_refuses_broken_data_with_the_report(tmp_path: Path) -> None:
    out = tmp_path / "w"
    assert finrec("generate", "--users", "100", "--products", "12", "--months", "1", "--out", str(out)).returncode == 0
    ev = pd.read_parquet(out / "events.parquet")
    ev["event_type"] = ev["event_type"].astype(str)
    ev.loc[ev.index[:3], "event_type"] = "like"
    ev.drop(columns=["timestamp"]).to_parquet(out / "events.parquet")
    res = finrec("validate", "--data", str(out))
    assert_clean_failure(res, 1, "missing_column", "timestamp", "unknown_event_type", "like")
    assert_clean_failure(finrec("validate", "--data", str(tmp_path / "absent")), 2, "absent")


def test_config_show_reflects_file_and_environment(tmp_path: Path) -> None:
    (tmp_path / "finrec.toml").write_text("[generate]\nmonths = 4\n")
    res = finrec("config", "show", env={"FINREC_GENERATE__USERS": "123"}, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "users = 123" in res.stdout and "months = 4" in res.stdout and "finrec.toml" in res.stdout
    res = finrec("config", "show", "--format", "json", cwd=tmp_path)
    assert json.loads(res.stdout)["generate"]["months"] == 4
    assert_clean_failure(finrec("config", "show", env={"FINREC_GENERATE__USERS": "lots"}), 2, "generate.users")
    assert_clean_failure(finrec("config", "show", env={"FINREC_NOPE": "1"}), 2, "FINREC_NOPE")
    assert_clean_failure(finrec("--config", str(tmp_path / "missing.toml"), "config", "show"), 2, "does not exist")


@pytest.mark.slow
def test_demo_runs_the_whole_job_and_serves_the_api(tmp_path: Path) -> None:
    port = free_port()
    env = {"FINREC_GENERATE__USERS": "400", "FINREC_GENERATE__PRODUCTS": "20", "FINREC_GENERATE__MONTHS": "2",
           "FINREC_SERVE__PORT": str(port)}  # fmt: skip
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FINREC_")} | env | {"COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "finrec", "demo", "--workspace", str(tmp_path / "ws")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env)  # fmt: skip
    key_file = tmp_path / "ws" / "secrets" / "dev-api-key"  # the development key the demo prints
    try:
        body = _wait_for_json(f"http://127.0.0.1:{port}/recommend/1?k=3", proc, timeout=600, key_file=key_file)
        assert body["user_id"] == "1" and len(body["items"]) <= 3
        assert oct(key_file.stat().st_mode & 0o777) == "0o600" and len(key_file.read_text().strip()) >= 32
        # Without the key: 401.
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/recommend/1?k=3", timeout=10)
        assert refused.value.code == 401
        # 20 products and some opted out of marketing: not everyone gets an answer, most customers do.
        answers = [_wait_for_json(f"http://127.0.0.1:{port}/recommend/{u}?k=3", proc, 10, key_file)
                   for u in range(1, 21)]
        assert sum(1 <= len(a["items"]) <= 3 for a in answers) >= 10, answers
        assert all(item["reasons"] for a in answers for item in a["items"])
        # a popularity model answered first; the two-stage model trains beside the API, takes over without a
        # restart, and is then evaluated
        deadline = time.monotonic() + 600
        while not (tmp_path / "ws" / "report.html").is_file():
            assert time.monotonic() < deadline and proc.poll() is None, "the evaluation beside the API wrote no report"
            time.sleep(1)
        two_stage = json.loads((tmp_path / "ws" / "model" / "manifest.json").read_text())["metrics"]["model_version"]
        served = _wait_for_json(f"http://127.0.0.1:{port}/recommend/1?k=3", proc, 10, key_file)["model_version"]
        assert served == two_stage
    finally:
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stdout + stderr
    assert "valid" in stdout and "trained" in stdout and "Traceback" not in stdout + stderr
    assert "development key" in stdout and key_file.read_text().strip() in stdout  # printed, clearly
    assert (tmp_path / "ws" / "report.html").is_file() and (tmp_path / "ws" / "model" / "manifest.json").is_file()
    assert "two-stage model trained" in stdout and "offline evaluation started beside the API" in stdout
    assert (tmp_path / "ws" / "audit" / "audit.jsonl").is_file()  # the answer above was audited
    again = finrec("demo", "--workspace", str(tmp_path / "ws"), "--no-serve", env=env)
    assert again.returncode == 0 and "reusing" in again.stdout


def _wait_for_json(url: str, proc: subprocess.Popen[str], timeout: float, key_file: Path) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"demo exited early ({proc.returncode}): {proc.communicate()}")
        if not key_file.is_file():
            time.sleep(1)
            continue
        request = urllib.request.Request(url, headers={"X-API-Key": key_file.read_text().strip()})
        try:
            with urllib.request.urlopen(request, timeout=5) as r:
                return dict(json.loads(r.read()))
        except (urllib.error.URLError, ConnectionError):
            time.sleep(1)
    raise AssertionError(f"{url} did not answer within {timeout} s")


def test_serve_refuses_short_keys_an_open_address_without_keys_and_no_auth_off_loopback(tmp_path: Path) -> None:
    ws = {"FINREC_WORKSPACE": str(tmp_path / "ws")}
    assert_clean_failure(finrec("serve", env={**ws, "FINREC_SERVE__API_KEY": "short"}), 2, "at least 32 characters")
    assert_clean_failure(finrec("serve", "--host", "0.0.0.0", env=ws), 2, "no API keys are configured")
    res = finrec("serve", "--no-auth", "--host", "0.0.0.0", env=ws)
    assert_clean_failure(res, 2, "--no-auth is refused on 0.0.0.0", "authentication is OFF")
    key = tmp_path / "key.toml"
    key.write_text('[serve]\napi_key = "' + "k" * 40 + '"\n')
    assert_clean_failure(finrec("--config", str(key), "serve", env=ws), 2, "keys never belong in a settings file")


def test_keygen_prints_a_key_and_its_hash(tmp_path: Path) -> None:
    import hashlib

    res = finrec("keygen", "--name", "web", "-s", "recommend", "-s", "events")
    assert res.returncode == 0, res.stderr
    key = res.stdout.split("\n")[1].strip()
    assert len(key) >= 32 and hashlib.sha256(key.encode()).hexdigest() in res.stdout
    (tmp_path / "finrec.toml").write_text(res.stdout[res.stdout.index("[[auth.keys]]"):])
    shown = finrec("config", "show", "--format", "json", cwd=tmp_path)
    assert json.loads(shown.stdout)["auth"]["keys"][0]["scopes"] == ["recommend", "events"], shown.stderr
    assert_clean_failure(finrec("keygen", "-s", "everything"), 2, "unknown scope")


def test_engine_flags_refuse_bad_requests_before_any_work(tmp_path: Path) -> None:
    # An unknown engine, and a Spark batch request that cannot run, are refused before validation or Spark starts.
    m, d, u = str(tmp_path / "m"), str(tmp_path / "d"), str(tmp_path / "u.txt")
    assert_clean_failure(finrec("recommend", "--engine", "flink", "-m", m, "-d", d, "-u", u, "-o", "r.csv"), 2,
                         "unknown --engine 'flink'", "duckdb, spark")  # fmt: skip
    assert_clean_failure(finrec("recommend", "--engine", "spark", "-k", "0", "-m", m, "-d", d, "-u", u, "-o", "r.csv"),
                         2, "--k 0 is out of range")  # fmt: skip
    assert_clean_failure(finrec("recommend", "--engine", "spark", "-m", m, "-d", d, "-u", u, "-o", "r.json"), 2,
                         "must end in .csv or .parquet")  # fmt: skip
    assert_clean_failure(finrec("features", "-d", d, "-o", str(tmp_path / "f"), "--cutoff", "someday"), 2,
                         "--cutoff 'someday' is not a time")  # fmt: skip
    assert not (tmp_path / "f").exists()


def test_spark_launcher_for_the_two_tower_needs_the_spark_engine(tmp_path: Path) -> None:
    env = {"FINREC_TRAIN__TWO_TOWER_WORKERS": "2", "FINREC_TRAIN__TWO_TOWER_LAUNCHER": "spark"}
    res = finrec("train", "-d", str(tmp_path / "data"), "-m", str(tmp_path / "model"), env=env)
    assert_clean_failure(res, 2, "two_tower_launcher", "--engine spark")
    assert not (tmp_path / "model").exists()
