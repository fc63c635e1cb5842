"""Strategies on synthetic ClientUpdates (pure, no model, no Ray): what the server keeps after
a round, what a plan carries, seeded sampling, server optimizers, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmrg.config import ConfigError, ExperimentConfig, config_from_dict, replace_keys
from fedmrg.fl.lowrank import ErrorFeedback, LowRankUpdate, aggregate_lora_states
from fedmrg.fl.messages import ClientUpdate, UpdateSpec
from fedmrg.fl.server_optim import ServerAdam, ServerSGD, make_server_optimizer
from fedmrg.fl.strategies import (
    LABEL_COUNTS,
    PROTOTYPES,
    STACKED,
    Centralized,
    FedAvg,
    FederationError,
    FedMRG,
    Local,
    make_strategy,
    sample_clients,
)
from fedmrg.model.losses import log_prior_from_counts, merge_prototypes

R, D, K = 2, 5, 6  # LoRA rank, out and in features
A1, B1 = "decoder.m1.lora_A.generic.weight", "decoder.m1.lora_B.generic.weight"
A2, B2 = "decoder.m2.lora_A.generic.weight", "decoder.m2.lora_B.generic.weight"
W, BIAS, STAT = "projector.net.0.weight", "projector.net.0.bias", "encoder.bn.running_mean"
SAMPLES = {"a": 10, "b": 30, "c": 20}


def global_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {A1: torch.randn(R, K, generator=g), B1: torch.zeros(D, R),
            A2: torch.randn(R, K, generator=g), B2: torch.zeros(D, R),
            W: torch.randn(8, 6, generator=g), BIAS: torch.randn(8, generator=g),
            STAT: torch.randn(4, generator=g)}


def trained(center: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A client's shared state after local training (random but seeded per center)."""
    g = torch.Generator().manual_seed(1000 * seed + ord(center))
    return {n: t + torch.randn(t.shape, generator=g) for n, t in global_state().items()}


def make_update(center: str, start: dict[str, torch.Tensor], rank: int = 0,
                round_id: int = 1, seed: int = 0, **extra) -> ClientUpdate:
    state = trained(center, seed)
    lora = {n: state[n] for n in (A1, B1, A2, B2)}
    deltas = {n: state[n] - start[n] for n in (W, BIAS, STAT)}
    dense = ErrorFeedback().compress_all(deltas, rank)
    return ClientUpdate(round_id=round_id, center=center, num_samples=SAMPLES[center],
                        lora=lora, dense=dense, **extra)


def config(strategy: str = "fedmrg", **federation) -> ExperimentConfig:
    return config_from_dict({"federation": {"strategy": strategy, **federation}})


def weights() -> list[float]:
    total = sum(SAMPLES.values())
    return [SAMPLES[c] / total for c in sorted(SAMPLES)]


# --------------------------------------------------------------------------- LoRA aggregation


@pytest.mark.parametrize("method", ["fedavg", "exact", "stack"])
def test_global_adapter_equals_the_direct_aggregation_of_the_clients_factors(method):
    strategy = make_strategy(config("fedmrg", aggregation=method))
    start = global_state()
    strategy.initialize(start)
    updates = [make_update(c, start) for c in ("c", "a", "b")]  # arrival order is not used
    strategy.aggregate_round(1, updates)
    ordered = sorted(updates, key=lambda u: u.center)
    direct = aggregate_lora_states(method, [u.lora for u in ordered],
                                   [u.num_samples for u in ordered])
    state = strategy.global_state()
    w = weights()
    for a, b in ((A1, B1), (A2, B2)):
        product = sum(wk * u.lora[b].double() @ u.lora[a].double()
                      for wk, u in zip(w, ordered, strict=True))  # (D, K) exact mean product
        if method == "stack":
            got_a, got_b = state[STACKED + a], state[STACKED + b]
            assert got_a.shape == (3 * R, K)  # the rank grows to sum_k r_k
            assert torch.allclose((got_b @ got_a).double(), product, atol=1e-5)
            assert torch.equal(state[a], start[a]) and torch.equal(state[b], start[b])
        else:
            got_a, got_b = state[a], state[b]
            assert got_a.shape == (R, K) and got_b.shape == (D, R)
        assert torch.allclose(got_a, direct[a]) and torch.allclose(got_b, direct[b])
        if method == "fedavg":  # factor by factor, independent of lowrank's code
            mean_a = sum(wk * u.lora[a] for wk, u in zip(w, ordered, strict=True))
            assert torch.allclose(got_a, mean_a, atol=1e-6)
            assert not torch.allclose((got_b @ got_a).double(), product, atol=1e-3)
        if method == "exact":  # Eckart-Young: the best rank-R approximation of the mean product
            U, S, Vh = torch.linalg.svd(product)
            best = U[:, :R] @ torch.diag(S[:R]) @ Vh[:R]
            assert torch.allclose((got_b @ got_a).double(), best, atol=1e-5)


