"""Every place a run will write, checked before it starts (before Ray, before any training).

A run that trains for an hour and then cannot write its summary loses its result; so
`check_output_paths` looks at each output path first and raises one `ExperimentError` naming
the key or option, the path and why it is unusable:

- `tracking.storage_path` (checkpoints, models, adapters): a folder that exists or can be
  created;
- `tracking.tracking_uri`: a sqlite store's database file (its folder is created by MLflow)
  or a local file store's folder; a tracking server is not checked here;
- `tracking.artifact_location`: the local folder a new experiment's artifacts go to (with a
  local store);
- `data.root` when the phantom benchmark will be generated there (no manifest yet);
- `model.lm_cache` when the builtin base LM is built there;
- extra files the caller will write, e.g. `--summary-json`: not a folder, its folder
  creatable, the file writable.

"Can be created" means: every existing part of the path is a folder, and the deepest existing
folder accepts a new file (probed by creating and removing a temporary file there, so a
read-only file system or missing permission is found even for root, who passes `os.access`).
Nothing else is created.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import unquote, urlparse

from fedmrg.choices import DataSource
from fedmrg.config import ExperimentConfig

PROBE_PREFIX = ".fedmrg-write-check-"


def _reason(error: OSError) -> str:
    return error.strerror or type(error).__name__


def _deepest_existing(path: Path) -> Path:
    """`path` or its nearest ancestor that exists (as anything)."""
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(path.anchor or ".")


# Below this much free space a failed torch write is taken for a full disk (torch's writer
# reports `unexpected pos` without the errno; `fedmrg.fl.checkpoint.save_state`).
NEARLY_FULL_BYTES = 64 * 2**20


def free_bytes(path: str | Path) -> int:
    """Free bytes (for an unprivileged user) on the file system that holds `path` (or would:
    its nearest existing ancestor)."""
    existing = _deepest_existing(Path(path).expanduser().absolute())
    return shutil.disk_usage(existing if existing.is_dir() else existing.parent).free


def disk_full_line(path: str | Path) -> str:
    """`disk full: <path> (N MiB free)`, the free space measured now."""
    try:
        free = f"{free_bytes(path) / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    return f"disk full: {path} ({free})"


def folder_problem(folder: str | Path) -> str | None:
    """Why `folder` cannot be used as an output folder (created if missing, then written
    into), or None when it can."""
    folder = Path(folder)
    existing = _deepest_existing(folder)
    if not existing.is_dir():
        if existing == folder:
            return "it is a file, not a folder"
        return f"{existing} is a file, not a folder"
    try:
        fd, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=existing)
    except OSError as e:
        where = "" if existing == folder else f" (in {existing}, where it would be created)"
        return f"cannot write there{where}: {_reason(e)}"
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return None


def file_problem(path: str | Path) -> str | None:
    """Why a file cannot be written at `path` (its folder created if missing), or None."""
    path = Path(path)
    if path.is_dir():
        return "it is a folder; give a file path"
    if path.exists():
        try:
            with open(path, "ab"):  # appends nothing: the file is left as it is
                pass
        except OSError as e:
            return f"cannot write it: {_reason(e)}"
        return None
    problem = folder_problem(path.parent)
    return f"its folder {path.parent} cannot be used: {problem}" if problem else None


def _local_store(tracking_uri: str) -> tuple[str, Path] | None:
    """("file", db path) for a sqlite store, ("folder", path) for a local file store, None
    for a server, an in-memory database or another database."""
    match = re.match(r"^sqlite:///(.*)$", tracking_uri)
    if match:
        name = match.group(1)
        return None if name in ("", ":memory:") else ("file", Path(name).expanduser())
    if tracking_uri.startswith("file:"):
        return "folder", Path(unquote(urlparse(tracking_uri).path))
    if re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*:", tracking_uri) or not tracking_uri:
        return None
    return "folder", Path(tracking_uri).expanduser()


def output_paths(cfg: ExperimentConfig, extra_files: Mapping[str, str | Path] | None = None
                 ) -> list[tuple[str, str, Path]]:
    """(key or option, "folder" or "file", path) for every place a run of `cfg` will write
    (module docstring). `cfg` should have absolute paths (`fedmrg.experiment.resolve_paths`)."""
    from fedmrg.data.shards import MANIFEST
    from fedmrg.tracking import is_server_uri

    tracking = cfg.tracking
    found = [("tracking.storage_path", "folder", Path(tracking.storage_path).expanduser())]
    store = _local_store(tracking.tracking_uri)
    if store is not None:
        found.append(("tracking.tracking_uri", *store))
    artifact = tracking.artifact_location
    if artifact and not is_server_uri(tracking.tracking_uri):
        if artifact.startswith("file:"):
            found.append(("tracking.artifact_location", "folder",
                          Path(unquote(urlparse(artifact).path))))
        elif not re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*:", artifact):
            found.append(("tracking.artifact_location", "folder", Path(artifact).expanduser()))
    root = Path(cfg.data.root).expanduser()
    if cfg.data.source == DataSource.PHANTOM and not (root / MANIFEST).exists():
        found.append(("data.root", "folder", root))  # the benchmark is generated there
    if cfg.model.lm.startswith("builtin:"):
        found.append(("model.lm_cache", "folder", Path(cfg.model.lm_cache).expanduser()))
    for option, path in (extra_files or {}).items():
        if path is not None:
            found.append((option, "file", Path(path).expanduser().absolute()))
    return found


def check_output_paths(cfg: ExperimentConfig,
                       extra_files: Mapping[str, str | Path | None] | None = None) -> None:
    """Raise `ExperimentError` naming every output path of a run of `cfg` (and of
    `extra_files`: option -> file) that cannot be written, and why; nothing is created."""
    from fedmrg.experiment import ExperimentError

    problems = []
    for key, kind, path in output_paths(cfg, extra_files):
        problem = folder_problem(path) if kind == "folder" else file_problem(path)
        if problem:
            problems.append(f"{key} {path}: {problem}")
    if problems:
        raise ExperimentError("; ".join(problems) + " (checked before the run started; "
                              "nothing was trained)")


# --------------------------------------------------------------------------- free space


class DiskSpaceError(ValueError):
    """Too little free space where the run writes; the message names the path, the free
    space and what the run needs (`fedmrg.exit_codes`: the exit code of a full disk)."""


def checkpoint_bytes(summary: Mapping[str, Mapping[str, int]], clients: int, *,
                     server_moments: int = 0) -> dict[str, int]:
    """What one completed round writes, estimated from the model's parameter groups
    (`fedmrg.model.params.parameter_group_summary`): the coordinator's checkpoint (the global
    shared state and `server_moments` optimizer moments of it) and each client's (its
    trainable tensors and AdamW's two moments of them); and a finished run's saved models
    (each client's model with its frozen part, e.g. the builtin LM). Bytes."""
    shared, private = summary["shared"]["bytes"], summary["private"]["bytes"]
    coordinator = shared * (1 + server_moments)
    client = 3 * (shared + private)
    return {"round": coordinator + clients * client, "coordinator": coordinator,
            "client": client, "models": clients * (shared + private + summary["frozen"]["bytes"])}


def check_free_space(storage_path: str | Path, need: Mapping[str, int], *, keep: int
                     ) -> str | None:
    """Raise `DiskSpaceError` when `storage_path` cannot hold one round's checkpoints
    (`checkpoint_bytes`): the first round would fail. Returns a warning line when it cannot
    hold what the whole run keeps (`keep` coordinator rounds, clients one more, the final
    models), else None."""
    free = free_bytes(storage_path)
    whole = keep * need["coordinator"] + (keep + 1) * (need["round"] - need["coordinator"]) + (
        need["models"])
    mib = 2**20
    if free < need["round"]:
        raise DiskSpaceError(f"disk full: tracking.storage_path {storage_path} has "
                             f"{free / mib:.1f} MiB free; one round's checkpoints of this run "
                             f"need about {need['round'] / mib:.1f} MiB (checked before the run "
                             f"started; nothing was trained)")
    if free < whole:
        return (f"tracking.storage_path {storage_path} has {free / mib:.1f} MiB free; this run "
                f"keeps about {whole / mib:.1f} MiB of checkpoints and models there: it may "
                f"fail with a full disk")
    return None
