"""The `fedmrg` command. It only parses arguments and calls the library."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

# Before torch is imported anywhere: idle OpenMP threads sleep instead of spinning (under load
# a spinning pool made training steps several times slower on 2 cores).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from fedmrg.config import describe_keys, load_config  # noqa: E402
from fedmrg.exit_codes import ExitCode, classify  # noqa: E402
from fedmrg.fl.strategies import strategy_names  # noqa: E402

WRITES_TO = "fedmrg.writes_to"  # ctx.meta: the folder a command writes (for a full disk)

EXIT_CODES_HELP = """\b
Exit codes (docs/operations.md, "Exit codes"):
  0 done   2 bad option, config, path or run name (nothing ran)   3 bad data
  4 bad checkpoint   5 the run failed (clients, rounds)   6 disk full
  7 a path became unusable (read-only, permission)   130/143 stopped by SIGINT/SIGTERM
  1 a bug: the traceback is printed"""


def _fail(message: str, code: ExitCode = ExitCode.USAGE) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(int(code))


class _Group(click.Group):
    """Turns the library's user-facing errors into one clear line and the exit code of their
    kind (`fedmrg.exit_codes`); anything else is a bug and keeps its traceback."""

    def invoke(self, ctx: click.Context):  # noqa: D401
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit,
                click.exceptions.Abort):
            raise
        except Exception as e:
            known = classify(e, ctx.meta.get(WRITES_TO))
            if known is None:
                raise
            _fail(known[1], known[0])


@click.group(cls=_Group)
@click.version_option(package_name="fedmrg")
def main() -> None:
    """fedmrg: federated LLM-driven medical report generation on Ray."""


# --------------------------------------------------------------------------- config


@main.command("config")
@click.option("--config", "config", default="default", show_default=True,
              help="preset name or YAML path")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="override a key, e.g. --set federation.rounds=5")
@click.option("--keys", is_flag=True, help="list every key with its default and help")
def config_cmd(config: str, overrides: tuple[str, ...], keys: bool) -> None:
    """Print the resolved, validated configuration."""
    if keys:
        for key, default, help_ in describe_keys():
            click.echo(f"{key:40s} {default:24s} {help_}")
        return
    import yaml

    cfg = load_config(config, overrides)
    click.echo(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# --------------------------------------------------------------------------- data


@main.group(cls=_Group)
def data() -> None:
    """Create, import and validate datasets."""


@data.command("phantom")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="output folder")
@click.option("--centers", default=4, show_default=True, type=click.IntRange(1, 26))
@click.option("--studies-per-center", default=300, show_default=True, type=click.IntRange(10))
@click.option("--image-size", default=64, show_default=True, type=click.IntRange(32, 1024))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0))
@click.option("--heldout/--no-heldout", default=True, show_default=True,
              help="also write an unseen-style center 'heldout'")
def data_phantom(out: Path, centers: int, studies_per_center: int, image_size: int, seed: int,
                 heldout: bool) -> None:
    """Generate the phantom multi-center benchmark."""
    from fedmrg.data.phantom import generate_phantom

    manifest = generate_phantom(out, centers=centers, studies_per_center=studies_per_center,
                                image_size=image_size, seed=seed, heldout_center=heldout)
    _print_counts(manifest)


@data.command("import")
@click.option("--format", "fmt", required=True, type=click.Choice(["r2gen", "csv", "jsonl"]))
@click.option("--input", "inputs", required=True, multiple=True,
              type=click.Path(exists=True, path_type=Path),
              help="annotation.json / .csv / .jsonl; repeat to merge several datasets")
@click.option("--image-root", "image_roots", multiple=True, type=click.Path(path_type=Path),
              help="folder image paths are relative to (one per --input, or one for all; "
                   "default: <input folder>/images if it exists, else the input folder)")
@click.option("--out", required=True, type=click.Path(path_type=Path))
@click.option("--centers-from", default="column", show_default=True,
              type=click.Choice(["column", "origin", "dirichlet"]),
              help="column: a 'center' field; origin: one center per --input; "
                   "dirichlet: seeded label-skew partition")
@click.option("--center-names", default="", help="comma-separated names for --centers-from "
                                                 "origin (default: input file stems)")
@click.option("--num-centers", default=4, show_default=True, type=click.IntRange(1))
@click.option("--alpha", default=0.5, show_default=True, type=click.FloatRange(min=0.0,
                                                                                 min_open=True),
              help="Dirichlet concentration (smaller: more skew)")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0))
@click.option("--on-error", default="raise", show_default=True,
              type=click.Choice(["raise", "skip"]),
              help="bad entries: stop with an error naming them, or skip and count them")
def data_import(fmt: str, inputs: tuple[Path, ...], image_roots: tuple[Path, ...], out: Path,
                centers_from: str, center_names: str, num_centers: int, alpha: float, seed: int,
                on_error: str) -> None:
    """Convert a real dataset (R2Gen annotation.json, CSV, JSONL) to the fedmrg layout."""
    from fedmrg.data.importers import ImportOptions, import_dataset

    options = ImportOptions(
        fmt=fmt, inputs=list(inputs), image_roots=list(image_roots), centers_from=centers_from,
        center_names=[c for c in center_names.split(",") if c], num_centers=num_centers,
        alpha=alpha, seed=seed, on_error=on_error,
    )
    manifest = import_dataset(options, out)
    _print_counts(manifest)
    skipped = manifest["skipped"]
    if skipped["total"]:
        click.echo(f"skipped {skipped['total']} entries: {skipped['by_reason']}")
        for line in skipped["examples"]:
            click.echo(f"  {line}")


@data.command("validate")
@click.argument("root", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
def data_validate(root: Path, as_json: bool) -> None:
    """Check a dataset against its manifest; print counts and label frequencies."""
    from fedmrg.data.schema import OBSERVATIONS
    from fedmrg.data.shards import validate_dataset

    summary = validate_dataset(root)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"{root}: OK")
    header = f"{'center':10s} {'train':>6s} {'val':>6s} {'test':>6s}  " + " ".join(
        f"{o[:6]:>6s}" for o in OBSERVATIONS)
    click.echo(header)
    for center, info in summary["centers"].items():
        rows = info["rows"]
        n = max(1, sum(rows.values()))
        freqs = " ".join(f"{info['positive'][o] / n:6.2f}" for o in OBSERVATIONS)
        click.echo(f"{center:10s} {rows['train']:6d} {rows['val']:6d} {rows['test']:6d}  {freqs}")
    click.echo("(label columns: fraction of studies positive)")
    if summary["skipped"].get("total"):
        click.echo(f"skipped at import: {summary['skipped']['by_reason']}")


@data.command("check")
@click.option("--config", "config", default="default", show_default=True,
              help="preset name or YAML path")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a key")
def data_check(config: str, overrides: tuple[str, ...]) -> None:
    """The data pipeline end to end: generate if missing, validate, stream every center."""
    from fedmrg.data.pipeline_check import check_pipeline
    from fedmrg.ray_cluster import connect

    cfg = load_config(config, overrides)
    resources = connect(cfg.resources)
    click.echo(f"ray: {resources.get('CPU', 0):g} logical CPUs, {resources.get('GPU', 0):g} GPUs")
    report = check_pipeline(cfg)
    click.echo(f"dataset {report['root']}: validated against its manifest")
    click.echo(f"{'center':10s} {'split':6s} {'rows':>6s} {'batches':>8s} {'rows/s':>8s}  skipped")
    for s in report["streams"]:
        click.echo(f"{s.center:10s} {s.split:6s} {s.rows:6d} {s.batches:8d} "
                   f"{s.rows_per_s:8.0f}  {sum(s.skipped.values()) or '-'}")


# --------------------------------------------------------------------------- run


@main.command("run", epilog=EXIT_CODES_HELP)
@click.option("--config", "config", default="default", show_default=True,
              help="preset name or YAML path")
@click.option("--strategy", type=click.Choice(strategy_names()),
              help="federated strategy (same as --set federation.strategy=...)")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="override a key, e.g. --set federation.rounds=5")
@click.option("--summary-json", type=click.Path(dir_okay=False, path_type=Path),
              help="also write the final table and communication totals as JSON")
@click.option("--run-name", default=None,
              help="run name: MLflow run and <tracking.storage_path>/<name> (default: "
                   "tracking.run_name, else <strategy>-<UTC time>). A name whose run already "
                   "started here is resumed from its last checkpoint into the same MLflow run; "
                   "a finished one does nothing")
@click.option("--resume", "resume", metavar="RUN", is_flag=False, flag_value="", default=None,
              help="continue run RUN from its last complete round (its newest checkpoint) into "
                   "the same MLflow run; without --config, with the run's own config.yaml "
                   "(--set on top, e.g. more federation.rounds); an error if RUN never "
                   "started. Bare --resume resumes --run-name")
@click.option("--checkpoint-fallback", is_flag=True,
              help="when the newest checkpoint is corrupt (checksum, missing file), resume from "
                   "the newest good one (warned) instead of stopping with an error")
def run_cmd(config: str, strategy: str | None, overrides: tuple[str, ...],
            summary_json: Path | None, run_name: str | None, resume: str | None,
            checkpoint_fallback: bool) -> None:
    """Run a federated experiment on Ray (RAY_ADDRESS, else a local cluster) and print the
    final metrics per center and mean, and the communication totals.

    Resume: every completed round is checkpointed under <tracking.storage_path>/<run name>/;
    `fedmrg run --resume RUN` (or the same command with the same --run-name, e.g. a
    resubmitted `ray_jobs/train.py` job) continues from the last checkpoint and ends with the
    same models as an uninterrupted run.

    Stop: SIGTERM (`ray job stop`, a scheduler) or SIGINT (Ctrl-C) ends the run's MLflow runs
    as KILLED (FAILED on an error) and exits with 143 (SIGTERM) or 130 (SIGINT); the last
    completed round's checkpoint stays, and `fedmrg run --resume RUN` continues from it.

    Output paths (--summary-json, tracking.storage_path, the MLflow store, data.root when the
    phantom benchmark is generated) are checked before anything starts: a bad one is an error
    (exit 2) before any training."""
    from fedmrg.experiment import Experiment, resolve_paths, saved_run_config
    from fedmrg.output_paths import check_output_paths
    from fedmrg.signals import RunInterrupted

    if resume:
        if run_name and run_name != resume:
            _fail(f"--resume {resume} and --run-name {run_name} name different runs")
        run_name = resume
    elif resume is not None and not run_name:
        _fail("--resume needs the run's name: --resume RUN (or --run-name RUN --resume)")
    if strategy:
        overrides = (*overrides, f"federation.strategy={strategy}")
    cfg = load_config(config, overrides)
    source = click.get_current_context().get_parameter_source("config")
    if resume is not None and source == click.core.ParameterSource.DEFAULT:
        # no --config: the run's own config.yaml, with this command's --set on top
        cfg = saved_run_config(cfg.tracking.storage_path, run_name, overrides) or cfg
    resolved = resolve_paths(cfg)
    click.get_current_context().meta[WRITES_TO] = resolved.tracking.storage_path
    try:
        check_output_paths(resolved, {"--summary-json": summary_json})
        result = Experiment(cfg, run_name=run_name, resume=resume is not None,
                            checkpoint_fallback=checkpoint_fallback).fit()
    except RunInterrupted as e:
        # caught here: click would turn a KeyboardInterrupt into "Aborted!" and exit 1
        name = e.run_name or "RUN"
        click.echo(f"stopped by {e.signal_name}; continue run {name} from its last completed "
                   f"round with: fedmrg run --resume {name}", err=True)
        sys.exit(e.exit_code)
    if result.already_finished:
        click.echo(f"run {result.run_name} already finished its {len(result.rounds)} rounds; "
                   f"nothing to do (raise federation.rounds to continue it, or choose another "
                   f"--run-name). Its results:")
    click.echo(result.table())
    if summary_json is not None:
        summary_json.parent.mkdir(parents=True, exist_ok=True)
        summary_json.write_text(json.dumps(result.summary(), indent=2))
        click.echo(f"summary: {summary_json}")


@main.command("evaluate")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--data-root", default=None, help="dataset to evaluate on (default: the run's)")
@click.option("--center", "centers", multiple=True, help="center to evaluate (repeatable; "
                                                         "default: every center of the dataset)")
@click.option("--split", default="test", show_default=True,
              type=click.Choice(["train", "val", "test"]))
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="also write the metrics and sample reports as JSON")
@click.option("--set", "overrides", multiple=True, metavar="eval.KEY=VALUE",
              help="generate differently from the run's config, e.g. --set "
                   "eval.no_repeat_ngram_size=3 (eval.* keys only)")
def evaluate_cmd(run_dir: Path, data_root: str | None, centers: tuple[str, ...], split: str,
                 json_path: Path | None, overrides: tuple[str, ...]) -> None:
    """Evaluate a finished run's models (<tracking.storage_path>/<run name>) on a dataset:
    generalization (generic model) and personalization (each center's own model)."""
    from fedmrg.choices import View
    from fedmrg.eval.evaluator import metrics_table
    from fedmrg.experiment import TABLE_KEYS, ExperimentError, evaluate_run
    from fedmrg.output_paths import file_problem

    if json_path is not None and (problem := file_problem(json_path)):
        _fail(f"--json {json_path}: {problem}")  # before the evaluation, not after it
    try:
        result = evaluate_run(run_dir, data_root=data_root, centers=centers or None, split=split,
                              overrides=overrides)
    except ExperimentError as e:
        _fail(str(e))
    for view in View:
        rows = [{"center": c, **m} for c, m in result[view]["per_center"].items()]
        rows.append({"center": "mean", **result[view]["mean"]})
        click.echo(f"{view} ({split} split)")
        click.echo(metrics_table(rows, TABLE_KEYS))
        click.echo("")
    if json_path is not None:
        from fedmrg.tracking import jsonable

        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(jsonable(result), indent=2))
        click.echo(f"metrics: {json_path}")


