"""Importers: real MRG datasets -> the fedmrg layout (one parquet dataset per center).

Formats (`ImportOptions.fmt`):

- `r2gen`: R2Gen's `annotation.json`, `{"train"|"val"|"test": [entry, ...]}`.
  * IU-Xray flavour: one entry per study, `{"id": "CXR2384_IM-0942", "report": ...,
    "image_path": ["CXR2384_IM-0942/0.png", "CXR2384_IM-0942/1.png"]}`; the study id is `id`.
    The first image is the frontal view.
  * MIMIC-CXR flavour: one entry per IMAGE (dicom): `{"id": <dicom id>, "study_id": 50414267,
    "subject_id": 10000032, "report": ..., "image_path": ["p10/p10000032/s50414267/<dicom>.jpg"]}`.
    Entries that share a `study_id` are grouped into one study (images in file order); they must
    agree on report, split, labels and center.
  * PromptMRG's annotation files add `labels` per entry: CheXbert codes 0 blank, 1 positive,
    2 negative, 3 uncertain. Their MIMIC file stores 18 values (the 14 CheXbert observations in
    our order, then 4 auxiliary diseases its classifier adds, see PromptMRG `main_train.py`);
    the first 14 are kept. Their IU-Xray file is a bare list of entries (test set only), which
    is accepted too: a list entry's `split` field is used, else the seeded split below.
  * The split is the top-level key (PromptMRG's files carry stale `split` fields inside entries
    that contradict the key; the R2Gen/PromptMRG loaders use the key, so do we).
  * Image paths are relative to `--image-root`, by default `<annotation folder>/images` when
    that folder exists (the R2Gen/PromptMRG layout), else the annotation's folder.
- `csv` / `jsonl`: `image` (one path) or `images` (several: `;`-separated in CSV, a list in
  JSONL), `report`, optional `study_id` (default `<input name>-<row>`), `split` (default: a
  seeded 70/10/20 split), `labels` (14 codes: JSON list or `;`-separated), `center`, `view`
  (default PA). Image paths are relative to `--image-root`, default the input file's folder.

Centers: `column` (each entry's `center`), `origin` (one center per input file), `dirichlet`
(seeded label-skew partition, `fedmrg.data.partition`, centers c0, c1, ...).

Labels missing in the source are filled by the rule-based labeler. Images are read once,
checked to decode, and stored as their original PNG/JPEG bytes (other formats re-encoded to PNG).

Bad entries (missing/corrupt image, empty report, duplicate study id, missing key, bad labels,
unknown split, missing center): `on_error="raise"` stops with a DatasetError naming the input
file, the entry and the problem; `on_error="skip"` skips them and counts them by reason in the
manifest's `skipped`. A file that cannot be parsed at all is always an error.

Everything is held in memory before writing (write_dataset groups by center), which is fine for
IU-Xray and subsets of MIMIC-CXR, not for all of MIMIC-CXR at full resolution.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fedmrg.config import ConfigError
from fedmrg.data.partition import center_names as dirichlet_center_names
from fedmrg.data.partition import dirichlet_label_skew
from fedmrg.data.schema import LABEL_NAMES, NUM_OBSERVATIONS, SPLITS
from fedmrg.data.shards import DatasetError, SkipLog, Study, sha256_file, write_dataset

log = logging.getLogger(__name__)

FORMATS = ("r2gen", "csv", "jsonl")
CENTER_SOURCES = ("column", "origin", "dirichlet")
ON_ERROR = ("raise", "skip")
DEFAULT_VIEW = "PA"
SEEDED_SPLIT = {"train": 0.7, "val": 0.1, "test": 0.2}  # for entries without a split
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validate": "val",
                 "validation": "val", "test": "test"}
PROMPTMRG_NUM_LABELS = 18  # 14 CheXbert + 4 auxiliary diseases (first 14 kept)
STORED_FORMATS = ("PNG", "JPEG")  # kept byte-for-byte; anything else PIL reads -> PNG
PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16")
IMAGE_READ_THREADS = 4  # PIL decodes outside the GIL; the disk is usually the bottleneck

R2GEN_KEYS = {"id", "study_id", "report", "image_path", "split", "labels", "center", "view"}
TABLE_KEYS = {"image", "images", "report", "study_id", "split", "labels", "center", "view"}


class EntryError(DatasetError):
    """One bad entry; `reason` is its SkipLog category under on_error=skip."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# --------------------------------------------------------------------------- options


