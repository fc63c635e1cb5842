"""MLflow tracking: params/tags, nested runs, round and evaluation metrics, artifacts, resume.

Every store lives in tmp_path (a copy of one migrated sqlite file: creating a fresh MLflow
database costs ~6 s, copying it ~0.05 s). One slow test runs a real `mlflow server`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import make_cfg, start
from mlflow import MlflowClient
from servers import free_ports, wait_until_serving

from fedmrg.config import config_from_dict
from fedmrg.data.shards import DatasetError
from fedmrg.tracking import (
    MAX_PARAM_CHARS,
    TRUNCATED,
    RunTracker,
    TrackingError,
    config_params,
    figure_centers,
    figure_communication,
    figure_evaluation,
    figure_round_metrics,
    git_commit,
    param_value,
    resolve_artifact_location,
    round_panels,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- fixtures


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    return sorted(f.path for f in client.list_artifacts(run_id, path))


def tiny_adapter(directory: Path, seed: int) -> Path:
    """A real PEFT LoRA adapter of a tiny Llama, saved with save_pretrained."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=2))
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                            init_lora_weights=False))
    model.save_pretrained(str(directory))
    return directory


# --------------------------------------------------------------------------- pure helpers


def test_param_value_json_for_structures_and_truncation():
    assert param_value(["q_proj", "v_proj"]) == '["q_proj", "v_proj"]'
    assert param_value({"b": 1, "a": 2}) == '{"a": 2, "b": 1}'
    assert param_value(True) == "true"
    assert param_value(2e-3) == "0.002"
    long = param_value("x" * 10_000)
    assert len(long) == MAX_PARAM_CHARS and long.endswith(TRUNCATED)

    cfg = config_from_dict({})
    params = config_params(cfg)
    assert params.keys() == cfg.flat().keys()
    assert params["model.lora_targets"] == json.dumps(cfg.model.lora_targets)
    assert params["data.centers"] == "[]" and params["tracking.run_name"] == ""


def test_resolve_artifact_location(tmp_path):
    local = "sqlite:///mlflow.db"
    assert resolve_artifact_location("mlartifacts", local, cwd=tmp_path) == (
        (tmp_path / "mlartifacts").resolve().as_uri())
    assert resolve_artifact_location(str(tmp_path / "a"), local) == (tmp_path / "a").as_uri()
    # a relative folder is the driver's disk: with a server, the server chooses
    assert resolve_artifact_location("mlartifacts", "http://127.0.0.1:5000") is None
    assert resolve_artifact_location(str(tmp_path / "a"), "http://h:1") == (
        (tmp_path / "a").as_uri())
    assert resolve_artifact_location("s3://bucket/x", local) == "s3://bucket/x"
    assert resolve_artifact_location("", local) is None


def test_git_commit_in_and_outside_a_checkout(tmp_path):
    assert git_commit(tmp_path) == "unknown"
    assert git_commit(tmp_path / "missing") == "unknown"

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                       cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "f.txt").write_text("1")
    git("add", "f.txt")
    git("commit", "-q", "-m", "c")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True,
                          text=True, check=True).stdout.strip()
    assert git_commit(tmp_path) == head
    (tmp_path / "f.txt").write_text("2")
    assert git_commit(tmp_path) == head + "+dirty"


def test_figures_only_for_what_was_logged():
    history = {"round": [(0, 0.0), (1, 1.0)], "lm_generic": [(0, 2.0), (1, 1.5)],
               "bytes_up": [(0, 1e6), (1, 1e6)], "bytes_up_cumulative": [(0, 1e6), (1, 2e6)],
               "generalization/bleu_4": [(1, 0.1)], "personalization/bleu_4": [(1, 0.2)],
               "generalization/a/bleu_4": [(1, 0.3)]}
    metrics = figure_round_metrics(history)
    assert [ax.get_title() for ax in metrics.axes if ax.get_visible()] == [
        "training loss (mean over clients)", "bytes per round"]
    comm = figure_communication(history)
    assert [ax.get_title() for ax in comm.axes] == ["communication, per round",
                                                   "communication, cumulative"]
    evaluation = figure_evaluation(history)
    (ax,) = evaluation.axes  # the per-center key is not a mean: one panel, two views
    assert ax.get_title() == "bleu_4" and len(ax.get_lines()) == 2
    centers = figure_centers({"a": {"loss": [(0, 1.0)]}, "b": {"loss": [(0, 2.0)]}})
    assert len(centers.axes[0].get_lines()) == 2
    assert figure_round_metrics({"round": [(0, 0.0)]}) is None
    assert figure_communication({}) is None and figure_evaluation({}) is None
    assert figure_centers({"a": {}}) is None


