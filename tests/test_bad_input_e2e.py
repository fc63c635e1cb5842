"""Bad input end to end (issue 5): a federated run fed broken data gives the policy's behaviour.

Datasets are small phantom copies (2 centers x 10 studies, 32 px) broken on disk with pyarrow,
like a hand-edited or half-synced dataset:
- corrupt images (a train and a test study of center a) and an empty report (a train study of
  center b). `data.on_error=raise`: `Experiment.fit()` raises ONE `ClientDataError` (a
  `DatasetError`, a ValueError) naming each center, its file and study, after the first
  round's replies are in: no raw worker traceback, no hang, the MLflow run marked FAILED, no
  round recorded as done. `skip`: the run finishes and every bad row is counted by reason in
  the round metrics (per center and summed), in the evaluation metrics and in MLflow;
- a shard file deleted between rounds (after center a's first round, while the run goes on;
  streaming, one epoch a round, so the next round reads it again): the run stops with a
  `ClientDataError`
  naming center a and the missing file, even under `skip` (that policy is for bad rows; a
  file gone from under a running experiment is always an error), round 1 checkpointed;
- an unknown or repeated center in `data.centers`, a center with no train rows: clear errors
  before any client starts.

The two runs that fail before any evaluation go at the same time (`fit_concurrently`), then
the one that finishes (its evaluation starts a METEOR JVM per client: memory is short on the
shared machine).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from helpers import (
    CHEAP,
    build_lm_once,
    experiment,
    fit_concurrently,
    tiny_overrides,
    tiny_run_config,
)

from fedmrg.cli import main
from fedmrg.config import ConfigError
from fedmrg.data.phantom import generate_phantom
from fedmrg.data.shards import MANIFEST, DatasetError, sha256_file
from fedmrg.exit_codes import ExitCode
from fedmrg.fl.checkpoint import client_checkpoint_dir, round_dir_name, run_checkpoint_dir
from fedmrg.fl.failure import ClientDataError

pytestmark = [pytest.mark.ray, pytest.mark.faults, pytest.mark.slow]

# Not an image: PIL cannot identify it (the PNG signature, then garbage).
CORRUPT_IMAGE = b"\x89PNG\r\n\x1a\n" + b"garbage, not a chunk"


# --------------------------------------------------------------------------- broken datasets


def small_phantom(root: Path) -> Path:
    """The dataset the tiny config with CHEAP asks for (2 centers, 10 studies: 7 train, 1 val,
    2 test each; 32 px)."""
    generate_phantom(root, centers=2, studies_per_center=10, image_size=32, seed=0,
                     heldout_center=False)
    return root


def center_file(root: Path, center: str) -> Path:
    files = json.loads((root / MANIFEST).read_text())["centers"][center]["files"]
    assert len(files) == 1  # 10 studies: one part file per center
    return root / files[0]["path"]


def first_study(path: Path, split: str) -> str:
    table = pq.read_table(path, columns=["study_id", "split"])
    return next(s for s, sp in zip(table["study_id"].to_pylist(), table["split"].to_pylist(),
                                   strict=True) if sp == split)


def edit_rows(path: Path, edits: dict[str, dict[str, object]]) -> None:
    """Rewrite columns of the rows named by study id: {study_id: {column: value}}, and the
    file's sha256 in the manifest: the data is bad at its source (as imported), not changed
    after the manifest was written (each client would refuse that file before its first
    round: `test_a_shard_that_differs_from_its_manifest_stops_the_run_naming_it`)."""
    table = pq.read_table(path)
    ids = table["study_id"].to_pylist()
    for study_id, values in edits.items():
        row = ids.index(study_id)
        for column, value in values.items():
            index = table.schema.get_field_index(column)
            cells = table[column].to_pylist()
            cells[row] = value
            table = table.set_column(index, table.schema.field(column),
                                     pa.array(cells, table.schema.field(column).type))
    pq.write_table(table, path)
    root = path.parents[1]
    manifest = json.loads((root / MANIFEST).read_text())
    for entry in manifest["centers"][path.parent.name.removeprefix("center=")]["files"]:
        if root / entry["path"] == path:
            entry["sha256"] = sha256_file(path)
    (root / MANIFEST).write_text(json.dumps(manifest))


def broken_rows(root: Path) -> dict[str, object]:
    """Corrupt images in a train and a test study of center a, an empty report in a train
    study of center b (the manifest is left as generated)."""
    small_phantom(root)
    a_file, b_file = center_file(root, "a"), center_file(root, "b")
    bad = {"a_file": a_file, "b_file": b_file, "a_train": first_study(a_file, "train"),
           "a_test": first_study(a_file, "test"), "b_train": first_study(b_file, "train")}
    edit_rows(a_file, {bad["a_train"]: {"images": [CORRUPT_IMAGE]},
                       bad["a_test"]: {"images": [CORRUPT_IMAGE]}})
    edit_rows(b_file, {bad["b_train"]: {"report": "  "}})
    return bad


def delete_when(trigger: Path, victim: Path, stop: threading.Event) -> threading.Thread:
    """A thread that deletes `victim` as soon as `trigger` exists (until `stop`)."""
    def watch() -> None:
        while not stop.is_set():
            if trigger.exists():
                victim.unlink()
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def parent_run(cfg, run_name: str):
    """The MLflow parent run of `run_name` in the run's own tracking store."""
    from mlflow import MlflowClient

    client = MlflowClient(cfg.tracking.tracking_uri)
    experiment_id = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    (run,) = client.search_runs([experiment_id], f"attributes.run_name = '{run_name}'")
    return client, run


