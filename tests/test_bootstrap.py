"""Paired bootstrap intervals (`fedmrg.eval.bootstrap`) on synthetic scores: pure, < 1 s."""

from __future__ import annotations

import numpy as np
import pytest

from fedmrg.eval.bootstrap import ce_f1_macro_of_studies, paired_bootstrap


def test_known_difference_is_covered_and_pairing_narrows_the_interval() -> None:
    rng = np.random.default_rng(0)
    # study difficulty varies a lot, shared by both methods; a beats b by 0.05 per study
    a, b = [], []
    for _ in range(3):  # seeds
        difficulty = rng.uniform(0, 1, 150)
        b.append(list(difficulty + rng.normal(0, 0.02, 150)))
        a.append(list(difficulty + 0.05 + rng.normal(0, 0.02, 150)))
    diff, lo, hi = paired_bootstrap(a, b, n_resamples=500, seed=1)
    assert lo < 0.05 < hi and lo < diff < hi
    assert diff == pytest.approx(0.05, abs=0.01)
    assert hi - lo < 0.02  # paired: the shared difficulty cancels (unpaired would be ~0.1)
    assert lo > 0  # the difference is resolved


def test_identical_inputs_give_zero_and_a_fixed_seed_reproduces() -> None:
    scores = [[0.1, 0.5, 0.9, 0.3], [0.2, 0.4]]
    assert paired_bootstrap(scores, scores, n_resamples=200, seed=3) == (0.0, 0.0, 0.0)
    other = [[0.2, 0.5, 0.7, 0.3], [0.1, 0.6]]
    first = paired_bootstrap(other, scores, n_resamples=200, seed=3)
    assert first == paired_bootstrap(other, scores, n_resamples=200, seed=3)
    assert first != paired_bootstrap(other, scores, n_resamples=200, seed=4)


def test_ce_f1_is_recomputed_on_each_resample() -> None:
    rng = np.random.default_rng(2)
    ref = (rng.random((120, 14)) < 0.3).astype(int)  # 1 = POSITIVE
    perfect = [(r, r) for r in ref]
    noisy = [(np.where(rng.random(14) < 0.3, 1 - r, r), r) for r in ref]
    diff, lo, hi = paired_bootstrap([perfect], [noisy], n_resamples=300, seed=0,
                                    metric=ce_f1_macro_of_studies)
    assert diff == pytest.approx(1.0 - ce_f1_macro_of_studies(noisy))
    assert 0 < lo < diff < hi <= 1.0


def test_unpaired_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="seed 0: a has 3 studies and b 2"):
        paired_bootstrap([[1, 2, 3]], [[1, 2]])
    with pytest.raises(ValueError, match="a has 2 seeds and b 1"):
        paired_bootstrap([[1], [2]], [[1]])
