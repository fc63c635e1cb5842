"""Every failure a one-line error with the exit code of its kind (issue 19, fedmrg.exit_codes).

A full disk and a read-only file system are real ones where the machine allows: a tmpfs of
1 MiB (filled by the write under test) and a read-only tmpfs, mounted for the test (root in a
container with CAP_SYS_ADMIN; skipped elsewhere). A client's failure reaches the driver as
text (`ClientFailure`, a failed round), so those cases are the texts Ray delivers.
"""

from __future__ import annotations

import errno
import re
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import tiny_model_config, tiny_overrides

from fedmrg.cli import main
from fedmrg.config import ConfigError, load_config
from fedmrg.data.shards import DatasetError
from fedmrg.exit_codes import ExitCode, classify
from fedmrg.experiment import ExperimentError, check_min_clients, client_layout
from fedmrg.fl.checkpoint import CheckpointError, list_checkpoints, write_checkpoint
from fedmrg.fl.coordinator import RoundFailedError
from fedmrg.fl.failure import ClientDataError, ClientFailure
from fedmrg.output_paths import (
    DiskSpaceError,
    check_free_space,
    checkpoint_bytes,
    free_bytes,
)

TORCH_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"
FULL_LINE = re.compile(r"^disk full: (.+) \((\d+\.\d) MiB free\)$")


