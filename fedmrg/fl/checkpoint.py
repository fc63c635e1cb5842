"""Checkpoints that survive a crash: atomic round folders, checksums, a config fingerprint, keep K.

    <tracking.storage_path>/<run name>/
      checkpoints/round-000003/                  the coordinator's, after every completed round
        state.pt                                 torch.save of what continuing the run needs
        manifest.json                            format version, round, sha256 and size of
                                                 every file, config fingerprint and its values
      centers/<center>/checkpoints/round-000003/ each client's private state (same layout),
                                                 written by the client where it runs

Writing (`write_checkpoint`): the files go to a temporary folder `.tmp-round-NNNNNN-...` in the
same directory (a rename never crosses file systems), each file fsynced, the manifest last;
one `rename` then makes it `round-NNNNNN`, and the directory is fsynced. A crash at any point
leaves either the complete folder or a temporary one that no reader looks at (the next write
removes it): there is no "latest" pointer to tear, the latest is the highest valid round
folder. A round written again (re-run after a resume from an older checkpoint) replaces the
old folder with two renames; rounds above the one written belong to a timeline that a resume
abandoned and are removed. Then all but the newest `keep` rounds are removed. One writer per
directory (the coordinator for its run, a client for its center).

Client retention (`client_rounds_to_keep`): a client's folder keeps what a resume can need and
no more. The coordinator resumes from one of its kept checkpoints (the newest, or an older one
with `--checkpoint-fallback`), and a client then goes back to its newest checkpoint at or
before that round; a client may also be one round ahead (it wrote round r, the coordinator
crashed before writing r), and a retried round goes back to the round before it. So a client
keeps its newest round and, for every round the coordinator may resume from, its newest round
at or before it. When a client writes round r the coordinator has finished round r - 1 and
keeps its last `tracking.checkpoint_keep` = K rounds (r - K .. r - 1; `resumable_rounds`); with
every client in every round that is rounds r - K .. r, one more than the coordinator's, and
fewer when a client sits rounds out. At the end of a run the coordinator holds rounds
R - K + 1 .. R, and `prune_client_checkpoints` drops the clients' round R - K (it removes only
what no kept coordinator checkpoint needs).

Reading (`verify_checkpoint`, `latest_checkpoint`, `load_checkpoint`): a folder is valid when
its manifest parses, its format version is `FORMAT_VERSION`, its round matches its name, every
listed file exists with the listed size and sha256, and (when the current fingerprint values
are given) its fingerprint equals theirs. Anything else raises `CheckpointError` naming the
file and the reason; a fingerprint mismatch names each differing key with both values.
`latest_checkpoint(..., fallback=True)` instead skips bad folders with a logged warning and
returns the newest good one (`Checkpoint.skipped` says what was skipped and why).

The config fingerprint (`fingerprint_values`) is every config key that decides what a round
computes, plus what the caller adds (the dataset's manifest hash: the data's identity, since
`data.root` is only a path). Left out (`UNFINGERPRINTED`), so that they may change between a
crash and its resume (MLflow records such a change as a resume tag): where things are stored
and logged (`tracking.*`, `data.root`, `model.lm_cache`), how Ray places work (`resources.*`,
`device`: bit-identity across a resume then needs the same device type), stream speed knobs
(`data.cache_decoded`, `data.stream_*`: a pass is the same either way), how long and when
(`federation.rounds`: a finished run can be extended; `federation.eval_every`,
`federation.round_deadline_s`, `federation.eval_deadline_s`, `federation.round_retries`:
when a call is given up on), and
`eval.samples` (sample reports kept for display), `eval.val_every` and `eval.val_studies`
(the validation points logged between rounds). Everything else (seed, data and stream
settings, model, losses, training, strategy, aggregation, wire dtype, sampling `fraction`
and `min_clients`, the update-norm bound, evaluation settings) is in it.

`state.pt` is read with `torch.load(weights_only=True)`: tensors, numbers, strings, lists and
dicts only, so a checkpoint cannot run code when it is loaded.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedmrg.config import ExperimentConfig

log = logging.getLogger(__name__)

FORMAT = "fedmrg-checkpoint"
FORMAT_VERSION = 1
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
CHECKPOINTS = "checkpoints"  # <run dir>/checkpoints, <run dir>/centers/<center>/checkpoints
CENTERS = "centers"
ROUND_DIR = re.compile(r"^round-(\d{6,})$")
TEMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"

# Config keys (exact, or a section when ending in ".") outside the fingerprint: see the module
# docstring for why each may change between a crash and its resume.
UNFINGERPRINTED = (
    "tracking.", "resources.", "device",
    "data.root", "model.lm_cache",
    "data.cache_decoded", "data.stream_cpus_per_task", "data.stream_max_tasks",
    "federation.rounds", "federation.eval_every", "federation.round_deadline_s",
    "federation.eval_deadline_s", "federation.round_retries",
    "eval.samples", "eval.val_every", "eval.val_studies",
)


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or incompatible; names the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason

    def __reduce__(self):  # picklable across Ray
        return (type(self), (self.path, self.reason))


# --------------------------------------------------------------------------- paths


def round_dir_name(round_id: int) -> str:
    return f"round-{round_id:06d}"


def run_checkpoint_dir(run_dir: str | Path) -> Path:
    """The coordinator's checkpoints of a run: `<run dir>/checkpoints`."""
    return Path(run_dir) / CHECKPOINTS


