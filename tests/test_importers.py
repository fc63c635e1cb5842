"""Importers (R2Gen IU-Xray / MIMIC-CXR / PromptMRG, CSV, JSONL) and the Dirichlet partition.

Every fixture is written here, in tmp_path: a few real PNG/JPEG/BMP images made with PIL and
annotation files in the shapes the MRG codebases use.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from fedmrg.cli import main
from fedmrg.config import ConfigError
from fedmrg.data.importers import ImportOptions, import_dataset, input_names
from fedmrg.data.partition import PartitionError, dirichlet_label_skew, primary_class
from fedmrg.data.schema import NO_FINDING, NUM_OBSERVATIONS, OBSERVATIONS
from fedmrg.data.shards import DatasetError, read_center_table, read_manifest

NEG = [2] * NUM_OBSERVATIONS
CARDIOMEGALY = [0, 1] + [0] * 11 + [0]
NORMAL = [0] * 13 + [1]


def write_image(path: Path, seed: int, fmt: str = "PNG", size: int = 12) -> bytes:
    """A small random grey image; returns the file's bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    Image.fromarray(pixels, mode="L").save(path, format=fmt)
    return path.read_bytes()


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def rows_by_id(root: Path, center: str) -> dict[str, dict]:
    return {r["study_id"]: r for r in read_center_table(root, center).to_pylist()}


def all_rows(root: Path) -> dict[str, dict]:
    rows = {}
    for center in read_manifest(root)["centers"]:
        rows |= rows_by_id(root, center)
    return rows


# --------------------------------------------------------------------------- fixtures


def make_iu(folder: Path, labels: str | None = "14") -> tuple[Path, dict]:
    """R2Gen IU-Xray layout: <folder>/annotation.json + <folder>/images/<id>/{0,1}.png."""
    entries = {}
    for i, split in enumerate(["train", "train", "train", "val", "test"]):
        sid = f"CXR{100 + i}_IM-{i:04d}"
        front = write_image(folder / "images" / sid / "0.png", seed=i)
        lateral = write_image(folder / "images" / sid / "1.png", seed=100 + i)
        entry = {"id": sid, "report": f"The heart size is normal. Case {i}.",
                 "image_path": [f"{sid}/0.png", f"{sid}/1.png"], "split": split}
        label = CARDIOMEGALY if i % 2 else NORMAL
        if labels == "14":
            entry["labels"] = label
        elif labels == "18":  # PromptMRG: 14 CheXbert + 4 auxiliary
            entry["labels"] = label + [1, 0, 1, 0]
        entries.setdefault(split, []).append(
            entry | {"_bytes": [front, lateral], "_labels": label})
    annotation = {k: [{x: v for x, v in e.items() if not x.startswith("_")} for e in es]
                  for k, es in entries.items()}
    path = folder / "annotation.json"
    path.write_text(json.dumps(annotation))
    expected = {e["id"]: e for es in entries.values() for e in es}
    return path, expected


def make_mimic(folder: Path) -> tuple[Path, dict]:
    """R2Gen MIMIC-CXR layout: one entry per image (dicom); PromptMRG's 18 labels."""
    studies = {  # study_id: (subject, split, n_images, labels)
        50000001: (10000032, "train", 2, CARDIOMEGALY),
        50000002: (10000032, "train", 1, NORMAL),
        50000003: (10000033, "val", 1, NORMAL),
        50000004: (10000034, "test", 3, CARDIOMEGALY),
    }
    annotation: dict[str, list] = {"train": [], "val": [], "test": []}
    expected = {}
    for n, (study_id, (subject, split, n_images, label)) in enumerate(studies.items()):
        report = f"Findings for study {study_id}. No pneumothorax."
        images = []
        for k in range(n_images):
            dicom = f"{n:02d}{k}aa804e-bde0afdd"
            rel = f"p10/p{subject}/s{study_id}/{dicom}.jpg"
            images.append(write_image(folder / "images" / rel, seed=10 * n + k, fmt="JPEG"))
            annotation[split].append({"id": dicom, "study_id": study_id, "subject_id": subject,
                                      "report": report, "image_path": [rel], "split": split,
                                      "labels": label + [0, 0, 0, 1]})
        expected[str(study_id)] = {"report": report, "split": split, "labels": label,
                                   "images": images}
    path = folder / "annotation.json"
    path.write_text(json.dumps(annotation))
    return path, expected


