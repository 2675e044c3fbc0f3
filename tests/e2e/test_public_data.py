"""finrec on real data: CoIL 2000 insurance holdings (kernlab's ticdata), hide-one, through the CLI.

The protocol of benchmarks/bench_public.py on one data set: one held product hidden for a seeded 30% of the
customers with at least two, `finrec train` and `finrec recommend --exclude held` run as a user runs them, and
finrec's MAP@3 must beat recommending the most popular products. InstEval (random holdout of positive ratings)
stands in when ticdata cannot be read here (it needs the `bench` extra's `rdata` and Debian's apt-get). The
data packages are downloaded into .cache/public-data/ when missing; without a network the test skips.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.slow

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _bench() -> ModuleType:
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))  # bench_public imports public_data as a sibling module
    spec = importlib.util.spec_from_file_location("bench_public", BENCHMARKS / "bench_public.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_public", module)
    spec.loader.exec_module(module)
    return module


def _dataset(bench: ModuleType) -> str:
    """ticdata when it can be had here, else InstEval; skips when neither can."""
    reasons = []
    if importlib.util.find_spec("rdata") is None:
        reasons.append("ticdata needs `rdata` (pip install -e '.[bench]')")
    else:
        try:
            bench.public_data.fetch("ticdata")
            return "ticdata"
        except bench.public_data.DataUnavailable as e:
            reasons.append(f"ticdata: {e}")
    try:
        bench.public_data.fetch("insteval")
    except bench.public_data.DataUnavailable as e:
        pytest.skip(f"no public data set can be downloaded here: {'; '.join(reasons)}; insteval: {e}")
    return "insteval"


def test_finrec_beats_popularity_on_public_data(tmp_path: Path) -> None:
    bench = _bench()
    name = _dataset(bench)
    result = bench.run_dataset(name, tmp_path, seed=0, methods=("finrec", "popularity"), log=lambda _: None)
    main = result["main_metric"]
    fin, pop = result["methods"]["finrec"], result["methods"]["popularity"]
    assert "error" not in fin, fin.get("error")
    report = (
        f"{name} ({result['split']['test_users']} customers, {result['protocol']}): "
        f"finrec {main} {fin['metrics'][main]:.4f} {fin['interval']} vs popularity {pop['metrics'][main]:.4f} "
        f"{pop['interval']}; finrec {fin['metrics']}, popularity {pop['metrics']}; "
        f"finrec stages {fin.get('stages')}, fallbacks {fin.get('fallbacks')}"
    )
    print(report)
    assert fin["metrics"][main] > pop["metrics"][main], report
