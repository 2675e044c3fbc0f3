"""The two-stage model end to end: train, recommend and evaluate through the pipeline and the command line.

The heavy tests train once on the session's ``small_world`` (6k customers, 60 products, 6 months) and are
marked slow. Unmarked tests use a tiny dataset with only the required columns, invalid data, or arguments
that are refused before any work starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import finrec.twostage.train as train_module
from finrec import pipeline
from finrec.config import FinrecSettings
from finrec.data.dataset import ETYPE, Dataset, load_dataset
from finrec.errors import DataValidationError, FinrecError
from finrec.features.builder import FeatureBuilder
from finrec.rules.eligibility import ProductRules, SuitabilityPolicy
from finrec.twostage.model import TwoStageModel
from finrec.twostage.train import allowed_mask, rules_for

DAY = 86_400
METRICS_WITH_INTERVALS = ("ndcg@10", "map@10", "mrr", "hit_rate@10")
ALL_MODELS = ("random", "popularity", "popularity_eligible", "two_tower", "two_stage", "oracle")
# Stage name in the manifest -> how its fallback message starts.
FALLBACK_PREFIX = {"retrieval": "retrieval", "ranking": "ranker", "approval_odds": "approval odds"}


def settings() -> FinrecSettings:
    return FinrecSettings(evaluate={"bootstrap": 200})


# --------------------------------------------------------------------------- helpers


def write_minimal(path: Path, n_users: int = 300, n_products: int = 40, n_events: int = 900, days: int = 90) -> Path:
    """Only the required columns, string ids; customers engage mostly with one of four product groups."""
    rng = np.random.default_rng(0)
    path.mkdir(parents=True)
    users = np.array([f"C-{i}" for i in range(1, n_users + 1)])
    products = np.array([f"P-{i}" for i in range(1, n_products + 1)])
    pd.DataFrame({"user_id": users}).to_csv(path / "users.csv", index=False)
    pd.DataFrame({"product_id": products}).to_csv(path / "products.csv", index=False)
    taste = rng.integers(0, 4, n_users)
    u = rng.integers(0, n_users, n_events)
    group = np.where(rng.random(n_events) < 0.8, taste[u], rng.integers(0, 4, n_events))
    p = group * (n_products // 4) + rng.integers(0, n_products // 4, n_events)
    etype = rng.choice(["impression", "view", "click", "apply"], n_events, p=[0.5, 0.2, 0.2, 0.1])
    ts = pd.Timestamp("2024-01-01", tz="UTC") + pd.to_timedelta(np.sort(rng.uniform(0, days * DAY, n_events)), "s")
    pd.DataFrame(
        {
            "user_id": users[u],
            "product_id": products[p],
            "event_type": etype,
            "timestamp": ts.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
    ).to_csv(path / "events.csv", index=False)
    return path


def write_users(path: Path, ids: list[str], header: bool = True) -> Path:
    lines = (["user_id"] if header else []) + [""] + [ids[0], ""] + ids[1:] + ["", ""]
    path.write_text("\n".join(lines) + "\n")
    return path


def held_at_end(ds: Dataset) -> set[tuple[int, int]]:
    """(user row, product row) held after the last event: last ownership event per pair is not a close."""
    ev = ds.events
    own = np.isin(ev.etype, [ETYPE["approve"], ETYPE["hold"], ETYPE["close"]])
    last = pd.DataFrame({"u": ev.user[own], "p": ev.product[own], "e": ev.etype[own]}).groupby(["u", "p"])["e"].last()
    held = last[last != ETYPE["close"]]
    return set(held.index.tolist())


def engaged_pairs(ds: Dataset) -> set[tuple[int, int]]:
    """Pairs with any interaction beyond being shown (view, click, apply, approve, decline, hold)."""
    ev = ds.events
    m = ~np.isin(ev.etype, [ETYPE["impression"], ETYPE["close"]])
    return set(zip(ev.user[m].tolist(), ev.product[m].tolist(), strict=True))


def needs_no_profile(ds: Dataset, s: FinrecSettings, at: int) -> np.ndarray:
    """Per product: eligible for a customer we know nothing about (no rule that needs a customer attribute)."""
    P = ds.products
    ok = np.ones(ds.n_products, dtype=bool)
    for c in ("min_credit_score", "min_income", "min_age", "max_age"):
        if c in P.columns:
            ok &= P[c].isna().to_numpy()
    if "regions" in P.columns:
        ok &= P["regions"].isna().to_numpy() | (P["regions"].astype(str).str.strip() == "*").to_numpy()
    if "risk_level" in P.columns:
        cats = s.rules.suitability_categories
        applies = P["category"].isin(cats).to_numpy() if cats is not None else np.ones(ds.n_products, bool)
        ok &= ~(applies & P["risk_level"].notna().to_numpy())
    if "launch_date" in P.columns:
        ok &= ~(P["launch_date"].to_numpy(np.float64) > at)
    return ok


def read_output(path: Path) -> pd.DataFrame:
    return pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)


def check_frame_shape(out: pd.DataFrame, k: int) -> None:
    assert list(out.columns) == ["user_id", "rank", "product_id", "score"]
    assert len(out) > 0
    for _, g in out.groupby(out["user_id"].astype(str), sort=False):
        assert g["rank"].tolist() == list(range(1, len(g) + 1))
        assert len(g) <= k
        assert g["product_id"].is_unique
        assert (np.diff(g["score"].to_numpy()) <= 1e-12).all(), "scores must not increase down the ranking"


def check_fallbacks_reported(manifest: dict[str, Any]) -> None:
    stages, fallbacks = manifest["metrics"]["stages"], manifest["metrics"]["fallbacks"]
    assert set(stages) == set(FALLBACK_PREFIX)
    for stage, kind in stages.items():
        fell_back = "fallback" in kind or "not used" in kind
        reported = any(f.startswith(FALLBACK_PREFIX[stage]) for f in fallbacks)
        if fell_back:
            assert reported, f"{stage} fell back ({kind}) but the manifest does not say why: {fallbacks}"
        elif stage != "approval_odds":  # the approval model may report a degraded fit while still in use
            assert not reported, f"{stage} is {kind} but a fallback is reported: {fallbacks}"


def finrec(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINREC_")}
    env["COLUMNS"] = "200"
    return subprocess.run(
        [sys.executable, "-m", "finrec", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )


def assert_clean(res: subprocess.CompletedProcess[str], code: int, *fragments: str) -> str:
    text = res.stdout + res.stderr
    assert res.returncode == code, text
    assert "Traceback" not in text, text
    for f in fragments:
        assert f in text, text
    return text


# --------------------------------------------------------------------------- trained on the small world


@pytest.fixture(scope="module")
def trained(small_world: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Train once through pipeline.train, keeping the in-memory model the pipeline saved."""
    captured: dict[str, Any] = {}
    original = train_module.train_two_stage

    def capture(*args: Any, **kwargs: Any):
        model, report = original(*args, **kwargs)
        captured["model"], captured["report"] = model, report
        return model, report

    model_dir = tmp_path_factory.mktemp("model") / "bundle"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "train_two_stage", capture)
        manifest = pipeline.train(small_world, model_dir, settings(), progress=False)
    assert "model" in captured, "pipeline.train no longer trains through finrec.twostage.train.train_two_stage"
    return {"dir": model_dir, "manifest": manifest, **captured}