def test_stack_accumulates_rounds_and_clients_restart_from_the_initial_factors():
    strategy = make_strategy(config("fedmrg", aggregation="stack"))
    start = global_state()
    strategy.initialize(start)
    assert strategy.global_state() is strategy.global_state()  # one object shared by plans
    assert not any(n.startswith(STACKED) for n in strategy.plan(1, "a").global_state)
    rounds = []
    for round_id in (1, 2):
        plan_state = strategy.plan(round_id, "a").global_state
        assert torch.equal(plan_state[A1], start[A1])  # every round restarts from B = 0
        ups = [make_update(c, start, round_id=round_id, seed=round_id) for c in "ab"]
        rounds.append(ups)
        metrics = strategy.aggregate_round(round_id, ups)
    assert metrics["lora_rank"] == 2 * 2 * R
    state = strategy.global_state()
    total = torch.zeros(D, K, dtype=torch.float64)
    for ups in rounds:
        n = sum(u.num_samples for u in ups)
        total += sum(u.num_samples / n * u.lora[B1].double() @ u.lora[A1].double() for u in ups)
    assert torch.allclose((state[STACKED + B1] @ state[STACKED + A1]).double(), total, atol=1e-5)


# --------------------------------------------------------------------------- dense updates


@pytest.mark.parametrize("rank", [0, 2])
def test_dense_updates_are_averaged_by_sample_count(rank):
    strategy = make_strategy(config("fedmrg", dense_update_rank=rank))
    start = global_state()
    strategy.initialize(start)
    updates = [make_update(c, start, rank=rank) for c in ("b", "a", "c")]
    if rank:  # the 8x6 weight travels as factors, the 1-D tensors dense
        assert all(isinstance(u.dense[W], LowRankUpdate) for u in updates)
        assert all(isinstance(u.dense[BIAS], torch.Tensor) for u in updates)
    strategy.aggregate_round(1, updates)
    state = strategy.global_state()
    w = weights()
    ordered = sorted(updates, key=lambda u: u.center)
    for name in (W, BIAS, STAT):
        sent = [u.dense[name].dense() if isinstance(u.dense[name], LowRankUpdate)
                else u.dense[name] for u in ordered]
        expected = start[name] + sum(wk * d for wk, d in zip(w, sent, strict=True))
        assert torch.allclose(state[name], expected, atol=1e-5), name
    if rank == 0:  # dense mode is exact FedAvg of the trained weights
        mean = sum(wk * trained(u.center)[W] for wk, u in zip(w, ordered, strict=True))
        assert torch.allclose(state[W], mean, atol=1e-5)


@pytest.mark.parametrize("strategy_name", ["fedavg", "fedmrg", "fedprox"])
def test_a_state_handed_out_never_changes_when_the_next_round_aggregates(strategy_name):
    # plans, evaluations and the Ray pool's object-store copy may still hold the old state
    strategy = make_strategy(config(strategy_name, dense_update_rank=2))
    start = global_state()
    strategy.initialize(start)
    before = strategy.global_state()
    copy = {n: t.clone() for n, t in before.items()}
    strategy.aggregate_round(1, [make_update(c, start, rank=2) for c in ("a", "b", "c")])
    after = strategy.global_state()
    assert after is not before
    assert before.keys() == copy.keys()
    assert all(torch.equal(before[n], copy[n]) for n in copy)
    assert not torch.equal(after[W], before[W]) and not torch.equal(after[A1], before[A1])


def test_an_update_without_a_shared_tensor_is_an_error_naming_the_center():
    strategy = make_strategy(config("fedavg"))
    start = global_state()
    strategy.initialize(start)
    bad = make_update("b", start)
    del bad.dense[BIAS]
    with pytest.raises(FederationError, match=r"center 'b'.*projector.net.0.bias"):
        strategy.aggregate_round(1, [make_update("a", start), bad])
    twice = [make_update("a", start), make_update("a", start)]
    with pytest.raises(FederationError, match="two updates from center 'a'"):
        strategy.aggregate_round(1, twice)


# --------------------------------------------------------------------------- prototypes, prior


