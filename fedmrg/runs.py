"""The runs under a storage folder: what each is, how far it got, what it costs on disk.

    runs = list_runs("runs")                       # [RunInfo], newest first
    remove_runs("runs", ["old-run"])               # checked first, then deleted

A run folder is `<tracking.storage_path>/<run name>/` as `fedmrg run` leaves it: `config.yaml`
(written when the run starts), `checkpoints/round-NNNNNN/` (the coordinator's, every round),
`centers/<center>/checkpoints/` (each client's own state), and once it finished `summary.json`,
`models/<center>/`, `generic_adapter/` and `centers/<center>/specialized_adapter/`. Its status:

- `finished`: `summary.json` covers the rounds its config asks for (`fedmrg evaluate` reads it;
  more `federation.rounds` on a resume extend it);
- `interrupted`: it started but did not finish; `resume_round` is the round its newest valid
  coordinator checkpoint holds (`fedmrg run --resume NAME` continues after it), 0 when it
  stopped before finishing a round (a resume starts it over); when the newest checkpoint is
  corrupt, `note` says which round `--checkpoint-fallback` resumes from;
- `empty`: nothing but a config (or nothing at all): never got to run.

Pure functions over the folder: no Ray, no MLflow (a removed run's MLflow run and artifacts stay
in the tracking store).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from fedmrg.experiment import RUN_CONFIG, RUN_SUMMARY
from fedmrg.fl.checkpoint import (
    CENTERS,
    CheckpointError,
    list_checkpoints,
    run_checkpoint_dir,
    verify_checkpoint,
)

RUN_MARKERS = (RUN_CONFIG, RUN_SUMMARY, "checkpoints")  # any one makes a folder a run's

FINISHED, INTERRUPTED, EMPTY = "finished", "interrupted", "empty"


class RunsError(ValueError):
    """A run name or cleanup request that cannot be honoured; names the run and why."""


@dataclass
class RunInfo:
    """One run folder, as `fedmrg runs` shows it."""

    name: str
    path: str
    strategy: str  # "?" when its config is unreadable
    status: str  # FINISHED, INTERRUPTED or EMPTY
    rounds_done: int  # finished: the summary's rounds; interrupted: resume_round
    rounds_planned: int | None  # the config's federation.rounds
    resume_round: int | None  # interrupted: the round a resume continues after
    bytes: int  # every file under the folder
    checkpoint_bytes: int  # of which coordinator and client checkpoints
    modified: float  # newest mtime under the folder (epoch seconds)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "modified_utc": _utc(self.modified)}

    @property
    def status_text(self) -> str:
        if self.status == INTERRUPTED:
            if not self.resume_round:
                return "interrupted in round 1 (starts over)"
            return f"interrupted, resumable at round {self.resume_round}"
        return self.status


def is_run_dir(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and any((path / marker).exists() for marker in RUN_MARKERS)


def folder_usage(path: str | Path) -> tuple[int, float]:
    """(bytes of every regular file under `path`, newest mtime of it or anything in it);
    links are counted as themselves, never followed."""
    total, newest = 0, Path(path).lstat().st_mtime
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            try:
                st = os.lstat(os.path.join(root, name))
            except FileNotFoundError:  # removed while we look (a run still writing)
                continue
            newest = max(newest, st.st_mtime)
            if name in files and not os.path.islink(os.path.join(root, name)):
                total += st.st_size
    return total, newest


def run_info(path: str | Path) -> RunInfo:
    """The `RunInfo` of one run folder (module docstring)."""
    path = Path(path)
    size, modified = folder_usage(path)
    checkpoint_bytes = folder_usage(run_checkpoint_dir(path))[0] if run_checkpoint_dir(
        path).is_dir() else 0
    for center_checkpoints in sorted((path / CENTERS).glob("*/checkpoints")):
        checkpoint_bytes += folder_usage(center_checkpoints)[0]
    strategy, planned, note = "?", None, ""
    try:
        cfg = yaml.safe_load((path / RUN_CONFIG).read_text()) or {}
        strategy = str(cfg["federation"]["strategy"])
        planned = int(cfg["federation"]["rounds"])
    except FileNotFoundError:
        note = f"no {RUN_CONFIG}"
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as e:
        note = f"{RUN_CONFIG} unreadable ({type(e).__name__})"
    done = _summary_rounds(path / RUN_SUMMARY)
    if done is not None and (planned is None or done >= planned):
        return RunInfo(path.name, str(path), strategy, FINISHED, done, planned, None, size,
                       checkpoint_bytes, modified, note)
    checkpoints = list_checkpoints(run_checkpoint_dir(path))
    if not checkpoints and not (path / CENTERS).is_dir() and done is None:
        return RunInfo(path.name, str(path), strategy, EMPTY, 0, planned, None, size,
                       checkpoint_bytes, modified, note)
    resume_round, bad = 0, []
    for round_id, folder in reversed(checkpoints):  # the newest valid one, as a resume does
        try:
            verify_checkpoint(folder)
        except CheckpointError as e:
            bad.append(f"round {round_id}: {e.reason}")
            continue
        resume_round = round_id
        break
    if bad and resume_round:
        note = (f"newest checkpoint bad ({bad[0]}): resumable at round {resume_round} only "
                f"with --checkpoint-fallback")
    elif bad:
        note = f"no valid checkpoint ({bad[0]}): a resume cannot continue it"
    return RunInfo(path.name, str(path), strategy, INTERRUPTED, resume_round, planned,
                   resume_round, size, checkpoint_bytes, modified, note)


def list_runs(storage: str | Path) -> list[RunInfo]:
    """Every run folder directly under `storage`, most recently modified first; [] when the
    folder does not exist."""
    storage = Path(storage).expanduser()
    if not storage.is_dir():
        return []
    runs = [run_info(p) for p in storage.iterdir() if not p.is_symlink() and is_run_dir(p)]
    return sorted(runs, key=lambda r: (-r.modified, r.name))


def select_runs(runs: Sequence[RunInfo], *, names: Iterable[str] = (),
                older_than_days: float | None = None, keep_last: int | None = None,
                now: float | None = None) -> list[RunInfo]:
    """The runs a cleanup removes: those named, plus with `older_than_days` and/or
    `keep_last` the runs last modified more than that many days ago and/or not among the
    `keep_last` most recently modified (both given: runs matching both). Names not among
    `runs` are a `RunsError`."""
    by_name = {r.name: r for r in runs}
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in by_name]
    if unknown:
        known = ", ".join(sorted(by_name)) or "none"
        raise RunsError(f"no run {unknown[0]!r} here (runs: {known})")
    chosen = {n: by_name[n] for n in names}
    if older_than_days is not None or keep_last is not None:
        now = time.time() if now is None else now
        newest_first = sorted(runs, key=lambda r: (-r.modified, r.name))
        for index, run in enumerate(newest_first):
            old = older_than_days is None or now - run.modified > older_than_days * 86400
            beyond = keep_last is None or index >= keep_last
            if old and beyond:
                chosen.setdefault(run.name, run)
    return list(chosen.values())


def check_run_names(storage: str | Path, names: Iterable[str]) -> list[Path]:
    """The folders of runs `names` under `storage`; a `RunsError` for a name that is a path,
    does not exist there, or is not a run folder (module docstring)."""
    storage = Path(storage).expanduser()
    folders = []
    for name in names:
        if not name or name in (".", "..") or "/" in name or os.sep in name:
            raise RunsError(f"{name!r} is not a run name (a folder name under {storage})")
        folder = storage / name
        if folder.is_symlink() or not folder.is_dir():
            raise RunsError(f"no run {name!r} at {storage}")
        if not is_run_dir(folder):
            raise RunsError(f"{folder} is not a fedmrg run folder (no {RUN_CONFIG}, "
                            f"{RUN_SUMMARY} or checkpoints/); not removed")
        folders.append(folder)
    return folders


def remove_runs(storage: str | Path, names: Iterable[str]) -> list[str]:
    """Delete the run folders `names` under `storage`, every name checked first
    (`check_run_names`: nothing is removed when one is wrong). Returns the removed names."""
    folders = check_run_names(storage, list(names))
    for folder in folders:
        shutil.rmtree(folder)
    return [f.name for f in folders]


def runs_table(runs: Sequence[RunInfo]) -> str:
    """A fixed-width table of `runs` with a total line."""
    header = (f"{'name':32s} {'strategy':12s} {'status':38s} {'rounds':>7s} {'size':>9s} "
              f"{'ckpts':>9s}  modified (UTC)")
    lines = [header]
    for r in runs:
        rounds = f"{r.rounds_done}/{r.rounds_planned if r.rounds_planned is not None else '?'}"
        lines.append(f"{r.name:32s} {r.strategy:12s} {r.status_text:38s} {rounds:>7s} "
                     f"{human_size(r.bytes):>9s} {human_size(r.checkpoint_bytes):>9s}  "
                     f"{_utc(r.modified)}")
        if r.note:
            lines.append(f"{'':32s} {r.note}")
    total = sum(r.bytes for r in runs)
    lines.append(f"{len(runs)} run(s), {human_size(total)}")
    return "\n".join(lines)


def runs_json(runs: Sequence[RunInfo]) -> str:
    return json.dumps([r.to_dict() for r in runs], indent=2)


def human_size(n: float) -> str:
    """Decimal units, as `du --si`: 66.1 MB is 66.1e6 bytes."""
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1000
        if n < 1000 or unit == "GB":
            break
    return f"{n:.1f} {unit}"


def _summary_rounds(path: Path) -> int | None:
    """Rounds a finished run's summary.json covers; None when absent or unreadable."""
    try:
        summary = json.loads(path.read_text())
        return max((int(r["round_id"]) for r in summary["rounds"]), default=0)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(seconds))
