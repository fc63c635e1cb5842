"""`fedsa_lora`: FedSA-LoRA (Guo et al., ICLR 2025): the LoRA A factors are shared and
aggregated (sample-weighted mean), the B factors stay on each client, private.

A learns what is common to the clients, B what is specific to each; the server never sees B.
Everything else is fedavg: the same implied switches, dense updates of the other shared tensors,
averaged. The global state holds no B: a client loads it around its own B (`owned_shared`, kept
in the client's checkpoint). So every evaluation of a center uses that center's B ("generic"
and "personalized" are both global A + own B); a held-out center is evaluated by the first
client's model, and the exported generic adapter holds that client's B.

Payload: updates carry the A factors only (`update_spec().lora`, from the global state).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from fedmrg.fl.lowrank import is_lora_factor
from fedmrg.fl.messages import ClientUpdate
from fedmrg.fl.strategies.base import ClientStrategy
from fedmrg.fl.strategies.fedavg import FedAvg
from fedmrg.fl.strategies.ffa_lora import mean_of_factors
from fedmrg.model.params import get_shared_state, load_shared_state


def is_factor_b(name: str) -> bool:
    return is_lora_factor(name) and ".lora_B." in name


class FedSALoRAClient(ClientStrategy):
    """Keeps its B factors: never replaced by a global state, never sent, checkpointed."""

    def owned_shared(self, names: Sequence[str]) -> set[str]:
        return {n for n in names if is_factor_b(n)}

    def load_global_state(self, client: Any, state: Mapping[str, Tensor]) -> None:
        own = {n: t for n, t in get_shared_state(client.model).items() if is_factor_b(n)}
        load_shared_state(client.model, {**state, **own})


class FedSALoRA(FedAvg):
    """A shared and averaged, B private (module docstring)."""

    name = "fedsa_lora"
    summary = "FedSA-LoRA: LoRA A shared and averaged, B kept private on each client"
    order = 45
    implies = dict(FedAvg.implies)
    client_class = FedSALoRAClient
    lora_mean = True  # the mean of the A factors (module docstring)

    def initialize(self, global_state: dict[str, Tensor]) -> None:
        super().initialize({n: t for n, t in global_state.items() if not is_factor_b(n)})

    def _aggregate_lora(self, updates: list[ClientUpdate], weights: list[int],
                        ) -> dict[str, float]:
        names = list(self._check_lora_names(updates))
        self._global.update(mean_of_factors(updates, weights, names, self._global))
        return {}
