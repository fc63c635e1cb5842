"""Everything MLflow: one parent run per experiment, one nested run per center.

    experiment (TrackingConfig.experiment)
      └── parent run  <run_name>     params: the flattened config; tags: git commit, seed,
          │                           strategy, data manifest hash, library versions, hostname;
          │                           metrics per round (step = round) and per evaluation;
          │                           artifacts: generic_adapter/, samples.json, plots/,
          │                           summary.json
          ├── nested run  center=a    per-center round and evaluation metrics,
          └── nested run  center=b    specialized_adapter/ (PEFT format)

Only the coordinator or the driver holds a `RunTracker`. It talks to MLflow through an
`MlflowClient` with explicit run ids, never the fluent API's process-global "active run", so
several trackers, threads or an actor are safe. Every metric the tracker logs is also kept in
`history` (reloaded from MLflow on resume), which is what `log_plots` draws.

A relative `artifact_location` is a folder next to a local store (sqlite); with a tracking server
(http/https) a relative folder would be the driver's disk, which the server cannot see, so the
server's own artifact root is used instead (e.g. `--serve-artifacts`). An absolute path or any
URI is used as given.

Resume (`RunTracker.start(..., resume=True)`): the newest active parent run of that name and its
nested runs are reattached and their metric history reloaded. A round at or below the last
logged one, and an evaluation view already logged at its step, are skipped with a warning
(MLflow cannot overwrite a metric at a step: it would hold two values there), so a run resumed
from a checkpoint older than its last logged round never logs a metric twice; the re-run's
values equal the skipped ones (deterministic resume) except wall-clock times.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedmrg.choices import View, choice_values
from fedmrg.config import ExperimentConfig, TrackingConfig
from fedmrg.data.shards import MANIFEST, DatasetError, manifest_hash

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from mlflow import MlflowClient
    from mlflow.entities import Run

log = logging.getLogger(__name__)

VIEWS = tuple(choice_values(View))
STATUSES = ("FINISHED", "FAILED", "KILLED")
LIBRARIES = ("torch", "transformers", "peft", "timm", "ray", "mlflow", "fedmrg")
SAMPLE_COLUMNS = ("center", "study_id", "view", "reference", "generated")

ROLE_TAG = "fedmrg.role"  # 'parent' or 'center': how a resumed run finds its own runs
CENTER_TAG = "fedmrg.center"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests runs by it
ROUND_METRIC = "round"  # logged every round (value = step = round id); marks rounds done

# MLflow's limits (mlflow.utils.validation): a param value holds 6000 characters, a tag 8000,
# one log_batch call 100 params/tags and 1000 metrics.
MAX_PARAM_CHARS = 6000
MAX_TAG_CHARS = 8000
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
TRUNCATED = "...[truncated]"
# MLflow's metric-name rule without the colon, which Windows stores refuse.
METRIC_NAME = re.compile(r"^[/\w.\- ]+$")


class TrackingError(ValueError):
    """Bad input to the tracker; the message names the metric, center, row or path."""


# --------------------------------------------------------------------------- pure helpers


def param_value(value: Any, limit: int = MAX_PARAM_CHARS) -> str:
    """A config value as an MLflow param string: lists, dicts, bools and None as JSON (so the
    value reads back with `--set key=value`), the rest with str(); cut to `limit` characters."""
    if isinstance(value, (list, tuple, dict, bool)) or value is None:
        text = json.dumps(value, sort_keys=True)
    else:
        text = str(value)
    if len(text) > limit:
        text = text[: limit - len(TRUNCATED)] + TRUNCATED
    return text


def config_params(cfg: ExperimentConfig) -> dict[str, str]:
    """The flattened config (`section.key`) as MLflow params."""
    return {key: param_value(value) for key, value in cfg.flat().items()}


def git_commit(path: str | Path | None = None) -> str:
    """The commit of the git checkout holding `path` (default: this package), '+dirty' when
    tracked files changed; 'unknown' outside a checkout or when git fails. Never raises."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()

        commit = git("rev-parse", "HEAD")
        if git("status", "--porcelain", "--untracked-files=no"):
            commit += "+dirty"
        return commit or "unknown"
    except (OSError, subprocess.SubprocessError, ValueError):
        return "unknown"


