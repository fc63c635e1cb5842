"""Federated strategies: what a round sends, what the server keeps (Flower's Strategy, no Ray).

A strategy decides; the coordinator moves messages; the math lives in `fl.lowrank`.

    strategy = make_strategy(cfg)           # cfg.federation.strategy; strategy.cfg is configured
    strategy.initialize(global_state)       # shared state of a freshly built model
    for round_id in 1..R:
        centers = strategy.configure_round(round_id, pool.centers(), rng)
        plans = {c: strategy.plan(round_id, c) for c in centers}
        ... clients train, send ClientUpdates ...
        metrics = strategy.aggregate_round(round_id, updates)  # updates the global state

The strategies:

- `fedavg`: one adapter; the generic LoRA factors are averaged factor by factor (`fedavg`
  aggregation), every other shared tensor gets the sample-weighted mean of the clients' dense
  updates. Its definition implies (`FedAvg.implies`): no specialized adapter, no mutual
  boosting, no contrastive heads, fedavg aggregation, dense updates (rank 0).
- `fedprox`: fedavg + the proximal term mu/2 ||w - w_global||^2 in local training (mu from
  `train.fedprox_mu`, default 0.01).
- `fedmrg`: generic adapter aggregated with `federation.aggregation` (default `exact`), dense
  shared tensors from their low-rank (error-feedback) updates, diagnosis prototypes merged with
  `merge_prototypes` and sent back next round, the clients' label-state counts turned into a
  global log prior for the logit-adjusted diagnosis loss. The specialized adapter and the local
  head never leave the client. It implies nothing: every FedMRG mechanism is the user's switch
  (ablations stay as set).
- `local`: no aggregation; every client keeps and trains its own model, plans carry no state.
  Same model switches as fedavg (the plain model, trained alone).
- `centralized`: fedavg over ONE client that holds the pooled data (the experiment builds that
  client); aggregation of one update is that update, so this is plain training on pooled data.

"implies" is the strategy's definition and nothing more: a key a strategy does not list keeps
the user's value (an explicit ablation is never silently undone). `implied_changes(cfg)` names
what configuring changed, for the run log.

Aggregation `stack` (FLoRA) makes the rank grow: the server keeps the cumulative stacked
factors of all rounds under `stacked.<factor name>` in the global state; a client merges
scaling * B @ A of them into its frozen base weights and restarts its generic adapter from the
initial factors (B = 0) every round, so the factors it sends are exactly the round's update.

Server optimizer (`federation.server_optimizer`, `fl.server_optim`): applied to the aggregated
update of the dense shared tensors. LoRA factors are replaced by their aggregate (`exact` gives
them a new basis every round, so per-coordinate Adam moments would mix unrelated directions);
BatchNorm running statistics get the plain average.

Client order: updates are aggregated sorted by center id, whatever order they arrived in.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedmrg.config import ConfigError, ExperimentConfig
from fedmrg.fl.lowrank import (
    aggregate_lora_states,
    decompress,
    is_lora_factor,
    lora_pairs,
    normalize_weights,
)
from fedmrg.fl.messages import STACKED, ClientUpdate, RoundPlan
from fedmrg.fl.server_optim import ServerSGD, make_server_optimizer
from fedmrg.model.losses import log_prior_from_counts, merge_prototypes

STATISTICS = ("running_mean", "running_var")  # averaged, never moved by a server optimizer
PROTOTYPES, LABEL_COUNTS = "prototypes", "label_counts"  # RoundPlan.collect entries


class FederationError(ValueError):
    """A round cannot be configured or aggregated; the message names the center/tensor/value."""


# --------------------------------------------------------------------------- helpers


def sample_clients(centers: Sequence[str], fraction: float, min_clients: int,
                   rng: np.random.Generator) -> list[str]:
    """Seeded sampling of max(min_clients, ceil(fraction * n)) of `centers`, returned sorted.

    The candidates are sorted first, so the draw depends on the RNG state and the set of
    centers only, never on the order a pool lists them in. Sampling all of them draws nothing
    from the RNG.
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
    return sorted(pool[int(i)] for i in chosen)


def _set_key(cfg: Any, key: str, value: Any) -> None:
    *path, last = key.split(".")
    for part in path:
        cfg = getattr(cfg, part)
    if not hasattr(cfg, last):
        raise ConfigError(f"strategy implies unknown config key {key!r}")
    setattr(cfg, last, value)


