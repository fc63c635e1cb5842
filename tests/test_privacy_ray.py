"""Privacy over real Ray actors (the in-process protocol and DP rounds: test_privacy_rounds.py).

- secure aggregation (ffa_lora, 3 client actors of the tiny model on the shared test cluster,
  `RayClientPool(record=True)`): in round 1 no message that reached the coordinator carries a
  client's update (the masked vectors look nothing like the plain ones), and the new global
  state is the sample-weighted mean of the plain updates to fixed-point precision; in round 2
  one client masks its update and then fails, and the round still aggregates the other two
  (its pairwise masks removed with the survivors' Shamir shares). The plain updates are read
  where they are masked, inside each actor (`PlainKeepingHost`).
- `fedmrg run` stopped by `privacy.target_epsilon` ends with one line saying so (epsilon
  spent, the target, rounds done of planned), and the run's summary and MLflow description
  say the same.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import ray
import torch
from helpers import CHEAP, TINY_ROUNDS, tiny_overrides

from fedmrg.config import load_config
from fedmrg.fl.actors import ClientHost, RayClientPool, client_actor_options, stop_actors
from fedmrg.fl.coordinator import Coordinator
from fedmrg.fl.lowrank import is_lora_factor
from fedmrg.fl.messages import ClientUpdate
from fedmrg.fl.strategies import make_strategy
from fedmrg.privacy.dp import PrivacyAccountant
from fedmrg.privacy.secagg import AdvertisedKeys, dequantize

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CENTERS = ("a", "b", "c")
DROP_ROUND = 2  # "c" masks its update in this round, then fails


class PlainKeepingHost(ClientHost):
    """The product's client actor, plus two test-only duties: every masked fit keeps the plain
    change it masked (`plain`), and `drop_after_mask` makes a round's fit fail after masking."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kept: dict[tuple[str, int], tuple[dict[str, torch.Tensor], int]] = {}
        self.drop_rounds: set[int] = set()
        for center, client in self.clients.items():
            session = client.secure_aggregation_session()
            session.masked_vector = self._keeping(center, session.masked_vector)

    def _keeping(self, center, masked_vector):
        from fedmrg.privacy.linear import update_changes

        def keep(plan, round_id, update, start):
            changes = update_changes(update, start)
            self.kept[(center, round_id)] = ({n: t.clone() for n, t in changes.items()},
                                             int(update.num_samples))
            return masked_vector(plan, round_id, update, start)
        return keep

    def plain(self, center: str, round_id: int):
        return self.kept.get((center, round_id))

    def drop_after_mask(self, round_id: int) -> None:
        self.drop_rounds.add(round_id)

    def fit(self, center, plan, global_state):
        update = super().fit(center, plan, global_state)  # trained and masked
        if plan.round_id in self.drop_rounds:
            raise RuntimeError(f"injected: {center} lost after masking round {plan.round_id}")
        return update


@pytest.fixture(scope="module")
def fleet(ray_cluster, tmp_path_factory):
    from fedmrg.data.prepare import ensure_dataset
    from fedmrg.model.base_lm import builtin_build_info

    tmp = tmp_path_factory.mktemp("secagg-ray")
    cfg = load_config("default", [*tiny_overrides(tmp), *CHEAP, "data.phantom.centers=3",
                                  "federation.strategy=ffa_lora", "federation.rounds=2",
                                  "federation.min_clients=2", "model.freeze_encoder=true",
                                  "privacy.secure_aggregation=true"])
    cfg = make_strategy(cfg).cfg
    root = ensure_dataset(cfg.data)
    builtin_build_info(cfg.model)  # build the LM once; the actors read the cache
    # workers cannot import this test module: send the host's code along with the class
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    remote = ray.remote(PlainKeepingHost)
    actors = {c: remote.options(**client_actor_options(cfg.resources, c)).remote(
        cfg, {c: None}, dataset_root=str(root), seed=cfg.seed) for c in CENTERS}
    ray.get([a.ready.remote(c) for c, a in actors.items()])
    initial = ray.get(actors["a"].shared_state.remote("a"))
    yield cfg, actors, initial
    stop_actors(actors.values())


def plain_changes(actors, round_id: int, centers) -> dict[str, tuple[dict, int]]:
    return {c: ray.get(actors[c].plain.remote(c, round_id)) for c in centers}


def assert_weighted_mean(before, after, plain: dict[str, tuple[dict, int]]) -> None:
    """`after` = `before` + the sample-weighted mean of the plain changes (fixed point 2^-24)."""
    total = sum(n for _, n in plain.values())
    moved = [name for name in next(iter(plain.values()))[0] if name in after]
    assert any(is_lora_factor(n) for n in moved) and any(not is_lora_factor(n) for n in moved)
    for name in moved:
        expected = before[name].double() + sum(n * changes[name].double()
                                               for changes, n in plain.values()) / total
        assert torch.allclose(after[name].double(), expected, atol=1e-6), name