CSV_HEADER = "study_id,images,report,split,labels,center,view"


def csv_line(sid: str, images: str, report: str = "Heart normal.", split: str = "train",
             labels: str = "2;2;2;2;2;2;2;2;2;2;2;2;2;1", center: str = "a",
             view: str = "pa") -> str:
    return ",".join([sid, images, f'"{report}"', split, labels, center, view])


def make_csv(folder: Path, extra_lines: list[str] = ()) -> Path:
    """Three good rows (train/val/test, centers a and b) plus any extra raw lines."""
    write_image(folder / "img" / "s1a.png", seed=1)
    write_image(folder / "img" / "s1b.jpg", seed=2, fmt="JPEG")
    write_image(folder / "img" / "s2.png", seed=3)
    write_image(folder / "img" / "s3.png", seed=4)
    lines = [CSV_HEADER,
             csv_line("s1", "img/s1a.png;img/s1b.jpg", split="train", view="lateral"),
             csv_line("s2", "img/s2.png", split="val", labels='"[0,1,0,0,0,0,0,0,0,0,0,0,0,0]"',
                      center="b"),
             csv_line("s3", "img/s3.png", split="test"),
             *extra_lines]
    path = folder / "data.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def options(fmt: str, *inputs: Path, **kw) -> ImportOptions:
    return ImportOptions(fmt=fmt, inputs=list(inputs), **kw)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("labels", ["14", "18"])
def test_r2gen_iu_xray_round_trip(tmp_path, labels):
    path, expected = make_iu(tmp_path / "iu_xray", labels=labels)
    manifest = import_dataset(options("r2gen", path, centers_from="origin",
                                      center_names=["iu"]), tmp_path / "out")

    assert list(manifest["centers"]) == ["iu"]
    assert manifest["centers"]["iu"]["rows"] == {"train": 3, "val": 1, "test": 1}
    assert manifest["source"]["inputs"][0]["flavour"] == "r2gen-iu-xray"
    assert manifest["source"]["labels"] == {"from_source": 5, "from_labeler": 0}
    rows = rows_by_id(tmp_path / "out", "iu")
    assert set(rows) == set(expected)
    for sid, e in expected.items():
        row = rows[sid]
        assert row["report"] == e["report"]
        assert row["images"] == e["_bytes"]  # original PNG bytes, frontal first
        assert row["labels"] == e["_labels"]  # PromptMRG's 4 auxiliary labels dropped
        assert row["split"] == e["split"]
        assert row["view"] == "PA" and row["center"] == "iu"


def test_r2gen_mimic_groups_per_image_entries_into_studies(tmp_path):
    path, expected = make_mimic(tmp_path / "mimic_cxr")
    manifest = import_dataset(options("r2gen", path, centers_from="origin"), tmp_path / "out")

    assert manifest["source"]["inputs"][0]["flavour"] == "r2gen-mimic-cxr"
    assert manifest["source"]["inputs"][0]["entries"] == 7  # image rows
    assert "subject_id" in manifest["source"]["inputs"][0]["ignored_keys"]
    (center,) = manifest["centers"]
    assert center == "annotation"  # the input's stem
    rows = rows_by_id(tmp_path / "out", center)
    assert set(rows) == set(expected)
    for sid, e in expected.items():
        assert rows[sid]["images"] == e["images"]  # JPEG bytes kept, in file order
        assert rows[sid]["report"] == e["report"]
        assert rows[sid]["labels"] == e["labels"]
        assert rows[sid]["split"] == e["split"]
    assert len(rows["50000004"]["images"]) == 3


