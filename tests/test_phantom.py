"""The phantom multi-center benchmark: determinism, layout, visibility of every finding, dual
heterogeneity (acquisition, style, label skew), and exact agreement with the labeler."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from sklearn.metrics import roc_auc_score

from fedmrg.cli import main
from fedmrg.data.labeler import label_report
from fedmrg.data.phantom import (
    CENTER_PROFILES,
    HELDOUT,
    NEUTRAL_STYLE,
    PHANTOM_VERSION,
    STYLE_NAMES,
    STYLES,
    Acquisition,
    assign_splits,
    center_profiles,
    check_labels,
    decode_png,
    generate_phantom,
    make_sample,
    neutral_corpus,
    render_pa,
    report_from_labels,
    sample_details,
    sample_labels,
    sample_record,
)
from fedmrg.data.phantom.doc_tables import fill, sections
from fedmrg.data.phantom.figure import render_centers_figure
from fedmrg.data.phantom.labels import (
    CARDIO,
    DEVICES,
    EDEMA,
    EFFUSION,
    FRACTURE,
    LESION,
    NO_FINDING,
    OPACITY,
    OPACITY_CHILDREN,
    PTX,
    VISIBLE,
    LabelSkew,
)
from fedmrg.data.schema import (
    BLANK,
    NEGATIVE,
    NUM_OBSERVATIONS,
    OBSERVATIONS,
    POSITIVE,
    SPLITS,
    UNCERTAIN,
)
from fedmrg.data.shards import DatasetError, read_center_table, validate_dataset

SMALL = dict(centers=2, studies_per_center=20, image_size=32)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("phantom") / "ds"
    return root, generate_phantom(root, seed=0, **SMALL)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


# --- determinism and layout --------------------------------------------------------------------


def test_same_seed_gives_byte_identical_dataset(small_dataset, tmp_path):
    root, manifest = small_dataset
    again = generate_phantom(tmp_path / "again", seed=0, **SMALL)
    assert again == manifest
    assert _files(tmp_path / "again") == _files(root)


def test_different_seed_gives_different_data(small_dataset, tmp_path):
    _, manifest = small_dataset
    other = generate_phantom(tmp_path / "other", seed=1, **SMALL)
    shas = {f["sha256"] for c in manifest["centers"].values() for f in c["files"]}
    other_shas = {f["sha256"] for c in other["centers"].values() for f in c["files"]}
    assert shas.isdisjoint(other_shas)


def test_manifest_describes_the_benchmark(small_dataset):
    root, manifest = small_dataset
    source = manifest["source"]
    assert source["kind"] == "phantom" and source["version"] == PHANTOM_VERSION == "1"
    assert (source["seed"], source["centers"], source["studies_per_center"],
            source["image_size"]) == (0, 2, 20, 32)
    assert sorted(manifest["centers"]) == sorted(source["profiles"]) == ["a", "b", HELDOUT]
    assert source["profiles"]["b"]["style"] == "icu"
    assert source["profiles"]["a"]["acquisition"]["invert"] is False
    for info in manifest["centers"].values():
        assert info["rows"] == {"train": 14, "val": 2, "test": 4}
    assert json.loads((root / "manifest.json").read_text()) == manifest
    validate_dataset(root)  # files, hashes and schema agree with the manifest


def test_rows_are_well_formed_studies(small_dataset):
    root, _ = small_dataset
    for center, profile in zip(["a", "b", HELDOUT], center_profiles(2), strict=True):
        table = read_center_table(root, center).to_pylist()
        size = profile.acquisition.output_size(32)
        for i, row in enumerate(table):
            assert row["study_id"] == f"{center}-{i:05d}" and row["center"] == center
            assert 1 <= len(row["images"]) <= 2 and row["view"] in ("PA", "AP")
            pixels = [decode_png(b) for b in row["images"]]
            assert all(p.shape == (size, size) and p.dtype == np.uint8 for p in pixels)
            check_labels(row["labels"])
            assert row["report"] == sample_record(profile, 0, i)[3]


def test_splits_are_disjoint_deterministic_and_70_10_20(small_dataset):
    root, _ = small_dataset
    table = pq.read_table(next((root / "center=a").glob("*.parquet"))).to_pylist()
    by_split = {sp: {r["study_id"] for r in table if r["split"] == sp} for sp in SPLITS}
    assert sum(len(v) for v in by_split.values()) == len({r["study_id"] for r in table}) == 20
    splits = assign_splits(seed=3, stream=0, n=300)
    assert Counter(splits) == {"train": 210, "val": 30, "test": 60}
    assert splits == assign_splits(seed=3, stream=0, n=300)
    assert splits != assign_splits(seed=4, stream=0, n=300)
    assert splits != assign_splits(seed=3, stream=1, n=300)


def test_studies_are_order_independent():
    profile = CENTER_PROFILES["d"]
    later = [make_sample(profile, 5, i, 48) for i in range(4)][3]
    alone = make_sample(profile, 5, 3, 48)
    assert alone.report == later.report and alone.labels == later.labels
    assert all(np.array_equal(x, y) for x, y in zip(alone.images, later.images, strict=True))


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="centers = 27"):
        generate_phantom(tmp_path / "x", centers=27)
    with pytest.raises(ValueError, match="studies_per_center = 5"):
        generate_phantom(tmp_path / "x", studies_per_center=5)
    with pytest.raises(ValueError, match="image_size = 16"):
        generate_phantom(tmp_path / "x", image_size=16)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(DatasetError, match="not empty"):
        generate_phantom(tmp_path / "full", **SMALL)


def test_more_than_four_centers_get_their_own_profiles(tmp_path):
    profiles = center_profiles(7, heldout=False)
    assert [p.center for p in profiles] == list("abcdefg")
    assert len({p.style.name for p in profiles}) == 7
    assert profiles[4].acquisition != profiles[0].acquisition
    assert center_profiles(7)[5] == profiles[5]  # a profile depends on its index only
    manifest = generate_phantom(tmp_path / "seven", centers=7, studies_per_center=10,
                                image_size=32, heldout_center=False)
    assert sorted(manifest["centers"]) == list("abcdefg")


# --- labels ---------------------------------------------------------------------------------


def _labels(skew: LabelSkew, n: int, seed: int = 0, mention: dict | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.array([sample_labels(rng, skew, mention or {}) for _ in range(n)])


def test_labels_follow_hierarchy_no_finding_and_code_rules():
    labels = _labels(CENTER_PROFILES["b"].skew, 3000, mention=STYLES["icu"].negative_mention)
    for row in labels:
        check_labels(row)
    children = np.isin(labels[:, list(OPACITY_CHILDREN)], (POSITIVE, UNCERTAIN)).any(axis=1)
    assert (labels[children, OPACITY] == POSITIVE).all()
    assert set(np.unique(labels[:, NO_FINDING])) == {BLANK, POSITIVE}
    assert (labels[:, DEVICES] != UNCERTAIN).all()
    uncertain_rate = (labels[:, :NO_FINDING] == UNCERTAIN).sum() / max(
        1, np.isin(labels[:, :NO_FINDING], (POSITIVE, UNCERTAIN)).sum())
    assert 0.02 < uncertain_rate < 0.12  # uncertain findings exist, at a low rate
    assert (labels == NEGATIVE).any() and (labels == BLANK).any()


def test_findings_co_occur_realistically():
    labels = _labels(CENTER_PROFILES["heldout"].skew, 4000) == POSITIVE
    def lift(a: int, b: int) -> float:  # P(b | a) / P(b | not a)
        return labels[labels[:, a], b].mean() / labels[~labels[:, a], b].mean()
    assert lift(EDEMA, CARDIO) > 3 and lift(EDEMA, EFFUSION) > 2
    assert lift(FRACTURE, PTX) > 2


def test_label_distribution_is_skewed_between_centers():
    rates = {c: (_labels(p.skew, 1500, seed=1) == POSITIVE).mean(axis=0)
             for c, p in CENTER_PROFILES.items()}
    assert rates["b"][DEVICES] > 4 * rates["a"][DEVICES]  # ICU: tubes and lines
    assert rates["b"][EDEMA] > 3 * rates["a"][EDEMA]
    assert rates["a"][NO_FINDING] > 2 * rates["b"][NO_FINDING]  # outpatients: normals
    assert rates["c"][LESION] == max(r[LESION] for r in rates.values())  # oncology
    assert rates["d"][FRACTURE] == max(r[FRACTURE] for r in rates.values())  # emergency


def test_inconsistent_labels_are_rejected_with_the_reason():
    rng = np.random.default_rng(0)
    ok = [BLANK] * NUM_OBSERVATIONS
    ok[NO_FINDING] = POSITIVE
    with pytest.raises(ValueError, match="hierarchy"):
        report_from_labels(ok[:OPACITY] + [BLANK, POSITIVE] + ok[OPACITY + 2:-1] + [BLANK],
                           STYLES["academic"], rng)
    bad = list(ok)
    bad[CARDIO] = POSITIVE
    with pytest.raises(ValueError, match="no finding = 1 but cardiomegaly is present"):
        report_from_labels(bad, STYLES["academic"], rng)
    with pytest.raises(ValueError, match="13 codes"):
        report_from_labels(ok[:-1], STYLES["academic"], rng)
    with pytest.raises(ValueError, match="codes are 0..3"):
        report_from_labels(ok[:-1] + [7], STYLES["academic"], rng)


# --- reports ---------------------------------------------------------------------------------


def _all_styles():
    styles = dict(STYLES)
    styles.update({p.style.name: p.style for p in center_profiles(6)})
    return styles


def test_labeler_recovers_every_label_of_center_reports():
    """100% agreement on generated studies of every center, the held-out one included."""
    for profile in center_profiles(6):
        for i in range(150):
            labels, _, _, report = sample_record(profile, 11, i)
            assert list(label_report(report)) == labels, (profile.center, report)


def test_labeler_recovers_every_code_of_every_style():
    """Each observation alone, in each of its codes, in every style (rare combos included)."""
    rich = LabelSkew({k: 0.3 for k in ("heart_failure", "infection", "critical_care", "trauma",
                                        "neoplasm", "chronic")}, uncertain_rate=0.25)
    for name, style in _all_styles().items():
        for obs in VISIBLE:
            for code in (POSITIVE, NEGATIVE, UNCERTAIN):
                labels = [BLANK] * NUM_OBSERVATIONS
                labels[obs] = code
                if obs in OPACITY_CHILDREN and code != NEGATIVE:
                    labels[OPACITY] = POSITIVE
                finding = code != NEGATIVE and obs != DEVICES
                labels[NO_FINDING] = BLANK if finding else POSITIVE
                report = report_from_labels(labels, style, np.random.default_rng(obs))
                assert list(label_report(report)) == labels, (name, OBSERVATIONS[obs], report)
        mention = {o: 0.3 for o in VISIBLE}
        rng = np.random.default_rng(5)
        for _ in range(60):
            labels = sample_labels(rng, rich, mention)
            report = report_from_labels(labels, style, rng)
            assert list(label_report(report)) == labels, (name, report)


def test_neutral_corpus_is_deterministic_and_in_no_center_style():
    corpus = neutral_corpus(200, seed=0)
    assert len(corpus) == 200 and corpus == neutral_corpus(200, seed=0)
    assert corpus != neutral_corpus(200, seed=1)
    assert NEUTRAL_STYLE == "neutral" and NEUTRAL_STYLE in STYLE_NAMES
    assert NEUTRAL_STYLE not in {p.style.name for p in center_profiles(26)}
    assert all(r.startswith("Findings:") and "Impression:" in r for r in corpus)
    assert neutral_corpus(0, seed=0) == []


def _bigrams(reports: list[str]) -> Counter:
    counts: Counter = Counter()
    for r in reports:
        words = re.findall(r"[a-z]+", r.lower())
        counts.update(zip(words, words[1:], strict=False))
    return counts


def _cosine(a: Counter, b: Counter) -> float:
    dot = sum(a[k] * b[k] for k in a.keys() & b.keys())
    return dot / np.sqrt(sum(v * v for v in a.values()) * sum(v * v for v in b.values()))


def test_reporting_styles_differ_between_centers():
    """Bigram profiles of two centers are further apart than two halves of one center."""
    reports = {p.center: [sample_record(p, 0, i)[3] for i in range(300)]
               for p in center_profiles(4)}
    halves = {c: (_bigrams(r[::2]), _bigrams(r[1::2])) for c, r in reports.items()}
    for c in reports:
        within = _cosine(*halves[c])
        assert within > 0.9, c
        for other in reports:
            if other != c:
                across = _cosine(halves[c][0], halves[other][1])
                assert across < within - 0.2, (c, other, across, within)
    assert reports["c"][0].startswith("IMPRESSION:")  # impression first
    assert not any("IMPRESSION" in r for r in reports["d"])  # no impression at all


# --- images -----------------------------------------------------------------------------------


def _balanced_images(n: int, seed: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Every visible finding positive with p = 0.25, independently; through center a's chain."""
    rng = np.random.default_rng(seed)
    acquisition = CENTER_PROFILES["a"].acquisition
    images, targets = [], []
    for _ in range(n):
        labels = [POSITIVE if p else BLANK for p in rng.random(len(VISIBLE)) < 0.25] + [BLANK]
        if any(labels[c] == POSITIVE for c in OPACITY_CHILDREN):
            labels[OPACITY] = POSITIVE
        details = sample_details(rng, labels)
        images.append(acquisition.apply(render_pa(labels, details, rng, size), rng))
        targets.append(labels[:NO_FINDING])
    return (np.stack(images).astype(np.float32) / 255.0)[:, None], np.array(targets, np.float32)


