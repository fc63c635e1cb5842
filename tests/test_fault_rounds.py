"""Fault injection over real Ray actors: rounds that survive their clients (issue 5).

Three client actors (`FaultyHost`: the product's `ClientHost` plus a test-only `inject` that
breaks chosen rounds) on the shared test cluster, the tiny model of test_federation_ray.py,
three phantom centers. Each test runs a fresh `Coordinator` (fedmrg strategy, exact
aggregation) over them for 2-3 rounds, without evaluation, and asserts the rounds' outcomes,
what was rejected and why, the fault counts in the round metrics, and the final global state:
exactly a replay of the strategy over the accepted updates as they reached the coordinator
(`RayClientPool(record=True)`), clipped where clipping applied.

Faults: NaN values and a wrong shape; an update 1000x the others (rejected, then clipped); a
reply delivered twice; a straggler past the deadline; a client process killed mid-round
(restarted by Ray, rejoins); too few clients after retries (a clean error, bounded, state at
the last completed round). Deadlines are 4x a measured honest round (at least 8 s), so a loaded
machine slows the tests down without failing them.
"""

from __future__ import annotations

import copy
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from helpers import tiny_overrides

from fedmrg.config import load_config, replace_keys
from fedmrg.fl.actors import ClientHost, RayClientPool, client_actor_options, stop_actors
from fedmrg.fl.coordinator import Coordinator, RoundFailedError, ValidationPointSkipped
from fedmrg.fl.messages import ClientUpdate
from fedmrg.fl.strategies import FederationError, make_strategy
from fedmrg.fl.validation import scale_update, update_norm
from fedmrg.fl.wire import from_wire

pytestmark = [pytest.mark.ray, pytest.mark.faults, pytest.mark.slow]

CENTERS = ("a", "b", "c")
WAIT_S = 120.0  # the longest a hold or a wait for a signal file lasts (no test hangs)
# a blocked call waits for its release longer than any deadline a loaded machine measures
# (4x an honest round or evaluation); the `signals` fixture releases it after each test
BLOCK_S = 600.0


class FaultyHost(ClientHost):
    """A client actor whose fit breaks on request: `inject({round_id: fault}, folder)`.

    crash: raise before training; nan / shape: train, then put NaN in a dense update / give a
    LoRA factor one column too many; x1000: train, then send 1000x the change (factors
    G + 1000 (X - G), deltas x1000); block: wait for `<folder>/release`, then train normally;
    hold: write `<folder>/started-<center>`, then sleep (until the process is killed).
    Under the key "evaluate": block every evaluate call the same way.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.faults: dict[int, str] = {}
        self.folder: str | None = None

    def inject(self, faults: dict[int, str], folder: str | None = None) -> None:
        self.faults, self.folder = dict(faults), folder

    def _wait_for(self, path: Path, wait_s: float = BLOCK_S) -> None:
        deadline = time.monotonic() + wait_s
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def fit(self, center, plan, global_state):
        fault = self.faults.get(plan.round_id)
        if fault == "crash":
            raise RuntimeError(f"injected crash in round {plan.round_id}")
        if fault == "block":
            self._wait_for(Path(self.folder, "release"))
        if fault == "hold":
            Path(self.folder, f"started-{center}").touch()
            time.sleep(WAIT_S)
        update = super().fit(center, plan, global_state)
        if fault == "nan":
            name = sorted(n for n, t in update.dense.items() if isinstance(t, torch.Tensor))[0]
            update.dense[name] = torch.full_like(update.dense[name], float("nan"))
        elif fault == "shape":
            name = sorted(n for n in update.lora if ".lora_A." in n)[0]
            factor = update.lora[name]
            update.lora[name] = torch.cat([factor, factor[:, :1]], dim=1)
        elif fault == "x1000":
            # against the state the client trained from (round 2 on: a delta, not the state)
            update = scale_update(update, self.clients[center].synced_state, 1000.0)
        return update

    def evaluate(self, center, *args, **kwargs):
        if self.faults.get("evaluate") == "block":
            self._wait_for(Path(self.folder, "release"))
        return super().evaluate(center, *args, **kwargs)


@pytest.fixture(scope="module")
def fleet(ray_cluster, tmp_path_factory):
    """Three started FaultyHost actors, the configured config and the initial global state."""
    from fedmrg.data.prepare import ensure_dataset
    from fedmrg.model.base_lm import builtin_build_info

    tmp = tmp_path_factory.mktemp("faults")
    cfg = load_config("default", [*tiny_overrides(tmp), "data.phantom.centers=3",
                                  "federation.aggregation=exact"])
    cfg = make_strategy(cfg).cfg
    root = ensure_dataset(cfg.data)
    builtin_build_info(cfg.model)  # build the LM once; the actors read the cache
    # workers cannot import this test module: send FaultyHost's code along with the class
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    remote = ray.remote(FaultyHost)
    actors = {c: remote.options(**client_actor_options(cfg.resources, c)).remote(
        cfg, {c: None}, dataset_root=str(root), seed=cfg.seed) for c in CENTERS}
    placement = {c: ray.get(a.ready.remote(c)) for c, a in actors.items()}
    initial = ray.get(actors["a"].shared_state.remote("a"))
    yield {"cfg": cfg, "actors": actors, "placement": placement, "initial": initial,
           "tmp": tmp}
    stop_actors(actors.values())


@pytest.fixture
def signals(fleet, tmp_path):
    """A folder for `block`/`hold` signals; afterwards every blocked call is released and
    every actor's faults are cleared (waiting for the calls still queued)."""
    yield tmp_path
    (tmp_path / "release").touch()
    ray.get([a.inject.remote({}) for a in fleet["actors"].values()], timeout=300)


