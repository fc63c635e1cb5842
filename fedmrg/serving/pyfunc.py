"""A run's models as MLflow pyfunc models: PNG bytes in, findings and a report out.

    model = mlflow.pyfunc.load_model("models:/fedmrg/3")          # or runs:/<run id>/generic
    model.predict(pd.DataFrame({"image_1": [frontal_png], "image_2": [lateral_png]}))
    #   -> columns: report (str), findings (14 dicts: observation, state, probability,
    #      probabilities), views (int)

Input: one row per study, `image_1` (the frontal view, required) .. `image_<data.max_views>`
(optional; None, b"" or a missing column: no such view), each an encoded PNG/JPEG. Served
over HTTP (`mlflow models serve`), binary columns travel base64-encoded, as MLflow's scoring
server expects.

The model carries its `fedmrg.model.io` folder as the artifact `model` (its PEFT adapters in
PEFT format under `adapters/`, the builtin base LM included) and the settings of the run it
came from (`settings.json`: image size, views, personalized or not, decoding). Loading it needs
fedmrg and its libraries importable (the model's requirements.txt lists the libraries; fedmrg
itself is not on PyPI: serve it from fedmrg's environment, `--env-manager local`).

`log_run_models` logs, at the end of a run, the generic model on the parent MLflow run (named
`generic`, registered under `tracking.register_model` when set) and each center's personalized
model on that center's nested run (named `personalized`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import Array, ColSpec, DataType, Object, Property, Schema

from fedmrg.data.schema import LABEL_NAMES
from fedmrg.serving.predictor import (
    PredictorSettings,
    ReportPredictor,
    ServingError,
    StudyPrediction,
)

log = logging.getLogger(__name__)

GENERIC_NAME = "generic"  # the logged model's name on the parent run: runs:/<id>/generic
PERSONALIZED_NAME = "personalized"  # on a center's nested run
SETTINGS_FILE = "settings.json"
MODEL_CODE = Path(__file__).with_name("model_code.py")  # builds the model where it is loaded
# What the model needs where it is loaded (fedmrg itself besides): pinned to this environment.
REQUIREMENTS = ("mlflow", "torch", "transformers", "peft", "timm", "safetensors", "pillow",
                "numpy", "pandas", "pyyaml")


def image_column(view: int) -> str:
    """The input column of view `view` (1-based)."""
    return f"image_{view}"


def input_schema(max_views: int) -> Schema:
    return Schema([ColSpec(DataType.binary, image_column(v), required=v == 1)
                   for v in range(1, max_views + 1)])


def output_schema() -> Schema:
    finding = Object([
        Property("observation", DataType.string), Property("state", DataType.string),
        Property("probability", DataType.double),
        Property("probabilities", Object([Property(n, DataType.double) for n in LABEL_NAMES])),
    ])
    return Schema([ColSpec(DataType.string, "report"), ColSpec(Array(finding), "findings"),
                   ColSpec(DataType.long, "views")])


def signature(max_views: int) -> ModelSignature:
    return ModelSignature(inputs=input_schema(max_views), outputs=output_schema())


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (
        isinstance(value, (bytes, bytearray, str)) and len(value) == 0)


def studies_from_frame(frame: pd.DataFrame, max_views: int) -> list[list[bytes]]:
    """One list of encoded views per row (`image_1`, `image_2`, ...); an error names the row
    and column of a value that is not bytes, or a row without `image_1`."""
    columns = [image_column(v) for v in range(1, max_views + 1)]
    unknown = [c for c in frame.columns if c not in columns]
    if unknown:
        raise ServingError(f"unknown input column {unknown[0]!r}; the model reads {columns}")
    if image_column(1) not in frame.columns:
        raise ServingError(f"the input has no {image_column(1)!r} column (the frontal view)")
    studies = []
    for row, values in enumerate(frame.itertuples(index=False)):
        views = []
        for column, value in zip(frame.columns, values, strict=True):
            if _missing(value):
                continue
            if not isinstance(value, (bytes, bytearray)):
                raise ServingError(f"row {row}, column {column!r}: expected encoded image "
                                   f"bytes, got {type(value).__name__}")
            views.append(bytes(value))
        if _missing(getattr(values, image_column(1))):
            raise ServingError(f"row {row}: no {image_column(1)!r} (the frontal view)")
        studies.append(views)
    return studies


def predictions_frame(predictions: Sequence[StudyPrediction]) -> pd.DataFrame:
    return pd.DataFrame({
        "report": [p.report for p in predictions],
        "findings": [[{"observation": f.observation, "state": f.state,
                       "probability": f.probability, "probabilities": f.probabilities}
                      for f in p.findings] for p in predictions],
        "views": [p.views for p in predictions],
    })


class ReportGeneratorModel(mlflow.pyfunc.PythonModel):
    """The pyfunc side of a `ReportPredictor` (module docstring)."""

    predictor: ReportPredictor

    def load_context(self, context: Any) -> None:
        settings = PredictorSettings.read(context.artifacts["settings"])
        self.predictor = ReportPredictor.from_folder(context.artifacts["model"], settings)

    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(
            model_input)
        studies = studies_from_frame(frame, self.predictor.settings.max_views)
        names = [f"row {i}" for i in range(len(studies))]
        return predictions_frame(self.predictor.predict(studies, names))


# --------------------------------------------------------------------------- logging


def example_study(image_size: int, views: int = 2, seed: int = 0) -> list[bytes]:
    """A synthetic study (the phantom benchmark's first center, no patient's image) as PNGs:
    the logged models' input example."""
    from fedmrg.data.phantom.acquisition import encode_png
    from fedmrg.data.phantom.centers import center_profiles
    from fedmrg.data.phantom.generator import make_sample

    profile = center_profiles(1, heldout=False)[0]
    for index in range(1000):
        sample = make_sample(profile, seed, index, image_size)
        if len(sample.images) >= views:
            return [encode_png(img) for img in sample.images[:views]]
    raise ServingError(f"no phantom study with {views} views")  # pragma: no cover


