"""What a run's actors ask of the Ray cluster, and whether the cluster can give it: pure
functions, no Ray calls (fedmrg/fl/actors.py makes the actors with these options).

- `client_actor_options(resources, center)`, `actor_groups`, `actor_plan`: the Ray options of
  every client actor, exactly as `start_client_actors` uses them;
- `resource_demand(cfg, clients)`: what the run needs at once to make progress: every client
  actor, one Ray Data task of each actor's stream beside it (a client's stream tasks are
  separate tasks, not inside its actor's reservation: without one schedulable task per
  stream, `fit` waits forever), and the coordinator actor;
- `check_fits(demand, cluster_resources)`: raises `ClusterTooSmallError` naming the keys to
  change and values that would fit; on a cluster that adds nodes on demand (`autoscaling`)
  it returns the same text as a warning instead: the nodes the run needs may not exist yet.

Totals only: an actor must also fit on ONE node, which Ray reports as a pending demand if it
does not (the progress watchdog, `fedmrg.ray_cluster.fail_without_progress`, names it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedmrg.config import ConfigError, ExperimentConfig, ResourcesConfig

# The coordinator actor mostly waits on its clients: it reserves no CPU (so it always fits).
COORDINATOR_NUM_CPUS = 0.0
# Resource amounts are compared with this slack (Ray keeps fractions to 1e-4).
_EPS = 1e-6


class ClusterTooSmallError(ConfigError):
    """The run's actors and their stream tasks cannot all be placed on the cluster."""


def center_resource(center: str) -> str:
    """The custom resource a node offers for each center whose data it holds."""
    return f"center_{center}"


def client_actor_options(resources: ResourcesConfig, center: str | None) -> dict[str, Any]:
    """Ray actor options of one client (`center=None`: a pooled client, never pinned)."""
    options: dict[str, Any] = {
        "num_cpus": resources.num_cpus_per_client,
        "num_gpus": resources.num_gpus_per_client,
        "max_restarts": resources.max_restarts,
        "max_task_retries": 0,  # fl/actors.py's docstring: fail the round, rejoin the next
    }
    if resources.pin_centers and center is not None:
        options["resources"] = {center_resource(center): 1}
    return options


@dataclass(frozen=True)
class TrainWorkers:
    """The Ray Train workers one center's local round runs on (`fedmrg.fl.ddp`): `count` > 1
    means a TorchTrainer run per round, each worker holding `cpus` and `gpus`."""

    count: int
    cpus: float
    gpus: float

    @property
    def distributed(self) -> bool:
        return self.count > 1


def train_workers(resources: ResourcesConfig) -> TrainWorkers:
    """One worker per GPU of `resources.gpus_per_center` (> 1), else
    `resources.workers_per_center` CPU workers (gloo); each takes num_cpus_per_client CPUs."""
    if resources.gpus_per_center > 1:
        return TrainWorkers(resources.gpus_per_center, resources.num_cpus_per_client, 1.0)
    return TrainWorkers(resources.workers_per_center, resources.num_cpus_per_client, 0.0)


def check_center_gpus(resources: ResourcesConfig, node_gpus: Sequence[float]) -> str | None:
    """A center's GPUs must be on one node: its Ray Train workers (one per GPU) and its client
    actor's own share. The problem as a one-line message naming the key (None: it fits)."""
    if resources.gpus_per_center <= 1:
        return None
    need = resources.gpus_per_center + resources.num_gpus_per_client
    most = max(node_gpus, default=0.0)
    if need <= most + _EPS:
        return None
    return (f"resources.gpus_per_center={resources.gpus_per_center} (+ "
            f"resources.num_gpus_per_client={_fmt(resources.num_gpus_per_client)} for the "
            f"client actor) needs {_fmt(need)} GPUs on one node; the largest node has "
            f"{_fmt(most)}")


