"""Reproducibility (issue 5): the same config and seed give the same run, bit for bit, on CPU.

Short fedmrg runs on the shared test cluster, three phantom centers, fraction 0.6 (two of
three sampled each round, so the sampling sequence and the aggregation order both matter),
2 rounds, the tiny model of test_federation_ray.py:
- A and B, seed 0, each through the product's path (`Experiment(cfg).fit()`: client and
  coordinator actors, MLflow, evaluation), one after the other, each generating its own copy
  of the dataset; A with one client per actor, B with `resources.clients_per_actor=2`
  (centers a and b trained in turn by one actor, c by another): where a client runs does not
  change what it computes. Same dataset bytes, the seeded sampling sequence, bit-identical client
  replies per (round, center) (same initialization, data order and training), bit-identical
  final global state and private specialized adapters, equal evaluation metrics.
- C, another seed, run beside B: its rounds only (the product's `Coordinator` over client
  actors, no evaluation, which needs a METEOR JVM per client: too much memory on the shared
  machine). Another sampling sequence and another global state.
The aggregation does not depend on the order replies arrive in (the strategy sorts by center).

The run and comparison helpers (`tiny_run_config`, `fit_concurrently`, `state_bits`, ...) are
in tests/helpers.py.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import (
    CHEAP,
    bits,
    build_lm_once,
    experiment,
    fit_concurrently,
    state_bits,
    tiny_run_config,
)

from fedmrg.config import ExperimentConfig
from fedmrg.data.shards import VERIFIED_CACHE
from fedmrg.fl.messages import ClientUpdate
from fedmrg.fl.strategies import make_strategy, sample_clients
from fedmrg.fl.wire import from_wire

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CENTERS = ("a", "b", "c")
ROUNDS = 2
FRACTION = 0.6  # ceil(0.6 * 3) = 2 of 3 centers per round


# --------------------------------------------------------------------------- helpers


def sampling_sequence(seed: int, rounds: int = ROUNDS) -> list[list[str]]:
    """The participants the coordinator's seeded RNG draws for each round (no failures)."""
    rng = np.random.default_rng(seed)
    return [sample_clients(CENTERS, FRACTION, 1, rng) for _ in range(rounds)]


def other_seed() -> int:
    """The smallest seed above 0 whose sampling sequence differs from seed 0's."""
    return next(s for s in range(1, 100) if sampling_sequence(s) != sampling_sequence(0))


def update_bits(update: ClientUpdate) -> dict[str, Any]:
    """Every tensor of a client update, as bits (LowRankUpdate: both factors)."""
    out: dict[str, Any] = {f"lora/{n}": bits(t) for n, t in update.lora.items()}
    for name, u in update.dense.items():
        out[f"dense/{name}"] = (bits(u) if isinstance(u, torch.Tensor)
                                else (bits(u.U), bits(u.V), tuple(u.shape)))
    for field in ("prototypes", "prototype_counts", "label_counts"):
        t = update.statistics.get(field)
        out[field] = None if t is None else bits(t)
    return out


def updates_by_round_center(result) -> dict[tuple[int, str], ClientUpdate]:
    out = {}
    for m in result.messages:
        if isinstance(m, ClientUpdate):
            assert (m.round_id, m.center) not in out, "a reply recorded twice"
            out[(m.round_id, m.center)] = m
    return out


