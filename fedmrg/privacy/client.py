"""A client's privacy duties (pure, no Ray): clip and noise what it sends (local DP; clip only
under central DP with secure aggregation, where the coordinator cannot), and take part in
secure aggregation (`SecAggParticipant`). `FederatedClient` and the client half of a strategy
call these; docs/privacy.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedmrg.choices import PrivacyMode
from fedmrg.config import PrivacyConfig
from fedmrg.fl.messages import ClientUpdate
from fedmrg.privacy import PrivacyError
from fedmrg.privacy.dp import add_gaussian_noise, clip_update
from fedmrg.privacy.linear import update_changes, update_from_changes
from fedmrg.privacy.secagg import AdvertisedKeys, SecAggClient, quantize

KEYS, SHARES, UNMASK = "keys", "shares", "unmask"  # the stages besides the masked fit


def client_clips(privacy: PrivacyConfig) -> bool:
    """Whether the client clips its own update (local DP, or central DP the coordinator
    cannot apply because it only sees the masked sum)."""
    return privacy.mode == PrivacyMode.LOCAL or (privacy.mode == PrivacyMode.CENTRAL
                                                 and privacy.secure_aggregation)


def privatize_update(privacy: PrivacyConfig, center: str, start: Mapping[str, Tensor],
                     lora: dict[str, Tensor], deltas: dict[str, Tensor],
                     generator: torch.Generator | None,
                     ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(lora, deltas) clipped to `privacy.clip_norm` as one update (the update norm against
    `start`), and under local DP with N(0, (noise_multiplier * clip_norm)^2) added to every
    coordinate of the change, before any compression (which is then post-processing)."""
    update = ClientUpdate(round_id=0, center=center, num_samples=1, lora=lora, dense=deltas)
    clipped, _ = clip_update(update, start, privacy.clip_norm)
    if privacy.mode != PrivacyMode.LOCAL:
        return clipped.lora, clipped.dense
    if generator is None:
        raise PrivacyError(f"client {center!r}: local DP needs a noise generator")
    noisy = add_gaussian_noise(update_changes(clipped, start),
                               privacy.noise_multiplier * privacy.clip_norm, generator)
    out = update_from_changes(noisy, start, list(lora), round_id=0, center=center,
                              num_samples=1)
    return out.lora, out.dense


@dataclass
class SecAggPlan:
    """What a round's plan carries under secure aggregation: the clients that shared keys
    (U2), the share ciphertexts addressed to this client, the layout of the vector (names
    and shapes, in order), fixed point, and whether each client weights its vector by its
    sample count (else 1: central DP counts clients, not samples)."""

    active: list[str]
    shares: dict[str, bytes]
    layout: list[tuple[str, tuple[int, ...]]]
    fraction_bits: int
    weight_by_samples: bool = True
    clients: int = field(default=0)  # len(active), for the headroom of `quantize`


def flatten_changes(changes: Mapping[str, Tensor], layout: list[tuple[str, tuple[int, ...]]],
                    ) -> np.ndarray:
    """The float64 vector of `changes` in `layout` order; a missing or misshapen tensor is an
    error naming it."""
    parts = []
    for name, shape in layout:
        if name not in changes or tuple(changes[name].shape) != tuple(shape):
            got = tuple(changes[name].shape) if name in changes else None
            raise PrivacyError(f"secure aggregation: {name!r} is {got}, the layout says "
                               f"{tuple(shape)}")
        parts.append(changes[name].detach().to(torch.float64).reshape(-1).cpu().numpy())
    return np.concatenate(parts) if parts else np.zeros(0)


def unflatten(vector: np.ndarray, layout: list[tuple[str, tuple[int, ...]]]
              ) -> dict[str, Tensor]:
    out, at = {}, 0
    for name, shape in layout:
        n = int(np.prod(shape, dtype=np.int64))
        out[name] = torch.from_numpy(vector[at:at + n].copy()).reshape(shape)
        at += n
    if at != vector.size:
        raise PrivacyError(f"secure aggregation: {vector.size} values, the layout holds {at}")
    return out


class SecAggParticipant:
    """A client's secure-aggregation state: one `SecAggClient` per round."""

    def __init__(self, center: str):
        self.center = center
        self.session: SecAggClient | None = None

    def handle(self, stage: str, round_id: int, message: Any) -> Any:
        """KEYS -> my AdvertisedKeys (a new round's keys); SHARES (roster) -> {peer:
        ciphertext}; UNMASK ((survivors, dropped)) -> my unmasking shares."""
        if stage == KEYS:
            self.session = SecAggClient(self.center, round_id)
            return self.session.advertise()
        session = self._session(round_id)
        if stage == SHARES:
            roster: Mapping[str, AdvertisedKeys] = message
            return session.share_keys(roster)
        if stage == UNMASK:
            survivors, dropped = message
            return session.unmask(survivors, dropped)
        raise PrivacyError(f"secure aggregation: unknown stage {stage!r}")

    def _session(self, round_id: int) -> SecAggClient:
        if self.session is None or self.session.round_id != round_id:
            raise PrivacyError(f"client {self.center!r}: no secure-aggregation keys for round "
                               f"{round_id}")
        return self.session

    def masked_vector(self, plan: SecAggPlan, round_id: int, update: ClientUpdate,
                      start: Mapping[str, Tensor]) -> Tensor:
        """The masked fixed-point vector (int64 view of uint64) of `update`'s changes against
        `start`, times its sample count when the plan weights by samples."""
        changes = update_changes(update, start)
        weight = float(update.num_samples) if plan.weight_by_samples else 1.0
        values = quantize(weight * flatten_changes(changes, plan.layout), plan.fraction_bits,
                          max(plan.clients, len(plan.active)))
        masked = self._session(round_id).mask(values, plan.shares, plan.active)
        return torch.from_numpy(masked.view(np.int64))
