"""The FL-MRG benchmark table: strategies, baselines and FedMRG ablations on the phantom benchmark.

Usage (from the repository root):

    python benchmarks/fl_mrg.py --quick      # routine check: 4 strategies, 1 seed, small budget
    python benchmarks/fl_mrg.py              # the full table: every row, 3 seeds (hours)
    python benchmarks/fl_mrg.py --resume     # continue an interrupted invocation
    python benchmarks/fl_mrg.py --report RECORD.json ... --out DIR   # a table of recorded runs
    options: --seeds 3 | --seeds 0,4,7 | --seeds 4,   --strategies fedmrg,fedavg,fedmrg-no_mutual
             --rounds R  --local-steps L  --eval-every N  --out DIR  --storage DIR
             --tracking-uri URI  --retries N  --set section.key=value (every run; repeatable)

Rows: every registered strategy (`fedmrg.fl.strategies.STRATEGIES`: `centralized`, `local`,
`fedavg`, `fedprox`, `ffa_lora`, `fedsa_lora`, `fedmrg`), and `fedmrg` with
one mechanism switched off (config switches, `ABLATIONS`): `fedmrg-no_lowrank` (factor-wise
fedavg aggregation, dense updates of the other shared tensors up, the full state down),
`fedmrg-no_contrastive` (both contrastive heads off), `fedmrg-no_prompts` (no diagnosis
prompt), `fedmrg-no_mutual` (no two-way KL), `fedmrg-no_specialized` (no private adapter,
hence no personal LM loss and no KL); `ffa_lora` with central DP (`ffa_lora-dp8`,
`ffa_lora-dp2`) or secure aggregation (`ffa_lora-secagg`) (`PRIVACY`, docs/privacy.md).
Each run is `fedmrg.experiment.Experiment(cfg, run_name=...).fit()` on the default config
with the row's overrides: real client actors on the local Ray, the phantom benchmark
(`data/phantom-v1`), MLflow (every run under one experiment, `fl_mrg_benchmark` or
`fl_mrg_benchmark_quick`, named `<strategy>-<ablation>-seed<k>`, ablation `base` for a plain
strategy; the default sqlite store unless `--tracking-uri`).

Same compute budget (`budget_overrides`): every federated client (fedmrg, its ablations,
fedavg, fedprox) and every `local` client trains `rounds x local_steps` optimizer steps of
`data.batch_size` studies. `centralized` is one client over the pooled data of the N
participating centers; it runs the same number of rounds with `local_steps x N` steps per
round, so it sees as many training samples as all N federated clients together. Every
round takes every client (`federation.fraction=1`, `federation.min_clients` = all of them):
a client that fails (e.g. its actor killed by the memory monitor and restarted by Ray) makes
the round try again (`federation.round_retries`) instead of aggregating without it, so no
run trains less than its budget.

Evaluation: every evaluation of every run generates with the config's `eval.*` settings
(the default config's, recorded per run under "generation"), on the test splits. Quick mode
evaluates only after the last round; its plot shows the per-round training loss of the
generic path (`lm_generic`, the one loss every strategy trains) and the final evaluation as
a point. Full mode also evaluates every `--eval-every` rounds (default 2), read back per
round from the run's MLflow metrics; the config has no separate (cheaper) setting for these
periodic evaluations, so they cost as much as the final one. A client's first evaluation
pays a one-time start-up (~20 s measured under load).

Consistency: every run records the version of the product code it ran (`product_version`: the
last commit that changed `fedmrg/` plus a hash of its uncommitted changes, which the client
actors import from disk), the tree's git commit, and its generation settings; when the runs
of one table differ in product code or generation settings (the code changed during a long
run, or `--resume` picked up older records), or a run lost client updates (a round that
aggregated without a failed client, which then trained less than the budget), the table
says so ("consistency" in the JSON).

Outputs in `--out` (default `benchmarks/results/fl_mrg/`), named by mode (`quick`/`full`):
`<mode>.json` (command, machine, load average, budget rule, every run: overrides, wall time,
final metrics per center, per-round metrics, bytes; the aggregate and the target checks),
`<mode>.md` (mean ± sample std over seeds: generalization on the 4 centers, on the held-out
center, personalization, cost), `<mode>_rounds.png` (main metrics per round, one line per
row), and `runs/<mode>/<run name>.json`, one per finished run: `--resume` skips every run
whose file exists (its recorded overrides must match), and an interrupted run continues from
its last round checkpoint (the product resumes a run name that started in the same
`--storage`). Without `--resume` every run starts afresh (its storage folder is removed first).
All outputs are rewritten after every run, so a long full run shows its partial table.
Each run's files (models, coordinator and client checkpoints) stay in `--storage`, default
`runs/fl_mrg/<mode>/`: measured 0.1 GB (centralized) to 1.1 GB (local) per quick run;
`--set tracking.checkpoint_keep=1` keeps fewer checkpoints.

`--report` runs nothing: it writes the outputs (`<mode>.json/.md/_rounds.png` in `--out`) from
the given run records (`runs/<mode>/*.json` of any earlier invocations), so rows measured by
different invocations (e.g. a row rerun after a default changed) share one table and one
target check; the consistency check names any mix of product code or generation settings.

A run that fails (e.g. a client actor killed by Ray's memory monitor while the machine is
shared: the product restarts the actor, but a call in flight fails the run) is tried again
up to `--retries` times (default 1), continuing from its last round checkpoint; its record
keeps each failed attempt's error and wall time, and its wall time is that of all attempts.
A run that still fails is listed under "failed" and the command exits with status 1.

Targets (`check_targets`, from the issue): fedmrg beats fedavg and local on personalization CE
macro-F1 and BLEU-4, beats local on the held-out center (CE macro-F1 and BLEU-4), reaches at
least 90% of centralized generalization CE macro-F1; each ablation's contribution (full fedmrg
minus the ablated row: positive = the mechanism helps). "Beats" compares means over seeds; the
margin is also given in units of the pooled standard deviation.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import _common  # noqa: F401  (before fedmrg/torch/Ray load: sets their environment)
from _common import ROOT, command_line, machine_info, markdown_table, write_json

from fedmrg.fl.strategies import strategy_names  # names only: torch is not loaded yet

log = logging.getLogger("fl_mrg")

STRATEGIES = strategy_names()  # the registry's, baselines first and fedmrg last
BASE = "base"  # the ablation name of a plain strategy in run names
# One FedMRG mechanism off per row (overrides on top of strategy fedmrg).
ABLATIONS: dict[str, tuple[str, ...]] = {
    # every low-rank factorization off: factor-wise averaging, dense updates up, the full
    # state down (the three keys FedAvg.implies sets for the same reason)
    "no_lowrank": ("federation.aggregation=fedavg", "federation.dense_update_rank=0",
                   "federation.download_rank=0"),
    "no_contrastive": ("model.losses.contrastive_global=0", "model.losses.contrastive_local=0"),
    "no_prompts": ("model.diagnosis_prompts=false",),
    "no_mutual": ("model.losses.mutual=0",),
    # without the specialized adapter its LM loss and the KL between the paths have nothing
    # to act on (the fedavg family switches off the same three keys)
    "no_specialized": ("model.specialized_adapter=false", "model.losses.lm_personal=0",
                       "model.losses.mutual=0"),
}
# Privacy rows (docs/privacy.md): FFA-LoRA (linear: exact under secure aggregation and central
# DP) with central DP at epsilon about 8 and 2 (delta 1e-5) after the default 10 rounds of all
# 4 centers (sample rate 1; Opacus' get_noise_multiplier: 2.02 and 6.80), and with secure
# aggregation. The clip is the config's default; the run records each round's epsilon.
PRIVACY: dict[str, tuple[str, ...]] = {
    "dp8": ("privacy.mode=central", "privacy.noise_multiplier=2.02"),
    "dp2": ("privacy.mode=central", "privacy.noise_multiplier=6.80"),
    "secagg": ("privacy.secure_aggregation=true",),
}
# Wire quantization rows (fedmrg.fl.quantize): fedmrg with its clients' model updates sent
# blockwise int8 or 4-bit NormalFloat, error feedback carrying the quantization error.
WIRE: dict[str, tuple[str, ...]] = {
    "int8": ("federation.wire_dtype=int8",),
    "nf4": ("federation.wire_dtype=nf4",),
}
ROWS = (*STRATEGIES, *(f"fedmrg-{a}" for a in ABLATIONS), *(f"fedmrg-{w}" for w in WIRE),
        *(f"ffa_lora-{p}" for p in PRIVACY))
# The evaluation preset of the evidence table (`--preset evidence`): the phantom benchmark at
# 750 studies per center (70/10/20: 525 train, 75 val, 150 test studies per center), and
# every test study's scores recorded for the paired bootstrap intervals (`eval.per_study`).
PRESETS: dict[str, tuple[str, ...]] = {
    "evidence": ("data.phantom.studies_per_center=750", "data.root=data/phantom-750",
                 "eval.per_study=true"),
}
ROW_LABELS = {
    "fedmrg-no_lowrank": "fedmrg w/o low-rank/exact aggregation",
    "fedmrg-no_contrastive": "fedmrg w/o client-aware contrastive",
    "fedmrg-no_prompts": "fedmrg w/o diagnosis prompts",
    "fedmrg-no_mutual": "fedmrg w/o mutual boosting",
    "fedmrg-no_specialized": "fedmrg w/o specialized adapter",
    "fedmrg-int8": "fedmrg, int8 wire",
    "fedmrg-nf4": "fedmrg, nf4 wire",
    "ffa_lora-dp8": "ffa_lora, central DP epsilon 8",
    "ffa_lora-dp2": "ffa_lora, central DP epsilon 2",
    "ffa_lora-secagg": "ffa_lora, secure aggregation",
}


@dataclasses.dataclass(frozen=True)
class Mode:
    """A benchmark mode's defaults (`None`: the config's own default)."""

    name: str
    rows: tuple[str, ...]
    seeds: tuple[int, ...]
    rounds: int | None
    local_steps: int | None
    eval_every: int


MODES = {
    # 4 x 10 steps per client: start-up and the final evaluation dominate a run's time
    # (measured in quick.json, with the load average it ran under)
    "quick": Mode("quick", ("fedmrg", "fedavg", "local", "centralized"), (0,), rounds=4,
                  local_steps=10, eval_every=0),
    # the default budget (federation.rounds x train.local_steps of fedmrg/config.py)
    "full": Mode("full", ROWS, (0, 1, 2), rounds=None, local_steps=None, eval_every=2),
}

# The table's metrics (fedmrg.eval.evaluator names) and views.
# distinct_2 and rep_4 (fedmrg.eval.repetition): how repetitive the generated reports are; n/a
# in records written before they were measured.
METRICS = ("bleu4", "meteor", "rouge_l", "cider", "ce_f1_micro", "ce_f1_macro", "distinct_2",
           "rep_4")
METRIC_LABELS = {"bleu4": "BLEU-4", "meteor": "METEOR", "rouge_l": "ROUGE-L", "cider": "CIDEr",
                 "ce_f1_micro": "CE F1 micro", "ce_f1_macro": "CE F1 macro",
                 "distinct_2": "distinct-2", "rep_4": "rep-4"}
# scope -> (Result view, what it is)
SCOPES = {
    "generalization": ("generalization", "generic model, mean over the participating centers' "
                                         "test splits"),
    "heldout": ("generalization", "generic model on the held-out center (unseen style and "
                                  "acquisition)"),
    "personalization": ("personalization", "each center's own model on its own test split"),
}
ROUND_METRICS = ("loss", "lm_generic", "lm_personal", "diagnosis")  # Result.rounds[i]["metrics"]
PLOT_PANELS = (  # (series key, title)
    ("generalization/ce_f1_macro", "generalization CE macro-F1 (4 centers)"),
    ("generalization/bleu4", "generalization BLEU-4 (4 centers)"),
    ("personalization/ce_f1_macro", "personalization CE macro-F1"),
    ("train/lm_generic", "training LM loss, generic path"),
)
CENTRALIZED_FRACTION = 0.9


class BenchmarkError(ValueError):
    """Bad benchmark arguments or recorded results; the message names the value or file."""


# --------------------------------------------------------------------------- the run matrix


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of the matrix: a row (strategy or ablation) at one seed, as config overrides."""

    row: str
    strategy: str
    ablation: str
    seed: int
    overrides: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.strategy}-{self.ablation}-seed{self.seed}"


