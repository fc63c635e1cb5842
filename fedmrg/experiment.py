"""The small user API, in the spirit of Ray Train: `Experiment(cfg).fit() -> Result`.

    from fedmrg.config import load_config
    from fedmrg.experiment import Experiment

    result = Experiment(load_config("default", ["federation.rounds=3"])).fit()
    print(result.table())

`fit()`:
1. resolves every path of the config to an absolute one (actors run in other processes,
   other working directories, other nodes);
2. connects to Ray (`resources.ray_address`, RAY_ADDRESS, else a local cluster), generates
   the phantom benchmark if it is missing, and builds the builtin base LM once here so every
   client actor finds it in the (shared, absolute) cache instead of building it in parallel;
3. starts one client per participating center (centralized: one client over the pooled
   data of all of them) in client actors, `resources.clients_per_actor` to an actor (1 by
   default), placed by `fedmrg.fl.actors`;
4. runs `run_federation` (strategy, `Coordinator`, MLflow) inside a coordinator actor on this
   node, or here with `in_process=True`, showing a progress bar over rounds and a one-line
   summary per round;
5. returns a `Result`: final generalization and personalization metrics per center and mean,
   communication totals, the round history, where MLflow and the run's files are.

Resume. After every completed round the coordinator logs the round to MLflow, then writes its
checkpoint under `<tracking.storage_path>/<run name>/checkpoints/` (`write_round_checkpoint`,
`fedmrg.fl.checkpoint`); each client writes its own private state under
`centers/<center>/checkpoints/` where it runs. `fit()` on a run name that already started there
(`resume=True`, or simply the same name again: a resubmitted job) continues from the newest
checkpoint: the same MLflow run (rounds and evaluations it already holds are not logged again),
the coordinator's state restored, each client back at its state of that round, so the final
models are those of an uninterrupted run. A corrupt newest checkpoint stops with a
`CheckpointError` naming the file, or with `checkpoint_fallback=True` the newest good one is
used; a config that changed what a round computes (the fingerprint) stops with the differing
keys. A run that already finished its `federation.rounds` does nothing and returns its saved
summary (`Result.already_finished`); more rounds extend it.

Only the coordinator (or this driver, in process) talks to MLflow. Artifacts: the final
generic adapter in PEFT format (from the global state), each center's specialized adapter
(written by its client under the run's storage folder, logged to the center's nested run
when the coordinator's node can read it), a table of sample reports, plots and the summary.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import re
import sys
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import yaml

from fedmrg.choices import View
from fedmrg.config import ExperimentConfig

log = logging.getLogger(__name__)

POOLED_CLIENT = "pooled"  # the id of the one client of the centralized baseline
# Inside <tracking.storage_path>/<run name>/:
RUN_CONFIG = "config.yaml"  # the resolved config the run used (after the strategy's switches)
RUN_SUMMARY = "summary.json"  # the final table, communication, rounds (Result.summary())
MODELS = "models"  # models/<client>/: each client's final model (fedmrg.model.io format)
# Columns of the final table (a subset of fedmrg.eval.evaluator.HEADLINE).
TABLE_KEYS = ("ce_f1_macro", "ce_f1_micro", "bleu1", "bleu4", "meteor", "rouge_l", "cider",
              "rep_4", "diag_acc")


class ExperimentError(ValueError):
    """The experiment cannot start or finish; the message names what and why."""


# --------------------------------------------------------------------------- paths


def _absolute(path: str, cwd: Path) -> str:
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (cwd / p).resolve())


def absolute_tracking_uri(uri: str, cwd: Path) -> str:
    """`sqlite:///relative.db` -> `sqlite:////abs/relative.db`; a bare path -> absolute;
    servers and absolute URIs unchanged."""
    match = re.match(r"^sqlite:///(.*)$", uri)
    if match and not match.group(1).startswith("/") and match.group(1) != ":memory:":
        return "sqlite:///" + _absolute(match.group(1), cwd)
    if re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*:", uri):
        return uri
    return _absolute(uri, cwd) if uri else uri


def resolve_paths(cfg: ExperimentConfig, cwd: str | Path | None = None) -> ExperimentConfig:
    """A copy of `cfg` whose local paths are absolute: data.root, model.lm_cache (expanded:
    every actor must use the same cache), model.lm when it is an existing local folder, a
    sqlite MLflow store and its artifact folder, tracking.storage_path."""
    cwd = Path(cwd or Path.cwd())
    lm = cfg.model.lm
    if not lm.startswith("builtin:") and (cwd / Path(lm).expanduser()).exists():
        lm = _absolute(lm, cwd)
    from fedmrg.tracking import is_server_uri

    artifact = cfg.tracking.artifact_location
    # a relative folder with a tracking server means "the server's own artifact root"
    # (fedmrg.tracking.resolve_artifact_location): only a local store gets it absolute
    if (artifact and not re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*:", artifact)
            and not is_server_uri(cfg.tracking.tracking_uri)):
        artifact = _absolute(artifact, cwd)
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, root=_absolute(cfg.data.root, cwd)),
        model=dataclasses.replace(cfg.model, lm=lm, lm_cache=_absolute(cfg.model.lm_cache, cwd)),
        tracking=dataclasses.replace(
            cfg.tracking, tracking_uri=absolute_tracking_uri(cfg.tracking.tracking_uri, cwd),
            artifact_location=artifact,
            storage_path=_absolute(cfg.tracking.storage_path, cwd)),
    )


def resolve_run_config(cfg: ExperimentConfig, run_name: str | None = None,
                       cwd: str | Path | None = None
                       ) -> tuple[ExperimentConfig, dict[str, tuple[Any, Any]]]:
    """The config a run uses, resolved once before anything starts and never changed after
    (it is frozen): local paths absolute (`resolve_paths`), the keys the strategy's definition
    implies set (`Strategy.configure`), `tracking.run_name` the run's name (`run_name`, else
    the config's, else a generated one: each client finds its checkpoint folder through it).
    Also returns what the strategy changed, {key: (user's value, strategy's value)}."""
    from fedmrg.fl.strategies import strategy_class
    from fedmrg.tracking import default_run_name

    user = resolve_paths(cfg, cwd)
    strategy = strategy_class(user.federation.strategy)
    implied = strategy.implied_changes(user)
    resolved = strategy.configure(user)
    name = run_name or resolved.tracking.run_name or default_run_name(strategy.name)
    resolved = dataclasses.replace(resolved, tracking=dataclasses.replace(resolved.tracking,
                                                                          run_name=name))
    return resolved, implied


def describe_changes(changes: Mapping[str, tuple[Any, Any]]) -> str:
    """`a.b=1 (was 2), ...` for {key: (before, after)}."""
    return ", ".join(f"{key}={after!r} (was {before!r})"
                     for key, (before, after) in changes.items())


def client_layout(strategy: str, centers: Sequence[str]) -> dict[str, list[str] | None]:
    """Client id -> the centers whose data it pools (None: its own center only): one pooled
    client when the strategy says so (`Strategy.pools_data`, e.g. `centralized`)."""
    from fedmrg.fl.strategies import strategy_class

    if strategy_class(strategy).pools_data:
        return {POOLED_CLIENT: list(centers)}
    return {c: None for c in centers}


def check_min_clients(cfg: ExperimentConfig, layout: Mapping[str, Sequence[str] | None]
                      ) -> None:
    """`federation.min_clients` must not exceed the clients the run has (`client_layout`):
    no round could ever close. A `ConfigError` naming the key and the count, before Ray."""
    from fedmrg.config import ConfigError

    wanted, clients = cfg.federation.min_clients, sorted(layout)
    if wanted <= len(clients):
        return
    if len(clients) == 1 and layout[clients[0]]:
        has = (f"1 client ({cfg.federation.strategy} pools the data of centers "
               f"{', '.join(layout[clients[0]])})")
    else:
        has = f"{len(clients)} client(s), one per center: {', '.join(clients)}"
    raise ConfigError(f"federation.min_clients={wanted} but the run has {has}; no round could "
                      f"close: set federation.min_clients to at most {len(clients)}")


def check_checkpoint_space(cfg: ExperimentConfig, clients: int) -> None:
    """Before the clients start: `tracking.storage_path` must hold one round's checkpoints of
    this run, from the model's parameter count (`fedmrg.output_paths.check_free_space`: a
    `DiskSpaceError` otherwise); too little for what the whole run keeps is a warning line on
    stderr. Checked on this node: clients elsewhere write their own checkpoints where they
    run."""
    from fedmrg.choices import ServerOptimizer
    from fedmrg.model.preflight import model_parameter_summary
    from fedmrg.output_paths import check_free_space, checkpoint_bytes

    try:
        summary = model_parameter_summary(cfg.model)
    except Exception as e:  # noqa: BLE001 - an LM this estimate cannot build on meta
        log.warning("free space for checkpoints not checked: the model could not be sized "
                    "before the run (%s: %s)", type(e).__name__, e)
        return
    moments = 0 if cfg.federation.server_optimizer == ServerOptimizer.NONE else 2
    need = checkpoint_bytes(summary, clients, server_moments=moments)
    warning = check_free_space(cfg.tracking.storage_path, need,
                               keep=cfg.tracking.checkpoint_keep)
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the result


@dataclass
class Result:
    """What a run gives back (`run_federation`, `Experiment.fit()`). Its `summary()` is the one
    schema of a run's results: `<run>/summary.json`, `fedmrg run --summary-json` and the
    MLflow run's summary artifact are all `summary()`, and `from_summary` reads it back."""

    run_name: str
    strategy: str
    centers: list[str]
    rounds: list[dict[str, Any]]  # RoundSummary.to_dict() per round
    generalization: dict[str, Any]  # {"per_center": {center: metrics}, "mean": metrics}
    personalization: dict[str, Any]
    communication: dict[str, float]
    wall_s: float
    storage_dir: str
    mlflow: dict[str, str]  # tracking_uri, experiment_id, run_id
    placement: dict[str, dict] = field(default_factory=dict)  # client -> node, resources
    resumed_from: int | None = None  # the checkpoint round this run continued from
    privacy: dict[str, Any] = field(default_factory=dict)  # docs/privacy.md; {}: off
    # the validation points (eval.val_every): {"evaluations": how many, "wall_s": their cost}
    validation: dict[str, Any] = field(default_factory=dict)
    # in memory only, never in the summary:
    global_state_puts: int = 0  # global states put in the object store (once per round)
    global_state: dict | None = None  # final global shared state (tensors)
    messages: list = field(default_factory=list)  # every client reply, when recorded
    already_finished: bool = False  # nothing was done: read back from the run's summary.json

    IN_MEMORY = ("global_state_puts", "global_state", "messages", "already_finished")

    def summary(self) -> dict[str, Any]:
        """Plain JSON: every field but the in-memory ones (tensors, recorded messages)."""
        from fedmrg.tracking import jsonable

        return jsonable({f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                         if f.name not in self.IN_MEMORY})

    @classmethod
    def from_summary(cls, summary: Mapping[str, Any]) -> Result:
        """A finished run's Result read back from its summary.json (no tensors, no messages:
        the final generic adapter is in `<run>/generic_adapter`). A key an older summary
        lacks takes its default."""
        known = {f.name for f in dataclasses.fields(cls)} - set(cls.IN_MEMORY)
        return cls(**{"wall_s": 0.0, **{k: v for k, v in summary.items() if k in known}},
                   already_finished=True)

    def table(self, keys: Sequence[str] = TABLE_KEYS) -> str:
        """The final table: per center and mean for both views, then communication."""
        from fedmrg.eval.evaluator import metrics_table

        lines = [f"run {self.run_name}: strategy {self.strategy}, {len(self.rounds)} rounds, "
                 f"centers {', '.join(self.centers)}, {self.wall_s / 60:.1f} min"]
        for view, what in (("generalization", "generic model on every center's test split"),
                           ("personalization", "each center's own model on its test split")):
            table = getattr(self, view)
            rows = [{"center": c, **m} for c, m in table.get("per_center", {}).items()]
            if not rows:
                continue
            rows.append({"center": "mean", **table.get("mean", {})})
            lines += ["", f"{view} ({what})", metrics_table(rows, keys)]
        c = self.communication
        if c:
            lines += ["", "communication (per round per client)",
                      f"  up   {_size(c['bytes_up_per_client_round'])}, down "
                      f"{_size(c['bytes_down_per_client_round'])}",
                      f"  the same update sent dense: {_size(c['dense_up_per_client_round'])} "
                      f"({c['dense_ratio']:.1f}x the bytes sent up)",
                      f"  the full model: {_size(c['full_model_bytes'])} "
                      f"({c['full_model_ratio']:.0f}x the bytes sent up)",
                      f"  totals: up {_size(c['bytes_up_total'])}, down "
                      f"{_size(c['bytes_down_total'])}"]
        if self.mlflow.get("run_id"):
            lines += ["", f"MLflow: run {self.mlflow['run_id']} in experiment "
                          f"{self.mlflow['experiment_id']} at {self.mlflow['tracking_uri']}"]
        lines.append(f"run files: {self.storage_dir}")
        if self.privacy.get("stopped"):  # the run's last line: why it ended early
            lines.append(self.privacy["stopped"])
        return "\n".join(lines)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def communication_totals(rounds: Sequence[Mapping[str, Any]], full_model_bytes: int
                         ) -> dict[str, float]:
    """Bytes per round per client (mean over rounds, each round over its participants) up and
    down, the dense-equivalent of the uploads and its ratio, the full model's size and its
    ratio to one upload, and run totals."""
    up = sum(r["bytes_up"] for r in rounds)
    down = sum(r["bytes_down"] for r in rounds)
    dense = sum(r["dense_equivalent_up"] for r in rounds)
    client_rounds = sum(len(r["participants"]) for r in rounds) or 1
    per_up, per_down = up / client_rounds, down / client_rounds
    return {
        "bytes_up_total": float(up), "bytes_down_total": float(down),
        "dense_equivalent_up_total": float(dense),
        "bytes_up_per_client_round": per_up, "bytes_down_per_client_round": per_down,
        "dense_up_per_client_round": dense / client_rounds,
        "dense_ratio": dense / up if up else math.nan,
        "full_model_bytes": float(full_model_bytes),
        "full_model_ratio": full_model_bytes / per_up if per_up else math.nan,
        "client_rounds": float(client_rounds),
    }


