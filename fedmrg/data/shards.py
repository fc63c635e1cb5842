"""The on-disk layout: `<root>/center=<id>/part-*.parquet` plus `<root>/manifest.json`.

Writers (phantom generator, importers) hand `Study` records to `write_dataset`; readers find a
center's files through `read_manifest`/`center_files`; `validate_dataset` re-checks a dataset
against its manifest (schema, counts, hashes). Nothing here knows about Ray.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fedmrg.data.schema import (
    ARROW_SCHEMA,
    LABEL_NAMES,
    NUM_OBSERVATIONS,
    OBSERVATIONS,
    POSITIVE,
    SCHEMA_VERSION,
    SPLITS,
)

MANIFEST = "manifest.json"
ROWS_PER_FILE = 256  # several files per center so Ray Data can read in parallel


class DatasetError(ValueError):
    """A dataset, file or record is invalid; the message names the file/row/key."""


@dataclass
class Study:
    """One row of the record schema (`fedmrg.data.schema`, docs/data.md)."""

    study_id: str
    center: str
    split: str
    images: list[bytes]
    view: str
    report: str
    labels: list[int]

    def check(self, where: str) -> None:
        """Raise DatasetError naming `where` (file/row) if the record breaks the schema."""
        if not self.study_id:
            raise DatasetError(f"{where}: empty study_id")
        if not self.center or "/" in self.center or "=" in self.center:
            raise DatasetError(f"{where}: invalid center {self.center!r}")
        if self.split not in SPLITS:
            raise DatasetError(f"{where}: split {self.split!r} is not one of {list(SPLITS)}")
        if not self.images:
            raise DatasetError(f"{where}: study {self.study_id!r} has no images")
        if not self.report or not self.report.strip():
            raise DatasetError(f"{where}: study {self.study_id!r} has an empty report")
        if len(self.labels) != NUM_OBSERVATIONS:
            raise DatasetError(f"{where}: study {self.study_id!r} has {len(self.labels)} labels, "
                               f"expected {NUM_OBSERVATIONS}")
        bad = [v for v in self.labels if v not in range(len(LABEL_NAMES))]
        if bad:
            raise DatasetError(f"{where}: study {self.study_id!r} has label code {bad[0]!r}; "
                               f"codes are 0..3 ({', '.join(LABEL_NAMES)})")


SKIPPED = "skipped"  # prefix of the skip metrics (`SkipLog.metrics`)


@dataclass
class SkipLog:
    """Rows skipped under `on_error=skip`: counted by reason, first examples kept."""

    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    max_examples: int = 20

    def add(self, reason: str, message: str) -> None:
        self.counts[reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(message)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "by_reason": dict(sorted(self.counts.items())),
                "examples": self.examples}

    def metrics(self, reasons: Iterable[str] = ()) -> dict[str, float]:
        """The counts as metrics: `skipped_rows` and `skipped_<reason>` for every reason
        counted or listed in `reasons` (zeros included, so a run's metrics show the policy at
        work, or that it had nothing to do)."""
        out = {f"{SKIPPED}_rows": float(self.total)}
        for reason in sorted({*reasons, *self.counts}):
            out[f"{SKIPPED}_{reason}"] = float(self.counts.get(reason, 0))
        return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _table(rows: list[Study]) -> pa.Table:
    return pa.table(
        {
            "study_id": [r.study_id for r in rows],
            "center": [r.center for r in rows],
            "split": [r.split for r in rows],
            "images": [list(r.images) for r in rows],
            "view": [r.view for r in rows],
            "report": [r.report for r in rows],
            "labels": [list(r.labels) for r in rows],
        },
        schema=ARROW_SCHEMA,
    )


def write_dataset(
    root: str | Path,
    studies: Iterable[Study],
    source: dict[str, Any],
    skipped: SkipLog | None = None,
    rows_per_file: int = ROWS_PER_FILE,
) -> dict[str, Any]:
    """Write studies grouped by center, in the order given, and the manifest; return it.

    Refuses a non-empty existing root (never mixes two datasets) and duplicate study ids.
    """
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise DatasetError(f"{root}: output folder exists and is not empty")
    by_center: dict[str, list[Study]] = defaultdict(list)
    seen: dict[str, str] = {}
    for i, s in enumerate(studies):
        s.check(f"record {i}")
        if s.study_id in seen:
            raise DatasetError(f"record {i}: duplicate study_id {s.study_id!r} "
                               f"(first seen in center {seen[s.study_id]!r})")
        seen[s.study_id] = s.center
        by_center[s.center].append(s)
    if not by_center:
        raise DatasetError(f"{root}: no studies to write")
    root.mkdir(parents=True, exist_ok=True)
    centers: dict[str, Any] = {}
    for center in sorted(by_center):
        rows = by_center[center]
        folder = root / f"center={center}"
        folder.mkdir()
        files = []
        for part, start in enumerate(range(0, len(rows), rows_per_file)):
            chunk = rows[start:start + rows_per_file]
            path = folder / f"part-{part:05d}.parquet"
            pq.write_table(_table(chunk), path, compression="zstd")
            files.append({"path": str(path.relative_to(root)), "rows": len(chunk),
                          "sha256": sha256_file(path)})
        centers[center] = {
            "rows": {sp: sum(r.split == sp for r in rows) for sp in SPLITS},
            "files": files,
            "label_positive_rate": _positive_rates(rows),
        }
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "observations": list(OBSERVATIONS),
        "source": source,
        "centers": centers,
        "skipped": (skipped or SkipLog()).to_dict(),
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def _positive_rates(rows: list[Study]) -> dict[str, float]:
    labels = np.array([r.labels for r in rows], dtype=np.int8)
    rates = (labels == POSITIVE).mean(axis=0)
    return {name: round(float(x), 4) for name, x in zip(OBSERVATIONS, rates, strict=True)}


def read_manifest(root: str | Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not path.exists():
        raise DatasetError(f"{path}: no manifest; is {root} a fedmrg dataset? "
                           f"(create one with `fedmrg data phantom` or `fedmrg data import`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(manifest, dict):
        raise DatasetError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DatasetError(f"{path}: schema_version {version!r}, this fedmrg reads "
                           f"{SCHEMA_VERSION}")
    _check_manifest_structure(path, manifest)
    return manifest


def _check_manifest_structure(path: Path, manifest: dict[str, Any]) -> None:
    """Fail with the manifest's name rather than a KeyError deep in a reader."""
    centers = manifest.get("centers")
    if not isinstance(centers, dict):
        raise DatasetError(f"{path}: no 'centers' object")
    for center, info in centers.items():
        rows = info.get("rows") if isinstance(info, dict) else None
        if not isinstance(rows, dict) or any(not isinstance(rows.get(sp), int) for sp in SPLITS):
            raise DatasetError(f"{path}: center {center!r} has no 'rows' counts for {SPLITS}")
        files = info.get("files")
        if not isinstance(files, list) or not all(
                isinstance(f, dict) and {"path", "rows", "sha256"} <= f.keys() for f in files):
            raise DatasetError(f"{path}: center {center!r} has no 'files' list of "
                               "{path, rows, sha256}")


