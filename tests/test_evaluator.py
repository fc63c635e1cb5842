"""evaluate_model / evaluate_centers on a tiny model: keys, CE through the labeler, per-center
and mean rows, generic vs personalized generation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import tiny_model_config

from fedmrg.data.schema import NUM_OBSERVATIONS, OBSERVATIONS
from fedmrg.eval.evaluator import (
    HEADLINE,
    CentersResult,
    EvalResult,
    EvaluationError,
    evaluate_centers,
    evaluate_model,
    mean_over_centers,
    metrics_table,
)
from fedmrg.eval.nlg import METRIC_KEYS
from fedmrg.model.base_lm import load_base_lm
from fedmrg.model.mrg import MRGModel

B, V, SIZE = 3, 2, 32
GEN = {"num_beams": 1, "max_new_tokens": 6}
REPORTS = (
    "The heart is enlarged, consistent with cardiomegaly. No pleural effusion.",
    "Small right pleural effusion. No pneumothorax.",
    "No acute cardiopulmonary process.",
    "Moderate cardiomegaly. Small left pneumothorax.",
    "Mild pulmonary edema. No pleural effusion.",
    "The lungs are clear.",
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: tiny models on a shared 2-core machine (see test_trainer.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> MRGModel:
    from fedmrg.data.phantom import neutral_corpus

    cfg = tiny_model_config(tmp_path_factory.mktemp("lm_cache"))
    lm, tok = load_base_lm(cfg, corpus=neutral_corpus(120, 0))
    return MRGModel.from_config(cfg, lm, tok, seed=0)


def make_batches(offset: int, n_batches: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(offset)
    out = []
    for b in range(n_batches):
        idx = [(offset + b * B + i) % len(REPORTS) for i in range(B)]
        out.append({
            "images": torch.randn(B, V, 1, SIZE, SIZE, generator=g),
            "view_mask": torch.tensor([[True, False], [True, True], [True, False]]),
            # deliberately NOT the reports' labels: CE must come from the labeler
            "labels": torch.randint(0, 4, (B, NUM_OBSERVATIONS), generator=g),
            "report": [REPORTS[i] for i in idx],
            "study_id": [f"s{offset}-{b}-{i}" for i in range(B)],
        })
    return out


def test_evaluate_model_returns_every_key_and_the_generations(model):
    batches = make_batches(0)
    result = evaluate_model(model, batches, personalized=False, num_samples=4, **GEN)
    n = B * len(batches)
    assert isinstance(result, EvalResult)
    assert len(result.reports) == len(result.references) == len(result.study_ids) == n
    assert result.references == [r for b in batches for r in b["report"]]
    assert result.study_ids == [s for b in batches for s in b["study_id"]]
    assert all(isinstance(r, str) for r in result.reports)
    keys = set(METRIC_KEYS) | {
        "num_studies", "ce_precision_micro", "ce_recall_micro", "ce_f1_micro",
        "ce_precision_macro", "ce_recall_macro", "ce_f1_macro", "ce_num_observations_macro",
        "diag_acc", "diag_auc", "diag_auc_num_observations",
    } | {f"ce_f1/{o}" for o in OBSERVATIONS}
    assert keys <= set(result.metrics), keys - set(result.metrics)
    assert set(HEADLINE) <= set(result.metrics)
    assert result.metrics["num_studies"] == n
    assert len(result.samples) == 4
    assert result.samples[0]["reference"] == result.references[0]
    assert result.samples[0]["generated"] == result.reports[0]
    assert result.predicted_states.shape == (n, NUM_OBSERVATIONS)


def test_per_study_items_recompute_the_corpus_metrics_in_study_id_order(model):
    from fedmrg.eval.bootstrap import bleu4_of_studies, ce_f1_macro_of_studies

    batches = make_batches(0)
    result = evaluate_model(model, batches, personalized=False, num_samples=0, meteor=False,
                            **GEN)
    n = len(result.reports)
    assert sorted(result.per_study) == ["bleu", "ce_labels"]
    assert len(result.per_study["ce_labels"]) == len(result.per_study["bleu"]) == n
    # the metrics of every study recomputed from the items equal the evaluation's own
    assert ce_f1_macro_of_studies(result.per_study["ce_labels"]) == pytest.approx(
        result.metrics["ce_f1_macro"], nan_ok=True)
    assert bleu4_of_studies(result.per_study["bleu"]) == pytest.approx(result.metrics["bleu4"])
    order = sorted(range(n), key=lambda i: result.study_ids[i])
    from fedmrg.data.labeler import label_report
    first = order[0]  # the first item is the smallest study id's
    assert result.per_study["ce_labels"][0] == [list(label_report(result.reports[first])),
                                                list(label_report(result.references[first]))]


def test_calibration_thresholds_decide_the_prompt_states(model):
    from fedmrg.data.schema import POSITIVE
    from fedmrg.eval.evaluator import head_probabilities

    batches = make_batches(0)
    probs, labels = head_probabilities(model, batches)
    assert probs.shape == (len(labels), NUM_OBSERVATIONS, 4)
    assert np.allclose(probs.sum(-1), 1.0, atol=1e-5)
    plain = evaluate_model(model, batches, num_samples=0, meteor=False, **GEN)
    assert np.array_equal(plain.predicted_states, probs.argmax(-1))
    everything = evaluate_model(model, batches, num_samples=0, meteor=False,
                                thresholds=np.zeros(NUM_OBSERVATIONS), **GEN)
    assert (everything.predicted_states == POSITIVE).all()  # threshold 0: every one positive


def test_evaluate_model_restores_training_mode_and_checks_arguments(model):
    model.train()
    evaluate_model(model, make_batches(0, 1), **GEN)
    assert model.training
    with pytest.raises(EvaluationError, match="unknown generation argument 'temperature'"):
        evaluate_model(model, make_batches(0, 1), temperature=0.7)
    with pytest.raises(EvaluationError, match="yielded no batch"):
        evaluate_model(model, [], **GEN)


def test_diagnosis_metrics_come_from_the_head_and_the_prompt_uses_its_argmax(model,
                                                                            monkeypatch):
    batches = make_batches(0, 1)
    with torch.no_grad():
        probs = torch.softmax(model.diagnosis_head(model.eval().encode_features(batches[0])),
                              -1)
    seen_states = []
    real_generate = model.generate

    def spy(images, view_mask, personalized=False, states=None, **kw):
        seen_states.append(states.clone())
        return real_generate(images, view_mask, personalized=personalized, states=states, **kw)

    monkeypatch.setattr(model, "generate", spy)
    result = evaluate_model(model, batches, **GEN)
    assert torch.equal(seen_states[0], probs.argmax(-1))
    assert np.array_equal(result.predicted_states, probs.argmax(-1).numpy())
    labels = batches[0]["labels"].numpy()
    expected_acc = (probs.argmax(-1).numpy() == labels).mean(0).mean()
    assert result.metrics["diag_acc"] == pytest.approx(expected_acc)


def test_ce_uses_the_labeler_on_generated_and_reference_reports(model, monkeypatch):
    batches = make_batches(0)
    lookup = iter([b["report"] for b in batches])
    monkeypatch.setattr(model, "generate", lambda *a, **k: list(next(lookup)))
    perfect = evaluate_model(model, batches, **GEN)  # generated == reference
    assert perfect.metrics["ce_f1_micro"] == 1.0 and perfect.metrics["ce_f1_macro"] == 1.0
    assert perfect.metrics["bleu4"] > 0.9
    # The batch labels are random and were ignored: the labeler read the text.
    assert perfect.metrics["ce_f1/cardiomegaly"] == 1.0
    monkeypatch.setattr(model, "generate", lambda images, *a, **k:
                        ["No acute cardiopulmonary process."] * len(images))
    normal = evaluate_model(model, batches, **GEN)
    # the labeler reads "no acute process" as "no finding": right for the normal references,
    # a miss for every finding
    assert normal.metrics["ce_f1/cardiomegaly"] == 0.0
    assert normal.metrics["ce_f1/pleural effusion"] == 0.0
    assert normal.metrics["ce_f1/no finding"] > 0.0
    assert 0.0 < normal.metrics["ce_recall_micro"] < 0.5
    assert normal.metrics["ce_f1_macro"] < 0.5


def test_evaluate_centers_per_center_and_mean_rows(model):
    streams = {"a": make_batches(0), "b": make_batches(3, 1)}
    result = evaluate_centers(model, streams, **GEN)
    assert isinstance(result, CentersResult)
    assert list(result.per_center) == ["a", "b"]
    assert result.per_center["b"].metrics["num_studies"] == B
    for key in ("bleu1", "ce_f1_micro", "diag_acc", "num_studies"):
        values = [result.per_center[c].metrics[key] for c in ("a", "b")]
        assert result.mean[key] == pytest.approx(np.mean(values))  # unweighted over centers
    rows = result.rows()
    assert [r["center"] for r in rows] == ["a", "b", "mean"]
    assert rows[-1]["bleu1"] == result.mean["bleu1"]
    table = result.markdown(("bleu1", "ce_f1_macro"))
    assert table.splitlines()[0] == "| center | bleu1 | ce_f1_macro |"
    assert table.splitlines()[-1].startswith("| mean | ")


class StreamLike:
    """Anything with iter_batches(epoch) is read like a CenterStream (epoch 0)."""

    def __init__(self, batches):
        self.batches, self.epochs = batches, []

    def iter_batches(self, epoch=0):
        self.epochs.append(epoch)
        return iter(self.batches)


def test_evaluate_centers_takes_streams_and_per_center_models(model):
    stream = StreamLike(make_batches(1, 1))
    result = evaluate_centers({"a": model}, {"a": stream}, **GEN)
    assert stream.epochs == [0] and result.per_center["a"].metrics["num_studies"] == B
    with pytest.raises(EvaluationError, match="no model for center 'b'"):
        evaluate_centers({"a": model}, {"b": make_batches(0, 1)}, **GEN)
    with pytest.raises(EvaluationError, match="center 'a': evaluate_model: the batches"):
        evaluate_centers(model, {"a": []}, **GEN)
    with pytest.raises(EvaluationError, match="no center"):
        evaluate_centers(model, {}, **GEN)


def test_personalized_and_generic_generation_differ_when_the_specialized_adapter_does(model):
    batches = make_batches(2, 1)
    before = evaluate_model(model, batches, personalized=True, **GEN).reports
    assert before == evaluate_model(model, batches, personalized=False, **GEN).reports  # B = 0
    g = torch.Generator().manual_seed(1)
    saved = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B.specialized." in name:
                saved[name] = p.detach().clone()
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    try:
        generic = evaluate_model(model, batches, personalized=False, **GEN).reports
        personal = evaluate_model(model, batches, personalized=True, **GEN).reports
    finally:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in saved:
                    p.copy_(saved[name])
    assert generic == before  # the generic model ignores the specialized adapter
    assert personal != generic


def test_mean_over_centers_skips_nan_and_table_formats():
    mean = mean_over_centers([{"x": 1.0, "y": math.nan}, {"x": 3.0, "y": 2.0}, {"x": 2.0}])
    assert mean == {"x": 2.0, "y": 2.0}
    assert math.isnan(mean_over_centers([{"z": math.nan}])["z"])
    table = metrics_table([{"center": "a", "x": 0.12345}], ["x"], digits=2)
    assert table.splitlines() == ["| center | x |", "|---|---:|", "| a | 0.12 |"]
