"""Natural-language-generation metrics for generated reports, computed the way MRG papers do.

R2Gen (Chen et al., EMNLP 2020) and the papers built on its pipeline (R2GenCMN, PromptMRG, ...)
clean every report with `clean_report_mimic_cxr`, feed the cleaned, space-separated text straight
to the pycocoevalcap scorers (no PTBTokenizer, which would also need Java and re-tokenize the
already-tokenized text) and report corpus-level scores:

* BLEU-1..4: ``Bleu(4)``, corpus BLEU with the "closest" reference length for the brevity penalty.
* METEOR: METEOR 1.5 (``meteor-1.5.jar`` shipped with pycocoevalcap, ``-l en -norm``), the
  aggregate score over the corpus (not the mean of per-report scores). Needs a ``java`` on PATH.
* ROUGE-L: ``Rouge``, mean over reports of the LCS F-measure with beta = 1.2.
* CIDEr: ``Cider`` (CIDEr-D style, sigma = 6, x10), whose IDF comes from the evaluated references,
  so it depends on the whole corpus; with a single report every IDF is 0 and so is CIDEr.

There is one reference per report. `bleu_statistics` gives each report's BLEU counts (its length,
its reference's, the n-grams it guessed and matched); summed over any subset of reports they
give that subset's corpus BLEU-4 exactly (`bleu4_from_statistics`): what a bootstrap over
test studies resamples (`fedmrg.eval.bootstrap`). The METEOR JVM takes a few seconds to
start, so one process per Python process is kept and reused (under a lock); it is closed at
exit or by `close_meteor`.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.bleu.bleu_scorer import BleuScorer
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

__all__ = ["METRIC_KEYS", "bleu4_from_statistics", "bleu_statistics", "clean_report",
           "close_meteor", "compute_nlg_metrics"]

METRIC_KEYS: tuple[str, ...] = (
    "bleu1",
    "bleu2",
    "bleu3",
    "bleu4",
    "meteor",
    "rouge_l",
    "cider",
)

# R2Gen strips numbered-list markers ("1. ... 2. ...") before splitting into sentences; the order
# of these replacements matters and is R2Gen's.
_LIST_MARKERS: tuple[tuple[str, str], ...] = (
    ("1. ", ""),
    (". 2. ", ". "),
    (". 3. ", ". "),
    (". 4. ", ". "),
    (". 5. ", ". "),
    (" 2. ", ". "),
    (" 3. ", ". "),
    (" 4. ", ". "),
    (" 5. ", ". "),
)
# R2Gen's sentence cleaner uses the class `[.,?;*!%^&_+():-\[\]{}]`, in which `:-\[` is a range
# (":" .. "["), so it also drops `<=>@` (and A-Z, already lower-cased) but keeps "-" ("x-ray").
# Spelled out here with the same effect on lower-cased text.
_SENTENCE_NOISE = re.compile(r"[.,?;*!%^&_+():<=>@\[\]{}]")
_SENTENCE_DROP = str.maketrans("", "", "\"/\\'")


def _collapse(text: str, pair: str) -> str:
    """Replace runs of `pair`'s character by one (R2Gen does a fixed number of passes)."""
    single = pair[0]
    while pair in text:
        text = text.replace(pair, single)
    return text


def clean_report(text: str) -> str:
    """Clean a report as R2Gen's `clean_report_mimic_cxr` does, returning scorer-ready text.

    Newlines become spaces, runs of "_", " " and "." are collapsed, numbered-list markers are
    dropped, the text is lower-cased and split into sentences on ". ", each sentence loses its
    punctuation noise (see `_SENTENCE_NOISE`, plus quotes, slashes and apostrophes), and the
    sentences are joined as "s1 . s2 . sn ." with single spaces between tokens (what R2Gen's
    tokenizer round trip hands to the scorers). As in R2Gen, empty sentences inside a report are
    kept (as extra "." tokens). One deliberate difference: a report with no words at all cleans
    to "" rather than R2Gen's ".", so an empty generation gets no credit for a full stop.

    >>> clean_report("1. The heart is normal.\\n2. No effusion (left).")
    'the heart is normal . no effusion left .'
    """
    if not isinstance(text, str):
        raise TypeError(f"clean_report expects str, got {type(text).__name__}")
    text = text.replace("\n", " ")
    text = _collapse(text, "__")
    text = _collapse(text, "  ")
    text = _collapse(text, "..")
    for old, new in _LIST_MARKERS:
        text = text.replace(old, new)
    sentences = text.strip().lower().split(". ")
    cleaned = [
        _SENTENCE_NOISE.sub("", s.translate(_SENTENCE_DROP).strip().lower()) for s in sentences
    ]
    tokens = (" . ".join(cleaned) + " .").split()
    return "" if all(t == "." for t in tokens) else " ".join(tokens)


