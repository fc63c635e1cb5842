"""Decoding remedies for repetitive reports, measured on one finished run's saved models.

Usage: ``python benchmarks/decoding.py RUN_DIR [--variant NAME:KEY=VALUE,KEY=VALUE ...]
[--split test] [--out-dir benchmarks/results/decoding]``

RUN_DIR is a finished run's folder (`<tracking.storage_path>/<run name>`, e.g. after
``fedmrg run --run-name decode-base``). Every variant re-evaluates the same saved models with
`fedmrg.experiment.evaluate_run` (what ``fedmrg evaluate RUN_DIR --set eval.KEY=VALUE`` does),
only the generation settings changing: greedy decoding as in the run, then no-repeat n-grams
(`eval.no_repeat_ngram_size`) and a repetition penalty (`eval.repetition_penalty`).

Reported per variant and view (generalization: the generic model on every center;
personalization: each center's own model), as the mean over the run's centers: CE-F1 macro,
BLEU-4, distinct-1/2 and rep-4 (`fedmrg.eval.repetition`), and the change from the first
variant with its spread over centers (the standard error of the per-center differences: the
same models and studies, so the differences are paired). The test split's reference reports
get the same repetition numbers (what a report written by a person looks like). Writes
`decoding.json` and `decoding.md` in --out-dir.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import _common  # noqa: F401  (first: sets the environment before torch loads)
import numpy as np

from fedmrg.choices import View, choice_values

DEFAULT_OUT = _common.RESULTS / "decoding"
# Each variant sets both remedies, so the table does not depend on the run's config defaults.
VARIANTS = (
    "plain:eval.no_repeat_ngram_size=0,eval.repetition_penalty=1.0",
    "no-repeat-3:eval.no_repeat_ngram_size=3,eval.repetition_penalty=1.0",
    "no-repeat-4:eval.no_repeat_ngram_size=4,eval.repetition_penalty=1.0",
    "penalty-1.2:eval.no_repeat_ngram_size=0,eval.repetition_penalty=1.2",
    "no-repeat-3+penalty-1.2:eval.no_repeat_ngram_size=3,eval.repetition_penalty=1.2",
    "no-repeat-4+penalty-1.2:eval.no_repeat_ngram_size=4,eval.repetition_penalty=1.2",
)
KEYS = ("ce_f1_macro", "bleu4", "distinct_1", "distinct_2", "rep_4")
VIEWS = tuple(choice_values(View))


def parse_variant(text: str) -> tuple[str, list[str]]:
    """`name:eval.a=1,eval.b=2` -> ("name", ["eval.a=1", "eval.b=2"])."""
    name, _, rest = text.partition(":")
    if not name:
        raise SystemExit(f"--variant {text!r}: expected NAME:KEY=VALUE[,KEY=VALUE]")
    return name, [o for o in rest.split(",") if o]


def reference_repetition(run_dir: Path, split: str, centers: Sequence[str]) -> dict[str, float]:
    """The repetition metrics of the split's reference reports, mean over `centers`."""
    import pyarrow.parquet as pq

    from fedmrg.config import load_config
    from fedmrg.data.shards import center_files, read_manifest
    from fedmrg.eval.repetition import compute_repetition_metrics

    root = load_config(str(run_dir / "config.yaml")).data.root
    manifest = read_manifest(root)
    per_center = []
    for center in centers:
        reports = []
        for path in center_files(root, center, manifest):
            table = pq.read_table(path, columns=["split", "report"])
            reports += [r for s, r in zip(table.column("split").to_pylist(),
                                          table.column("report").to_pylist(), strict=True)
                        if s == split]
        per_center.append(compute_repetition_metrics(reports))
    return {k: float(np.mean([m[k] for m in per_center])) for k in per_center[0]}


def paired_change(base: dict[str, dict[str, float]], other: dict[str, dict[str, float]],
                  centers: Sequence[str], key: str) -> dict[str, float]:
    """Mean over centers of other - base, and the standard error of those differences."""
    diffs = [other[c][key] - base[c][key] for c in centers
             if math.isfinite(other[c].get(key, math.nan)) and math.isfinite(base[c].get(key,
                                                                                       math.nan))]
    if not diffs:
        return {"mean": math.nan, "se": math.nan}
    se = float(np.std(diffs, ddof=1) / math.sqrt(len(diffs))) if len(diffs) > 1 else math.nan
    return {"mean": float(np.mean(diffs)), "se": se}


