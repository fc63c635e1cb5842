"""LocalTrainer: determinism, learning, FedProx, schedule, clipping, what it optimizes.

Tiny model (32-wide 1-layer Llama, narrow resnet10t at 32 px); the builtin LM is built once
per module into a temporary cache.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_model_config

from fedmrg.config import LossConfig, TrainConfig
from fedmrg.data.schema import NUM_OBSERVATIONS
from fedmrg.model.base_lm import load_base_lm
from fedmrg.model.mrg import MRGModel
from fedmrg.model.params import get_shared_state, parameter_groups
from fedmrg.model.trainer import (
    LocalTrainer,
    TrainerError,
    epoch_batches,
    linear_decay,
    lr_factor,
    proximal_term,
)

B, V, SIZE = 4, 2, 32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids OpenMP contention
    that makes each step 30-100x slower when other processes load the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def make_model(tmp_path_factory, corpus):
    cache = str(tmp_path_factory.mktemp("lm_cache"))

    def make(seed: int = 0, **over) -> MRGModel:
        cfg = tiny_model_config(cache, **over)
        lm, tok = load_base_lm(cfg, corpus=corpus)
        return MRGModel.from_config(cfg, lm, tok, seed=seed)

    return make


def make_batch(corpus: list[str], seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "images": torch.randn(B, V, 1, SIZE, SIZE, generator=g),
        "view_mask": torch.tensor([[True, False], [True, True], [True, False], [True, True]]),
        "labels": torch.randint(0, 4, (B, NUM_OBSERVATIONS), generator=g),
        "report": [corpus[(seed * B + i) % len(corpus)] for i in range(B)],
        "study_id": [f"s{seed}-{i}" for i in range(B)],
    }


@pytest.fixture(scope="module")
def batches(corpus) -> list[dict]:
    return [make_batch(corpus, s) for s in range(3)]


def trainable_state(model: MRGModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------- schedule


def test_lr_factor_warmup_then_constant_or_cosine():
    assert [lr_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(0, 0) == 1.0  # no warm-up
    cos = [lr_factor(s, 2, "cosine", total_steps=10, min_lr_ratio=0.1) for s in range(12)]
    assert cos[:3] == [0.5, 1.0, 1.0]  # warm-up, then the cosine starts at 1
    assert cos[6] == pytest.approx(0.1 + 0.9 * 0.5)  # half way (step 6 of 2..10)
    assert cos[10] == pytest.approx(0.1) and cos[11] == pytest.approx(0.1)  # held at the floor
    assert all(a >= b for a, b in zip(cos[1:], cos[2:], strict=False))
    with pytest.raises(TrainerError, match="needs total_steps"):
        lr_factor(5, 1, "cosine")
    with pytest.raises(TrainerError, match="schedule: 'step'"):
        lr_factor(5, 1, "step")


def test_trainer_applies_the_warmup_to_the_optimizer(make_model, batches):
    model = make_model()
    trainer = LocalTrainer(model, TrainConfig(lr=1e-3, warmup_steps=4), seed=0)
    seen = []
    for _ in range(5):
        seen.append(trainer.optimizer.param_groups[0]["lr"])
        out = trainer.fit(batches[:1], 1)
        assert out["lr"] == pytest.approx(seen[-1])
    assert seen == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    assert trainer.step == 5


def test_linear_decay():
    tf = linear_decay(1.0, 0.2, 8)
    assert [tf(s) for s in (0, 4, 8, 100)] == pytest.approx([1.0, 0.6, 0.2, 0.2])
    with pytest.raises(TrainerError, match="steps must be >= 1"):
        linear_decay(1.0, 0.0, 0)


# --------------------------------------------------------------------------- training


def test_same_seed_same_batches_identical_weights(make_model, batches):
    finals = []
    for trainer_seed in (7, 7, 8):
        model = make_model(seed=0, prompt_teacher_forcing=0.5, lora_dropout=0.2)
        trainer = LocalTrainer(model, TrainConfig(lr=5e-3, warmup_steps=1), seed=trainer_seed)
        trainer.fit(batches, 3)
        finals.append(trainable_state(model))
    assert all(torch.equal(finals[0][n], finals[1][n]) for n in finals[0])
    # another trainer seed draws other teacher-forcing and dropout masks: other weights
    assert any(not torch.equal(finals[0][n], finals[2][n]) for n in finals[0])


def test_training_leaves_the_global_rng_alone(make_model, batches):
    model = make_model(lora_dropout=0.2)
    trainer = LocalTrainer(model, TrainConfig(), seed=0)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    trainer.fit(batches, 2)
    assert torch.equal(torch.rand(3), expected)


def test_loss_decreases_on_a_tiny_batch(make_model, batches):
    model = make_model()
    trainer = LocalTrainer(model, TrainConfig(lr=1e-2, warmup_steps=0), seed=0)
    first = trainer.fit(batches[:1], 1)
    for _ in range(40):
        last = trainer.fit(batches[:1], 1)
    # The heads fit one batch fast; the adapters of this barely warmed-up 32-wide LM slowly.
    assert last["diagnosis"] < 0.1 * first["diagnosis"]
    assert last["contrastive_local"] < 0.1 * first["contrastive_local"]
    for term in ("lm_generic", "lm_personal"):
        assert last[term] < first[term] - 0.08, (term, first[term], last[term])
    assert last["loss"] < 0.85 * first["loss"]


def test_fit_reports_means_counts_and_continues_a_generator(make_model, batches, corpus):
    model = make_model()
    trainer = LocalTrainer(model, TrainConfig(), seed=0)
    seen = []

    def stream():
        for i in range(5):
            seen.append(i)
            yield make_batch(corpus, i)

    gen = stream()
    out = trainer.fit(gen, 2)
    assert out["steps"] == 2 and out["samples"] == 2 * B and out["exhausted"] == 0.0
    assert seen == [0, 1]  # takes exactly the batches it trains on
    for key in ("loss", "lm_generic", "lm_personal", "mutual", "diagnosis", "contrastive_local",
                "grad_norm", "wall_s", "lr"):
        assert math.isfinite(out[key]), key
    assert "contrastive_global" not in out  # no prototypes given
    out = trainer.fit(gen, 10)  # the same generator continues, then runs out
    assert seen == [0, 1, 2, 3, 4]
    assert out["steps"] == 3 and out["exhausted"] == 1.0
    out = trainer.fit(batches, None)  # steps=None: one pass over the iterable
    assert out["steps"] == len(batches) and trainer.step == 2 + 3 + len(batches)
    with pytest.raises(TrainerError, match="yielded no batch"):
        trainer.fit([], 3)


def test_fit_passes_prototypes_and_log_prior(make_model, batches):
    model = make_model()
    protos, counts = model.local_prototypes(batches)
    prior = torch.log_softmax(torch.randn(NUM_OBSERVATIONS, 4), -1)
    trainer = LocalTrainer(model, TrainConfig(), seed=0)
    out = trainer.fit(batches[:1], 1, prototypes=protos, proto_counts=counts, log_prior=prior)
    assert out["contrastive_global"] > 0


def test_optimizer_holds_exactly_the_trainable_parameters(make_model, batches):
    model = make_model(freeze_encoder=True)
    trainer = LocalTrainer(model, TrainConfig(lr=1e-2), seed=0)
    groups = parameter_groups(model)
    expected = {id(p) for g in ("shared", "private") for p in groups[g].values()
                if p.requires_grad}
    in_opt = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert in_opt == expected
    assert not expected & {id(p) for p in groups["frozen"].values()}
    frozen_before = {n: p.detach().clone() for n, p in groups["frozen"].items()}
    assert any("q_proj.base_layer" in n for n in frozen_before)
    assert any(n.startswith("encoder.") for n in frozen_before)
    shared_before = get_shared_state(model)
    trainer.fit(batches, 3)
    for name, p in groups["frozen"].items():
        assert torch.equal(p, frozen_before[name]), name  # base LM and frozen encoder
    shared_after = get_shared_state(model)
    assert any(not torch.equal(shared_before[n], shared_after[n]) for n in shared_before)


def test_gradient_clipping_bounds_the_norm(make_model, batches):
    model = make_model()
    trainer = LocalTrainer(model, TrainConfig(grad_clip=1e-3), seed=0)
    out = trainer.fit(batches[:1], 1)
    assert out["grad_norm"] > 1e-3  # the norm before clipping, reported
    params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    assert float(norm) <= 1e-3 * (1 + 1e-4)
    unclipped = LocalTrainer(make_model(), TrainConfig(grad_clip=0.0), seed=0)
    assert unclipped.fit(batches[:1], 1)["grad_norm"] == pytest.approx(out["grad_norm"],
                                                                       rel=1e-4)


def test_optimizer_state_persists_and_resets_by_group(make_model, batches):
    model = make_model()
    trainer = LocalTrainer(model, TrainConfig(), seed=0)
    trainer.fit(batches[:1], 1)
    with_grad = {p for p in trainer.trainable.values() if p.grad is not None}
    assert set(trainer.optimizer.state) == with_grad  # global head: no prototypes, no grad
    assert len(with_grad) < len(trainer.trainable)
    state = trainer.optimizer.state[next(iter(trainer.shared.values()))]
    assert int(state["step"]) == 1
    trainer.fit(batches[:1], 1)
    assert int(state["step"]) == 2  # the same moments, continued
    trainer.reset_optimizer("shared")
    assert all(p not in trainer.optimizer.state for p in trainer.shared.values())
    assert all(p in trainer.optimizer.state for p in trainer.private.values())
    assert trainer.step == 2  # no second warm-up
    trainer.fit(batches[:1], 1)  # fresh moments for the shared tensors
    assert int(trainer.optimizer.state[next(iter(trainer.shared.values()))]["step"]) == 1
    with pytest.raises(TrainerError, match="group 'frozen'"):
        trainer.reset_optimizer("frozen")


def test_state_dict_round_trip_resumes_identically(make_model, batches):
    a = make_model(prompt_teacher_forcing=0.5)
    ta = LocalTrainer(a, TrainConfig(warmup_steps=3), seed=1)
    ta.fit(batches[:2], 2)
    saved_model = {k: v.clone() for k, v in a.state_dict().items()}
    saved = ta.state_dict()
    ta.fit(batches, 3)
    b = make_model(prompt_teacher_forcing=0.5)
    b.load_state_dict(saved_model)
    tb = LocalTrainer(b, TrainConfig(warmup_steps=3), seed=1)
    tb.load_state_dict(saved)
    tb.fit(batches, 3)
    sa, sb = trainable_state(a), trainable_state(b)
    assert all(torch.equal(sa[n], sb[n]) for n in sa)


# --------------------------------------------------------------------------- FedProx


def test_proximal_term_zero_at_reference_positive_away():
    params = {"w": torch.nn.Parameter(torch.tensor([1.0, 2.0]))}
    assert float(proximal_term(params, {"w": torch.tensor([1.0, 2.0])}, 0.5).detach()) == 0.0
    value = proximal_term(params, {"w": torch.tensor([0.0, 0.0]), "bn.running_mean": 0}, 0.5)
    assert float(value.detach()) == pytest.approx(0.25 * 5.0)  # mu/2 * ||w||^2; extra keys ignored
    value.backward()
    assert torch.allclose(params["w"].grad, 0.5 * torch.tensor([1.0, 2.0]))  # mu (w - ref)
    with pytest.raises(TrainerError, match="missing shared parameter 'w'"):
        proximal_term(params, {}, 0.5)
    with pytest.raises(TrainerError, match=r"'w' has shape \(3,\)"):
        proximal_term(params, {"w": torch.zeros(3)}, 0.5)


def test_fedprox_pulls_shared_weights_toward_the_reference(make_model, batches):
    def distance_after(mu: float) -> tuple[float, dict]:
        model = make_model()
        reference = get_shared_state(model)
        trainer = LocalTrainer(model, TrainConfig(lr=1e-2, warmup_steps=0), seed=0)
        first = trainer.fit(batches[:1], 1, prox_reference=reference, mu=mu)
        out = trainer.fit(batches, 5, prox_reference=reference, mu=mu)
        after = get_shared_state(model)
        dist = sum(float((after[n] - reference[n]).pow(2).sum()) for n in trainer.shared)
        return dist, {"first": first, "last": out}

    free, free_out = distance_after(0.0)
    prox, prox_out = distance_after(50.0)
    assert "prox" not in free_out["last"]
    assert prox_out["first"]["prox"] == 0.0  # first step: the weights are the reference
    assert prox_out["last"]["prox"] > 0.0
    assert prox < 0.5 * free


def test_fedprox_defaults_to_the_weights_at_fit_start(make_model, batches):
    model = make_model()
    trainer = LocalTrainer(model, TrainConfig(lr=1e-2, fedprox_mu=1.0), seed=0)
    assert "prox" not in trainer.fit(batches, 1)  # config's mu alone does not turn it on
    out = trainer.fit(batches, 3, mu=1.0)  # no reference: the shared weights when fit started
    assert out["prox"] > 0.0
    with pytest.raises(TrainerError, match="missing shared parameter"):
        trainer.fit(batches, 1, prox_reference={}, mu=1.0)


# --------------------------------------------------------------------------- arguments


def test_teacher_forcing_schedule_is_applied_per_step_without_mutating_config(make_model,
                                                                              batches):
    model = make_model(prompt_teacher_forcing=1.0)
    cfg = model.cfg
    seen = []
    real_prompt_states = model.prompt_states

    def spy(logits, labels=None, generator=None):
        seen.append(model.cfg.prompt_teacher_forcing)
        return real_prompt_states(logits, labels, generator)

    model.prompt_states = spy
    trainer = LocalTrainer(model, TrainConfig(), seed=0, teacher_forcing=linear_decay(1.0, 0.0,
                                                                                      2))
    trainer.fit(batches, 3)
    assert seen == [1.0, 0.5, 0.0]
    assert model.cfg is cfg and cfg.prompt_teacher_forcing == 1.0
    bad = LocalTrainer(model, TrainConfig(), seed=0, teacher_forcing=lambda step: 2.0)
    with pytest.raises(TrainerError, match="not a probability"):
        bad.fit(batches, 1)
    assert model.cfg is cfg


def test_trainer_argument_errors(make_model):
    model = make_model()
    with pytest.raises(TrainerError, match="needs total_steps"):
        LocalTrainer(model, TrainConfig(), schedule="cosine")
    with pytest.raises(TrainerError, match="schedule: 'linear'"):
        LocalTrainer(model, TrainConfig(), schedule="linear")
    with pytest.raises(TrainerError, match="min_lr_ratio"):
        LocalTrainer(model, TrainConfig(), schedule="cosine", total_steps=5, min_lr_ratio=2.0)
    trainer = LocalTrainer(model, TrainConfig(), seed=0)
    with pytest.raises(TrainerError, match="steps: expected >= 0"):
        trainer.fit([], -1)
    with pytest.raises(TrainerError, match="mu: expected >= 0"):
        trainer.fit([], 1, mu=-1.0)


def test_non_finite_loss_names_the_step(make_model, batches):
    model = make_model(losses=LossConfig(lm_generic=0, lm_personal=0, mutual=0,
                                         contrastive_local=0))
    trainer = LocalTrainer(model, TrainConfig(), seed=0)
    with torch.no_grad():
        model.diagnosis_head.linear.bias.fill_(float("inf"))
    with pytest.raises(TrainerError, match="non-finite loss at step 0"):
        trainer.fit(batches[:1], 1)


# --------------------------------------------------------------------------- epochs


class FakeStream:
    def __init__(self, per_epoch: int):
        self.per_epoch = per_epoch

    def iter_batches(self, epoch: int = 0):
        for i in range(self.per_epoch):
            yield {"epoch": epoch, "i": i}


def test_epoch_batches_walks_epochs_in_order():
    got = [(b["epoch"], b["i"]) for b in epoch_batches(FakeStream(2), start_epoch=3,
                                                       max_epochs=2)]
    assert got == [(3, 0), (3, 1), (4, 0), (4, 1)]
    endless = epoch_batches(FakeStream(1))
    assert [next(endless)["epoch"] for _ in range(4)] == [0, 1, 2, 3]
    with pytest.raises(TrainerError, match="epoch 0 yielded no batch"):
        next(epoch_batches(FakeStream(0)))
