"""fedmrg against Flower's simulation engine on the same federated workload.

Usage, in the Flower venv (`make flower-venv`; flwr is never installed in the main venv):
``.venv-flower/bin/python benchmarks/vs_flower.py [--clients 2 4 8] [--rounds 3]
[--arms fedmrg flower] [--cluster-cpus N] [--sample-s 0.5] [--set section.key=value ...]
[--out benchmarks/results/vs_flower.json]``

The venv: `flwr[simulation]` pins ray==2.55.1 (fedmrg is pinned to 2.60.0) and needs older
fastapi, packaging, protobuf, rich, starlette, typer, uvicorn and virtualenv than
constraints.txt, so `make flower-venv` installs torch/torchvision from constraints.txt and
then `-e '.[flower]'` with every other pin of constraints.txt (those 9 dropped). Both arms run
in that venv, in one process, one after the other for each K (`arm_order`: fedmrg first for
the first K, then alternating, so a drift of the machine's load hits both), so they share
the Ray version (fedmrg on Ray 2.55.1 here, not its own 2.60.0) and the machine's state.

The workload, for each K of `--clients`: K centers of the phantom benchmark, the default
config (tiny CPU model, strategy fedmrg: generic LoRA factors, rank-`dense_update_rank`
low-rank dense updates with error feedback, prototypes, label counts), `train.local_steps`
local steps per round, `--rounds` rounds, no evaluation (`federation.eval_every=0`; neither
arm evaluates at the end). The default phantom benchmark has 4 centers; for K above that the
benchmark is generated with K centers next to it (`data.root` + `-c<K>`,
`data.phantom.centers=K`): centers a-d are those of the default (same profiles, same seed),
the others seeded variants of them (`fedmrg.data.phantom.centers`), so no center is split or
reused. Every arm of the run uses that one dataset.

(a) fedmrg: the product's Ray path as benchmarks/overhead.py runs it: `start_client_actors`
(one `ClientHost` actor per center holding a resident `FederatedClient`), a `RayClientPool`
and the product's `Coordinator` in this driver (torch on 1 thread, as in the coordinator
actor: `_common.timed_step`), `Coordinator.step()` once per round.

(b) Flower: `flwr.simulation.run_simulation` with the Ray backend (deprecated in flwr 1.42
in favour of `flwr run`, still the in-process entry point). Its ClientApp's `client_fn`
builds a `FederatedClient` for every message (Flower's clients are stateless: its actor pool
runs whichever node's message comes next): base LM and model built, train stream opened,
private state (adapter, head, optimizer, error feedback, stream position) restored from the
center's own fedmrg checkpoint, which `fit` writes after training as it does in the product;
`fit` returns the `ClientUpdate` as NumPy arrays (`message_to_arrays`), and the client's
stream is closed. The ServerApp's strategy (a legacy `flwr.server.strategy.Strategy`) holds
`make_strategy(cfg)`, the server half the coordinator uses: `configure_fit` samples with its
`configure_round` and sends its plan, `aggregate_fit` calls its `aggregate_round`. The
initial global state is what Flower asks one client for (`get_parameters`: a freshly built
model), as fedmrg asks one actor (`shared_state`). Each client asks for
`resources.num_cpus_per_client` CPUs (`client_resources`), as fedmrg's actors do.

Both arms run this driver and every Ray process at niceness 15 (`renice_to_workers`: the
niceness Ray gives its workers), and write each client's checkpoint after every fit (the
product does whenever a run has a name), to a temporary folder removed at the end.
Differences that stay, by design of each:
fedmrg sends a client that holds the previous round's state the low-rank downlink delta
(`fl.broadcast`), Flower's rebuilt client holds nothing and gets the full global state every
round; fedmrg's coordinator also validates every update and bounds its norm, computes the
next downlink delta, and runs on 1 torch thread, Flower's server thread on torch's default.

The cluster: a private local Ray cluster per arm and K (`ray.init(address="local")` as
`fedmrg.ray_cluster.connect` starts one), the same for both arms, with `--cluster-cpus`
logical CPUs (default: the fewest whole CPUs that hold K clients, ceil(K *
num_cpus_per_client): 1, 2, 4 for K = 2, 4, 8). Flower's actor pool takes floor(CPUs /
client CPUs) actors, all of them started at once, and Ray takes whole CPUs only, so the pool
reserves every logical CPU: a stream task asking for `data.stream_cpus_per_task` (0.25 by
default) would never be scheduled and the run would hang. Both arms therefore run with
`data.stream_cpus_per_task=0` (each stream still runs at most `data.stream_max_tasks` tasks
at once; fedmrg alone would start a larger cluster, max(4, 2 x cores) CPUs, with 0.25).

Measured, per arm and K:
- per-round wall time: fedmrg the coordinator's `RoundSummary.round_time_s` (plans to
  aggregation and downlink delta), Flower from its strategy's `configure_fit` to the end of
  its `aggregate_fit`, both in this process;
- peak memory: a thread samples this process and all its descendants (the local Ray cluster
  started here: GCS, raylet, agents, workers, actors) every `--sample-s`: RSS summed over
  the processes (shared pages counted in each process that maps them), PSS and USS
  (`_common.tree_memory_mib`). Per round the peak inside the round, for the arm the peak
  over its rounds above the first sample of the arm (this driver before Ray starts);
- rebuilding state between rounds, per client and round: Flower `construct_s` (everything
  `FederatedClient.__init__` does: model build, `stream_open_s`, train reports scanned,
  `restore_s` of its checkpoint; a pool actor's first construction also imports the model
  stack) + `close_s` (its stream's pass ended); fedmrg 0 (the actors stay resident), its one
  build reported as start-up (`actors_start_s`). Beside it,
  in both arms: `save_s` (the checkpoint written in `fit`) and `first_batch_s` (the first
  batch of the round: a resident stream resumes, a rebuilt one starts, decodes its center's
  images again and skips the batches of the epoch the center already trained on);
- start-up (Ray, actors or actor pool, initial state: until round 1 starts), tear-down, and
  bytes per round (`fedmrg.fl.wire.message_bytes` of the messages both arms carry; for Flower
  also the serialized NumPy payloads).
Ratios are Flower / fedmrg. Writes the JSON (after every K too) and a markdown table beside
it (`vs_flower.md`); prints the tables.

The conversion between fedmrg's messages and Flower's lists of arrays (`message_to_arrays`,
`arrays_to_message`) needs no flwr (tests/test_vs_flower.py checks it is exact); everything
else of Flower is imported where it is used.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import _common  # noqa: F401  (first: sets the environment before torch loads)
import numpy as np
import torch
from _common import (
    command_line,
    machine_info,
    markdown_table,
    probe_actors,
    result_path,
    timed_step,
    tree_memory_mib,
    write_json,
)

from fedmrg.fl.broadcast import StateDelta
from fedmrg.fl.lowrank import LowRankUpdate
from fedmrg.fl.messages import ClientUpdate, RoundPlan
from fedmrg.fl.quantize import QuantizedTensor

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # read when flwr is imported

RESULT_NAME = "vs_flower.json"
ARMS = ("fedmrg", "flower")
# Ray starts its workers at its own niceness + 15 (the raylet's `worker_niceness`): both arms
# run this driver and every Ray process at 15 (`renice_to_workers`).
WORKER_NICENESS = 15
RAY_WORKER_NICENESS_ENV = "RAY_worker_niceness"  # Ray's spelling (ray_constants)
# Imported before the arms, so that neither pays them in its start-up.
WARM_IMPORTS = ("ray", "ray.data", "fedmrg.fl.actors", "fedmrg.fl.client",
                "fedmrg.fl.coordinator", "fedmrg.ray_cluster")
FLOWER_IMPORTS = ("flwr.client", "flwr.common", "flwr.server", "flwr.simulation")
# The fedmrg strategy's plan is the same for every center (FedAvg.plan reads only the round),
# and a Flower server knows its clients by node id, not by center.
ANY_CENTER = ""

# --------------------------------------------------------------------------- messages <-> arrays

# The dataclasses a fedmrg message may hold, by name (the layout names them).
MESSAGE_CLASSES: dict[str, type] = {
    cls.__name__: cls for cls in (RoundPlan, ClientUpdate, LowRankUpdate, StateDelta,
                                  QuantizedTensor)}


def message_to_arrays(message: Any) -> list[np.ndarray]:
    """A fedmrg message (`RoundPlan`, `ClientUpdate`, a state dict) as Flower carries
    parameters: its tensors as NumPy arrays in the order met, then one uint8 array holding the
    layout (JSON: the message's structure, with each tensor's index). Exact: every array has
    its tensor's dtype and values (bfloat16, which NumPy lacks, travels as its int16 bits);
    numbers and strings keep their type in the layout."""
    arrays: list[np.ndarray] = []

    def encode(obj: Any) -> list[Any]:
        if isinstance(obj, torch.Tensor):
            tensor = obj.detach().cpu()
            bf16 = tensor.dtype == torch.bfloat16
            arrays.append((tensor.view(torch.int16) if bf16 else tensor).numpy())
            return ["bf16" if bf16 else "tensor", len(arrays) - 1]
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            name = type(obj).__name__
            if MESSAGE_CLASSES.get(name) is not type(obj):
                raise TypeError(f"message_to_arrays: {name} is not a message class "
                                f"({sorted(MESSAGE_CLASSES)})")
            return ["dataclass", name, {f.name: encode(getattr(obj, f.name))
                                        for f in dataclasses.fields(obj)}]
        if isinstance(obj, Mapping):
            keys = [k for k in obj if not isinstance(k, str)]
            if keys:
                raise TypeError(f"message_to_arrays: mapping key {keys[0]!r} is not a string")
            return ["dict", {k: encode(v) for k, v in obj.items()}]
        if isinstance(obj, (list, tuple)):
            return ["tuple" if isinstance(obj, tuple) else "list", [encode(v) for v in obj]]
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return ["value", obj]
        raise TypeError(f"message_to_arrays: cannot send a {type(obj).__name__}")

    layout = json.dumps(encode(message)).encode()
    return [*arrays, np.frombuffer(layout, dtype=np.uint8)]


def arrays_to_message(arrays: Sequence[np.ndarray]) -> Any:
    """The message `message_to_arrays` made `arrays` from (tensors copied out of the arrays)."""
    *tensors, layout = arrays

    def decode(node: list[Any]) -> Any:
        kind = node[0]
        if kind in ("tensor", "bf16"):
            tensor = torch.from_numpy(np.array(tensors[node[1]], copy=True))
            return tensor.view(torch.bfloat16) if kind == "bf16" else tensor
        if kind == "dataclass":
            return MESSAGE_CLASSES[node[1]](**{k: decode(v) for k, v in node[2].items()})
        if kind == "dict":
            return {k: decode(v) for k, v in node[1].items()}
        if kind == "list":
            return [decode(v) for v in node[1]]
        if kind == "tuple":
            return tuple(decode(v) for v in node[1])
        if kind == "value":
            return node[1]
        raise ValueError(f"arrays_to_message: unknown layout node {kind!r}")

    return decode(json.loads(np.asarray(layout, dtype=np.uint8).tobytes()))


def payload_bytes(arrays: Sequence[np.ndarray]) -> int:
    """Bytes of the arrays' data (Flower's serialized payload adds a small .npy header each)."""
    return sum(int(a.nbytes) for a in arrays)


# --------------------------------------------------------------------------- the cluster


def cluster_cpus(clients: int, cpus_per_client: float) -> int:
    """Logical CPUs of both arms' cluster (module docstring): the fewest whole CPUs (Ray takes
    no fraction) that hold `clients` clients of `cpus_per_client`."""
    return max(1, math.ceil(clients * cpus_per_client - 1e-9))


def flower_pool_size(cpus: int, cpus_per_client: float) -> int:
    """Actors in Flower's pool on a one-node cluster (flwr's `pool_size_from_resources`)."""
    return int(cpus / cpus_per_client)


def renice_to_workers() -> int:
    """This process at niceness `WORKER_NICENESS` (or above, if it already was), and the Ray
    clusters it starts from now on with their workers at the same niceness
    (RAY_worker_niceness, which the raylet adds to its own): on a shared machine a nice-0
    driver (coordinator, Flower's server thread) would win CPU time from other work that the
    clients could not, and Ray started from a reniced driver would put its workers at 19.
    Returns the niceness."""
    current = os.nice(0)
    if current < WORKER_NICENESS:
        current = os.nice(WORKER_NICENESS - current)
    os.environ[RAY_WORKER_NICENESS_ENV] = str(max(0, WORKER_NICENESS - current))
    return current


def ray_init_args(cpus: int) -> dict[str, Any]:
    """`ray.init` arguments of both arms: a private local cluster of `cpus` logical CPUs, as
    `fedmrg.ray_cluster.connect` starts one."""
    return {"address": "local", "num_cpus": cpus, "include_dashboard": False,
            "log_to_driver": False, "configure_logging": False}


class TreeMemorySampler:
    """Samples the memory of this process and all its descendants every `interval_s` in a
    thread while the block runs (module docstring)."""

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self.samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-memory", daemon=True)

    def __enter__(self) -> TreeMemorySampler:
        self.samples.append(self.sample())  # the baseline, before anything starts
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(self.sample())

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.samples.append(self.sample())

    @staticmethod
    def sample() -> dict[str, float]:
        import psutil

        rss = 0
        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            try:
                rss += proc.memory_info().rss
            except psutil.Error:  # gone since listed
                continue
        tree = tree_memory_mib()
        return {"t": time.perf_counter(), "rss_mib": rss / 2**20, "pss_mib": tree["pss"],
                "uss_mib": tree["uss"], "processes": tree["processes"]}

    def peak(self, start: float = -math.inf, end: float = math.inf) -> dict[str, float]:
        """The largest of each number over the samples taken in [start, end] ({} if none)."""
        window = [s for s in self.samples if start <= s["t"] <= end]
        if not window:
            return {}
        return {k: max(s[k] for s in window) for k in ("rss_mib", "pss_mib", "uss_mib",
                                                       "processes")} | {"samples": len(window)}


def wait_for_children(timeout_s: float = 30.0) -> int:
    """Wait until the processes the last arm left (a Ray cluster shutting down) are gone, so
    the next arm's first sample is this driver alone; returns how many were still there."""
    import psutil

    _, alive = psutil.wait_procs(psutil.Process().children(recursive=True), timeout=timeout_s)
    return len(alive)


# --------------------------------------------------------------------------- client timings


def _first_batch_timed(batches: Iterator[dict], timings: dict[str, float]) -> Iterator[dict]:
    """`batches`, recording in timings["first_batch_s"] how long the first one took."""
    started = time.perf_counter()
    try:
        for index, batch in enumerate(batches):
            if index == 0:
                timings["first_batch_s"] = time.perf_counter() - started
            yield batch
    finally:
        batches.close()


def instrument_client(client: Any, timings: dict[str, float]) -> None:
    """Record the next round's checkpoint save ("save_s") and first batch ("first_batch_s")
    of `client` (a `FederatedClient`) in `timings`: its instance's `_write_checkpoint` is
    wrapped once, its batch iterator every round."""
    client.round_timings = timings
    if "_write_checkpoint" not in vars(client):
        write = client._write_checkpoint

        def timed_write(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return write(*args, **kwargs)
            finally:
                client.round_timings["save_s"] = time.perf_counter() - started

        client._write_checkpoint = timed_write
    client._batches = _first_batch_timed(client._batches, timings)


def _instrument_host(host: Any) -> None:
    """`instrument_client` for every client of a `ClientHost` (run in its actor)."""
    host.round_timings = {center: {} for center in host.clients}
    for center, client in host.clients.items():
        instrument_client(client, host.round_timings[center])


def _host_timings(host: Any) -> dict[str, dict[str, float]]:
    return host.round_timings


def call_on_actors(actors: Mapping[str, Any], fn: Callable[[Any], Any]) -> list[Any]:
    """fn(instance) inside each distinct actor of `actors` (`__ray_call__`), their results."""
    import ray
    from ray import cloudpickle

    if __name__ != "__main__":  # imported (not run as a script): ship the functions by value
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return ray.get([actor.__ray_call__.remote(fn) for actor in dict.fromkeys(actors.values())])


def build_rebuilt_client(cfg: Any, center: str, root: str) -> tuple[Any, dict[str, float]]:
    """A `FederatedClient` built as Flower's client is, for one message, and the timings of its
    construction: construct_s (all of `__init__`), stream_open_s, restore_s (its newest own
    checkpoint), restored_round (0: none yet)."""
    from fedmrg.fl.client import FederatedClient

    timings: dict[str, float] = {}

    class RebuiltClient(FederatedClient):
        def _stream(self, *args: Any, **kwargs: Any) -> Any:  # (centers, split, ...)
            started = time.perf_counter()
            try:
                return super()._stream(*args, **kwargs)
            finally:
                timings["stream_open_s"] = time.perf_counter() - started

        def restore_latest_checkpoint(self, max_round: int | None = None) -> int | None:
            started = time.perf_counter()
            try:
                return super().restore_latest_checkpoint(max_round)
            finally:
                timings["restore_s"] = time.perf_counter() - started

    started = time.perf_counter()
    client = RebuiltClient(cfg, center, dataset_root=root, seed=cfg.seed)
    timings["construct_s"] = time.perf_counter() - started
    timings["restored_round"] = client.state_round or 0
    return client, timings


# --------------------------------------------------------------------------- (a) fedmrg


def run_fedmrg(cfg: Any, root: str, centers: list[str], rounds: int, cpus: int,
               sampler: TreeMemorySampler) -> dict[str, Any]:
    """Arm (a) (module docstring)."""
    import ray

    from fedmrg.fl.actors import RayClientPool, start_client_actors, stop_actors
    from fedmrg.fl.coordinator import Coordinator
    from fedmrg.fl.strategies import make_strategy
    from fedmrg.ray_cluster import connect

    started = time.perf_counter()
    ray.init(**ray_init_args(cpus))
    actors: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    try:
        connect(cfg.resources)  # already connected: only its Ray Data settings
        ray_s = time.perf_counter() - started
        actors, _ = start_client_actors(cfg, dict.fromkeys(centers), dataset_root=root,
                                        seed=cfg.seed)
        actors_start_s = time.perf_counter() - started - ray_s
        probes = probe_actors(actors)
        pool = RayClientPool(actors)
        initial = pool.call_all("shared_state", centers=centers[:1])[centers[0]]
        coordinator = Coordinator(cfg, make_strategy(cfg), pool, initial,
                                  np.random.default_rng(cfg.seed))
        startup_s = time.perf_counter() - started
        for _ in range(rounds):
            call_on_actors(actors, _instrument_host)
            round_started = time.perf_counter()
            summary, split = timed_step(coordinator)
            round_ended = time.perf_counter()
            if summary.rejected:
                raise RuntimeError(f"fedmrg round {summary.round_id}: rejected "
                                   f"{summary.rejected}")
            timings = {c: t for host in call_on_actors(actors, _host_timings)
                       for c, t in host.items()}
            rows.append({
                "round": summary.round_id, "wall_s": summary.round_time_s,
                "window": [round_started, round_ended],
                "memory": sampler.peak(round_started, round_ended),
                "coordinator_own_s": split["own_s"], "wait_s": split["wait_s"],
                "aggregate_s": split.get("aggregate s"),
                "bytes_up": summary.bytes_up, "bytes_down": summary.bytes_down,
                "clients": {c: {"fit_s": summary.metrics[f"{c}/fit_s"], "rebuild_s": 0.0,
                                **timings.get(c, {})} for c in summary.participants}})
            print(f"  fedmrg K={len(centers)} round {summary.round_id}: "
                  f"{summary.round_time_s:.2f} s", flush=True)
        last_round_ended = time.perf_counter()
    finally:
        if actors:
            stop_actors(actors.values())
        ray.shutdown()
    return {"arm": "fedmrg", "cluster_cpus": cpus, "ray_init_s": ray_s,
            "actors_start_s": actors_start_s, "startup_s": startup_s,
            "teardown_s": time.perf_counter() - last_round_ended,
            "driver_niceness": os.nice(0), "probes": probes, "rounds": rows}


# --------------------------------------------------------------------------- (b) Flower


def flower_client_app(cfg: Any, root: str, centers: list[str]) -> Any:
    """The ClientApp of arm (b): a fedmrg client rebuilt for every message (module
    docstring); node i of the simulation is center `centers[i]`."""
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context

    class FedmrgNumPyClient(NumPyClient):
        def __init__(self, client: Any, timings: dict[str, float]):
            self.client, self.timings = client, timings

        def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
            from fedmrg.model.params import get_shared_state

            arrays = message_to_arrays(get_shared_state(self.client.model))
            self.client.close()
            return arrays

        def fit(self, parameters: list[np.ndarray], config: dict[str, Any]
                ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
            started = time.perf_counter()
            plan = arrays_to_message(parameters)
            self.timings["plan_decode_s"] = time.perf_counter() - started
            instrument_client(self.client, self.timings)
            update = self.client.fit(plan)
            started = time.perf_counter()
            self.client.close()
            self.timings["close_s"] = time.perf_counter() - started
            started = time.perf_counter()
            arrays = message_to_arrays(update)
            self.timings["update_encode_s"] = time.perf_counter() - started
            return arrays, int(update.num_samples), {
                "center": self.client.center, "pid": os.getpid(), "niceness": os.nice(0),
                "torch_threads": torch.get_num_threads(), "fit_s": update.metrics["fit_s"],
                **self.timings}

    def client_fn(context: Context) -> Any:
        center = centers[int(context.node_config["partition-id"])]
        client, timings = build_rebuilt_client(cfg, center, root)
        return FedmrgNumPyClient(client, timings).to_client()

    return ClientApp(client_fn=client_fn)


def flower_strategy(cfg: Any, clients: int) -> Any:
    """The ServerApp's strategy of arm (b): fedmrg's server half behind Flower's legacy
    Strategy interface (module docstring). Its `rounds` hold what each round measured."""
    from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import Strategy

    from fedmrg.fl.strategies import make_strategy
    from fedmrg.fl.wire import from_wire, message_bytes, to_wire

    class FedmrgOnFlower(Strategy):
        def __init__(self) -> None:
            self.fedmrg = make_strategy(cfg)
            self.rng = np.random.default_rng(cfg.seed)
            self.rounds: list[dict[str, Any]] = []

        def initialize_parameters(self, client_manager: Any) -> None:
            return None  # Flower asks one client (`get_parameters`): a freshly built model

        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any
                          ) -> list[tuple[Any, Any]]:
            started = time.perf_counter()
            if server_round == 1:
                self.fedmrg.initialize(arrays_to_message(parameters_to_ndarrays(parameters)))
            proxies = client_manager.all()
            if len(proxies) != clients:
                raise RuntimeError(f"Flower round {server_round}: {len(proxies)} clients "
                                   f"registered, {clients} expected")
            chosen = self.fedmrg.configure_round(server_round, sorted(proxies), self.rng)
            plan = to_wire(self.fedmrg.plan(server_round, ANY_CENTER),
                           cfg.federation.wire_dtype)
            arrays = message_to_arrays(plan)
            fit_ins = FitIns(ndarrays_to_parameters(arrays), {})
            self.rounds.append({
                "round": server_round, "started": started,
                "configured": time.perf_counter(),
                "bytes_down": message_bytes(plan).bytes * len(chosen),
                "payload_bytes_down": payload_bytes(arrays) * len(chosen)})
            return [(proxies[cid], fit_ins) for cid in chosen]

        def aggregate_fit(self, server_round: int, results: list[tuple[Any, Any]],
                          failures: list[Any]) -> tuple[None, dict[str, Any]]:
            started = time.perf_counter()
            if failures:
                reasons = [repr(f) if isinstance(f, BaseException) else f[1].status.message
                           for f in failures]
                raise RuntimeError(f"Flower round {server_round}: {len(failures)} client(s) "
                                   f"failed: {reasons}")
            updates, bytes_up, payload_up = [], 0, 0
            for _, res in results:
                arrays = parameters_to_ndarrays(res.parameters)
                wired = arrays_to_message(arrays)
                bytes_up += message_bytes(wired).bytes
                payload_up += payload_bytes(arrays)
                updates.append(from_wire(wired))
            decoded = time.perf_counter()
            self.fedmrg.aggregate_round(server_round, updates)
            ended = time.perf_counter()
            row = self.rounds[-1]
            row.update(
                ended=ended, wall_s=ended - row["started"],
                window=[row["started"], ended], plan_encode_s=row["configured"] - row["started"],
                wait_s=started - row["configured"], update_decode_s=decoded - started,
                aggregate_s=ended - decoded, bytes_up=bytes_up, payload_bytes_up=payload_up,
                clients={res.metrics["center"]: dict(res.metrics) for _, res in results})
            print(f"  flower K={clients} round {server_round}: {row['wall_s']:.2f} s",
                  flush=True)
            return None, {}  # the global state stays in the fedmrg strategy

        def configure_evaluate(self, server_round: int, parameters: Any,
                               client_manager: Any) -> list[tuple[Any, Any]]:
            return []  # no evaluation (module docstring)

        def aggregate_evaluate(self, server_round: int, results: list[Any],
                               failures: list[Any]) -> tuple[None, dict[str, Any]]:
            return None, {}

        def evaluate(self, server_round: int, parameters: Any) -> None:
            return None

    return FedmrgOnFlower()


def run_flower(cfg: Any, root: str, centers: list[str], rounds: int, cpus: int,
               sampler: TreeMemorySampler) -> dict[str, Any]:
    """Arm (b) (module docstring)."""
    import ray
    from flwr.common import Context
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.simulation import run_simulation

    strategy = flower_strategy(cfg, len(centers))

    def server_fn(context: Context) -> Any:
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=rounds))

    cpus_per_client = cfg.resources.num_cpus_per_client
    backend_config = {"client_resources": {"num_cpus": cpus_per_client,
                                           "num_gpus": cfg.resources.num_gpus_per_client},
                      "init_args": ray_init_args(cpus)}
    pythonpath = os.environ.get("PYTHONPATH")  # Flower's Ray backend sets it for its workers
    started = time.perf_counter()
    try:
        run_simulation(server_app=ServerApp(server_fn=server_fn),
                       client_app=flower_client_app(cfg, root, centers),
                       num_supernodes=len(centers), backend_config=backend_config)
        ended = time.perf_counter()
    finally:
        ray.shutdown()
        if pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = pythonpath
    rows = strategy.rounds
    if len(rows) != rounds or "ended" not in rows[-1]:
        raise RuntimeError(f"Flower ran {len(rows)} of {rounds} rounds")
    for row in rows:
        row["memory"] = sampler.peak(*row["window"])
        for timings in row["clients"].values():
            timings["rebuild_s"] = timings["construct_s"] + timings["close_s"]
    return {"arm": "flower", "cluster_cpus": cpus,
            "pool_actors": flower_pool_size(cpus, cpus_per_client),
            "startup_s": rows[0]["started"] - started,
            "teardown_s": time.perf_counter() - rows[-1]["ended"],
            "simulation_s": ended - started, "driver_niceness": os.nice(0), "rounds": rows}


