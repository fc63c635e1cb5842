"""The shard layout and manifest (fedmrg/data/shards.py) and `fedmrg data validate`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from fedmrg.cli import main
from fedmrg.data.schema import ARROW_SCHEMA, NUM_OBSERVATIONS, OBSERVATIONS
from fedmrg.data.shards import (
    MANIFEST,
    VERIFIED_CACHE,
    DatasetError,
    SkipLog,
    Study,
    center_files,
    manifest_hash,
    read_center_table,
    read_manifest,
    validate_dataset,
    verify_center_files,
    write_dataset,
)

CARDIOMEGALY = OBSERVATIONS.index("cardiomegaly")


def study(i: int, center: str = "a", split: str = "train", positive: int | None = None) -> Study:
    labels = [2] * NUM_OBSERVATIONS
    if positive is not None:
        labels[positive] = 1
    return Study(study_id=f"s{i}", center=center, split=split, images=[b"img%d" % i],
                 view="PA", report=f"report {i}", labels=labels)


def small_dataset(root: Path, rows_per_file: int = 2) -> dict:
    """Center a: 5 studies (3 train, 1 val, 1 test; 2 cardiomegaly); center b: 2 studies."""
    studies = [study(0, split="train", positive=CARDIOMEGALY), study(1, split="train"),
               study(2, split="val", positive=CARDIOMEGALY), study(3, split="test"),
               study(4, split="train"),
               study(5, center="b", split="train"), study(6, center="b", split="test")]
    skipped = SkipLog()
    skipped.add("missing_image", "data.csv: line 9: image x.png not found")
    return write_dataset(root, studies, {"kind": "test"}, skipped=skipped,
                         rows_per_file=rows_per_file)


def rewrite(root: Path, rel: str, table: pa.Table) -> None:
    """Replace one parquet file and re-sign it in the manifest (so only content checks fire)."""
    path = root / rel
    pq.write_table(table, path)
    manifest = json.loads((root / MANIFEST).read_text())
    for info in manifest["centers"].values():
        for f in info["files"]:
            if f["path"] == rel:
                f["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
                f["rows"] = table.num_rows
    (root / MANIFEST).write_text(json.dumps(manifest))


# --------------------------------------------------------------------------- Study.check


@pytest.mark.parametrize("change,problem", [
    (dict(study_id=""), "empty study_id"),
    (dict(center="x/y"), "invalid center 'x/y'"),
    (dict(center="a=b"), "invalid center 'a=b'"),
    (dict(split="dev"), "split 'dev' is not one of"),
    (dict(images=[]), "has no images"),
    (dict(report=" \n"), "empty report"),
    (dict(labels=[2] * 13), "13 labels, expected 14"),
    (dict(labels=[2] * 13 + [4]), "label code 4"),
])
def test_study_check_names_the_record_and_problem(change, problem):
    s = study(0)
    for k, v in change.items():
        setattr(s, k, v)
    with pytest.raises(DatasetError, match=f"^file.csv row 3: .*{problem}"):
        s.check("file.csv row 3")


# --------------------------------------------------------------------------- write / read


def test_write_dataset_layout_manifest_and_read_back(tmp_path):
    manifest = small_dataset(tmp_path / "ds")
    a = manifest["centers"]["a"]
    assert a["rows"] == {"train": 3, "val": 1, "test": 1}
    assert [f["path"] for f in a["files"]] == [f"center=a/part-0000{i}.parquet" for i in range(3)]
    assert [f["rows"] for f in a["files"]] == [2, 2, 1]
    for f in a["files"]:
        assert f["sha256"] == hashlib.sha256((tmp_path / "ds" / f["path"]).read_bytes()
                                             ).hexdigest()
    assert a["label_positive_rate"]["cardiomegaly"] == 0.4
    assert manifest["skipped"] == {"total": 1, "by_reason": {"missing_image": 1},
                                   "examples": ["data.csv: line 9: image x.png not found"]}
    assert read_manifest(tmp_path / "ds") == manifest

    table = read_center_table(tmp_path / "ds", "a")
    assert table.schema.equals(ARROW_SCHEMA)
    assert table["study_id"].to_pylist() == ["s0", "s1", "s2", "s3", "s4"]  # order kept
    assert table["images"].to_pylist()[2] == [b"img2"]
    assert read_center_table(tmp_path / "ds", "a", split="val")["study_id"].to_pylist() == ["s2"]
    assert center_files(tmp_path / "ds", "b") == [str(tmp_path / "ds/center=b/part-00000.parquet")]


def test_write_dataset_refuses_bad_input(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(DatasetError, match="not empty"):
        write_dataset(tmp_path / "full", [study(0)], {})
    with pytest.raises(DatasetError, match=r"record 1: duplicate study_id 's0' .*center 'a'"):
        write_dataset(tmp_path / "dup", [study(0), study(0, center="b")], {})
    with pytest.raises(DatasetError, match="no studies"):
        write_dataset(tmp_path / "none", [], {})
    bad = study(1)
    bad.split = "dev"
    with pytest.raises(DatasetError, match="record 1: split 'dev'"):
        write_dataset(tmp_path / "bad", [study(0), bad], {})
    assert not (tmp_path / "dup").exists() and not (tmp_path / "bad").exists()


def test_read_manifest_errors(tmp_path):
    with pytest.raises(DatasetError, match="no manifest.*fedmrg data import"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text("{")
    with pytest.raises(DatasetError, match="manifest.json: not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"schema_version": 99, "centers": {}}))
    with pytest.raises(DatasetError, match="schema_version 99"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"schema_version": 1}))
    with pytest.raises(DatasetError, match="manifest.json: no 'centers'"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"schema_version": 1, "centers": {"a": {}}}))
    with pytest.raises(DatasetError, match="manifest.json: center 'a' has no 'rows'"):
        read_manifest(tmp_path)
    rows = {"train": 1, "val": 0, "test": 0}
    (tmp_path / MANIFEST).write_text(json.dumps({"schema_version": 1,
                                                 "centers": {"a": {"rows": rows}}}))
    with pytest.raises(DatasetError, match="manifest.json: center 'a' has no 'files'"):
        read_manifest(tmp_path)


def test_center_files_unknown_center_and_manifest_hash(tmp_path):
    small_dataset(tmp_path / "d1")
    small_dataset(tmp_path / "d2", rows_per_file=3)
    with pytest.raises(DatasetError, match=r"unknown center 'z'; the manifest has \['a', 'b'\]"):
        center_files(tmp_path / "d1", "z")
    assert manifest_hash(tmp_path / "d1") != manifest_hash(tmp_path / "d2")
    small_dataset(tmp_path / "d3")
    assert manifest_hash(tmp_path / "d1") == manifest_hash(tmp_path / "d3")  # deterministic


# --------------------------------------------------------------------------- validate


def test_validate_summary(tmp_path):
    small_dataset(tmp_path / "ds")
    summary = validate_dataset(tmp_path / "ds")
    assert summary["centers"]["a"]["rows"] == {"train": 3, "val": 1, "test": 1}
    assert summary["centers"]["a"]["positive"]["cardiomegaly"] == 2
    assert summary["centers"]["b"]["positive"]["cardiomegaly"] == 0
    assert summary["skipped"]["by_reason"] == {"missing_image": 1}


def _delete(root):
    (root / "center=a/part-00001.parquet").unlink()
    return "center=a/part-00001.parquet: listed in the manifest but missing"


def _modify(root):
    path = root / "center=b/part-00000.parquet"
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    return "center=b/part-00000.parquet: sha256 differs"


def _file_count(root):
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["centers"]["a"]["files"][0]["rows"] = 3
    (root / MANIFEST).write_text(json.dumps(manifest))
    return "center=a/part-00000.parquet: 2 rows, manifest says 3"


def _split_count(root):
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["centers"]["b"]["rows"]["test"] = 4
    (root / MANIFEST).write_text(json.dumps(manifest))
    return "manifest.json: center 'b': 1 test rows, manifest says 4"


def _other_center(root):
    table = pq.read_table(root / "center=b/part-00000.parquet")
    table = table.set_column(1, ARROW_SCHEMA.field("center"), pa.array(["a", "b"]))
    rewrite(root, "center=b/part-00000.parquet", table)
    return "center=b/part-00000.parquet: 1 rows belong to another center"


def _schema(root):
    table = pq.read_table(root / "center=b/part-00000.parquet").drop_columns(["view"])
    rewrite(root, "center=b/part-00000.parquet", table)
    return "center=b/part-00000.parquet: schema differs"


def _not_parquet(root):
    (root / "center=b/part-00000.parquet").write_bytes(b"not parquet")
    rewrite_sha = json.loads((root / MANIFEST).read_text())
    rewrite_sha["centers"]["b"]["files"][0]["sha256"] = hashlib.sha256(b"not parquet").hexdigest()
    (root / MANIFEST).write_text(json.dumps(rewrite_sha))
    return "center=b/part-00000.parquet: unreadable parquet"


def _ragged_labels(root):
    table = pq.read_table(root / "center=b/part-00000.parquet")
    labels = pa.array([[2] * 13, [2] * 14], type=pa.list_(pa.int8()))
    table = table.set_column(6, ARROW_SCHEMA.field("labels"), labels)
    rewrite(root, "center=b/part-00000.parquet", table)
    return "center=b/part-00000.parquet: 1 rows with a labels list of length != 14"


def _label_codes(root):
    table = pq.read_table(root / "center=b/part-00000.parquet")
    labels = pa.array([[7] * 14, [2] * 14], type=pa.list_(pa.int8()))
    table = table.set_column(6, ARROW_SCHEMA.field("labels"), labels)
    rewrite(root, "center=b/part-00000.parquet", table)
    return "center=b/part-00000.parquet: label codes outside 0..3"


TAMPER = [_delete, _modify, _file_count, _split_count, _other_center, _schema, _not_parquet,
          _ragged_labels, _label_codes]


@pytest.mark.parametrize("tamper", TAMPER, ids=[t.__name__[1:] for t in TAMPER])
def test_validate_reports_what_is_wrong_and_where(tmp_path, tamper):
    root = tmp_path / "ds"
    small_dataset(root)
    expected = tamper(root)
    with pytest.raises(DatasetError) as err:
        validate_dataset(root)
    assert expected in str(err.value)


def test_validate_lists_every_problem(tmp_path):
    root = tmp_path / "ds"
    small_dataset(root)
    problems = [_delete(root), _modify(root), _file_count(root)]
    with pytest.raises(DatasetError) as err:
        validate_dataset(root)
    message = str(err.value)
    assert all(p in message for p in problems)
    assert "problem(s)" in message


def test_a_center_is_verified_against_the_manifest_once_until_a_file_changes(tmp_path):
    root = tmp_path / "ds"
    small_dataset(root)
    files = center_files(root, "a")
    assert verify_center_files(root, "a") == len(files) == 3  # hashed, then cached
    cache = root / "center=a" / VERIFIED_CACHE
    assert sorted(json.loads(cache.read_text())) == [f"center=a/part-0000{i}.parquet"
                                                     for i in range(3)]
    assert verify_center_files(root, "a") == 0  # same size, mtime, manifest sha256: no read
    assert verify_center_files(root, "b") == 1
    # a file changed in place (same size, new mtime) is hashed again and named
    part = Path(files[0])
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside a data page: the footer still parses
    part.write_bytes(bytes(data))
    with pytest.raises(DatasetError) as caught:
        verify_center_files(root, "a")
    assert str(caught.value).startswith(f"center 'a': its files differ from {root / MANIFEST}")
    assert f"{part}: sha256 differs from the manifest (file changed)" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_an_edited_manifest_sha256_fails_verification_even_with_a_cache(tmp_path):
    """Issue 19: `fedmrg data validate` rejected the edited manifest, but the run trained."""
    root = tmp_path / "ds"
    small_dataset(root)
    assert verify_center_files(root, "b") == 1
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["centers"]["b"]["files"][0]["sha256"] = "0" * 64
    (root / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match=r"center=b/part-00000\.parquet: sha256 differs"):
        verify_center_files(root, "b")
    _schema(root)  # rewritten with a column missing (and its sha256 in the manifest)
    with pytest.raises(DatasetError, match=r"center=b/part-00000\.parquet: schema differs"):
        verify_center_files(root, "b")


def test_a_read_only_dataset_is_verified_without_a_cache(tmp_path):
    root = tmp_path / "ds"
    small_dataset(root)
    (root / "center=a" / VERIFIED_CACHE).mkdir()  # not writable as a file, even for root
    assert verify_center_files(root, "a") == 3
    assert verify_center_files(root, "a") == 3  # verified again: nothing cached


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def imported(tmp_path) -> Path:
    """A fresh `fedmrg data import` of a small CSV: centers a (4 studies) and b (2)."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / "x.png")
    lines = ["study_id,image,report,split,labels,center"]
    positives = {0: "cardiomegaly", 1: "cardiomegaly", 2: "edema", 4: "edema"}
    for i, (split, center) in enumerate([("train", "a"), ("train", "a"), ("val", "a"),
                                         ("test", "a"), ("train", "b"), ("test", "b")]):
        labels = [2] * NUM_OBSERVATIONS
        if i in positives:
            labels[OBSERVATIONS.index(positives[i])] = 1
        lines.append(f"s{i},x.png,report {i},{split},{';'.join(map(str, labels))},{center}")
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(main, ["data", "import", "--format", "csv", "--input",
                                       str(tmp_path / "d.csv"), "--out", str(tmp_path / "ds")])
    assert result.exit_code == 0, result.output
    return tmp_path / "ds"