def test_the_round_plot_shows_the_curves_that_matter_not_zero_counters():
    rounds = [(1, 0.0), (2, 0.0), (3, 0.0), (4, 0.0)]
    history = {k: [(r, 1.0 + r) for r, _ in rounds] for k in (
        "loss", "lm_generic", "lm_personal", "diagnosis", "grad_norm", "epoch", "fit_s",
        "residual_norm", "update_norm_max", "participants", "bytes_up", "bytes_down",
        "dense_equivalent_up", "round_time_s", "aggregation_time_s", "a/update_norm")}
    history.update({k: list(rounds) for k in (
        "rejected_failed", "rejected_deadline", "rejected_invalid", "rejected_norm", "clipped",
        "late_replies_dropped", "duplicate_replies_dropped", "rejoined", "rejected")})
    history["round"] = [(r, float(r)) for r, _ in rounds]
    history["val/generalization/ce_f1_macro"] = [(2, 0.2), (4, 0.3)]
    history["val/personalization/ce_f1_macro"] = [(2, 0.25), (4, 0.35)]
    history["generalization/ce_f1_macro"] = [(4, 0.31)]
    history["val/generalization/bleu4"] = [(2, 0.05), (4, 0.07)]
    history["val/generalization/a/bleu4"] = [(2, 0.05), (4, 0.07)]  # a center: not a mean
    panels = {title: sorted(lines) for title, _, _, lines in round_panels(history)}
    assert panels == {
        "training loss (mean over clients)": ["diagnosis", "lm_generic", "lm_personal", "loss"],
        "bytes per round": ["bytes_down", "bytes_up"],
        "time per round": ["aggregation_time_s", "round_time_s"],
        "ce_f1_macro": ["test generalization", "val generalization", "val personalization"],
        "bleu4": ["val generalization"]}  # no panel of counters that stayed 0
    history["rejected_deadline"] = [(1, 0.0), (2, 1.0), (3, 0.0), (4, 0.0)]
    panels = {title: sorted(lines) for title, _, _, lines in round_panels(history)}
    assert panels["faults (count per round)"] == ["rejected_deadline"]
    fig = figure_round_metrics(history)
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 6
    evaluation = figure_evaluation(history)
    titles = {ax.get_title(): sorted(line.get_label() for line in ax.get_lines())
              for ax in evaluation.axes if ax.get_visible()}
    assert titles["ce_f1_macro"] == ["generalization", "val generalization",
                                     "val personalization"]


# --------------------------------------------------------------------------- start


def test_start_records_params_tags_and_nested_runs(store, dataset_root, tmp_path):
    tracker = start(store, dataset_root, federation={"strategy": "fedavg"})
    client = MlflowClient(store["tracking_uri"])

    experiment = client.get_experiment(tracker.experiment_id)
    assert experiment.name == "fedmrg-test"
    assert experiment.artifact_location == (tmp_path / "artifacts").as_uri()
    parent = client.get_run(tracker.run_id)
    assert parent.info.run_name == "run1" and parent.info.status == "RUNNING"
    assert parent.data.params == config_params(make_cfg(store, federation={"strategy": "fedavg"}))
    tags = parent.data.tags
    assert tags["seed"] == "7" and tags["strategy"] == "fedavg"
    assert tags["data_manifest_hash"] == hashlib.sha256(
        (dataset_root / "manifest.json").read_bytes()).hexdigest()
    assert tags["git_commit"] == git_commit()
    assert tags["hostname"] == socket.gethostname()
    assert json.loads(tags["centers"]) == ["a", "b"]
    import mlflow
    assert tags["version.mlflow"] == mlflow.__version__
    assert {f"version.{lib}" for lib in ("torch", "transformers", "peft", "timm", "ray",
                                         "fedmrg")} <= tags.keys()

    nested = client.search_runs([tracker.experiment_id],
                                f"tags.mlflow.parentRunId = '{tracker.run_id}'")
    assert sorted(r.info.run_name for r in nested) == ["center=a", "center=b"]
    assert {r.data.tags["fedmrg.center"]: r.info.run_id for r in nested} == (
        tracker.center_run_ids)
    assert not (Path.cwd() / "mlartifacts").exists()


