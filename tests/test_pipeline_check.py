"""`fedmrg data check`: the data pipeline end to end on the shared local Ray cluster."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from fedmrg.cli import main

pytestmark = pytest.mark.ray


def test_data_check_generates_validates_and_streams_every_center(ray_cluster, tmp_path):
    root = tmp_path / "ds"
    sets = ["--set", f"data.root={root}", "--set", "data.phantom.centers=2",
            "--set", "data.phantom.studies_per_center=20", "--set", "data.phantom.image_size=32",
            "--set", "data.image_size=32"]
    result = CliRunner().invoke(main, ["data", "check", *sets])
    assert result.exit_code == 0, result.output
    assert "validated against its manifest" in result.output
    rows = [line.split() for line in result.output.splitlines()
            if line.split()[:1] in (["a"], ["b"], ["heldout"])]
    # 3 centers x 3 splits, 70/10/20 of 20 studies; every row of every split came through
    assert {(r[0], r[1], int(r[2])) for r in rows} == {
        (c, s, n) for c in ("a", "b", "heldout") for s, n in (("train", 14), ("val", 2),
                                                             ("test", 4))}
    assert (root / "manifest.json").exists()


def test_data_check_names_a_bad_key(ray_cluster):
    result = CliRunner().invoke(main, ["data", "check", "--set", "data.rooot=x"])
    assert result.exit_code == 2
    assert "unknown key data.rooot" in result.output
