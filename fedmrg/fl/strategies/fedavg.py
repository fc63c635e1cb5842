"""`fedavg`: sample-weighted averaging of the generic adapter and the dense shared tensors.

Server: the generic LoRA factors are aggregated with `federation.aggregation` (implied
`fedavg`: factor by factor; `exact` and `stack` for the subclasses and ablations that keep the
user's choice), every other shared tensor gets the sample-weighted mean of the clients' dense
updates, applied through the server optimizer (`federation.server_optimizer`, `fl.server_optim`).
LoRA factors are replaced by their aggregate (`exact` gives them a new basis every round, so
per-coordinate Adam moments would mix unrelated directions); BatchNorm running statistics get
the plain average. Its definition implies (`FedAvg.implies`): no specialized adapter, no mutual
boosting, no contrastive heads, fedavg aggregation, dense updates and downloads (rank 0).

Aggregation `stack` (FLoRA) makes the rank grow: the server keeps the cumulative stacked
factors of all rounds under `stacked.<factor name>` in the global state; the client half merges
scaling * B @ A of them into its frozen base weights and restarts its generic adapter from the
initial factors (B = 0) every round, so the factors it sends are exactly the round's update.

Client order: updates are aggregated sorted by center id, whatever order they arrived in.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from fedmrg.choices import AggregationMethod
from fedmrg.config import ExperimentConfig
from fedmrg.fl.lowrank import (
    aggregate_lora_states,
    decompress,
    is_lora_factor,
    lora_matrices,
    lora_pairs,
    normalize_weights,
)
from fedmrg.fl.messages import STACKED, ClientUpdate, RoundPlan
from fedmrg.fl.server_optim import ServerSGD, make_server_optimizer
from fedmrg.fl.strategies.base import (
    STATISTICS,
    ClientStrategy,
    FederationError,
    Strategy,
    by_center,
)
from fedmrg.model.params import load_shared_state


class FedAvgClient(ClientStrategy):
    """Plain federated training; merges `stacked.` factors (aggregation `stack`) into the
    frozen base weights when a global state carries them."""

    def __init__(self, cfg: ExperimentConfig):
        super().__init__(cfg)
        self._base_weights: dict[str, Tensor] = {}  # module -> original base weight (stack)

    def load_global_state(self, client: Any, state: Mapping[str, Tensor]) -> None:
        stacked = {n[len(STACKED):]: t for n, t in state.items() if n.startswith(STACKED)}
        load_shared_state(client.model, {n: t for n, t in state.items()
                                         if not n.startswith(STACKED)})
        self._merge_into_base(client.model, stacked)

    @torch.no_grad()
    def _merge_into_base(self, model: Any, stacked: Mapping[str, Tensor]) -> None:
        """base weight = original + scaling * B @ A for each stacked pair (FLoRA); modules
        without one get their original weight back."""
        merged = set()
        for pair in lora_pairs(stacked).values():
            layer = model.get_submodule(pair.module)
            if getattr(layer, "fan_in_fan_out", False):
                raise FederationError(f"{pair.module}: stack aggregation does not support "
                                      f"fan_in_fan_out layers")
            weight = layer.get_base_layer().weight
            original = self._base_weights.setdefault(pair.module, weight.detach().clone())
            A, B = lora_matrices(stacked[pair.a_key], stacked[pair.b_key])
            delta = (B.double() @ A.double()).reshape(original.shape) * layer.scaling[pair.adapter]
            weight.copy_((original.double() + delta.to(original.device)).to(weight.dtype))
            merged.add(pair.module)
        for module, original in self._base_weights.items():
            if module not in merged:
                model.get_submodule(module).get_base_layer().weight.copy_(original)


class FedAvg(Strategy):
    """Sample-weighted averaging of the generic adapter and the dense shared tensors."""

    name = "fedavg"
    summary = "sample-weighted mean of the generic adapter and every shared tensor"
    order = 20
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
    client_class = FedAvgClient

    lora_mean: ClassVar[bool] = False  # the LoRA aggregate is the factors' mean, always

    def __init__(self, cfg: ExperimentConfig):
        super().__init__(cfg)
        fed = self.cfg.federation
        self.aggregation = fed.aggregation
        self.optimizer: ServerSGD = make_server_optimizer(fed.server_optimizer, fed.server_lr)
        self._initial_lora: dict[str, Tensor] = {}  # stack: every round restarts from these
        self._stacked: dict[str, Tensor] = {}  # stack: cumulative factors of all rounds
        self._plan_state: dict[str, Tensor] | None = None

    # ----------------------------------------------------------------- plans

    def plan_tensors(self) -> dict[str, Tensor]:
        """The strategy's own tensors in every plan (none here)."""
        return {}

    def plan_config(self) -> dict[str, Any]:
        """The strategy's own scalars in every plan (none here)."""
        return {}

    def plan(self, round_id: int, center: str) -> RoundPlan:
        return RoundPlan(round_id=round_id, global_state=self.global_state(),
                         local_steps=self.cfg.train.local_steps, tensors=self.plan_tensors(),
                         config=self.plan_config())

    def initialize(self, global_state: dict[str, Tensor]) -> None:
        super().initialize(global_state)
        self._initial_lora = {n: t for n, t in self._global.items() if is_lora_factor(n)}
        self._stacked = {}
        self._plan_state = None

    def global_state(self) -> dict[str, Tensor] | None:
        if self._global is None or self.aggregation != AggregationMethod.STACK or not self._stacked:
            return self._global
        if self._plan_state is None:
            self._plan_state = {**self._global,
                                **{STACKED + n: t for n, t in self._stacked.items()}}
        return self._plan_state

    # ----------------------------------------------------------------- aggregation

    def aggregate_round(self, round_id: int, updates: list[ClientUpdate]) -> dict[str, float]:
        if self._global is None:
            raise FederationError(f"{self.name}: aggregate_round before initialize")
        updates = by_center(updates)
        weights = [u.num_samples for u in updates]
        for u in updates:
            if isinstance(u.num_samples, bool) or not (
                    isinstance(u.num_samples, numbers.Integral) and u.num_samples > 0):
                raise FederationError(f"center {u.center!r}: num_samples {u.num_samples!r} is "
                                      f"not a positive integer")
        metrics = {"clients": float(len(updates)), "weight_total": float(sum(weights))}
        # A state handed out (`global_state`) never changes: plans, evaluations and the
        # client pool's object-store copy may still hold it, so the round writes a new dict.
        self._global = dict(self._global)
        metrics.update(self._aggregate_lora(updates, weights))
        metrics.update(self._aggregate_dense(updates, weights))
        self._plan_state = None
        return metrics

    def _check_lora_names(self, updates: list[ClientUpdate]) -> dict[str, tuple[int, ...]]:
        expected = self.update_spec().lora
        for u in updates:
            if set(u.lora) != set(expected):
                missing = sorted(set(expected) - set(u.lora))
                extra = sorted(set(u.lora) - set(expected))
                raise FederationError(f"center {u.center!r}: LoRA factors do not match the "
                                      f"global adapter (missing {missing[:3]}, unexpected "
                                      f"{extra[:3]})")
        return expected

    def _aggregate_lora(self, updates: list[ClientUpdate], weights: list[int],
                        ) -> dict[str, float]:
        expected = self._check_lora_names(updates)
        if not expected:
            return {}
        states = [u.lora for u in updates]
        if self.aggregation == AggregationMethod.STACK:
            # Clients restarted from B = 0, so their factors are the round's update; the
            # stack of them is appended to the cumulative stack (rank grows, module docstring).
            round_stack = aggregate_lora_states(AggregationMethod.STACK, states, weights)
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
        expected = self.update_spec().dense
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

    def linear_problem(self) -> str | None:
        statistics = sorted(self.update_spec().statistics)
        if statistics:
            return (f"strategy {self.name!r}: its updates carry statistics {statistics}, "
                    f"merged client by client")
        if not self.lora_mean and self.aggregation != "fedavg":
            return (f"strategy {self.name!r} with federation.aggregation "
                    f"{self.aggregation!r}: needs each client's factors (only 'fedavg', the "
                    f"mean factor by factor, is linear)")
        return None

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