def _by_center(updates: Sequence[ClientUpdate]) -> list[ClientUpdate]:
    """Updates sorted by center id (fixed aggregation order); a duplicate center is an error."""
    ordered = sorted(updates, key=lambda u: u.center)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if a.center == b.center:
            raise FederationError(f"two updates from center {a.center!r} in one round")
    if not ordered:
        raise FederationError("no update to aggregate")
    return ordered


# --------------------------------------------------------------------------- base


class Strategy:
    """Base strategy (see the module docstring). Subclasses override `plan` and
    `aggregate_round`; `implies` lists the config keys their definition fixes."""

    name = "base"
    implies: dict[str, Any] = {}  # "section.key" -> value

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = self.configure(cfg)
        self._global: dict[str, Tensor] | None = None

    # ----------------------------------------------------------------- config

    def configure(self, cfg: ExperimentConfig) -> ExperimentConfig:
        """A copy of `cfg` with the keys in `implies` set; every other key as the user set it."""
        out = copy.deepcopy(cfg)
        for key, value in self.implies.items():
            _set_key(out, key, value)
        return out

    def implied_changes(self, cfg: ExperimentConfig) -> dict[str, tuple[Any, Any]]:
        """{key: (user's value, strategy's value)} for every key `configure` changes."""
        before, after = cfg.flat(), self.configure(cfg).flat()
        return {k: (before[k], after[k]) for k in before if before[k] != after[k]}

    # ----------------------------------------------------------------- rounds

    def initialize(self, global_state: dict[str, Tensor]) -> None:
        """Start from the shared state of a freshly built model (identical on every client)."""
        self._global = {n: t.detach().clone() for n, t in global_state.items()}

    def configure_round(self, round_id: int, centers: Sequence[str],
                        rng: np.random.Generator) -> list[str]:
        """The centers that train this round, sorted (seeded sampling, `sample_clients`)."""
        fed = self.cfg.federation
        return sample_clients(centers, fed.fraction, fed.min_clients, rng)

    def plan(self, round_id: int, center: str) -> RoundPlan:
        raise NotImplementedError

    def aggregate_round(self, round_id: int, updates: list[ClientUpdate]) -> dict[str, float]:
        """Fold the round's updates into the server state; returns round metrics."""
        raise NotImplementedError

    def global_state(self) -> dict[str, Tensor] | None:
        """What a client loads as the server's model (None for `local`: there is none).
        The same object until the next aggregation, so plans of one round share it."""
        return self._global

    def update_spec(self) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
        """Names and shapes an update must carry: (lora factors, dense tensors)."""
        if self._global is None:
            return {}, {}
        lora = {n: tuple(t.shape) for n, t in self._global.items() if is_lora_factor(n)}
        dense = {n: tuple(t.shape) for n, t in self._global.items() if not is_lora_factor(n)}
        return lora, dense

    # ----------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "global": self._global}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise FederationError(f"strategy state of {state.get('name')!r} loaded into "
                                  f"{self.name!r}")
        self._global = state["global"]


# --------------------------------------------------------------------------- fedavg family