def manifest_hash(root: str | Path) -> str:
    """Identifies a dataset's exact contents (the manifest holds every file's sha256)."""
    return sha256_file(Path(root) / MANIFEST)


def center_files(root: str | Path, center: str, manifest: dict[str, Any] | None = None
                 ) -> list[str]:
    """Absolute paths of one center's parquet files; error naming the center if unknown."""
    manifest = manifest or read_manifest(root)
    centers = manifest["centers"]
    if center not in centers:
        raise DatasetError(f"{root}: unknown center {center!r}; the manifest has "
                           f"{sorted(centers)}")
    return [str(Path(root) / f["path"]) for f in centers[center]["files"]]


def read_center_table(root: str | Path, center: str, split: str | None = None) -> pa.Table:
    """One center's rows in memory (for small data, tests and the plain-PyTorch baseline)."""
    tables = [pq.read_table(p) for p in center_files(root, center)]
    table = pa.concat_tables(tables)
    if split is not None:
        table = table.filter(pc.equal(table["split"], split))
    return table


def shard_file_problems(root: str | Path, entry: dict[str, Any]) -> tuple[list[str], bool]:
    """The cheap checks of one manifest file entry ({path, rows, sha256}): it exists, its sha256
    and its row count are the manifest's, its schema is the record schema (parquet metadata
    only, no row is read). Returns (problems naming the file, whether its rows can be read
    with the record schema)."""
    path = Path(root) / entry["path"]
    if not path.exists():
        return [f"{path}: listed in the manifest but missing"], False
    problems = []
    if sha256_file(path) != entry["sha256"]:
        problems.append(f"{path}: sha256 differs from the manifest (file changed)")
    try:
        metadata = pq.read_metadata(path)
        schema = metadata.schema.to_arrow_schema()
    except Exception as e:  # noqa: BLE001 - any read failure is a finding to report
        return [*problems, f"{path}: unreadable parquet: {' '.join(str(e).split())}"], False
    if not schema.equals(ARROW_SCHEMA, check_metadata=False):
        return [*problems, f"{path}: schema differs from the record schema: {schema} != "
                           f"{ARROW_SCHEMA}"], False
    if metadata.num_rows != entry["rows"]:
        problems.append(f"{path}: {metadata.num_rows} rows, manifest says {entry['rows']}")
    return problems, True


VERIFIED_CACHE = ".fedmrg-verified.json"  # in <root>/center=<id>/ (`verify_center_files`)


