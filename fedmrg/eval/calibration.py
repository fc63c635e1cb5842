"""Per-center calibration of the diagnosis head: a positive threshold per observation.

    thresholds = fit_positive_thresholds(val_probs, val_labels)   # (14,), NaN: keep argmax
    states = calibrated_states(test_probs, thresholds)              # (N, 14) label codes

The head's argmax decides the states the report prompt shows, and the clinical-efficacy
metrics count an observation as found when the report says it is positive. A head shared by
every center (fedmrg's, aggregated) ranks a center's studies well but puts the positive
boundary where the federation's data put it; a center can move it to its own on its validation
split, without training: for each observation the threshold on the head's positive
probability that maximizes the positive F1 on that split (the CE-F1 macro counts exactly that
F1). A study is positive when its positive probability reaches the threshold, else it takes
the most probable of the other states. An observation with no positive among the validation
labels keeps the argmax (NaN threshold): nothing there to fit to.

Pure numpy; `fedmrg.fl.client` fits it on the center's own val split (`eval.calibrate_head`).
"""

from __future__ import annotations

import numpy as np

from fedmrg.data.schema import NUM_OBSERVATIONS, NUM_STATES, POSITIVE


def _check(probs: np.ndarray, labels: np.ndarray | None = None) -> None:
    if probs.ndim != 3 or probs.shape[1:] != (NUM_OBSERVATIONS, NUM_STATES):
        raise ValueError(f"probs: shape {probs.shape}, expected (N, {NUM_OBSERVATIONS}, "
                         f"{NUM_STATES})")
    if labels is not None and labels.shape != probs.shape[:2]:
        raise ValueError(f"labels: shape {labels.shape}, expected {probs.shape[:2]}")


def _f1(predicted: np.ndarray, true: np.ndarray) -> float:
    tp = float(np.sum(predicted & true))
    fp, fn = float(np.sum(predicted & ~true)), float(np.sum(~predicted & true))
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def fit_positive_thresholds(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(14,) thresholds on the positive probability (module docstring) from `probs` (N, 14, 4
    softmax of the head) and the true label codes `labels` (N, 14). Among thresholds of equal
    F1 the one nearest to the argmax's own behaviour wins (the median of the candidates that
    tie), so a split that cannot tell them apart moves the boundary least."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    _check(probs, labels)
    out = np.full(NUM_OBSERVATIONS, np.nan)
    for j in range(NUM_OBSERVATIONS):
        true = labels[:, j] == POSITIVE
        if not true.any():
            continue
        p = probs[:, j, POSITIVE]
        # every distinct positive probability is a boundary; above the largest: none positive
        candidates = np.unique(np.concatenate([p, [np.inf]]))
        scores = np.array([_f1(p >= t, true) for t in candidates])
        best = candidates[scores == scores.max()]
        argmax_positive = probs[:, j].argmax(-1) == POSITIVE
        argmax_f1 = _f1(argmax_positive, true)
        if scores.max() <= argmax_f1:  # the argmax is already as good: leave it
            continue
        finite = best[np.isfinite(best)]
        out[j] = float(np.median(finite)) if finite.size else np.inf
    return out


def calibrated_states(probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """(N, 14) label codes: positive where the positive probability reaches the observation's
    threshold, else the most probable other state; a NaN threshold keeps the argmax."""
    probs = np.asarray(probs, dtype=np.float64)
    _check(probs)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if thresholds.shape != (NUM_OBSERVATIONS,):
        raise ValueError(f"thresholds: shape {thresholds.shape}, expected ({NUM_OBSERVATIONS},)")
    states = probs.argmax(-1)
    others = probs.copy()
    others[:, :, POSITIVE] = -np.inf
    other_state = others.argmax(-1)
    for j in np.flatnonzero(~np.isnan(thresholds)):
        positive = probs[:, j, POSITIVE] >= thresholds[j]
        states[:, j] = np.where(positive, POSITIVE, other_state[:, j])
    return states