# --------------------------------------------------------------------------- report


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def arm_summary(arm: Mapping[str, Any], baseline: Mapping[str, float]) -> dict[str, Any]:
    """What the tables show of one arm: means over rounds (and over clients for client
    timings; `after_first`: rounds 2+), memory peaks over the rounds above the arm's first
    sample."""
    rounds = arm["rounds"]

    def client_mean(key: str, first: int = 0) -> float | None:
        return _mean([c.get(key) for r in rounds[first:] for c in r["clients"].values()])

    peaks = {k: max((r["memory"].get(k, 0.0) for r in rounds), default=0.0)
             for k in ("rss_mib", "pss_mib", "uss_mib")}
    return {
        "round_s": _mean([r["wall_s"] for r in rounds]),
        "round_s_after_first": _mean([r["wall_s"] for r in rounds[1:]]),
        "round_s_each": [r["wall_s"] for r in rounds],
        **{f"peak_{k}": v for k, v in peaks.items()},
        **{f"peak_{k}_above_start": v - baseline[k] for k, v in peaks.items()},
        "rebuild_s": client_mean("rebuild_s"), "construct_s": client_mean("construct_s"),
        "restore_s": client_mean("restore_s"), "stream_open_s": client_mean("stream_open_s"),
        "close_s": client_mean("close_s"), "save_s": client_mean("save_s"),
        "fit_s": client_mean("fit_s"),
        "first_batch_s": client_mean("first_batch_s"),
        "first_batch_s_after_first": client_mean("first_batch_s", 1),
        "startup_s": arm["startup_s"], "teardown_s": arm["teardown_s"],
        "bytes_down": _mean([r["bytes_down"] for r in rounds]),
        "bytes_up": _mean([r["bytes_up"] for r in rounds]),
    }


