"""ensure_dataset: the default dataset appears on first use, is reused, and never mixed up."""

from __future__ import annotations

import dataclasses

import pytest

from fedmrg.config import DataConfig, PhantomConfig
from fedmrg.data.prepare import ensure_dataset, participating_centers
from fedmrg.data.shards import DatasetError, manifest_hash, read_manifest


def _cfg(root, **phantom) -> DataConfig:
    p = {"centers": 2, "studies_per_center": 20, "image_size": 32, "seed": 3, **phantom}
    return DataConfig(root=str(root), phantom=PhantomConfig(**p))


def test_generates_once_then_reuses(tmp_path):
    cfg = _cfg(tmp_path / "ds")
    root = ensure_dataset(cfg)
    first = manifest_hash(root)
    assert sorted(read_manifest(root)["centers"]) == ["a", "b", "heldout"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp folder left"
    assert manifest_hash(ensure_dataset(cfg)) == first


def test_existing_dataset_with_other_settings_is_an_error(tmp_path):
    ensure_dataset(_cfg(tmp_path / "ds"))
    with pytest.raises(DatasetError, match=r"data.phantom.seed: dataset has 3, config asks 4"):
        ensure_dataset(_cfg(tmp_path / "ds", seed=4))


def test_missing_path_dataset_and_foreign_folder(tmp_path):
    with pytest.raises(DatasetError, match="data.source is 'path'"):
        ensure_dataset(DataConfig(root=str(tmp_path / "nothing"), source="path"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(DatasetError, match="not empty and has no manifest.json"):
        ensure_dataset(_cfg(tmp_path / "junk"))


def test_participating_centers(tmp_path):
    cfg = _cfg(tmp_path / "ds")
    manifest = read_manifest(ensure_dataset(cfg))
    assert participating_centers(cfg, manifest) == ["a", "b"]
    chosen = dataclasses.replace(cfg, centers=["b", "heldout"])
    assert participating_centers(chosen, manifest) == ["b", "heldout"]
    # a phantom config already refuses 'z' (DataConfig.check); an imported dataset's manifest
    # is the only place that knows its centers
    imported = dataclasses.replace(cfg, source="path", centers=["z"])
    with pytest.raises(DatasetError, match="unknown center 'z'"):
        participating_centers(imported, manifest)