def test_start_generates_a_name_and_rejects_bad_input(store, dataset_root, tmp_path):
    tracker = start(store, dataset_root, run_name=None)
    assert tracker.run_name.startswith("fedmrg-")
    assert MlflowClient(store["tracking_uri"]).get_run(tracker.run_id).info.run_name == (
        tracker.run_name)
    with pytest.raises(DatasetError, match="manifest.json"):
        start(store, tmp_path / "nowhere")
    with pytest.raises(TrackingError, match="'a' is listed twice"):
        start(store, dataset_root, centers=("a", "a"))
    with pytest.raises(TrackingError, match="non-empty list"):
        start(store, dataset_root, centers=())


# --------------------------------------------------------------------------- metrics


def test_log_round_steps_cumulative_bytes_and_nonfinite(store, dataset_root):
    tracker = start(store, dataset_root)
    client = MlflowClient(store["tracking_uri"])
    tracker.log_round(0, {"loss/total": 2.0, "bytes_up": 100, "bytes_down": 50,
                          "participating_clients": 2, "aggregation_time_s": np.float32(0.5)},
                      {"a": {"loss": 2.5, "samples": 10}, "b": {"loss": 1.5}})
    tracker.log_round(1, {"loss/total": float("nan"), "bytes_up": 300, "bytes_down": 50,
                          "round_time_s": 1.25},
                      {"a": {"loss": 2.0, "grad_norm": float("inf")}})

    run = tracker.run_id
    assert history(client, run, "round") == [(0, 0.0), (1, 1.0)]
    assert history(client, run, "loss/total") == [(0, 2.0)]  # the NaN was not logged
    assert history(client, run, "bytes_up_cumulative") == [(0, 100.0), (1, 400.0)]
    assert history(client, run, "bytes_down_cumulative") == [(0, 50.0), (1, 100.0)]
    assert history(client, run, "aggregation_time_s") == [(0, 0.5)]
    assert history(client, run, "round_time_s") == [(1, 1.25)]
    assert tracker.nonfinite_skipped == 2
    a, b = tracker.center_run_ids["a"], tracker.center_run_ids["b"]
    assert history(client, a, "loss") == [(0, 2.5), (1, 2.0)]
    assert history(client, b, "loss") == [(0, 1.5)]
    assert client.get_metric_history(a, "grad_norm") == []
    assert "loss" not in client.get_run(run).data.metrics  # center metrics stay nested
    assert tracker.last_logged_round() == 1
    assert tracker.history["bytes_up_cumulative"] == [(0, 100.0), (1, 400.0)]
    assert tracker.center_history["a"]["loss"] == [(0, 2.5), (1, 2.0)]

    with pytest.raises(TrackingError, match="round 2: unknown center 'z'"):
        tracker.log_round(2, {"loss": 1.0}, {"z": {"loss": 1.0}})
    with pytest.raises(TrackingError, match="invalid metric name 'bad=name'"):
        tracker.log_round(2, {"bad=name": 1.0})
    with pytest.raises(TrackingError, match="metric 'loss': expected a number, got str"):
        tracker.log_round(2, {"loss": "low"})
    with pytest.raises(TrackingError, match="integer >= 0"):
        tracker.log_round(-1, {})
    assert tracker.last_logged_round() == 1  # failed calls logged nothing