RATIO_KEYS = ("round_s", "round_s_after_first", "peak_rss_mib_above_start",
              "peak_pss_mib_above_start", "peak_rss_mib", "peak_pss_mib", "startup_s",
              "first_batch_s_after_first", "bytes_down")


def ratios(fedmrg: Mapping[str, Any], flower: Mapping[str, Any]) -> dict[str, float | None]:
    """Flower / fedmrg of each of RATIO_KEYS (None where one is missing or fedmrg's is 0)."""
    return {k: (flower[k] / fedmrg[k] if fedmrg.get(k) and flower.get(k) is not None
                else None) for k in RATIO_KEYS}


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _kib(value: float | None) -> str:
    return _fmt(None if value is None else value / 2**10, 0)


def tables(results: Sequence[Mapping[str, Any]]) -> str:
    """Time and memory per K with ratios, then the state kept or rebuilt between rounds."""
    main_rows, state_rows = [], []
    for r in results:
        s = r["summary"]
        fm, fl = s.get("fedmrg", {}), s.get("flower", {})
        q = r.get("ratios", {})
        main_rows.append([
            r["clients"], r["rounds"], _fmt(fm.get("round_s")), _fmt(fl.get("round_s")),
            _fmt(q.get("round_s")), _fmt(fm.get("round_s_after_first")),
            _fmt(fl.get("round_s_after_first")), _fmt(q.get("round_s_after_first")),
            _fmt(fm.get("peak_rss_mib_above_start"), 0),
            _fmt(fl.get("peak_rss_mib_above_start"), 0),
            _fmt(q.get("peak_rss_mib_above_start")),
            _fmt(fm.get("peak_pss_mib_above_start"), 0),
            _fmt(fl.get("peak_pss_mib_above_start"), 0),
            _fmt(q.get("peak_pss_mib_above_start"))])
        state_rows.append([
            r["clients"], _fmt(fm.get("rebuild_s")), _fmt(fl.get("rebuild_s")),
            _fmt(fl.get("stream_open_s")), _fmt(fl.get("restore_s")),
            f"{_fmt(fm.get('save_s'), 3)} / {_fmt(fl.get('save_s'), 3)}",
            f"{_fmt(fm.get('first_batch_s_after_first'))} / "
            f"{_fmt(fl.get('first_batch_s_after_first'))}",
            f"{_fmt(fm.get('fit_s'))} / {_fmt(fl.get('fit_s'))}",
            f"{_fmt(fm.get('startup_s'), 1)} / {_fmt(fl.get('startup_s'), 1)}",
            f"{_kib(fm.get('bytes_down'))} / {_kib(fl.get('bytes_down'))}"])
    time_memory = markdown_table(
        ["K", "rounds", "round s fedmrg", "round s Flower", "ratio", "rounds 2+ s fedmrg",
         "rounds 2+ s Flower", "ratio", "peak RSS MiB fedmrg", "peak RSS MiB Flower", "ratio",
         "peak PSS MiB fedmrg", "peak PSS MiB Flower", "ratio"], main_rows)
    state = markdown_table(
        ["K", "rebuild s/client/round fedmrg", "rebuild s/client/round Flower",
         "of which stream open s", "of which restore s", "checkpoint save s (fedmrg / Flower)",
         "first batch s, rounds 2+ (fedmrg / Flower)", "client fit s (fedmrg / Flower)",
         "start-up s (fedmrg / Flower)", "down KiB/round (fedmrg / Flower)"], state_rows)
    return "\n\n".join([time_memory, state])


