"""benchmarks/vs_flower.py's pure parts, without flwr: fedmrg messages <-> Flower's lists of
NumPy arrays (exact, through the .npy bytes Flower sends), and the cluster it sizes."""

from __future__ import annotations

import dataclasses
import io
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import vs_flower  # noqa: E402

from fedmrg.fl.broadcast import StateDelta  # noqa: E402
from fedmrg.fl.lowrank import LowRankUpdate  # noqa: E402
from fedmrg.fl.messages import ClientUpdate, RoundPlan  # noqa: E402
from fedmrg.fl.wire import to_wire  # noqa: E402


def through_npy(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """What a Flower peer gets: each array saved as .npy bytes (`ndarrays_to_parameters`,
    allow_pickle=False) and loaded back (`parameters_to_ndarrays`)."""
    out = []
    for array in arrays:
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        out.append(np.load(io.BytesIO(buffer.getvalue()), allow_pickle=False))
    return out


def assert_same(a: Any, b: Any, path: str = "message") -> None:
    """Same types, tensors bit-identical with the same dtype and shape, all the way down."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), path
    elif dataclasses.is_dataclass(a):
        for field in dataclasses.fields(a):
            assert_same(getattr(a, field.name), getattr(b, field.name), f"{path}.{field.name}")
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for key in a:
            assert_same(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def client_update(gen: torch.Generator) -> ClientUpdate:
    return ClientUpdate(
        round_id=3, center="b", num_samples=210,
        lora={"lm.q_proj.lora_A.generic.weight": torch.randn(8, 16, generator=gen),
              "lm.q_proj.lora_B.generic.weight": torch.randn(16, 8, generator=gen)},
        dense={"encoder.conv.weight": LowRankUpdate(U=torch.randn(6, 2, generator=gen),
                                                    V=torch.randn(2, 27, generator=gen),
                                                    shape=(6, 3, 3, 3)),
               "diagnosis_head.bias": torch.randn(5, generator=gen),
               "encoder.bn.num_batches_tracked": torch.tensor(7)},
        statistics={"prototypes": torch.randn(14, 8, generator=gen),
                    "label_counts": torch.randint(0, 50, (14, 4), generator=gen)},
        metrics={"loss": 1.2345678901234567, "fit_s": 0.1, "steps": 20.0})


def test_a_client_update_round_trips_exactly_through_flowers_arrays():
    gen = torch.Generator().manual_seed(0)
    for wire in ("fp32", "bf16", "int8"):
        update = to_wire(client_update(gen), wire)
        arrays = vs_flower.message_to_arrays(update)
        assert all(isinstance(a, np.ndarray) for a in arrays)
        assert arrays[-1].dtype == np.uint8  # the layout travels as the last array
        assert_same(update, vs_flower.arrays_to_message(through_npy(arrays)))


def test_a_plan_with_a_state_delta_and_a_state_dict_round_trip_exactly():
    gen = torch.Generator().manual_seed(1)
    state = {"lm.q_proj.lora_A.generic.weight": torch.randn(8, 16, generator=gen),
             "encoder.bn.running_mean": torch.randn(4, generator=gen).to(torch.bfloat16),
             "encoder.bn.num_batches_tracked": torch.tensor(3)}
    plan = RoundPlan(
        round_id=2, global_state=None, local_steps=20,
        tensors={"prototypes": torch.randn(14, 8, generator=gen)},
        config={"send_prototypes": True, "send_label_counts": False, "mu": 0.01, "name": "x"},
        state_version=4,
        global_delta=StateDelta(base_version=3, version=4, replace=dict(state),
                                add={"w": LowRankUpdate(U=torch.randn(4, 1, generator=gen),
                                                        V=torch.randn(1, 5, generator=gen),
                                                        shape=(4, 5))}))
    for message in (plan, dataclasses.replace(plan, global_state=state, global_delta=None),
                    state):
        assert_same(message, vs_flower.arrays_to_message(
            through_npy(vs_flower.message_to_arrays(message))))


def test_what_is_not_a_message_is_refused():
    @dataclasses.dataclass
    class Other:
        x: int = 1

    with pytest.raises(TypeError, match="not a message class"):
        vs_flower.message_to_arrays({"a": Other()})
    with pytest.raises(TypeError, match="not a string"):
        vs_flower.message_to_arrays({1: torch.zeros(2)})


@pytest.mark.parametrize("clients", [2, 4, 8])
def test_the_cluster_holds_exactly_one_flower_actor_per_client(clients):
    cpus = vs_flower.cluster_cpus(clients, 0.5)
    assert cpus == clients // 2
    assert vs_flower.flower_pool_size(cpus, 0.5) == clients


def test_the_arms_take_turns_going_first():
    arms = ("fedmrg", "flower")
    assert [vs_flower.arm_order(arms, i) for i in range(3)] == [
        ["fedmrg", "flower"], ["flower", "fedmrg"], ["fedmrg", "flower"]]
