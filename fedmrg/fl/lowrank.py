"""Low-rank updates: LoRA aggregation on the server, truncated-SVD + error feedback on clients.

Server side, per LoRA module (update of W = scaling * B @ A, A (r, k), B (d, r)):

- `fedavg`: weighted mean of the A's and of the B's separately. Cheap, but the mean of products
  is not the product of means, so it is inexact unless clients agree.
- `exact`: the best rank-`rank` approximation (Frobenius / spectral, Eckart-Young) of
  M = sum_k w_k B_k A_k, from QR of the stacked factors and an SVD of a small R x R core
  (R = sum_k r_k), never forming the dense d x k matrix M.
- `stack`: FLoRA-style concatenation, A = [A_1; ...; A_K], B = [w_1 B_1 | ... | w_K B_K].
  B @ A equals M exactly, but the rank is R = sum_k r_k (see `aggregate_lora_stack`).

Client side, every other shared (dense) tensor: `ErrorFeedback.compress` sends a truncated SVD
of the round's update plus the residual it failed to send last round.

Scaling: all three methods combine products B_k A_k, i.e. they assume every client's adapter
has the same `scaling` (lora_alpha / r). With heterogeneous ranks and a fixed lora_alpha the
scalings differ: pass `B_k * scaling_k` and divide the resulting B by the receiving adapter's
scaling.

Pure functions on CPU or GPU tensors; no Ray. Factorizations run in float64 and the results
come back in the inputs' dtype.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedmrg.choices import AggregationMethod, choice_values
from fedmrg.fl.quantize import round_trip

COMPUTE_DTYPE = torch.float64  # QR/SVD precision; the cost is a few small matrices per module

# `<module>.lora_A.<adapter>.weight`, as peft names them in a state dict
_LORA_NAME = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])\.(?P<adapter>[^.]+)\.weight$")
_LORA_MARK = re.compile(r"(^|\.)lora_[AB]\.")


class LowRankError(ValueError):
    """Inconsistent factors, weights or ranks; the message names the client/tensor/value."""


# --------------------------------------------------------------------------- weights


def normalize_weights(weights: Sequence[float] | torch.Tensor, n: int | None = None,
                      dtype: torch.dtype = COMPUTE_DTYPE) -> torch.Tensor:
    """Client weights (sample counts) -> (K,) tensor summing to 1.

    Zero weights are allowed (the client contributes nothing); negative, non-finite or an
    all-zero set are errors, as is a count different from `n` when given.
    """
    w = torch.as_tensor(weights, dtype=dtype).flatten().cpu()
    if n is not None and w.numel() != n:
        raise LowRankError(f"got {w.numel()} weights for {n} clients")
    if w.numel() == 0:
        raise LowRankError("no clients to aggregate (empty weights)")
    for i, v in enumerate(w.tolist()):
        if not math.isfinite(v) or v < 0:
            raise LowRankError(f"client {i}: weight {v} is not a finite non-negative number")
    total = float(w.sum())
    if total <= 0:
        raise LowRankError(f"weights {w.tolist()} sum to 0; at least one client needs samples")
    return w / total


# --------------------------------------------------------------------------- LoRA aggregation


def _check_factors(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor]) -> tuple[int, int]:
    """Every A_k (r_k, k), B_k (d, r_k), same d and k for all clients; returns (d, k)."""
    if len(As) != len(Bs):
        raise LowRankError(f"{len(As)} A factors but {len(Bs)} B factors")
    if not As:
        raise LowRankError("no clients to aggregate (empty factor lists)")
    for i, (a, b) in enumerate(zip(As, Bs, strict=True)):
        if a.dim() != 2 or b.dim() != 2:
            raise LowRankError(f"client {i}: factors must be 2-D, got A {tuple(a.shape)} and "
                               f"B {tuple(b.shape)} (reshape conv factors with lora_matrices)")
        if a.shape[0] != b.shape[1]:
            raise LowRankError(f"client {i}: A {tuple(a.shape)} and B {tuple(b.shape)} have "
                               f"different ranks ({a.shape[0]} vs {b.shape[1]})")
    d, k = Bs[0].shape[0], As[0].shape[1]
    for i, (a, b) in enumerate(zip(As, Bs, strict=True)):
        if (b.shape[0], a.shape[1]) != (d, k):
            raise LowRankError(f"client {i}: B @ A has shape {(b.shape[0], a.shape[1])}, "
                               f"client 0's has {(d, k)}")
    return d, k


def _result_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype if dtype.is_floating_point else torch.get_default_dtype()


def aggregate_lora_fedavg(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor],
                          weights: Sequence[float] | torch.Tensor,
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted means: A = sum_k w_k A_k (r, k), B = sum_k w_k B_k (d, r).

    B @ A != sum_k w_k B_k A_k in general (cross terms B_i A_j); equal when clients agree.
    All clients must have the same rank (use `exact` or `stack` for heterogeneous ranks).
    """
    _check_factors(As, Bs)
    ranks = [a.shape[0] for a in As]
    if len(set(ranks)) > 1:
        raise LowRankError(f"fedavg needs one rank for all clients, got ranks {ranks}; "
                           f"use aggregation 'exact' or 'stack' for heterogeneous ranks")
    w = normalize_weights(weights, len(As))
    dtype = _result_dtype([*As, *Bs])
    A = sum(wi * a.to(COMPUTE_DTYPE) for wi, a in zip(w.tolist(), As, strict=True))
    B = sum(wi * b.to(COMPUTE_DTYPE) for wi, b in zip(w.tolist(), Bs, strict=True))
    return A.to(dtype), B.to(dtype)


