"""Connecting to Ray: the cluster in RAY_ADDRESS / the config, or a private local one; what
the cluster can give a run, and what it waits for.

Which cluster (`connect`): `resources.ray_address`, else RAY_ADDRESS (set by `ray job
submit`), else a private local cluster started for this process (`ray.init(address=
"local")`). Ray's own default would join the cluster recorded in `<tmp>/ray/ray_current_cluster`
by the last `ray start` on this machine, and with our CPU count that ends in `ValueError: When
connecting to an existing cluster, num_cpus and num_gpus must not be provided` (or a hang on a
stale file). A running `ray start` cluster is joined only when asked (`auto`, an address, or
RAY_ADDRESS); `connect` says in one line that it exists and how to join it.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from pathlib import Path

from fedmrg.config import ExperimentConfig, ResourcesConfig
from fedmrg.experiment import ExperimentError

log = logging.getLogger(__name__)

# Set before Ray starts (workers of a local cluster inherit them): no usage stats, stay on
# 127.0.0.1, and idle OpenMP threads sleep instead of spinning (with several actors on few
# cores, spinning pools made a training step 5-9x slower: benchmarks/centralized.py).
_RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "OMP_WAIT_POLICY": "PASSIVE"}
# Written by `ray up` on the head node of an autoscaling cluster (cluster.yaml's head starts Ray
# with --autoscaling-config=~/ray_bootstrap_config.yaml); a job's driver runs there.
RAY_BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"


class NoProgressError(ExperimentError):
    """A wait for client actors or replies saw nothing for `resources.progress_timeout_s`."""


class _DropTokenAuthNotice(logging.Filter):
    """Drops Ray's "Token authentication is enabled for this Ray cluster ..." notice, logged on
    every start of a local cluster: Ray's default (token auth on) is kept, only the line that
    repeats it on every run's console goes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this")


def _quiet_token_auth_notice() -> None:
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _DropTokenAuthNotice) for f in logger.filters):
        logger.addFilter(_DropTokenAuthNotice())


def local_logical_cpus() -> int:
    """Logical CPUs of a local cluster: more than the cores on purpose, so client actors that
    hold fractional CPUs leave room for their Ray Data tasks."""
    return max(4, 2 * (os.cpu_count() or 1))


def ray_current_cluster_file() -> Path:
    """Where `ray start` records its cluster's address for `ray.init()` on this machine
    (`$RAY_TMPDIR/ray/ray_current_cluster`, else `$TMPDIR/...`, else `/tmp/ray/...`)."""
    try:
        from ray._common.utils import get_ray_address_file

        return Path(get_ray_address_file(None))
    except ImportError:  # moved in another Ray version: the same rule as Ray 2.60's
        base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
        return Path(base) / "ray" / "ray_current_cluster"


def running_local_cluster(connect_timeout_s: float = 0.5) -> str | None:
    """The address in `ray_current_cluster` when something answers there (a `ray start`
    cluster still running), else None (no file, or a stale one left by a cluster that is
    gone)."""
    path = ray_current_cluster_file()
    try:
        address = path.read_text().strip()
    except OSError:
        return None
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return None
    try:
        with socket.create_connection((host, int(port)), timeout=connect_timeout_s):
            return address
    except OSError:
        return None


def choose_address(resources: ResourcesConfig, environ: Mapping[str, str] | None = None
                   ) -> tuple[str | None, str | None]:
    """(address for `ray.init`, None: start a private local cluster; a one-line notice or
    None). The module docstring says why a `ray start` cluster is not joined unasked."""
    environ = os.environ if environ is None else environ
    address = resources.ray_address or environ.get("RAY_ADDRESS") or None
    if address not in (None, "local"):
        return address, None
    running = running_local_cluster() if address is None else None
    notice = None
    if running is not None:
        notice = (f"a Ray cluster started by `ray start` is running at {running} "
                  f"({ray_current_cluster_file()}); fedmrg starts its own local cluster. To "
                  f"run on that one: --set resources.ray_address=auto (or RAY_ADDRESS={running})")
    return None, notice


