"""The `fedmrg` command's exit codes, and the one line each kind of failure is reported as.

The CLI (`fedmrg.cli`) prints `error: <line>` and exits with the code `classify` gives; an
error it does not know is a bug and keeps its traceback (exit 1). docs/operations.md, "Exit
codes", has the table.

A full disk rarely says so: an `OSError` ENOSPC names the file; torch's writer reports it as
`[enforce fail at inline_container.cc:...] unexpected pos ...` or `PytorchStreamWriter failed
writing file ...` (`fedmrg.fl.checkpoint.save_state` turns that into an ENOSPC naming the file
when the disk there is nearly full); and a client's failure arrives as text inside a
`ClientFailure` or a failed round, `... [Errno 28] No space left on device: '<path>'`. Each
becomes `disk full: <path> (N MiB free)`.
"""

from __future__ import annotations

import errno
import os
import re
from enum import IntEnum
from pathlib import Path

from fedmrg.output_paths import NEARLY_FULL_BYTES, disk_full_line, free_bytes


class ExitCode(IntEnum):
    OK = 0
    INTERNAL = 1  # a bug: the traceback is printed
    USAGE = 2  # a bad option, config key or value, path or run name; found before the run
    DATA = 3  # the dataset, its manifest or a shard (also found by a client)
    CHECKPOINT = 4  # a checkpoint corrupt, incomplete or of another config (resume)
    RUN_FAILED = 5  # clients failed, a round could not close, the cluster made no progress
    DISK_FULL = 6  # no space left (ENOSPC, disk quota) where the run writes
    FILESYSTEM = 7  # a path the run writes or reads became unusable (read-only, permission)
    # a signal stops a run with 128 + its number: 130 (SIGINT), 143 (SIGTERM)


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_ERRNO_IN_TEXT = re.compile(r"\[Errno (\d+)\] ([^:\n'\"]+)(?:: '([^'\n]+)')?")
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "database or disk is full")
TORCH_WRITE_FAILED = ("PytorchStreamWriter failed", "unexpected pos")


def is_torch_write_failure(error: BaseException | str) -> bool:
    """torch's writer failed (the message names no file and no errno)."""
    text = str(error)
    return any(marker in text for marker in TORCH_WRITE_FAILED)


def _errno_in_text(text: str) -> tuple[int, str, str | None] | None:
    """(errno, strerror, path or None) of the first `[Errno N] ...` in an error's text."""
    match = _ERRNO_IN_TEXT.search(text)
    if match is None:
        return None
    return int(match.group(1)), match.group(2).strip(), match.group(3)


def _disk_full(error: BaseException, where: str | Path | None) -> str | None:
    """The one line for an error that is a full disk, else None."""
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
        return disk_full_line(error.filename or where or os.getcwd())
    text = str(error)
    found = _errno_in_text(text)
    if found is not None and found[0] in DISK_FULL_ERRNOS:
        return disk_full_line(found[2] or where or os.getcwd())
    if any(marker in text for marker in _DISK_FULL_TEXT):
        return disk_full_line(where or os.getcwd())
    if where is not None and is_torch_write_failure(text):
        try:
            if free_bytes(where) < NEARLY_FULL_BYTES:
                return disk_full_line(where)
        except OSError:
            return None
    return None


def _filesystem(error: BaseException) -> str | None:
    """The one line for a path that cannot be used (read-only file system, permission, not a
    folder, missing): an `OSError` (not a network one), or its text inside a client's
    failure."""
    if isinstance(error, OSError) and not isinstance(error, (ConnectionError, TimeoutError)):
        reason = error.strerror or type(error).__name__
        return f"{error.filename}: {reason}" if error.filename else f"{reason}: {error}"
    text = str(error)
    found = _errno_in_text(text)
    if found is not None and found[0] in (errno.EROFS, errno.EACCES, errno.EPERM):
        _, reason, path = found
        where = text.split(": ", 1)[0]  # who reported it: "client 'a'", "round 2"
        return f"{path or 'a file the run writes'}: {reason} ({where})"
    return None


def classify(error: BaseException, where: str | Path | None = None
             ) -> tuple[ExitCode, str] | None:
    """(exit code, one line) for an error the user can act on; None for anything else (a bug:
    the caller re-raises it). `where`: the folder the run writes to (`tracking.storage_path`),
    for a full disk whose error names no file."""
    from fedmrg.config import ConfigError
    from fedmrg.data.shards import DatasetError
    from fedmrg.experiment import ExperimentError
    from fedmrg.fl.checkpoint import CheckpointError
    from fedmrg.fl.ddp import DistributedRoundError
    from fedmrg.fl.failure import ClientFailure
    from fedmrg.fl.strategies import FederationError
    from fedmrg.output_paths import DiskSpaceError
    from fedmrg.privacy import PrivacyError
    from fedmrg.ray_cluster import NoProgressError
    from fedmrg.runs import RunsError
    from fedmrg.serving.predictor import ServingError
    from fedmrg.tracking import TrackingError

    if isinstance(error, DiskSpaceError):  # found before the run: the message says it all
        return ExitCode.DISK_FULL, str(error)
    disk = _disk_full(error, where)
    if disk is not None:
        return ExitCode.DISK_FULL, disk
    if isinstance(error, OSError):
        filesystem = _filesystem(error)
        return (ExitCode.FILESYSTEM, filesystem) if filesystem is not None else None
    if isinstance(error, DatasetError):
        return ExitCode.DATA, str(error)
    if isinstance(error, CheckpointError):
        return ExitCode.CHECKPOINT, str(error)
    if isinstance(error, (ClientFailure, FederationError, DistributedRoundError,
                          NoProgressError)):
        filesystem = _filesystem(error)  # a client's read-only or forbidden folder
        if filesystem is not None:
            return ExitCode.FILESYSTEM, filesystem
        return ExitCode.RUN_FAILED, str(error)
    if isinstance(error, (ConfigError, ExperimentError, RunsError, ServingError, TrackingError,
                          PrivacyError)):
        return ExitCode.USAGE, str(error)
    return None
