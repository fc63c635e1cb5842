"""`exact` LoRA aggregation against the dense route (form the d x k product, take its SVD).

Usage: ``python benchmarks/aggregation.py [--sizes 1024 4096] [--clients 4 16 64]
[--ranks 8 16] [--dense-dtype float32] [--threads 1] [--device cpu]
[--out benchmarks/results/aggregation.json]``

For every (d = k, K clients, rank r): K random float32 client factor pairs A_k (r, k),
B_k (d, r) with random sample-count weights, then

- exact: `aggregate_lora_exact` (QR of the stacked factors + SVD of the (Kr x Kr) core, float64
  inside), timed as the median of up to 3 runs (1 when a run takes over 5 s);
- dense: M = [w_1 B_1 | ... | w_K B_K] @ [A_1; ...; A_K] (d x k) and `torch.linalg.svd(M,
  full_matrices=False)` truncated to r, in --dense-dtype (float32: the cheaper dense route; a
  float64 SVD of a 4096 x 4096 matrix takes minutes on 2 cores), timed ONCE per configuration;
- rel_diff: ||B A - M_r||_F / ||M_r||_F between the two results (float32 round-off of the dense
  route dominates it: the exact route works in float64).

Target (issue 6): at d = k = 4096, `exact` at least 10x faster than the dense route, for
every K and r (the speedup falls as K*r grows towards d: the QR and the core SVD cost
O(d (K r)^2 + (K r)^3)).

Prints a markdown table and writes the numbers as JSON with the machine (nproc, load average
before and after: the machine may be shared) and the command.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import _common  # noqa: F401  (first: sets the environment before torch loads)
import torch
from _common import RESULTS, command_line, machine_info, write_json

from fedmrg.fl.lowrank import aggregate_lora_exact, normalize_weights

DEFAULT_OUT = RESULTS / "aggregation.json"
TARGET_SIZE, TARGET_SPEEDUP = 4096, 10.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start


def client_factors(d: int, k: int, clients: int, rank: int, seed: int, device: torch.device):
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(rank, k, generator=g).to(device) for _ in range(clients)]
    Bs = [torch.randn(d, rank, generator=g).to(device) for _ in range(clients)]
    weights = torch.randint(50, 500, (clients,), generator=g).tolist()
    return As, Bs, weights


def dense_route(As, Bs, weights, rank: int, dtype: torch.dtype) -> torch.Tensor:
    """Form M (d, k) and take its thin SVD: the top-rank approximation M_r (d, k)."""
    w = normalize_weights(weights).tolist()
    B_stack = torch.cat([wi * b.to(dtype) for wi, b in zip(w, Bs, strict=True)], dim=1)  # (d, R)
    A_stack = torch.cat([a.to(dtype) for a in As], dim=0)  # (R, k)
    M = B_stack @ A_stack  # (d, k)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return (U[:, :rank] * S[:rank]) @ Vh[:rank]


def run_case(d: int, clients: int, rank: int, dense_dtype: torch.dtype, device: torch.device,
             seed: int) -> dict:
    As, Bs, weights = client_factors(d, d, clients, rank, seed, device)
    times = []
    for _ in range(3):
        (A, B), seconds = timed(lambda: aggregate_lora_exact(As, Bs, weights, rank), device)
        times.append(seconds)
        if seconds > 5:
            break
    exact_s = statistics.median(times)
    M_r, dense_s = timed(lambda: dense_route(As, Bs, weights, rank, dense_dtype), device)
    approx = B.double() @ A.double()
    rel_diff = float((approx - M_r.double()).norm() / M_r.double().norm())
    return {"d": d, "k": d, "clients": clients, "rank": rank, "stacked_rank": clients * rank,
            "exact_s": exact_s, "exact_runs": len(times), "dense_s": dense_s,
            "speedup": dense_s / exact_s, "rel_diff": rel_diff}


def markdown(rows: list[dict], dense_dtype: str) -> str:
    lines = [f"| d = k | K | r | K*r | exact s | dense ({dense_dtype}) s | speedup | rel diff |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['d']} | {r['clients']} | {r['rank']} | {r['stacked_rank']} | "
                     f"{r['exact_s']:.3f} | {r['dense_s']:.2f} | {r['speedup']:.1f}x | "
                     f"{r['rel_diff']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--clients", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--dense-dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads for both routes (1: on a loaded shared "
                             "2-core box 2 threads measured 10-100x slower, spin contention)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dense_dtype = getattr(torch, args.dense_dtype)
    torch.set_num_threads(args.threads)

    load_before = os.getloadavg()
    start = time.perf_counter()
    # warm up the linear-algebra libraries once, outside every timing
    aggregate_lora_exact(*client_factors(64, 64, 2, 4, 0, device), 4)
    dense_route(*client_factors(64, 64, 2, 4, 0, device), 4, dense_dtype)
    rows = []
    for d in args.sizes:
        for clients in args.clients:
            for rank in args.ranks:
                row = run_case(d, clients, rank, dense_dtype, device, args.seed)
                rows.append(row)
                print(f"d={d} K={clients} r={rank}: exact {row['exact_s']:.3f}s, dense "
                      f"{row['dense_s']:.2f}s, {row['speedup']:.1f}x, rel diff "
                      f"{row['rel_diff']:.1e}", flush=True)
    table = markdown(rows, args.dense_dtype)
    print()
    print(table)

    at_target = [r for r in rows if r["d"] == TARGET_SIZE]
    worst = min((r["speedup"] for r in at_target), default=None)
    target = {"d": TARGET_SIZE, "min_speedup": TARGET_SPEEDUP, "worst_speedup": worst,
              "met": worst is not None and worst >= TARGET_SPEEDUP}
    if worst is not None:
        print(f"\ntarget: exact >= {TARGET_SPEEDUP:g}x faster than the dense route at d = k = "
              f"{TARGET_SIZE}: worst {worst:.1f}x -> {'met' if target['met'] else 'MISSED'}")
    machine = machine_info(
        device=str(device), loadavg_before=[round(x, 2) for x in load_before],
        device_name=(torch.cuda.get_device_name(device) if device.type == "cuda"
                     else platform.processor() or platform.machine()))
    result = {"command": command_line("aggregation.py", argv), "machine": machine,
              "args": vars(args), "wall_s": round(time.perf_counter() - start, 1),
              "target": target, "results": rows, "table": table}
    write_json(args.out, result)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