def parse_rows(text: str) -> list[str]:
    """`"fedmrg,fedavg,fedmrg-no_mutual"` -> the rows, in the table's order; `all` is every
    row, `ablations` every fedmrg ablation, `wire` the quantized-wire rows, `privacy` the
    privacy rows. An unknown name is a
    BenchmarkError."""
    wanted: list[str] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        if item == "all":
            wanted += ROWS
        elif item == "ablations":
            wanted += [f"fedmrg-{a}" for a in ABLATIONS]
        elif item == "privacy":
            wanted += [f"ffa_lora-{p}" for p in PRIVACY]
        elif item == "wire":
            wanted += [f"fedmrg-{w}" for w in WIRE]
        elif item in ROWS:
            wanted.append(item)
        else:
            raise BenchmarkError(f"--strategies: unknown row {item!r}; choose from "
                                 f"{list(ROWS)} (or 'all', 'ablations', 'wire', 'privacy')")
    if not wanted:
        raise BenchmarkError(f"--strategies: no row in {text!r}")
    return [r for r in ROWS if r in wanted]


def parse_seeds(text: str) -> list[int]:
    """`"3"` -> seeds 0, 1, 2; `"0,4,7"` -> those seeds; `"4,"` -> seed 4 alone. Seeds are
    integers >= 0."""
    parts = [s.strip() for s in text.split(",") if s.strip()]
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        raise BenchmarkError(f"--seeds: {text!r} is not a count or a comma list of "
                             f"integers") from None
    if not numbers or any(n < 0 for n in numbers):
        raise BenchmarkError(f"--seeds: {text!r}: need a count >= 1 or seeds >= 0")
    if len(parts) == 1 and "," not in text:
        if numbers[0] < 1:
            raise BenchmarkError(f"--seeds: a count must be >= 1, got {numbers[0]} (one seed "
                                 f"alone is a list: '{numbers[0]},')")
        return list(range(numbers[0]))
    if len(set(numbers)) != len(numbers):
        raise BenchmarkError(f"--seeds: {text!r} repeats a seed")
    return numbers