def test_missing_labels_are_filled_by_the_labeler(tmp_path):
    from fedmrg.data.labeler import label_reports

    reports = {"p1": "Cardiomegaly. No pleural effusion.",
               "p2": "The lungs are clear. No acute cardiopulmonary abnormality."}
    write_image(tmp_path / "a.png", seed=0)
    lines = [json.dumps({"study_id": "p1", "image": "a.png", "report": reports["p1"]}),
             json.dumps({"study_id": "p2", "image": "a.png", "report": reports["p2"]}),
             json.dumps({"study_id": "p3", "image": "a.png", "report": "Edema.",
                         "labels": NEG})]  # given labels are kept, not relabeled
    (tmp_path / "r.jsonl").write_text("\n".join(lines))
    manifest = import_dataset(options("jsonl", tmp_path / "r.jsonl", centers_from="origin"),
                              tmp_path / "out")

    assert manifest["source"]["labels"] == {"from_source": 1, "from_labeler": 2}
    rows = rows_by_id(tmp_path / "out", "r")
    expected = label_reports([reports["p1"], reports["p2"]])  # (2, 14)
    assert rows["p1"]["labels"] == expected[0].tolist()
    assert rows["p2"]["labels"] == expected[1].tolist()
    assert rows["p1"]["labels"][OBSERVATIONS.index("cardiomegaly")] == 1
    assert rows["p1"]["labels"][OBSERVATIONS.index("pleural effusion")] == 2
    assert rows["p3"]["labels"] == NEG


def test_promptmrg_bare_list_uses_entry_split_else_seeded(tmp_path):
    folder = tmp_path / "iu"
    entries = []
    for i in range(10):
        write_image(folder / "images" / f"c{i}" / "0.png", seed=i)
        entry = {"id": f"c{i}", "report": f"report {i}", "image_path": [f"c{i}/0.png"],
                 "labels": NORMAL + [0, 0, 0, 0]}
        if i < 3:
            entry["split"] = "test"
        entries.append(entry)
    (folder / "iu_annotation_promptmrg.json").write_text(json.dumps(entries))
    import_dataset(options("r2gen", folder / "iu_annotation_promptmrg.json",
                           centers_from="origin"), tmp_path / "out")
    rows = rows_by_id(tmp_path / "out", "iu_annotation_promptmrg")
    assert [rows[f"c{i}"]["split"] for i in range(3)] == ["test"] * 3
    seeded = [rows[f"c{i}"]["split"] for i in range(3, 10)]
    assert sorted(seeded) == sorted(["train"] * 5 + ["val"] * 1 + ["test"] * 1)  # 70/10/20 of 7


def test_csv_round_trip_with_center_column(tmp_path):
    path = make_csv(tmp_path)
    manifest = import_dataset(options("csv", path), tmp_path / "out")

    assert manifest["centers"]["a"]["rows"] == {"train": 1, "val": 0, "test": 1}
    assert manifest["centers"]["b"]["rows"] == {"train": 0, "val": 1, "test": 0}
    rows = all_rows(tmp_path / "out")
    assert rows["s1"]["images"] == [(tmp_path / "img/s1a.png").read_bytes(),
                                    (tmp_path / "img/s1b.jpg").read_bytes()]
    assert rows["s1"]["view"] == "LATERAL" and rows["s1"]["center"] == "a"
    assert rows["s1"]["labels"] == [2] * 13 + [1]  # ';'-separated
    assert rows["s2"]["labels"] == CARDIOMEGALY  # JSON list
    assert rows["s2"]["center"] == "b" and rows["s2"]["split"] == "val"
    assert rows["s3"]["report"] == "Heart normal."


