"""Which modules of a causal LM get the LoRA adapters, per architecture (pure; no weights).

`model.lora_targets: []` (the default) means the attention projections of the LM's architecture,
looked up by its config's `model_type`: every Llama-style decoder (Llama, Mistral, Qwen2/3,
Gemma, ...) has `q_proj k_proj v_proj o_proj`; GPT-2 fuses q/k/v into one `c_attn` (a
`Conv1D`, weights stored transposed: `fan_in_fan_out`); GPT-NeoX/Falcon/Bloom name theirs
`query_key_value`. An architecture missing from our table falls back to peft's own table (its
defaults, often q and v only). An explicit list overrides, as given.

A target is a module name suffix, as peft matches it: `c_proj` alone would match GPT-2's MLP
output as well as its attention output, so the attention one is named `attn.c_proj`. Every
target must match at least one Linear (or GPT-2 `Conv1D`) module: `check_lora_targets` names the
first one that matches none, with the LM's adaptable module names, before any actor starts
(the module names come from the LM's config on the meta device: nothing is loaded).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

_LLAMA_STYLE = ("q_proj", "k_proj", "v_proj", "o_proj")

# model_type -> attention projections (names as peft matches them: a suffix after a '.').
ATTENTION_TARGETS: dict[str, tuple[str, ...]] = {
    **{t: _LLAMA_STYLE for t in (
        "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma",
        "gemma2", "gemma3_text", "olmo", "olmo2", "granite", "cohere", "stablelm", "starcoder2",
        "smollm3", "internlm2", "deepseek_v2")},
    "phi": ("q_proj", "k_proj", "v_proj", "dense"),
    "phi3": ("qkv_proj", "o_proj"),
    "gpt2": ("c_attn", "attn.c_proj"),
    "gpt_bigcode": ("c_attn", "attn.c_proj"),
    "gptj": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "gpt_neo": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "gpt_neox": ("query_key_value", "attention.dense"),
    "falcon": ("query_key_value", "self_attention.dense"),
    "bloom": ("query_key_value", "self_attention.dense"),
}
# Architectures whose projections are transformers' `Conv1D` (weight stored as (in, out)).
FAN_IN_FAN_OUT = frozenset({"gpt2", "gpt_bigcode"})


class LoraTargetError(ValueError):
    """The LoRA targets do not fit the LM; the message names the key and value."""


@dataclass(frozen=True)
class LoraTargets:
    """What `wrap_decoder` gives peft: the module suffixes and whether weights are (in, out)."""

    modules: tuple[str, ...]
    fan_in_fan_out: bool
    chosen_by: str  # "config" (model.lora_targets) or "architecture <model_type>"


def resolve_lora_targets(model_type: str, explicit: Sequence[str] = ()) -> LoraTargets:
    """The targets for an LM of `model_type`: `explicit` when given, else the table's."""
    fan = model_type in FAN_IN_FAN_OUT
    if explicit:
        return LoraTargets(tuple(explicit), fan, "config")
    if model_type in ATTENTION_TARGETS:
        return LoraTargets(ATTENTION_TARGETS[model_type], fan, f"architecture {model_type}")
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT

    found = PEFT.get(model_type)
    if isinstance(found, (list, tuple)) and found:
        return LoraTargets(tuple(found), fan, f"architecture {model_type} (peft's table)")
    raise LoraTargetError(
        f"model.lora_targets=[]: no default LoRA targets for LM architecture {model_type!r}; "
        f"name the attention projections, e.g. --set 'model.lora_targets=[q_proj,v_proj]'")


def adaptable_modules(model: nn.Module) -> list[str]:
    """Full names of the modules LoRA can adapt here: Linear layers and transformers'
    `Conv1D` (GPT-2), the LM head and embeddings left out."""
    from transformers.pytorch_utils import Conv1D

    return [name for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, Conv1D)) and name and name != "lm_head"]


def target_matches(target: str, name: str) -> bool:
    """peft's rule for a string entry of `target_modules`: the full name or a '.'-suffix."""
    return name == target or name.endswith("." + target)


def check_lora_targets(targets: Iterable[str], module_names: Sequence[str],
                       architecture: str = "the LM") -> None:
    """Every target matches at least one of `module_names` (from `adaptable_modules`), else
    `LoraTargetError` naming the first that does not and the names it could be."""
    for target in targets:
        if not any(target_matches(target, n) for n in module_names):
            suffixes = sorted({n.rsplit(".", 1)[-1] for n in module_names})
            raise LoraTargetError(
                f"model.lora_targets: {target!r} matches no Linear module of {architecture}; "
                f"its adaptable module names end in {suffixes}")