@dataclass
class ImportOptions:
    """What `fedmrg data import` asks for; validated on construction."""

    fmt: str
    inputs: list[Path]
    image_roots: list[Path] = field(default_factory=list)
    centers_from: str = "column"
    center_names: list[str] = field(default_factory=list)
    num_centers: int = 4
    alpha: float = 0.5
    seed: int = 0
    on_error: str = "raise"

    def __post_init__(self) -> None:
        _choice("fmt", self.fmt, FORMATS)
        _choice("centers_from", self.centers_from, CENTER_SOURCES)
        _choice("on_error", self.on_error, ON_ERROR)
        self.inputs = [Path(p) for p in self.inputs]
        self.image_roots = [Path(p) for p in self.image_roots]
        self.center_names = list(self.center_names)
        if not self.inputs:
            raise ConfigError("inputs: give at least one input file")
        for p in self.inputs:
            if not p.is_file():
                raise ConfigError(f"inputs: {p} is not a file")
        if len(self.image_roots) not in (0, 1, len(self.inputs)):
            raise ConfigError(f"image_roots: give one per input ({len(self.inputs)}) or one for "
                              f"all, got {len(self.image_roots)}")
        for p in self.image_roots:
            if not p.is_dir():
                raise ConfigError(f"image_roots: {p} is not a folder")
        if self.center_names:
            if self.centers_from != "origin":
                raise ConfigError("center_names: only used with centers_from='origin' "
                                  f"(got centers_from={self.centers_from!r})")
            if len(self.center_names) != len(self.inputs):
                raise ConfigError(f"center_names: {len(self.center_names)} names for "
                                  f"{len(self.inputs)} inputs; give one per input")
            if len(set(self.center_names)) != len(self.center_names):
                raise ConfigError(f"center_names: names repeat: {self.center_names}")
            for name in self.center_names:
                if not _valid_center(name):
                    raise ConfigError(f"center_names: invalid center name {name!r} (no '/', "
                                      "'=' or surrounding spaces)")
        if isinstance(self.num_centers, bool) or not isinstance(self.num_centers, int) \
                or self.num_centers < 1:
            raise ConfigError(f"num_centers: must be an integer >= 1, got {self.num_centers!r}")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) \
                or self.alpha <= 0:
            raise ConfigError(f"alpha: must be a finite number > 0, got {self.alpha!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed: must be an integer >= 0, got {self.seed!r}")

    def image_root(self, i: int) -> Path:
        """Folder the i-th input's image paths are relative to."""
        if self.image_roots:
            return self.image_roots[i if len(self.image_roots) > 1 else 0]
        folder = self.inputs[i].parent
        if self.fmt == "r2gen" and (folder / "images").is_dir():
            return folder / "images"
        return folder


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}: {value!r} is not one of {list(allowed)}")


def _valid_center(name: str) -> bool:
    return bool(name) and name == name.strip() and "/" not in name and "=" not in name


def input_names(paths: list[Path]) -> list[str]:
    """Short unique names for input files: stems, else parent folders, else both, else inputN.

    Used as origin center names and in row-number study ids. Two R2Gen inputs are both
    `annotation.json`, so their folders (iu_xray, mimic_cxr) name them.
    """
    candidates = [
        [p.stem for p in paths],
        [p.resolve().parent.name for p in paths],
        [f"{p.resolve().parent.name}_{p.stem}" for p in paths],
    ]
    for names in candidates:
        names = [n.replace("/", "-").replace("=", "-").strip() for n in names]
        if all(names) and len(set(names)) == len(names):
            return names
    return [f"input{i}" for i in range(len(paths))]