def test_jsonl_round_trip_row_ids_seeded_split_and_png_reencoding(tmp_path):
    bmp = write_image(tmp_path / "a.bmp", seed=7, fmt="BMP")
    write_image(tmp_path / "b.png", seed=8)
    lines = [json.dumps({"images": ["a.bmp", "b.png"], "report": f"r{i}", "labels": NORMAL,
                         "view": "AP", "extra": 1}) for i in range(20)]
    (tmp_path / "set.jsonl").write_text("\n".join(lines) + "\n\n")

    m1 = import_dataset(options("jsonl", tmp_path / "set.jsonl", centers_from="origin",
                                seed=3), tmp_path / "o1")
    import_dataset(options("jsonl", tmp_path / "set.jsonl", centers_from="origin",
                           seed=3), tmp_path / "o2")
    import_dataset(options("jsonl", tmp_path / "set.jsonl", centers_from="origin",
                           seed=4), tmp_path / "o3")

    assert m1["centers"]["set"]["rows"] == {"train": 14, "val": 2, "test": 4}
    assert m1["source"]["splits"]["seeded"] == 20
    assert m1["source"]["inputs"][0]["ignored_keys"] == ["extra"]
    r1, r2, r3 = (rows_by_id(tmp_path / o, "set") for o in ("o1", "o2", "o3"))
    assert set(r1) == {f"set-{i}" for i in range(1, 21)}
    assert r1["set-5"]["report"] == "r4" and r1["set-5"]["view"] == "AP"
    split = {k: v["split"] for k, v in r1.items()}
    assert split == {k: v["split"] for k, v in r2.items()}  # same seed, same split
    assert split != {k: v["split"] for k, v in r3.items()}  # another seed, another split
    bmp_stored, png_stored = r1["set-1"]["images"]
    assert bmp_stored[:8] == b"\x89PNG\r\n\x1a\n" and bmp_stored != bmp  # BMP -> PNG
    np.testing.assert_array_equal(decode(bmp_stored), decode(bmp))  # same pixels
    assert png_stored == (tmp_path / "b.png").read_bytes()


def test_origin_merges_inputs_named_by_folder_or_explicitly(tmp_path):
    iu, iu_expected = make_iu(tmp_path / "iu_xray")
    mimic, mimic_expected = make_mimic(tmp_path / "mimic_cxr")
    manifest = import_dataset(options("r2gen", iu, mimic, centers_from="origin"),
                              tmp_path / "out")
    # both inputs are annotation.json: their folders name the centers
    assert sorted(manifest["centers"]) == ["iu_xray", "mimic_cxr"]
    assert set(rows_by_id(tmp_path / "out", "iu_xray")) == set(iu_expected)
    assert set(rows_by_id(tmp_path / "out", "mimic_cxr")) == set(mimic_expected)

    manifest = import_dataset(options("r2gen", iu, mimic, centers_from="origin",
                                      center_names=["hosp-a", "hosp-b"]), tmp_path / "out2")
    assert manifest["centers"]["hosp-a"]["rows"] == {"train": 3, "val": 1, "test": 1}
    assert manifest["centers"]["hosp-b"]["rows"] == {"train": 2, "val": 1, "test": 1}


def test_input_names_fall_back_when_stems_collide(tmp_path):
    assert input_names([tmp_path / "a.csv", tmp_path / "b.csv"]) == ["a", "b"]
    assert input_names([tmp_path / "x" / "d.csv", tmp_path / "y" / "d.csv"]) == ["x", "y"]
    assert input_names([tmp_path / "d.csv", tmp_path / "d.jsonl"]) == ["input0", "input1"]


def test_dirichlet_import_every_center_trains_and_is_seeded(tmp_path):
    write_image(tmp_path / "x.png", seed=0)
    lines = [CSV_HEADER.replace(",center", "")]
    for i in range(60):
        label = ["2"] * 14
        label[i % 5] = "1"  # five primary classes
        lines.append(f"s{i},x.png,report {i},{['train', 'val', 'test'][i % 3]},"
                     f"{';'.join(label)},PA")
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    opts = dict(centers_from="dirichlet", num_centers=3, alpha=0.3, seed=5)
    m1 = import_dataset(options("csv", tmp_path / "d.csv", **opts), tmp_path / "o1")
    m2 = import_dataset(options("csv", tmp_path / "d.csv", **opts), tmp_path / "o2")

    assert sorted(m1["centers"]) == ["c0", "c1", "c2"]
    assert all(c["rows"]["train"] >= 1 for c in m1["centers"].values())
    assert sum(sum(c["rows"].values()) for c in m1["centers"].values()) == 60
    assert m1["source"]["alpha"] == 0.3 and m1["source"]["num_centers"] == 3
    assert m1["centers"] == m2["centers"]  # same seed: same rows, byte-identical files


