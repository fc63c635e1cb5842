"""`ffa_lora`: FFA-LoRA (Sun et al., ICLR 2024): the LoRA A factors stay frozen at their seeded
initialization on every client, only B is trained and sent, the server keeps the
sample-weighted mean of B.

Exact by construction: every client holds the same A (built from the same seed, never
trained), so the mean of the clients' adapters is the adapter of the mean B:
sum_k w_k B_k A = (sum_k w_k B_k) A. (FedAvg averages A and B separately, which is not.)
Everything else is fedavg: the same implied switches (no specialized adapter, no contrastive
heads, dense updates of the other shared tensors, averaged).

Payload: updates carry the B factors only (`update_spec().lora`); plans carry the global state,
A included (unchanged from round to round).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fedmrg.fl.lowrank import is_lora_factor, normalize_weights
from fedmrg.fl.messages import ClientUpdate, UpdateSpec
from fedmrg.fl.strategies.base import ClientStrategy
from fedmrg.fl.strategies.fedavg import FedAvg
from fedmrg.model.params import parameter_groups


def is_factor_a(name: str) -> bool:
    return is_lora_factor(name) and ".lora_A." in name


def mean_of_factors(updates: Sequence[ClientUpdate], weights: Sequence[int],
                    names: Sequence[str], like: dict[str, Tensor]) -> dict[str, Tensor]:
    """{name: sum_k w_k X_k} over the updates' LoRA factors `names`, weights normalized,
    computed in float64 and returned in the dtype of `like[name]`."""
    w = normalize_weights(list(weights)).tolist()
    return {n: sum(wk * u.lora[n].to(torch.float64) for wk, u in zip(w, updates, strict=True)
                   ).to(like[n].dtype) for n in names}


class FFALoRAClient(ClientStrategy):
    """Freezes the shared A factors before the trainer is built (they are never in its
    optimizer); sends the B factors only."""

    def prepare_model(self, model: Any) -> None:
        for name, param in parameter_groups(model)["shared"].items():
            if is_factor_a(name):
                param.requires_grad_(False)

    def sends_factor(self, name: str) -> bool:
        return not is_factor_a(name)


class FFALoRA(FedAvg):
    """A frozen and shared, B trained and averaged (module docstring)."""

    name = "ffa_lora"
    summary = "FFA-LoRA: LoRA A frozen at its seeded init, only B trained and averaged (exact)"
    order = 40
    implies = dict(FedAvg.implies)
    client_class = FFALoRAClient
    lora_mean = True  # exact under summation (module docstring)

    def update_spec(self) -> UpdateSpec:
        spec = super().update_spec()
        spec.lora = {n: s for n, s in spec.lora.items() if not is_factor_a(n)}
        return spec

    def _aggregate_lora(self, updates: list[ClientUpdate], weights: list[int],
                        ) -> dict[str, float]:
        names = list(self._check_lora_names(updates))
        self._global.update(mean_of_factors(updates, weights, names, self._global))
        return {}