# --------------------------------------------------------------------------- parsed entries


@dataclass
class RawStudy:
    """A study as read from an input, before images, labels, split and center are settled."""

    study_id: str
    report: str
    image_paths: list[Path]
    where: str  # "<file>: <entry>", for messages
    split: str | None = None
    labels: list[int] | None = None
    center: str | None = None
    view: str = DEFAULT_VIEW
    origin: int = 0  # index of the input file
    images: list[bytes] = field(default_factory=list)


@dataclass
class ParsedInput:
    studies: list[RawStudy]
    entries: int  # entries/rows read, good or bad
    flavour: str
    ignored_keys: list[str]


class _Policy:
    """Applies on_error: raise the entry's error, or count it in the SkipLog."""

    def __init__(self, on_error: str):
        self.on_error = on_error
        self.skipped = SkipLog()

    def fail(self, error: EntryError) -> None:
        if self.on_error == "raise":
            raise error
        self.skipped.add(error.reason, str(error))


def _report(value: Any, where: str) -> str:
    if value is None:
        raise EntryError("missing_key", f"{where}: no 'report'")
    if not isinstance(value, str):
        raise EntryError("malformed_entry", f"{where}: 'report' is {type(value).__name__}, "
                                            "expected text")
    if not value.strip():
        raise EntryError("empty_report", f"{where}: empty report")
    return value.strip()


def _split(value: Any, where: str) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    split = SPLIT_ALIASES.get(str(value).strip().lower())
    if split is None:
        raise EntryError("unknown_split", f"{where}: unknown split {value!r}; use one of "
                                          f"{list(SPLITS)} (or valid/validate/validation)")
    return split