# --------------------------------------------------------------------------- the run


def _evaluation_table(reply_or_table: Any) -> dict[str, Any]:
    """{"per_center": {center: metrics}, "mean": metrics} from the coordinator's result, and
    with `eval.per_study` "per_study": {center: [one reply's per-study items per model that
    evaluated it]} (one model, except `local`'s clients each on a held-out center)."""
    if reply_or_table is None:
        return {"per_center": {}, "mean": {}}
    if isinstance(reply_or_table, Mapping):
        return {k: dict(reply_or_table.get(k, {})) for k in ("per_center", "mean", "per_study")
                if k in reply_or_table or k != "per_study"}
    table = {"per_center": dict(reply_or_table.per_center), "mean": dict(reply_or_table.mean)}
    per_study: dict[str, list] = {}
    for reply in reply_or_table.replies:
        if reply.per_study:
            per_study.setdefault(reply.center, []).append(reply.per_study)
    if per_study:
        table["per_study"] = per_study
    return table


def round_metrics(row: Mapping[str, Any], center_runs: Collection[str]
                  ) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """(parent metrics, {center: metrics}) MLflow gets for one `RoundSummary.to_dict()`."""
    metrics = {"bytes_up": row["bytes_up"], "bytes_down": row["bytes_down"],
               "dense_equivalent_up": row["dense_equivalent_up"],
               "aggregation_time_s": row["aggregation_time_s"],
               "round_time_s": row["round_time_s"],
               "participants": len(row["participants"]), "rejected": len(row["rejected"])}
    per_center: dict[str, dict[str, float]] = {}
    for key, value in row["metrics"].items():
        # "<center>/<metric>" are the clients' own numbers; the rest are round-level
        center, _, name = key.partition("/")
        if name and center in center_runs:
            per_center.setdefault(center, {})[name] = value
        else:
            metrics[key] = value
    return metrics, per_center