def actor_groups(client_ids: Sequence[str], clients_per_actor: int) -> list[list[str]]:
    """The clients each actor hosts: consecutive runs of `clients_per_actor` in the given
    order (the last group may be smaller)."""
    if clients_per_actor < 1:
        raise ValueError(f"clients_per_actor must be >= 1, got {clients_per_actor}")
    ids = list(client_ids)
    return [ids[i:i + clients_per_actor] for i in range(0, len(ids), clients_per_actor)]


def actor_plan(resources: ResourcesConfig, clients: Mapping[str, list[str] | None]
               ) -> list[tuple[list[str], dict[str, Any]]]:
    """(the clients an actor hosts, its Ray options) for every client actor of a run whose
    clients are `clients` (client id -> the centers it pools, None: its own center). An actor
    reserves one client's resources (its clients train in turn, never at once); only an actor
    hosting one unpooled client is pinned to its center's nodes."""
    plan = []
    for group in actor_groups(list(clients), resources.clients_per_actor):
        pinned = group[0] if len(group) == 1 and not clients[group[0]] else None
        plan.append((group, client_actor_options(resources, pinned)))
    return plan


@dataclass(frozen=True)
class ResourceDemand:
    """What a run needs at once (module docstring): its actors' reservations and one stream
    task per client actor. `total` is the sum, the numbers `check_fits` compares."""

    clients: int
    actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    stream_cpus_per_task: float
    stream_max_tasks: int
    coordinator_cpus: float
    clients_per_actor: int
    pin_centers: bool
    custom: dict[str, float] = field(default_factory=dict)  # e.g. center_a: 1
    # Ray Train workers of a distributed center (`train_workers`), while its round trains
    # (the round's clients train at once, each with its own workers)
    workers: TrainWorkers = field(default_factory=lambda: TrainWorkers(1, 0.0, 0.0))

    @property
    def total(self) -> dict[str, float]:
        w = self.workers if self.workers.distributed else TrainWorkers(0, 0.0, 0.0)
        out = {"CPU": self.actors * (self.cpus_per_actor + self.stream_cpus_per_task
                                     + w.count * w.cpus) + self.coordinator_cpus,
               "GPU": self.actors * (self.gpus_per_actor + w.count * w.gpus)}
        out.update(self.custom)
        return out


def resource_demand(cfg: ExperimentConfig, clients: Mapping[str, list[str] | None]
                    ) -> ResourceDemand:
    """The run's `ResourceDemand` from the same options `start_client_actors` gives its actors
    (`actor_plan`) and the streams' `data.stream_cpus_per_task`."""
    plan = actor_plan(cfg.resources, clients)
    custom: dict[str, float] = {}
    for _, options in plan:
        for name, amount in options.get("resources", {}).items():
            custom[name] = custom.get(name, 0.0) + float(amount)
    return ResourceDemand(
        clients=len(clients), actors=len(plan),
        cpus_per_actor=float(cfg.resources.num_cpus_per_client),
        gpus_per_actor=float(cfg.resources.num_gpus_per_client),
        stream_cpus_per_task=float(cfg.data.stream_cpus_per_task),
        stream_max_tasks=cfg.data.stream_max_tasks, coordinator_cpus=COORDINATOR_NUM_CPUS,
        clients_per_actor=cfg.resources.clients_per_actor,
        pin_centers=cfg.resources.pin_centers, custom=custom,
        workers=train_workers(cfg.resources))


