"""Connecting to Ray: the cluster in RAY_ADDRESS / the config, or a local one."""

from __future__ import annotations

import logging
import os

from fedmrg.config import ResourcesConfig

# Set before Ray starts (workers of a local cluster inherit them): no usage stats, stay on
# 127.0.0.1, and idle OpenMP threads sleep instead of spinning (with several actors on few
# cores, spinning pools made a training step 5-9x slower: benchmarks/centralized.py).
_RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "OMP_WAIT_POLICY": "PASSIVE"}


def local_logical_cpus() -> int:
    """Logical CPUs of a local cluster: more than the cores on purpose, so client actors that
    hold fractional CPUs leave room for their Ray Data tasks (docs/operations.md, GPUs)."""
    return max(4, 2 * (os.cpu_count() or 1))


def connect(resources: ResourcesConfig, *, quiet: bool = True) -> dict[str, float]:
    """`ray.init` once: `resources.ray_address`, else RAY_ADDRESS, else a local cluster.

    Returns the cluster's resources. Calling it again in a process that is already connected
    is a no-op (a Ray job's driver is connected by `ray job submit` through RAY_ADDRESS).
    """
    import ray
    import ray.data

    for key, value in _RAY_ENV.items():
        os.environ.setdefault(key, value)
    if not ray.is_initialized():
        address = resources.ray_address or os.environ.get("RAY_ADDRESS") or None
        kwargs: dict = {"log_to_driver": not quiet, "configure_logging": False}
        if address is None:
            kwargs.update(num_cpus=local_logical_cpus(), include_dashboard=False)
        ray.init(address=address, **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    return ray.cluster_resources()
