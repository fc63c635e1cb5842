"""Tests for the rule-based CheXpert-style labeler (fedmrg.data.labeler)."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest

from fedmrg.data.labeler import find_mentions, label_report, label_reports
from fedmrg.data.schema import (
    BLANK,
    LABEL_NAMES,
    NEGATIVE,
    NO_FINDING,
    NUM_OBSERVATIONS,
    OBSERVATIONS,
    POSITIVE,
    UNCERTAIN,
)


def _load_sentences():
    # tests/ is not a package and tests/conftest.py belongs to others: import by file path.
    path = Path(__file__).parent / "data" / "labeler_sentences.py"
    spec = importlib.util.spec_from_file_location("labeler_sentences", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SENTENCES = _load_sentences()
CASES = SENTENCES.CASES


def _param(case: tuple):
    text, expected = case[0], case[1]
    marks = [pytest.mark.xfail(reason=case[2], strict=True)] if len(case) > 2 else []
    short = " ".join(text.split())[:70]
    return pytest.param(text, expected, id=short, marks=marks)


def _diff(got: list[int], want: list[int]) -> dict[str, str]:
    return {
        OBSERVATIONS[i]: f"expected {LABEL_NAMES[w]}, got {LABEL_NAMES[g]}"
        for i, (g, w) in enumerate(zip(got, want, strict=True))
        if g != w
    }


@pytest.mark.parametrize(("text", "expected"), [_param(c) for c in CASES])
def test_sentence_labels(text: str, expected: dict[str, int]) -> None:
    want = SENTENCES.expected_vector(expected, OBSERVATIONS)
    got = label_report(text)
    assert got == want, _diff(got, want)


def test_sentence_set_is_large_and_covers_every_observation_and_state() -> None:
    assert len(CASES) >= 170
    assert len({c[0] for c in CASES}) == len(CASES), "duplicate sentences"
    seen = {name: set() for name in OBSERVATIONS}
    for case in CASES:
        for name, code in case[1].items():
            seen[name].add(code)
    for name in OBSERVATIONS:
        if name == "no finding":
            assert seen[name] == {POSITIVE, BLANK}, "no finding must be explicit in every case"
        else:
            assert {POSITIVE, NEGATIVE, UNCERTAIN} <= seen[name], (name, seen[name])
    assert all("no finding" in case[1] for case in CASES), "state no finding explicitly"


def test_per_observation_accuracy() -> None:
    cases = [c for c in CASES if len(c) == 2]  # xfail cases are reported by the benchmark
    want = np.array([SENTENCES.expected_vector(c[1], OBSERVATIONS) for c in cases])
    got = label_reports([c[0] for c in cases])
    accuracy = (want == got).mean(axis=0)
    for name, acc in zip(OBSERVATIONS, accuracy, strict=True):
        assert acc == 1.0, f"{name}: accuracy {acc:.3f}"


def test_label_reports_shape_dtype_and_order() -> None:
    texts = ["No pneumothorax.", "Small left pleural effusion.", "", "Moderate cardiomegaly."]
    out = label_reports(texts)
    assert out.shape == (4, NUM_OBSERVATIONS)
    assert out.dtype == np.int8
    for row, text in zip(out, texts, strict=True):
        assert row.tolist() == label_report(text)
    assert label_reports([]).shape == (0, NUM_OBSERVATIONS)
    assert label_reports(tuple(texts)).dtype == np.int8


@pytest.mark.parametrize("text", ["", "   ", "\n\t\n", "..."])
def test_empty_report_is_all_blank(text: str) -> None:
    assert label_report(text) == [BLANK] * NUM_OBSERVATIONS


def test_non_string_is_rejected() -> None:
    with pytest.raises(TypeError):
        label_report(None)  # type: ignore[arg-type]


def test_case_insensitive() -> None:
    for case in CASES[::3]:
        text = case[0]
        assert label_report(text.upper()) == label_report(text.lower()) == label_report(text)


def test_no_finding_convention() -> None:
    nf = NO_FINDING
    assert label_report("No acute cardiopulmonary abnormality.")[nf] == POSITIVE
    # support devices do not block no finding
    assert label_report("Endotracheal tube in good position. Lungs are clear.")[nf] == POSITIVE
    # any positive or uncertain finding blanks it; it is never negative
    assert label_report("Possible small left effusion.")[nf] == BLANK
    assert label_report("Small hiatal hernia.")[nf] == BLANK
    assert all(label_report(c[0])[nf] != NEGATIVE for c in CASES)


def test_sections_that_are_not_findings_are_ignored() -> None:
    report = "INDICATION: Rule out pneumonia.\nHISTORY: Fever.\nFINDINGS: No acute process."
    labels = label_report(report)
    assert labels[OBSERVATIONS.index("pneumonia")] == BLANK
    assert labels[NO_FINDING] == POSITIVE


def test_find_mentions_explains_labels() -> None:
    mentions = find_mentions("No pleural effusion. Possible small pneumothorax.")
    got = {(m.observation, m.code) for m in mentions}
    assert ("pleural effusion", NEGATIVE) in got
    assert ("pneumothorax", UNCERTAIN) in got
    assert find_mentions("") == []


def test_pathological_inputs_are_fast_and_safe() -> None:
    for text in ["no effusion, " * 3000, "heart " * 3000, "x" * 100_000, "a\x00b no effusion"]:
        t0 = time.perf_counter()
        labels = label_report(text)
        assert time.perf_counter() - t0 < 5.0
        assert len(labels) == NUM_OBSERVATIONS
