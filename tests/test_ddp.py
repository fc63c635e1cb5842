"""A center's local round on Ray Train workers (fedmrg/fl/ddp.py): rows split exactly, the same
update from 2 gloo workers as from 1 on the same global batches, and a worker killed mid-round
failing the client's fit like any failed client (its model untouched).

The model is tiny (a 1-layer 32-wide Llama from tests/tiny_hf.py, a narrow resnet10t, frozen so
that BatchNorm statistics do not depend on the rows a worker sees), the batches synthetic:
5 rows (shards of 3 and 2: the weighting matters) with reports of equal token counts, so every
loss term that is on is a mean over rows; 3 steps.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_ENCODER
from tiny_hf import save_tiny_lm

from fedmrg.config import ExperimentConfig, config_from_dict, replace_keys
from fedmrg.fl.client import derive_seed
from fedmrg.fl.ddp import (
    RoundInputs,
    run_round_on_workers,
    shard_batch,
    shard_bounds,
    train_rows,
)
from fedmrg.fl.placement import TrainWorkers, train_workers
from fedmrg.fl.strategies import make_strategy
from fedmrg.model.base_lm import load_base_lm
from fedmrg.model.mrg import MRGModel
from fedmrg.model.params import get_private_state, get_shared_state
from fedmrg.model.trainer import LocalTrainer

ROWS, STEPS = 5, 3


def test_shards_cover_every_row_once_with_sizes_differing_by_at_most_one():
    for rows in (4, 5, 7):
        for world in (1, 2, 3):
            bounds = [shard_bounds(rows, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == rows
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
            sizes = [hi - lo for lo, hi in bounds]
            assert max(sizes) - min(sizes) <= 1
    batch = {"labels": torch.arange(10).view(5, 2), "study_id": list("abcde"),
             "center": np.array(list("aabbb")), "width": 7}
    second = shard_batch(batch, 1, 2)
    assert second["labels"].tolist() == [[6, 7], [8, 9]]
    assert second["study_id"] == ["d", "e"] and second["center"].tolist() == ["b", "b"]
    assert second["width"] == 7
    with pytest.raises(ValueError, match="a batch of 5 rows cannot feed 6 workers"):
        shard_batch(batch, 0, 6)


def test_workers_per_center_and_gpus_per_center_set_the_ray_train_workers():
    from fedmrg.config import ConfigError, load_config

    cfg = load_config("default", ["resources.workers_per_center=2"])
    assert train_workers(cfg.resources) == TrainWorkers(2, 0.5, 0.0)
    cfg = load_config("default", ["resources.gpus_per_center=4",
                                  "resources.num_cpus_per_client=2"])
    assert train_workers(cfg.resources) == TrainWorkers(4, 2.0, 1.0)
    assert not train_workers(load_config("default").resources).distributed
    with pytest.raises(ConfigError, match="resources.workers_per_center=2 with "
                                          "resources.gpus_per_center=2"):
        load_config("default", ["resources.workers_per_center=2",
                                "resources.gpus_per_center=2"])


def test_more_gpus_per_center_than_a_node_has_is_refused_naming_the_key():
    from fedmrg.config import load_config
    from fedmrg.fl.placement import check_center_gpus, resource_demand

    cfg = load_config("default", ["resources.gpus_per_center=4"])
    assert check_center_gpus(cfg.resources, [4.0, 2.0]) is None
    problem = check_center_gpus(cfg.resources, [2.0, 2.0])
    assert problem.startswith("resources.gpus_per_center=4 ") and "largest node has 2" in problem
    # the cluster-wide demand counts each center's workers beside its actor
    demand = resource_demand(cfg, {"a": None, "b": None})
    assert demand.total["GPU"] == 8.0
    assert demand.total["CPU"] == pytest.approx(2 * (0.5 + 0.25 + 4 * 0.5))


# --------------------------------------------------------------------------- on Ray Train


def tiny_config(lm: str) -> ExperimentConfig:
    return make_strategy(config_from_dict({
        "device": "cpu",
        "model": {"lm": lm, "freeze_encoder": True, "encoder_kwargs": TINY_ENCODER,
                  "visual_tokens": 2, "lora_rank": 2, "projection_dim": 8,
                  # pairs rows within a worker's rows: not a row mean
                  "losses": {"contrastive_local": 0.0}},
        "train": {"warmup_steps": 1, "lr": 1e-3},
        "federation": {"strategy": "fedavg"},
    })).cfg


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory) -> str:
    return str(save_tiny_lm("llama", tmp_path_factory.mktemp("ddp") / "lm"))


@pytest.fixture(scope="module")
def round_inputs(lm_folder) -> RoundInputs:
    """A round as a client would hand it to its workers: the model's starting state and
    optimizer state, 3 global batches."""
    cfg = tiny_config(lm_folder)
    g = torch.Generator().manual_seed(0)
    batches = [{"images": torch.randn(ROWS, 2, 1, 32, 32, generator=g),
                "view_mask": torch.tensor([[True, i % 2 == 0] for i in range(ROWS)]),
                "labels": torch.randint(0, 4, (ROWS, 14), generator=g),
                "input_ids": torch.randint(4, 200, (ROWS, 12), generator=g),
                "attention_mask": torch.ones(ROWS, 12, dtype=torch.long),
                "study_id": [f"s{i}" for i in range(ROWS)]} for _ in range(STEPS)]
    base, tokenizer = load_base_lm(cfg.model)
    model = MRGModel.from_config(cfg.model, base, tokenizer, seed=0)
    trainer = LocalTrainer(model, cfg.train, seed=derive_seed(0, "a", "train"))
    return RoundInputs(cfg, "a", 0, batches, get_shared_state(model), get_private_state(model),
                       trainer.state_dict(), {})


@pytest.mark.ray
@pytest.mark.slow
def test_two_gloo_workers_give_the_update_of_one_on_the_same_global_batches(
        ray_cluster, round_inputs, tmp_path):
    one = train_rows(round_inputs, 0, 1, torch.device("cpu"))
    two = run_round_on_workers(round_inputs, TrainWorkers(2, 0.5, 0.0), tmp_path, "equal")
    moved = [n for n in one.shared if not torch.equal(one.shared[n], round_inputs.shared[n])]
    assert len(moved) > 10  # the round trained: projector, heads, generic adapter
    for states in ("shared", "private"):
        a, b = getattr(one, states), getattr(two, states)
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(b[name], a[name], atol=2e-6, rtol=1e-4, msg=name)
    assert two.trainer_state["step"] == one.trainer_state["step"] == STEPS
    assert two.metrics["samples"] == one.metrics["samples"] == ROWS * STEPS
    assert two.metrics["loss"] == pytest.approx(one.metrics["loss"], rel=1e-4)
    assert not (tmp_path / "equal").exists()  # the run's checkpoint is not kept


def _training_worker_pids() -> list[int]:
    """Pids of the Ray Train workers of this session whose round is training: each prints a
    line to its log file when its training function starts (killing one earlier, while Ray
    Train still sets up the worker group, makes Ray Train restart the group instead)."""
    import re

    import ray

    logs = ray._private.worker.global_worker.node.get_logs_dir_path()
    pids = []
    for path in sorted(Path(logs).glob("worker-*.out")):
        with contextlib.suppress(OSError):
            found = re.search(r"fedmrg ray train: .* \(pid (\d+)\)", path.read_text())
            if found:
                pids.append(int(found.group(1)))
    return pids


@pytest.mark.ray
@pytest.mark.slow
def test_a_worker_killed_mid_round_fails_the_client_like_any_failed_client(
        ray_cluster, lm_folder, tmp_path):
    """A client with resources.workers_per_center=2; SIGKILL one of its 2 Ray Train workers
    (as the kernel's OOM killer would) once both run: the in-process pool hands the
    coordinator a `ClientFailure` naming the center and the failed Ray Train round, and the
    client's model is untouched (only a finished run's checkpoint replaces it)."""
    from fedmrg.data.phantom import generate_phantom
    from fedmrg.fl.client import FederatedClient
    from fedmrg.fl.coordinator import InProcessPool
    from fedmrg.fl.failure import ClientFailure
    from fedmrg.fl.messages import RoundPlan

    root = tmp_path / "phantom"
    generate_phantom(root, centers=1, studies_per_center=10, image_size=32, seed=0,
                     heldout_center=False)
    cfg = replace_keys(tiny_config(lm_folder), {
        "data.root": str(root), "data.image_size": 32, "data.batch_size": 4,
        "data.max_report_tokens": 24, "data.stream_max_tasks": 1,
        "resources.workers_per_center": 2})
    client = FederatedClient(cfg, "a", dataset_root=str(root), seed=0)
    before = {n: t.clone() for n, t in get_shared_state(client.model).items()}
    killed: list[int] = []
    earlier = set(_training_worker_pids())  # workers of earlier runs (ended)

    def kill_one_worker() -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            pids = [p for p in _training_worker_pids() if p not in earlier]
            if len(pids) == 2:
                os.kill(pids[1], signal.SIGKILL)
                killed.append(pids[1])
                return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_one_worker)
    killer.start()
    pool = InProcessPool({"a": client})
    call = pool.submit_fit("a", RoundPlan(round_id=1, global_state=None, local_steps=40))
    try:
        with pytest.raises(ClientFailure, match=r"client 'a': DistributedRoundError: center "
                                                r"'a': its Ray Train round on 2 workers failed: "
                                                r"WorkerGroupError") as failure:
            pool.result(call)
    finally:
        killer.join()
        client.close()
    assert killed, "the two Ray Train workers never ran"
    assert failure.value.center == "a"
    after = get_shared_state(client.model)
    assert all(torch.equal(after[n], before[n]) for n in before)