def _check_corpus(references: Sequence[str], hypotheses: Sequence[str]) -> None:
    for name, texts in (("references", references), ("hypotheses", hypotheses)):
        # A bare string is a Sequence[str] too, and scoring its characters is never intended.
        if isinstance(texts, (str, bytes)):
            raise TypeError(f"{name} must be a sequence of strings, not a single string")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"{name}[{i}] is {type(t).__name__}, expected str")
    if len(references) != len(hypotheses):
        raise ValueError(
            f"references and hypotheses differ in length: {len(references)} != {len(hypotheses)}"
        )
    if len(references) == 0:
        raise ValueError("references and hypotheses are empty; nothing to score")


def _one_line(text: str) -> str:
    """Single-spaced text with no newline or "|||" (they would break METEOR's stdio protocol)."""
    return " ".join(text.replace("|||", " ").split())


class _MeteorProcess:
    """A METEOR 1.5 JVM driven over pycocoevalcap's stdio protocol (SCORE/EVAL lines)."""

    def __init__(self) -> None:
        java = shutil.which("java")
        if java is None:
            raise RuntimeError(
                "METEOR needs a Java runtime (Java 8 or newer) but no `java` is on PATH; "
                "install one (e.g. `apt-get install openjdk-17-jre-headless`)"
            )
        import pycocoevalcap.meteor.meteor as meteor_module

        jar_dir = Path(meteor_module.__file__).resolve().parent
        if not (jar_dir / "meteor-1.5.jar").is_file():
            raise RuntimeError(f"meteor-1.5.jar not found in {jar_dir}; reinstall pycocoevalcap")
        # stderr goes to a file, not a pipe: nobody drains it, and a full pipe would hang the JVM.
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        # Same command line as pycocoevalcap's Meteor, so scores match published ones.
        self._proc = subprocess.Popen(
            [java, "-jar", "-Xmx2G", "meteor-1.5.jar", "-", "-", "-stdio", "-l", "en", "-norm"],
            cwd=jar_dir,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        self.pid = os.getpid()

    def alive(self) -> bool:
        return self._proc.poll() is None

    def _stderr_tail(self) -> str:
        try:
            self._stderr.seek(0)
            return self._stderr.read().decode(errors="replace")[-2000:]
        except (OSError, ValueError):
            return ""

    def _ask(self, line: str) -> None:
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write((line + "\n").encode())
            self._proc.stdin.flush()
        except BrokenPipeError as err:
            raise RuntimeError(f"METEOR (java) died: {self._stderr_tail()}") from err

    def _answer(self) -> str:
        assert self._proc.stdout is not None
        out = self._proc.stdout.readline()
        if not out:  # EOF: the JVM is gone (bad java, out of memory, killed)
            try:
                code = self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                code = None
            raise RuntimeError(
                f"METEOR (java) stopped answering, exit code {code}: {self._stderr_tail()}"
            )
        return out.decode().strip()

    def score(self, references: Sequence[str], hypotheses: Sequence[str]) -> float:
        """Corpus METEOR: per-pair statistics, then one EVAL over all of them."""
        stats = []
        for ref, hyp in zip(references, hypotheses, strict=True):
            # One round trip per pair: writing everything first could fill both pipes and
            # deadlock.
            self._ask(f"SCORE ||| {_one_line(ref)} ||| {_one_line(hyp)}")
            stats.append(self._answer())
        self._ask("EVAL ||| " + " ||| ".join(stats))
        for _ in stats:  # per-pair scores, unused
            self._answer()
        return float(self._answer())

    def close(self) -> None:
        if self.pid != os.getpid():
            return  # inherited over fork: the JVM belongs to the parent
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):  # a dead JVM: broken pipe
                self._proc.stdin.close()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._stderr.close()


_meteor: _MeteorProcess | None = None
_meteor_lock = threading.Lock()


def close_meteor() -> None:
    """Stop the cached METEOR JVM, if any (also run at interpreter exit)."""
    global _meteor
    with _meteor_lock:
        if _meteor is not None:
            _meteor.close()
            _meteor = None


atexit.register(close_meteor)