def test_secure_aggregation_over_ray_actors_with_a_client_lost_after_masking(fleet):
    cfg, actors, initial = fleet
    strategy = make_strategy(cfg)
    pool = RayClientPool(actors, record=True)
    coordinator = Coordinator(strategy.cfg, strategy, pool, initial,
                              np.random.default_rng(cfg.seed))

    before = dict(coordinator.strategy.global_state())
    first = coordinator.step()
    assert first.participants == list(CENTERS) and not first.rejected
    plain = plain_changes(actors, 1, CENTERS)
    # the coordinator's view: keys, share ciphertexts, masked vectors, unmasking shares
    kinds = [type(m).__name__ for m in pool.received]
    assert kinds.count("AdvertisedKeys") == 3 and kinds.count("ClientUpdate") == 3
    for message in pool.received:
        if isinstance(message, ClientUpdate):
            assert not message.lora and not message.dense and not message.statistics
            assert message.masked.dtype == torch.int64
            changes, n = plain[message.center]
            vector = n * torch.cat([t.reshape(-1).double() for _, t in sorted(changes.items())])
            seen = dequantize(message.masked.numpy().view(np.uint64), 24)
            assert seen.size == vector.numel() > 1000
            assert np.mean(np.abs(seen - vector.numpy()) < 1e-3) < 1e-3  # no value shows
            assert abs(np.corrcoef(seen, vector.numpy())[0, 1]) < 0.05
        elif isinstance(message, dict):  # shares: ciphertexts; unmasking: field elements
            assert all(isinstance(v, (bytes, tuple)) for v in message.values())
        else:
            assert isinstance(message, AdvertisedKeys)
    after = coordinator.strategy.global_state()
    assert_weighted_mean(before, after, plain)

    # round 2: "c" shares its keys and masks its update, then is lost
    ray.get(actors["c"].drop_after_mask.remote(DROP_ROUND))
    before, seen_before = dict(after), len(pool.received)
    second = coordinator.step()
    assert second.participants == ["a", "b"] and set(second.rejected) == {"c"}
    assert "lost after masking" in second.rejected["c"]
    assert ray.get(actors["c"].plain.remote("c", DROP_ROUND)) is not None  # it did mask
    updates = [m for m in pool.received[seen_before:] if isinstance(m, ClientUpdate)]
    assert sorted(u.center for u in updates) == ["a", "b"]
    assert_weighted_mean(before, coordinator.strategy.global_state(),
                         plain_changes(actors, DROP_ROUND, ("a", "b")))


def test_a_run_stopped_by_the_privacy_budget_says_so(ray_cluster, tmp_path):
    from click.testing import CliRunner
    from mlflow import MlflowClient

    from fedmrg.cli import main

    one, two = PrivacyAccountant(), PrivacyAccountant()
    one.step(1.0, 1.0)
    two.step(1.0, 1.0, 2)
    target = (one.epsilon(1e-5) + two.epsilon(1e-5)) / 2  # room for 1 of the 2 rounds
    items = [*tiny_overrides(tmp_path), *CHEAP, "federation.strategy=ffa_lora",
             "privacy.mode=central", "privacy.noise_multiplier=1.0", "privacy.noise_seed=3",
             f"privacy.target_epsilon={target}"]
    args = ["run", "--run-name", "budget", "--summary-json", str(tmp_path / "summary.json")]
    for item in items:
        args += ["--set", item]
    outcome = CliRunner().invoke(main, args)
    assert outcome.exit_code == 0, outcome.output

    line = (f"stopped by the privacy budget after 1 of {TINY_ROUNDS} rounds: epsilon "
            f"{one.epsilon(1e-5):.3g} spent of privacy.target_epsilon={target:g} (delta 1e-05);"
            f" round 2 would have reached epsilon {two.epsilon(1e-5):.3g}")
    printed = outcome.output.strip().splitlines()
    assert printed[-2] == line and printed[-1].startswith("summary: ")  # the table's last line
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["rounds"]) == 1 and summary["privacy"]["stopped"] == line
    saved = json.loads((tmp_path / "runs" / "budget" / "summary.json").read_text())
    assert saved["privacy"]["stopped"] == line
    run = MlflowClient(tracking_uri=summary["mlflow"]["tracking_uri"]).get_run(
        summary["mlflow"]["run_id"])
    assert run.data.tags["mlflow.note.content"].endswith(f"\n\nS{line[1:]}.")
    assert run.data.metrics["privacy_epsilon"] == pytest.approx(one.epsilon(1e-5))