# --------------------------------------------------------------------------- runs


def _storage_options(command):
    command = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                           help="override a key, e.g. --set tracking.storage_path=/data/runs")(
        command)
    return click.option("--config", "config", default="default", show_default=True,
                        help="preset name or YAML path: its tracking.storage_path holds the "
                             "runs")(command)


def _runs_storage(ctx: click.Context, config: str, overrides: tuple[str, ...]) -> Path:
    """tracking.storage_path of the config, with the group's --config/--set under the
    subcommand's (`fedmrg runs --set K=V rm NAME` and `fedmrg runs rm NAME --set K=V`)."""
    parent = ctx.parent.params if ctx.parent is not None else {}
    if ctx.get_parameter_source("config") == click.core.ParameterSource.DEFAULT:
        config = parent.get("config") or config
    cfg = load_config(config, (*parent.get("overrides", ()), *overrides))
    return Path(cfg.tracking.storage_path).expanduser()


def _show_runs(storage: Path, as_json: bool) -> None:
    from fedmrg.runs import list_runs, runs_json, runs_table

    runs = list_runs(storage)
    if as_json:
        click.echo(runs_json(runs))
    elif not runs:
        click.echo(f"no runs in {storage}")
    else:
        click.echo(f"runs in {storage}")
        click.echo(runs_table(runs))


