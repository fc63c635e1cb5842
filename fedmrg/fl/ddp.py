"""A center's local round as a Ray Train `TorchTrainer` run: data parallel over its GPUs (or
CPU workers), launched by the center's client actor when `resources.gpus_per_center > 1`
(one worker per GPU, NCCL) or `resources.workers_per_center > 1` (CPU workers, gloo).

    inputs = RoundInputs(cfg, center, seed, batches, shared, private, trainer_state, terms)
    result = run_round_on_workers(inputs, train_workers(cfg.resources), storage, name)
    # result.shared / .private / .trainer_state: the model and optimizer after the round

The client actor keeps its stream, its model and its optimizer state, as without Ray Train: it
draws the round's `local_steps` global batches from its stream (same batches, same
augmentation as a one-process round), and the run's workers each build the client's model the
client's way (same base LM, seed, strategy preparation), load the round's starting tensors and
optimizer state, and train the steps on their rows of every global batch (`shard_batch`:
contiguous, sizes differing by at most one). After each backward pass `GradientAverager`
all-reduces the gradients, each worker's weighted by its rows' share of the global batch, so
clipping, AdamW and the schedule see the global batch's gradient on every worker and the
workers stay identical. Rank 0 writes the trained tensors and optimizer state as the run's
checkpoint, which the actor loads: the round then goes on (update, statistics, own
checkpoint) exactly as a one-process round.

Why a gradient all-reduce in the trainer and not torch's `DistributedDataParallel` wrapper:
a step runs the decoder twice (generic, then generic + specialized adapters) and skips the
loss terms whose weight is 0, so parameters go unused or are used twice in one step, and the
trainer addresses the model's parameters by name; one flat all-reduce per step is what DDP's
buckets do, without those constraints. The same global batch gives the same update as one
worker, within float tolerance, for loss terms that are means over samples (the diagnosis
loss) or over tokens when rows have equal token counts; a token mean over rows of different
lengths is the mean of the workers' token means, and the client-aware contrastive loss pairs
rows within a worker's rows only (the usual data-parallel semantics). BatchNorm layers of a
trained encoder normalize by each worker's rows and rank 0's running statistics are kept (the
paper preset freezes the encoder). Teacher-forcing draws come from the same seeded generator
on every worker.

A worker that dies, or raises, fails the Ray Train run (no Ray Train retries: `max_failures`
0); `run_round_on_workers` raises `DistributedRoundError` naming the center, and the client's
fit fails like any failed client call: the coordinator drops it from the round (or retries the
round) and the actor's own model and optimizer are untouched, since they are only replaced
from a finished run's checkpoint.

Cost: the workers are started, and load the base LM, for every round (a TorchTrainer run has
no persistent worker group), seconds for a 1B model from the page cache, more for 7B.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fedmrg.config import ExperimentConfig
from fedmrg.fl.checkpoint import save_state
from fedmrg.fl.placement import TrainWorkers

STATE_FILE = "round_state.pt"


class DistributedRoundError(RuntimeError):
    """A center's Ray Train round failed (a worker died or raised); names the center."""


@dataclass
class RoundInputs:
    """Everything a worker needs to train the round (one `ray.put`, read by every worker)."""

    cfg: ExperimentConfig
    center: str
    seed: int  # the client's seed: the same model initialization and trainer seed
    batches: list[dict]  # the round's global batches, as the client's stream gave them
    shared: dict[str, Tensor]  # the client's shared state as the round starts
    private: dict[str, Tensor]
    trainer_state: dict[str, Any]  # LocalTrainer.state_dict()
    terms: dict[str, Any]  # the strategy's training terms (prototypes, prox reference, mu)


@dataclass
class RoundResult:
    shared: dict[str, Tensor]
    private: dict[str, Tensor]
    trainer_state: dict[str, Any]
    metrics: dict[str, float]


# --------------------------------------------------------------------------- pure pieces


def shard_bounds(rows: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi) of `rank`'s contiguous rows among `world` workers (sizes differ by <= 1)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    base, extra = divmod(rows, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def batch_rows(batch: Mapping[str, Any]) -> int:
    labels = batch.get("labels")
    if labels is None:
        raise ValueError(f"a training batch needs 'labels' to count its rows; keys: "
                         f"{sorted(batch)}")
    return int(labels.shape[0])


def shard_batch(batch: Mapping[str, Any], rank: int, world: int) -> dict[str, Any]:
    """`rank`'s rows of every per-row value of `batch` (tensors, arrays, lists of the batch's
    length); other values as they are."""
    rows = batch_rows(batch)
    if rows < world:
        raise ValueError(f"a batch of {rows} rows cannot feed {world} workers (data.batch_size "
                         f"must be at least the center's Ray Train workers)")
    lo, hi = shard_bounds(rows, rank, world)
    out = {}
    for key, value in batch.items():
        if isinstance(value, (Tensor, np.ndarray, list, tuple)) and len(value) == rows:
            out[key] = value[lo:hi]
        else:
            out[key] = value
    return out


