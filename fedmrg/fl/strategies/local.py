"""`local`: no aggregation; every client keeps and trains its own model, plans carry no state
and updates no tensors. Same model switches as fedavg (the plain model, trained alone)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from fedmrg.fl.messages import ClientUpdate, RoundPlan
from fedmrg.fl.strategies.base import ClientStrategy, FederationError, Strategy, by_center
from fedmrg.fl.strategies.fedavg import FedAvg


class LocalClient(ClientStrategy):
    """Every shared tensor is the client's own model: checkpointed with the client."""

    def owned_shared(self, names: Sequence[str]) -> set[str]:
        return set(names)


class Local(Strategy):
    """Every center trains alone: no global model, no aggregation, nothing but metrics sent."""

    name = "local"
    summary = "every center trains its own model alone (lower baseline)"
    order = 10
    implies = {k: v for k, v in FedAvg.implies.items() if k.startswith("model.")}
    client_class = LocalClient

    def initialize(self, global_state: dict[str, Tensor]) -> None:
        self._global = None  # every client starts from the same seeded weights anyway

    def plan(self, round_id: int, center: str) -> RoundPlan:
        return RoundPlan(round_id=round_id, global_state=None,
                         local_steps=self.cfg.train.local_steps)

    def aggregate_round(self, round_id: int, updates: list[ClientUpdate]) -> dict[str, float]:
        updates = by_center(updates)
        for u in updates:
            if u.lora or u.dense:
                raise FederationError(f"center {u.center!r}: strategy local expects no model "
                                      f"update, got {len(u.lora) + len(u.dense)} tensors")
        return {"clients": float(len(updates)),
                "weight_total": float(sum(u.num_samples for u in updates))}