@main.group("runs", cls=_Group, invoke_without_command=True)
@_storage_options
@click.option("--json", "as_json", is_flag=True, help="print the list as JSON")
@click.pass_context
def runs_group(ctx: click.Context, config: str, overrides: tuple[str, ...],
               as_json: bool) -> None:
    """The runs under tracking.storage_path (default runs/): status (finished, interrupted
    and the round a resume continues after, empty), rounds, size on disk, last change.
    `fedmrg runs rm` removes runs."""
    if ctx.invoked_subcommand is None:
        _show_runs(_runs_storage(ctx, config, overrides), as_json)


@runs_group.command("list")
@_storage_options
@click.option("--json", "as_json", is_flag=True, help="print the list as JSON")
@click.pass_context
def runs_list(ctx: click.Context, config: str, overrides: tuple[str, ...],
              as_json: bool) -> None:
    """List the runs, most recently changed first (the same as bare `fedmrg runs`)."""
    _show_runs(_runs_storage(ctx, config, overrides), as_json)


@runs_group.command("rm")
@click.argument("names", nargs=-1)
@_storage_options
@click.option("--older-than", "older_than", type=click.FloatRange(min=0), metavar="DAYS",
              help="also remove every run last changed more than DAYS days ago")
@click.option("--keep-last", "keep_last", type=click.IntRange(min=0), metavar="N",
              help="also remove every run but the N most recently changed (with --older-than: "
                   "runs that are both)")
