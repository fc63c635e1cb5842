"""`generate_phantom`: the phantom multi-center benchmark written in the fedmrg record layout.

One study = labels (center skew) -> finding details -> frontal view (+ lateral) rendered and
passed through the center's acquisition -> PNG; report written from the same labels and details
in the center's style. Each study has its own generators, spawned from (seed, center stream,
index), one for labels, one for pixels, one for text: studies can be produced in any order, and
changing the renderer does not change a single report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmrg.data.phantom.acquisition import encode_png
from fedmrg.data.phantom.anatomy import render_lateral, render_pa
from fedmrg.data.phantom.centers import CenterProfile, center_profiles
from fedmrg.data.phantom.labels import FindingDetails, sample_details, sample_labels
from fedmrg.data.phantom.styles import report_from_labels
from fedmrg.data.schema import SPLITS
from fedmrg.data.shards import Study, write_dataset

PHANTOM_VERSION = "1"  # bump whenever the output for a given seed changes in any byte
SPLIT_FRACTIONS: dict[str, float] = {"train": 0.7, "val": 0.1, "test": 0.2}
SPLIT_STREAM_TAG = 1_000_003  # keeps the split permutation independent of every study's draws


@dataclass
class PhantomSample:
    """One generated study before encoding: pixels as the center stores them."""

    labels: list[int]
    details: FindingDetails
    views: list[str]  # "PA" or "AP" first, then "LATERAL" when present
    images: list[np.ndarray]  # uint8 (S, S), S = the center's output size
    report: str


def _rngs(profile: CenterProfile, seed: int, index: int) -> list[np.random.Generator]:
    seq = np.random.SeedSequence([seed, profile.stream, index])
    return [np.random.default_rng(s) for s in seq.spawn(3)]  # labels, pixels, text


def sample_record(profile: CenterProfile, seed: int, index: int
                  ) -> tuple[list[int], FindingDetails, list[str], str]:
    """Labels, details, views and report of study `index`, without rendering its images
    (the same values `make_sample` returns: the text never depends on the pixels)."""
    label_rng, _, text_rng = _rngs(profile, seed, index)
    labels = sample_labels(label_rng, profile.skew, profile.style.negative_mention)
    details = sample_details(label_rng, labels)
    ap = bool(label_rng.random() < profile.ap_rate)
    lateral = bool(label_rng.random() < profile.two_view_rate)
    views = ["AP" if ap else "PA"] + (["LATERAL"] if lateral else [])
    report = report_from_labels(labels, profile.style, text_rng, details=details)
    return labels, details, views, report


def make_sample(profile: CenterProfile, seed: int, index: int, image_size: int
                ) -> PhantomSample:
    """Study `index` of a center (a pure function of its arguments)."""
    labels, details, views, report = sample_record(profile, seed, index)
    image_rng = _rngs(profile, seed, index)[1]
    size = profile.acquisition.output_size(image_size)
    acquire = profile.acquisition.apply
    images = [acquire(render_pa(labels, details, image_rng, size, ap=views[0] == "AP"),
                      image_rng)]
    if len(views) > 1:
        images.append(acquire(render_lateral(labels, details, image_rng, size), image_rng))
    return PhantomSample(labels=labels, details=details, views=views, images=images,
                         report=report)


def assign_splits(seed: int, stream: int, n: int) -> list[str]:
    """Split of each of a center's n studies: a seeded permutation cut 70/10/20."""
    counts = {sp: round(SPLIT_FRACTIONS[sp] * n) for sp in ("train", "val")}
    counts["test"] = n - counts["train"] - counts["val"]
    order = np.random.default_rng(np.random.SeedSequence([seed, stream, SPLIT_STREAM_TAG])
                                  ).permutation(n)
    splits = [""] * n
    start = 0
    for sp in SPLITS:
        for i in order[start:start + counts[sp]]:
            splits[int(i)] = sp
        start += counts[sp]
    return splits


def study_id(center: str, index: int) -> str:
    return f"{center}-{index:05d}"


def center_studies(profile: CenterProfile, seed: int, n: int, image_size: int) -> list[Study]:
    splits = assign_splits(seed, profile.stream, n)
    studies = []
    for i in range(n):
        sample = make_sample(profile, seed, i, image_size)
        studies.append(Study(
            study_id=study_id(profile.center, i), center=profile.center, split=splits[i],
            images=[encode_png(im) for im in sample.images], view=sample.views[0],
            report=sample.report, labels=sample.labels))
    return studies


def _check_args(centers: int, studies_per_center: int, image_size: int, seed: int) -> None:
    checks = [("centers", centers, 1, 26), ("studies_per_center", studies_per_center, 10, None),
              ("image_size", image_size, 32, 1024), ("seed", seed, 0, None)]
    for name, value, lo, hi in checks:
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise ValueError(f"generate_phantom: {name} = {value!r} must be an integer")
        if value < lo or (hi is not None and value > hi):
            allowed = f">= {lo}" if hi is None else f"in {lo}..{hi}"
            raise ValueError(f"generate_phantom: {name} = {value} must be {allowed}")


def phantom_source(profiles: list[CenterProfile], centers: int, studies_per_center: int,
                   image_size: int, seed: int, heldout_center: bool) -> dict[str, Any]:
    """The manifest's `source`: everything needed to regenerate the same bytes."""
    return {
        "kind": "phantom",
        "version": PHANTOM_VERSION,
        "seed": seed,
        "centers": centers,
        "studies_per_center": studies_per_center,
        "image_size": image_size,
        "heldout_center": heldout_center,
        "split_fractions": SPLIT_FRACTIONS,
        "profiles": {p.center: p.summary() for p in profiles},
    }


def generate_phantom(out: str | Path, centers: int = 4, studies_per_center: int = 300,
                     image_size: int = 64, seed: int = 0, heldout_center: bool = True
                     ) -> dict[str, Any]:
    """Write the phantom benchmark to `out` (which must be missing or empty); return the
    manifest. Centers are 'a', 'b', ... plus 'heldout'; same arguments, byte-identical files."""
    _check_args(centers, studies_per_center, image_size, seed)
    profiles = center_profiles(centers, heldout=heldout_center)
    studies = [s for p in profiles
               for s in center_studies(p, seed, studies_per_center, image_size)]
    source = phantom_source(profiles, centers, studies_per_center, image_size, seed,
                            heldout_center)
    return write_dataset(out, studies, source)
