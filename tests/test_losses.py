"""FedMRG losses and prototypes: values against hand/reference computations, gradients, masking,
degenerate batches, and that optimising them does what they are for."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fedmrg.data.schema import NEGATIVE, NO_FINDING, NUM_OBSERVATIONS, POSITIVE, UNCERTAIN
from fedmrg.model.losses import (
    LossInputError,
    client_aware_contrastive_loss,
    compute_prototypes,
    jaccard,
    label_log_prior,
    label_state_counts,
    logit_adjusted_diagnosis_loss,
    merge_prototypes,
    multi_hot,
    mutual_boosting_kl,
    prototype_supcon_loss,
)

K = NUM_OBSERVATIONS


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """These tensors are tiny: intra-op threads only add contention on a shared 2-core box
    (measured 24 ms vs 0.8 ms per step under load). Restored after this module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def labels_from_sets(sets: list[set[int]], fill: int = NEGATIVE) -> torch.Tensor:
    """[{positive observations}, ...] -> (N, 14) int64 codes, the rest coded `fill`."""
    labels = torch.full((len(sets), K), fill, dtype=torch.long)
    for i, s in enumerate(sets):
        for k in s:
            labels[i, k] = POSITIVE
    return labels


def reference_supcon(sim: torch.Tensor, candidates: torch.Tensor,
                     positives: torch.Tensor) -> float:
    """Khosla et al. 2020 L_out written as plain loops, for checking the vectorised version."""
    terms = []
    for i in range(sim.shape[0]):
        cand = [j for j in range(sim.shape[1]) if candidates[i, j]]
        pos = [j for j in cand if positives[i, j]]
        if not pos:
            continue
        denom = sum(math.exp(float(sim[i, j])) for j in cand)
        terms.append(-sum(float(sim[i, p]) - math.log(denom) for p in pos) / len(pos))
    return sum(terms) / len(terms) if terms else 0.0


# --------------------------------------------------------------------------- mutual boosting KL


def _logits(seed: int, shape=(2, 5, 11)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).requires_grad_()


def test_kl_exactly_zero_when_paths_agree_positive_otherwise():
    gen = _logits(0)
    mask = torch.ones(2, 5, dtype=torch.bool)
    same = mutual_boosting_kl(gen, gen.detach().clone(), mask, temperature=2.0)
    assert same.item() == 0.0
    other = mutual_boosting_kl(gen, _logits(1), mask, temperature=2.0)
    assert other.item() > 1e-3


def test_kl_is_two_way_symmetric_and_matches_hand_formula():
    gen, per = _logits(0), _logits(1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    t = 1.7
    loss = mutual_boosting_kl(gen, per, mask, t)
    swapped = mutual_boosting_kl(per, gen, mask, t)
    torch.testing.assert_close(loss, swapped)

    p_g = F.softmax(gen[mask] / t, -1)
    p_s = F.softmax(per[mask] / t, -1)
    kl = lambda p, q: (p * (p.log() - q.log())).sum(-1)  # noqa: E731
    expected = t * t * (kl(p_s, p_g) + kl(p_g, p_s)).mean()
    torch.testing.assert_close(loss, expected)


def test_kl_gradient_flows_only_into_the_student_side_of_each_term():
    # Analytic: d/dg [T^2 KL(sg(p_s) || softmax(g/T))] = T (p_g - p_s), per valid token / N.
    # Without the stop-gradient the generic logits would also get the teacher-side gradient of
    # KL(p_g || p_s), and this equality would fail.
    gen, per = _logits(2), _logits(3)
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 1, 0, 1]], dtype=torch.bool)
    t = 2.0
    mutual_boosting_kl(gen, per, mask, t).backward()
    p_g = F.softmax(gen.detach() / t, -1)
    p_s = F.softmax(per.detach() / t, -1)
    n = int(mask.sum())
    expected_gen = t * (p_g - p_s) * mask[..., None] / n
    expected_per = t * (p_s - p_g) * mask[..., None] / n
    torch.testing.assert_close(gen.grad, expected_gen)
    torch.testing.assert_close(per.grad, expected_per)