@pytest.fixture(scope="module")
def small_ds(small_world: Path) -> Dataset:
    return load_dataset(small_world)


@pytest.fixture(scope="module")
def evaluation(trained: dict[str, Any], small_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "report.json"
    pipeline.evaluate(trained["dir"], small_world, out, settings(), progress=False)
    return out


@pytest.mark.slow
def test_train_writes_a_complete_manifest(trained: dict[str, Any], small_ds: Dataset) -> None:
    manifest, model_dir = trained["manifest"], trained["dir"]
    assert json.loads(json.dumps(manifest, default=str)) == json.loads((model_dir / "manifest.json").read_text())
    assert manifest["kind"] == "model"
    assert manifest["inputs"]["data_fingerprint"] == small_ds.fingerprint
    assert manifest["inputs"]["users"] == small_ds.n_users and manifest["inputs"]["products"] == small_ds.n_products
    m = manifest["metrics"]
    assert m["model_version"].endswith(small_ds.fingerprint[:8])
    assert m["stages"] == trained["model"].stages()
    # The small world has enough signal for every stage: no fallback.
    assert m["stages"]["ranking"] == "lightgbm_lambdarank" and m["stages"]["approval_odds"] == "lightgbm+isotonic"
    assert m["stages"]["retrieval"].startswith("two_tower + popularity")
    assert {"ease", "transitions"} <= set(m["stages"]["retrieval"].split(" + "))
    assert m["fallbacks"] == []
    assert {"retrieval", "approval", "ranker", "sources"} <= set(m["training"])
    # The selection guard's table: popularity, each source, the two-tower and the stack on held-out customers,
    # and what serves is never worse than popularity there.
    v = m["validation"]
    assert {"popularity", "two_tower", "stack", "ease"} <= set(v["table"])
    assert m["serves"] == v["serves"] and m["serves"] in v["table"]
    assert v["table"][m["serves"]]["ndcg@10"] >= v["table"]["popularity"]["ndcg@10"]
    assert manifest["config"]["split"]["eval_cutoff"] < manifest["config"]["split"]["end"]
    # Every file is listed with its checksum, and nothing is left outside the bundle.
    for rel, info in manifest["files"].items():
        data = (model_dir / rel).read_bytes()
        assert len(data) == info["bytes"] and hashlib.sha256(data).hexdigest() == info["sha256"], rel
    assert not [p for p in model_dir.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_saved_bundle_recommends_exactly_like_the_in_memory_model(trained: dict[str, Any], small_ds: Dataset) -> None:
    s = settings()
    memory, loaded = trained["model"], TwoStageModel.load(trained["dir"])
    assert loaded.stages() == memory.stages()
    fb = FeatureBuilder(small_ds, s.protected_attributes)
    cutoff = small_ds.time_range[1] + 1
    snap = fb.snapshot(cutoff)
    history = fb.history(cutoff, memory.config.history_length)
    users = np.arange(0, small_ds.n_users, 7)
    allowed = allowed_mask(rules_for(small_ds, s), snap, users, small_ds.n_products)
    a = memory.recommend(fb, snap, users, allowed, 10, history)
    b = loaded.recommend(fb, snap, users, allowed, 10, history)
    assert (a.items >= 0).any(axis=1).all()
    assert np.array_equal(a.items, b.items)
    assert np.array_equal(a.candidates, b.candidates)
    assert np.array_equal(a.scores, b.scores, equal_nan=True)
    assert np.array_equal(a.approval, b.approval, equal_nan=True)
    # Recommendations respect the mask they were given.
    rows = np.repeat(np.arange(len(users)), a.items.shape[1])
    items = a.items.ravel()
    assert allowed[rows[items >= 0], items[items >= 0]].all()


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_recommend_output_respects_rules_and_holdings(
    trained: dict[str, Any], small_world: Path, small_ds: Dataset, tmp_path: Path, suffix: str
) -> None:
    s = settings()
    known = small_ds.users["user_id"].iloc[::40].astype(str).tolist()
    ids = [*known, "no-such-customer", known[0]]  # an unknown id and a repeat
    out = tmp_path / f"recs{suffix}"
    k = 5
    res = pipeline.recommend(trained["dir"], small_world, write_users(tmp_path / "u.txt", ids), k, out, s,
                             progress=False)  # fmt: skip
    assert res["users"] == len(known) + 1 and res["unknown_users"] == 1
    frame = read_output(out)
    assert res["rows"] == len(frame)
    check_frame_shape(frame, k)
    frame["user_id"] = frame["user_id"].astype(str)
    frame["product_id"] = frame["product_id"].astype(str)
    assert set(frame["user_id"]) - {"no-such-customer"} == set(known)
    counts = frame.groupby("user_id").size()
    assert (counts[known] == k).mean() > 0.9  # almost everyone has at least k allowed products

    # Rules and holdings, checked against the data independently of the pipeline's own masks.
    cutoff = small_ds.time_range[1] + 1
    r = s.rules
    rules = ProductRules.from_frames(
        small_ds.users,
        small_ds.products,
        SuitabilityPolicy(tuple(r.suitability_categories), r.max_risk_above_tolerance),
    )
    urow = small_ds.user_rows(frame["user_id"].to_numpy())
    prow = small_ds.product_rows(frame["product_id"].to_numpy())
    assert (prow >= 0).all()
    is_known = urow >= 0
    ok = rules.allowed(urow[is_known], at=cutoff)[np.arange(is_known.sum()), prow[is_known]]
    assert ok.all(), frame[is_known][~ok]
    held = held_at_end(small_ds)
    assert len(held) > 1000
    recommended_held = [(u, p) for u, p in zip(urow[is_known], prow[is_known], strict=True) if (u, p) in held]
    assert not recommended_held

    # The unknown customer is not an error: they get the products that need no profile (possibly none: in the
    # synthetic worlds nearly every product has an age or credit rule), at most k.
    cold = frame[~is_known]
    cold_ok = needs_no_profile(small_ds, s, cutoff)
    assert len(cold) == min(k, int(cold_ok.sum()))
    assert cold_ok[prow[~is_known]].all()


@pytest.mark.slow
def test_recommend_exclude_interacted_and_file_formats(
    trained: dict[str, Any], small_world: Path, small_ds: Dataset, tmp_path: Path
) -> None:
    s = settings()
    known = small_ds.users["user_id"].iloc[5::25].astype(str).tolist()
    users_file = write_users(tmp_path / "u.txt", known)
    out = tmp_path / "interacted.csv"
    pipeline.recommend(trained["dir"], small_world, users_file, 10, out, s, exclude="interacted", progress=False)
    frame = read_output(out)
    check_frame_shape(frame, 10)
    urow = small_ds.user_rows(frame["user_id"].astype(str).to_numpy())
    prow = small_ds.product_rows(frame["product_id"].astype(str).to_numpy())
    engaged = engaged_pairs(small_ds)
    clash = [(u, p) for u, p in zip(urow, prow, strict=True) if (u, p) in engaged]
    assert not clash, clash[:5]
    # exclude="none" may recommend what they hold; "held" never does (checked above); an unknown mode is refused.
    pipeline.recommend(trained["dir"], small_world, users_file, 10, tmp_path / "none.csv", s, exclude="none",
                       progress=False)  # fmt: skip
    assert len(read_output(tmp_path / "none.csv")) >= len(frame)
    with pytest.raises(FinrecError, match="exclude"):
        pipeline.recommend(trained["dir"], small_world, users_file, 10, tmp_path / "x.csv", s, exclude="all")
    # Header-less files work too; a missing file and an empty file are clear errors.
    write_users(tmp_path / "plain.txt", known[:3], header=False)
    pipeline.recommend(trained["dir"], small_world, tmp_path / "plain.txt", 3, tmp_path / "p.csv", s, progress=False)
    assert sorted(read_output(tmp_path / "p.csv")["user_id"].astype(str).unique()) == sorted(known[:3])
    with pytest.raises(FinrecError, match="does not exist"):
        pipeline.recommend(trained["dir"], small_world, tmp_path / "absent.txt", 3, tmp_path / "q.csv", s)
    (tmp_path / "empty.txt").write_text("user_id\n\n")
    with pytest.raises(FinrecError):
        pipeline.recommend(trained["dir"], small_world, tmp_path / "empty.txt", 3, tmp_path / "q.csv", s)
    for bad_k in (0, -1, 1001):
        with pytest.raises(FinrecError, match="--k"):
            pipeline.recommend(trained["dir"], small_world, users_file, bad_k, tmp_path / "q.csv", s)
    with pytest.raises(FinrecError, match="csv or .parquet"):
        pipeline.recommend(trained["dir"], small_world, users_file, 3, tmp_path / "q.json", s)
    assert not (tmp_path / "q.csv").exists()


@pytest.mark.slow
def test_evaluate_writes_report_and_html(evaluation: Path, small_ds: Dataset) -> None:
    report = json.loads(evaluation.read_text())
    assert tuple(report["models"]) == ALL_MODELS
    for name, metrics in report["models"].items():
        for metric in METRICS_WITH_INTERVALS:
            v = metrics[metric]
            assert v["low"] <= v["mean"] <= v["high"], (name, metric, v)
            assert v["low"] >= 0 and v["high"] <= 1
        # Catalogue coverage is one number for the whole catalogue, not a per-customer mean: no interval.
        assert 0 < metrics["coverage@10"]["mean"] <= 1
        assert "true_conversion@10" in metrics
    assert report["dataset"]["fingerprint"] == small_ds.fingerprint
    assert report["split"]["evaluated_users"] > 500
    assert report["model"]["fallbacks"] == []
    assert any("held-out window" in n for n in report["notes"])
    html = evaluation.with_suffix(".html")
    assert html.is_file()
    text = html.read_text()
    assert "<img" in text and "two_stage" in text


@pytest.mark.slow
def test_evaluation_ranks_models_in_the_expected_order(evaluation: Path) -> None:
    models = json.loads(evaluation.read_text())["models"]
    tc = {m: models[m]["true_conversion@10"]["mean"] for m in models}
    assert tc["oracle"] > tc["two_stage"] > tc["random"], tc
    nd = {m: models[m]["ndcg@10"]["mean"] for m in models}
    assert nd["two_stage"] > nd["random"] and nd["oracle"] > nd["random"], nd


@pytest.mark.slow
def test_two_tower_beats_popularity(trained: dict[str, Any], evaluation: Path) -> None:
    models = json.loads(evaluation.read_text())["models"]
    retrieval = trained["manifest"]["metrics"]["training"]["retrieval"]
    assert retrieval["best_epoch"] > 1, retrieval
    assert models["two_tower"]["ndcg@10"]["mean"] > models["popularity"]["ndcg@10"]["mean"]


# --------------------------------------------------------------------------- required columns only


def test_minimal_dataset_trains_recommends_and_evaluates(tmp_path: Path) -> None:
    data = write_minimal(tmp_path / "data")
    model_dir = tmp_path / "model"
    s = settings()
    manifest = pipeline.train(data, model_dir, s, progress=False)
    assert manifest["kind"] == "model"
    check_fallbacks_reported(manifest)
    assert manifest["metrics"]["fallbacks"], "this sparse dataset is expected to need at least one fallback"

    ids = ["C-1", "C-2", "C-300", "C-999"]  # C-999 is unknown
    out = tmp_path / "recs.csv"
    res = pipeline.recommend(model_dir, data, write_users(tmp_path / "u.txt", ids), 5, out, s, progress=False)
    assert res["unknown_users"] == 1
    frame = pd.read_csv(out, dtype={"user_id": str, "product_id": str})
    check_frame_shape(frame, 5)
    assert set(frame["user_id"]) == set(ids)
    assert frame.groupby("user_id").size().eq(5).all()
    assert frame["product_id"].str.startswith("P-").all()

    report = pipeline.evaluate(model_dir, data, tmp_path / "eval" / "report.json", s, progress=False)
    assert set(report["models"]) == {"random", "popularity", "popularity_eligible", "two_tower", "two_stage"}
    assert any("ground truth" in n for n in report["notes"])
    assert report["model"]["fallbacks"] == manifest["metrics"]["fallbacks"]
    assert (tmp_path / "eval" / "report.html").is_file()

    # Training again into the same bundle replaces it.
    again = pipeline.train(data, model_dir, s, progress=False)
    assert again["inputs"]["data_fingerprint"] == manifest["inputs"]["data_fingerprint"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "eval", "model", "recs.csv", "u.txt"]


# --------------------------------------------------------------------------- invalid data and arguments


def break_event_types(data: Path) -> None:
    ev = pd.read_csv(data / "events.csv")
    ev.loc[ev.index[:4], "event_type"] = "like"
    ev.to_csv(data / "events.csv", index=False)


def test_train_refuses_invalid_data_and_writes_nothing(tmp_path: Path) -> None:
    data = write_minimal(tmp_path / "data", n_events=300)
    break_event_types(data)
    model_dir = tmp_path / "models" / "m"
    with pytest.raises(DataValidationError) as info:
        pipeline.train(data, model_dir, settings(), progress=False)
    problems = info.value.report.errors
    assert [p.code for p in problems] == ["unknown_event_type"]
    assert problems[0].count == 4 and problems[0].table == "events"
    assert "like" in json.dumps(info.value.report.to_dict())
    assert not model_dir.exists()
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_train_into_a_foreign_folder_is_refused(tmp_path: Path) -> None:
    data = write_minimal(tmp_path / "data", n_events=300)
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(FinrecError, match="not a finrec model bundle"):
        pipeline.train(data, folder, settings(), progress=False)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


def test_cli_train_on_invalid_data_exits_1_without_traceback(tmp_path: Path) -> None:
    data = write_minimal(tmp_path / "data", n_events=300)
    break_event_types(data)
    res = finrec("train", "--data", str(data), "--model-dir", str(tmp_path / "m"))
    assert_clean(res, 1, "breaks the data contract", "finrec validate")
    assert not (tmp_path / "m").exists()


def test_cli_train_on_invalid_data_shows_the_report(tmp_path: Path) -> None:
    data = write_minimal(tmp_path / "data", n_events=300)
    break_event_types(data)
    res = finrec("train", "--data", str(data), "--model-dir", str(tmp_path / "m"))
    assert_clean(res, 1, "unknown_event_type", "like")


def test_cli_recommend_refuses_k_0(tmp_path: Path) -> None:
    users = write_users(tmp_path / "u.txt", ["C-1"])
    res = finrec("recommend", "--model-dir", str(tmp_path / "m"), "--data", str(tmp_path / "d"), "--users",
                 str(users), "--k", "0", "--output", str(tmp_path / "out.csv"))  # fmt: skip
    assert_clean(res, 2, "--k 0", "1 <= k <= 1000")
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.slow
def test_cli_train_recommend_evaluate(tmp_path: Path) -> None:
    data, model = tmp_path / "world", tmp_path / "model"
    assert_clean(finrec("generate", "--users", "1500", "--products", "40", "--months", "6", "--out", str(data)), 0)
    text = assert_clean(finrec("train", "--data", str(data), "--model-dir", str(model)), 0, "trained")
    assert (model / "manifest.json").is_file()
    manifest = json.loads((model / "manifest.json").read_text())
    assert manifest["metrics"]["model_version"] in text
    for fb in manifest["metrics"]["fallbacks"]:
        assert fb.split(":")[0] in text

    ids = pd.read_parquet(data / "users.parquet")["user_id"].astype(str).head(50).tolist()
    users = write_users(tmp_path / "users.txt", [*ids, "stranger"])
    out = tmp_path / "out.csv"
    assert_clean(
        finrec("recommend", "--model-dir", str(model), "--data", str(data), "--users", str(users), "--k", "5",
               "--output", str(out)),
        0, "wrote", "1 unknown",
    )  # fmt: skip
    frame = pd.read_csv(out, dtype={"user_id": str, "product_id": str})
    check_frame_shape(frame, 5)
    assert set(frame["user_id"]) - {"stranger"} == set(ids)
    ds = load_dataset(data)
    cold = frame[frame["user_id"] == "stranger"]
    cold_ok = needs_no_profile(ds, FinrecSettings(), ds.time_range[1] + 1)
    assert len(cold) == min(5, int(cold_ok.sum()))
    assert cold_ok[ds.product_rows(cold["product_id"].to_numpy())].all()

    report = tmp_path / "eval" / "r.json"
    text = assert_clean(
        finrec("evaluate", "--model-dir", str(model), "--data", str(data), "--output", str(report)), 0, "two_stage"
    )
    assert report.is_file() and report.with_suffix(".html").is_file()
    assert tuple(json.loads(report.read_text())["models"]) == ALL_MODELS


@pytest.mark.slow
def test_protected_attributes_are_never_model_features(small_world: Path, tmp_path: Path) -> None:
    """With age protected too, no stage of the bundle sees gender or age; the age rules still apply."""
    s = FinrecSettings(protected_attributes=["gender", "age"])
    pipeline.train(small_world, tmp_path / "m", s, progress=False)
    model = TwoStageModel.load(tmp_path / "m")
    names = set(model.space.user_numeric) | set(model.space.user_vocab)
    assert not names & {"gender", "age"}
    assert model.ranker is not None and model.approval is not None
    used = set(model.ranker.feature_names_) | set(model.approval.feature_names_)
    assert not {n for n in used if n in ("user_gender", "user_age")}
    # The eligibility rules still use age: nobody gets a product outside its age limits.
    users = tmp_path / "users.txt"
    users.write_text("\n".join(str(i) for i in range(1, 301)))
    pipeline.recommend(tmp_path / "m", small_world, users, 10, tmp_path / "r.csv", s, progress=False)
    recs = pd.read_csv(tmp_path / "r.csv")
    u = pd.read_parquet(small_world / "users.parquet")[["user_id", "age"]]
    p = pd.read_parquet(small_world / "products.parquet")[["product_id", "min_age", "max_age"]]
    j = recs.merge(u, on="user_id").merge(p, on="product_id")
    assert len(j) > 0
    assert not ((j["age"] < j["min_age"]) | (j["age"] > j["max_age"])).any()


@pytest.mark.slow
def test_ann_index_setting_is_used_and_close_to_exact(small_world: Path, tmp_path: Path) -> None:
    """`[train] index = "hnsw"` is saved in the bundle and used by recommend; results stay close to exact."""
    s = FinrecSettings(train={"index": "hnsw"})
    pipeline.train(small_world, tmp_path / "m", s, progress=False)
    model = TwoStageModel.load(tmp_path / "m")
    assert model.config.index == "hnsw"
    ds = load_dataset(small_world)
    fb = FeatureBuilder(ds, s.protected_attributes)
    cut = ds.time_range[1] + 1
    snap, hist = fb.snapshot(cut), fb.history(cut)
    users = np.arange(200)
    allowed = allowed_mask(rules_for(ds, s), snap, users, ds.n_products)
    ann = model.recommend(fb, snap, users, allowed, 10, hist)
    exact = model.recommend(fb, snap, users, allowed, 10, hist, index_kind="exact")
    assert allowed[np.arange(200)[:, None], np.maximum(ann.items, 0)][ann.items >= 0].all()
    overlap = np.mean([len(set(a[a >= 0]) & set(e[e >= 0])) / max((e >= 0).sum(), 1)
                       for a, e in zip(ann.items, exact.items, strict=True)])  # fmt: skip
    assert overlap > 0.9


@pytest.mark.slow
def test_a_data_parallel_two_tower_is_recorded_and_serves(tiny_world: Path, tmp_path: Path) -> None:
    """`[train] two_tower_workers = 2`: the two-tower trains in two processes, the manifest and the two-tower's
    own description say so, and the bundle loads and recommends."""
    from finrec.config import FinrecSettings
    from finrec.testing import TINY_TRAIN

    s = FinrecSettings(train={**TINY_TRAIN, "two_tower_workers": 2})
    manifest = pipeline.train(tiny_world, tmp_path / "model", s, progress=False)
    assert manifest["metrics"]["training"]["retrieval"]["workers"] == 2
    (meta,) = (tmp_path / "model").rglob("two_tower.json")
    assert json.loads(meta.read_text())["config"]["workers"] == 2
    users = load_dataset(tiny_world).users["user_id"].astype(str).head(3).tolist()
    (tmp_path / "users.txt").write_text("\n".join(users) + "\n")
    pipeline.recommend(tmp_path / "model", tiny_world, tmp_path / "users.txt", 5, tmp_path / "recs.csv", s,
                       progress=False)  # fmt: skip
    recs = pd.read_csv(tmp_path / "recs.csv", dtype={"user_id": str})
    assert set(recs["user_id"]) == set(users) and len(recs) == 15