def test_fedmrg_merges_prototypes_and_label_counts_into_the_next_plan():
    strategy = make_strategy(config("fedmrg"))
    start = global_state()
    strategy.initialize(start)
    first = strategy.plan(1, "a")
    assert first.tensors == {}
    assert first.config == {"send_prototypes": True, "send_label_counts": True}
    assert set(strategy.update_spec().statistics) == {PROTOTYPES, "prototype_counts",
                                                      LABEL_COUNTS}
    g = torch.Generator().manual_seed(3)
    updates = []
    for c in ("a", "b"):
        protos, counts = torch.randn(14, 8, generator=g), torch.randint(0, 5, (14,), generator=g)
        labels = torch.randint(0, 50, (14, 4), generator=g)
        updates.append(make_update(c, start, statistics={
            PROTOTYPES: protos, "prototype_counts": counts, LABEL_COUNTS: labels}))
    metrics = strategy.aggregate_round(1, updates)
    merged, counts = merge_prototypes([(u.statistics[PROTOTYPES],
                                        u.statistics["prototype_counts"]) for u in updates])
    plan = strategy.plan(2, "b")
    assert torch.equal(plan.tensors[PROTOTYPES], merged)
    assert torch.equal(plan.tensors["prototype_counts"], counts)
    assert metrics["prototype_classes"] == float((counts > 0).sum())
    prior = log_prior_from_counts(updates[0].statistics[LABEL_COUNTS]
                                  + updates[1].statistics[LABEL_COUNTS])
    log_prior = plan.tensors["log_prior"]
    assert torch.allclose(log_prior, prior.to(log_prior.dtype))
    # a center's counts replace its earlier ones (never double counted across rounds)
    strategy.aggregate_round(2, [make_update(
        "a", start, statistics={LABEL_COUNTS: updates[0].statistics[LABEL_COUNTS]})])
    assert torch.allclose(strategy.plan(3, "a").tensors["log_prior"], log_prior)


def test_fedmrg_ablations_turn_off_what_the_plan_asks_for():
    cfg = replace_keys(config("fedmrg"), {"model.losses.contrastive_global": 0.0,
                                          "model.losses.diagnosis_logit_adjust_tau": 0.0})
    strategy = make_strategy(cfg)
    assert strategy.plan(1, "a").config == {} and strategy.update_spec().statistics == {}


def test_fedavg_plans_carry_no_prototypes_prior_or_mu():
    strategy = make_strategy(config("fedavg"))
    strategy.initialize(global_state())
    plan = strategy.plan(1, "a")
    assert plan.global_state is strategy.global_state()
    assert plan.tensors == {} and plan.config == {}
    assert plan.local_steps == ExperimentConfig().train.local_steps


def test_fedprox_plans_carry_mu():
    strategy = make_strategy(config("fedprox"))
    strategy.initialize(global_state())
    mu = strategy.plan(1, "a").config["fedprox_mu"]
    assert mu == ExperimentConfig().train.fedprox_mu > 0
    cfg = replace_keys(config("fedprox"), {"train.fedprox_mu": 0.05})
    assert make_strategy(cfg).plan(1, "a").config["fedprox_mu"] == 0.05
    fedmrg = replace_keys(config("fedmrg"), {"train.fedprox_mu": 0.05})  # only fedprox sends it
    assert "fedprox_mu" not in make_strategy(fedmrg).plan(1, "a").config


def test_the_registry_is_what_config_cli_and_benchmark_offer():
    import dataclasses

    from fedmrg.config import FederationConfig
    from fedmrg.fl.strategies import STRATEGIES, Strategy, strategy_class, strategy_names

    # the names config and CLI read from the modules' source are the registered classes
    assert strategy_names() == tuple(STRATEGIES)
    assert {"fedavg", "fedprox", "fedmrg", "local", "centralized"} <= set(STRATEGIES)
    assert all(issubclass(cls, Strategy) and cls.name == name for name, cls in STRATEGIES.items())
    strategy = {f.name: f for f in dataclasses.fields(FederationConfig)}["strategy"]
    assert tuple(strategy.metadata["choices"]) == tuple(STRATEGIES)
    with pytest.raises(ConfigError, match="federation.strategy: 'fedsgd' is not one of"):
        strategy_class("fedsgd")


def test_local_keeps_no_global_state():
    strategy = make_strategy(config("local"))
    assert isinstance(strategy, Local)
    strategy.initialize(global_state())
    assert strategy.global_state() is None
    assert strategy.update_spec() == UpdateSpec()
    plan = strategy.plan(1, "a")
    assert plan.global_state is None and plan.tensors == {}
    empty = ClientUpdate(1, "a", 10, lora={}, dense={}, metrics={"loss": 1.0})
    assert strategy.aggregate_round(1, [empty])["clients"] == 1.0
    with pytest.raises(FederationError, match="expects no model update"):
        strategy.aggregate_round(1, [make_update("a", global_state())])


