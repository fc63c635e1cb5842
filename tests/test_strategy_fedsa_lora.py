"""FedSA-LoRA (`fedmrg.fl.strategies.fedsa_lora`): A shared and averaged, B private on each
client. The aggregation math on synthetic updates (pure), then two real rounds in process
(plain `FederatedClient`s over Ray Data streams, `Coordinator`, `InProcessPool`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import tiny_client_config

from fedmrg.config import config_from_dict
from fedmrg.fl.lowrank import ErrorFeedback, is_lora_factor
from fedmrg.fl.messages import ClientUpdate
from fedmrg.fl.strategies import STRATEGIES, FedAvg, make_strategy
from fedmrg.fl.strategies.fedsa_lora import FedSALoRA
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
    """What a FedSA-LoRA client sends: its trained A factors, dense deltas of the rest."""
    g = torch.Generator().manual_seed(ord(center))
    lora = {n: start[n] + torch.randn(start[n].shape, generator=g) for n in (A1, A2)}
    deltas = {n: torch.randn(start[n].shape, generator=g) for n in (W, BIAS)}
    return ClientUpdate(1, center, SAMPLES[center], lora, ErrorFeedback().compress_all(deltas, 0))


def strategy() -> FedSALoRA:
    s = make_strategy(config_from_dict({"federation": {"strategy": "fedsa_lora"}}))
    assert isinstance(s, FedSALoRA)
    return s


def test_registered_with_fedavgs_switches():
    assert STRATEGIES["fedsa_lora"] is FedSALoRA
    assert FedSALoRA.implies == FedAvg.implies


def test_the_server_keeps_no_b_and_averages_a():
    s, start = strategy(), global_state()
    s.initialize(start)
    assert set(s.global_state()) == {A1, A2, W, BIAS}  # B never reaches the server
    spec = s.update_spec()
    assert set(spec.lora) == {A1, A2} and set(spec.dense) == {W, BIAS}
    updates = [client_update(c, start) for c in "abc"]
    for u in updates:
        assert validate_update(u, center=u.center, round_id=1, spec=spec) is None
    with_b = client_update("a", start)
    with_b.lora[B1] = torch.zeros(D, R)
    reason = validate_update(with_b, center="a", round_id=1, spec=spec)
    assert reason is not None and reason.startswith(f"unexpected LoRA factor '{B1}'")
    s.aggregate_round(1, updates)
    state, total = s.global_state(), sum(SAMPLES.values())
    for a in (A1, A2):
        mean_a = sum(SAMPLES[u.center] / total * u.lora[a].double() for u in updates)
        assert torch.allclose(state[a].double(), mean_a, atol=1e-6)
    assert set(state) == {A1, A2, W, BIAS}
    mean_bias = sum(SAMPLES[u.center] / total * u.dense[BIAS] for u in updates)
    assert torch.allclose(state[BIAS], start[BIAS] + mean_bias, atol=1e-6)


# --------------------------------------------------------------------------- real rounds


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    from fedmrg.data.phantom import generate_phantom

    root = tmp_path_factory.mktemp("fedsa") / "phantom"
    generate_phantom(root, centers=2, studies_per_center=20, image_size=32, seed=0,
                     heldout_center=False)
    return str(root)


def test_rounds_share_a_and_keep_each_clients_b(ray_cluster, dataset, tmp_path):
    from fedmrg.fl.checkpoint import latest_checkpoint
    from fedmrg.fl.client import FederatedClient
    from fedmrg.fl.coordinator import Coordinator, InProcessPool
    from fedmrg.fl.wire import from_wire
    from fedmrg.model.params import get_shared_state

    s = make_strategy(tiny_client_config("fedsa_lora", dataset, str(tmp_path / "lm"),
                                         rounds=2))
    cfg = s.cfg
    clients = {c: FederatedClient(cfg, c, dataset_root=dataset, seed=cfg.seed,
                                  generation={"num_beams": 1, "max_new_tokens": 4},
                                  eval_samples=1, checkpoint_dir=tmp_path / c / "checkpoints")
               for c in ("a", "b")}
    replies: dict[int, list[ClientUpdate]] = {}
    own_b: dict[str, dict[str, torch.Tensor]] = {}

    class Recording(InProcessPool):
        def submit_fit(self, center, plan):
            if plan.round_id == 2:  # what the client holds before round 2 loads its plan
                own_b[center] = {n: t for n, t in get_shared_state(
                    self.clients[center].model).items() if n in b_names}
            return super().submit_fit(center, plan)

        def result(self, handle):
            reply = super().result(handle)
            if isinstance(reply, ClientUpdate):
                replies.setdefault(reply.round_id, []).append(from_wire(reply))
            return reply

    initial = get_shared_state(clients["a"].model)
    a_names = [n for n in initial if is_lora_factor(n) and ".lora_A." in n]
    b_names = [n for n in initial if is_lora_factor(n) and ".lora_B." in n]
    assert a_names and b_names
    try:
        coordinator = Coordinator(cfg, s, Recording(clients), initial,
                                  np.random.default_rng(cfg.seed))
        result = coordinator.run()
        state = result.global_state
        assert not set(b_names) & set(state)  # B never reached the server
        for round_id in (1, 2):
            assert all(set(u.lora) == set(a_names) for u in replies[round_id])  # only A
        last = sorted(replies[2], key=lambda u: u.center)
        total = sum(u.num_samples for u in last)
        for a in a_names:
            mean_a = sum(u.num_samples / total * u.lora[a].double() for u in last)
            assert torch.allclose(state[a].double(), mean_a, atol=1e-6)
        # each client's B survived round 2's plan and the evaluation (both load the global
        # state around it), differs between the clients, and is in its own checkpoint
        finals = {c: get_shared_state(client.model) for c, client in clients.items()}
        assert any(not torch.equal(finals["a"][n], finals["b"][n]) for n in b_names)
        for c, client in clients.items():
            assert any(not torch.equal(own_b[c][n], initial[n]) for n in b_names)  # trained
            assert all(torch.equal(finals[c][n], state[n]) for n in a_names)
            saved = latest_checkpoint(client.checkpoint_dir).load()["shared"]
            assert set(saved) == set(b_names)
            assert all(torch.equal(saved[n], finals[c][n]) for n in b_names)
    finally:
        for client in clients.values():
            client.close()