def test_log_evaluation_mean_per_center_and_heldout(store, dataset_root):
    tracker = start(store, dataset_root)
    client = MlflowClient(store["tracking_uri"])
    per_center = {"a": {"bleu_4": 0.2, "ce_f1_macro": 0.5}, "b": {"bleu_4": 0.4},
                  "heldout": {"bleu_4": 0.1}}
    tracker.log_evaluation(3, "generalization", per_center, {"bleu_4": 0.3, "ce_f1_macro": 0.5})
    tracker.log_evaluation(3, "personalization", {"a": {"bleu_4": 0.6}}, {"bleu_4": 0.6})

    run = tracker.run_id
    assert history(client, run, "generalization/bleu_4") == [(3, 0.3)]
    assert history(client, run, "generalization/heldout/bleu_4") == [(3, 0.1)]
    assert history(client, run, "generalization/a/ce_f1_macro") == [(3, 0.5)]
    assert history(client, run, "personalization/bleu_4") == [(3, 0.6)]
    a = tracker.center_run_ids["a"]
    assert history(client, a, "generalization/bleu_4") == [(3, pytest.approx(0.2))]
    assert history(client, a, "personalization/bleu_4") == [(3, pytest.approx(0.6))]
    assert history(client, tracker.center_run_ids["b"], "generalization/bleu_4") == [
        (3, pytest.approx(0.4))]
    with pytest.raises(TrackingError, match="view 'train' is not one of"):
        tracker.log_evaluation(3, "train", {}, {"bleu_4": 1.0})


def test_validation_points_are_logged_under_val_and_apart_from_the_test_evaluation(
        store, dataset_root):
    tracker = start(store, dataset_root)
    client = MlflowClient(store["tracking_uri"])
    tracker.log_evaluation(2, "generalization", {"a": {"bleu4": 0.1}}, {"bleu4": 0.1},
                           split="val")
    tracker.log_evaluation(4, "generalization", {"a": {"bleu4": 0.2}}, {"bleu4": 0.2},
                           split="val")
    assert tracker.has_evaluation("generalization", 4, "val")
    assert not tracker.has_evaluation("generalization", 4)  # the test evaluation is apart
    tracker.log_evaluation(4, "generalization", {"a": {"bleu4": 0.3}}, {"bleu4": 0.3})
    run = tracker.run_id
    assert history(client, run, "val/generalization/bleu4") == [(2, 0.1), (4, 0.2)]
    assert history(client, run, "val/generalization/a/bleu4") == [(2, 0.1), (4, 0.2)]
    assert history(client, run, "generalization/bleu4") == [(4, 0.3)]
    assert history(client, tracker.center_run_ids["a"], "val/generalization/bleu4") == [
        (2, pytest.approx(0.1)), (4, pytest.approx(0.2))]
    tracker.log_evaluation(4, "generalization", {}, {"bleu4": 0.9}, split="val")  # skipped
    assert tracker.evaluations_skipped == 1
    assert history(client, run, "val/generalization/bleu4") == [(2, 0.1), (4, 0.2)]


# --------------------------------------------------------------------------- artifacts


