"""Local training of an `MRGModel`: what a federated client runs each round, and what the
`centralized` and `local` baselines run end to end. Plain PyTorch, no Ray.

    trainer = LocalTrainer(model, TrainConfig(), seed=0)
    trainer.fit(batches, steps=20, prototypes=..., proto_counts=..., log_prior=...,
                prox_reference=global_shared_state)

One step: forward (every loss term of `model.cfg.losses`) + optional FedProx proximal term ->
backward -> clip the gradient norm -> AdamW -> learning-rate schedule.

Choices, and why:
- Optimizer: AdamW over the parameters that are trainable when the trainer is built (shared
  and private groups; the frozen base LM and a frozen encoder never enter it). No weight decay
  on biases and norm weights, the usual split.
- Schedule: linear warm-up over `warmup_steps`, then constant ("constant", the default) or a
  cosine decay to `min_lr_ratio * lr` at `total_steps` ("cosine"). Constant is the default
  because a federated client does not know how many steps its life will have (rounds, sampling,
  restarts); the centralized baseline, which knows its budget, uses cosine. The step counter
  lives in the trainer, so the warm-up happens once per trainer, not once per `fit`.
- Optimizer state persists across `fit` calls: a centralized run can call `fit` many times,
  and a client's private tensors (specialized adapter, local head) continue their own
  trajectory across rounds, so their Adam moments stay valid. The shared tensors are
  overwritten by the server's aggregate each round; their moments still describe the client's
  gradients near it, and a federated client keeps them unless `train.reset_shared_moments`
  (FedAvg's fresh local optimizer per round) makes it call `reset_optimizer("shared")`: a reset
  makes AdamW's next steps about lr * sign(grad) on every shared weight, which slowed the
  from-scratch encoder and diagnosis head in the federated default.
- FedProx: `mu/2 * ||w - w_ref||^2` over the trainable SHARED parameters (what is aggregated),
  on when `fit(..., mu=...)` is given mu > 0 (the fedprox strategy passes `train.fedprox_mu`;
  the trainer never turns it on by itself). `w_ref` is `prox_reference` (e.g. the round's
  global state, name -> tensor); with no reference, the shared weights at the start of `fit`
  are used, which is FedProx's w^t when the client has just loaded the global model.
- Data parallel (`grad_sync`, used by fedmrg/fl/ddp.py): each worker runs the steps on its
  rows of the global batch and a hook averages the gradients before clipping, so clipping,
  AdamW and the schedule see the global batch's gradient on every worker.
- Determinism: the prompt teacher-forcing draws come from the trainer's own
  `torch.Generator(seed)`, and every step runs under a forked global RNG seeded by
  (seed, step) (LoRA dropout, anything else drawing from torch's global RNG), so the same
  seed and the same batches give identical weights, and training never moves the caller's RNG.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmrg.config import TrainConfig
from fedmrg.model.params import parameter_groups

SCHEDULES = ("constant", "cosine")


class TrainerError(ValueError):
    """Bad trainer arguments or inputs; the message names the argument or tensor."""


# --------------------------------------------------------------------------- schedules


def lr_factor(step: int, warmup_steps: int, schedule: str = "constant",
              total_steps: int | None = None, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based).

    Warm-up: (step + 1) / warmup_steps for step < warmup_steps, so the first step already
    moves. Then 1.0 ("constant"), or a cosine from 1.0 at the end of the warm-up down to
    `min_lr_ratio` at `total_steps` and held there ("cosine").
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise TrainerError(f"schedule: {schedule!r} is not one of {list(SCHEDULES)}")
    if total_steps is None:
        raise TrainerError("schedule='cosine' needs total_steps")
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def linear_decay(start: float, end: float, steps: int) -> Callable[[int], float]:
    """step -> value going linearly from `start` (step 0) to `end` (step `steps`), then held.

    E.g. the prompt teacher-forcing probability from 1.0 down, so the decoder first learns to
    follow the prompt, then to cope with the diagnosis head's own (imperfect) predictions.
    """
    if steps < 1:
        raise TrainerError(f"linear_decay: steps must be >= 1, got {steps}")

    def value(step: int) -> float:
        return start + (end - start) * min(1.0, step / steps)

    return value


def _step_seed(seed: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


# --------------------------------------------------------------------------- FedProx


def proximal_term(params: Mapping[str, nn.Parameter], reference: Mapping[str, torch.Tensor],
                  mu: float) -> torch.Tensor:
    """mu/2 * sum over `params` of ||p - reference[name]||^2 (a scalar with a graph to params).

    Every parameter needs a reference of the same shape (else TrainerError naming it); extra
    reference entries (e.g. BatchNorm buffers of a shared state) are ignored.
    """
    missing = [n for n in params if n not in reference]
    if missing:
        raise TrainerError(f"prox_reference: missing shared parameter {missing[0]!r} "
                           f"({len(missing)} missing in all)")
    total = None
    for name, p in params.items():
        ref = reference[name]
        if tuple(ref.shape) != tuple(p.shape):
            raise TrainerError(f"prox_reference: {name!r} has shape {tuple(ref.shape)}, the "
                               f"parameter has {tuple(p.shape)}")
        sq = (p - ref.detach().to(p.device, p.dtype)).pow(2).sum()
        total = sq if total is None else total + sq
    if total is None:
        raise TrainerError("proximal_term: no shared trainable parameter")
    return 0.5 * mu * total


# --------------------------------------------------------------------------- trainer


class LocalTrainer:
    """Runs steps of the full FedMRG objective on one model (see the module docstring)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, seed: int = 0, *,
                 schedule: str = "constant", total_steps: int | None = None,
                 min_lr_ratio: float = 0.0,
                 teacher_forcing: Callable[[int], float] | None = None,
                 grad_sync: Callable[[list[nn.Parameter], int], None] | None = None):
        if schedule not in SCHEDULES:
            raise TrainerError(f"schedule: {schedule!r} is not one of {list(SCHEDULES)}")
        if schedule == "cosine" and (total_steps is None or total_steps < 1):
            raise TrainerError(f"schedule='cosine' needs total_steps >= 1, got {total_steps!r}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise TrainerError(f"min_lr_ratio: expected a value in [0, 1], got {min_lr_ratio}")
        self.model, self.cfg, self.seed = model, cfg, seed
        self.schedule, self.total_steps, self.min_lr_ratio = schedule, total_steps, min_lr_ratio
        self.teacher_forcing = teacher_forcing  # step -> probability; None: model.cfg's value
        # (trainable parameters, this step's batch rows) -> None, after backward: averages the
        # gradients over data-parallel workers (fedmrg.fl.ddp); None: one process
        self.grad_sync = grad_sync
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0  # optimizer steps done over the trainer's life

        groups = parameter_groups(model)
        self.shared = {n: p for n, p in groups["shared"].items() if p.requires_grad}
        self.private = {n: p for n, p in groups["private"].items() if p.requires_grad}
        self.trainable = {**self.shared, **self.private}
        if not self.trainable:
            raise TrainerError("the model has no trainable parameter")
        decay, no_decay = [], []
        for p in self.trainable.values():
            # Biases and normalization weights (1-D) are not decayed.
            (no_decay if p.ndim <= 1 else decay).append(p)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
        self._set_lr()

    # ----------------------------------------------------------------- state

    def lr_at(self, step: int) -> float:
        return self.cfg.lr * lr_factor(step, self.cfg.warmup_steps, self.schedule,
                                       self.total_steps, self.min_lr_ratio)

    def _set_lr(self) -> None:
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def reset_optimizer(self, group: str = "all") -> None:
        """Forget AdamW moments of the "shared" tensors, the "private" ones, or "all".

        The schedule's step counter is kept (no second warm-up).
        """
        chosen = {"all": self.trainable, "shared": self.shared, "private": self.private}
        if group not in chosen:
            raise TrainerError(f"reset_optimizer: group {group!r} is not one of {list(chosen)}")
        for p in chosen[group].values():
            self.optimizer.state.pop(p, None)

    def state_dict(self) -> dict[str, Any]:
        """A snapshot (deep copy: later steps do not change it) of the optimizer state, step
        and teacher-forcing generator, to checkpoint a client."""
        return {"optimizer": copy.deepcopy(self.optimizer.state_dict()), "step": self.step,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.generator.set_state(state["generator"])
        self._set_lr()

    # ----------------------------------------------------------------- training

    def fit(self, batches: Iterable[dict], steps: int | None = None, *,
            prototypes: torch.Tensor | None = None, proto_counts: torch.Tensor | None = None,
            log_prior: torch.Tensor | None = None,
            prox_reference: Mapping[str, torch.Tensor] | None = None,
            mu: float = 0.0) -> dict[str, float]:
        """Train on `batches` for `steps` optimizer steps (None: until the iterable ends).

        Takes exactly the batches it trains on from the iterable, so a generator passed to
        successive calls continues where the last call stopped (see `epoch_batches`). Stops
        early when the iterable ends ("exhausted" is then 1.0). `mu` > 0 adds the FedProx term
        against `prox_reference` (see the module docstring). Returns the mean of each loss term
        over the steps ("loss" is the weighted objective, "prox" the proximal term when on),
        "grad_norm" (mean, before clipping), "steps", "samples", "wall_s", "lr" (of the last
        step), "exhausted".
        """
        if steps is not None and steps < 0:
            raise TrainerError(f"steps: expected >= 0 or None, got {steps}")
        if mu < 0:
            raise TrainerError(f"mu: expected >= 0, got {mu}")
        if mu > 0 and prox_reference is None:
            prox_reference = {n: p.detach().clone() for n, p in self.shared.items()}
        elif mu > 0:
            proximal_term(self.shared, prox_reference, mu)  # validate names/shapes up front

        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        done, samples, exhausted = 0, 0, False
        start = time.perf_counter()
        base_cfg = getattr(self.model, "cfg", None)
        self.model.train()
        iterator = iter(batches)
        try:
            while steps is None or done < steps:
                try:
                    batch = next(iterator)
                except StopIteration:
                    exhausted = True
                    break
                terms = self._train_step(batch, prototypes, proto_counts, log_prior,
                                         prox_reference, mu, base_cfg)
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v
                    counts[k] = counts.get(k, 0) + 1
                done += 1
                samples += _batch_size(batch)
        finally:
            if base_cfg is not None:
                self.model.cfg = base_cfg  # undo a teacher-forcing schedule's per-step config
        if done == 0 and (steps is None or steps > 0):
            raise TrainerError("fit: the batches iterable yielded no batch")
        out = {k: sums[k] / counts[k] for k in sums}
        out.update(steps=float(done), samples=float(samples),
                   wall_s=time.perf_counter() - start, lr=self.lr_at(max(0, self.step - 1)),
                   exhausted=float(exhausted))
        return out

    def _train_step(self, batch: dict, prototypes, proto_counts, log_prior, prox_reference,
                    mu: float, base_cfg: Any) -> dict[str, float]:
        if self.teacher_forcing is not None and base_cfg is not None:
            p = float(self.teacher_forcing(self.step))
            if not 0.0 <= p <= 1.0:
                raise TrainerError(f"teacher_forcing({self.step}) = {p}, not a probability")
            # A per-step copy: the caller's config object is never mutated.
            self.model.cfg = dataclasses.replace(base_cfg, prompt_teacher_forcing=p)
        self._set_lr()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_step_seed(self.seed, self.step))
            out = self.model(batch, prototypes=prototypes, proto_counts=proto_counts,
                             log_prior=log_prior, generator=self.generator)
            loss = out["loss"]
            terms = {k: float(v) for k, v in out.items() if k not in ("loss", "features")}
            if mu > 0:
                prox = proximal_term(self.shared, prox_reference, mu)
                loss = loss + prox
                terms["prox"] = float(prox.detach())
            if not torch.isfinite(loss):
                raise TrainerError(f"non-finite loss at step {self.step}: {terms}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            params = list(self.trainable.values())
            if self.grad_sync is not None:
                self.grad_sync(params, _batch_size(batch))
            if self.cfg.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
            else:
                norm = torch.nn.utils.get_total_norm(
                    [p.grad for p in params if p.grad is not None])
            self.optimizer.step()
        terms["loss"] = float(loss.detach())
        terms["grad_norm"] = float(norm)
        self.step += 1
        self._set_lr()  # the optimizer always shows the rate of the next step
        return terms


# --------------------------------------------------------------------------- batches


def _batch_size(batch: dict) -> int:
    labels = batch.get("labels")
    if labels is not None:
        return int(labels.shape[0])
    return len(batch.get("study_id", ()))


def epoch_batches(stream: Any, start_epoch: int = 0,
                  max_epochs: int | None = None) -> Iterator[dict]:
    """Batches of `stream.iter_batches(epoch)` for epoch = start_epoch, start_epoch + 1, ...

    An endless (or `max_epochs`-long) stream for `LocalTrainer.fit(..., steps=N)`: keep the
    generator and pass it to every `fit` so a client's rounds walk through its data epoch after
    epoch instead of restarting the first epoch each round. An empty epoch raises TrainerError
    (it would otherwise loop forever).
    """
    epoch = start_epoch
    while max_epochs is None or epoch < start_epoch + max_epochs:
        seen = 0
        for batch in stream.iter_batches(epoch):
            seen += 1
            yield batch
        if seen == 0:
            raise TrainerError(f"{stream!r}: epoch {epoch} yielded no batch")
        epoch += 1
