"""The coordinator: a plain class that runs federated rounds over a `ClientPool` (no Ray here).

    pool = InProcessPool({c: FederatedClient(cfg, c, dataset_root=root, seed=cfg.seed) ...})
    coordinator = Coordinator(cfg, strategy, pool, initial_state, np.random.default_rng(seed))
    result = coordinator.run()   # FederatedResult

The Ray edge (`fedmrg.fl.actors`) provides a pool of client actors and runs this same class
inside an actor; tests and debugging use `InProcessPool`, which runs every call at once.

A round (`run_round`) is one or more attempts; an attempt:
1. `strategy.configure_round`: seeded sampling (`fraction`, at least `min_clients`), sorted;
2. one plan per sampled client, its floating tensors cast to `federation.wire_dtype`, with
   the global state as the downlink sends it (`_downlink`, `fl.broadcast`): the round's
   low-rank delta to a client known to hold the previous synced version, the full synced
   state to any other (new, not sampled last round, or whose last call failed: a client
   restarted since holds nothing, so it rejoins from the full state like any other). The
   full state is cast once and shared by the plans that carry it, so a Ray pool puts it once;
3. submit, then collect (`collect_replies`): the attempt closes when every client answered
   or, with `round_deadline_s` > 0, when the deadline passes, whatever has arrived by then
   (every wait is bounded by the deadline; with no deadline a call ends when the client
   answers or its actor dies, which Ray reports at once). Calls still running at the deadline
   are abandoned: their replies, whenever they arrive, are dropped and counted, never applied
   (a Ray actor runs its calls one at a time, so the client's next call queues behind the
   abandoned one; see `drop_late_replies`). A second reply for a client that already answered
   (a transport that delivers twice) is dropped and counted;
4. every reply is counted in bytes (`message_bytes`), then checked against the payload schema
   the strategy publishes (`validate_update` with `strategy.update_spec()`: round id, center,
   names, shapes, wire dtype, finite values, statistics' names and shapes, numeric metrics),
   cast back from the wire dtype and held to the update-norm bound (`bound_update_norm`:
   `federation.max_update_norm`, rejected or clipped by `update_norm_action`); see
   `fedmrg.fl.validation` for the norm. What a failed call means is the failure policy's
   (`fedmrg.fl.failure`): a client whose data is bad (its call returned a `data` fault) stops
   the run once the attempt's replies are in, with one `ClientDataError` naming every such
   client and its own message (center, file, study); any other failure (crash, lost actor,
   deadline, invalid, norm) rejects that client from the attempt;
5. fewer than `min_clients` accepted updates: the attempt failed; the round is tried again
   (`FailurePolicy.retry_round`: up to `federation.round_retries` more times), with a fresh
   sample drawn from the same seeded
   RNG stream (so the same seed and the same failures give the same clients; with fraction 1
   every attempt asks every client) and the same global state and round id. When every
   attempt failed, `RoundFailedError` (a `FederationError`) names each attempt's centers and
   reasons, and the coordinator is left exactly at the last completed round (round id,
   strategy, history, RNG state: `state_dict` is unchanged), so a checkpoint of that round
   resumes the run;
6. `strategy.aggregate_round` over the accepted updates in center order;
7. a `RoundSummary` goes to `on_round`: bytes up/down (every attempt's), dense equivalent,
   times, who was rejected and why (last attempt; earlier attempts in `failed_attempts`), who
   was clipped and who rejoined after an actor restart, and metrics: the strategy's, the
   clients' (their mean, the sum for the "skipped_*" row counts of `data.on_error=skip` and
   for "truncated_reports", and "<center>/<metric>"), "<center>/update_norm" of every update
   measured, `update_norm_max`, and counts over all the round's attempts: `rejected_failed`
   (the call raised or the actor died), `rejected_deadline`, `rejected_invalid`,
   `rejected_norm`, `clipped` (last attempt), `late_replies_dropped`,
   `duplicate_replies_dropped`, `round_attempts`, `rejoined`.
`on_evaluation(view, per_center, mean, step=round_id)` gets every evaluation (a validation
one with `split="val"` added).
Validation (`val_every` > 0, `Experiment` passes `eval.val_every` / `eval.val_studies`): after
every `val_every`-th round, the last included, the same evaluation on the val split of the
participating centers (no held-out center), each limited to its first `val_studies` studies:
a few cheap points per run on curves over rounds; one that loses a center (after its
retries, the failure policy) is warned and skipped, the run goes on. An evaluation reads its
own streams and
generates without sampling, so it changes no training state (the next round's plan loads the
global state again): the run's models are the same with or without it.
`eval_every` rounds, and after the last one, `evaluate`: it waits for every evaluation, at
most `federation.eval_deadline_s` (0: no deadline; the driver's progress watchdog still
applies); a crashed one, e.g. on an actor being restarted, is asked again up to
`federation.round_retries` times; then one error names every evaluation given up on
(`ClientDataError` when all of them had bad data), and the run stops with its last round's
checkpoint kept. A call abandoned at the deadline is never asked again (an actor runs one
call at a time: a new one would queue behind it); its late reply is dropped.

Evaluation (`evaluate`): generalization = the generic model (the global state) on the test
split of every evaluated center (`eval_centers`, default the pool's centers) and of every
held-out center; each dataset is evaluated by its own client, a center without a client (the
held-out one, or all of them under `centralized`) by the first client by id. Under `local`
there is no generic model: each center's model is evaluated on its own test split, and a
held-out center by every client's model, the metrics averaged over them. Personalization =
each center's own model (global state + its private state) on its own test split. Means are
unweighted over the evaluated (not held-out) centers. Every reply is validated
(`validate_eval_reply`: fields, sizes, numeric metrics, and samples within what the run asked
and the dataset center's disclosure policy allows); a rejected one is warned, left out of the
metrics and samples, and named in `Evaluation.rejected`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from torch import Tensor

from fedmrg.choices import View
from fedmrg.config import ExperimentConfig
from fedmrg.data.shards import SKIPPED
from fedmrg.eval.evaluator import mean_over_centers
from fedmrg.fl.broadcast import StateBroadcast
from fedmrg.fl.failure import (
    ClientDataError,
    ClientFailure,
    ClientFault,
    FailureAction,
    FailureKind,
    FailurePolicy,
    Phase,
    rejection_kind,
)
from fedmrg.fl.messages import ClientUpdate, EvalReply, RoundPlan, RoundSummary
from fedmrg.fl.strategies import FederationError, Strategy
from fedmrg.fl.validation import bound_update_norm, validate_eval_reply, validate_update
from fedmrg.fl.wire import from_wire, message_bytes, to_wire, wire_dtype, wire_quantization
from fedmrg.privacy.server import ServerPrivacy

__all__ = ["ClientPool", "Collected", "Coordinator", "Evaluation", "FederatedResult",
           "InProcessPool", "RoundAttempt", "RoundFailedError", "ValidationPointSkipped",
           "validate_update"]

# How long a finished abandoned call's reply may take to arrive once the same client has
# answered a later call (it is already on its way: milliseconds, bounded generously).
LATE_REPLY_GRACE_S = 5.0
log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the pool


class ClientPool(Protocol):
    """How the coordinator reaches its clients: in-process (`InProcessPool`) or Ray actors.

    A handle is opaque and hashable (a Ray ObjectRef, or an in-process record). `wait` returns
    (ready, pending) like `ray.wait`; `result` returns the reply or raises `ClientFailure` (its
    `kind`: crash or lost), or `ClientDataError` when the client's data was bad (`fl.failure`).
    `global_state` in `submit_evaluate` is the server's generic state for an evaluation
    (None: the client's own model as it stands).
    """

    def centers(self) -> list[str]: ...

    def submit_fit(self, center: str, plan: RoundPlan) -> Any: ...

    def submit_evaluate(self, center: str, split: str, personalized: bool,
                        dataset_center: str | None = None,
                        global_state: dict[str, Tensor] | None = None,
                        max_studies: int | None = None) -> Any: ...

    def submit_secagg(self, center: str, stage: str, round_id: int, message: Any) -> Any:
        """A secure-aggregation step (`FederatedClient.secure_aggregation`)."""
        ...

    def wait(self, handles: Sequence[Any], num_returns: int, timeout_s: float | None,
             ) -> tuple[list[Any], list[Any]]: ...

    def result(self, handle: Any) -> ClientUpdate | EvalReply: ...

    def rejoined(self) -> list[str]:
        """Clients whose process was restarted after a loss and that answered a call since;
        each restart reported once (a pool whose clients cannot restart returns [])."""
        ...


@dataclass(eq=False)  # hashable by identity: handles are dict keys
class _Call:
    """An in-process call, already run: its reply or the failure it raised."""

    center: str
    reply: ClientUpdate | EvalReply | None = None
    error: ClientFailure | ClientDataError | None = None


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
            failure = ClientFault.from_exception(center, e).as_error()
            failure.__cause__ = e  # the client's traceback, for debugging in process
            return _Call(center, error=failure)

    def submit_fit(self, center: str, plan: RoundPlan) -> _Call:
        return self._run(center, lambda client: client.fit(plan))

    def submit_evaluate(self, center: str, split: str, personalized: bool,
                        dataset_center: str | None = None,
                        global_state: dict[str, Tensor] | None = None,
                        max_studies: int | None = None) -> _Call:
        limit = {} if max_studies is None else {"max_studies": max_studies}
        return self._run(center, lambda client: client.evaluate(
            split, personalized, dataset_center=dataset_center, global_state=global_state,
            **limit))

    def submit_secagg(self, center: str, stage: str, round_id: int, message: Any) -> _Call:
        return self._run(center, lambda client: client.secure_aggregation(stage, round_id,
                                                                          message))

    def wait(self, handles: Sequence[_Call], num_returns: int, timeout_s: float | None,
             ) -> tuple[list[_Call], list[_Call]]:
        return list(handles), []

    def result(self, handle: _Call) -> ClientUpdate | EvalReply:
        if handle.error is not None:
            raise handle.error
        return handle.reply

    def rejoined(self) -> list[str]:
        return []  # clients in this process are never restarted


# --------------------------------------------------------------------------- results


@dataclass
class Evaluation:
    """One evaluation view after a round: metrics per dataset center and their mean."""

    round_id: int
    view: str  # "generalization" | "personalization"
    per_center: dict[str, dict[str, float]]
    mean: dict[str, float]  # unweighted over the evaluated (not held-out) centers
    replies: list[EvalReply] = field(default_factory=list)
    split: str = "test"
    wall_s: float = 0.0  # the whole evaluation, both views (each view holds the same)
    # dataset center -> why its reply was rejected (`validate_eval_reply`): not in per_center
    rejected: dict[str, str] = field(default_factory=dict)


@dataclass
class FederatedResult:
    """What `Coordinator.run` returns."""

    history: list[RoundSummary]
    global_state: dict[str, Tensor] | None
    generalization: Evaluation | None
    personalization: Evaluation | None
    evaluations: list[Evaluation] = field(default_factory=list)  # every one, in order
    privacy: dict[str, Any] = field(default_factory=dict)  # ServerPrivacy.report(); {}: off

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


class RoundFailedError(FederationError):
    """Every attempt of a round had fewer than `min_clients` usable updates. `attempts` holds
    each attempt's {center: reason}; the coordinator is still at round `round_id - 1`."""

    def __init__(self, message: str, round_id: int, attempts: list[dict[str, str]]):
        super().__init__(message)
        self.round_id = round_id
        self.attempts = attempts

    def __reduce__(self):  # picklable across Ray (the coordinator may run in an actor)
        return (type(self), (str(self), self.round_id, self.attempts))


REJECTION_KINDS = ("failed", "deadline", "invalid", "norm")  # metrics "rejected_<kind>"


class ValidationPointSkipped(FederationError):
    """A validation point lost a center (`FailurePolicy`: drop at a validation point): the
    point is skipped, the run goes on."""


@dataclass
class Collected:
    """What `collect_replies` gathered from one attempt's calls."""

    replies: dict[str, Any] = field(default_factory=dict)  # center -> reply as received
    # center -> (kind, reason); a data error's reason is the client's own message
    failed: dict[str, tuple[FailureKind, str]] = field(default_factory=dict)
    duplicates: int = 0  # second deliveries for a call already answered: dropped
    late_dropped: int = 0  # replies of earlier abandoned calls that arrived meanwhile: dropped


@dataclass
class RoundAttempt:
    """One attempt at a round (module docstring): what came back and what became of it."""

    number: int
    centers: list[str]
    accepted: list[ClientUpdate] = field(default_factory=list)  # from the wire, clipped
    rejected: dict[str, str] = field(default_factory=dict)  # center -> reason
    rejected_kind: dict[str, str] = field(default_factory=dict)  # center -> REJECTION_KINDS
    clipped: dict[str, float] = field(default_factory=dict)  # center -> norm before clipping
    norms: dict[str, float] = field(default_factory=dict)  # center -> update norm
    bytes_up: int = 0
    dense_up: int = 0
    bytes_down: int = 0
    duplicates: int = 0
    late_dropped: int = 0
    # the centers whose updates `accepted` stands for, when it is their aggregate (secure
    # aggregation: one update of their sum); None: the centers of `accepted`
    participants: list[str] | None = None
    # the replies whose scalar metrics the round reports, when `accepted` is their aggregate
    reports: list[ClientUpdate] | None = None

    @property
    def usable(self) -> list[str]:
        return (list(self.participants) if self.participants is not None
                else [u.center for u in self.accepted])

    def reject(self, center: str, kind: FailureKind, reason: str) -> None:
        self.rejected[center], self.rejected_kind[center] = reason, rejection_kind(kind)


# --------------------------------------------------------------------------- the coordinator


class Coordinator:
    """Runs the rounds of one experiment (module docstring)."""

    def __init__(self, cfg: ExperimentConfig, strategy: Strategy, pool: ClientPool,
                 initial_state: Mapping[str, Tensor], rng: np.random.Generator, *,
                 on_round: Callable[[RoundSummary], None] | None = None,
                 on_evaluation: Callable[..., None] | None = None,
                 eval_centers: Sequence[str] | None = None,
                 heldout_centers: Sequence[str] = (), eval_split: str = "test",
                 val_every: int = 0, val_studies: int | None = None,
                 on_event: Callable[[dict], None] | None = None):
        self.cfg, self.strategy, self.pool, self.rng = cfg, strategy, pool, rng
        self.on_round = on_round or (lambda summary: None)
        self.on_evaluation = on_evaluation or (lambda view, per_center, mean, step=None,
                                               split=None: None)
        self.eval_centers = list(eval_centers) if eval_centers is not None else None
        self.heldout_centers = list(heldout_centers)
        self.eval_split = eval_split
        self.val_every, self.val_studies = val_every, val_studies  # module docstring
        # progress of an evaluation, for a console: {"type": "evaluating", split, round,
        # total} when it starts, {"type": "evaluated", split, done, total, view, center} as
        # each of its evaluations comes back
        self.on_event = on_event or (lambda event: None)
        self.strategy.initialize(dict(initial_state))
        self.round_id = 0  # the last finished round
        self.history: list[RoundSummary] = []
        self.evaluations: list[Evaluation] = []
        # calls given up on at a deadline, still running (handle -> center): their replies
        # are dropped when they arrive (`drop_late_replies`)
        self.abandoned: dict[Any, str] = {}
        self.late_replies_dropped = 0  # over the run, this process (not checkpointed)
        # the downlink (`fl.broadcast`): clients at the previous version get the round's
        # low-rank delta, the others the full synced state; None: the full global state
        state, rank = self.strategy.global_state(), cfg.federation.download_rank
        self.broadcast = (StateBroadcast(state, rank, cfg.federation.wire_dtype,
                                         cfg.federation.whole_tensors)
                          if state is not None and rank > 0 else None)
        self.client_versions: dict[str, int] = {}  # center -> synced version it holds
        # client-level DP and secure aggregation (`fedmrg.privacy`, docs/privacy.md)
        self.privacy = ServerPrivacy.for_run(strategy.cfg, strategy)

    @property
    def failure_policy(self) -> FailurePolicy:
        """What a failed call means for a round or an evaluation (`fl.failure`)."""
        return FailurePolicy(retries=self.cfg.federation.round_retries)

    # ----------------------------------------------------------------- the run

    def run(self) -> FederatedResult:
        """Rounds from the one after `round_id` to `federation.rounds`, evaluations included."""
        while self.round_id < self.cfg.federation.rounds:
            stop = self.privacy and self.privacy.budget_problem(len(self.pool.centers()),
                                                                self.round_id)
            if stop:  # before the round that would exceed it: evaluated and saved as usual
                log.warning("%s", stop)
                break
            self.step()
        generalization, personalization = self.evaluate(self.round_id)
        return FederatedResult(self.history, self.strategy.global_state(), generalization,
                               personalization, list(self.evaluations),
                               privacy=self.privacy.report() if self.privacy else {})

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
        if self.val_every and round_id % self.val_every == 0:
            try:
                self.evaluate(round_id, split="val", max_studies=self.val_studies)
            except ValidationPointSkipped as e:
                # a monitoring point, never the reason a run stops: the round stands
                log.warning("round %d: validation point skipped: %s", round_id, e)
        return summary

    def run_round(self, round_id: int) -> RoundSummary:
        """One round (module docstring), without touching the history. Raises
        `RoundFailedError` with the coordinator's state as it was when every attempt failed."""
        started = time.perf_counter()
        fed = self.cfg.federation
        rng_state = self.rng.bit_generator.state  # a failed round gives back its draws
        attempts: list[RoundAttempt] = []
        try:
            while True:
                attempts.append(self._attempt(round_id, len(attempts) + 1))
                if len(attempts[-1].usable) >= fed.min_clients:
                    break
                if not self.failure_policy.retry_round(len(attempts)):
                    self.on_round_failure(round_id, attempts)
        except (FederationError, ClientDataError):
            self.rng.bit_generator.state = rng_state
            raise
        final = attempts[-1]
        rejoined = sorted(set(self.pool.rejoined()) if hasattr(self.pool, "rejoined") else ())

        aggregation_started = time.perf_counter()
        accepted = final.accepted
        if self.privacy is not None:  # central DP: one update of the noised mean
            accepted = self.privacy.aggregate_input(round_id, accepted, len(final.centers),
                                                    self.strategy.global_state())
        metrics = self.strategy.aggregate_round(round_id, accepted)
        if self.broadcast is not None:  # the next round's delta, computed once for everyone
            self.broadcast.advance(self.strategy.global_state())
        aggregation_time = time.perf_counter() - aggregation_started
        metrics.update(client_metrics(final.accepted if final.reports is None
                                      else final.reports))
        metrics.update(round_fault_metrics(attempts, rejoined))
        if self.privacy is not None:
            metrics.update(clients=float(len(final.usable)),
                           **self.privacy.account(len(attempts), len(self.pool.centers())))
        return RoundSummary(round_id=round_id, participants=final.usable,
                            rejected=dict(sorted(final.rejected.items())),
                            bytes_up=sum(a.bytes_up for a in attempts),
                            bytes_down=sum(a.bytes_down for a in attempts),
                            dense_equivalent_up=sum(a.dense_up for a in attempts),
                            aggregation_time_s=aggregation_time,
                            round_time_s=time.perf_counter() - started, metrics=metrics,
                            clipped=dict(sorted(final.clipped.items())), rejoined=rejoined,
                            attempts=len(attempts),
                            failed_attempts=[dict(sorted(a.rejected.items()))
                                             for a in attempts[:-1]])

    def _attempt(self, round_id: int, number: int) -> RoundAttempt:
        """Sample, send, collect and check one attempt of a round (steps 1-4)."""
        fed = self.cfg.federation
        if self.privacy is not None and self.privacy.secure:
            return self.privacy.secure_attempt(self, round_id, number)
        centers = self.strategy.configure_round(round_id, self.pool.centers(), self.rng)
        plans = self._wire_plans({c: self._downlink(c, self.strategy.plan(round_id, c))
                                  for c in centers})
        attempt = RoundAttempt(number, list(centers),
                               bytes_down=sum(message_bytes(p).bytes for p in plans.values()))
        handles = {self.pool.submit_fit(c, plans[c]): c for c in centers}
        collected = self.collect_replies(handles, fed.min_clients, fed.round_deadline_s)
        self.note_fits(round_id, plans, collected, attempt)
        max_norm, norm_action = (self.privacy.norm_bound() if self.privacy is not None
                                 else (fed.max_update_norm, fed.update_norm_action))

        spec = self.strategy.update_spec()
        reference = self.strategy.global_state()
        dtype, quantization = wire_dtype(fed.wire_dtype), wire_quantization(fed.wire_dtype)
        for center, reply in sorted(collected.replies.items()):
            size = message_bytes(reply)
            attempt.bytes_up += size.bytes
            attempt.dense_up += size.dense_equivalent_bytes
            reason = validate_update(reply, center=center, round_id=round_id, spec=spec,
                                     dtype=dtype, quantization=quantization)
            if reason is not None:
                self.reject_fits(round_id, {center: (FailureKind.INVALID, reason)}, attempt)
                continue
            check = bound_update_norm(from_wire(reply), reference, max_norm, norm_action)
            attempt.norms[center] = check.norm
            if check.update is None:
                self.reject_fits(round_id, {center: (FailureKind.NORM, check.reason or
                                                     "update norm out of bounds")}, attempt)
                continue
            if check.clipped:
                attempt.clipped[center] = check.norm
            attempt.accepted.append(check.update)
        return attempt

    def note_fits(self, round_id: int, plans: Mapping[str, RoundPlan], collected: Collected,
                  attempt: RoundAttempt) -> None:
        """Record an attempt's fit calls: bad data stops the run (one error naming every
        client), failures are rejected, and each client's synced version is what it was sent
        when it answered, unknown when it did not."""
        self.reject_fits(round_id, collected.failed, attempt)
        attempt.duplicates += collected.duplicates
        attempt.late_dropped += collected.late_dropped
        for center in collected.failed:
            self.client_versions.pop(center, None)  # it may not hold what it was sent
        for center in collected.replies:
            version = _plan_version(plans[center])
            if version is None:
                self.client_versions.pop(center, None)
            else:
                self.client_versions[center] = version

    def reject_fits(self, round_id: int, failed: Mapping[str, tuple[FailureKind, str]],
                    attempt: RoundAttempt, context: str = "") -> None:
        """The failure policy on an attempt's failed fit calls (all of them at once, so one
        error names every client whose data is bad): each is rejected from the attempt, or
        the run stops."""
        stop = {}
        for center, (kind, reason) in failed.items():
            if self.failure_policy.decide(Phase.FIT, kind) is FailureAction.RAISE:
                stop[center] = reason
            else:
                attempt.reject(center, kind, context + reason)
        if stop:  # only bad data stops a round (`fl.failure`)
            raise ClientDataError(stop, f"round {round_id}")

    def _downlink(self, center: str, plan: RoundPlan) -> RoundPlan:
        """The plan with what `center` needs of the global state: the round's delta when it
        holds the previous version, else the full synced state (`fl.broadcast`)."""
        if self.broadcast is None or plan.global_state is None:
            return plan
        delta = self.broadcast.message_for(self.client_versions.get(center))
        if delta is not None:
            return dataclasses.replace(plan, global_state=None, global_delta=delta)
        return dataclasses.replace(plan, global_state=self.broadcast.full_state(),
                                   state_version=self.broadcast.version)

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
                        ) -> Collected:
        """The replies and failures of an attempt's calls (module docstring, step 3).
        `min_clients` is not a reason to wait longer: the deadline bounds every wait."""
        deadline = time.monotonic() + deadline_s if deadline_s > 0 else None
        pending = list(handles)
        out = Collected()
        answered: set[Any] = set()
        while pending:
            timeout = None
            if deadline is not None:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    break
            ready, pending = self.pool.wait(pending, 1, timeout)
            for handle in ready:
                center = handles.get(handle)
                if (center is None or handle in answered or center in out.replies
                        or center in out.failed):
                    out.duplicates += 1  # delivered twice (or never asked for): used once
                    continue
                answered.add(handle)
                try:
                    out.replies[center] = self.pool.result(handle)
                except ClientFailure as e:
                    out.failed[center] = (e.kind, f"failed: {e.message}")
                except ClientDataError as e:
                    out.failed[center] = (FailureKind.DATA, e.errors.get(center, str(e)))
        earlier = dict(self.abandoned)
        for handle in pending:
            out.failed[handles[handle]] = (FailureKind.DEADLINE,
                                           f"no reply within the {deadline_s:g} s deadline")
            self.abandoned[handle] = handles[handle]
        if earlier:
            out.late_dropped = self.drop_late_replies(
                earlier, answered_centers={handles[h] for h in answered})
        return out

    def drop_late_replies(self, calls: Mapping[Any, str] | None = None,
                          answered_centers: set[str] | frozenset[str] = frozenset(),
                          grace_s: float = LATE_REPLY_GRACE_S) -> int:
        """Forget the abandoned calls (of `calls`, default all) that have finished, reply or
        failure, without reading them; returns how many. An actor runs one call at a time, so
        the abandoned call of a client in `answered_centers` (it answered a later call) has
        finished: its reply is waited for up to `grace_s` so it is counted now."""
        calls = dict(self.abandoned if calls is None else calls)
        if not calls:
            return 0
        ready, pending = self.pool.wait(list(calls), len(calls), 0)
        due = [h for h in pending if calls[h] in answered_centers]
        if due:
            more, _ = self.pool.wait(due, len(due), grace_s)
            ready = [*ready, *more]
        for handle in ready:
            self.abandoned.pop(handle, None)
        self.late_replies_dropped += len(ready)
        return len(ready)

    def on_round_failure(self, round_id: int, attempts: Sequence[RoundAttempt]) -> None:
        """Every attempt had too few usable updates: stop the run with `RoundFailedError`
        naming each attempt's centers and reasons (the coordinator's state is untouched)."""
        fed = self.cfg.federation
        lines = []
        for a in attempts:
            reasons = "; ".join(f"{c}: {r}" for c, r in sorted(a.rejected.items())) or "none"
            ok = ", ".join(u.center for u in a.accepted) or "none"
            lines.append(f"attempt {a.number} (sampled {', '.join(a.centers)}; usable: {ok}; "
                         f"rejected: {reasons})")
        raise RoundFailedError(
            f"round {round_id}: fewer than federation.min_clients={fed.min_clients} usable "
            f"updates in each of {len(attempts)} attempt(s) (federation.round_retries="
            f"{fed.round_retries}); the run stops after round {round_id - 1}. "
            + " | ".join(lines), round_id, [dict(a.rejected) for a in attempts])

    # ----------------------------------------------------------------- evaluation

    def evaluate(self, round_id: int, split: str | None = None, max_studies: int | None = None
                 ) -> tuple[Evaluation, Evaluation]:
        """Generalization and personalization after `round_id` (module docstring) on `split`
        (default `eval_split`); a split other than it (validation) leaves the held-out centers
        out, and `max_studies` limits each dataset to its first studies."""
        split = split or self.eval_split
        started = time.perf_counter()
        clients = self.pool.centers()
        datasets = self.eval_centers if self.eval_centers is not None else clients
        heldout = self.heldout_centers if split == self.eval_split else []
        state = self.strategy.global_state()

        jobs: list[tuple[str, str, str, bool]] = []  # (view, dataset, client, personalized)
        for dataset in [*datasets, *heldout]:
            if state is None and dataset not in datasets:  # local: every model on held-out
                jobs += [(View.GENERALIZATION, dataset, c, False) for c in clients]
            else:
                owner = evaluating_client(dataset, clients)
                jobs.append((View.GENERALIZATION, dataset, owner, False))
        jobs += [(View.PERSONALIZATION, d, evaluating_client(d, clients), True) for d in datasets]

        def submit(job: tuple[str, str, str, bool]) -> Any:
            _, dataset, client, personalized = job
            limit = {} if max_studies is None else {"max_studies": max_studies}
            return self.pool.submit_evaluate(client, split, personalized, dataset_center=dataset,
                                             global_state=state, **limit)

        # An evaluation changes no state, so a crashed one (e.g. its actor killed and being
        # restarted by Ray) may simply be asked again: the failure policy says how often.
        phase = Phase.EVALUATE if split == self.eval_split else Phase.VALIDATE
        deadline_s = self.cfg.federation.eval_deadline_s
        deadline = time.monotonic() + deadline_s if deadline_s > 0 else None
        self.on_event({"type": "evaluating", "split": split, "round": round_id,
                       "total": len(jobs)})
        tries = dict.fromkeys(jobs, 1)
        handles = {submit(job): job for job in jobs}
        replies: dict[tuple, EvalReply] = {}
        rejected: dict[tuple, str] = {}  # job -> why its reply failed validate_eval_reply
        # given up on: job -> (kind, reason, what the policy does about it)
        failed: dict[tuple, tuple[FailureKind, str, FailureAction]] = {}
        pending = list(handles)
        while pending:
            timeout = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                break
            ready, pending = self.pool.wait(pending, 1, timeout)
            for handle in ready:
                job = handles.pop(handle)
                view, dataset, client, _ = job
                try:
                    reply = self.pool.result(handle)
                except ClientDataError as e:
                    kind, reason = FailureKind.DATA, e.errors.get(client, str(e))
                except ClientFailure as e:
                    kind, reason = e.kind, e.message
                else:
                    invalid = validate_eval_reply(reply, center=dataset, view=view,
                                                  run=self.cfg.eval)
                    if invalid is None:
                        replies[job] = reply
                        self.on_event({"type": "evaluated", "split": split,
                                       "done": len(replies) + len(rejected),
                                       "total": len(jobs), "view": view, "center": dataset})
                        continue
                    kind, reason = FailureKind.INVALID, invalid
                action = self.failure_policy.decide(phase, kind, tries[job])
                if action is FailureAction.RETRY:
                    log.warning("round %d: %s evaluation of %r on client %r failed (%s); "
                                "asking again (try %d)", round_id, view, dataset, client,
                                reason, tries[job] + 1)
                    tries[job] += 1
                    retry = submit(job)
                    handles[retry] = job
                    pending.append(retry)
                elif kind is FailureKind.INVALID:  # left out, recorded in the Evaluation
                    # not used, not logged: the reason names the field, not its content
                    rejected[job] = reason
                    log.warning("round %d: %s evaluation of %r from client %r rejected: %s",
                                round_id, view, dataset, client, reason)
                    self.on_event({"type": "evaluated", "split": split,
                                   "done": len(replies) + len(rejected),
                                   "total": len(jobs), "view": view, "center": dataset})
                else:
                    failed[job] = (kind, reason, action)
        for handle in pending:  # the deadline passed: their replies will be dropped
            failed[handles[handle]] = (FailureKind.DEADLINE, f"no reply within federation."
                                       f"eval_deadline_s={deadline_s:g} s",
                                       self.failure_policy.decide(phase, FailureKind.DEADLINE))
            self.abandoned[handle] = handles[handle][2]
        if failed:
            self.on_evaluation_failure(round_id, split, failed)
        wall = time.perf_counter() - started
        out = []
        for view in View:
            per_center: dict[str, dict[str, float]] = {}
            ordered = [(job, replies[job]) for job in jobs  # job order
                       if job[0] == view and job in replies]
            for dataset in dict.fromkeys(job[1] for job, _ in ordered):
                parts = [r.metrics for job, r in ordered if job[1] == dataset]
                per_center[dataset] = parts[0] if len(parts) == 1 else mean_over_centers(parts)
            mean = mean_over_centers(per_center[d] for d in datasets if d in per_center)
            evaluation = Evaluation(round_id, view, per_center, mean, [r for _, r in ordered],
                                    split=split, wall_s=wall,
                                    rejected={job[1]: why for job, why in rejected.items()
                                              if job[0] == view})
            self.evaluations.append(evaluation)
            if split == self.eval_split:
                self.on_evaluation(view, per_center, mean, step=round_id)
            else:
                self.on_evaluation(view, per_center, mean, step=round_id, split=split)
            out.append(evaluation)
        return out[0], out[1]

    def on_evaluation_failure(self, round_id: int, split: str,
                              failed: Mapping[tuple, tuple[FailureKind, str, FailureAction]]
                              ) -> None:
        """Evaluation calls given up on (after their retries), once every other reply is in:
        one error names them all. Dropped (a validation point): `ValidationPointSkipped`;
        only bad data: `ClientDataError` (the CLI's data error); else `FederationError`."""
        what = f"round {round_id} {split} evaluation"
        if any(action is FailureAction.DROP for _, _, action in failed.values()):
            parts = [f"{view} of {dataset!r} on client {client!r}: {reason}"
                     for (view, dataset, client, _), (_, reason, _) in failed.items()]
            raise ValidationPointSkipped(f"{what}: " + " | ".join(parts))
        if all(kind is FailureKind.DATA for kind, _, _ in failed.values()):
            raise ClientDataError({job[2]: reason for job, (_, reason, _) in failed.items()},
                                  what)
        parts = [f"{view} evaluation of {dataset!r} on client {client!r} failed "
                 f"({kind}): {reason}"
                 for (view, dataset, client, _), (kind, reason, _) in failed.items()]
        raise FederationError(f"{what}: " + " | ".join(parts) + "; the last round's "
                              "checkpoint is kept: --resume evaluates again")

    # ----------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything to continue the run after `round_id` (issue 5 writes it to disk)."""
        return {"round_id": self.round_id, "strategy": self.strategy.state_dict(),
                "rng": self.rng.bit_generator.state,
                "history": [s.to_dict() for s in self.history],
                "broadcast": None if self.broadcast is None else self.broadcast.state_dict(),
                "privacy": None if self.privacy is None else self.privacy.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.round_id = int(state["round_id"])
        self.strategy.load_state_dict(state["strategy"])
        self.rng.bit_generator.state = state["rng"]
        self.history = [RoundSummary(**row) for row in state["history"]]
        if self.broadcast is not None and state.get("broadcast") is not None:
            self.broadcast.load_state_dict(state["broadcast"])
        self.client_versions = {}  # clients are rebuilt on resume: each gets the full state
        if self.privacy is not None and state.get("privacy") is not None:
            self.privacy.load_state_dict(state["privacy"])  # the epsilon spent so far


def evaluating_client(dataset: str, clients: Sequence[str]) -> str:
    """The client that evaluates `dataset` (both views): its own client, else (a held-out
    center) the first client. The generic model is the global state with that client's
    private tensors (e.g. its encoder's normalization), so `evaluate_run` uses the same rule."""
    return dataset if dataset in clients else sorted(clients)[0]


def _plan_version(plan: RoundPlan) -> int | None:
    """The synced version a client holds once it has applied `plan` (None: not a synced one)."""
    if plan.global_delta is not None:
        return plan.global_delta.version
    return plan.state_version


def client_metrics(updates: Sequence[ClientUpdate]) -> dict[str, float]:
    """The clients' own metrics: "<center>/<metric>" each, and over clients the mean, or the
    sum for counts of skipped rows ("skipped_*": rows the round's clients left out) and of
    truncated reports ("truncated_*": train reports longer than data.max_report_tokens)."""
    out: dict[str, float] = {}
    for u in updates:
        out.update({f"{u.center}/{k}": float(v) for k, v in u.metrics.items()})
    keys = dict.fromkeys(k for u in updates for k in u.metrics)
    for k in keys:
        values = [float(u.metrics[k]) for u in updates if k in u.metrics]
        summed = k.startswith((f"{SKIPPED}_", "truncated_"))
        out[k] = float(np.sum(values) if summed else np.mean(values))
    return out


def round_fault_metrics(attempts: Sequence[RoundAttempt], rejoined: Sequence[str],
                        ) -> dict[str, float]:
    """The round's fault counts (module docstring, step 7), always present (0 when none):
    rejections by kind, late and duplicate replies over every attempt; clipping, update norms
    of the last attempt (the one aggregated); attempts; rejoined clients."""
    final = attempts[-1]
    out = {f"rejected_{kind}": float(sum(list(a.rejected_kind.values()).count(kind)
                                         for a in attempts))
           for kind in REJECTION_KINDS}
    out.update(clipped=float(len(final.clipped)),
               late_replies_dropped=float(sum(a.late_dropped for a in attempts)),
               duplicate_replies_dropped=float(sum(a.duplicates for a in attempts)),
               round_attempts=float(len(attempts)), rejoined=float(len(rejoined)))
    if final.norms:
        out["update_norm_max"] = max(final.norms.values())
    out.update({f"{c}/update_norm": n for c, n in sorted(final.norms.items())})
    return out
