"""The HTML evaluation report: one self-contained file, every section, escaped text, missing parts."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.figure import Figure

from finrec.evaluation.bootstrap import summarise
from finrec.evaluation.html import metrics_bar_figure, recall_figure, segments_figure, write_html_report
from finrec.evaluation.metrics import Relevance, evaluate_rankings

MODELS = ("random", "popularity", "two_tower", "two_stage", "oracle")


def _summary(mean: float, n: int = 500) -> dict[str, Any]:
    return {"mean": mean, "low": mean - 0.02, "high": mean + 0.02, "n": n}


def _report() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    models = {}
    for i, m in enumerate(MODELS):
        base = 0.1 + 0.15 * i
        models[m] = {
            "ndcg@10": _summary(base),
            "map@10": _summary(base * 0.8),
            "mrr": _summary(base * 1.1),
            "hit_rate@10": _summary(min(1.0, base * 1.5)),
            "recall@10": _summary(base),
            "recall@100": _summary(min(1.0, base * 2)),
            "coverage@10": {"mean": float(rng.random())},
        }
    segments = {
        "age_band": {
            band: {m: {"ndcg@10": _summary(0.2 + 0.1 * j, n=50 + j)} for j, m in enumerate(("popularity", "two_stage"))}
            for band in ("18-29", "30-44", "45+")
        },
        "region": {
            "north": {"two_stage": {"ndcg@10": _summary(0.4, n=12)}},
            "south": {"two_stage": {"ndcg@10": _summary(0.3, n=9)}, "random": {"ndcg@10": _summary(0.1, n=9)}},
        },
    }
    return {
        "title": "Offline evaluation <v1>",
        "created_at": "2024-07-01T12:00:00+00:00",
        "dataset": {"path": "/data/world", "users": 6000, "products": 60, "fingerprint": "abc&def"},
        "model": {"n_candidates": 100, "stages": ["two_tower", "ranker"], "note": "<script>alert(1)</script>"},
        "split": {"eval_cutoff": "2024-06-01", "evaluated_users": 1234},
        "models": models,
        "comparisons": {"two_stage - popularity": {"metric": "ndcg@10", "mean_diff": 0.3, "low": 0.2, "high": 0.4}},
        "segments": segments,
        "notes": ["Logged relevance only covers shown products.", "<script>alert('x')</script> & more"],
    }


def _extra_plot() -> Figure:
    fig = Figure()
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], "--")
    return fig


def test_full_report_has_every_section(tmp_path: Path) -> None:
    out = write_html_report(_report(), tmp_path / "sub" / "report.html", plots={"Reliability <diagram>": _extra_plot()})
    assert out == tmp_path / "sub" / "report.html" and out.exists()
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    for m in MODELS:
        assert f"<th>{m}" in page
    for heading in ("Metrics", "Recall@N", "Segments", "Paired comparisons", "Notes"):
        assert heading in page
    assert "Reliability &lt;diagram&gt;" in page
    # Bar chart, recall chart, segments chart and the extra plot, all embedded.
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 4
    assert all(base64.b64decode(b).startswith(b"\x89PNG") for b in images)
    # Nothing external, nothing executable.
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in page
    assert "Offline evaluation &lt;v1&gt;" in page and "abc&amp;def" in page
    # Table cells: mean [low, high]; best non-reference model per column is bold, the oracle is not.
    assert "0.5500 [0.5300, 0.5700]" in page  # two_stage ndcg@10
    assert "<b>0.5500 [0.5300, 0.5700]</b>" in page
    assert "<b>0.7000 [0.6800, 0.7200]</b>" not in page  # oracle ndcg@10
    # Segments: "—" where a model has no value for a segment (random in the north).
    north = re.search(r"<tr><th>north</th>.*?</tr>", page)
    assert north is not None and '<td class="missing">—</td>' in north.group(0)
    assert "18-29" in page


def test_report_with_missing_models_and_metrics_renders(tmp_path: Path) -> None:
    report = {
        "title": "partial",
        "models": {
            "popularity": {"ndcg@10": _summary(0.3), "coverage@10": {"mean": 0.1}},
            "two_stage": {"map@10": {"mean": float("nan"), "low": None}, "custom_metric": {"mean": 2.5}},
        },
        "segments": {"age_band": {"18-29": {}}},
        "notes": [],
    }
    page = write_html_report(report, tmp_path / "partial.html").read_text(encoding="utf-8")
    assert "popularity" in page and "two_stage" in page and "custom_metric" in page
    assert page.count('class="missing"') >= 3
    assert "Recall@N" not in page  # no recall metric anywhere: no chart
    # Nothing at all still gives a page.
    empty = write_html_report({}, tmp_path / "empty.html").read_text(encoding="utf-8")
    assert "no model results" in empty


def test_report_from_real_metrics(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    n_users, n_items = 400, 30
    rel = Relevance.from_pairs(
        n_users, rng.integers(0, n_users, 800), rng.integers(0, n_items, 800), rng.integers(1, 5, 800)
    )
    models = {}
    for name in ("random", "two_stage"):
        ranked = np.argsort(rng.random((n_users, n_items)), axis=1)[:, :10]
        models[name] = summarise(evaluate_rankings(ranked, rel, n_items, k=5, recall_ks=(5, 10)), n_boot=100)
    page = write_html_report({"models": models}, tmp_path / "r.html").read_text(encoding="utf-8")
    assert "ndcg@5" in page and "recall@10" in page and "coverage@5" in page


def test_figure_helpers_return_figures() -> None:
    models = _report()["models"]
    assert isinstance(metrics_bar_figure(models, "ndcg@10"), Figure)
    assert isinstance(metrics_bar_figure(models, ["ndcg@10", "map@10"]), Figure)
    assert isinstance(recall_figure(models), Figure)
    assert recall_figure({"x": {"ndcg@10": _summary(0.1)}}) is None
    fig = segments_figure(_report()["segments"], "ndcg@10")
    assert isinstance(fig, Figure) and len(fig.axes) == 2


def test_pyplot_figures_are_closed_after_embedding(tmp_path: Path) -> None:
    plt = pytest.importorskip("matplotlib.pyplot")
    fig = plt.figure()
    fig.gca().plot([1, 2, 3])
    n_before = len(plt.get_fignums())
    write_html_report({"title": "t"}, tmp_path / "t.html", plots={"curve": fig})
    assert len(plt.get_fignums()) == n_before - 1