def aggregate_lora_stack(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor],
                         weights: Sequence[float] | torch.Tensor,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """FLoRA-style stacking: A = [A_1; ...; A_K] (R, k), B = [w_1 B_1 | ... | w_K B_K] (d, R).

    B @ A = sum_k w_k B_k A_k exactly, with R = sum_k r_k. The rank grows: the next round's
    adapter has rank R, not the clients' r. A receiver must either merge scaling * B @ A into
    its frozen base weight and start a fresh rank-r adapter (what FLoRA does), or be built with
    rank R; fed back as the clients' starting factors round after round, R grows by sum_k r_k
    each round. The weights go on B, so the A rows are the clients' own.
    """
    _check_factors(As, Bs)
    w = normalize_weights(weights, len(As))
    dtype = _result_dtype([*As, *Bs])
    A = torch.cat([a.to(COMPUTE_DTYPE) for a in As], dim=0)  # (R, k)
    B = torch.cat([wi * b.to(COMPUTE_DTYPE) for wi, b in zip(w.tolist(), Bs, strict=True)],
                  dim=1)  # (d, R)
    return A.to(dtype), B.to(dtype)


def _orthogonal_rows(rows: torch.Tensor, n: int) -> torch.Tensor:
    """n unit rows (n, k) orthogonal to the orthonormal `rows` (m, k) and to each other;
    rows past k are zero. Deterministic (Householder QR of the existing rows)."""
    m, k = rows.shape
    Q, _ = torch.linalg.qr(rows.T, mode="complete")  # (k, k); columns m.. span the complement
    extra = Q[:, m:m + n].T  # (min(n, k - m), k)
    return torch.cat([extra, extra.new_zeros(n - extra.shape[0], k)], dim=0)


