"""The personalized path with the diagnosis head calibrated or tuned per center, against without,
and, given several strategies' runs, the strategies against each other under each variant.

Usage: ``python benchmarks/calibration.py RUN_DIR [RUN_DIR ...] [--variants "head tuned"]
[--out benchmarks/results/calibration.json]``

Each RUN_DIR is a finished run's folder (`<tracking.storage_path>/<run name>`), e.g. the
runs of `benchmarks/fl_mrg.py --preset evidence`. Every run's personalized models are
evaluated on the test split of every participating center, with
`fedmrg.experiment.evaluate_run` (what ``fedmrg evaluate RUN_DIR --set eval.KEY=VALUE``
does), once per variant (`VARIANTS`, or those `--variants` names): as trained (the head's
argmax decides the prompt); with `eval.calibrate_head=true` (each center's model moves its
head's positive threshold per observation to the best F1 on that center's own val split,
`fedmrg.eval.calibration`); with `eval.head_tuning_steps` (each center tunes its own copy of
the head on its train split, `fedmrg.model.head_tuning`). The models, the test studies and the
decoding are the same, so each variant's difference from "as trained" is paired: for CE-F1
macro/micro and BLEU-4, the paired bootstrap 95% interval over test studies
(`fedmrg.eval.bootstrap`, resampled within every run x center, pooled), per strategy (the
runs' `federation.strategy`), and the mean of each variant over runs and centers.

When the runs hold several strategies, the first strategy given (`--reference`, default the
first RUN_DIR's) is also compared with every other under each variant, paired on the same
(seed, center) test studies: e.g. fedmrg with its head tuned against fedavg with its head
tuned. Writes the JSON and a markdown table beside it (`.md`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Mapping, Sequence
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

Unit = tuple[int, str]  # (seed, center): the test studies a paired comparison shares


def paired_intervals(a: Mapping[Unit, Mapping[str, list]], b: Mapping[Unit, Mapping[str, list]]
                     ) -> dict[str, Any]:
    """metric -> the a - b difference and its paired bootstrap interval, from two maps of
    (seed, center) -> per-study items (`EvalResult.per_study`), on the units both hold."""
    from fedmrg.eval.bootstrap import (
        bleu4_of_studies,
        ce_f1_macro_of_studies,
        ce_f1_micro_of_studies,
        paired_bootstrap,
    )

    functions = {"ce_f1_macro": ce_f1_macro_of_studies, "ce_f1_micro": ce_f1_micro_of_studies,
                 "bleu4": bleu4_of_studies}
    units = sorted(set(a) & set(b))
    if not units:
        raise ValueError(f"no (seed, center) in common: {sorted(a)} vs {sorted(b)}")
    out = {}
    for metric, which in METRICS.items():
        diff, lo, hi = paired_bootstrap([a[u][which] for u in units],
                                        [b[u][which] for u in units], RESAMPLES,
                                        seed=0, metric=functions[metric])
        out[metric] = {"diff": diff, "lo": lo, "hi": hi, "units": len(units),
                       "studies": sum(len(a[u][which]) for u in units),
                       "resolved": lo > 0 or hi < 0}
    return out


def run_identity(run_dir: Path) -> tuple[str, int]:
    """(strategy, seed) of a finished run, from the config it ran with."""
    from fedmrg.config import load_config
    from fedmrg.experiment import RUN_CONFIG

    cfg = load_config(str(run_dir / RUN_CONFIG))
    return cfg.federation.strategy, cfg.seed


def _ci_row(ci: Mapping[str, Any]) -> list[str]:
    return [f"{ci['diff']:+.4f}", f"[{ci['lo']:+.4f}, {ci['hi']:+.4f}]",
            "yes" if ci["resolved"] else "no"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", type=Path, nargs="+")
    parser.add_argument("--variants", nargs="+", choices=[v for v in VARIANTS if v != BASELINE],
                        default=[v for v in VARIANTS if v != BASELINE],
                        help="variants besides 'as trained' (default: all)")
    parser.add_argument("--reference", help="the strategy compared with the others (default: "
                                            "the first run's)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    from fedmrg.experiment import evaluate_run

    out = result_path(args.out, "calibration.json")
    variants = [BASELINE, *args.variants]
    identities: dict[Path, tuple[str, int]] = {}
    seen: dict[tuple[str, int], Path] = {}
    for run_dir in args.run_dirs:
        identity = run_identity(run_dir)
        if identity in seen:
            parser.error(f"{run_dir} and {seen[identity]} are both {identity[0]} at seed "
                         f"{identity[1]}: one run per strategy and seed")
        seen[identity], identities[run_dir] = run_dir, identity
    strategies = list(dict.fromkeys(s for s, _ in identities.values()))
    reference = args.reference or strategies[0]
    if reference not in strategies:
        parser.error(f"--reference {reference!r}: no run of it among {strategies}")
    # strategy -> variant -> (seed, center) -> per-study items
    per_study: dict[str, dict[str, dict[Unit, Mapping[str, list]]]] = {
        s: {v: {} for v in variants} for s in strategies}
    means = {s: {v: {m: [] for m in METRICS} for v in variants} for s in strategies}
    runs = []
    for run_dir, (strategy, seed) in identities.items():
        centers = json.loads((run_dir / "summary.json").read_text())["centers"]
        row: dict[str, Any] = {"run": str(run_dir), "strategy": strategy, "seed": seed,
                               "centers": centers}
        for variant in variants:
            start = time.perf_counter()
            result = evaluate_run(run_dir, centers=centers, overrides=VARIANTS[variant],
                                  views=(View.PERSONALIZATION,))
            table = result[View.PERSONALIZATION]
            row[variant] = {"wall_s": time.perf_counter() - start,
                            "mean": {m: table["mean"].get(m) for m in METRICS}}
            for center in centers:
                per_study[strategy][variant][(seed, center)] = table["per_study"][center][0]
                for m in METRICS:
                    means[strategy][variant][m].append(table["per_center"][center][m])
            print(f"{run_dir.name} {variant}: " + ", ".join(
                f"{m} {row[variant]['mean'][m]:.3f}" for m in METRICS), flush=True)
        runs.append(row)
    minus_as_trained = {s: {v: paired_intervals(per_study[s][v], per_study[s][BASELINE])
                            for v in args.variants} for s in strategies}
    between = {f"{reference} - {other}": {
        v: paired_intervals(per_study[reference][v], per_study[other][v]) for v in variants}
        for other in strategies if other != reference}
    mean = {s: {v: {m: statistics.fmean(x) for m, x in ms.items()} for v, ms in vs.items()}
            for s, vs in means.items()}
    record = {"benchmark": "calibration", "command": command_line("calibration.py", argv),
              "machine": machine_info(), "runs": runs, "mean": mean,
              "minus_as_trained": minus_as_trained, "between_strategies": between}
    write_json(out, record)
    header = ["strategy", "variant", "metric", BASELINE, "variant's", "variant - as trained",
              "paired 95% CI", "resolved"]
    rows = [[s, v, m, f"{mean[s][BASELINE][m]:.3f}", f"{mean[s][v][m]:.3f}", *_ci_row(ci)]
            for s, cis in minus_as_trained.items() for v, by in cis.items()
            for m, ci in by.items()]
    n = next(iter(next(iter(minus_as_trained[reference].values())).values()))
    text = (f"Personalized models of {len(runs)} run(s) ({', '.join(strategies)}), mean over "
            f"runs x centers ({n['units']} test sets, {n['studies']} test studies per "
            f"strategy); command: `{record['command']}`\n\n" + markdown_table(header, rows))
    if between:
        rows = []
        for pair, by_variant in between.items():
            a, b = pair.split(" - ")
            rows += [[pair, v, m, f"{mean[a][v][m]:.3f}", f"{mean[b][v][m]:.3f}", *_ci_row(ci)]
                     for v, cis in by_variant.items() for m, ci in cis.items()]
        text += ("\n\nStrategies under the same variant, paired on the same (seed, center) test "
                 "studies:\n\n" + markdown_table(
                     ["comparison", "variant", "metric", "first", "second", "difference",
                      "paired 95% CI", "resolved"], rows))
    out.with_suffix(".md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