def test_kl_ignores_padded_tokens():
    gen, per = _logits(4), _logits(5)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    loss = mutual_boosting_kl(gen, per, mask, 1.0)
    # Garbage (even inf) in the padded positions changes nothing.
    gen2, per2 = gen.detach().clone(), per.detach().clone()
    gen2[~mask] = float("inf")
    per2[~mask] = -1e9
    torch.testing.assert_close(mutual_boosting_kl(gen2, per2, mask, 1.0), loss.detach())
    loss.backward()
    assert gen.grad[~mask].abs().sum() == 0 and per.grad[~mask].abs().sum() == 0
    assert gen.grad[mask].abs().sum() > 0


def test_kl_empty_mask_is_graph_zero():
    gen, per = _logits(6), _logits(7)
    gen_nan = gen.detach().clone().requires_grad_()
    with torch.no_grad():
        gen_nan[0, 0, 0] = float("nan")
    loss = mutual_boosting_kl(gen_nan, per, torch.zeros(2, 5, dtype=torch.bool), 2.0)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(gen_nan.grad, torch.zeros_like(gen_nan))


def test_kl_bad_inputs_name_the_argument():
    gen, per = _logits(0), _logits(1)
    with pytest.raises(LossInputError, match="token_mask must be a bool"):
        mutual_boosting_kl(gen, per, torch.ones(2, 5, dtype=torch.long), 1.0)
    with pytest.raises(LossInputError, match="token_mask must be"):
        mutual_boosting_kl(gen, per, torch.ones(2, 4, dtype=torch.bool), 1.0)
    with pytest.raises(LossInputError, match="personal_logits"):
        mutual_boosting_kl(gen, per[:, :, :5], torch.ones(2, 5, dtype=torch.bool), 1.0)
    with pytest.raises(LossInputError, match="temperature"):
        mutual_boosting_kl(gen, per, torch.ones(2, 5, dtype=torch.bool), 0.0)


def test_kl_bfloat16_logits_are_finite():
    gen, per = _logits(0).detach().bfloat16() * 30, _logits(1).detach().bfloat16() * 30
    loss = mutual_boosting_kl(gen, per, torch.ones(2, 5, dtype=torch.bool), 1.0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and loss > 0


# --------------------------------------------------------------------------- diagnosis loss


def _diag_batch(seed: int, b: int = 6):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, K, 4, generator=g, requires_grad=True)
    labels = torch.randint(0, 4, (b, K), generator=g)
    return logits, labels


def test_diagnosis_loss_is_plain_ce_without_or_with_uniform_prior():
    logits, labels = _diag_batch(0)
    plain = F.cross_entropy(logits.reshape(-1, 4), labels.reshape(-1))
    torch.testing.assert_close(logit_adjusted_diagnosis_loss(logits, labels), plain)
    uniform = torch.full((K, 4), math.log(0.25))
    torch.testing.assert_close(logit_adjusted_diagnosis_loss(logits, labels, uniform, 1.0), plain)
    # A prior constant within each observation's row is uniform too (softmax shift invariance).
    row_const = torch.arange(K, dtype=torch.float32)[:, None].expand(K, 4) * -0.3
    torch.testing.assert_close(logit_adjusted_diagnosis_loss(logits, labels, row_const, 2.0),
                               plain)


def test_diagnosis_loss_adds_tau_log_prior_and_accepts_int8_labels():
    logits, labels = _diag_batch(1)
    prior = label_log_prior(labels)
    expected = F.cross_entropy((logits + 0.7 * prior).reshape(-1, 4), labels.reshape(-1))
    got = logit_adjusted_diagnosis_loss(logits, labels.to(torch.int8), prior, tau=0.7)
    torch.testing.assert_close(got, expected)


def test_label_log_prior_from_hand_counts():
    labels = torch.zeros(3, K, dtype=torch.long)
    labels[:, 0] = torch.tensor([POSITIVE, POSITIVE, NEGATIVE])
    counts = label_state_counts(labels)
    assert counts[0].tolist() == [0, 2, 1, 0] and counts[1].tolist() == [3, 0, 0, 0]
    prior = label_log_prior(labels, smoothing=1.0)
    torch.testing.assert_close(prior[0].exp(), torch.tensor([1, 3, 2, 1]) / 7.0)
    torch.testing.assert_close(prior[1].exp(), torch.tensor([4, 1, 1, 1]) / 7.0)
    # No data: uniform.
    torch.testing.assert_close(label_log_prior(labels[:0]).exp(), torch.full((K, 4), 0.25))
    with pytest.raises(LossInputError, match="smoothing"):
        label_log_prior(labels, smoothing=0.0)


