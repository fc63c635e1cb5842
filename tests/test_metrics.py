"""NLG and clinical-efficacy metrics against hand-computed values.

METEOR starts one JVM (a few seconds) that every test here shares through the module cache.
"""

from __future__ import annotations

import math
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from fedmrg.data.schema import BLANK, NEGATIVE, NUM_OBSERVATIONS, OBSERVATIONS, POSITIVE, UNCERTAIN
from fedmrg.eval import nlg
from fedmrg.eval.clinical import compute_ce_metrics, compute_diagnosis_metrics
from fedmrg.eval.nlg import METRIC_KEYS, clean_report, compute_nlg_metrics

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs java")

# Cleaned: "the cat sat on the mat ." / "there is no effusion ."
REFS = ["The cat sat on the mat.", "There is no effusion."]
# Cleaned: "the cat on the mat ." / "no no no effusion ."
HYPS = ["The cat on the mat.", "No no no effusion."]


def rouge_f(p: float, r: float, beta: float = 1.2) -> float:
    return (1 + beta**2) * p * r / (r + beta**2 * p)


@pytest.fixture(scope="module")
def scores() -> dict[str, float]:
    return compute_nlg_metrics(REFS, HYPS)


# --- cleaning ---------------------------------------------------------------------------------


def test_clean_report_examples():
    assert clean_report("1. The heart is normal.\n2. No effusion (left).") == (
        "the heart is normal . no effusion left ."
    )
    # Runs of dots/spaces/underscores collapse; quotes, slashes, brackets, ":" go; "-" stays.
    assert clean_report('Heart  size: "normal"..  Chest x-ray [PA/lat]___ ok') == (
        "heart size normal . chest x-ray palat ok ."
    )
    assert clean_report("No acute disease") == "no acute disease ."
    assert clean_report("") == ""
    assert clean_report(" .. \n ") == ""


def test_clean_report_is_idempotent():
    text = "FINDINGS: 1. Mild cardiomegaly. 2. Small left effusion; no pneumothorax."
    once = clean_report(text)
    assert once == "findings mild cardiomegaly . small left effusion no pneumothorax ."
    assert clean_report(once) == once


# --- NLG: hand-computed values ---------------------------------------------------------------


@needs_java
def test_bleu_by_hand(scores):
    # Pair 1: 6 hyp tokens all in the ref (1-gram 6/6); bigrams the-cat, on-the, the-mat, mat-.
    # match (4/5). Pair 2: "no" clipped to 1, so 1-grams 3/5; bigrams no-effusion, effusion-.
    # match (2/4). Corpus: 9/11 and 6/9; hyp length 11, closest ref lengths 7 + 5 = 12.
    bp = math.exp(1 - 12 / 11)
    assert scores["bleu1"] == pytest.approx(bp * 9 / 11, abs=1e-7)
    assert scores["bleu2"] == pytest.approx(bp * math.sqrt(9 / 11 * 6 / 9), abs=1e-7)


def test_bleu_statistics_sum_to_the_corpus_bleu4_of_any_subset():
    rng = np.random.default_rng(3)
    words = ["the", "heart", "is", "normal", "lungs", "clear", "no", "effusion", "mild",
             "cardiomegaly", ".", "seen"]
    refs = [" ".join(rng.choice(words, rng.integers(3, 25))) for _ in range(40)]
    hyps = [" ".join(rng.choice(words, rng.integers(0, 25))) for _ in range(40)]
    counts = nlg.bleu_statistics(refs, hyps)
    assert len(counts) == 40 and all(len(c) == nlg.BLEU_STATISTICS for c in counts)
    for subset in (range(40), range(0, 40, 3), [5, 5, 7, 30]):  # a resample repeats studies
        subset = list(subset)
        expected = compute_nlg_metrics([refs[i] for i in subset], [hyps[i] for i in subset],
                                       meteor=False)["bleu4"]
        assert nlg.bleu4_from_statistics([counts[i] for i in subset]) == pytest.approx(
            expected, rel=1e-12, abs=1e-15)
    # pair 2 by hand: "no no no effusion ." against "there is no effusion ."; "no" clipped to 1
    assert nlg.bleu_statistics(REFS, HYPS)[1] == [5, 5, 5, 4, 3, 2, 3, 2, 1, 0]
    with pytest.raises(ValueError, match="no reports"):
        nlg.bleu4_from_statistics([])


@needs_java
def test_rouge_l_by_hand(scores):
    # LCS: 6 of 6 hyp / 7 ref tokens; "no effusion ." = 3 of 5 / 5.
    expected = (rouge_f(1.0, 6 / 7) + rouge_f(3 / 5, 3 / 5)) / 2
    assert scores["rouge_l"] == pytest.approx(expected, abs=1e-9)


