"""How repetitive generated reports are: distinct-n over the corpus and rep-4 per report.

A decoder that loops ("no heart is no heart is ... is is is") can still score BLEU against a
reference that shares its words; these numbers show the loop directly. Both work on the words
of `clean_report` (the text the NLG scorers see), full stops left out, n-grams taken inside
one report (never across two):

* ``distinct_1`` / ``distinct_2``: unique n-grams / n-grams over the whole generated corpus
  (Li et al., NAACL 2016). Low: the reports reuse the same few words or pairs.
* ``rep_4``: per report, 1 - unique 4-grams / 4-grams (the share of its 4-grams that repeat
  one it already had; Welleck et al., ICLR 2020 "seq-rep-4"), averaged over reports; a report
  shorter than 4 words counts 0. 0: no report repeats a 4-gram.

A corpus without any n-gram of a size (every report empty) gets distinct 0.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedmrg.eval.nlg import clean_report

REPETITION_KEYS: tuple[str, ...] = ("distinct_1", "distinct_2", "rep_4")


def report_words(text: str) -> list[str]:
    """The words of a cleaned report (full stops dropped)."""
    return [t for t in clean_report(text).split() if t != "."]


def ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def distinct_n(reports: Sequence[Sequence[str]], n: int) -> float:
    """Unique n-grams / n-grams over `reports` (lists of words), n-grams inside each report."""
    grams = [g for words in reports for g in ngrams(words, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_rate(words: Sequence[str], n: int = 4) -> float:
    """1 - unique n-grams / n-grams of one report; 0 when it has no n-gram."""
    grams = ngrams(words, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def compute_repetition_metrics(hypotheses: Sequence[str]) -> dict[str, float]:
    """`REPETITION_KEYS` of a corpus of generated reports (module docstring)."""
    if isinstance(hypotheses, (str, bytes)):
        raise TypeError("hypotheses must be a sequence of strings, not a single string")
    if not hypotheses:
        raise ValueError("hypotheses are empty; nothing to score")
    words = [report_words(t) for t in hypotheses]
    return {"distinct_1": distinct_n(words, 1), "distinct_2": distinct_n(words, 2),
            "rep_4": sum(repeated_ngram_rate(w, 4) for w in words) / len(words)}
