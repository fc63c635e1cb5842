"""Privacy in real federated rounds, in one process: real `FederatedClient`s (tiny model, Ray
Data streams over 3 phantom centers), the plain `Coordinator`, an `InProcessPool` that records
every message the coordinator receives.

- secure aggregation (ffa_lora): no reply carries a client's update in the clear, one client
  lost after the keys were shared still leaves an aggregate, and the new global state is the
  sample-weighted mean of the survivors' updates (the plain values are read where they are
  masked, in the client, to compute what the aggregate must be);
- central DP (ffa_lora): the global state moves by (sum of clipped updates + the seeded noise
  draw) / sampled clients, epsilon is the accountant's, the run stops before the round that
  would exceed `privacy.target_epsilon`, and a coordinator resumed from the state after the
  last round reports the same epsilon and stops too.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from helpers import tiny_client_config

from fedmrg.config import ExperimentConfig, replace_keys
from fedmrg.fl.client import FederatedClient
from fedmrg.fl.coordinator import Coordinator, InProcessPool, _Call
from fedmrg.fl.failure import ClientFailure
from fedmrg.fl.lowrank import is_lora_factor
from fedmrg.fl.messages import ClientUpdate
from fedmrg.fl.strategies import make_strategy
from fedmrg.fl.validation import scale_update, update_norm
from fedmrg.model.params import get_shared_state
from fedmrg.privacy.client import SecAggParticipant
from fedmrg.privacy.dp import PrivacyAccountant, add_gaussian_noise, noise_generator
from fedmrg.privacy.linear import update_changes
from fedmrg.privacy.secagg import AdvertisedKeys, dequantize

CENTERS = ("a", "b", "c")
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def tiny_config(root: str, lm_cache: str) -> ExperimentConfig:
    cfg = tiny_client_config("ffa_lora", root, lm_cache, rounds=3)
    # a small update: the adapters, heads and projector
    return replace_keys(cfg, {"model.freeze_encoder": True, "eval.max_new_tokens": 6,
                              "eval.samples": 0})


class RecordingPool(InProcessPool):
    """Keeps every reply the coordinator receives; `lose_fit` fails those centers' fits."""

    def __init__(self, clients):
        super().__init__(clients)
        self.received: list = []
        self.lose_fit: set[str] = set()

    def submit_fit(self, center, plan):
        if center in self.lose_fit:
            return _Call(center, error=ClientFailure(center, "fit failed: actor lost"))
        return super().submit_fit(center, plan)

    def result(self, handle):
        reply = super().result(handle)
        self.received.append(reply)
        return reply


@pytest.fixture(scope="module")
def clients(ray_cluster, tmp_path_factory):
    from fedmrg.data.phantom import generate_phantom

    root = tmp_path_factory.mktemp("privacy") / "phantom"
    generate_phantom(root, centers=len(CENTERS), studies_per_center=20, image_size=32, seed=0,
                     heldout_center=False)
    cfg = make_strategy(tiny_config(str(root), str(tmp_path_factory.mktemp("lm")))).cfg
    built = {c: FederatedClient(cfg, c, dataset_root=str(root), seed=cfg.seed)
             for c in CENTERS}
    yield cfg, built
    for client in built.values():
        client.close()


def coordinator_for(cfg: ExperimentConfig, clients: dict) -> tuple[Coordinator, RecordingPool]:
    strategy = make_strategy(cfg)
    pool = RecordingPool(clients)
    initial = get_shared_state(clients["a"].model)  # every client built from the same seed
    return Coordinator(strategy.cfg, strategy, pool, initial,
                       np.random.default_rng(cfg.seed)), pool


