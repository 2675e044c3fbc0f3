"""Wiring of the offline commands: validate, load, run a stage, write its artifact. No modelling here.

Each function takes plain values (paths, settings) and returns what it wrote,
so the CLI, tests and the later service share one path through the system.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from finrec.artifacts import MANIFEST, atomic_dir, read_manifest, verify_files, write_manifest
from finrec.config import FinrecSettings
from finrec.data.dataset import Dataset, load_dataset
from finrec.errors import ArtifactError, FinrecError
from finrec.features.split import TemporalSplit
from finrec.twostage.model import TwoStageModel

MODEL_KIND = "model"


def _load(data: Path, settings: FinrecSettings) -> Dataset:
    return load_dataset(data, future_tolerance_seconds=settings.validation.future_tolerance_seconds)


def train(data: Path, model_dir: Path, settings: FinrecSettings, progress: bool = True,
          dataset: Dataset | None = None,
          fit_sources: Callable[[TwoStageModel], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """Validate ``data``, train the two-stage model, write the bundle to ``model_dir``; returns the manifest.

    ``dataset``: ``data`` already loaded (a sample of its customers drawn by Spark). ``fit_sources``: called on the
    trained model before it is saved, to fit its candidate sources on more than ``dataset`` holds (a sample's
    :meth:`~finrec.engine.sample.CustomerSample.fit_sources_on_everyone`). An existing model bundle at
    ``model_dir`` is replaced atomically; any other non-empty folder is refused.
    """
    from finrec.monitoring.reference import REFERENCE_DIR, sample_features
    from finrec.twostage.train import train_two_stage

    if model_dir.is_dir() and any(model_dir.iterdir()) and not (model_dir / "model.json").is_file():
        raise ArtifactError(f"{model_dir} exists and is not a finrec model bundle", hint="choose an empty --model-dir")
    t0 = time.perf_counter()
    ds = _load(data, settings) if dataset is None else dataset
    load_s = time.perf_counter() - t0
    model, report = train_two_stage(ds, settings, progress=progress)
    if fit_sources is not None:
        clock = time.perf_counter()
        fit_sources(model)
        report.seconds["sources_on_everyone"] = time.perf_counter() - clock
    version = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{ds.fingerprint[:8]}"
    with atomic_dir(model_dir, overwrite=True) as tmp:
        model.save(tmp)
        # The drift reference: what the model sees at its ranker cutoff. Written before the manifest so that
        # it is checksummed with the rest of the bundle.
        clock = time.perf_counter()
        reference = sample_features(model, ds, settings, cutoff=report.split.rank_cutoff,
                                    n_users=settings.monitor.drift_sample_users, seed=settings.train.seed)  # fmt: skip
        reference.save(tmp / REFERENCE_DIR)
        report.seconds["drift_reference"] = time.perf_counter() - clock
        manifest = write_manifest(
            tmp,
            MODEL_KIND,
            config={"settings": settings.model_dump(mode="json"), "split": report.split.to_dict()},
            inputs={
                "data": str(data.resolve()),
                "data_fingerprint": ds.fingerprint,
                "users": ds.n_users,
                "products": ds.n_products,
                "events": len(ds.events),
            },  # fmt: skip
            metrics={
                "training": report.metrics,
                "validation": report.validation,
                "fallbacks": report.fallbacks,
                "seconds": {"load": round(load_s, 2), **{k: round(v, 2) for k, v in report.seconds.items()}},
                "model_version": version,
                "stages": model.stages(),
                "serves": model.serve,
            },  # fmt: skip
        )
    return manifest


def load_model(model_dir: Path) -> tuple[TwoStageModel, dict[str, Any]]:
    """Read a bundle after checking every file against its manifest (sizes and checksums)."""
    manifest = read_manifest(model_dir, MODEL_KIND)
    verify_files(model_dir, manifest)
    return TwoStageModel.load(model_dir), manifest


def read_user_ids(path: Path) -> list[str]:
    """One id per line; blank lines and a leading ``user_id`` header are skipped."""
    if not path.is_file():
        raise FinrecError(f"users file {path} does not exist", hint="pass a text file with one user id per line")
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise FinrecError(f"users file {path} is not UTF-8 text", hint="one user id per line, UTF-8") from None
    ids = [ln for ln in lines if ln]
    if ids and ids[0].lower() == "user_id":
        ids = ids[1:]
    if not ids:
        raise FinrecError(f"users file {path} lists no user ids", hint="one user id per line")
    return list(dict.fromkeys(ids))  # keep order, drop repeats


def recommend(
    model_dir: Path,
    data: Path,
    users_file: Path,
    k: int,
    output: Path,
    settings: FinrecSettings,
    exclude: str = "held",
    progress: bool = True,
) -> dict[str, Any]:
    """Batch recommendations for the listed users at the end of ``data``; writes CSV or Parquet."""
    from finrec.features.builder import FeatureBuilder

    suffix = check_recommend_request(k, exclude, output)
    model, manifest = load_model(model_dir)
    ids = read_user_ids(users_file)
    ds = _load(data, settings)
    cutoff = ds.time_range[1] + 1
    builder = FeatureBuilder(ds, settings.protected_attributes)
    rows = ds.user_rows(ids)
    known = rows >= 0
    parts = [recommend_rows(model, builder, settings, cutoff, rows[known], k, exclude, progress)]
    unknown_ids = np.asarray(ids, dtype=object)[~known].tolist()
    if unknown_ids:
        parts.append(recommend_unknown(model, builder, settings, cutoff, unknown_ids, k))
    frame = pd.concat(parts, ignore_index=True)
    pid = ds.products["product_id"].to_numpy()
    frame.insert(2, "product_id", pid[frame.pop("item").to_numpy(np.int64)])
    for col in ("user_id", "product_id"):
        frame[col] = ids_for_output(frame[col])
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    if suffix == ".csv":
        frame.to_csv(tmp, index=False)
    else:
        frame.to_parquet(tmp, index=False)
    tmp.replace(output)
    return {"users": len(ids), "unknown_users": len(unknown_ids), "rows": len(frame),
            "model_version": manifest["metrics"].get("model_version"), "output": str(output)}  # fmt: skip


def check_recommend_request(k: int, exclude: str, output: Path) -> str:
    """Refuse a batch request that cannot run (either engine), before any work; returns the output's suffix."""
    if exclude not in ("held", "interacted", "none"):
        raise FinrecError(f"unknown --exclude {exclude!r}", hint="use held, interacted or none")
    if not 1 <= k <= 1000:
        raise FinrecError(f"--k {k} is out of range", hint="use 1 <= k <= 1000")
    suffix = "".join(output.suffixes[-1:]).lower()
    if suffix not in (".csv", ".parquet"):
        raise FinrecError(f"--output {output} must end in .csv or .parquet")
    return suffix


