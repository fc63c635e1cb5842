"""Which tensors travel: explicit parameter groups of an `MRGModel`.

- shared  (sent to the server, aggregated): the generic LoRA factors, projector, diagnosis head,
  global projection head, the encoder's trainable weights (all of it when trained, its LoRA
  factors when frozen) and, for a trained encoder without `local_batchnorm`, its float
  normalization statistics (BatchNorm running mean/var: without them a server-side model would
  normalize with its initial statistics).
- private (never leave the center): the specialized LoRA factors, the local projection head and,
  with `model.local_batchnorm` (FedBN, the default) and a trained encoder, the encoder's
  BatchNorm layers: weights, biases and running statistics. Centers differ in acquisition
  (center c's films have inverted polarity): running statistics averaged over centers fit none
  of them, and evaluation-mode BatchNorm then normalizes every center wrongly (the default
  fedmrg run: diagnosis accuracy 0.647 with private BatchNorm vs 0.536 averaged).
- frozen  (identical everywhere, never trained): the base LM and a frozen encoder.

Names are `state_dict` names (`decoder.base_model.model...lora_A.generic.weight`), the same in
every process that builds the model from the same config. Membership is decided by module and
adapter name, never by `requires_grad`, so a stray flag cannot leak a private tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from fedmrg.model.encoder import ENCODER_ADAPTER
from fedmrg.model.mrg import GENERIC, SPECIALIZED

GROUPS = ("shared", "private", "frozen")
SHARED_MODULES = ("projector.", "diagnosis_head.", "global_head.")
PRIVATE_MODULES = ("local_head.",)


class ParameterGroupError(ValueError):
    """A state does not match the model's group; the message names the tensor."""


