"""Byte accounting of federated messages, and the wire dtype of their floating tensors.

`message_bytes(payload)` walks any message (nested dicts, lists, tuples, dataclasses of tensors,
`LowRankUpdate`s, numpy arrays, numbers, strings) and counts what it carries:

- tensor and array data: numel * element size, by dtype (`float32`, `bfloat16`, ...);
- numbers 8 bytes (`int64` / `float64`), bools 1 byte, strings and bytes their (UTF-8) length,
  None nothing; mapping keys and dataclass field names count as strings: names travel too
  (a state dict's names can outweigh a tiny model's LoRA factors);
- `dense_equivalent_bytes`: what the same update would cost sent dense. A LoRA pair
  (`<m>.lora_A.<a>.weight` (r, k) and `<m>.lora_B.<a>.weight` (d, r) in one mapping) counts as
  the full d x k delta, a `LowRankUpdate` as its original shape, anything else as itself; all
  in the factors' element size.

Framing (pickle headers, tensor shapes and strides) is not counted: it is the same whatever the
compression and small next to the data. `to_wire(payload, "bf16")` casts floating tensors for
sending; `from_wire(payload)` casts them back (to float32 by default) on arrival.

Quantized wire dtypes ("int8", "nf4", `fedmrg.fl.quantize`): `to_wire` quantizes the model
update of a `ClientUpdate` (its LoRA factors, dense updates and `LowRankUpdate` factors) into
`QuantizedTensor`s and sends every other floating tensor (plans, broadcast state, statistics)
in float32: the downlink's global state and the prototypes/label counts are not error-fed, so
they stay exact. A `QuantizedTensor` counts its codes + scales (under its scheme's name in
`by_dtype`), its dense equivalent as float32; `from_wire` dequantizes it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedmrg.choices import WireDtype, choice_values
from fedmrg.fl.lowrank import LowRankUpdate, is_lora_factor, lora_delta_shape, lora_pairs
from fedmrg.fl.quantize import QuantizedTensor, dequantize, quantize

# the dtype of floating tensors that are not quantized
WIRE_DTYPES = {WireDtype.FP32: torch.float32, WireDtype.BF16: torch.bfloat16,
               WireDtype.INT8: torch.float32, WireDtype.NF4: torch.float32}
QUANTIZED_WIRE = {WireDtype.INT8: "int8", WireDtype.NF4: "nf4"}
SCALAR_BYTES = 8  # a Python int/float as int64/float64


class WireError(ValueError):
    """A message holds something that cannot be counted or cast; the message names its path."""


@dataclass
class WireSize:
    """Bytes of one message (or of several, summed with `+`)."""

    bytes: int = 0
    dense_equivalent_bytes: int = 0
    by_dtype: dict[str, int] = field(default_factory=dict)
    tensors: int = 0  # tensors and arrays; a LowRankUpdate is 2

    @property
    def compression(self) -> float:
        """dense_equivalent_bytes / bytes (1.0 for an empty message)."""
        return self.dense_equivalent_bytes / self.bytes if self.bytes else 1.0

    def __add__(self, other: WireSize) -> WireSize:
        by_dtype = dict(self.by_dtype)
        for dtype, n in other.by_dtype.items():
            by_dtype[dtype] = by_dtype.get(dtype, 0) + n
        return WireSize(self.bytes + other.bytes,
                        self.dense_equivalent_bytes + other.dense_equivalent_bytes,
                        by_dtype, self.tensors + other.tensors)

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers for logging/JSON."""
        return {"bytes": self.bytes, "dense_equivalent_bytes": self.dense_equivalent_bytes,
                "by_dtype": dict(sorted(self.by_dtype.items())), "tensors": self.tensors}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _bytes_and_name(t: torch.Tensor | QuantizedTensor) -> tuple[int, str]:
    if isinstance(t, QuantizedTensor):
        return t.nbytes, t.scheme
    return t.numel() * t.element_size(), _dtype_name(t.dtype)


def _element_size(t: torch.Tensor | QuantizedTensor) -> int:
    return torch.float32.itemsize if isinstance(t, QuantizedTensor) else t.element_size()


