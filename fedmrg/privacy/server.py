"""The coordinator's privacy duties for one run (pure, no Ray; docs/privacy.md):

- `ServerPrivacy.check`: which strategies a setting can hold for, before anything trains.
- central DP: the update-norm bound becomes the clip (`norm_bound`), and the round's updates
  become one update carrying (sum of clipped changes + N(0, (sigma C)^2)) / sampled clients
  (`aggregate_input`; a fixed denominator, as DP-FedAvg: the number of clients that answered
  would itself depend on the data), which the strategy aggregates as it would the K updates
  when it is linear (`fedmrg.privacy.linear`).
- accounting (`account`, `budget_problem`): epsilon at `privacy.delta` after every round, in
  the round's metrics (`privacy_epsilon`) and in the run's summary; with
  `privacy.target_epsilon` the run stops before a round that would exceed it.
- secure aggregation (`secure_attempt`): the round's protocol (`fedmrg.privacy.secagg`) over
  the coordinator's pool, ending in the same one update.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from fedmrg.choices import PrivacyMode
from fedmrg.config import ConfigError, ExperimentConfig
from fedmrg.fl.failure import FailureKind
from fedmrg.fl.messages import ClientUpdate
from fedmrg.privacy import PrivacyError
from fedmrg.privacy.client import KEYS, SHARES, UNMASK, SecAggPlan, unflatten
from fedmrg.privacy.dp import (
    PrivacyAccountant,
    add_gaussian_noise,
    noise_generator,
    round_sample_rate,
)
from fedmrg.privacy.linear import sum_changes, update_from_changes
from fedmrg.privacy.secagg import SecAggServer, dequantize

if TYPE_CHECKING:
    from fedmrg.fl.coordinator import Coordinator, RoundAttempt
    from fedmrg.fl.strategies import Strategy

log = logging.getLogger(__name__)
AGGREGATE = "aggregate"  # the center name of the one update a linear aggregate hands on


def budget_stop_line(spent: float, target: float, delta: float, rounds_done: int,
                     rounds_planned: int, next_epsilon: float) -> str:
    """The line a run stopped by `privacy.target_epsilon` ends with (console, summary, MLflow
    description): epsilon spent, the target, the rounds done of those planned."""
    return (f"stopped by the privacy budget after {rounds_done} of {rounds_planned} rounds: "
            f"epsilon {spent:.3g} spent of privacy.target_epsilon={target:g} (delta "
            f"{delta:g}); round {rounds_done + 1} would have reached epsilon {next_epsilon:.3g}")


class ServerPrivacy:
    """What the coordinator does for `cfg.privacy` (module docstring)."""

    def __init__(self, cfg: ExperimentConfig, strategy: Strategy):
        self.check(cfg, strategy)
        self.cfg, self.privacy, self.fed = cfg, cfg.privacy, cfg.federation
        self.strategy = strategy
        self.accountant = PrivacyAccountant()
        self.stopped: str | None = None  # why the run stopped early (privacy budget)

    @classmethod
    def for_run(cls, cfg: ExperimentConfig, strategy: Strategy) -> ServerPrivacy | None:
        """None when privacy is off (the default)."""
        p = cfg.privacy
        return cls(cfg, strategy) if p.mode != PrivacyMode.NONE or p.secure_aggregation else None

    @staticmethod
    def check(cfg: ExperimentConfig, strategy: Strategy) -> None:
        """A `ConfigError` naming the key when the privacy settings cannot hold for the
        (configured, initialized) strategy."""
        p = cfg.privacy
        if p.mode == PrivacyMode.NONE and not p.secure_aggregation:
            return
        what = (f"privacy.mode={p.mode!r}" if p.mode != PrivacyMode.NONE else
                "privacy.secure_aggregation")
        if strategy.pools_data or strategy.name == "local":
            raise ConfigError(f"{what}: strategy {strategy.name!r} sends no update to "
                              f"aggregate (nothing to protect)")
        statistics = sorted(strategy.update_spec().statistics)
        if statistics:
            raise ConfigError(f"{what}: strategy {strategy.name!r} sends statistics "
                              f"{statistics} that are neither clipped nor noised nor masked; "
                              f"switch them off or use fedavg, ffa_lora, fedsa_lora, fedprox")
        if p.mode == PrivacyMode.CENTRAL or p.secure_aggregation:
            problem = strategy.linear_problem()
            if problem:
                raise ConfigError(f"{what} needs an aggregate linear in what clients send: "
                                  f"{problem}")
        linear = p.mode == PrivacyMode.CENTRAL or p.secure_aggregation
        if linear and cfg.federation.download_rank > 0:
            raise ConfigError(f"{what}: the aggregate is measured against the server's global "
                              f"state, which clients must hold exactly; set "
                              f"federation.download_rank to 0")
        if p.secure_aggregation and cfg.federation.dense_update_rank > 0:
            raise ConfigError("privacy.secure_aggregation: a masked low-rank update is not a "
                              "low-rank update of the sum; set federation.dense_update_rank "
                              "to 0")

    @property
    def secure(self) -> bool:
        return self.privacy.secure_aggregation

    # ----------------------------------------------------------------- clipping and noise

    def norm_bound(self) -> tuple[float, str]:
        """(max_norm, action) for `bound_update_norm`: the DP clip under central DP (the
        coordinator sees the updates), else the federation's own bound."""
        if self.privacy.mode == PrivacyMode.CENTRAL and not self.secure:
            return self.privacy.clip_norm, "clip"
        return self.fed.max_update_norm, self.fed.update_norm_action

    def noise_std(self) -> float:
        return self.privacy.noise_multiplier * self.privacy.clip_norm

    def aggregate_input(self, round_id: int, accepted: list[ClientUpdate], sampled: int,
                        reference: Mapping[str, Tensor]) -> list[ClientUpdate]:
        """The updates the strategy aggregates: under central DP (without secure aggregation,
        which does the same in `secure_attempt`) one update of the noised mean change (module
        docstring), else `accepted` as they are."""
        if self.privacy.mode != PrivacyMode.CENTRAL or self.secure:
            return accepted
        total = sum_changes(accepted, reference, [1.0] * len(accepted))
        return [self._noised_mean(round_id, total, sampled, reference, list(accepted[0].lora),
                                  num_samples=len(accepted))]

    def _noised_mean(self, round_id: int, total: dict[str, Tensor], denominator: float,
                     reference: Mapping[str, Tensor], lora_names: list[str],
                     num_samples: int) -> ClientUpdate:
        if self.privacy.mode == PrivacyMode.CENTRAL:
            generator = noise_generator(self.privacy.noise_seed, "central", str(round_id))
            total = add_gaussian_noise(total, self.noise_std(), generator)
        mean = {n: t / denominator for n, t in total.items()}
        return update_from_changes(mean, reference, lora_names, round_id=round_id,
                                   center=AGGREGATE, num_samples=max(1, num_samples))

    # ----------------------------------------------------------------- accounting

    def _step(self, available: int) -> tuple[float, float]:
        """(noise multiplier, sample rate) of one step."""
        rate = (1.0 if self.privacy.mode == PrivacyMode.LOCAL else
                round_sample_rate(self.fed.fraction, self.fed.min_clients, available))
        return self.privacy.noise_multiplier, rate

    def epsilon(self) -> float:
        return self.accountant.epsilon(self.privacy.delta)

    def budget_problem(self, available: int, rounds_done: int) -> str | None:
        """Why the round after `rounds_done` may not run (it would take epsilon past
        `privacy.target_epsilon`), as the one line the run ends with, or None."""
        if self.privacy.mode == PrivacyMode.NONE or self.privacy.target_epsilon <= 0:
            return None
        noise, rate = self._step(available)
        after = self.accountant.epsilon_after(noise, rate, self.privacy.delta)
        if after > self.privacy.target_epsilon:
            self.stopped = budget_stop_line(self.epsilon(), self.privacy.target_epsilon,
                                            self.privacy.delta, rounds_done, self.fed.rounds,
                                            after)
            return self.stopped
        return None

    def account(self, attempts: int, available: int) -> dict[str, float]:
        """Compose a finished round and return its metrics. Central: one step (a failed
        attempt released nothing); local: every attempt clients sent in."""
        if self.privacy.mode == PrivacyMode.NONE:
            return {}
        noise, rate = self._step(available)
        self.accountant.step(noise, rate, attempts if self.privacy.mode == PrivacyMode.LOCAL else 1)
        return {"privacy_epsilon": self.epsilon(), "privacy_sample_rate": rate}

    def report(self) -> dict[str, Any]:
        """The run summary's `privacy` section."""
        p = self.privacy
        out: dict[str, Any] = {"mode": p.mode, "secure_aggregation": p.secure_aggregation}
        if p.mode != PrivacyMode.NONE:
            out.update(epsilon=self.epsilon(), delta=p.delta, clip_norm=p.clip_norm,
                       noise_multiplier=p.noise_multiplier, target_epsilon=p.target_epsilon,
                       accountant="opacus RDP", stopped=self.stopped)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"accountant": self.accountant.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.accountant.load_state_dict(state["accountant"])

    # ----------------------------------------------------------------- secure aggregation

    def layout(self) -> list[tuple[str, tuple[int, ...]]]:
        """The masked vector's layout: the payload schema's LoRA factors then dense tensors,
        each sorted by name."""
        spec = self.strategy.update_spec()
        return [*sorted(spec.lora.items()), *sorted(spec.dense.items())]

    def secure_attempt(self, coordinator: Coordinator, round_id: int, number: int,
                       ) -> RoundAttempt:
        """One attempt of a round under secure aggregation (`fedmrg.privacy.secagg`): keys,
        shares, masked fits, unmasking; its `accepted` is the one update of the weighted mean
        (or, under central DP, the noised mean over the sampled clients)."""
        from fedmrg.fl.coordinator import RoundAttempt
        from fedmrg.fl.wire import message_bytes

        fed, pool = self.fed, coordinator.pool
        centers = self.strategy.configure_round(round_id, pool.centers(), coordinator.rng)
        attempt = RoundAttempt(number, list(centers))
        layout = self.layout()
        length = sum(int(np.prod(s, dtype=np.int64)) for _, s in layout)
        server = SecAggServer(round_id, length)

        def count(reply: Any) -> None:
            size = message_bytes(reply)
            attempt.bytes_up += size.bytes
            attempt.dense_up += size.dense_equivalent_bytes

        def exchange(stage: str, messages: Mapping[str, Any]) -> dict[str, Any]:
            handles = {pool.submit_secagg(c, stage, round_id, m): c for c, m in messages.items()}
            attempt.bytes_down += sum(message_bytes(m).bytes for m in messages.values())
            collected = coordinator.collect_replies(handles, fed.min_clients,
                                                    fed.round_deadline_s)
            coordinator.reject_fits(round_id, collected.failed, attempt,
                                    context=f"secure aggregation {stage}: ")
            for reply in collected.replies.values():
                count(reply)
            return collected.replies

        try:
            keys = exchange(KEYS, {c: None for c in centers})
            roster = server.set_roster(list(keys.values()))
            shares = exchange(SHARES, {c: roster for c in roster})
            routed = server.route_shares(shares)
            plans = {c: coordinator._downlink(c, self.strategy.plan(round_id, c))
                     for c in routed}
            plans = coordinator._wire_plans(plans)
            weighted = self.privacy.mode != PrivacyMode.CENTRAL  # central DP counts clients
            plans = {c: dataclasses.replace(p, secure_aggregation=SecAggPlan(
                server.active, routed[c], layout, self.privacy.secagg_fraction_bits,
                weight_by_samples=weighted, clients=len(server.active)))
                for c, p in plans.items()}
            attempt.bytes_down += sum(message_bytes(p).bytes for p in plans.values())
            handles = {pool.submit_fit(c, plans[c]): c for c in plans}
            collected = coordinator.collect_replies(handles, fed.min_clients,
                                                    fed.round_deadline_s)
            coordinator.note_fits(round_id, plans, collected, attempt)
            masked, weights, reports = {}, {}, []
            for center, reply in sorted(collected.replies.items()):
                count(reply)
                reason = masked_update_problem(reply, center, round_id, length)
                if reason:
                    coordinator.reject_fits(round_id, {center: (FailureKind.INVALID, reason)},
                                            attempt)
                    continue
                masked[center] = reply.masked.numpy().view(np.uint64)
                weights[center] = int(reply.num_samples)
                reports.append(dataclasses.replace(reply, masked=None))  # its metrics only
            survivors, dropped = server.unmask_request(masked)
            unmasking = exchange(UNMASK, {c: (survivors, dropped) for c in survivors})
            total = dequantize(server.aggregate(masked, unmasking),
                               self.privacy.secagg_fraction_bits)
        except PrivacyError as e:
            for center in centers:
                if center not in attempt.rejected:
                    attempt.reject(center, FailureKind.CRASH, f"secure aggregation: {e}")
            return attempt
        reference = self.strategy.global_state()
        changes = unflatten(total, layout)
        lora_names = list(self.strategy.update_spec().lora)
        denominator = (float(sum(weights[c] for c in survivors)) if weighted
                       else float(len(centers)))
        attempt.accepted = [self._noised_mean(round_id, changes, denominator, reference,
                                              lora_names, num_samples=len(survivors))]
        attempt.participants = list(survivors)
        attempt.reports = [r for r in reports if r.center in survivors]
        return attempt