def _adapter_of(name: str) -> str | None:
    """The peft adapter a LoRA tensor belongs to (`...lora_A.<adapter>.weight`), else None."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.startswith("lora_"):
            return parts[i + 1]
    return None


def local_norm_modules(model: nn.Module) -> set[str]:
    """Names (`encoder.<module>`) of the encoder's BatchNorm layers kept private, if any."""
    if not getattr(model.encoder, "local_norm", False):
        return set()
    return {f"encoder.{n}" for n, m in model.encoder.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def _group_of(name: str, encoder_frozen: bool, local_norm: set[str]) -> str:
    if name.rsplit(".", 1)[0] in local_norm:  # FedBN: the layer stays with the center
        return "private"
    if name.startswith("decoder."):
        adapter = _adapter_of(name)
        if adapter == GENERIC:
            return "shared"
        if adapter == SPECIALIZED:
            return "private"
        if adapter is not None:
            raise ParameterGroupError(f"{name}: unknown decoder adapter {adapter!r}")
        return "frozen"
    if name.startswith(SHARED_MODULES):
        return "shared"
    if name.startswith(PRIVATE_MODULES):
        return "private"
    if name.startswith("encoder."):
        if not encoder_frozen or _adapter_of(name) == ENCODER_ADAPTER:
            return "shared"
        return "frozen"
    raise ParameterGroupError(f"{name}: parameter outside every known module; add it to a group "
                              f"in fedmrg/model/params.py")


def parameter_groups(model: nn.Module) -> dict[str, dict[str, nn.Parameter]]:
    """{"shared": {name: param}, "private": {...}, "frozen": {...}} over every parameter."""
    groups: dict[str, dict[str, nn.Parameter]] = {g: {} for g in GROUPS}
    encoder_frozen = bool(model.encoder.frozen)
    local_norm = local_norm_modules(model)
    for name, param in model.named_parameters():
        groups[_group_of(name, encoder_frozen, local_norm)][name] = param
    return groups


def group_buffers(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """{"shared": {...}, "private": {...}}: the float buffers of a trained encoder (BatchNorm
    running statistics), private for the layers in `local_norm_modules`."""
    out: dict[str, dict[str, torch.Tensor]] = {"shared": {}, "private": {}}
    if model.encoder.frozen:
        return out
    local_norm = local_norm_modules(model)
    for n, b in model.encoder.named_buffers():
        if b.dtype.is_floating_point:
            name = f"encoder.{n}"
            out[_group_of(name, False, local_norm)][name] = b
    return out


def counter_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's integer buffers (BatchNorm `num_batches_tracked`): in no group (never sent,
    never averaged), each client's own count of its training batches, which its checkpoint
    keeps so that a resumed client's model equals an uninterrupted one's in every buffer."""
    return {f"encoder.{n}": b for n, b in model.encoder.named_buffers()
            if not b.dtype.is_floating_point}


def _group_tensors(model: nn.Module, group: str) -> dict[str, torch.Tensor]:
    if group not in GROUPS:
        raise ParameterGroupError(f"unknown group {group!r}; groups: {list(GROUPS)}")
    tensors: dict[str, torch.Tensor] = dict(parameter_groups(model)[group])
    tensors.update(group_buffers(model).get(group, {}))
    return tensors


def get_state(model: nn.Module, group: str) -> dict[str, torch.Tensor]:
    """Detached CPU copies of a group's tensors (a snapshot: training does not change it)."""
    return {n: t.detach().to("cpu", copy=True) for n, t in _group_tensors(model, group).items()}


def load_state(model: nn.Module, group: str, state: Mapping[str, torch.Tensor]) -> None:
    """Copy `state` into the group's tensors; strict on names, shapes and finite values."""
    targets = _group_tensors(model, group)
    unknown = sorted(set(state) - set(targets))
    if unknown:
        raise ParameterGroupError(f"{group} state: unknown tensor {unknown[0]!r} "
                                  f"({len(unknown)} unknown in all)")
    missing = sorted(set(targets) - set(state))
    if missing:
        raise ParameterGroupError(f"{group} state: missing tensor {missing[0]!r} "
                                  f"({len(missing)} missing in all)")
    for name, value in state.items():
        target = targets[name]
        if tuple(value.shape) != tuple(target.shape):
            raise ParameterGroupError(f"{group} state: {name!r} has shape {tuple(value.shape)}, "
                                      f"the model expects {tuple(target.shape)}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ParameterGroupError(f"{group} state: {name!r} has non-finite values")
    with torch.no_grad():
        for name, value in state.items():
            targets[name].copy_(value)


def get_shared_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a client sends and the server aggregates (see the module docstring)."""
    return get_state(model, "shared")


def load_shared_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    load_state(model, "shared", state)


def get_private_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The center's own tensors (specialized adapter, local head): kept, checkpointed locally."""
    return get_state(model, "private")


def load_private_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    load_state(model, "private", state)


# --------------------------------------------------------------------------- description


@dataclass(frozen=True)
class TensorRow:
    group: str
    name: str
    shape: tuple[int, ...]
    dtype: str
    bytes: int
    kind: str  # "parameter" or "buffer"


def describe_parameter_groups(model: nn.Module) -> list[TensorRow]:
    """One row per tensor of every group (shared and private buffers included,
    kind="buffer")."""
    rows = []
    for group, params in parameter_groups(model).items():
        for name, p in params.items():
            rows.append(TensorRow(group, name, tuple(p.shape), str(p.dtype).removeprefix("torch."),
                                  p.numel() * p.element_size(), "parameter"))
    for group, buffers in group_buffers(model).items():
        for name, b in buffers.items():
            rows.append(TensorRow(group, name, tuple(b.shape),
                                  str(b.dtype).removeprefix("torch."),
                                  b.numel() * b.element_size(), "buffer"))
    return rows


def parameter_group_summary(model: nn.Module) -> dict[str, dict[str, int]]:
    """{group: {"tensors", "elements", "bytes"}} for shared, private and frozen."""
    summary = {g: {"tensors": 0, "elements": 0, "bytes": 0} for g in GROUPS}
    for row in describe_parameter_groups(model):
        s = summary[row.group]
        s["tensors"] += 1
        s["elements"] += int(torch.Size(row.shape).numel())
        s["bytes"] += row.bytes
    return summary


def format_parameter_summary(summary: Mapping[str, Mapping[str, int]]) -> str:
    """A markdown table of `parameter_group_summary`."""
    lines = ["| group | tensors | elements | MiB |", "|---|---:|---:|---:|"]
    for group, s in summary.items():
        lines.append(f"| {group} | {s['tensors']} | {s['elements']:,} | "
                     f"{s['bytes'] / 2**20:.2f} |")
    return "\n".join(lines)
