"""GPU pinning and a federated round on a GPU: two client actors sharing one GPU through Ray.

Usage: ``python benchmarks/gpu_round.py [--num-gpus 1] [--gpus-per-client 0.5] [--rounds 2]
[--local-steps 10] [--studies 60] [--lm-warmup-steps N] [--out PATH]``
(``--num-gpus 0`` runs the same thing on the CPU, clients asking for no GPU.)

What it does, in one process:
1. a local Ray: ``ray.init(num_cpus=8, num_gpus=N, include_dashboard=False)``;
2. the phantom benchmark in a temporary folder (2 centers x 60 studies, 64 px, no held-out
   center) and the default preset with ``device=auto``, ``resources.num_gpus_per_client=0.5``
   (two clients on one GPU), ``federation.rounds=2``, ``train.local_steps=10``, the builtin
   LM cached in the temporary folder (built once here, like ``Experiment.fit``);
3. the client actors (``start_client_actors``), a ``RayClientPool``, the strategy and a
   ``Coordinator`` whose rounds run through ``Coordinator.step()`` with ``eval_every=0``: no
   evaluation, so no METEOR/java is needed;
4. per client actor, through ``__ray_call__`` (Ray runs a closure on the actor instance, so
   nothing is added to the library): Ray's GPU ids, ``CUDA_VISIBLE_DEVICES``, the CUDA device
   name, the devices of the model's parameters and the GPU memory the actor holds, before and
   after the rounds; Ray's GPU accounting while both actors live;
5. per round: wall time, aggregation time, each client's fit time and losses, bytes up and
   down; at the end, whether every tensor of the aggregated global state is finite.

Writes JSON to ``$OUT/gpu_round.json`` when OUT is set (the device machine), else to
``benchmarks/results/gpu_round.json``; exits non-zero when a check fails (a client on the
wrong device, a non-finite global state), after writing the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from _common import result_path

from fedmrg.config import ExperimentConfig, load_config
from fedmrg.data.phantom import generate_phantom
from fedmrg.data.prepare import participating_centers
from fedmrg.experiment import client_layout, resolve_paths
from fedmrg.fl.actors import RayClientPool, start_client_actors, stop_actors
from fedmrg.fl.coordinator import Coordinator
from fedmrg.fl.strategies import make_strategy
from fedmrg.model.base_lm import builtin_build_info

RESULT_NAME = "gpu_round.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-gpus", type=float, default=1.0, help="GPUs Ray offers (0: CPU run)")
    p.add_argument("--gpus-per-client", type=float, default=None,
                   help="resources.num_gpus_per_client (default 0.5, or 0 with --num-gpus 0)")
    p.add_argument("--num-cpus", type=int, default=8)
    p.add_argument("--centers", type=int, default=2)
    p.add_argument("--studies", type=int, default=60, help="studies per center")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=None, help="data.batch_size (default: "
                                                                "the preset's)")
    p.add_argument("--lm-warmup-steps", type=int, default=None,
                   help="model.lm_warmup_steps of the builtin LM (default: the preset's)")
    p.add_argument("--strategy", default="fedmrg")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help=f"JSON path (default: $OUT/{RESULT_NAME}, else benchmarks/results/)")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace, tmp: Path, gpus_per_client: float
                 ) -> ExperimentConfig:
    """The default preset with this benchmark's overrides, paths absolute, strategy switches
    applied (as `Experiment.fit` does)."""
    overrides = [
        "device=auto", f"seed={args.seed}",
        f"data.root={tmp / 'data'}", f"data.phantom.centers={args.centers}",
        f"data.phantom.studies_per_center={args.studies}",
        f"data.phantom.image_size={args.image_size}", "data.phantom.heldout_center=false",
        f"resources.num_gpus_per_client={gpus_per_client}",
        f"federation.strategy={args.strategy}", f"federation.rounds={args.rounds}",
        "federation.eval_every=0", f"train.local_steps={args.local_steps}",
        f"model.lm_cache={tmp / 'lm'}",
        f"tracking.storage_path={tmp / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
        f"tracking.artifact_location={tmp / 'mlartifacts'}",
    ]
    if args.batch_size is not None:
        overrides.append(f"data.batch_size={args.batch_size}")
    if args.lm_warmup_steps is not None:
        overrides.append(f"model.lm_warmup_steps={args.lm_warmup_steps}")
    cfg = resolve_paths(load_config("default", overrides))
    return make_strategy(cfg).cfg


# --------------------------------------------------------------------------- actor probes


def probe_actor(host: Any, center: str) -> dict[str, Any]:
    """Runs INSIDE a client actor (`__ray_call__`): what Ray gave it and where `center`'s
    model is."""
    import os

    import ray
    import torch

    model = host.clients[center].model
    devices: dict[str, int] = {}
    for p in model.parameters():
        devices[str(p.device)] = devices.get(str(p.device), 0) + p.numel()
    cuda = torch.cuda.is_available()
    out = {
        "center": center,
        "pid": os.getpid(),
        "ray_gpu_ids": [str(i) for i in ray.get_gpu_ids()],
        "accelerator_gpu_ids": list(ray.get_runtime_context().get_accelerator_ids()
                                    .get("GPU", [])),
        "assigned_resources": ray.get_runtime_context().get_assigned_resources(),
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "cuda_available": cuda,
        "cuda_device_count": torch.cuda.device_count() if cuda else 0,
        "model_device": str(model.device),
        "param_elements_by_device": devices,
    }
    if cuda:
        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        out.update(cuda_current_device=index, cuda_device_name=torch.cuda.get_device_name(index),
                   cuda_total_memory_mib=props.total_memory / 2**20,
                   cuda_memory_allocated_mib=torch.cuda.memory_allocated(index) / 2**20,
                   cuda_max_memory_allocated_mib=torch.cuda.max_memory_allocated(index) / 2**20,
                   cuda_uuid=str(getattr(props, "uuid", "")))
    return out


def probe_all(actors: dict[str, Any]) -> dict[str, dict[str, Any]]:
    refs = {c: a.__ray_call__.remote(probe_actor, c) for c, a in actors.items()}
    return {c: ray.get(r) for c, r in refs.items()}


# --------------------------------------------------------------------------- checks


def pinning_checks(probes: dict[str, dict], gpus_per_client: float) -> dict[str, bool]:
    """What must hold of every client: a GPU from Ray iff it asked for one, and then its whole
    model on that GPU; else its whole model on the CPU."""
    checks = {}
    for center, p in probes.items():
        on = set(p["param_elements_by_device"])
        if gpus_per_client > 0:
            checks[f"{center}: Ray assigned one GPU"] = len(p["ray_gpu_ids"]) == 1
            checks[f"{center}: CUDA_VISIBLE_DEVICES is Ray's GPU id"] = (
                p["CUDA_VISIBLE_DEVICES"] == ",".join(p["ray_gpu_ids"]))
            checks[f"{center}: sees exactly one CUDA device"] = p["cuda_device_count"] == 1
            checks[f"{center}: every parameter on cuda"] = bool(on) and all(
                d.startswith("cuda") for d in on)
        else:
            checks[f"{center}: no GPU assigned"] = not p["ray_gpu_ids"]
            checks[f"{center}: every parameter on cpu"] = on == {"cpu"}
    if gpus_per_client > 0 and gpus_per_client * len(probes) <= 1:
        ids = {tuple(p["ray_gpu_ids"]) for p in probes.values()}
        checks["clients share one GPU (same Ray GPU id)"] = len(ids) == 1
    return checks


def state_report(state: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    if state is None:
        return {"tensors": 0, "elements": 0, "all_finite": None}
    bad = [n for n, t in state.items() if not bool(torch.isfinite(t.float()).all())]
    return {"tensors": len(state), "elements": int(sum(t.numel() for t in state.values())),
            "bytes": int(sum(t.numel() * t.element_size() for t in state.values())),
            "dtypes": sorted({str(t.dtype) for t in state.values()}),
            "devices": sorted({str(t.device) for t in state.values()}),
            "norm": float(math.sqrt(sum(float(t.float().pow(2).sum()) for t in state.values()))),
            "non_finite": bad[:10], "all_finite": not bad}


def round_row(summary: Any, centers: list[str]) -> dict[str, Any]:
    row = summary.to_dict()
    metrics = row["metrics"]
    per_client = {c: {k.split("/", 1)[1]: v for k, v in metrics.items()
                      if k.startswith(f"{c}/")} for c in centers}
    fit_s = [v["fit_s"] for v in per_client.values() if "fit_s" in v]
    return {"round_id": row["round_id"], "round_time_s": row["round_time_s"],
            # > 1: the clients' fits overlapped in time (they ran at once, sharing the GPU)
            "sum_fit_s_over_round_s": sum(fit_s) / row["round_time_s"] if fit_s else None,
            "aggregation_time_s": row["aggregation_time_s"],
            "participants": row["participants"], "rejected": row["rejected"],
            "bytes_up": row["bytes_up"], "bytes_down": row["bytes_down"],
            "dense_equivalent_up": row["dense_equivalent_up"],
            "loss": metrics.get("loss"), "per_client": per_client,
            "round_metrics": {k: v for k, v in metrics.items() if "/" not in k}}


def machine() -> dict[str, Any]:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "ray": ray.__version__, "nproc": os.cpu_count(), "platform": platform.platform(),
            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info.update(cuda=torch.version.cuda, gpus=[torch.cuda.get_device_name(i)
                                                   for i in range(torch.cuda.device_count())])
    return info


# --------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict[str, Any]:
    gpus_per_client = args.gpus_per_client
    if gpus_per_client is None:
        gpus_per_client = 0.5 if args.num_gpus > 0 else 0.0
    started = time.perf_counter()
    result: dict[str, Any] = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                              "machine": machine(), "checks": {}}
    with tempfile.TemporaryDirectory(prefix="fedmrg-gpu-round-") as tmp_name:
        tmp = Path(tmp_name)
        cfg = build_config(args, tmp, gpus_per_client)
        t = time.perf_counter()
        manifest = generate_phantom(cfg.data.root, centers=args.centers,
                                    studies_per_center=args.studies,
                                    image_size=args.image_size, seed=cfg.data.phantom.seed,
                                    heldout_center=False)
        result["phantom_s"] = time.perf_counter() - t
        t = time.perf_counter()
        result["base_lm"] = {k: v for k, v in builtin_build_info(cfg.model).items()
                             if not isinstance(v, (list, dict))}
        result["base_lm_s"] = time.perf_counter() - t
        centers = participating_centers(cfg.data, manifest)
        result["config"] = {"device": cfg.device, "strategy": cfg.federation.strategy,
                            "num_gpus_per_client": cfg.resources.num_gpus_per_client,
                            "num_cpus_per_client": cfg.resources.num_cpus_per_client,
                            "rounds": cfg.federation.rounds,
                            "local_steps": cfg.train.local_steps,
                            "batch_size": cfg.data.batch_size, "centers": centers,
                            "studies_per_center": args.studies, "image_size": args.image_size,
                            "wire_dtype": cfg.federation.wire_dtype,
                            "aggregation": cfg.federation.aggregation}

        ray.init(num_cpus=args.num_cpus, num_gpus=args.num_gpus, include_dashboard=False,
                 log_to_driver=True)
        actors: dict[str, Any] = {}
        try:
            result["ray_cluster_resources"] = ray.cluster_resources()
            t = time.perf_counter()
            actors, placement = start_client_actors(
                cfg, client_layout(cfg.federation.strategy, centers),
                dataset_root=cfg.data.root, seed=cfg.seed)
            result["actors_start_s"] = time.perf_counter() - t
            result["placement"] = placement
            result["ray_available_gpu_with_actors"] = ray.available_resources().get("GPU", 0.0)
            result["probe_before"] = probe_all(actors)

            pool = RayClientPool(actors)
            strategy = make_strategy(cfg)
            first = pool.centers()[0]
            initial = pool.call_all("shared_state", centers=[first])[first]
            coordinator = Coordinator(cfg, strategy, pool, initial,
                                      rng=np.random.default_rng(cfg.seed))
            result["rounds"] = []
            for _ in range(cfg.federation.rounds):
                summary = coordinator.step()  # eval_every=0: no evaluation in between
                row = round_row(summary, pool.centers())
                result["rounds"].append(row)
                print(f"round {row['round_id']}: {row['round_time_s']:.2f} s, loss "
                      f"{row['loss']}, up {row['bytes_up']} B, down {row['bytes_down']} B",
                      flush=True)
            result["global_state_puts"] = pool.puts
            result["global_state"] = state_report(strategy.global_state())
            result["probe_after"] = probe_all(actors)
        finally:
            if actors:
                stop_actors(actors.values())
            ray.shutdown()

    checks = pinning_checks(result["probe_after"], gpus_per_client)
    checks["global state all finite"] = bool(result["global_state"]["all_finite"])
    checks["every round: every client aggregated"] = all(
        sorted(r["participants"]) == sorted(centers) and not r["rejected"]
        for r in result["rounds"])
    checks["losses finite"] = all(r["loss"] is not None and math.isfinite(r["loss"])
                                  for r in result["rounds"])
    result["checks"] = checks
    result["ok"] = all(checks.values())
    result["wall_s"] = time.perf_counter() - started
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = result_path(args.out, RESULT_NAME)
    result = run(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    for name, ok in result["checks"].items():
        print(f"[{'ok' if ok else 'FAIL'}] {name}")
    for center, p in result["probe_after"].items():
        print(f"client {center}: Ray GPU ids {p['ray_gpu_ids']}, CUDA_VISIBLE_DEVICES="
              f"{p['CUDA_VISIBLE_DEVICES']}, {p.get('cuda_device_name', 'no CUDA')}, params on "
              f"{sorted(p['param_elements_by_device'])}")
    print(f"wrote {out} ({result['wall_s']:.1f} s)")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