def inject(fleet, faults: dict[str, dict[int, str]], folder: Path | None = None) -> None:
    ray.get([fleet["actors"][c].inject.remote(f, str(folder) if folder else None)
             for c, f in faults.items()])


def coordinator_over(fleet, pool: RayClientPool, **federation) -> Coordinator:
    cfg = replace_keys(fleet["cfg"], {"federation.rounds": 3, "federation.min_clients": 2,
                                      **{f"federation.{k}": v for k, v in federation.items()}})
    strategy = make_strategy(cfg)
    return Coordinator(strategy.cfg, strategy, pool, fleet["initial"],
                       np.random.default_rng(cfg.seed))


def received(pool: RayClientPool, round_id: int, centers) -> list[ClientUpdate]:
    """The replies of `round_id` from `centers` as they reached the coordinator, one each."""
    out = {m.center: m for m in pool.received
           if isinstance(m, ClientUpdate) and m.round_id == round_id and m.center in centers}
    assert sorted(out) == sorted(centers), (round_id, sorted(out))
    return [from_wire(out[c]) for c in sorted(out)]


def replay(coordinator: Coordinator, fleet, rounds: list[list[ClientUpdate]]):
    """A fresh strategy that aggregates exactly `rounds` of updates from the initial state."""
    strategy = make_strategy(coordinator.cfg)
    strategy.initialize(dict(fleet["initial"]))
    for round_id, updates in enumerate(rounds, 1):
        strategy.aggregate_round(round_id, updates)
    return strategy


def assert_state(coordinator: Coordinator, expected) -> None:
    got, want = coordinator.strategy.global_state(), expected.global_state()
    assert got.keys() == want.keys()
    for name in got:
        assert torch.equal(got[name], want[name]), name


# --------------------------------------------------------------------------- bad updates


def test_nan_and_wrong_shapes_are_rejected_and_the_rounds_go_on(fleet, signals):
    inject(fleet, {"b": {1: "nan"}, "c": {1: "shape"}})
    pool = RayClientPool(fleet["actors"], record=True)
    coordinator = coordinator_over(fleet, pool, min_clients=1)
    first, second = coordinator.step(), coordinator.step()
    assert first.participants == ["a"] and second.participants == list(CENTERS)
    assert "has non-finite values" in first.rejected["b"]
    assert ".lora_A.generic.weight' has shape" in first.rejected["c"]
    assert "expected" in first.rejected["c"] and "(any rank)" in first.rejected["c"]
    assert first.metrics["rejected_invalid"] == 2 and second.metrics["rejected_invalid"] == 0
    assert math.isfinite(second.metrics["loss"])
    expected = replay(coordinator, fleet, [received(pool, 1, "a"),
                                           received(pool, 2, CENTERS)])
    assert_state(coordinator, expected)


def test_an_update_1000x_the_others_is_rejected_then_clipped(fleet, signals):
    inject(fleet, {"b": {2: "x1000", 3: "x1000"}})
    pool = RayClientPool(fleet["actors"], record=True)
    coordinator = coordinator_over(fleet, pool)
    honest = coordinator.step()
    norms = [honest.metrics[f"{c}/update_norm"] for c in CENTERS]
    assert all(0 < n < math.inf for n in norms) and honest.metrics["rejected_norm"] == 0
    bound = math.sqrt(1000) * max(norms)  # far from honest rounds and from a 1000x one
    coordinator.cfg = replace_keys(coordinator.cfg, {"federation.max_update_norm": bound})

    rejected = coordinator.step()
    assert rejected.participants == ["a", "c"] and rejected.metrics["rejected_norm"] == 1
    huge = rejected.metrics["b/update_norm"]
    assert huge > bound and rejected.metrics["update_norm_max"] == huge
    assert rejected.rejected["b"] == (f"update norm {huge:.6g} exceeds "
                                      f"federation.max_update_norm={bound:g}")

    coordinator.cfg = replace_keys(coordinator.cfg, {"federation.update_norm_action": "clip"})
    clipped = coordinator.step()
    assert clipped.participants == list(CENTERS) and clipped.rejected == {}
    assert list(clipped.clipped) == ["b"] and clipped.metrics["clipped"] == 1
    assert clipped.clipped["b"] == clipped.metrics["b/update_norm"] > bound

    rounds = [received(pool, 1, CENTERS), received(pool, 2, "ac")]
    before_round_3 = replay(coordinator, fleet, rounds).global_state()
    b3 = received(pool, 3, "b")[0]
    b3_clipped = scale_update(b3, before_round_3, bound / update_norm(b3, before_round_3))
    assert update_norm(b3_clipped, before_round_3) == pytest.approx(bound, rel=1e-4)
    a3, _, c3 = received(pool, 3, CENTERS)
    assert_state(coordinator, replay(coordinator, fleet, [*rounds, [a3, b3_clipped, c3]]))