@needs_java
def test_identical_corpus_scores_perfect():
    refs = REFS + ["Mild cardiomegaly without edema.", "Left lower lobe atelectasis is seen."]
    out = compute_nlg_metrics(refs, list(refs))
    assert list(out) == list(METRIC_KEYS)
    for k in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "meteor"):
        assert out[k] == pytest.approx(1.0, abs=1e-6), k
    # Every report has n-grams the others lack, so each order has nonzero TF-IDF: 10 x cos 1.
    assert out["cider"] == pytest.approx(10.0, abs=1e-6)


@needs_java
def test_meteor_disjoint_is_zero(scores):
    # Uncleaned, so the two do not share the final " ." token.
    out = compute_nlg_metrics(["heart normal"], ["pneumothorax present"], clean=False)
    assert out["meteor"] == 0.0
    assert out["rouge_l"] == 0.0
    assert 0.0 < scores["meteor"] < 1.0


@needs_java
def test_empty_hypotheses_score_zero_without_crashing():
    out = compute_nlg_metrics(REFS, ["", "   "])
    assert all(v == pytest.approx(0.0, abs=1e-6) for v in out.values()), out
    # Uncleaned empty strings on both sides, where Cider alone would raise.
    out = compute_nlg_metrics(["", ""], ["", "x"], clean=False)
    assert set(out) == set(METRIC_KEYS)


@needs_java
def test_meteor_protocol_survives_newlines_and_separators():
    out = compute_nlg_metrics(["a ||| b\nc"], ["a b c"], clean=False)
    assert out["meteor"] == pytest.approx(1.0)


@needs_java
def test_concurrent_calls_share_one_meteor(scores):
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda _: compute_nlg_metrics(REFS, HYPS), range(3)))
    assert all(r == scores for r in results)


def test_missing_java_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(nlg, "_meteor", None)  # restored afterwards: the shared JVM survives
    monkeypatch.setattr(nlg.shutil, "which", lambda _name: None)
    with pytest.raises(RuntimeError, match="Java"):
        compute_nlg_metrics(REFS, HYPS)


@pytest.mark.parametrize(
    ("refs", "hyps", "exc"),
    [
        (REFS, HYPS[:1], ValueError),
        ([], [], ValueError),
        ("a report", "a report", TypeError),
        (REFS, ["ok", None], TypeError),
    ],
)
def test_nlg_input_errors(refs, hyps, exc):
    with pytest.raises(exc):
        compute_nlg_metrics(refs, hyps)


# --- clinical efficacy -------------------------------------------------------------------------


def ce_case() -> tuple[np.ndarray, np.ndarray]:
    """4 reports; observations 0-3 have positives, the other 10 have none (blank/neg/uncertain).

    obs 0: ref + in rows 0,1; hyp + in row 0        -> TP 1 FP 0 FN 1: P 1,  R 1/2, F1 2/3
    obs 1: + in every row on both sides             -> TP 4:           P 1,  R 1,   F1 1
    obs 2: ref + in row 0, hyp says uncertain there -> FN 1:           P 0*, R 0,   F1 0
    obs 3: ref uncertain in row 1, hyp + there      -> FP 1:           P 0,  R 0*,  F1 0
    (* zero division -> 0)
    """
    rng = np.random.default_rng(0)
    codes = np.array([BLANK, NEGATIVE, UNCERTAIN])
    ref = rng.choice(codes, size=(4, NUM_OBSERVATIONS)).astype(np.int8)
    hyp = rng.choice(codes, size=(4, NUM_OBSERVATIONS)).astype(np.int8)
    ref[:, :4] = NEGATIVE
    hyp[:, :4] = NEGATIVE
    ref[[0, 1], 0] = POSITIVE
    hyp[0, 0] = POSITIVE
    ref[:, 1] = POSITIVE
    hyp[:, 1] = POSITIVE
    ref[0, 2] = POSITIVE
    hyp[0, 2] = UNCERTAIN
    ref[1, 3] = UNCERTAIN
    hyp[1, 3] = POSITIVE
    return ref, hyp


def test_ce_micro_vs_macro_by_hand():
    ref, hyp = ce_case()
    out = compute_ce_metrics(ref, hyp)
    # Pooled: TP 5, FP 1, FN 2.
    assert out["ce_precision_micro"] == pytest.approx(5 / 6)
    assert out["ce_recall_micro"] == pytest.approx(5 / 7)
    assert out["ce_f1_micro"] == pytest.approx(10 / 13)
    # Macro over the 4 observations with any positive.
    assert out["ce_num_observations_macro"] == 4
    assert out["ce_precision_macro"] == pytest.approx((1 + 1 + 0 + 0) / 4)
    assert out["ce_recall_macro"] == pytest.approx((0.5 + 1 + 0 + 0) / 4)
    assert out["ce_f1_macro"] == pytest.approx((2 / 3 + 1 + 0 + 0) / 4)
    assert out["ce_f1/" + OBSERVATIONS[0]] == pytest.approx(2 / 3)
    assert out["ce_f1/" + OBSERVATIONS[1]] == 1.0
    assert math.isnan(out["ce_f1/" + OBSERVATIONS[4]])
    assert sum(k.startswith("ce_f1/") for k in out) == NUM_OBSERVATIONS