def test_centralized_is_fedavg_over_exactly_one_client():
    strategy = make_strategy(config("centralized"))
    assert isinstance(strategy, Centralized) and isinstance(strategy, FedAvg)
    rng = np.random.default_rng(0)
    assert strategy.configure_round(1, ["pooled"], rng) == ["pooled"]
    with pytest.raises(FederationError, match="one client over the pooled data"):
        strategy.configure_round(1, ["a", "b"], rng)
    start = global_state()
    strategy.initialize(start)
    update = make_update("a", start)
    strategy.aggregate_round(1, [update])
    state = trained("a")
    assert all(torch.allclose(strategy.global_state()[n], state[n], atol=1e-6) for n in state)


# --------------------------------------------------------------------------- configure


def test_configure_sets_only_the_strategys_definition():
    # an explicit ablation outside fedavg's definition
    user = replace_keys(config("fedavg"), {"model.diagnosis_prompts": False,
                                           "model.losses.diagnosis": 0.3})
    strategy = make_strategy(user)
    cfg = strategy.cfg
    assert not cfg.model.specialized_adapter and cfg.model.losses.mutual == 0
    assert cfg.model.losses.contrastive_global == 0 and cfg.model.losses.contrastive_local == 0
    assert cfg.federation.aggregation == "fedavg" and cfg.federation.dense_update_rank == 0
    assert cfg.model.diagnosis_prompts is False and cfg.model.losses.diagnosis == 0.3
    assert user.model.specialized_adapter  # the caller's config is not mutated
    assert make_strategy(cfg).cfg is cfg  # resolved once: configuring it again changes nothing
    changes = strategy.implied_changes(user)
    assert changes["federation.aggregation"] == ("exact", "fedavg")
    assert "model.diagnosis_prompts" not in changes


def test_fedmrg_never_undoes_a_users_ablation():
    user = replace_keys(config("fedmrg", aggregation="fedavg", dense_update_rank=0),
                        {"model.specialized_adapter": False, "model.losses.mutual": 0.0})
    strategy = make_strategy(user)
    assert strategy.implied_changes(user) == {}
    assert strategy.cfg is user


def test_an_implied_key_is_validated_like_a_users():
    class Misspelt(FedAvg):  # no name: never registered
        implies = {"federation.roundz": 1}

    class OutOfRange(FedAvg):
        implies = {"federation.fraction": 2.0}

    with pytest.raises(ConfigError, match="strategy 'fedavg' implies unknown key "
                                          "federation.roundz"):
        Misspelt.configure(config("fedavg"))
    with pytest.raises(ConfigError, match="federation.fraction: 2.0 is above the maximum 1"):
        OutOfRange.configure(config("fedavg"))


def test_a_client_refuses_a_config_its_strategy_would_still_change():
    from fedmrg.fl.strategies import make_client_strategy

    user = config("fedavg")
    with pytest.raises(ConfigError, match="not resolved for strategy 'fedavg': it implies "
                                          "model.specialized_adapter=False"):
        make_client_strategy(user)
    resolved = make_strategy(user).cfg
    assert make_client_strategy(resolved).cfg is resolved


def test_unknown_strategy_and_server_optimizer_are_config_errors():
    with pytest.raises(ConfigError, match="federation.strategy: 'fedsgd'"):
        config("fedsgd")
    with pytest.raises(ConfigError, match="server_optimizer: 'sgd'"):
        make_server_optimizer("sgd", 1.0)


# --------------------------------------------------------------------------- sampling


def test_sampling_is_seeded_sorted_and_respects_fraction_and_min_clients():
    centers = ["d", "b", "a", "c", "e", "f"]

    def sequence(seed: int, pool=centers) -> list[list[str]]:
        rng = np.random.default_rng(seed)
        return [sample_clients(pool, 0.5, 1, rng) for _ in range(6)]

    first = sequence(7)
    assert first == sequence(7)  # same seed, same sampling sequence
    assert first == sequence(7, sorted(centers))  # the pool's listing order does not matter
    assert first != sequence(8)
    assert all(len(s) == 3 and s == sorted(s) and set(s) <= set(centers) for s in first)
    assert len({tuple(s) for s in first}) > 1  # rounds draw different clients
    rng = np.random.default_rng(0)
    assert len(sample_clients(centers, 0.1, 4, rng)) == 4  # min_clients wins over fraction
    assert sample_clients(centers, 1.0, 1, rng) == sorted(centers)
    assert len(sample_clients(centers, 0.0, 1, rng)) == 1
    with pytest.raises(FederationError, match="min_clients is 7"):
        sample_clients(centers, 1.0, 7, rng)