def budget_overrides(strategy: str, rounds: int, local_steps: int, n_centers: int
                     ) -> tuple[str, ...]:
    """The compute budget as overrides (module docstring, "Same compute budget"):
    `centralized` trains `local_steps x n_centers` steps per round, everyone else
    `local_steps` per client; every round takes every client (fraction 1, min_clients all)."""
    if strategy not in STRATEGIES:
        raise BenchmarkError(f"unknown strategy {strategy!r}; choose from {list(STRATEGIES)}")
    if rounds < 1 or local_steps < 1 or n_centers < 1:
        raise BenchmarkError(f"rounds ({rounds}), local steps ({local_steps}) and centers "
                             f"({n_centers}) must all be >= 1")
    from fedmrg.fl.strategies import STRATEGIES as REGISTRY

    centralized = REGISTRY[strategy].pools_data  # one client over the pooled data
    steps = local_steps * n_centers if centralized else local_steps
    clients = 1 if centralized else n_centers
    return (f"federation.strategy={strategy}", f"federation.rounds={rounds}",
            f"train.local_steps={steps}", "federation.fraction=1.0",
            f"federation.min_clients={clients}")


def budget_rule(rounds: int, local_steps: int, n_centers: int, batch_size: int) -> str:
    """The budget rule in words, with this invocation's numbers."""
    per_client = rounds * local_steps
    return (f"every federated or local client: {rounds} rounds x {local_steps} steps = "
            f"{per_client} steps of {batch_size} studies; centralized: {rounds} rounds x "
            f"{local_steps * n_centers} steps = {per_client * n_centers} steps of {batch_size} "
            f"pooled studies, as many samples as all {n_centers} clients together")


def run_matrix(rows: Sequence[str], seeds: Sequence[int], *, rounds: int, local_steps: int,
               n_centers: int, eval_every: int, experiment: str, storage_path: str,
               tracking_uri: str | None = None, extra: Sequence[str] = ()) -> list[RunSpec]:
    """Every run, seed-major (a whole seed's table is done before the next seed starts), with
    its complete overrides on the default config: seed, budget, evaluation, tracking, the
    ablation's switches, then `extra` (which may override any of them)."""
    specs = []
    for seed in seeds:
        for row in rows:
            if row not in ROWS:
                raise BenchmarkError(f"unknown row {row!r}; choose from {list(ROWS)}")
            strategy, _, ablation = row.partition("-")
            switches = {**ABLATIONS, **WIRE, **PRIVACY}[ablation] if ablation else ()
            overrides = (f"seed={seed}", *budget_overrides(strategy, rounds, local_steps,
                                                           n_centers),
                         f"federation.eval_every={eval_every}",
                         f"tracking.experiment={experiment}",
                         f"tracking.storage_path={storage_path}",
                         *([f"tracking.tracking_uri={tracking_uri}"] if tracking_uri else []),
                         *switches, *extra)
            specs.append(RunSpec(row, strategy, ablation or BASE, seed, overrides))
    return specs


# --------------------------------------------------------------------------- one run's record


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def final_metrics(summary: Mapping[str, Any]) -> dict[str, float | None]:
    """`<scope>/<metric>` for the table from a `Result.summary()`: generalization (mean over
    the participating centers), heldout (mean over the centers evaluated but not trained on),
    personalization; plus bytes and the run's own wall time."""
    centers = set(summary["centers"])
    generalization = summary["generalization"]
    heldout = [m for c, m in generalization.get("per_center", {}).items() if c not in centers]
    scopes = {"generalization": generalization.get("mean", {}),
              "personalization": summary["personalization"].get("mean", {})}
    out: dict[str, float | None] = {}
    for metric in METRICS:
        for scope, values in scopes.items():
            out[f"{scope}/{metric}"] = _finite(values.get(metric))
        found = [v for v in (_finite(m.get(metric)) for m in heldout) if v is not None]
        out[f"heldout/{metric}"] = statistics.fmean(found) if found else None
    comm = summary.get("communication") or {}
    up, down = comm.get("bytes_up_total", 0.0), comm.get("bytes_down_total", 0.0)
    out.update(bytes_up=float(up), bytes_down=float(down), bytes_total=float(up + down),
               wall_s=_finite(summary.get("wall_s")))
    return out


