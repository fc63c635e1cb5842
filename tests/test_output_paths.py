"""Every output path is checked before a run starts (fedmrg.output_paths).

Run as root here: `chmod` cannot make a folder unwritable for root, so the unwritable cases
use a path under a regular file (ENOTDIR for everyone) and sysfs (/sys refuses new files
even to root); a read-only file system needs a mount and is not tested. The permission case
of an existing read-only file runs only as a non-root user.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedmrg.cli import main
from fedmrg.config import load_config
from fedmrg.experiment import Experiment, ExperimentError, resolve_paths
from fedmrg.output_paths import (
    PROBE_PREFIX,
    check_output_paths,
    file_problem,
    folder_problem,
    output_paths,
)


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def good_overrides(tmp: Path) -> list[str]:
    return [f"data.root={tmp}/data", f"model.lm_cache={tmp}/lm",
            f"tracking.tracking_uri=sqlite:///{tmp}/store/mlflow.db",
            f"tracking.artifact_location={tmp}/artifacts", f"tracking.storage_path={tmp}/runs"]


@pytest.fixture
def tmp(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)  # a relative default path lands here, never in the repo
    (tmp_path / "afile").write_text("not a folder")
    return tmp_path


def test_good_paths_pass_and_nothing_is_created(tmp):
    cfg = resolve_paths(load_config("default", good_overrides(tmp)))
    before = tree(tmp)
    check_output_paths(cfg, {"--summary-json": tmp / "out" / "summary.json"})
    assert tree(tmp) == before  # no folder made, no probe file left
    keys = [key for key, _, _ in output_paths(cfg, {"--summary-json": tmp / "s.json"})]
    assert keys == ["tracking.storage_path", "tracking.tracking_uri",
                    "tracking.artifact_location", "data.root", "model.lm_cache",
                    "--summary-json"]


@pytest.mark.parametrize("key, value, message", [
    ("tracking.storage_path", "{tmp}/afile/runs", "{tmp}/afile is a file, not a folder"),
    ("tracking.storage_path", "{tmp}/afile", "it is a file, not a folder"),
    ("tracking.tracking_uri", "sqlite:///{tmp}/afile/mlflow.db",
     "its folder {tmp}/afile cannot be used: it is a file, not a folder"),
    ("tracking.tracking_uri", "sqlite:///{tmp}", "it is a folder; give a file path"),
    ("tracking.tracking_uri", "{tmp}/afile/mlruns", "{tmp}/afile is a file, not a folder"),
    ("tracking.tracking_uri", "file://{tmp}/afile/mlruns", "{tmp}/afile is a file, not a folder"),
    ("tracking.artifact_location", "{tmp}/afile/art", "{tmp}/afile is a file, not a folder"),
    ("data.root", "{tmp}/afile/data", "{tmp}/afile is a file, not a folder"),
    ("model.lm_cache", "{tmp}/afile/lm", "{tmp}/afile is a file, not a folder"),
])
def test_each_bad_output_path_is_named_with_its_key_and_why(tmp, key, value, message):
    value, message = value.format(tmp=tmp), message.format(tmp=tmp)
    cfg = resolve_paths(load_config("default", [*good_overrides(tmp), f"{key}={value}"]))
    with pytest.raises(ExperimentError) as caught:
        check_output_paths(cfg)
    text = str(caught.value)
    assert text.startswith(f"{key} ") and message in text and "nothing was trained" in text


def test_existing_dataset_and_tracking_server_are_not_output_paths(tmp):
    data = tmp / "ds"
    data.mkdir()
    (data / "manifest.json").write_text("{}")  # exists: read, not generated
    cfg = resolve_paths(load_config("default", [
        *good_overrides(tmp), f"data.root={data}", "tracking.tracking_uri=http://127.0.0.1:1",
        f"tracking.artifact_location={tmp}/afile/x", "model.lm=some/hf-model"]))
    keys = [key for key, _, _ in output_paths(cfg)]
    # a relative or local artifact folder with a server is the server's business
    assert keys == ["tracking.storage_path"]
    check_output_paths(cfg)


def test_summary_file_problems(tmp):
    assert file_problem(tmp / "afile") is None  # an existing file: overwritten
    assert (tmp / "afile").read_text() == "not a folder"  # ... but not by the check
    assert file_problem(tmp) == "it is a folder; give a file path"
    assert file_problem(tmp / "afile" / "s.json") == (
        f"its folder {tmp / 'afile'} cannot be used: it is a file, not a folder")
    assert file_problem(tmp / "new" / "deeper" / "s.json") is None
    assert not (tmp / "new").exists()


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs sysfs")
def test_a_folder_nobody_may_create_is_refused_even_for_root():
    if folder_problem("/sys") is None:
        pytest.skip("/sys accepts new files here")
    problem = folder_problem("/sys/fedmrg-runs/x")
    assert problem.startswith("cannot write there (in /sys, where it would be created): ")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes a read-only file anyway")
def test_a_read_only_file_is_refused(tmp):
    locked = tmp / "locked.json"
    locked.write_text("{}")
    locked.chmod(0o444)
    assert file_problem(locked).startswith("cannot write it: Permission denied")


def test_probe_files_never_stay(tmp):
    assert folder_problem(tmp / "a" / "b") is None
    assert not [p for p in tmp.iterdir() if p.name.startswith(PROBE_PREFIX)]


def test_run_with_summary_under_a_file_fails_in_seconds_before_training(tmp):
    """The issue's case: `--summary-json X` with X's parent a file, refused up front."""
    started = time.monotonic()
    outcome = CliRunner().invoke(main, [
        "run", "--summary-json", str(tmp / "afile" / "summary.json"),
        *[arg for item in good_overrides(tmp) for arg in ("--set", item)]])
    assert outcome.exit_code == 2, outcome.output
    assert outcome.output.strip() == (
        f"error: --summary-json {tmp}/afile/summary.json: its folder {tmp}/afile cannot be "
        f"used: it is a file, not a folder (checked before the run started; nothing was "
        f"trained)")
    assert time.monotonic() - started < 30
    # nothing started: no run folder, no MLflow store, no dataset, no LM built
    assert tree(tmp) == ["afile"]


def test_experiment_fit_checks_its_config_paths_before_ray(tmp):
    import ray

    cfg = load_config("default", [*good_overrides(tmp), f"tracking.storage_path={tmp}/afile/r"])
    connected = ray.is_initialized()  # another test of this session may have started Ray
    with pytest.raises(ExperimentError, match="tracking.storage_path .*afile is a file"):
        Experiment(cfg, run_name="x").fit()
    assert ray.is_initialized() == connected
    assert tree(tmp) == ["afile"]


def test_evaluate_json_under_a_file_is_refused_before_evaluating(tmp):
    outcome = CliRunner().invoke(main, ["evaluate", str(tmp), "--json",
                                        str(tmp / "afile" / "m.json")])
    assert outcome.exit_code == 2
    assert f"error: --json {tmp}/afile/m.json: its folder {tmp}/afile cannot be used" in (
        outcome.output)