def _floor(value: float, digits: int = 2) -> float:
    """`value` rounded down to `digits` decimals (a suggested setting that surely fits)."""
    scale = 10 ** digits
    return math.floor(value * scale + _EPS) / scale


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _cpu_problem(d: ResourceDemand, have: float) -> str | None:
    need = d.total["CPU"]
    if need <= have + _EPS:
        return None
    per_actor = (have - d.coordinator_cpus) / d.actors  # what each actor may take, stream too
    fixes = []
    cpus = _floor(per_actor - d.stream_cpus_per_task)
    if 0 < cpus < d.cpus_per_actor:
        fixes.append(f"lower resources.num_cpus_per_client to {_fmt(cpus)}")
    stream = _floor(per_actor - d.cpus_per_actor)
    if 0 < stream < d.stream_cpus_per_task:
        fixes.append(f"lower data.stream_cpus_per_task to {_fmt(stream)}")
    if not d.pin_centers and d.actors > 1:
        for per in range(d.clients_per_actor + 1, d.clients + 1):
            actors = math.ceil(d.clients / per)
            if (actors * (d.cpus_per_actor + d.stream_cpus_per_task) + d.coordinator_cpus
                    <= have + _EPS):
                fixes.append(f"raise resources.clients_per_actor to {per} (clients sharing an "
                             f"actor train in turn)")
                break
    fixes.append(f"give the cluster at least {_fmt(need)} CPUs (ray start --num-cpus)")
    hosts = "" if d.clients_per_actor == 1 else f" ({d.clients} clients)"
    workers = (f" + {d.workers.count} Ray Train workers x {_fmt(d.workers.cpus)} CPU "
               f"[resources.workers_per_center/gpus_per_center]" if d.workers.distributed else "")
    return (f"{d.actors} client actors{hosts} x ({_fmt(d.cpus_per_actor)} CPU "
            f"[resources.num_cpus_per_client] + {_fmt(d.stream_cpus_per_task)} CPU for one "
            f"data-stream task [data.stream_cpus_per_task]{workers}) + coordinator "
            f"{_fmt(d.coordinator_cpus)} CPU need {_fmt(need)} CPUs, the cluster has "
            f"{_fmt(have)}: " + ", or ".join(fixes))


def _gpu_problem(d: ResourceDemand, have: float) -> str | None:
    need = d.total["GPU"]
    if need <= have + _EPS:
        return None
    fixes = []
    if have > 0:
        per = _floor(have / d.actors)
        if per > 0:
            fixes.append(f"lower resources.num_gpus_per_client to {_fmt(per)} (clients share "
                         f"a GPU)")
    fixes.append("set resources.num_gpus_per_client=0 (train on CPUs)")
    fixes.append(f"give the cluster at least {_fmt(need)} GPUs")
    workers = (f" + {d.workers.count} Ray Train workers x 1 GPU [resources.gpus_per_center]"
               if d.workers.gpus else "")
    return (f"{d.actors} client actors x ({_fmt(d.gpus_per_actor)} GPU "
            f"[resources.num_gpus_per_client]{workers}) need {_fmt(need)} GPUs, the cluster has "
            f"{_fmt(have)}: " + ", or ".join(fixes))


def _custom_problem(d: ResourceDemand, cluster: Mapping[str, float]) -> str | None:
    missing = [name for name, amount in sorted(d.custom.items())
               if cluster.get(name, 0.0) + _EPS < amount]
    if not missing:
        return None
    example = "{" + ", ".join(f'"{name}": 1' for name in missing[:2]) + "}"
    return (f"resources.pin_centers is true but no node offers {', '.join(missing)} (a "
            f"node holding that center's data declares it: ray start --resources='{example}'): "
            f"start such nodes, or set resources.pin_centers=false")


def check_fits(demand: ResourceDemand, cluster_resources: Mapping[str, float], *,
               autoscaling: bool = False) -> list[str]:
    """Raise `ClusterTooSmallError` when `demand` exceeds `cluster_resources` (Ray's
    `cluster_resources()`: totals, not what other work holds right now). With `autoscaling`
    the cluster may still add the nodes: the same message is returned as a warning instead.
    Returns the warnings (empty when it fits)."""
    problems = [p for p in (_cpu_problem(demand, float(cluster_resources.get("CPU", 0.0))),
                            _gpu_problem(demand, float(cluster_resources.get("GPU", 0.0))),
                            _custom_problem(demand, cluster_resources)) if p]
    if not problems:
        return []
    message = "the run does not fit the Ray cluster: " + "; ".join(problems)
    if autoscaling:
        return [message + " (the cluster adds nodes on demand [resources.autoscaling]: "
                          "starting anyway)"]
    raise ClusterTooSmallError(message + " (on a cluster that adds nodes on demand, set "
                                         "resources.autoscaling=true)")