def client_checkpoint_dir(run_dir: str | Path, center: str) -> Path:
    """A client's own checkpoints: `<run dir>/centers/<center>/checkpoints`."""
    return Path(run_dir) / CENTERS / center / CHECKPOINTS


# --------------------------------------------------------------------------- fingerprint


def is_fingerprinted(key: str) -> bool:
    return not any(key == k or (k.endswith(".") and key.startswith(k)) for k in UNFINGERPRINTED)


def fingerprint_values(cfg: ExperimentConfig, extra: Mapping[str, Any] | None = None
                       ) -> dict[str, Any]:
    """{key: value} of every fingerprinted config key (module docstring), plus `extra`
    (e.g. {"data.manifest_hash": ...}), as plain JSON values."""
    values = {k: v for k, v in cfg.flat().items() if is_fingerprinted(k)}
    values.update(extra or {})
    return json.loads(json.dumps(values, sort_keys=True, default=str))


def run_fingerprint(cfg: ExperimentConfig, dataset_root: str | Path) -> dict[str, Any]:
    """The fingerprint values of a run: the config's and the dataset's manifest hash. The
    coordinator and every client compute the same (a client's `device` may differ: it is
    left out)."""
    from fedmrg.data.shards import manifest_hash

    return fingerprint_values(cfg, {"data.manifest_hash": manifest_hash(dataset_root)})


