"""Model registry: versions with their manifests, aliases (``champion``, ``challenger``), promotion gate, rollback."""

from finrec.registry.gate import (
    GateResult,
    PromotionRefused,
    check_gate,
    evaluation_key,
    evaluation_record,
    resolve_metric,
)
from finrec.registry.store import CHALLENGER, CHAMPION, ModelRegistry, Promotion, UnknownVersionError

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "GateResult",
    "ModelRegistry",
    "Promotion",
    "PromotionRefused",
    "UnknownVersionError",
    "check_gate",
    "evaluation_key",
    "evaluation_record",
    "resolve_metric",
]
