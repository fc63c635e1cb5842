"""Kill the driver mid-run, then resume: the same final state as an uninterrupted run.

On the shared Ray cluster with the tiny config of test_federation_ray.py (2 centers, 3 rounds of
2 local steps; greedy 8-token evaluation):
(a) an uninterrupted run (coordinator in this process), checkpointed every round (coordinator
    and each client);
(b) the same config as `python -m fedmrg run` in a subprocess (a driver of the same cluster),
    killed with SIGKILL as soon as its round-2 checkpoint appears: Ray then kills its
    coordinator and client actors, which had logged rounds 1-2 to MLflow;
(c) its newest checkpoint corrupted (a flipped byte): `fedmrg run --resume killed` stops with
    an error naming the file and does nothing; with `--checkpoint-fallback` it continues from
    round 1 (the clients go back to their own round-1 state; round 2 runs again) into the same
    MLflow run, which then holds each round once (the re-run round 2 is skipped, its values
    equal), the same losses as (a), and the final global state and each client's saved model
    (every tensor and buffer) equal (a)'s bit for bit; resuming the finished run does nothing,
    and resuming it (or the unfinished run) with a changed setting is refused, naming it.
A resume into a tracking store that lacks the checkpoint's rounds logs them from its history.
(b) and (c) share one killed run: a resume from the newest checkpoint is the same path as the
fallback's (which only picks an older folder), and a second killed run would cost another
minute or two on the shared 2-core machine.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch
from click.testing import CliRunner
from helpers import tiny_overrides
from safetensors.torch import load_file

from fedmrg.cli import main
from fedmrg.config import load_config
from fedmrg.fl.checkpoint import (
    client_rounds_to_keep,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
)
from fedmrg.runs import run_info

pytestmark = [pytest.mark.ray, pytest.mark.faults, pytest.mark.slow]

ROUNDS = 3
KILL_AFTER = 2
START_TIMEOUT_S = 240  # the killed run reaching its round-2 checkpoint, on a loaded machine
CHANGED_STEPS = ("incompatible: the config differs from the checkpoint's in "
                 "train.local_steps: checkpoint 2, now 3")


def overrides(tmp: Path) -> list[str]:
    return [*tiny_overrides(tmp), f"federation.rounds={ROUNDS}", "eval.num_beams=1",
            "eval.max_new_tokens=8", "eval.samples=1"]


def cli_args(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def global_state(run_dir: Path) -> dict[str, torch.Tensor]:
    """The global shared state in the run's final coordinator checkpoint."""
    found = latest_checkpoint(run_dir / "checkpoints")
    assert found is not None and found.round_id == ROUNDS, found
    return found.load()["coordinator"]["strategy"]["global"]


def assert_bit_identical(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys() and ours
    different = [n for n in ours if not (ours[n].dtype == theirs[n].dtype
                                         and torch.equal(ours[n], theirs[n]))]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def metric_steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def wait_for(condition, timeout_s: float, what: str, proc=None, log=None) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: the run exited with {proc.returncode} first:\n"
                        f"{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s} s" + (
                f":\n{log.read_text()[-4000:]}" if log else ""))
        time.sleep(0.05)


@pytest.fixture(scope="module")
def runs(ray_cluster, tmp_path_factory):
    from fedmrg.experiment import Experiment

    tmp = tmp_path_factory.mktemp("resume")
    items = overrides(tmp)
    # (a) uninterrupted; its coordinator in this process (where it runs changes no bit)
    full = Experiment(load_config("default", items), run_name="full", in_process=True,
                      progress=False, out=io.StringIO()).fit()

    # (b) the same run, its driver killed once round 2 is checkpointed
    killed_dir = tmp / "runs" / "killed"
    log = tmp / "killed.log"
    idle_cpus = ray.available_resources().get("CPU", 0)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fedmrg", "run", "--run-name", "killed",
                                 *cli_args(items)], stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=tmp)
    try:
        marker = killed_dir / "checkpoints" / f"round-{KILL_AFTER:06d}" / "manifest.json"
        wait_for(marker.is_file, START_TIMEOUT_S, "round-2 checkpoint", proc, log)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    # Ray kills a dead driver's actors: once their CPUs are back, nothing writes any more
    wait_for(lambda: ray.available_resources().get("CPU", 0) >= idle_cpus, 60,
             "the killed run's actors released")
    at_kill = [r for r, _ in list_checkpoints(killed_dir / "checkpoints")]
    clients_at_kill = {c: [r for r, _ in list_checkpoints(killed_dir / "centers" / c /
                                                            "checkpoints")] for c in ("a", "b")}
    # the rounds each client trained in (aggregated or rejected), from the newest checkpoint
    newest = latest_checkpoint(killed_dir / "checkpoints")
    history = newest.load()["coordinator"]["history"] if newest is not None else []
    trained_at_kill = {c: [row["round_id"] for row in history if c in row["participants"]
                           or c in row["rejected"]] for c in ("a", "b")}
    return {"tmp": tmp, "items": items, "full": full, "killed_dir": killed_dir,
            "at_kill": at_kill, "clients_at_kill": clients_at_kill,
            "trained_at_kill": trained_at_kill, "log": log}