def recommend_rows(model: TwoStageModel, builder: Any, settings: FinrecSettings, cutoff: int, rows: np.ndarray,
                   k: int, exclude: str = "held", progress: bool = False,
                   sources: Any = None) -> pd.DataFrame:  # fmt: skip
    """Top ``k`` of each customer row of ``builder.ds`` at ``cutoff``: (user_id, rank, item, score) rows.

    The batch path of `finrec recommend`, on the whole dataset (embedded) or on one partition of customers
    (Spark: the builder then takes the catalogue's statistics from outside, and ``sources`` are the candidate
    sources fitted at ``cutoff`` on every customer's positives). Fewer than ``k`` allowed products give fewer
    rows, never a back-fill.
    """
    from tqdm import tqdm

    from finrec.data.dataset import ETYPE
    from finrec.twostage.train import allowed_mask, rules_for

    ds = builder.ds
    snap = builder.snapshot(cutoff)
    if sources is not None:
        model.set_sources(snap, sources)
    history = builder.history(cutoff, model.config.history_length)
    rules = rules_for(ds, settings)
    interacted = None
    if exclude == "interacted":
        ev = ds.events
        interacted = np.unique(np.column_stack([ev.user, ev.product])[ev.etype != ETYPE["close"]], axis=0)
    ids = ds.users["user_id"].to_numpy()
    parts = [pd.DataFrame({"user_id": pd.Series([], dtype=object), "rank": np.empty(0, np.int64),
                           "item": np.empty(0, np.int64), "score": np.empty(0)})]  # fmt: skip
    for start in tqdm(range(0, len(rows), 2000), desc="recommending", unit="block", disable=not progress):
        bu = rows[start : start + 2000]
        allowed = allowed_mask(rules, snap, bu, ds.n_products, exclude, interacted)
        rec = model.recommend(builder, snap, bu, allowed, k, history, with_features=False)
        m = rec.items >= 0
        parts.append(pd.DataFrame({
            "user_id": np.repeat(ids[bu], m.sum(axis=1)),
            "rank": np.cumsum(m, axis=1)[m],
            "item": rec.items[m],
            "score": rec.scores[m],
        }))  # fmt: skip
    return pd.concat(parts, ignore_index=True)


