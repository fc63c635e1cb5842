"""`fedmrg runs` (fedmrg.runs and the CLI group), on run folders written as a run writes them.

Pure: folders with the run's config.yaml, the real checkpoint writer's coordinator and client
checkpoints, summary.json and saved files: a finished run, an interrupted one (resumable at
its newest checkpoint; its newest corrupt: resumable only with --checkpoint-fallback), one
interrupted in round 1, a finished run extended and interrupted, an empty one, and folders
that are not runs. Listing (status, rounds, sizes, order), selection for cleanup, removal
(asks, refuses names that are not runs before removing anything), JSON. A tiny real run
(Ray) then checks the client checkpoint retention of a run with a client sitting rounds out
and lists that run folder.
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from fedmrg.cli import main
from fedmrg.config import load_config
from fedmrg.fl.checkpoint import client_checkpoint_dir, run_checkpoint_dir, write_checkpoint
from fedmrg.runs import (
    EMPTY,
    FINISHED,
    INTERRUPTED,
    RunsError,
    check_run_names,
    human_size,
    list_runs,
    remove_runs,
    run_info,
    select_runs,
)

DAY = 86400.0


def make_run(storage: Path, name: str, *, rounds: int, coordinator: list[int],
             clients: dict[str, list[int]] | None = None, summary_rounds: int | None = None,
             age_days: float = 0.0) -> Path:
    """A run folder as `fedmrg run` leaves it, last changed `age_days` ago."""
    run_dir = storage / name
    run_dir.mkdir(parents=True)
    cfg = load_config("default", [f"federation.rounds={rounds}"])
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    for r in coordinator:
        write_checkpoint(run_checkpoint_dir(run_dir), r, {"round_id": r, "pad": b"x" * 1000},
                         keep=2)
    for center, client_rounds in (clients or {}).items():
        for r in client_rounds:
            write_checkpoint(client_checkpoint_dir(run_dir, center), r, {"r": r},
                             resumable_from=[r - 1], kind="client")
    if summary_rounds is not None:
        (run_dir / "models" / "a").mkdir(parents=True)
        (run_dir / "models" / "a" / "model.safetensors").write_bytes(b"m" * 5000)
        (run_dir / "summary.json").write_text(json.dumps(
            {"run_name": name, "rounds": [{"round_id": r} for r in range(1, summary_rounds + 1)]}))
    set_age(run_dir, age_days)
    return run_dir


def set_age(folder: Path, days: float) -> None:
    stamp = time.time() - days * DAY
    for root, dirs, files in os.walk(folder):
        for name in [*dirs, *files]:
            os.utime(os.path.join(root, name), (stamp, stamp))
    os.utime(folder, (stamp, stamp))


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def storage(tmp_path):
    storage = tmp_path / "runs"
    make_run(storage, "done", rounds=3, coordinator=[2, 3], clients={"a": [2, 3], "b": [3]},
             summary_rounds=3, age_days=10)
    make_run(storage, "cut", rounds=5, coordinator=[1, 2], clients={"a": [1, 2, 3]},
             age_days=1)
    bad = make_run(storage, "bad-newest", rounds=5, coordinator=[1, 2], age_days=2)
    state = run_checkpoint_dir(bad) / "round-000002" / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    set_age(bad, 2)
    make_run(storage, "first-round", rounds=5, coordinator=[], clients={"a": [1]}, age_days=3)
    make_run(storage, "extended", rounds=6, coordinator=[2, 3], summary_rounds=3, age_days=4)
    make_run(storage, "never", rounds=5, coordinator=[], age_days=20)
    (storage / "notes").mkdir()  # not runs: a plain folder and a file
    (storage / "notes" / "x.txt").write_text("x")
    (storage / "README").write_text("x")
    return storage


def test_listing_names_status_rounds_and_size_newest_first(storage):
    runs = list_runs(storage)
    assert [r.name for r in runs] == ["cut", "bad-newest", "first-round", "extended", "done",
                                      "never"]
    by = {r.name: r for r in runs}
    assert (by["done"].status, by["done"].rounds_done, by["done"].rounds_planned) == (
        FINISHED, 3, 3)
    assert by["done"].status_text == "finished" and by["done"].strategy == "fedmrg"
    cut = by["cut"]
    assert (cut.status, cut.resume_round, cut.rounds_done, cut.rounds_planned) == (
        INTERRUPTED, 2, 2, 5)
    assert cut.status_text == "interrupted, resumable at round 2"
    assert by["bad-newest"].resume_round == 1
    assert "only with --checkpoint-fallback" in by["bad-newest"].note
    assert "(round 2: corrupt: sha256" in by["bad-newest"].note
    assert by["first-round"].status_text == "interrupted in round 1 (starts over)"
    assert (by["extended"].status, by["extended"].resume_round) == (INTERRUPTED, 3)
    assert (by["never"].status, by["never"].rounds_done) == (EMPTY, 0)
    for run in runs:
        folder = storage / run.name
        assert run.bytes == disk_bytes(folder)
        assert run.checkpoint_bytes == disk_bytes(folder / "checkpoints") + sum(
            disk_bytes(c) for c in (folder / "centers").glob("*/checkpoints"))
        assert abs(run.modified - folder.stat().st_mtime) < 1
    assert by["done"].bytes > by["done"].checkpoint_bytes > 0  # models/ and summary besides
    assert list_runs(storage / "absent") == []


def test_selection_by_name_age_and_rank(storage):
    runs = list_runs(storage)
    now = time.time()
    names = lambda chosen: sorted(r.name for r in chosen)  # noqa: E731
    assert names(select_runs(runs, names=["done"])) == ["done"]
    assert names(select_runs(runs, older_than_days=5, now=now)) == ["done", "never"]
    assert names(select_runs(runs, keep_last=4, now=now)) == ["done", "never"]
    assert names(select_runs(runs, keep_last=5, older_than_days=5, now=now)) == ["never"]
    assert names(select_runs(runs, names=["cut"], older_than_days=15, now=now)) == [
        "cut", "never"]
    assert select_runs(runs, keep_last=10) == [] and select_runs(runs) == []
    with pytest.raises(RunsError, match="no run 'nope' here"):
        select_runs(runs, names=["nope"])


def test_removal_checks_every_name_first(storage):
    for name, message in (("notes", "not a fedmrg run folder"), ("README", "no run 'README'"),
                          ("../runs", "not a run name"), ("..", "not a run name"),
                          ("nope", "no run 'nope'")):
        with pytest.raises(RunsError, match=message):
            remove_runs(storage, ["cut", name])
        assert (storage / "cut").is_dir()  # nothing removed
    assert remove_runs(storage, ["cut", "never"]) == ["cut", "never"]
    assert not (storage / "cut").exists() and not (storage / "never").exists()
    assert check_run_names(storage, ["done"]) == [storage / "done"]
    assert (storage / "notes" / "x.txt").is_file()


def cli(storage: Path, *args: str, input: str | None = None):
    return CliRunner().invoke(main, ["runs", *args, "--set",
                                     f"tracking.storage_path={storage}"], input=input)


def test_cli_lists_as_table_and_json(storage):
    table = cli(storage)
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0] == f"runs in {storage}"
    assert lines[2].split()[:6] == ["cut", "fedmrg", "interrupted,", "resumable", "at", "round"]
    done = next(line for line in lines if line.startswith("done "))
    assert " finished " in done and " 3/3 " in done
    assert lines[-1] == f"6 run(s), {human_size(disk_bytes(storage) - 2)}"  # less notes, README
    # the group's --set before the subcommand works as well
    listed = CliRunner().invoke(main, ["runs", "--set", f"tracking.storage_path={storage}",
                                       "list", "--json"])
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.output)
    assert [r["name"] for r in rows][:2] == ["cut", "bad-newest"]
    assert rows[0]["status"] == "interrupted" and rows[0]["resume_round"] == 2
    assert rows[0]["bytes"] == disk_bytes(storage / "cut") and rows[0]["modified_utc"]
    empty = cli(storage / "absent", "list")
    assert empty.exit_code == 0 and "no runs in" in empty.output


def test_cli_rm_asks_then_removes(storage):
    kept = cli(storage, "rm", "done", input="n\n")
    assert kept.exit_code == 1 and "remove 1 run(s)" in kept.output and "Aborted" in (
        kept.output)
    assert (storage / "done").is_dir()
    size = human_size(disk_bytes(storage / "done"))
    gone = cli(storage, "rm", "done", input="y\n")
    assert gone.exit_code == 0, gone.output
    assert f"removed 1 run(s), {size}" in gone.output and not (storage / "done").exists()


def test_cli_rm_bulk_dry_run_json_and_refusals(storage):
    dry = cli(storage, "rm", "--keep-last", "4", "--dry-run")
    assert dry.exit_code == 0 and "dry run: would remove 2 run(s)" in dry.output
    assert (storage / "never").is_dir() and (storage / "extended").is_dir()
    removed = cli(storage, "rm", "--older-than", "15", "--yes", "--json")
    assert removed.exit_code == 0, removed.output
    assert [r["name"] for r in json.loads(removed.output)] == ["never"]
    assert not (storage / "never").exists()
    refused = cli(storage, "rm", "cut", "notes", "--yes")
    assert refused.exit_code == 2 and f"error: {storage / 'notes'} is not a fedmrg run " in (
        refused.output)
    assert (storage / "cut").is_dir()
    bare = cli(storage, "rm")
    assert bare.exit_code == 2 and "--older-than DAYS and/or --keep-last N" in bare.output
    nothing = cli(storage, "rm", "--older-than", "100", "--yes")
    assert nothing.exit_code == 0 and "no run in" in nothing.output


# --------------------------------------------------------------------------- a real run


@pytest.mark.ray
@pytest.mark.slow
def test_a_run_keeps_the_client_rounds_a_resume_needs_and_is_listed(ray_cluster, tmp_path):
    """4 rounds, 2 centers, one sampled per round (fraction 0.5), checkpoint_keep 2: the
    coordinator keeps rounds 3-4; each center's folder holds, of the rounds it trained, its
    newest and its newest at or before 3 and 4 (a center that sat round 4 out keeps its
    round-3 or older state, not rounds the coordinator no longer has)."""
    from helpers import tiny_overrides

    from fedmrg.experiment import Experiment
    from fedmrg.fl.checkpoint import client_rounds_to_keep, list_checkpoints

    items = [*tiny_overrides(tmp_path), "federation.rounds=4", "federation.fraction=0.5",
             "tracking.checkpoint_keep=2", "train.local_steps=1", "eval.max_new_tokens=4",
             "eval.samples=0", "eval.val_every=0"]
    result = Experiment(load_config("default", items), run_name="kept", in_process=True,
                        progress=False, out=io.StringIO()).fit()
    run_dir = Path(result.storage_dir)
    assert [r for r, _ in list_checkpoints(run_dir / "checkpoints")] == [3, 4]
    trained = {c: [row["round_id"] for row in result.rounds if c in row["participants"]]
               for c in ("a", "b")}
    assert all(len(row["participants"]) == 1 for row in result.rounds)
    for center, rounds in trained.items():
        kept = [r for r, _ in list_checkpoints(run_dir / "centers" / center / "checkpoints")]
        by_hand = sorted({rounds[-1]} | {max((r for r in rounds if r <= c), default=None)
                                         for c in (3, 4)} - {None})
        assert kept == by_hand == sorted(client_rounds_to_keep(rounds, [3, 4])), (center,
                                                                                   rounds)
    info = run_info(run_dir)
    assert (info.status, info.rounds_done, info.rounds_planned) == (FINISHED, 4, 4)
    assert info.bytes == disk_bytes(run_dir) and info.checkpoint_bytes > 0