class GradientAverager:
    """`LocalTrainer(grad_sync=...)`: all-reduce the gradients as one flat tensor, each
    worker's scaled by its rows / the global batch's rows (the global batch's mean gradient
    when the loss is a mean over rows). Parameters without a gradient (an unused loss term)
    are left alone; every worker has the same ones, since all run the same loss terms."""

    def __init__(self, global_rows: Sequence[int]):
        self.global_rows = list(global_rows)  # per step
        self.step = 0

    def __call__(self, params: list[nn.Parameter], rows: int) -> None:
        import torch.distributed as dist

        weight = rows / self.global_rows[self.step]
        self.step += 1
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads]) * weight
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def build_round_model(inputs: RoundInputs, device: torch.device) -> tuple[Any, Any]:
    """The client's model and trainer, as `FederatedClient` builds them, with the round's
    starting tensors and optimizer state loaded: (model, trainer)."""
    from fedmrg.fl.client import derive_seed
    from fedmrg.fl.strategies import make_client_strategy
    from fedmrg.model.base_lm import load_base_lm
    from fedmrg.model.mrg import MRGModel
    from fedmrg.model.params import load_private_state, load_shared_state
    from fedmrg.model.trainer import LocalTrainer

    cfg = inputs.cfg
    lm, tokenizer = load_base_lm(cfg.model, device=device)
    model = MRGModel.from_config(cfg.model, lm, tokenizer, seed=inputs.seed,
                                 max_report_tokens=cfg.data.max_report_tokens)
    model.to(device)
    make_client_strategy(cfg).prepare_model(model)
    load_shared_state(model, inputs.shared)
    load_private_state(model, inputs.private)
    trainer = LocalTrainer(model, cfg.train, seed=derive_seed(inputs.seed, inputs.center,
                                                              "train"))
    trainer.load_state_dict(inputs.trainer_state)
    return model, trainer


def train_rows(inputs: RoundInputs, rank: int, world: int, device: torch.device
               ) -> RoundResult:
    """Train the round on `rank`'s rows of every global batch (world 1: all of them, no
    process group). With world > 1 a torch.distributed process group must be up."""
    from fedmrg.model.params import get_private_state, get_shared_state

    model, trainer = build_round_model(inputs, device)
    if world > 1:
        trainer.grad_sync = GradientAverager([batch_rows(b) for b in inputs.batches])
    shards = [shard_batch(b, rank, world) for b in inputs.batches]
    metrics = trainer.fit(shards, len(shards), **inputs.terms)
    if world > 1:
        metrics = _mean_over_workers(metrics)
    cpu = torch.device("cpu")
    return RoundResult(
        shared={n: t.to(cpu) for n, t in get_shared_state(model).items()},
        private={n: t.to(cpu) for n, t in get_private_state(model).items()},
        trainer_state=_to_cpu(trainer.state_dict()), metrics=metrics)


def _mean_over_workers(metrics: dict[str, float]) -> dict[str, float]:
    """Loss terms weighted by each worker's samples; samples summed; the rest (steps, lr,
    grad_norm: the same on every worker) as rank 0 has them."""
    import torch.distributed as dist

    samples = metrics["samples"]
    keys = sorted(k for k in metrics if k not in ("steps", "samples", "lr", "grad_norm",
                                                  "exhausted", "wall_s"))
    flat = torch.tensor([samples] + [metrics[k] * samples for k in keys], dtype=torch.float64)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    out = dict(metrics)
    out["samples"] = float(flat[0])
    out.update({k: float(flat[i + 1] / flat[0]) for i, k in enumerate(keys)})
    return out


def _to_cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


# --------------------------------------------------------------------------- Ray Train


def _worker_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: train its rows, rank 0 reports the result as a checkpoint."""
    import ray
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    inputs: RoundInputs = ray.get(config["inputs"])
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    # in the worker's log (Ray's logs folder, worker-*.out): which center, rank, device
    print(f"fedmrg ray train: center {inputs.center!r} rank {rank} of {world} on {device}, "
          f"{len(inputs.batches)} steps (pid {os.getpid()})", flush=True)
    result = train_rows(inputs, rank, world, device)
    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            save_state(result, Path(tmp) / STATE_FILE)  # a full disk says so
            ray.train.report(result.metrics,
                             checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(result.metrics)


def run_round_on_workers(inputs: RoundInputs, workers: TrainWorkers, storage_path: str | Path,
                         name: str) -> RoundResult:
    """Run the round as a `TorchTrainer` with `workers` (module docstring); the run's files
    go to `storage_path/name` (shared storage on a multi-node cluster). Raises
    `DistributedRoundError` when the run fails."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not workers.distributed:
        raise ValueError(f"{workers}: a Ray Train round needs at least 2 workers")
    use_gpu = workers.gpus > 0
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"inputs": ray.put(inputs), "use_gpu": use_gpu},
        scaling_config=ScalingConfig(
            num_workers=workers.count, use_gpu=use_gpu,
            resources_per_worker={"CPU": workers.cpus, **({"GPU": workers.gpus}
                                                          if use_gpu else {})},
            # a center's workers share its node (NCCL over NVLink/PCIe, not the network)
            placement_strategy="STRICT_PACK"),
        run_config=RunConfig(name=name, storage_path=str(storage_path),
                             failure_config=FailureConfig(max_failures=0)),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # TrainingFailedError: a worker died or raised
        cause = str(e).strip().splitlines()
        raise DistributedRoundError(
            f"center {inputs.center!r}: its Ray Train round on {workers.count} workers "
            f"failed: {type(e).__name__}: {' '.join(cause[:3])[:500]}") from e
    if result.checkpoint is None:
        raise DistributedRoundError(f"center {inputs.center!r}: its Ray Train round ended "
                                    f"without rank 0's checkpoint")
    try:
        with result.checkpoint.as_directory() as folder:
            return torch.load(Path(folder) / STATE_FILE, weights_only=False)
    finally:
        # the state now lives in the client (and its own checkpoint): no copy per round
        shutil.rmtree(Path(storage_path) / name, ignore_errors=True)
