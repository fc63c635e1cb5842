"""Where a trained model comes from: a finished run's folder, or an MLflow model URI.

    predictor = run_predictor(run_folder("RUN", "runs"), center=None)   # the generic model
    predictor = run_predictor(run_folder("RUN", "runs"), center="a")    # center a's own model
    predictor = uri_predictor("models:/fedmrg/3", "sqlite:///mlflow.db")

A run folder (`<tracking.storage_path>/<run name>/`) holds `models/<client>/`, every client's
final model (`fedmrg.model.io`), and `config.yaml`, which gives the preprocessing and decoding
the run was scored with. The generic model is the first client's model with its specialized
adapter off (as `fedmrg evaluate` scores generalization); a center's personalized model is its
own client's model with both adapters (those it has) and its own tuned diagnosis head (when the
run tuned one, `eval.head_tuning_steps`).
"""

from __future__ import annotations

from pathlib import Path

from fedmrg.experiment import MODELS, RUN_CONFIG
from fedmrg.serving.predictor import PredictorSettings, ReportPredictor, ServingError


def run_folder(run: str | Path, storage_path: str | Path) -> Path:
    """A run given as its folder or as its name under `storage_path`; an error names both
    places and the runs there."""
    for candidate in (Path(run).expanduser(), Path(storage_path).expanduser() / str(run)):
        if (candidate / RUN_CONFIG).is_file():
            return candidate.resolve()
    storage = Path(storage_path).expanduser()
    runs = sorted(p.name for p in storage.iterdir() if (p / RUN_CONFIG).is_file()) if (
        storage.is_dir()) else []
    raise ServingError(f"unknown run {str(run)!r}: not a run folder (no {RUN_CONFIG}) and no "
                       f"run of that name in {storage} (runs there: {runs or 'none'})")


def run_clients(run_dir: Path) -> list[str]:
    """The clients whose final model the run saved (sorted); an error when there is none."""
    models = run_dir / MODELS
    clients = sorted(p.name for p in models.iterdir() if p.is_dir() and not
                     p.name.startswith(".")) if models.is_dir() else []
    if not clients:
        raise ServingError(f"{models}: no saved model; run {run_dir.name!r} did not finish")
    return clients


def run_model(run_dir: Path, center: str | None = None) -> tuple[Path, PredictorSettings]:
    """(model folder, settings) of the run's generic model (`center` None) or of `center`'s
    personalized model."""
    from fedmrg.config import load_config

    clients = run_clients(run_dir)
    cfg = load_config(str(run_dir / RUN_CONFIG))
    if center is None:  # as a run evaluates a held-out center (coordinator.evaluating_client)
        return run_dir / MODELS / clients[0], PredictorSettings.from_config(cfg)
    if center not in clients:
        raise ServingError(f"run {run_dir.name!r} has no model of center {center!r}; its "
                           f"models: {clients}")
    return run_dir / MODELS / center, PredictorSettings.from_config(cfg, personalized=True)


def run_predictor(run_dir: Path, center: str | None = None) -> ReportPredictor:
    folder, settings = run_model(run_dir, center)
    return ReportPredictor.from_folder(folder, settings)


def uri_predictor(model_uri: str, tracking_uri: str) -> ReportPredictor:
    """The predictor inside a fedmrg pyfunc model logged to MLflow (`fedmrg.serving.pyfunc`):
    `models:/NAME/VERSION`, `models:/<model id>`, `runs:/<run id>/model` or a local folder."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from fedmrg.serving.pyfunc import ReportGeneratorModel

    mlflow.set_tracking_uri(tracking_uri)  # this process only reads models from that store
    try:
        loaded = mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError) as e:
        raise ServingError(f"cannot load MLflow model {model_uri!r} from {tracking_uri}: "
                           f"{str(e).splitlines()[0]}") from e
    python_model = loaded.unwrap_python_model()
    if not isinstance(python_model, ReportGeneratorModel):
        raise ServingError(f"{model_uri}: a {type(python_model).__name__}, not a fedmrg report "
                           f"generator")
    return python_model.predictor