def _imbalanced_labels(n: int = 200, rare: int = POSITIVE, rare_frac: float = 0.1):
    labels = torch.full((n, K), NEGATIVE, dtype=torch.long)
    labels[: int(n * rare_frac)] = rare
    return labels


def test_logit_adjustment_learns_balanced_raw_logits():
    # Bias-only model: plain CE drives softmax(raw logits) to the label frequencies; the adjusted
    # loss drives softmax(raw + log prior) there, so the raw logits become (near) uniform, i.e.
    # the rare state is no longer suppressed at prediction time.
    labels = _imbalanced_labels()
    prior = label_log_prior(labels, smoothing=0.5)

    def fit(log_prior):
        bias = torch.zeros(K, 4, requires_grad=True)
        opt = torch.optim.Adam([bias], lr=0.1)
        for _ in range(300):
            opt.zero_grad()
            logit_adjusted_diagnosis_loss(bias.expand(len(labels), K, 4), labels,
                                          log_prior).backward()
            opt.step()
        return F.softmax(bias.detach(), -1)

    p_ce, p_la = fit(None), fit(prior)
    assert torch.allclose(p_ce[:, POSITIVE], torch.tensor(0.1), atol=0.02)
    # States seen in the data end up balanced (the unseen blank/uncertain keep sinking).
    assert torch.allclose(p_la[:, POSITIVE], p_la[:, NEGATIVE], atol=0.05)
    assert (p_la[:, POSITIVE] > 4 * p_ce[:, POSITIVE]).all()


def test_logit_adjustment_predicts_the_rare_state_more_often_on_overlapping_data():
    # Rare positives (10%) at x ~ N(+1), common negatives at x ~ N(-1): plain CE puts the
    # decision threshold far on the rare side; logit adjustment moves it toward balanced error.
    g = torch.Generator().manual_seed(0)
    n = 400
    labels = _imbalanced_labels(n)
    is_pos = labels[:, 0] == POSITIVE
    x = torch.where(is_pos, 1.0, -1.0)[:, None] + torch.randn(n, 1, generator=g)  # (N, 1)
    prior = label_log_prior(labels)

    def fit(log_prior):
        torch.manual_seed(0)
        head = torch.nn.Linear(1, K * 4)
        opt = torch.optim.Adam(head.parameters(), lr=0.05)
        for _ in range(200):
            opt.zero_grad()
            logit_adjusted_diagnosis_loss(head(x).view(n, K, 4), labels, log_prior).backward()
            opt.step()
        with torch.no_grad():
            return head(x).view(n, K, 4).argmax(-1)[:, 0]  # raw logits at inference

    recall_ce = (fit(None)[is_pos] == POSITIVE).float().mean()
    recall_la = (fit(prior)[is_pos] == POSITIVE).float().mean()
    assert recall_la > recall_ce + 0.2, (recall_ce, recall_la)


def test_diagnosis_loss_bad_inputs_name_the_problem():
    logits, labels = _diag_batch(0)
    bad = labels.clone()
    bad[2, 5] = 7
    with pytest.raises(LossInputError, match=r"labels\[2, 5\] = 7"):
        logit_adjusted_diagnosis_loss(logits, bad)
    with pytest.raises(LossInputError, match="logits must be"):
        logit_adjusted_diagnosis_loss(logits[:, :, :3], labels)
    with pytest.raises(LossInputError, match="rows"):
        logit_adjusted_diagnosis_loss(logits, labels[:3])
    with pytest.raises(LossInputError, match="log_prior must be"):
        logit_adjusted_diagnosis_loss(logits, labels, torch.zeros(K, 3))
    with pytest.raises(LossInputError, match="integer"):
        logit_adjusted_diagnosis_loss(logits, labels.float())


def test_diagnosis_loss_empty_batch_is_graph_zero():
    logits, labels = _diag_batch(0)
    loss = logit_adjusted_diagnosis_loss(logits[:0], labels[:0], label_log_prior(labels))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()


