"""The MRG model, its parameter groups, save/load and local training.

    from fedmrg.model import MRGModel, LocalTrainer, get_shared_state, save_model

Names are resolved on first use (PEP 562), so importing a light submodule such as
`fedmrg.model.losses` does not pull in transformers and peft.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MRGModel": "mrg", "ModelInputError": "mrg", "GENERIC": "mrg", "SPECIALIZED": "mrg",
    "LOSS_TERMS": "mrg",
    "load_base_lm": "base_lm", "BaseLMError": "base_lm",
    "parameter_groups": "params", "get_shared_state": "params", "load_shared_state": "params",
    "get_private_state": "params", "load_private_state": "params",
    "describe_parameter_groups": "params", "parameter_group_summary": "params",
    "format_parameter_summary": "params", "ParameterGroupError": "params",
    "save_model": "io", "load_model": "io", "save_adapter": "io", "ModelIOError": "io",
    "LocalTrainer": "trainer", "TrainerError": "trainer", "epoch_batches": "trainer",
    "linear_decay": "trainer", "lr_factor": "trainer", "proximal_term": "trainer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fedmrg.model' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"fedmrg.model.{_EXPORTS[name]}"), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
