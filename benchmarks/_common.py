"""What the benchmark scripts share: their environment, the machine they ran on, JSON output,
line fits, process memory, and timers inside the coordinator.

Import it before torch/transformers/Ray (`import _common` first: the scripts run as
`python benchmarks/<name>.py`, so this folder is on sys.path): it sets the environment those
libraries read when they start.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a missed hub call costs 25-50 s of retries
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine a spinning pool
# made a training step 5-9x slower under load (benchmarks/model_step.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


# --------------------------------------------------------------------------- the run's record


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mem_available_mib() -> float:
    """MemAvailable of the whole machine (what new processes can still get), MiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return math.nan


def git_commit() -> str | None:
    """The code's commit: $FEDMRG_GIT_COMMIT (set it when running from an exported tree, e.g.
    `git archive HEAD`), else `git rev-parse HEAD` here, with "+dirty" when the tracked
    files differ from it; None outside a checkout."""
    if os.environ.get("FEDMRG_GIT_COMMIT"):
        return os.environ["FEDMRG_GIT_COMMIT"]
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def machine_info(**extra: Any) -> dict[str, Any]:
    """nproc, CPU model, memory, OS, library versions and the load average right now (the
    machine may be shared: every number should be read next to the load it ran under)."""
    import torch

    total = math.nan
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            total = int(line.split()[1]) / 2**20
    info = {"nproc": os.cpu_count(), "cpu": _cpu_model(), "mem_total_gib": round(total, 1),
            "mem_available_gib": round(mem_available_mib() / 1024, 1),
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "loadavg": [round(x, 2) for x in os.getloadavg()], "git_commit": git_commit()}
    with contextlib.suppress(ImportError):
        import ray

        info["ray"] = ray.__version__
    info.update(extra)
    return info


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The command that reproduces a run (`argv` None: this process's own arguments)."""
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", f"benchmarks/{script}", *args])


def jsonable(obj: Any) -> Any:
    """Plain JSON values: paths as strings, numpy/torch scalars as numbers, NaN as None."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return jsonable(obj.item())
    return obj


def result_path(arg: Path | None, name: str) -> Path:
    """Where a benchmark writes its JSON: `--out` if given, else `$OUT/<name>` (the device
    machine's folder that comes back), else benchmarks/results/<name>."""
    if arg is not None:
        return arg
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / name
    return RESULTS / name


def _is_scalar(value: Any) -> bool:
    return not isinstance(value, (dict, list))


def _is_leaf_list(value: Any) -> bool:
    """A list of scalars, or of lists of scalars (a per-study item, a curve)."""
    return isinstance(value, list) and all(
        _is_scalar(v) or (isinstance(v, list) and all(map(_is_scalar, v))) for v in value)


def dumps_readable(value: Any, indent: int = 0) -> str:
    """JSON with objects indented two spaces a level and every leaf list on one line: a record's
    per-study items (thousands of numbers) take a line each instead of a line per number."""
    if isinstance(value, dict) and value:
        pad = " " * (indent + 2)
        items = [f"{pad}{json.dumps(k)}: {dumps_readable(v, indent + 2)}"
                 for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    if isinstance(value, list) and value and not _is_leaf_list(value):
        pad = " " * (indent + 2)
        return ("[\n" + ",\n".join(pad + dumps_readable(v, indent + 2) for v in value)
                + "\n" + " " * indent + "]")
    return json.dumps(value, separators=(", ", ": "))


def write_json(path: Path, record: dict[str, Any]) -> Path:
    """Write `record` as readable JSON (`dumps_readable`), atomically (a reader never sees half
    a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dumps_readable(jsonable(record)) + "\n")
    tmp.replace(path)
    return path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]],
                   align: str | None = None) -> str:
    """A markdown table; `align` one char per column, 'l' or 'r' (default: first l, rest r)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return math.nan
    return ordered[n // 2] if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])


# --------------------------------------------------------------------------- fits


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float]:
    """Least-squares y = intercept + slope * x, with R^2."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    slope = sxy / sxx if sxx else math.nan
    intercept = my - slope * mx
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return {"slope": slope, "intercept": intercept,
            "r2": 1 - ss_res / ss_tot if ss_tot else math.nan}


def growth_exponent(xs: Sequence[float], ys: Sequence[float]) -> float:
    """p of y ~ x^p (least squares in log-log): 1 is linear, 2 quadratic."""
    return fit_line([math.log(x) for x in xs], [math.log(y) for y in ys])["slope"]


# --------------------------------------------------------------------------- process memory


def process_memory_mib(pid: int | None = None) -> dict[str, float]:
    """Memory of one process (default: this one), MiB: rss now, rss_peak (VmHWM), and from
    smaps_rollup pss (shared pages split among the processes that map them) and uss (private
    pages only: what the process alone costs the machine)."""
    base = Path("/proc") / (str(pid) if pid else "self")
    out: dict[str, float] = {}
    for line in (base / "status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out["rss" if key == "VmRSS" else "rss_peak"] = int(value.split()[0]) / 1024
    private = 0
    with contextlib.suppress(OSError):
        for line in (base / "smaps_rollup").read_text().splitlines():
            key, _, value = line.partition(":")
            if key == "Pss":
                out["pss"] = int(value.split()[0]) / 1024
            elif key in ("Private_Clean", "Private_Dirty"):
                private += int(value.split()[0])
        out["uss"] = private / 1024
    return out


def match_niceness(actor_probes: dict[str, dict[str, Any]]) -> int:
    """Raise this process's niceness to the actors' (Ray starts workers at 15): on a machine
    shared with other work, a nice-0 driver would win CPU time the actors cannot, and a
    driver-side baseline or coordinator would look faster than it is. (The product's
    coordinator runs in an actor, at the same niceness.) Returns the niceness now."""
    target = max(p["niceness"] for p in actor_probes.values())
    current = os.nice(0)
    return os.nice(target - current) if target > current else current


def tree_memory_mib() -> dict[str, float]:
    """PSS and USS summed over this process and all its descendants (MiB), and their count.
    For a local Ray cluster started here that is the whole cluster: GCS, raylet (object store
    pages included in PSS), actors and Ray Data workers. Processes that vanish are skipped."""
    import psutil

    pss = uss = 0.0
    count = 0
    for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            mem = process_memory_mib(proc.pid)
        except OSError:
            continue
        pss += mem.get("pss", 0.0)
        uss += mem.get("uss", 0.0)
        count += 1
    return {"pss": pss, "uss": uss, "processes": count}


def _actor_probe(instance: Any) -> dict[str, Any]:
    import torch

    return {"pid": os.getpid(), "niceness": os.nice(0), "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), **process_memory_mib()}


def probe_actors(actors: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{id: pid, niceness, torch threads, OMP_NUM_THREADS, memory (`process_memory_mib`)} of
    each actor, read inside it through `actor.__ray_call__` (Ray calls fn(instance) there)."""
    import ray
    from ray import cloudpickle

    # this module is not importable in the actor (benchmarks/ is not a package): ship by value
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    by_actor: dict[Any, Any] = {}  # an actor hosting several clients is probed once
    for actor in actors.values():
        if actor not in by_actor:
            by_actor[actor] = actor.__ray_call__.remote(_actor_probe)
    return {k: ray.get(by_actor[a]) for k, a in actors.items()}


# --------------------------------------------------------------------------- coordinator timers


class Timers:
    """Accumulated wall seconds, CPU seconds of the calling thread (`time.thread_time`: not
    counting time the thread waited or was preempted) and calls per label, each exclusive of
    the timed calls nested inside."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._stack: list[list[float]] = []  # [start, cpu start, nested, nested cpu]

    def wrap(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            frame = [time.perf_counter(), time.thread_time(), 0.0, 0.0]
            self._stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                self._stack.pop()
                wall = time.perf_counter() - frame[0]
                cpu = time.thread_time() - frame[1]
                self.seconds[label] = self.seconds.get(label, 0.0) + wall - frame[2]
                self.cpu_seconds[label] = self.cpu_seconds.get(label, 0.0) + cpu - frame[3]
                self.calls[label] = self.calls.get(label, 0) + 1
                if self._stack:
                    self._stack[-1][2] += wall
                    self._stack[-1][3] += cpu

        timed.__wrapped__ = fn  # type: ignore[attr-defined]
        return timed


# What the coordinator's own time is made of: the callable, where it lives, and its label.
# `pool.wait` is the time blocked on the clients: NOT the coordinator's own.
WAIT = "wait (blocked on clients)"
COORDINATOR_PARTS = (
    ("strategy", "configure_round", "sampling"),
    ("strategy", "plan", "plans"),
    ("coordinator", "_wire_plans", "plans to wire dtype"),
    ("module", "message_bytes", "message_bytes"),
    ("pool", "submit_fit", "submit (ray.put + calls)"),
    ("pool", "wait", WAIT),
    ("pool", "result", "replies (ray.get)"),
    ("module", "validate_update", "validate_update"),
    ("module", "from_wire", "from_wire"),
    ("module", "bound_update_norm", "update norm bound"),
    ("pool", "rejoined", "restart probes"),
    ("strategy", "aggregate_round", "aggregate"),
    ("broadcast", "advance", "downlink delta (broadcast.advance)"),
)


@contextlib.contextmanager
def coordinator_timers(coordinator: Any) -> Iterator[Timers]:
    """Time the parts of `Coordinator.run_round` (COORDINATOR_PARTS) while the block runs, by
    wrapping them on the instance, its strategy and pool, and in fedmrg.fl.coordinator's
    namespace (what run_round calls); everything is restored on exit. The coordinator's own
    time of a round is its `round_time_s` minus `Timers.seconds[WAIT]`."""
    import fedmrg.fl.coordinator as module

    owners = {"strategy": coordinator.strategy, "coordinator": coordinator,
              "pool": coordinator.pool, "module": module,
              "broadcast": getattr(coordinator, "broadcast", None)}  # None: no low-rank downlink
    timers = Timers()
    patched: list[tuple[Any, str, bool, Any]] = []  # (owner, name, had own attribute, old)
    try:
        for owner_name, attr, label in COORDINATOR_PARTS:
            owner = owners[owner_name]
            if owner is None or not hasattr(owner, attr):  # e.g. a pool without restarts
                continue
            own = attr in vars(owner) if owner_name != "module" else True
            old = getattr(owner, attr)
            patched.append((owner, attr, own, vars(owner).get(attr) if own else None))
            setattr(owner, attr, timers.wrap(label, old))
        yield timers
    finally:
        for owner, attr, own, old in reversed(patched):
            if own:
                setattr(owner, attr, old)
            else:
                delattr(owner, attr)  # the class attribute shows again


@contextlib.contextmanager
def local_ray(resources: Any) -> Iterator[dict[str, float]]:
    """Ray as the product connects to it (`fedmrg.ray_cluster.connect`: RAY_ADDRESS or a
    local cluster with more logical CPUs than cores); shut down on exit if started here."""
    import ray

    from fedmrg.ray_cluster import connect

    started = not ray.is_initialized()
    try:
        yield connect(resources)
    finally:
        if started:
            ray.shutdown()


COORDINATOR_THREADS = 1  # the product's coordinator actor has num_cpus=0: Ray gives it
# OMP_NUM_THREADS=1 (ray._private.utils.set_omp_num_threads_if_unset), so torch uses 1 thread


def timed_step(coordinator: Any, threads: int = COORDINATOR_THREADS,
               ) -> tuple[Any, dict[str, float]]:
    """`coordinator.step()` under `coordinator_timers`, with torch on `threads` threads as in
    the product's coordinator actor: (RoundSummary, the round's time split).

    The split: round_s (`round_time_s`), wait_s (blocked on clients), own_s = round - wait
    (wall: on a busy machine it includes time the coordinator was preempted, e.g. by its own
    clients' training), own_cpu_s (CPU time of the coordinator's thread outside the wait:
    what its code costs, whatever the load), other_s (own wall time outside the labeled
    parts), and each part's wall seconds ("<part> s")."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with coordinator_timers(coordinator) as timers:
            cpu_started = time.thread_time()
            summary = coordinator.step()
            cpu = time.thread_time() - cpu_started
    finally:
        torch.set_num_threads(previous)
    wait = timers.seconds.get(WAIT, 0.0)
    parts = {k: v for k, v in timers.seconds.items() if k != WAIT}
    own = summary.round_time_s - wait
    split = {"round_s": summary.round_time_s, "wait_s": wait, "own_s": own,
             "own_cpu_s": cpu - timers.cpu_seconds.get(WAIT, 0.0),
             "other_s": own - sum(parts.values()), **{f"{k} s": v for k, v in parts.items()}}
    return summary, split
