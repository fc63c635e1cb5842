"""The code MLflow stores with a fedmrg pyfunc model ("models from code": the model object is
built by running this file where it is loaded, never unpickled)."""

import mlflow

from fedmrg.serving.pyfunc import ReportGeneratorModel

mlflow.models.set_model(ReportGeneratorModel())