def aggregate_lora_exact(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor],
                         weights: Sequence[float] | torch.Tensor, rank: int,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` approximation of M = sum_k w_k B_k A_k, as factors A (rank, k), B (d, rank).

    M = Bs @ As with Bs = [w_1 B_1 | ... | w_K B_K] (d, R) and As = [A_1; ...; A_K] (R, k).
    QR: Bs = Qb Rb, As^T = Qa Ra, so M = Qb (Rb Ra^T) Qa^T, and the SVD of the small core
    C = Rb Ra^T = U S V^T gives the SVD of M = (Qb U) S (Qa V)^T. Cost O((d + k) R^2 + R^3)
    instead of O(d k R + d k min(d, k)) for the dense route; it pays while R << min(d, k).

    Split of S between the factors: balanced, B = Qb U_r sqrt(S_r), A = sqrt(S_r) V_r^T Qa^T,
    so column i of B and row i of A have the same norm sqrt(s_i). This keeps the two factors
    equally conditioned for the next round's gradients (dL/dB = G A^T, dL/dA = B^T G), whereas
    putting S on one side leaves the other orthonormal and the gradient scales lopsided.
    Components without energy (s_i <= max(p, q) * eps * s_1, e.g. all B_k = 0, or rank > R)
    get B column 0 and a unit-norm A row orthogonal to the others, as LoRA initializes (B = 0,
    A != 0): the product is unchanged, and the component stays trainable (with A row and B
    column both zero, both gradients would be zero forever). The output always has exactly
    `rank` components, so the receiving adapter keeps its shape; past rank k the extra A rows
    are zero (no orthogonal direction is left).

    Clients may have different ranks r_k; the output has the requested `rank`.
    """
    d, k = _check_factors(As, Bs)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise LowRankError(f"rank must be a positive integer, got {rank!r}")
    w = normalize_weights(weights, len(As))
    dtype, device = _result_dtype([*As, *Bs]), Bs[0].device
    B_stack = torch.cat([wi * b.to(device, COMPUTE_DTYPE)
                         for wi, b in zip(w.tolist(), Bs, strict=True)], dim=1)  # (d, R)
    A_stack = torch.cat([a.to(device, COMPUTE_DTYPE) for a in As], dim=0)  # (R, k)
    Qb, Rb = torch.linalg.qr(B_stack, mode="reduced")  # (d, p), (p, R), p = min(d, R)
    Qa, Ra = torch.linalg.qr(A_stack.T, mode="reduced")  # (k, q), (q, R), q = min(k, R)
    core = Rb @ Ra.T  # (p, q)
    U, svals, Vh = torch.linalg.svd(core, full_matrices=False)  # (p, m), (m,), (m, q)
    kept = min(rank, svals.numel())
    svals, directions = svals[:kept], Vh[:kept] @ Qa.T  # (kept,), (kept, k) orthonormal rows
    root = svals.sqrt()
    B = (Qb @ U[:, :kept]) * root  # (d, kept)
    A = root[:, None] * directions  # (kept, k)
    tol = max(core.shape) * torch.finfo(COMPUTE_DTYPE).eps * svals[0]  # descending
    dead = svals <= tol
    B[:, dead] = 0.0
    A[dead] = directions[dead]
    if kept < rank:  # more components asked than M has: pad with fresh trainable ones
        A = torch.cat([A, _orthogonal_rows(directions, rank - kept)], dim=0)
        B = torch.cat([B, B.new_zeros(d, rank - kept)], dim=1)
    return A.to(dtype), B.to(dtype)


def aggregate_lora(method: str, As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor],
                   weights: Sequence[float] | torch.Tensor, rank: int | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch on `method` (federation.aggregation): "exact" | "fedavg" | "stack".

    `rank` is used by "exact" only; None means the largest client rank.
    """
    if method == AggregationMethod.EXACT:
        _check_factors(As, Bs)
        target = max(a.shape[0] for a in As) if rank is None else rank
        return aggregate_lora_exact(As, Bs, weights, target)
    if method == AggregationMethod.FEDAVG:
        return aggregate_lora_fedavg(As, Bs, weights)
    if method == AggregationMethod.STACK:
        return aggregate_lora_stack(As, Bs, weights)
    raise LowRankError(f"unknown LoRA aggregation {method!r}; choose one of "
                       f"{choice_values(AggregationMethod)}")


# --------------------------------------------------------------------------- LoRA in state dicts


@dataclass(frozen=True)
class LoraPair:
    """The two factor names of one LoRA adapter on one module."""

    module: str  # e.g. "decoder.base_model.model.model.layers.0.self_attn.q_proj"
    adapter: str  # e.g. "generic"
    a_key: str
    b_key: str


def is_lora_factor(name: str) -> bool:
    """True for state-dict names of LoRA factors (`...lora_A.<adapter>...`, `...lora_B...`)."""
    return _LORA_MARK.search(name) is not None


def lora_pairs(names: Mapping[str, object] | Sequence[str], adapters: Sequence[str] | None = None,
               ) -> dict[str, LoraPair]:
    """Group LoRA factor names into pairs, keyed `"<module>.<adapter>"`, in first-seen order.

    `names`: a state dict or its keys. Only adapters in `adapters` are taken (None: all).
    A factor without its partner, or a LoRA name not of the form
    `<module>.lora_{A,B}.<adapter>.weight` (e.g. a peft lora bias), is an error.
    """
    found: dict[str, dict[str, str]] = {}
    for name in names:
        if not is_lora_factor(name):
            continue
        match = _LORA_NAME.match(name)
        if match is None:
            raise LowRankError(f"{name}: unsupported LoRA tensor (expected "
                               f"'<module>.lora_A.<adapter>.weight' or lora_B)")
        if adapters is not None and match["adapter"] not in adapters:
            continue
        key = f"{match['module']}.{match['adapter']}"
        found.setdefault(key, {})[match["factor"]] = name
    pairs = {}
    for key, factors in found.items():
        if set(factors) != {"A", "B"}:
            have, lack = next(iter(factors.items())), "B" if "A" in factors else "A"
            raise LowRankError(f"{have[1]}: LoRA factor without its lora_{lack} partner")
        module, adapter = key.rsplit(".", 1)
        pairs[key] = LoraPair(module, adapter, factors["A"], factors["B"])
    return pairs


def lora_matrices(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """peft factors as matrices: A (r, k) and B (d, r), with delta W = B @ A (times scaling).

    Linear: A (r, in), B (out, r) as they are. Conv2d: A (r, in, kh, kw) -> (r, in*kh*kw) and
    B (out, r, 1, 1) -> (out, r); the delta reshapes back to (out, in, kh, kw).
    """
    if A.dim() < 2 or B.dim() < 2:
        raise LowRankError(f"LoRA factors need >= 2 dims, got A {tuple(A.shape)}, "
                           f"B {tuple(B.shape)}")
    if any(s != 1 for s in B.shape[2:]):
        raise LowRankError(f"LoRA B {tuple(B.shape)}: trailing dims must be 1 (a 1x1 conv)")
    return A.reshape(A.shape[0], -1), B.reshape(B.shape[0], B.shape[1])


def lora_delta_shape(A: torch.Tensor, B: torch.Tensor) -> tuple[int, ...]:
    """Shape of the base weight the factors update: (d, k) or (out, in, kh, kw)."""
    return (B.shape[0], *A.shape[1:])


def aggregate_lora_states(method: str, states: Sequence[Mapping[str, torch.Tensor]],
                          weights: Sequence[float] | torch.Tensor, rank: int | None = None,
                          adapters: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Aggregate every LoRA pair of the clients' state dicts -> {a_key: A, b_key: B}.

    Pairs come from client 0 (`lora_pairs`); every client must hold both factors of every
    pair with matching non-rank dims. Conv factors are aggregated as matrices and reshaped back
    to peft's layout with the new rank. Non-LoRA tensors are ignored (the caller averages them).
    """
    if not states:
        raise LowRankError("no client states to aggregate")
    pairs = lora_pairs(states[0], adapters)
    for i, state in enumerate(states[1:], start=1):
        other = lora_pairs(state, adapters)
        if other.keys() != pairs.keys():
            diff = sorted(set(pairs).symmetric_difference(other))
            raise LowRankError(f"client {i}: LoRA modules differ from client 0's, "
                               f"first: {diff[0]!r} ({len(diff)} in all)")
    out: dict[str, torch.Tensor] = {}
    for key, pair in pairs.items():
        ref_A, ref_B = states[0][pair.a_key], states[0][pair.b_key]
        As, Bs = [], []
        for i, state in enumerate(states):
            A, B = state[pair.a_key], state[pair.b_key]
            if A.shape[1:] != ref_A.shape[1:] or B.shape[2:] != ref_B.shape[2:]:
                raise LowRankError(f"client {i}: {key}: factors A {tuple(A.shape)}, "
                                   f"B {tuple(B.shape)} do not match client 0's "
                                   f"A {tuple(ref_A.shape)}, B {tuple(ref_B.shape)}")
            try:
                a, b = lora_matrices(A, B)
            except LowRankError as e:
                raise LowRankError(f"client {i}: {key}: {e}") from None
            As.append(a)
            Bs.append(b)
        try:
            A, B = aggregate_lora(method, As, Bs, weights, rank)  # checks ranks and d
        except LowRankError as e:
            raise LowRankError(f"{key}: {e}") from None
        r = A.shape[0]
        out[pair.a_key] = A.reshape(r, *ref_A.shape[1:]).to(ref_A.dtype)
        out[pair.b_key] = B.reshape(ref_B.shape[0], r, *ref_B.shape[2:]).to(ref_B.dtype)
    return out


# --------------------------------------------------------------------------- dense updates


@dataclass
class LowRankUpdate:
    """A dense update of `shape` sent as U (m, r) @ V (r, n), with m = shape[0] and
    n = prod(shape[1:]) (a conv weight (out, in, kh, kw) is the matrix (out, in*kh*kw))."""

    U: torch.Tensor  # (m, r), singular values folded in
    V: torch.Tensor  # (r, n), orthonormal rows
    shape: tuple[int, ...]

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    def dense(self) -> torch.Tensor:
        return (self.U @ self.V).reshape(self.shape)


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """(m, n) of the matrix view of a >= 2-D tensor: (shape[0], prod(shape[1:]))."""
    if len(shape) < 2:
        raise LowRankError(f"shape {tuple(shape)}: a matrix view needs >= 2 dims")
    return shape[0], math.prod(shape[1:])


def factorizes(shape: Sequence[int], rank: int) -> bool:
    """Whether an update of `shape` travels as rank-`rank` factors rather than dense.

    Rule: rank > 0, at least 2 dims, and the factors hold fewer numbers than the tensor,
    rank * (m + n) < m * n. So 1-D tensors (biases, norms, BatchNorm statistics), rank 0
    (dense mode) and small or thin matrices go dense. (rank >= min(m, n) never factorizes.)
    """
    if rank <= 0 or len(shape) < 2:
        return False
    m, n = matrix_shape(shape)
    return rank * (m + n) < m * n


def update_rank(name: str, rank: int, whole: Sequence[str] = ()) -> int:
    """The rank a shared tensor's update travels at: 0 (whole) when its name starts with one
    of the `whole` prefixes (`federation.whole_tensors`), else `rank`."""
    return 0 if any(name.startswith(prefix) for prefix in whole) else rank


def truncated_svd(delta: torch.Tensor, rank: int) -> LowRankUpdate:
    """Best rank-`rank` approximation of a >= 2-D tensor: U = U_r S_r (m, r), V = V_r^T (r, n).

    Computed in float64 from the eigendecomposition of the smaller Gram matrix (`_top_svd`),
    factors returned in delta's dtype. Ranks above min(m, n) are clipped to it.
    """
    if delta.dim() < 2:
        raise LowRankError(f"truncated_svd needs a >= 2-D tensor, got shape {tuple(delta.shape)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise LowRankError(f"rank must be a positive integer, got {rank!r}")
    m, n = matrix_shape(delta.shape)
    dtype = delta.dtype if delta.is_floating_point() else torch.get_default_dtype()
    U, V = _top_svd(delta.reshape(m, n).to(COMPUTE_DTYPE), min(rank, m, n))
    return LowRankUpdate(U=U.to(dtype), V=V.to(dtype), shape=tuple(delta.shape))


def _top_svd(M: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_r S_r, V_r^T) of M (m, n) from the top-r eigenvectors P of A A^T, A the orientation
    of M with the fewer rows: A's best rank-r approximation is P (P^T A). Several times faster
    than a full SVD on the wide matrices a model's layers give (one p x p eigh instead of a
    p x q SVD). The Gram matrix squares the condition number: singular values below ~1e-8 of
    the largest come out as rounding noise, but P stays orthonormal, so P (P^T A) is still the
    projection onto the kept directions and the product U V loses nothing of them."""
    wide = M.shape[0] <= M.shape[1]
    A = M if wide else M.T  # (p, q), p <= q
    _, vecs = torch.linalg.eigh(A @ A.T)  # ascending eigenvalues
    P = vecs[:, -r:].flip(1)  # (p, r), largest first
    W = P.T @ A  # (r, q) = S_r V_r^T of A
    if not wide:  # M = A^T: its U_r S_r is W^T, its V_r^T is P^T
        return W.T, P.T
    S = W.norm(dim=1)  # the singular values, consistent with W
    nonzero = S > 0
    V = torch.where(nonzero[:, None], W / torch.where(nonzero, S, 1.0)[:, None], 0.0)
    return P * S, V


def compress(delta: torch.Tensor, rank: int) -> LowRankUpdate | torch.Tensor:
    """`truncated_svd(delta, rank)` when `factorizes(delta.shape, rank)`, else delta (dense)."""
    return truncated_svd(delta, rank) if factorizes(delta.shape, rank) else delta


def decompress(update: LowRankUpdate | torch.Tensor) -> torch.Tensor:
    """The dense delta a message stands for (a dense tensor is returned as it is)."""
    if isinstance(update, LowRankUpdate):
        return update.dense()
    if isinstance(update, torch.Tensor):
        return update
    raise LowRankError(f"cannot decompress a {type(update).__name__}; expected a LowRankUpdate "
                       f"or a tensor")


class ErrorFeedback:
    """Per-tensor truncation residuals kept on the client across rounds.

    compress(name, delta, rank): corrected = delta + residual[name]; send the rank-`rank`
    factors of `corrected` (or corrected dense, see `factorizes`); keep
    residual[name] = corrected - transmitted. What is not sent this round is sent later, so
    the sum of transmitted updates tracks the sum of true updates within the last residual.
    With a quantized wire (`quantization` "int8" / "nf4", `fedmrg.fl.quantize`), what is
    transmitted is the quantized factors (or tensor), so the quantization error joins the
    residual too (re-quantizing the round-tripped values on the wire is lossless). Residuals
    are float32 (float64 for float64 deltas) whatever the wire dtype.
    """

    def __init__(self) -> None:
        self.residuals: dict[str, torch.Tensor] = {}

    def compress(self, name: str, delta: torch.Tensor, rank: int,
                 quantization: str | None = None) -> LowRankUpdate | torch.Tensor:
        dtype = torch.promote_types(delta.dtype, torch.float32)
        corrected = delta.to(dtype)
        residual = self.residuals.get(name)
        if residual is not None:
            if residual.shape != delta.shape:
                raise LowRankError(f"{name}: update shape {tuple(delta.shape)} differs from the "
                                   f"stored residual's {tuple(residual.shape)}")
            corrected = corrected + residual.to(corrected.device, dtype)
        update = compress(corrected, rank)
        if quantization is not None:
            update = (LowRankUpdate(round_trip(update.U, quantization),
                                    round_trip(update.V, quantization), tuple(update.shape))
                      if isinstance(update, LowRankUpdate) else round_trip(update, quantization))
            self.residuals[name] = corrected - decompress(update).to(dtype)
        elif isinstance(update, LowRankUpdate):
            self.residuals[name] = corrected - update.dense().to(dtype)
        else:  # sent exactly: nothing left over
            self.residuals.pop(name, None)
        return update

    def compress_all(self, deltas: Mapping[str, torch.Tensor], rank: int,
                     whole: Sequence[str] = (), quantization: str | None = None,
                     ) -> dict[str, LowRankUpdate | torch.Tensor]:
        """`compress` every tensor of a dict of updates, keyed by name; names under a `whole`
        prefix go at rank 0 (no truncation, see `update_rank`; still quantized if asked)."""
        return {name: self.compress(name, delta, update_rank(name, rank, whole), quantization)
                for name, delta in deltas.items()}

    def residual_norm(self) -> float:
        """Frobenius norm of all stored residuals together (0 when nothing is pending)."""
        return math.sqrt(sum(float(r.double().pow(2).sum()) for r in self.residuals.values()))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Residuals for a client checkpoint (copies)."""
        return {n: r.detach().clone() for n, r in self.residuals.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.residuals = {n: r.detach().clone() for n, r in state.items()}
