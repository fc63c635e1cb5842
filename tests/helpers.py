"""Helpers shared by the test modules (`from helpers import ...`); test modules never import
each other. Three groups:

- the tiny model and run: `TINY_MODEL` (a 32-wide 1-layer builtin Llama, a narrow resnet10t),
  `tiny_overrides` (a complete `Experiment` run in well under a minute on 2 cores),
  `tiny_run_config`, `tiny_client_config` (in-process clients over an existing dataset);
- running and comparing runs: `experiment`, `fit_concurrently`, `build_lm_once`, `bits`,
  `state_bits`;
- the pure coordinator's fake clients (`FakeClient`, `fake_coordinator`: synthetic updates,
  milliseconds), and `start`, a run tracker on the MLflow store of the `store` fixture
  (tests/conftest.py).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmrg.config import ExperimentConfig, ModelConfig, config_from_dict, load_config
from fedmrg.fl.broadcast import apply_delta
from fedmrg.fl.coordinator import Coordinator, InProcessPool
from fedmrg.fl.messages import ClientUpdate, EvalReply, RoundPlan
from fedmrg.fl.strategies import make_strategy
from fedmrg.fl.validation import scale_update

# --------------------------------------------------------------------------- the tiny model

TINY_ENCODER = {"channels": [8, 16, 32, 64], "stem_width": 8}
# `model.*` of every tiny test model (lm_cache aside)
TINY_MODEL = {"lm_hidden_size": 32, "lm_layers": 1, "lm_heads": 2, "lm_vocab_size": 256,
              "lm_warmup_steps": 5, "encoder_kwargs": TINY_ENCODER, "visual_tokens": 3,
              "lora_rank": 4, "projection_dim": 8}
TINY_ROUNDS = 2  # the rounds of `tiny_overrides`


def tiny_model_config(lm_cache: str | Path, **over: Any) -> ModelConfig:
    """The tiny model with its builtin LM cached in `lm_cache`, `over` on top."""
    return ModelConfig(**{**TINY_MODEL, "lm_cache": str(lm_cache), **over})


def tiny_overrides(tmp: Path) -> list[str]:
    """`--set` items of a complete run in `tmp` (data, LM cache, MLflow store, run folders) in
    well under a minute on 2 cores: 2 phantom centers of 20 studies at 32 px, the tiny model,
    2 local steps, `TINY_ROUNDS` rounds."""
    return [
        f"data.root={tmp}/data", "data.phantom.centers=2", "data.phantom.studies_per_center=20",
        "data.phantom.image_size=32", "data.phantom.heldout_center=false",
        "data.image_size=32", "data.batch_size=4", "data.max_report_tokens=24",
        f"model.lm_cache={tmp}/lm",
        *(f"model.{key}={json.dumps(value)}" for key, value in TINY_MODEL.items()),
        "train.local_steps=2", f"federation.rounds={TINY_ROUNDS}", "eval.max_new_tokens=24",
        "resources.num_cpus_per_client=0.5", "resources.num_gpus_per_client=0",
        f"tracking.tracking_uri=sqlite:///{tmp}/mlflow.db",
        f"tracking.artifact_location={tmp}/mlartifacts", f"tracking.storage_path={tmp}/runs",
        # logging the MLflow models costs a run seconds; test_federation_ray's run turns it on
        "tracking.log_models=false",
    ]


# Smaller than `tiny_overrides` where it does not matter: 10 studies per center (7 train,
# 2 test), greedy generation of short reports.
CHEAP = ("data.phantom.studies_per_center=10", "eval.num_beams=1", "eval.max_new_tokens=16")


def tiny_run_config(tmp: Path, lm_cache: Path, *overrides: str) -> ExperimentConfig:
    """The `tiny_overrides` run in `tmp`, with one builtin-LM cache shared by a module (built
    once before any run starts, `build_lm_once`) and `overrides` on top."""
    return load_config("default", [*tiny_overrides(tmp), f"model.lm_cache={lm_cache}",
                                   *overrides])


def tiny_client_config(strategy: str, root: str, lm_cache: str, **federation: Any
                       ) -> ExperimentConfig:
    """The dataclass defaults with the tiny model for in-process clients over the dataset at
    `root` (32 px, batches of 4, 2 local steps, one Ray Data task per stream), 2 rounds of
    `strategy`; `federation` keys on top."""
    return config_from_dict({
        "device": "cpu",
        "data": {"root": root, "image_size": 32, "batch_size": 4, "max_report_tokens": 32,
                 "stream_max_tasks": 1},
        "model": {**TINY_MODEL, "lm_cache": lm_cache},
        "train": {"local_steps": 2, "warmup_steps": 1},
        "federation": {"strategy": strategy, "rounds": 2, **federation},
    })


# --------------------------------------------------------------------------- running runs

RUN_TIMEOUT_S = 1200.0  # far beyond a tiny run on the loaded machine (~3 min): a hang fails


def fit_concurrently(runs: Mapping[str, Callable[[], Any]], timeout_s: float = RUN_TIMEOUT_S
                     ) -> dict[str, Any]:
    """Call every function at once in threads (each an `Experiment.fit()` with its own actors,
    data, MLflow store and run folder); {name: its result, or the exception it raised}. A run
    that takes longer than `timeout_s` fails the test instead of hanging it."""
    def outcome(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - the tests assert on the exception itself
            return e

    with ThreadPoolExecutor(max_workers=len(runs)) as pool:
        futures = {name: pool.submit(outcome, fn) for name, fn in runs.items()}
        return {name: future.result(timeout=timeout_s) for name, future in futures.items()}


def experiment(cfg: ExperimentConfig, run_name: str, **kwargs: Any) -> Callable[[], Any]:
    """`Experiment(cfg, ...).fit` with every reply recorded and no progress output."""
    from fedmrg.experiment import Experiment

    return Experiment(cfg, run_name=run_name, record_messages=True, progress=False,
                      out=io.StringIO(), **kwargs).fit


def build_lm_once(cfg: ExperimentConfig) -> None:
    """Build the builtin base LM into the shared cache before concurrent runs read it."""
    from fedmrg.model.base_lm import builtin_build_info

    builtin_build_info(cfg.model)


def bits(t: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    """A tensor's dtype, shape and raw bytes: equal exactly when bit-identical."""
    t = t.detach().cpu().contiguous()
    return str(t.dtype), tuple(t.shape), t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def state_bits(state: Mapping[str, torch.Tensor]) -> dict[str, tuple]:
    return {name: bits(t) for name, t in state.items()}


