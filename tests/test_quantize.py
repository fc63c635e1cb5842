"""Quantized wire dtypes (`fedmrg.fl.quantize`, int8 / nf4 in `fedmrg.fl.wire`): round-trip
error bounds, exact byte counts, packing of odd lengths, validation of malformed messages, and
error feedback carrying the quantization error across rounds. Pure, well under a second."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fedmrg.fl.lowrank import ErrorFeedback, LowRankUpdate, truncated_svd
from fedmrg.fl.messages import ClientUpdate, UpdateSpec
from fedmrg.fl.quantize import (
    NF4_LEVELS,
    dequantize,
    quantize,
    quantized_nbytes,
    quantized_problem,
    round_trip,
)
from fedmrg.fl.validation import validate_update
from fedmrg.fl.wire import from_wire, message_bytes, to_wire, wire_dtype, wire_quantization

# half the widest gap between consecutive NF4 levels (between 0.723 and 1.0)
NF4_MAX_ERROR = float((NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max()) / 2


def block_absmax(t: torch.Tensor, block: int = 64) -> torch.Tensor:
    flat = t.reshape(-1)
    pad = (-flat.numel()) % block
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, block)
    return blocks.abs().amax(1).repeat_interleave(block)[:flat.numel()].view(t.shape)


@pytest.mark.parametrize("scheme,bound", [("int8", 1 / 254), ("nf4", NF4_MAX_ERROR)])
@pytest.mark.parametrize("numel", [1, 63, 64, 65, 1001])
def test_round_trip_error_is_bounded_by_block_absmax(scheme: str, bound: float,
                                                     numel: int) -> None:
    g = torch.Generator().manual_seed(numel)
    # blocks of very different magnitudes: the scale is per block, not per tensor
    t = torch.randn(numel, generator=g) * torch.logspace(-4, 2, numel)
    back = dequantize(quantize(t, scheme))
    assert back.shape == t.shape and back.dtype == torch.float32
    err = (back - t).abs()
    assert bool((err <= bound * block_absmax(t) * (1 + 1e-5) + 1e-12).all())
    # each block's absmax is sent exactly (a level of +-1 times its scale)
    i = int(t[:64].abs().argmax())
    assert back[i] == pytest.approx(float(t[i]), rel=1e-6)


def test_int8_error_is_near_its_bound_and_nf4_is_coarser() -> None:
    t = torch.randn(64 * 100, generator=torch.Generator().manual_seed(0))
    rel = {s: float(((round_trip(t, s) - t).abs() / block_absmax(t)).max())
           for s in ("int8", "nf4")}
    assert 1 / 400 < rel["int8"] <= 1 / 254 + 1e-6
    assert 1 / 254 < rel["nf4"] <= NF4_MAX_ERROR + 1e-6


@pytest.mark.parametrize("shape", [(1,), (3, 5), (7, 9, 11), (129,), (0,)])
def test_exact_byte_counts_and_odd_packing(shape: tuple[int, ...]) -> None:
    t = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    numel = math.prod(shape)
    for scheme, codes in (("int8", numel), ("nf4", (numel + 1) // 2)):
        q = quantize(t, scheme)
        assert q.data.numel() == codes
        assert q.scales.numel() == math.ceil(numel / 64)
        assert q.nbytes == codes + 4 * math.ceil(numel / 64) == quantized_nbytes(numel, scheme)
        size = message_bytes({"x": q})
        assert size.bytes == q.nbytes + 1  # + the key "x"
        assert size.by_dtype[scheme] == q.nbytes
        assert size.dense_equivalent_bytes == 4 * numel + 1
        assert dequantize(q).shape == t.shape


def test_nf4_packs_two_codes_per_byte_low_nibble_first() -> None:
    t = torch.tensor([1.0, -1.0, 0.0])  # levels 15, 0, 7
    q = quantize(t, "nf4")
    assert q.data.tolist() == [15 | (0 << 4), 7]  # the odd last code: high nibble 0
    assert dequantize(q).tolist() == [1.0, -1.0, 0.0]


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_requantizing_a_round_trip_is_lossless(scheme: str) -> None:
    t = torch.randn(300, generator=torch.Generator().manual_seed(2))
    once = round_trip(t, scheme)
    assert torch.equal(quantize(once, scheme).data, quantize(t, scheme).data)
    assert torch.equal(round_trip(once, scheme), once)


def update(seed: int = 0) -> ClientUpdate:
    g = torch.Generator().manual_seed(seed)
    lora = {"m.lora_A.generic.weight": torch.randn(4, 9, generator=g),
            "m.lora_B.generic.weight": torch.randn(5, 4, generator=g)}
    dense = {"head.weight": truncated_svd(torch.randn(7, 9, generator=g), 2),
             "head.bias": torch.randn(7, generator=g)}
    return ClientUpdate(1, "a", 3, lora, dense, metrics={"loss": 1.0})


SPEC = UpdateSpec(lora={"m.lora_A.generic.weight": (4, 9), "m.lora_B.generic.weight": (5, 4)},
                  dense={"head.weight": (7, 9), "head.bias": (7,)})


@pytest.mark.parametrize("wire", ["int8", "nf4"])
def test_to_wire_quantizes_the_model_update_and_validation_accepts_it(wire: str) -> None:
    honest = update()
    sent = to_wire(honest, wire)
    scheme = wire_quantization(wire)
    assert wire_dtype(wire) == torch.float32
    assert validate_update(sent, center="a", round_id=1, spec=SPEC, dtype=torch.float32,
                           quantization=scheme) is None
    # bytes: codes + scales of every model tensor (the LoRA pair stands for a 5 x 9 delta)
    fp32, q = message_bytes(to_wire(honest, "fp32")), message_bytes(sent)
    model = sum(quantized_nbytes(n, scheme) for n in (36, 20, 14, 18, 7))
    assert fp32.bytes - q.bytes == 4 * (36 + 20 + 14 + 18 + 7) - model
    received = from_wire(sent)
    assert isinstance(received.dense["head.weight"], LowRankUpdate)
    assert torch.allclose(received.dense["head.bias"], honest.dense["head.bias"],
                          atol=NF4_MAX_ERROR * float(honest.dense["head.bias"].abs().max()))
    # an unquantized update is refused when the wire says quantized, and the other way round
    reason = validate_update(to_wire(honest, "fp32"), center="a", round_id=1, spec=SPEC,
                             dtype=torch.float32, quantization=scheme)
    assert reason is not None and f"expected {scheme}-quantized" in reason
    reason = validate_update(sent, center="a", round_id=1, spec=SPEC, dtype=torch.float32)
    assert reason is not None and "quantized, expected the wire dtype" in reason


def test_validation_rejects_bad_scales_codes_and_shapes() -> None:
    sent = to_wire(update(), "int8")
    name = "head.bias"
    q = sent.dense[name]
    bad = {
        "scales have non-finite values": dataclasses.replace(
            q, scales=torch.tensor([float("inf")])),
        "scales have negative values": dataclasses.replace(q, scales=-q.scales),
        "scales are torch.float16": dataclasses.replace(q, scales=q.scales.half()),
        "codes are torch.int8 (6,)": dataclasses.replace(q, data=q.data[:6]),
        "quantized as 'nf4', expected 'int8'": quantize(update().dense[name], "nf4"),
        "code -128": dataclasses.replace(q, data=torch.full_like(q.data, -128)),
    }
    for why, malformed in bad.items():
        reply = dataclasses.replace(sent, dense={**sent.dense, name: malformed})
        reason = validate_update(reply, center="a", round_id=1, spec=SPEC, dtype=torch.float32,
                                 quantization="int8")
        assert reason is not None and why in reason and repr(name) in reason, (why, reason)
    # a shape that does not fit the tensor's
    wrong = dataclasses.replace(q, shape=(8,), data=torch.zeros(8, dtype=torch.int8))
    reply = dataclasses.replace(sent, dense={**sent.dense, name: wrong})
    reason = validate_update(reply, center="a", round_id=1, spec=SPEC, dtype=torch.float32,
                             quantization="int8")
    assert reason == "dense update 'head.bias' does not fit the tensor's shape (7,)"
    assert quantized_problem(q) is None


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
@pytest.mark.parametrize("rank", [0, 2])
def test_error_feedback_carries_the_quantization_error(scheme: str, rank: int) -> None:
    """50 rounds of random updates: the residual stays below a small multiple of one round's
    quantization (+ truncation) error, and the sum sent tracks the sum of true updates within
    the last residual, exactly."""
    g = torch.Generator().manual_seed(3)
    feedback = ErrorFeedback()
    shape = (16, 24)
    true_sum = torch.zeros(shape, dtype=torch.float64)
    sent_sum = torch.zeros(shape, dtype=torch.float64)
    one_round_errors, residual_norms = [], []
    for _ in range(50):
        delta = torch.randn(shape, generator=g) * 0.01
        sent = feedback.compress("w", delta, rank, scheme)
        on_wire = from_wire(to_wire(ClientUpdate(1, "a", 1, {}, {"w": sent}), scheme))
        received = on_wire.dense["w"]
        received = received.U @ received.V if isinstance(received, LowRankUpdate) else received
        true_sum += delta.double()
        sent_sum += received.double()
        direct = round_trip(delta, scheme) if rank == 0 else None
        if direct is not None:
            one_round_errors.append(float((direct - delta).norm()))
        residual_norms.append(feedback.residual_norm())
        # what arrived is what the residual accounted for: the wire adds no further loss
        assert torch.allclose(true_sum - sent_sum,
                              feedback.residuals["w"].double(), atol=1e-5)
    if rank == 0:
        one_round = sum(one_round_errors) / len(one_round_errors)
        assert max(residual_norms) < 3 * one_round
    else:  # truncation dominates; the residual stays bounded (no growth over the rounds)
        assert max(residual_norms[25:]) < 2 * max(residual_norms[:25])
    # without feedback the errors would add up: the tracked sum is far closer
    assert float((true_sum - sent_sum).norm()) == pytest.approx(residual_norms[-1], rel=1e-4)
