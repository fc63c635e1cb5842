"""Federated strategies, one module each; `STRATEGIES` (name -> class) is the registry that
config, CLI, benchmarks and validation (through `Strategy.update_spec`) take their choices from.

Every `Strategy` subclass that sets a `name` in a module of this package is registered under
it, listed by `order` (baselines first, fedmrg last): a new strategy is a new module here (its
server half, client half and payload schema, see `base`) plus its tests, nothing else.

This package's own import is light: `strategy_names()` reads the names from the modules'
source, so `fedmrg.config` validates `federation.strategy` without importing torch; the
classes and `make_strategy` load on first use (`registry`). A test keeps the two in step.
"""

from __future__ import annotations

import ast
import importlib
from functools import cache
from pathlib import Path
from typing import Any

_HERE = Path(__file__).parent

# name -> the module that defines it (loaded on first access, PEP 562)
_EXPORTS = {
    "STRATEGIES": "registry", "make_strategy": "registry", "make_client_strategy": "registry",
    "strategy_class": "registry",
    "ClientStrategy": "base", "FederationError": "base", "Strategy": "base",
    "STATISTICS": "base", "by_center": "base", "sample_clients": "base",
    "STACKED": "fedavg", "FedAvg": "fedavg", "FedProx": "fedprox", "Centralized": "centralized",
    "Local": "local", "FedMRG": "fedmrg", "PROTOTYPES": "fedmrg", "LABEL_COUNTS": "fedmrg",
}
__all__ = ["strategy_names", *_EXPORTS]


def _class_constants(node: ast.ClassDef) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for stmt in node.body:
        target = value = None
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            target, value = stmt.targets[0], stmt.value
        elif isinstance(stmt, ast.AnnAssign):
            target, value = stmt.target, stmt.value
        if isinstance(target, ast.Name) and isinstance(value, ast.Constant):
            out[target.id] = value.value
    return out


@cache
def strategy_names() -> tuple[str, ...]:
    """The registered strategy names in registry order, read from the source of this package's
    modules (class-level `name = "..."` and `order = N` constants) without importing them."""
    found: dict[str, int] = {}
    for path in sorted(_HERE.glob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef):
                constants = _class_constants(node)
                if constants.get("name"):
                    found[constants["name"]] = int(constants.get("order", 50))
    return tuple(sorted(found, key=lambda name: (found[name], name)))


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
