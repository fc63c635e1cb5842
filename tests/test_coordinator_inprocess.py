"""A real federated run in one process: plain `FederatedClient`s over Ray Data streams, the
plain `Coordinator`, `InProcessPool`. Tiny model (32-wide 1-layer Llama, narrow resnet10t at
32 px), 2 phantom centers of 20 studies + 'heldout', 2 local steps, 2 rounds.

What is checked against the messages themselves (a recording pool keeps every plan and reply):
the aggregated state equals the aggregation computed directly from the clients' factors, no
private tensor name travels, strategies send what they are defined to send, bytes are counted,
and both evaluation views come back per center and as a mean.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from helpers import (
    SHAPES,
    FakeClient,
    fake_coordinator,
    fake_state,
    tiny_client_config,
)

from fedmrg.config import ExperimentConfig, config_from_dict
from fedmrg.fl.client import FederatedClient
from fedmrg.fl.coordinator import (
    Coordinator,
    FederatedResult,
    InProcessPool,
    RoundFailedError,
)
from fedmrg.fl.lowrank import LowRankUpdate, aggregate_lora_states, decompress, is_lora_factor
from fedmrg.fl.messages import STACKED, ClientUpdate, RoundPlan
from fedmrg.fl.strategies import FederationError, make_strategy
from fedmrg.fl.validation import scale_update, update_norm
from fedmrg.fl.wire import from_wire, message_bytes
from fedmrg.model.params import get_private_state, get_shared_state

CENTERS = ("a", "b")
GENERATION = {"num_beams": 1, "max_new_tokens": 6}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    from fedmrg.data.phantom import generate_phantom

    root = tmp_path_factory.mktemp("fl") / "phantom"
    generate_phantom(root, centers=len(CENTERS), studies_per_center=20, image_size=32, seed=0,
                     heldout_center=True)
    return str(root)


@pytest.fixture(scope="module")
def lm_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("lm_cache"))


def tiny_config(strategy: str, root: str, lm_cache: str, **federation) -> ExperimentConfig:
    """The tiny in-process config; dense updates at rank 2 unless `federation` says otherwise."""
    return tiny_client_config(strategy, root, lm_cache, **{"dense_update_rank": 2, **federation})


class RecordingPool(InProcessPool):
    """Keeps every plan sent and every fit reply received, by round."""

    def __init__(self, clients):
        super().__init__(clients)
        self.plans: dict[int, dict[str, RoundPlan]] = {}
        self.updates: dict[int, dict[str, ClientUpdate]] = {}

    def submit_fit(self, center, plan):
        self.plans.setdefault(plan.round_id, {})[center] = plan
        return super().submit_fit(center, plan)

    def result(self, handle):
        reply = super().result(handle)
        if isinstance(reply, ClientUpdate):
            self.updates.setdefault(reply.round_id, {})[reply.center] = reply
        return reply


def run(strategy_name: str, root: str, lm_cache: str, **federation,
        ) -> tuple[FederatedResult, RecordingPool, dict]:
    strategy = make_strategy(tiny_config(strategy_name, root, lm_cache, **federation))
    cfg = strategy.cfg  # the strategy's configured config: what clients are built with
    clients = {c: FederatedClient(cfg, c, dataset_root=root, seed=cfg.seed,
                                  generation=GENERATION, eval_samples=2) for c in CENTERS}
    pool = RecordingPool(clients)
    initial = get_shared_state(clients["a"].model)
    coordinator = Coordinator(cfg, strategy, pool, initial, np.random.default_rng(cfg.seed),
                              heldout_centers=["heldout"])
    return coordinator.run(), pool, clients


def close(clients: dict) -> None:
    for client in clients.values():
        client.close()  # end the suspended stream passes while Ray is up


@pytest.fixture(scope="module")
def fedmrg_run(ray_cluster, dataset, lm_cache):
    result, pool, clients = run("fedmrg", dataset, lm_cache)
    yield result, pool, clients
    close(clients)


def test_fedmrg_run_completes_and_evaluates_both_views(fedmrg_run):
    result, pool, _ = fedmrg_run
    assert [s.round_id for s in result.history] == [1, 2]
    assert all(s.participants == list(CENTERS) and s.rejected == {} for s in result.history)
    assert all(math.isfinite(s.metrics["loss"]) and "a/loss" in s.metrics
               for s in result.history)
    gen, per = result.generalization, result.personalization
    assert set(gen.per_center) == {"a", "b", "heldout"}
    assert set(per.per_center) == set(CENTERS)
    for evaluation in (gen, per):
        for metrics in evaluation.per_center.values():
            assert {"bleu4", "ce_f1_micro", "diag_acc", "num_studies"} <= set(metrics)
            assert metrics["num_studies"] == 4  # 20 studies, 20% test
        assert evaluation.mean["bleu1"] == pytest.approx(
            np.mean([evaluation.per_center[c]["bleu1"] for c in CENTERS]))
    assert {r.center for r in result.generalization_replies} == {"a", "b", "heldout"}
    assert all(len(r.samples) == 2 for r in result.personalization_replies)
    # generated text only: a center's reference reports and study ids stay with it
    # (eval.share_references is off by default)
    samples = [x for r in result.personalization_replies for x in r.samples]
    assert all("generated" in x and "reference" not in x and "study_id" not in x for x in samples)
    # the true findings come from the reference report: they stay too; the predicted ones go
    assert all("true_findings" not in x and x["findings"] for x in samples)


def test_truncated_train_reports_are_counted_per_center_and_summed(fedmrg_run, dataset):
    from fedmrg.fl.client import train_report_truncation

    result, _, clients = fedmrg_run
    limit = clients["a"].cfg.data.max_report_tokens
    counts = {c: train_report_truncation(dataset, [c], clients[c].model.tokenizer, limit)
              for c in CENTERS}
    assert all(0 < n["truncated"] <= n["reports"] for n in counts.values())  # 32 tokens cut
    for summary in result.history:
        m = summary.metrics
        assert all(m[f"{c}/truncated_reports"] == counts[c]["truncated"] for c in CENTERS)
        assert m["truncated_reports"] == sum(n["truncated"] for n in counts.values())


def test_aggregated_state_equals_the_direct_aggregation_of_the_clients_messages(fedmrg_run):
    result, pool, _ = fedmrg_run
    updates = [from_wire(pool.updates[2][c]) for c in CENTERS]
    weights = [u.num_samples for u in updates]
    assert weights == [14, 14]  # the train rows of each center
    direct = aggregate_lora_states("exact", [u.lora for u in updates], weights)
    final = result.global_state
    assert direct.keys() == {n for n in final if is_lora_factor(n)}
    assert all(torch.allclose(final[n], direct[n], atol=1e-6) for n in direct)
    # dense tensors: the server's state moves by the mean update of every round (the clients
    # train from the synced downlink state, so round 2's start is not sent whole)
    start = pool.plans[1]["a"].global_state  # the initial state, sent whole in round 1
    first = [from_wire(pool.updates[1][c]) for c in CENTERS]
    for name in final:
        if is_lora_factor(name):
            continue
        moves = [sum(decompress(u.dense[name]) for u in us) / 2 for us in (first, updates)]
        assert torch.allclose(final[name], start[name] + moves[0] + moves[1], atol=1e-5), name


def test_after_round_one_the_state_goes_down_as_a_low_rank_delta(fedmrg_run):
    result, pool, clients = fedmrg_run
    first, second = pool.plans[1]["a"], pool.plans[2]["a"]
    assert first.global_state is not None and first.global_delta is None  # nothing synced yet
    assert second.global_state is None and second.global_delta is not None
    assert second.global_delta.base_version == first.state_version
    assert second.global_delta.add  # dense tensors travel as low-rank factors
    assert message_bytes(second).bytes < 0.5 * message_bytes(first).bytes
    assert result.history[1].bytes_down < 0.5 * result.history[0].bytes_down
    a, b = clients["a"]._synced, clients["b"]._synced
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)  # the same B


def test_no_private_tensor_name_ever_travels(fedmrg_run):
    _, pool, clients = fedmrg_run
    private = set(get_private_state(clients["a"].model))
    assert any("specialized" in n for n in private) and any("local_head" in n for n in private)
    for round_updates in pool.updates.values():
        for update in round_updates.values():
            names = set(update.lora) | set(update.dense)
            assert names and not names & private
            assert not any("specialized" in n or n.startswith("local_head.") for n in names)
    for round_plans in pool.plans.values():
        for plan in round_plans.values():
            delta = plan.global_delta
            names = set(plan.global_state or {}) | set(delta.replace) | set(delta.add) if delta \
                else set(plan.global_state)
            assert names and not names & private


def test_fedmrg_sends_low_rank_factors_prototypes_and_label_counts(fedmrg_run):
    _, pool, _ = fedmrg_run
    update = pool.updates[1]["a"]
    # matrices travel as rank-2 factors, vectors (biases) dense; BatchNorm stays (FedBN)
    for name in ("projector.net.0.weight", "global_head.net.0.weight",
                 "encoder.backbone.layer4.0.conv2.weight"):
        assert isinstance(update.dense[name], LowRankUpdate) and update.dense[name].rank == 2
    assert isinstance(update.dense["projector.net.0.bias"], torch.Tensor)
    # federation.whole_tensors (default: the diagnosis head) travels whole, not factorized
    head = update.dense["diagnosis_head.linear.weight"]
    assert isinstance(head, torch.Tensor) and head.dim() == 2 and min(head.shape) > 2
    assert not any(n.startswith("encoder.backbone.bn1.") for n in update.dense)
    stats = update.statistics
    assert stats["prototypes"].shape == (14, 8) and stats["prototype_counts"].shape == (14,)
    assert stats["label_counts"].dtype == torch.int64
    assert int(stats["label_counts"].sum()) == 14 * 14
    first, second = pool.plans[1]["a"], pool.plans[2]["a"]
    assert "prototypes" not in first.tensors and "log_prior" not in first.tensors
    assert second.tensors["prototypes"] is not None and second.tensors["log_prior"].shape == (14, 4)
    assert pool.plans[2]["a"].global_state is pool.plans[2]["b"].global_state  # one state


def test_bytes_up_and_down_are_the_messages_sizes(fedmrg_run):
    result, pool, _ = fedmrg_run
    for summary in result.history:
        ups = pool.updates[summary.round_id].values()
        downs = pool.plans[summary.round_id].values()
        assert summary.bytes_up == sum(message_bytes(u).bytes for u in ups)
        assert summary.bytes_down == sum(message_bytes(p).bytes for p in downs)
        assert summary.dense_equivalent_up > summary.bytes_up  # low-rank saves bytes
        assert summary.aggregation_time_s > 0 and summary.round_time_s > 0
    totals = result.communication()
    assert totals["bytes_up"] == sum(s.bytes_up for s in result.history)


def test_stacked_factors_are_merged_into_the_frozen_base_weights(fedmrg_run):
    result, _, clients = fedmrg_run
    client, state = clients["a"], dict(result.global_state)
    a_key = next(n for n in state if n.endswith("q_proj.lora_A.generic.weight"))
    b_key = a_key.replace(".lora_A.", ".lora_B.")
    layer = client.model.get_submodule(a_key.removesuffix(".lora_A.generic.weight"))
    base = layer.get_base_layer().weight
    original = base.detach().clone()
    g = torch.Generator().manual_seed(0)
    A = torch.randn(8, original.shape[1], generator=g)  # rank 8: twice the adapter's
    B = torch.randn(original.shape[0], 8, generator=g)
    client.load_global_state({**state, STACKED + a_key: A, STACKED + b_key: B})
    assert torch.allclose(base, original + layer.scaling["generic"] * B @ A, atol=1e-5)
    assert torch.equal(get_shared_state(client.model)[a_key], state[a_key])
    client.load_global_state(state)  # no stack in the state: the original weight is back
    assert torch.equal(base, original)


def test_fedavg_sends_dense_updates_and_no_prototypes(ray_cluster, dataset, lm_cache,
                                                     fedmrg_run):
    result, pool, clients = run("fedavg", dataset, lm_cache, rounds=1, wire_dtype="bf16")
    close(clients)
    assert not clients["a"].model.cfg.specialized_adapter
    wired, plan = pool.updates[1]["a"], pool.plans[1]["a"]
    floats = [*wired.lora.values(), *wired.dense.values(), *plan.global_state.values()]
    assert {t.dtype for t in floats if t.is_floating_point()} == {torch.bfloat16}
    update = from_wire(wired)
    assert update.statistics == {}
    assert update.dense and all(isinstance(t, torch.Tensor) for t in update.dense.values())
    assert message_bytes(update.dense).compression == 1.0  # rank 0: dense deltas
    assert pool.plans[1]["a"].tensors == {} and pool.plans[1]["a"].config == {}
    updates = [from_wire(pool.updates[1][c]) for c in CENTERS]
    direct = aggregate_lora_states("fedavg", [u.lora for u in updates], [14, 14])
    assert all(torch.allclose(result.global_state[n], direct[n], atol=1e-6) for n in direct)
    fedmrg_result = fedmrg_run[0]
    # same generic adapter in both; the dense part costs fedavg more, even in half the bytes
    # (measured: 4.9x, bf16 fedavg vs fp32 fedmrg)
    assert result.history[0].bytes_up > 3 * fedmrg_result.history[0].bytes_up
    assert set(result.personalization.per_center) == set(CENTERS)


def test_local_sends_no_tensors_and_evaluates_each_own_model(ray_cluster, dataset, lm_cache):
    result, pool, clients = run("local", dataset, lm_cache, rounds=1)
    close(clients)
    assert result.global_state is None
    assert all(p.global_state is None for p in pool.plans[1].values())
    for update in pool.updates[1].values():
        assert not update.lora and not update.dense and update.statistics == {}
        assert message_bytes(update).tensors == 0
    assert set(result.generalization.per_center) == {"a", "b", "heldout"}
    # the held-out center is evaluated by every local model, its metrics averaged
    heldout = [r for r in result.generalization_replies if r.center == "heldout"]
    assert len(heldout) == 2
    assert result.generalization.per_center["heldout"]["diag_acc"] == pytest.approx(
        np.mean([r.metrics["diag_acc"] for r in heldout]))
    # two models trained apart: their generic adapters differ
    a, b = (get_shared_state(clients[c].model) for c in CENTERS)
    assert any(not torch.equal(a[n], b[n]) for n in a if is_lora_factor(n))


def test_a_fit_failing_inside_the_stream_leaves_the_client_able_to_train_again(
        ray_cluster, dataset, lm_cache):
    """An error raised by the train stream (seen on a machine missing a package Ray Data's
    torch batches import) finishes the suspended pass; the client's next fit must start a new
    pass at its kept position, not find no batch (every retry used to fail so)."""
    cfg = make_strategy(tiny_config("local", dataset, lm_cache)).cfg
    client = FederatedClient(cfg, "a", dataset_root=dataset, seed=cfg.seed,
                             generation=GENERATION, eval_samples=2)
    stream = client.train_stream
    real_iter_batches = stream.iter_batches

    def failing_after_one_batch(epoch: int = 0):
        batches = real_iter_batches(epoch)
        yield next(batches)
        batches.close()
        raise ImportError("injected: a package the stream needs is missing")

    try:
        stream.iter_batches = failing_after_one_batch
        with pytest.raises(ImportError, match="injected"):
            client.fit(RoundPlan(round_id=1, global_state=None, local_steps=2))
        assert (client.epoch, client.batch_in_epoch) == (0, 1)  # the one batch it trained on
        stream.iter_batches = real_iter_batches
        update = client.fit(RoundPlan(round_id=1, global_state=None, local_steps=2))
    finally:
        client.close()
    assert update.metrics["epoch"] == 0.0 and client.batch_in_epoch == 3
    assert math.isfinite(update.metrics["loss"])


def test_a_retried_round_applies_its_delta_after_the_client_went_back_a_round(
        ray_cluster, dataset, lm_cache, tmp_path):
    """A round that failed for too few clients is retried; a client that had finished it goes
    back to its previous round's checkpoint, and the retry's plan is a delta from the synced
    version it holds (`StateBroadcast.message_for`). Going back used to drop that synced
    state: the retry failed with "needs the full state" (seen when a full disk failed most
    clients of a round in the FL-MRG benchmark)."""
    from fedmrg.fl.broadcast import StateBroadcast

    configured = make_strategy(tiny_config("fedmrg", dataset, lm_cache, download_rank=2)).cfg
    cfg = dataclasses.replace(configured, tracking=dataclasses.replace(
        configured.tracking, storage_path=str(tmp_path), run_name="retry"))
    client = FederatedClient(cfg, "a", dataset_root=dataset, seed=cfg.seed,
                             generation=GENERATION, eval_samples=2)
    try:
        initial = get_shared_state(client.model)
        broadcast = StateBroadcast(initial, rank=2)
        client.fit(RoundPlan(1, initial, local_steps=1, state_version=broadcast.version))
        moved = {n: t + 0.01 * torch.ones_like(t) if t.is_floating_point() else t
                 for n, t in initial.items()}
        delta = broadcast.advance(moved)  # the round-1 aggregate, as a delta from version 0
        first = client.fit(RoundPlan(2, None, local_steps=1, global_delta=delta))
        assert client.state_version == 1
        # round 2 failed elsewhere and is retried: this client is up to date (version 1)
        retry = broadcast.message_for(client.state_version)
        assert retry is not None and retry.base_version == retry.version == 1
        again = client.fit(RoundPlan(2, None, local_steps=1, global_delta=retry))
    finally:
        client.close()
    assert again.round_id == 2 and math.isfinite(again.metrics["loss"])
    assert client.state_version == 1
    synced = client.synced_state
    assert all(torch.equal(synced[n], broadcast.synced[n]) for n in broadcast.synced)
    assert first.lora.keys() == again.lora.keys()


def own_tensors(client: FederatedClient) -> dict[str, torch.Tensor]:
    """Every buffer of the model and its private tensors: what a client's own checkpoint must
    bring back (the shared tensors are the server's, sent with the next plan)."""
    return {**{n: b.clone() for n, b in client.model.named_buffers()},
            **get_private_state(client.model)}


def test_a_client_rebuilt_from_its_checkpoint_has_every_buffer_of_the_one_that_trained(
        ray_cluster, dataset, lm_cache, tmp_path):
    """Issue 19: BatchNorm's integer `num_batches_tracked` is in no parameter group; a
    resumed client came back with the count of a fresh one (20 vs 30 in a resumed run)."""
    configured = make_strategy(tiny_config("fedmrg", dataset, lm_cache)).cfg
    cfg = dataclasses.replace(configured, tracking=dataclasses.replace(
        configured.tracking, storage_path=str(tmp_path), run_name="counters"))
    trained = FederatedClient(cfg, "a", dataset_root=dataset, seed=cfg.seed,
                              generation=GENERATION, eval_samples=2)
    try:
        trained.fit(RoundPlan(1, get_shared_state(trained.model), local_steps=2))
        ours = own_tensors(trained)
    finally:
        trained.close()
    rebuilt = FederatedClient(cfg, "a", dataset_root=dataset, seed=cfg.seed,
                              generation=GENERATION, eval_samples=2)  # restores round 1
    try:
        theirs = own_tensors(rebuilt)
    finally:
        rebuilt.close()
    counts = {n: int(t) for n, t in ours.items() if n.endswith("num_batches_tracked")}
    assert counts and set(counts.values()) == {2}  # two training batches
    assert ours.keys() == theirs.keys()
    different = [n for n in ours if not torch.equal(ours[n], theirs[n])]
    assert not different, different[:5]


# --------------------------------------------------------------------------- pure coordinator
# Fake clients with synthetic updates: the round logic without a model (milliseconds).

def test_bad_replies_are_rejected_with_their_reason_and_the_round_goes_on():
    faults = {"a": None, "b": "stale", "c": "nan", "d": "shape", "e": "crash", "f": "private",
              "g": None}
    clients = {c: FakeClient(c, f) for c, f in faults.items()}
    coordinator = fake_coordinator(clients, rounds=1, min_clients=2)
    summary = coordinator.run_round(1)
    assert summary.participants == ["a", "g"]
    assert "late or duplicate" in summary.rejected["b"]
    assert "'head.bias' has non-finite values" in summary.rejected["c"]
    assert "'head.weight' does not fit" in summary.rejected["d"]
    assert summary.rejected["e"] == "failed: RuntimeError: out of memory"
    assert "unexpected dense update 'local_head.net.0.weight'" in summary.rejected["f"]
    # only the accepted updates were aggregated
    plan = coordinator.strategy.plan(1, "a")
    ups = [clients[c].fit(RoundPlan(1, fake_state())) for c in ("a", "g")]
    direct = aggregate_lora_states("fedavg", [u.lora for u in ups], [u.num_samples for u in ups])
    assert torch.allclose(plan.global_state["m.lora_A.generic.weight"],
                          direct["m.lora_A.generic.weight"])
    assert summary.metrics["loss"] == np.mean([ord("a"), ord("g")])
    assert summary.metrics["g/loss"] == ord("g")


def test_too_few_good_replies_fail_the_round_naming_why():
    clients = {"a": FakeClient("a"), "b": FakeClient("b", "crash")}
    with pytest.raises(Exception, match=r"fewer than federation.min_clients=2.*b: failed"):
        fake_coordinator(clients, min_clients=2).run_round(1)


class StragglerPool(InProcessPool):
    """Client "c" replies only to a wait without timeout (after the deadline)."""

    def __init__(self, clients):
        super().__init__(clients)
        self.waits: list[float | None] = []

    def wait(self, handles, num_returns, timeout_s):
        self.waits.append(timeout_s)
        fast = [h for h in handles if h.center != "c"]
        if fast:
            return fast, [h for h in handles if h.center == "c"]
        if timeout_s is not None:
            import time

            time.sleep(timeout_s)
            return [], list(handles)
        return list(handles), []


@pytest.mark.parametrize("min_clients", [2, 3])
def test_deadline_closes_the_round_at_min_clients(min_clients):
    clients = {c: FakeClient(c) for c in "abc"}
    coordinator = fake_coordinator(clients, min_clients=min_clients, round_deadline_s=0.05,
                                   round_retries=1)
    coordinator.pool = StragglerPool(clients)
    if min_clients == 2:  # a and b suffice: c is abandoned at the deadline
        summary = coordinator.run_round(1)
        assert summary.participants == ["a", "b"]
        assert summary.rejected == {"c": "no reply within the 0.05 s deadline"}
        assert summary.metrics["rejected_deadline"] == 1 and summary.attempts == 1
        assert 0 < coordinator.pool.waits[-1] <= 0.05
        assert len(coordinator.abandoned) == 1  # c's call: its reply will be dropped
    else:  # the deadline bounds every wait: too few replies fail the attempt, then the round
        with pytest.raises(RoundFailedError, match=r"min_clients=3 usable updates in each of "
                                                   r"2 attempt\(s\).*c: no reply within"):
            coordinator.run_round(1)
        assert None not in coordinator.pool.waits  # never an unbounded wait
        assert len(coordinator.abandoned) == 2  # both attempts' calls to c


@pytest.mark.parametrize("download_rank", [0, 2])
def test_a_resumed_coordinator_ends_where_an_uninterrupted_one_does(download_rank):
    clients = {c: FakeClient(c) for c in "abcd"}
    options = dict(strategy="fedmrg", rounds=3, fraction=0.5, aggregation="exact",
                   download_rank=download_rank)
    whole = fake_coordinator(clients, **options).run()
    first = fake_coordinator(clients, **options)
    first.step()
    state = first.state_dict()
    resumed = fake_coordinator(clients, **options)
    resumed.load_state_dict(state)
    result = resumed.run()
    assert [s.participants for s in result.history] == [s.participants for s in whole.history]
    assert len({tuple(s.participants) for s in whole.history}) > 1  # sampling did happen
    assert all(torch.equal(result.global_state[n], whole.global_state[n]) for n in SHAPES)


def test_evaluation_views_route_each_dataset_to_its_client():
    clients = {c: FakeClient(c) for c in "ab"}
    coordinator = fake_coordinator(clients, rounds=1)
    coordinator.heldout_centers = ["heldout"]
    seen = []
    coordinator.on_evaluation = lambda view, per, mean, step=None: seen.append((view, step))
    gen, per = coordinator.evaluate(1)
    assert gen.per_center == {
        "a": {"score": ord("a"), "has_state": 1.0}, "b": {"score": ord("b"), "has_state": 1.0},
        "heldout": {"score": ord("h"), "has_state": 1.0}}
    assert gen.mean["score"] == (ord("a") + ord("b")) / 2  # held-out not in the mean
    assert per.per_center["a"]["score"] == ord("a") + 0.5
    assert seen == [("generalization", 1), ("personalization", 1)]


class FlakyEvaluator(FakeClient):
    """Its first `failures` evaluate calls fail, as calls to an actor being restarted do."""

    def __init__(self, center: str, failures: int):
        super().__init__(center)
        self.failures = failures

    def evaluate(self, *args, **kwargs):
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("actor unavailable")
        return super().evaluate(*args, **kwargs)


@pytest.mark.parametrize("failures", [1, 3])
def test_a_failed_evaluation_is_asked_again_up_to_round_retries(failures):
    # client a runs 2 evaluations (generalization, personalization), each tried 1 + 2 times
    clients = {"a": FlakyEvaluator("a", failures), "b": FakeClient("b")}
    gen, per = fake_coordinator(clients, rounds=1, round_retries=2).evaluate(1)
    assert clients["a"].failures == 0
    assert gen.per_center["a"]["score"] == ord("a")
    assert per.per_center["a"]["score"] == ord("a") + 0.5


def test_an_evaluation_failing_past_its_retries_stops_the_run_naming_it():
    clients = {"a": FlakyEvaluator("a", 100), "b": FakeClient("b")}
    with pytest.raises(FederationError, match=r"evaluation of 'a' on client 'a' failed.*"
                                              r"actor unavailable"):
        fake_coordinator(clients, rounds=1, round_retries=2).evaluate(1)
    assert clients["a"].failures == 100 - 6  # both of its evaluations tried 1 + 2 times


# --------------------------------------------------------------------------- faults, in process
# The round's fault handling on fake clients (milliseconds); tests/test_fault_rounds.py does
# the same over real Ray actors and the tiny model.


def aggregated(*rounds: list[ClientUpdate]) -> dict[str, torch.Tensor]:
    """The fedavg global state after rounds that aggregate exactly these updates."""
    s = make_strategy(config_from_dict({"federation": {"strategy": "fedavg"}}))
    s.initialize(fake_state())
    for round_id, updates in enumerate(rounds, 1):
        s.aggregate_round(round_id, updates)
    return s.global_state()


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_round_retries_with_the_next_seeded_sample_until_enough_updates():
    # seed 3 samples [a, c] then [a, d] at fraction 0.5: c crashes, so attempt 2 succeeds
    clients = {c: FakeClient(c, "crash" if c == "c" else None) for c in "abcd"}
    coordinator = fake_coordinator(clients, fraction=0.5, min_clients=2, round_retries=2)
    summary = coordinator.run_round(1)
    assert summary.attempts == 2 and summary.participants == ["a", "d"]
    assert summary.failed_attempts == [{"c": "failed: RuntimeError: out of memory"}]
    assert summary.rejected == {}  # the aggregated attempt's own rejections
    assert summary.metrics["round_attempts"] == 2 and summary.metrics["rejected_failed"] == 1
    ups = [clients[c].fit(RoundPlan(1, fake_state())) for c in ("a", "d")]
    assert_same_state(coordinator.strategy.global_state(), aggregated(ups))
    # the same seed and the same failure give the same attempts
    again = fake_coordinator(clients, fraction=0.5, min_clients=2, round_retries=2)
    assert again.run_round(1).to_dict() | {"aggregation_time_s": 0, "round_time_s": 0} == (
        summary.to_dict() | {"aggregation_time_s": 0, "round_time_s": 0})


def test_a_failed_round_names_every_attempt_and_leaves_the_coordinator_untouched():
    clients = {c: FakeClient(c) for c in "abc"}
    coordinator = fake_coordinator(clients, rounds=3, fraction=0.5, min_clients=2,
                                   round_retries=1)
    coordinator.step()
    before = copy.deepcopy(coordinator.state_dict())  # the strategy's dict is live
    clients["b"].fault = clients["c"].fault = "crash"
    clients["a"].fault = "nan"
    with pytest.raises(RoundFailedError) as info:
        coordinator.step()
    message = str(info.value)
    assert "round 2: fewer than federation.min_clients=2 usable updates in each of 2" in message
    assert "federation.round_retries=1" in message and "stops after round 1" in message
    for center, reason in (("a", "non-finite"), ("b", "out of memory")):
        assert f"{center}: " in message and reason in message
    assert info.value.round_id == 2 and len(info.value.attempts) == 2
    after = coordinator.state_dict()
    assert after["round_id"] == 1 and len(coordinator.history) == 1
    assert after["rng"] == before["rng"]  # the failed attempts' draws were given back
    assert_same_state(after["strategy"]["global"], before["strategy"]["global"])
    # resumed as it stands, the round samples what it would have sampled without the failure
    for client in clients.values():
        client.fault = None
    assert coordinator.step().round_id == 2


class DeliverTwicePool(InProcessPool):
    """At-least-once transport: every reply of client "b" is delivered twice."""

    def wait(self, handles, num_returns, timeout_s):
        ready, pending = super().wait(handles, num_returns, timeout_s)
        return ready + [h for h in ready if h.center == "b"], pending


def test_a_reply_delivered_twice_is_aggregated_once():
    clients = {c: FakeClient(c) for c in "abc"}
    coordinator = fake_coordinator(clients)
    coordinator.pool = DeliverTwicePool(clients)
    summary = coordinator.run_round(1)
    assert summary.participants == ["a", "b", "c"]
    assert summary.metrics["duplicate_replies_dropped"] == 1
    ups = [clients[c].fit(RoundPlan(1, fake_state())) for c in "abc"]
    assert_same_state(coordinator.strategy.global_state(), aggregated(ups))


class LatePool(InProcessPool):
    """Client "c" answers round 1 only once round 2 has started (after round 1's deadline)."""

    def __init__(self, clients):
        super().__init__(clients)
        self.round, self.rounds, self.results = 0, {}, []

    def submit_fit(self, center, plan):
        handle = super().submit_fit(center, plan)
        self.round = max(self.round, plan.round_id)
        self.rounds[handle] = plan.round_id
        return handle

    def wait(self, handles, num_returns, timeout_s):
        ready = [h for h in handles if not (h.center == "c" and self.rounds[h] == self.round == 1)]
        if not ready and timeout_s:
            import time

            time.sleep(timeout_s)
        return ready, [h for h in handles if h not in ready]

    def result(self, handle):
        self.results.append((handle.center, self.rounds[handle]))
        return super().result(handle)


def test_a_late_reply_is_dropped_and_never_applied_to_a_later_round():
    clients = {c: FakeClient(c) for c in "abc"}
    coordinator = fake_coordinator(clients, rounds=2, min_clients=2, round_deadline_s=0.05)
    coordinator.pool = pool = LatePool(clients)
    first = coordinator.step()
    assert first.participants == ["a", "b"] and "deadline" in first.rejected["c"]
    second = coordinator.step()
    assert second.participants == ["a", "b", "c"] and second.metrics["late_replies_dropped"] == 1
    assert ("c", 1) not in pool.results and coordinator.abandoned == {}
    assert coordinator.late_replies_dropped == 1
    # round 2 aggregated exactly the round-2 replies, from round 1's aggregate of a and b
    ups1 = [clients[c].fit(RoundPlan(1, fake_state())) for c in "ab"]
    ups2 = [clients[c].fit(RoundPlan(2, aggregated(ups1))) for c in "abc"]
    assert_same_state(coordinator.strategy.global_state(), aggregated(ups1, ups2))


@pytest.mark.parametrize("action", ["reject", "clip"])
def test_an_update_1000x_the_others_is_rejected_or_clipped(action):
    clients = {c: FakeClient(c, "huge" if c == "b" else None) for c in "abc"}
    honest = [FakeClient(c).fit(RoundPlan(1, fake_state())) for c in "abc"]
    norms = [update_norm(u, fake_state()) for u in honest]
    bound = 10 * max(norms)
    coordinator = fake_coordinator(clients, max_update_norm=bound, update_norm_action=action)
    summary = coordinator.run_round(1)
    huge = summary.metrics["b/update_norm"]
    assert huge == pytest.approx(1000 * norms[1], rel=1e-4)
    assert summary.metrics["a/update_norm"] == pytest.approx(norms[0], rel=1e-6)
    if action == "reject":
        assert summary.participants == ["a", "c"] and summary.metrics["rejected_norm"] == 1
        assert summary.rejected["b"] == (f"update norm {huge:.6g} exceeds "
                                         f"federation.max_update_norm={bound:g}")
        expected = aggregated([honest[0], honest[2]])
    else:
        assert summary.participants == ["a", "b", "c"] and summary.rejected == {}
        assert summary.clipped == {"b": huge} and summary.metrics["clipped"] == 1
        sent = clients["b"].fit(RoundPlan(1, fake_state()))
        clipped = scale_update(sent, fake_state(), bound / huge)
        assert update_norm(clipped, fake_state()) == pytest.approx(bound, rel=1e-5)
        expected = aggregated([honest[0], clipped, honest[2]])
    assert_same_state(coordinator.strategy.global_state(), expected)
