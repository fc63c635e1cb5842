"""`fedmrg`: the generic adapter aggregated with `federation.aggregation` (default `exact`),
dense shared tensors from their low-rank (error-feedback) updates, diagnosis prototypes merged
with `merge_prototypes` and sent back next round, the clients' label-state counts turned into a
global log prior for the logit-adjusted diagnosis loss. The specialized adapter and the local
head never leave the client. It implies nothing: every FedMRG mechanism is the user's switch
(ablations stay as set).

Payload: plans carry `tensors` "prototypes" (14, P), "prototype_counts" (14,) (after the first
round that merged some) and "log_prior" (14, 4) (once any center sent label counts), and
`config` flags "send_prototypes" / "send_label_counts" (what the round's losses use); updates
carry the statistics of the same names (`statistic_specs`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from fedmrg.config import ExperimentConfig
from fedmrg.data.schema import NUM_OBSERVATIONS, NUM_STATES
from fedmrg.fl.messages import ClientUpdate, RoundPlan, StatisticSpec, UpdateSpec
from fedmrg.fl.strategies.base import by_center, own_log_prior
from fedmrg.fl.strategies.fedavg import FedAvg, FedAvgClient
from fedmrg.model.losses import log_prior_from_counts, merge_prototypes

PROTOTYPES, PROTOTYPE_COUNTS, LABEL_COUNTS = "prototypes", "prototype_counts", "label_counts"
LOG_PRIOR = "log_prior"
SEND = {PROTOTYPES: "send_prototypes", LABEL_COUNTS: "send_label_counts"}  # plan config flags


def statistic_specs(projection_dim: int) -> dict[str, StatisticSpec]:
    """The statistics a fedmrg update may carry besides its model update: diagnosis prototypes
    in the global head's space (14, `model.projection_dim`), the samples behind each prototype
    (14,), the label-state counts of the train split (14, 4). Fixed by the model, never by how
    many samples a center has."""
    return {PROTOTYPES: StatisticSpec((NUM_OBSERVATIONS, projection_dim)),
            PROTOTYPE_COUNTS: StatisticSpec((NUM_OBSERVATIONS,), counts=True),
            LABEL_COUNTS: StatisticSpec((NUM_OBSERVATIONS, NUM_STATES), counts=True)}


class FedMRGClient(FedAvgClient):
    """Trains against the plan's prototypes and global prior (else the center's own prior);
    sends the prototypes of its global head on the round's batches and its label counts when
    the plan asks."""

    def training_terms(self, client: Any, plan: RoundPlan,
                       start: Mapping[str, Tensor]) -> dict[str, Any]:
        prior = plan.tensors.get(LOG_PRIOR)
        return {"prototypes": plan.tensors.get(PROTOTYPES),
                "proto_counts": plan.tensors.get(PROTOTYPE_COUNTS),
                "log_prior": prior if prior is not None else own_log_prior(client)}

    def keeps_batches(self, plan: RoundPlan) -> bool:
        return bool(plan.config.get(SEND[PROTOTYPES]))

    def statistics(self, client: Any, plan: RoundPlan, batches: list[dict],
                   ) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if plan.config.get(SEND[PROTOTYPES]):
            prototypes, counts = client.model.local_prototypes(batches)  # (14, P), (14,)
            out[PROTOTYPES], out[PROTOTYPE_COUNTS] = prototypes.cpu(), counts.cpu()
        if plan.config.get(SEND[LABEL_COUNTS]):
            out[LABEL_COUNTS] = client.label_counts()
        return out


class FedMRG(FedAvg):
    """Generic adapter + dense low-rank updates + prototypes + global label prior."""

    name = "fedmrg"
    summary = ("FedMRG: exact low-rank aggregation, prototypes, global label prior, private "
               "specialized adapter (the default)")
    order = 100
    implies: dict[str, Any] = {}
    client_class = FedMRGClient

    def __init__(self, cfg: ExperimentConfig):
        super().__init__(cfg)
        self.prototypes: Tensor | None = None  # (14, P)
        self.prototype_counts: Tensor | None = None  # (14,)
        self.label_counts: dict[str, Tensor] = {}  # center -> (14, 4), the latest it sent

    def collect(self) -> tuple[str, ...]:
        """The statistics the round's losses use: "prototypes", "label_counts"."""
        losses = self.cfg.model.losses
        wanted: tuple[str, ...] = ()
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

    def plan_tensors(self) -> dict[str, Tensor]:
        out = {}
        if self.prototypes is not None and self.prototype_counts is not None:
            out[PROTOTYPES], out[PROTOTYPE_COUNTS] = self.prototypes, self.prototype_counts
        prior = self.log_prior()
        if prior is not None:
            out[LOG_PRIOR] = prior
        return out

    def plan_config(self) -> dict[str, Any]:
        return {SEND[s]: True for s in self.collect()}

    def update_spec(self) -> UpdateSpec:
        spec = super().update_spec()
        specs = statistic_specs(self.cfg.model.projection_dim)
        wanted = self.collect()
        names = ((PROTOTYPES, PROTOTYPE_COUNTS) if PROTOTYPES in wanted else ()) + (
            (LABEL_COUNTS,) if LABEL_COUNTS in wanted else ())
        spec.statistics = {n: specs[n] for n in names}
        return spec

    def aggregate_round(self, round_id: int, updates: list[ClientUpdate]) -> dict[str, float]:
        metrics = super().aggregate_round(round_id, updates)
        updates = by_center(updates)
        if PROTOTYPES in self.collect():
            parts = [(u.statistics[PROTOTYPES], u.statistics[PROTOTYPE_COUNTS]) for u in updates
                     if PROTOTYPES in u.statistics and PROTOTYPE_COUNTS in u.statistics]
            if parts:  # this round's participants only: older prototypes used older heads
                self.prototypes, self.prototype_counts = merge_prototypes(parts)
                metrics["prototype_classes"] = float((self.prototype_counts > 0).sum())
        if LABEL_COUNTS in self.collect():
            for u in updates:
                if LABEL_COUNTS in u.statistics:
                    self.label_counts[u.center] = u.statistics[LABEL_COUNTS].detach().clone()
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