def markdown_report(record: Mapping[str, Any]) -> str:
    m = record["machine"]
    return "\n".join([
        "# fedmrg vs Flower's simulation engine", "",
        f"`{record['command']}` (in .venv-flower), flwr {m.get('flwr')}, ray {m.get('ray')}, "
        f"torch {m.get('torch')}; {m['nproc']} x {m['cpu']}, {m['mem_total_gib']} GiB; "
        f"load average {m.get('loadavg_start')} at the start, {m['loadavg']} at the end; "
        f"git {m.get('git_commit')}.", "",
        "Means over rounds (rounds 2+: without the first, whose streams start in both arms) "
        "and clients; peak memory over the rounds, above the driver alone before Ray starts, "
        "summed over the driver and the Ray processes (RSS counts shared pages in every "
        "process, PSS splits them). Rebuild: what a client does between rounds to be back "
        "where it was (Flower: build the model, open the stream, restore its checkpoint, "
        "close the stream after fit; fedmrg: nothing, the actors stay resident). Ratios are "
        "Flower / fedmrg. benchmarks/vs_flower.py's docstring says how each number is "
        "measured.", "",
        record["table"], ""])


# --------------------------------------------------------------------------- main


def dataset_config(cfg: Any, clients: int) -> Any:
    """`cfg` with a phantom benchmark of at least `clients` centers (module docstring)."""
    from fedmrg.choices import DataSource
    from fedmrg.config import replace_keys

    phantom = cfg.data.phantom
    if cfg.data.source != DataSource.PHANTOM or clients <= phantom.centers:
        return cfg
    return replace_keys(cfg, {"data.root": f"{cfg.data.root}-c{clients}",
                              "data.phantom.centers": clients})


