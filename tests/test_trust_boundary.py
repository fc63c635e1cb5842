"""The trust boundary (issue 5): what a center sends the coordinator, inspected field by field.

One short fedmrg run (2 centers x 27 studies, 2 rounds, tiny model; `eval.samples=0`, the
setting for a deployment where no text may leave a center) records every reply that reached
the coordinator (`Experiment(record_messages=True)`: each `ClientUpdate` and `EvalReply`).
Every field of every message is walked recursively, dictionary keys included, and each leaf
must be one of:
- a number (sample counts, metric values, a low-rank update's shape);
- a string that is a center id (`center`), a view name (`view`), a shared tensor name (keys
  of `lora`/`dense`) or a metric name (keys of `metrics`, with a number as value);
- a tensor of model-level shape: a generic LoRA factor or a dense update shaped like its
  shared tensor (or its low-rank factors U (m, r), V (r, n)), prototypes (14, P), prototype
  counts (14,), label-state counts (14, 4).
Nothing else: no bytes, no arrays, no other string. On top: no report of the dataset (nor any
of its sentences), no study id, no private tensor name (specialized adapter, local head: the
names of a model built here) appears anywhere, and no tensor's leading dimension is the batch
size or a split's row count (the config makes those differ from every model dimension).

With `eval.samples` > 0 an `EvalReply` also carries sample generations for the MLflow table,
and `fedmrg.eval.evaluator.evaluate_model` puts each sample's REFERENCE report (the center's
own test report) and study id in them too when `eval.share_references` asks and the center's
own policy allows: tests/test_disclosure.py.

The coordinator's own guard (pure, milliseconds): `validate_update` rejects statistics that are
not model-level (per-sample prototypes or labels) and metrics that are not numbers (text).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import build_lm_once, experiment, fit_concurrently, tiny_run_config

from fedmrg.choices import View, choice_values
from fedmrg.data.schema import NUM_OBSERVATIONS, NUM_STATES
from fedmrg.fl.lowrank import LowRankUpdate, is_lora_factor
from fedmrg.fl.messages import ClientUpdate, EvalReply, UpdateSpec
from fedmrg.fl.strategies import make_strategy
from fedmrg.fl.strategies.fedmrg import statistic_specs
from fedmrg.fl.validation import validate_update


def on_the_run(test):
    """A test of the recorded run: needs the shared Ray cluster and takes minutes."""
    return pytest.mark.ray(pytest.mark.slow(test))

CENTERS = ("a", "b")
ROUNDS = 2
VIEWS = tuple(choice_values(View))
# 19 train, 3 val, 5 test rows per center; with batches of 7, none of these counts is a
# dimension of any tensor of the tiny model (checked in test_no_tensor_is_per_sample)
STUDIES = 27
BATCH = 7


def leaves(obj: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """(path, leaf) for every field, item and dictionary key of a message, recursively; a
    key is a leaf at `path + ("<key>",)`, its value lives at `path + (key,)`."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from leaves(getattr(obj, f.name), (*path, f.name))
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield (*path, "<key>"), key
            yield from leaves(value, (*path, key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from leaves(value, (*path, i))
    else:
        yield path, obj


def sentences(report: str) -> list[str]:
    """A report's sentences long enough to be recognizable text (not a lone word)."""
    return [s.strip() for s in re.split(r"(?<=[.:])\s+", report) if len(s.strip()) >= 16]


@pytest.fixture(scope="module")
def run(ray_cluster, tmp_path_factory):
    from fedmrg.model.base_lm import load_base_lm
    from fedmrg.model.mrg import MRGModel
    from fedmrg.model.params import get_private_state, get_shared_state

    tmp = tmp_path_factory.mktemp("trust")
    cfg = tiny_run_config(tmp, tmp / "lm", f"data.phantom.studies_per_center={STUDIES}",
                          f"data.batch_size={BATCH}", "eval.samples=0", "eval.num_beams=1",
                          "eval.max_new_tokens=16", f"federation.rounds={ROUNDS}")
    build_lm_once(cfg)
    result = fit_concurrently({"run": experiment(cfg, "trust")})["run"]
    if isinstance(result, BaseException):
        raise AssertionError(f"the run failed: {result!r}") from result
    # the model every client built: which tensor names are shared, which private
    configured = make_strategy(cfg).cfg
    lm, tokenizer = load_base_lm(configured.model)
    model = MRGModel.from_config(configured.model, lm, tokenizer, seed=cfg.seed,
                                 max_report_tokens=configured.data.max_report_tokens)
    shared = {n: tuple(t.shape) for n, t in get_shared_state(model).items()}
    private = set(get_private_state(model))
    tables = [pq.read_table(p, columns=["study_id", "split", "report"])
              for p in sorted(Path(cfg.data.root).glob("center=*/*.parquet"))]
    rows = [r for t in tables for r in t.to_pylist()]
    return {"cfg": configured, "result": result, "shared": shared, "private": private,
            "rows": rows}


@on_the_run
def test_every_reply_was_recorded(run):
    result = run["result"]
    fits = [m for m in result.messages if isinstance(m, ClientUpdate)]
    evals = [m for m in result.messages if isinstance(m, EvalReply)]
    assert len(result.messages) == len(fits) + len(evals)  # nothing of another kind
    assert sorted((m.round_id, m.center) for m in fits) == [
        (r, c) for r in range(1, ROUNDS + 1) for c in CENTERS]
    # generalization and personalization on each center's test split, and the same on its val
    # split at every validation point (eval.val_every)
    val_every = run["cfg"].eval.val_every
    points = 1 + (ROUNDS // val_every if val_every else 0)
    assert sorted((m.view, m.center) for m in evals) == [
        (v, c) for v in VIEWS for c in CENTERS for _ in range(points)]


@on_the_run
def test_every_leaf_is_a_number_a_name_or_a_model_level_tensor(run):
    cfg, shared = run["cfg"], run["shared"]
    assert set(shared) == set(run["result"].global_state)  # the model built here is the run's
    stats = {("statistics", "prototypes"): (NUM_OBSERVATIONS, cfg.model.projection_dim),
             ("statistics", "prototype_counts"): (NUM_OBSERVATIONS,),
             ("statistics", "label_counts"): (NUM_OBSERVATIONS, NUM_STATES)}
    seen_tensors = 0
    for message in run["result"].messages:
        kind = type(message).__name__
        metric_names = set(message.metrics)
        for path, leaf in leaves(message):
            where = f"{kind} {message.center} {path}"
            if isinstance(leaf, torch.Tensor):
                seen_tensors += 1
                assert kind == "ClientUpdate", where
                assert tuple(leaf.shape) == expected_shape(path, leaf, shared, stats, cfg), where
            elif isinstance(leaf, str):
                assert allowed_string(path, leaf, metric_names, shared), (where, leaf)
            else:
                # numbers only: no bytes, arrays, or objects of another kind
                assert leaf is None or (isinstance(leaf, (int, float, np.integer, np.floating))
                                        and not isinstance(leaf, bytes)), (where, type(leaf))
            assert not isinstance(leaf, (bytes, bytearray, memoryview, np.ndarray)), where
    assert seen_tensors > 0


def expected_shape(path: tuple, tensor: torch.Tensor, shared: Mapping[str, tuple],
                   stats: Mapping[tuple, tuple], cfg) -> tuple:
    """The one shape a tensor at `path` of a ClientUpdate may have."""
    if path in stats:
        return stats[path]
    if len(path) == 2 and path[0] == "lora":
        name, want = path[1], shared[path[1]]
        assert is_lora_factor(name) and ".generic." in name, name
        rank_dim = 0 if ".lora_A." in name else 1  # any rank up to the configured one
        assert tensor.shape[rank_dim] <= cfg.model.lora_rank, name
        return tuple(tensor.shape[i] if i == rank_dim else d for i, d in enumerate(want))
    if len(path) == 2 and path[0] == "dense":
        return shared[path[1]]  # sent dense (rank 0, 1-D or too small to factorize)
    if len(path) == 3 and path[0] == "dense" and path[2] in ("U", "V"):
        want = shared[path[1]]
        m, n = want[0], int(np.prod(want[1:]))
        r = tensor.shape[1] if path[2] == "U" else tensor.shape[0]
        assert r <= cfg.federation.dense_update_rank, path
        return (m, r) if path[2] == "U" else (r, n)
    raise AssertionError(f"a tensor where none belongs: {path}")


def allowed_string(path: tuple, value: str, metric_names: set[str],
                   shared: Mapping[str, tuple]) -> bool:
    if path == ("center",):
        return value in CENTERS
    if path == ("view",):
        return value in VIEWS
    if path in (("lora", "<key>"), ("dense", "<key>")):
        return value in shared
    if path == ("statistics", "<key>"):  # the names the strategy's payload schema publishes
        return value in statistic_specs(projection_dim=1)  # names only
    if path == ("metrics", "<key>"):
        return value in metric_names and len(value) <= 48
    return False


@on_the_run
def test_no_report_text_study_id_or_private_name_appears_anywhere(run):
    rows = run["rows"]
    reports = {r["report"] for r in rows}
    report_sentences = {s for r in reports for s in sentences(r)}
    study_ids = {r["study_id"] for r in rows}
    private = run["private"]
    assert any(".specialized." in n for n in private)  # the private adapter exists...
    assert any(n.startswith("local_head.") for n in private)
    strings = [leaf for m in run["result"].messages for _, leaf in leaves(m)
               if isinstance(leaf, str)]
    assert strings
    for s in strings:
        assert s not in reports and s not in study_ids and s not in private, s
        assert not any(sentence in s for sentence in report_sentences), s
        assert "specialized" not in s and not s.startswith("local_head."), s
    # eval.samples=0: no sample generation, hence no reference report, leaves a center
    assert all(m.samples == [] for m in run["result"].messages if isinstance(m, EvalReply))


@on_the_run
def test_no_tensor_is_per_sample(run):
    """No tensor's leading dimension is a batch or a split's size, which the config keeps
    apart from every dimension of the model (else this check would prove nothing)."""
    cfg, shared, rows = run["cfg"], run["shared"], run["rows"]
    counts = {split: sum(r["split"] == split and r["study_id"].startswith("a-") for r in rows)
              for split in ("train", "test")}
    per_sample = {BATCH, counts["train"], counts["test"]}
    model_dims = ({d for shape in shared.values() for d in shape}
                  | {NUM_OBSERVATIONS, NUM_STATES, cfg.model.projection_dim,
                     cfg.model.lora_rank, cfg.federation.dense_update_rank})
    assert counts == {"train": 19, "test": 5} and not per_sample & model_dims
    for message in run["result"].messages:
        for path, leaf in leaves(message):
            if isinstance(leaf, torch.Tensor):
                assert leaf.dim() == 0 or leaf.shape[0] not in per_sample, path
    for u in (m for m in run["result"].messages if isinstance(m, ClientUpdate)):
        # the aggregation weight is the center's train size, a count, not a list of samples
        assert u.num_samples == counts["train"] and isinstance(u.num_samples, int)
        assert all(isinstance(t, (torch.Tensor, LowRankUpdate)) for t in u.dense.values())


# --------------------------------------------------------------------------- the guard (pure)


def small_update(**fields) -> ClientUpdate:
    """A well-formed update with one dense tensor and the three statistics (P = 8)."""
    statistics = {"prototypes": torch.zeros(NUM_OBSERVATIONS, 8),
                  "prototype_counts": torch.ones(NUM_OBSERVATIONS),
                  "label_counts": torch.ones(NUM_OBSERVATIONS, NUM_STATES, dtype=torch.int64)}
    statistics.update({k: fields.pop(k) for k in list(fields) if k in statistics})
    base = ClientUpdate(1, "a", 19, {}, {"head.bias": torch.zeros(3)}, statistics=statistics,
                        metrics={"loss": 1.5, "skipped_rows": 0.0})
    return dataclasses.replace(base, **fields)


def check(update: ClientUpdate) -> str | None:
    spec = UpdateSpec({}, {"head.bias": (3,)}, statistic_specs(8))
    return validate_update(update, center="a", round_id=1, spec=spec)


@pytest.mark.parametrize("fields, reason", [
    ({"prototypes": torch.zeros(BATCH, 8)}, "prototypes has shape (7, 8), expected (14, 8)"),
    ({"prototype_counts": torch.ones(BATCH)}, "prototype_counts has shape (7,), expected (14,)"),
    ({"label_counts": torch.ones(19, NUM_OBSERVATIONS)},
     "label_counts has shape (19, 14), expected (14, 4)"),
    ({"label_counts": -torch.ones(NUM_OBSERVATIONS, NUM_STATES)}, "label_counts has negative"),
    ({"metrics": {"loss": "No pleural effusion."}}, "metrics are not a mapping of names to num"),
    ({"metrics": {"loss": b"\x89PNG"}}, "metrics are not a mapping of names to numbers"),
    ({"metrics": ["loss"]}, "metrics are not a mapping of names to numbers"),
])
def test_validation_rejects_per_sample_statistics_and_text_in_metrics(fields, reason):
    assert check(small_update()) is None
    assert check(small_update(**fields)).startswith(reason)