# --------------------------------------------------------------------------- prototypes


def test_prototypes_hand_computed():
    features = torch.tensor([[3.0, 4.0], [2.0, 0.0], [0.0, 5.0]])  # normalised: (.6,.8) (1,0) (0,1)
    labels = torch.full((3, K), NEGATIVE)
    labels[0, 0] = labels[0, 1] = POSITIVE
    labels[1, 0] = POSITIVE
    labels[2, 2] = UNCERTAIN  # uncertain is not positive
    labels[2, 3] = 0
    protos, counts = compute_prototypes(features, labels)
    assert counts.dtype == torch.long
    assert counts.tolist() == [2, 1] + [0] * (K - 2)
    torch.testing.assert_close(protos[0], torch.tensor([0.8, 0.4]))
    torch.testing.assert_close(protos[1], torch.tensor([0.6, 0.8]))
    assert protos[2:].abs().sum() == 0


def test_merge_equals_prototypes_of_the_pooled_data():
    g = torch.Generator().manual_seed(0)
    n = 30
    features = torch.randn(n, 8, generator=g) * 3
    labels = torch.randint(0, 4, (n, K), generator=g)
    labels[:, 4] = NEGATIVE  # observation 4 positive nowhere -> zero row, count 0
    labels[:10, 7] = NEGATIVE  # observation 7 absent from the first client only
    pooled = compute_prototypes(features, labels)
    parts = [compute_prototypes(features[a:b], labels[a:b]) for a, b in [(0, 10), (10, 13),
                                                                          (13, 30)]]
    merged = merge_prototypes(parts)
    torch.testing.assert_close(merged[0], pooled[0])
    assert torch.equal(merged[1], pooled[1])
    assert merged[1][4] == 0 and merged[0][4].abs().sum() == 0
    # Count-weighted, not a plain mean of the clients' prototypes.
    plain_mean = torch.stack([p for p, _ in parts]).mean(0)
    assert not torch.allclose(plain_mean[0], pooled[0][0])


def test_prototypes_carry_no_gradient_and_merge_rejects_bad_parts():
    features = torch.randn(4, 3, requires_grad=True)
    protos, counts = compute_prototypes(features, labels_from_sets([{0}, {0}, {1}, set()]))
    assert not protos.requires_grad
    with pytest.raises(LossInputError, match="at least one"):
        merge_prototypes([])
    with pytest.raises(LossInputError, match="part 1"):
        merge_prototypes([(protos, counts), (torch.zeros(K, 5), counts)])
    with pytest.raises(LossInputError, match="part 1"):
        merge_prototypes([(protos, counts), (protos, -counts)])
    with pytest.raises(LossInputError, match="features has 3 rows"):
        compute_prototypes(features[:3], labels_from_sets([{0}] * 4))


# --------------------------------------------------------------------------- contrastive losses


def test_multi_hot_and_jaccard():
    labels = labels_from_sets([{0, 1}, {0}, {0, 2}, set(), set()])
    labels[3, 5] = UNCERTAIN
    assert multi_hot(labels)[0, :3].tolist() == [True, True, False]
    j = jaccard(multi_hot(labels))
    assert j[0, 1] == 0.5 and j[1, 0] == 0.5
    assert abs(j[0, 2] - 1 / 3) < 1e-6 and j[1, 1] == 1.0
    assert j[3, 4] == 0 and j[3, 3] == 0  # no positive observation: nobody's positive


