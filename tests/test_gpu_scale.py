"""benchmarks/gpu_scale.py (the GPU proof) stops at once on a machine without CUDA, and the
per-client GPU memory estimate from shapes (fedmrg.model.memory) counts what it says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_hf import save_tiny_lm

from fedmrg.config import config_from_dict, replace_keys
from fedmrg.model.base_lm import load_base_lm
from fedmrg.model.memory import CONTEXT_BYTES, NF4_BYTES, lm_weight_bytes, training_memory
from fedmrg.model.mrg import MRGModel

ROOT = Path(__file__).resolve().parents[1]


def test_without_cuda_the_gpu_proof_stops_with_one_line_and_builds_nothing(tmp_path):
    out = tmp_path / "gpu_scale.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a GPU machine
    done = subprocess.run([sys.executable, "benchmarks/gpu_scale.py", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "benchmarks/gpu_scale.py needs a CUDA GPU: torch.cuda.is_available() is False")
    assert done.stdout == "" and not out.exists()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    cfg = config_from_dict({"model": {
        "lm": str(save_tiny_lm("llama", tmp_path_factory.mktemp("mem") / "lm")),
        "encoder_kwargs": {"channels": [8, 16, 32, 64]}, "visual_tokens": 2, "lora_rank": 2,
        "freeze_encoder": True}})
    m = cfg.model
    lm, tokenizer = load_base_lm(m)
    return cfg, MRGModel.from_config(m, lm, tokenizer, seed=0)


def test_the_memory_estimate_counts_weights_state_and_activations(tiny_model):
    cfg, model = tiny_model
    lm = model.decoder.get_base_model()
    base = sum(p.numel() for n, p in lm.named_parameters() if "lora_" not in n)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    estimate = training_memory(model, cfg)
    assert estimate.parts["base LM weights"] == 4 * base
    assert estimate.parts["trainable state"] == 16 * trainable
    assert estimate.parts["encoder weights"] == 4 * sum(
        p.numel() for p in model.encoder.parameters())
    assert estimate.parts["CUDA context"] == CONTEXT_BYTES
    assert estimate.setting == "float32"
    # bfloat16 halves the weights and the activations; checkpointing cuts the activations
    half_cfg = replace_keys(cfg, {"model.lm_dtype": "bfloat16"})
    half = training_memory(model, half_cfg)
    assert half.parts["base LM weights"] == 2 * base
    assert half.parts["LM activations"] == estimate.parts["LM activations"] / 2
    checkpointed = replace_keys(half_cfg, {"model.gradient_checkpointing": True})
    less = training_memory(model, checkpointed).parts["LM activations"]
    assert less < half.parts["LM activations"]
    # 4-bit: the block Linear weights at ~0.52 bytes, embeddings/head/norms in bfloat16
    in_blocks = sum(p.numel() for n, mod in lm.named_modules() if ".layers." in f".{n}."
                    and isinstance(mod, torch.nn.Linear) and "lora_" not in n
                    for p in mod.parameters(recurse=False))
    assert lm_weight_bytes(lm, "bfloat16", "4bit") == pytest.approx(
        in_blocks * NF4_BYTES + (base - in_blocks) * 2)
