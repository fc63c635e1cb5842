"""The linear aggregate that central DP and secure aggregation share (pure, no Ray).

A strategy is linear in what clients send when its aggregation of K updates is the same as
its aggregation of one update carrying their weighted mean: fedavg of LoRA factors (factor by
factor), FFA-LoRA (mean of B, A frozen), FedSA-LoRA (mean of A), and the mean of dense
deltas. The aggregate is then computed in the space of changes (a LoRA factor X as X - G
against the round's global factor G, a dense or low-rank delta as its dense tensor), where a
noise draw or a masked sum is added, and handed to the strategy as one `ClientUpdate`.
Exact (SVD) or stacked aggregation, and statistics such as fedmrg's prototypes, need each
client's own values: they are not linear (`Strategy.linear_problem`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedmrg.fl.lowrank import decompress
from fedmrg.fl.messages import ClientUpdate
from fedmrg.privacy import PrivacyError

_F64 = torch.float64


def update_changes(update: ClientUpdate, reference: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """{name: float64 change}: LoRA factors X - G (same shape as the global factor), dense
    and low-rank deltas as dense tensors."""
    out: dict[str, Tensor] = {}
    for name, x in update.lora.items():
        g = reference[name]
        if tuple(x.shape) != tuple(g.shape):
            raise PrivacyError(f"center {update.center!r}: LoRA factor {name!r} has shape "
                               f"{tuple(x.shape)}, the global one {tuple(g.shape)}; a linear "
                               f"aggregate needs one rank")
        out[name] = x.detach().to(_F64) - g.detach().to(_F64).to(x.device)
    for name, u in update.dense.items():
        out[name] = decompress(u).detach().to(_F64)
    return out


def update_from_changes(changes: Mapping[str, Tensor], reference: Mapping[str, Tensor],
                        lora_names: Sequence[str], *, round_id: int, center: str,
                        num_samples: int) -> ClientUpdate:
    """The `ClientUpdate` that applies `changes` to `reference`: LoRA factors G + change,
    dense deltas as they are, each in the global tensor's dtype."""
    lora_set = set(lora_names)
    lora = {n: (reference[n].to(_F64) + c.to(reference[n].device)).to(reference[n].dtype)
            for n, c in changes.items() if n in lora_set}
    dense = {n: c.to(reference[n].dtype) for n, c in changes.items() if n not in lora_set}
    return ClientUpdate(round_id=round_id, center=center, num_samples=num_samples, lora=lora,
                        dense=dense)


def sum_changes(updates: Sequence[ClientUpdate], reference: Mapping[str, Tensor],
                weights: Sequence[float]) -> dict[str, Tensor]:
    """sum_k weights_k * changes_k, float64, names of the first update."""
    if not updates:
        raise PrivacyError("no update to aggregate")
    total: dict[str, Tensor] = {}
    for w, update in zip(weights, updates, strict=True):
        for name, change in update_changes(update, reference).items():
            total[name] = w * change if name not in total else total[name] + w * change
    return total