def test_secure_aggregation_round_with_a_lost_client(clients, monkeypatch):
    base, built = clients
    cfg = replace_keys(base, {"privacy.secure_aggregation": True, "federation.min_clients": 2})
    coordinator, pool = coordinator_for(cfg, built)
    pool.lose_fit = {"c"}  # "c" shared its keys; "a" and "b" mask with it, then it is gone
    plain: dict[str, tuple[ClientUpdate, dict]] = {}
    real_mask = SecAggParticipant.masked_vector

    def spy(self, plan, round_id, update, start):  # read the plain update where it is masked
        plain[self.center] = (update, {n: t.clone() for n, t in start.items()})
        return real_mask(self, plan, round_id, update, start)

    monkeypatch.setattr(SecAggParticipant, "masked_vector", spy)
    before = dict(coordinator.strategy.global_state())
    summary = coordinator.step()
    assert summary.participants == ["a", "b"] and set(summary.rejected) == {"c"}
    assert summary.metrics["clients"] == 2.0
    assert "a/loss" in summary.metrics and "c/loss" not in summary.metrics  # clients' scalars

    # the coordinator's view: keys, share ciphertexts, masked vectors, unmasking shares
    kinds = [type(m).__name__ for m in pool.received]
    assert kinds.count("AdvertisedKeys") == 3 and kinds.count("ClientUpdate") == 2
    for message in pool.received:
        if isinstance(message, ClientUpdate):
            assert not message.lora and not message.dense and not message.statistics
            assert message.masked.dtype == torch.int64
            update, start = plain[message.center]
            vector = torch.cat([c.reshape(-1) for _, c in sorted(
                update_changes(update, start).items())]).numpy()
            seen = dequantize(message.masked.numpy().view(np.uint64), 24)
            assert abs(np.corrcoef(seen, vector)[0, 1]) < 0.05  # masked: no trace of it
        elif isinstance(message, dict):  # shares: ciphertexts; unmasking: field elements
            assert all(isinstance(v, (bytes, tuple)) for v in message.values())
        else:
            assert isinstance(message, AdvertisedKeys)

    # the aggregate: the survivors' sample-weighted mean change, to fixed-point precision
    after = coordinator.strategy.global_state()
    weights = {c: plain[c][0].num_samples for c in ("a", "b")}
    changes = {c: update_changes(*plain[c]) for c in ("a", "b")}
    total = sum(weights.values())
    moved = [n for n in changes["a"] if n in after]
    assert any(is_lora_factor(n) for n in moved) and any(not is_lora_factor(n) for n in moved)
    for name in moved:
        expected = before[name].double() + sum(weights[c] * changes[c][name]
                                               for c in weights) / total
        assert torch.allclose(after[name].double(), expected, atol=1e-6), name


def test_central_dp_noised_mean_epsilon_budget_and_resume(clients):
    base, built = clients
    one, two = (PrivacyAccountant(), PrivacyAccountant())
    one.step(1.0, 1.0)
    two.step(1.0, 1.0, 2)
    delta = base.privacy.delta
    cfg = replace_keys(base, {
        "privacy.mode": "central", "privacy.clip_norm": 0.05, "privacy.noise_multiplier": 1.0,
        "privacy.noise_seed": 5,
        "privacy.target_epsilon": (one.epsilon(delta) + two.epsilon(delta)) / 2,  # 1 round
    })
    p = cfg.privacy
    coordinator, pool = coordinator_for(cfg, built)
    before = dict(coordinator.strategy.global_state())
    saved = []
    coordinator.on_round = lambda summary: saved.append(copy.deepcopy(
        coordinator.state_dict()))
    result = coordinator.run()

    assert [s.round_id for s in result.history] == [1]  # round 2 would exceed the budget
    epsilon = result.history[0].metrics["privacy_epsilon"]
    assert epsilon == pytest.approx(one.epsilon(p.delta)) and epsilon < p.target_epsilon
    assert result.privacy["epsilon"] == pytest.approx(epsilon)
    assert result.privacy["stopped"] == (
        f"stopped by the privacy budget after 1 of 3 rounds: epsilon {epsilon:.3g} spent of "
        f"privacy.target_epsilon={p.target_epsilon:g} (delta 1e-05); round 2 would have "
        f"reached epsilon {two.epsilon(delta):.3g}")
    assert result.generalization is not None  # stopped cleanly: evaluated as usual

    # the aggregate: (sum of the clipped updates + the seeded noise) / 3 sampled clients
    updates = [u for u in pool.received if isinstance(u, ClientUpdate)]
    assert sorted(u.center for u in updates) == list(CENTERS)
    clipped = []
    for u in updates:
        norm = update_norm(u, before)
        assert norm > p.clip_norm  # the bound bites
        clipped.append(update_changes(scale_update(u, before, p.clip_norm / norm), before))
    total = {n: sum(c[n] for c in clipped) for n in clipped[0]}
    noisy = add_gaussian_noise(total, p.noise_multiplier * p.clip_norm,
                               noise_generator(5, "central", "1"))
    after = result.global_state
    for name, t in noisy.items():
        assert torch.allclose(after[name].double(), before[name].double() + t / 3,
                              atol=1e-6), name

    resumed, _ = coordinator_for(cfg, built)
    resumed.load_state_dict(saved[-1])
    assert resumed.privacy.epsilon() == pytest.approx(epsilon)
    assert resumed.privacy.budget_problem(len(CENTERS), 1) is not None  # stops there too
    assert math.isfinite(epsilon)
