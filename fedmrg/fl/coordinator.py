"""The coordinator: a plain class that runs federated rounds over a `ClientPool` (no Ray here).

    pool = InProcessPool({c: FederatedClient(cfg, c, dataset_root=root, seed=cfg.seed) ...})
    coordinator = Coordinator(cfg, strategy, pool, initial_state, np.random.default_rng(seed))
    result = coordinator.run()   # FederatedResult

The Ray edge (`fedmrg.fl.actors`) provides a pool of client actors and runs this same class
inside an actor; tests and debugging use `InProcessPool`, which runs every call at once.

A round (`run_round`):
1. `strategy.configure_round`: seeded sampling (`fraction`, at least `min_clients`), sorted;
2. one plan per sampled client, its floating tensors cast to `federation.wire_dtype` (the
   global state once per round; every plan shares it, so a Ray pool puts it once);
3. submit, then collect (`collect_replies`): the round closes when every client replied, or,
   with `round_deadline_s` > 0, once the deadline passed and `min_clients` good replies are in
   (stragglers' replies are abandoned);
4. every reply is counted in bytes (`message_bytes`), then checked (`validate_update`: round
   id, center, names, shapes, finite values; a failed or invalid reply is recorded in
   `RoundSummary.rejected` with its reason) and cast back from the wire dtype;
5. `strategy.aggregate_round` over the accepted updates in center order;
6. a `RoundSummary` (bytes up/down, dense equivalent, times, the strategy's metrics, the
   clients' metrics as their mean and as "<center>/<metric>") goes to `on_round`.
`on_evaluation(view, per_center, mean, step=round_id)` gets every evaluation.
Fewer than `min_clients` accepted updates fail the round with `FederationError` (retries are
a policy hook: `on_round_failure`). `eval_every` rounds, and after the last one, `evaluate`.

Evaluation (`evaluate`): generalization = the generic model (the global state) on the test
split of every evaluated center (`eval_centers`, default the pool's centers) and of every
held-out center; each dataset is evaluated by its own client, a center without a client (the
held-out one, or all of them under `centralized`) by the first client by id. Under `local`
there is no generic model: each center's model is evaluated on its own test split, and a
held-out center by every client's model, the metrics averaged over them. Personalization =
each center's own model (global state + its private state) on its own test split. Means are
unweighted over the evaluated (not held-out) centers.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from fedmrg.config import ExperimentConfig
from fedmrg.eval.evaluator import mean_over_centers
from fedmrg.fl.lowrank import LowRankUpdate
from fedmrg.fl.messages import ClientFailure, ClientUpdate, EvalReply, RoundPlan, RoundSummary
from fedmrg.fl.strategies import FederationError, Strategy
from fedmrg.fl.wire import from_wire, message_bytes, to_wire

__all__ = ["ClientFailure", "ClientPool", "Coordinator", "Evaluation", "FederatedResult",
           "InProcessPool", "validate_update"]

GENERALIZATION, PERSONALIZATION = "generalization", "personalization"


# --------------------------------------------------------------------------- the pool


class ClientPool(Protocol):
    """How the coordinator reaches its clients: in-process (`InProcessPool`) or Ray actors.

    A handle is opaque and hashable (a Ray ObjectRef, or an in-process record). `wait` returns
    (ready, pending) like `ray.wait`; `result` returns the reply or raises `ClientFailure`.
    `global_state` in `submit_evaluate` is the server's generic state for an evaluation
    (None: the client's own model as it stands).
    """

    def centers(self) -> list[str]: ...

    def submit_fit(self, center: str, plan: RoundPlan) -> Any: ...

    def submit_evaluate(self, center: str, split: str, personalized: bool,
                        dataset_center: str | None = None,
                        global_state: dict[str, Tensor] | None = None) -> Any: ...

    def wait(self, handles: Sequence[Any], num_returns: int, timeout_s: float | None,
             ) -> tuple[list[Any], list[Any]]: ...

    def result(self, handle: Any) -> ClientUpdate | EvalReply: ...


@dataclass(eq=False)  # hashable by identity: handles are dict keys
class _Call:
    """An in-process call, already run: its reply or the failure it raised."""

    center: str
    reply: ClientUpdate | EvalReply | None = None
    error: ClientFailure | None = None


class InProcessPool:
    """`ClientPool` over plain clients in this process: a submit runs the call at once and keeps
    its result or exception; `wait` finds every call ready."""

    def __init__(self, clients: Mapping[str, Any]):
        if not clients:
            raise FederationError("InProcessPool: no clients")
        self.clients = dict(clients)

    def centers(self) -> list[str]:
        return sorted(self.clients)

    def _run(self, center: str, fn: Callable[[Any], Any]) -> _Call:
        if center not in self.clients:
            return _Call(center, error=ClientFailure(center, f"no such client; the pool has "
                                                             f"{self.centers()}"))
        try:
            return _Call(center, reply=fn(self.clients[center]))
        except Exception as e:  # a client's failure is the round's to judge, as over Ray
            failure = ClientFailure(center, f"{type(e).__name__}: {e}")
            failure.__cause__ = e  # the client's traceback, for debugging in process
            return _Call(center, error=failure)

    def submit_fit(self, center: str, plan: RoundPlan) -> _Call:
        return self._run(center, lambda client: client.fit(plan))

    def submit_evaluate(self, center: str, split: str, personalized: bool,
                        dataset_center: str | None = None,
                        global_state: dict[str, Tensor] | None = None) -> _Call:
        return self._run(center, lambda client: client.evaluate(
            split, personalized, dataset_center=dataset_center, global_state=global_state))

    def wait(self, handles: Sequence[_Call], num_returns: int, timeout_s: float | None,
             ) -> tuple[list[_Call], list[_Call]]:
        return list(handles), []

    def result(self, handle: _Call) -> ClientUpdate | EvalReply:
        if handle.error is not None:
            raise handle.error
        return handle.reply


# --------------------------------------------------------------------------- validation


def _finite(t: Tensor) -> bool:
    return not t.is_floating_point() or bool(torch.isfinite(t).all())


def validate_update(update: Any, *, center: str, round_id: int,
                    lora_spec: Mapping[str, tuple[int, ...]],
                    dense_spec: Mapping[str, tuple[int, ...]]) -> str | None:
    """Why `update` must not be aggregated, or None. Checks: a ClientUpdate of this round from
    this center, a positive sample count, exactly the expected tensor names, shapes (a LoRA
    factor may differ in rank only; a low-rank update must stand for the tensor's shape), finite
    values. The norm bound and clipping are issue 5's policy (`federation.max_update_norm`)."""
    if not isinstance(update, ClientUpdate):
        return f"not a ClientUpdate but a {type(update).__name__}"
    if update.round_id != round_id:
        return f"reply for round {update.round_id}, not round {round_id} (late or duplicate)"
    if update.center != center:
        return f"reply names center {update.center!r}, sent to {center!r}"
    n = update.num_samples
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
        return f"num_samples {n!r} is not a positive integer"
    for kind, got, spec in (("LoRA factor", update.lora, lora_spec),
                            ("dense update", update.dense, dense_spec)):
        missing, extra = sorted(set(spec) - set(got)), sorted(set(got) - set(spec))
        if extra:
            return f"unexpected {kind} {extra[0]!r} ({len(extra)} unexpected)"
        if missing:
            return f"missing {kind} {missing[0]!r} ({len(missing)} missing)"
    for name, t in update.lora.items():
        want = lora_spec[name]
        rank_dim = 0 if ".lora_A." in name else 1
        if (not isinstance(t, Tensor) or t.dim() != len(want)
                or any(a != b for i, (a, b) in enumerate(zip(t.shape, want, strict=True))
                       if i != rank_dim)):
            return f"LoRA factor {name!r} has shape {_shape(t)}, expected {want} (any rank)"
        if not _finite(t):
            return f"LoRA factor {name!r} has non-finite values"
    for name, u in update.dense.items():
        want = dense_spec[name]
        if isinstance(u, LowRankUpdate):
            ok = (tuple(u.shape) == want and u.U.dim() == 2 and u.V.dim() == 2
                  and u.U.shape[1] == u.V.shape[0] and u.U.shape[0] == want[0]
                  and u.V.shape[1] == math.prod(want[1:]))
            tensors = (u.U, u.V)
        else:
            ok = isinstance(u, Tensor) and tuple(u.shape) == want
            tensors = (u,) if isinstance(u, Tensor) else ()
        if not ok:
            return f"dense update {name!r} does not fit the tensor's shape {want}"
        if not all(_finite(t) for t in tensors):
            return f"dense update {name!r} has non-finite values"
    for field_name in ("prototypes", "prototype_counts", "label_counts"):
        t = getattr(update, field_name)
        if t is not None and (not isinstance(t, Tensor) or not _finite(t)):
            return f"{field_name} is not a finite tensor"
    return None


def _shape(t: Any) -> Any:
    return tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__


# --------------------------------------------------------------------------- results


@dataclass
class Evaluation:
    """One evaluation view after a round: metrics per dataset center and their mean."""

    round_id: int
    view: str  # "generalization" | "personalization"
    per_center: dict[str, dict[str, float]]
    mean: dict[str, float]  # unweighted over the evaluated (not held-out) centers
    replies: list[EvalReply] = field(default_factory=list)


@dataclass
class FederatedResult:
    """What `Coordinator.run` returns."""

    history: list[RoundSummary]
    global_state: dict[str, Tensor] | None
    generalization: Evaluation | None
    personalization: Evaluation | None
    evaluations: list[Evaluation] = field(default_factory=list)  # every one, in order

    @property
    def generalization_replies(self) -> list[EvalReply]:
        return self.generalization.replies if self.generalization else []

    @property
    def personalization_replies(self) -> list[EvalReply]:
        return self.personalization.replies if self.personalization else []

    def communication(self) -> dict[str, int]:
        """Run totals: bytes up and down, and the dense equivalent of the uploads."""
        return {"bytes_up": sum(s.bytes_up for s in self.history),
                "bytes_down": sum(s.bytes_down for s in self.history),
                "dense_equivalent_up": sum(s.dense_equivalent_up for s in self.history)}


# --------------------------------------------------------------------------- the coordinator


class Coordinator:
    """Runs the rounds of one experiment (module docstring)."""

    def __init__(self, cfg: ExperimentConfig, strategy: Strategy, pool: ClientPool,
                 initial_state: Mapping[str, Tensor], rng: np.random.Generator, *,
                 on_round: Callable[[RoundSummary], None] | None = None,
                 on_evaluation: Callable[..., None] | None = None,
                 eval_centers: Sequence[str] | None = None,
                 heldout_centers: Sequence[str] = (), eval_split: str = "test"):
        self.cfg, self.strategy, self.pool, self.rng = cfg, strategy, pool, rng
        self.on_round = on_round or (lambda summary: None)
        self.on_evaluation = on_evaluation or (lambda view, per_center, mean, step=None: None)
        self.eval_centers = list(eval_centers) if eval_centers is not None else None
        self.heldout_centers = list(heldout_centers)
        self.eval_split = eval_split
        self.strategy.initialize(dict(initial_state))
        self.round_id = 0  # the last finished round
        self.history: list[RoundSummary] = []
        self.evaluations: list[Evaluation] = []

    # ----------------------------------------------------------------- the run

    def run(self) -> FederatedResult:
        """Rounds from the one after `round_id` to `federation.rounds`, evaluations included."""
        while self.round_id < self.cfg.federation.rounds:
            self.step()
        generalization, personalization = self.evaluate(self.round_id)
        return FederatedResult(self.history, self.strategy.global_state(), generalization,
                               personalization, list(self.evaluations))

    def step(self) -> RoundSummary:
        """The next round, recorded in the history and reported; evaluated every
        `eval_every` rounds (the last round's evaluation is `run`'s)."""
        fed = self.cfg.federation
        round_id = self.round_id + 1
        summary = self.run_round(round_id)
        self.history.append(summary)
        self.round_id = round_id
        self.on_round(summary)
        if fed.eval_every and round_id % fed.eval_every == 0 and round_id < fed.rounds:
            self.evaluate(round_id)
        return summary

    def run_round(self, round_id: int) -> RoundSummary:
        """One round (module docstring), without touching the history."""
        started = time.perf_counter()
        fed = self.cfg.federation
        centers = self.strategy.configure_round(round_id, self.pool.centers(), self.rng)
        plans = self._wire_plans({c: self.strategy.plan(round_id, c) for c in centers})
        bytes_down = sum(message_bytes(p).bytes for p in plans.values())
        handles = {self.pool.submit_fit(c, plans[c]): c for c in centers}

        replies, rejected = self.collect_replies(handles, fed.min_clients, fed.round_deadline_s)
        lora_spec, dense_spec = self.strategy.update_spec()
        bytes_up = dense_up = 0
        accepted: list[ClientUpdate] = []
        for center, reply in sorted(replies.items()):
            size = message_bytes(reply)
            bytes_up += size.bytes
            dense_up += size.dense_equivalent_bytes
            reason = validate_update(reply, center=center, round_id=round_id,
                                     lora_spec=lora_spec, dense_spec=dense_spec)
            if reason is None:
                accepted.append(from_wire(reply))
            else:
                rejected[center] = reason
        if len(accepted) < fed.min_clients:
            self.on_round_failure(round_id, rejected)

        aggregation_started = time.perf_counter()
        metrics = self.strategy.aggregate_round(round_id, accepted)
        aggregation_time = time.perf_counter() - aggregation_started
        metrics.update(client_metrics(accepted))
        return RoundSummary(round_id=round_id, participants=[u.center for u in accepted],
                            rejected=dict(sorted(rejected.items())), bytes_up=bytes_up,
                            bytes_down=bytes_down, dense_equivalent_up=dense_up,
                            aggregation_time_s=aggregation_time,
                            round_time_s=time.perf_counter() - started, metrics=metrics)

    def _wire_plans(self, plans: dict[str, RoundPlan]) -> dict[str, RoundPlan]:
        """Plans with floating tensors in the wire dtype; a global state shared by several
        plans is cast once and stays shared."""
        dtype = self.cfg.federation.wire_dtype
        cast: dict[int, Any] = {}
        out = {}
        for center, plan in plans.items():
            state = plan.global_state
            if state is not None and id(state) not in cast:
                cast[id(state)] = to_wire(state, dtype)
            wired = to_wire(dataclasses.replace(plan, global_state=None), dtype)
            out[center] = dataclasses.replace(
                wired, global_state=None if state is None else cast[id(state)])
        return out

    def collect_replies(self, handles: Mapping[Any, str], min_clients: int, deadline_s: float,
                        ) -> tuple[dict[str, Any], dict[str, str]]:
        """({center: reply}, {center: failure reason}) of a round's calls (module docstring)."""
        deadline = time.monotonic() + deadline_s if deadline_s > 0 else None
        pending = list(handles)
        replies: dict[str, Any] = {}
        failed: dict[str, str] = {}
        while pending:
            past = deadline is not None and time.monotonic() >= deadline
            if past and len(replies) >= min_clients:
                for handle in pending:
                    failed[handles[handle]] = f"no reply within the {deadline_s:g} s deadline"
                break
            timeout = None if deadline is None or past else deadline - time.monotonic()
            ready, pending = self.pool.wait(pending, 1, timeout)
            for handle in ready:
                center = handles[handle]
                try:
                    replies[center] = self.pool.result(handle)
                except ClientFailure as e:
                    failed[center] = f"failed: {e.message}"
        return replies, failed

    def on_round_failure(self, round_id: int, rejected: Mapping[str, str]) -> None:
        """Too few good updates. Policy hook (issue 5: retries, stop with a checkpoint)."""
        reasons = "; ".join(f"{c}: {r}" for c, r in sorted(rejected.items())) or "none"
        raise FederationError(
            f"round {round_id}: fewer than federation.min_clients="
            f"{self.cfg.federation.min_clients} usable updates (rejected: {reasons})")

    # ----------------------------------------------------------------- evaluation

    def evaluate(self, round_id: int) -> tuple[Evaluation, Evaluation]:
        """Generalization and personalization after `round_id` (module docstring)."""
        clients = self.pool.centers()
        datasets = self.eval_centers if self.eval_centers is not None else clients
        state = self.strategy.global_state()

        def owner(dataset: str) -> str:
            return dataset if dataset in clients else clients[0]

        jobs: list[tuple[str, str, str, bool]] = []  # (view, dataset, client, personalized)
        for dataset in [*datasets, *self.heldout_centers]:
            if state is None and dataset not in datasets:  # local: every model on held-out
                jobs += [(GENERALIZATION, dataset, c, False) for c in clients]
            else:
                jobs.append((GENERALIZATION, dataset, owner(dataset), False))
        jobs += [(PERSONALIZATION, d, owner(d), True) for d in datasets]

        handles = {}
        for job in jobs:
            _, dataset, client, personalized = job
            handles[self.pool.submit_evaluate(client, self.eval_split, personalized,
                                              dataset_center=dataset, global_state=state)] = job
        replies: dict[tuple, EvalReply] = {}
        pending = list(handles)
        while pending:
            ready, pending = self.pool.wait(pending, len(pending), None)
            for handle in ready:
                view, dataset, client, _ = handles[handle]
                try:
                    replies[handles[handle]] = self.pool.result(handle)
                except ClientFailure as e:
                    raise FederationError(f"round {round_id}: {view} evaluation of "
                                          f"{dataset!r} on client {client!r} failed: "
                                          f"{e.message}") from None
        out = []
        for view in (GENERALIZATION, PERSONALIZATION):
            per_center: dict[str, dict[str, float]] = {}
            ordered = [(job, replies[job]) for job in jobs if job[0] == view]  # job order
            for dataset in dict.fromkeys(job[1] for job, _ in ordered):
                parts = [r.metrics for job, r in ordered if job[1] == dataset]
                per_center[dataset] = parts[0] if len(parts) == 1 else mean_over_centers(parts)
            mean = mean_over_centers(per_center[d] for d in datasets if d in per_center)
            evaluation = Evaluation(round_id, view, per_center, mean, [r for _, r in ordered])
            self.evaluations.append(evaluation)
            self.on_evaluation(view, per_center, mean, step=round_id)
            out.append(evaluation)
        return out[0], out[1]

    # ----------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything to continue the run after `round_id` (issue 5 writes it to disk)."""
        return {"round_id": self.round_id, "strategy": self.strategy.state_dict(),
                "rng": self.rng.bit_generator.state,
                "history": [s.to_dict() for s in self.history]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.round_id = int(state["round_id"])
        self.strategy.load_state_dict(state["strategy"])
        self.rng.bit_generator.state = state["rng"]
        self.history = [RoundSummary(**row) for row in state["history"]]


def client_metrics(updates: Sequence[ClientUpdate]) -> dict[str, float]:
    """The clients' own metrics: "<center>/<metric>" each, and the mean over clients."""
    out: dict[str, float] = {}
    for u in updates:
        out.update({f"{u.center}/{k}": float(v) for k, v in u.metrics.items()})
    keys = dict.fromkeys(k for u in updates for k in u.metrics)
    for k in keys:
        values = [float(u.metrics[k]) for u in updates if k in u.metrics]
        out[k] = float(np.mean(values))
    return out