def _random_batch(seed: int, b: int = 7, d: int = 5):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, d, generator=g)
    sets = [set(torch.randint(0, 4, (int(torch.randint(0, 3, (1,), generator=g)),),
                              generator=g).tolist()) for _ in range(b)]
    return z, labels_from_sets(sets), sets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prototype_supcon_matches_reference(seed):
    z, labels, sets = _random_batch(seed)
    g = torch.Generator().manual_seed(100 + seed)
    protos = torch.randn(K, 5, generator=g)
    counts = torch.zeros(K, dtype=torch.long)
    counts[[0, 1, 3, 9]] = 4  # observation 2 has no prototype yet
    t = 0.3
    zn, pn = F.normalize(z, dim=1), F.normalize(protos, dim=1)
    b = len(sets)
    sim = torch.cat([zn @ pn.T, zn @ zn.T], 1) / t
    cand = torch.zeros(b, K + b, dtype=torch.bool)
    pos = torch.zeros_like(cand)
    for i in range(b):
        for k in range(K):
            cand[i, k] = bool(counts[k] > 0)
            pos[i, k] = cand[i, k] and k in sets[i]
        for j in range(b):
            cand[i, K + j] = i != j
            pos[i, K + j] = i != j and bool(sets[i] & sets[j])
    expected = reference_supcon(sim, cand, pos)
    got = prototype_supcon_loss(z, labels, protos, counts, t)
    assert abs(got.item() - expected) < 1e-5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_client_aware_contrastive_matches_reference(seed):
    z, labels, sets = _random_batch(seed, b=9)
    centers = ["a", "b", "a", "a", "b", "c", "a", "b", "b"]
    t = 0.2
    zn = F.normalize(z, dim=1)
    sim = zn @ zn.T / t
    b = len(sets)
    cand = ~torch.eye(b, dtype=torch.bool)
    for use_centers in (False, True):
        pos = torch.zeros(b, b, dtype=torch.bool)
        for i in range(b):
            for j in range(b):
                union = sets[i] | sets[j]
                jac = len(sets[i] & sets[j]) / len(union) if union else 0.0
                same = centers[i] == centers[j] or not use_centers
                pos[i, j] = i != j and jac >= 0.5 and same
        expected = reference_supcon(sim, cand, pos)
        got = client_aware_contrastive_loss(z, labels, t, centers if use_centers else None)
        assert abs(got.item() - expected) < 1e-5, use_centers


def test_center_ids_restrict_positives_to_the_same_center():
    z = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    labels = labels_from_sets([{1}, {1}, {2}])
    assert client_aware_contrastive_loss(z, labels, 0.1) > 0
    split = client_aware_contrastive_loss(z, labels, 0.1, ["a", "b", "a"])
    assert split.item() == 0.0
    same = client_aware_contrastive_loss(z, labels, 0.1, torch.tensor([3, 3, 1]))
    torch.testing.assert_close(same, client_aware_contrastive_loss(z, labels, 0.1))
    with pytest.raises(LossInputError, match="center_ids has 2"):
        client_aware_contrastive_loss(z, labels, 0.1, ["a", "b"])


def test_prototype_loss_with_no_prototypes_is_in_batch_supcon():
    # Single-finding studies: "share any" == exact pattern, so both losses must agree.
    z, _, _ = _random_batch(3, b=8)
    labels = labels_from_sets([{0}, {0}, {1}, {2}, {1}, {NO_FINDING}, {NO_FINDING}, {3}])
    empty = prototype_supcon_loss(z, labels, torch.zeros(K, 5), torch.zeros(K), 0.5)
    torch.testing.assert_close(empty, client_aware_contrastive_loss(z, labels, 0.5,
                                                                    min_jaccard=1.0))
    assert empty > 0


def test_unavailable_prototypes_are_neither_positives_nor_negatives():
    z = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    labels = labels_from_sets([{0}, {1}, {2}])
    protos = torch.randn(K, 4, generator=torch.Generator().manual_seed(1))
    counts = torch.zeros(K)
    counts[[1, 2]] = 1
    loss = prototype_supcon_loss(z, labels, protos, counts, 0.1)
    moved = protos.clone()
    moved[0] = -moved[0] * 5  # observation 0 has no prototype: its row must not matter
    moved[5] = z[1]
    torch.testing.assert_close(prototype_supcon_loss(z, labels, moved, counts, 0.1), loss)


@pytest.mark.parametrize("case", ["no_positives", "one_sample", "empty_prototypes", "no_findings"])
def test_contrastive_losses_are_finite_graph_zero_in_degenerate_batches(case):
    z = torch.randn(4, 6, generator=torch.Generator().manual_seed(0), requires_grad=True)
    labels = labels_from_sets([{0}, {1}, {2}, {3}])
    protos, counts = torch.randn(K, 6), torch.zeros(K)
    if case == "one_sample":
        z, labels = z[:1], labels[:1]
    elif case == "no_findings":  # only blank/uncertain codes: no diagnosis set at all
        labels = torch.full((4, K), UNCERTAIN)
        counts[:] = 3
    losses = [prototype_supcon_loss(z, labels, protos, counts, 0.1),
              client_aware_contrastive_loss(z, labels, 0.1)]
    for loss in losses:
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
    # The same batch with prototypes is a real, finite loss.
    if case in ("one_sample", "no_positives"):
        counts[:] = 2
        loss = prototype_supcon_loss(z, labels, protos, counts, 0.1)
        assert torch.isfinite(loss) and loss > 0


