"""The per-center calibration of the diagnosis head's positive thresholds (pure numpy)."""

from __future__ import annotations

import numpy as np
import pytest

from fedmrg.data.schema import NEGATIVE, NUM_OBSERVATIONS, POSITIVE
from fedmrg.eval.calibration import calibrated_states, fit_positive_thresholds


def head(n: int, positive: np.ndarray, p_true: float, p_false: float) -> np.ndarray:
    """(n, 14, 4) softmax-like probabilities: positive studies get `p_true` on positive, the
    others `p_false`; the rest of the mass on negative (so the argmax says negative whenever
    the positive probability is below one half)."""
    probs = np.zeros((n, NUM_OBSERVATIONS, 4))
    p = np.where(positive, p_true, p_false)
    probs[:, :, POSITIVE] = p
    probs[:, :, NEGATIVE] = 1 - p
    return probs


def test_a_shy_head_gets_a_lower_threshold_that_finds_the_positives():
    rng = np.random.default_rng(0)
    positive = rng.random((60, NUM_OBSERVATIONS)) < 0.3
    positive[:, 3] = False  # an observation the val split never has positive
    labels = np.where(positive, POSITIVE, NEGATIVE)
    probs = head(60, positive, p_true=0.35, p_false=0.1)  # the argmax finds no positive
    assert not (probs.argmax(-1) == POSITIVE).any()
    thresholds = fit_positive_thresholds(probs, labels)
    assert np.isnan(thresholds[3])  # nothing to fit to: the argmax stays
    fitted = np.delete(thresholds, 3)
    assert np.all((fitted > 0.1) & (fitted <= 0.35))
    states = calibrated_states(probs, thresholds)
    assert np.array_equal(states == POSITIVE, positive)  # every positive found, no false one
    # a test set with the same head: the same thresholds transfer
    test_positive = rng.random((40, NUM_OBSERVATIONS)) < 0.3
    test_states = calibrated_states(head(40, test_positive, 0.35, 0.1), thresholds)
    test_positive[:, 3] = False  # observation 3 kept the argmax: never positive here
    assert np.array_equal(test_states == POSITIVE, test_positive)


def test_an_already_right_argmax_is_left_alone():
    positive = np.zeros((20, NUM_OBSERVATIONS), dtype=bool)
    positive[::3] = True
    probs = head(20, positive, p_true=0.9, p_false=0.05)
    thresholds = fit_positive_thresholds(probs, np.where(positive, POSITIVE, NEGATIVE))
    assert np.isnan(thresholds).all()
    assert np.array_equal(calibrated_states(probs, thresholds), probs.argmax(-1))


def test_below_the_threshold_a_study_takes_its_most_probable_other_state():
    probs = np.full((1, NUM_OBSERVATIONS, 4), 0.1)
    probs[0, :, POSITIVE] = 0.6
    probs[0, :, 3] = 0.2  # uncertain is the next most probable
    thresholds = np.full(NUM_OBSERVATIONS, 0.7)
    assert (calibrated_states(probs, thresholds) == 3).all()


@pytest.mark.parametrize("probs, labels, message", [
    (np.zeros((4, 13, 4)), np.zeros((4, 13)), "probs: shape (4, 13, 4)"),
    (np.zeros((4, 14, 4)), np.zeros((3, 14)), "labels: shape (3, 14)"),
])
def test_bad_shapes_are_named(probs, labels, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fit_positive_thresholds(probs, labels)
    with pytest.raises(ValueError, match="thresholds: shape"):
        calibrated_states(np.zeros((2, 14, 4)), np.zeros(3))


def test_a_head_tuned_locally_learns_the_centers_labels_and_leaves_the_original():
    import torch

    from fedmrg.model.head_tuning import tune_head_locally
    from fedmrg.model.heads import DiagnosisHead
    from fedmrg.model.losses import label_log_prior

    g = torch.Generator().manual_seed(0)
    features = torch.randn(200, 16, generator=g)
    # this center's labels: observation j positive when feature j > 0, else negative
    labels = torch.where(features[:, :NUM_OBSERVATIONS] > 0, POSITIVE, NEGATIVE)
    head = DiagnosisHead(16)
    before = {k: v.clone() for k, v in head.state_dict().items()}

    def accuracy(h):
        with torch.no_grad():
            return (h(features).argmax(-1) == labels).float().mean().item()

    tuned = tune_head_locally(head, features, labels, steps=300, seed=0, lr=0.05,
                              log_prior=label_log_prior(labels), tau=1.0)
    assert accuracy(head) < 0.6 < 0.95 < accuracy(tuned)
    assert all(torch.equal(v, head.state_dict()[k]) for k, v in before.items())  # a copy
    again = tune_head_locally(head, features, labels, steps=300, seed=0, lr=0.05,
                              log_prior=label_log_prior(labels), tau=1.0)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in tuned.state_dict().items())
    with pytest.raises(ValueError, match="steps must be >= 1"):
        tune_head_locally(head, features, labels, steps=0, seed=0)
