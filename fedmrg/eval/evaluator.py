"""Evaluate an `MRGModel` on batches: generated reports, NLG, CE and diagnosis metrics.

    result = evaluate_model(model, stream.iter_batches(), personalized=False)
    table = evaluate_centers(model, {"a": stream_a, "b": stream_b})            # generalization
    table = evaluate_centers({"a": model_a, "b": model_b}, streams, personalized=True)

Metrics of one evaluation (`EvalResult.metrics`):
- NLG: bleu1..4, meteor, rouge_l, cider (`fedmrg.eval.nlg`, corpus-level, cleaned text).
- CE: the rule-based labeler applied to the generated AND the reference reports
  (`compute_ce_from_reports`); positive = code 1; ce_precision/recall/f1 `_micro` (TP/FP/FN
  pooled over studies and the 14 observations) and `_macro` (mean over the observations that
  occur in references or generations, `absent="exclude"`; pass absent="zero" for the R2Gen
  convention), plus `ce_f1/<observation>`.
- Repetition of the generated reports (`fedmrg.eval.repetition`): distinct_1, distinct_2
  (unique n-grams / n-grams over the corpus) and rep_4 (per report, the share of its 4-grams
  that repeat one it already had, mean over reports).
- Diagnosis head: diag_acc (argmax state accuracy, mean over observations) and diag_auc
  (positive-vs-rest AUC, mean over observations with both classes) from its softmax
  probabilities on the same batches; the generated report's prompt shows the same argmax.
  diag_f1_macro / diag_f1_micro: the CE formula applied to the head's argmax states against
  the batch labels, i.e. the CE a decoder that verbalized its prompt perfectly would get; the
  gap to ce_f1_* is what the decoder loses (or adds).
- `oracle_prompt=True` shows the ground-truth labels as the prompt instead (an analysis of the
  decoder alone: how well it follows a correct prompt); never a reported result.
- num_studies.
`EvalResult.samples`: the first studies' study_id, reference, generated report, the states the
prompt showed ("states", digits) and, as text, the findings the head predicted ("findings")
and the true ones ("true_findings", from the labels).
`EvalResult.per_study`: every study's items for a bootstrap over studies
(`fedmrg.eval.bootstrap`), in study-id order: "ce_labels" (the labeler's 14 codes of the
generated report, then of the reference) and "bleu" (its `fedmrg.eval.nlg.bleu_statistics`).

Across centers (`evaluate_centers`) the "mean" row is the unweighted mean over centers of each
metric (every center counts the same, whatever its test size; NaN entries, e.g. the F1 of an
observation absent at one center, are left out of that metric's mean).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedmrg.config import EvalConfig
from fedmrg.eval.calibration import calibrated_states
from fedmrg.eval.clinical import compute_ce_metrics, compute_diagnosis_metrics
from fedmrg.eval.nlg import bleu_statistics, compute_nlg_metrics
from fedmrg.eval.repetition import compute_repetition_metrics
from fedmrg.model.prompts import findings_text

# The metrics a benchmark table shows, in order.
HEADLINE = ("ce_f1_macro", "ce_f1_micro", "ce_precision_micro", "ce_recall_micro", "bleu1",
            "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider", "distinct_1",
            "distinct_2", "rep_4", "diag_acc", "diag_auc")
# The `eval.*` keys that are `MRGModel.generate` arguments.
GENERATION_KEYS = ("num_beams", "max_new_tokens", "min_new_tokens", "repetition_penalty",
                   "no_repeat_ngram_size")
GENERATION_DEFAULTS = {k: getattr(EvalConfig(), k) for k in GENERATION_KEYS}


def generation_kwargs(ev: EvalConfig, **overrides: Any) -> dict[str, Any]:
    """The generation arguments of `evaluate_model` from the `eval` config section, then
    `overrides` (one place, so a client and `fedmrg evaluate` decode alike)."""
    unknown = sorted(set(overrides) - set(GENERATION_KEYS))
    if unknown:
        raise EvaluationError(f"unknown generation argument {unknown[0]!r}; allowed: "
                              f"{sorted(GENERATION_KEYS)}")
    return {**{k: getattr(ev, k) for k in GENERATION_KEYS}, **overrides}


class EvaluationError(ValueError):
    """Evaluation inputs are unusable; the message names the center or argument."""


@dataclass
class EvalResult:
    """One model on one set of batches."""

    reports: list[str]  # generated, in batch order
    references: list[str]
    study_ids: list[str]
    metrics: dict[str, float]
    samples: list[dict[str, str]]  # first N: study_id, reference, generated, prompt states
    predicted_states: np.ndarray  # (N, 14) diagnosis head argmax, the states the prompt showed
    wall_s: float = 0.0
    # per test study, in study-id order (module docstring): "ce_labels", "bleu"
    per_study: dict[str, list] = field(default_factory=dict)


@dataclass
class CentersResult:
    """Per-center results and their mean over centers (unweighted, NaN-skipping)."""

    per_center: dict[str, EvalResult]
    mean: dict[str, float] = field(default_factory=dict)

    def rows(self, keys: Sequence[str] = HEADLINE) -> list[dict[str, Any]]:
        """One dict per center, then the "mean" row: {"center", key: value...}."""
        out = [{"center": c, **{k: r.metrics.get(k, math.nan) for k in keys}}
               for c, r in self.per_center.items()]
        out.append({"center": "mean", **{k: self.mean.get(k, math.nan) for k in keys}})
        return out

    def markdown(self, keys: Sequence[str] = HEADLINE, digits: int = 3) -> str:
        return metrics_table(self.rows(keys), keys, digits)


def metrics_table(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], digits: int = 3,
                  first: str = "center") -> str:
    """A markdown table with a `first` column then one column per key."""
    lines = ["| " + " | ".join([first, *keys]) + " |",
             "|---|" + "---:|" * len(keys)]
    for row in rows:
        cells = [str(row.get(first, ""))]
        for k in keys:
            v = row.get(k, math.nan)
            cells.append(f"{v:.{digits}f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_over_centers(metrics: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Unweighted mean of each key over the centers that have a finite value for it."""
    metrics = list(metrics)
    keys = dict.fromkeys(k for m in metrics for k in m)
    out = {}
    for k in keys:
        values = [m[k] for m in metrics if k in m and math.isfinite(m[k])]
        out[k] = float(np.mean(values)) if values else math.nan
    return out