def library_versions(names: Sequence[str] = LIBRARIES) -> dict[str, str]:
    """Installed distribution versions, read from metadata (nothing is imported)."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def is_server_uri(tracking_uri: str) -> bool:
    return tracking_uri.split(":", 1)[0].lower() in ("http", "https", "databricks")


def resolve_artifact_location(location: str, tracking_uri: str, cwd: str | Path | None = None
                              ) -> str | None:
    """The artifact location for a new experiment (see the module docstring); None lets the
    store or server choose."""
    if not location:
        return None
    if re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*:", location) and not re.match(r"^[A-Za-z]:[\\/]",
                                                                           location):
        return location  # already a URI (file:, s3:, mlflow-artifacts:, ...); not C:\ paths
    path = Path(location).expanduser()
    if not path.is_absolute():
        if is_server_uri(tracking_uri):
            return None
        path = Path(cwd or os.getcwd()) / path
    return path.resolve().as_uri()


def default_run_name(strategy: str, now: float | None = None) -> str:
    """`<strategy>-<UTC yyyymmdd-hhmmss>`."""
    return f"{strategy}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now))}"


def check_metric_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not METRIC_NAME.match(name) or (
            os.path.normpath(name) != name or name.startswith("/")):
        raise TrackingError(f"{where}: invalid metric name {name!r}; names may only contain "
                            "letters, digits, _ - . space and / (not at the ends, no //)")
    return name


def as_float(value: Any, where: str) -> float:
    """A number, a bool, a numpy or 0-d torch scalar -> float; anything else is an error."""
    if isinstance(value, numbers.Number) and not isinstance(value, complex):
        return float(value)
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return as_float(item(), where)
        except (TypeError, ValueError, RuntimeError):
            pass
    raise TrackingError(f"{where}: expected a number, got {type(value).__name__} {value!r:.80}")


def jsonable(value: Any, where: str = "summary") -> Any:
    """A summary value as plain JSON types; numpy/torch scalars and arrays via .item/.tolist."""
    if value is None or isinstance(value, (bool, str, int, float)):
        return value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Path):
        return str(value)
    for method in ("tolist", "item"):
        if callable(getattr(value, method, None)):
            return jsonable(getattr(value, method)(), where)
    raise TrackingError(f"{where}: {type(value).__name__} is not JSON-serializable")


DESCRIPTION_TAG = "mlflow.note.content"  # the run's description in the MLflow UI (markdown)
DESCRIPTION_METRICS = ("ce_f1_macro", "bleu4")


def run_description(cfg: ExperimentConfig, centers: Sequence[str],
                    heldout: Sequence[str] = (), results: Mapping[str, Any] | None = None
                    ) -> str:
    """What ran, in markdown, for the run's description in the MLflow UI; with `results`
    ({view: {"mean": metrics}}, the final evaluation) the headline numbers and where the
    models are."""
    m, f = cfg.model, cfg.federation
    lines = [f"**fedmrg {f.strategy}**: {len(centers)} centers ({', '.join(centers)})"
             + (f", held out: {', '.join(heldout)}" if heldout else "")
             + f"; {f.rounds} rounds x {cfg.train.local_steps} local steps; seed {cfg.seed}.",
             f"Model: {m.encoder} encoder, base LM `{m.lm}`, LoRA rank {m.lora_rank} on "
             f"{', '.join(m.lora_targets) or 'the LM architecture default modules'}; data "
             f"`{cfg.data.root}`."]
    if results:
        for view in VIEWS:
            mean = (results.get(view) or {}).get("mean") or {}
            shown = ", ".join(f"{k} {mean[k]:.3f}" for k in DESCRIPTION_METRICS if k in mean)
            if shown:
                lines.append(f"Final {view} (mean over centers): {shown}.")
        if cfg.tracking.log_models:
            registered = (f", registered as `{cfg.tracking.register_model}`"
                          if cfg.tracking.register_model else "")
            lines.append(f"Models: `generic` on this run{registered}; each center's "
                         f"`personalized` model on its nested run (docs/models.md).")
        stopped = (results.get("privacy") or {}).get("stopped")
        if stopped:  # the same line `fedmrg run` ends with
            lines.append(f"{stopped[0].upper()}{stopped[1:]}.")
    return "\n\n".join(lines)


# --------------------------------------------------------------------------- plots

History = Mapping[str, Sequence[tuple[int, float]]]


VAL_PREFIX = "val/"  # the validation points (`eval.val_every`): val/<view>/<metric>
# What the per-round plot shows (`round_panels`): the training loss terms (mean over clients),
# bytes per round, time per round, the evaluation curves below (validation points and test
# evaluations), and the fault counters only when one of them was ever non-zero.
LOSS_TERMS = ("loss", "lm_generic", "lm_personal", "mutual", "diagnosis", "contrastive_global",
              "contrastive_local", "prox")
EVALUATION_CURVES = ("ce_f1_macro", "bleu4", "rep_4")
FAULT_COUNTS = ("rejected_failed", "rejected_deadline", "rejected_invalid", "rejected_norm",
                "clipped", "late_replies_dropped", "duplicate_replies_dropped", "rejoined")


def is_evaluation_key(key: str) -> bool:
    if key.startswith(VAL_PREFIX):
        key = key[len(VAL_PREFIX):]
    return key.split("/", 1)[0] in VIEWS


def is_bytes_key(key: str) -> bool:
    return "bytes" in key


def _grid(n: int, ncols: int = 3, size: tuple[float, float] = (4.0, 2.8)):
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry

    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes


def _line(ax, points: Sequence[tuple[int, float]], label: str | None = None, scale: float = 1.0):
    steps = [s for s, _ in sorted(points)]
    values = [v / scale for _, v in sorted(points)]
    ax.plot(steps, values, marker="o", markersize=3, label=label)


def round_panels(history: History) -> list[tuple[str, str, float, dict[str, Sequence]]]:
    """The per-round plot's panels: (title, y label, scale, {line label: points}), only those
    with something to draw (see LOSS_TERMS, EVALUATION_CURVES, FAULT_COUNTS)."""
    def pick(keys: Sequence[str]) -> dict[str, Sequence]:
        return {k: history[k] for k in keys if history.get(k)}

    panels = [("training loss (mean over clients)", "", 1.0, pick(LOSS_TERMS)),
              ("bytes per round", "MB", 1e6, pick(("bytes_up", "bytes_down"))),
              ("time per round", "s", 1.0, pick(("round_time_s", "aggregation_time_s")))]
    for metric in EVALUATION_CURVES:
        curves = {f"{label} {view}": history[f"{prefix}{view}/{metric}"]
                  for label, prefix in (("val", VAL_PREFIX), ("test", "")) for view in VIEWS
                  if history.get(f"{prefix}{view}/{metric}")}
        panels.append((metric, "", 1.0, curves))
    faults = {k: points for k, points in pick(FAULT_COUNTS).items() if any(v for _, v in points)}
    panels.append(("faults (count per round)", "", 1.0, faults))
    return [p for p in panels if p[3]]


def figure_round_metrics(history: History) -> Figure | None:
    """The curves that matter over rounds (`round_panels`), one panel each; None if none."""
    from matplotlib.ticker import MaxNLocator

    panels = round_panels(history)
    if not panels:
        return None
    fig, axes = _grid(len(panels))
    for ax, (title, unit, scale, lines) in zip(axes, panels, strict=False):
        for label, points in lines.items():
            if label.startswith("test "):  # a point or a few (federation.eval_every): stars
                steps, values = zip(*sorted(points), strict=True)
                ax.plot(steps, values, marker="*", markersize=10, linestyle=":", label=label)
            else:
                _line(ax, points, label=label, scale=scale)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds, not 1.5
        if unit:
            ax.set_ylabel(unit)
        ax.legend(fontsize=7)
    return fig


def figure_communication(history: History) -> Figure | None:
    """Bytes per round (up/down) and cumulative, in MB; None if no bytes were logged."""
    per_round = sorted(k for k in history if is_bytes_key(k) and "cumulative" not in k
                       and not is_evaluation_key(k) and history[k])
    cumulative = sorted(k for k in history if is_bytes_key(k) and "cumulative" in k
                        and not is_evaluation_key(k) and history[k])
    if not per_round and not cumulative:
        return None
    panels = [(title, keys) for title, keys in (("per round", per_round),
                                                ("cumulative", cumulative)) if keys]
    fig, axes = _grid(len(panels), ncols=2, size=(5.0, 3.2))
    for ax, (title, keys) in zip(axes, panels, strict=False):
        for key in keys:
            _line(ax, history[key], label=key, scale=1e6)
        ax.set_title(f"communication, {title}", fontsize=9)
        ax.set_xlabel("round")
        ax.set_ylabel("MB")
        ax.legend(fontsize=7)
    return fig


def figure_evaluation(history: History) -> Figure | None:
    """Mean evaluation metrics (`<view>/<metric>`, and the validation points
    `val/<view>/<metric>`) over steps, one line per view and split; None if none."""
    by_metric: dict[str, dict[str, Sequence[tuple[int, float]]]] = {}
    for key, points in history.items():
        parts = key.split("/")
        if parts[0] == VAL_PREFIX.rstrip("/"):
            parts, label = parts[1:], "val "
        else:
            label = ""
        if len(parts) == 2 and parts[0] in VIEWS and points:
            by_metric.setdefault(parts[1], {})[label + parts[0]] = points
    if not by_metric:
        return None
    fig, axes = _grid(len(by_metric))
    for ax, metric in zip(axes, sorted(by_metric), strict=False):
        for view, points in sorted(by_metric[metric].items()):
            _line(ax, points, label=view)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("round")
        ax.legend(fontsize=7)
    return fig


def figure_centers(center_history: Mapping[str, History]) -> Figure | None:
    """Per-center round metrics, one panel per metric, one line per center; None if none."""
    keys = sorted({k for h in center_history.values() for k, pts in h.items()
                   if pts and not is_evaluation_key(k)})
    if not keys:
        return None
    fig, axes = _grid(len(keys))
    for ax, key in zip(axes, keys, strict=False):
        for center in sorted(center_history):
            if center_history[center].get(key):
                _line(ax, center_history[center][key], label=center)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("round")
        ax.legend(fontsize=7)
    return fig


# --------------------------------------------------------------------------- the tracker


def _client(tracking_uri: str) -> MlflowClient:
    from mlflow import MlflowClient  # imported here: ~2 s, and only the driver needs it

    return MlflowClient(tracking_uri=tracking_uri)


def _get_or_create_experiment(client: MlflowClient, name: str,
                              artifact_location: str | None) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:
            # another tracker created it between our two calls
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(f"MLflow experiment {name!r} is deleted; restore it (mlflow "
                            "experiments restore) or choose another tracking.experiment")
    return experiment.experiment_id


def _metric_history(client: MlflowClient, run: Run) -> dict[str, list[tuple[int, float]]]:
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            for key in run.data.metrics}


class RunTracker:
    """The MLflow side of one experiment; build it with `RunTracker.start`."""

    def __init__(self, client: MlflowClient, experiment_id: str, run_id: str, run_name: str,
                 center_run_ids: dict[str, str], resumed: bool = False) -> None:
        self.client = client
        self.experiment_id = experiment_id
        self.run_id = run_id
        self.run_name = run_name
        self.center_run_ids = dict(center_run_ids)
        self.resumed = resumed
        # metric -> [(step, value)] for the parent; center -> metric -> [...] for nested runs
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.center_history: dict[str, dict[str, list[tuple[int, float]]]] = {
            c: {} for c in self.center_run_ids}
        self.nonfinite_skipped = 0  # NaN/inf metric values not logged (each one warned)
        self.rounds_skipped = 0  # rounds at or below last_logged_round(), not logged twice
        self.evaluations_skipped = 0  # evaluations already logged at their step, not twice
        self._last_round: int | None = None
        self._finished = False
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- start / resume

    @classmethod
    def start(cls, cfg: ExperimentConfig, centers: list[str], dataset_root: str,
              run_name: str | None = None, resume: bool = False) -> RunTracker:
        """Open the experiment's parent run and one nested run per center.

        `run_name` falls back to `cfg.tracking.run_name`, then to `<strategy>-<UTC time>`. With
        `resume=True` and an active parent run of that name in the experiment, reattach to it
        and its nested runs (creating only missing centers); otherwise start new runs.
        """
        tcfg: TrackingConfig = cfg.tracking
        centers = _check_centers(centers)
        manifest = Path(dataset_root) / MANIFEST
        if not manifest.is_file():
            raise DatasetError(f"{manifest}: no dataset manifest to hash for the run's tags")
        name = run_name or tcfg.run_name or default_run_name(cfg.federation.strategy)
        client = _client(tcfg.tracking_uri)
        experiment_id = _get_or_create_experiment(
            client, tcfg.experiment,
            resolve_artifact_location(tcfg.artifact_location, tcfg.tracking_uri))
        params = config_params(cfg)
        tags = cls._provenance_tags(cfg, centers, dataset_root)

        existing = cls._find_parents(client, experiment_id, name)
        parent = existing[0] if resume and existing else None
        if len(existing) > 1 and parent is not None:
            log.warning("%d MLflow runs are named %r; resuming the newest (%s)", len(existing),
                        name, parent.info.run_id)
        if parent is None:
            if existing and not resume:
                log.warning("MLflow run %r already exists in experiment %r; starting another "
                            "(pass resume=True to continue it)", name, tcfg.experiment)
            parent = client.create_run(experiment_id, run_name=name,
                                       tags={**tags, ROLE_TAG: "parent"})
            _log_params(client, parent.info.run_id, params)
            tracker = cls(client, experiment_id, parent.info.run_id, name, {})
        else:
            tracker = cls._reattach(client, experiment_id, parent, params, tags)
        missing = [c for c in centers if c not in tracker.center_run_ids]
        for center in missing:
            tracker._create_center_run(center)
        if tracker.resumed and missing:
            _set_tags(client, tracker.run_id, {"centers": json.dumps(list(tracker.center_run_ids))})
        return tracker

    @staticmethod
    def _provenance_tags(cfg: ExperimentConfig, centers: list[str], dataset_root: str
                         ) -> dict[str, str]:
        commit = git_commit()
        tags = {
            "git_commit": commit,
            "seed": str(cfg.seed),
            "strategy": cfg.federation.strategy,
            "data_manifest_hash": manifest_hash(dataset_root),
            "dataset_root": str(Path(dataset_root).resolve()),
            "centers": json.dumps(centers),
            "hostname": socket.gethostname(),
            **{f"version.{lib}": v for lib, v in library_versions().items()},
        }
        if commit != "unknown":
            tags["mlflow.source.git.commit"] = commit.removesuffix("+dirty")  # shown by the UI
        return {k: v[:MAX_TAG_CHARS] for k, v in tags.items()}

    @staticmethod
    def _find_parents(client: MlflowClient, experiment_id: str, name: str) -> list[Run]:
        """Active parent runs named `name`, newest first."""
        role = f"tags.`{ROLE_TAG}` = 'parent'"
        order = ["attributes.start_time DESC"]
        if "'" not in name:
            return list(client.search_runs([experiment_id], f"{role} and attributes.run_name = "
                                           f"'{name}'", order_by=order, max_results=100))
        # MLflow's filter language cannot quote a name holding ': match names here instead
        found, token = [], None
        while True:
            page = client.search_runs([experiment_id], role, order_by=order, max_results=1000,
                                      page_token=token)
            found += [r for r in page if r.info.run_name == name]
            token = page.token
            if not token:
                return found

    @classmethod
    def _reattach(cls, client: MlflowClient, experiment_id: str, parent: Run,
                  params: dict[str, str], tags: dict[str, str]) -> RunTracker:
        run_id = parent.info.run_id
        nested = client.search_runs([experiment_id], f"tags.{PARENT_TAG} = '{run_id}'",
                                    max_results=1000)
        center_runs: dict[str, str] = {}
        for run in sorted(nested, key=lambda r: r.info.start_time):
            center = run.data.tags.get(CENTER_TAG)
            if center is None:
                continue
            if center in center_runs:
                log.warning("run %s has two nested runs for center %r; using %s", run_id,
                            center, center_runs[center])
                continue
            center_runs[center] = run.info.run_id
        tracker = cls(client, experiment_id, run_id, parent.info.run_name, center_runs,
                      resumed=True)
        tracker.history = _metric_history(client, parent)
        for center, center_run_id in center_runs.items():
            tracker.center_history[center] = _metric_history(client, client.get_run(
                center_run_id))
        rounds = tracker.history.get(ROUND_METRIC)
        tracker._last_round = max(step for step, _ in rounds) if rounds else None

        # Params are immutable in MLflow: record what changed instead of failing or hiding it.
        old_params, old_tags = parent.data.params, parent.data.tags
        changes = {k: [old_params[k], v] for k, v in params.items()
                   if k in old_params and old_params[k] != v}
        changes.update({f"tag:{k}": [old_tags[k], v] for k, v in tags.items()
                        if k in old_tags and old_tags[k] != v})
        _log_params(client, run_id, {k: v for k, v in params.items() if k not in old_params})
        resumes = int(old_tags.get("fedmrg.resumes", "0")) + 1
        resume_tags = {"fedmrg.resumes": str(resumes)}
        if changes:
            log.warning("resumed run %r with changed settings: %s", parent.info.run_name,
                        sorted(changes))
            resume_tags[f"fedmrg.resume_{resumes}.changes"] = json.dumps(changes)[:MAX_TAG_CHARS]
        _set_tags(client, run_id, resume_tags)
        for rid in [run_id, *center_runs.values()]:
            client.update_run(rid, status="RUNNING")
        return tracker

    def _create_center_run(self, center: str) -> None:
        run = self.client.create_run(
            self.experiment_id, run_name=f"center={center}",
            tags={PARENT_TAG: self.run_id, ROLE_TAG: "center", CENTER_TAG: center})
        self.center_run_ids[center] = run.info.run_id
        self.center_history[center] = {}

    # ---------------------------------------------------------------- metrics

    def last_logged_round(self) -> int | None:
        """The highest round already logged to this run (None before the first)."""
        return self._last_round

    def log_round(self, round_id: int, metrics: Mapping[str, Any],
                  per_center: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        """Round metrics on the parent (step = round), per-center ones on the nested runs.

        `bytes_up`/`bytes_down` get `bytes_up_cumulative`/`bytes_down_cumulative` added unless
        given. A round at or below `last_logged_round()` is skipped with a warning, so a resumed
        run never logs a round twice. NaN/inf values are skipped, warned and counted.
        """
        if isinstance(round_id, bool) or not isinstance(round_id, int) or round_id < 0:
            raise TrackingError(f"round id must be an integer >= 0, got {round_id!r}")
        with self._lock:
            self._check_open()
            if self._last_round is not None and round_id <= self._last_round:
                self.rounds_skipped += 1
                log.warning("round %d not logged: run %r already has rounds up to %d",
                            round_id, self.run_name, self._last_round)
                return
            where = f"round {round_id}"
            values = self._finite(metrics, where)
            for direction in ("bytes_up", "bytes_down"):
                total = f"{direction}_cumulative"
                if direction in values and total not in metrics:
                    previous = self.history.get(total)
                    values[total] = (previous[-1][1] if previous else 0.0) + values[direction]
            values[ROUND_METRIC] = float(round_id)
            batches = {self.run_id: values}
            for center, center_metrics in (per_center or {}).items():
                run_id = self._center_run(center, where)
                batches[run_id] = self._finite(center_metrics, f"{where}, center {center!r}")
            self._log_metrics(batches, round_id)
            self._last_round = round_id

    def log_evaluation(self, step: int, view: str, per_center: Mapping[str, Mapping[str, Any]],
                       mean: Mapping[str, Any], split: str = "test") -> None:
        """Evaluation metrics named `<view>/<metric>`: the mean on the parent, each center's on
        its nested run; the parent also keeps `<view>/<center>/<metric>` for every center, so a
        held-out center (no nested run) is recorded too and the parent holds the whole table.
        Another split than the test split (the validation points) gets its name in front:
        `val/<view>/<metric>`.
        A view already logged at `step` (a resumed run repeating an evaluation it logged before
        a crash) is skipped with a warning, so no evaluation metric is logged twice."""
        if view not in VIEWS:
            raise TrackingError(f"evaluation view {view!r} is not one of {choice_values(View)}")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise TrackingError(f"evaluation step must be an integer >= 0, got {step!r}")
        check_metric_name(split, "evaluation split")
        prefix = "" if split == "test" else f"{split}/"
        with self._lock:
            self._check_open()
            if self.has_evaluation(view, step, split):
                # a resumed run re-running an evaluation logged before the crash: MLflow cannot
                # overwrite a (metric, step), a second entry would duplicate it
                self.evaluations_skipped += 1
                log.warning("%s%s evaluation at step %d not logged: run %r already has it",
                            prefix, view, step, self.run_name)
                return
            where = f"{prefix}{view} evaluation at step {step}"
            view = prefix + view
            parent = {f"{view}/{k}": v for k, v in self._finite(mean, f"{where}, mean").items()}
            batches: dict[str, dict[str, float]] = {}
            for center, center_metrics in per_center.items():
                check_metric_name(center, f"{where}: center name")
                values = self._finite(center_metrics, f"{where}, center {center!r}")
                parent.update({f"{view}/{center}/{k}": v for k, v in values.items()})
                if center in self.center_run_ids:
                    batches[self.center_run_ids[center]] = {f"{view}/{k}": v
                                                            for k, v in values.items()}
            batches[self.run_id] = parent
            self._log_metrics(batches, step)

    def has_evaluation(self, view: str, step: int, split: str = "test") -> bool:
        """Whether this run already holds `view`'s evaluation on `split` at `step` (parent
        metrics)."""
        prefix = f"{view}/" if split == "test" else f"{split}/{view}/"
        return any(s == step for key, points in self.history.items() if key.startswith(prefix)
                   for s, _ in points)

    def describe(self, text: str) -> None:
        """The parent run's description (markdown, shown on its page in the MLflow UI)."""
        self.tag({DESCRIPTION_TAG: text})

    def tag(self, tags: Mapping[str, str]) -> None:
        """Set tags on the parent run (e.g. where a resumed run continued from)."""
        with self._lock:
            self._check_open()
            _set_tags(self.client, self.run_id, {k: str(v)[:MAX_TAG_CHARS]
                                                 for k, v in tags.items()})

    def _finite(self, metrics: Mapping[str, Any], where: str) -> dict[str, float]:
        if not isinstance(metrics, Mapping):
            raise TrackingError(f"{where}: metrics must be a mapping name -> number, got "
                                f"{type(metrics).__name__}")
        out = {}
        for key, value in metrics.items():
            check_metric_name(key, where)
            number = as_float(value, f"{where}, metric {key!r}")
            if math.isfinite(number):
                out[key] = number
            else:
                self.nonfinite_skipped += 1
                log.warning("%s: metric %r is %s; not logged", where, key, number)
        return out

    def _center_run(self, center: str, where: str) -> str:
        if center not in self.center_run_ids:
            raise TrackingError(f"{where}: unknown center {center!r}; this run has nested runs "
                                f"for {sorted(self.center_run_ids)}")
        return self.center_run_ids[center]

    def _log_metrics(self, batches: Mapping[str, Mapping[str, float]], step: int) -> None:
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        centers = {rid: c for c, rid in self.center_run_ids.items()}
        for run_id, values in batches.items():
            items = [Metric(k, v, timestamp, step) for k, v in values.items()]
            for i in range(0, len(items), METRICS_PER_BATCH):
                self.client.log_batch(run_id, metrics=items[i:i + METRICS_PER_BATCH])
            history = self.history if run_id == self.run_id else self.center_history[
                centers[run_id]]
            for key, value in values.items():
                history.setdefault(key, []).append((step, value))

    # ---------------------------------------------------------------- artifacts

    def log_adapter(self, directory: str | Path, center: str | None = None) -> str:
        """A PEFT adapter folder (`save_pretrained`): the generic one under the parent's
        `generic_adapter/`, a center's specialized one under its nested run's
        `specialized_adapter/`. Returns the artifact path."""
        directory = Path(directory)
        if not (directory / "adapter_config.json").is_file():
            raise TrackingError(f"{directory}: not a PEFT adapter folder (no adapter_config.json)")
        with self._lock:
            self._check_open()
            if center is None:
                run_id, artifact_path = self.run_id, "generic_adapter"
            else:
                run_id = self._center_run(center, f"adapter {directory}")
                artifact_path = "specialized_adapter"
            self.client.log_artifacts(run_id, str(directory), artifact_path)
        return artifact_path

    def log_models(self, run_dir: str | Path, registered_name: str = "") -> dict[str, str]:
        """The run's generic model (on the parent, registered as `registered_name` when given)
        and each center's personalized model (on its nested run) as MLflow pyfunc models, from
        the models the run saved under `run_dir` (`fedmrg.serving.pyfunc.log_run_models`).
        Returns {"generic" or center: model URI}."""
        from fedmrg.serving.pyfunc import log_run_models

        with self._lock:
            self._check_open()
            return log_run_models(Path(run_dir), self.client.tracking_uri, self.run_id,
                                  self.center_run_ids, registered_name=registered_name)

    def log_samples(self, rows: Sequence[Mapping[str, Any]], artifact_file: str = "samples.json"
                    ) -> None:
        """Generated reports next to their references as an MLflow table (appended when the
        table exists). Columns: center, study_id, view, reference, generated, then any extra
        keys (missing extras are null)."""
        if not rows:
            return
        columns = list(SAMPLE_COLUMNS)
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise TrackingError(f"sample row {i}: expected a mapping, got "
                                    f"{type(row).__name__}")
            missing = [c for c in SAMPLE_COLUMNS if c not in row]
            if missing:
                raise TrackingError(f"sample row {i}: missing {missing}; a row needs "
                                    f"{list(SAMPLE_COLUMNS)}")
            for key in ("reference", "generated"):
                if not isinstance(row[key], str):
                    raise TrackingError(f"sample row {i}: {key} must be a string, got "
                                        f"{type(row[key]).__name__}")
            columns += [k for k in row if k not in columns]
        table = {c: [jsonable(row.get(c), f"sample row {i}.{c}") for i, row in enumerate(rows)]
                 for c in columns}
        with self._lock:
            self._check_open()
            self.client.log_table(self.run_id, data=table, artifact_file=artifact_file)

    def log_plots(self, history: History | None = None,
                  center_history: Mapping[str, History] | None = None) -> list[str]:
        """PNG plots under `plots/`: round metrics, communication, evaluation, per-center
        curves; drawn from what this tracker logged unless histories are given. Returns the
        artifact paths written (a plot with nothing to draw is left out)."""
        with self._lock:
            self._check_open()
            history = self.history if history is None else history
            center_history = self.center_history if center_history is None else center_history
            figures = {
                "plots/round_metrics.png": figure_round_metrics(history),
                "plots/communication.png": figure_communication(history),
                "plots/evaluation.png": figure_evaluation(history),
                "plots/centers.png": figure_centers(center_history),
            }
            written = []
            for path, fig in figures.items():
                if fig is not None:
                    self.client.log_figure(self.run_id, fig, path, save_kwargs={"dpi": 100})
                    written.append(path)
        return written

    def log_summary(self, summary: Mapping[str, Any], artifact_file: str = "summary.json"
                    ) -> None:
        """The run's final summary as a JSON artifact on the parent."""
        data = jsonable(summary)
        with self._lock:
            self._check_open()
            self.client.log_dict(self.run_id, data, artifact_file)

    # ---------------------------------------------------------------- end

    def finish(self, status: str = "FINISHED") -> None:
        """End the nested runs, then the parent. A second call does nothing."""
        if status not in STATUSES:
            raise TrackingError(f"run status {status!r} is not one of {list(STATUSES)}")
        with self._lock:
            if self._finished:
                return
            _set_tags(self.client, self.run_id, {
                "fedmrg.nonfinite_metrics_skipped": str(self.nonfinite_skipped),
                "fedmrg.rounds_skipped": str(self.rounds_skipped),
                "fedmrg.evaluations_skipped": str(self.evaluations_skipped)})
            for run_id in self.center_run_ids.values():
                self.client.set_terminated(run_id, status=status)
            self.client.set_terminated(self.run_id, status=status)
            self._finished = True

    def __enter__(self) -> RunTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish("FINISHED")
            return
        try:
            self.finish("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
        except Exception:  # noqa: BLE001 - the exception that ended the run matters more
            log.exception("could not mark MLflow run %r as ended", self.run_name)

    def _check_open(self) -> None:
        if self._finished:
            raise TrackingError(f"MLflow run {self.run_name!r} is finished; nothing more can be "
                                "logged to it")


def end_runs(tracking_uri: str, run_ids: Sequence[str], status: str,
             reason: str | None = None) -> list[str]:
    """End the runs of `run_ids` that are still RUNNING as `status` (nested runs first, then
    the parent, as `RunTracker.finish`), tagging each with `fedmrg.end_reason` when a reason
    is given; returns the ids it ended. For a run whose tracker cannot end it any more: its
    process was stopped (`fedmrg.signals`). Runs already ended keep their status."""
    if status not in STATUSES:
        raise TrackingError(f"run status {status!r} is not one of {list(STATUSES)}")
    client = _client(tracking_uri)
    ended = []
    for run_id in run_ids:
        if client.get_run(run_id).info.status != "RUNNING":
            continue
        if reason:
            _set_tags(client, run_id, {"fedmrg.end_reason": reason[:MAX_TAG_CHARS]})
        client.set_terminated(run_id, status=status)
        ended.append(run_id)
    return ended


def _check_centers(centers: Sequence[str]) -> list[str]:
    if isinstance(centers, str) or not centers:
        raise TrackingError(f"centers must be a non-empty list of center ids, got {centers!r}")
    seen = set()
    for center in centers:
        if not isinstance(center, str) or not center:
            raise TrackingError(f"center ids must be non-empty strings, got {center!r}")
        check_metric_name(center, "center id")
        if center in seen:
            raise TrackingError(f"center {center!r} is listed twice")
        seen.add(center)
    return list(centers)


def _log_params(client: MlflowClient, run_id: str, params: Mapping[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[i:i + PARAMS_PER_BATCH])


def _set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> None:
    from mlflow.entities import RunTag

    items = [RunTag(k, v) for k, v in tags.items()]
    for i in range(0, len(items), PARAMS_PER_BATCH):
        client.log_batch(run_id, tags=items[i:i + PARAMS_PER_BATCH])
