"""Bytes per client per round, up and down: fedmrg against dense FedAvg and the full model.

Usage: ``python benchmarks/comm.py [--ranks 4 8 16] [--aggregations exact fedavg]
[--wires fp32 bf16] [--clients 4] [--scales default paper] [--seed 0]
[--set section.key=value ...] [--out benchmarks/results/comm.json]``

Two scales:

- default (the CPU model of `fedmrg/configs/default.yaml`, built for real): the messages are
  built as a round makes them and counted with `fedmrg.fl.wire.message_bytes` (tensor data +
  names + scalars). Down: the strategy's round-2 `RoundPlan` (global state, merged prototypes,
  global label prior) cast to the wire dtype as the coordinator does (`to_wire`). Up: a
  `ClientUpdate` as `FederatedClient.fit` builds it (generic LoRA factors as trained, every
  other shared tensor's update through `ErrorFeedback.compress_all` at
  `federation.dense_update_rank`, those under `federation.whole_tensors` whole, prototypes,
  label counts, metrics), from a seeded random
  perturbation of the model's shared state (the bytes depend on shapes only), after
  `--clients` such updates went through the strategy's real `aggregate_round`.
- paper (Swin-B + a 7B Llama-architecture decoder, `fedmrg/configs/paper.yaml`, built on the
  meta device by `benchmarks/model_step.py`'s `paper_model`): from tensor shapes
  (`model_step.communication` for the upload). The default scale checks the shape formula
  against the counted messages (`shape_check`).

Columns, per client per round (a `rank r` row sets model.lora_rank,
federation.dense_update_rank and federation.download_rank to r; `exact` and `fedavg` LoRA
aggregation send the same bytes):

- up: what a client sends.
- down (delta): the downlink of a client that holds the previous round's state
  (`fl.broadcast`: `StateBroadcast.advance` after the round's aggregation, in the plan's
  `global_delta`): the new generic LoRA factors and small tensors as they are, every other
  shared tensor's change as a rank-`download_rank` `LowRankUpdate` (server-side error
  feedback keeps the rest for later rounds).
- down (full): the whole global shared state in the plan: what a client that missed a delta
  (first round, not sampled, restarted) gets, and what every client got before the downlink.
- down (lossless), JSON only: the dense tensors' aggregate as the stacked client factors
  (rank K*r, exact for `server_optimizer: none`; it grows with the clients K).
- dense FedAvg: full fine-tuning of the same trainable modules, sent dense both ways (each
  LoRA pair as its d x k weight, every other shared tensor as it is): the uploads'
  `dense_equivalent_bytes`.
- fedavg strategy: the product's `fedavg` baseline (LoRA factors + dense shared updates).
- full model: every parameter (and shared buffer) of the model, in the wire dtype.

Per-client GPU memory at paper scale (``--memory``, written to benchmarks/results/memory.json
instead): one row per way of loading the frozen 7B decoder (float32, bfloat16, bfloat16 with
gradient checkpointing, 4-bit and 8-bit quantized with checkpointing), estimated from the
shapes of the meta-device paper model by `fedmrg.model.memory.training_memory` (its
docstring says what each part counts). benchmarks/gpu_scale.py measures the peak on a GPU.

Target (issue 6): a round under 1% of the full model at paper scale, judged on up + down
(delta) per client, against the full model in the same wire dtype; up + down (full) is
reported beside it (a client's round after it missed one). Prints tables and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import _common  # noqa: F401  (first: sets the environment before torch loads)
import numpy as np
import torch
from _common import RESULTS, command_line, machine_info, markdown_table, write_json
from model_step import WIRE_BYTES, communication, paper_model

from fedmrg.config import ExperimentConfig, load_config
from fedmrg.fl.broadcast import StateBroadcast
from fedmrg.fl.lowrank import (
    ErrorFeedback,
    LowRankUpdate,
    factorizes,
    is_lora_factor,
    lora_pairs,
    matrix_shape,
    normalize_weights,
)
from fedmrg.fl.messages import ClientUpdate, RoundPlan
from fedmrg.fl.strategies import make_strategy
from fedmrg.fl.wire import from_wire, message_bytes, to_wire, wire_quantization
from fedmrg.model.mrg import MRGModel
from fedmrg.model.params import describe_parameter_groups, get_shared_state

DEFAULT_OUT = RESULTS / "comm.json"
MEMORY_OUT = RESULTS / "memory.json"
# (setting, overrides of the paper preset): how the frozen base LM is held
MEMORY_SETTINGS = (
    ("float32", ["model.lm_dtype=float32", "model.gradient_checkpointing=false"]),
    ("bfloat16", ["model.lm_dtype=bfloat16", "model.gradient_checkpointing=false"]),
    ("bfloat16 + checkpointing", ["model.lm_dtype=bfloat16",
                                  "model.gradient_checkpointing=true"]),
    ("8-bit + checkpointing", ["model.lm_dtype=bfloat16", "model.lm_quantization=8bit",
                               "model.gradient_checkpointing=true"]),
    ("4-bit + checkpointing", ["model.lm_dtype=bfloat16", "model.lm_quantization=4bit",
                               "model.gradient_checkpointing=true"]),
)
TARGET_FRACTION = 0.01
NUM_OBSERVATIONS, NUM_STATES = 14, 4


def variant_config(base: str, rank: int, aggregation: str, wire: str,
                   strategy: str = "fedmrg", overrides: list[str] = ()) -> ExperimentConfig:
    return load_config(base, [*overrides, f"model.lora_rank={rank}",
                              f"federation.dense_update_rank={rank}",
                              f"federation.download_rank={rank}",
                              f"federation.aggregation={aggregation}",
                              f"federation.wire_dtype={wire}",
                              f"federation.strategy={strategy}"])


# --------------------------------------------------------------------------- shapes


def shape_counts(model: MRGModel, cfg: ExperimentConfig, clients: int) -> dict[str, int]:
    """Bytes per client per round from tensor shapes (module docstring), model tensors only
    (no names, prototypes or metrics)."""
    rank = cfg.federation.dense_update_rank
    down_rank = cfg.federation.download_rank
    wire = WIRE_BYTES[cfg.federation.wire_dtype]
    rows = describe_parameter_groups(model)
    shared = {r.name: r.shape for r in rows if r.group == "shared"}
    full_elements = sum(int(np.prod(r.shape)) if r.shape else 1 for r in rows)

    def numel(shape: tuple[int, ...]) -> int:
        return int(np.prod(shape)) if shape else 1

    lora = {n: s for n, s in shared.items() if is_lora_factor(n)}
    dense = {n: s for n, s in shared.items() if not is_lora_factor(n)}
    lora_elements = sum(numel(s) for s in lora.values())
    lora_dense_elements = sum(shared[p.b_key][0] * numel(shared[p.a_key][1:])
                              for p in lora_pairs(lora).values())  # d x k per pair

    def factored(shape: tuple[int, ...], r: int) -> int:
        if not factorizes(shape, r):
            return numel(shape)
        m, n = matrix_shape(shape)
        return r * (m + n)

    dense_elements = sum(numel(s) for s in dense.values())
    return {
        "up": communication(model, cfg)["sent_bytes"],
        "down_full": (lora_elements + dense_elements) * wire,
        "down_delta": (lora_elements + sum(factored(s, down_rank) if down_rank else numel(s)
                                           for s in dense.values())) * wire,
        "down_lossless": (lora_elements + sum(factored(s, rank * clients)
                                              for s in dense.values())) * wire,
        "dense_fedavg": (lora_dense_elements + dense_elements) * wire,
        "fedavg_strategy": (lora_elements + dense_elements) * wire,
        "full_model": full_elements * wire,
        "full_model_fp32": full_elements * 4,
    }


# --------------------------------------------------------------------------- real messages


def client_update(cfg: ExperimentConfig, center: str, global_state: dict[str, torch.Tensor],
                  round_id: int, rng: torch.Generator, error_feedback: ErrorFeedback
                  ) -> ClientUpdate:
    """A ClientUpdate built as `FederatedClient.fit` builds it (module docstring), from a
    small seeded perturbation of the global state instead of real training."""
    start = {n: t.float() for n, t in global_state.items()}
    trained = {n: t + 1e-3 * torch.randn(t.shape, generator=rng) for n, t in start.items()}
    lora = {n: t for n, t in trained.items() if is_lora_factor(n)}
    deltas = {n: t - start[n] for n, t in trained.items() if not is_lora_factor(n)}
    dense = error_feedback.compress_all(deltas, cfg.federation.dense_update_rank,
                                        cfg.federation.whole_tensors,
                                        wire_quantization(cfg.federation.wire_dtype))
    # the statistics the strategy's payload schema names, random in their shapes (counts as
    # integers, everything else float32)
    strategy = make_strategy(cfg)
    strategy.initialize(global_state)
    statistics = {name: (torch.randint(0, 50, spec.shape, generator=rng) if spec.counts
                         else torch.randn(spec.shape, generator=rng))
                  for name, spec in strategy.update_spec().statistics.items()}
    # the keys a client reports (LocalTrainer's loss terms + the client's own)
    metrics = {k: 0.0 for k in ("loss", "lm_generic", "lm_personal", "mutual", "diagnosis",
                                "contrastive_global", "contrastive_local", "lr", "steps",
                                "samples", "epoch", "residual_norm", "fit_s")}
    update = ClientUpdate(round_id=round_id, center=center, num_samples=210, lora=lora,
                          dense=dense, statistics=statistics, metrics=metrics)
    return to_wire(update, cfg.federation.wire_dtype)


def lossless_down(plan: RoundPlan, before: dict[str, torch.Tensor],
                  after: dict[str, torch.Tensor], updates: list[ClientUpdate], rank: int,
                  wire: str) -> RoundPlan:
    """The round-2 plan with the round's exact change as its state: the new LoRA factors, and
    each dense tensor's aggregate as the stacked client factors (rank K*r) where that is
    smaller than the tensor (for comparison: not what the product sends)."""
    lossless = {n: t for n, t in after.items() if is_lora_factor(n)}
    weights = normalize_weights([u.num_samples for u in updates]).tolist()
    for name, new in after.items():
        if is_lora_factor(name):
            continue
        delta = new.float() - before[name].float()
        parts = [from_wire(u.dense[name]) for u in updates]
        if all(isinstance(p, LowRankUpdate) for p in parts) and factorizes(
                delta.shape, rank * len(parts)):
            lossless[name] = LowRankUpdate(
                U=torch.cat([w * p.U for w, p in zip(weights, parts, strict=True)], dim=1),
                V=torch.cat([p.V for p in parts], dim=0), shape=tuple(delta.shape))
        else:
            lossless[name] = delta
    return to_wire(dataclasses.replace(plan, global_state=lossless), wire)


def default_scale_row(rank: int, aggregation: str, wire: str, clients: int, seed: int,
                      overrides: list[str] = ()) -> dict[str, Any]:
    """One variant at default scale: the messages counted, and the shape formula beside."""
    cfg = make_strategy(variant_config("default", rank, aggregation, wire,
                                       overrides=overrides)).cfg
    model = MRGModel.from_config(cfg.model, seed=seed)
    initial = get_shared_state(model)
    centers = [chr(ord("a") + i) for i in range(clients)]
    rng = torch.Generator().manual_seed(seed)

    strategy = make_strategy(cfg)
    strategy.initialize(initial)
    broadcast = StateBroadcast(initial, cfg.federation.download_rank, wire,
                               cfg.federation.whole_tensors)
    plan1 = to_wire(strategy.plan(1, centers[0]), wire)
    feedback = {c: ErrorFeedback() for c in centers}
    updates = [client_update(cfg, c, initial, 1, rng, feedback[c]) for c in centers]
    before = {n: t.clone() for n, t in strategy.global_state().items()}
    strategy.aggregate_round(1, [from_wire(u) for u in updates])
    after = strategy.global_state()
    plan2 = to_wire(strategy.plan(2, centers[0]), wire)
    delta = broadcast.advance(after)  # what a client at version 0 gets for round 2
    plan2_delta = to_wire(dataclasses.replace(plan2, global_state=None, global_delta=delta,
                                              state_version=delta.version), wire)
    down_lossless = lossless_down(plan2, before, after, updates, rank, wire)

    # the product's fedavg strategy: its own config (rank-0 dense updates, no prototypes)
    fedavg_cfg = make_strategy(variant_config("default", rank, "fedavg", wire, "fedavg",
                                              overrides)).cfg
    fedavg_update = client_update(fedavg_cfg, centers[0], initial, 1, rng, ErrorFeedback())

    up = message_bytes(updates[0])
    shapes = shape_counts(model, cfg, clients)
    counted = {
        "up": up.bytes, "down_round1": message_bytes(plan1).bytes,
        "down_full": message_bytes(plan2).bytes,
        "down_delta": message_bytes(plan2_delta).bytes,
        "down_lossless": message_bytes(down_lossless).bytes,
        "dense_fedavg": up.dense_equivalent_bytes,
        "fedavg_strategy": message_bytes(fedavg_update).bytes,
        # the full model is never a message: its size comes from the shapes
        "full_model": shapes["full_model"], "full_model_fp32": shapes["full_model_fp32"],
        "up_by_dtype": up.by_dtype,
    }
    return {"scale": "default", "rank": rank, "aggregation": aggregation, "wire": wire,
            "clients": clients, "counted": counted, "shape_check": shapes}


def paper_scale_row(rank: int, aggregation: str, wire: str, clients: int) -> dict[str, Any]:
    cfg = variant_config("paper", rank, aggregation, wire)
    model = paper_model(cfg)
    return {"scale": "paper", "rank": rank, "aggregation": aggregation, "wire": wire,
            "clients": clients, "counted": shape_counts(model, cfg, clients)}


def memory_rows() -> list[dict[str, Any]]:
    """Per-client GPU memory at paper scale for each `MEMORY_SETTINGS` row (from shapes)."""
    from fedmrg.model.memory import training_memory

    rows = []
    for setting, overrides in MEMORY_SETTINGS:
        cfg = load_config("paper", overrides)
        estimate = training_memory(paper_model(cfg), cfg)
        rows.append({"setting": setting, "overrides": overrides, "gib": estimate.gib(),
                     "batch_size": cfg.data.batch_size,
                     "max_report_tokens": cfg.data.max_report_tokens})
    return rows


def memory_table(rows: list[dict[str, Any]]) -> str:
    parts = [k for k in rows[0]["gib"] if k != "total"]
    header = ["frozen 7B decoder", *[f"{p} GiB" for p in parts], "total GiB"]
    body = [[r["setting"], *[f"{r['gib'][p]:.2f}" for p in parts], f"{r['gib']['total']:.1f}"]
            for r in rows]
    return markdown_table(header, body, "l" + "r" * (len(parts) + 1))


# --------------------------------------------------------------------------- report


def fractions(c: dict[str, Any]) -> dict[str, float]:
    full = c["full_model"]
    return {"up": c["up"] / full, "down_delta": c["down_delta"] / full,
            "down_full": c["down_full"] / full,
            "round_delta": (c["up"] + c["down_delta"]) / full,
            "round_full": (c["up"] + c["down_full"]) / full,
            "dense_fedavg_round": 2 * c["dense_fedavg"] / full}


def mib(n: float) -> str:
    return f"{n / 2**20:,.3f}" if n < 2**20 else f"{n / 2**20:,.2f}"


def table(rows: list[dict[str, Any]]) -> str:
    header = ["scale", "LoRA agg", "rank", "wire", "up MiB", "down (delta) MiB",
              "down (full) MiB", "dense FedAvg MiB (each way)", "fedavg strategy MiB (up)",
              "full model MiB", "up % of full", "up + delta % of full", "up + full % of full"]
    body = []
    for r in rows:
        c, f = r["counted"], r["fractions"]
        body.append([r["scale"], r["aggregation"], r["rank"], r["wire"], mib(c["up"]),
                     mib(c["down_delta"]), mib(c["down_full"]), mib(c["dense_fedavg"]),
                     mib(c["fedavg_strategy"]), mib(c["full_model"]), f"{f['up']:.3%}",
                     f"{f['round_delta']:.3%}", f"{f['round_full']:.3%}"])
    return markdown_table(header, body, "llrl" + "r" * 9)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--aggregations", nargs="+", default=["exact", "fedavg"],
                        choices=("exact", "fedavg"))
    parser.add_argument("--wires", nargs="+", default=["fp32", "bf16"],
                        choices=("fp32", "bf16", "int8", "nf4"))
    parser.add_argument("--clients", type=int, default=4,
                        help="clients of the aggregated round (the lossless download grows "
                             "with them)")
    parser.add_argument("--scales", nargs="+", default=["default", "paper"],
                        choices=("default", "paper"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="config override of the default scale, section.key=value")
    parser.add_argument("--memory", action="store_true",
                        help="per-client GPU memory at paper scale per way of loading the "
                             "decoder, from shapes (writes --out, default memory.json)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    machine = machine_info()
    started = time.perf_counter()
    if args.memory:
        out = args.out or MEMORY_OUT
        rows = memory_rows()
        text = memory_table(rows)
        print(text)
        record = {"command": command_line("comm.py", argv), "machine": machine,
                  "wall_s": time.perf_counter() - started, "measured": False,
                  "source": "fedmrg.model.memory.training_memory on the meta-device paper "
                            "model (shapes only)", "results": rows, "table": text}
        write_json(out, record)
        print(f"wrote {out}")
        return record
    args.out = args.out or DEFAULT_OUT
    torch.manual_seed(args.seed)

    rows = []
    for scale in args.scales:
        for rank in args.ranks:
            for aggregation in args.aggregations:
                for wire in args.wires:
                    row = (default_scale_row(rank, aggregation, wire, args.clients, args.seed,
                                             args.overrides)
                           if scale == "default" else
                           paper_scale_row(rank, aggregation, wire, args.clients))
                    row["fractions"] = fractions(row["counted"])
                    rows.append(row)
                    print(f"{scale} {aggregation} rank {rank} {wire}: up "
                          f"{mib(row['counted']['up'])} MiB, down "
                          f"{mib(row['counted']['down_delta'])} MiB (delta), "
                          f"{mib(row['counted']['down_full'])} MiB (full)", flush=True)

    paper = [r for r in rows if r["scale"] == "paper"]
    target = None
    if paper:
        worst = {k: max(r["fractions"][k] for r in paper)
                 for k in ("up", "round_delta", "round_full")}
        target = {"fraction": TARGET_FRACTION,
                  "judged_on": "up + down (delta) per client per round, against the full "
                               "model in the same wire dtype, worst variant",
                  "worst": worst, "met": worst["round_delta"] < TARGET_FRACTION,
                  "met_with_full_download": worst["round_full"] < TARGET_FRACTION}
    check = []
    for r in rows:
        if "shape_check" in r:
            s, c = r["shape_check"], r["counted"]
            check.append({"rank": r["rank"], "aggregation": r["aggregation"], "wire": r["wire"],
                          **{k: {"counted": c[k], "from_shapes": s[k]}
                             for k in ("up", "down_delta", "down_full", "dense_fedavg",
                                       "full_model")}})
    text = table(rows)
    print()
    print(text)
    if target:
        w = target["worst"]
        print(f"\ntarget: a round under {TARGET_FRACTION:.0%} of the full model at paper scale "
              f"(worst variant): up + down (delta) {w['round_delta']:.3%} -> "
              f"{'met' if target['met'] else 'MISSED'} (up alone {w['up']:.3%}; a round with "
              f"the full state down {w['round_full']:.3%})")
    record = {"command": command_line("comm.py", argv), "machine": machine,
              "args": vars(args), "wall_s": time.perf_counter() - started,
              "target": target, "results": rows, "shape_check": check, "table": text}
    write_json(args.out, record)
    print(f"wrote {args.out}")
    return record


if __name__ == "__main__":
    main()
