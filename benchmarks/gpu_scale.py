"""The GPU proof at scale: 4 clients sharing one GPU (0.25 each), a randomly initialized ~1B
Llama-architecture decoder in bfloat16 and a Swin-B encoder (no weights), 3 federated rounds;
then the same with the decoder 4-bit quantized when bitsandbytes loads.

Usage: ``python benchmarks/gpu_scale.py [--rounds 3] [--local-steps 10] [--batch-size 4]
[--studies 40] [--num-cpus 16] [--out PATH]``

Needs a CUDA GPU: without one it stops at once with a one-line message and exit status 2
(nothing is built). What it does:
1. writes a random Llama of TinyLlama's shape (hidden 2048, 22 layers, 32 heads, 4 KV heads,
   MLP 5632, vocabulary 32000: 1.1B parameters) in bfloat16 with ``save_pretrained`` to a
   temporary folder, with fedmrg's WordPiece tokenizer (no download), and the phantom
   benchmark (4 centers, 224 px);
2. a local Ray with one GPU; per setting (``bfloat16``; ``4bit`` if ``import bitsandbytes``
   works) the 4 client actors at ``resources.num_gpus_per_client=0.25``, the model as the
   paper preset has it (Swin-B frozen, ``in_chans`` 3, 8 visual tokens, rank-16 adapters,
   gradient checkpointing), ``federation.rounds`` rounds through ``Coordinator.step()``
   without evaluation (no METEOR/java);
3. per round: wall time, bytes up and down; per client, read inside its actor
   (``__ray_call__``): peak GPU memory allocated and reserved by its process
   (``torch.cuda.max_memory_allocated/reserved``), beside the estimate from shapes
   (``fedmrg.model.memory.training_memory``), and where its model's parameters are.

Writes ``$OUT/gpu_scale.json`` when OUT is set (the device machine), else
``benchmarks/results/gpu_scale.json``; exits 1 when a check fails (a client not on the GPU, a
non-finite global state, a round without every client), after writing the JSON.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import result_path

RESULT_NAME = "gpu_scale.json"
CLIENTS, GPU_PER_CLIENT = 4, 0.25
LLAMA_1B = {"hidden_size": 2048, "num_hidden_layers": 22, "num_attention_heads": 32,
            "num_key_value_heads": 4, "intermediate_size": 5632, "vocab_size": 32000,
            "max_position_embeddings": 2048}
SWIN_B = "swin_base_patch4_window7_224"


class NoCudaError(RuntimeError):
    """This machine has no CUDA GPU: the proof cannot run here."""


def require_cuda() -> str:
    """The GPU's name, or `NoCudaError` with the reason, before anything is built."""
    import torch

    if not torch.cuda.is_available():
        built = torch.version.cuda or "none (a CPU-only build)"
        raise NoCudaError(f"benchmarks/gpu_scale.py needs a CUDA GPU: "
                          f"torch.cuda.is_available() is False on this machine (torch "
                          f"{torch.__version__}, CUDA {built}); run it on a GPU node")
    return torch.cuda.get_device_name(0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--studies", type=int, default=40, help="studies per center")
    p.add_argument("--num-cpus", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help=f"JSON path (default: $OUT/{RESULT_NAME}, else benchmarks/results/)")
    return p.parse_args(argv)


def bitsandbytes_status() -> str | None:
    """None when bitsandbytes imports, else why not (the 4-bit setting is then skipped)."""
    try:
        importlib.import_module("bitsandbytes")
    except Exception as e:  # ImportError, or a CUDA setup error raised at import
        return f"{type(e).__name__}: {e}"
    return None


def write_random_llama(folder: Path, seed: int) -> dict[str, Any]:
    """A random ~1B Llama in bfloat16 and fedmrg's tokenizer in `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedmrg.data.phantom import neutral_corpus
    from fedmrg.model.base_lm import train_tokenizer

    tokenizer = train_tokenizer(neutral_corpus(500, seed), LLAMA_1B["vocab_size"])
    config = LlamaConfig(**LLAMA_1B, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device("cuda"):  # initialization on the GPU: seconds instead of a minute
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return {"parameters": parameters, "config": LLAMA_1B, "tokenizer_vocab": len(tokenizer)}


def build_config(args: argparse.Namespace, tmp: Path, lm: Path, setting: str) -> Any:
    from fedmrg.config import load_config
    from fedmrg.experiment import resolve_paths
    from fedmrg.fl.strategies import make_strategy

    overrides = [
        "device=cuda", f"seed={args.seed}",
        f"data.root={tmp / 'data'}", f"data.phantom.centers={CLIENTS}",
        f"data.phantom.studies_per_center={args.studies}", "data.phantom.image_size=224",
        "data.phantom.heldout_center=false", "data.image_size=224",
        f"data.batch_size={args.batch_size}", "data.max_report_tokens=128",
        "data.stream_cpus_per_task=1", "data.stream_max_tasks=1",
        f"model.lm={lm}", "model.lm_dtype=bfloat16", "model.gradient_checkpointing=true",
        f"model.lm_quantization={'4bit' if setting == '4bit' else 'none'}",
        f"model.encoder={SWIN_B}", "model.pretrained=false", "model.in_chans=3",
        "model.freeze_encoder=true", "model.encoder_kwargs={}", "model.visual_tokens=8",
        "model.lora_rank=16", "model.lora_alpha=32", "model.projection_dim=256",
        f"resources.num_gpus_per_client={GPU_PER_CLIENT}", "resources.num_cpus_per_client=2",
        f"federation.rounds={args.rounds}", "federation.eval_every=0", "eval.val_every=0",
        "federation.wire_dtype=bf16", "federation.dense_update_rank=16",
        "federation.download_rank=16", f"train.local_steps={args.local_steps}",
        f"tracking.storage_path={tmp / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
        f"tracking.artifact_location={tmp / 'mlartifacts'}",
    ]
    return make_strategy(resolve_paths(load_config("default", overrides))).cfg


def memory_probe(host: Any, center: str, cfg: Any) -> dict[str, Any]:
    """Runs INSIDE a client actor (`__ray_call__`): its process's GPU memory peaks, the
    estimate from shapes, and where the model is."""
    import torch

    from fedmrg.model.memory import training_memory

    model = host.clients[center].model
    devices = sorted({str(p.device) for p in model.parameters()})
    index = torch.cuda.current_device()
    return {"center": center, "param_devices": devices,
            "peak_allocated_gib": torch.cuda.max_memory_allocated(index) / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(index) / 2**30,
            "allocated_now_gib": torch.cuda.memory_allocated(index) / 2**30,
            "estimate_gib": training_memory(model, cfg).gib()}


def run_setting(args: argparse.Namespace, tmp: Path, lm: Path, setting: str) -> dict[str, Any]:
    import numpy as np
    import ray
    from gpu_round import round_row, state_report

    from fedmrg.data.prepare import participating_centers
    from fedmrg.data.shards import read_manifest
    from fedmrg.experiment import client_layout
    from fedmrg.fl.actors import RayClientPool, start_client_actors, stop_actors
    from fedmrg.fl.coordinator import Coordinator
    from fedmrg.fl.strategies import make_strategy

    cfg = build_config(args, tmp, lm, setting)
    centers = participating_centers(cfg.data, read_manifest(cfg.data.root))
    out: dict[str, Any] = {"setting": setting, "centers": centers}
    actors: dict[str, Any] = {}
    try:
        t = time.perf_counter()
        actors, placement = start_client_actors(cfg, client_layout(cfg.federation.strategy,
                                                                   centers),
                                                dataset_root=cfg.data.root, seed=cfg.seed)
        out["actors_start_s"] = time.perf_counter() - t
        out["placement"] = placement
        pool = RayClientPool(actors)
        strategy = make_strategy(cfg)
        first = pool.centers()[0]
        initial = pool.call_all("shared_state", centers=[first])[first]
        coordinator = Coordinator(cfg, strategy, pool, initial,
                                  rng=np.random.default_rng(cfg.seed))
        out["rounds"] = []
        for _ in range(cfg.federation.rounds):
            row = round_row(coordinator.step(), pool.centers())
            out["rounds"].append(row)
            print(f"{setting} round {row['round_id']}: {row['round_time_s']:.1f} s, loss "
                  f"{row['loss']}, up {row['bytes_up']} B, down {row['bytes_down']} B",
                  flush=True)
        out["global_state"] = state_report(strategy.global_state())
        out["clients"] = {c: ray.get(a.__ray_call__.remote(memory_probe, c, cfg))
                          for c, a in actors.items()}
    finally:
        if actors:
            stop_actors(actors.values())
    rounds = out["rounds"]
    out["checks"] = {
        "every client's model on cuda": all(
            p["param_devices"] and all(d.startswith("cuda") for d in p["param_devices"])
            for p in out["clients"].values()),
        "every round: every client aggregated": all(
            sorted(r["participants"]) == sorted(centers) and not r["rejected"] for r in rounds),
        "global state all finite": bool(out["global_state"]["all_finite"]),
    }
    out["summary"] = {
        "round_time_s": [r["round_time_s"] for r in rounds],
        "bytes_up_per_round": [r["bytes_up"] for r in rounds],
        "bytes_down_per_round": [r["bytes_down"] for r in rounds],
        "peak_allocated_gib_per_client": {c: round(p["peak_allocated_gib"], 2)
                                          for c, p in out["clients"].items()},
        "estimate_gib_per_client": next(iter(out["clients"].values()))["estimate_gib"],
    }
    return out


def run(args: argparse.Namespace, gpu: str) -> dict[str, Any]:
    import ray
    from gpu_round import machine

    from fedmrg.data.phantom import generate_phantom

    started = time.perf_counter()
    result: dict[str, Any] = {"command": " ".join(["python benchmarks/gpu_scale.py",
                                                   *sys.argv[1:]]),
                              "machine": {**machine(), "gpu": gpu}, "settings": {}}
    missing = bitsandbytes_status()
    settings = ["bfloat16"] + ([] if missing else ["4bit"])
    if missing:
        result["skipped"] = {"4bit": f"bitsandbytes does not load: {missing}"}
    with tempfile.TemporaryDirectory(prefix="fedmrg-gpu-scale-") as tmp_name:
        tmp = Path(tmp_name)
        t = time.perf_counter()
        result["lm"] = write_random_llama(tmp / "llama-1b", args.seed)
        result["lm_write_s"] = time.perf_counter() - t
        generate_phantom(tmp / "data", centers=CLIENTS, studies_per_center=args.studies,
                         image_size=224, seed=args.seed, heldout_center=False)
        ray.init(num_cpus=args.num_cpus, num_gpus=1, include_dashboard=False)
        try:
            for setting in settings:
                result["settings"][setting] = run_setting(args, tmp, tmp / "llama-1b",
                                                          setting)
        finally:
            ray.shutdown()
    result["ok"] = all(all(s["checks"].values()) for s in result["settings"].values())
    result["wall_s"] = time.perf_counter() - started
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        gpu = require_cuda()
    except NoCudaError as e:
        print(str(e), file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_round's helpers
    out = result_path(args.out, RESULT_NAME)
    result = run(args, gpu)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    for setting, s in result["settings"].items():
        for name, ok in s["checks"].items():
            print(f"[{'ok' if ok else 'FAIL'}] {setting}: {name}")
        print(f"{setting}: {json.dumps(s['summary'])}")
    print(f"wrote {out} ({result['wall_s']:.0f} s)")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