def test_strategy_configure_round_uses_the_config():
    strategy = make_strategy(config("fedmrg", fraction=0.5, min_clients=2))
    rng = np.random.default_rng(1)
    chosen = strategy.configure_round(1, ["a", "b", "c", "d", "e"], rng)
    assert len(chosen) == 3 and chosen == sorted(chosen)


# --------------------------------------------------------------------------- server optimizer


def test_server_adam_moves_the_state_in_the_pseudo_gradients_direction():
    delta = torch.tensor([0.5, -2.0, 1e-4, 0.0])
    params = {"w": torch.zeros(4)}
    adam = ServerAdam(lr=0.1)
    adam.step(params, {"w": delta})
    step = params["w"]
    assert torch.equal(torch.sign(step), torch.sign(delta))
    expected = 0.1 * 0.1 * delta / (0.1 * delta.abs() + 1e-3)  # m = 0.1 d, sqrt(v) = 0.1 |d|
    assert torch.allclose(step, expected)
    assert step[:2].abs().max() < 0.1 + 1e-6  # the step is bounded by lr, not by |delta|
    state = adam.state_dict()
    again = ServerAdam(lr=0.1)
    again.load_state_dict(state)
    p1, p2 = {"w": torch.ones(4)}, {"w": torch.ones(4)}
    adam.step(p1, {"w": delta})
    again.step(p2, {"w": delta})
    assert torch.equal(p1["w"], p2["w"])  # moments survive a checkpoint
    sgd = {"w": torch.ones(4)}
    ServerSGD(0.5).step(sgd, {"w": delta})
    assert torch.allclose(sgd["w"], 1 + 0.5 * delta)


def test_fedadam_moves_dense_tensors_and_replaces_lora_factors():
    strategy = make_strategy(config("fedmrg", server_optimizer="adam", server_lr=0.01,
                                    aggregation="fedavg"))
    start = global_state()
    strategy.initialize(start)
    updates = [make_update(c, start) for c in "abc"]
    strategy.aggregate_round(1, updates)
    state = strategy.global_state()
    w = weights()
    mean_delta = sum(wk * u.dense[W] for wk, u in zip(w, updates, strict=True))
    moved = state[W] - start[W]
    assert torch.equal(torch.sign(moved), torch.sign(mean_delta))
    assert moved.abs().max() <= 0.01 + 1e-6
    mean_stat = sum(wk * u.dense[STAT] for wk, u in zip(w, updates, strict=True))
    assert torch.allclose(state[STAT], start[STAT] + mean_stat, atol=1e-6)  # plain average
    direct = aggregate_lora_states("fedavg", [u.lora for u in updates], list(SAMPLES.values()))
    assert torch.allclose(state[A1], direct[A1])


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("method", ["exact", "stack"])
def test_state_dict_round_trip_gives_the_same_next_round(method):
    cfg = config("fedmrg", aggregation=method, server_optimizer="adam", server_lr=0.01)
    start = global_state()
    protos = {"prototypes": torch.randn(14, 8), "prototype_counts": torch.ones(14).long(),
              "label_counts": torch.ones(14, 4).long()}
    one = make_strategy(cfg)
    one.initialize(start)
    one.aggregate_round(1, [make_update(c, start, statistics=protos) for c in "ab"])
    two = FedMRG(cfg)
    two.load_state_dict(one.state_dict())
    for s in (one, two):
        s.aggregate_round(2, [make_update(c, start, seed=2, statistics=protos) for c in "ab"])
    p1, p2 = one.plan(3, "a"), two.plan(3, "a")
    assert p1.global_state.keys() == p2.global_state.keys()
    assert all(torch.equal(p1.global_state[n], p2.global_state[n]) for n in p1.global_state)
    assert p1.tensors.keys() == p2.tensors.keys() == {"prototypes", "prototype_counts",
                                                      "log_prior"}
    assert all(torch.equal(p1.tensors[n], p2.tensors[n]) for n in p1.tensors)
    with pytest.raises(FederationError, match="strategy state of 'fedmrg' loaded into 'fedavg'"):
        FedAvg(config("fedavg")).load_state_dict(one.state_dict())
