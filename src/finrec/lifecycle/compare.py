"""Offline evaluation of registry versions on one shared window, recorded for the promotion gate.

Two versions are only comparable on the same customers, data and held-out
window. :func:`evaluate_versions` evaluates each version on the same
:class:`~finrec.features.split.TemporalSplit` of one dataset and records each
result in the version's registry entry under the key of that data and window.

The window is the first version's own held-out window when it was trained on
this very data (a challenger just trained by ``finrec retrain``), else the
dataset's latest window as ``finrec train`` would plan it: either way after
what the challenger learned from. A champion trained on older data never saw
it either. (A champion trained on *newer* data than the window could have seen
it; the gate would then flatter the champion, never the challenger.)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from finrec.artifacts import read_manifest
from finrec.config import FinrecSettings
from finrec.data.dataset import Dataset, load_dataset
from finrec.errors import FinrecError
from finrec.features.split import TemporalSplit
from finrec.registry import ModelRegistry, evaluation_record

log = logging.getLogger("finrec.lifecycle")


def shared_split(bundle: Path, ds: Dataset, settings: FinrecSettings) -> TemporalSplit:
    """The held-out window to compare versions on (see the module docstring)."""
    manifest = read_manifest(bundle, "model")
    own = manifest.get("config", {}).get("split")
    if own and manifest.get("inputs", {}).get("data_fingerprint") == ds.fingerprint:
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in own.items()}
        return TemporalSplit(**fields)
    t = settings.train
    return TemporalSplit.plan(*ds.time_range, t.eval_days, t.label_days, t.max_retrieval_windows)


Evaluations = dict[str, tuple[str, dict[str, Any]]]


def evaluate_versions(registry: ModelRegistry, refs: list[str], data: Path, settings: FinrecSettings,
                      progress: bool = True, ds: Dataset | None = None) -> Evaluations:  # fmt: skip
    """Evaluate each version (or alias) of ``refs`` on ``data`` over one window; returns version -> (key, record).

    Each record is also stored in the version's registry entry. On synthetic data the ground truth next to the
    data (``<data>/ground_truth``) adds ``true_conversion@k``.
    """
    from finrec.evaluation.offline import evaluate_model
    from finrec.pipeline import load_model

    versions = list(dict.fromkeys(registry.require(r) for r in refs))
    if not versions:
        raise FinrecError("no versions to evaluate", hint="name at least one version or alias")
    ds = ds or load_dataset(Path(data), future_tolerance_seconds=settings.validation.future_tolerance_seconds)
    split = shared_split(registry.path(versions[0]), ds, settings)
    truth = Path(data) / "ground_truth"
    out: Evaluations = {}
    for version in versions:
        model, _ = load_model(registry.path(version))
        try:
            report, _ = evaluate_model(ds, model, settings, ground_truth=truth if (truth / "world.json").is_file()
                                       else None, progress=progress, split=split)  # fmt: skip
        except ValueError as exc:  # e.g. nobody with a relevant event in the window
            raise FinrecError(f"cannot evaluate {version} on {data}: {exc}",
                              hint="evaluate on data with feedback after the models' training") from None  # fmt: skip
        key, record = evaluation_record(report)
        record["version"] = version
        registry.add_evaluation(version, key, record)
        log.info("evaluated", extra={"version": version, "key": key})
        out[version] = (key, record)
    return out