def log_missing_rounds(tracker: Any, rows: Sequence[Mapping[str, Any]]) -> list[int]:
    """Log the rounds of a checkpoint's history that the MLflow run lacks (a resume into
    another tracking store, or an MLflow run lost); returns their ids. Rounds it already has
    are left as they are."""
    last = tracker.last_logged_round()
    missing = [row for row in rows if last is None or row["round_id"] > last]
    for row in missing:
        tracker.log_round(row["round_id"], *round_metrics(row, tracker.center_run_ids))
    return [row["round_id"] for row in missing]


def write_round_checkpoint(run_dir: str | Path, coordinator: Any, cfg: ExperimentConfig,
                           fingerprint: Mapping[str, Any],
                           meta: Mapping[str, Any] | None = None) -> Path:
    """The coordinator's checkpoint of its last finished round, `<run dir>/checkpoints/
    round-NNNNNN/`: `Coordinator.state_dict()` (round, strategy state: global shared state,
    server optimizer, prototypes, label counts; sampling RNG; round history) and, in the
    manifest, per-client bookkeeping and `meta`. Keeps `tracking.checkpoint_keep` rounds."""
    from fedmrg.fl.checkpoint import client_bookkeeping, run_checkpoint_dir, write_checkpoint

    rows = [s.to_dict() for s in coordinator.history]
    return write_checkpoint(run_checkpoint_dir(run_dir), coordinator.round_id,
                            {"coordinator": coordinator.state_dict()},
                            keep=cfg.tracking.checkpoint_keep, kind="coordinator",
                            fingerprint=fingerprint,
                            meta={**(meta or {}), "clients": client_bookkeeping(rows)})


