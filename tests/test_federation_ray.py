"""The federation through Ray actors on the shared test cluster: `Experiment.fit()` end to end.

One 2-center, 2-round fedmrg run (tiny LM and encoder, 32 px, 20 studies per center) with the
coordinator in an actor, shared by the tests below: it completes; its final generic adapter is
exactly the aggregation of the factors the clients sent in the last round; no message that
reached the coordinator carries a specialized-adapter or local-head tensor; MLflow's sqlite store
holds the params, per-round metrics, evaluations and artifacts (the generic adapter loads with
`peft.PeftModel.from_pretrained`); clients ran with num_gpus=0 on their fractional CPUs. The
pool's transport (one `ray.put` per state, failures as ClientFailure) is checked on stub actors.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from pathlib import Path

import pytest
import ray
import torch
from helpers import TINY_ROUNDS, tiny_overrides

from fedmrg.config import ResourcesConfig, load_config
from fedmrg.fl.actors import (
    RayClientPool,
    actor_groups,
    client_actor_options,
    coordinator_actor_options,
)
from fedmrg.fl.failure import ClientFailure
from fedmrg.fl.lowrank import LowRankUpdate, aggregate_lora_states, is_lora_factor
from fedmrg.fl.messages import ClientUpdate, EvalReply, RoundPlan

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROUNDS = TINY_ROUNDS
REGISTERED = "ray-fedmrg-generic"


@pytest.fixture(scope="module")
def run(ray_cluster, tmp_path_factory):
    from fedmrg.experiment import Experiment

    tmp = tmp_path_factory.mktemp("federation")
    # eval.head_tuning_steps: each center's own tuned head is evaluated and saved
    cfg = load_config("default", [*tiny_overrides(tmp), "tracking.log_models=true",
                                  f"tracking.register_model={REGISTERED}",
                                  "eval.head_tuning_steps=20"])
    out = io.StringIO()
    warnings: list[str] = []  # the driver's warnings (a module fixture cannot use caplog)
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("fedmrg").addHandler(handler)
    try:
        result = Experiment(cfg, run_name="ray-fedmrg", record_messages=True, out=out).fit()
    finally:
        logging.getLogger("fedmrg").removeHandler(handler)
    return {"cfg": cfg, "result": result, "out": out.getvalue(), "tmp": tmp,
            "warnings": warnings}


def _tensor_names(message) -> list[str]:
    if isinstance(message, ClientUpdate):
        return [*message.lora, *message.dense]
    return []


# --------------------------------------------------------------------------- the run


def test_two_center_run_completes_with_both_views_and_byte_counts(run):
    result = run["result"]
    assert [r["round_id"] for r in result.rounds] == [1, 2]
    assert all(r["participants"] == ["a", "b"] and not r["rejected"] for r in result.rounds)
    for view in (result.generalization, result.personalization):
        assert sorted(view["per_center"]) == ["a", "b"]
        assert view["mean"]["num_studies"] > 0 and "bleu4" in view["mean"]
    comm = result.communication
    assert comm["bytes_up_per_client_round"] > 0 and comm["bytes_down_per_client_round"] > 0
    assert comm["dense_ratio"] > 1  # low-rank factors are smaller than the dense update
    assert comm["full_model_bytes"] > comm["bytes_up_per_client_round"]
    # driver output: one line per round and the final table
    assert "round 1/2 | 2 clients" in run["out"] and "round 2/2 | 2 clients" in run["out"]
    table = result.table()
    assert "generalization" in table and "personalization" in table and "| mean |" in table
    # one schema: the run folder's summary.json is the returned Result's summary()
    summary = json.loads((Path(result.storage_dir) / "summary.json").read_text())
    assert json.dumps(summary, sort_keys=True) == json.dumps(result.summary(), sort_keys=True)
    assert summary["placement"].keys() == {"a", "b"} and summary["wall_s"] > 0
    assert summary["validation"]["evaluations"] >= 0 and "global_state" not in summary


def test_truncated_train_reports_are_warned_on_the_driver_and_logged_per_center(run):
    """data.max_report_tokens=24 (tiny_overrides) cuts phantom reports: each client counts
    its own when it starts; the driver warns one line per center, every round logs them."""
    result, limit = run["result"], run["cfg"].data.max_report_tokens
    for center, info in sorted(result.placement.items()):
        truncation = info["truncation"]
        assert 0 < truncation["truncated"] <= truncation["reports"]
        assert (f"center {center!r}: {truncation['truncated']} of {truncation['reports']} "
                f"train reports are longer than data.max_report_tokens={limit} tokens") in (
                    "\n".join(run["warnings"]))
        for row in result.rounds:
            assert row["metrics"][f"{center}/truncated_reports"] == truncation["truncated"]


def test_generic_adapter_is_the_aggregation_of_the_returned_factors(run):
    cfg, result = run["cfg"], run["result"]
    last = sorted((m for m in result.messages
                   if isinstance(m, ClientUpdate) and m.round_id == ROUNDS),
                  key=lambda u: u.center)
    assert [u.center for u in last] == ["a", "b"]
    expected = aggregate_lora_states(cfg.federation.aggregation, [u.lora for u in last],
                                     [u.num_samples for u in last])
    assert expected and set(expected) == {n for n in result.global_state if is_lora_factor(n)}
    for name, tensor in expected.items():
        torch.testing.assert_close(result.global_state[name], tensor, rtol=0, atol=0)
    # and the clients did train: the generic B factors left their zero initialization
    assert any(float(t.abs().sum()) > 0 for n, t in expected.items() if ".lora_B." in n)


def test_no_private_tensor_reaches_the_coordinator(run):
    result = run["result"]
    fits = [m for m in result.messages if isinstance(m, ClientUpdate)]
    evals = [m for m in result.messages if isinstance(m, EvalReply)]
    assert len(fits) == 2 * ROUNDS and len(evals) >= 4
    names = [n for m in result.messages for n in _tensor_names(m)]
    assert names and all("generic" in n for n in names if is_lora_factor(n))
    leaked = [n for n in names if "specialized" in n or n.startswith("local_head.")]
    assert not leaked
    # fedmrg sends low-rank factors of the dense shared tensors, not the tensors
    assert any(isinstance(u, LowRankUpdate) for m in fits for u in m.dense.values())
    # ... while the private adapter did exist: each client saved it where it runs
    for center in ("a", "b"):
        saved = Path(result.storage_dir, "centers", center, "specialized_adapter")
        assert (saved / "adapter_config.json").is_file()


def test_global_state_is_put_once_and_then_travels_as_deltas(run):
    # round 1: the full state, put once for both clients; round 2: each client holds round
    # 1's state, so the plan carries the low-rank delta (`fl.broadcast`), nothing is put; the
    # evaluation after the last aggregation puts the server's state once: 2 puts
    assert run["result"].global_state_puts == 2
    downs = [r["bytes_down"] for r in run["result"].rounds]
    assert downs[1] < 0.5 * downs[0]


def test_clients_ran_on_fractional_cpus_without_gpus(run):
    for center, info in run["result"].placement.items():
        assert info["assigned"].get("CPU") == pytest.approx(0.5), center
        assert "GPU" not in info["assigned"] and info["device"] == "cpu"


def test_mlflow_store_has_params_metrics_and_a_loadable_peft_adapter(run, tmp_path):
    from mlflow import MlflowClient
    from peft import PeftModel

    from fedmrg.model.base_lm import load_base_lm

    cfg, result = run["cfg"], run["result"]
    client = MlflowClient(result.mlflow["tracking_uri"])
    parent = client.get_run(result.mlflow["run_id"])
    assert parent.info.run_name == "ray-fedmrg" and parent.info.status == "FINISHED"
    assert parent.data.params["federation.strategy"] == "fedmrg"
    assert parent.data.tags["strategy"] == "fedmrg"
    up = client.get_metric_history(parent.info.run_id, "bytes_up")
    assert [m.step for m in up] == [1, 2]
    assert "generalization/bleu4" in parent.data.metrics
    assert "personalization/a/bleu4" in parent.data.metrics
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"generic_adapter", "samples.json", "summary.json", "plots"} <= artifacts
    nested = client.search_runs([parent.info.experiment_id],
                                f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.tags["fedmrg.center"] for r in nested) == ["a", "b"]
    for r in nested:
        assert [a.path for a in client.list_artifacts(r.info.run_id)] == ["specialized_adapter"]
        assert "lm_generic" in r.data.metrics

    local = client.download_artifacts(parent.info.run_id, "generic_adapter", str(tmp_path))
    base, _ = load_base_lm(cfg.model)
    peft_model = PeftModel.from_pretrained(base, local)
    loaded = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert loaded
    for name, param in loaded.items():
        # base_model.model.<m>.lora_A.default.weight is decoder.base_model.model.<m>...generic...
        key = "decoder." + name.replace(".default.", ".generic.")
        torch.testing.assert_close(param.detach(), result.global_state[key], rtol=0, atol=0)


def test_the_run_logs_its_models_per_evaluation_samples_and_a_description(run, tmp_path):
    """MLflow models (generic on the parent, registered; personalized on each center's run),
    a samples table per evaluation, and the run's description."""
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    from fedmrg.serving.pyfunc import example_study
    from fedmrg.serving.sources import run_predictor

    result = run["result"]
    uri, parent_id = result.mlflow["tracking_uri"], result.mlflow["run_id"]
    client = MlflowClient(uri)
    parent = client.get_run(parent_id)
    nested = {r.info.run_id: r.data.tags["fedmrg.center"] for r in client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")}
    models = {m.source_run_id: m for m in client.search_logged_models(
        [parent.info.experiment_id])}
    assert sorted(models) == sorted([parent_id, *nested])
    assert models[parent_id].name == "generic"
    assert {models[r].name for r in nested} == {"personalized"}
    version = client.get_model_version(REGISTERED, "1")
    assert version.source == models[parent_id].model_uri
    # the registered model, loaded from its files, writes the report the run's folder does
    local = models[parent_id].artifact_location  # a folder: the store is local
    study = example_study(32)
    frame = pd.DataFrame({"image_1": [study[0]], "image_2": [study[1]]})
    out = mlflow.pyfunc.load_model(local).predict(frame)
    [expected] = run_predictor(Path(result.storage_dir)).predict([study])
    assert out["report"][0] == expected.report
    # a samples table per evaluation: the validation point and the final test evaluation
    tables = {a.path for a in client.list_artifacts(parent_id, "samples")}
    assert tables == {f"samples/val-round-{ROUNDS:03d}.json",
                      f"samples/test-round-{ROUNDS:03d}.json"}
    table = json.loads(Path(client.download_artifacts(
        parent_id, f"samples/test-round-{ROUNDS:03d}.json", str(tmp_path))).read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert {r["view"] for r in rows} == {"generalization", "personalization"}
    assert all(r["findings"] and r["generated"] is not None for r in rows)
    # references, and the true findings read from them, stay at the centers by default
    assert all(r["reference"] == "" and r["true_findings"] == "" for r in rows)
    description = parent.data.tags["mlflow.note.content"]
    assert description.startswith("**fedmrg fedmrg**: 2 centers (a, b)")
    assert "Final generalization (mean over centers): ce_f1_macro" in description
    assert f"registered as `{REGISTERED}`" in description


def test_a_client_that_cannot_start_is_a_clear_cli_error(run):
    from click.testing import CliRunner
    from transformers import LlamaConfig

    from fedmrg.cli import main

    def run_with_lm(lm: str):
        args = ["run", "--run-name", "broken"]
        for item in [*tiny_overrides(run["tmp"]), f"model.lm={lm}"]:
            args += ["--set", item]
        return CliRunner().invoke(main, args)

    # a folder that is not there: refused by the driver before any actor starts
    outcome = run_with_lm(f"{run['tmp']}/no-such-lm")
    assert outcome.exit_code == 2, outcome.output
    assert outcome.output.strip() == f"error: model.lm='{run['tmp']}/no-such-lm': no such folder"
    # a config without weights passes that check; the client actors cannot load it
    weightless = run["tmp"] / "weightless-lm"
    LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=2).save_pretrained(weightless)
    outcome = run_with_lm(str(weightless))
    assert outcome.exit_code == 5, outcome.output  # the run failed (fedmrg.exit_codes)
    assert "error: client 'a': could not start: BaseLMError" in outcome.output
    assert "weightless-lm" in outcome.output


# --------------------------------------------------------------------------- placement options


def test_client_options_pin_centers_and_take_fractional_resources():
    res = ResourcesConfig(num_cpus_per_client=0.5, num_gpus_per_client=0.25, pin_centers=True,
                          max_restarts=3)
    options = client_actor_options(res, "a")
    assert options == {"num_cpus": 0.5, "num_gpus": 0.25, "max_restarts": 3,
                       "max_task_retries": 0, "resources": {"center_a": 1}}
    assert "resources" not in client_actor_options(res, None)  # pooled client: not pinned
    res = dataclasses.replace(res, pin_centers=False)
    assert "resources" not in client_actor_options(res, "a")


def test_actor_groups_split_clients_into_consecutive_runs():
    assert actor_groups(["a", "b", "c"], 1) == [["a"], ["b"], ["c"]]
    assert actor_groups([f"c{i}" for i in range(5)], 2) == [["c0", "c1"], ["c2", "c3"], ["c4"]]
    assert actor_groups(["a", "b"], 8) == [["a", "b"]]
    with pytest.raises(ValueError, match="clients_per_actor must be >= 1, got 0"):
        actor_groups(["a"], 0)


def test_coordinator_options_hold_no_cpu_and_stay_on_the_driver_node(ray_cluster):
    options = coordinator_actor_options()
    assert options["num_cpus"] == 0 and options["max_concurrency"] >= 2
    strategy = options["scheduling_strategy"]
    assert strategy.node_id == ray.get_runtime_context().get_node_id() and not strategy.soft


def test_a_client_without_a_gpu_never_picks_one_up():
    from fedmrg.fl.actors import client_device

    assert client_device("auto", []) == "cpu"  # Ray leaves CUDA_VISIBLE_DEVICES unset then
    assert client_device("auto", ["0"]) == "auto"  # Ray made exactly its GPU visible
    assert client_device("cuda", []) == "cuda" and client_device("cpu", ["0"]) == "cpu"


# --------------------------------------------------------------------------- pure helpers


def test_resolve_paths_makes_local_paths_absolute_for_actors(tmp_path):
    from fedmrg.experiment import absolute_tracking_uri, resolve_paths

    cfg = resolve_paths(load_config("default"), tmp_path)
    assert cfg.data.root == str(tmp_path / "data/phantom-v1")
    assert cfg.tracking.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert cfg.tracking.artifact_location == str(tmp_path / "mlartifacts")
    assert cfg.tracking.storage_path == str(tmp_path / "runs")
    assert cfg.model.lm_cache == str(Path("~/.cache/fedmrg/lm").expanduser())
    assert load_config("default").data.root == "data/phantom-v1"  # the input is not changed
    # a server keeps its URI, and a relative artifact folder means the server's own root
    served = resolve_paths(load_config("default", ["tracking.tracking_uri=http://h:5000"]),
                           tmp_path)
    assert served.tracking.tracking_uri == "http://h:5000"
    assert served.tracking.artifact_location == "mlartifacts"
    assert absolute_tracking_uri("sqlite:////abs/m.db", tmp_path) == "sqlite:////abs/m.db"
    assert absolute_tracking_uri("mlruns", tmp_path) == str(tmp_path / "mlruns")


def test_communication_totals_are_per_participating_client_and_round():
    from fedmrg.experiment import communication_totals, round_line

    rounds = [{"round_id": 1, "participants": ["a", "b"], "rejected": {}, "bytes_up": 200,
               "bytes_down": 1000, "dense_equivalent_up": 2000, "aggregation_time_s": 0.1,
               "round_time_s": 2.0, "metrics": {"loss": 1.5}},
              {"round_id": 2, "participants": ["a"], "rejected": {"b": "failed"},
               "bytes_up": 100, "bytes_down": 500, "dense_equivalent_up": 1000,
               "aggregation_time_s": 0.1, "round_time_s": 2.0, "metrics": {}}]
    totals = communication_totals(rounds, full_model_bytes=10_000)
    assert totals["bytes_up_per_client_round"] == 100 and totals["client_rounds"] == 3
    assert totals["bytes_down_per_client_round"] == 500 and totals["dense_ratio"] == 10
    assert totals["full_model_ratio"] == 100 and totals["bytes_up_total"] == 300
    line = round_line(rounds[1], 2)
    assert line.startswith("round 2/2 | 1 clients | 1 rejected") and "10.0x < dense" in line
    assert "loss 1.500" in round_line(rounds[0], 2)


# --------------------------------------------------------------------------- the pool


@ray.remote(num_cpus=0)
class _StubClient:
    """Answers like a client host: echoes what it received, fails on a negative round id."""

    def fit(self, center, plan, global_state):
        if plan.round_id < 0:
            raise ValueError("bad round")
        assert plan.global_state is None  # the state travels by reference, not in the plan
        total = sum(float(t.sum()) for t in global_state.values())
        return ClientUpdate(plan.round_id, center, 1, {}, {}, metrics={"total": total})

    def evaluate(self, center, split, personalized, dataset_center, global_state):
        return EvalReply(dataset_center or center, "generalization",
                         {"got_state": float(global_state is not None)})


def test_pool_puts_a_state_once_resolves_it_in_the_actor_and_maps_failures(ray_cluster):
    shared = _StubClient.remote()  # "b" and "c" share one actor: each call names its client
    pool = RayClientPool({"a": _StubClient.remote(), "b": shared, "c": shared}, record=True)
    try:
        state = {"w": torch.ones(3, 2)}
        handles = [pool.submit_fit(c, RoundPlan(1, state)) for c in pool.centers()]
        ready, pending = pool.wait(handles, len(handles), timeout_s=60)
        assert not pending and {h.center for h in ready} == {"a", "b", "c"}
        assert [pool.result(h).metrics["total"] for h in handles] == [6.0, 6.0, 6.0]
        assert pool.puts == 1  # one put for three clients
        # an equal copy (a plan cast again) is still the same state; a new one is put
        pool.submit_fit("a", RoundPlan(2, {"w": torch.ones(3, 2)}))
        assert pool.puts == 1
        new = pool.submit_fit("a", RoundPlan(3, {"w": torch.zeros(3, 2)}))
        assert pool.puts == 2 and pool.result(new).metrics["total"] == 0.0
        # a dict changed after it was put is a new state, not the stored one
        changed = {"w": torch.zeros(3, 2)}
        pool.result(pool.submit_fit("a", RoundPlan(4, changed)))
        changed["w"] = torch.full((3, 2), 2.0)
        again = pool.submit_fit("a", RoundPlan(5, changed))
        assert pool.puts == 3 and pool.result(again).metrics["total"] == 12.0
        reply = pool.result(pool.submit_evaluate("b", "test", False, "heldout", None))
        assert reply.center == "heldout" and reply.metrics["got_state"] == 0.0

        failing = pool.submit_fit("c", RoundPlan(-1, state))
        with pytest.raises(ClientFailure, match="bad round") as info:
            pool.result(failing)
        assert info.value.center == "c"
        with pytest.raises(ClientFailure, match="no such client"):
            pool.submit_fit("zz", RoundPlan(1, state))
        assert len(pool.received) == 7  # every reply that arrived, the failure excluded
    finally:
        pool.shutdown()


def test_evaluate_run_reproduces_the_final_evaluation_from_the_saved_models(run):
    from fedmrg.experiment import ExperimentError, evaluate_run
    from fedmrg.model.io import load_model

    result = run["result"]
    # each center's saved model holds the head its personalization view was scored with
    for center in ("a", "b"):
        model = load_model(Path(result.storage_dir) / "models" / center)
        own, shared = model.own_diagnosis_head.linear.weight, model.diagnosis_head.linear.weight
        assert own.shape == shared.shape and not torch.equal(own, shared)
    saved = evaluate_run(result.storage_dir, connect_ray=False)
    for view in ("generalization", "personalization"):
        ours, theirs = saved[view]["per_center"], getattr(result, view)["per_center"]
        assert sorted(ours) == sorted(theirs) == ["a", "b"]
        for center in ours:
            for key in ("num_studies", "diag_acc", "bleu1", "bleu4", "rouge_l", "ce_f1_micro"):
                assert ours[center][key] == pytest.approx(theirs[center][key], abs=1e-6), (
                    view, center, key)
    assert saved["samples"] and {"center", "view", "reference", "generated"} <= set(
        saved["samples"][0])
    with pytest.raises(ExperimentError, match="not the folder of a finished"):
        evaluate_run(run["tmp"], connect_ray=False)
    with pytest.raises(ExperimentError, match="'zz' is not in the dataset"):
        evaluate_run(result.storage_dir, centers=["zz"], connect_ray=False)


def test_centralized_is_one_client_over_the_pooled_centers(ray_cluster, tmp_path):
    from fedmrg.experiment import Experiment

    cfg = load_config("default", [*tiny_overrides(tmp_path), "federation.strategy=centralized",
                                  "federation.rounds=1"])
    result = Experiment(cfg, run_name="ray-centralized", progress=False,
                        out=io.StringIO()).fit()
    assert len(result.placement) == 1, result.placement  # one client holds the pooled data
    # the pooled model is scored on every center's own test split
    assert set(result.generalization["per_center"]) == {"a", "b"}
    assert len(result.rounds) == 1
