"""Session-wide test fixtures.

The environment is fixed before anything imports transformers, MLflow or Ray: a missed Hugging
Face hub call costs 25-50 s of retries, and Ray reads its variables when it starts.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # stay on 127.0.0.1
# idle OpenMP threads sleep instead of spinning: under load a spinning pool made training
# steps several times slower on 2 cores (benchmarks/centralized.py)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

# Logical CPUs of the shared test cluster: more than the 2 real cores on purpose, so client
# actors holding fractional CPUs leave room for Ray Data tasks (as `fedmrg run` does).
RAY_TEST_CPUS = 4


# The longest test files first (measured on 2 cores): `make test` runs the files on two xdist
# workers, one file per worker at a time, and a long file started last would run on alone.
LONGEST_FIRST = (
    "test_cluster_fit.py", "test_ray_jobs.py", "test_reproducibility.py", "test_resume.py",
    "test_stop_run.py", "test_fault_rounds.py", "test_bad_input_e2e.py",
    "test_federation_ray.py", "test_cluster_auth.py", "test_validation_points.py",
    "test_privacy_ray.py", "test_fl_mrg_benchmark.py", "test_trust_boundary.py",
    "test_ddp.py", "test_runs.py", "test_serving.py", "test_benchmarks_smoke.py",
    "test_coordinator_inprocess.py", "test_stream.py", "test_real_reports.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept


@pytest.fixture(scope="session")
def ray_cluster():
    """ONE local Ray for the whole test session (ray.init takes 4-6 s); yields its resources.

    Tests that need Ray take this fixture; it starts on first use and shuts down at the end.
    """
    import ray
    import ray.data

    ray.init(
        num_cpus=RAY_TEST_CPUS,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        object_store_memory=512 * 1024 * 1024,  # plenty for the tiny test datasets
        # workers are forked by the local raylet and inherit the environment set above
    )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
    # Ray Data logs at DEBUG; pytest would print hundreds of those lines with every failure.
    logging.getLogger("ray.data").setLevel(logging.INFO)
    try:
        yield ray.cluster_resources()
    finally:
        ray.shutdown()


# Words of the tiny tokenizer's vocabulary (anything else maps to <unk>).
REPORT_WORDS = (
    "heart", "size", "normal", "no", "focal", "consolidation", "pleural", "effusion",
    "pneumothorax", "is", "are", "the", "mild", "moderate", "severe", "cardiomegaly",
    "opacity", "lungs", "clear", "left", "right", "lower", "lobe", "report", "enlarged",
    "silhouette", "stable", "support", "devices", "fracture", "edema", "atelectasis", "lesion",
    "of", "and",
)


@pytest.fixture(scope="session")
def word_tokenizer():
    """A tiny word-level Hugging Face fast tokenizer with pad/bos/eos/unk, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(REPORT_WORDS)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    """A small neutral-style warm-up corpus for tiny builtin LMs (tests may override it)."""
    from fedmrg.data.phantom import neutral_corpus

    return neutral_corpus(120, 0)


# --------------------------------------------------------------------------- MLflow stores
# (tests/helpers.py `start` opens a run tracker on one)


@pytest.fixture(scope="module")
def migrated_db(tmp_path_factory) -> Path:
    """One sqlite file with MLflow's schema, copied by each test (creating a fresh MLflow
    database costs ~6 s, copying it ~0.05 s)."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path, migrated_db, monkeypatch) -> dict[str, str]:
    """A private sqlite store and artifact folder; cwd is tmp_path so nothing lands in the repo."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(migrated_db, tmp_path / "mlflow.db")
    return {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "artifact_location": str(tmp_path / "artifacts")}


@pytest.fixture
def dataset_root(tmp_path) -> Path:
    """An empty dataset (a manifest without centers)."""
    root = tmp_path / "dataset"
    root.mkdir()
    (root / "manifest.json").write_text(json.dumps({"schema_version": 1, "centers": {}}))
    return root
