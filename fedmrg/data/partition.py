"""Seeded Dirichlet label-skew partition of studies across centers.

The usual non-IID recipe of FL papers (NIID-Bench, FedLab): every study gets one primary class;
for each class, proportions over the K centers are drawn from Dirichlet(alpha) and the class's
studies are cut by those proportions. Small alpha: each class lands mostly in one or two centers
(strong skew); large alpha: every center sees about the same mix.

Multi-label chest X-ray studies have no single class, so the primary class is the first positive
observation in the fixed OBSERVATIONS order, or "no finding" when nothing is positive. This is a
choice, not a standard: it favours the observations listed first when several are positive.

Optional `strata` (e.g. the split of each study) make the cut within each stratum with the SAME
class proportions, so a center's val/test mix follows its own train mix.
"""

from __future__ import annotations

import numpy as np

from fedmrg.data.schema import NO_FINDING, NUM_OBSERVATIONS, POSITIVE
from fedmrg.data.shards import DatasetError

MAX_DRAWS = 100  # redraws before giving up on giving every center a required study


class PartitionError(DatasetError):
    """The studies cannot be partitioned as asked (too few studies for the centers)."""


def primary_class(labels: np.ndarray) -> np.ndarray:
    """(N, 14) label codes -> (N,) index of the first positive observation, else NO_FINDING."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.shape[1] != NUM_OBSERVATIONS:
        raise PartitionError(f"labels must have shape (N, {NUM_OBSERVATIONS}), got "
                             f"{labels.shape}")
    positive = labels == POSITIVE  # (N, 14)
    return np.where(positive.any(axis=1), positive.argmax(axis=1), NO_FINDING)


def dirichlet_label_skew(
    labels: np.ndarray,
    num_centers: int,
    alpha: float,
    seed: int,
    *,
    strata: np.ndarray | None = None,
    required: np.ndarray | None = None,
    max_draws: int = MAX_DRAWS,
) -> np.ndarray:
    """Assign each study to a center; return (N,) int64 center indices in [0, num_centers).

    labels: (N, 14) codes. strata: (N,) ints, cut separately per stratum with shared class
    proportions (default: one stratum). required: (N,) bool, rows of which every center must get
    at least one (default: every row counts), e.g. `split == "train"`. The draw is repeated, up
    to `max_draws` times from the same seeded generator, until every center has one; then
    PartitionError. Deterministic in `seed`.
    """
    classes = primary_class(labels)  # (N,)
    n = len(classes)
    if num_centers < 1:
        raise PartitionError(f"num_centers must be >= 1, got {num_centers}")
    if not np.isfinite(alpha) or alpha <= 0:
        raise PartitionError(f"alpha must be a finite number > 0, got {alpha}")
    strata = np.zeros(n, dtype=np.int64) if strata is None else np.asarray(strata)
    required = np.ones(n, dtype=bool) if required is None else np.asarray(required, dtype=bool)
    if strata.shape != (n,) or required.shape != (n,):
        raise PartitionError(f"strata and required must have shape ({n},), got "
                             f"{strata.shape} and {required.shape}")
    n_required = int(required.sum())
    if n_required < num_centers:
        raise PartitionError(f"cannot give each of {num_centers} centers a study: only "
                             f"{n_required} eligible (training) studies of {n}; use fewer "
                             f"centers")

    rng = np.random.default_rng(seed)
    for _ in range(max_draws):
        centers = _draw(classes, strata, num_centers, alpha, rng)
        covered = np.bincount(centers[required], minlength=num_centers)
        if (covered > 0).all():
            return centers
    empty = [f"c{k}" for k in np.flatnonzero(covered == 0)]
    raise PartitionError(f"Dirichlet partition (alpha={alpha}, seed={seed}) left center(s) "
                         f"{empty} without an eligible (training) study in {max_draws} "
                         f"draws: {n_required} eligible studies in "
                         f"{len(np.unique(classes[required]))} primary classes for "
                         f"{num_centers} centers; use a larger alpha or fewer centers")


def _draw(classes: np.ndarray, strata: np.ndarray, num_centers: int, alpha: float,
          rng: np.random.Generator) -> np.ndarray:
    centers = np.empty(len(classes), dtype=np.int64)
    for c in np.unique(classes):
        proportions = rng.dirichlet(np.full(num_centers, alpha))  # (K,)
        for s in np.unique(strata):
            members = rng.permutation(np.flatnonzero((classes == c) & (strata == s)))
            # cut points from the cumulative proportions; the last center takes the remainder
            cuts = np.round(np.cumsum(proportions)[:-1] * len(members)).astype(np.int64)
            for k, part in enumerate(np.split(members, cuts)):
                centers[part] = k
    return centers


def center_names(num_centers: int) -> list[str]:
    """Names of Dirichlet centers: 'c0', 'c1', ..."""
    return [f"c{k}" for k in range(num_centers)]