def run_federation(cfg: ExperimentConfig, actors: Mapping[str, Any], *, centers: list[str],
                   dataset_root: str, run_name: str, heldout_centers: Sequence[str] = (),
                   resume: bool = False, resume_from: str | None = None, record: bool = False,
                   placement: Mapping[str, dict] | None = None, started_at: float | None = None,
                   emit: Callable[[dict], None] = lambda event: None) -> Result:
    """The coordinator's side of a run over started client actors: strategy, `Coordinator`,
    MLflow, checkpoints, end-of-run artifacts. `centers` are the participating centers
    (evaluated, their mean reported), `heldout_centers` are evaluated for generalization only.
    `resume` reattaches the MLflow run of that name; `resume_from` is the coordinator
    checkpoint folder to continue from (verified again here). After every round: its metrics
    go to MLflow, then its checkpoint is written (`write_round_checkpoint`). At the end, the
    models and adapters (`save_run_artifacts`), then the summary (`Result.summary()`) to MLflow
    and `<run>/summary.json`. `placement` (client -> where it runs) goes into the result as
    given; `wall_s` counts from `started_at` (`time.time()`, default: now). Runs in the
    coordinator actor or in the driver; the `Result` is picklable."""
    from fedmrg.fl.actors import ProgressWatchdog, RayClientPool
    from fedmrg.fl.checkpoint import load_checkpoint, run_fingerprint
    from fedmrg.fl.coordinator import Coordinator
    from fedmrg.fl.strategies import make_strategy
    from fedmrg.tracking import RunTracker, run_description

    begun = time.time()
    pool = RayClientPool(actors, record=record,
                         watchdog=ProgressWatchdog.for_run(cfg.resources))
    strategy = make_strategy(cfg)
    if strategy.cfg is not cfg:  # resolved once, by whoever built the run (`resolve_run_config`)
        raise ExperimentError(f"run_federation got a config the strategy still changes: "
                              f"{describe_changes(strategy.implied_changes(cfg))}")
    first = pool.centers()[0]
    initial = pool.call_all("shared_state", centers=[first])[first]
    sizes = pool.call_all("parameter_summary", centers=[first])[first]
    full_model_bytes = sum(group["bytes"] for group in sizes.values())
    run_dir = Path(cfg.tracking.storage_path) / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_CONFIG).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tracked = sorted(set(pool.centers()) | set(centers))
    fingerprint = run_fingerprint(cfg, dataset_root)
    checkpoint_state = None
    if resume_from is not None:
        checkpoint_state, _ = load_checkpoint(resume_from, fingerprint)
    tracker = RunTracker.start(cfg, tracked, dataset_root, run_name=run_name,
                               resume=resume or resume_from is not None)
    # at once: whoever stops this run (a signal, fedmrg.signals) ends these runs as KILLED
    emit({"type": "tracking", "tracking_uri": cfg.tracking.tracking_uri,
          "run_ids": [*tracker.center_run_ids.values(), tracker.run_id]})

    def on_round(summary) -> None:
        row = summary.to_dict()
        # MLflow first, then the checkpoint: a crash between the two re-runs the round on
        # resume, and the tracker skips its already logged metrics (never logged twice).
        tracker.log_round(row["round_id"], *round_metrics(row, tracker.center_run_ids))
        write_round_checkpoint(run_dir, coordinator, cfg, fingerprint,
                               meta={"run_name": run_name, "mlflow_run_id": tracker.run_id})
        emit({"type": "round", "summary": row})

    def on_evaluation(view: str, per_center: Mapping[str, Mapping[str, float]],
                      mean: Mapping[str, float], step: int | None = None,
                      split: str = "test") -> None:
        if step is None:
            step = tracker.last_logged_round() or 0
        if not tracker.has_evaluation(view, step, split):  # a resumed run logs it once
            # Coordinator.evaluate reports its latest Evaluation, whose replies hold the samples
            rows = evaluation_sample_rows(view, coordinator.evaluations[-1].replies)
            tracker.log_samples(rows, artifact_file=f"samples/{split}-round-{step:03d}.json")
        tracker.log_evaluation(step, view, per_center, mean, split=split)
        emit({"type": "evaluation", "view": view, "mean": dict(mean), "split": split,
              "round": step})

    with tracker:
        coordinator = Coordinator(cfg, strategy, pool, initial,
                                  rng=np.random.default_rng(cfg.seed), on_round=on_round,
                                  on_evaluation=on_evaluation, eval_centers=centers,
                                  heldout_centers=heldout_centers,
                                  val_every=cfg.eval.val_every,
                                  val_studies=cfg.eval.val_studies, on_event=emit)
        resumed_from = None
        if checkpoint_state is not None:
            coordinator.load_state_dict(checkpoint_state["coordinator"])
            resumed_from = coordinator.round_id
            tracker.tag({"fedmrg.resumed_from_round": str(resumed_from),
                         "fedmrg.resumed_from_checkpoint": str(resume_from)})
            log_missing_rounds(tracker, [s.to_dict() for s in coordinator.history])
        tracker.describe(run_description(cfg, centers, heldout_centers))
        emit({"type": "start", "run_name": run_name, "run_id": tracker.run_id,
              "rounds": cfg.federation.rounds, "clients": pool.centers(),
              "resumed_from": resumed_from})
        federated = coordinator.run()
        save_run_artifacts(cfg, pool, tracker, run_dir, federated, pools_data=strategy.pools_data)
        validations = [e for e in federated.evaluations
                       if e.split != coordinator.eval_split and e.view == View.GENERALIZATION]
        rounds = [s.to_dict() for s in federated.history]
        result = Result(
            run_name=run_name, strategy=strategy.name, centers=list(centers), rounds=rounds,
            generalization=_evaluation_table(federated.generalization),
            personalization=_evaluation_table(federated.personalization),
            communication=communication_totals(rounds, full_model_bytes),
            wall_s=time.time() - (started_at if started_at is not None else begun),
            storage_dir=str(run_dir),
            mlflow={"tracking_uri": cfg.tracking.tracking_uri,
                    "experiment_id": tracker.experiment_id, "run_id": tracker.run_id},
            placement=dict(placement or {}), resumed_from=resumed_from,
            # epsilon spent, the guarantee's settings, why it stopped early (docs/privacy.md)
            privacy=federated.privacy,
            validation={"evaluations": len(validations),
                        "wall_s": sum(e.wall_s for e in validations)},
            global_state_puts=pool.puts, global_state=federated.global_state,
            messages=list(pool.received))
        summary = result.summary()
        tracker.log_plots()
        tracker.describe(run_description(cfg, centers, heldout_centers, summary))
        tracker.log_summary(summary)
        (run_dir / RUN_SUMMARY).write_text(json.dumps(summary, indent=2))
    return result


