"""Low-rank aggregation and compression: `exact` against a dense float64 SVD reference, `fedavg`
and `stack` against the product sum, peft's own delta weights for conv/linear factors, and error
feedback over many rounds."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedmrg.fl.lowrank import (
    ErrorFeedback,
    LowRankError,
    LowRankUpdate,
    aggregate_lora,
    aggregate_lora_exact,
    aggregate_lora_fedavg,
    aggregate_lora_stack,
    aggregate_lora_states,
    compress,
    decompress,
    factorizes,
    lora_pairs,
    normalize_weights,
    truncated_svd,
    update_rank,
)

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Small matrices: intra-op threads only add contention on the shared 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_factors(d: int, k: int, ranks: list[int], seed: int, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(r, k, generator=g, dtype=dtype) for r in ranks]
    Bs = [torch.randn(d, r, generator=g, dtype=dtype) for r in ranks]
    weights = [float(w) for w in torch.randint(1, 100, (len(ranks),), generator=g)]
    return As, Bs, weights


def product_sum(As, Bs, weights) -> torch.Tensor:
    """sum_k w_k B_k A_k in float64, weights normalized: the dense reference (tests only)."""
    total = sum(weights)
    return sum((w / total) * b.double() @ a.double()
               for a, b, w in zip(As, Bs, weights, strict=True))


def dense_top_r(M: torch.Tensor, rank: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return (U[:, :rank] * S[:rank]) @ Vh[:rank]


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref).norm() / ref.norm())


# --------------------------------------------------------------------------- exact


SHAPES = [(16, 16), (64, 300), (300, 64), (300, 300)]
CLIENT_RANKS = [[4], [4, 4], [2, 8], [4, 4, 4, 4, 4], [1, 3, 8, 2, 6]]


@pytest.mark.parametrize("d,k", SHAPES)
@pytest.mark.parametrize("ranks", CLIENT_RANKS, ids=lambda r: "r" + "-".join(map(str, r)))
@pytest.mark.parametrize("rank", [1, 4])
def test_exact_equals_dense_svd_reference(d, k, ranks, rank):
    As, Bs, weights = random_factors(d, k, ranks, seed=d * 7 + k + len(ranks) + rank)
    A, B = aggregate_lora_exact(As, Bs, weights, rank)
    assert A.shape == (rank, k) and B.shape == (d, rank) and A.dtype == F64
    M = product_sum(As, Bs, weights)
    assert rel(B @ A, dense_top_r(M, rank)) < 1e-10
    # the singular values of B @ A are the top ones of M
    torch.testing.assert_close(torch.linalg.svdvals(B @ A)[:rank],
                               torch.linalg.svdvals(M)[:rank], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("ranks,rank", [([3, 2], 5), ([4], 4), ([2, 2, 1], 8), ([8, 8], 16)])
def test_exact_reproduces_the_sum_when_its_rank_fits(ranks, rank):
    As, Bs, weights = random_factors(64, 40, ranks, seed=sum(ranks) + rank)
    A, B = aggregate_lora_exact(As, Bs, weights, rank)
    assert A.shape == (rank, 40) and B.shape == (64, rank)
    torch.testing.assert_close(B @ A, product_sum(As, Bs, weights), rtol=1e-10, atol=1e-12)
    # components beyond the true rank: B column 0, A row a fresh unit direction orthogonal to
    # the others (trainable, as LoRA's init), not noise and not dead
    R = sum(ranks)
    if rank > R:
        assert torch.count_nonzero(B[:, R:]) == 0
        eye = torch.eye(rank - R, dtype=F64)
        torch.testing.assert_close(A[R:] @ A[R:].T, eye, atol=1e-12, rtol=0)
        assert float((A[R:] @ A[:R].T).abs().max()) < 1e-12


def test_exact_keeps_zero_energy_components_trainable():
    """All B_k = 0 (no client trained B): balanced sqrt(0) splits would zero A as well, and a
    LoRA pair with A = 0 and B = 0 gets zero gradients forever."""
    As, Bs, weights = random_factors(24, 18, [4, 4], seed=6)
    A, B = aggregate_lora_exact(As, [torch.zeros_like(b) for b in Bs], weights, 4)
    assert torch.count_nonzero(B) == 0
    torch.testing.assert_close(A @ A.T, torch.eye(4, dtype=F64), atol=1e-12, rtol=0)
    # rank above k: one orthogonal row is left, the rest are zero
    As, Bs, weights = random_factors(10, 3, [2], seed=7)
    A, B = aggregate_lora_exact(As, Bs, weights, 5)
    torch.testing.assert_close(B @ A, Bs[0] @ As[0], rtol=1e-12, atol=1e-12)
    assert [round(float(n), 9) for n in A[2:].norm(dim=1)] == [1.0, 0.0, 0.0]


def test_exact_truncation_error_is_the_eckart_young_tail():
    As, Bs, weights = random_factors(50, 70, [6, 6, 6], seed=3)
    A, B = aggregate_lora_exact(As, Bs, weights, 5)
    M = product_sum(As, Bs, weights)
    S = torch.linalg.svdvals(M)
    assert math.isclose(float((M - B @ A).norm()), float(S[5:].norm()), rel_tol=1e-9)


def test_exact_split_is_balanced_and_deterministic():
    As, Bs, weights = random_factors(48, 32, [4, 6], seed=11)
    A, B = aggregate_lora_exact(As, Bs, weights, 4)
    # column i of B and row i of A both have norm sqrt(s_i)
    torch.testing.assert_close(B.norm(dim=0), A.norm(dim=1), rtol=1e-10, atol=0)
    S = torch.linalg.svdvals(B @ A)[:4]
    torch.testing.assert_close(B.norm(dim=0) ** 2, S, rtol=1e-10, atol=0)
    A2, B2 = aggregate_lora_exact(As, Bs, weights, 4)
    assert torch.equal(A, A2) and torch.equal(B, B2)


def test_exact_keeps_float32_inputs_float32_with_float64_accuracy():
    As, Bs, weights = random_factors(128, 96, [8, 8, 8], seed=5, dtype=torch.float32)
    A, B = aggregate_lora_exact(As, Bs, weights, 8)
    assert A.dtype == B.dtype == torch.float32
    assert rel(B @ A, dense_top_r(product_sum(As, Bs, weights), 8)) < 1e-5


def test_exact_rejects_bad_rank_and_mismatched_factors():
    As, Bs, weights = random_factors(16, 12, [2, 3], seed=0)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(LowRankError, match="rank must be a positive integer"):
            aggregate_lora_exact(As, Bs, weights, bad)
    with pytest.raises(LowRankError, match="client 1: A \\(3, 12\\) and B \\(16, 2\\)"):
        aggregate_lora_exact(As, [Bs[0], Bs[0]], weights, 2)
    with pytest.raises(LowRankError, match="client 1: B @ A has shape \\(16, 13\\)"):
        aggregate_lora_exact([As[0], torch.randn(3, 13, dtype=F64)], Bs, weights, 2)
    with pytest.raises(LowRankError, match="2 A factors but 1 B factors"):
        aggregate_lora_exact(As, Bs[:1], weights, 2)
    with pytest.raises(LowRankError, match="must be 2-D"):
        aggregate_lora_exact([As[0][None]], [Bs[0]], [1.0], 2)


# --------------------------------------------------------------------------- weights


def test_weights_are_normalized_inside():
    As, Bs, _ = random_factors(30, 20, [3, 3], seed=2)
    for method in ("exact", "fedavg", "stack"):
        A1, B1 = aggregate_lora(method, As, Bs, [1, 3], rank=4)
        A2, B2 = aggregate_lora(method, As, Bs, [0.25, 0.75], rank=4)
        A3, B3 = aggregate_lora(method, As, Bs, torch.tensor([100, 300]), rank=4)
        torch.testing.assert_close(B1 @ A1, B2 @ A2, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(B1 @ A1, B3 @ A3, rtol=1e-12, atol=1e-12)
    A, B = aggregate_lora_stack(As, Bs, [1, 3])
    torch.testing.assert_close(B @ A, 0.25 * Bs[0] @ As[0] + 0.75 * Bs[1] @ As[1])
    # a client with weight 0 contributes nothing
    A, B = aggregate_lora_exact(As, Bs, [5, 0], 3)
    torch.testing.assert_close(B @ A, Bs[0] @ As[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(normalize_weights([2, 6]), torch.tensor([0.25, 0.75], dtype=F64))


@pytest.mark.parametrize("weights,match", [
    ([1, -2], "client 1: weight -2.0"),
    ([0, 0], "sum to 0"),
    ([1, float("nan")], "client 1: weight nan"),
    ([1, float("inf")], "client 1: weight inf"),
    ([1, 2, 3], "3 weights for 2 clients"),
])
def test_bad_weights_are_errors_naming_the_client(weights, match):
    As, Bs, _ = random_factors(8, 8, [2, 2], seed=0)
    for method in ("exact", "fedavg", "stack"):
        with pytest.raises(LowRankError, match=match):
            aggregate_lora(method, As, Bs, weights, rank=2)


# --------------------------------------------------------------------------- fedavg, stack


def test_fedavg_is_the_mean_of_factors_and_differs_from_the_product_mean():
    As, Bs, weights = random_factors(40, 30, [4, 4, 4], seed=8)
    A, B = aggregate_lora_fedavg(As, Bs, weights)
    w = torch.tensor(weights, dtype=F64) / sum(weights)
    torch.testing.assert_close(A, sum(wi * a for wi, a in zip(w, As, strict=True)))
    torch.testing.assert_close(B, sum(wi * b for wi, b in zip(w, Bs, strict=True)))
    # mean of products != product of means: far off for independent clients
    assert rel(B @ A, product_sum(As, Bs, weights)) > 0.3


def test_fedavg_equals_the_product_mean_when_clients_agree():
    As, Bs, _ = random_factors(40, 30, [4], seed=9)
    A, B = aggregate_lora_fedavg(As * 3, Bs * 3, [1, 7, 2])
    torch.testing.assert_close(B @ A, Bs[0] @ As[0], rtol=1e-12, atol=1e-12)


def test_fedavg_refuses_heterogeneous_ranks():
    As, Bs, weights = random_factors(16, 16, [2, 4], seed=1)
    with pytest.raises(LowRankError, match="ranks \\[2, 4\\].*'exact' or 'stack'"):
        aggregate_lora_fedavg(As, Bs, weights)


@pytest.mark.parametrize("ranks", [[4], [2, 8], [1, 3, 8, 2, 6]])
def test_stack_is_the_exact_sum_with_rank_growing(ranks):
    As, Bs, weights = random_factors(50, 33, ranks, seed=len(ranks))
    A, B = aggregate_lora_stack(As, Bs, weights)
    assert A.shape == (sum(ranks), 33) and B.shape == (50, sum(ranks))
    torch.testing.assert_close(B @ A, product_sum(As, Bs, weights), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(A[: ranks[0]], As[0])  # A rows are the clients' own


def test_dispatcher_routes_and_defaults_rank_to_the_largest_client_rank():
    As, Bs, weights = random_factors(30, 20, [2, 5], seed=4)
    A, B = aggregate_lora("exact", As, Bs, weights)
    assert A.shape == (5, 20)
    torch.testing.assert_close(B @ A, dense_top_r(product_sum(As, Bs, weights), 5))
    assert aggregate_lora("stack", As, Bs, weights)[0].shape == (7, 20)
    with pytest.raises(LowRankError, match="unknown LoRA aggregation 'svd'.*exact"):
        aggregate_lora("svd", As, Bs, weights)


# --------------------------------------------------------------------------- state dicts, peft


def test_lora_pairs_groups_factors_and_names_an_unpaired_one():
    names = ["decoder.m.q_proj.lora_A.generic.weight", "decoder.m.q_proj.lora_B.generic.weight",
             "decoder.m.q_proj.lora_A.specialized.weight",
             "decoder.m.q_proj.lora_B.specialized.weight",
             "encoder.backbone.conv.lora_B.encoder.weight",
             "encoder.backbone.conv.lora_A.encoder.weight", "projector.weight", "head.bias"]
    pairs = lora_pairs(names)
    assert list(pairs) == ["decoder.m.q_proj.generic", "decoder.m.q_proj.specialized",
                           "encoder.backbone.conv.encoder"]
    conv = pairs["encoder.backbone.conv.encoder"]
    assert (conv.module, conv.adapter) == ("encoder.backbone.conv", "encoder")
    assert conv.a_key == names[5] and conv.b_key == names[4]
    assert list(lora_pairs(names, adapters=["generic"])) == ["decoder.m.q_proj.generic"]
    with pytest.raises(LowRankError, match="decoder.x.lora_B.generic.weight: LoRA factor without "
                                           "its lora_A partner"):
        lora_pairs([*names, "decoder.x.lora_B.generic.weight"])
    with pytest.raises(LowRankError, match="decoder.x.lora_A.generic.bias: unsupported"):
        lora_pairs(["decoder.x.lora_A.generic.bias"])


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.fc = nn.Linear(12, 10)


def peft_clients(ranks: list[int], seed: int) -> list[nn.Module]:
    """Real peft LoRA layers (adapter "generic") on a conv and a linear, random factors."""
    from peft import LoraConfig, inject_adapter_in_model

    clients = []
    for i, r in enumerate(ranks):
        torch.manual_seed(seed)  # same base weights everywhere
        net = TinyNet()
        cfg = LoraConfig(r=r, lora_alpha=r, target_modules=["conv", "fc"])  # scaling 1
        inject_adapter_in_model(cfg, net, adapter_name="generic")
        g = torch.Generator().manual_seed(seed * 100 + i)
        with torch.no_grad():
            for name, p in net.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g))
        clients.append(net)
    return clients


@pytest.mark.parametrize("method,ranks", [("stack", [2, 3]), ("exact", [2, 3]),
                                          ("fedavg", [2, 2])])
def test_state_aggregation_matches_peft_delta_weights(method, ranks):
    clients = peft_clients(ranks, seed=1)
    states = [{n: t.detach().clone() for n, t in c.state_dict().items() if "lora_" in n}
              for c in clients]
    weights = [3, 1]
    merged = aggregate_lora_states(method, states, weights, rank=6)
    assert set(merged) == set(states[0])
    assert merged["conv.lora_A.generic.weight"].dim() == 4
    # load into a peft model of the resulting rank and ask peft for its delta weights
    r_out = merged["fc.lora_A.generic.weight"].shape[0]
    (server,) = peft_clients([r_out], seed=1)
    server.load_state_dict(merged, strict=False)
    for layer in ("conv", "fc"):
        with torch.no_grad():  # scaling is alpha / r = 1 on every model
            got = getattr(server, layer).get_delta_weight("generic")
            deltas = [getattr(c, layer).get_delta_weight("generic") for c in clients]
        want = sum(w / sum(weights) * dlt for w, dlt in zip(weights, deltas, strict=True))
        if method == "fedavg":  # inexact by design
            assert rel(got, want.double()) > 0.05
        else:  # total rank 5 <= 6: exact reproduces the sum too
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_state_aggregation_names_the_module_and_client_on_mismatch():
    clients = peft_clients([2, 2], seed=2)
    states = [{n: t for n, t in c.state_dict().items() if "lora_" in n} for c in clients]
    bad = dict(states[1])
    bad["fc.lora_A.generic.weight"] = torch.randn(2, 13)
    with pytest.raises(LowRankError, match="client 1: fc.generic: factors A \\(2, 13\\)"):
        aggregate_lora_states("exact", [states[0], bad], [1, 1], rank=2)
    fewer = {n: t for n, t in states[1].items() if not n.startswith("conv.")}
    with pytest.raises(LowRankError, match="client 1: LoRA modules differ.*conv.generic"):
        aggregate_lora_states("exact", [states[0], fewer], [1, 1], rank=2)


# --------------------------------------------------------------------------- dense updates


def test_factorize_rule():
    assert factorizes((64, 48), 4)  # 4 * 112 < 3072
    assert factorizes((16, 8, 3, 3), 4)  # conv: (16, 72), 4 * 88 < 1152
    assert not factorizes((8, 8), 4)  # 4 * 16 == 64: not smaller
    assert factorizes((1000, 3), 2)  # 2 * 1003 < 3000
    assert not factorizes((1000, 3), 3)  # rank >= min(m, n) never pays
    assert not factorizes((64,), 4)  # 1-D
    assert not factorizes((64, 48), 0)  # dense mode
    assert not factorizes((), 4)


def test_truncated_svd_matches_reference_for_matrices_and_convs():
    g = torch.Generator().manual_seed(0)
    for shape in [(40, 30), (30, 40), (16, 8, 3, 3)]:
        delta = torch.randn(shape, generator=g)
        up = truncated_svd(delta, 5)
        m = shape[0]
        assert up.U.shape == (m, 5) and up.V.shape == (5, math.prod(shape[1:]))
        assert up.shape == shape and up.U.dtype == torch.float32
        ref = dense_top_r(delta.reshape(m, -1).double(), 5).reshape(shape)
        assert rel(decompress(up), ref) < 1e-6
        # V has orthonormal rows (singular values live in U)
        torch.testing.assert_close(up.V @ up.V.T, torch.eye(5), atol=1e-5, rtol=0)
    assert truncated_svd(torch.randn(6, 4, generator=g), 9).rank == 4  # clipped to min(m, n)
    with pytest.raises(LowRankError, match="needs a >= 2-D tensor, got shape \\(5,\\)"):
        truncated_svd(torch.randn(5), 2)


def test_truncated_svd_of_rank_deficient_and_ill_conditioned_matrices():
    """The Gram-matrix route must not divide by a zero singular value, and must keep the top
    directions exact when the spectrum spans many decades."""
    g = torch.Generator().manual_seed(1)
    for m, n in [(12, 50), (50, 12)]:
        low = torch.randn(m, 2, generator=g, dtype=torch.float64) @ torch.randn(
            2, n, generator=g, dtype=torch.float64)
        up = truncated_svd(low, 5)  # rank 2 asked for 5: three zero directions
        assert torch.isfinite(up.U).all() and torch.isfinite(up.V).all()
        assert rel(decompress(up), low) < 1e-10
        assert truncated_svd(torch.zeros(m, n), 3).dense().abs().max() == 0
        # singular values 1 .. 1e-12: the rank-4 truncation is the reference's within 1e-9
        q1, _ = torch.linalg.qr(torch.randn(m, 12, generator=g, dtype=torch.float64))
        q2, _ = torch.linalg.qr(torch.randn(n, 12, generator=g, dtype=torch.float64))
        k = min(m, n, 12)
        spectrum = torch.logspace(0, -12, k, dtype=torch.float64)
        M = q1[:, :k] * spectrum @ q2[:, :k].T
        assert rel(decompress(truncated_svd(M, 4)), dense_top_r(M, 4)) < 1e-9


def test_whole_tensors_go_dense_and_lossless_the_others_low_rank():
    g = torch.Generator().manual_seed(3)
    deltas = {"diagnosis_head.linear.weight": torch.randn(56, 64, generator=g),
              "encoder.conv.weight": torch.randn(64, 64, generator=g)}
    assert update_rank("diagnosis_head.linear.weight", 8, ["diagnosis_head."]) == 0
    assert update_rank("encoder.conv.weight", 8, ["diagnosis_head."]) == 8
    ef = ErrorFeedback()
    sent = ef.compress_all(deltas, 8, whole=["diagnosis_head."])
    assert torch.equal(sent["diagnosis_head.linear.weight"], deltas["diagnosis_head.linear.weight"])
    assert isinstance(sent["encoder.conv.weight"], LowRankUpdate)
    # nothing of the whole tensor is left behind; the truncated one keeps a residual
    assert set(ef.residuals) <= {"encoder.conv.weight"} or float(
        ef.residuals["diagnosis_head.linear.weight"].abs().max()) == 0.0


def test_compress_sends_small_and_1d_tensors_dense():
    g = torch.Generator().manual_seed(1)
    bias, small, big = torch.randn(64, generator=g), torch.randn(6, 6, generator=g), \
        torch.randn(64, 48, generator=g)
    assert compress(bias, 4) is bias and compress(small, 4) is small
    assert compress(big, 0) is big
    assert isinstance(compress(big, 4), LowRankUpdate)
    with pytest.raises(LowRankError, match="cannot decompress a list"):
        decompress([1, 2])


def test_rank_zero_error_feedback_is_lossless():
    ef = ErrorFeedback()
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        delta = torch.randn(20, 30, generator=g)
        sent = ef.compress("w", delta, 0)
        assert isinstance(sent, torch.Tensor) and torch.equal(sent, delta)
    assert ef.residuals == {} and ef.residual_norm() == 0.0


def test_error_feedback_makes_the_sent_sum_track_the_true_sum():
    """Updates with a persistent full-rank direction (as in training) plus noise, rank 3 of 30:
    without feedback a constant fraction of every update is never sent, so the gap grows
    with the rounds; with feedback the gap is exactly the current residual, which stays
    bounded, so the relative gap goes to 0."""
    g = torch.Generator().manual_seed(0)
    m, n, rank, rounds = 40, 30, 3, 100
    drift = torch.randn(m, n, generator=g, dtype=F64) / math.sqrt(m * n)
    ef, plain = ErrorFeedback(), ErrorFeedback()
    true_sum, fed_sum, plain_sum = (torch.zeros(m, n, dtype=F64) for _ in range(3))
    gaps, plain_gaps, residuals = {}, {}, {}
    for t in range(1, rounds + 1):
        delta = drift + 0.5 * torch.randn(m, n, generator=g, dtype=F64) / math.sqrt(m * n)
        true_sum += delta
        fed_sum += decompress(ef.compress("w", delta, rank))
        plain_sum += decompress(plain.compress("w", delta, rank))
        plain.residuals.clear()  # no feedback
        # telescoping: sent so far + what is pending == everything
        torch.testing.assert_close(fed_sum + ef.residuals["w"], true_sum, rtol=1e-12,
                                   atol=1e-12)
        gaps[t] = float((fed_sum - true_sum).norm())
        plain_gaps[t] = float((plain_sum - true_sum).norm())
        residuals[t] = ef.residual_norm()
    assert math.isclose(gaps[rounds], residuals[rounds], rel_tol=1e-9)
    assert gaps[100] < 1.2 * gaps[50]  # bounded
    assert plain_gaps[100] > 1.8 * plain_gaps[50]  # grows ~linearly
    assert gaps[100] / float(true_sum.norm()) < 0.1
    assert plain_gaps[100] / float(true_sum.norm()) > 0.5
    assert plain_gaps[100] > 5 * gaps[100]


def test_error_feedback_per_tensor_state_and_errors():
    ef = ErrorFeedback()
    g = torch.Generator().manual_seed(3)
    sent = ef.compress_all({"a.weight": torch.randn(30, 20, generator=g),
                            "a.bias": torch.randn(30, generator=g)}, rank=2)
    assert isinstance(sent["a.weight"], LowRankUpdate) and isinstance(sent["a.bias"], torch.Tensor)
    assert set(ef.residuals) == {"a.weight"}
    saved = ef.state_dict()
    other = ErrorFeedback()
    other.load_state_dict(saved)
    nxt = torch.randn(30, 20, generator=g)
    torch.testing.assert_close(decompress(ef.compress("a.weight", nxt, 2)),
                               decompress(other.compress("a.weight", nxt, 2)))
    with pytest.raises(LowRankError, match="a.weight: update shape \\(20, 30\\) differs"):
        ef.compress("a.weight", torch.randn(20, 30), 2)