def export_generic_model(model_dir: Path, out: Path) -> Path:
    """A copy of a saved model with only its generic adapter and the shared diagnosis head
    (the specialized adapter and a center's own tuned head are the client's private ones and
    stay out of the shared model)."""
    from fedmrg.model.io import MANIFEST, OWN_HEAD, read_manifest
    from fedmrg.model.mrg import GENERIC

    manifest = read_manifest(model_dir)
    shutil.copytree(model_dir, out, ignore=lambda where, names: [
        n for n in names if (Path(where).name == "adapters" and n != GENERIC)
        or (Path(where) == model_dir and n == OWN_HEAD)])
    manifest["adapters"] = [GENERIC]
    manifest["model_config"]["specialized_adapter"] = False
    manifest["own_diagnosis_head"] = None
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out


def requirements() -> list[str]:
    out = []
    for name in REQUIREMENTS:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(name)
    return out


def log_model(tracking_uri: str, run_id: str, name: str, model_dir: Path,
              settings: PredictorSettings, *, registered_name: str | None = None,
              tags: Mapping[str, str] | None = None) -> str:
    """Log one saved model as a pyfunc model of run `run_id` (in the run's experiment);
    returns its `models:/<model id>` URI."""
    from mlflow import MlflowClient
    from mlflow.models import Model
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    client = MlflowClient(tracking_uri)
    # created here, in the run's experiment (Model.log alone would pick the process's active
    # experiment, the Default one in a coordinator actor)
    logged = client.create_logged_model(
        client.get_run(run_id).info.experiment_id, name=name, source_run_id=run_id,
        tags=dict(tags or {}), params={k: str(v) for k, v in settings.to_dict().items()},
        model_type="fedmrg report generator")
    example = pd.DataFrame({image_column(v + 1): [png] for v, png in enumerate(
        example_study(settings.image_size, min(2, settings.max_views)))})
    with tempfile.TemporaryDirectory(prefix="fedmrg-pyfunc-") as tmp:
        settings_path = settings.write(Path(tmp) / SETTINGS_FILE)
        # Model.log, not mlflow.pyfunc.log_model: it takes the run id (no fluent active run);
        # the tracking URI is set only while logging (MLflow's log path reads the global one).
        # With an input example MLflow loads the model back and predicts it: a check.
        with _use_tracking_uri(tracking_uri):
            info = Model.log(
                artifact_path=None, name=name, flavor=mlflow.pyfunc, run_id=run_id,
                model_id=logged.model_id, python_model=str(MODEL_CODE),
                artifacts={"model": str(model_dir), "settings": str(settings_path)},
                signature=signature(settings.max_views), input_example=example,
                pip_requirements=requirements(), registered_model_name=registered_name)
    return info.model_uri


def log_run_models(run_dir: Path, tracking_uri: str, parent_run_id: str,
                   center_run_ids: Mapping[str, str], *, registered_name: str = ""
                   ) -> dict[str, str]:
    """The run's generic model on the parent run (registered as `registered_name` when given)
    and every center's personalized model on its nested run; {"generic" or center: model
    URI}. A center without a saved model this node can see is skipped."""
    from fedmrg.serving.sources import run_clients, run_model

    # MLflow downloads each model back to check its input example: no bars in a run's console
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uris = {}
    folder, settings = run_model(run_dir)
    with tempfile.TemporaryDirectory(prefix="fedmrg-generic-") as tmp:
        generic = export_generic_model(folder, Path(tmp) / "model")
        uris["generic"] = log_model(tracking_uri, parent_run_id, GENERIC_NAME, generic,
                                    settings, registered_name=registered_name or None,
                                    tags={"fedmrg.model": "generic"})
    clients = run_clients(run_dir)
    for center, run_id in sorted(center_run_ids.items()):
        if center not in clients:
            # a pooled run (centralized) has none; else it ran on a node this one cannot see
            log.info("no saved model of center %r under %s; its personalized model is not "
                     "logged", center, run_dir)
            continue
        folder, settings = run_model(run_dir, center)
        uris[center] = log_model(tracking_uri, run_id, PERSONALIZED_NAME, folder, settings,
                                 tags={"fedmrg.model": "personalized", "fedmrg.center": center})
    return uris
