"""The FedMRG training losses and diagnosis prototypes (mechanisms 2 and 3 of docs/model.md).

Pure PyTorch over tensors: no model, no Ray. Every loss returns a scalar float32 tensor; in a
degenerate case (no valid token, no anchor with a positive, empty batch) it returns an exact 0
that is still attached to the inputs' graph, so `loss.backward()` works and gives zero grads.

- Decoder, mechanism 3: `mutual_boosting_kl` ties the generic-only path and the
  generic+specialized path with a two-way distillation KL (stop-gradient on each teacher side).
- Encoder, mechanism 2: `logit_adjusted_diagnosis_loss` keeps diagnostic accuracy under label
  imbalance; `prototype_supcon_loss` trains the global (aggregated) projection head against the
  diagnosis prototypes the server merges from clients (`compute_prototypes` on each client,
  `merge_prototypes` on the server), so positives come from other centers without sharing data;
  `client_aware_contrastive_loss` trains the private local head on local data.

Labels follow `fedmrg.data.schema`: (N, 14) integer codes, BLANK=0 POSITIVE=1 NEGATIVE=2
UNCERTAIN=3. A sample's "diagnosis set" is the set of observations coded POSITIVE; "no finding"
is itself one of the 14 observations, so two normal studies share it like any other diagnosis.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
import torch.nn.functional as F

from fedmrg.data.schema import NUM_OBSERVATIONS, NUM_STATES, POSITIVE

Tensor = torch.Tensor


class LossInputError(ValueError):
    """A loss got inputs of the wrong shape, dtype or value; the message names the argument."""


# --------------------------------------------------------------------------- checks & helpers


def _check_temperature(temperature: float, name: str = "temperature") -> float:
    t = float(temperature)
    if not t > 0 or t != t or t == float("inf"):
        raise LossInputError(f"{name} must be a finite number > 0, got {temperature!r}")
    return t


def _check_labels(labels: Tensor, name: str = "labels") -> None:
    """(N, 14) integer codes in [0, 4)."""
    if not isinstance(labels, Tensor):
        raise LossInputError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 2 or labels.shape[1] != NUM_OBSERVATIONS:
        raise LossInputError(
            f"{name} must have shape (N, {NUM_OBSERVATIONS}), got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise LossInputError(f"{name} must be an integer tensor of label codes, got {labels.dtype}")
    bad = (labels < 0) | (labels >= NUM_STATES)
    if bad.any():
        row, col = (int(i) for i in bad.nonzero()[0])
        raise LossInputError(
            f"{name}[{row}, {col}] = {int(labels[row, col])} is not a label code in "
            f"[0, {NUM_STATES})")


def _check_features(x: Tensor, name: str, rows: int | None = None) -> None:
    if not isinstance(x, Tensor) or x.dim() != 2 or not x.dtype.is_floating_point:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise LossInputError(f"{name} must be a floating (N, D) tensor, got {shape}")
    if rows is not None and x.shape[0] != rows:
        raise LossInputError(f"{name} has {x.shape[0]} rows but labels has {rows}")


def _graph_zero(*tensors: Tensor) -> Tensor:
    """An exact float32 0 attached to the graph of `tensors` (an empty slice sums to 0, and
    unlike `x.sum() * 0` it stays 0 even if x holds inf/NaN)."""
    return sum(t.reshape(-1)[:0].float().sum() for t in tensors)


def multi_hot(labels: Tensor) -> Tensor:
    """(N, 14) label codes -> (N, 14) bool: True where the observation is POSITIVE."""
    _check_labels(labels)
    return labels == POSITIVE


def jaccard(sets: Tensor) -> Tensor:
    """(N, K) bool membership -> (N, N) float32 pairwise Jaccard |a & b| / |a | b|.

    Two empty sets get 0, not 1: a study with no positive observation (only blank, negative or
    uncertain codes) says nothing about its diagnosis, so it is nobody's positive.
    """
    s = sets.float()  # (N, K)
    inter = s @ s.T  # (N, N)
    sizes = s.sum(1)  # (N,)
    union = sizes[:, None] + sizes[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))


def _center_codes(center_ids: Tensor | Sequence[Hashable], n: int) -> Tensor:
    """Center ids (tensor or e.g. a list of center names) -> (N,) int64 codes."""
    if isinstance(center_ids, Tensor):
        codes = center_ids.reshape(-1)
    else:
        index: dict[Hashable, int] = {}
        codes = torch.tensor([index.setdefault(c, len(index)) for c in center_ids],
                             dtype=torch.long)
    if codes.numel() != n:
        raise LossInputError(f"center_ids has {codes.numel()} entries but the batch has {n}")
    return codes


def _supcon(sim: Tensor, candidates: Tensor, positives: Tensor) -> Tensor:
    """Supervised contrastive loss, the L_out form of Khosla et al. 2020, eq. 2.

    sim (A, C): anchor-to-candidate similarities already divided by the temperature;
    candidates (A, C) bool: what enters each anchor's softmax denominator (not the anchor itself);
    positives (A, C) bool, a subset of candidates.
    loss = mean over anchors with >= 1 positive of  -1/|P(i)| sum_{p in P(i)} log softmax_i(p).
    Anchors without a positive are left out (their term is undefined); none left -> graph zero.
    """
    positives = positives & candidates
    has_pos = positives.any(1)  # (A,)
    if not bool(has_pos.any()):
        return _graph_zero(sim)
    # Only rows with a positive: each has at least one candidate, so logsumexp is finite and
    # the -inf entries of masked candidates get exactly zero gradient.
    sim, candidates, positives = sim[has_pos], candidates[has_pos], positives[has_pos]
    logits = sim.masked_fill(~candidates, float("-inf"))  # (A', C)
    log_prob = logits - logits.logsumexp(1, keepdim=True)
    pos_log_prob = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(1)
    return (-pos_log_prob / positives.sum(1)).mean()


# --------------------------------------------------------------------------- decoder: mechanism 3


def mutual_boosting_kl(generic_logits: Tensor, personal_logits: Tensor, token_mask: Tensor,
                       temperature: float) -> Tensor:
    """Two-way distillation KL between the generic-only and generic+specialized paths.

    generic_logits, personal_logits: (B, T, V) next-token logits of the two paths, aligned with
    `token_mask` (B, T) bool, True where the logits predict a report token (prompt, visual and
    padding positions False; the caller does the usual one-step shift).
    With p_g = softmax(generic / T), p_s = softmax(personal / T):
        T^2 * [ KL(sg(p_s) || p_g) + KL(sg(p_g) || p_s) ]  averaged over the valid tokens,
    where sg is stop-gradient: each path is the student in one term and a fixed teacher in the
    other, so the generic logits get gradient only from the first term and the personal logits
    only from the second. T^2 keeps gradient magnitudes independent of T (Hinton et al. 2015).
    Exactly 0 when the logits agree; no valid token -> graph zero. Computed in float32.
    """
    t = _check_temperature(temperature)
    if generic_logits.dim() != 3 or generic_logits.shape != personal_logits.shape:
        raise LossInputError(
            f"generic_logits and personal_logits must both be (B, T, V), got "
            f"{tuple(generic_logits.shape)} and {tuple(personal_logits.shape)}")
    if token_mask.dtype != torch.bool:
        # An integer mask would index (gather) positions instead of selecting them.
        raise LossInputError(f"token_mask must be a bool tensor, got {token_mask.dtype}")
    if token_mask.shape != generic_logits.shape[:2]:
        raise LossInputError(f"token_mask must be (B, T) = {tuple(generic_logits.shape[:2])}, "
                             f"got {tuple(token_mask.shape)}")
    # Select the report tokens first: (N, V) instead of (B, T, V) in float32.
    gen = generic_logits[token_mask].float() / t  # (N, V)
    per = personal_logits[token_mask].float() / t  # (N, V)
    n = gen.shape[0]
    if n == 0:
        return _graph_zero(gen, per)
    log_g = F.log_softmax(gen, dim=-1)
    log_s = F.log_softmax(per, dim=-1)
    # F.kl_div(input=log q, target=log p, log_target=True) = sum p * (log p - log q) = KL(p || q)
    kl_generic_student = F.kl_div(log_g, log_s.detach(), reduction="sum", log_target=True)
    kl_personal_student = F.kl_div(log_s, log_g.detach(), reduction="sum", log_target=True)
    return (kl_generic_student + kl_personal_student) * (t * t) / n


# --------------------------------------------------------------------------- diagnosis head


def label_state_counts(labels: Tensor) -> Tensor:
    """(N, 14) label codes -> (14, 4) float32 counts of each state per observation (what a
    client can send so the server builds a global prior)."""
    _check_labels(labels)
    return F.one_hot(labels.long(), NUM_STATES).sum(0).float()


def log_prior_from_counts(counts: Tensor, smoothing: float = 1.0) -> Tensor:
    """(14, 4) state counts -> (14, 4) log prior, log((count + s) / (total + 4 s)) per row.

    `smoothing` must be > 0 so that a state never seen gets a finite log prior (a -inf prior
    would make its logit -inf and its loss infinite the first time it appears).
    """
    if not float(smoothing) > 0:
        raise LossInputError(f"smoothing must be > 0, got {smoothing!r}")
    if counts.shape != (NUM_OBSERVATIONS, NUM_STATES):
        raise LossInputError(f"counts must be ({NUM_OBSERVATIONS}, {NUM_STATES}), got "
                             f"{tuple(counts.shape)}")
    if bool((counts < 0).any()):
        raise LossInputError("counts must be non-negative")
    c = counts.float() + float(smoothing)
    return (c / c.sum(1, keepdim=True)).log()


def label_log_prior(labels: Tensor, smoothing: float = 1.0) -> Tensor:
    """(N, 14) label codes -> (14, 4) log class prior per observation, Laplace-smoothed."""
    return log_prior_from_counts(label_state_counts(labels), smoothing)


def logit_adjusted_diagnosis_loss(logits: Tensor, labels: Tensor, log_prior: Tensor | None = None,
                                  tau: float = 1.0) -> Tensor:
    """Cross-entropy over the 4 states of each of the 14 observations, with logit adjustment.

    logits (B, 14, 4), labels (B, 14) codes, log_prior (14, 4) or None.
    Logit-adjusted loss (Menon et al. 2021): CE(logits + tau * log_prior, labels). Frequent
    states get a head start during training, so the raw logits must earn the rare ones: predict
    with the *unadjusted* logits (argmax(logits)), which is then balanced rather than biased
    toward "blank"/"negative". None (or a prior uniform within each observation) is plain CE.
    Averaged over observations and batch; B == 0 -> graph zero.
    """
    if logits.dim() != 3 or logits.shape[1:] != (NUM_OBSERVATIONS, NUM_STATES):
        raise LossInputError(f"logits must be (B, {NUM_OBSERVATIONS}, {NUM_STATES}), got "
                             f"{tuple(logits.shape)}")
    _check_labels(labels)
    if labels.shape[0] != logits.shape[0]:
        raise LossInputError(f"labels has {labels.shape[0]} rows but logits has "
                             f"{logits.shape[0]}")
    x = logits.float()  # (B, 14, 4)
    if log_prior is not None:
        if log_prior.shape != (NUM_OBSERVATIONS, NUM_STATES):
            raise LossInputError(f"log_prior must be ({NUM_OBSERVATIONS}, {NUM_STATES}), got "
                                 f"{tuple(log_prior.shape)}")
        if not bool(torch.isfinite(log_prior).all()):
            raise LossInputError("log_prior has non-finite values (use smoothing > 0)")
        x = x + float(tau) * log_prior.detach().to(x)
    if x.shape[0] == 0:
        return _graph_zero(x)
    return F.cross_entropy(x.reshape(-1, NUM_STATES), labels.reshape(-1).long())


# --------------------------------------------------------------------------- prototypes


@torch.no_grad()
def compute_prototypes(features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-observation mean of L2-normalised features over the samples where it is POSITIVE.

    features (N, D), labels (N, 14) -> prototypes (14, D) float32, counts (14,) int64.
    A row with count 0 is all zeros. The mean is not re-normalised, so that merging is an exact
    count-weighted mean (`merge_prototypes`); the losses normalise. No gradient: prototypes
    are messages to the server, fixed targets when they come back.
    """
    _check_labels(labels)
    _check_features(features, "features", labels.shape[0])
    f = F.normalize(features.float(), dim=1)  # (N, D)
    pos = multi_hot(labels).float()  # (N, 14)
    counts = pos.sum(0)  # (14,)
    prototypes = (pos.T @ f) / counts.clamp(min=1)[:, None]  # (14, D)
    return prototypes, counts.long()