def _labels(value: Any, where: str, allow_promptmrg: bool = False) -> list[int] | None:
    """14 CheXbert codes from a list or a JSON / `;`-separated string; None when absent."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        text = value.strip()
        try:
            value = json.loads(text) if text.startswith("[") else [
                int(v) for v in text.split(";")]
        except ValueError as e:
            raise EntryError("bad_labels", f"{where}: labels {text!r} are not a JSON list or "
                                           f"';'-separated integers: {e}") from e
    if not isinstance(value, list):
        raise EntryError("bad_labels", f"{where}: labels must be a list of "
                                       f"{NUM_OBSERVATIONS} codes, got {type(value).__name__}")
    if allow_promptmrg and len(value) == PROMPTMRG_NUM_LABELS:
        value = value[:NUM_OBSERVATIONS]  # PromptMRG: 14 CheXbert + 4 auxiliary diseases
    if len(value) != NUM_OBSERVATIONS:
        expected = f"{NUM_OBSERVATIONS}" + (f" (or PromptMRG's {PROMPTMRG_NUM_LABELS})"
                                            if allow_promptmrg else "")
        raise EntryError("bad_labels", f"{where}: {len(value)} labels, expected {expected}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or v not in range(len(LABEL_NAMES)):
            raise EntryError("bad_labels", f"{where}: label code {v!r}; codes are integers 0 "
                                           "blank, 1 positive, 2 negative, 3 uncertain "
                                           "(CheXbert; convert CheXpert's 1/0/-1/blank first)")
    return list(value)


def _text(value: Any) -> str | None:
    """An optional text field: None for absent/empty."""
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _view(value: Any) -> str:
    return (_text(value) or DEFAULT_VIEW).upper()


def _image_paths(value: Any, where: str, root: Path, key: str) -> list[Path]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(
            isinstance(v, str) and v.strip() for v in value):
        raise EntryError("malformed_entry", f"{where}: '{key}' must be a non-empty list of "
                                            f"image paths, got {value!r}")
    return [root / v.strip() for v in value]


# --------------------------------------------------------------------------- R2Gen


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not a valid JSON file: {e}") from e


def read_r2gen(path: Path, image_root: Path, name: str, policy: _Policy) -> ParsedInput:
    """Read an R2Gen/PromptMRG annotation.json (IU-Xray or MIMIC-CXR flavour)."""
    data = _load_json(path)
    if isinstance(data, dict):
        groups = list(data.items())
    elif isinstance(data, list):  # PromptMRG's IU-Xray file: a bare list of entries
        groups = [(None, data)]
    else:
        raise DatasetError(f"{path}: expected {{\"train\": [...], \"val\": [...], "
                           f"\"test\": [...]}} or a list of entries, got {type(data).__name__}")
    for key, entries in groups:
        if not isinstance(entries, list):
            raise DatasetError(f"{path}: '{key}' must be a list of entries, got "
                               f"{type(entries).__name__}")

    studies: dict[str, RawStudy] = {}
    images_seen: dict[str, set[str]] = {}  # MIMIC: image ids already grouped into a study
    grouped = False
    ignored: set[str] = set()
    n_entries = 0
    for key, entries in groups:
        for i, entry in enumerate(entries):
            n_entries += 1
            where = f"{path}: {key if key is not None else 'entry'}[{i}]"
            try:
                if not isinstance(entry, dict):
                    raise EntryError("malformed_entry", f"{where}: entry is "
                                                        f"{type(entry).__name__}, expected an "
                                                        "object")
                ignored |= set(entry) - R2GEN_KEYS
                per_image = "study_id" in entry  # MIMIC flavour: one entry per image
                grouped |= per_image
                study = _r2gen_entry(entry, key, where, image_root)
                first = studies.get(study.study_id)
                if first is None:
                    studies[study.study_id] = study
                    images_seen[study.study_id] = {_text(entry.get("id")) or where}
                elif per_image:
                    _group_image(first, study, _text(entry.get("id")) or where,
                                 images_seen[study.study_id])
                else:
                    raise EntryError("duplicate_study_id", f"{study.where}: duplicate study id "
                                                           f"(first at {first.where})")
            except EntryError as e:
                policy.fail(e)
    return ParsedInput(list(studies.values()), n_entries,
                       "r2gen-mimic-cxr" if grouped else "r2gen-iu-xray", sorted(ignored))


def _r2gen_entry(entry: dict, key: str | None, where: str, image_root: Path) -> RawStudy:
    if "study_id" in entry:
        study_id = _text(entry["study_id"])
        id_key = "study_id"
    else:
        study_id = _text(entry.get("id"))
        id_key = "id"
    if study_id is None:
        raise EntryError("missing_key", f"{where}: no 'id' (IU-Xray) or 'study_id' (MIMIC-CXR)")
    where = f"{where} ({id_key} {study_id!r})"
    if "image_path" not in entry:
        raise EntryError("missing_key", f"{where}: no 'image_path'")
    # the top-level key is the split (entries may carry stale 'split' fields, see docstring)
    split = _split(key if key is not None else entry.get("split"), where)
    return RawStudy(
        study_id=study_id,
        report=_report(entry.get("report"), where),
        image_paths=_image_paths(entry["image_path"], where, image_root, "image_path"),
        where=where,
        split=split,
        labels=_labels(entry.get("labels"), where, allow_promptmrg=True),
        center=_text(entry.get("center")),
        view=_view(entry.get("view")),
    )


def _group_image(study: RawStudy, entry: RawStudy, image_id: str, seen: set[str]) -> None:
    """Add a MIMIC per-image entry to its study, refusing entries that disagree with it."""
    if image_id in seen:
        raise EntryError("duplicate_entry", f"{entry.where}: image {image_id!r} listed twice "
                                            f"for this study (first at {study.where})")
    for attr in ("report", "split", "labels", "center"):
        if getattr(entry, attr) != getattr(study, attr):
            raise EntryError("conflicting_entries", f"{entry.where}: {attr} differs from the "
                                                    f"study's first entry at {study.where}")
    seen.add(image_id)
    study.image_paths += entry.image_paths


# --------------------------------------------------------------------------- CSV / JSONL


def _table_entry(row: dict[str, Any], where: str, row_number: int, name: str,
                 image_root: Path, seps: bool) -> RawStudy:
    """One CSV row / JSONL object. `seps`: CSV cells, where `images` is `;`-separated text."""
    has_image, has_images = row.get("image") is not None, row.get("images") is not None
    if has_image and has_images:
        raise EntryError("malformed_entry", f"{where}: both 'image' and 'images'; give one")
    if not (has_image or has_images):
        raise EntryError("missing_key", f"{where}: no 'image' or 'images'")
    if has_images:
        value = row["images"]
        if seps:
            value = [v for v in str(value).split(";") if v.strip()]
        elif not isinstance(value, list):
            raise EntryError("malformed_entry", f"{where}: 'images' must be a list of paths "
                                                "(use 'image' for one path)")
        paths = _image_paths(value, where, image_root, "images")
    else:
        value = row["image"]
        if not isinstance(value, str):
            raise EntryError("malformed_entry", f"{where}: 'image' must be one path, got "
                                                f"{value!r}")
        paths = _image_paths(value, where, image_root, "image")
    if "study_id" in row:
        study_id = _text(row["study_id"])
        if study_id is None:
            raise EntryError("missing_key", f"{where}: empty 'study_id'")
    else:
        study_id = f"{name}-{row_number}"
    where = f"{where} (study_id {study_id!r})"
    return RawStudy(
        study_id=study_id,
        report=_report(row.get("report"), where),
        image_paths=paths,
        where=where,
        split=_split(row.get("split"), where),
        labels=_labels(row.get("labels"), where),
        center=_text(row.get("center")),
        view=_view(row.get("view")),
    )


def read_csv(path: Path, image_root: Path, name: str, policy: _Policy) -> ParsedInput:
    """Read a CSV with a header row (columns: see the module docstring)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames
            if not header:
                raise DatasetError(f"{path}: empty file, expected a header row")
            _check_columns(path, header)
            rows = []
            for row in reader:
                rows.append((reader.line_num, row))
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text: {e}") from e
    except csv.Error as e:
        raise DatasetError(f"{path}: not a readable CSV file: {e}") from e

    studies = []
    for number, (line, row) in enumerate(rows, start=1):
        where = f"{path}: line {line}"
        try:
            if None in row or None in row.values():  # DictReader: too many / too few fields
                n_fields = len(header) + len(row.get(None, [])) - list(row.values()).count(None)
                raise EntryError("malformed_entry", f"{where}: {n_fields} fields, the header "
                                                    f"has {len(header)}")
            # a blank cell is an absent value, except a blank report, which is an empty one
            cells = {k: (v if v.strip() or k == "report" else None) for k, v in row.items()}
            studies.append(_table_entry(cells, where, number, name, image_root, seps=True))
        except EntryError as e:
            policy.fail(e)
    return ParsedInput(studies, len(rows), "csv", sorted(set(header) - TABLE_KEYS))