def mount_tmpfs(path: Path, options: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    return path


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 1 MiB file system."""
    yield mount_tmpfs(tmp_path / "tiny", "size=1m")
    # lazy: a failed torch writer may still hold a file there open
    subprocess.run(["umount", "--lazy", str(tmp_path / "tiny")], check=False)


@pytest.fixture
def read_only_disk(tmp_path):
    yield mount_tmpfs(tmp_path / "ro", "ro,size=1m")
    subprocess.run(["umount", "--lazy", str(tmp_path / "ro")], check=False)


# --------------------------------------------------------------------------- the mapping


@pytest.mark.parametrize("error, code, line", [
    (DatasetError("/d/x.parquet: sha256 differs"), ExitCode.DATA, "/d/x.parquet: sha256 differs"),
    (ClientDataError({"a": "could not start: f: bad"}), ExitCode.DATA,
     "bad data at client 'a': could not start: f: bad"),
    (CheckpointError("/r/state.pt", "corrupt"), ExitCode.CHECKPOINT, "/r/state.pt: corrupt"),
    (ClientFailure("a", "RuntimeError: boom"), ExitCode.RUN_FAILED,
     "client 'a': RuntimeError: boom"),
    (RoundFailedError("round 1: fewer usable updates", 1, []), ExitCode.RUN_FAILED,
     "round 1: fewer usable updates"),
    (ConfigError("federation.rounds: must be >= 1"), ExitCode.USAGE,
     "federation.rounds: must be >= 1"),
    (ExperimentError("nothing to resume"), ExitCode.USAGE, "nothing to resume"),
    (PermissionError(errno.EACCES, "Permission denied", "/x/y"), ExitCode.FILESYSTEM,
     "/x/y: Permission denied"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/f"), ExitCode.FILESYSTEM,
     "/ro/f: Read-only file system"),
    (ClientFailure("a", "OSError: [Errno 30] Read-only file system: '/ro/state.pt'"),
     ExitCode.FILESYSTEM, "/ro/state.pt: Read-only file system (client 'a')"),
    (RoundFailedError("round 2: fewer than federation.min_clients=1 usable updates ... a: "
                      "failed: fit failed: OSError: [Errno 30] Read-only file system: '/ro/x'",
                      2, []), ExitCode.FILESYSTEM, "/ro/x: Read-only file system (round 2)"),
])
def test_each_kind_of_error_is_one_line_with_its_exit_code(error, code, line):
    assert classify(error) == (code, line)
    assert "\n" not in line


@pytest.mark.parametrize("error", [KeyError("x"), RuntimeError("a bug"),
                                   ConnectionError("ray gone"), RuntimeError(TORCH_FULL)])
def test_an_unknown_error_is_left_to_its_traceback(error, tmp_path):
    # a torch write failure on a disk with room is not taken for a full disk
    assert classify(error, tmp_path) is None


def test_a_full_disk_names_the_file_and_the_free_space(tmp_path):
    target = tmp_path / "runs" / "r1" / "state.pt"
    for error in (
            OSError(errno.ENOSPC, "No space left on device", str(target)),
            ClientFailure("a", f"OSError: [Errno 28] No space left on device: '{target}'"),
            RoundFailedError(f"round 2: fewer than federation.min_clients=1 usable updates after "
                             f"3 attempts: client 'a': OSError: [Errno 28] No space left on "
                             f"device: '{target}' | client 'b': OSError: [Errno 28] No space "
                             f"left on device: '{target}'", 2, [])):
        code, line = classify(error, tmp_path)
        match = FULL_LINE.match(line)
        assert code == ExitCode.DISK_FULL and match, line
        assert match.group(1) == str(target)
        assert abs(float(match.group(2)) - free_bytes(tmp_path) / 2**20) < 64  # measured now


def test_a_checkpoint_written_to_a_full_disk_is_an_enospc_naming_its_file(tiny_disk):
    """torch reports it as `unexpected pos` without a file or errno (issue 19)."""
    state = {"weights": torch.zeros(1_000_000)}  # 4 MB on a 1 MiB disk
    with pytest.raises(OSError) as caught:
        write_checkpoint(tiny_disk / "checkpoints", 1, state, keep=1)
    error = caught.value
    assert error.errno == errno.ENOSPC and error.filename.endswith("/state.pt")
    assert "unexpected pos" in str(error.__cause__)
    code, line = classify(error, tiny_disk)
    assert code == ExitCode.DISK_FULL and line.startswith(f"disk full: {tiny_disk}/checkpoints/")
    assert list_checkpoints(tiny_disk / "checkpoints") == []
    assert not list((tiny_disk / "checkpoints").iterdir())  # its temporary folder removed
    # the raw torch text, as a client's failure, where the run writes on a nearly full disk
    assert classify(ClientFailure("a", f"RuntimeError: {TORCH_FULL}"), tiny_disk)[0] == (
        ExitCode.DISK_FULL)


# --------------------------------------------------------------------------- before Ray


def test_min_clients_above_the_clients_of_the_run_is_refused_naming_both():
    cfg = load_config("default", ["federation.min_clients=9"])
    with pytest.raises(ConfigError) as caught:
        check_min_clients(cfg, client_layout("fedmrg", ["a", "b", "c", "d"]))
    assert str(caught.value) == (
        "federation.min_clients=9 but the run has 4 client(s), one per center: a, b, c, d; no "
        "round could close: set federation.min_clients to at most 4")
    central = load_config("default", ["federation.min_clients=2",
                                      "federation.strategy=centralized"])
    with pytest.raises(ConfigError, match=r"has 1 client \(centralized pools the data of "
                                          r"centers a, b\)"):
        check_min_clients(central, client_layout("centralized", ["a", "b"]))
    check_min_clients(load_config("default", ["federation.min_clients=4"]),
                      client_layout("fedmrg", ["a", "b", "c", "d"]))


def test_cli_min_clients_above_the_centers_fails_in_seconds_leaving_no_run(tmp_path,
                                                                           monkeypatch):
    """Issue 19: a 36-line traceback after 51 s, once Ray and the actors had started, and a
    run folder left behind."""
    monkeypatch.chdir(tmp_path)
    args = [a for item in [*tiny_overrides(tmp_path), "federation.min_clients=9"]
            for a in ("--set", item)]
    outcome = CliRunner().invoke(main, ["run", "--run-name", "mc9", *args])
    assert outcome.exit_code == ExitCode.USAGE, outcome.output
    assert outcome.output == ("error: federation.min_clients=9 but the run has 2 client(s), one "
                              "per center: a, b; no round could close: set "
                              "federation.min_clients to at most 2\n")
    assert not (tmp_path / "runs" / "mc9").exists()


def test_cli_storage_on_a_read_only_file_system_is_refused_before_the_run(read_only_disk,
                                                                          tmp_path,
                                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [a for item in [*tiny_overrides(tmp_path),
                           f"tracking.storage_path={read_only_disk}/runs"] for a in ("--set", item)]
    outcome = CliRunner().invoke(main, ["run", *args])
    assert outcome.exit_code == ExitCode.USAGE, outcome.output
    assert outcome.output.startswith(f"error: tracking.storage_path {read_only_disk}/runs: "
                                     f"cannot write there (in {read_only_disk}, where it would "
                                     f"be created): Read-only file system")
    assert len(outcome.output.splitlines()) == 1


def test_checkpoint_size_is_estimated_from_the_parameter_groups():
    summary = {"shared": {"bytes": 100}, "private": {"bytes": 10}, "frozen": {"bytes": 1000}}
    need = checkpoint_bytes(summary, 4, server_moments=2)
    # coordinator: the global state and 2 moments; a client: its trainable tensors and AdamW's
    # 2 moments of them; models: every client's whole model
    assert need == {"coordinator": 300, "client": 330, "round": 300 + 4 * 330,
                    "models": 4 * 1110}


def test_free_space_below_one_rounds_checkpoints_is_refused_and_below_the_run_warned(
        tiny_disk):
    free = free_bytes(tiny_disk)
    need = {"coordinator": free // 4, "client": free // 2, "round": free // 4 + free // 2,
            "models": 0}
    # one round fits, the 2 kept rounds (clients 3) do not: a warning
    warning = check_free_space(tiny_disk / "runs", need, keep=2)
    assert warning.startswith(f"tracking.storage_path {tiny_disk}/runs has 1.0 MiB free; this "
                              f"run keeps about ")
    assert check_free_space(tiny_disk / "runs", {k: v // 8 for k, v in need.items()},
                            keep=2) is None
    with pytest.raises(DiskSpaceError) as caught:
        check_free_space(tiny_disk / "runs", {**need, "round": 2 * free}, keep=2)
    code, line = classify(caught.value)
    assert code == ExitCode.DISK_FULL and line == (
        f"disk full: tracking.storage_path {tiny_disk}/runs has 1.0 MiB free; one round's "
        f"checkpoints of this run need about 2.0 MiB (checked before the run started; nothing "
        f"was trained)")


def test_the_size_estimate_uses_the_parameter_count_of_the_model_the_clients_build(tmp_path):
    from fedmrg.model.mrg import MRGModel
    from fedmrg.model.params import parameter_group_summary
    from fedmrg.model.preflight import model_parameter_summary

    cfg = tiny_model_config(tmp_path / "lm")
    assert model_parameter_summary(cfg) == parameter_group_summary(MRGModel.from_config(cfg))