@click.option("--yes", "-y", "yes", is_flag=True, help="do not ask before removing")
@click.option("--dry-run", is_flag=True, help="only show what would be removed")
@click.option("--json", "as_json", is_flag=True, help="print the removed runs as JSON")
@click.pass_context
def runs_rm(ctx: click.Context, names: tuple[str, ...], config: str,
            overrides: tuple[str, ...], older_than: float | None, keep_last: int | None,
            yes: bool, dry_run: bool, as_json: bool) -> None:
    """Remove runs: the folders <tracking.storage_path>/NAME (checkpoints, models, adapters),
    named or chosen by --older-than / --keep-last. Asks first unless --yes. Their MLflow runs
    stay in the tracking store."""
    from fedmrg.runs import (
        RunsError,
        check_run_names,
        human_size,
        list_runs,
        remove_runs,
        runs_json,
        runs_table,
        select_runs,
    )

    if not names and older_than is None and keep_last is None:
        _fail("fedmrg runs rm: name the runs to remove, or choose them with --older-than DAYS "
              "and/or --keep-last N")
    storage = _runs_storage(ctx, config, overrides)
    try:
        check_run_names(storage, names)
        chosen = select_runs(list_runs(storage), names=names, older_than_days=older_than,
                             keep_last=keep_last)
    except RunsError as e:
        _fail(str(e))
    if not chosen:
        click.echo(runs_json([]) if as_json else f"no run in {storage} to remove")
        return
    total = human_size(sum(r.bytes for r in chosen))
    if not as_json:
        click.echo(runs_table(chosen))
    if dry_run:
        click.echo(runs_json(chosen) if as_json else f"dry run: would remove {len(chosen)} "
                                                     f"run(s), {total}")
        return
    if not yes:
        click.confirm(f"remove {len(chosen)} run(s) from {storage}, {total}?", abort=True,
                      err=True)
    try:
        remove_runs(storage, [r.name for r in chosen])
    except RunsError as e:
        _fail(str(e))
    click.echo(runs_json(chosen) if as_json else f"removed {len(chosen)} run(s), {total}")


