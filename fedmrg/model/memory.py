"""GPU memory of one client while it trains, estimated from tensor shapes (pure; no GPU).

    estimate = training_memory(model, cfg)      # model: e.g. on the meta device
    estimate.total_bytes, estimate.parts        # {"base LM weights": ..., ...}

Parts, in bytes:
- base LM weights: the frozen decoder in `model.lm_dtype` (4 or 2 bytes a weight), or
  quantized (`model.lm_quantization`): bitsandbytes quantizes the Linear layers inside the
  decoder blocks (NF4 with double quantization: 4 bits + ~0.127 bits of constants a weight;
  8-bit: 1 byte + one float32 scale per row); embeddings, norms and the LM head stay in the
  compute dtype (bfloat16 unless `lm_dtype` says otherwise);
- encoder weights: the timm encoder in float32 (frozen at paper scale: no gradient state);
- trainable state: every trainable tensor in float32 with its gradient and AdamW's two
  moments (16 bytes a value);
- LM activations: per decoder layer and token, Korthikanti et al. (2022)'s count for a
  transformer layer kept for the backward pass, s*b*h*(34 + 5*a*s/h) bytes at 2-byte
  activations (scaled to the LM's dtype), with the MLP term widened to the LM's intermediate
  size; times 2: the generic and the generic+specialized passes are both alive until the
  backward. With gradient checkpointing only each layer's input (s*b*h) is kept, plus one
  layer's full activations while it is recomputed;
- logits: the report positions' logits in float32 for both passes, with their log-softmax
  copies (4 tensors of B x T_r x V);
- CUDA context and allocator slack: a fixed 0.75 GiB (what a PyTorch process holds before
  any tensor, plus fragmentation), an assumption.

Sequence length: the diagnosis prompt (`PROMPT_TOKENS`, an assumed upper bound for a Llama
tokenizer), `model.visual_tokens`, `data.max_report_tokens`. An estimate to size a GPU, not a
measurement: benchmarks/gpu_scale.py measures the peak on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from fedmrg.choices import LMDtype, Quantization
from fedmrg.config import ExperimentConfig

PROMPT_TOKENS = 96  # "Findings to report: ..." for 14 observations, Llama tokenizer, at most
CONTEXT_BYTES = int(0.75 * 2**30)
DTYPE_BYTES = {LMDtype.FLOAT32: 4, LMDtype.BFLOAT16: 2, LMDtype.FLOAT16: 2}
NF4_BYTES = 0.5 + 0.127 / 8  # 4 bits + double-quantized constants (QLoRA, Dettmers et al.)


@dataclass(frozen=True)
class MemoryEstimate:
    setting: str
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def total_bytes(self) -> float:
        return sum(self.parts.values())

    def gib(self) -> dict[str, float]:
        return {**{k: round(v / 2**30, 2) for k, v in self.parts.items()},
                "total": round(self.total_bytes / 2**30, 2)}


def lm_weight_bytes(lm: nn.Module, dtype: str, quantization: str) -> float:
    """The frozen base LM's weights as loaded (module docstring); LoRA tensors left out."""
    compute = DTYPE_BYTES[dtype]
    if quantization == Quantization.NONE:
        return float(sum(p.numel() for n, p in lm.named_parameters() if "lora_" not in n)
                     * compute)
    quantized, rest = 0.0, 0.0
    for name, module in lm.named_modules():
        if "lora_" in name:
            continue
        in_block = ".layers." in f".{name}." or ".h." in f".{name}."
        for p in module.parameters(recurse=False):
            if isinstance(module, nn.Linear) and in_block and p.ndim == 2:
                four_bit = quantization == Quantization.FOUR_BIT
                quantized += p.numel() * (NF4_BYTES if four_bit else 1.0)
                if quantization == Quantization.EIGHT_BIT:
                    quantized += p.shape[0] * 4  # one float32 scale per row
            else:
                rest += p.numel() * compute
    return quantized + rest


def training_memory(model: nn.Module, cfg: ExperimentConfig) -> MemoryEstimate:
    """The estimate for `model` (an `MRGModel`, any device, meta included) trained as `cfg`
    says: batch `data.batch_size`, the LM's dtype, quantization and gradient checkpointing
    from `cfg.model`."""
    m = cfg.model
    lm = model.decoder.get_base_model()
    lm_cfg = lm.config
    hidden, layers = lm_cfg.hidden_size, lm_cfg.num_hidden_layers
    heads = lm_cfg.num_attention_heads
    inter = getattr(lm_cfg, "intermediate_size", None) or 4 * hidden
    batch = cfg.data.batch_size
    seq = PROMPT_TOKENS + m.visual_tokens + cfg.data.max_report_tokens
    # activations in the LM's compute dtype: float32, or 2 bytes (bf16/fp16, or quantized)
    full = m.lm_dtype == LMDtype.FLOAT32 and m.lm_quantization == Quantization.NONE
    act_scale = 2.0 if full else 1.0
    # Korthikanti et al.: 34 s b h with a 4h MLP; its MLP part (19 s b h) scales with the
    # LM's intermediate width
    per_layer = seq * batch * hidden * (15 + 19 * inter / (4 * hidden)
                                        + 5 * heads * seq / hidden) * act_scale
    if m.gradient_checkpointing:  # each layer's input kept, one layer recomputed at a time
        activations = 2 * layers * seq * batch * hidden * 2 * act_scale + per_layer
    else:
        activations = 2 * layers * per_layer
    parts = {
        "base LM weights": lm_weight_bytes(lm, m.lm_dtype, m.lm_quantization),
        "encoder weights": 4.0 * sum(p.numel() for p in model.encoder.parameters()
                                     if not p.requires_grad),
        "trainable state": 16.0 * sum(p.numel() for p in model.parameters()
                                      if p.requires_grad),
        "LM activations": float(activations),
        "logits": 4.0 * batch * cfg.data.max_report_tokens * lm_cfg.vocab_size * 4,
        "CUDA context": float(CONTEXT_BYTES),
    }
    return MemoryEstimate(setting_name(cfg), parts)


def setting_name(cfg: ExperimentConfig) -> str:
    m = cfg.model
    name = m.lm_dtype if m.lm_quantization == Quantization.NONE else f"{m.lm_quantization} base"
    return name + (" + checkpointing" if m.gradient_checkpointing else "")