def _check_columns(path: Path, columns: list[str]) -> None:
    if "report" not in columns:
        raise DatasetError(f"{path}: no 'report' column (columns: {columns})")
    if "image" not in columns and "images" not in columns:
        raise DatasetError(f"{path}: no 'image' or 'images' column (columns: {columns})")
    if "image" in columns and "images" in columns:
        raise DatasetError(f"{path}: both 'image' and 'images' columns; keep one")
    if len(set(columns)) != len(columns):
        raise DatasetError(f"{path}: repeated column names: {columns}")


def read_jsonl(path: Path, image_root: Path, name: str, policy: _Policy) -> ParsedInput:
    """Read JSON Lines: one object per line (keys: see the module docstring)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text: {e}") from e
    parsed: list[tuple[int, Any]] = []
    bad_json: list[tuple[int, str]] = []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            parsed.append((line_no, json.loads(line)))
        except json.JSONDecodeError as e:
            bad_json.append((line_no, str(e)))
    if bad_json and not parsed:  # nothing parses: the file is not JSON Lines at all
        raise DatasetError(f"{path}: not a JSON Lines file (line {bad_json[0][0]}: "
                           f"{bad_json[0][1]})")

    items = sorted([(n, obj, None) for n, obj in parsed] + [(n, None, e) for n, e in bad_json],
                   key=lambda t: t[0])
    studies, ignored = [], set()
    for number, (line_no, obj, json_error) in enumerate(items, start=1):
        where = f"{path}: line {line_no}"
        try:
            if json_error is not None:
                raise EntryError("malformed_entry", f"{where}: invalid JSON: {json_error}")
            if not isinstance(obj, dict):
                raise EntryError("malformed_entry", f"{where}: expected a JSON object, got "
                                                    f"{type(obj).__name__}")
            ignored |= set(obj) - TABLE_KEYS
            studies.append(_table_entry(obj, where, number, name, image_root, seps=False))
        except EntryError as e:
            policy.fail(e)
    return ParsedInput(studies, len(items), "jsonl", sorted(ignored))


READERS: dict[str, Callable[[Path, Path, str, _Policy], ParsedInput]] = {
    "r2gen": read_r2gen, "csv": read_csv, "jsonl": read_jsonl}


# --------------------------------------------------------------------------- images


def encode_image(path: Path) -> bytes:
    """Read an image file once, check it decodes fully, return the bytes to store.

    PNG/JPEG are kept byte-for-byte; other formats PIL reads are re-encoded to PNG.
    Raises EntryError (missing_image / unreadable_image / corrupt_image) without the entry name.
    """
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        raise EntryError("missing_image", f"image {path} not found") from e
    except OSError as e:
        raise EntryError("unreadable_image", f"image {path} cannot be read: {e}") from e
    try:
        with Image.open(io.BytesIO(data)) as im:  # verify() checks structure (PNG CRCs) ...
            fmt = im.format
            im.verify()
        with Image.open(io.BytesIO(data)) as im:  # ... load() decodes every pixel
            im.load()
            if fmt in STORED_FORMATS:
                return data
            if im.mode not in PNG_MODES:
                im = im.convert("RGB")
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            return buf.getvalue()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
        raise EntryError("corrupt_image", f"image {path} does not decode: "
                                          f"{type(e).__name__}: {e}") from e


def _load_images(study: RawStudy) -> EntryError | None:
    try:
        study.images = [encode_image(p) for p in study.image_paths]
    except EntryError as e:
        return EntryError(e.reason, f"{study.where}: {e}")
    return None


# --------------------------------------------------------------------------- import


def import_dataset(options: ImportOptions, out: str | Path) -> dict[str, Any]:
    """Convert the inputs to the fedmrg layout under `out`; return the manifest."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(f"{out}: output folder exists and is not empty")
    policy = _Policy(options.on_error)
    names = input_names(options.inputs)

    studies: list[RawStudy] = []
    inputs_info = []
    for i, path in enumerate(options.inputs):
        parsed = READERS[options.fmt](path, options.image_root(i), names[i], policy)
        for s in parsed.studies:
            s.origin = i
        studies += parsed.studies
        inputs_info.append({"path": str(path), "sha256": sha256_file(path),
                            "flavour": parsed.flavour, "entries": parsed.entries,
                            "image_root": str(options.image_root(i)),
                            "ignored_keys": parsed.ignored_keys})

    # cheap checks first, so no image is decoded for an entry that is dropped anyway
    if options.centers_from == "column":
        studies = _keep(studies, policy, _check_center)
    studies = _drop_duplicates(studies, policy)
    with ThreadPoolExecutor(IMAGE_READ_THREADS) as pool:
        errors = list(pool.map(_load_images, studies))  # in order: skip log is deterministic
    kept = []
    for study, error in zip(studies, errors, strict=True):
        if error is None:
            kept.append(study)
        else:
            policy.fail(error)
    studies = kept
    if not studies:
        raise DatasetError(f"no usable studies in {[str(p) for p in options.inputs]} "
                           f"(skipped: {policy.skipped.to_dict()['by_reason']})")

    n_labeled = _fill_labels(studies)
    n_seeded = _fill_splits(studies, options.seed)
    _assign_centers(studies, options, names)

    source = {
        "kind": "import",
        "format": options.fmt,
        "inputs": inputs_info,
        "centers_from": options.centers_from,
        "seed": options.seed,
        "labels": {"from_source": len(studies) - n_labeled, "from_labeler": n_labeled},
        "splits": {"from_source": len(studies) - n_seeded, "seeded": n_seeded,
                   "seeded_fractions": SEEDED_SPLIT},
    }
    if options.centers_from == "dirichlet":
        source |= {"num_centers": options.num_centers, "alpha": options.alpha}
    if policy.skipped.total:
        log.warning("import skipped %d entries: %s", policy.skipped.total,
                    dict(policy.skipped.counts))
    records = [Study(study_id=s.study_id, center=s.center, split=s.split, images=s.images,
                     view=s.view, report=s.report, labels=s.labels) for s in studies]
    return write_dataset(out, records, source, skipped=policy.skipped)


