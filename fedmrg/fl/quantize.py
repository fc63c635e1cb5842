"""Blockwise quantization of model-update tensors for the wire (pure torch, no Ray).

    q = quantize(t, "int8")         # a QuantizedTensor: packed codes + one fp32 scale per block
    t2 = dequantize(q)              # float32, t's shape
    reason = quantized_problem(q)   # None, or why q is malformed (validation)

The tensor is flattened and cut into blocks of `BLOCK` (64) values (the last one may be
shorter); each block keeps its absolute maximum as a float32 scale and its values as codes:

- int8: round(x / absmax * 127), one signed byte per value: error <= absmax / 254 per value.
- nf4: the nearest of the 16 NormalFloat levels (QLoRA, Dettmers et al. 2023: quantiles of a
  normal distribution, scaled to [-1, 1]) of x / absmax, two 4-bit codes per byte (the low
  nibble first; an odd count leaves the last high nibble 0). Error <= absmax * 0.16 (half the
  widest gap between levels, 0.696..1.0), much less near 0 where most values of an update are.

Bytes on the wire: codes (numel for int8, ceil(numel / 2) for nf4) + 4 * ceil(numel / 64)
scales: 8.5 bits per value for int8, 4.5 for nf4 (vs 32 for fp32). Quantizing what
`dequantize` returned gives the same codes (the block's absmax is a level times its scale), so
a tensor that was round-tripped once (error feedback does, `fedmrg.fl.lowrank.ErrorFeedback`)
travels with no further loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

BLOCK = 64
SCALE_DTYPE = torch.float32
SCHEMES = ("int8", "nf4")
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])


class QuantizationError(ValueError):
    """An unknown scheme or a tensor that cannot be quantized."""


@dataclass(frozen=True)
class QuantizedTensor:
    """A floating tensor as it travels quantized: `data` the codes (int8, or uint8 with two nf4
    codes per byte), `scales` one float32 absmax per block of `block` values, `shape` the
    original shape."""

    scheme: str
    shape: tuple[int, ...]
    data: Tensor
    scales: Tensor
    block: int = BLOCK

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def dim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes on the wire: codes + scales."""
        return (self.data.numel() * self.data.element_size()
                + self.scales.numel() * self.scales.element_size())


def quantized_nbytes(numel: int, scheme: str, block: int = BLOCK) -> int:
    """Bytes a tensor of `numel` values takes quantized (codes + float32 scales)."""
    if scheme not in SCHEMES:
        raise QuantizationError(f"unknown quantization {scheme!r}; choose one of {SCHEMES}")
    codes = numel if scheme == "int8" else (numel + 1) // 2
    return codes + SCALE_DTYPE.itemsize * math.ceil(numel / block)


def _blocks(flat: Tensor, block: int) -> Tensor:
    """(n_blocks, block) view of `flat`, zero-padded at the end."""
    pad = (-flat.numel()) % block
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, block)


def quantize(t: Tensor, scheme: str, block: int = BLOCK) -> QuantizedTensor:
    """`t` (floating, any shape, finite) quantized blockwise (module docstring)."""
    if scheme not in SCHEMES:
        raise QuantizationError(f"unknown quantization {scheme!r}; choose one of {SCHEMES}")
    if not t.is_floating_point():
        raise QuantizationError(f"cannot quantize a {t.dtype} tensor (floating only)")
    flat = t.detach().reshape(-1).to(torch.float32).cpu()
    numel = flat.numel()
    blocks = _blocks(flat, block)
    scales = blocks.abs().amax(dim=1)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales)).unsqueeze(1)
    unit = blocks / safe  # in [-1, 1]
    if scheme == "int8":
        data = torch.round(unit * 127).clamp(-127, 127).to(torch.int8).reshape(-1)[:numel]
    else:
        codes = (unit.unsqueeze(-1) - NF4_LEVELS).abs().argmin(dim=-1).to(torch.uint8)
        codes = codes.reshape(-1)[:numel]
        if numel % 2:
            codes = torch.cat([codes, codes.new_zeros(1)])
        data = codes[0::2] | (codes[1::2] << 4)
    return QuantizedTensor(scheme, tuple(t.shape), data.contiguous(),
                           scales.to(SCALE_DTYPE).contiguous(), block)


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The floating tensor `q` stands for, in `dtype` (float32 by default)."""
    numel = q.numel
    if q.scheme == "int8":
        unit = q.data.to(torch.float32) / 127
    elif q.scheme == "nf4":
        codes = torch.stack([q.data & 0x0F, q.data >> 4], dim=1).reshape(-1)[:numel]
        unit = NF4_LEVELS[codes.long()]
    else:
        raise QuantizationError(f"unknown quantization {q.scheme!r}; choose one of {SCHEMES}")
    values = (_blocks(unit, q.block) * q.scales.to(torch.float32).unsqueeze(1)).reshape(-1)
    return values[:numel].reshape(q.shape).to(dtype)


def round_trip(t: Tensor, scheme: str) -> Tensor:
    """What the receiver gets for `t`: dequantize(quantize(t)), in t's floating dtype."""
    return dequantize(quantize(t, scheme), t.dtype).to(t.device)


def quantized_problem(q: QuantizedTensor, scheme: str | None = None) -> str | None:
    """Why `q` (as received) is not a well-formed quantized tensor, or None: its scheme (the
    expected one if given), block size, shape, code dtype and count, scale dtype, count and
    values (finite, non-negative)."""
    if scheme is not None and q.scheme != scheme:
        return f"quantized as {q.scheme!r}, expected {scheme!r}"
    if q.scheme not in SCHEMES:
        return f"unknown quantization {q.scheme!r}"
    if not isinstance(q.block, int) or isinstance(q.block, bool) or q.block <= 0:
        return f"block size {q.block!r} is not a positive integer"
    if (not isinstance(q.shape, tuple)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                       for d in q.shape)):
        return f"shape {q.shape!r} is not a tuple of non-negative integers"
    if not isinstance(q.data, Tensor) or not isinstance(q.scales, Tensor):
        return "codes or scales are not tensors"
    numel = q.numel
    want_dtype, want_codes = ((torch.int8, numel) if q.scheme == "int8"
                              else (torch.uint8, (numel + 1) // 2))
    if q.data.dtype != want_dtype or q.data.dim() != 1 or q.data.numel() != want_codes:
        return (f"codes are {q.data.dtype} {tuple(q.data.shape)}, expected {want_dtype} "
                f"({want_codes},) for shape {q.shape}")
    if q.scheme == "int8" and bool((q.data == -128).any()):
        return "int8 code -128 is out of range (-127..127)"
    blocks = math.ceil(numel / q.block)
    if q.scales.dtype != SCALE_DTYPE or q.scales.dim() != 1 or q.scales.numel() != blocks:
        return (f"scales are {q.scales.dtype} {tuple(q.scales.shape)}, expected "
                f"{SCALE_DTYPE} ({blocks},)")
    if not bool(torch.isfinite(q.scales).all()):
        return "scales have non-finite values"
    if bool((q.scales < 0).any()):
        return "scales have negative values"
    return None
