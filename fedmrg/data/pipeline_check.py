"""The data pipeline end to end: dataset on disk -> validation -> each center's Ray Data stream.

`fedmrg data check` runs this; it is what a user runs first on a new cluster or dataset to see
that every center's shards can be found, validated, decoded and batched.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from fedmrg.config import ExperimentConfig
from fedmrg.data.prepare import ensure_dataset, participating_centers
from fedmrg.data.schema import SPLITS
from fedmrg.data.shards import read_manifest, validate_dataset


@dataclass
class StreamCheck:
    center: str
    split: str
    rows: int
    batches: int
    seconds: float
    skipped: dict[str, int]

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("nan")


def check_pipeline(cfg: ExperimentConfig, splits: tuple[str, ...] = SPLITS) -> dict[str, Any]:
    """Ensure, validate and stream every participating center (and 'heldout' if present).

    Needs a connected Ray (see `fedmrg.ray_cluster.connect`). Returns the validation summary
    and one `StreamCheck` per (center, split) with a row count, batch count and time.
    """
    from fedmrg.data.stream import CenterStream

    root = ensure_dataset(cfg.data)
    summary = validate_dataset(root)
    manifest = read_manifest(root)
    centers = participating_centers(cfg.data, manifest)
    if "heldout" in manifest["centers"] and "heldout" not in centers:
        centers.append("heldout")
    # actors and Ray Data workers may run elsewhere: never hand them a relative path
    data_cfg = dataclasses.replace(cfg.data, root=str(root.resolve()))
    checks = []
    for center in centers:
        for split in splits:
            if not manifest["centers"][center]["rows"][split]:
                continue
            stream = CenterStream.from_config(data_cfg, center, split,
                                              in_chans=cfg.model.in_chans, seed=cfg.seed)
            start = time.perf_counter()
            rows = batches = 0
            for batch in stream.iter_batches(epoch=0):
                rows += len(batch["study_id"])
                batches += 1
            checks.append(StreamCheck(center, split, rows, batches,
                                      time.perf_counter() - start,
                                      dict(stream.skipped.counts)))
    return {"root": str(root), "validation": summary, "streams": checks}