def verify_center_files(root: str | Path, center: str,
                        manifest: dict[str, Any] | None = None) -> int:
    """Before a client trains on `center`: every file the manifest lists for it passes
    `shard_file_problems` (sha256, rows, schema), else a `DatasetError` naming each bad file.
    Returns how many files were hashed (0: every one was in the cache).

    The result is cached in `<root>/center=<id>/.fedmrg-verified.json`, next to the files it
    describes, so that every later run and resume on that data (any run folder) skips the
    hashing: a file verified before with the same path, size, mtime and manifest sha256 is not
    read again. Each center's client writes only its own folder's cache (atomically); a
    read-only dataset is verified every time instead (the cache is only a speed-up)."""
    root = Path(root)
    manifest = manifest or read_manifest(root)
    center_files(root, center, manifest)  # an unknown center is named
    entries = manifest["centers"][center]["files"]
    folders = {(root / f["path"]).parent for f in entries}
    cache_path = (folders.pop() if len(folders) == 1 else root / f"center={center}") / (
        VERIFIED_CACHE)
    try:
        cached = json.loads(cache_path.read_text())
        if not isinstance(cached, dict):
            cached = {}
    except (OSError, ValueError):
        cached = {}
    verified, problems, hashed = {}, [], 0
    for entry in entries:
        path = root / entry["path"]
        try:
            stat = path.stat()
            key = [stat.st_size, stat.st_mtime_ns, entry["sha256"], entry["rows"]]
        except OSError:
            key = None
        if key is not None and cached.get(entry["path"]) == key:
            verified[entry["path"]] = key
            continue
        hashed += 1
        found, _ = shard_file_problems(root, entry)
        if found:
            problems += found
        elif key is not None:
            verified[entry["path"]] = key
    if problems:
        raise DatasetError(f"center {center!r}: its files differ from {root / MANIFEST} "
                           f"(`fedmrg data validate {root}` checks every center): "
                           + "; ".join(problems))
    if hashed and verified != cached:
        tmp = cache_path.with_name(f"{VERIFIED_CACHE}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(verified, sort_keys=True))
            os.replace(tmp, cache_path)
        except OSError:  # a read-only dataset: verified again next time
            with contextlib.suppress(OSError):
                tmp.unlink()
    return hashed


def validate_dataset(root: str | Path) -> dict[str, Any]:
    """Check every file against the manifest; return per-center counts and label frequencies.

    Raises DatasetError listing every problem found (not only the first).
    """
    root = Path(root)
    manifest = read_manifest(root)
    problems: list[str] = []
    summary: dict[str, Any] = {}
    for center, info in sorted(manifest["centers"].items()):
        counts: Counter = Counter()
        label_counts = np.zeros((NUM_OBSERVATIONS, len(LABEL_NAMES)), dtype=np.int64)
        for f in info["files"]:
            path = root / f["path"]
            found, usable = shard_file_problems(root, f)
            problems += found
            if not usable:
                continue
            try:
                table = pq.read_table(path)
            except Exception as e:  # noqa: BLE001 - any read failure is a finding to report
                problems.append(f"{path}: unreadable parquet: {e}")
                continue
            bad_center = pc.sum(pc.not_equal(table["center"], center)).as_py()
            if bad_center:
                problems.append(f"{path}: {bad_center} rows belong to another center")
            counts.update(table["split"].to_pylist())
            # a wrong-length list would make the label matrix ragged: report it, do not crash
            bad_length = pc.sum(pc.not_equal(pc.list_value_length(table["labels"]),
                                             NUM_OBSERVATIONS)).as_py()
            if bad_length:
                problems.append(f"{path}: {bad_length} rows with a labels list of length != "
                                f"{NUM_OBSERVATIONS}")
                continue
            labels = np.array(table["labels"].to_pylist(), dtype=np.int64).reshape(
                -1, NUM_OBSERVATIONS)
            if labels.size and (labels.min() < 0 or labels.max() >= len(LABEL_NAMES)):
                problems.append(f"{path}: label codes outside 0..{len(LABEL_NAMES) - 1} "
                                f"({', '.join(LABEL_NAMES)})")
            for code in range(len(LABEL_NAMES)):
                label_counts[:, code] += (labels == code).sum(axis=0)
        for sp in SPLITS:
            if counts[sp] != info["rows"][sp]:
                problems.append(f"{root / MANIFEST}: center {center!r}: {counts[sp]} {sp} "
                                f"rows, manifest says {info['rows'][sp]}")
        summary[center] = {
            "rows": {sp: counts[sp] for sp in SPLITS},
            "positive": {o: int(label_counts[i, POSITIVE]) for i, o in enumerate(OBSERVATIONS)},
        }
    if problems:
        raise DatasetError(f"{root}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return {"centers": summary, "skipped": manifest.get("skipped", {})}