class DeliverTwicePool(RayClientPool):
    """An at-least-once transport: every fit reply of client "b" is delivered twice."""

    def wait(self, handles, num_returns, timeout_s):
        ready, pending = super().wait(handles, num_returns, timeout_s)
        return ready + [h for h in ready if h.center == "b" and h.kind == "fit"], pending


def test_a_reply_delivered_twice_is_applied_once(fleet, signals):
    pool = DeliverTwicePool(fleet["actors"], record=True)
    coordinator = coordinator_over(fleet, pool)
    summaries = [coordinator.step(), coordinator.step()]
    for summary in summaries:
        assert summary.participants == list(CENTERS)
        assert summary.metrics["duplicate_replies_dropped"] == 1
    assert sum(isinstance(m, ClientUpdate) for m in pool.received) == 6  # read once each
    expected = replay(coordinator, fleet, [received(pool, r, CENTERS) for r in (1, 2)])
    assert_state(coordinator, expected)


# --------------------------------------------------------------------------- lost clients


def test_a_straggler_past_the_deadline_is_dropped_and_its_late_reply_never_applied(
        fleet, signals):
    pool = RayClientPool(fleet["actors"], record=True)
    coordinator = coordinator_over(fleet, pool)
    honest = coordinator.step()  # measures a round on this machine, now
    deadline = max(8.0, 4 * honest.round_time_s)  # generous: a loaded machine is bursty
    inject(fleet, {"b": {2: "block"}}, signals)
    coordinator.cfg = replace_keys(coordinator.cfg, {"federation.round_deadline_s": deadline})

    started = time.monotonic()
    straggled = coordinator.step()
    assert time.monotonic() - started < deadline + 60  # closed at the deadline, not at b
    assert straggled.participants == ["a", "c"]
    assert straggled.rejected == {"b": f"no reply within the {deadline:g} s deadline"}
    assert straggled.metrics["rejected_deadline"] == 1 and len(coordinator.abandoned) == 1

    (signals / "release").touch()  # b finishes round 2 late, then its round-3 call runs
    coordinator.cfg = replace_keys(coordinator.cfg, {"federation.round_deadline_s": 0.0})
    after = coordinator.step()
    assert after.participants == list(CENTERS)
    assert after.metrics["late_replies_dropped"] == 1 and coordinator.abandoned == {}
    # b's round-2 reply was never read, let alone aggregated
    assert not [m for m in pool.received if isinstance(m, ClientUpdate)
                and (m.round_id, m.center) == (2, "b")]
    expected = replay(coordinator, fleet, [received(pool, 1, CENTERS), received(pool, 2, "ac"),
                                           received(pool, 3, CENTERS)])
    assert_state(coordinator, expected)


class KillingPool(RayClientPool):
    """Kills client `victim`'s process once its round-1 fit is running (SIGKILL, as the OOM
    killer would)."""

    def __init__(self, actors, victim: str, pid: int, folder: Path):
        super().__init__(actors, record=True)
        self.victim, self.pid, self.folder, self.killed = victim, pid, folder, False

    def submit_fit(self, center, plan):
        handle = super().submit_fit(center, plan)
        if center == self.victim and plan.round_id == 1:
            started = self.folder / f"started-{center}"
            deadline = time.monotonic() + WAIT_S
            while not started.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            os.kill(self.pid, signal.SIGKILL)
            self.killed = True
        return handle