def _keep(studies: list[RawStudy], policy: _Policy,
          check: Callable[[RawStudy], None]) -> list[RawStudy]:
    kept = []
    for s in studies:
        try:
            check(s)
            kept.append(s)
        except EntryError as e:
            policy.fail(e)
    return kept


def _check_center(study: RawStudy) -> None:
    if study.center is None:
        raise EntryError("missing_center", f"{study.where}: no 'center' value (needed by "
                                           "--centers-from column; or use origin/dirichlet)")
    if not _valid_center(study.center):
        raise EntryError("bad_center", f"{study.where}: invalid center {study.center!r} "
                                       "(no '/' or '=')")


def _drop_duplicates(studies: list[RawStudy], policy: _Policy) -> list[RawStudy]:
    """Across all inputs (within one input the readers already refused duplicates)."""
    first: dict[str, RawStudy] = {}

    def check(s: RawStudy) -> None:
        if s.study_id in first:
            raise EntryError("duplicate_study_id", f"{s.where}: duplicate study id (first at "
                                                   f"{first[s.study_id].where})")
        first[s.study_id] = s

    return _keep(studies, policy, check)


def _fill_labels(studies: list[RawStudy]) -> int:
    """Label reports that came without labels; return how many."""
    missing = [s for s in studies if s.labels is None]
    if missing:
        from fedmrg.data.labeler import label_reports

        labels = np.asarray(label_reports([s.report for s in missing]))  # (M, 14)
        for s, row in zip(missing, labels, strict=True):
            s.labels = [int(v) for v in row]
    return len(missing)