def test_adapters_samples_plots_and_summary(store, dataset_root, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    tracker = start(store, dataset_root)
    client = MlflowClient(store["tracking_uri"])
    generic = tiny_adapter(tmp_path / "generic", seed=1)
    specialized = tiny_adapter(tmp_path / "specialized_a", seed=2)
    assert tracker.log_adapter(generic) == "generic_adapter"
    assert tracker.log_adapter(specialized, center="a") == "specialized_adapter"
    with pytest.raises(TrackingError, match="not a PEFT adapter folder"):
        tracker.log_adapter(tmp_path)
    with pytest.raises(TrackingError, match="unknown center 'z'"):
        tracker.log_adapter(generic, center="z")

    run, a = tracker.run_id, tracker.center_run_ids["a"]
    peft_files = {"adapter_config.json", "adapter_model.safetensors"}
    assert {p.split("/")[-1] for p in artifact_paths(client, run, "generic_adapter")} == {
        f.name for f in generic.iterdir()} >= peft_files
    assert {p.split("/")[-1] for p in artifact_paths(client, a, "specialized_adapter")} == {
        f.name for f in specialized.iterdir()} >= peft_files
    assert artifact_paths(client, tracker.center_run_ids["b"]) == []
    # the downloaded artifact is a loadable PEFT adapter with the logged weights
    downloaded = client.download_artifacts(run, "generic_adapter", str(tmp_path / "dl"))
    saved = load_file(str(generic / "adapter_model.safetensors"))
    assert {k: v.tolist() for k, v in load_file(
        f"{downloaded}/adapter_model.safetensors").items()} == {
        k: v.tolist() for k, v in saved.items()}
    from transformers import LlamaConfig, LlamaForCausalLM
    base = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=2))
    loaded = PeftModel.from_pretrained(base, downloaded)
    lora_a = next(v for k, v in loaded.state_dict().items() if "lora_A" in k)
    assert lora_a.tolist() == next(v for k, v in saved.items() if "lora_A" in k).tolist()

    rows = [{"center": "a", "study_id": "s1", "view": "personalization",
             "reference": "heart size is normal .", "generated": "heart size normal ."},
            {"center": "b", "study_id": "s2", "view": "generalization",
             "reference": "no pleural effusion .", "generated": "no effusion .", "round": 2}]
    tracker.log_samples(rows)
    tracker.log_samples([{**rows[0], "study_id": "s3"}])  # appended to the same table
    with pytest.raises(TrackingError, match=r"sample row 1: missing \['generated'\]"):
        tracker.log_samples([rows[0], {k: v for k, v in rows[0].items() if k != "generated"}])
    table = json.loads(Path(client.download_artifacts(run, "samples.json",
                                                      str(tmp_path / "dl2"))).read_text())
    assert table["columns"][:5] == ["center", "study_id", "view", "reference", "generated"]
    assert [r[1] for r in table["data"]] == ["s1", "s2", "s3"]
    assert table["data"][1][3:5] == ["no pleural effusion .", "no effusion ."]

    for r in range(3):
        tracker.log_round(r, {"loss/total": 3.0 - r, "bytes_up": 1e5, "bytes_down": 2e5},
                          {"a": {"loss": 2.0 - r / 2}, "b": {"loss": 2.5 - r / 3}})
    tracker.log_evaluation(2, "generalization", {"a": {"bleu_4": 0.1}}, {"bleu_4": 0.1})
    written = tracker.log_plots()
    assert sorted(written) == ["plots/centers.png", "plots/communication.png",
                               "plots/evaluation.png", "plots/round_metrics.png"]
    assert artifact_paths(client, run, "plots") == sorted(written)
    png = client.download_artifacts(run, "plots/communication.png", str(tmp_path / "dl3"))
    assert Path(png).read_bytes()[:8] == PNG_MAGIC and Path(png).stat().st_size > 5000

    tracker.log_summary({"final": {"bleu_4": np.float64(0.25)}, "bytes": np.array([1, 2]),
                         "dataset": tmp_path})
    summary = json.loads(Path(client.download_artifacts(run, "summary.json",
                                                        str(tmp_path / "dl4"))).read_text())
    assert summary == {"final": {"bleu_4": 0.25}, "bytes": [1, 2], "dataset": str(tmp_path)}
    with pytest.raises(TrackingError, match=r"summary.bad: object is not JSON-serializable"):
        tracker.log_summary({"bad": object()})


# --------------------------------------------------------------------------- finish / resume