def encoded_studies(model: Any, batches: Iterable[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, F), labels (N, 14)): the encoder's features (eval mode) and the true label
    codes of every study of `batches` (what a center tunes its own head on)."""
    was_training = model.training
    model.eval()
    features, labels = [], []
    try:
        with torch.no_grad():
            for batch in batches:
                features.append(model.encode_features(batch).float().cpu())
                labels.append(batch["labels"].cpu())
    finally:
        model.train(was_training)
    if not features:
        raise EvaluationError("encoded_studies: the batches iterable yielded no batch")
    return torch.cat(features), torch.cat(labels)


def head_probabilities(model: Any, batches: Iterable[dict], head: Any = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(probs (N, 14, 4), labels (N, 14)): the diagnosis head's softmax (`head`, default the
    model's) and the true label codes over `batches` (what `fedmrg.eval.calibration` fits
    thresholds to)."""
    features, labels = encoded_studies(model, batches)
    head = model.diagnosis_head if head is None else head
    with torch.no_grad():
        logits = head(features.to(next(head.parameters()).device))
    return torch.softmax(logits.float(), dim=-1).cpu().numpy(), labels.numpy()


@torch.no_grad()
def evaluate_model(model: Any, batches: Iterable[dict], personalized: bool = False, *,
                   num_samples: int = 5, absent: str = "exclude", oracle_prompt: bool = False,
                   meteor: bool = True, thresholds: np.ndarray | None = None,
                   head: Any = None, **generation: Any) -> EvalResult:
    """Generate a report for every study of `batches` and score it (see the module docstring).

    `generation` overrides GENERATION_DEFAULTS (num_beams, max_new_tokens, min_new_tokens,
    repetition_penalty, no_repeat_ngram_size), passed to `model.generate`; build it from a
    config with `generation_kwargs(cfg.eval)`. `thresholds` (14,): the head's states come from
    `fedmrg.eval.calibration.calibrated_states` instead of its argmax (a center's
    calibration); `head`: the diagnosis head that writes the prompts (default
    `model.diagnosis_head_for(personalized)`; e.g. a center's own tuned copy,
    `fedmrg.model.head_tuning`). `meteor=False` leaves METEOR out (it needs a JVM per
    process: a validation point does without).
    """
    unknown = sorted(set(generation) - set(GENERATION_DEFAULTS))
    if unknown:
        raise EvaluationError(f"unknown generation argument {unknown[0]!r}; allowed: "
                              f"{sorted(GENERATION_DEFAULTS)}")
    gen = {**GENERATION_DEFAULTS, **generation}
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    reports: list[str] = []
    references: list[str] = []
    study_ids: list[str] = []
    labels, probs, states_all = [], [], []
    try:
        for batch in batches:
            features = model.encode_features(batch)  # (B, F)
            logits = (model.diagnosis_head_for(personalized) if head is None else head)(features)
            p = torch.softmax(logits.float(), dim=-1)  # (B, 14, 4)
            states = p.argmax(-1)  # (B, 14): what the prompt shows
            if thresholds is not None:
                states = torch.as_tensor(calibrated_states(p.cpu().numpy(), thresholds),
                                         device=p.device)
            prompt = batch["labels"].to(states.device) if oracle_prompt else states
            texts = model.generate(batch["images"], batch["view_mask"],
                                   personalized=personalized, states=prompt, **gen)
            reports += texts
            references += [str(r) for r in batch["report"]]
            study_ids += [str(s) for s in batch.get("study_id", [""] * len(texts))]
            labels.append(batch["labels"].cpu())
            probs.append(p.cpu())
            states_all.append(states.cpu())
    finally:
        model.train(was_training)
    if not reports:
        raise EvaluationError("evaluate_model: the batches iterable yielded no batch")
    metrics: dict[str, float] = {"num_studies": float(len(reports))}
    metrics.update(compute_nlg_metrics(references, reports, meteor=meteor))
    metrics.update(compute_repetition_metrics(reports))
    from fedmrg.data.labeler import label_reports  # the rule-based labeler, both sides

    reference_labels = label_reports(references)
    generated_labels = label_reports(reports)
    metrics.update(compute_ce_metrics(reference_labels, generated_labels, absent=absent))
    true = torch.cat(labels).numpy()
    metrics.update(compute_diagnosis_metrics(true, torch.cat(probs).numpy()))
    predicted = torch.cat(states_all).numpy()
    head_ce = compute_ce_metrics(true, predicted, absent=absent)
    metrics["diag_f1_macro"] = head_ce["ce_f1_macro"]
    metrics["diag_f1_micro"] = head_ce["ce_f1_micro"]
    samples = [{"study_id": study_ids[i], "reference": references[i],
                "generated": reports[i], "states": " ".join(map(str, predicted[i])),
                "findings": findings_text(predicted[i]), "true_findings": findings_text(true[i])}
               for i in range(min(num_samples, len(reports)))]
    bleu = bleu_statistics(references, reports)
    order = sorted(range(len(reports)), key=lambda i: study_ids[i])
    per_study = {"ce_labels": [[generated_labels[i].tolist(), reference_labels[i].tolist()]
                               for i in order],
                 "bleu": [bleu[i] for i in order]}
    return EvalResult(reports, references, study_ids, metrics, samples, predicted,
                      time.perf_counter() - start, per_study)


