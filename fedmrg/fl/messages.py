"""The messages of a federated round: what goes down to a client, what comes back, what a round
leaves in the history.

- `RoundPlan` (server -> client): the round id, the global shared state (None for the `local`
  strategy: the client keeps its own model and sends no model update) or, for a client that
  holds the previous round's state, the low-rank delta to the new one (`fl.broadcast`); the
  local steps of the round; and the strategy's own named tensors and scalar config (its client
  half reads them). A global state may hold `stacked.`-prefixed LoRA factors (aggregation
  `stack`, FLoRA): a cumulative update the fedavg family's client half merges into the frozen
  base weights.
- `ClientUpdate` (client -> server): the ONLY thing a client sends after training. Model-level
  aggregates only: adapter factors, low-rank (or dense) updates of shared tensors, the named
  statistics its strategy asked for (fedmrg: diagnosis prototypes, label-state counts), scalar
  metrics. Never rows, report text, image bytes or per-sample tensors. Its form is the
  strategy's `UpdateSpec` (the payload schema `fl.validation` checks).
- `EvalReply` (client -> server): metrics of one evaluation and a few sample generations.
  Generated text is the one piece of text that leaves a center, and only on evaluation, for
  MLflow's table of sample reports; a deployment that forbids it sets `eval.samples: 0`, and
  each center can narrow what its replies carry with its own disclosure policy
  (`fedmrg.privacy.disclosure`); the coordinator validates every reply
  (`fl.validation.validate_eval_reply`).
- `RoundSummary`: bookkeeping of one round for the history, MLflow and the progress bar:
  who was aggregated, who was rejected and why, who was clipped or rejoined after a restart,
  how many attempts the round took.

Plain dataclasses of tensors and numbers: picklable for Ray, countable by `fl.wire.message_bytes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from fedmrg.fl.broadcast import StateDelta
from fedmrg.fl.lowrank import LowRankUpdate
from fedmrg.privacy.disclosure import DisclosurePolicy

STACKED = "stacked."  # prefix of cumulative FLoRA factors in a global state (aggregation stack)


Scalar = bool | int | float | str  # a plan's config value


@dataclass
class RoundPlan:
    """What one client gets for one round. `tensors` and `config` are the strategy's own
    (named by its server half, read by its client half): e.g. fedmrg's merged prototypes and
    global label prior, fedprox's mu."""

    round_id: int
    global_state: dict[str, Tensor] | None  # shared tensors by state-dict name; None: keep own
    local_steps: int = 1
    tensors: dict[str, Tensor] = field(default_factory=dict)
    config: dict[str, Scalar] = field(default_factory=dict)
    # the downlink (`fl.broadcast`): the version of `global_state`, or instead of it the
    # low-rank delta that brings a client holding `global_delta.base_version` up to date
    state_version: int | None = None
    global_delta: StateDelta | None = None
    # secure aggregation (`fedmrg.privacy.client.SecAggPlan`): who masks with whom, the key
    # shares addressed to this client, the vector's layout; None: the update goes in the clear
    secure_aggregation: Any = None


@dataclass
class ClientUpdate:
    """What one client sends back after a round of local training (and nothing else)."""

    round_id: int
    center: str
    num_samples: int  # samples seen this round: the aggregation weight
    lora: dict[str, Tensor]  # adapter factors after training, as they are (those the spec names)
    # every other shared tensor: trained - global, a LowRankUpdate (rank dense_update_rank,
    # error feedback on the client) or a dense tensor (rank 0, 1-D, or too small to factorize)
    dense: dict[str, LowRankUpdate | Tensor]
    # model-level statistics the strategy asked for, by name (fedmrg: "prototypes" (14, P),
    # "prototype_counts" (14,), "label_counts" (14, 4)); never rows of samples
    statistics: dict[str, Tensor] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    # secure aggregation: the masked fixed-point vector (int64 view of uint64) that stands
    # for lora and dense, which are then empty (`fedmrg.privacy.secagg`)
    masked: Tensor | None = None


@dataclass(frozen=True)
class StatisticSpec:
    """The one shape a statistic may have; `counts`: its values must be >= 0."""

    shape: tuple[int, ...]
    counts: bool = False


@dataclass
class UpdateSpec:
    """The payload schema a strategy publishes for a round's `ClientUpdate`s: the names and
    shapes of the LoRA factors (any rank) and dense updates it must carry, and the statistics
    it may carry. `fl.validation.validate_update` checks every update against it."""

    lora: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dense: dict[str, tuple[int, ...]] = field(default_factory=dict)
    statistics: dict[str, StatisticSpec] = field(default_factory=dict)


@dataclass
class EvalReply:
    """One evaluation on one client: `view` is "generalization" or "personalization"."""

    center: str  # the dataset evaluated (the held-out center for an unseen-center evaluation)
    view: str
    metrics: dict[str, float]
    # {generated, states, findings} and, when the run and the center allow, {study_id,
    # reference, true_findings} (`fedmrg.privacy.disclosure`)
    samples: list[dict[str, Any]] = field(default_factory=list)
    # the dataset center's own disclosure policy the samples were chosen under
    disclosure: DisclosurePolicy = field(default_factory=DisclosurePolicy)
    # when the run asks (eval.per_study) and the policy allows: per test study, in study-id
    # order, "ce_labels" [[14 generated codes], [14 reference codes]] and "bleu" (the 10
    # `fedmrg.eval.nlg.bleu_statistics` counts); no text, no study id
    per_study: dict[str, list] = field(default_factory=dict)


@dataclass
class RoundSummary:
    """One finished round, as the coordinator records it."""

    round_id: int
    participants: list[str]  # centers whose update was aggregated, sorted
    rejected: dict[str, str]  # center -> why its reply was not aggregated
    bytes_up: int
    bytes_down: int
    dense_equivalent_up: int  # what the same updates would have cost sent dense
    aggregation_time_s: float
    round_time_s: float
    # round-level numbers (strategy, clients' mean and "<center>/<metric>", and the counts of
    # rejections, clipping, late and duplicate replies: see fedmrg.fl.coordinator)
    metrics: dict[str, float] = field(default_factory=dict)
    clipped: dict[str, float] = field(default_factory=dict)  # center -> its norm before clipping
    rejoined: list[str] = field(default_factory=list)  # centers back after an actor restart
    attempts: int = 1  # 1 + the retries this round needed (federation.round_retries)
    # the rejections of each earlier attempt that had fewer than min_clients usable updates
    failed_attempts: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"round_id": self.round_id, "participants": list(self.participants),
                "rejected": dict(self.rejected), "bytes_up": self.bytes_up,
                "bytes_down": self.bytes_down, "dense_equivalent_up": self.dense_equivalent_up,
                "aggregation_time_s": self.aggregation_time_s, "round_time_s": self.round_time_s,
                "metrics": dict(self.metrics), "clipped": dict(self.clipped),
                "rejoined": list(self.rejoined), "attempts": self.attempts,
                "failed_attempts": [dict(a) for a in self.failed_attempts]}