# --------------------------------------------------------------------------- generate


@main.command("generate")
@click.argument("studies", nargs=-1, required=True, metavar="IMAGE[,IMAGE]...")
@click.option("--run", "run", help="a finished run: its name under tracking.storage_path, or "
                                   "its folder")
@click.option("--model", "model_uri", help="an MLflow model URI instead of --run: "
                                           "models:/NAME/VERSION, models:/<model id>, "
                                           "runs:/<run id>/generic")
@click.option("--center", help="the center's personalized model (default: the generic model)")
@click.option("--format", "fmt", default="text", show_default=True,
              type=click.Choice(["text", "json"]))
@_storage_options
def generate_cmd(studies: tuple[str, ...], run: str | None, model_uri: str | None,
                 center: str | None, fmt: str, config: str, overrides: tuple[str, ...]) -> None:
    """Write a report for each study: the 14 findings with their probabilities, then the
    generated report. A study is one image, or two views of it joined by a comma
    (FRONTAL,LATERAL); PNG or JPEG. --config/--set give tracking.storage_path (where --run
    looks) and tracking.tracking_uri (where --model looks)."""
    from fedmrg.serving.predictor import ServingError, format_prediction
    from fedmrg.serving.sources import run_folder, run_predictor, uri_predictor

    if (run is None) == (model_uri is None):
        _fail("fedmrg generate: give the model with --run RUN or --model URI (one of them)")
    if model_uri is not None and center is not None:
        _fail("--center picks a model of a --run; a --model URI names one model already")
    views = [[v for v in study.split(",") if v] for study in studies]
    encoded = []
    for study in views:
        encoded.append([])
        for path in study:
            try:
                encoded[-1].append(Path(path).read_bytes())
            except OSError as e:
                _fail(f"{path}: cannot read the image ({e.strerror or e})")
    cfg = load_config(config, overrides)
    try:
        if run is not None:
            predictor = run_predictor(run_folder(run, cfg.tracking.storage_path), center)
        else:
            predictor = uri_predictor(model_uri, cfg.tracking.tracking_uri)
        predictions = predictor.predict(encoded, names=[",".join(s) for s in views])
    except ServingError as e:
        _fail(str(e))
    if fmt == "json":
        click.echo(json.dumps([p.to_dict() for p in predictions], indent=2))
    else:
        click.echo("\n\n".join(format_prediction(p) for p in predictions))


def _print_counts(manifest: dict) -> None:
    for center, info in sorted(manifest["centers"].items()):
        rows = info["rows"]
        click.echo(f"center {center}: train {rows['train']}, val {rows['val']}, "
                   f"test {rows['test']}, {len(info['files'])} file(s)")


if __name__ == "__main__":
    main()