def config_fingerprint(values: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of `fingerprint_values`."""
    text = json.dumps(dict(values), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def fingerprint_diff(saved: Mapping[str, Any], current: Mapping[str, Any]
                     ) -> dict[str, tuple[Any, Any]]:
    """{key: (checkpoint's value, current value)} for every key that differs or is missing
    on one side (shown as "<absent>")."""
    absent = "<absent>"
    return {k: (saved.get(k, absent), current.get(k, absent))
            for k in sorted(set(saved) | set(current)) if saved.get(k, absent) != current.get(
                k, absent)}


def client_bookkeeping(history: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per client, from a round history (`RoundSummary.to_dict()` rows): rounds aggregated,
    the last one, rounds rejected and the last rejection's reason."""
    out: dict[str, dict[str, Any]] = {}
    for row in history:
        for center in row["participants"]:
            entry = out.setdefault(center, {"rounds": 0, "last_round": None, "rejected": 0,
                                            "last_rejection": None})
            entry["rounds"] += 1
            entry["last_round"] = row["round_id"]
        for center, reason in row["rejected"].items():
            entry = out.setdefault(center, {"rounds": 0, "last_round": None, "rejected": 0,
                                            "last_rejection": None})
            entry["rejected"] += 1
            entry["last_rejection"] = f"round {row['round_id']}: {reason}"
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------- writing


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_state(state: Any, path: str | Path) -> None:
    """`torch.save(state, path)`; a write that fails on a nearly full disk is an `OSError`
    ENOSPC naming `path` (torch reports it as `[enforce fail at inline_container.cc:...]
    unexpected pos ...`, without a file or an errno: `fedmrg.exit_codes`)."""
    from fedmrg.exit_codes import is_torch_write_failure
    from fedmrg.output_paths import NEARLY_FULL_BYTES, free_bytes

    try:
        torch.save(state, path)
    except RuntimeError as e:
        if not is_torch_write_failure(e):
            raise
        try:
            nearly_full = free_bytes(path) < NEARLY_FULL_BYTES
        except OSError:
            raise e from None
        if not nearly_full:
            raise
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(directory: str | Path, round_id: int, state: Mapping[str, Any], *,
                     keep: int | None = None, resumable_from: Iterable[int] | None = None,
                     kind: str = "coordinator",
                     fingerprint: Mapping[str, Any] | None = None,
                     meta: Mapping[str, Any] | None = None) -> Path:
    """Write `state` (tensors, numbers, strings, lists, dicts) as the checkpoint of `round_id`
    in `directory`, atomically (module docstring). Then keep the newest `keep` rounds (the
    coordinator), or with `resumable_from` instead the rounds a resume from any of those
    coordinator rounds needs (a client: `client_rounds_to_keep`). `fingerprint` is
    `fingerprint_values(...)`; `meta` is stored in the manifest as is (JSON). Returns the
    round folder."""
    if isinstance(round_id, bool) or not isinstance(round_id, int) or round_id < 0:
        raise ValueError(f"checkpoint round id must be an integer >= 0, got {round_id!r}")
    if (keep is None) == (resumable_from is None):
        raise ValueError("write_checkpoint needs one of keep and resumable_from")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ValueError(f"checkpoints to keep must be an integer >= 1, got {keep!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = round_dir_name(round_id)
    tmp = directory / f"{TEMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        state_path = tmp / STATE_FILE
        save_state(dict(state), state_path)
        _fsync_file(state_path)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind,
            "round_id": round_id, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": {STATE_FILE: {"sha256": _sha256(state_path),
                                   "bytes": state_path.stat().st_size}},
            "fingerprint": config_fingerprint(fingerprint) if fingerprint is not None else None,
            "fingerprint_values": dict(fingerprint) if fingerprint is not None else None,
            "meta": dict(meta or {}),
        }
        manifest_path = tmp / MANIFEST_FILE
        manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True, default=str))
        _fsync_file(manifest_path)
        _fsync_dir(tmp)
        target = directory / name
        old = None
        if target.exists():  # a re-run round: move the old folder aside, then replace it
            old = directory / f"{OLD_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
        os.rename(tmp, target)
        _fsync_dir(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    prune_checkpoints(directory, keep, written=round_id, resumable_from=resumable_from)
    return target


def resumable_rounds(round_id: int, keep: int) -> list[int]:
    """The rounds the coordinator may resume from while round `round_id` runs, and so
    until it finishes round `round_id` (module docstring, "Client retention"): it finished
    round `round_id - 1` and keeps the last `keep` (`tracking.checkpoint_keep`); round 0 is
    the start, which needs no checkpoint."""
    return list(range(max(1, round_id - keep), round_id))


def client_rounds_to_keep(rounds: Iterable[int], resumable_from: Iterable[int]) -> set[int]:
    """Of a client's checkpoint `rounds`, those a resume can need: the newest, and for each
    coordinator round in `resumable_from` the newest at or before it (module docstring,
    "Client retention"). A resumable round with no client round at or before it needs none:
    the client goes back to its state as built."""
    rounds = sorted(set(rounds))
    if not rounds:
        return set()
    keep = {rounds[-1]}
    for resumed in resumable_from:
        before = [r for r in rounds if r <= resumed]
        if before:
            keep.add(before[-1])
    return keep


def prune_checkpoints(directory: str | Path, keep: int | None = None,
                      written: int | None = None, *,
                      resumable_from: Iterable[int] | None = None) -> list[Path]:
    """Remove temporary and replaced folders left by crashed writes, rounds above `written`
    (a timeline abandoned by a resume), and all but the newest `keep` rounds, or with
    `resumable_from` all but `client_rounds_to_keep(rounds, resumable_from)`. Returns what
    was removed."""
    directory = Path(directory)
    removed = []
    for path in directory.iterdir() if directory.is_dir() else ():
        if path.is_dir() and path.name.startswith((TEMP_PREFIX, OLD_PREFIX)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    rounds = list_checkpoints(directory)
    if written is not None:
        for round_id, path in rounds:
            if round_id > written:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        rounds = [(r, p) for r, p in rounds if r <= written]
    if resumable_from is not None:
        needed = client_rounds_to_keep((r for r, _ in rounds), resumable_from)
        dropped = [path for r, path in rounds if r not in needed]
    elif keep is not None:
        dropped = [path for _, path in rounds[:-keep]]
    else:
        dropped = []
    for path in dropped:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def prune_client_checkpoints(run_dir: str | Path) -> dict[str, list[int]]:
    """At the end of a run (its writers stopped): drop each client checkpoint in
    `<run dir>/centers/*/checkpoints` that no kept coordinator checkpoint can need (module
    docstring, "Client retention"; the clients' folders this node sees, e.g. on shared
    storage). Returns {center: rounds removed}."""
    run_dir = Path(run_dir)
    coordinator_rounds = [r for r, _ in list_checkpoints(run_checkpoint_dir(run_dir))]
    removed: dict[str, list[int]] = {}
    centers = run_dir / CENTERS
    for center in sorted(centers.iterdir()) if centers.is_dir() else ():
        folder = center / CHECKPOINTS
        before = {r for r, _ in list_checkpoints(folder)}
        if not before:
            continue
        prune_checkpoints(folder, resumable_from=coordinator_rounds)
        gone = sorted(before - {r for r, _ in list_checkpoints(folder)})
        if gone:
            removed[center.name] = gone
    return removed


# --------------------------------------------------------------------------- reading


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """(round, folder) of every `round-NNNNNN` folder, oldest first; temporary folders and
    anything else are ignored. An absent directory has none."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = ROUND_DIR.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


@dataclass
class Checkpoint:
    """A verified checkpoint folder."""

    path: Path
    round_id: int
    manifest: dict[str, Any]
    skipped: list[str] = field(default_factory=list)  # newer folders skipped (fallback), why

    @property
    def meta(self) -> dict[str, Any]:
        return self.manifest.get("meta") or {}

    def load(self, fingerprint: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The state, verified again (the folder may have changed since it was listed)."""
        return load_checkpoint(self.path, fingerprint)[0]


def verify_checkpoint(path: str | Path, fingerprint: Mapping[str, Any] | None = None
                      ) -> dict[str, Any]:
    """The manifest of a valid checkpoint folder (module docstring), else CheckpointError."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not path.is_dir():
        raise CheckpointError(path, "no such checkpoint folder")
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(manifest_path, "missing: the checkpoint is incomplete") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(manifest_path, f"unreadable ({e}): the checkpoint is "
                                             f"corrupt") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(manifest_path, f"not a {FORMAT} manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(manifest_path, f"incompatible: format version {version!r}, this "
                                             f"fedmrg reads version {FORMAT_VERSION}")
    match = ROUND_DIR.match(path.name)
    if match and int(match.group(1)) != manifest.get("round_id"):
        raise CheckpointError(manifest_path, f"corrupt: round {manifest.get('round_id')!r} in "
                                             f"a folder named {path.name}")
    files = manifest.get("files")
    if not isinstance(files, dict) or STATE_FILE not in files:
        raise CheckpointError(manifest_path, f"corrupt: lists no {STATE_FILE}")
    for name, info in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(file, "missing: the checkpoint is incomplete")
        size = file.stat().st_size
        if size != info.get("bytes"):
            raise CheckpointError(file, f"corrupt: {size} bytes, the manifest says "
                                        f"{info.get('bytes')}")
        digest = _sha256(file)
        if digest != info.get("sha256"):
            raise CheckpointError(file, f"corrupt: sha256 {digest[:12]}..., the manifest says "
                                        f"{str(info.get('sha256'))[:12]}...")
    if fingerprint is not None:
        saved = manifest.get("fingerprint_values")
        if not isinstance(saved, dict):
            raise CheckpointError(manifest_path, "incompatible: the checkpoint has no config "
                                                 "fingerprint")
        current = json.loads(json.dumps(dict(fingerprint), sort_keys=True, default=str))
        diff = fingerprint_diff(saved, current)
        if diff or manifest.get("fingerprint") != config_fingerprint(current):
            shown = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in
                              list(diff.items())[:8])
            more = f" (and {len(diff) - 8} more)" if len(diff) > 8 else ""
            raise CheckpointError(manifest_path, f"incompatible: the config differs from the "
                                                 f"checkpoint's in {shown or 'its hash'}{more}")
    return manifest


def load_checkpoint(path: str | Path, fingerprint: Mapping[str, Any] | None = None
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, manifest) of a valid checkpoint folder; CheckpointError otherwise."""
    path = Path(path)
    manifest = verify_checkpoint(path, fingerprint)
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise CheckpointError(path / STATE_FILE, f"cannot be loaded: {type(e).__name__}: "
                                                 f"{e}") from None
    return state, manifest


def latest_checkpoint(directory: str | Path, *, fingerprint: Mapping[str, Any] | None = None,
                      max_round: int | None = None, fallback: bool = False
                      ) -> Checkpoint | None:
    """The newest valid checkpoint in `directory` (at or below `max_round` when given); None
    when there is none. The newest folder being corrupt or incompatible raises CheckpointError,
    or with `fallback=True` is skipped with a warning (recorded in `Checkpoint.skipped`) for
    the previous good one; when no folder is good, the newest one's error is raised."""
    skipped: list[str] = []
    first_error: CheckpointError | None = None
    for round_id, path in reversed(list_checkpoints(directory)):
        if max_round is not None and round_id > max_round:
            continue
        try:
            manifest = verify_checkpoint(path, fingerprint)
        except CheckpointError as e:
            if not fallback:
                raise
            first_error = first_error or e
            skipped.append(str(e))
            log.warning("checkpoint skipped: %s", e)
            continue
        if skipped:
            log.warning("using the previous good checkpoint %s", path)
        return Checkpoint(path, round_id, manifest, skipped)
    if first_error is not None:
        raise CheckpointError(first_error.path, f"{first_error.reason}; and no older "
                                                f"checkpoint in {directory} is valid")
    return None

