"""Every LightGBM prediction in the process goes through one lock.

A LightGBM booster is not safe to predict from two threads at once: each call builds a ``Predictor`` that writes
the booster's shared iteration state (``GBDT::InitPredict``; LightGBM issue #6142, open), and ``pred_contrib``
corrupts the heap under concurrent calls (issue #5482); each call also sets OpenMP's process-wide thread count.
The API scores requests on a thread pool, so two requests, or a request and a hot-reloaded model's first call,
met inside one booster: a worker died of a segmentation fault in ``lib_lightgbm.so`` (seen in the closed-loop
drift test, and reproduced by eight threads mixing ``predict``, ``pred_leaf`` and ``pred_contrib`` on one ranker).

One process-wide lock, rather than one per booster, because the thread count is global too. What it costs: a
request's two calls took about 0.7 ms together when measured (0.56 ms for the scores of 105 candidates, 0.16 ms for
the leaves of the 10 returned; docs/benchmarks.md, "Serving"), so a worker's LightGBM work saturates past about
1,400 requests a second, several times what one worker answers; batch scoring makes one call at a time anyway.
(A copy of the booster per thread would keep calls parallel at the price of memory per thread.)
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import lightgbm as lgb

#: Held by every call into a booster's prediction code (re-entrant: a caller may hold it around several calls).
PREDICT_LOCK = threading.RLock()


def predict(booster: lgb.Booster, X: np.ndarray, **kwargs: Any) -> np.ndarray:
    """``booster.predict(X, **kwargs)`` under :data:`PREDICT_LOCK`, as an ndarray."""
    with PREDICT_LOCK:
        return np.asarray(booster.predict(X, **kwargs))


def dump_model(booster: lgb.Booster, **kwargs: Any) -> dict[str, Any]:
    """``booster.dump_model(**kwargs)`` under :data:`PREDICT_LOCK`."""
    with PREDICT_LOCK:
        return dict(booster.dump_model(**kwargs))