class FedAvg(Strategy):
    """Sample-weighted averaging of the generic adapter and the dense shared tensors."""

    name = "fedavg"
    implies = {
        "model.specialized_adapter": False,
        "model.losses.lm_personal": 0.0,
        "model.losses.mutual": 0.0,
        "model.losses.contrastive_global": 0.0,
        "model.losses.contrastive_local": 0.0,
        "federation.aggregation": "fedavg",
        "federation.dense_update_rank": 0,
        "federation.download_rank": 0,
    }

    def __init__(self, cfg: ExperimentConfig):
        super().__init__(cfg)
        fed = self.cfg.federation
        self.aggregation = fed.aggregation
        self.optimizer: ServerSGD = make_server_optimizer(fed.server_optimizer, fed.server_lr)
        self._initial_lora: dict[str, Tensor] = {}  # stack: every round restarts from these
        self._stacked: dict[str, Tensor] = {}  # stack: cumulative factors of all rounds
        self._plan_state: dict[str, Tensor] | None = None

    # ----------------------------------------------------------------- plans

    def fedprox_mu(self) -> float:
        return 0.0

    def collect(self) -> tuple[str, ...]:
        return ()

    def plan(self, round_id: int, center: str) -> RoundPlan:
        return RoundPlan(round_id=round_id, global_state=self.global_state(),
                         local_steps=self.cfg.train.local_steps, fedprox_mu=self.fedprox_mu(),
                         collect=self.collect())

    def initialize(self, global_state: dict[str, Tensor]) -> None:
        super().initialize(global_state)
        self._initial_lora = {n: t for n, t in self._global.items() if is_lora_factor(n)}
        self._stacked = {}
        self._plan_state = None

    def global_state(self) -> dict[str, Tensor] | None:
        if self._global is None or self.aggregation != "stack" or not self._stacked:
            return self._global
        if self._plan_state is None:
            self._plan_state = {**self._global,
                                **{STACKED + n: t for n, t in self._stacked.items()}}
        return self._plan_state

    # ----------------------------------------------------------------- aggregation

    def aggregate_round(self, round_id: int, updates: list[ClientUpdate]) -> dict[str, float]:
        if self._global is None:
            raise FederationError(f"{self.name}: aggregate_round before initialize")
        updates = _by_center(updates)
        weights = [u.num_samples for u in updates]
        for u in updates:
            if isinstance(u.num_samples, bool) or not (
                    isinstance(u.num_samples, numbers.Integral) and u.num_samples > 0):
                raise FederationError(f"center {u.center!r}: num_samples {u.num_samples!r} is "
                                      f"not a positive integer")
        metrics = {"clients": float(len(updates)), "weight_total": float(sum(weights))}
        metrics.update(self._aggregate_lora(updates, weights))
        metrics.update(self._aggregate_dense(updates, weights))
        self._plan_state = None
        return metrics

    def _aggregate_lora(self, updates: list[ClientUpdate], weights: list[int],
                        ) -> dict[str, float]:
        expected, _ = self.update_spec()
        for u in updates:
            if set(u.lora) != set(expected):
                missing = sorted(set(expected) - set(u.lora))
                extra = sorted(set(u.lora) - set(expected))
                raise FederationError(f"center {u.center!r}: LoRA factors do not match the "
                                      f"global adapter (missing {missing[:3]}, unexpected "
                                      f"{extra[:3]})")
        if not expected:
            return {}
        states = [u.lora for u in updates]
        if self.aggregation == "stack":
            # Clients restarted from B = 0, so their factors are the round's update; the
            # stack of them is appended to the cumulative stack (rank grows, module docstring).
            round_stack = aggregate_lora_states("stack", states, weights)
            for pair in lora_pairs(round_stack).values():
                a, b = round_stack[pair.a_key], round_stack[pair.b_key]
                if pair.a_key in self._stacked:
                    a = torch.cat([self._stacked[pair.a_key], a], dim=0)
                    b = torch.cat([self._stacked[pair.b_key], b], dim=1)
                self._stacked[pair.a_key], self._stacked[pair.b_key] = a, b
            rank = max(t.shape[0] for n, t in self._stacked.items() if ".lora_A." in n)
            return {"lora_rank": float(rank)}
        aggregated = aggregate_lora_states(self.aggregation, states, weights)
        self._global.update(aggregated)
        return {}

    def _aggregate_dense(self, updates: list[ClientUpdate], weights: list[int],
                         ) -> dict[str, float]:
        _, expected = self.update_spec()
        w = normalize_weights(weights).tolist()
        mean: dict[str, Tensor] = {}
        for name, shape in expected.items():
            total = None
            for wk, u in zip(w, updates, strict=True):
                if name not in u.dense:
                    raise FederationError(f"center {u.center!r}: no update for shared tensor "
                                          f"{name!r}")
                delta = decompress(u.dense[name]).to(torch.float64)
                if tuple(delta.shape) != shape:
                    raise FederationError(f"center {u.center!r}: update of {name!r} has shape "
                                          f"{tuple(delta.shape)}, the global tensor {shape}")
                total = wk * delta if total is None else total + wk * delta
            mean[name] = total.to(self._global[name].dtype)
        for u in updates:
            extra = sorted(set(u.dense) - set(expected))
            if extra:
                raise FederationError(f"center {u.center!r}: update of unknown tensor "
                                      f"{extra[0]!r}")
        statistics = {n: d for n, d in mean.items() if n.endswith(STATISTICS)}
        weights_only = {n: d for n, d in mean.items() if n not in statistics}
        for name, delta in statistics.items():
            self._global[name] = self._global[name] + delta
        self.optimizer.step(self._global, weights_only)
        norm = math.sqrt(sum(float(d.double().pow(2).sum()) for d in weights_only.values()))
        return {"dense_update_norm": norm}

    # ----------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "initial_lora": self._initial_lora,
                "stacked": self._stacked, "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._initial_lora = dict(state["initial_lora"])
        self._stacked = dict(state["stacked"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._plan_state = None


class FedProx(FedAvg):
    """FedAvg + the proximal term mu/2 ||w - w_global||^2 in local training.

    mu is `train.fedprox_mu` (default 0.01, from the FedProx paper's grid); the other
    strategies send mu = 0.
    """

    name = "fedprox"

    def fedprox_mu(self) -> float:
        return self.cfg.train.fedprox_mu


class Centralized(FedAvg):
    """FedAvg over one client that holds the pooled data of every center."""

    name = "centralized"

    def configure_round(self, round_id: int, centers: Sequence[str],
                        rng: np.random.Generator) -> list[str]:
        if len(centers) != 1:
            raise FederationError(f"centralized trains one client over the pooled data; the "
                                  f"pool has {len(centers)}: {sorted(centers)}")
        return list(centers)


class FedMRG(FedAvg):
    """Generic adapter + dense low-rank updates + prototypes + global label prior."""

    name = "fedmrg"
    implies: dict[str, Any] = {}

    def __init__(self, cfg: ExperimentConfig):
        super().__init__(cfg)
        self.prototypes: Tensor | None = None  # (14, P)
        self.prototype_counts: Tensor | None = None  # (14,)
        self.label_counts: dict[str, Tensor] = {}  # center -> (14, 4), the latest it sent

    def collect(self) -> tuple[str, ...]:
        losses = self.cfg.model.losses
        wanted = ()
        if losses.contrastive_global > 0:
            wanted += (PROTOTYPES,)
        if losses.diagnosis > 0 and losses.diagnosis_logit_adjust_tau > 0:
            wanted += (LABEL_COUNTS,)
        return wanted

    def log_prior(self) -> Tensor | None:
        """(14, 4) log prior from the label counts of every center heard from so far."""
        if not self.label_counts:
            return None
        total = sum(c.to(torch.float64) for _, c in sorted(self.label_counts.items()))
        return log_prior_from_counts(total, self.cfg.model.losses.diagnosis_prior_smoothing)

    def plan(self, round_id: int, center: str) -> RoundPlan:
        plan = super().plan(round_id, center)
        plan.prototypes, plan.prototype_counts = self.prototypes, self.prototype_counts
        plan.log_prior = self.log_prior()
        return plan

    def aggregate_round(self, round_id: int, updates: list[ClientUpdate]) -> dict[str, float]:
        metrics = super().aggregate_round(round_id, updates)
        updates = _by_center(updates)
        if PROTOTYPES in self.collect():
            parts = [(u.prototypes, u.prototype_counts) for u in updates
                     if u.prototypes is not None and u.prototype_counts is not None]
            if parts:  # this round's participants only: older prototypes used older heads
                self.prototypes, self.prototype_counts = merge_prototypes(parts)
                metrics["prototype_classes"] = float((self.prototype_counts > 0).sum())
        if LABEL_COUNTS in self.collect():
            for u in updates:
                if u.label_counts is not None:
                    self.label_counts[u.center] = u.label_counts.detach().clone()
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "prototypes": self.prototypes,
                "prototype_counts": self.prototype_counts,
                "label_counts": dict(self.label_counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.prototypes = state["prototypes"]
        self.prototype_counts = state["prototype_counts"]
        self.label_counts = dict(state["label_counts"])


class Local(Strategy):
    """Every center trains alone: no global model, no aggregation, nothing but metrics sent."""

    name = "local"
    implies = {k: v for k, v in FedAvg.implies.items() if k.startswith("model.")}

    def initialize(self, global_state: dict[str, Tensor]) -> None:
        self._global = None  # every client starts from the same seeded weights anyway

    def plan(self, round_id: int, center: str) -> RoundPlan:
        return RoundPlan(round_id=round_id, global_state=None,
                         local_steps=self.cfg.train.local_steps)

    def aggregate_round(self, round_id: int, updates: list[ClientUpdate]) -> dict[str, float]:
        updates = _by_center(updates)
        for u in updates:
            if u.lora or u.dense:
                raise FederationError(f"center {u.center!r}: strategy local expects no model "
                                      f"update, got {len(u.lora) + len(u.dense)} tensors")
        return {"clients": float(len(updates)),
                "weight_total": float(sum(u.num_samples for u in updates))}


STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg, "fedprox": FedProx, "fedmrg": FedMRG, "local": Local,
    "centralized": Centralized,
}


def make_strategy(cfg: ExperimentConfig) -> Strategy:
    """The strategy named by `cfg.federation.strategy`; its `.cfg` is the configured config."""
    name = cfg.federation.strategy
    if name not in STRATEGIES:
        raise ConfigError(f"federation.strategy: {name!r} is not one of {sorted(STRATEGIES)}")
    return STRATEGIES[name](cfg)
