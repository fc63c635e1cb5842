"""The strategy registry: every `Strategy` subclass with a `name` in this package's modules.

Importing it imports every strategy module (torch, peft); `fedmrg.fl.strategies.strategy_names`
gives the same names without importing anything (config and CLI use it).
"""

from __future__ import annotations

import importlib
import pkgutil

from fedmrg.config import ConfigError, ExperimentConfig
from fedmrg.fl.strategies.base import ClientStrategy, Strategy, strategy_classes

_PACKAGE = __name__.rpartition(".")[0]
for _module in pkgutil.iter_modules(importlib.import_module(_PACKAGE).__path__):
    importlib.import_module(f"{_PACKAGE}.{_module.name}")


def _registry() -> dict[str, type[Strategy]]:
    found: dict[str, type[Strategy]] = {}
    for cls in strategy_classes():
        if cls.name in found and found[cls.name] is not cls:
            raise ImportError(f"two strategies named {cls.name!r}: {found[cls.name].__module__}"
                              f" and {cls.__module__}")
        found[cls.name] = cls
    return dict(sorted(found.items(), key=lambda item: (item[1].order, item[0])))


STRATEGIES: dict[str, type[Strategy]] = _registry()


def strategy_class(name: str) -> type[Strategy]:
    """The registered strategy `name`; an unknown name is a `ConfigError` naming the choices."""
    if name not in STRATEGIES:
        raise ConfigError(f"federation.strategy: {name!r} is not one of {list(STRATEGIES)}")
    return STRATEGIES[name]


def make_strategy(cfg: ExperimentConfig) -> Strategy:
    """The strategy named by `cfg.federation.strategy`; its `.cfg` is the configured config."""
    return strategy_class(cfg.federation.strategy)(cfg)


def make_client_strategy(cfg: ExperimentConfig) -> ClientStrategy:
    """The client half of the strategy named by `cfg.federation.strategy`, on `cfg`, which
    must be resolved already (the strategy's configured config): a client never resolves it
    again, and one given a config the strategy would still change is a `ConfigError`."""
    strategy = strategy_class(cfg.federation.strategy)
    changes = strategy.implied_changes(cfg)
    if changes:
        raise ConfigError(f"the client's config is not resolved for strategy {strategy.name!r}: "
                          f"it implies {', '.join(f'{k}={v!r}' for k, (_, v) in changes.items())}"
                          f" (build clients with make_strategy(cfg).cfg)")
    return strategy.client_class(cfg)