def round_rows(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per round: losses (mean over the round's clients), bytes, time, participants."""
    out = []
    for r in summary["rounds"]:
        row = {"round": r["round_id"], "participants": len(r["participants"]),
               "rejected": {c: str(why)[:200] for c, why in r.get("rejected", {}).items()},
               "bytes_up": r["bytes_up"],
               "bytes_down": r["bytes_down"], "round_time_s": r["round_time_s"]}
        row.update({k: r["metrics"][k] for k in ROUND_METRICS if k in r.get("metrics", {})})
        out.append(row)
    return out


def evaluation_keys(heldout: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """`<scope>/<metric>` -> the MLflow parent-run metric(s) holding it per evaluation
    (`RunTracker.log_evaluation`: `<view>/<metric>` means, `<view>/<center>/<metric>`)."""
    out: dict[str, tuple[str, ...]] = {}
    for metric in METRICS:
        out[f"generalization/{metric}"] = (f"generalization/{metric}",)
        out[f"personalization/{metric}"] = (f"personalization/{metric}",)
        if heldout:
            out[f"heldout/{metric}"] = tuple(f"generalization/{c}/{metric}" for c in heldout)
    return out


def evaluations_by_round(histories: Mapping[str, Sequence[tuple[int, float]]],
                         keys: Mapping[str, Sequence[str]]) -> list[dict[str, Any]]:
    """[{"round": step, "<scope>/<metric>": value}] from MLflow metric histories (key ->
    [(step, value)]); a scope over several metrics (held-out centers) is their mean."""
    by_step: dict[int, dict[str, list[float]]] = {}
    for scope_key, metric_keys in keys.items():
        for metric_key in metric_keys:
            for step, value in histories.get(metric_key, ()):
                if math.isfinite(value):
                    by_step.setdefault(int(step), {}).setdefault(scope_key, []).append(value)
    return [{"round": step, **{k: statistics.fmean(v) for k, v in values.items()}}
            for step, values in sorted(by_step.items())]


def read_evaluations(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every evaluation of the run (periodic and final), per round, from its MLflow run."""
    from mlflow.tracking import MlflowClient

    mlflow_info = summary["mlflow"]
    heldout = [c for c in summary["generalization"].get("per_center", {})
               if c not in set(summary["centers"])]
    keys = evaluation_keys(heldout)
    client = MlflowClient(mlflow_info["tracking_uri"])
    histories = {k: [(m.step, m.value) for m in client.get_metric_history(
        mlflow_info["run_id"], k)] for ks in keys.values() for k in ks}
    return evaluations_by_round(histories, keys)


def run_record(spec: RunSpec, summary: Mapping[str, Any], evaluations: Sequence[Mapping],
               *, wall_s: float, loadavg_start: Sequence[float], loadavg_end: Sequence[float],
               git_commit: str = "unknown", product: str = "unknown",
               generation: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What the benchmark keeps of one run (JSON): spec, overrides, wall time (of the whole
    `fit()`, as measured here), load average, final metrics per center and for the table,
    per-round metrics and evaluations, bytes, where MLflow and the run's files are."""
    final = {**final_metrics(summary), "wall_s": wall_s}
    evaluations = [dict(e) for e in evaluations]
    last = max((r["round_id"] for r in summary["rounds"]), default=0)
    if not any(e["round"] == last for e in evaluations):  # MLflow unreadable: the final one
        evaluations.append({"round": last, **{k: v for k, v in final.items()
                                              if k.split("/")[0] in SCOPES and v is not None}})
    return {
        "name": spec.name, "row": spec.row, "strategy": spec.strategy,
        "ablation": spec.ablation, "seed": spec.seed, "overrides": list(spec.overrides),
        "wall_s": wall_s, "fit_wall_s": summary.get("wall_s"), "git_commit": git_commit,
        "product_version": product, "generation": dict(generation or {}),
        "loadavg_start": list(loadavg_start), "loadavg_end": list(loadavg_end),
        "final": final,
        "per_center": {"generalization": summary["generalization"].get("per_center", {}),
                       "personalization": summary["personalization"].get("per_center", {})},
        "rounds": round_rows(summary), "evaluations": evaluations,
        "communication": summary.get("communication", {}),
        "centers": list(summary["centers"]), "mlflow": summary.get("mlflow", {}),
        "storage_dir": summary.get("storage_dir"),
        "privacy": summary.get("privacy", {}),  # epsilon spent (privacy rows)
        "per_study": per_study_items(summary),
    }


def per_study_items(summary: Mapping[str, Any]) -> dict[str, dict[str, list]]:
    """scope (SCOPES) -> center -> the final evaluation's per-study items of each model that
    evaluated that center (`Result` tables' "per_study", recorded with `eval.per_study`);
    empty when the run recorded none."""
    centers = set(summary["centers"])
    out: dict[str, dict[str, list]] = {}
    for scope, (view, _) in SCOPES.items():
        for center, models in (summary[view].get("per_study") or {}).items():
            if (scope == "heldout") != (center not in centers):
                continue
            out.setdefault(scope, {})[center] = list(models)
    return out


# --------------------------------------------------------------------------- aggregation


def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, sample standard deviation, n) over the finite values; std None below 2."""
    found = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not found:
        return None, None, 0
    std = statistics.stdev(found) if len(found) > 1 else None
    return statistics.fmean(found), std, len(found)


def format_mean_std(mean: float | None, std: float | None, digits: int = 3) -> str:
    """`0.123 ± 0.004`, `0.123` without a std (one seed), `n/a` without a value."""
    if mean is None:
        return "n/a"
    text = f"{mean:.{digits}f}"
    return text if std is None else f"{text} ± {std:.{digits}f}"


def format_bytes(mean: float | None, std: float | None = None) -> str:
    """`21.6 MB ± 0.1` in decimal units of the mean's size."""
    if mean is None:
        return "n/a"
    unit, scale = next(((u, s) for u, s in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3))
                        if abs(mean) >= s), ("B", 1.0))
    digits = 0 if unit == "B" else 1
    text = f"{mean / scale:.{digits}f} {unit}"
    return text if std is None else f"{text} ± {std / scale:.{digits}f}"


def aggregate(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per row (in the table's order): seeds, and (mean, std, n) of every final value."""
    out: dict[str, dict[str, Any]] = {}
    for row in ROWS:
        mine = [r for r in records if r["row"] == row]
        if not mine:
            continue
        keys = dict.fromkeys(k for r in mine for k in r["final"])
        out[row] = {"seeds": sorted(r["seed"] for r in mine),
                    "stats": {k: mean_std(r["final"].get(k) for r in mine) for k in keys}}
    return out


def per_round_series(records: Sequence[Mapping[str, Any]]
                     ) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """row -> series key -> [(round, mean over the row's seeds)]: `train/<round metric>` for
    every round, `<scope>/<metric>` for every evaluation."""
    values: dict[str, dict[str, dict[int, list[float]]]] = {}
    for r in records:
        series = values.setdefault(r["row"], {})
        for rr in r["rounds"]:
            for key in ROUND_METRICS:
                if _finite(rr.get(key)) is not None:
                    series.setdefault(f"train/{key}", {}).setdefault(rr["round"], []).append(
                        rr[key])
        for e in r["evaluations"]:
            for key, value in e.items():
                if key != "round" and _finite(value) is not None:
                    series.setdefault(key, {}).setdefault(e["round"], []).append(value)
    return {row: {key: [(k, statistics.fmean(v)) for k, v in sorted(points.items())]
                  for key, points in series.items()}
            for row, series in values.items()}


# --------------------------------------------------------------------------- tables


def row_label(row: str) -> str:
    return ROW_LABELS.get(row, row)


def _seeds_cell(seeds: Sequence[int]) -> str:
    return str(len(seeds))


def results_tables(agg: Mapping[str, Mapping[str, Any]]) -> str:
    """The markdown tables: one per scope (SCOPES), then cost (bytes, wall time). A metric
    that no run measured (records older than the metric) gets no column."""
    parts = []
    for scope, (_, what) in SCOPES.items():
        metrics = [m for m in METRICS
                   if any(a["stats"].get(f"{scope}/{m}", (None,))[0] is not None
                          for a in agg.values())]
        header = ["row", "seeds", *(METRIC_LABELS[m] for m in metrics)]
        rows = [[row_label(row), _seeds_cell(a["seeds"]),
                 *(format_mean_std(*a["stats"].get(f"{scope}/{m}", (None, None, 0))[:2])
                   for m in metrics)]
                for row, a in agg.items()]
        parts += [f"**{scope}**: {what}", "", markdown_table(header, rows), ""]
    header = ["row", "seeds", "bytes communicated (total)", "up", "down", "wall time (min)"]
    rows = []
    for row, a in agg.items():
        s = a["stats"]
        wall = s.get("wall_s", (None, None, 0))
        rows.append([row_label(row), _seeds_cell(a["seeds"]),
                     format_bytes(*s["bytes_total"][:2]), format_bytes(*s["bytes_up"][:2]),
                     format_bytes(*s["bytes_down"][:2]),
                     format_mean_std(*(None if v is None else v / 60 for v in wall[:2]), 1)])
    parts += ["**cost**: bytes over the whole run, all clients, up and down; wall time of the "
              "run (start-up and evaluation included)", "", markdown_table(header, rows)]
    return "\n".join(parts)


# --------------------------------------------------------------------------- targets


def _stat(agg: Mapping[str, Any], row: str, key: str) -> tuple[float | None, float | None]:
    if row not in agg:
        return None, None
    mean, std, _ = agg[row]["stats"].get(key, (None, None, 0))
    return mean, std


def _beats(agg: Mapping[str, Any], winner: str, loser: str, key: str) -> dict[str, Any]:
    a, sa = _stat(agg, winner, key)
    b, sb = _stat(agg, loser, key)
    check: dict[str, Any] = {"target": f"{winner} > {loser} on {key}", "kind": "beats",
                             winner: a, loser: b}
    if a is None or b is None:
        missing = [r for r, v in ((winner, a), (loser, b)) if v is None]
        return {**check, "passed": None, "detail": f"skipped: no result for {missing}"}
    pooled = math.sqrt(((sa or 0.0) ** 2 + (sb or 0.0) ** 2) / 2)
    margin = (a - b) / pooled if pooled > 0 else None
    detail = f"{a:.4f} vs {b:.4f} (delta {a - b:+.4f}"
    detail += f", {margin:+.1f} pooled std)" if margin is not None else ", one seed or no spread)"
    return {**check, "passed": a > b, "delta": a - b, "margin_std": margin, "detail": detail}


NO_PER_STUDY = "n/a (no per-study records)"
BOOTSTRAP_RESAMPLES = 2000


# metric -> (which per-study items it reads, the corpus metric of a list of them)
PER_STUDY_METRICS = {"ce_f1_macro": "ce_labels", "ce_f1_micro": "ce_labels", "bleu4": "bleu"}


def per_study_units(records: Sequence[Mapping[str, Any]], row: str, key: str
                    ) -> dict[tuple[int, str], list[Any]]:
    """(seed, center) -> the row's per-study items for `key` (`<scope>/<metric>`, metric in
    PER_STUDY_METRICS) from the records' `per_study` (`per_study_items`): per test study (in
    study-id order) the tuple of the items of every model that evaluated the center; empty
    when the records hold none."""
    scope, _, metric = key.partition("/")
    if metric not in PER_STUDY_METRICS:
        return {}
    which = PER_STUDY_METRICS[metric]
    out = {}
    for r in records:
        if r["row"] != row:
            continue
        for center, models in ((r.get("per_study") or {}).get(scope) or {}).items():
            out[(r["seed"], center)] = [tuple(study) for study in
                                        zip(*(m[which] for m in models), strict=True)]
    return out


def paired_interval(records: Sequence[Mapping[str, Any]], winner: str, loser: str, key: str,
                    ) -> dict[str, Any] | None:
    """The paired bootstrap 95% interval of winner - loser on `key` over the test studies
    (`fedmrg.eval.bootstrap`), resampled within every (seed, center) both rows have, or None
    when the records hold no per-study items for both."""
    from fedmrg.eval.bootstrap import (
        bleu4_of_studies,
        ce_f1_macro_of_studies,
        ce_f1_micro_of_studies,
        over_models,
        paired_bootstrap,
    )

    a, b = per_study_units(records, winner, key), per_study_units(records, loser, key)
    shared = [u for u in sorted(set(a) & set(b)) if len(a[u]) == len(b[u])]
    if not shared:
        return None
    metric = {"ce_f1_macro": ce_f1_macro_of_studies, "ce_f1_micro": ce_f1_micro_of_studies,
              "bleu4": bleu4_of_studies}[key.partition("/")[2]]
    diff, lo, hi = paired_bootstrap([a[u] for u in shared], [b[u] for u in shared],
                                    BOOTSTRAP_RESAMPLES, seed=0, metric=over_models(metric))
    return {"diff": diff, "lo": lo, "hi": hi, "units": len(shared),
            "studies": sum(len(a[u]) for u in shared), "resolved": lo > 0 or hi < 0}


def _with_interval(check: dict[str, Any], records: Sequence[Mapping[str, Any]] | None,
                   winner: str, loser: str, key: str) -> dict[str, Any]:
    if records is None:
        return check
    ci = paired_interval(records, winner, loser, key)
    check["ci95"] = ci
    check["detail"] += ("; paired 95% CI " + (NO_PER_STUDY if ci is None else
                        f"[{ci['lo']:+.4f}, {ci['hi']:+.4f}] over {ci['units']} "
                        f"seed x center test sets"))
    return check


def check_targets(agg: Mapping[str, Mapping[str, Any]],
                  records: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The issue's targets on the aggregated rows (module docstring); a target whose rows did
    not run is `passed: None` with the reason. Ablations: contribution = full fedmrg minus
    the ablated row per main metric (positive: the mechanism helps), bytes as a ratio. With
    `records`, each comparison also gets its paired bootstrap interval over test studies
    (`paired_interval`, `ci95`; "n/a (no per-study records)" where the records hold none)."""
    checks = []
    for loser in ("fedavg", "local"):
        for key in ("personalization/ce_f1_macro", "personalization/bleu4"):
            checks.append(_with_interval(_beats(agg, "fedmrg", loser, key), records,
                                         "fedmrg", loser, key))
    for key in ("heldout/ce_f1_macro", "heldout/bleu4"):
        checks.append(_with_interval(_beats(agg, "fedmrg", "local", key), records,
                                     "fedmrg", "local", key))
    key = "generalization/ce_f1_macro"
    mine, _ = _stat(agg, "fedmrg", key)
    central, _ = _stat(agg, "centralized", key)
    target = (f"fedmrg {key} >= {CENTRALIZED_FRACTION:.0%} of centralized")
    if mine is None or central is None:
        checks.append({"target": target, "kind": "fraction", "passed": None,
                       "detail": "skipped: fedmrg or centralized did not run"})
    else:
        ratio = mine / central if central else math.inf
        checks.append({"target": target, "kind": "fraction", "fedmrg": mine,
                       "centralized": central, "ratio": ratio,
                       "passed": ratio >= CENTRALIZED_FRACTION,
                       "detail": f"{mine:.4f} / {central:.4f} = {ratio:.0%}"})
    main = [f"{scope}/{m}" for scope in SCOPES for m in ("ce_f1_macro", "bleu4")]
    ablations: dict[str, Any] = {}
    for row in (r for r in ROWS if r.startswith("fedmrg-")):  # ablations and wire rows
        if row not in agg or "fedmrg" not in agg:
            continue
        contribution = {}
        intervals: dict[str, Any] = {}
        for k in main:
            full, ablated = _stat(agg, "fedmrg", k)[0], _stat(agg, row, k)[0]
            contribution[k] = None if full is None or ablated is None else full - ablated
            if records is not None:
                intervals[k] = paired_interval(records, "fedmrg", row, k)
        full_bytes, ablated_bytes = (_stat(agg, "fedmrg", "bytes_total")[0],
                                     _stat(agg, row, "bytes_total")[0])
        ablations[row] = {
            "contribution": contribution,
            "bytes_ratio_without": (ablated_bytes / full_bytes if full_bytes else None),
            "helps_on": [k for k, v in contribution.items() if v is not None and v > 0],
            "hurts_on": [k for k, v in contribution.items() if v is not None and v < 0],
            **({"ci95": intervals} if records is not None else {})}
    decided = [c for c in checks if c["passed"] is not None]
    return {"checks": checks, "ablations": ablations,
            "passed": sum(bool(c["passed"]) for c in decided), "decided": len(decided)}


def targets_text(targets: Mapping[str, Any]) -> str:
    """The target checks and ablation contributions as lines of markdown."""
    lines = [f"**targets**: {targets['passed']} of {targets['decided']} met", ""]
    for c in targets["checks"]:
        mark = {True: "met", False: "MISSED", None: "skipped"}[c["passed"]]
        lines.append(f"- {mark}: {c['target']}: {c['detail']}")
    if targets["ablations"]:
        lines += ["", "**ablations and wire quantization**: full fedmrg minus the row (an "
                      "ablation: the mechanism's contribution, positive when it helps; a "
                      "quantized wire: its quality cost, positive when it loses)", ""]
        header = ["row", *(k.replace("/", " ") for k in
                               next(iter(targets["ablations"].values()))["contribution"]),
                  "bytes x (row / fedmrg)"]
        rows = []
        for row, a in targets["ablations"].items():
            ratio = a["bytes_ratio_without"]
            rows.append([row_label(row),
                         *("n/a" if v is None else f"{v:+.4f}"
                           for v in a["contribution"].values()),
                         "n/a" if ratio is None else f"{ratio:.2f}"])
        lines.append(markdown_table(header, rows))
        with_ci = {row: a["ci95"] for row, a in targets["ablations"].items() if "ci95" in a}
        if with_ci:
            lines += ["", "paired bootstrap 95% intervals of the contributions (over test "
                          "studies, paired, pooled over seeds):", ""]
            rows = [[row_label(row),
                     *(NO_PER_STUDY if ci is None else f"[{ci['lo']:+.4f}, {ci['hi']:+.4f}]"
                       for ci in cis.values())] for row, cis in with_ci.items()]
            lines.append(markdown_table(header[:-1], rows))
    return "\n".join(lines)


# --------------------------------------------------------------------------- the plot


def write_plot(series: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]], path: Path,
               title: str = "") -> Path:
    """One panel per main metric (PLOT_PANELS) against the round, one line per row (mean over
    seeds); a single evaluation shows as a point. PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    last_round = max((x for s in series.values() for points in s.values() for x, _ in points),
                     default=1)
    for ax, (key, panel_title) in zip(axes.flat, PLOT_PANELS, strict=True):
        drawn = False
        for row in (r for r in ROWS if r in series):
            points = series[row].get(key, [])
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            style = "--" if row.startswith("fedmrg-") else "-"
            ax.plot(xs, ys, style, marker="o", markersize=3, label=row_label(row),
                    linewidth=2.5 if row == "fedmrg" else 1.2)
            drawn = True
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(0.5, last_round + 0.5)  # every panel on the same rounds
        ax.grid(alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    handles, labels = [], []
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.08 if handles else 0, 1, 0.96 if title else 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- running


# Where a run's files and MLflow records go, not what it computes: `--resume` may find a
# record made with another --storage or --tracking-uri (e.g. a record copied from elsewhere).
WHERE_KEYS = ("tracking.storage_path=", "tracking.tracking_uri=", "tracking.artifact_location=")


def _what_it_computes(overrides: Sequence[str]) -> list[str]:
    return [o for o in overrides if not o.startswith(WHERE_KEYS)]


def load_recorded(path: Path, spec: RunSpec) -> dict[str, Any]:
    """A finished run's record for `--resume`; it must have been made with `spec`'s overrides
    (else the table would mix budgets), where its files went aside (`WHERE_KEYS`)."""
    try:
        record = json.loads(path.read_text())
        recorded = _what_it_computes(list(record["overrides"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BenchmarkError(f"{path}: unreadable run record ({e}); delete it to rerun "
                             f"{spec.name}") from None
    wanted = _what_it_computes(spec.overrides)
    if recorded != wanted:
        differ = sorted(set(recorded) ^ set(wanted))
        raise BenchmarkError(f"{path}: recorded with other settings than this invocation "
                             f"(differing overrides: {differ}); use the same arguments, "
                             f"another --out, or delete the file")
    return record


def run_one(spec: RunSpec, *, resume: bool) -> dict[str, Any]:
    """`Experiment(cfg, run_name=spec.name).fit()` and its record. Without `resume` the run's
    storage folder is removed first (a fresh run); with it, a run that started there
    continues from its last checkpoint (or returns its summary if it had finished)."""
    from fedmrg.config import load_config
    from fedmrg.experiment import Experiment, resolve_paths
    from fedmrg.tracking import git_commit

    cfg = load_config("default", spec.overrides)
    commit, product = git_commit(), product_version()
    run_dir = Path(resolve_paths(cfg).tracking.storage_path) / spec.name
    if not resume and run_dir.exists():
        log.info("%s: removing the earlier run's folder %s (fresh run)", spec.name, run_dir)
        shutil.rmtree(run_dir)
    load_start = os.getloadavg()
    start = time.perf_counter()
    result = Experiment(cfg, run_name=spec.name, progress=False).fit()
    wall = time.perf_counter() - start
    summary = result.summary()
    if result.already_finished:
        wall = summary.get("wall_s") or wall
    try:
        evaluations = read_evaluations(summary)
    except Exception as e:  # the table still has the final metrics from the summary
        log.warning("%s: per-round evaluations not read from MLflow (%s)", spec.name, e)
        evaluations = []
    return run_record(spec, summary, evaluations, wall_s=wall, loadavg_start=load_start,
                      loadavg_end=os.getloadavg(), git_commit=commit, product=product,
                      generation=generation_settings(cfg))


def product_version(root: Path = ROOT) -> str:
    """The product code (`fedmrg/`) as a run imports it: the last commit that changed it, plus
    `+dirty.<hash>` of its uncommitted changes and untracked files when there are any. The
    same code gives the same string whatever else changed in the tree; 'unknown' without
    git."""
    def git(*args: str) -> bytes:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, check=True,
                              timeout=30).stdout

    try:
        commit = git("log", "-1", "--format=%H", "--", "fedmrg").decode().strip()
        digest = hashlib.sha256(git("diff", "HEAD", "--", "fedmrg"))
        untracked = git("ls-files", "--others", "--exclude-standard", "--", "fedmrg").split()
        for name in sorted(untracked):
            digest.update(name + b"\0" + (root / name.decode()).read_bytes())
        dirty = bool(git("diff", "HEAD", "--name-only", "--", "fedmrg").strip() or untracked)
    except (OSError, subprocess.SubprocessError, ValueError):
        return "unknown"
    if not commit:
        return "unknown"
    return f"{commit}+dirty.{digest.hexdigest()[:12]}" if dirty else commit


def run_with_retries(spec: RunSpec, *, resume: bool, retries: int) -> dict[str, Any]:
    """`run_one`, tried again up to `retries` times after a failure, each retry continuing
    from the run's last checkpoint (`resume=True`); the last error is raised. The record's
    wall time covers every attempt; `failed_attempts` lists the earlier errors."""
    attempts: list[dict[str, Any]] = []
    start = time.perf_counter()
    for attempt in range(retries + 1):
        began = time.perf_counter()
        try:
            record = run_one(spec, resume=resume or attempt > 0)
        except Exception as e:
            attempts.append({"error": f"{type(e).__name__}: {e}",
                             "wall_s": time.perf_counter() - began})
            if attempt == retries:
                raise
            log.warning("%s: attempt %d failed (%s); continuing it from its last checkpoint",
                        spec.name, attempt + 1, attempts[-1]["error"])
            continue
        if attempts:
            record["wall_s"] = record["final"]["wall_s"] = time.perf_counter() - start
        record["failed_attempts"] = attempts
        return record
    raise AssertionError("unreachable")


def generation_settings(cfg: Any) -> dict[str, Any]:
    """The `eval.*` settings a run generates its reports with."""
    from fedmrg.eval.evaluator import generation_kwargs

    return generation_kwargs(cfg.eval)


def _centers(rejected: Any) -> str:
    """The rejected centers of a round row (a count in records made before they were named)."""
    return ", ".join(sorted(rejected)) if isinstance(rejected, Mapping) else f"{rejected} client(s)"


def consistency(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Why the runs of one table may not be comparable: more than one version of the product
    code or of the generation settings among them, and runs that lost client updates (a
    client that failed, e.g. an actor killed and restarted, trains less than the budget).
    Empty: consistent."""
    problems = []
    for key, what in (("product_version", "versions of the product code (fedmrg/)"),
                      ("generation", "generation settings")):
        groups: dict[str, list[str]] = {}
        for r in records:
            groups.setdefault(json.dumps(r.get(key), sort_keys=True), []).append(r["name"])
        if len(groups) > 1:
            problems.append(f"{len(groups)} different {what}: " + "; ".join(
                f"{value} ({', '.join(names)})" for value, names in groups.items()))
    for r in records:
        lost = {rr["round"]: rr["rejected"] for rr in r["rounds"] if rr.get("rejected")}
        if lost:
            problems.append(f"{r['name']}: client updates not aggregated in round(s) "
                            + ", ".join(f"{k} ({_centers(v)})" for k, v in lost.items())
                            + "; it trained less than the budget")
    return problems


def participating_count(extra: Sequence[str]) -> int:
    """N, the centers that take part (for the centralized budget), from the dataset the runs
    will use (generated here if missing, as `fit()` would)."""
    from fedmrg.config import load_config
    from fedmrg.data.prepare import ensure_dataset, participating_centers
    from fedmrg.data.shards import read_manifest

    cfg = load_config("default", list(extra))
    return len(participating_centers(cfg.data, read_manifest(ensure_dataset(cfg.data))))


def run_line(i: int, n: int, record: Mapping[str, Any], skipped: bool = False) -> str:
    f = record["final"]

    def v(key: str) -> str:
        return "n/a" if f.get(key) is None else f"{f[key]:.3f}"

    what = "recorded" if skipped else f"{record['wall_s'] / 60:.1f} min"
    return (f"[{i}/{n}] {record['name']}: {what} | gen CE-F1 {v('generalization/ce_f1_macro')}"
            f" BLEU-4 {v('generalization/bleu4')} | held-out CE-F1 {v('heldout/ce_f1_macro')}"
            f" BLEU-4 {v('heldout/bleu4')} | pers CE-F1 {v('personalization/ce_f1_macro')}"
            f" BLEU-4 {v('personalization/bleu4')} | {format_bytes(f['bytes_total'])}")


def write_outputs(out: Path, mode: str, header: Mapping[str, Any],
                  records: Sequence[Mapping[str, Any]], failed: Sequence[Mapping[str, Any]]
                  ) -> dict[str, Any]:
    """`<mode>.json`, `<mode>.md` and `<mode>_rounds.png` from the records so far."""
    agg = aggregate(records)
    targets = check_targets(agg, records)
    tables = results_tables(agg) if agg else "(no finished run yet)"
    text = targets_text(targets)
    problems = consistency(records)
    document = {**header, "runs": list(records), "failed": list(failed), "aggregate": agg,
                "targets": targets, "consistency": problems, "tables_markdown": tables}
    write_json(out / f"{mode}.json", document)
    md = [f"# FL-MRG benchmark ({mode} mode)", "", f"`{header['command']}`", "",
          f"Machine: {header['machine']['cpu']}, {header['machine']['nproc']} cores, load "
          f"average {header['machine']['loadavg']} at the start. Budget: "
          f"{header['budget']['rule']}. Evaluation: {header['evaluation']['rule']}. "
          f"Mean ± sample std over seeds.", "",
          tables, "", text]
    if problems:
        md += ["", "**warning, runs not comparable**: " + " | ".join(problems)]
    if failed:
        md += ["", "**failed runs**: " + "; ".join(f"{f['name']}: {f['error']}" for f in failed)]
    (out / f"{mode}.md").write_text("\n".join(md) + "\n")
    if records:
        write_plot(per_round_series(records), out / f"{mode}_rounds.png",
                   f"FL-MRG benchmark ({mode}): mean over seeds")
    return document


def read_records(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """Run records for `--report`, each checked to be one; a run given twice is an error."""
    records = []
    for path in paths:
        try:
            record = json.loads(Path(path).read_text())
            if not isinstance(record.get("final"), dict) or record.get("row") not in ROWS:
                raise ValueError("no 'final' metrics or no known 'row'")
        except (OSError, ValueError, AttributeError) as e:
            raise BenchmarkError(f"{path}: not a run record of this benchmark ({e})") from None
        records.append(record)
    names = [r["name"] for r in records]
    if len(set(names)) < len(names):
        raise BenchmarkError(f"--report: the same run twice: "
                             f"{sorted({n for n in names if names.count(n) > 1})}")
    return records


def report(out: Path, mode: str, header: dict[str, Any], records: Sequence[dict[str, Any]],
           paths: Sequence[Path]) -> int:
    """`--report`: the outputs from recorded runs, none run (module docstring)."""
    header = {**header, "rows": sorted({r["row"] for r in records}, key=ROWS.index),
              "seeds": sorted({r["seed"] for r in records}),
              "reported_records": [str(p) for p in paths]}
    print_document(write_outputs(out, mode, header, records, []), out, mode)
    return 0


def print_document(document: Mapping[str, Any], out: Path, mode: str) -> None:
    """The tables, the target checks and any consistency warning, as written to `out`."""
    print(document["tables_markdown"])
    print()
    print(targets_text(document["targets"]))
    for problem in document["consistency"]:
        print(f"WARNING, runs not comparable: {problem}")
    print(f"\nwrote {out / f'{mode}.json'}, {out / f'{mode}.md'}, {out / f'{mode}_rounds.png'}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the routine-check mode")
    parser.add_argument("--seeds", help="a count (3: seeds 0,1,2) or a comma list")
    parser.add_argument("--strategies", help=f"comma list of rows from {list(ROWS)}, 'all', "
                                             f"'ablations'")
    parser.add_argument("--rounds", type=int, help="federation.rounds")
    parser.add_argument("--local-steps", type=int, help="train.local_steps per client")
    parser.add_argument("--eval-every", type=int, help="federation.eval_every")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fl_mrg")
    parser.add_argument("--storage", type=Path,
                        help="tracking.storage_path (default runs/fl_mrg/<mode>)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: the config's)")
    parser.add_argument("--set", dest="extra", action="append", default=[],
                        metavar="KEY=VALUE", help="config override for every run")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="overrides for every run before --set (PRESETS: 'evidence' is "
                             "150 test studies per center and per-study records)")
    parser.add_argument("--retries", type=int, default=1,
                        help="times a failed run is continued from its checkpoint")
    parser.add_argument("--resume", action="store_true",
                        help="skip runs whose record exists; continue interrupted ones")
    parser.add_argument("--report", type=Path, nargs="+", metavar="RECORD",
                        help="run nothing: the table of these run records")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from fedmrg.config import load_config

    if args.retries < 0:
        raise BenchmarkError(f"--retries must be >= 0, got {args.retries}")
    mode = MODES["quick" if args.quick else "full"]
    args.extra = [*PRESETS.get(args.preset, ()), *args.extra]
    defaults = load_config("default", args.extra)
    rows = parse_rows(args.strategies) if args.strategies else list(mode.rows)
    seeds = parse_seeds(args.seeds) if args.seeds else list(mode.seeds)
    rounds = args.rounds or mode.rounds or defaults.federation.rounds
    local_steps = args.local_steps or mode.local_steps or defaults.train.local_steps
    eval_every = mode.eval_every if args.eval_every is None else args.eval_every
    storage = (args.storage or ROOT / "runs" / "fl_mrg" / mode.name).resolve()
    experiment = "fl_mrg_benchmark" + ("_quick" if mode.name == "quick" else "")
    reported = read_records(args.report) if args.report else None
    # the budget of recorded runs: their own centers (no dataset needed to table them)
    n_centers = (max(len(r["centers"]) for r in reported) if reported
                 else participating_count(args.extra))
    specs = run_matrix(rows, seeds, rounds=rounds, local_steps=local_steps,
                       n_centers=n_centers, eval_every=eval_every, experiment=experiment,
                       storage_path=str(storage), tracking_uri=args.tracking_uri,
                       extra=args.extra)
    for spec in specs:  # every config is valid before hours of runs start
        load_config("default", spec.overrides)
    gen = defaults.eval
    decoding = ("greedy decoding" if gen.num_beams == 1 else
                f"beam search ({gen.num_beams} beams)")
    from fedmrg.tracking import git_commit

    header = {
        "benchmark": "fl_mrg", "mode": mode.name, "command": command_line("fl_mrg.py", argv),
        "machine": machine_info(), "git_commit": git_commit(),
        "product_version": product_version(), "rows": rows, "seeds": seeds,
        "budget": {"rounds": rounds, "local_steps": local_steps, "n_centers": n_centers,
                   "batch_size": defaults.data.batch_size,
                   "rule": budget_rule(rounds, local_steps, n_centers,
                                       defaults.data.batch_size)},
        "evaluation": {"eval_every": eval_every, **generation_settings(defaults),
                       "rule": (f"test splits, {decoding} up to {gen.max_new_tokens} tokens, "
                                + (f"every {eval_every} rounds and after the last"
                                   if eval_every else "after the last round only"))},
        "mlflow": {"experiment": experiment,
                   "tracking_uri": args.tracking_uri or defaults.tracking.tracking_uri},
        "storage": str(storage), "extra_overrides": list(args.extra),
    }
    out: Path = args.out.resolve()
    if reported is not None:
        return report(out, mode.name, header, reported, args.report)
    print(f"FL-MRG benchmark, {mode.name} mode: {len(specs)} runs ({len(rows)} rows x "
          f"{len(seeds)} seeds); {header['budget']['rule']}", flush=True)
    run_dir = out / "runs" / mode.name
    records: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    start = time.perf_counter()
    import ray

    from fedmrg.ray_cluster import connect

    started_ray = not ray.is_initialized()
    connect(defaults.resources)  # one Ray for every run
    try:
        for i, spec in enumerate(specs, 1):
            path = run_dir / f"{spec.name}.json"
            if args.resume and path.is_file():
                records.append(load_recorded(path, spec))
                print(run_line(i, len(specs), records[-1], skipped=True), flush=True)
                continue
            try:
                record = run_with_retries(spec, resume=args.resume, retries=args.retries)
            except Exception as e:  # recorded and reported; the other runs go on
                log.exception("%s failed", spec.name)
                failed.append({"name": spec.name, "error": f"{type(e).__name__}: {e}"})
                print(f"[{i}/{len(specs)}] {spec.name}: FAILED ({type(e).__name__}: {e})",
                      flush=True)
                continue
            write_json(path, record)
            records.append(record)
            print(run_line(i, len(specs), record), flush=True)
            header["wall_s"] = time.perf_counter() - start
            header["loadavg_end"] = list(os.getloadavg())
            write_outputs(out, mode.name, header, records, failed)
    finally:
        if started_ray:
            ray.shutdown()
    header["wall_s"] = time.perf_counter() - start
    header["loadavg_end"] = list(os.getloadavg())
    document = write_outputs(out, mode.name, header, records, failed)
    print(f"\nFL-MRG benchmark ({mode.name}): {len(records)} runs, {len(failed)} failed, "
          f"{header['wall_s'] / 60:.1f} min, load average {header['loadavg_end']}\n")
    print_document(document, out, mode.name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