def test_cli_validate_fresh_import_prints_counts_and_label_frequencies(imported):
    result = CliRunner().invoke(main, ["data", "validate", str(imported)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"{imported}: OK"
    assert lines[1].split()[:4] == ["center", "train", "val", "test"]
    assert all(o[:6] in lines[1] for o in OBSERVATIONS)
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:4]}
    assert rows["a"][:3] == ["2", "1", "1"] and rows["b"][:3] == ["1", "0", "1"]
    cardio, edema = 4 + CARDIOMEGALY - 1, 4 + OBSERVATIONS.index("edema") - 1
    assert float(rows["a"][cardio]) == 0.5 and float(rows["a"][edema]) == 0.25
    assert float(rows["b"][cardio]) == 0.0 and float(rows["b"][edema]) == 0.5

    result = CliRunner().invoke(main, ["data", "validate", str(imported), "--json"])
    summary = json.loads(result.output)
    assert summary["centers"]["a"]["rows"] == {"train": 2, "val": 1, "test": 1}
    assert summary["centers"]["a"]["positive"]["cardiomegaly"] == 2


@pytest.mark.parametrize("tamper", ["delete", "modify", "count", "manifest"])
def test_cli_validate_fails_naming_the_file(imported, tamper):
    part = imported / "center=a/part-00000.parquet"
    manifest = json.loads((imported / MANIFEST).read_text())
    if tamper == "delete":
        part.unlink()
        named = str(part)
    elif tamper == "modify":
        part.write_bytes(part.read_bytes() + b"x")
        named = str(part)
    elif tamper == "count":
        manifest["centers"]["a"]["rows"]["val"] = 2
        (imported / MANIFEST).write_text(json.dumps(manifest))
        named = str(imported / MANIFEST)
    else:
        (imported / MANIFEST).unlink()
        named = str(imported / MANIFEST)
    result = CliRunner().invoke(main, ["data", "validate", str(imported)])
    assert result.exit_code == 3  # a data error (fedmrg.exit_codes)
    assert result.output.startswith("error: ") and named in result.output
