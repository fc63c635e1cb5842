"""Rounds with 2 to 32 client actors of the tiny model on one machine: round time, the
coordinator's own time per client, memory per actor.

Usage: ``python benchmarks/scale.py [--clients 2 4 8 16 32] [--clients-per-actor 1]
[--stub-clients 2 4 ... 128] [--rounds 3] [--steps 2] [--cpus-per-client 0.05]
[--reserve-gib 4] [--set section.key=value ...] [--out benchmarks/results/scale.json]``

The default config (tiny CPU model, phantom benchmark, fedmrg, exact aggregation) with
`train.local_steps = --steps` and `resources.num_cpus_per_client = --cpus-per-client`, so 32
actors fit in the local cluster's logical CPUs and leave room for their Ray Data tasks. The
phantom benchmark has 4 training centers; client i trains on center `centers[i mod 4]`'s data
(`centers_for_data`), under its own id `c<i>`: several clients read the same center (same
data, same work), the federation sees K distinct clients.

Clients are started once and added as K grows (2, then 2 more, then 4 more, ...), through the
product's `start_client_actors`, `--clients-per-actor` to an actor
(`resources.clients_per_actor`: one actor trains its clients in turn, so K clients pay the
libraries' memory K / clients-per-actor times; each addition starts its own actors); before
each addition the machine's MemAvailable must stay above `--reserve-gib` after the new
clients (at the footprint per client measured so far; the machine is shared), else the run
stops there and says how far it went (the footprint: PSS of this process tree, i.e. the
local cluster, per added client). For each K: a fresh strategy and
`Coordinator` over a `RayClientPool` of the first K actors, run here in the driver (the
product's `in_process` mode), `--rounds` rounds; the first round is a warm-up (new actors
decode their stream's first epoch) and the medians are over the others:

- round wall time (`RoundSummary.round_time_s`) and the slowest client's `fit_s`;
- the coordinator's own time (round time minus the time blocked waiting on clients; timed
  inside it with `_common.coordinator_timers`: plans, message_bytes, ray.put and submits,
  ray.get of replies, validation, norm bound, aggregation), in all and per client;
- memory of every actor, read inside it (`_common.probe_actors`): peak RSS (VmHWM), USS
  (private pages: what one more actor costs) and PSS; and the growth of the summed PSS of
  this process tree (the local cluster: actors, Ray Data workers, object store) since before
  the first actor. (The machine's MemAvailable is shared with other work: only the guard
  reads it.)

The coordinator's own cost is also measured past what memory allows for actors: the same
`Coordinator` over an `InProcessPool` of K stub clients (`--stub-clients`, up to 128) that
answer each plan at once with a ClientUpdate of the model's real shapes (one built as a
client builds it, `comm.client_update`, the others copies scaled per client): every reply
costs the coordinator what a trained client's does (bytes, validation, norm, aggregation),
with no training and no transport.

The coordinator's own time is measured as wall time (round minus wait) and as the CPU time
of its thread outside the wait (`_common.timed_step`): on 2 shared cores the wall time also
counts the coordinator preempted by its K training clients and by other work. A line
own = a + b K is fitted for each series, and the growth exponent p of own ~ K^p (log-log,
over all K and over the larger half); requirement (issue 6): the coordinator's own cost
grows no worse than linearly, taken as p <= 1.15 on CPU time for both (noise margin on a
shared machine). Prints tables and JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import _common  # noqa: F401  (first: sets the environment before torch loads)
import numpy as np
from _common import (
    RESULTS,
    command_line,
    fit_line,
    growth_exponent,
    local_ray,
    machine_info,
    markdown_table,
    match_niceness,
    median,
    mem_available_mib,
    probe_actors,
    timed_step,
    tree_memory_mib,
    write_json,
)

from fedmrg.config import ExperimentConfig, load_config
from fedmrg.data.prepare import ensure_dataset, participating_centers
from fedmrg.data.shards import read_manifest
from fedmrg.experiment import resolve_paths
from fedmrg.fl.actors import RayClientPool, start_client_actors, stop_actors
from fedmrg.fl.coordinator import Coordinator, InProcessPool
from fedmrg.fl.failure import ClientFailure
from fedmrg.fl.lowrank import ErrorFeedback, LowRankUpdate
from fedmrg.fl.strategies import make_strategy
from fedmrg.model.mrg import MRGModel
from fedmrg.model.params import get_shared_state

DEFAULT_OUT = RESULTS / "scale.json"
MAX_EXPONENT = 1.15
FIRST_CLIENT_GUESS_MIB = 1100.0  # footprint assumed before any client was measured


def client_ids(n: int) -> list[str]:
    return [f"c{i:02d}" for i in range(n)]


def run_rounds(cfg: ExperimentConfig, actors: dict[str, Any], rounds: int) -> list[dict]:
    """`rounds` rounds of a fresh coordinator over `actors`, each with its time split."""
    pool = RayClientPool(actors)
    first = pool.centers()[0]
    initial = pool.call_all("shared_state", centers=[first])[first]
    coordinator = Coordinator(cfg, make_strategy(cfg), pool, initial,
                              np.random.default_rng(cfg.seed))
    out = []
    for _ in range(rounds):
        summary, split = timed_step(coordinator)
        if summary.rejected:
            raise RuntimeError(f"round {summary.round_id}: rejected {summary.rejected}")
        fits = [summary.metrics[f"{c}/fit_s"] for c in summary.participants]
        out.append({**split,
                    "max_fit_s": max(fits), "mean_fit_s": sum(fits) / len(fits),
                    "bytes_up": summary.bytes_up, "bytes_down": summary.bytes_down})
    return out


def summarize(k: int, rounds: list[dict], probes: dict[str, dict], cluster_mib: float,
              start_s: float) -> dict[str, Any]:
    timed = rounds[1:] or rounds  # the first round warms new actors up
    parts = [key for key in timed[0] if key.endswith(" s") or key == "other_s"]
    own = median([r["own_s"] for r in timed])
    by_actor = {p["pid"]: p for p in probes.values()}  # an actor hosting n clients: once
    return {
        "clients": k, "start_new_actors_s": start_s,
        "own_cpu_s": median([r["own_cpu_s"] for r in timed]),
        "round_s": median([r["round_s"] for r in timed]),
        "max_fit_s": median([r["max_fit_s"] for r in timed]),
        "own_s": own, "own_per_client_s": own / k,
        "own_parts_s": {p: median([r[p] for r in timed]) for p in parts},
        "actor_rss_peak_mib_max": max(p["rss_peak"] for p in by_actor.values()),
        "actor_rss_peak_mib_mean": float(np.mean([p["rss_peak"] for p in by_actor.values()])),
        "actor_uss_mib_mean": float(np.mean([p["uss"] for p in by_actor.values()])),
        "actor_pss_mib_mean": float(np.mean([p["pss"] for p in by_actor.values()])),
        "cluster_mem_mib": cluster_mib,  # PSS growth of this process tree since no actor
        "cluster_mem_per_actor_mib": cluster_mib / len(by_actor),
        "cluster_mem_per_client_mib": cluster_mib / len(probes),
        "actors_alive": len(by_actor), "clients_alive": len(probes), "rounds": rounds,
        "probes": probes,
    }


def split_table(title: str, results: list[dict[str, Any]]) -> str:
    parts = sorted({p for r in results for p in r["own_parts_s"]})
    return markdown_table([f"{title} (median ms per round)",
                           *(f"K={r['clients']}" for r in results)],
                          [[p.removesuffix(" s"), *(f"{1000 * r['own_parts_s'].get(p, 0):.1f}"
                                                    for r in results)] for p in parts])


def tables(results: list[dict[str, Any]], stubs: list[dict[str, Any]]) -> str:
    out = []
    if results:
        out.append(markdown_table(
            ["clients (actors)", "round s", "slowest fit s", "coordinator own s (wall)",
             "own CPU s", "own per client ms", "actor peak RSS MiB (max)",
             "actor USS MiB (mean)", "cluster memory GiB", "per added client MiB"],
            [[f"{r['clients']} ({r['actors_alive']})", f"{r['round_s']:.2f}",
              f"{r['max_fit_s']:.2f}",
              f"{r['own_s']:.3f}", f"{r['own_cpu_s']:.3f}",
              f"{1000 * r['own_per_client_s']:.1f}",
              f"{r['actor_rss_peak_mib_max']:.0f}", f"{r['actor_uss_mib_mean']:.0f}",
              f"{r['cluster_mem_mib'] / 1024:.1f}",
              f"{r['marginal_mem_per_new_client_mib']:.0f}"] for r in results]))
        out.append(split_table("coordinator part, actors", results))
    if stubs:
        out.append(markdown_table(
            ["clients (in-process stubs)", "coordinator own s (wall)", "own CPU s",
             "own per client ms"],
            [[r["clients"], f"{r['own_s']:.3f}", f"{r['own_cpu_s']:.3f}",
              f"{1000 * r['own_per_client_s']:.1f}"] for r in stubs]))
        out.append(split_table("coordinator part, stubs", stubs))
    return "\n\n".join(out)


class StubClient:
    """Answers `fit(plan)` at once with a ClientUpdate of the model's real shapes, built once
    as a client builds it (`comm.client_update`): the coordinator's work per reply is a
    trained client's, with no training and no transport."""

    def __init__(self, update: Any):
        self.update = update

    def fit(self, plan: Any) -> Any:
        return dataclasses.replace(self.update, round_id=plan.round_id)