def _fill_splits(studies: list[RawStudy], seed: int) -> int:
    """Seeded 70/10/20 split of the studies that have none (in input order); return how many."""
    missing = [s for s in studies if s.split is None]
    order = np.random.default_rng([seed, 1]).permutation(len(missing))  # own stream
    n_train = round(SEEDED_SPLIT["train"] * len(missing))
    n_val = round(SEEDED_SPLIT["val"] * len(missing))
    for rank, i in enumerate(order):
        missing[i].split = "train" if rank < n_train else "val" if rank < n_train + n_val \
            else "test"
    return len(missing)


def _assign_centers(studies: list[RawStudy], options: ImportOptions, names: list[str]) -> None:
    if options.centers_from == "origin":
        origin_names = options.center_names or names
        for s in studies:
            s.center = origin_names[s.origin]
    elif options.centers_from == "dirichlet":
        labels = np.array([s.labels for s in studies], dtype=np.int8)  # (N, 14)
        splits = np.array([SPLITS.index(s.split) for s in studies])  # (N,)
        assignment = dirichlet_label_skew(labels, options.num_centers, options.alpha,
                                          options.seed, strata=splits,
                                          required=splits == SPLITS.index("train"))
        centers = dirichlet_center_names(options.num_centers)
        for s, k in zip(studies, assignment, strict=True):
            s.center = centers[k]
