"""Settings: precedence, and clear errors for every way a setting can be wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from finrec.config import load_settings
from finrec.errors import ConfigError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in [k for k in __import__("os").environ if k.startswith("FINREC_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no stray ./finrec.toml


def test_defaults_are_complete_and_sane() -> None:
    s = load_settings()
    g = s.events.grades
    assert g["approve"] > g["apply"] > g["click"] > g["view"] > g["impression"]
    assert s.generate.users == 200_000 and s.generate.products == 300


def test_file_then_env_then_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        "[generate]\nusers = 111\nmonths = 3\n\n[events.grades]\n"
        + "".join(
            f"{t} = {i}\n"
            for i, t in enumerate(["impression", "view", "click", "apply", "decline", "approve", "hold", "close"])
        )
    )
    s = load_settings(cfg)
    assert (s.generate.users, s.generate.months, s.events.grades["close"]) == (111, 3, 7)
    monkeypatch.setenv("FINREC_GENERATE__USERS", "222")
    s = load_settings(cfg)
    assert (s.generate.users, s.generate.months) == (222, 3)  # env overrides one key, file keeps the rest
    assert load_settings(cfg, workspace=Path("/x")).workspace == Path("/x")


def test_finrec_config_variable_and_default_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "finrec.toml").write_text("workspace = 'from-default-file'\n")
    assert load_settings().workspace == Path("from-default-file")
    other = tmp_path / "other.toml"
    other.write_text("workspace = 'from-variable'\n")
    monkeypatch.setenv("FINREC_CONFIG", str(other))
    assert load_settings().workspace == Path("from-variable")


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[generate]\nuserz = 5\n", "generate.userz"),
        ("[generate]\nusers = 0\n", "generate.users"),
        ("[events.grades]\nclick = -1\n", "grades must be >= 0"),
        ("[events.grades]\nlike = 1\n", "unknown event types"),
        ("workspace = [\n", "not valid TOML"),
    ],
)
def test_bad_file_is_refused_naming_the_key(tmp_path: Path, toml: str, message: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load_settings(cfg)


def test_one_grade_overrides_only_that_grade(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINREC_EVENTS__GRADES__VIEW", "0")
    g = load_settings().events.grades
    assert g["view"] == 0 and g["approve"] == 4 and len(g) == 8


def test_missing_file_and_bad_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")
    monkeypatch.setenv("FINREC_GENERATE__USERS", "many")
    with pytest.raises(ConfigError, match="generate.users"):
        load_settings()
    monkeypatch.delenv("FINREC_GENERATE__USERS")
    monkeypatch.setenv("FINREC_GENERTE__USERS", "5")
    with pytest.raises(ConfigError, match="FINREC_GENERTE__USERS"):
        load_settings()
