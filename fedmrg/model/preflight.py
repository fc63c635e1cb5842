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