def test_ce_absent_zero_matches_sklearn():
    from sklearn.metrics import precision_recall_fscore_support

    ref, hyp = ce_case()
    out = compute_ce_metrics(ref, hyp, absent="zero")
    assert out["ce_num_observations_macro"] == NUM_OBSERVATIONS
    assert out["ce_f1_macro"] == pytest.approx((2 / 3 + 1) / NUM_OBSERVATIONS)
    y, h = ref == POSITIVE, hyp == POSITIVE
    for avg in ("micro", "macro"):
        p, r, f, _ = precision_recall_fscore_support(y, h, average=avg, zero_division=0)
        assert out[f"ce_precision_{avg}"] == pytest.approx(p)
        assert out[f"ce_recall_{avg}"] == pytest.approx(r)
        assert out[f"ce_f1_{avg}"] == pytest.approx(f)
    assert out["ce_f1/" + OBSERVATIONS[4]] == 0.0


def test_ce_no_positives_anywhere():
    neg = np.full((3, NUM_OBSERVATIONS), NEGATIVE)
    out = compute_ce_metrics(neg, neg)
    assert out["ce_f1_micro"] == 0.0
    assert out["ce_f1_macro"] == 0.0
    assert out["ce_num_observations_macro"] == 0


def test_ce_input_errors():
    ok = np.zeros((2, NUM_OBSERVATIONS), dtype=np.int8)
    with pytest.raises(ValueError, match="shape"):
        compute_ce_metrics(ok, np.zeros((3, NUM_OBSERVATIONS), dtype=np.int8))
    with pytest.raises(ValueError, match="shape"):
        compute_ce_metrics(ok[:, :13], ok[:, :13])
    with pytest.raises(ValueError, match="empty"):
        compute_ce_metrics(ok[:0], ok[:0])
    with pytest.raises(ValueError, match="codes"):
        compute_ce_metrics(ok - 1, ok)  # CheXpert's -1 for uncertain is not our code
    with pytest.raises(ValueError, match="absent"):
        compute_ce_metrics(ok, ok, absent="ignore")


def test_diagnosis_metrics_by_hand():
    true = np.full((4, NUM_OBSERVATIONS), NEGATIVE)
    true[[0, 1], 0] = POSITIVE
    probs = np.zeros((4, NUM_OBSERVATIONS, 4))
    probs[:, :, NEGATIVE] = 1.0  # right everywhere but observation 0
    probs[:, 0] = [
        [0.10, 0.60, 0.20, 0.10],  # positive, argmax positive: right
        [0.10, 0.30, 0.50, 0.10],  # positive, argmax negative: wrong
        [0.10, 0.35, 0.45, 0.10],  # negative: right
        [0.05, 0.10, 0.80, 0.05],  # negative: right
    ]
    out = compute_diagnosis_metrics(true, probs)
    assert out["diag_acc"] == pytest.approx((0.75 + 13) / 14)
    # Positive scores {0.6, 0.3} vs negative {0.35, 0.1}: 3 of 4 pairs ranked right.
    assert out["diag_auc"] == pytest.approx(0.75)
    assert out["diag_auc_num_observations"] == 1
    with pytest.raises(ValueError, match="probs"):
        compute_diagnosis_metrics(true, probs[:, :, :3])


def test_ce_from_reports_uses_labeler():
    labeler = pytest.importorskip("fedmrg.data.labeler")
    from fedmrg.eval.clinical import compute_ce_from_reports

    refs = [
        "There is a large right pleural effusion. The heart is enlarged.",
        "No acute cardiopulmonary process.",
        "Right lower lobe consolidation concerning for pneumonia.",
    ]
    hyps = ["The heart is enlarged.", "No acute cardiopulmonary process.", "Lungs are clear."]
    out = compute_ce_from_reports(refs, hyps)
    expected = compute_ce_metrics(labeler.label_reports(refs), labeler.label_reports(hyps))
    assert out.keys() == expected.keys()
    assert all(
        out[k] == expected[k] or (math.isnan(out[k]) and math.isnan(expected[k])) for k in out
    )
    same = compute_ce_from_reports(refs, refs)
    assert same["ce_f1_micro"] == 1.0 and same["ce_f1_macro"] == 1.0
    with pytest.raises(ValueError):
        compute_ce_from_reports(refs, hyps[:2])