class _Counter:
    def __init__(self) -> None:
        self.size = WireSize()

    def data(self, dtype: str, nbytes: int, dense_bytes: int | None = None,
             tensors: int = 0) -> None:
        s = self.size
        s.bytes += nbytes
        s.dense_equivalent_bytes += nbytes if dense_bytes is None else dense_bytes
        s.by_dtype[dtype] = s.by_dtype.get(dtype, 0) + nbytes
        s.tensors += tensors

    def factors(self, tensors: list[torch.Tensor | QuantizedTensor], dense_numel: int) -> None:
        """Low-rank factors: their own bytes, and the dense tensor they stand for as the
        dense equivalent (in the widest factor's element size, float32 if quantized)."""
        nbytes = 0
        for t in tensors:
            n, name = _bytes_and_name(t)
            self.data(name, n, tensors=1)
            nbytes += n
        elem = max(_element_size(t) for t in tensors)
        self.size.dense_equivalent_bytes += dense_numel * elem - nbytes

    def walk(self, obj: Any, path: str) -> None:
        if isinstance(obj, QuantizedTensor):
            self.data(obj.scheme, obj.nbytes, obj.numel * torch.float32.itemsize, tensors=1)
        elif isinstance(obj, torch.Tensor):
            self.data(_dtype_name(obj.dtype), obj.numel() * obj.element_size(), tensors=1)
        elif isinstance(obj, LowRankUpdate):
            self.factors([obj.U, obj.V], math.prod(obj.shape))
        elif isinstance(obj, np.ndarray):
            self.data(str(obj.dtype), int(obj.nbytes), tensors=1)
        elif isinstance(obj, Mapping):
            self.mapping(obj, path)
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            self.mapping({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}, path)
        elif isinstance(obj, (list, tuple, set, frozenset)):
            for i, item in enumerate(obj):
                self.walk(item, f"{path}[{i}]")
        else:
            self.scalar(obj, path)

    def scalar(self, obj: Any, path: str) -> None:
        if obj is None:
            return
        if isinstance(obj, (bool, np.bool_)):
            self.data("bool", 1)
        elif isinstance(obj, (int, np.integer)):
            self.data("int64", SCALAR_BYTES)
        elif isinstance(obj, (float, np.floating)):
            self.data("float64", SCALAR_BYTES)
        elif isinstance(obj, str):
            self.data("str", len(obj.encode("utf-8")))
        elif isinstance(obj, (bytes, bytearray)):
            self.data("bytes", len(obj))
        else:
            raise WireError(f"{path or 'payload'}: cannot count a {type(obj).__name__} "
                            f"(tensors, LowRankUpdate, arrays, containers, numbers, strings)")

    def mapping(self, obj: Mapping, path: str) -> None:
        lora_names = [k for k, v in obj.items()
                      if isinstance(k, str) and isinstance(v, (torch.Tensor, QuantizedTensor))
                      and is_lora_factor(k)]
        try:
            pairs = lora_pairs(lora_names) if lora_names else {}
        except ValueError:  # an unpaired factor: count it as itself rather than guess
            pairs = {}
        paired = set()
        for pair in pairs.values():
            A, B = obj[pair.a_key], obj[pair.b_key]
            if (isinstance(A, (torch.Tensor, QuantizedTensor))
                    and isinstance(B, (torch.Tensor, QuantizedTensor))
                    and A.dim() >= 2 and B.dim() >= 2 and A.shape[0] == B.shape[1]):
                self.factors([A, B], math.prod(lora_delta_shape(A, B)))
                paired.update((pair.a_key, pair.b_key))
        for key, value in obj.items():
            self.walk(key, f"{path}.<key>")
            if key not in paired:
                self.walk(value, f"{path}[{key!r}]")


def message_bytes(payload: Any) -> WireSize:
    """Bytes a message carries, by dtype, and its dense-equivalent size (module docstring)."""
    counter = _Counter()
    counter.walk(payload, "")
    return counter.size


# --------------------------------------------------------------------------- wire dtype


def wire_dtype(name: str) -> torch.dtype:
    """The torch dtype floating tensors that are not quantized travel in: bf16 for "bf16",
    float32 for the others; an unknown name is an error naming the choices."""
    if name not in WIRE_DTYPES:
        raise WireError(f"unknown wire dtype {name!r}; choose one of {choice_values(WireDtype)}")
    return WIRE_DTYPES[name]


def wire_quantization(name: str) -> str | None:
    """The quantization scheme of a wire dtype's model updates ("int8", "nf4"), or None."""
    wire_dtype(name)
    return QUANTIZED_WIRE.get(name)


def _cast(obj: Any, dtype: torch.dtype) -> Any:
    if isinstance(obj, QuantizedTensor):
        return dequantize(obj, dtype)
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, LowRankUpdate):
        return LowRankUpdate(_cast(obj.U, dtype), _cast(obj.V, dtype), tuple(obj.shape))
    if isinstance(obj, Mapping):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: _cast(getattr(obj, f.name), dtype)
                   for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)
    if isinstance(obj, (list, tuple)):
        items = [_cast(item, dtype) for item in obj]
        return items if isinstance(obj, list) else tuple(items)
    return obj  # numbers, strings, arrays: unchanged


def _quantized(obj: Any, scheme: str) -> Any:
    if isinstance(obj, torch.Tensor) and obj.is_floating_point():
        return quantize(obj, scheme)
    if isinstance(obj, LowRankUpdate):
        return LowRankUpdate(_quantized(obj.U, scheme), _quantized(obj.V, scheme),
                             tuple(obj.shape))
    return obj


def to_wire(payload: Any, dtype: str = "fp32") -> Any:
    """A copy of the message with every floating tensor (LowRankUpdate factors included) cast to
    the wire dtype; integer tensors, numpy arrays and scalars are left as they are. With a
    quantized wire dtype, a `ClientUpdate`'s LoRA factors and dense updates are quantized
    (module docstring)."""
    from fedmrg.fl.messages import ClientUpdate  # (import cycle: messages -> broadcast -> wire)

    wired = _cast(payload, wire_dtype(dtype))
    scheme = wire_quantization(dtype)
    if scheme is not None and isinstance(wired, ClientUpdate):
        wired = dataclasses.replace(
            wired, lora={n: _quantized(t, scheme) for n, t in wired.lora.items()},
            dense={n: _quantized(u, scheme) for n, u in wired.dense.items()})
    return wired


def from_wire(payload: Any, dtype: str = "fp32") -> Any:
    """The receiving side of `to_wire`: floating tensors back to `dtype` (float32 by default)
    for aggregation/loading, quantized ones dequantized. Precision lost on the wire stays
    lost."""
    return _cast(payload, wire_dtype(dtype))