def arm_order(arms: Sequence[str], index: int) -> list[str]:
    """The arms of the `index`-th K in the order they run: as given for the first K, then
    reversed every other K."""
    return list(arms) if index % 2 == 0 else list(reversed(arms))


def arm_config(cfg: Any, centers: list[str], run_name: str, storage: Path) -> Any:
    """The config of one arm: its centers, its own run (and so client checkpoint folders)."""
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, centers=centers),
        tracking=dataclasses.replace(cfg.tracking, run_name=run_name,
                                     storage_path=str(storage)))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--cluster-cpus", type=int, default=None,
                        help="logical CPUs of both arms' Ray cluster (default: "
                             "ceil(K * resources.num_cpus_per_client))")
    parser.add_argument("--sample-s", type=float, default=0.5,
                        help="memory sampling interval in seconds")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="config override section.key=value (default config otherwise)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = result_path(args.out, RESULT_NAME)

    versions: dict[str, str] = {}
    if "flower" in args.arms:
        try:
            import flwr
        except ImportError:
            raise SystemExit("flwr is not installed here: run this benchmark with "
                             ".venv-flower/bin/python (make flower-venv)") from None
        versions["flwr"] = flwr.__version__
    for module in (*WARM_IMPORTS, *(FLOWER_IMPORTS if "flower" in args.arms else ())):
        importlib.import_module(module)
    niceness = renice_to_workers()
    from fedmrg.config import load_config
    from fedmrg.data.prepare import ensure_dataset, participating_centers
    from fedmrg.data.shards import read_manifest
    from fedmrg.experiment import resolve_paths
    from fedmrg.fl.strategies import make_strategy

    machine = machine_info(**versions)
    started = time.perf_counter()
    overrides = [f"federation.rounds={args.rounds}", "federation.eval_every=0",
                 "data.stream_cpus_per_task=0", *args.overrides]
    cfg = make_strategy(resolve_paths(dataset_config(load_config("default", overrides),
                                                     max(args.clients)))).cfg
    root = str(ensure_dataset(cfg.data))
    available = participating_centers(cfg.data, read_manifest(root))
    for k in args.clients:
        if k > len(available):
            raise SystemExit(f"--clients {k}: the dataset at {root} has only "
                             f"{len(available)} participating centers {available}")
    if cfg.model.lm.startswith("builtin:"):
        from fedmrg.model.base_lm import builtin_build_info

        builtin_build_info(cfg.model)  # built once here, every client finds it in the cache
    results: list[dict[str, Any]] = []

    def save(complete: bool) -> dict[str, Any]:
        record = {"command": command_line("vs_flower.py", argv), "complete": complete,
                  "machine": machine_info(loadavg_start=machine["loadavg"],
                                          driver_niceness=niceness, **versions),
                  "args": vars(args), "config_overrides": overrides, "data_root": root,
                  "wall_s": time.perf_counter() - started, "results": results,
                  "table": tables(results) if results else ""}
        write_json(out, record)
        out.with_suffix(".md").write_text(markdown_report(record))
        return record

    run_arm = {"fedmrg": run_fedmrg, "flower": run_flower}
    storage = Path(tempfile.mkdtemp(prefix="vs_flower-"))
    try:
        for index, k in enumerate(args.clients):
            centers = available[:k]
            cpus = args.cluster_cpus or cluster_cpus(k, cfg.resources.num_cpus_per_client)
            print(f"K={k} clients ({', '.join(centers)}), {args.rounds} rounds of "
                  f"{cfg.train.local_steps} local steps, {cpus} logical CPUs", flush=True)
            order = arm_order(args.arms, index)
            result: dict[str, Any] = {"clients": k, "centers": centers, "rounds": args.rounds,
                                      "cluster_cpus": cpus, "order": order, "arms": {},
                                      "summary": {}}
            for name in order:
                arm_cfg = arm_config(cfg, centers, f"{name}-k{k}", storage)
                with TreeMemorySampler(args.sample_s) as sampler:
                    arm = run_arm[name](arm_cfg, root, centers, args.rounds, cpus, sampler)
                arm["memory_start"], arm["memory_end"] = sampler.samples[0], sampler.samples[-1]
                arm["memory_peak"] = sampler.peak()
                arm["processes_left_after_30_s"] = wait_for_children()
                result["arms"][name] = arm
                result["summary"][name] = arm_summary(arm, sampler.samples[0])
            if len(result["summary"]) == len(ARMS):
                result["ratios"] = ratios(result["summary"]["fedmrg"],
                                          result["summary"]["flower"])
            results.append(result)
            save(False)
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    record = save(True)
    print()
    print(record["table"])
    print(f"\nwrote {out} and {out.with_suffix('.md')}")
    return record


if __name__ == "__main__":
    main()