def test_cli_import_prints_counts_and_skips(tmp_path):
    path = make_csv(tmp_path, [csv_line("s4", "img/missing.png")])
    result = CliRunner().invoke(main, ["data", "import", "--format", "csv", "--input",
                                       str(path), "--out", str(tmp_path / "out"),
                                       "--on-error", "skip"])
    assert result.exit_code == 0, result.output
    assert "center a: train 1, val 0, test 1" in result.output
    assert "skipped 1 entries: {'missing_image': 1}" in result.output
    assert "missing.png" in result.output

    result = CliRunner().invoke(main, ["data", "import", "--format", "csv", "--input",
                                       str(path), "--out", str(tmp_path / "out2")])
    assert result.exit_code == 3  # a data error (fedmrg.exit_codes)
    assert "error:" in result.output and "line 5" in result.output and "'s4'" in result.output


# --------------------------------------------------------------------------- bad input

# (case id, extra CSV line, reason, words the error must contain besides the file and entry)
CSV_BAD = [
    ("missing image", csv_line("bad", "img/nope.png"), "missing_image", "not found"),
    ("corrupt image", csv_line("bad", "img/corrupt.png"), "corrupt_image", "does not decode"),
    ("truncated jpeg", csv_line("bad", "img/trunc.jpg"), "corrupt_image", "does not decode"),
    ("empty report", csv_line("bad", "img/s2.png", report="  "), "empty_report",
     "empty report"),
    ("duplicate id", csv_line("s2", "img/s2.png"), "duplicate_study_id", "duplicate study id"),
    ("13 labels", csv_line("bad", "img/s2.png", labels=";".join(["2"] * 13)), "bad_labels",
     "13 labels, expected 14"),
    ("label code", csv_line("bad", "img/s2.png", labels=";".join(["-1"] * 14)), "bad_labels",
     "label code -1"),
    ("labels text", csv_line("bad", "img/s2.png", labels="pos"), "bad_labels",
     "not a JSON list"),
    ("unknown split", csv_line("bad", "img/s2.png", split="dev"), "unknown_split",
     "unknown split 'dev'"),
    ("missing center", csv_line("bad", "img/s2.png", center=""), "missing_center",
     "no 'center'"),
    ("bad center", csv_line("bad", "img/s2.png", center="x/y"), "bad_center",
     "invalid center"),
    ("no images", csv_line("bad", ""), "missing_key", "no 'image' or 'images'"),
    ("extra field", csv_line("bad", "img/s2.png") + ",surplus", "malformed_entry",
     "8 fields, the header has 7"),
    ("empty study id", csv_line("", "img/s2.png"), "missing_key", "empty 'study_id'"),
]