def scaled_update(update: Any, center: str, factor: float) -> Any:
    """`update` from `center` with every floating tensor times `factor` (new tensors)."""
    def scale(t: Any) -> Any:
        if isinstance(t, LowRankUpdate):
            return LowRankUpdate(t.U * factor, t.V.clone(), t.shape)
        return t * factor if t.is_floating_point() else t.clone()

    return dataclasses.replace(
        update, center=center, lora={n: scale(t) for n, t in update.lora.items()},
        dense={n: scale(t) for n, t in update.dense.items()},
        statistics={n: scale(t) for n, t in update.statistics.items()})


def stub_rounds(cfg: ExperimentConfig, ks: list[int], rounds: int) -> list[dict[str, Any]]:
    """The coordinator's own time for K stub clients in process (`InProcessPool`), K in ks."""
    import torch
    from comm import client_update

    initial = get_shared_state(MRGModel.from_config(cfg.model, seed=cfg.seed))
    rng = torch.Generator().manual_seed(cfg.seed)
    # one update built as a client builds it (an SVD per dense tensor); the others are copies
    # scaled per client (distinct values, the same shapes and work for the coordinator)
    template = client_update(cfg, "template", initial, 1, rng, ErrorFeedback())
    updates = {c: scaled_update(template, c, 1.0 + i / 1000)
               for i, c in enumerate(client_ids(max(ks)))}
    out = []
    for k in sorted(ks):
        pool = InProcessPool({c: StubClient(updates[c]) for c in client_ids(k)})
        coordinator = Coordinator(cfg, make_strategy(cfg), pool, initial,
                                  np.random.default_rng(cfg.seed))
        runs = []
        for _ in range(rounds):
            summary, split = timed_step(coordinator)
            if summary.rejected:
                raise RuntimeError(f"stub round {summary.round_id}: {summary.rejected}")
            runs.append(split)
        timed = runs[1:] or runs
        own = median([r["own_s"] for r in timed])
        parts = [key for key in timed[0] if key.endswith(" s") or key == "other_s"]
        out.append({"clients": k, "own_s": own, "own_per_client_s": own / k,
                    "own_cpu_s": median([r["own_cpu_s"] for r in timed]),
                    "own_parts_s": {p: median([r[p] for r in timed]) for p in parts},
                    "rounds": runs})
        print(f"stub K={k}: coordinator own {own:.3f} s ({1000 * own / k:.1f} ms/client)",
              flush=True)
    return out


