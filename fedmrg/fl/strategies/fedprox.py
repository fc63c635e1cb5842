"""`fedprox`: fedavg + the proximal term mu/2 ||w - w_global||^2 in local training.

mu is `train.fedprox_mu` (default 0.01, from the FedProx paper's grid), sent in the plan's
config as `fedprox_mu`; the client half adds the term against the shared state as loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from fedmrg.fl.messages import RoundPlan
from fedmrg.fl.strategies.fedavg import FedAvg, FedAvgClient

MU = "fedprox_mu"  # the plan's config key


class FedProxClient(FedAvgClient):
    def training_terms(self, client: Any, plan: RoundPlan,
                       start: Mapping[str, Tensor]) -> dict[str, Any]:
        mu = float(plan.config.get(MU, 0.0))
        return {**super().training_terms(client, plan, start),
                "prox_reference": start if mu > 0 else None, "mu": mu}


class FedProx(FedAvg):
    """FedAvg + the proximal term in local training (module docstring)."""

    name = "fedprox"
    summary = "fedavg + the proximal term mu/2 ||w - w_global||^2 (train.fedprox_mu)"
    order = 30
    client_class = FedProxClient

    def plan_config(self) -> dict[str, Any]:
        return {MU: self.cfg.train.fedprox_mu}
