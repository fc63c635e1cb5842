"""FFA-LoRA (`fedmrg.fl.strategies.ffa_lora`): A frozen at its seeded init, only B trained and
sent, B averaged. The aggregation math on synthetic updates (pure), then one real round in
process (plain `FederatedClient`s over Ray Data streams, `Coordinator`, `InProcessPool`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import tiny_client_config

from fedmrg.config import config_from_dict
from fedmrg.fl.lowrank import ErrorFeedback, is_lora_factor
from fedmrg.fl.messages import ClientUpdate
from fedmrg.fl.strategies import STRATEGIES, FedAvg, FederationError, make_strategy
from fedmrg.fl.strategies.ffa_lora import FFALoRA
from fedmrg.fl.validation import validate_update

R, D, K = 2, 5, 6
A1, B1 = "decoder.m1.lora_A.generic.weight", "decoder.m1.lora_B.generic.weight"
A2, B2 = "decoder.m2.lora_A.generic.weight", "decoder.m2.lora_B.generic.weight"
W, BIAS = "projector.net.0.weight", "projector.net.0.bias"
SAMPLES = {"a": 10, "b": 30, "c": 20}


def global_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {A1: torch.randn(R, K, generator=g), B1: torch.zeros(D, R),
            A2: torch.randn(R, K, generator=g), B2: torch.zeros(D, R),
            W: torch.randn(8, 6, generator=g), BIAS: torch.randn(8, generator=g)}


def client_update(center: str, start: dict[str, torch.Tensor]) -> ClientUpdate:
    """What an FFA-LoRA client sends: its trained B factors, dense deltas of the rest."""
    g = torch.Generator().manual_seed(ord(center))
    trained = {n: t + torch.randn(t.shape, generator=g) for n, t in start.items()}
    lora = {n: trained[n] for n in (B1, B2)}
    dense = ErrorFeedback().compress_all({n: trained[n] - start[n] for n in (W, BIAS)}, 0)
    return ClientUpdate(1, center, SAMPLES[center], lora, dense)


def strategy() -> FFALoRA:
    s = make_strategy(config_from_dict({"federation": {"strategy": "ffa_lora"}}))
    assert isinstance(s, FFALoRA)
    return s


def test_registered_with_fedavgs_switches():
    assert STRATEGIES["ffa_lora"] is FFALoRA
    assert FFALoRA.implies == FedAvg.implies
    cfg = strategy().cfg
    assert not cfg.model.specialized_adapter and cfg.federation.dense_update_rank == 0


def test_b_is_the_weighted_mean_and_the_adapter_is_exact():
    s, start = strategy(), global_state()
    s.initialize(start)
    spec = s.update_spec()
    assert set(spec.lora) == {B1, B2} and set(spec.dense) == {W, BIAS}  # A is never sent
    updates = [client_update(c, start) for c in "abc"]
    for u in updates:
        assert validate_update(u, center=u.center, round_id=1, spec=spec) is None
    s.aggregate_round(1, updates)
    state = s.global_state()
    total = sum(SAMPLES.values())
    for a, b in ((A1, B1), (A2, B2)):
        assert torch.equal(state[a], start[a])  # frozen
        mean_b = sum(SAMPLES[u.center] / total * u.lora[b].double() for u in updates)
        assert torch.allclose(state[b].double(), mean_b, atol=1e-6)
        # exact: the global adapter is the weighted mean of the clients' adapters
        mean_adapter = sum(SAMPLES[u.center] / total * u.lora[b].double() @ start[a].double()
                           for u in updates)
        assert torch.allclose(state[b].double() @ state[a].double(), mean_adapter, atol=1e-6)
    mean_w = sum(SAMPLES[u.center] / total * u.dense[W] for u in updates)
    assert torch.allclose(state[W], start[W] + mean_w, atol=1e-6)


def test_an_update_that_sends_a_is_rejected():
    s, start = strategy(), global_state()
    s.initialize(start)
    bad = client_update("a", start)
    bad.lora[A1] = start[A1] + 1
    reason = validate_update(bad, center="a", round_id=1, spec=s.update_spec())
    assert reason is not None and reason.startswith(f"unexpected LoRA factor '{A1}'")
    with pytest.raises(FederationError, match="LoRA factors do not match"):
        s.aggregate_round(1, [bad])


# --------------------------------------------------------------------------- one real round


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    from fedmrg.data.phantom import generate_phantom

    root = tmp_path_factory.mktemp("ffa") / "phantom"
    generate_phantom(root, centers=2, studies_per_center=20, image_size=32, seed=0,
                     heldout_center=False)
    return str(root)


def test_one_round_trains_b_only_and_aggregates_it_exactly(ray_cluster, dataset, tmp_path):
    from fedmrg.fl.client import FederatedClient
    from fedmrg.fl.coordinator import Coordinator, InProcessPool
    from fedmrg.fl.wire import from_wire
    from fedmrg.model.params import get_shared_state

    s = make_strategy(tiny_client_config("ffa_lora", dataset, str(tmp_path / "lm"),
                                         rounds=1))
    cfg = s.cfg
    clients = {c: FederatedClient(cfg, c, dataset_root=dataset, seed=cfg.seed,
                                  generation={"num_beams": 1, "max_new_tokens": 4},
                                  eval_samples=1) for c in ("a", "b")}
    replies: list[ClientUpdate] = []

    class Recording(InProcessPool):
        def result(self, handle):
            reply = super().result(handle)
            if isinstance(reply, ClientUpdate):
                replies.append(from_wire(reply))
            return reply

    initial = get_shared_state(clients["a"].model)
    try:
        result = Coordinator(cfg, s, Recording(clients), initial,
                             np.random.default_rng(cfg.seed)).run()
        a_names = [n for n in initial if is_lora_factor(n) and ".lora_A." in n]
        b_names = [n for n in initial if is_lora_factor(n) and ".lora_B." in n]
        assert a_names and b_names and len(replies) == 2
        for client in clients.values():  # A never moved on any client
            trained = get_shared_state(client.model)
            assert all(torch.equal(trained[n], initial[n]) for n in a_names)
        for u in replies:
            assert set(u.lora) == set(b_names)  # only B travels
            assert any(not torch.equal(u.lora[n], initial[n]) for n in b_names)  # B trained
        weights = [u.num_samples for u in replies]
        total = sum(weights)
        state = result.global_state
        for a in a_names:
            b = a.replace(".lora_A.", ".lora_B.")
            assert torch.equal(state[a], initial[a])
            mean_adapter = sum(w / total * u.lora[b].double() @ initial[a].double()
                               for w, u in zip(weights, replies, strict=True))
            got = state[b].double() @ state[a].double()
            assert torch.allclose(got, mean_adapter, atol=1e-6)
        assert result.history[0].participants == ["a", "b"]
        assert np.isfinite(result.generalization.mean["bleu4"])
    finally:
        for client in clients.values():
            client.close()