def test_finish_ends_every_run_once(store, dataset_root):
    client = MlflowClient(store["tracking_uri"])
    tracker = start(store, dataset_root)
    with pytest.raises(TrackingError, match="status 'DONE'"):
        tracker.finish("DONE")
    tracker.finish("FINISHED")
    tracker.finish("FAILED")  # no-op: the first status stands
    for run_id in [tracker.run_id, *tracker.center_run_ids.values()]:
        info = client.get_run(run_id).info
        assert info.status == "FINISHED" and info.end_time is not None
    with pytest.raises(TrackingError, match="is finished"):
        tracker.log_round(0, {"loss": 1.0})

    with pytest.raises(RuntimeError), start(store, dataset_root, run_name="crash") as crashed:
        raise RuntimeError("boom")
    assert client.get_run(crashed.run_id).info.status == "FAILED"
    assert {client.get_run(r).info.status for r in crashed.center_run_ids.values()} == {"FAILED"}


def test_resume_reattaches_without_duplicates(store, dataset_root):
    client = MlflowClient(store["tracking_uri"])
    first = start(store, dataset_root)
    for r in range(3):
        first.log_round(r, {"loss/total": 1.0 / (r + 1), "bytes_up": 10.0},
                        {"a": {"loss": 1.0}, "b": {"loss": 2.0}})
    first.log_evaluation(2, "generalization", {"a": {"bleu4": 0.1}}, {"bleu4": 0.1})
    first.finish("FAILED")

    resumed = start(store, dataset_root, centers=("a", "b", "c"), resume=True,
                    federation={"rounds": 20})
    assert resumed.resumed and resumed.run_id == first.run_id
    assert {c: resumed.center_run_ids[c] for c in "ab"} == first.center_run_ids
    assert resumed.last_logged_round() == 2
    assert resumed.history["bytes_up_cumulative"][-1] == (2, 30.0)
    assert resumed.center_history["a"]["loss"] == [(0, 1.0), (1, 1.0), (2, 1.0)]
    runs = client.search_runs([resumed.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["center=a", "center=b", "center=c", "run1"]
    parent = client.get_run(resumed.run_id)
    assert parent.info.status == "RUNNING"
    assert parent.data.tags["fedmrg.resumes"] == "1"
    changes = json.loads(parent.data.tags["fedmrg.resume_1.changes"])
    assert changes == {"federation.rounds": ["10", "20"],
                       "tag:centers": ['["a", "b"]', '["a", "b", "c"]']}
    assert json.loads(parent.data.tags["centers"]) == ["a", "b", "c"]
    assert parent.data.params["federation.rounds"] == "10"  # params are immutable in MLflow

    resumed.log_round(2, {"loss/total": 9.0})  # already logged before the crash: skipped
    resumed.log_round(3, {"loss/total": 0.25, "bytes_up": 10.0}, {"c": {"loss": 3.0}})
    assert resumed.rounds_skipped == 1
    # an evaluation repeated at a step the run already holds is skipped; another view is not
    resumed.log_evaluation(2, "generalization", {"a": {"bleu4": 0.9}}, {"bleu4": 0.9})
    resumed.log_evaluation(2, "personalization", {"a": {"bleu4": 0.2}}, {"bleu4": 0.2})
    assert resumed.evaluations_skipped == 1
    assert history(client, resumed.run_id, "generalization/bleu4") == [(2, 0.1)]
    assert history(client, resumed.center_run_ids["a"], "generalization/bleu4") == [(2, 0.1)]
    assert history(client, resumed.run_id, "personalization/a/bleu4") == [(2, 0.2)]
    assert [s for s, _ in history(client, resumed.run_id, "round")] == [0, 1, 2, 3]
    assert history(client, resumed.run_id, "loss/total")[-2:] == [(2, 1 / 3), (3, 0.25)]
    assert history(client, resumed.run_id, "bytes_up_cumulative")[-1] == (3, 40.0)
    resumed.tag({"fedmrg.resumed_from_round": 2})
    resumed.finish()
    assert parent.info.run_id == resumed.run_id
    tags = client.get_run(resumed.run_id).data.tags
    assert tags["fedmrg.resumed_from_round"] == "2" and tags["fedmrg.evaluations_skipped"] == "1"
    assert client.get_run(resumed.center_run_ids["c"]).info.status == "FINISHED"

    # resume with no such run starts one; without resume a same-named run is a new one
    fresh = start(store, dataset_root, run_name="new", resume=True)
    assert not fresh.resumed and fresh.last_logged_round() is None
    again = start(store, dataset_root, run_name="new")
    assert again.run_id != fresh.run_id
    # a name MLflow's filter language cannot quote is still found
    odd = start(store, dataset_root, run_name="it's \"odd\"")
    assert start(store, dataset_root, run_name="it's \"odd\"", resume=True).run_id == odd.run_id


# --------------------------------------------------------------------------- a real server


@pytest.fixture
def mlflow_server(tmp_path, migrated_db):
    """`mlflow server` on 127.0.0.1 with a sqlite backend and proxied artifacts in tmp_path."""
    (port,) = free_ports(1)
    shutil.copy(migrated_db, tmp_path / "server.db")
    artifacts = tmp_path / "server-artifacts"
    log_path = tmp_path / "server.log"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
           # the job runner starts a handful of huey workers that this test never uses
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
             "--artifacts-destination", str(artifacts), "--serve-artifacts", "--workers", "1"],
            stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
            start_new_session=True)  # own process group: teardown ends uvicorn with it
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(proc, f"{url}/health", log_path, 120, interval_s=0.25)
        yield {"url": url, "artifacts": artifacts}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