def _meteor_score(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    global _meteor
    with _meteor_lock:  # the JVM speaks one conversation at a time
        if _meteor is not None and (_meteor.pid != os.getpid() or not _meteor.alive()):
            _meteor.close()
            _meteor = None
        if _meteor is None:
            _meteor = _MeteorProcess()
        try:
            return _meteor.score(references, hypotheses)
        except BaseException:
            # The conversation may be out of step now; never reuse this JVM.
            _meteor.close()
            _meteor = None
            raise


def _prepared(references: Sequence[str], hypotheses: Sequence[str], clean: bool
              ) -> tuple[list[str], list[str]]:
    """The texts as the scorers get them: cleaned (`clean_report`) or only single-spaced."""
    _check_corpus(references, hypotheses)
    prepare = clean_report if clean else (lambda t: " ".join(t.split()))
    return [prepare(t) for t in references], [prepare(t) for t in hypotheses]


# A report's BLEU counts: [its length, its reference's length, guessed 1..4-grams, matched
# 1..4-grams] (pycocoevalcap's BleuScorer bookkeeping, one reference per report)
BLEU_STATISTICS = 10
_BLEU_N = 4


def bleu_statistics(references: Sequence[str], hypotheses: Sequence[str], *,
                    clean: bool = True) -> list[list[int]]:
    """Each report's BLEU counts (`BLEU_STATISTICS` integers, module docstring), prepared as
    `compute_nlg_metrics` prepares them."""
    refs, hyps = _prepared(references, hypotheses, clean)
    scorer = BleuScorer(n=_BLEU_N)
    for ref, hyp in zip(refs, hyps, strict=True):
        scorer += (hyp, [ref])
    out = []
    for comps, (ref_lengths, _) in zip(scorer.ctest, scorer.crefs, strict=True):
        testlen = comps["testlen"]
        # "closest" reference length, as Bleu.compute_score uses (one reference: its length)
        reflen = min((abs(n - testlen), n) for n in ref_lengths)[1]
        out.append([int(testlen), int(reflen), *map(int, comps["guess"]),
                    *map(int, comps["correct"])])
    return out


def bleu4_from_statistics(statistics: Sequence[Sequence[int]]) -> float:
    """Corpus BLEU-4 of the reports whose `bleu_statistics` these are: the same number
    `compute_nlg_metrics` gives for them (pycocoevalcap's formula and smoothing constants)."""
    if not statistics:
        raise ValueError("bleu4_from_statistics: no reports")
    total = [sum(column) for column in zip(*statistics, strict=True)]
    if len(total) != BLEU_STATISTICS:
        raise ValueError(f"bleu4_from_statistics: {len(total)} counts per report, expected "
                         f"{BLEU_STATISTICS}")
    testlen, reflen = total[0], total[1]
    guess, correct = total[2:2 + _BLEU_N], total[2 + _BLEU_N:]
    tiny, small = 1e-15, 1e-9  # BleuScorer's: a zero match count gives 0, never a division error
    bleu = 1.0
    for k in range(_BLEU_N):
        bleu *= (correct[k] + tiny) / (guess[k] + small)
    bleu **= 1.0 / _BLEU_N
    ratio = (testlen + tiny) / (reflen + small)
    return float(bleu * math.exp(1 - 1 / ratio) if ratio < 1 else bleu)


def compute_nlg_metrics(
    references: Sequence[str], hypotheses: Sequence[str], *, clean: bool = True,
    meteor: bool = True,
) -> dict[str, float]:
    """Corpus-level BLEU-1..4, METEOR, ROUGE-L and CIDEr of `hypotheses` against `references`.

    Pairs are aligned by position, one reference each. With `clean` (the default) both sides go
    through `clean_report` first; pass ``clean=False`` only for text already cleaned that way.
    Empty hypotheses score 0 rather than failing. Returns floats under `METRIC_KEYS`
    (without "meteor" when `meteor=False`: no JVM is started, e.g. for a cheap validation).
    """
    refs, hyps = _prepared(references, hypotheses, clean)
    gts = {i: [r] for i, r in enumerate(refs)}
    res = {i: [h] for i, h in enumerate(hyps)}

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    # Rouge splits on " ", so "" is one empty token that matches nothing: score 0, no crash.
    rouge_l, _ = Rouge().compute_score(gts, res)
    # Cider takes the max document frequency over reference n-grams, which fails when no
    # reference has a single token; every score is 0 then anyway.
    cider = Cider().compute_score(gts, res)[0] if any(refs) else 0.0

    out = {
        "bleu1": float(bleu[0]),
        "bleu2": float(bleu[1]),
        "bleu3": float(bleu[2]),
        "bleu4": float(bleu[3]),
        "meteor": float(_meteor_score(refs, hyps)) if meteor else None,
        "rouge_l": float(rouge_l),
        "cider": float(cider),
    }
    return {k: v for k, v in out.items() if v is not None}