@pytest.mark.parametrize("case,line,reason,problem", CSV_BAD, ids=[c[0] for c in CSV_BAD])
def test_csv_bad_entry_raises_or_is_skipped_and_counted(tmp_path, case, line, reason,
                                                        problem):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    jpeg = write_image(tmp_path / "img" / "t.jpg", seed=9, fmt="JPEG", size=64)
    (tmp_path / "img" / "trunc.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    path = make_csv(tmp_path, [line])

    with pytest.raises(DatasetError) as err:
        import_dataset(options("csv", path), tmp_path / "out_raise")
    message = str(err.value)
    assert str(path) in message and "line 5" in message and problem in message
    assert not (tmp_path / "out_raise").exists()  # nothing half-written

    manifest = import_dataset(options("csv", path, on_error="skip"), tmp_path / "out_skip")
    assert manifest["skipped"]["by_reason"] == {reason: 1}
    assert manifest["skipped"]["total"] == 1
    assert problem in manifest["skipped"]["examples"][0]
    assert set(all_rows(tmp_path / "out_skip")) == {"s1", "s2", "s3"}
    assert read_manifest(tmp_path / "out_skip")["skipped"]["by_reason"] == {reason: 1}


def _r2gen_bad(kind: str, folder: Path) -> tuple[Path, str, str, str]:
    """Mutate a good annotation: returns (path, reason, entry name, problem)."""
    if kind in ("conflict", "duplicate image"):
        path, _ = make_mimic(folder)
        ann = json.loads(path.read_text())
        bad = dict(ann["train"][1])  # second image of study 50000001
        if kind == "conflict":
            bad["report"] = "a different report"
            ann["train"][1] = bad
            reason, problem = "conflicting_entries", "report differs"
        else:
            bad["id"] = ann["train"][0]["id"]
            ann["train"][1] = bad
            reason, problem = "duplicate_entry", "listed twice"
        path.write_text(json.dumps(ann))
        return path, reason, "train[1] (study_id '50000001')", problem
    path, _ = make_iu(folder)
    ann = json.loads(path.read_text())
    if kind == "missing image_path":
        del ann["train"][1]["image_path"]
        reason, entry, problem = "missing_key", "train[1] (id 'CXR101_IM-0001')", "image_path"
    elif kind == "unknown split key":
        ann["dev"] = ann.pop("val")
        reason, entry, problem = "unknown_split", "dev[0] (id 'CXR103_IM-0003')", "'dev'"
    elif kind == "duplicate id":
        ann["test"].append(dict(ann["train"][0]))
        reason, entry, problem = ("duplicate_study_id", "test[1] (id 'CXR100_IM-0000')",
                                  "first at")
    elif kind == "not an object":
        ann["test"].append("CXR9")
        reason, entry, problem = "malformed_entry", "test[1]", "expected an object"
    elif kind == "labels wrong length":
        ann["val"][0]["labels"] = [0] * 15
        reason, entry, problem = ("bad_labels", "val[0] (id 'CXR103_IM-0003')",
                                  "15 labels, expected 14 (or PromptMRG's 18)")
    path.write_text(json.dumps(ann))
    return path, reason, entry, problem


R2GEN_BAD = ["conflict", "duplicate image", "missing image_path", "unknown split key",
             "duplicate id", "not an object", "labels wrong length"]


@pytest.mark.parametrize("kind", R2GEN_BAD)
def test_r2gen_bad_entry_raises_or_is_skipped_and_counted(tmp_path, kind):
    path, reason, entry, problem = _r2gen_bad(kind, tmp_path / "ds")
    with pytest.raises(DatasetError) as err:
        import_dataset(options("r2gen", path, centers_from="origin"), tmp_path / "o1")
    assert f"{path}: {entry}" in str(err.value) and problem in str(err.value)

    manifest = import_dataset(options("r2gen", path, centers_from="origin", on_error="skip"),
                              tmp_path / "o2")
    assert manifest["skipped"]["by_reason"] == {reason: 1}
    rows = all_rows(tmp_path / "o2")
    if kind == "conflict":  # the study keeps its first, consistent image
        assert len(rows["50000001"]["images"]) == 1


def test_jsonl_bad_lines(tmp_path):
    write_image(tmp_path / "a.png", seed=0)
    good = {"image": "a.png", "report": "ok", "labels": NORMAL, "split": "train"}
    lines = [json.dumps(good | {"study_id": "g1"}),
             "{not json",
             json.dumps(good | {"study_id": "g2", "images": "a.png", "image": None}),
             json.dumps(["a list"]),
             json.dumps(good | {"study_id": "g3", "image": ["a.png"]}),
             json.dumps(good | {"study_id": 4})]
    path = tmp_path / "x.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(DatasetError, match=r"x\.jsonl: line 2: invalid JSON"):
        import_dataset(options("jsonl", path, centers_from="origin"), tmp_path / "o1")
    manifest = import_dataset(options("jsonl", path, centers_from="origin", on_error="skip"),
                              tmp_path / "o2")
    assert manifest["skipped"]["by_reason"] == {"malformed_entry": 4}
    assert set(rows_by_id(tmp_path / "o2", "x")) == {"g1", "4"}
    assert any("line 3" in e and "must be a list" in e for e in manifest["skipped"]["examples"])


@pytest.mark.parametrize("fmt,name,content,problem", [
    ("r2gen", "annotation.json", '{"train": [', "not a valid JSON file"),
    ("r2gen", "annotation.json", '"text"', "got str"),
    ("r2gen", "annotation.json", '{"train": {"id": 1}}', "'train' must be a list"),
    ("csv", "d.csv", "study_id,image\ns1,a.png\n", "no 'report' column"),
    ("csv", "d.csv", "report,image,images\nr,a.png,b.png\n", "both 'image' and 'images'"),
    ("csv", "d.csv", "", "empty file"),
    ("csv", "d.csv", b"report,image\n\xff\xfe,a\n", "not UTF-8"),
    ("jsonl", "d.jsonl", '[{"report": "r",\n "image": "a.png"}]\n', "not a JSON Lines file"),
])
def test_malformed_file_is_always_an_error(tmp_path, fmt, name, content, problem):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(DatasetError) as err:
        import_dataset(options(fmt, path, centers_from="origin", on_error="skip"),
                       tmp_path / "out")
    assert str(path) in str(err.value) and problem in str(err.value)


def test_everything_skipped_is_an_error_with_the_counts(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("report,image\nr1,nope.png\nr2,nope2.png\n")
    with pytest.raises(DatasetError, match=r"no usable studies.*'missing_image': 2"):
        import_dataset(options("csv", path, centers_from="origin", on_error="skip"),
                       tmp_path / "out")


def test_refuses_non_empty_output_before_reading(tmp_path):
    path = make_csv(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(DatasetError, match="not empty"):
        import_dataset(options("csv", path), tmp_path / "out")


@pytest.mark.parametrize("kw,problem", [
    (dict(fmt="parquet"), "fmt: 'parquet' is not one of"),
    (dict(inputs=[]), "at least one input"),
    (dict(inputs=["missing.csv"]), "missing.csv is not a file"),
    (dict(centers_from="hospital"), "centers_from: 'hospital'"),
    (dict(on_error="ignore"), "on_error: 'ignore'"),
    (dict(image_roots=["a", "b", "c"]), "one per input"),
    (dict(image_roots=["no_such_folder"]), "no_such_folder is not a folder"),
    (dict(center_names=["x"]), "only used with centers_from='origin'"),
    (dict(centers_from="origin", center_names=["x", "y"]), "2 names for 1 inputs"),
    (dict(centers_from="origin", center_names=["a=b"]), "invalid center name 'a=b'"),
    (dict(num_centers=0), "num_centers"),
    (dict(alpha=0.0), "alpha"),
    (dict(alpha=float("inf")), "alpha"),
    (dict(seed=-1), "seed"),
])
def test_import_options_are_validated(tmp_path, monkeypatch, kw, problem):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.csv").write_text("report,image\n")
    args = dict(fmt="csv", inputs=["d.csv"]) | kw
    with pytest.raises(ConfigError, match=problem.replace("(", r"\(")):
        ImportOptions(**args)


def test_image_root_defaults(tmp_path):
    iu, _ = make_iu(tmp_path / "iu")
    assert options("r2gen", iu).image_root(0) == tmp_path / "iu" / "images"
    csv_path = make_csv(tmp_path)
    assert options("csv", csv_path).image_root(0) == tmp_path
    roots = options("csv", csv_path, csv_path, image_roots=[tmp_path / "img"])
    assert roots.image_root(1) == tmp_path / "img"


# --------------------------------------------------------------------------- partition


def synthetic_labels(n: int, seed: int) -> np.ndarray:
    """(n, 14): one positive finding among the first 6 observations, or normal."""
    rng = np.random.default_rng(seed)
    labels = np.full((n, NUM_OBSERVATIONS), 2, dtype=np.int8)
    primary = rng.integers(0, 7, n)
    for i, c in enumerate(primary):
        if c == 6:
            labels[i, NO_FINDING] = 1
        else:
            labels[i, c] = 1
    return labels


def class_distributions(labels: np.ndarray, centers: np.ndarray, k: int) -> np.ndarray:
    classes = primary_class(labels)
    dist = np.zeros((k, len(OBSERVATIONS)))
    for c in range(k):
        dist[c] = np.bincount(classes[centers == c], minlength=len(OBSERVATIONS))
    return dist / np.maximum(dist.sum(axis=1, keepdims=True), 1)  # (K, 14)


def test_primary_class_is_first_positive_else_no_finding():
    labels = np.array([[0, 1, 1] + [0] * 11, [2] * 14, [3] * 14, [0] * 12 + [1, 0]])
    assert primary_class(labels).tolist() == [1, NO_FINDING, NO_FINDING, 12]
    with pytest.raises(PartitionError, match="shape"):
        primary_class(np.zeros((3, 13)))


def test_dirichlet_is_deterministic_in_the_seed():
    labels = synthetic_labels(500, seed=0)
    a = dirichlet_label_skew(labels, 5, 0.5, seed=1)
    assert np.array_equal(a, dirichlet_label_skew(labels, 5, 0.5, seed=1))
    assert not np.array_equal(a, dirichlet_label_skew(labels, 5, 0.5, seed=2))
    assert a.shape == (500,) and set(a.tolist()) == set(range(5))


def test_dirichlet_small_alpha_skews_large_alpha_does_not():
    labels = synthetic_labels(4000, seed=0)
    k = 4

    def spread(alpha: float) -> float:  # mean total-variation distance between centers
        dist = class_distributions(labels, dirichlet_label_skew(labels, k, alpha, seed=0), k)
        return np.mean([0.5 * np.abs(dist[i] - dist[j]).sum()
                        for i in range(k) for j in range(i + 1, k)])

    assert spread(0.1) > 0.5
    assert spread(1e6) < 0.05


def test_dirichlet_strata_share_class_proportions():
    labels = synthetic_labels(6000, seed=1)
    strata = np.arange(6000) % 3  # e.g. train / val / test
    centers = dirichlet_label_skew(labels, 3, 0.3, seed=0, strata=strata)
    per_stratum = [class_distributions(labels[strata == s], centers[strata == s], 3)
                   for s in range(3)]
    # each center's class mix is the same in every stratum (up to sampling noise)
    assert np.abs(per_stratum[0] - per_stratum[1]).max() < 0.1
    assert np.abs(per_stratum[0] - per_stratum[2]).max() < 0.1


def test_dirichlet_gives_every_center_a_required_study_or_says_why():
    labels = synthetic_labels(40, seed=2)
    required = np.arange(40) < 12  # e.g. the training rows
    centers = dirichlet_label_skew(labels, 6, 1.0, seed=0, required=required)
    assert set(centers[required].tolist()) == set(range(6))
    with pytest.raises(PartitionError, match="only 12 eligible"):
        dirichlet_label_skew(labels, 13, 1.0, seed=0, required=required)
    one_class = np.tile(np.array(NORMAL, dtype=np.int8), (50, 1))
    with pytest.raises(PartitionError, match=r"left center\(s\) .* larger alpha"):
        dirichlet_label_skew(one_class, 4, 1e-3, seed=0)
    with pytest.raises(PartitionError, match="alpha"):
        dirichlet_label_skew(labels, 2, -1.0, seed=0)