def dataset_bytes(root: Path) -> dict[str, bytes]:
    """Every data file's bytes; a client's verification cache (it holds mtimes) is not data."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != VERIFIED_CACHE}


# --------------------------------------------------------------------------- the runs


def run_rounds(cfg: ExperimentConfig, rounds: int) -> dict[str, Any]:
    """The rounds of a run without its evaluation: what `Experiment.fit` sets up (strategy,
    dataset, client actors, initial state from a client, seeded coordinator), then `rounds`
    coordinator steps. {"participants": per round, "global_state": after the last}."""
    from fedmrg.data.prepare import ensure_dataset
    from fedmrg.experiment import client_layout, resolve_paths
    from fedmrg.fl.actors import RayClientPool, start_client_actors, stop_actors
    from fedmrg.fl.coordinator import Coordinator

    strategy = make_strategy(resolve_paths(cfg))
    cfg = strategy.cfg
    root = str(ensure_dataset(cfg.data))
    actors, _ = start_client_actors(cfg, client_layout(cfg.federation.strategy, CENTERS),
                                    dataset_root=root, seed=cfg.seed)
    try:
        pool = RayClientPool(actors)
        initial = pool.call_all("shared_state", centers=["a"])["a"]
        coordinator = Coordinator(cfg, strategy, pool, initial, np.random.default_rng(cfg.seed))
        summaries = [coordinator.step() for _ in range(rounds)]
    finally:
        stop_actors(actors.values())
    return {"participants": [s.participants for s in summaries],
            "global_state": strategy.global_state()}


@pytest.fixture(scope="module")
def runs(ray_cluster, tmp_path_factory):
    base = tmp_path_factory.mktemp("repro")
    lm_cache = base / "lm"
    seeds = {"A": 0, "B": 0, "C": other_seed()}
    hosting = {"B": ["resources.clients_per_actor=2"]}
    cfgs = {name: tiny_run_config(base / name, lm_cache, f"seed={seed}",
                              f"data.phantom.centers={len(CENTERS)}",
                              f"federation.fraction={FRACTION}", *CHEAP,
                              *hosting.get(name, []))
            for name, seed in seeds.items()}
    build_lm_once(cfgs["A"])
    results = fit_concurrently({"A": experiment(cfgs["A"], "repro-A")})
    results |= fit_concurrently({"B": experiment(cfgs["B"], "repro-B"),
                                 "C": lambda: run_rounds(cfgs["C"], ROUNDS)})
    for name, result in results.items():
        if isinstance(result, BaseException):
            raise AssertionError(f"run {name} failed: {result!r}") from result
    return {"results": results, "cfgs": cfgs, "seeds": seeds, "base": base}


def test_same_seed_same_data_and_sampling_sequence(runs):
    a, b, c = (runs["results"][k] for k in "ABC")
    # each run generated its own copy of the phantom benchmark: byte-identical
    data = {k: dataset_bytes(Path(runs["cfgs"][k].data.root)) for k in "AB"}
    assert data["A"] and data["A"] == data["B"]
    # the seeded sequence, two of three centers a round, replayed exactly
    expected = sampling_sequence(0)
    assert all(len(p) == 2 for p in expected)
    assert [r["participants"] for r in a.rounds] == expected
    assert [r["participants"] for r in b.rounds] == expected
    assert c["participants"] == sampling_sequence(runs["seeds"]["C"]) != expected
    assert all(not r["rejected"] for r in (*a.rounds, *b.rounds))


def test_same_seed_bit_identical_replies_and_final_state(runs):
    a, b = runs["results"]["A"], runs["results"]["B"]
    pids = {run: {c: r.placement[c]["pid"] for c in CENTERS} for run, r in (("A", a), ("B", b))}
    assert len(set(pids["A"].values())) == 3  # one actor per client
    assert pids["B"]["a"] == pids["B"]["b"] != pids["B"]["c"]  # a and b share one actor
    assert b.placement["a"]["hosts"] == ["a", "b"] and b.placement["c"]["hosts"] == ["c"]
    replies_a, replies_b = updates_by_round_center(a), updates_by_round_center(b)
    assert sorted(replies_a) == sorted(replies_b) == sorted(
        (r, c) for r, centers in enumerate(sampling_sequence(0), 1) for c in centers)
    for key in sorted(replies_a):
        # same initialization, same batches, same training: the same bits on the wire
        assert update_bits(replies_a[key]) == update_bits(replies_b[key]), key
        assert replies_a[key].num_samples == replies_b[key].num_samples
    assert a.global_state and state_bits(a.global_state) == state_bits(b.global_state)


def test_same_seed_same_private_adapters_and_evaluation(runs):
    from safetensors.torch import load_file

    a, b = runs["results"]["A"], runs["results"]["B"]
    for center in CENTERS:
        files = [Path(r.storage_dir, "centers", center, "specialized_adapter",
                      "adapter_model.safetensors") for r in (a, b)]
        tensors = [load_file(str(f)) for f in files]
        assert tensors[0] and state_bits(tensors[0]) == state_bits(tensors[1]), center
    for view in ("generalization", "personalization"):
        ours, theirs = getattr(a, view)["per_center"], getattr(b, view)["per_center"]
        assert sorted(ours) == sorted(theirs) == list(CENTERS)
        for center in CENTERS:
            # every score of the same generated reports; only wall times differ
            same = {k: v for k, v in ours[center].items() if not k.endswith("_s")}
            other = {k: v for k, v in theirs[center].items() if not k.endswith("_s")}
            assert same == pytest.approx(other, nan_ok=True, rel=0, abs=0), (view, center)


def test_another_seed_gives_another_run(runs):
    a, c = runs["results"]["A"].global_state, runs["results"]["C"]["global_state"]
    assert a.keys() == c.keys()
    differing = [n for n in a if bits(a[n]) != bits(c[n])]
    # another initialization and sampling: (nearly) every tensor differs, not a few
    assert len(differing) > len(a) // 2


def test_aggregation_does_not_depend_on_reply_order(runs):
    """The strategy aggregates in center order, whatever order replies arrived in."""
    a, cfg = runs["results"]["A"], runs["cfgs"]["A"]
    last = [m for m in a.messages if isinstance(m, ClientUpdate) and m.round_id == ROUNDS]
    assert len(last) == 2
    states = []
    for order in (last, last[::-1]):
        strategy = make_strategy(cfg)
        strategy.initialize(a.global_state)  # any state of the right names and shapes
        strategy.aggregate_round(ROUNDS, [from_wire(copy.deepcopy(u)) for u in order])
        states.append(state_bits(strategy.global_state()))
    assert states[0] == states[1]
