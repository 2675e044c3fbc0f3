"""`finrec scheduler` as an operator meets it: the help in order, bad settings, an unreachable webhook, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

from test_cli import assert_clean_failure, finrec


def test_help_lists_commands_in_the_order_a_user_meets_them() -> None:
    res = finrec("--help")
    assert res.returncode == 0
    order = ["generate", "validate", "train", "evaluate", "recommend", "serve", "monitor", "registry", "experiment",
             "retrain", "simulate", "scheduler"]  # fmt: skip
    listed = [line.split()[1] for line in res.stdout.splitlines() if line.startswith("│ ") and len(line.split()) > 2]
    assert [c for c in listed if c in order] == order, listed
    sub = finrec("scheduler", "run", "--help")
    assert sub.returncode == 0 and "75" in sub.stdout and "--if-due" in sub.stdout and "[schedule]" in sub.stdout


def test_bad_settings_unknown_jobs_and_an_unreachable_webhook_say_what_to_fix(tmp_path: Path) -> None:
    ws = {"FINREC_WORKSPACE": str(tmp_path / "ws")}
    assert_clean_failure(finrec("scheduler", "run", "tidy-up", env=ws), 2, "unknown job 'tidy-up'", "rollup")
    assert_clean_failure(finrec("scheduler", "history", env={**ws, "FINREC_SCHEDULE__DRIFT_CHECK_EVERY_HOURS": "-1"}),
                         2, "schedule.drift_check_every_hours", "greater than 0")  # fmt: skip
    down = {**ws, "FINREC_ALERTS__WEBHOOK_URL": "http://127.0.0.1:9/hook?token=s3cret",
            "FINREC_ALERTS__WEBHOOK_RETRIES": "1", "FINREC_ALERTS__WEBHOOK_BACKOFF_SECONDS": "0"}  # fmt: skip
    res = finrec("scheduler", "test-webhook", env=down)
    assert_clean_failure(res, 2, "did not take the test alert after 2 attempt(s)", "dead-letter.jsonl",
                         "check alerts.webhook_url")  # fmt: skip
    assert "s3cret" not in res.stdout + res.stderr  # the URL's token is never shown
    (kept,) = (tmp_path / "ws" / "monitoring" / "dead-letter.jsonl").read_text().splitlines()
    assert json.loads(kept)["alert"]["title"] == "finrec test alert"
    # nothing registered yet: the drift check has nothing to check (exit 0), retraining nothing to start from (2)
    skipped = finrec("scheduler", "run", "drift-check", env=ws)
    assert skipped.returncode == 0 and "skipped" in skipped.stdout and "no champion" in skipped.stdout
    assert_clean_failure(finrec("scheduler", "run", "retrain", env=ws), 2, "nothing to retrain from", "hint")
    history = finrec("scheduler", "history", "--json", env=ws)
    assert [json.loads(line)["outcome"] for line in history.stdout.splitlines()] == ["skipped", "failed"]
