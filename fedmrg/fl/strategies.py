"""Federated strategies: what a round sends, what the server keeps (Flower's Strategy, no Ray).

A strategy decides; the coordinator moves messages; the math lives in `fl.lowrank`.

    strategy = make_strategy(cfg)           # cfg.federation.strategy
    cfg = strategy.configure(cfg)           # the switches the strategy's definition implies
    strategy.initialize(global_state)       # shared state of a freshly built model
    for round_id in 1..R:
        centers = strategy.configure_round(round_id, pool.centers(), rng)
        plans = {c: strategy.plan(round_id, c) for c in centers}
        ... clients train, send ClientUpdates ...
        metrics = strategy.aggregate_round(round_id, updates)  # updates the global state

Work in progress: the base interface is committed first so the Ray edge can import it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import Tensor

from fedmrg.config import ConfigError, ExperimentConfig
from fedmrg.fl.messages import ClientUpdate, RoundPlan


class FederationError(ValueError):
    """A round cannot be configured or aggregated; the message names the center/tensor/value."""


def sample_clients(centers: Sequence[str], fraction: float, min_clients: int,
                   rng: np.random.Generator) -> list[str]:
    """Seeded sampling of max(min_clients, ceil(fraction * n)) of `centers`, returned sorted.

    The candidates are sorted first, so the draw depends on the RNG state and the set of
    centers only, never on the order a pool lists them in.
    """
    pool = sorted(set(centers))
    n = len(pool)
    if n < min_clients:
        raise FederationError(f"{n} client(s) available ({pool}) but federation.min_clients is "
                              f"{min_clients}")
    k = min(n, max(min_clients, math.ceil(fraction * n - 1e-9)))
    if k == n:
        return pool
    chosen = rng.choice(n, size=k, replace=False)
    return sorted(pool[i] for i in chosen)


class Strategy:
    """Base strategy (see the module docstring). Subclasses override `plan` and
    `aggregate_round`; `implies` lists the config keys their definition fixes."""

    name = "base"
    implies: dict[str, Any] = {}  # "section.key" -> value

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self._global: dict[str, Tensor] | None = None

    def configure(self, cfg: ExperimentConfig) -> ExperimentConfig:
        """A copy of `cfg` with the keys in `implies` set; every other key as the user set it."""
        raise NotImplementedError

    def initialize(self, global_state: dict[str, Tensor]) -> None:
        """Start from the shared state of a freshly built model (identical on every client)."""
        self._global = {n: t.detach().clone() for n, t in global_state.items()}

    def configure_round(self, round_id: int, centers: Sequence[str],
                        rng: np.random.Generator) -> list[str]:
        fed = self.cfg.federation
        return sample_clients(centers, fed.fraction, fed.min_clients, rng)

    def plan(self, round_id: int, center: str) -> RoundPlan:
        raise NotImplementedError

    def aggregate_round(self, round_id: int, updates: list[ClientUpdate]) -> dict[str, float]:
        raise NotImplementedError

    def global_state(self) -> dict[str, Tensor] | None:
        """The server's shared state (None for `local`: there is no global model)."""
        return self._global

    def state_dict(self) -> dict[str, Any]:
        return {"global": self._global}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._global = state["global"]


def make_strategy(cfg: ExperimentConfig) -> Strategy:
    """The strategy named by `cfg.federation.strategy`."""
    raise ConfigError(f"federation.strategy: {cfg.federation.strategy!r} not built yet")
