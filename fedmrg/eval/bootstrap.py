"""Paired bootstrap confidence intervals of a difference between two methods (pure numpy).

    diff, lo, hi = paired_bootstrap(a_scores, b_scores, n_resamples=2000, seed=0)
    diff, lo, hi = paired_bootstrap(a_labels, b_labels, metric=ce_f1_macro_of_studies)
    diff, lo, hi = paired_bootstrap(a_counts, b_counts, metric=bleu4_of_studies)

`a_scores[s]` and `b_scores[s]` are the two methods' per-study items on the same test studies
of seed `s` (same order: item i of both is study i). Each resample draws, within every seed,
studies with replacement, the same indices for both methods (paired), recomputes `metric` on
each method's drawn items (a corpus-level metric such as CE macro-F1 is recomputed from the
drawn label vectors, not averaged per study) and takes the mean over seeds of a - b. The
result: the observed difference (metric on every study, mean over seeds) and the 2.5 / 97.5
percentiles (for a 95% interval) of the resampled differences.

The per-study items are what an evaluation records per study (`EvalResult.per_study`): a
(generated labels, reference labels) pair for the CE metrics, the BLEU counts
(`fedmrg.eval.nlg.bleu_statistics`) for corpus BLEU-4, recomputed exactly on every resample.
Where several models were scored on the same studies and the method's number is their mean
(e.g. every local model on a held-out center), each study's item is the tuple of the models'
items and `over_models(metric)` the metric.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fedmrg.eval.clinical import compute_ce_metrics
from fedmrg.eval.nlg import bleu4_from_statistics

Metric = Callable[[Sequence[Any]], float]


def mean_of_studies(items: Sequence[Any]) -> float:
    """A per-study metric's corpus value: the mean of the studies' scores (e.g. BLEU-4)."""
    return float(np.mean(np.asarray(items, dtype=np.float64)))


def ce_f1_macro_of_studies(items: Sequence[tuple[Sequence[int], Sequence[int]]]) -> float:
    """CE macro-F1 of studies given as (generated labels, reference labels) pairs, each the
    14 observation codes (`fedmrg.eval.clinical.compute_ce_metrics`, absent observations
    excluded)."""
    hyp = np.asarray([h for h, _ in items])
    ref = np.asarray([r for _, r in items])
    return float(compute_ce_metrics(ref, hyp)["ce_f1_macro"])


def ce_f1_micro_of_studies(items: Sequence[tuple[Sequence[int], Sequence[int]]]) -> float:
    """CE micro-F1 of (generated labels, reference labels) pairs (`ce_f1_macro_of_studies`)."""
    hyp = np.asarray([h for h, _ in items])
    ref = np.asarray([r for _, r in items])
    return float(compute_ce_metrics(ref, hyp)["ce_f1_micro"])


def bleu4_of_studies(items: Sequence[Sequence[int]]) -> float:
    """Corpus BLEU-4 of the studies' BLEU counts (`fedmrg.eval.nlg.bleu_statistics`)."""
    return bleu4_from_statistics(items)


def over_models(metric: Metric) -> Metric:
    """`metric` for studies whose items are tuples over models (one item per model scored on
    the study): the mean over the models of `metric` on each model's items."""
    def mean_over_models(items: Sequence[Sequence[Any]]) -> float:
        models = len(items[0])
        return float(np.mean([metric([item[m] for item in items]) for m in range(models)]))
    return mean_over_models


def paired_bootstrap(a_scores: Sequence[Sequence[Any]], b_scores: Sequence[Sequence[Any]],
                     n_resamples: int = 2000, seed: int = 0, metric: Metric = mean_of_studies,
                     confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean difference a - b, low, high) over test studies, paired across a and b, pooled over
    seeds (module docstring). A seed's two lists must have the same (non-zero) length."""
    if len(a_scores) != len(b_scores) or not a_scores:
        raise ValueError(f"a has {len(a_scores)} seeds and b {len(b_scores)}: expected the "
                         f"same non-zero number (paired)")
    for s, (a, b) in enumerate(zip(a_scores, b_scores, strict=True)):
        if len(a) != len(b) or not a:
            raise ValueError(f"seed {s}: a has {len(a)} studies and b {len(b)}: expected the "
                             f"same non-zero number (the same test studies)")
    if n_resamples < 1 or not 0 < confidence < 1:
        raise ValueError(f"n_resamples {n_resamples} must be >= 1 and confidence "
                         f"{confidence} in (0, 1)")
    observed = float(np.mean([metric(a) - metric(b)
                              for a, b in zip(a_scores, b_scores, strict=True)]))
    rng = np.random.default_rng(seed)
    diffs = np.empty(n_resamples)
    for k in range(n_resamples):
        per_seed = []
        for a, b in zip(a_scores, b_scores, strict=True):
            idx = rng.integers(0, len(a), len(a))
            per_seed.append(metric([a[i] for i in idx]) - metric([b[i] for i in idx]))
        diffs[k] = np.mean(per_seed)
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(diffs, [tail, 100 - tail])
    return observed, float(lo), float(hi)
