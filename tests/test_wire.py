"""Byte accounting of messages (hand-counted) and the wire dtype cast."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from fedmrg.fl.lowrank import LowRankUpdate, truncated_svd
from fedmrg.fl.wire import WireError, WireSize, from_wire, message_bytes, to_wire

A_KEY, B_KEY = "m.lora_A.generic.weight", "m.lora_B.generic.weight"  # 23 characters each


def test_plain_tensor_and_keys():
    size = message_bytes({"w": torch.zeros(10, 4)})
    assert size == WireSize(bytes=161, dense_equivalent_bytes=161,
                            by_dtype={"float32": 160, "str": 1}, tensors=1)
    assert message_bytes(torch.zeros(3, dtype=torch.float64)).by_dtype == {"float64": 24}
    assert message_bytes(torch.zeros(5, dtype=torch.int8)).bytes == 5


def test_lora_pair_counts_the_full_delta_as_dense_equivalent():
    A, B = torch.zeros(2, 30), torch.zeros(20, 2)  # delta (20, 30)
    size = message_bytes({A_KEY: A, B_KEY: B})
    keys = 2 * len(A_KEY)
    assert size.bytes == (60 + 40) * 4 + keys
    assert size.dense_equivalent_bytes == 20 * 30 * 4 + keys
    assert size.by_dtype == {"float32": 400, "str": keys} and size.tensors == 2
    # conv LoRA: A (r, in, kh, kw), B (out, r, 1, 1) -> delta (out, in, kh, kw)
    conv = message_bytes({A_KEY: torch.zeros(2, 3, 3, 3), B_KEY: torch.zeros(5, 2, 1, 1)})
    assert conv.dense_equivalent_bytes == 5 * 27 * 4 + keys
    assert conv.bytes == (54 + 10) * 4 + keys
    # an unpaired factor counts as itself rather than as a guessed delta
    lone = message_bytes({A_KEY: A})
    assert lone.bytes == lone.dense_equivalent_bytes == 240 + len(A_KEY)


def test_low_rank_update_counts_its_original_shape_as_dense_equivalent():
    up = LowRankUpdate(U=torch.zeros(20, 3), V=torch.zeros(3, 30), shape=(20, 30))
    assert message_bytes(up) == WireSize(600, 2400, {"float32": 600}, 2)
    conv = truncated_svd(torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(0)), 4)
    size = message_bytes(conv)
    assert size.bytes == (16 * 4 + 4 * 72) * 4
    assert size.dense_equivalent_bytes == 16 * 72 * 4
    assert size.compression == pytest.approx(1152 / 352)


def test_scalars_strings_containers_arrays_and_dataclasses():
    payload = {"n": 5, "loss": 0.5, "ok": True, "name": "ab", "none": None}
    # keys 1 + 4 + 2 + 4 + 4 = 15, values 8 + 8 + 1 + 2 + 0 = 19
    size = message_bytes(payload)
    assert size.bytes == size.dense_equivalent_bytes == 34
    assert size.by_dtype == {"int64": 8, "float64": 8, "bool": 1, "str": 17}
    assert size.tensors == 0
    nested = message_bytes([torch.zeros(2), (np.zeros(3, dtype=np.float16), b"xyz"), {1: "é"}])
    assert nested.by_dtype == {"float32": 8, "float16": 6, "bytes": 3, "int64": 8, "str": 2}
    assert nested.tensors == 2

    @dataclass
    class Reply:
        update: dict
        samples: int

    reply = message_bytes(Reply(update={A_KEY: torch.zeros(2, 30), B_KEY: torch.zeros(20, 2)},
                                samples=12))
    fields = len("update") + len("samples")
    assert reply.bytes == 400 + 2 * len(A_KEY) + fields + 8
    assert reply.dense_equivalent_bytes == 2400 + 2 * len(A_KEY) + fields + 8


def test_unknown_objects_are_errors_naming_the_path():
    with pytest.raises(WireError, match=r"\['metrics'\]\[1\]: cannot count a object"):
        message_bytes({"metrics": [1, object()]})


def test_sizes_add_up():
    a = message_bytes({"w": torch.zeros(4)})
    b = message_bytes({"w": torch.zeros(4, dtype=torch.bfloat16)})
    total = a + b
    assert total == WireSize(26, 26, {"float32": 16, "bfloat16": 8, "str": 2}, 2)
    assert total.to_dict()["by_dtype"] == {"bfloat16": 8, "float32": 16, "str": 2}
    assert WireSize().compression == 1.0


def payload():
    g = torch.Generator().manual_seed(0)
    return {
        "update": {A_KEY: torch.randn(4, 64, generator=g), B_KEY: torch.randn(32, 4, generator=g),
                   "projector.weight": truncated_svd(torch.randn(48, 40, generator=g), 4),
                   "projector.bias": torch.randn(48, generator=g, dtype=torch.float64)},
        "counts": torch.arange(6),  # integer: never cast
        "samples": 17,
        "metrics": [{"loss": 0.25}],
    }


def test_bf16_wire_halves_floating_bytes_and_round_trips():
    msg = payload()
    fp32 = message_bytes(to_wire(msg, "fp32"))
    bf16 = message_bytes(to_wire(msg, "bf16"))
    assert set(fp32.by_dtype) == {"float32", "int64", "float64", "str"}  # metrics float: Python
    assert bf16.by_dtype["bfloat16"] * 2 == fp32.by_dtype["float32"]
    assert bf16.by_dtype["int64"] == fp32.by_dtype["int64"] == 6 * 8 + 8
    assert "float32" not in bf16.by_dtype
    floating = fp32.by_dtype["float32"]
    assert fp32.bytes - bf16.bytes == floating // 2
    # the dense equivalent is counted in the wire's element size too
    assert fp32.dense_equivalent_bytes - bf16.dense_equivalent_bytes == (
        32 * 64 + 48 * 40 + 48) * 2
    # the original is untouched; from_wire restores float32 within bf16 precision
    assert msg["update"][A_KEY].dtype == torch.float32
    back = from_wire(to_wire(msg, "bf16"))
    assert back["update"][A_KEY].dtype == torch.float32
    assert isinstance(back["update"]["projector.weight"], LowRankUpdate)
    assert back["update"]["projector.weight"].shape == (48, 40)
    torch.testing.assert_close(back["update"][A_KEY], msg["update"][A_KEY], rtol=1e-2, atol=1e-2)
    assert torch.equal(back["counts"], msg["counts"]) and back["samples"] == 17
    assert isinstance(back["metrics"], list)
    exact = from_wire(to_wire(msg, "fp32"))
    assert torch.equal(exact["update"][B_KEY], msg["update"][B_KEY])


def test_unknown_wire_dtype():
    with pytest.raises(WireError, match="unknown wire dtype 'fp8'.*'fp32', 'bf16'"):
        to_wire({}, "fp8")
