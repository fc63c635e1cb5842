"""Validation points between rounds (`eval.val_every`, `eval.val_studies`): the coordinator's
schedule and what it asks its clients (in process), `first_studies`, and on the shared Ray
cluster a tiny run with and without them: the same final models and test metrics, and the
val/... points in MLflow."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from helpers import FakeClient, fake_coordinator
from safetensors.torch import load_file

from fedmrg.eval.evaluator import EvaluationError, first_studies


class CountingClient(FakeClient):
    """A fake client that records every evaluation it is asked for."""

    def __init__(self, center: str, calls: list):
        super().__init__(center)
        self.calls = calls

    def evaluate(self, split, personalized, dataset_center=None, global_state=None,
                 max_studies=None):
        self.calls.append((split, dataset_center, personalized, max_studies))
        return super().evaluate(split, personalized, dataset_center, global_state)


def test_validation_every_n_rounds_on_the_val_split_limited_and_reported_apart():
    calls: list = []
    clients = {c: CountingClient(c, calls) for c in "ab"}
    coordinator = fake_coordinator(clients, rounds=5)
    coordinator.heldout_centers = ["heldout"]
    coordinator.val_every, coordinator.val_studies = 2, 3
    seen = []
    coordinator.on_evaluation = lambda view, per, mean, step=None, split=None: seen.append(
        (split or "test", view, step))
    result = coordinator.run()
    assert seen == [("val", "generalization", 2), ("val", "personalization", 2),
                    ("val", "generalization", 4), ("val", "personalization", 4),
                    ("test", "generalization", 5), ("test", "personalization", 5)]
    val_calls = [c for c in calls if c[0] == "val"]
    # participating centers only (no held-out), both views, each cut to val_studies
    assert sorted(val_calls) == sorted([("val", c, p, 3) for c in "ab" for p in (False, True)]
                                       * 2)
    test_calls = [c for c in calls if c[0] == "test"]
    assert ("test", "heldout", False, None) in test_calls
    assert all(limit is None for *_, limit in test_calls)
    assert [(e.split, e.round_id) for e in result.evaluations] == [
        ("val", 2), ("val", 2), ("val", 4), ("val", 4), ("test", 5), ("test", 5)]
    assert result.generalization.split == "test" and result.generalization.round_id == 5


class FailingValidator(CountingClient):
    """Every validation evaluation fails (an actor killed for memory, say)."""

    def evaluate(self, split, personalized, dataset_center=None, global_state=None,
                 max_studies=None):
        if split == "val":
            raise RuntimeError("OutOfMemoryError")
        return super().evaluate(split, personalized, dataset_center, global_state, max_studies)


def test_a_failed_validation_point_is_skipped_and_the_run_goes_on(caplog):
    calls: list = []
    coordinator = fake_coordinator({c: FailingValidator(c, calls) for c in "ab"}, rounds=2)
    coordinator.val_every, coordinator.val_studies = 1, 2
    with caplog.at_level("WARNING", logger="fedmrg.fl.coordinator"):
        result = coordinator.run()
    assert [s.round_id for s in result.history] == [1, 2]
    assert [e.split for e in result.evaluations] == ["test", "test"]
    assert "round 1: validation point skipped" in caplog.text


def test_validation_changes_nothing_the_rounds_compute():
    plain = fake_coordinator({c: FakeClient(c) for c in "abc"}, rounds=3, fraction=0.6).run()
    calls: list = []
    validated = fake_coordinator({c: CountingClient(c, calls) for c in "abc"}, rounds=3,
                                 fraction=0.6)
    validated.val_every, validated.val_studies = 1, 2
    result = validated.run()
    assert any(c[0] == "val" for c in calls)
    assert [s.participants for s in result.history] == [s.participants for s in plain.history]
    assert all(torch.equal(result.global_state[n], plain.global_state[n])
               for n in plain.global_state)


def test_first_studies_cuts_the_last_batch_and_closes_the_source():
    closed = []

    def source():
        try:
            for b in range(5):
                yield {"labels": torch.arange(4) + 4 * b, "report": [f"r{4 * b + i}"
                                                                      for i in range(4)],
                       "view_mask": torch.ones(4, 2), "center": "a"}
        finally:
            closed.append(True)

    batches = list(first_studies(source(), 6))
    assert [len(b["labels"]) for b in batches] == [4, 2]
    assert batches[1]["report"] == ["r4", "r5"] and batches[1]["view_mask"].shape == (2, 2)
    assert batches[1]["center"] == "a"  # not one entry per study: kept as it is
    assert closed == [True]  # the pass was ended, not left suspended
    assert [len(b["labels"]) for b in first_studies(source(), 100)] == [4] * 5
    with pytest.raises(EvaluationError, match="at least 1"):
        list(first_studies(source(), 0))


# --------------------------------------------------------------------------- on Ray


def untimed(table: dict) -> dict:
    """An evaluation table ({"per_center", "mean"}) without the wall times (eval_s), NaN
    spelled "nan" (NaN is not equal to itself)."""
    def clean(metrics: dict) -> dict:
        return {k: "nan" if v != v else v for k, v in metrics.items() if not k.endswith("_s")}

    return {"per_center": {c: clean(m) for c, m in table["per_center"].items()},
            "mean": clean(table["mean"])}


@pytest.mark.ray
@pytest.mark.slow
def test_a_tiny_run_logs_validation_points_and_ends_with_the_same_models(ray_cluster,
                                                                         tmp_path):
    from helpers import CHEAP, build_lm_once, fit_concurrently, state_bits, tiny_run_config
    from mlflow import MlflowClient

    from fedmrg.experiment import Experiment

    lm_cache = tmp_path / "lm"
    common = ("federation.rounds=2", "data.phantom.centers=2", *CHEAP)
    cfgs = {"plain": tiny_run_config(tmp_path / "plain", lm_cache, *common, "eval.val_every=0"),
            "val": tiny_run_config(tmp_path / "val", lm_cache, *common, "eval.val_every=1",
                                   "eval.val_studies=2")}
    build_lm_once(cfgs["plain"])
    outs = {name: io.StringIO() for name in cfgs}
    results = {}
    for name, cfg in cfgs.items():  # one after the other: half the memory of both at once
        results |= fit_concurrently({name: Experiment(cfg, run_name=f"val-{name}",
                                                      out=outs[name], progress=True).fit})
    for name, result in results.items():
        if isinstance(result, BaseException):
            raise AssertionError(f"run {name} failed: {result!r}") from result
    plain, val = results["plain"], results["val"]
    # evaluation reads its own streams and never samples: the same models, the same test table
    assert state_bits(val.global_state) == state_bits(plain.global_state)
    for view in ("generalization", "personalization"):  # every metric but the wall times
        assert untimed(getattr(val, view)) == untimed(getattr(plain, view)), view
    client = MlflowClient(val.mlflow["tracking_uri"])
    points = [(m.step, m.value) for m in client.get_metric_history(
        val.mlflow["run_id"], "val/generalization/ce_f1_macro")]
    assert [s for s, _ in points] == [1, 2]
    assert client.get_metric_history(val.mlflow["run_id"], "val/personalization/bleu4")
    assert [m.step for m in client.get_metric_history(
        val.mlflow["run_id"], "generalization/ce_f1_macro")] == [2]
    plain_client = MlflowClient(plain.mlflow["tracking_uri"])
    assert not plain_client.get_metric_history(plain.mlflow["run_id"],
                                               "val/generalization/ce_f1_macro")
    assert "val generalization:" in outs["val"].getvalue()
    summary = json.loads((Path(val.storage_dir) / "summary.json").read_text())
    assert summary["validation"]["evaluations"] == 2 and summary["validation"]["wall_s"] > 0
    # every client's saved model holds the final global state, not the one an earlier
    # validation point was sent (the low-rank downlink sends no full state to reuse then)
    for result in (plain, val):
        for center_dir in sorted((Path(result.storage_dir) / "models").iterdir()):
            saved = load_file(center_dir / "modules.safetensors")
            shared = [n for n in result.global_state if n in saved]
            assert shared, center_dir
            for name in shared:
                assert torch.equal(saved[name], result.global_state[name]), (center_dir, name)


def test_the_console_shows_validation_points_and_final_evaluation_progress():
    from fedmrg.experiment import _Progress

    out = io.StringIO()
    progress = _Progress(2, True, out)
    progress.note("starting 2 client actors for 2 clients (model, data streams)...")
    progress.on_event({"type": "start", "run_name": "r", "rounds": 2, "clients": ["a", "b"]})
    progress.on_event({"type": "evaluating", "split": "val", "round": 1, "total": 4})
    progress.on_event({"type": "evaluated", "split": "val", "done": 1, "total": 4,
                       "view": "generalization", "center": "a"})
    progress.on_event({"type": "evaluation", "split": "val", "view": "generalization",
                       "mean": {"ce_f1_macro": 0.25, "rep_4": 0.5}, "round": 1})
    progress.on_event({"type": "evaluating", "split": "test", "round": 2, "total": 5})
    progress.on_event({"type": "evaluated", "split": "test", "done": 2, "total": 5,
                       "view": "personalization", "center": "b"})
    progress.close()
    lines = out.getvalue().splitlines()
    assert lines == [
        "starting 2 client actors for 2 clients (model, data streams)...",
        "run r: clients a, b",
        "  val generalization: ce_f1_macro 0.250, rep_4 0.500",
        "evaluating after round 2 on the test split: 5 evaluations (generalization and "
        "personalization)",
        "  evaluated 2/5: personalization on b"]


def test_a_validation_point_scores_without_starting_meteor():
    from fedmrg.eval import nlg

    nlg.close_meteor()
    metrics = nlg.compute_nlg_metrics(["the heart is normal ."], ["the heart is normal ."],
                                      meteor=False)
    assert "meteor" not in metrics and metrics["bleu1"] == pytest.approx(1.0)
    assert nlg._meteor is None  # no JVM was started
