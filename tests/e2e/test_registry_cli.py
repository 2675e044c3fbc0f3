"""`finrec registry` and `finrec retrain` as a user runs them: exit codes, messages, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli import assert_clean_failure, finrec

from finrec import pipeline
from finrec.config import FinrecSettings
from finrec.registry import ModelRegistry
from finrec.testing import TINY_TRAIN

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def weak_model(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "popularity"
    pipeline.train(tiny_world, out, FinrecSettings(train={**TINY_TRAIN, "model": "popularity"}), progress=False)
    return out


def test_register_gate_force_and_rollback_from_the_command_line(tiny_world: Path, tiny_model: Path,
                                                                 weak_model: Path, tmp_path: Path) -> None:  # fmt: skip
    env = {"FINREC_WORKSPACE": str(tmp_path / "ws"), "FINREC_TRAIN__EVAL_DAYS": "30",
           "FINREC_TRAIN__LABEL_DAYS": "30"}  # fmt: skip
    res = finrec("registry", "list", env=env)
    assert res.returncode == 0 and "holds no versions yet" in res.stdout
    assert finrec("registry", "register", str(tiny_model), "--alias", "champion", env=env).returncode == 0
    res = finrec("registry", "register", str(weak_model), "--data", str(tiny_world), "--no-progress", env=env)
    assert res.returncode == 0, res.stderr
    assert "v2:" in res.stdout and "v1:" in res.stdout  # both evaluated on the same window
    res = finrec("registry", "promote", env=env)
    assert_clean_failure(res, 3, "refused:", "worse than the champion v1", "--force")
    res = finrec("registry", "promote", "--force", "--reason", "drill", env=env)
    assert res.returncode == 0 and "v2" in res.stdout and "forced" in res.stdout, res.stdout + res.stderr
    res = finrec("registry", "rollback", "--reason", "bad answers", env=env)
    assert res.returncode == 0 and "v1 is the champion again" in res.stdout
    shown = json.loads(finrec("registry", "show", "champion", env=env).stdout)
    assert shown["version"] == "v1" and shown["manifest"]["config"]["settings"]["train"]["model"] == "two_stage"
    reg = ModelRegistry(tmp_path / "ws" / "registry")
    assert [h["action"] for h in reg.history()][-3:] == ["promotion_refused", "promote", "rollback"]
    res = finrec("registry", "history", env=env)
    assert res.returncode == 0 and "drill" in res.stdout and "bad answers" in res.stdout


def test_registry_mistakes_are_clear_errors(tiny_model: Path, tmp_path: Path) -> None:
    env = {"FINREC_WORKSPACE": str(tmp_path / "ws")}
    assert_clean_failure(finrec("registry", "promote", "v7", env=env), 2, "no version or alias 'v7'")
    assert_clean_failure(finrec("registry", "register", str(tmp_path / "nope"), env=env), 2, "is not a folder")
    assert_clean_failure(finrec("registry", "rollback", env=env), 2, "no champion to roll back")
    assert finrec("registry", "register", str(tiny_model), "--alias", "champion", env=env).returncode == 0
    assert_clean_failure(finrec("registry", "register", str(tiny_model), "--alias", "champion", env=env), 2,
                         "cannot become champion by registration")  # fmt: skip
    assert_clean_failure(finrec("registry", "alias", "champion", "v1", env=env), 2, "moves only by promotion")
    assert_clean_failure(finrec("registry", "rollback", env=env), 2, "nothing to roll back to")
    bad = {**env, "FINREC_REGISTRY__GATE_METRIC": "accuracy"}
    assert_clean_failure(finrec("registry", "list", env=bad), 2, "gate_metric")


def test_retrain_says_what_is_missing(tiny_model: Path, tmp_path: Path) -> None:
    env = {"FINREC_WORKSPACE": str(tmp_path / "ws")}
    assert_clean_failure(finrec("retrain", env=env), 2, "nothing to retrain from")
    assert_clean_failure(finrec("retrain", "--if-drift", env=env), 2, "needs a champion")
    assert finrec("registry", "register", str(tiny_model), "--alias", "champion", env=env).returncode == 0
    assert_clean_failure(finrec("retrain", env=env), 2, "no event store at")