def save_run_artifacts(cfg: ExperimentConfig, pool: Any, tracker: Any, run_dir: Path,
                       federated: Any, *, pools_data: bool) -> None:
    """A finished run's models, written under `run_dir` and logged to MLflow: every client's
    final model (global state + its private state, for `evaluate_run`), the generic adapter
    in PEFT format from the final global state, each center's specialized adapter (written
    where its client runs; logged when this node sees it; none when the strategy pools
    data), the pyfunc models (`tracking.log_models`) and the final samples table."""
    from fedmrg.fl.actors import write_folder

    global_state = federated.global_state
    state_ref = pool.state_ref(global_state)
    for center in pool.centers():
        pool.call_all("save_model", str(run_dir / MODELS / center), state_ref,
                      centers=[center])
    if global_state is not None:
        first = pool.centers()[0]
        files = pool.call_all("export_generic_adapter", global_state, centers=[first])[first]
        tracker.log_adapter(write_folder(files, run_dir / "generic_adapter"))
    if not pools_data:
        saved = {c: pool.call_all("save_specialized_adapter",
                                  str(run_dir / "centers" / c / "specialized_adapter"),
                                  centers=[c])[c] for c in pool.centers()}
        for center, path in saved.items():
            if path and Path(path, "adapter_config.json").is_file():
                tracker.log_adapter(path, center=center)
    if cfg.tracking.log_models:  # MLflow pyfunc models, from the saved ones (docs/models.md)
        tracker.log_models(run_dir, registered_name=cfg.tracking.register_model)
    samples = _sample_rows(federated)
    if samples:
        tracker.log_samples(samples)


def _sample_rows(federated: Any) -> list[dict[str, Any]]:
    """Rows for the MLflow samples table from the final evaluation replies."""
    return [row for view in View for row in evaluation_sample_rows(
        view, getattr(federated, f"{view}_replies", None) or [])]


def evaluation_sample_rows(view: str, replies: Sequence[Any]) -> list[dict[str, Any]]:
    """One evaluation view's sample studies as rows of an MLflow table: center, study_id,
    view, reference (empty unless eval.share_references), generated, the findings the
    diagnosis head predicted and, when references are shared, the true ones."""
    return [{"center": reply.center, "study_id": sample.get("study_id", ""), "view": view,
             "reference": str(sample.get("reference", "")),
             "generated": str(sample.get("generated", "")),
             "findings": str(sample.get("findings", "")),
             "true_findings": str(sample.get("true_findings", ""))}
            for reply in replies for sample in reply.samples]


# --------------------------------------------------------------------------- evaluation


def _own_head(model: Any, cfg: Any, data_cfg: Any, center: str) -> Any:
    """`center`'s own tuned copy of `model`'s diagnosis head, as its client makes it
    (`FederatedClient.own_head`: its train split, unaugmented, in order)."""
    from fedmrg.data.stream import CenterStream
    from fedmrg.fl.client import derive_seed
    from fedmrg.model.head_tuning import tune_own_head

    train = CenterStream.from_config(data_cfg, center, "train", model.cfg.in_chans,
                                     tokenizer=model.tokenizer, seed=cfg.seed, augment=False,
                                     shuffle=False)
    return tune_own_head(model, train.iter_batches(0), cfg.model.losses,
                         cfg.eval.head_tuning_steps, seed=derive_seed(cfg.seed, center, "head"))