@pytest.mark.slow
def test_mlflow_server_round_trip(mlflow_server, dataset_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # the default artifact_location ('mlartifacts') is relative: the server's root is used
    cfg = config_from_dict({"tracking": {"tracking_uri": mlflow_server["url"],
                                         "experiment": "fedmrg-server"},
                            "federation": {"rounds": 2}})
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 2}')
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")

    with RunTracker.start(cfg, ["a", "b"], str(dataset_root), "server-run") as tracker:
        for r in range(2):
            tracker.log_round(r, {"loss/total": 2.0 - r, "bytes_up": 1000.0, "bytes_down": 500.0,
                                  "participating_clients": 2},
                              {"a": {"loss": 2.1 - r}, "b": {"loss": 1.9 - r}})
        tracker.log_evaluation(1, "generalization", {"a": {"bleu_4": 0.2}, "b": {"bleu_4": 0.4}},
                               {"bleu_4": 0.3})
        tracker.log_adapter(adapter)
        tracker.log_adapter(adapter, center="b")
        tracker.log_samples([{"center": "a", "study_id": "s1", "view": "generalization",
                              "reference": "heart size is normal .", "generated": "heart ."}])
        plots = tracker.log_plots()
        tracker.log_summary({"rounds": 2})

    client = MlflowClient(tracking_uri=mlflow_server["url"])
    experiment = client.get_experiment_by_name("fedmrg-server")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["center=a", "center=b", "server-run"]
    parent = runs["server-run"]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["federation.rounds"] == "2"
    assert parent.data.tags["strategy"] == "fedmrg"
    assert runs["center=b"].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert history(client, parent.info.run_id, "bytes_up_cumulative") == [(0, 1000.0),
                                                                          (1, 2000.0)]
    assert history(client, parent.info.run_id, "generalization/bleu_4") == [(1, 0.3)]
    assert history(client, runs["center=a"].info.run_id, "loss") == [
        (0, pytest.approx(2.1)), (1, pytest.approx(1.1))]
    assert artifact_paths(client, parent.info.run_id) == [
        "generic_adapter", "plots", "samples.json", "summary.json"]
    assert artifact_paths(client, runs["center=b"].info.run_id, "specialized_adapter") == [
        "specialized_adapter/adapter_config.json", "specialized_adapter/adapter_model.safetensors"]
    assert artifact_paths(client, parent.info.run_id, "plots") == sorted(plots)
    summary = client.download_artifacts(parent.info.run_id, "summary.json", str(tmp_path))
    assert json.loads(Path(summary).read_text()) == {"rounds": 2}
    # artifacts went through the server into its --artifacts-destination, not a local folder
    stored = list(mlflow_server["artifacts"].rglob("adapter_config.json"))
    assert len(stored) == 2 and not (tmp_path / "mlartifacts").exists()
    assert not math.isnan(parent.data.metrics["round"])
