"""The low-rank downlink (`fedmrg.fl.broadcast`): what it sends, and that clients stay in sync."""

from __future__ import annotations

import pytest
import torch

from fedmrg.fl.broadcast import BroadcastError, StateBroadcast, StateDelta, apply_delta
from fedmrg.fl.lowrank import LowRankUpdate
from fedmrg.fl.wire import message_bytes

LORA_A = "decoder.layers.0.q_proj.lora_A.generic.weight"


def state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "projector.weight": torch.randn(64, 48, generator=g),  # factorizes at rank 4
        "projector.bias": torch.randn(64, generator=g),  # 1-D: sent as it is
        "encoder.conv.weight": torch.randn(16, 8, 3, 3, generator=g),  # conv: (16, 72) matrix
        LORA_A: torch.randn(4, 48, generator=g),  # LoRA factor: sent as it is
        "encoder.bn.num_batches_tracked": torch.tensor(3),
    }


def low_rank_change(s: dict, rank: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = dict(s)
    out["projector.weight"] = s["projector.weight"] + (
        torch.randn(64, rank, generator=g) @ torch.randn(rank, 48, generator=g))
    out["projector.bias"] = s["projector.bias"] + 1.0
    out[LORA_A] = torch.randn(4, 48, generator=g)
    return out


def test_a_change_within_the_rank_arrives_exactly_and_costs_less_than_the_state():
    s0 = state()
    b = StateBroadcast(s0, rank=4)
    s1 = low_rank_change(s0, rank=3, seed=1)
    delta = b.advance(s1)
    assert (delta.base_version, delta.version, b.version) == (0, 1, 1)
    assert set(delta.add) == {"projector.weight"}
    assert isinstance(delta.add["projector.weight"], LowRankUpdate)
    assert set(delta.replace) == {"projector.bias", LORA_A}  # unchanged tensors are not sent
    client = apply_delta(s0, delta)
    for name in s1:
        torch.testing.assert_close(client[name], s1[name], atol=1e-4, rtol=1e-4)
        assert torch.equal(client[name], b.full_state()[name]), name  # server knows B exactly
    assert message_bytes(delta).bytes < 0.5 * message_bytes(s1).bytes


def test_what_a_round_cannot_send_is_sent_later_error_feedback():
    """B tracks S: with a fixed target, the distance shrinks round after round."""
    s0 = state()
    b = StateBroadcast(s0, rank=2)
    target = low_rank_change(s0, rank=12, seed=2)  # more than one round's rank
    client = dict(s0)
    gaps = []
    for _ in range(8):
        client = apply_delta(client, b.advance(target))
        gaps.append(float((client["projector.weight"] - target["projector.weight"]).norm()))
        assert torch.equal(client["projector.weight"], b.full_state()["projector.weight"])
    assert all(later < earlier for earlier, later in zip(gaps, gaps[1:], strict=False))
    assert gaps[-1] < 1e-3 * gaps[0]


def test_bf16_wire_keeps_server_and_client_identical():
    s0 = state()
    b = StateBroadcast(s0, rank=4, wire="bf16")
    client = dict(s0)
    for seed in (1, 2, 3):
        delta = b.advance(low_rank_change(b.full_state(), rank=3, seed=seed))
        assert delta.add["projector.weight"].U.dtype == torch.bfloat16
        assert delta.replace["projector.bias"].dtype == torch.bfloat16
        client = apply_delta(client, delta)
        for name, t in b.full_state().items():
            assert torch.equal(client[name].to(t.dtype), t), name


def test_rank_zero_sends_every_changed_tensor_whole():
    s0 = state()
    b = StateBroadcast(s0, rank=0)
    delta = b.advance(low_rank_change(s0, rank=3, seed=1))
    assert not delta.add and {"projector.weight", "projector.bias", LORA_A} == set(delta.replace)


def test_only_a_client_at_the_base_version_gets_the_delta():
    s0 = state()
    b = StateBroadcast(s0, rank=4)
    assert b.message_for(None) is None  # a client with no synced state needs the full one
    delta = b.advance(low_rank_change(s0, rank=3, seed=1))
    assert b.message_for(0) is delta
    assert b.message_for(None) is None and b.message_for(7) is None
    again = b.message_for(1)  # already at the current version (a retried round): no change
    assert (again.base_version, again.version, again.add, again.replace) == (1, 1, {}, {})
    b.advance(low_rank_change(b.full_state(), rank=3, seed=2))
    assert b.message_for(0) is None  # missed a delta: full state


def test_a_delta_that_does_not_fit_is_a_clear_error():
    s0 = state()
    bad = StateDelta(0, 1, add={"projector.weight": torch.zeros(3, 3)})
    with pytest.raises(BroadcastError, match="'projector.weight' has shape \\(3, 3\\)"):
        apply_delta(s0, bad)
    with pytest.raises(BroadcastError, match="'nope'"):
        apply_delta(s0, StateDelta(0, 1, add={"nope": torch.zeros(1)}))


def test_state_dict_round_trip_continues_the_same_deltas():
    s0 = state()
    a = StateBroadcast(s0, rank=4)
    a.advance(low_rank_change(s0, rank=6, seed=1))
    b = StateBroadcast(state(seed=9), rank=4)
    b.load_state_dict(a.state_dict())
    assert b.version == 1 and b.message_for(0) is None  # the old delta is not kept
    target = low_rank_change(a.full_state(), rank=6, seed=2)
    da, db = a.advance(target), b.advance(target)
    for name in da.add:
        assert torch.equal(da.add[name].U, db.add[name].U), name
    assert all(torch.equal(a.full_state()[n], b.full_state()[n]) for n in s0)


def test_a_tensor_named_whole_is_sent_whole_and_arrives_exactly():
    """`federation.whole_tensors`: a full-rank change of a listed tensor is replaced, not
    truncated; the other tensors keep the low-rank route."""
    s0 = state()
    g = torch.Generator().manual_seed(5)
    s1 = dict(s0)
    s1["projector.weight"] = s0["projector.weight"] + torch.randn(64, 48, generator=g)
    s1["encoder.conv.weight"] = s0["encoder.conv.weight"] + torch.randn(16, 8, 3, 3, generator=g)
    delta = StateBroadcast(s0, rank=4, whole=["projector."]).advance(s1)
    assert "projector.weight" in delta.replace and "projector.weight" not in delta.add
    assert isinstance(delta.add["encoder.conv.weight"], LowRankUpdate)
    client = apply_delta(s0, delta)
    assert torch.equal(client["projector.weight"], s1["projector.weight"])
    assert not torch.allclose(client["encoder.conv.weight"], s1["encoder.conv.weight"])
