"""Checkpoint folders (fedmrg.fl.checkpoint), pure: no Ray, no model.

Round trip of a coordinator-like state; atomic writes (no temporary folder left, a write that
fails midway leaves the previous latest intact, a folder left by a killed writer is ignored and
then removed); keep-K pruning and a re-run round replacing its folder; corruption (flipped
byte, truncation, missing file, unreadable manifest, a pickled object) named by file; config
fingerprint (excluded keys may change, others are named with both values; format version);
fallback to the previous good checkpoint; per-client bookkeeping.
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmrg.config import load_config
from fedmrg.fl import checkpoint as ckpt
from fedmrg.fl.checkpoint import (
    CheckpointError,
    client_bookkeeping,
    fingerprint_values,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    verify_checkpoint,
    write_checkpoint,
)


def coordinator_like_state(round_id: int) -> dict:
    rng = np.random.default_rng(7)
    rng.random(round_id)  # an advanced bit generator, as after sampling
    return {"coordinator": {
        "round_id": round_id,
        "strategy": {"name": "fedmrg",
                     "global": {"w": torch.randn(3, 4, generator=torch.Generator().manual_seed(
                         round_id)), "b": torch.arange(4, dtype=torch.float64)},
                     "optimizer": {"m": {}, "v": {}}, "prototypes": None,
                     "label_counts": {"a": torch.ones(14, 4, dtype=torch.int64)}},
        "rng": rng.bit_generator.state,
        "history": [{"round_id": r, "participants": ["a", "b"], "rejected": {}, "bytes_up": 10,
                     "metrics": {"loss": 1.0 / r}} for r in range(1, round_id + 1)],
    }}


def write(directory: Path, round_id: int, keep: int = 3, fingerprint=None) -> Path:
    return write_checkpoint(directory, round_id, coordinator_like_state(round_id), keep=keep,
                            fingerprint=fingerprint, meta={"run_name": "r"})


def assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


# --------------------------------------------------------------------------- round trip


def test_round_trip_restores_tensors_rng_and_history(tmp_path):
    state = coordinator_like_state(2)
    path = write_checkpoint(tmp_path, 2, state, keep=3, kind="coordinator",
                            meta={"run_name": "r"})
    assert path == tmp_path / "round-000002"
    loaded, manifest = load_checkpoint(path)
    assert_same(state, loaded)
    assert manifest["round_id"] == 2 and manifest["kind"] == "coordinator"
    assert manifest["meta"] == {"run_name": "r"}
    assert manifest["format_version"] == ckpt.FORMAT_VERSION
    digest = manifest["files"][ckpt.STATE_FILE]["sha256"]
    assert digest == ckpt._sha256(path / ckpt.STATE_FILE)
    # the restored bit generator continues exactly where the saved one was
    saved = np.random.default_rng(0)
    saved.bit_generator.state = state["coordinator"]["rng"]
    restored = np.random.default_rng(0)
    restored.bit_generator.state = loaded["coordinator"]["rng"]
    assert saved.integers(0, 1 << 30, 5).tolist() == restored.integers(0, 1 << 30, 5).tolist()


def test_a_state_that_is_not_plain_data_cannot_be_loaded(tmp_path):
    # weights_only loading: a checkpoint cannot run code; a pickled object is refused
    path = write_checkpoint(tmp_path, 1, {"thing": Path("/x")}, keep=1)
    with pytest.raises(CheckpointError, match="cannot be loaded") as info:
        load_checkpoint(path)
    assert info.value.path.endswith("round-000001/state.pt")


# --------------------------------------------------------------------------- atomicity


def test_writes_leave_no_temporary_folder(tmp_path):
    for r in (1, 2):
        write(tmp_path, r)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-000001", "round-000002"]


def test_a_write_failing_midway_leaves_the_previous_latest(tmp_path, monkeypatch):
    write(tmp_path, 1)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "_fsync_dir", crash)  # after both files, before the rename
    with pytest.raises(OSError, match="disk full"):
        write(tmp_path, 2)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["round-000001"]
    assert latest_checkpoint(tmp_path).round_id == 1


def test_a_folder_left_by_a_killed_writer_is_ignored_then_removed(tmp_path):
    write(tmp_path, 1)
    torn = tmp_path / f"{ckpt.TEMP_PREFIX}round-000002-deadbeef"
    torn.mkdir()
    (torn / ckpt.STATE_FILE).write_bytes(b"half a file")
    assert [r for r, _ in list_checkpoints(tmp_path)] == [1]
    assert latest_checkpoint(tmp_path).round_id == 1
    write(tmp_path, 2)
    assert not torn.exists()
    assert latest_checkpoint(tmp_path).round_id == 2


# --------------------------------------------------------------------------- keep K


def test_only_the_newest_k_rounds_are_kept(tmp_path):
    for r in range(1, 6):
        write(tmp_path, r, keep=3)
    assert [r for r, _ in list_checkpoints(tmp_path)] == [3, 4, 5]


def test_a_rerun_round_replaces_its_folder_and_drops_later_ones(tmp_path):
    for r in (1, 2, 3):
        write(tmp_path, r)
    # resumed from round 1: round 2 is written again; round 3 belonged to the abandoned run
    replaced = write_checkpoint(tmp_path, 2, {"again": torch.zeros(1)}, keep=3)
    assert [r for r, _ in list_checkpoints(tmp_path)] == [1, 2]
    assert set(load_checkpoint(replaced)[0]) == {"again"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-000001", "round-000002"]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="round id"):
        write_checkpoint("/tmp/unused", -1, {}, keep=1)
    with pytest.raises(ValueError, match="to keep"):
        write_checkpoint("/tmp/unused", 1, {}, keep=0)


# --------------------------------------------------------------------------- corruption


def test_a_flipped_byte_is_a_checksum_error_naming_the_file(tmp_path):
    path = write(tmp_path, 1)
    state = path / ckpt.STATE_FILE
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt: sha256") as info:
        verify_checkpoint(path)
    assert info.value.path == str(state)
    assert str(state) in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("damage, file, reason", [
    ("truncate", ckpt.STATE_FILE, "corrupt: .* bytes"),
    ("delete", ckpt.STATE_FILE, "missing"),
    ("delete", ckpt.MANIFEST_FILE, "missing"),
    ("garble", ckpt.MANIFEST_FILE, "unreadable"),
])
def test_damaged_files_are_named(tmp_path, damage, file, reason):
    path = write(tmp_path, 1)
    target = path / file
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:100])
    elif damage == "delete":
        target.unlink()
    else:
        target.write_text("{not json")
    with pytest.raises(CheckpointError, match=reason) as info:
        latest_checkpoint(tmp_path)
    assert info.value.path == str(target)


def test_another_format_version_is_incompatible(tmp_path):
    path = write(tmp_path, 1)
    manifest = json.loads((path / ckpt.MANIFEST_FILE).read_text())
    manifest["format_version"] = ckpt.FORMAT_VERSION + 1
    (path / ckpt.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="incompatible: format version 2"):
        verify_checkpoint(path)


def test_checkpoint_error_pickles_with_its_path_and_reason():
    error = pickle.loads(pickle.dumps(CheckpointError("/a/state.pt", "corrupt: x")))
    assert (error.path, error.reason, str(error)) == ("/a/state.pt", "corrupt: x",
                                                      "/a/state.pt: corrupt: x")


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_leaves_out_paths_placement_and_length_only():
    values = fingerprint_values(load_config("default"), {"data.manifest_hash": "abc"})
    assert values["data.manifest_hash"] == "abc"
    assert {"seed", "train.lr", "federation.fraction", "federation.min_clients",
            "federation.max_update_norm", "model.lora_rank", "eval.num_beams"} <= set(values)
    left_out = {"tracking.storage_path", "tracking.run_name", "tracking.checkpoint_keep",
                "resources.num_gpus_per_client", "device", "data.root", "model.lm_cache",
                "federation.rounds", "federation.eval_every", "federation.round_deadline_s",
                "eval.samples", "eval.val_every", "eval.val_studies", "data.stream_max_tasks"}
    assert not left_out & set(values)
    assert "eval.no_repeat_ngram_size" in values  # decoding changes the evaluated numbers


def test_changing_only_excluded_keys_keeps_a_checkpoint_compatible(tmp_path):
    saved = fingerprint_values(load_config("default"))
    write(tmp_path, 1, fingerprint=saved)
    moved = fingerprint_values(load_config("default", [
        "tracking.storage_path=/elsewhere", "federation.rounds=50", "resources.max_restarts=0",
        "data.root=/mnt/data", "eval.samples=0", "device=cpu"]))
    assert latest_checkpoint(tmp_path, fingerprint=moved).round_id == 1


def test_a_changed_key_is_named_with_both_values(tmp_path):
    write(tmp_path, 1, fingerprint=fingerprint_values(load_config("default"), {"h": "x"}))
    changed = fingerprint_values(load_config("default", ["train.lr=0.001", "seed=3"]),
                                 {"h": "x"})
    with pytest.raises(CheckpointError, match="incompatible") as info:
        latest_checkpoint(tmp_path, fingerprint=changed)
    message = str(info.value)
    assert "train.lr: checkpoint 0.002, now 0.001" in message
    assert "seed: checkpoint 0, now 3" in message
    assert info.value.path.endswith("round-000001/manifest.json")


# --------------------------------------------------------------------------- fallback


def test_corrupt_newest_raises_or_falls_back_to_the_previous_good_one(tmp_path, caplog):
    for r in (1, 2, 3):
        write(tmp_path, r)
    (tmp_path / "round-000003" / ckpt.STATE_FILE).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="round-000003/state.pt: corrupt"):
        latest_checkpoint(tmp_path)
    with caplog.at_level(logging.WARNING, logger="fedmrg.fl.checkpoint"):
        found = latest_checkpoint(tmp_path, fallback=True)
    assert found.round_id == 2 and found.path == tmp_path / "round-000002"
    assert len(found.skipped) == 1 and "round-000003/state.pt: corrupt" in found.skipped[0]
    assert "checkpoint skipped" in caplog.text and "round-000003" in caplog.text
    assert_same(found.load(), coordinator_like_state(2))


def test_fallback_with_no_good_checkpoint_raises_the_newest_error(tmp_path):
    for r in (1, 2):
        write(tmp_path, r)
        (tmp_path / f"round-00000{r}" / ckpt.MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match="no older checkpoint .* is valid") as info:
        latest_checkpoint(tmp_path, fallback=True)
    assert info.value.path.endswith("round-000002/manifest.json")


def test_max_round_picks_the_newest_at_or_below_it(tmp_path):
    for r in (1, 2, 4):
        write(tmp_path, r, keep=5)
    assert latest_checkpoint(tmp_path, max_round=3).round_id == 2
    assert latest_checkpoint(tmp_path, max_round=0) is None
    assert latest_checkpoint(tmp_path / "absent") is None


def test_client_bookkeeping_counts_rounds_and_rejections():
    history = [
        {"round_id": 1, "participants": ["a", "b"], "rejected": {}},
        {"round_id": 2, "participants": ["a"], "rejected": {"b": "non-finite values"}},
    ]
    assert client_bookkeeping(history) == {
        "a": {"rounds": 2, "last_round": 2, "rejected": 0, "last_rejection": None},
        "b": {"rounds": 1, "last_round": 1, "rejected": 1,
              "last_rejection": "round 2: non-finite values"},
    }