def first_studies(batches: Iterable[dict], n: int) -> Iterator[dict]:
    """The first `n` studies of `batches`: whole batches, the last one cut to size (a value
    with one entry per study is cut, anything else kept). The source is closed after (a
    suspended stream pass ends)."""
    if n < 1:
        raise EvaluationError(f"first_studies: n must be at least 1, got {n}")
    source = iter(batches)
    left = n
    try:
        for batch in source:
            size = len(batch["labels"])
            if size > left:
                batch = {k: v[:left] if _per_study(v, size) else v for k, v in batch.items()}
                size = left
            yield batch
            left -= size
            if left <= 0:
                break
    finally:
        close = getattr(source, "close", None)
        if callable(close):
            close()


def _per_study(value: Any, size: int) -> bool:
    return not isinstance(value, (str, bytes)) and hasattr(value, "__getitem__") and (
        hasattr(value, "__len__") and len(value) == size)


def _center_batches(source: Any) -> Iterable[dict]:
    """A CenterStream (anything with iter_batches) -> its epoch-0 pass; else the iterable."""
    if hasattr(source, "iter_batches"):
        return source.iter_batches(0)
    return source


def evaluate_centers(models: Any, streams_by_center: Mapping[str, Any],
                     personalized: bool = False, **kwargs: Any) -> CentersResult:
    """Evaluate per center, then average over centers.

    `models`: one model for every center (generalization: the generic model everywhere) or a
    mapping center -> model (personalization: each center's own model, usually with
    personalized=True). `streams_by_center`: center -> CenterStream or iterable of batches.
    `kwargs` go to `evaluate_model`.
    """
    if not streams_by_center:
        raise EvaluationError("evaluate_centers: no center to evaluate")
    per_center: dict[str, EvalResult] = {}
    for center, source in streams_by_center.items():
        if isinstance(models, Mapping):
            if center not in models:
                raise EvaluationError(f"evaluate_centers: no model for center {center!r}; "
                                      f"models are given for {sorted(models)}")
            model = models[center]
        else:
            model = models
        try:
            per_center[center] = evaluate_model(model, _center_batches(source), personalized,
                                                **kwargs)
        except EvaluationError as e:
            raise EvaluationError(f"center {center!r}: {e}") from e
    return CentersResult(per_center, mean_over_centers(r.metrics for r in per_center.values()))
