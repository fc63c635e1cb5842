"""The ONE place that makes Ray actors, and the Ray transport of the federation.

    driver ── CoordinatorHost actor (num_cpus=0, on the driver's node, threaded)
                 └── runs a plain `Coordinator` over a RayClientPool
    ClientHost actors ── each holds one plain `FederatedClient` (default), or several
                 (`resources.clients_per_actor`: many simulated centers on one machine,
                 trained in turn); model, Ray Data stream, optimizer resident across rounds

- `client_actor_options(resources, center)` (fedmrg/fl/placement.py, with the check that a
  run fits the cluster): num_cpus / num_gpus (fractional allowed) from `ResourcesConfig`, the
  custom resource `center_<id>: 1` when `pin_centers` (only a node that holds that center's
  data offers it, see cluster.yaml), `max_restarts`, and no task retries: a crashed client's
  call fails this round (`ClientFailure`), the restarted actor rejoins the next one, rather
  than replaying a round on a freshly rebuilt model.
- `ProgressWatchdog`: every wait for client actors or replies (`start_client_actors`, the
  pool's `wait` and `call_all`) that sees nothing arrive for `resources.progress_timeout_s`
  reports it through a callable, by default `fedmrg.ray_cluster.fail_without_progress`: the
  run fails naming Ray's pending resource demands instead of hanging (e.g. stream tasks that
  cannot be scheduled beside the client actors).
- `RayClientPool` implements the coordinator's `ClientPool` protocol with actor method calls:
  every call names its client (an actor may host several); a round's full global state (for
  the clients that get it rather than a delta, see `fl.broadcast`) is `ray.put` ONCE and each
  of them gets the same ObjectRef as a top-level argument (Ray resolves it in the actor,
  zero-copy from the node's object store);
  `ray.wait` collects replies. A client's own exception comes back as a `ClientFault` reply
  (`fl.failure`: its kind, `data` for a `DatasetError`, else `crash`, decided in the actor
  where the exception's type is known, never parsed from Ray's traceback text), raised by
  the pool as `ClientDataError` or `ClientFailure`; a call whose actor died is a
  `ClientFailure` of kind `lost`. What the coordinator does with each is its failure
  policy's (bad data stops the run; so does `start_client_actors` for a client whose data
  fails while it is built).
  A client whose actor was lost: Ray restarts it (the new actor rebuilds its model and
  stream in `ClientHost.__init__`, its private state from its own checkpoint); the pool sends
  that client's next calls through a small task that waits for the restart (Ray itself
  fails calls made during a restart when tasks have no retries), and reports it in
  `rejoined()`. A restarted client holds no synced state: a delta sent to it fails that call
  ("needs the full state"), the coordinator then forgets its version as after any failed
  call, and its next plan carries the full synced state.
- `CoordinatorHost` runs any driver function (the experiment's run loop) inside an actor and
  buffers its progress events, which the driver polls while the run goes on (max_concurrency
  2: `poll` runs beside `run`). Placed on the driver's node, so a local MLflow store and the
  run's local paths mean the same there as in the driver.

No federated logic lives here: sampling, aggregation and evaluation order are the
coordinator's and the strategy's (fedmrg/fl/coordinator.py, fedmrg/fl/strategies/).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
import torch
from ray.exceptions import (
    ActorUnavailableError,
    RayActorError,
    RayError,
    RayTaskError,
)
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from fedmrg.choices import Device
from fedmrg.config import ExperimentConfig, ResourcesConfig
from fedmrg.fl.failure import ClientFailure, ClientFault, FailureKind
from fedmrg.fl.messages import ClientUpdate, EvalReply, RoundPlan
from fedmrg.fl.placement import (  # noqa: F401 - part of this module's API
    COORDINATOR_NUM_CPUS,
    actor_groups,
    actor_plan,
    center_resource,
    client_actor_options,
)

if TYPE_CHECKING:
    from ray.actor import ActorHandle

    from fedmrg.fl.client import FederatedClient

log = logging.getLogger(__name__)

Tensors = dict[str, torch.Tensor]
# How long a call to a lost client waits for Ray to restart its actor (a restart rebuilds the
# model: seconds for the tiny CPU model, minutes for a large LM loading onto a GPU).
RESTART_WAIT_S = 600.0


# --------------------------------------------------------------------------- placement


def client_device(requested: str, assigned_gpus: Sequence[str]) -> str:
    """The device a client uses. Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone for an actor that
    holds no GPU, so `auto` would find (and share, unaccounted) every GPU of the node: a client
    Ray gave no GPU runs on the CPU. An explicit `cuda` or `cpu` is kept."""
    if requested == Device.AUTO and not assigned_gpus:
        return Device.CPU
    return requested


def coordinator_actor_options(node_id: str | None = None) -> dict[str, Any]:
    """The coordinator mostly waits: no CPU reserved; on `node_id` (default: this node)."""
    node_id = node_id or ray.get_runtime_context().get_node_id()
    return {
        "num_cpus": COORDINATOR_NUM_CPUS,
        # `poll` and `end_tracking` answer while `run` is busy (an interrupted poll may still
        # be queued when the driver asks the actor to end its MLflow runs)
        "max_concurrency": 3,
        "max_restarts": 0,  # a lost coordinator is resumed by resubmitting the job
        "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
    }


# --------------------------------------------------------------------------- the client actor


def _read_folder(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def write_folder(files: Mapping[str, bytes], directory: str | Path) -> Path:
    """Write `{relative path: bytes}` (from `ClientHost.export_generic_adapter`) to a folder."""
    directory = Path(directory)
    for name, data in files.items():
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ValueError(f"{name!r}: not a relative path inside the folder")
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return directory


def _faults_as_replies(method: Callable) -> Callable:
    """A client's own exception comes back as a `ClientFault` reply (its kind decided here,
    from the exception's type) instead of a Ray error for the coordinator to parse; a client
    that could not be built answers every call with its start fault."""

    @functools.wraps(method)
    def call(self: ClientHost, center: str, *args: Any, **kwargs: Any) -> Any:
        if center in self.start_faults:
            return self.start_faults[center]
        try:
            return method(self, center, *args, **kwargs)
        except Exception as e:  # the coordinator's failure policy judges it
            log.warning("client %r: %s failed: %s: %s", center, method.__name__,
                        type(e).__name__, e, exc_info=True)
            return ClientFault.from_exception(center, e)

    return call


class ClientHost:
    """One or more `FederatedClient`s inside an actor (`resources.clients_per_actor`; one per
    actor by default). Every method names the client it is for; an actor hosting several
    trains them in turn (Ray runs one call of an actor at a time), so K simulated centers
    share one process's libraries instead of paying them K times. Forwards fit/evaluate, and a
    few end-of-run exports that need the model (adapters in PEFT format). Built once;
    resident across rounds."""

    def __init__(self, cfg: ExperimentConfig, clients: Mapping[str, list[str] | None], *,
                 dataset_root: str, seed: int = 0,
                 generation: Mapping[str, Any] | None = None):
        from fedmrg.fl.client import FederatedClient  # the model stack loads in the actor only

        gpus = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
        cfg = dataclasses.replace(cfg, device=client_device(cfg.device, gpus))
        self.clients: dict[str, FederatedClient] = {}
        # a client that could not be built: `ready` and every call answer with this fault
        # (the actor stays up, so the driver learns the cause as data, not traceback text)
        self.start_faults: dict[str, ClientFault] = {}
        for client_id, pooled in clients.items():
            try:
                self.clients[client_id] = FederatedClient(
                    cfg, client_id, dataset_root=dataset_root, centers_for_data=pooled,
                    seed=seed, generation=generation)
            except Exception as e:
                log.warning("client %r could not start", client_id, exc_info=True)
                self.start_faults[client_id] = ClientFault.from_exception(client_id, e)

    def _client(self, center: str) -> FederatedClient:
        if center not in self.clients:
            raise KeyError(f"client {center!r} is not hosted here; this actor hosts "
                           f"{sorted(self.clients)}")
        return self.clients[center]

    def ready(self, center: str) -> dict[str, Any]:
        """Where this client runs and what Ray gave it (placement checks, logs), its process
        id, the clients its actor hosts, whether Ray restarted this actor after a crash
        (`restarted`), and how its train reports fit data.max_report_tokens (`truncation`)."""
        ctx = ray.get_runtime_context()
        fault = self.start_faults.get(center)
        return {"center": center, "node_id": ctx.get_node_id(),
                "assigned": ctx.get_assigned_resources(),
                "device": None if fault else str(self._client(center).model.device),
                "pid": os.getpid(), "hosts": sorted([*self.clients, *self.start_faults]),
                "restarted": bool(ctx.was_current_actor_reconstructed), "fault": fault,
                "truncation": {} if fault else dict(self._client(center).truncation)}

    def close(self) -> None:
        """End every client's train stream's suspended pass before the actor is killed."""
        for client in self.clients.values():
            client.close()

    def shared_state(self, center: str) -> Tensors:
        """The shared tensors of the freshly built model: the run's initial global state
        (identical on every client: same seed, same weights)."""
        from fedmrg.model.params import get_shared_state

        return get_shared_state(self._client(center).model)

    def parameter_summary(self, center: str) -> dict[str, dict[str, int]]:
        """{group: {tensors, elements, bytes}} of the model (shared, private, frozen)."""
        from fedmrg.model.params import parameter_group_summary

        return parameter_group_summary(self._client(center).model)

    @_faults_as_replies
    def fit(self, center: str, plan: RoundPlan, global_state: Tensors | None) -> ClientUpdate:
        from fedmrg.data.stream import skip_metrics

        client = self._client(center)
        # `global_state` arrives as a top-level argument: Ray resolved the round's ObjectRef.
        update = client.fit(dataclasses.replace(plan, global_state=global_state))
        # rows data.on_error=skip left out of the train split, by reason (counted, not lost)
        update.metrics.update(skip_metrics(client.train_stream.skipped))
        return update

    @_faults_as_replies
    def secure_aggregation(self, center: str, stage: str, round_id: int, message: Any) -> Any:
        return self._client(center).secure_aggregation(stage, round_id, message)

    @_faults_as_replies
    def evaluate(self, center: str, split: str, personalized: bool,
                 dataset_center: str | None, global_state: Tensors | None,
                 max_studies: int | None = None) -> EvalReply:
        from fedmrg.data.stream import skip_metrics

        client = self._client(center)
        reply = client.evaluate(split, personalized, dataset_center=dataset_center,
                                global_state=global_state, max_studies=max_studies)
        stream = client.eval_stream(dataset_center or center, split)
        reply.metrics.update(skip_metrics(stream.skipped))
        return reply

    def export_generic_adapter(self, center: str, global_state: Tensors | None
                               ) -> dict[str, bytes]:
        """The generic adapter in PEFT format as `{file: bytes}`, with `global_state` loaded
        first (None: this client's own). Bytes, not a path: the caller may be on another
        node with no shared storage. (Aggregation `stack` merges its cumulative factors into
        the base weights; the adapter file then holds only the last round's factors.)"""
        from fedmrg.model.io import save_adapter
        from fedmrg.model.mrg import GENERIC

        client = self._client(center)
        if global_state is not None:
            client.load_global_state(global_state)
        with tempfile.TemporaryDirectory() as tmp:
            return _read_folder(save_adapter(client.model, GENERIC, tmp))

    def save_specialized_adapter(self, center: str, directory: str) -> str | None:
        """This center's private adapter in PEFT format, written where the client runs (the
        center's own storage); None when the model has none. Never sent to the coordinator."""
        from fedmrg.model.io import save_adapter
        from fedmrg.model.mrg import SPECIALIZED

        model = self._client(center).model
        if SPECIALIZED not in model.adapter_names:
            return None
        target = Path(directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            written = save_adapter(model, SPECIALIZED, tmp)  # <tmp>/specialized
            shutil.rmtree(target, ignore_errors=True)
            os.replace(written, target)
        return str(target)

    def save_model(self, center: str, directory: str, global_state: Tensors | None) -> str:
        """The whole model (global shared state + this center's private state and, with
        `eval.head_tuning_steps`, its own tuned head) as a `fedmrg.model.io` folder, for
        `fedmrg evaluate`, `fedmrg generate` and serving."""
        from fedmrg.model.io import save_model

        client = self._client(center)
        if global_state is not None:
            client.load_global_state(global_state)
        client.keep_own_head()
        return str(save_model(client.model, directory))


class ProgressWatchdog:
    """`ray.wait` that notices a stall: whenever `timeout_s` pass with none of the awaited
    refs finishing, it calls `on_stall(waiting_for, idle_s)`, which raises to fail the run or
    returns to wait on (another `timeout_s`). `timeout_s=0`: a plain `ray.wait`."""

    def __init__(self, timeout_s: float, on_stall: Callable[[str, float], None]):
        self.timeout_s = timeout_s
        self.on_stall = on_stall

    @classmethod
    def for_run(cls, resources: ResourcesConfig) -> ProgressWatchdog:
        """`resources.progress_timeout_s`, failing with Ray's pending demands (waiting on
        while an autoscaling cluster may still add the nodes)."""
        from fedmrg.ray_cluster import cluster_autoscales, fail_without_progress

        return cls(resources.progress_timeout_s,
                   functools.partial(fail_without_progress,
                                     timeout_s=resources.progress_timeout_s,
                                     autoscaling=cluster_autoscales(resources)))

    def wait(self, refs: Sequence[ray.ObjectRef], num_returns: int, timeout_s: float | None,
             waiting_for: str) -> tuple[list[ray.ObjectRef], list[ray.ObjectRef]]:
        """(ready, pending) like `ray.wait(refs, num_returns, timeout=timeout_s)`; ready in
        the order they finished."""
        if self.timeout_s <= 0 or (timeout_s is not None and timeout_s <= self.timeout_s):
            return ray.wait(list(refs), num_returns=num_returns, timeout=timeout_s)
        ready: list[ray.ObjectRef] = []
        pending = list(refs)
        end = None if timeout_s is None else time.monotonic() + timeout_s
        last = time.monotonic()  # when something last finished (or the wait began)
        while pending and len(ready) < num_returns:
            now = time.monotonic()
            if end is not None and now >= end:
                break
            stall_at = last + self.timeout_s
            until = stall_at if end is None else min(stall_at, end)
            got, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, until - now))
            if got:
                ready += got
                last = time.monotonic()
            elif time.monotonic() >= stall_at:
                self.on_stall(waiting_for, time.monotonic() - last)
                last = time.monotonic()
        return ready, pending


def start_client_actors(cfg: ExperimentConfig, clients: Mapping[str, list[str] | None], *,
                        dataset_root: str, seed: int,
                        generation: Mapping[str, Any] | None = None,
                        ) -> tuple[dict[str, ActorHandle], dict[str, dict]]:
    """`ClientHost` actors for the entries of `clients` (client id -> centers it pools, None:
    its own center), `resources.clients_per_actor` clients per actor (`actor_groups`).
    Returns (actors: client id -> its actor's handle, shared by the clients an actor hosts;
    placement: client id -> `ClientHost.ready()`) once every actor is built; a constructor
    error is raised here as `ClientFailure` naming the client (the other actors are
    stopped), and so is a start that sees no actor ready for `resources.progress_timeout_s`
    (`ProgressWatchdog`: e.g. `NoProgressError` naming the actors Ray cannot place)."""
    remote = ray.remote(ClientHost)
    actors: dict[str, ActorHandle] = {}
    for group, options in actor_plan(cfg.resources, clients):
        actor = remote.options(**options).remote(
            cfg, {c: clients[c] for c in group}, dataset_root=dataset_root, seed=seed,
            generation=generation)
        actors.update(dict.fromkeys(group, actor))
    calls = {client_id: actor.ready.remote(client_id) for client_id, actor in actors.items()}
    try:
        ProgressWatchdog.for_run(cfg.resources).wait(
            list(calls.values()), len(calls), None,
            waiting_for=f"client actors to start ({', '.join(calls)})")
    except BaseException:
        stop_actors(actors.values(), close=False)
        raise
    placement = {}
    for client_id, call in calls.items():
        try:
            placement[client_id] = ray.get(call)
        except RayError as e:  # the actor itself died (its constructor's errors are faults)
            stop_actors(actors.values(), close=False)
            raise ClientFailure(client_id, f"could not start: {_cause(e)}",
                                FailureKind.LOST) from None
        fault = placement[client_id].pop("fault", None)
        if fault is not None:
            stop_actors(actors.values(), close=False)
            raise fault.as_error("could not start: ")
    return actors, placement


def _cause(error: BaseException) -> str:
    """The user-facing cause of a Ray error (an actor that died, or an exception outside the
    client methods that answer with faults): the raised exception when there is one."""
    if isinstance(error, RayTaskError):
        cause = error.cause
        if cause is not None and not isinstance(cause, RayError):
            return f"{type(cause).__name__}: {cause}"
        if isinstance(cause, RayError) and cause is not error:  # raised in a task that called
            return _cause(cause)                                # the actor (_call_when_ready)
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"


# --------------------------------------------------------------------------- the pool


def _call_when_ready(actor: ActorHandle, center: str, method: str, args: list, wait_s: float,
                     ) -> tuple[dict[str, Any], Any]:
    """(actor.ready(center), actor.<method>(center, *args)) once the actor answers: runs as a
    Ray task for a
    client whose actor was lost. With `max_task_retries=0` Ray fails every call made while the
    actor restarts ("unavailable") instead of queuing it, so this polls `ready` (every 0.25 s,
    at most `wait_s`) and then makes the call. ObjectRefs in `args` arrive unresolved (nested
    in a list) and are passed on as top-level arguments, resolved in the actor."""
    give_up = time.monotonic() + wait_s
    while True:
        try:
            info = ray.get(actor.ready.remote(center))
            break
        except ActorUnavailableError:
            if time.monotonic() >= give_up:
                raise
            time.sleep(0.25)
    return info, ray.get(getattr(actor, method).remote(center, *args))


def _actor_lost(error: RayError) -> bool:
    """The call failed because its actor died or became unreachable (directly, or inside
    `_call_when_ready`)."""
    cause = error.cause if isinstance(error, RayTaskError) else None
    return isinstance(error, RayActorError) or isinstance(cause, RayActorError)


@dataclass(frozen=True)
class Call:
    """A pending client call: the pool's handle."""

    center: str
    kind: str  # "fit" or "evaluate"
    ref: ray.ObjectRef
    after_loss: bool = False  # made through `_call_when_ready`: the reply is (ready(), reply)


class RayClientPool:
    """`ClientPool` over client actors (see the module docstring).

    `record=True` keeps every reply received, in arrival order, in `received` (tests inspect
    exactly what reached the coordinator); `puts` counts the global states put in the object
    store (one per distinct state: once per round).

    Restarts: a call that fails because its actor was lost (`RayActorError`: process killed,
    node lost, out of memory) marks the client as lost. Ray restarts the actor
    (`max_restarts`); meanwhile it fails every new call at once (no task retries), so the
    pool sends a lost client's calls through `_call_when_ready` (a CPU-less task that waits up
    to `restart_wait_s` for the actor to answer `ready()`, then calls it): a restarting client
    is waited for like a slow one, within the round's deadline. Its first reply also brings
    `ready()`: the client is reported by `rejoined()` when that ran in a restarted actor
    (`ready()["restarted"]`, or a different pid than the last one seen), and is no longer
    lost. An actor with no restarts left fails the call at once (`ActorDiedError`).
    """

    def __init__(self, actors: Mapping[str, ActorHandle], *, record: bool = False,
                 restart_wait_s: float = RESTART_WAIT_S,
                 watchdog: ProgressWatchdog | None = None):
        if not actors:
            raise ValueError("RayClientPool: no client actors")
        self.actors = dict(actors)
        self.record = record
        self.restart_wait_s = restart_wait_s
        self.watchdog = watchdog
        self.received: list[ClientUpdate | EvalReply] = []
        self.puts = 0
        self._state: Tensors | None = None
        self._state_ref: ray.ObjectRef | None = None
        self._lost: set[str] = set()  # clients whose actor was lost and has not answered since
        self._pids: dict[str, int] = {}  # client -> pid of its last ready() seen
        self._rejoined: list[str] = []
        self._when_ready = None  # the remote `_call_when_ready`, made on first use

    def centers(self) -> list[str]:
        return sorted(self.actors)

    def _actor(self, center: str) -> ActorHandle:
        if center not in self.actors:
            raise ClientFailure(center, f"no such client; the pool has {self.centers()}")
        return self.actors[center]

    def state_ref(self, state: Tensors | None) -> ray.ObjectRef | None:
        """The object-store reference of `state`, put once while the same state is sent."""
        if state is None:
            return None
        if not _same_state(state, self._state):
            # a snapshot of the names -> tensors, not the caller's dict: a dict changed after
            # it was put must not pass for the state the object store holds
            self._state, self._state_ref = dict(state), ray.put(state)
            self.puts += 1
        return self._state_ref

    def _submit(self, center: str, kind: str, method: str, *args: Any) -> Call:
        actor = self._actor(center)
        if center not in self._lost:
            return Call(center, kind, getattr(actor, method).remote(center, *args))
        if self._when_ready is None:
            self._when_ready = ray.remote(num_cpus=0, max_retries=0)(_call_when_ready)
        ref = self._when_ready.remote(actor, center, method, list(args), self.restart_wait_s)
        return Call(center, kind, ref, after_loss=True)

    def submit_fit(self, center: str, plan: RoundPlan) -> Call:
        ref = self.state_ref(plan.global_state)
        light = dataclasses.replace(plan, global_state=None)  # the state travels by reference
        return self._submit(center, "fit", "fit", light, ref)

    def submit_secagg(self, center: str, stage: str, round_id: int, message: Any) -> Call:
        return self._submit(center, "secure aggregation", "secure_aggregation", stage,
                            round_id, message)

    def submit_evaluate(self, center: str, split: str, personalized: bool,
                        dataset_center: str | None = None,
                        global_state: Tensors | None = None,
                        max_studies: int | None = None) -> Call:
        ref = self.state_ref(global_state)
        limit = () if max_studies is None else (max_studies,)
        return self._submit(center, "evaluate", "evaluate", split, personalized,
                            dataset_center, ref, *limit)

    def wait(self, handles: Sequence[Call], num_returns: int, timeout_s: float | None
             ) -> tuple[list[Call], list[Call]]:
        if not handles:
            return [], []
        by_ref = {h.ref: h for h in handles}
        wanted = min(num_returns, len(handles))
        if self.watchdog is None:
            ready, pending = ray.wait(list(by_ref), num_returns=wanted, timeout=timeout_s)
        else:
            kinds = sorted({h.kind for h in handles})
            centers = ", ".join(sorted({h.center for h in handles}))
            ready, pending = self.watchdog.wait(
                list(by_ref), wanted, timeout_s,
                waiting_for=f"{' and '.join(kinds)} replies from {centers}")
        return [by_ref[r] for r in ready], [by_ref[r] for r in pending]

    def result(self, handle: Call) -> ClientUpdate | EvalReply:
        try:
            reply = ray.get(handle.ref)
        except RayError as e:
            lost = _actor_lost(e)
            if lost:  # every client that actor hosts restarts with it
                actor = self.actors[handle.center]
                self._lost.update(c for c, a in self.actors.items() if a == actor)
            raise ClientFailure(handle.center, f"{handle.kind} failed: {_cause(e)}",
                                FailureKind.LOST if lost else FailureKind.CRASH) from None
        if handle.after_loss:
            info, reply = reply
            self._note_rejoin(handle.center, info)
        if self.record:
            self.received.append(reply)
        if isinstance(reply, ClientFault):
            raise reply.as_error(f"{handle.kind} failed: ")
        return reply

    def _note_rejoin(self, center: str, info: Mapping[str, Any]) -> None:
        self._lost.discard(center)
        previous = self._pids.get(center)
        self._pids[center] = info["pid"]
        # with no pid seen before, Ray's flag; after that a new pid also shows a second restart
        if (info["restarted"] if previous is None else info["pid"] != previous):
            self._rejoined.append(center)

    def rejoined(self) -> list[str]:
        """Clients back from an actor restart since the last call (class docstring)."""
        out, self._rejoined = sorted(set(self._rejoined)), []
        return out

    def call_all(self, method: str, *args: Any, centers: Sequence[str] | None = None,
                 timeout_s: float | None = None) -> dict[str, Any]:
        """`method(*args)` on every client (or `centers`), resolved; ObjectRefs among `args`
        are passed through. A failure raises `ClientFailure` naming the client."""
        refs = {c: getattr(self._actor(c), method).remote(c, *args)
                for c in (centers or self.centers())}
        if self.watchdog is not None and timeout_s is None:
            self.watchdog.wait(list(refs.values()), len(refs), None,
                               waiting_for=f"{method} from {', '.join(refs)}")
        out = {}
        for center, ref in refs.items():
            try:
                out[center] = ray.get(ref, timeout=timeout_s)
            except RayError as e:
                raise ClientFailure(center, f"{method} failed: {_cause(e)}") from None
        return out

    def shutdown(self) -> None:
        stop_actors(self.actors.values())


def stop_actors(actors: Sequence[ActorHandle] | Any, timeout_s: float = 30.0, *,
                close: bool = True) -> None:
    """Close client actors (ends their streams' suspended passes), then kill them. An actor
    that hosts several clients appears once per client: it is closed and killed once."""
    actors = list(dict.fromkeys(actors))
    closing = [a.close.remote() for a in actors if close and hasattr(a, "close")]
    if closing:
        ray.wait(closing, num_returns=len(closing), timeout=timeout_s)
    for actor in actors:
        ray.kill(actor, no_restart=True)


def _same_state(a: Tensors | None, b: Tensors | None) -> bool:
    """The same names with the same or equal tensors (plans may copy the state)."""
    if a is None or b is None or a.keys() != b.keys():
        return a is b
    return all(a[k] is b[k] or (a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
                                and torch.equal(a[k], b[k])) for k in a)


# --------------------------------------------------------------------------- the coordinator


class CoordinatorHost:
    """Runs `run_fn(emit)` in an actor; `emit(event)` buffers progress events for `poll`."""

    def __init__(self, run_fn: Callable[[Callable[[dict], None]], Any]):
        self._run_fn = run_fn
        self._events: list[dict] = []
        self._lock = threading.Lock()
        self._tracking: dict | None = None  # the run's "tracking" event: its MLflow runs

    def _emit(self, event: dict) -> None:
        with self._lock:
            self._events.append(event)
            if event.get("type") == "tracking":
                self._tracking = event

    def end_tracking(self, status: str, reason: str) -> list[str]:
        """End the run's MLflow runs still RUNNING as `status` while `run` is cut short (its
        tracker never reaches its own end); the ids ended. MLflow is loaded here already."""
        from fedmrg.tracking import end_runs

        with self._lock:
            tracking = self._tracking
        if tracking is None:
            return []
        return end_runs(tracking["tracking_uri"], tracking["run_ids"], status, reason)

    def run(self) -> Any:
        return self._run_fn(self._emit)

    def poll(self) -> list[dict]:
        """Events emitted since the last poll."""
        with self._lock:
            events, self._events = self._events, []
        return events


def run_in_coordinator_actor(run_fn: Callable[[Callable[[dict], None]], Any],
                             on_event: Callable[[dict], None], *,
                             poll_interval_s: float = 0.5) -> Any:
    """Run `run_fn` inside a `CoordinatorHost` actor on this node, feeding its events to
    `on_event` here as they come; returns what `run_fn` returns (its exception is raised)."""
    host = ray.remote(CoordinatorHost).options(**coordinator_actor_options()).remote(run_fn)
    tracking: dict | None = None
    try:
        done = host.run.remote()
        try:
            while True:
                ready, _ = ray.wait([done], timeout=poll_interval_s)
                for event in ray.get(host.poll.remote()):
                    if event.get("type") == "tracking":
                        tracking = event
                    on_event(event)
                if ready:
                    break
        except BaseException as stop:
            # stopped here (a signal: fedmrg.signals) while the run goes on in the actor:
            # end its MLflow runs before the actor is killed, or they stay RUNNING for ever
            _end_cut_run(host, tracking, stop)
            raise
        try:
            return ray.get(done)
        except RayTaskError as e:
            cause = e.cause
            if isinstance(cause, Exception) and not isinstance(cause, RayError):
                raise cause from None  # the run's own error (ConfigError, DatasetError, ...)
            raise
    finally:
        ray.kill(host, no_restart=True)


END_TRACKING_TIMEOUT_S = 10.0  # `ray job stop` SIGKILLs 3 s after its SIGTERM by default


def _end_cut_run(host: ActorHandle, tracking: dict | None, stop: BaseException) -> None:
    """End the MLflow runs of a coordinator actor's run that this driver stops: KILLED for an
    interruption (a signal), FAILED for an error here; through the actor (MLflow is loaded
    there), else from here with the ids its "tracking" event gave. Never raises: the reason
    the run stopped is what the caller reports."""
    from fedmrg.signals import as_run_interrupted

    stop = as_run_interrupted(stop)
    status = "KILLED" if isinstance(stop, KeyboardInterrupt) else "FAILED"
    reason = f"driver stopped: {stop}" if str(stop) else f"driver stopped: {type(stop).__name__}"
    try:
        ray.get(host.end_tracking.remote(status, reason), timeout=END_TRACKING_TIMEOUT_S)
        return
    except BaseException as e:  # noqa: BLE001 - a dead or busy actor: try from here
        log.warning("the coordinator actor could not end its MLflow runs (%s)", e)
    if tracking is None:
        return
    try:
        from fedmrg.tracking import end_runs

        end_runs(tracking["tracking_uri"], tracking["run_ids"], status, reason)
    except Exception as e:  # noqa: BLE001
        log.warning("could not end the MLflow runs %s as %s (%s)", tracking["run_ids"], status,
                    e)