def test_a_client_killed_mid_round_is_restarted_and_rejoins(fleet, signals):
    actors = fleet["actors"]
    before = ray.get(actors["b"].ready.remote("b"))
    inject(fleet, {"b": {1: "hold"}}, signals)
    pool = KillingPool(actors, "b", before["pid"], signals)
    coordinator = coordinator_over(fleet, pool)  # no deadline: Ray reports the death
    lost = coordinator.step()
    assert pool.killed and lost.participants == ["a", "c"]
    assert lost.rejected["b"].startswith("failed: fit failed: Actor")  # Unavailable/Died
    assert lost.metrics["rejected_failed"] == 1 and lost.rejoined == []

    back = coordinator.step()  # b's call waits for Ray to restart the actor, then runs
    assert back.participants == list(CENTERS), back.rejected
    assert back.rejoined == ["b"]
    assert back.metrics["rejoined"] == 1 and math.isfinite(back.metrics["b/loss"])
    after = ray.get(actors["b"].ready.remote("b"))
    assert after["restarted"] and after["pid"] != before["pid"]
    expected = replay(coordinator, fleet, [received(pool, 1, "ac"), received(pool, 2, CENTERS)])
    assert_state(coordinator, expected)


def test_too_few_clients_after_retries_stop_the_run_cleanly(fleet, signals):
    pool = RayClientPool(fleet["actors"], record=True)
    coordinator = coordinator_over(fleet, pool, round_retries=1)
    honest = coordinator.step()
    deadline = max(8.0, 4 * honest.round_time_s)  # generous: a loaded machine is bursty
    state = copy.deepcopy(coordinator.state_dict())  # the strategy's dict is live
    # round 2, both attempts: b crashes, c never answers; a alone is below min_clients=2
    inject(fleet, {"b": {2: "crash"}, "c": {2: "block"}}, signals)
    coordinator.cfg = replace_keys(coordinator.cfg, {"federation.round_deadline_s": deadline})

    started = time.monotonic()
    with pytest.raises(RoundFailedError) as info:
        coordinator.step()
    elapsed = time.monotonic() - started
    assert elapsed < 2 * deadline + 60  # two bounded attempts, no hang
    message = str(info.value)
    assert message.startswith("round 2: fewer than federation.min_clients=2 usable updates in "
                              "each of 2 attempt(s) (federation.round_retries=1); the run "
                              "stops after round 1.")
    assert info.value.attempts == [
        {"b": "failed: fit failed: RuntimeError: injected crash in round 2",
         "c": f"no reply within the {deadline:g} s deadline"}] * 2
    assert "attempt 2 (sampled a, b, c; usable: a;" in message
    # the coordinator is where round 1 left it: a checkpoint of round 1 resumes the run
    after = coordinator.state_dict()
    assert after["round_id"] == coordinator.round_id == 1 and len(coordinator.history) == 1
    assert after["rng"] == state["rng"] and after["history"] == state["history"]
    for name, tensor in state["strategy"]["global"].items():
        assert torch.equal(after["strategy"]["global"][name], tensor), name
    assert len(coordinator.abandoned) == 2  # c's two calls, still blocked


def test_an_evaluation_that_hangs_fails_at_its_deadline_naming_the_client(fleet, signals):
    """federation.eval_deadline_s bounds an evaluation: a client that hangs while evaluating
    stops a test evaluation with one error naming it (no hang), skips a validation point,
    and its late replies are dropped once it answers."""
    pool = RayClientPool(fleet["actors"], record=True)
    coordinator = coordinator_over(fleet, pool)
    started = time.monotonic()
    coordinator.evaluate(0, max_studies=2)  # measures an honest evaluation, now
    deadline = max(8.0, 4 * (time.monotonic() - started))
    coordinator.cfg = replace_keys(coordinator.cfg, {"federation.eval_deadline_s": deadline})
    inject(fleet, {"b": {"evaluate": "block"}}, signals)
    read = len(pool.received)

    started = time.monotonic()
    with pytest.raises(FederationError) as info:
        coordinator.evaluate(0, max_studies=2)
    assert time.monotonic() - started < deadline + 60  # closed at the deadline, not at b
    message = str(info.value)
    assert message.startswith("round 0 test evaluation: ")
    for view in ("generalization", "personalization"):  # b's second call queued behind
        assert (f"{view} evaluation of 'b' on client 'b' failed (deadline): no reply "
                f"within federation.eval_deadline_s={deadline:g} s") in message
    assert "'a'" not in message and "--resume evaluates again" in message
    assert sorted(set(coordinator.abandoned.values())) == ["b"]

    with pytest.raises(ValidationPointSkipped, match="round 0 val evaluation: .*client 'b'"):
        coordinator.evaluate(0, split="val", max_studies=2)  # b's calls queue behind
    abandoned = len(coordinator.abandoned)
    assert abandoned == 4  # b's generalization and personalization, twice

    (signals / "release").touch()
    deadline_at = time.monotonic() + 120
    while coordinator.abandoned and time.monotonic() < deadline_at:
        coordinator.drop_late_replies()
        time.sleep(0.2)
    assert coordinator.abandoned == {} and coordinator.late_replies_dropped == abandoned
    # every reply read after b hung is from a or c: b's late ones were never read
    assert {m.center for m in pool.received[read:]} == {"a", "c"}