def growth(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Linear fits and growth exponents of the coordinator's own time over K, wall and CPU;
    judged on CPU time (wall time on 2 shared cores also counts the coordinator preempted
    by its own K training clients and by other work)."""
    if len(results) < 2:
        return None
    ks = [r["clients"] for r in results]
    out: dict[str, Any] = {}
    for key in ("own_s", "own_cpu_s"):
        ys = [r[key] for r in results]
        out[key] = {"linear_fit": fit_line(ks, ys), "exponent": growth_exponent(ks, ys),
                    "exponent_upper_half": (growth_exponent(ks[len(ks) // 2:],
                                                            ys[len(ks) // 2:])
                                            if len(ks) >= 4 else None)}
    out["met"] = out["own_cpu_s"]["exponent"] <= MAX_EXPONENT and (
        out["own_cpu_s"]["exponent_upper_half"] is None
        or out["own_cpu_s"]["exponent_upper_half"] <= MAX_EXPONENT)
    return out


def growth_line(name: str, g: dict[str, Any] | None) -> str:
    if g is None:
        return f"{name}: fewer than 2 settings, no fit"
    parts = []
    for key, what in (("own_cpu_s", "CPU"), ("own_s", "wall")):
        line, e = g[key]["linear_fit"], g[key]
        upper = ("" if e["exponent_upper_half"] is None
                 else f", {e['exponent_upper_half']:.2f} over the larger half")
        parts.append(f"{what}: {1000 * line['intercept']:.0f} ms + "
                     f"{1000 * line['slope']:.1f} ms x K (R^2 {line['r2']:.3f}), exponent "
                     f"{e['exponent']:.2f}{upper}")
    return (f"{name}: coordinator own time, {'; '.join(parts)} (no worse than linear: CPU "
            f"exponent <= {MAX_EXPONENT}) -> {'met' if g['met'] else 'MISSED'}")


def actor_runs(cfg: ExperimentConfig, root: str, centers: list[str], ks: list[int],
               rounds: int, reserve_gib: float, renice: bool = True,
               ) -> tuple[list[dict[str, Any]], str | None]:
    """Real clients in actors, added as K grows (module docstring); (rows, why it stopped)."""
    results: list[dict[str, Any]] = []
    tree_before = tree_memory_mib()["pss"]
    actors: dict[str, Any] = {}
    per_client = FIRST_CLIENT_GUESS_MIB
    try:
        for k in sorted(ks):
            new = [c for c in client_ids(k) if c not in actors]
            left = mem_available_mib() - len(new) * per_client
            if left < reserve_gib * 1024:
                return results, (f"stopped before K={k}: {len(new)} more clients at "
                                 f"{per_client:.0f} MiB each would leave {left / 1024:.1f} "
                                 f"GiB of the machine's memory available (< --reserve-gib "
                                 f"{reserve_gib:g}; the machine is shared)")
            print(f"K={k}: starting {len(new)} clients, "
                  f"{cfg.resources.clients_per_actor} per actor", flush=True)
            tree_start = tree_memory_mib()["pss"]
            t0 = time.perf_counter()
            try:
                more, _ = start_client_actors(
                    cfg, {c: [centers[int(c[1:]) % len(centers)]] for c in new},
                    dataset_root=root, seed=cfg.seed)
            except ClientFailure as e:
                return results, f"stopped at K={k}: {e}"
            start_s = time.perf_counter() - t0
            actors.update(more)
            if renice:  # the product's coordinator actor runs at the actors' niceness
                match_niceness(probe_actors(more))
            try:
                rounds_out = run_rounds(cfg, {c: actors[c] for c in client_ids(k)}, rounds)
            except Exception as e:  # e.g. an actor killed for memory: say how far it went
                return results, f"stopped at K={k}: {type(e).__name__}: {str(e)[:500]}"
            probes = probe_actors(actors)
            tree = tree_memory_mib()
            # the next guard's footprint per client: the marginal one of this addition (the
            # first addition also carries the cluster's fixed processes: an overestimate)
            per_client = (tree["pss"] - tree_start) / len(new)
            row = summarize(k, rounds_out, probes, tree["pss"] - tree_before, start_s)
            row["mem_available_gib"] = mem_available_mib() / 1024
            row["marginal_mem_per_new_client_mib"] = per_client
            results.append(row)
            print(f"K={k}: round {row['round_s']:.2f} s, coordinator own {row['own_s']:.3f} s "
                  f"({1000 * row['own_per_client_s']:.1f} ms/client), actor peak RSS "
                  f"{row['actor_rss_peak_mib_max']:.0f} MiB, cluster "
                  f"{row['cluster_mem_mib'] / 1024:.1f} GiB for {row['actors_alive']} actors "
                  f"hosting {len(actors)} clients; load "
                  f"{os.getloadavg()[0]:.1f}", flush=True)
    finally:
        stop_actors(actors.values())
    return results, None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--clients-per-actor", type=int,
                        help="resources.clients_per_actor (default: the config's)")
    parser.add_argument("--stub-clients", type=int, nargs="*",
                        default=[2, 4, 8, 16, 32, 64, 128],
                        help="K of the in-process stub runs (none: skip them)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per K (first: warm-up)")
    parser.add_argument("--steps", type=int, default=2, help="train.local_steps")
    parser.add_argument("--cpus-per-client", type=float, default=0.05,
                        help="resources.num_cpus_per_client")
    parser.add_argument("--reserve-gib", type=float, default=4.0,
                        help="MemAvailable to leave free on this (shared) machine")
    parser.add_argument("--keep-niceness", action="store_true",
                        help="do not raise this process's niceness to the actors' (tests)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="config override section.key=value")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    machine = machine_info()
    started = time.perf_counter()
    overrides = [f"train.local_steps={args.steps}",
                 f"resources.num_cpus_per_client={args.cpus_per_client}",
                 *([f"resources.clients_per_actor={args.clients_per_actor}"]
                   if args.clients_per_actor else []), *args.overrides]
    cfg = make_strategy(resolve_paths(load_config("default", overrides))).cfg

    with local_ray(cfg.resources) as cluster:
        root = str(ensure_dataset(cfg.data))
        centers = participating_centers(cfg.data, read_manifest(root))
        if cfg.model.lm.startswith("builtin:"):
            from fedmrg.model.base_lm import builtin_build_info

            builtin_build_info(cfg.model)  # as Experiment.fit: built once, actors read it
        results, stopped = actor_runs(cfg, root, centers, args.clients, args.rounds,
                                      args.reserve_gib, renice=not args.keep_niceness)
        # after the actors: at their niceness, and with their memory given back
        stubs = stub_rounds(cfg, args.stub_clients, args.rounds) if args.stub_clients else []

    actor_growth, stub_growth = growth(results), growth(stubs)
    met = all(g is None or g["met"] for g in (actor_growth, stub_growth)) and bool(
        actor_growth or stub_growth)
    reached = max((r["clients"] for r in results), default=0)
    text = tables(results, stubs)
    print()
    print(text)
    print()
    print(growth_line("actors", actor_growth))
    print(growth_line("stub clients", stub_growth))
    print(f"actors: reached K={reached} of {max(args.clients)}"
          + (f"; {stopped}" if stopped else ""))
    record = {"command": command_line("scale.py", argv),
              "machine": machine_info(loadavg_start=machine["loadavg"],
                                      mem_available_start_gib=machine["mem_available_gib"],
                                      ray_cluster_cpus=cluster.get("CPU")),
              "args": vars(args), "wall_s": time.perf_counter() - started,
              "target": {"max_exponent": MAX_EXPONENT, "met": met, "actors": actor_growth,
                         "stub_clients": stub_growth, "reached_clients": reached,
                         "requested_clients": max(args.clients), "stopped": stopped},
              "results": results, "stub_results": stubs, "table": text}
    write_json(args.out, record)
    print(f"wrote {args.out}")
    return record


if __name__ == "__main__":
    main()