def recommend_unknown(model: TwoStageModel, builder: Any, settings: FinrecSettings, cutoff: int,
                      unknown_ids: list[str], k: int) -> pd.DataFrame:  # fmt: skip
    """Customers the data does not know: no profile, so the most popular products without rules that need one."""
    from finrec.twostage.train import rules_for

    ds = builder.ds
    empty = pd.DataFrame({c: [np.nan] for c in ds.users.columns if c != "user_id"})
    cold = rules_for(ds, settings, users=empty)
    ok = cold.allowed(np.zeros(1, dtype=np.int64), at=cutoff)[0]
    pop = model.popularity_scores(builder)
    order = np.asarray([i for i in np.argsort(-pop, kind="stable") if ok[i]][:k], dtype=np.int64)
    return pd.DataFrame({
        "user_id": np.repeat(np.asarray(unknown_ids, dtype=object), len(order)),
        "rank": np.tile(np.arange(1, len(order) + 1), len(unknown_ids)),
        "item": np.tile(order, len(unknown_ids)),
        "score": np.tile(pop[order], len(unknown_ids)),
    })  # fmt: skip


def ids_for_output(ids: pd.Series) -> pd.Series:
    """Ids as written by ``finrec recommend``: integers when every id reads back the same as an integer, else text.

    Ids are text in the contract, so "00001069" stays "00001069" (an integer column would drop its zeros).

    >>> ids_for_output(pd.Series(["12", "7"])).tolist(), ids_for_output(pd.Series(["00012", "7"])).tolist()
    ([12, 7], ['00012', '7'])
    """
    text = ids.astype(str)
    if len(text) and text.str.fullmatch(r"-?(0|[1-9]\d{0,17})").all():
        return text.astype(np.int64)
    return text


def evaluate(model_dir: Path, data: Path, output: Path, settings: FinrecSettings, ground_truth: Path | None = None,
             progress: bool = True, split: TemporalSplit | None = None,
             dataset: Dataset | None = None) -> dict[str, Any]:  # fmt: skip
    """Offline evaluation to ``output`` (JSON) and an HTML report next to it (same name, .html).

    ``split`` fixes the held-out window (default: the model's own); see :func:`evaluate_model`. ``dataset``:
    ``data`` already loaded (a sample of its customers drawn by Spark).
    """
    from finrec.evaluation.html import write_html_report
    from finrec.evaluation.offline import evaluate_model

    model, manifest = load_model(model_dir)
    ds = _load(data, settings) if dataset is None else dataset
    if ground_truth is None and (data / "ground_truth" / "world.json").is_file():
        ground_truth = data / "ground_truth"
    report, figures = evaluate_model(ds, model, settings, ground_truth=ground_truth, progress=progress,
                                     split=split)
    report["model"]["version"] = manifest["metrics"].get("model_version")
    report["model"]["training"] = _training_summary(manifest["metrics"].get("training", {}))
    report["model"]["fallbacks"] = manifest["metrics"].get("fallbacks", [])
    plan = manifest["metrics"].get("validation", {}).get("plan", {})
    same_data = manifest["inputs"].get("data_fingerprint") == ds.fingerprint
    if same_data and plan and "impressions" not in str(plan.get("reason", "")):
        report["notes"].insert(0, "This bundle learned without impressions, from its own validation plan "
                                  f"({plan.get('kind')}) and then from all the data: it has seen this window, so "
                                  "these figures are optimistic. The honest figure is the validation table in the "
                                  "bundle's manifest (printed by `finrec train`).")  # fmt: skip
    elif same_data:
        report["notes"].insert(0, "Evaluated on the training dataset's own held-out window (after the last cutoff "
                                  "the model saw).")  # fmt: skip
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1, default=_json_default))
    write_html_report(report, output.with_suffix(".html"), plots=figures)
    return report


def _training_summary(training: dict[str, Any]) -> dict[str, str]:
    """One readable line per stage for the report; the manifest keeps every detail."""
    out = {}
    for stage, m in training.items():
        parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items()
                 if isinstance(v, int | float | str) and not isinstance(v, bool)]  # fmt: skip
        cal = m.get("calibrated") or m.get("raw")
        if isinstance(cal, dict):
            parts += [f"{k} {cal[k]:.4f}" for k in ("brier", "ece", "auc") if isinstance(cal.get(k), float)]
        if isinstance(m.get("top_features"), dict):
            parts.append("top features " + ", ".join(list(m["top_features"])[:5]))
        out[stage] = "; ".join(parts)
    return out


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


__all__ = ["train", "recommend", "evaluate", "load_model", "read_user_ids", "MANIFEST", "asdict"]