def run(run_dir: Path, variants: Sequence[str], split: str) -> dict[str, Any]:
    import json

    from fedmrg.config import load_config
    from fedmrg.eval.evaluator import mean_over_centers
    from fedmrg.experiment import evaluate_run

    run_dir = run_dir.expanduser().resolve()
    # the run's participating centers: its summary's, else those with a saved model
    summary = run_dir / "summary.json"
    centers = (list(json.loads(summary.read_text())["centers"]) if summary.is_file()
               else sorted(p.name for p in (run_dir / "models").iterdir() if p.is_dir()))
    cfg = load_config(str(run_dir / "config.yaml"))
    results = []
    for i, text in enumerate(variants):
        name, overrides = parse_variant(text)
        start = time.perf_counter()
        out = evaluate_run(run_dir, split=split, overrides=overrides, connect_ray=i == 0)
        wall = time.perf_counter() - start
        row = {"name": name, "overrides": overrides, "wall_s": wall}
        for view in VIEWS:
            per_center = {c: {k: m.get(k, math.nan) for k in KEYS}
                          for c, m in out[view]["per_center"].items()}
            mean = mean_over_centers(per_center[c] for c in centers)
            row[view] = {"mean": {k: mean.get(k, math.nan) for k in KEYS},
                         "per_center": per_center}
        row["samples"] = out["samples"]  # eval.samples per center and view
        results.append(row)
        print(f"{name}: {wall:.0f} s; " + "; ".join(
            f"{view} " + ", ".join(f"{k} {row[view]['mean'][k]:.3f}" for k in KEYS)
            for view in VIEWS), flush=True)
    base = results[0]
    for row in results:
        row["change"] = {view: {k: paired_change(base[view]["per_center"],
                                                 row[view]["per_center"], centers, k)
                                for k in KEYS} for view in VIEWS}
    return {"run_dir": str(run_dir), "split": split, "centers": centers,
            "run_eval_settings": {k: getattr(cfg.eval, k) for k in (
                "num_beams", "max_new_tokens", "min_new_tokens", "repetition_penalty",
                "no_repeat_ngram_size")},
            "references": reference_repetition(run_dir, split, centers),
            "variants": results}


def markdown(record: dict[str, Any]) -> str:
    header = ["variant", "view", *KEYS, "Δ ce_f1_macro (±se)", "Δ bleu4 (±se)"]
    rows = []
    for row in record["variants"]:
        for view in VIEWS:
            mean, change = row[view]["mean"], row["change"][view]
            rows.append([row["name"], view, *(f"{mean[k]:.3f}" for k in KEYS),
                         *(f"{change[k]['mean']:+.3f} ± {change[k]['se']:.3f}"
                           for k in ("ce_f1_macro", "bleu4"))])
    ref = record["references"]
    rows.append(["reference reports", "-", "-", "-",
                 *(f"{ref[k]:.3f}" for k in ("distinct_1", "distinct_2", "rep_4")), "-", "-"])
    lines = [f"Decoding variants on the saved models of `{record['run_dir']}` "
             f"({record['split']} split, mean over centers {', '.join(record['centers'])}; "
             f"Δ: change from `{record['variants'][0]['name']}`, ± the standard error of the "
             f"per-center differences)." + (f" {record['note']}" if record.get("note") else ""),
             "", _common.markdown_table(header, rows, "ll" +
                                                                      "r" * (len(header) - 2))]
    worst = worst_sample(record["variants"][0]["samples"])
    if worst is not None:
        lines += ["", f"The most repetitive sample report of `{record['variants'][0]['name']}` "
                      f"({worst['view']}, center {worst['center']}, study {worst['study_id']}) "
                      f"under each variant:", ""]
        for row in record["variants"]:
            same = [s for s in row["samples"] if (s["center"], s["view"], s["study_id"]) == (
                worst["center"], worst["view"], worst["study_id"])]
            if same:
                lines.append(f"- {row['name']}: \"{same[0]['generated']}\"")
        lines.append(f"- reference: \"{worst.get('reference', '')}\"")
    return "\n".join(lines) + "\n"


def worst_sample(samples: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The sample whose generated report repeats the largest share of its 4-grams."""
    from fedmrg.eval.repetition import repeated_ngram_rate, report_words

    if not samples:
        return None
    return max(samples, key=lambda s: repeated_ngram_rate(report_words(s["generated"]), 4))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--variant", action="append", dest="variants",
                        help="NAME:eval.KEY=VALUE[,eval.KEY=VALUE] (repeatable; the first is "
                             "the baseline); default: " + " ".join(VARIANTS))
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--note", default="", help="how RUN_DIR was made (kept in the record)")
    args = parser.parse_args(argv)
    record = run(args.run_dir, args.variants or VARIANTS, args.split)
    record["note"] = args.note
    record["command"] = _common.command_line("decoding.py", argv)
    record["machine"] = _common.machine_info()
    _common.write_json(args.out_dir / "decoding.json", record)
    text = markdown(record)
    (args.out_dir / "decoding.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
