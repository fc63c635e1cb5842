"""The vision encoder: any timm backbone, multi-view studies pooled to one feature vector.

A study has up to V views (PA, lateral, ...); `view_mask` says which are real. Only real views
go through the backbone (padding never touches BatchNorm statistics), and their features are
averaged per study. Frozen when `freeze_encoder` (BatchNorm then stays in eval mode), with an
optional peft LoRA adapter named `encoder` on its Linear/Conv2d layers.
"""

from __future__ import annotations

import os
from pathlib import Path

import timm
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from fedmrg.config import ModelConfig

ENCODER_ADAPTER = "encoder"


class EncoderError(ValueError):
    """The encoder cannot be built or fed; the message names the model/key/shape."""


def create_backbone(cfg: ModelConfig) -> nn.Module:
    """`timm.create_model(cfg.encoder, ...)` with a pooled (N, F) output and clear errors.

    Pretrained weights come from `model.encoder_checkpoint` (a local file, read by timm's own
    loader: the classifier is dropped and the stem adapted to `in_chans`), else from timm's
    source when `model.pretrained`, else none (random initialization)."""
    if not timm.is_model(cfg.encoder):
        close = timm.list_models(f"*{cfg.encoder.split('_')[0]}*")[:10]
        raise EncoderError(f"model.encoder: {cfg.encoder!r} is not a timm model"
                           + (f"; similar names: {close}" if close else ""))
    kwargs = dict(num_classes=0, in_chans=cfg.in_chans, **cfg.encoder_kwargs)
    if cfg.encoder_checkpoint:
        return _from_checkpoint(cfg, kwargs)
    if not cfg.pretrained:
        try:
            return timm.create_model(cfg.encoder, pretrained=False, **kwargs)
        except TypeError as e:
            raise EncoderError(f"model.encoder_kwargs {cfg.encoder_kwargs}: rejected by "
                               f"{cfg.encoder!r}: {e}") from e
    try:
        return timm.create_model(cfg.encoder, pretrained=True, **kwargs)
    except Exception as e:  # timm raises several types for missing weights (hub, url, file)
        raise EncoderError(
            f"model.pretrained=true but pretrained weights for {cfg.encoder!r} are not available: "
            f"{type(e).__name__}: {e}. Offline (no network or HF_HUB_OFFLINE=1), put the weights "
            f"in the Hugging Face cache, set model.encoder_checkpoint to a local weights file, "
            f"or set model.pretrained=false") from e


def check_encoder_checkpoint(cfg: ModelConfig) -> None:
    """`model.encoder_checkpoint` names a readable file (checked before any actor starts)."""
    if not cfg.encoder_checkpoint:
        return
    path = Path(os.path.expanduser(cfg.encoder_checkpoint))
    if not path.is_file():
        raise EncoderError(f"model.encoder_checkpoint={cfg.encoder_checkpoint!r}: no such file")
    if not os.access(path, os.R_OK):
        raise EncoderError(f"model.encoder_checkpoint={cfg.encoder_checkpoint!r}: not readable")


def _from_checkpoint(cfg: ModelConfig, kwargs: dict) -> nn.Module:
    check_encoder_checkpoint(cfg)
    path = str(Path(os.path.expanduser(cfg.encoder_checkpoint)))
    overlay = {**kwargs.pop("pretrained_cfg_overlay", {}), "file": path}
    try:
        return timm.create_model(cfg.encoder, pretrained=True, pretrained_cfg_overlay=overlay,
                                 **kwargs)
    except Exception as e:  # a wrong file: torch/safetensors read errors, key/shape mismatches
        first = str(e).strip().splitlines()
        raise EncoderError(f"model.encoder_checkpoint={cfg.encoder_checkpoint!r}: not weights "
                           f"of {cfg.encoder!r} with {cfg.encoder_kwargs or 'default'} kwargs: "
                           f"{type(e).__name__}: {' '.join(first[:2])[:300]}") from e


def _lora_target_names(backbone: nn.Module) -> list[str]:
    """Linear and ungrouped Conv2d layers: the ones peft's LoRA supports without caveats."""
    names = []
    for name, module in backbone.named_modules():
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1):
            names.append(name)
    return names


class VisionEncoder(nn.Module):
    """(B, V, C, H, W) images + (B, V) view mask -> (B, F) study features."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.backbone = create_backbone(cfg)
        self.num_features: int = int(self.backbone.num_features)
        self.in_chans = cfg.in_chans
        self.frozen = cfg.freeze_encoder
        # FedBN: a trained encoder's BatchNorm layers stay with the center (fedmrg.model.params)
        self.local_norm = bool(cfg.local_batchnorm) and not self.frozen
        if cfg.encoder_lora_rank and not cfg.freeze_encoder:
            raise EncoderError("model.encoder_lora_rank > 0 needs model.freeze_encoder=true "
                               "(LoRA adapts a frozen encoder; a trainable one needs none)")
        if self.frozen:
            self.backbone.requires_grad_(False)
        if cfg.encoder_lora_rank:
            lora = LoraConfig(r=cfg.encoder_lora_rank, lora_alpha=cfg.encoder_lora_rank * 2,
                              target_modules=_lora_target_names(self.backbone))
            inject_adapter_in_model(lora, self.backbone, adapter_name=ENCODER_ADAPTER)
            for name, p in self.backbone.named_parameters():
                p.requires_grad_(f"lora_A.{ENCODER_ADAPTER}." in name
                                 or f"lora_B.{ENCODER_ADAPTER}." in name)
        if self.frozen:
            self.backbone.eval()

    def train(self, mode: bool = True) -> VisionEncoder:
        super().train(mode)
        if self.frozen:
            self.backbone.eval()  # frozen BatchNorm statistics and no dropout
        return self

    def forward(self, images: torch.Tensor, view_mask: torch.Tensor) -> torch.Tensor:
        if images.ndim != 5 or images.shape[2] != self.in_chans:
            raise EncoderError(f"images: expected (B, V, {self.in_chans}, H, W), got "
                               f"{tuple(images.shape)}")
        B, V = images.shape[:2]
        if view_mask.shape != (B, V):
            raise EncoderError(f"view_mask: expected shape {(B, V)}, got {tuple(view_mask.shape)}")
        view_mask = view_mask.to(device=images.device, dtype=torch.bool)
        if not bool(view_mask.any(1).all()):
            raise EncoderError("view_mask: every study needs at least one real view")
        feats = self.backbone(images[view_mask])  # (N, F) for the N real views only
        per_view = feats.new_zeros(B, V, feats.shape[-1])
        per_view[view_mask] = feats  # (B, V, F)
        weights = view_mask.to(feats.dtype).unsqueeze(-1)  # (B, V, 1)
        return (per_view * weights).sum(1) / weights.sum(1)  # (B, F)