def evaluate_run(run_dir: str | Path, *, data_root: str | None = None,
                 centers: Sequence[str] | None = None, split: str = "test",
                 overrides: Sequence[str] = (), connect_ray: bool = True,
                 views: Sequence[str] = tuple(View)) -> dict[str, Any]:
    """A finished run's models on a dataset: generalization (the generic model, any client's
    saved model with its specialized adapter off) and personalization (each center's own
    model; a center without one, e.g. under `centralized`, gets the first client's) on
    `split` of every center in `centers` (default: every center of the dataset).

    `data_root` defaults to the run's dataset (another dataset in the fedmrg layout works).
    `overrides` (`eval.key=value`, e.g. `eval.no_repeat_ngram_size=3`) change how reports are
    generated and scored on top of the run's config; only `eval.*` keys may change here.
    `eval.calibrate_head` calibrates each center's model on that center's val split before its
    personalization; `eval.per_study` adds each view's "per_study" as a run's summary has it;
    `views` picks the views (both by default).
    Returns {"generalization": {"per_center", "mean"}, "personalization": ..., "samples"};
    means are over the run's participating centers among those evaluated (all of them when
    none took part). Runs in this process (Ray Data streams the test splits).
    """
    from fedmrg.config import load_config
    from fedmrg.data.shards import read_manifest
    from fedmrg.data.stream import CenterStream
    from fedmrg.eval.calibration import fit_positive_thresholds
    from fedmrg.eval.evaluator import (
        evaluate_model,
        generation_kwargs,
        head_probabilities,
        mean_over_centers,
    )
    from fedmrg.fl.coordinator import evaluating_client
    from fedmrg.model.io import load_model

    outside = [o for o in overrides if not o.strip().startswith("eval.")]
    if outside:
        raise ExperimentError(f"--set {outside[0]}: only eval.* keys change an evaluation of a "
                              f"finished run (its models are fixed; --data-root picks the data)")
    run_dir = Path(run_dir).expanduser().resolve()
    if not (run_dir / RUN_CONFIG).is_file():
        raise ExperimentError(f"{run_dir}: no {RUN_CONFIG}; not the folder of a finished "
                              f"fedmrg run (<tracking.storage_path>/<run name>)")
    models_dir = run_dir / MODELS
    clients = sorted(p.name for p in models_dir.iterdir() if p.is_dir()) if (
        models_dir.is_dir()) else []
    if not clients:
        raise ExperimentError(f"{models_dir}: no saved client model; the run did not finish")
    cfg = load_config(str(run_dir / RUN_CONFIG), overrides)
    root = str(Path(data_root).expanduser().resolve()) if data_root else cfg.data.root
    data_cfg = dataclasses.replace(cfg.data, root=root, batch_size=cfg.eval.batch_size)
    if connect_ray:
        from fedmrg.ray_cluster import connect

        connect(cfg.resources)
    known = sorted(read_manifest(root)["centers"])
    centers = list(centers) if centers else known
    unknown = [c for c in centers if c not in known]
    if unknown:
        raise ExperimentError(f"center {unknown[0]!r} is not in the dataset at {root}; it has "
                              f"{known}")
    participated = []
    if (run_dir / RUN_SUMMARY).is_file():
        participated = json.loads((run_dir / RUN_SUMMARY).read_text()).get("centers", [])
    averaged = [c for c in centers if c in participated] or centers
    generation = generation_kwargs(cfg.eval)

    models: dict[str, Any] = {}

    def model_of(client: str):
        if client not in models:
            models[client] = load_model(models_dir / client)
        return models[client]

    out: dict[str, Any] = {"samples": []}
    per_study: dict[str, dict[str, list]] = {}  # with eval.per_study, as Result tables hold it
    for view in views:
        per_center = {}
        for center in centers:
            client = evaluating_client(center, clients)  # as the run's own evaluation did
            model = model_of(client)
            personalized = view == View.PERSONALIZATION and model.cfg.specialized_adapter
            stream = CenterStream.from_config(data_cfg, center, split, model.cfg.in_chans,
                                              tokenizer=model.tokenizer, seed=cfg.seed)
            thresholds = None
            # the personalization view: the center's own head (tuned now, or as its saved
            # model holds it); the generalization view: the shared one
            head = model.diagnosis_head_for(view == View.PERSONALIZATION)
            if view == View.PERSONALIZATION and cfg.eval.head_tuning_steps:
                head = _own_head(model, cfg, data_cfg, center)
            if view == View.PERSONALIZATION and cfg.eval.calibrate_head:
                val = CenterStream.from_config(data_cfg, center, "val", model.cfg.in_chans,
                                               tokenizer=model.tokenizer, seed=cfg.seed)
                thresholds = fit_positive_thresholds(*head_probabilities(
                    model, val.iter_batches(0), head))
            result = evaluate_model(model, stream.iter_batches(0), personalized,
                                    num_samples=cfg.eval.samples, thresholds=thresholds,
                                    head=head, **generation)
            per_center[center] = result.metrics
            if cfg.eval.per_study:
                per_study.setdefault(view, {})[center] = [result.per_study]
            out["samples"] += [{"center": center, "view": view, **s} for s in result.samples]
        out[view] = {"per_center": per_center,
                     "mean": mean_over_centers(per_center[c] for c in averaged)}
        if view in per_study:
            out[view]["per_study"] = per_study[view]
    return out


# --------------------------------------------------------------------------- the API


