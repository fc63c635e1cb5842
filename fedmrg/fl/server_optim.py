"""Server optimizers on the aggregated update (Reddi et al. 2021, "Adaptive Federated
Optimization").

The server treats the round's aggregated update Delta = sum_k w_k (x_k - x) as a
pseudo-gradient (with the sign of a descent step already applied) and moves the global
tensors with it:

- `ServerSGD` (federation.server_optimizer = none): x <- x + lr * Delta; lr = 1 is FedAvg.
- `ServerAdam` (adam): m <- b1 m + (1 - b1) Delta; v <- b2 v + (1 - b2) Delta^2;
  x <- x + lr * m / (sqrt(v) + tau). As in the paper, no bias correction; tau bounds the
  per-coordinate step by lr * |m| / tau, so lr must be small (1e-2 .. 1e-3; lr = 1 moves every
  coordinate by about 1 per round).

Both act on the DENSE shared tensors only. LoRA factors aggregated by `exact` come back in a
new basis each round (the SVD of the aggregate), so per-coordinate moments of A and B would
mix unrelated directions; they are replaced by the aggregate instead (`fl/strategies/`).
Statistics that are not weights (BatchNorm running mean/var) are not optimized either: the
caller gives them the plain average.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from fedmrg.choices import ServerOptimizer, choice_values
from fedmrg.config import ConfigError


class ServerSGD:
    """x <- x + lr * Delta (module docstring); stateless."""

    def __init__(self, lr: float = 1.0):
        self.lr = float(lr)

    def step(self, params: dict[str, Tensor], deltas: Mapping[str, Tensor]) -> None:
        """Update `params` in place (their tensors are replaced, not mutated)."""
        for name, delta in deltas.items():
            params[name] = params[name] + self.lr * delta.to(params[name].dtype)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class ServerAdam(ServerSGD):
    """FedAdam (module docstring). Defaults b1, b2, tau are the paper's."""

    def __init__(self, lr: float, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3):
        super().__init__(lr)
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1 and tau > 0):
            raise ValueError(f"ServerAdam: need 0 <= beta1, beta2 < 1 and tau > 0, got "
                             f"beta1={beta1}, beta2={beta2}, tau={tau}")
        self.beta1, self.beta2, self.tau = beta1, beta2, tau
        self.m: dict[str, Tensor] = {}
        self.v: dict[str, Tensor] = {}

    def step(self, params: dict[str, Tensor], deltas: Mapping[str, Tensor]) -> None:
        for name, delta in deltas.items():
            d = delta.to(torch.float32)
            m = self.m.get(name, torch.zeros_like(d))
            v = self.v.get(name, torch.zeros_like(d))
            m = self.beta1 * m + (1 - self.beta1) * d
            v = self.beta2 * v + (1 - self.beta2) * d * d
            self.m[name], self.v[name] = m, v
            step = self.lr * m / (v.sqrt() + self.tau)
            params[name] = params[name] + step.to(params[name].dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"m": {n: t.clone() for n, t in self.m.items()},
                "v": {n: t.clone() for n, t in self.v.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.m = {n: t.clone() for n, t in state["m"].items()}
        self.v = {n: t.clone() for n, t in state["v"].items()}


def make_server_optimizer(name: str, lr: float) -> ServerSGD:
    """federation.server_optimizer: "none" -> ServerSGD(lr), "adam" -> ServerAdam(lr)."""
    if name == ServerOptimizer.NONE:
        return ServerSGD(lr)
    if name == ServerOptimizer.ADAM:
        return ServerAdam(lr)
    raise ConfigError(f"federation.server_optimizer: {name!r} is not one of "
                      f"{choice_values(ServerOptimizer)}")