# --------------------------------------------------------------------------- the runs


@pytest.fixture(scope="module")
def runs(ray_cluster, tmp_path_factory):
    base = tmp_path_factory.mktemp("badinput")
    lm_cache = base / "lm"
    bad = broken_rows(base / "broken")
    clean = small_phantom(base / "vanish-data")
    victim = center_file(clean, "a")
    cfgs = {
        "raise": tiny_run_config(base / "raise", lm_cache, *CHEAP, f"data.root={base / 'broken'}",
                                 "data.on_error=raise"),
        "skip": tiny_run_config(base / "skip", lm_cache, *CHEAP, f"data.root={base / 'broken'}",
                                "data.on_error=skip"),
        # streaming, one epoch (one batch of the 7 train rows) per round: round 2 reads
        # center a's file again
        "vanish": tiny_run_config(base / "vanish", lm_cache, *CHEAP, f"data.root={clean}",
                                  "data.on_error=skip", "data.cache_decoded=false",
                                  "data.batch_size=8", "train.local_steps=1"),
    }
    build_lm_once(cfgs["raise"])
    run_names = {name: f"bad-{name}" for name in cfgs}
    # the shard disappears once client a has finished (and checkpointed) its first round
    stop = threading.Event()
    trigger = client_checkpoint_dir(
        Path(cfgs["vanish"].tracking.storage_path) / run_names["vanish"], "a") / round_dir_name(1)
    watcher = delete_when(trigger, victim, stop)
    started = time.monotonic()
    try:
        outcomes = fit_concurrently({name: experiment(cfgs[name], run_names[name])
                                     for name in ("raise", "vanish")})
        outcomes |= fit_concurrently({"skip": experiment(cfgs["skip"], run_names["skip"])})
    finally:
        stop.set()
        watcher.join(timeout=5)
    return {"outcomes": outcomes, "cfgs": cfgs, "run_names": run_names, "bad": bad,
            "victim": victim, "wall_s": time.monotonic() - started}


def test_raise_stops_the_run_with_one_error_naming_each_center_file_and_study(runs):
    error, bad = runs["outcomes"]["raise"], runs["bad"]
    assert type(error) is ClientDataError, repr(error)
    assert isinstance(error, DatasetError) and isinstance(error, ValueError)
    assert error.centers == ["a", "b"]  # both clients' data, one error, after round 1's replies
    a, b = error.errors["a"], error.errors["b"]
    assert f"center 'a', file {bad['a_file']}, study {bad['a_train']!r}" in a
    assert "not a recognizable image" in a
    assert f"center 'b', file {bad['b_file']}, study {bad['b_train']!r}: empty report" in b
    message = str(error)
    assert message.startswith("round 1: bad data at 2 clients: client 'a': ")
    assert "on_error='skip' skips and counts such rows" in message
    # the clients' own messages, not a worker traceback wrapped by Ray
    assert "Traceback" not in message and "ray::" not in message and "\n" not in message
    cfg, name = runs["cfgs"]["raise"], runs["run_names"]["raise"]
    client, run = parent_run(cfg, name)
    assert run.info.status == "FAILED"
    assert not client.get_metric_history(run.info.run_id, "bytes_up")  # no round completed
    checkpoints = run_checkpoint_dir(Path(cfg.tracking.storage_path) / name)
    assert not list(checkpoints.glob("round-*"))


def test_skip_finishes_and_counts_every_bad_row_by_reason(runs):
    result = runs["outcomes"]["skip"]
    assert not isinstance(result, BaseException), repr(result)
    assert [r["participants"] for r in result.rounds] == [["a", "b"], ["a", "b"]]
    for row in result.rounds:
        m = row["metrics"]
        assert (m["a/skipped_corrupt_image"], m["a/skipped_empty_report"]) == (1, 0)
        assert (m["b/skipped_corrupt_image"], m["b/skipped_empty_report"]) == (0, 1)
        assert m["a/skipped_rows"] == m["b/skipped_rows"] == 1
        assert m["skipped_rows"] == 2 and m["skipped_corrupt_image"] == 1  # summed, not averaged
    for view in ("generalization", "personalization"):
        per_center = getattr(result, view)["per_center"]
        # a's corrupt test study is left out of its 2 test studies, and counted
        assert per_center["a"]["skipped_corrupt_image"] == 1 and per_center["a"]["num_studies"] == 1
        assert per_center["b"]["skipped_rows"] == 0 and per_center["b"]["num_studies"] == 2
    cfg, name = runs["cfgs"]["skip"], runs["run_names"]["skip"]
    client, run = parent_run(cfg, name)
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "skipped_rows")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 2.0)]
    nested = {r.data.tags["fedmrg.center"]: r for r in client.search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")}
    for center, reason in (("a", "skipped_corrupt_image"), ("b", "skipped_empty_report")):
        history = client.get_metric_history(nested[center].info.run_id, reason)
        assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 1.0)], center