@torch.no_grad()
def merge_prototypes(parts: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """What the server does: count-weighted mean of the clients' (prototypes, counts).

    parts: [(prototypes (14, D), counts (14,)), ...] -> (prototypes (14, D) float32,
    counts (14,) total, int64). Rows with total count 0 are zeros. Equal to
    `compute_prototypes` on the pooled data.
    """
    if not parts:
        raise LossInputError("merge_prototypes needs at least one (prototypes, counts) part")
    shape = tuple(parts[0][0].shape)
    device = parts[0][0].device
    total = torch.zeros(NUM_OBSERVATIONS, dtype=torch.float64, device=device)
    weighted = None
    for i, (protos, counts) in enumerate(parts):
        if protos.dim() != 2 or protos.shape[0] != NUM_OBSERVATIONS or tuple(protos.shape) != shape:
            raise LossInputError(f"part {i}: prototypes must be ({NUM_OBSERVATIONS}, D) like part "
                                 f"0 {shape}, got {tuple(protos.shape)}")
        if tuple(counts.shape) != (NUM_OBSERVATIONS,):
            raise LossInputError(f"part {i}: counts must be ({NUM_OBSERVATIONS},), got "
                                 f"{tuple(counts.shape)}")
        if bool((counts < 0).any()) or not bool(torch.isfinite(protos).all()):
            raise LossInputError(f"part {i}: negative counts or non-finite prototypes")
        c = counts.to(device, torch.float64)
        term = protos.to(device, torch.float64) * c[:, None]  # (14, D)
        weighted = term if weighted is None else weighted + term
        total += c
    prototypes = (weighted / total.clamp(min=1)[:, None]).float()
    return prototypes, total.round().long()


# --------------------------------------------------------------------------- encoder: mechanism 2


def prototype_supcon_loss(z: Tensor, labels: Tensor, prototypes: Tensor, proto_counts: Tensor,
                          temperature: float) -> Tensor:
    """The global head's loss: supervised contrastive against the aggregated diagnosis prototypes
    plus in-batch positives.

    z (B, D) projected features, labels (B, 14), prototypes (14, D), proto_counts (14,).
    For anchor i the candidates are the available prototypes (count > 0) and the other samples
    of the batch; its positives are the prototypes of its positive observations and the samples
    sharing at least one positive observation with it (two "no finding" studies share the "no
    finding" observation). Negatives are every other candidate. z and the prototypes are
    L2-normalised here; the prototypes are fixed targets (no gradient).
    Anchors with no positive are left out; none left (e.g. B == 1 and no prototypes) -> graph zero.
    """
    t = _check_temperature(temperature)
    _check_labels(labels)
    b = labels.shape[0]
    _check_features(z, "z", b)
    _check_features(prototypes, "prototypes")
    if prototypes.shape != (NUM_OBSERVATIONS, z.shape[1]):
        raise LossInputError(f"prototypes must be ({NUM_OBSERVATIONS}, {z.shape[1]}) to match z, "
                             f"got {tuple(prototypes.shape)}")
    if proto_counts.shape != (NUM_OBSERVATIONS,):
        raise LossInputError(f"proto_counts must be ({NUM_OBSERVATIONS},), got "
                             f"{tuple(proto_counts.shape)}")
    zn = F.normalize(z.float(), dim=1)  # (B, D)
    pn = F.normalize(prototypes.detach().float().to(z.device), dim=1)  # (14, D)
    pos_sets = multi_hot(labels).to(z.device)  # (B, 14)
    available = (proto_counts > 0).to(z.device)  # (14,)
    not_self = ~torch.eye(b, dtype=torch.bool, device=z.device)  # (B, B)
    share = (pos_sets.float() @ pos_sets.float().T) > 0  # (B, B)

    sim = torch.cat([zn @ pn.T, zn @ zn.T], dim=1) / t  # (B, 14 + B)
    candidates = torch.cat([available.expand(b, -1), not_self], dim=1)
    positives = torch.cat([pos_sets & available, share & not_self], dim=1)
    return _supcon(sim, candidates, positives)


def client_aware_contrastive_loss(z: Tensor, labels: Tensor, temperature: float,
                                  center_ids: Tensor | Sequence[Hashable] | None = None,
                                  min_jaccard: float = 0.5) -> Tensor:
    """The local head's loss: supervised contrastive on local data.

    z (B, D) projected features, labels (B, 14), center_ids (B,) or None (all from this client).
    Positives of anchor i: the other samples whose diagnosis set has Jaccard >= `min_jaccard`
    with i's, and (when `center_ids` is given, e.g. a centralized baseline on pooled data) the
    same center; samples of other centers stay in the denominator as negatives, which is what
    makes the head client-aware. Candidates: every other sample. z is L2-normalised here.

    Why Jaccard >= 0.5 rather than the global head's "share any observation" or the exact
    multi-hot pattern: the local head should be *finer* than the global one (locally
    distinctive), so sharing one finding out of several is not enough; but with 14 observations
    exact patterns rarely repeat in a small local batch, which would leave most anchors without a
    positive. 0.5 keeps single-finding studies exact ({a} vs {a}), accepts one finding more or
    less ({a, b} vs {a}), and rejects {a, b} vs {a, c}. `min_jaccard=1.0` is the exact pattern.
    Studies with no positive observation are nobody's positive (see `jaccard`).
    Anchors with no positive are left out; none left -> graph zero.
    """
    t = _check_temperature(temperature)
    if not 0 < float(min_jaccard) <= 1:
        raise LossInputError(f"min_jaccard must be in (0, 1], got {min_jaccard!r}")
    _check_labels(labels)
    b = labels.shape[0]
    _check_features(z, "z", b)
    zn = F.normalize(z.float(), dim=1)  # (B, D)
    not_self = ~torch.eye(b, dtype=torch.bool, device=z.device)  # (B, B)
    positives = (jaccard(multi_hot(labels)).to(z.device) >= min_jaccard) & not_self
    if center_ids is not None:
        codes = _center_codes(center_ids, b).to(z.device)
        positives &= codes[:, None] == codes[None, :]
    return _supcon(zn @ zn.T / t, not_self, positives)
