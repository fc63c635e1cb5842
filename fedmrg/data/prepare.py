"""Make sure the configured dataset exists: generate the phantom benchmark when it is missing."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from fedmrg.choices import DataSource
from fedmrg.config import DataConfig
from fedmrg.data.shards import MANIFEST, DatasetError, read_manifest


def ensure_dataset(cfg: DataConfig) -> Path:
    """Return the dataset root, generating the phantom benchmark there if it is missing.

    Generation goes to a sibling temp folder that is renamed into place, so an interrupted
    run never leaves a half-written dataset that later looks complete.
    """
    root = Path(cfg.root).expanduser()
    if (root / MANIFEST).exists():
        manifest = read_manifest(root)
        _check_phantom_matches(root, manifest, cfg)
        return root
    if cfg.source != DataSource.PHANTOM:
        raise DatasetError(f"{root}: no dataset there (data.source is 'path'); create it with "
                           f"`fedmrg data import` or `fedmrg data phantom`")
    if root.exists() and any(root.iterdir()):
        raise DatasetError(f"{root}: folder exists, is not empty and has no {MANIFEST}")
    from fedmrg.data.phantom import generate_phantom

    p = cfg.phantom
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        generate_phantom(tmp / "ds", centers=p.centers, studies_per_center=p.studies_per_center,
                         image_size=p.image_size, seed=p.seed, heldout_center=p.heldout_center)
        if root.exists():
            root.rmdir()
        os.replace(tmp / "ds", root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _check_phantom_matches(root: Path, manifest: dict, cfg: DataConfig) -> None:
    """A phantom dataset generated with other settings than the config asks for is an error."""
    source = manifest.get("source", {})
    if cfg.source != DataSource.PHANTOM or source.get("kind") != "phantom":
        return
    from fedmrg.data.phantom import PHANTOM_VERSION

    p = cfg.phantom
    wanted = {"version": PHANTOM_VERSION, "seed": p.seed, "centers": p.centers,
              "studies_per_center": p.studies_per_center, "image_size": p.image_size,
              "heldout_center": p.heldout_center}
    diff = {k: (source.get(k), v) for k, v in wanted.items() if source.get(k) != v}
    if diff:
        detail = ", ".join(f"{'generator ' if k == 'version' else 'data.phantom.'}{k}: "
                           f"dataset has {a!r}, config asks {b!r}" for k, (a, b) in diff.items())
        raise DatasetError(f"{root}: existing phantom dataset differs from the config ({detail});"
                           f" point data.root elsewhere or delete the folder")


def participating_centers(cfg: DataConfig, manifest: dict) -> list[str]:
    """The configured centers, or every center in the manifest except the held-out one.

    Checked here, in the driver, before any client starts: an unknown or repeated center, and
    a participating center the manifest gives no train rows (nothing to train on) or no test
    rows (nothing to evaluate it on at the end of the run). Each is a DatasetError naming the
    center and the manifest.
    """
    known = sorted(manifest["centers"])
    where = Path(cfg.root) / MANIFEST
    if not cfg.centers:
        centers = [c for c in known if c != "heldout"]
        if not centers:
            raise DatasetError(f"{where}: no center to train on besides 'heldout' ({known}); "
                               f"name the centers in data.centers")
    else:
        unknown = [c for c in cfg.centers if c not in known]
        if unknown:
            raise DatasetError(f"data.centers: unknown center {unknown[0]!r}; the dataset at "
                               f"{cfg.root} has {known}")
        repeated = sorted({c for c in cfg.centers if cfg.centers.count(c) > 1})
        if repeated:
            raise DatasetError(f"data.centers: center {repeated[0]!r} is listed more than once "
                               f"({cfg.centers})")
        centers = list(cfg.centers)
    for center in centers:
        rows = manifest["centers"][center]["rows"]
        for split, why in (("train", "nothing to train on"), ("test", "nothing to evaluate on")):
            if rows.get(split, 0) <= 0:
                raise DatasetError(
                    f"{where}: center {center!r} has no {split!r} rows ({why}; rows per split: "
                    f"{rows}); leave it out of data.centers")
    return centers