def test_uninterrupted_run_checkpointed_every_round(runs):
    full = runs["full"]
    run_dir = Path(full.storage_dir)
    cfg = load_config("default", runs["items"])
    kept = [r for r, _ in list_checkpoints(run_dir / "checkpoints")]
    assert kept == list(range(1, ROUNDS + 1))[-cfg.tracking.checkpoint_keep:]
    assert_bit_identical(global_state(run_dir), full.global_state)
    for center in ("a", "b"):  # at the end, a client keeps the coordinator's rounds, no more
        assert [r for r, _ in list_checkpoints(run_dir / "centers" / center / "checkpoints")
                ] == kept
    for center in ("a", "b"):  # each client's own checkpoints, without the server's tensors
        own = latest_checkpoint(run_dir / "centers" / center / "checkpoints")
        assert own.round_id == ROUNDS and own.meta["center"] == center
        state = own.load()
        assert "shared" not in state and state["private"] and state["trainer"]["step"] == (
            ROUNDS * cfg.train.local_steps)
        # Adam moments of every trained tensor, shared ones too (train.reset_shared_moments
        # is false: the next fit goes on with them)
        optimizer = state["trainer"]["optimizer"]
        assert len(optimizer["state"]) == sum(len(g["params"]) for g in optimizer["param_groups"])


def test_rounds_a_new_tracking_store_lacks_are_logged_from_the_checkpoint_history(runs):
    from mlflow import MlflowClient

    from fedmrg.experiment import log_missing_rounds
    from fedmrg.tracking import RunTracker

    tmp, full = runs["tmp"], runs["full"]
    store = f"sqlite:///{tmp}/mlflow-elsewhere.db"
    cfg = load_config("default", [*runs["items"], f"tracking.tracking_uri={store}"])
    tracker = RunTracker.start(cfg, ["a", "b"], str(tmp / "data"), run_name="full",
                               resume=True)
    assert log_missing_rounds(tracker, full.rounds[:2]) == [1, 2]
    assert log_missing_rounds(tracker, full.rounds) == [3]
    assert log_missing_rounds(tracker, full.rounds) == []
    tracker.finish()
    client = MlflowClient(store)
    assert metric_steps(client, tracker.run_id, "round") == [1, 2, 3]
    ours = client.get_metric_history(tracker.run_id, "loss")
    theirs = MlflowClient(full.mlflow["tracking_uri"]).get_metric_history(
        full.mlflow["run_id"], "loss")
    assert sorted((m.step, m.value) for m in ours) == sorted((m.step, m.value) for m in theirs)