def connect(resources: ResourcesConfig, *, quiet: bool = True) -> dict[str, float]:
    """`ray.init` once, on the cluster `choose_address` picks (module docstring).

    Returns the cluster's resources. Calling it again in a process that is already connected
    is a no-op (a Ray job's driver is connected by `ray job submit` through RAY_ADDRESS).
    """
    import ray
    import ray.data

    for key, value in _RAY_ENV.items():
        os.environ.setdefault(key, value)
    if not ray.is_initialized():
        address, notice = choose_address(resources)
        if notice:
            log.warning(notice)
        kwargs: dict = {"log_to_driver": not quiet, "configure_logging": False}
        if address is None:
            # "local", not None: None would make Ray join the cluster in ray_current_cluster
            address = "local"
            kwargs.update(num_cpus=local_logical_cpus(), include_dashboard=False)
        _quiet_token_auth_notice()
        ray.init(address=address, **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    return ray.cluster_resources()


# --------------------------------------------------------------------------- what fits


def cluster_autoscales(resources: ResourcesConfig, bootstrap_config: str = RAY_BOOTSTRAP_CONFIG
                       ) -> bool:
    """`resources.autoscaling`, or when null: this is the head node of a `ray up` cluster
    whose config lets it add workers (max_workers > 0 overall or for a node type)."""
    if resources.autoscaling is not None:
        return resources.autoscaling
    path = Path(bootstrap_config).expanduser()
    if not path.is_file():
        return False
    import yaml

    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return False
    types = config.get("available_node_types") or {}
    return bool(config.get("max_workers")) or any(
        (t or {}).get("max_workers") for t in types.values() if isinstance(t, dict))


def check_cluster_fits(cfg: ExperimentConfig, clients: Mapping[str, list[str] | None],
                       cluster_resources: Mapping[str, float]) -> None:
    """`fedmrg.fl.placement.check_fits` for the run's client actors on this cluster: raises
    `ClusterTooSmallError` (a `ConfigError`) naming the keys to change, or logs it as a warning
    on an autoscaling cluster (`cluster_autoscales`)."""
    import ray

    from fedmrg.fl.placement import (
        ClusterTooSmallError,
        check_center_gpus,
        check_fits,
        resource_demand,
    )

    autoscaling = cluster_autoscales(cfg.resources)
    for warning in check_fits(resource_demand(cfg, clients), cluster_resources,
                              autoscaling=autoscaling):
        log.warning(warning)
    if cfg.resources.gpus_per_center > 1:
        node_gpus = [float(n.get("Resources", {}).get("GPU", 0.0)) for n in ray.nodes()
                     if n.get("Alive")]
        problem = check_center_gpus(cfg.resources, node_gpus)
        if problem and autoscaling:
            log.warning("%s (the cluster adds nodes on demand: starting anyway)", problem)
        elif problem:
            raise ClusterTooSmallError(problem)


# --------------------------------------------------------------------------- what waits


def pending_demands() -> tuple[list[tuple[dict[str, float], int]], bool]:
    """([(resource shape, count)] of the tasks and actors Ray cannot place now, whether the
    autoscaler is starting nodes), from the GCS's cluster status (what `ray status` shows
    under "Demands"). Needs a connected driver or worker."""
    import ray
    from ray.autoscaler.v2.sdk import get_cluster_status

    status = get_cluster_status(ray.get_runtime_context().gcs_address)
    demands = status.resource_demands
    out: list[tuple[dict[str, float], int]] = []
    for group in [*demands.ray_task_actor_demand, *demands.placement_group_demand]:
        for bundle in group.bundles_by_count:
            out.append((dict(bundle.bundle), int(bundle.count)))
    launching = bool(status.pending_launches) or bool(getattr(status, "pending_nodes", None))
    return out, launching


def describe_demands(demands: list[tuple[dict[str, float], int]]) -> str:
    """`{CPU: 0.25} x 5, {CPU: 1, GPU: 1} x 1`, or `none`."""
    if not demands:
        return "none"
    return ", ".join("{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shape.items())) + "}"
                     + f" x {count}" for shape, count in demands)


def fail_without_progress(waiting_for: str, idle_s: float, *, timeout_s: float,
                          autoscaling: bool = False) -> None:
    """What a progress watchdog does when `idle_s` passed with nothing arriving: raise
    `NoProgressError` naming Ray's pending resource demands and the cluster's free resources.
    Returns (keep waiting, warned) while the autoscaler is starting nodes, or on a cluster
    that adds nodes on demand (`autoscaling`) while something waits for resources: new nodes
    can take longer than any fixed timeout to start and set up."""
    import ray

    try:
        demands, launching = pending_demands()
        pending = describe_demands(demands)
    except Exception as e:  # the report must not hide the stall it reports
        demands, launching, pending = [], False, f"unknown ({type(e).__name__}: {e})"
    if launching or (autoscaling and demands):
        log.warning("no progress for %.0f s while waiting for %s; Ray's pending demands %s "
                    "may get nodes from the autoscaler: waiting on", idle_s, waiting_for,
                    pending)
        return
    free = ray.available_resources()
    total = ray.cluster_resources()
    shown = ", ".join(f"{k} {free.get(k, 0.0):g} of {total[k]:g}" for k in ("CPU", "GPU")
                      if k in total)
    hint = ("something waits for resources that are not free: free them (other jobs or "
            "actors) or lower resources.num_cpus_per_client, data.stream_cpus_per_task or "
            "resources.num_gpus_per_client" if demands
            else "the calls are running but have not answered")
    raise NoProgressError(
        f"no progress for {idle_s:.0f} s (resources.progress_timeout_s={timeout_s:g}) while "
        f"waiting for "
        f"{waiting_for}; Ray's pending resource demands: {pending}; free: {shown}; {hint}")
