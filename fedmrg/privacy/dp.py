"""Client-level differential privacy, DP-FedAvg family (McMahan et al., ICLR 2018): each
client's update is clipped to an L2 bound C, Gaussian noise of standard deviation
`noise_multiplier` x C is added to the sum of the clipped updates (central) or by each client
to its own (local), and an RDP accountant composes the rounds into (epsilon, delta).

The norm is the update norm of `fedmrg.fl.validation` (one L2 norm over everything a client
sends: LoRA factors as their change X - G against the round's global state, dense and
low-rank deltas); clipping is its `scale_update`, so what is clipped is exactly what is sent.

Accounting: Opacus' RDP accountant (`opacus.accountants.RDPAccountant`): a round is one step
of the subsampled Gaussian mechanism with the round's sample rate (sampled / available
centers; the analysis assumes Poisson sampling, the standard approximation for a fixed-size
sample of DP-FedAvg). Under local DP the coordinator knows who was sampled, so there is no
amplification by sampling: every attempt a client sends in is a step at rate 1.
"""

from __future__ import annotations

import math
import secrets
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedmrg.fl.messages import ClientUpdate
from fedmrg.fl.validation import bound_update_norm
from fedmrg.privacy import PrivacyError


def clip_update(update: ClientUpdate, reference: Mapping[str, Tensor], clip_norm: float,
                ) -> tuple[ClientUpdate, float]:
    """(`update` scaled down to update norm `clip_norm` when above it, its norm before)."""
    check = bound_update_norm(update, reference, clip_norm, "clip")
    if check.update is None:
        raise PrivacyError(f"center {update.center!r}: {check.reason}; cannot clip it")
    return check.update, check.norm


def noise_generator(seed: int | None, *keys: str) -> torch.Generator:
    """A CPU generator for DP noise: from OS randomness when `seed` is None (a deployment: who
    knows the seed can subtract the noise), else derived from the seed and `keys` (center,
    round) for reproducible experiments."""
    generator = torch.Generator()
    if seed is None:
        generator.manual_seed(secrets.randbits(63))
    else:
        words = [seed, *(zlib.crc32(k.encode()) for k in keys)]
        generator.manual_seed(int(np.random.SeedSequence(words).generate_state(1)[0]))
    return generator


def add_gaussian_noise(changes: Mapping[str, Tensor], std: float,
                       generator: torch.Generator) -> dict[str, Tensor]:
    """`changes` + N(0, std^2) on every coordinate, in float64, names in sorted order (the
    draws do not depend on the dict's order)."""
    out = {}
    for name in sorted(changes):
        t = changes[name].to(torch.float64)
        noise = torch.randn(t.shape, generator=generator, dtype=torch.float64)
        out[name] = t + std * noise.to(t.device)
    return {n: out[n] for n in changes}


def round_sample_rate(fraction: float, min_clients: int, available: int) -> float:
    """The share of `available` centers a round samples (`sample_clients`'s count)."""
    if available <= 0:
        raise PrivacyError("no centers available to sample")
    k = min(available, max(min_clients, math.ceil(fraction * available - 1e-9)))
    return k / available


class PrivacyAccountant:
    """Composition of the rounds' Gaussian mechanisms (module docstring). `history` is
    Opacus' [(noise_multiplier, sample_rate, steps)]: all the state there is, so a checkpoint
    that holds it resumes to the same epsilon."""

    def __init__(self) -> None:
        self.history: list[tuple[float, float, int]] = []

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        if steps <= 0:
            return
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            last = self.history[-1]
            self.history[-1] = (last[0], last[1], last[2] + steps)
        else:
            self.history.append((float(noise_multiplier), float(sample_rate), int(steps)))

    @staticmethod
    def _epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
        if not history:
            return 0.0
        if any(noise <= 0 for noise, _, _ in history):
            return math.inf  # no noise: no guarantee at all
        from opacus.accountants import RDPAccountant  # heavy import, only when DP is on

        accountant = RDPAccountant()
        accountant.history = list(history)
        return float(accountant.get_epsilon(delta))

    def epsilon(self, delta: float) -> float:
        """Epsilon at `delta` of every step taken so far (0 before the first)."""
        return self._epsilon(self.history, delta)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, delta: float,
                      steps: int = 1) -> float:
        """Epsilon once `steps` more steps are taken (the history is not changed)."""
        ahead = PrivacyAccountant()
        ahead.history = list(self.history)
        ahead.step(noise_multiplier, sample_rate, steps)
        return ahead.epsilon(delta)

    def state_dict(self) -> dict[str, Any]:
        return {"history": [list(h) for h in self.history]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history = [(float(n), float(q), int(s)) for n, q, s in state["history"]]