def check_privacy(cfg: ExperimentConfig) -> None:
    """`ServerPrivacy.check` on the strategy `cfg` names, before anything starts (nothing to
    check, and nothing imported, when privacy is off)."""
    if cfg.privacy.mode == PrivacyMode.NONE and not cfg.privacy.secure_aggregation:
        return
    from fedmrg.fl.strategies import make_strategy

    strategy = make_strategy(cfg)
    ServerPrivacy.check(strategy.cfg, strategy)


def masked_update_problem(reply: Any, center: str, round_id: int, length: int) -> str | None:
    """Why a masked reply is unusable, or None: a `ClientUpdate` of this round and center,
    a positive sample count, one int64 vector of `length` values and no tensor in the clear."""
    if not isinstance(reply, ClientUpdate):
        return f"not a ClientUpdate but a {type(reply).__name__}"
    if reply.round_id != round_id or reply.center != center:
        return f"reply for round {reply.round_id} of {reply.center!r}"
    n = reply.num_samples
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
        return f"num_samples {n!r} is not a positive integer"
    if reply.lora or reply.dense or reply.statistics:
        return "tensors in the clear next to a masked update"
    m = reply.masked
    if not isinstance(m, Tensor) or m.dtype != torch.int64 or tuple(m.shape) != (length,):
        return f"masked vector is not int64 of {length} values"
    return None