class Experiment:
    """One federated experiment (see the module docstring).

    `in_process=True` runs the coordinator in this process (tests, debugging) instead of an
    actor; `record_messages=True` keeps every client reply in `Result.messages`; `progress`
    shows the bar and round lines on `out` (default stderr / stdout).

    Resume (module docstring): a `run_name` (or `tracking.run_name`) whose run already started
    under `tracking.storage_path` is continued from its newest checkpoint; `resume=True` also
    insists that it did start (else `ExperimentError`); `checkpoint_fallback=True` resumes from
    the newest good checkpoint when the newest is corrupt, instead of a `CheckpointError`.
    """

    def __init__(self, cfg: ExperimentConfig, *, run_name: str | None = None,
                 resume: bool = False, checkpoint_fallback: bool = False,
                 in_process: bool = False, record_messages: bool = False,
                 progress: bool = True, out: TextIO | None = None):
        self.cfg = cfg
        self.run_name = run_name
        self.resume = resume
        self.checkpoint_fallback = checkpoint_fallback
        self.in_process = in_process
        self.record_messages = record_messages
        self.progress = progress
        self.out = out
        self._run_name = run_name  # the run's name once `fit` knows it

    def fit(self) -> Result:
        """Run the experiment, or continue it (module docstring, "Resume").

        SIGTERM or SIGINT (in the main thread) stops it with `fedmrg.signals.RunInterrupted`
        (its `run_name` set): the MLflow runs end as KILLED, the client actors are killed, the
        last round's checkpoint stays resumable. An error ends them as FAILED."""
        from fedmrg.signals import RunInterrupted, StopOnSignals, as_run_interrupted

        self._stop = StopOnSignals()
        with self._stop:
            try:
                return self._fit()
            except KeyboardInterrupt as e:
                stop = as_run_interrupted(e)
                if not isinstance(stop, RunInterrupted):
                    raise
                stop.run_name = stop.run_name or self._run_name
                raise stop from None

    def _fit(self) -> Result:
        from fedmrg.data.prepare import ensure_dataset, participating_centers
        from fedmrg.data.shards import read_manifest
        from fedmrg.fl.actors import run_in_coordinator_actor, start_client_actors, stop_actors
        from fedmrg.fl.checkpoint import prune_client_checkpoints, run_fingerprint
        from fedmrg.model.preflight import check_model_inputs
        from fedmrg.output_paths import check_output_paths
        from fedmrg.privacy.server import check_privacy
        from fedmrg.ray_cluster import check_cluster_fits, connect

        begun = time.time()  # the result's wall_s counts from here (in the coordinator too)
        cfg, implied = resolve_run_config(self.cfg, self.run_name)
        run_name = cfg.tracking.run_name
        self._run_name = run_name
        if implied:
            log.info("strategy %s sets %s", cfg.federation.strategy, describe_changes(implied))
        run_dir = Path(cfg.tracking.storage_path) / run_name
        check_output_paths(cfg)  # before Ray and any training: a bad path fails in seconds
        check_model_inputs(cfg.model)  # the LM, its LoRA targets, the encoder's weights file
        check_privacy(cfg)  # a privacy setting its strategy cannot keep, likewise
        started = (run_dir / RUN_CONFIG).is_file()
        if self.resume and not started:
            raise ExperimentError(f"nothing to resume: no run {run_name!r} at {run_dir} (no "
                                  f"{RUN_CONFIG}; tracking.storage_path/<run name>)")
        finished = finished_summary(run_dir, cfg.federation.rounds)
        if finished is not None:
            # the fingerprint check of any resume: a changed setting is refused here too,
            # not answered with the old results
            done = max((r["round_id"] for r in finished["rounds"]), default=0)
            resume_checkpoint(run_dir, finished_run_fingerprint(cfg, run_dir),
                              rounds=max(done, cfg.federation.rounds),
                              fallback=self.checkpoint_fallback)
            log.warning("run %r already finished its %d rounds (%s); nothing to do", run_name,
                        cfg.federation.rounds, run_dir / RUN_SUMMARY)
            return Result.from_summary(finished)
        # the data, the clients and the checkpoint to continue from: all before Ray starts
        root = ensure_dataset(cfg.data)
        manifest = read_manifest(root)
        centers = participating_centers(cfg.data, manifest)
        heldout = [c for c in sorted(manifest["centers"]) if c not in centers]
        checkpoint = resume_checkpoint(run_dir, run_fingerprint(cfg, root),
                                       rounds=cfg.federation.rounds,
                                       fallback=self.checkpoint_fallback)
        layout = client_layout(cfg.federation.strategy, centers)
        check_min_clients(cfg, layout)
        cluster_resources = connect(cfg.resources)
        self._stop.install()  # again: ray.init replaced the SIGTERM handler
        # before anything starts: do the client actors and their streams fit the cluster?
        check_cluster_fits(cfg, layout, cluster_resources)
        if cfg.model.lm.startswith("builtin:"):
            from fedmrg.model.base_lm import builtin_build_info

            builtin_build_info(cfg.model)  # build once here; every actor reads the cache
        # sized from the model (the builtin LM built just above: a run the cluster cannot
        # hold is refused before anything is built), before any actor starts
        check_checkpoint_space(cfg, len(layout))
        progress = _Progress(cfg.federation.rounds, self.progress, self.out)
        per_actor = cfg.resources.clients_per_actor
        progress.note(f"starting {math.ceil(len(layout) / per_actor)} client actors for "
                      f"{len(layout)} clients (model, data streams)...")
        started_at = time.perf_counter()
        actors, placement = start_client_actors(cfg, layout, dataset_root=str(root),
                                                seed=cfg.seed)
        progress.note(f"clients ready in {time.perf_counter() - started_at:.0f} s")
        from fedmrg.fl.client import truncation_warning

        for client_id, info in sorted(placement.items()):  # the clients' own warnings, here
            if info.get("truncation", {}).get("truncated"):
                log.warning(truncation_warning(client_id, info["truncation"],
                                               cfg.data.max_report_tokens))
        try:
            run_fn = functools.partial(
                run_federation, cfg, actors, centers=centers, dataset_root=str(root),
                run_name=run_name, heldout_centers=heldout, resume=self.resume or started,
                resume_from=str(checkpoint.path) if checkpoint else None,
                record=self.record_messages, placement=placement, started_at=begun)
            if self.in_process:
                result = run_fn(emit=progress.on_event)
            else:
                result = run_in_coordinator_actor(lambda emit: run_fn(emit=emit),
                                                  progress.on_event)
        finally:
            progress.close()
            # stopped by a signal: no graceful close (`ray job stop` SIGKILLs 3 s later)
            stop_actors(actors.values(), close=self._stop.received is None)
        # the clients are stopped: drop their checkpoints that no kept coordinator checkpoint
        # needs (those this node sees; `fedmrg.fl.checkpoint`, "Client retention")
        prune_client_checkpoints(run_dir)
        return result


def saved_run_config(storage_path: str | Path, run_name: str, overrides: Sequence[str] = ()
                     ) -> ExperimentConfig | None:
    """The config a run used (`<storage>/<run>/config.yaml`) with `overrides` on top (e.g.
    `federation.rounds=20` to extend it), or None when the run never started there."""
    from fedmrg.config import load_config

    path = Path(storage_path).expanduser() / run_name / RUN_CONFIG
    return load_config(str(path), overrides) if path.is_file() else None


