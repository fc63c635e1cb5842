"""Report evaluation: NLG metrics, clinical efficacy, and the model evaluator.

    from fedmrg.eval import evaluate_model, evaluate_centers, compute_nlg_metrics

Names are resolved on first use (PEP 562): the metrics stay importable without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "compute_nlg_metrics": "nlg", "clean_report": "nlg", "close_meteor": "nlg",
    "METRIC_KEYS": "nlg",
    "compute_ce_metrics": "clinical", "compute_ce_from_reports": "clinical",
    "compute_diagnosis_metrics": "clinical",
    "evaluate_model": "evaluator", "evaluate_centers": "evaluator", "EvalResult": "evaluator",
    "CentersResult": "evaluator", "EvaluationError": "evaluator",
    "mean_over_centers": "evaluator", "metrics_table": "evaluator", "HEADLINE": "evaluator",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fedmrg.eval' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"fedmrg.eval.{_EXPORTS[name]}"), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
