"""Update validation and the update-norm bound (`fedmrg.fl.validation`): pure, milliseconds.

The norm is checked against a direct dense computation (factor differences, U @ V formed), its
homogeneity (scaling the change by s scales the norm by s, the basis of clipping), zero-padding
of factors of another rank (no adapter changes), every way a 1000x update could be built, the
reject/clip policy, and the form checks (names, shapes, wire dtype, finite values).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fedmrg.fl.lowrank import LowRankUpdate, truncated_svd
from fedmrg.fl.messages import ClientUpdate, UpdateSpec
from fedmrg.fl.strategies import FederationError
from fedmrg.fl.strategies.fedmrg import statistic_specs
from fedmrg.fl.validation import (
    bound_update_norm,
    scale_update,
    update_norm,
    validate_update,
)

A, B = "m.lora_A.generic.weight", "m.lora_B.generic.weight"
CONV_A, CONV_B = "c.lora_A.generic.weight", "c.lora_B.generic.weight"
LORA_SPEC = {A: (4, 6), B: (5, 4), CONV_A: (4, 3, 3, 3), CONV_B: (8, 4, 1, 1)}
DENSE_SPEC = {"head.weight": (7, 9), "head.bias": (7,)}


def global_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(s, generator=g) for n, s in {**LORA_SPEC, **DENSE_SPEC}.items()}


def honest_update(seed: int = 1, rank_r: int | None = None) -> ClientUpdate:
    """Factors near the global ones, a low-rank and a dense delta (`rank_r`: another rank)."""
    g = torch.Generator().manual_seed(seed)
    ref = global_state()
    lora = {n: ref[n] + 0.1 * torch.randn(ref[n].shape, generator=g) for n in LORA_SPEC}
    if rank_r is not None:
        lora[A] = torch.randn(rank_r, 6, generator=g)
        lora[B] = torch.randn(5, rank_r, generator=g)
    dense = {"head.weight": truncated_svd(0.1 * torch.randn(7, 9, generator=g), 2),
             "head.bias": 0.1 * torch.randn(7, generator=g)}
    return ClientUpdate(3, "a", 12, lora, dense)


def direct_norm(update: ClientUpdate, ref: dict[str, torch.Tensor]) -> float:
    """The definition, formed densely: factor differences (same rank) and U @ V."""
    parts = [(update.lora[n].double() - ref[n].double()).flatten() for n in update.lora]
    for u in update.dense.values():
        dense = u.U.double() @ u.V.double() if isinstance(u, LowRankUpdate) else u.double()
        parts.append(dense.flatten())
    return float(torch.cat(parts).norm())


def check(update: ClientUpdate, dtype: torch.dtype | None = torch.float32) -> str | None:
    return validate_update(update, center="a", round_id=3,
                           spec=UpdateSpec(LORA_SPEC, DENSE_SPEC, statistic_specs(8)),
                           dtype=dtype)


# --------------------------------------------------------------------------- the norm


def test_update_norm_is_the_norm_of_the_change_to_the_shared_state():
    update, ref = honest_update(), global_state()
    assert update_norm(update, ref) == pytest.approx(direct_norm(update, ref), rel=1e-12)
    # the low-rank delta counts as ||U V||_F, not as the norms of U and V
    low = update.dense["head.weight"]
    only = ClientUpdate(3, "a", 1, {}, {"head.weight": low})
    assert update_norm(only, ref) == pytest.approx(float((low.U.double() @ low.V.double()).norm()),
                                                   rel=1e-12)
    assert update_norm(only, ref) != pytest.approx(float(low.U.norm() * low.V.norm()))
    # an update equal to the global state changes nothing
    still = ClientUpdate(3, "a", 1, {n: ref[n].clone() for n in LORA_SPEC}, {})
    assert update_norm(still, ref) == 0.0


def test_an_update_without_tensors_has_norm_zero_and_one_without_reference_is_an_error():
    assert update_norm(ClientUpdate(1, "a", 5, {}, {}), None) == 0.0  # strategy local
    with pytest.raises(FederationError, match="center 'a'.*no global state"):
        update_norm(honest_update(), None)
    partial = {n: t for n, t in global_state().items() if n != A}
    with pytest.raises(FederationError, match=f"center 'a': LoRA factor '{A}' is not in"):
        update_norm(honest_update(), partial)


@pytest.mark.parametrize("factor", [1000.0, 0.25, 0.0])
def test_scaling_the_change_scales_the_norm_exactly(factor):
    update, ref = honest_update(), global_state()
    scaled = scale_update(update, ref, factor)
    assert update_norm(scaled, ref) == pytest.approx(factor * update_norm(update, ref),
                                                     rel=1e-6, abs=1e-6)
    assert scaled.center == "a" and scaled.num_samples == 12 and scaled.round_id == 3
    assert torch.equal(update.lora[A], honest_update().lora[A])  # the input is not changed
    if factor == 0.0:  # no change at all: the global factors, zero deltas
        assert torch.allclose(scaled.lora[B], ref[B]) and not scaled.dense["head.bias"].any()


def test_scaling_keeps_the_wire_dtype():
    update = honest_update()
    bf16 = dataclasses.replace(update, lora={n: t.bfloat16() for n, t in update.lora.items()})
    scaled = scale_update(bf16, global_state(), 0.5)
    assert {t.dtype for t in scaled.lora.values()} == {torch.bfloat16}
    assert scaled.dense["head.weight"].U.dtype == torch.float32


def test_factors_of_another_rank_are_compared_zero_padded():
    ref = global_state()  # rank 4
    for r in (2, 6):
        update = honest_update(rank_r=r)
        padded = max(r, 4)

        def pad(t, dim, rank=padded):
            shape = list(t.shape)
            shape[dim] = rank - t.shape[dim]
            return torch.cat([t.double(), torch.zeros(shape, dtype=torch.float64)], dim=dim)

        change_sq = float((pad(update.lora[A], 0) - pad(ref[A], 0)).pow(2).sum()
                          + (pad(update.lora[B], 1) - pad(ref[B], 1)).pow(2).sum())
        rest = ClientUpdate(3, "a", 1, {n: update.lora[n] for n in (CONV_A, CONV_B)},
                            update.dense)
        expected = math.sqrt(change_sq + update_norm(rest, ref) ** 2)
        assert update_norm(update, ref) == pytest.approx(expected, rel=1e-12)
        # scaling by 1 pads without changing the adapter: B' A' == B A
        same = scale_update(update, ref, 1.0)
        assert same.lora[A].shape == (padded, 6) and same.lora[B].shape == (5, padded)
        assert torch.allclose(same.lora[B] @ same.lora[A], update.lora[B] @ update.lora[A],
                              atol=1e-5)
        assert check(same) is None  # still a valid update (any rank)


def inflations(update: ClientUpdate, ref: dict) -> dict[str, ClientUpdate]:
    """Ways to make one part of an update 1000x larger."""
    low = update.dense["head.weight"]
    out = {
        "A factor change": dataclasses.replace(
            update, lora={**update.lora, A: ref[A] + 1000 * (update.lora[A] - ref[A])}),
        "B factor change": dataclasses.replace(
            update, lora={**update.lora, CONV_B: ref[CONV_B] + 1000 * (
                update.lora[CONV_B] - ref[CONV_B])}),
        "factors themselves": dataclasses.replace(
            update, lora={n: 1000 * t for n, t in update.lora.items()}),
        "U of a low-rank delta": dataclasses.replace(update, dense={
            **update.dense, "head.weight": LowRankUpdate(1000 * low.U, low.V, low.shape)}),
        "V of a low-rank delta": dataclasses.replace(update, dense={
            **update.dense, "head.weight": LowRankUpdate(low.U, 1000 * low.V, low.shape)}),
        "dense delta": dataclasses.replace(update, dense={
            **update.dense, "head.bias": 1000 * update.dense["head.bias"]}),
        "whole update": scale_update(update, ref, 1000.0),
    }
    return out


def test_no_part_of_an_update_escapes_the_bound_when_made_1000x_larger():
    ref = global_state()
    honest = [update_norm(honest_update(seed), ref) for seed in range(1, 6)]
    bound = 10 * max(honest)
    for what, inflated in inflations(honest_update(), ref).items():
        norm = update_norm(inflated, ref)
        assert norm > 3 * bound, what
        result = bound_update_norm(inflated, ref, bound, "reject")
        assert result.update is None and "exceeds federation.max_update_norm" in result.reason


# --------------------------------------------------------------------------- reject or clip


def test_an_update_within_the_bound_is_accepted_as_it_is():
    update, ref = honest_update(), global_state()
    norm = update_norm(update, ref)
    for action in ("reject", "clip"):
        result = bound_update_norm(update, ref, 2 * norm, action)
        assert result.update is update and not result.clipped and result.reason is None
        assert result.norm == pytest.approx(norm)
    unbounded = bound_update_norm(scale_update(update, ref, 1e6), ref, 0.0, "reject")
    assert unbounded.update is not None  # max_norm 0: no bound


def test_reject_names_the_norm_and_the_bound():
    update, ref = honest_update(), global_state()
    norm = update_norm(update, ref)
    result = bound_update_norm(update, ref, norm / 2, "reject")
    assert result.update is None and not result.clipped
    assert result.reason == (f"update norm {norm:.6g} exceeds federation.max_update_norm="
                             f"{norm / 2:g}")


def test_clip_scales_the_update_down_to_the_bound():
    update, ref = honest_update(), global_state()
    norm = update_norm(update, ref)
    result = bound_update_norm(update, ref, norm / 4, "clip")
    assert result.clipped and result.reason is None and result.norm == pytest.approx(norm)
    assert update_norm(result.update, ref) == pytest.approx(norm / 4, rel=1e-6)
    # the direction is kept: the clipped change is the original change times 1/4
    expected = scale_update(update, ref, 0.25)
    for name in LORA_SPEC:
        assert torch.equal(result.update.lora[name], expected.lora[name])
    assert torch.equal(result.update.dense["head.bias"], update.dense["head.bias"] * 0.25)
    assert update_norm(update, ref) == pytest.approx(norm)  # the input is not changed


def test_an_overflowing_norm_is_rejected_even_when_clipping():
    huge = dataclasses.replace(honest_update(), dense={
        **honest_update().dense, "head.bias": torch.full((7,), 1e200, dtype=torch.float64)})
    result = bound_update_norm(huge, global_state(), 1.0, "clip")
    assert result.update is None and "inf" in result.reason


def test_an_unknown_action_is_an_error_naming_the_key():
    with pytest.raises(FederationError, match="update_norm_action: 'drop' is not one of"):
        bound_update_norm(honest_update(), global_state(), 1.0, "drop")


# --------------------------------------------------------------------------- form


def test_a_well_formed_update_passes_and_any_rank_is_allowed():
    assert check(honest_update()) is None
    assert check(honest_update(rank_r=2)) is None
    assert check(honest_update(), dtype=None) is None


def broken(**changes) -> ClientUpdate:
    return dataclasses.replace(honest_update(), **changes)


def with_lora(name, tensor) -> ClientUpdate:
    return broken(lora={**honest_update().lora, name: tensor})


def with_dense(name, value) -> ClientUpdate:
    return broken(dense={**honest_update().dense, name: value})


@pytest.mark.parametrize("update, reason", [
    ({"not": "an update"}, "not a ClientUpdate but a dict"),
    (broken(round_id=2), "reply for round 2, not round 3 (late or duplicate)"),
    (broken(center="b"), "reply names center 'b', sent to 'a'"),
    (broken(num_samples=0), "num_samples 0 is not a positive integer"),
    (broken(num_samples=True), "num_samples True is not a positive integer"),
    (broken(lora={n: t for n, t in honest_update().lora.items() if n != B}),
     f"missing LoRA factor '{B}' (1 missing)"),
    (with_dense("local_head.w", torch.zeros(2)),
     "unexpected dense update 'local_head.w' (1 unexpected)"),
    (with_lora(A, torch.zeros(4, 7)), f"LoRA factor '{A}' has shape (4, 7), expected (4, 6)"),
    (with_lora(CONV_B, torch.zeros(8, 4, 1)), f"LoRA factor '{CONV_B}' has shape (8, 4, 1)"),
    (with_lora(A, [[0.0] * 6] * 4), f"LoRA factor '{A}' has shape list"),
    (with_lora(A, torch.zeros(4, 6, dtype=torch.float64)),
     f"LoRA factor '{A}' has dtype torch.float64, expected the wire dtype torch.float32"),
    (with_lora(A, torch.zeros(4, 6, dtype=torch.int64)),
     f"LoRA factor '{A}' has dtype torch.int64, not a floating dtype"),
    (with_lora(B, torch.full((5, 4), float("inf"))), f"LoRA factor '{B}' has non-finite"),
    (with_dense("head.weight", LowRankUpdate(torch.zeros(7, 2), torch.zeros(3, 9), (7, 9))),
     "dense update 'head.weight' does not fit the tensor's shape (7, 9)"),
    (with_dense("head.weight", LowRankUpdate(torch.zeros(7, 2), torch.zeros(2, 9), (9, 7))),
     "dense update 'head.weight' does not fit"),
    (with_dense("head.bias", torch.zeros(8)), "dense update 'head.bias' does not fit"),
    (with_dense("head.weight", LowRankUpdate(torch.zeros(7, 2).bfloat16(), torch.zeros(2, 9),
                                             (7, 9))),
     "dense update 'head.weight' has dtype torch.bfloat16, expected the wire dtype"),
    (with_dense("head.bias", torch.tensor([float("nan")] * 7)),
     "dense update 'head.bias' has non-finite values"),
    (broken(statistics={"prototypes": torch.full((14, 8), float("nan"))}),
     "prototypes is not a finite tensor"),
    (broken(statistics={"rows": torch.zeros(3)}), "unexpected statistic 'rows' (1 unexpected)"),
    (broken(lora=[1, 2]), "LoRA factors are a list, not a mapping"),
])
def test_a_malformed_update_is_rejected_with_its_reason(update, reason):
    got = check(update)
    assert got is not None and got.startswith(reason), got
