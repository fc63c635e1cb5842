"""Clinical efficacy (CE) of generated reports, and diagnosis metrics of the label head.

CE compares the 14 CheXpert observations (`fedmrg.data.schema.OBSERVATIONS`, "no finding"
included) labelled on the reference and on the generated report. As in R2Gen's `compute_ce.py`,
an observation counts as *positive* only when its code is POSITIVE (1); BLANK, NEGATIVE and
UNCERTAIN are all negative. Returned keys (all floats):

* ``ce_precision_micro``, ``ce_recall_micro``, ``ce_f1_micro``: TP, FP and FN pooled over every
  report and every observation.
* ``ce_precision_macro``, ``ce_recall_macro``, ``ce_f1_macro``: the unweighted mean over
  observations of the per-observation precision, recall and F1 (macro F1 is the mean of the F1s,
  not the F1 of the macro precision and recall).
* ``ce_f1/<observation>``: per-observation F1, e.g. ``ce_f1/pleural effusion``.
* ``ce_num_observations_macro``: how many observations entered the macro means.

Zero division: a ratio with a zero denominator is 0 (sklearn's ``zero_division=0``), e.g. the
precision of an observation never predicted positive. An observation *absent* from both sides
(no positive in the references nor in the hypotheses, so TP = FP = FN = 0) has no defined score:

* ``absent="exclude"`` (default): it is left out of the macro means and its ``ce_f1/...`` is NaN.
  A model that correctly reports nothing for a rare finding is not scored 0 for it, which matters
  on small per-center test splits.
* ``absent="zero"``: it scores 0 everywhere and counts in the macro means, exactly
  ``sklearn.metrics.precision_recall_fscore_support(average="macro", zero_division=0)``, the
  numbers R2Gen-style code reports.

On a test set where every observation occurs (e.g. MIMIC-CXR's) the two agree. Micro scores do
not depend on `absent` (they are 0 when no report has any positive at all).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from fedmrg.data.schema import NUM_OBSERVATIONS, NUM_STATES, OBSERVATIONS, POSITIVE

__all__ = ["compute_ce_from_reports", "compute_ce_metrics", "compute_diagnosis_metrics"]

Absent = Literal["exclude", "zero"]


def _as_label_matrix(labels: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 2 or arr.shape[1] != NUM_OBSERVATIONS:
        raise ValueError(f"{name} must have shape (N, {NUM_OBSERVATIONS}), got {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty; nothing to score")
    if not np.isin(arr, np.arange(NUM_STATES)).all():
        raise ValueError(f"{name} holds values outside the label codes 0..{NUM_STATES - 1}")
    return arr.astype(np.int64)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, 0 where den == 0 (sklearn's zero_division=0)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def compute_ce_metrics(
    ref_labels: np.ndarray, hyp_labels: np.ndarray, *, absent: Absent = "exclude"
) -> dict[str, float]:
    """CE precision/recall/F1, micro and macro, of (N, 14) label codes; see the module docstring."""
    if absent not in ("exclude", "zero"):
        raise ValueError(f"absent must be 'exclude' or 'zero', got {absent!r}")
    ref = _as_label_matrix(ref_labels, "ref_labels") == POSITIVE
    hyp = _as_label_matrix(hyp_labels, "hyp_labels") == POSITIVE
    if ref.shape != hyp.shape:
        raise ValueError(f"ref_labels {ref.shape} and hyp_labels {hyp.shape} differ in shape")

    tp = (ref & hyp).sum(axis=0)
    fp = (~ref & hyp).sum(axis=0)
    fn = (ref & ~hyp).sum(axis=0)

    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    # F1 from counts (2TP / (2TP + FP + FN)) equals the harmonic mean where that is defined.
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)

    present = (tp + fp + fn) > 0
    used = present if absent == "exclude" else np.ones_like(present)
    n_used = int(used.sum())

    def macro(per_obs: np.ndarray) -> float:
        return float(per_obs[used].mean()) if n_used else 0.0

    t, p, n = int(tp.sum()), int(fp.sum()), int(fn.sum())
    out: dict[str, float] = {
        "ce_precision_micro": float(_ratio(t, t + p)),
        "ce_recall_micro": float(_ratio(t, t + n)),
        "ce_f1_micro": float(_ratio(2 * t, 2 * t + p + n)),
        "ce_precision_macro": macro(precision),
        "ce_recall_macro": macro(recall),
        "ce_f1_macro": macro(f1),
        "ce_num_observations_macro": float(n_used),
    }
    for j, name in enumerate(OBSERVATIONS):
        out[f"ce_f1/{name}"] = float(f1[j]) if used[j] else float("nan")
    return out


def compute_ce_from_reports(
    references: Sequence[str], hypotheses: Sequence[str], *, absent: Absent = "exclude"
) -> dict[str, float]:
    """Label both sides with `fedmrg.data.labeler.label_reports`, then `compute_ce_metrics`."""
    for name, texts in (("references", references), ("hypotheses", hypotheses)):
        if isinstance(texts, (str, bytes)):
            raise TypeError(f"{name} must be a sequence of strings, not a single string")
    if len(references) != len(hypotheses):
        raise ValueError(
            f"references and hypotheses differ in length: {len(references)} != {len(hypotheses)}"
        )
    if len(references) == 0:
        raise ValueError("references and hypotheses are empty; nothing to score")
    # Imported here so the label-array metrics work without the labeler's dependencies.
    from fedmrg.data.labeler import label_reports

    return compute_ce_metrics(
        label_reports(list(references)), label_reports(list(hypotheses)), absent=absent
    )


def compute_diagnosis_metrics(true_labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Accuracy and AUC of per-observation 4-state predictions.

    `true_labels` holds (N, 14) label codes, `probs` (N, 14, 4) probabilities over the states in
    `LABEL_NAMES` order. ``diag_acc``: accuracy of the argmax state, averaged over observations.
    ``diag_auc``: one-vs-rest ROC AUC of the POSITIVE probability against "true code is
    POSITIVE", averaged over the observations where both classes occur (NaN if none does);
    ``diag_auc_num_observations`` says how many did.
    """
    from sklearn.metrics import roc_auc_score

    true = _as_label_matrix(true_labels, "true_labels")
    p = np.asarray(probs, dtype=np.float64)
    expected = (true.shape[0], NUM_OBSERVATIONS, NUM_STATES)
    if p.shape != expected:
        raise ValueError(f"probs must have shape {expected}, got {p.shape}")
    if not np.isfinite(p).all():
        raise ValueError("probs holds NaN or infinite values")

    acc_per_obs = (p.argmax(axis=2) == true).mean(axis=0)
    aucs = []
    for j in range(NUM_OBSERVATIONS):
        y = true[:, j] == POSITIVE
        if 0 < y.sum() < len(y):  # AUC is undefined with a single class
            aucs.append(roc_auc_score(y, p[:, j, POSITIVE]))
    return {
        "diag_acc": float(acc_per_obs.mean()),
        "diag_auc": float(np.mean(aucs)) if aucs else float("nan"),
        "diag_auc_num_observations": float(len(aucs)),
    }