def test_killed_run_corrupt_checkpoint_named_then_resumed_to_the_same_final_state(runs):
    from mlflow import MlflowClient

    tmp, full, run_dir = runs["tmp"], runs["full"], runs["killed_dir"]
    assert runs["at_kill"] == [1, 2], runs["log"].read_text()[-3000:]
    # each client kept its state as of both coordinator rounds (and round 3 when it got
    # that far): with every client in both rounds, rounds 1 and 2
    for center, kept in runs["clients_at_kill"].items():
        trained = runs["trained_at_kill"][center]
        assert set(kept) - {3} == client_rounds_to_keep(trained, [1, 2]), (center, kept,
                                                                            trained)
    assert runs["trained_at_kill"] == {"a": [1, 2], "b": [1, 2]}, (
        "a client failed a round of the killed run (a loaded machine?), so it cannot end like "
        "the uninterrupted run: " + runs["log"].read_text()[-3000:])
    listed = run_info(run_dir)  # `fedmrg runs`
    assert (listed.status, listed.resume_round, listed.rounds_planned) == ("interrupted", 2, 3)
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    experiment = client.get_experiment_by_name("fedmrg")
    before = client.search_runs([experiment.experiment_id], "attributes.run_name = 'killed'")
    assert len(before) == 1 and before[0].info.status == "RUNNING"  # killed: never ended
    run_id = before[0].info.run_id
    assert metric_steps(client, run_id, "round") == [1, 2]
    storage = cli_args([f"tracking.storage_path={tmp}/runs"])

    # a setting that changes what a round computes: refused, naming it (before Ray starts)
    changed = CliRunner().invoke(main, ["run", "--resume", "killed", *storage,
                                        *cli_args(["train.local_steps=3"])])
    assert changed.exit_code == 4, changed.output
    assert CHANGED_STEPS in changed.output and len(changed.output.splitlines()) == 1

    # the newest checkpoint corrupted: a clear error naming the file, and nothing done
    newest = run_dir / "checkpoints" / f"round-{KILL_AFTER:06d}" / "state.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    refused = CliRunner().invoke(main, ["run", "--resume", "killed", *storage])
    assert refused.exit_code == 4, refused.output  # a checkpoint error (fedmrg.exit_codes)
    assert f"error: {newest}: corrupt: sha256" in refused.output
    assert "--checkpoint-fallback" in refused.output
    assert [r for r, _ in list_checkpoints(run_dir / "checkpoints")] == [1, 2]
    listed = run_info(run_dir)
    assert listed.resume_round == 1 and "only with --checkpoint-fallback" in listed.note

    # with fallback: round 1's checkpoint; the clients go back to their round-1 state
    resumed = CliRunner().invoke(main, ["run", "--resume", "killed", "--checkpoint-fallback",
                                        *storage])
    assert resumed.exit_code == 0, resumed.output
    assert "resumed from the round-1 checkpoint: rounds 2..3 to go" in resumed.output
    assert "round 2/3 | 2 clients" in resumed.output and "round 3/3 | 2 clients" in (
        resumed.output)
    assert_bit_identical(global_state(run_dir), full.global_state)
    for center in ("a", "b"):  # each client's final model: every tensor, buffers included
        # (BatchNorm's num_batches_tracked came back as a fresh model's count: issue 19)
        ours, theirs = (load_file(Path(d) / "models" / center / "modules.safetensors")
                        for d in (run_dir, full.storage_dir))
        assert any(n.endswith("num_batches_tracked") for n in ours)
        assert_bit_identical(ours, theirs)
        for adapter in (run_dir / "models" / center / "adapters").rglob("*.safetensors"):
            twin = Path(full.storage_dir) / adapter.relative_to(run_dir)
            assert_bit_identical(load_file(adapter), load_file(twin))
    load_checkpoint(newest.parent)  # round 2 written again, valid
    coordinator_rounds = [r for r, _ in list_checkpoints(run_dir / "checkpoints")]
    for center in ("a", "b"):
        assert [r for r, _ in list_checkpoints(run_dir / "centers" / center / "checkpoints")
                ] == coordinator_rounds

    # the same MLflow run; round 2, logged before the kill and run again, is not logged twice
    after = client.search_runs([experiment.experiment_id], "attributes.run_name = 'killed'")
    assert [r.info.run_id for r in after] == [run_id]
    parent = client.get_run(run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["fedmrg.resumed_from_round"] == "1"
    assert parent.data.tags["fedmrg.rounds_skipped"] == "1"
    for key in ("round", "loss", "bytes_up", "bytes_up_cumulative"):
        assert metric_steps(client, run_id, key) == [1, 2, 3], key
    assert metric_steps(client, run_id, "generalization/bleu4") == [ROUNDS]
    nested = client.search_runs([experiment.experiment_id],
                                f"tags.mlflow.parentRunId = '{run_id}'")
    assert sorted(r.data.tags["fedmrg.center"] for r in nested) == ["a", "b"]
    for r in nested:
        assert metric_steps(client, r.info.run_id, "lm_generic") == [1, 2, 3]
    # the killed and resumed run logged the uninterrupted run's losses
    full_loss = client.get_metric_history(full.mlflow["run_id"], "loss")
    ours = client.get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in ours) == sorted((m.step, m.value)
                                                              for m in full_loss)

    # resuming the finished run: a clear message, no work
    again = CliRunner().invoke(main, ["run", "--resume", "killed", *storage])
    assert again.exit_code == 0, again.output
    assert "run killed already finished its 3 rounds; nothing to do" in again.output
    assert metric_steps(client, run_id, "round") == [1, 2, 3]
    # ... but with a changed setting it is refused like the unfinished run was (issue 19: it
    # reprinted the old results with rc 0)
    changed = CliRunner().invoke(main, ["run", "--resume", "killed", *storage,
                                        *cli_args(["train.local_steps=3"])])
    assert changed.exit_code == 4, changed.output
    assert CHANGED_STEPS in changed.output and "already finished" not in changed.output


def test_resume_arguments_that_name_no_run_are_clear_errors(tmp_path):
    storage = cli_args([f"tracking.storage_path={tmp_path}"])
    for args, message in (
            (["--resume", "nope", *storage], f"nothing to resume: no run 'nope' at {tmp_path}"),
            (["--resume"], "--resume needs the run's name"),
            (["--resume", "a", "--run-name", "b"], "--resume a and --run-name b name different"),
    ):
        outcome = CliRunner().invoke(main, ["run", *args])
        assert outcome.exit_code == 2 and message in outcome.output, outcome.output
