"""The `Strategy` interface: a server half, a client half and a payload schema in one module.

A strategy module (one file per strategy in this package) defines a `Strategy` subclass with a
`name`; the package registry (`fedmrg.fl.strategies.STRATEGIES`) finds it by itself, so adding a
strategy touches its own file and its tests only.

Server half (`Strategy`, run by the coordinator, no Ray):

    strategy = make_strategy(cfg)           # cfg.federation.strategy; strategy.cfg is configured
    strategy.initialize(global_state)       # shared state of a freshly built model
    for round_id in 1..R:
        centers = strategy.configure_round(round_id, pool.centers(), rng)
        plans = {c: strategy.plan(round_id, c) for c in centers}
        spec = strategy.update_spec()       # what each ClientUpdate must look like
        ... clients train, send ClientUpdates, validated against spec ...
        metrics = strategy.aggregate_round(round_id, updates)  # updates the global state

Client half (`ClientStrategy`, `Strategy.client_class`, one instance per `FederatedClient`):
what the client does with the model before training, what it loads from a plan, the extra
terms of its local training, which shared tensors it keeps as its own, and what it sends.

Payload schema: `Strategy.update_spec()` (`UpdateSpec`: LoRA factor and dense update names
and shapes, named statistics); plans carry the strategy's own `tensors` and scalar `config`.

`implies` is the strategy's definition and nothing more: a key a strategy does not list keeps
the user's value (an explicit ablation is never silently undone). `implied_changes(cfg)` names
what configuring changed, for the run log.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from fedmrg.config import ConfigError, ExperimentConfig, replace_keys
from fedmrg.fl.lowrank import is_lora_factor
from fedmrg.fl.messages import ClientUpdate, RoundPlan, UpdateSpec
from fedmrg.fl.wire import wire_quantization
from fedmrg.model.losses import log_prior_from_counts
from fedmrg.model.params import load_shared_state

if TYPE_CHECKING:  # the client half is handed its client; no import cycle at run time
    from fedmrg.fl.client import FederatedClient

STATISTICS = ("running_mean", "running_var")  # averaged, never moved by a server optimizer


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


def by_center(updates: Sequence[ClientUpdate]) -> list[ClientUpdate]:
    """Updates sorted by center id (fixed aggregation order); a duplicate center is an error."""
    ordered = sorted(updates, key=lambda u: u.center)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if a.center == b.center:
            raise FederationError(f"two updates from center {a.center!r} in one round")
    if not ordered:
        raise FederationError("no update to aggregate")
    return ordered


# --------------------------------------------------------------------------- client half


class ClientStrategy:
    """The client half of a strategy: hooks `FederatedClient` calls. The defaults are plain
    federated training of every shared tensor: load the global state as it is, no extra loss
    term, send every generic LoRA factor as trained and every other shared tensor's round
    update (trained - global) through error feedback. One instance per client: it may keep
    client-side state (it is rebuilt with the client, so nothing in it may need a checkpoint
    that `owned_shared` does not cover)."""

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self._noise: torch.Generator | None = None  # local DP noise, made on first use

    def prepare_model(self, model: Any) -> None:
        """Called once on the freshly built model, before its trainer and optimizer exist."""

    def owned_shared(self, names: Sequence[str]) -> set[str]:
        """The shared tensors (of `names`) that are this client's own, not the server's: kept
        in the client's checkpoint and never replaced by a plan. Default: none."""
        return set()

    def load_global_state(self, client: FederatedClient, state: Mapping[str, Tensor]) -> None:
        """Load a global state (from a plan, for an evaluation or an export) into the model."""
        load_shared_state(client.model, state)

    def training_terms(self, client: FederatedClient, plan: RoundPlan,
                       start: Mapping[str, Tensor]) -> dict[str, Any]:
        """Keyword arguments of `LocalTrainer.fit` for this round (`start`: the shared state
        as loaded). Default: the center's own label prior when the diagnosis loss uses one."""
        return {"log_prior": own_log_prior(client)}

    def keeps_batches(self, plan: RoundPlan) -> bool:
        """Whether `statistics` needs the round's training batches."""
        return False

    def sends_factor(self, name: str) -> bool:
        """Whether the update carries the shared LoRA factor `name` (as trained)."""
        return True

    def model_update(self, client: FederatedClient, start: Mapping[str, Tensor],
                     trained: Mapping[str, Tensor],
                     ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """(lora, dense) of the update: the factors `sends_factor` names, and for every other
        shared tensor not `owned_shared`, trained - start through the client's error feedback
        at `federation.dense_update_rank` (whole under `federation.whole_tensors`)."""
        owned = self.owned_shared(list(trained))
        lora = {n: t for n, t in trained.items()
                if is_lora_factor(n) and n not in owned and self.sends_factor(n)}
        deltas = {n: t - start[n] for n, t in trained.items()
                  if not is_lora_factor(n) and n not in owned}
        from fedmrg.choices import PrivacyMode
        from fedmrg.privacy.client import client_clips, privatize_update  # (import cycle)
        from fedmrg.privacy.dp import noise_generator

        if client_clips(self.cfg.privacy):  # before compression (docs/privacy.md)
            if self._noise is None and self.cfg.privacy.mode == PrivacyMode.LOCAL:
                self._noise = noise_generator(self.cfg.privacy.noise_seed, client.center)
            lora, deltas = privatize_update(self.cfg.privacy, client.center, start, lora,
                                            deltas, self._noise)
        fed = self.cfg.federation
        dense = client.error_feedback.compress_all(deltas, fed.dense_update_rank,
                                                   fed.whole_tensors,
                                                   wire_quantization(fed.wire_dtype))
        return lora, dense

    def statistics(self, client: FederatedClient, plan: RoundPlan,
                   batches: list[dict]) -> dict[str, Tensor]:
        """The named statistics the update carries besides the model update. Default: none."""
        return {}


def own_log_prior(client: FederatedClient) -> Tensor | None:
    """The center's own label prior (no communication needed), or None when the diagnosis
    loss does not use one."""
    losses = client.cfg.model.losses
    if losses.diagnosis > 0 and losses.diagnosis_logit_adjust_tau > 0:
        return log_prior_from_counts(client.label_counts(), losses.diagnosis_prior_smoothing)
    return None


# --------------------------------------------------------------------------- server half


class Strategy:
    """Base strategy (module docstring). Subclasses set `name`, override `plan` and
    `aggregate_round`, and name their client half in `client_class`; `implies` lists the
    config keys their definition fixes. `summary` is the one line the CLI shows; `order`
    places it in listings (tables read baselines first, fedmrg last); `pools_data`: the run
    builds ONE client over the pooled data of every center."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    order: ClassVar[int] = 50
    pools_data: ClassVar[bool] = False
    implies: ClassVar[dict[str, Any]] = {}  # "section.key" -> value
    client_class: ClassVar[type[ClientStrategy]] = ClientStrategy

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = self.configure(cfg)
        self._global: dict[str, Tensor] | None = None

    # ----------------------------------------------------------------- config

    @classmethod
    def configure(cls, cfg: ExperimentConfig) -> ExperimentConfig:
        """`cfg` with the keys in `implies` set, every other key as the user set it: `cfg`
        itself when it already has them (a resolved config: configuring is idempotent and
        costs nothing), else a validated copy."""
        flat = cfg.flat()
        changes = {key: value for key, value in cls.implies.items()
                   if key not in flat or flat[key] != value}
        if not changes:
            return cfg
        try:
            return replace_keys(cfg, changes)
        except ConfigError as e:
            raise ConfigError(f"strategy {cls.name!r} implies {e}") from None

    @classmethod
    def implied_changes(cls, cfg: ExperimentConfig) -> dict[str, tuple[Any, Any]]:
        """{key: (user's value, strategy's value)} for every key `configure` changes."""
        before, after = cfg.flat(), cls.configure(cfg).flat()
        return {k: (before[k], after[k]) for k in before if before[k] != after[k]}

    def client_strategy(self) -> ClientStrategy:
        """A client half for one client, on the configured config."""
        return self.client_class(self.cfg)

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
        The same object until the next aggregation, so plans of one round share it; an
        aggregation makes a new one and never changes a state already handed out."""
        return self._global

    def update_spec(self) -> UpdateSpec:
        """The payload schema of this round's updates: by default every LoRA factor and every
        other tensor of the global state, no statistics."""
        if self._global is None:
            return UpdateSpec()
        return UpdateSpec(
            lora={n: tuple(t.shape) for n, t in self._global.items() if is_lora_factor(n)},
            dense={n: tuple(t.shape) for n, t in self._global.items()
                   if not is_lora_factor(n)})

    def linear_problem(self) -> str | None:
        """Why aggregating this round's updates differs from aggregating one update carrying
        their weighted mean, or None when it does not: central DP and secure aggregation
        need the aggregate to be linear in what clients send (`fedmrg.privacy.linear`)."""
        return f"strategy {self.name!r} does not aggregate the mean of its clients' updates"

    # ----------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "global": self._global}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise FederationError(f"strategy state of {state.get('name')!r} loaded into "
                                  f"{self.name!r}")
        self._global = state["global"]


def strategy_classes(root: type[Strategy] = Strategy) -> Iterator[type[Strategy]]:
    """Every subclass of `root` (recursively) that names itself."""
    for cls in root.__subclasses__():
        if cls.__dict__.get("name"):
            yield cls
        yield from strategy_classes(cls)