def test_every_visible_finding_is_learnable_by_a_small_cnn():
    """A 3-layer CNN trained for a few seconds separates each finding on held-out images."""
    torch.manual_seed(0)
    x_train, y_train = (torch.from_numpy(a) for a in _balanced_images(800, seed=1))
    x_test, y_test = _balanced_images(300, seed=2)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 5, stride=2, padding=2), torch.nn.ReLU(),  # (B, 16, 32, 32)
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(),  # (B, 32, 16, 16)
        torch.nn.Conv2d(32, 32, 3, stride=2, padding=1), torch.nn.ReLU(),  # (B, 32, 8, 8)
        torch.nn.Flatten(), torch.nn.Linear(32 * 8 * 8, len(VISIBLE)),
    )
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convs: threads cost more than they give on 2 cores
    try:
        for _ in range(15):
            for idx in torch.randperm(len(x_train), generator=generator).split(64):
                loss = torch.nn.functional.binary_cross_entropy_with_logits(
                    net(x_train[idx]), y_train[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            scores = net(torch.from_numpy(x_test)).numpy()
    finally:
        torch.set_num_threads(threads)
    auc = {OBSERVATIONS[k]: roc_auc_score(y_test[:, k], scores[:, k]) for k in VISIBLE}
    assert min(auc.values()) >= 0.8, auc


def test_uncertain_findings_are_drawn_faint():
    def render(code: int) -> np.ndarray:
        labels = [BLANK] * NUM_OBSERVATIONS
        labels[EFFUSION] = code
        details = sample_details(np.random.default_rng(0), [POSITIVE] * NUM_OBSERVATIONS)
        return render_pa(labels, details, np.random.default_rng(1), 64)
    absent, faint, certain = render(BLANK), render(UNCERTAIN), render(POSITIVE)
    weak, strong = np.abs(faint - absent).sum(), np.abs(certain - absent).sum()
    assert 0.2 * strong < weak < 0.7 * strong


def test_acquisition_differs_between_centers():
    """Polarity, noise, blur, resolution and burned-in markers are center properties."""
    def stats(center: str) -> dict[str, float]:
        profile = CENTER_PROFILES[center]
        imgs = [make_sample(profile, 0, i, 64).images[0].astype(np.float32) for i in range(30)]
        detail = [np.abs(np.diff(im, axis=1)).mean() for im in imgs]  # noise + sharpness
        return {"size": imgs[0].shape[0], "mean": np.mean(imgs), "detail": np.mean(detail)}
    s = {c: stats(c) for c in CENTER_PROFILES}
    assert (s["a"]["size"], s["b"]["size"], s["c"]["size"], s[HELDOUT]["size"]) == (64, 56, 80,
                                                                                   72)
    assert s["c"]["mean"] > s["a"]["mean"] + 60  # inverted polarity: air is white
    assert s["b"]["detail"] > 1.5 * s["a"]["detail"]  # portable films: noisy
    assert s["d"]["detail"] < s["a"]["detail"]  # blurred
    two_view = {c: np.mean([len(sample_record(p, 0, i)[2]) == 2 for i in range(200)])
                for c, p in CENTER_PROFILES.items()}
    assert two_view["a"] > 0.4 > 0.15 > two_view["b"]
    ap = np.mean([sample_record(CENTER_PROFILES["b"], 0, i)[2][0] == "AP" for i in range(200)])
    assert ap > 0.8


def test_markers_are_burned_in_where_expected():
    attenuation = np.full((64, 64), 0.3)
    plain = Acquisition(noise_std=0.0).apply(attenuation, np.random.default_rng(0))
    marked = Acquisition(noise_std=0.0, markers=("side_letter", "text_block"),
                         marker_text="XYZ").apply(attenuation, np.random.default_rng(0))
    changed = plain != marked
    assert changed[:16, :16].any() and changed[52:, 32:].any()  # "R" top left, text bottom right
    assert not changed[20:48, :].any()  # the anatomy is left alone
    inverted = Acquisition(noise_std=0.0, invert=True, markers=("side_letter",))
    assert inverted.apply(attenuation, np.random.default_rng(0))[:16, :16].min() < 60  # dark ink
    with pytest.raises(ValueError, match="unknown marker 'logo'"):
        Acquisition(markers=("logo",))
    with pytest.raises(ValueError, match="gamma = 0.0"):
        Acquisition(gamma=0.0)


# --- docs, figure, CLI ------------------------------------------------------------------------


def test_docs_tables_are_what_the_code_computes():
    doc = (Path(__file__).parents[1] / "docs" / "phantom.md").read_text()
    assert fill(doc, sections()) == doc, "run: python -m fedmrg.data.phantom.doc_tables " \
                                         "docs/phantom.md"
    assert f"version {PHANTOM_VERSION}" in doc


def test_centers_figure_is_written(tmp_path):
    out = render_centers_figure(tmp_path / "fig.png", seed=0, image_size=32, centers=1)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 1000 and im.height > 300


def test_cli_generates_the_benchmark(tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(main, ["data", "phantom", "--out", str(out), "--centers", "1",
                                       "--studies-per-center", "10", "--image-size", "32",
                                       "--no-heldout"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["centers"]) == ["a"] and manifest["source"]["heldout_center"] is False
