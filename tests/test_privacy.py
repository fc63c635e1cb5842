"""Pure privacy logic (fedmrg.privacy): Shamir shares, fixed point, the secure-aggregation
protocol end to end between real `SecAggClient`s and a `SecAggServer` (what the server sees,
the sum, dropouts), DP clipping and noise, the accountant, and which strategies a setting can
hold for. No Ray, no model: milliseconds each."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from fedmrg.config import ConfigError, config_from_dict, load_config, replace_keys
from fedmrg.fl.lowrank import LowRankUpdate
from fedmrg.fl.messages import ClientUpdate
from fedmrg.fl.strategies import make_strategy
from fedmrg.fl.validation import update_norm
from fedmrg.privacy import PrivacyError
from fedmrg.privacy.client import flatten_changes, privatize_update, unflatten
from fedmrg.privacy.dp import (
    PrivacyAccountant,
    add_gaussian_noise,
    clip_update,
    noise_generator,
    round_sample_rate,
)
from fedmrg.privacy.secagg import (
    MASK,
    SELF,
    SecAggClient,
    SecAggServer,
    dequantize,
    quantize,
    shamir_combine,
    shamir_split,
    threshold_for,
)
from fedmrg.privacy.server import ServerPrivacy

FRACTION_BITS = 24


# --------------------------------------------------------------------------- building blocks


def test_shamir_any_threshold_subset_rebuilds_the_secret_and_fewer_do_not():
    secret = int.from_bytes(bytes(range(32)), "big")
    shares = shamir_split(secret, [1, 2, 3, 4, 5], threshold=3)
    for subset in ([1, 2, 3], [2, 4, 5], [5, 3, 1]):
        assert shamir_combine({x: shares[x] for x in subset}, 3) == secret
    assert shamir_combine({x: shares[x] for x in (1, 2)}, 2) != secret  # 2 points: a line
    with pytest.raises(PrivacyError, match="3 needed"):
        shamir_combine({1: shares[1], 2: shares[2]}, 3)
    assert [threshold_for(n) for n in (2, 3, 4, 5, 10)] == [2, 2, 3, 3, 6]


def test_fixed_point_error_is_at_most_half_a_step_and_overflow_is_refused():
    rng = np.random.default_rng(0)
    x = rng.normal(scale=3.0, size=100_000)
    back = dequantize(quantize(x, FRACTION_BITS, clients=4), FRACTION_BITS)
    error = float(np.abs(back - x).max())
    assert 0 < error <= 2.0 ** -(FRACTION_BITS + 1)  # measured: ~3.0e-8 at 24 bits
    # four clients' worth of values that could wrap the int64 sum: refused, naming the key
    too_big = np.array([2.0 ** (62 - FRACTION_BITS) / 4])
    with pytest.raises(PrivacyError, match="secagg_fraction_bits"):
        quantize(too_big, FRACTION_BITS, clients=4)


# --------------------------------------------------------------------------- the protocol


def secure_sum(inputs: dict[str, np.ndarray], *, drop_before_masking=(), drop_after_masking=()):
    """One round between real clients and a server; returns (sum, everything the server
    received, the server)."""
    round_id, length = 7, next(iter(inputs.values())).size
    clients = {c: SecAggClient(c, round_id) for c in inputs}
    server = SecAggServer(round_id, length)
    received: list = []
    keys = [clients[c].advertise() for c in clients]
    received += keys
    roster = server.set_roster(keys)
    shares = {c: clients[c].share_keys(roster) for c in clients}
    received += list(shares.values())
    routed = server.route_shares(shares)
    masked = {c: clients[c].mask(quantize(inputs[c], FRACTION_BITS, len(inputs)), routed[c],
                                 server.active)
              for c in clients if c not in drop_before_masking}
    received += list(masked.values())
    survivors, dropped = server.unmask_request(masked)
    unmasking = {c: clients[c].unmask(survivors, dropped) for c in survivors
                 if c not in drop_after_masking}
    received += list(unmasking.values())
    total = dequantize(server.aggregate(masked, unmasking), FRACTION_BITS)
    return total, received, server


@pytest.fixture(scope="module")
def inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {c: rng.normal(size=5000) for c in "abcd"}


def test_masked_sum_equals_the_plain_sum(inputs):
    total, _, _ = secure_sum(inputs)
    plain = sum(inputs.values())
    assert np.abs(total - plain).max() <= 4 * 2.0 ** -(FRACTION_BITS + 1)


def test_nothing_the_server_receives_reveals_a_single_clients_vector(inputs):
    _, received, _ = secure_sum(inputs)
    secrets_in_clear = {x.tobytes() for x in inputs.values()}
    quantized = {quantize(x, FRACTION_BITS, 4).tobytes() for x in inputs.values()}
    for message in received:
        if isinstance(message, np.ndarray):  # a masked input: uniform noise mod 2^64
            assert message.tobytes() not in secrets_in_clear | quantized
            as_float = dequantize(message, FRACTION_BITS)
            for x in inputs.values():
                assert abs(np.corrcoef(as_float, x)[0, 1]) < 0.05
            low_bits = (message & np.uint64(1)).mean()
            assert 0.45 < low_bits < 0.55
        elif isinstance(message, dict) and message and isinstance(
                next(iter(message.values())), bytes):  # share ciphertexts: opaque bytes
            # AES-GCM (nonce, ciphertext, tag) of "x:share:share": no digits in the clear
            assert all(not re.fullmatch(rb"[0-9:]+", blob[12:-16]) for blob in
                       message.values())
    # a single masked input, unmasked with all the server can get for it, is still masked:
    # the self mask b_u is only rebuilt for survivors, the pairwise keys only for the dropped


def test_a_client_dropped_before_masking_and_one_after_still_aggregate(inputs):
    total, _, server = secure_sum(inputs, drop_before_masking=("c",))
    expected = inputs["a"] + inputs["b"] + inputs["d"]
    assert np.abs(total - expected).max() <= 3 * 2.0 ** -(FRACTION_BITS + 1)
    # masked, then silent at unmasking: its input is in the sum, the others' shares suffice
    total, _, _ = secure_sum(inputs, drop_after_masking=("d",))
    assert np.abs(total - sum(inputs.values())).max() <= 4 * 2.0 ** -(FRACTION_BITS + 1)
    with pytest.raises(PrivacyError, match="3 needed"):
        secure_sum(inputs, drop_before_masking=("c", "d"))


def test_a_client_never_reveals_both_secrets_of_one_peer():
    clients = {c: SecAggClient(c, 1) for c in "abc"}
    server = SecAggServer(1, 4)
    roster = server.set_roster([c.advertise() for c in clients.values()])
    routed = server.route_shares({c: clients[c].share_keys(roster) for c in clients})
    for c in clients:
        clients[c].mask(quantize(np.ones(4), 8, 3), routed[c], server.active)
    with pytest.raises(PrivacyError, match="refusing to unmask"):
        clients["a"].unmask(["a", "b"], ["b"])
    shares = clients["a"].unmask(["a", "b"], ["c"])
    assert shares["b"][0] == SELF and shares["c"][0] == MASK
    with pytest.raises(PrivacyError, match="already unmasked"):
        clients["a"].unmask(["a", "b", "c"], [])
    with pytest.raises(PrivacyError, match="at least 2"):
        SecAggServer(1, 4).set_roster([clients["a"].advertise()])


def test_flatten_round_trip():
    changes = {"x": torch.arange(6.0).reshape(2, 3), "y": torch.tensor([7.0])}
    layout = [("x", (2, 3)), ("y", (1,))]
    back = unflatten(flatten_changes(changes, layout), layout)
    assert all(torch.equal(back[n].float(), changes[n]) for n in changes)
    with pytest.raises(PrivacyError, match="'y'"):
        flatten_changes({"x": changes["x"]}, layout)


# --------------------------------------------------------------------------- DP


def an_update(scale: float = 1.0) -> tuple[ClientUpdate, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    reference = {"m.lora_A.default.weight": torch.randn(2, 5, generator=g),
                 "m.lora_B.default.weight": torch.zeros(4, 2), "w": torch.zeros(4, 5)}
    lora = {n: reference[n] + scale * torch.randn(reference[n].shape, generator=g)
            for n in ("m.lora_A.default.weight", "m.lora_B.default.weight")}
    dense = {"w": LowRankUpdate(scale * torch.randn(4, 2, generator=g),
                                torch.randn(2, 5, generator=g), (4, 5))}
    return ClientUpdate(1, "a", 10, lora=lora, dense=dense), reference


def test_clipping_bounds_the_update_norm_over_everything_sent():
    update, reference = an_update(scale=3.0)
    norm = update_norm(update, reference)
    clipped, before = clip_update(update, reference, 1.0)
    assert before == pytest.approx(norm) and norm > 1.0
    assert update_norm(clipped, reference) == pytest.approx(1.0)
    small, _ = clip_update(clipped, reference, 5.0)  # under the bound: unchanged
    assert update_norm(small, reference) == pytest.approx(1.0)


def test_local_dp_clips_then_adds_noise_of_the_configured_std():
    cfg = config_from_dict({"privacy": {"mode": "local", "clip_norm": 0.5,
                                        "noise_multiplier": 2.0}})
    reference = {"w": torch.zeros(200, 100)}
    deltas = {"w": torch.full((200, 100), 1.0)}
    lora, noisy = privatize_update(cfg.privacy, "a", reference, {}, deltas,
                                   noise_generator(3, "a"))
    sent = noisy["w"].double()
    clipped_value = 0.5 / math.sqrt(200 * 100)  # the clipped change, every coordinate equal
    assert float(sent.mean()) == pytest.approx(clipped_value, abs=0.05)
    assert float(sent.std()) == pytest.approx(2.0 * 0.5, rel=0.02)
    again = privatize_update(cfg.privacy, "a", reference, {}, deltas, noise_generator(3, "a"))
    assert torch.equal(again[1]["w"], noisy["w"])  # a noise seed makes it reproducible
    # the coordinator cannot clip: the client does
    cfg = replace_keys(cfg, {"privacy.mode": "central", "privacy.secure_aggregation": True})
    _, clipped = privatize_update(cfg.privacy, "a", reference, {}, deltas, None)
    assert float(clipped["w"].double().norm()) == pytest.approx(0.5)


def test_gaussian_noise_depends_on_names_not_dict_order():
    t = {"a": torch.zeros(3), "b": torch.zeros(2)}
    one = add_gaussian_noise(t, 1.0, noise_generator(1, "x"))
    two = add_gaussian_noise(dict(reversed(t.items())), 1.0, noise_generator(1, "x"))
    assert all(torch.equal(one[n], two[n]) for n in t)


def test_accountant_matches_opacus_composes_and_resumes():
    from opacus.accountants import RDPAccountant

    accountant = PrivacyAccountant()
    for _ in range(5):
        accountant.step(1.1, 0.5)
    direct = RDPAccountant()
    for _ in range(5):
        direct.step(noise_multiplier=1.1, sample_rate=0.5)
    assert accountant.history == [(1.1, 0.5, 5)]
    assert accountant.epsilon(1e-5) == pytest.approx(direct.get_epsilon(1e-5))
    ahead = accountant.epsilon_after(1.1, 0.5, 1e-5)
    assert ahead > accountant.epsilon(1e-5) and accountant.history == [(1.1, 0.5, 5)]
    resumed = PrivacyAccountant()
    resumed.load_state_dict(accountant.state_dict())
    resumed.step(1.1, 0.5)
    assert resumed.epsilon(1e-5) == pytest.approx(ahead)
    assert PrivacyAccountant().epsilon(1e-5) == 0.0
    none = PrivacyAccountant()
    none.step(0.0, 1.0)
    assert none.epsilon(1e-5) == math.inf
    assert round_sample_rate(0.5, 1, 4) == 0.5 and round_sample_rate(0.1, 2, 4) == 0.5


# --------------------------------------------------------------------------- which strategies


def strategy_for(*overrides: str):
    strategy = make_strategy(load_config(None, list(overrides)))
    return strategy.cfg, strategy


@pytest.mark.parametrize("overrides", [
    ("federation.strategy=ffa_lora", "privacy.secure_aggregation=true"),
    ("federation.strategy=fedavg", "privacy.secure_aggregation=true", "privacy.mode=central"),
    ("federation.strategy=fedsa_lora", "privacy.mode=central"),
    ("federation.strategy=fedavg", "privacy.mode=local"),
])
def test_linear_strategies_are_accepted(overrides):
    ServerPrivacy.check(*strategy_for(*overrides))


@pytest.mark.parametrize("overrides, message", [
    (("federation.strategy=fedmrg", "privacy.secure_aggregation=true"), "statistics"),
    (("federation.strategy=fedmrg", "privacy.mode=local"), "statistics"),
    (("federation.strategy=fedmrg", "model.losses.contrastive_global=0",
      "model.losses.diagnosis_logit_adjust_tau=0", "privacy.mode=central"),
     "aggregation 'exact'"),
    (("federation.strategy=fedavg", "federation.aggregation=exact",
      "privacy.secure_aggregation=true"), "aggregation 'exact'"),
    (("federation.strategy=local", "privacy.mode=local"), "nothing to protect"),
    (("federation.strategy=ffa_lora", "federation.dense_update_rank=4",
      "privacy.secure_aggregation=true"), "dense_update_rank"),
])
def test_other_combinations_are_a_config_error_naming_why(overrides, message):
    cfg, strategy = strategy_for(*overrides)
    # what the strategies imply (fedavg aggregation, rank 0) undone, as a subclass could
    if "aggregation=exact" in " ".join(overrides):
        cfg = replace_keys(cfg, {"federation.aggregation": "exact"})
        strategy.aggregation = "exact"
    if "dense_update_rank=4" in " ".join(overrides):
        cfg = replace_keys(cfg, {"federation.dense_update_rank": 4})
    with pytest.raises(ConfigError, match=message):
        ServerPrivacy.check(cfg, strategy)


def test_privacy_keys_are_validated():
    with pytest.raises(ConfigError, match="privacy.mode"):
        load_config(None, ["privacy.mode=strong"])
    with pytest.raises(ConfigError, match="privacy.nosie_multiplier"):
        load_config(None, ["privacy.nosie_multiplier=1"])
    cfg = load_config(None, [])
    assert cfg.privacy.mode == "none" and not cfg.privacy.secure_aggregation
