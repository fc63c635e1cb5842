"""Per-observation accuracy of the rule-based labeler on the hand-written sentence set.

Usage: ``python benchmarks/labeler_accuracy.py [--out benchmarks/results/labeler_accuracy.json]``

Prints a markdown table (accuracy per observation over all cases, and per observation over the
cases where the expected label is not blank) plus the exact-match rate (all 14 codes right),
and writes the same numbers as JSON. The cases live in ``tests/data/labeler_sentences.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

from fedmrg.data.labeler import label_report
from fedmrg.data.schema import BLANK, LABEL_NAMES, OBSERVATIONS

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = ROOT / "tests" / "data" / "labeler_sentences.py"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "labeler_accuracy.json"


def load_cases(path: Path = SENTENCES) -> ModuleType:
    """Import the sentence module from its file path (``tests/`` is not a package)."""
    spec = importlib.util.spec_from_file_location("labeler_sentences", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def evaluate(cases: list[tuple], observations: tuple[str, ...] = OBSERVATIONS) -> dict:
    """Accuracy per observation, exact-match rate and the list of mismatching cases."""
    n = len(cases)
    correct = [0] * len(observations)
    mentioned = [0] * len(observations)
    mentioned_correct = [0] * len(observations)
    exact = 0
    failures = []
    for case in cases:
        text, expected = case[0], case[1]
        want = [expected.get(name, BLANK) for name in observations]
        got = label_report(text)
        for i, (w, g) in enumerate(zip(want, got, strict=True)):
            correct[i] += w == g
            if w != BLANK:
                mentioned[i] += 1
                mentioned_correct[i] += w == g
        if want == got:
            exact += 1
        else:
            failures.append(
                {
                    "text": text,
                    "xfail": case[2] if len(case) > 2 else None,
                    "diff": {
                        observations[i]: {"expected": LABEL_NAMES[w], "got": LABEL_NAMES[g]}
                        for i, (w, g) in enumerate(zip(want, got, strict=True))
                        if w != g
                    },
                }
            )
    per_obs = {
        name: {
            "accuracy": correct[i] / n,
            "n_not_blank": mentioned[i],
            "accuracy_not_blank": (mentioned_correct[i] / mentioned[i]) if mentioned[i] else None,
        }
        for i, name in enumerate(observations)
    }
    return {
        "n_cases": n,
        "exact_match": exact / n,
        "mean_accuracy": sum(correct) / (n * len(observations)),
        "per_observation": per_obs,
        "failures": failures,
    }


def markdown_table(result: dict) -> str:
    """The result as a markdown table."""
    lines = [
        "| observation | accuracy (all cases) | expected not blank | accuracy (not blank) |",
        "|---|---|---|---|",
    ]
    for name, r in result["per_observation"].items():
        nb = "n/a" if r["accuracy_not_blank"] is None else f"{r['accuracy_not_blank']:.1%}"
        lines.append(f"| {name} | {r['accuracy']:.1%} | {r['n_not_blank']} | {nb} |")
    lines.append(f"| **all (mean)** | {result['mean_accuracy']:.1%} | | |")
    lines.append("")
    lines.append(
        f"Exact match (all 14 labels right): {result['exact_match']:.1%} "
        f"of {result['n_cases']} cases."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    args = parser.parse_args(argv)
    cases = load_cases().CASES
    result = evaluate(cases)
    print(markdown_table(result))
    for f in result["failures"]:
        print(f"\nMISMATCH{' (xfail: ' + f['xfail'] + ')' if f['xfail'] else ''}: {f['text']!r}")
        for name, d in f["diff"].items():
            print(f"  {name}: expected {d['expected']}, got {d['got']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
