"""The personalized path with the diagnosis head calibrated or tuned per center, against without.

Usage: ``python benchmarks/calibration.py RUN_DIR [RUN_DIR ...] [--out
benchmarks/results/calibration.json]``

Each RUN_DIR is a finished run's folder (`<tracking.storage_path>/<run name>`), e.g. the
fedmrg seeds of `benchmarks/fl_mrg.py --preset evidence`. Every run's personalized models are
evaluated twice on the test split of every participating center, with
`fedmrg.experiment.evaluate_run` (what ``fedmrg evaluate RUN_DIR --set eval.KEY=VALUE``
does), once per variant (`VARIANTS`): as trained (the head's argmax decides the prompt); with
`eval.calibrate_head=true` (each center's model moves its head's positive threshold per
observation to the best F1 on that center's own val split, `fedmrg.eval.calibration`); with
`eval.head_tuning_steps` (each center tunes its own copy of the head on its train split,
`fedmrg.model.head_tuning`). The models, the test studies and the decoding are the same, so
each variant's difference from "as trained" is paired: for CE-F1 macro/micro and BLEU-4, the
paired bootstrap 95% interval over test studies (`fedmrg.eval.bootstrap`, resampled within
every run x center, pooled), and the mean of each variant over runs and centers. Writes the
JSON and a markdown table beside it (`.md`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import _common  # noqa: F401  (first: sets the environment before torch loads)
from _common import command_line, machine_info, markdown_table, result_path, write_json

from fedmrg.choices import View

BASELINE = "as trained"
VARIANTS = {BASELINE: ("eval.per_study=true",),
            "calibrated": ("eval.per_study=true", "eval.calibrate_head=true"),
            "head tuned": ("eval.per_study=true", "eval.head_tuning_steps=200")}
METRICS = {"ce_f1_macro": "ce_labels", "ce_f1_micro": "ce_labels", "bleu4": "bleu"}
RESAMPLES = 2000


def paired_intervals(per_study: dict[str, dict[tuple[str, str], list]], variant: str
                     ) -> dict[str, Any]:
    """metric -> the `variant` - as-trained difference and its paired bootstrap interval,
    from variant -> (run, center) -> per-study items (`EvalResult.per_study`)."""
    from fedmrg.eval.bootstrap import (
        bleu4_of_studies,
        ce_f1_macro_of_studies,
        ce_f1_micro_of_studies,
        paired_bootstrap,
    )

    functions = {"ce_f1_macro": ce_f1_macro_of_studies, "ce_f1_micro": ce_f1_micro_of_studies,
                 "bleu4": bleu4_of_studies}
    after, before = per_study[variant], per_study[BASELINE]
    units = sorted(after)
    out = {}
    for metric, which in METRICS.items():
        diff, lo, hi = paired_bootstrap([after[u][which] for u in units],
                                        [before[u][which] for u in units], RESAMPLES,
                                        seed=0, metric=functions[metric])
        out[metric] = {"diff": diff, "lo": lo, "hi": hi, "units": len(units),
                       "studies": sum(len(after[u][which]) for u in units),
                       "resolved": lo > 0 or hi < 0}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    from fedmrg.experiment import evaluate_run

    out = result_path(args.out, "calibration.json")
    per_study: dict[str, dict[tuple[str, str], list]] = {v: {} for v in VARIANTS}
    means: dict[str, dict[str, list[float]]] = {v: {m: [] for m in METRICS} for v in VARIANTS}
    runs = []
    for run_dir in args.run_dirs:
        centers = json.loads((run_dir / "summary.json").read_text())["centers"]
        row: dict[str, Any] = {"run": str(run_dir), "centers": centers}
        for variant, overrides in VARIANTS.items():
            start = time.perf_counter()
            result = evaluate_run(run_dir, centers=centers, overrides=overrides,
                                  views=(View.PERSONALIZATION,))
            table = result[View.PERSONALIZATION]
            row[variant] = {"wall_s": time.perf_counter() - start,
                            "mean": {m: table["mean"].get(m) for m in METRICS}}
            for center in centers:
                per_study[variant][(str(run_dir), center)] = table["per_study"][center][0]
                for m in METRICS:
                    means[variant][m].append(table["per_center"][center][m])
            print(f"{run_dir.name} {variant}: " + ", ".join(
                f"{m} {row[variant]['mean'][m]:.3f}" for m in METRICS), flush=True)
        runs.append(row)
    intervals = {v: paired_intervals(per_study, v) for v in VARIANTS if v != BASELINE}
    record = {"benchmark": "calibration", "command": command_line("calibration.py", argv),
              "machine": machine_info(), "runs": runs,
              "mean": {v: {m: statistics.fmean(x) for m, x in ms.items()}
                       for v, ms in means.items()},
              "minus_as_trained": intervals}
    write_json(out, record)
    header = ["variant", "metric", BASELINE, "variant's", "variant - as trained",
              "paired 95% CI", "resolved"]
    rows = [[v, m, f"{record['mean'][BASELINE][m]:.3f}", f"{record['mean'][v][m]:.3f}",
             f"{ci['diff']:+.4f}", f"[{ci['lo']:+.4f}, {ci['hi']:+.4f}]",
             "yes" if ci["resolved"] else "no"]
            for v, cis in intervals.items() for m, ci in cis.items()]
    n = intervals["calibrated"]["bleu4"]
    text = (f"Personalized models of {len(runs)} run(s), mean over runs x centers "
            f"({n['units']} test sets, {n['studies']} test studies); command: "
            f"`{record['command']}`\n\n" + markdown_table(header, rows) + "\n")
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