def _separable_toy(seed: int = 0, classes: int = 8, per_class: int = 2):
    """Class signal in 8 dims, a large nuisance (think acquisition style) in 24 more: linearly
    separable, but a random projection is dominated by the nuisance."""
    g = torch.Generator().manual_seed(seed)
    n = classes * per_class
    cls = torch.arange(classes).repeat_interleave(per_class)  # (N,)
    x = torch.randn(n, 32, generator=g) * 3.0
    x[:, :classes] = F.one_hot(cls, classes) * 3.0 + 0.1 * torch.randn(n, classes, generator=g)
    labels = labels_from_sets([{int(c)} for c in cls])
    return x, labels, cls


def _optimise(loss_fn, x, steps: int = 100, d: int = 16):
    torch.manual_seed(0)
    proj = torch.nn.Linear(x.shape[1], d)
    opt = torch.optim.Adam(proj.parameters(), lr=0.03)
    history = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(proj(x))
        loss.backward()
        opt.step()
        history.append(loss.item())
    return history, proj


def test_client_aware_contrastive_decreases_on_a_separable_batch():
    x, labels, _ = _separable_toy()
    history, _ = _optimise(lambda z: client_aware_contrastive_loss(z, labels, 0.1), x)
    assert all(math.isfinite(v) for v in history)
    assert history[-1] < 0.5 * history[0], (history[0], history[-1])


def test_prototype_supcon_decreases_on_a_separable_batch():
    x, labels, _ = _separable_toy()
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(5)))
    protos = torch.zeros(K, 16)
    protos[:8] = q[:8]  # the server's prototypes for observations 0..7, well separated
    counts = torch.zeros(K, dtype=torch.long)
    counts[:8] = 10
    history, _ = _optimise(lambda z: prototype_supcon_loss(z, labels, protos, counts, 0.1), x)
    assert history[-1] < 0.5 * history[0], (history[0], history[-1])


def test_prototype_loss_pulls_samples_toward_their_class_prototype():
    # One sample per class: no in-batch positives, so only the prototypes can pull.
    x, labels, cls = _separable_toy(seed=1, per_class=1)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(6)))
    protos = torch.zeros(K, 16)
    protos[:8] = q[:8]
    counts = torch.zeros(K)
    counts[:8] = 5

    def own_cosine(proj) -> float:
        with torch.no_grad():
            return F.cosine_similarity(proj(x), protos[cls], dim=1).mean().item()

    torch.manual_seed(0)
    before = own_cosine(torch.nn.Linear(32, 16))
    _, proj = _optimise(lambda z: prototype_supcon_loss(z, labels, protos, counts, 0.1), x,
                        steps=60)
    after = own_cosine(proj)
    assert after > before + 0.5 and after > 0.8, (before, after)


def test_contrastive_bad_inputs_name_the_argument():
    z = torch.randn(3, 4)
    labels = labels_from_sets([{0}, {0}, {1}])
    with pytest.raises(LossInputError, match="z has 2 rows"):
        client_aware_contrastive_loss(z[:2], labels, 0.1)
    with pytest.raises(LossInputError, match="min_jaccard"):
        client_aware_contrastive_loss(z, labels, 0.1, min_jaccard=0.0)
    with pytest.raises(LossInputError, match="prototypes must be"):
        prototype_supcon_loss(z, labels, torch.zeros(K, 5), torch.ones(K), 0.1)
    with pytest.raises(LossInputError, match="proto_counts"):
        prototype_supcon_loss(z, labels, torch.zeros(K, 4), torch.ones(K - 1), 0.1)
    with pytest.raises(LossInputError, match="temperature"):
        prototype_supcon_loss(z, labels, torch.zeros(K, 4), torch.ones(K), -1.0)
