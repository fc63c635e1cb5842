"""Save and load a whole `MRGModel` as a self-describing folder.

    <dir>/fedmrg_model.json      format version, ModelConfig, seed, adapters, where the base LM is
                                 and its shape (`BASE_LM_KEYS`: another LM there is an error)
    <dir>/adapters/<name>/       each decoder adapter in PEFT format (PeftModel.from_pretrained)
    <dir>/modules.safetensors    encoder, projector and heads (state_dict names)
    <dir>/own_diagnosis_head.safetensors
                                 the center's own tuned diagnosis head, when the model has one
                                 (`MRGModel.own_diagnosis_head`: the personalized path's prompts)
    <dir>/tokenizer/             the tokenizer (save_pretrained)
    <dir>/base_lm/               the frozen base LM weights: always for the builtin LM (so the
                                 folder needs no cache), for hub/path LMs only when asked

The folder is written next to its destination and renamed into place, so a reader never sees
half of it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from fedmrg.config import ConfigError, ModelConfig, config_from_dict
from fedmrg.model.base_lm import BUILTIN_TINY_LLAMA, load_base_lm, load_causal_lm, load_tokenizer
from fedmrg.model.mrg import MRGModel

FORMAT_VERSION = 1
MANIFEST = "fedmrg_model.json"
MODULES = ("encoder", "projector", "diagnosis_head", "global_head", "local_head")
OWN_HEAD = "own_diagnosis_head.safetensors"
# What identifies a base LM's shape: a folder's adapters and projector only fit an LM that
# agrees on these (a hub id or path may name another LM where the model is loaded).
BASE_LM_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")


class ModelIOError(ValueError):
    """A saved model folder is missing or inconsistent; the message names the file."""


def base_lm_state(model: MRGModel) -> dict[str, torch.Tensor]:
    """The frozen base LM's own weights, without peft's LoRA layers (HF names)."""
    state = {}
    for name, tensor in model.decoder.get_base_model().state_dict().items():
        if ".lora_" in name:
            continue
        state[name.replace(".base_layer.", ".")] = tensor
    return state


def base_lm_config(lm: torch.nn.Module) -> dict:
    """The `BASE_LM_KEYS` of an HF model's config (None where it has no such key)."""
    config = lm.config.to_dict()
    return {k: config.get(k) for k in BASE_LM_KEYS}


def save_adapter(model: MRGModel, adapter: str, directory: str | Path) -> Path:
    """One decoder adapter in PEFT format; returns its folder (`<directory>/<adapter>`)."""
    if adapter not in model.adapter_names:
        raise ModelIOError(f"no adapter {adapter!r}; the model has {model.adapter_names}")
    model.decoder.save_pretrained(str(directory), selected_adapters=[adapter])
    return Path(directory) / adapter


def save_model(model: MRGModel, directory: str | Path, *,
               include_base_lm: bool | None = None) -> Path:
    """Write the model folder (see the module docstring); replaces an existing one."""
    directory = Path(directory)
    if include_base_lm is None:
        include_base_lm = model.cfg.lm == BUILTIN_TINY_LLAMA
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        model.decoder.save_pretrained(str(tmp / "adapters"), selected_adapters=model.adapter_names)
        modules = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
                   if k.split(".", 1)[0] in MODULES}
        save_file(modules, str(tmp / "modules.safetensors"))
        own = model.own_diagnosis_head
        if own is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in own.state_dict().items()},
                      str(tmp / OWN_HEAD))
        model.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        if include_base_lm:
            base = model.decoder.get_base_model()
            base.save_pretrained(str(tmp / "base_lm"), state_dict=base_lm_state(model))
        manifest = {
            "format": FORMAT_VERSION, "model_config": dataclasses.asdict(model.cfg),
            "seed": model.seed, "max_report_tokens": model.max_report_tokens,
            "adapters": model.adapter_names,
            "own_diagnosis_head": OWN_HEAD if own is not None else None,
            "base_lm": "base_lm" if include_base_lm else model.cfg.lm,
            "base_lm_config": base_lm_config(model.decoder.get_base_model()),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise ModelIOError(f"{path}: not found; {directory} is not a saved fedmrg model")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT_VERSION:
        raise ModelIOError(f"{path}: format {manifest.get('format')!r}, this fedmrg reads "
                           f"format {FORMAT_VERSION}")
    return manifest


def load_model(directory: str | Path) -> MRGModel:
    """Rebuild a saved model (on CPU, in eval mode)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    try:
        cfg: ModelConfig = config_from_dict({"model": manifest["model_config"]}).model
    except ConfigError as e:
        raise ModelIOError(f"{directory / MANIFEST}: model_config: {e}") from e
    tokenizer = load_tokenizer(directory / "tokenizer")
    if manifest["base_lm"] == "base_lm":
        base_lm = load_causal_lm(directory / "base_lm")
    else:
        base_lm, _ = load_base_lm(cfg)
    saved, found = manifest.get("base_lm_config"), base_lm_config(base_lm)
    if saved is not None and saved != found:
        differ = ", ".join(f"{k} {saved.get(k)!r} here {found.get(k)!r}" for k in BASE_LM_KEYS
                           if saved.get(k) != found.get(k))
        raise ModelIOError(f"{directory}: trained with another base LM than the one available "
                           f"as {manifest['base_lm']!r} ({differ}); load it where model.lm "
                           f"names the LM the run used")
    model = MRGModel.from_config(cfg, base_lm, tokenizer, seed=manifest["seed"],
                                 max_report_tokens=manifest["max_report_tokens"])
    if sorted(manifest["adapters"]) != sorted(model.adapter_names):
        raise ModelIOError(f"{directory / MANIFEST}: adapters {manifest['adapters']} do not match "
                           f"the config's {model.adapter_names}")
    for adapter in model.adapter_names:
        path = directory / "adapters" / adapter / "adapter_model.safetensors"
        if not path.exists():
            raise ModelIOError(f"{path}: missing")
        result = set_peft_model_state_dict(model.decoder, load_file(str(path)),
                                           adapter_name=adapter)
        lora_missing = [k for k in result.missing_keys if f".{adapter}." in k and "lora_" in k]
        if result.unexpected_keys or lora_missing:
            raise ModelIOError(f"{path}: does not fit the model: unexpected "
                               f"{result.unexpected_keys[:3]}, missing {lora_missing[:3]}")
    modules_path = directory / "modules.safetensors"
    result = model.load_state_dict(load_file(str(modules_path)), strict=False)
    missing = [k for k in result.missing_keys if k.split(".", 1)[0] in MODULES]
    if result.unexpected_keys or missing:
        raise ModelIOError(f"{modules_path}: does not fit the model: unexpected "
                           f"{result.unexpected_keys[:3]}, missing {missing[:3]}")
    if manifest.get("own_diagnosis_head"):
        model.set_own_diagnosis_head(
            _load_own_head(model, directory / manifest["own_diagnosis_head"]))
    return model.eval()


def _load_own_head(model: MRGModel, path: Path) -> torch.nn.Module:
    """The center's own head saved at `path`, in a copy of the shared head's shape."""
    if not path.exists():
        raise ModelIOError(f"{path}: missing (the manifest names it)")
    head = copy.deepcopy(model.diagnosis_head)
    try:
        head.load_state_dict(load_file(str(path)))
    except RuntimeError as e:
        raise ModelIOError(f"{path}: does not fit the model's diagnosis head: {e}") from e
    return head