def test_a_shard_that_disappears_between_rounds_stops_the_run_even_when_skipping(runs):
    error, victim = runs["outcomes"]["vanish"], runs["victim"]
    assert not victim.exists()  # the watcher did delete it, after a's first round
    assert type(error) is ClientDataError, repr(error)
    assert error.centers == ["a"]
    assert f"center 'a', file {victim}: missing" in error.errors["a"]
    assert "Traceback" not in str(error)
    cfg, name = runs["cfgs"]["vanish"], runs["run_names"]["vanish"]
    run_dir = Path(cfg.tracking.storage_path) / name
    # round 1 was done and checkpointed before the file went: the run can be resumed from it
    assert (run_checkpoint_dir(run_dir) / round_dir_name(1)).is_dir()
    client, run = parent_run(cfg, name)
    assert run.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "bytes_up")][0] == 1


def test_a_shard_that_differs_from_its_manifest_stops_the_run_naming_it(ray_cluster, tmp_path,
                                                                          monkeypatch):
    """Issue 19: one shard's sha256 edited in manifest.json; `fedmrg data validate` failed but
    `fedmrg run` trained and evaluated with rc 0. Each client now verifies its own files
    before its first round: one line naming the shard, the exit code of a data error."""
    monkeypatch.chdir(tmp_path)
    root = small_phantom(tmp_path / "ds")
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["centers"]["b"]["files"][0]["sha256"] = "0" * 64
    (root / MANIFEST).write_text(json.dumps(manifest))
    items = [*tiny_overrides(tmp_path), *CHEAP, "data.source=path", f"data.root={root}"]
    outcome = CliRunner().invoke(main, ["run", "--run-name", "tampered",
                                        *[a for item in items for a in ("--set", item)]])
    assert outcome.exit_code == ExitCode.DATA, outcome.output
    (line,) = [x for x in outcome.output.splitlines() if x.startswith("error:")]
    assert line == (f"error: bad data at client 'b': could not start: center 'b': its files "
                    f"differ from {root / MANIFEST} (`fedmrg data validate {root}` checks every "
                    f"center): {center_file(root, 'b')}: sha256 differs from the manifest (file "
                    f"changed)")
    assert "Traceback" not in outcome.output
    assert not list(run_checkpoint_dir(tmp_path / "runs" / "tampered").glob("round-*"))


# --------------------------------------------------------------------------- before any client


def test_an_unknown_phantom_center_is_a_config_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.centers: unknown center 'zz'; the phantom "
                                          r"benchmark has \['a', 'b'"):
        tiny_run_config(tmp_path, tmp_path / "lm", *CHEAP, "data.centers=[a, zz]")


@pytest.mark.parametrize("centers, message", [
    ("[a, zz]", r"data\.centers: unknown center 'zz'; the dataset at .* has \['a', 'b'\]"),
    ("[b, a, b]", r"data\.centers: center 'b' is listed more than once"),
])
def test_a_bad_center_in_a_dataset_stops_before_any_client_starts(ray_cluster, tmp_path,
                                                                  centers, message):
    root = small_phantom(tmp_path / "ds")
    cfg = tiny_run_config(tmp_path, tmp_path / "lm", *CHEAP, "data.source=path",
                          f"data.root={root}", f"data.centers={centers}")
    with pytest.raises(DatasetError, match=message):
        experiment(cfg, "bad-center")()
    assert not (Path(cfg.tracking.storage_path) / "bad-center").exists()


def test_a_center_without_train_rows_stops_before_any_client_starts(ray_cluster, tmp_path):
    root = small_phantom(tmp_path / "ds")
    path = center_file(root, "b")
    table = pq.read_table(path, columns=["study_id", "split"])
    train = [s for s, sp in zip(table["study_id"].to_pylist(), table["split"].to_pylist(),
                                strict=True) if sp == "train"]
    edit_rows(path, {s: {"split": "val"} for s in train})  # every train study becomes val
    manifest = json.loads((root / MANIFEST).read_text())
    rows = manifest["centers"]["b"]["rows"]
    rows["val"], rows["train"] = rows["val"] + rows["train"], 0
    (root / MANIFEST).write_text(json.dumps(manifest))
    cfg = tiny_run_config(tmp_path, tmp_path / "lm", *CHEAP, f"data.root={root}")
    with pytest.raises(DatasetError, match=rf"{root / MANIFEST}: center 'b' has no 'train' "
                                           r"rows \(nothing to train on"):
        experiment(cfg, "no-train")()
    assert not (Path(cfg.tracking.storage_path) / "no-train").exists()