# --------------------------------------------------------------------------- fake clients
# Synthetic updates: the coordinator's round logic without a model (milliseconds).

SHAPES = {"m.lora_A.generic.weight": (2, 6), "m.lora_B.generic.weight": (5, 2),
          "head.weight": (4, 3), "head.bias": (4,)}


def fake_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}


class FakeClient:
    """Answers a plan with a seeded update; `fault` breaks it in one way."""

    def __init__(self, center: str, fault: str | None = None):
        self.center, self.fault = center, fault
        self.synced: dict | None = None  # the downlink state, as a real client keeps it

    def fit(self, plan: RoundPlan) -> ClientUpdate:
        if self.fault == "crash":
            raise RuntimeError("out of memory")
        if plan.global_delta is not None:
            self.synced = apply_delta(self.synced, plan.global_delta)
        else:
            self.synced = plan.global_state
        g = torch.Generator().manual_seed(plan.round_id * 100 + ord(self.center))
        lora = {n: self.synced[n] + torch.randn(SHAPES[n], generator=g)
                for n in SHAPES if ".lora_" in n}
        dense = {n: torch.randn(SHAPES[n], generator=g) for n in SHAPES if ".lora_" not in n}
        update = ClientUpdate(plan.round_id, self.center, 10 + ord(self.center) % 7, lora, dense,
                              metrics={"loss": float(ord(self.center))})
        if self.fault == "stale":
            update.round_id -= 1
        elif self.fault == "nan":
            update.dense["head.bias"] = torch.full((4,), float("nan"))
        elif self.fault == "shape":
            update.dense["head.weight"] = torch.zeros(3, 4)
        elif self.fault == "private":
            update.dense["local_head.net.0.weight"] = torch.zeros(2, 2)
        elif self.fault == "huge":
            update = scale_update(update, self.synced, 1000.0)
        return update

    def evaluate(self, split, personalized, dataset_center=None, global_state=None):
        value = float(ord((dataset_center or self.center)[0])) + (0.5 if personalized else 0.0)
        return EvalReply(dataset_center or self.center,
                         "personalization" if personalized else "generalization",
                         {"score": value, "has_state": float(global_state is not None)})


def fake_coordinator(clients: dict, strategy: str = "fedavg", **federation: Any) -> Coordinator:
    """A `Coordinator` over `clients` in process, from `fake_state()`, `federation` keys set."""
    s = make_strategy(config_from_dict({"federation": {"strategy": strategy, **federation}}))
    return Coordinator(s.cfg, s, InProcessPool(clients), fake_state(), np.random.default_rng(3))


# --------------------------------------------------------------------------- MLflow stores


def make_cfg(store: dict[str, str], **sections: dict) -> ExperimentConfig:
    """Seed 7, the `store`, experiment `fedmrg-test`, `sections` ({section: {key: value}})."""
    data: dict[str, Any] = {"seed": 7, "tracking": {**store, "experiment": "fedmrg-test"}}
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return config_from_dict(data)


def start(store, dataset_root, centers=("a", "b"), run_name="run1", resume=False, **sections):
    """`RunTracker.start` on `make_cfg(store, **sections)`."""
    from fedmrg.tracking import RunTracker

    return RunTracker.start(make_cfg(store, **sections), list(centers), str(dataset_root),
                            run_name, resume=resume)
