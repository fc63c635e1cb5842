"""`Result`: the one schema of a run's results (summary.json, --summary-json, MLflow)."""

from __future__ import annotations

import json

import torch

from fedmrg.experiment import Result


def a_result(**changes) -> Result:
    fields = dict(
        run_name="r", strategy="fedavg", centers=["a", "b"],
        rounds=[{"round_id": 1, "participants": ["a", "b"]}],
        generalization={"per_center": {"a": {"bleu4": 0.1}}, "mean": {"bleu4": 0.1}},
        personalization={"per_center": {}, "mean": {}},
        communication={"bytes_up_total": 10}, wall_s=12.5, storage_dir="/runs/r",
        mlflow={"run_id": "x"}, placement={"a": {"node_id": "n"}}, resumed_from=1,
        privacy={"epsilon": 2.0}, validation={"evaluations": 1, "wall_s": 0.5},
        global_state_puts=3, global_state={"w": torch.ones(2)}, messages=[object()])
    return Result(**{**fields, **changes})


def test_the_summary_is_every_field_but_the_in_memory_ones():
    summary = a_result().summary()
    assert set(summary) == {"run_name", "strategy", "centers", "rounds", "generalization",
                            "personalization", "communication", "wall_s", "storage_dir",
                            "mlflow", "placement", "resumed_from", "privacy", "validation"}
    json.dumps(summary)  # plain JSON


def test_a_summary_reads_back_as_the_same_result():
    back = Result.from_summary(json.loads(json.dumps(a_result().summary())))
    assert back.already_finished and back.global_state is None and back.messages == []
    assert back.summary() == a_result().summary()


def test_an_older_summary_without_newer_keys_reads_with_their_defaults():
    old = {k: v for k, v in a_result().summary().items()
           if k not in ("wall_s", "placement", "privacy", "validation")}
    back = Result.from_summary(old)
    assert (back.wall_s, back.placement, back.privacy, back.validation) == (0.0, {}, {}, {})