def finished_summary(run_dir: str | Path, rounds: int) -> dict[str, Any] | None:
    """The summary of a run that finished at least `rounds` rounds, else None (not started,
    interrupted, or asked now for more rounds than it ran: then it continues)."""
    path = Path(run_dir) / RUN_SUMMARY
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
        done = max((r["round_id"] for r in summary["rounds"]), default=0)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExperimentError(f"{path}: unreadable summary of a finished run ({e})") from None
    return summary if done >= rounds else None


def finished_run_fingerprint(cfg: ExperimentConfig, run_dir: str | Path) -> dict[str, Any]:
    """`run_fingerprint` of `cfg` for a finished run: with the dataset's manifest hash when the
    dataset is still there, else the one the run's newest checkpoint recorded (only the
    config is compared then: its results can be shown without its data)."""
    from fedmrg.data.shards import MANIFEST
    from fedmrg.fl.checkpoint import (
        fingerprint_values,
        latest_checkpoint,
        run_checkpoint_dir,
        run_fingerprint,
    )

    root = Path(cfg.data.root)
    if (root / MANIFEST).is_file():
        return run_fingerprint(cfg, root)
    newest = latest_checkpoint(run_checkpoint_dir(run_dir), fallback=True)
    saved = (newest.manifest.get("fingerprint_values") or {}) if newest is not None else {}
    return fingerprint_values(cfg, {"data.manifest_hash": saved.get("data.manifest_hash")})


def resume_checkpoint(run_dir: str | Path, fingerprint: Mapping[str, Any], *, rounds: int,
                      fallback: bool = False) -> Any:
    """The coordinator checkpoint a run continues from (`fedmrg.fl.checkpoint.Checkpoint`),
    None when it has none (a new run, or one that crashed in its first round). A corrupt or
    incompatible newest checkpoint is a `CheckpointError` naming the file, with what to do;
    `fallback=True` uses the newest good one instead (warned)."""
    from fedmrg.fl.checkpoint import CheckpointError, latest_checkpoint, run_checkpoint_dir

    run_dir = Path(run_dir)
    try:
        found = latest_checkpoint(run_checkpoint_dir(run_dir), fingerprint=fingerprint,
                                  fallback=fallback)
    except CheckpointError as e:
        if e.reason.startswith("incompatible"):
            hint = (f"resume with the run's own config ({run_dir / RUN_CONFIG}) or start "
                    f"another run name")
        elif not fallback:
            hint = ("--checkpoint-fallback (Experiment(checkpoint_fallback=True)) resumes from "
                    "the newest good checkpoint instead")
        else:
            hint = "start another run name"
        raise CheckpointError(e.path, f"{e.reason}; {hint}") from None
    if found is not None and found.round_id > rounds:
        raise ExperimentError(f"{found.path}: the run's checkpoint is at round {found.round_id}, "
                              f"beyond federation.rounds={rounds}; resume with at least "
                              f"{found.round_id} rounds")
    return found


class _Progress:
    """A tqdm bar over rounds (stderr) and one line per round (stdout) in the driver."""

    def __init__(self, rounds: int, enabled: bool, out: TextIO | None):
        self.rounds, self.enabled = rounds, enabled
        self.out = out or sys.stdout
        self.bar = None

    def on_event(self, event: dict) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        kind = event.get("type")
        if kind == "start":
            done = event.get("resumed_from") or 0
            self.bar = tqdm(total=event["rounds"], initial=done, desc=f"{event['run_name']}",
                            unit="round", file=sys.stderr, dynamic_ncols=True, leave=False,
                            disable=None)  # a bar on a terminal only; the lines always
            tqdm.write(f"run {event['run_name']}: clients {', '.join(event['clients'])}",
                       file=self.out)
            if event.get("resumed_from") is not None:
                left = (f"rounds {done + 1}..{self.rounds} to go" if done < self.rounds
                        else "every round done: evaluation and end-of-run artifacts only")
                tqdm.write(f"resumed from the round-{done} checkpoint: {left}", file=self.out)
        elif kind == "evaluating" and event.get("split") == "test":
            tqdm.write(f"evaluating after round {event['round']} on the test split: "
                       f"{event['total']} evaluations (generalization and personalization)",
                       file=self.out)
        elif kind == "evaluated" and event.get("split") == "test":
            tqdm.write(f"  evaluated {event['done']}/{event['total']}: {event['view']} on "
                       f"{event['center']}", file=self.out)
        elif kind == "round":
            tqdm.write(round_line(event["summary"], self.rounds), file=self.out)
            if self.bar is not None:
                self.bar.update(1)
        elif kind == "evaluation":
            mean = event["mean"]
            shown = ", ".join(f"{k} {mean[k]:.3f}" for k in TABLE_KEYS if k in mean)
            split = event.get("split", "test")
            where = "" if split == "test" else f"{split} "
            tqdm.write(f"  {where}{event['view']}: {shown}", file=self.out)

    def note(self, text: str) -> None:
        """A line of its own (start-up steps), shown whenever progress is."""
        if self.enabled:
            print(text, file=self.out, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def round_line(row: Mapping[str, Any], rounds: int) -> str:
    """`round 3/10 | 4 clients | loss 2.31 | up 45.2 KB/client (12.3x < dense) | ...`."""
    n = max(1, len(row["participants"]))
    metrics = row.get("metrics", {})
    parts = [f"round {row['round_id']}/{rounds}", f"{len(row['participants'])} clients"]
    if row.get("rejected"):
        parts.append(f"{len(row['rejected'])} rejected")
    for key in ("loss", "lm_generic", "lm_personal", "diagnosis"):
        if key in metrics:
            parts.append(f"{key} {metrics[key]:.3f}")
    ratio = (row["dense_equivalent_up"] / row["bytes_up"]) if row["bytes_up"] else math.nan
    parts += [f"up {_size(row['bytes_up'] / n)}/client ({ratio:.1f}x < dense)",
              f"down {_size(row['bytes_down'] / n)}/client",
              f"agg {row['aggregation_time_s']:.2f} s", f"{row['round_time_s']:.1f} s"]
    return " | ".join(parts)
