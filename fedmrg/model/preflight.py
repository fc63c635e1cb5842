"""The model a run asks for, checked on the driver before any actor starts: one-line
`ConfigError`s naming the key and value (what the CLI prints), in seconds, instead of every
client actor failing the same way minutes later.

- `model.lm`: a folder with a config.json, or a hub id in the Hugging Face cache (or
  downloadable when online); read as a config only, the model built on the meta device;
- `model.lora_targets`: each one matches a Linear module of that LM (or, when empty, the LM's
  architecture has default targets, `fedmrg.model.lora_targets`);
- `model.encoder_checkpoint`: a readable file;
- `model.lm_quantization` on CPU-only clients is refused by the config itself
  (`fedmrg.config`), and on a client without CUDA by `load_causal_lm`.
"""

from __future__ import annotations

from fedmrg.config import ConfigError, ModelConfig


def check_model_inputs(cfg: ModelConfig) -> str:
    """Raise `ConfigError` for a model the clients could not build; returns the LM's
    model_type."""
    from fedmrg.model.base_lm import BaseLMError, check_base_lm
    from fedmrg.model.encoder import EncoderError, check_encoder_checkpoint
    from fedmrg.model.lora_targets import LoraTargetError

    try:
        check_encoder_checkpoint(cfg)
        return check_base_lm(cfg)
    except (BaseLMError, EncoderError, LoraTargetError) as e:
        raise ConfigError(str(e)) from e


def model_parameter_summary(cfg: ModelConfig) -> dict[str, dict[str, int]]:
    """`parameter_group_summary` (shared, private, frozen: tensors, elements, bytes) of the
    model the clients will build, built on the meta device (no weights, milliseconds) from the
    LM's config and tokenizer; the builtin LM is built first when missing (the driver builds it
    before the clients start anyway)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from fedmrg.model.base_lm import BUILTIN_TINY_LLAMA, builtin_lm_path, load_tokenizer
    from fedmrg.model.mrg import MRGModel
    from fedmrg.model.params import parameter_group_summary

    source = builtin_lm_path(cfg) if cfg.lm == BUILTIN_TINY_LLAMA else cfg.lm
    tokenizer = load_tokenizer(source)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(source)))
        model = MRGModel.from_config(cfg, lm, tokenizer)
    return parameter_group_summary(model)
