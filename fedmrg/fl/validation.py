"""What the coordinator checks in a client's reply before using it (pure, no Ray).

    reason = validate_update(reply, center=c, round_id=r, spec=strategy.update_spec(),
                             dtype=torch.float32)          # None, or why it is unusable
    check = bound_update_norm(update, global_state, max_norm, "reject" | "clip")
    reason = validate_eval_reply(reply, center=dataset, view=view, run=cfg.eval)

1. `validate_update`: the reply's form against the payload schema its strategy publishes
   (`UpdateSpec`, `Strategy.update_spec`). A `ClientUpdate` of this round from this center, a
   positive sample count, exactly the expected tensor names, shapes (a LoRA factor may differ in
   rank only; a low-rank update must stand for the tensor's shape), floating tensors in the wire
   dtype, finite values; only statistics the spec names, each in its model-level shape (e.g.
   fedmrg's prototypes (14, P), never rows of samples), counts non-negative; metrics a mapping
   of names to numbers (no text).
2. `update_norm`: its size. The update norm is the L2 norm, over every shared tensor at once,
   of the change the update applies to the server's shared state:
   - a LoRA factor X (the client sends its factors as trained): X - G, G the round's global
     factor of that name. Factors of different ranks are compared zero-padded to the larger
     rank (rows of A, columns of B); padding adds nothing to B @ A, so it changes no adapter.
     This bounds the adapter's change too: B'A' - BA = dB A + B dA + dB dA.
   - a dense shared tensor (the client sends trained - global): that delta; a `LowRankUpdate`
     U V counts as ||U V||_F, computed from the r x r Gram matrices (U^T U, V V^T) without
     forming U V.
   So sqrt(sum over LoRA factors ||X - G||^2 + sum over dense tensors ||delta||^2). Scaling the
   change by s scales the norm by exactly s: a client that sends 1000x its honest update has
   1000x the honest norm, whatever the tensors (factors, low-rank or dense deltas, BatchNorm
   statistics: all of them count). The named statistics and metrics an update also carries
   are not model updates and are not in the norm.
3. `bound_update_norm`: with `federation.max_update_norm` > 0, an update whose norm exceeds the
   bound is rejected (`update_norm_action=reject`) or scaled down to the bound (`clip`:
   `scale_update` by max_norm / norm, the DP-FedAvg clipping rule) and accepted. A non-finite
   norm is always rejected.

The norm is computed in float64 on the update as received (after `from_wire`), against the
server's float32 global state; with a bf16 wire dtype it includes the bf16 rounding of the
factors the client loaded (about 2^-8 relative, far below any useful bound).

4. `validate_eval_reply`: an evaluation reply (`EvalReply`, the one message that may carry
   text) before its metrics and samples are used or logged. Exactly an `EvalReply` with no
   extra attribute, of the dataset and view asked for; a `DisclosurePolicy`; metrics a
   mapping of names (at most `MAX_METRIC_NAME` characters, at most `MAX_METRICS` of them) to
   numbers that are finite or NaN (an undefined metric, e.g. the F1 of an observation absent
   from the center; the tracker skips it); samples a list of at most `effective_disclosure`'s
   count, each a mapping of allowed field names to strings of at most `MAX_SAMPLE_CHARS`; the
   reference fields (study id, reference report, true findings) only when the run asked for
   them AND the dataset center's policy allows them; per-study scores only when the run asked
   (`eval.per_study`) and the policy allows references, exactly "ce_labels" (a pair of 14
   label codes per study) and "bleu" (`BLEU_STATISTICS` counts >= 0 per study), one item per
   evaluated study (`metrics["num_studies"]`). The reason names the field, never its
   content (a refused reference must not reach the logs either).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedmrg.choices import NormAction, choice_values
from fedmrg.config import EvalConfig
from fedmrg.data.schema import NUM_OBSERVATIONS, NUM_STATES
from fedmrg.eval.nlg import BLEU_STATISTICS
from fedmrg.fl.lowrank import LowRankUpdate
from fedmrg.fl.messages import ClientUpdate, EvalReply, UpdateSpec
from fedmrg.fl.quantize import QuantizedTensor, quantized_problem
from fedmrg.fl.strategies import FederationError
from fedmrg.privacy.disclosure import (
    GENERATED_FIELDS,
    REFERENCE_FIELDS,
    DisclosureError,
    DisclosurePolicy,
    effective_disclosure,
)

__all__ = ["NormCheck", "bound_update_norm", "scale_update", "update_norm",
           "validate_eval_reply", "validate_update"]

MAX_METRICS = 512  # an evaluation reports ~60 (NLG, CE per observation, diagnosis, skips)
MAX_METRIC_NAME = 64  # the longest is ~40 ("ce_f1/enlarged cardiomediastinum")
MAX_SAMPLE_CHARS = 8192  # one sample text; a 160-token report is ~1000 characters

_F64 = torch.float64


# --------------------------------------------------------------------------- form


def _finite(t: Tensor | QuantizedTensor) -> bool:
    if isinstance(t, QuantizedTensor):  # (its scales are checked by `quantized_problem`)
        return True
    return not t.is_floating_point() or bool(torch.isfinite(t).all())


def _shape(t: Any) -> Any:
    return (tuple(t.shape) if isinstance(t, (Tensor, QuantizedTensor))
            else type(t).__name__)


def _dtype_problem(what: str, tensors: tuple[Tensor | QuantizedTensor, ...],
                   dtype: torch.dtype | None, quantization: str | None = None) -> str | None:
    for t in tensors:
        if quantization is not None or isinstance(t, QuantizedTensor):
            if not isinstance(t, QuantizedTensor):
                return f"{what} is a {t.dtype} tensor, expected {quantization}-quantized"
            if quantization is None:
                return f"{what} is {t.scheme}-quantized, expected the wire dtype {dtype}"
            problem = quantized_problem(t, quantization)
            if problem:
                return f"{what}: {problem}"
            continue
        if not t.is_floating_point():
            return f"{what} has dtype {t.dtype}, not a floating dtype"
        if dtype is not None and t.dtype != dtype:
            return f"{what} has dtype {t.dtype}, expected the wire dtype {dtype}"
    return None


def lora_rank_dim(name: str) -> int:
    """The rank dimension of a LoRA factor: rows of A (r, k, ...), columns of B (d, r, ...)."""
    return 0 if ".lora_A." in name else 1


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float, np.integer,
                                                               np.floating))


def validate_update(update: Any, *, center: str, round_id: int, spec: UpdateSpec,
                    dtype: torch.dtype | None = None, quantization: str | None = None,
                    ) -> str | None:
    """Why `update` must not be aggregated, or None (module docstring, 1). `spec`: the
    strategy's payload schema for the round; `dtype`: the wire dtype every floating model
    tensor must have (None: any floating dtype); `quantization` ("int8", "nf4",
    `fedmrg.fl.wire.wire_quantization`): every model tensor must instead be a well-formed
    `QuantizedTensor` of that scheme (codes, finite scales, shape)."""
    lora_spec, dense_spec = spec.lora, spec.dense
    if not isinstance(update, ClientUpdate):
        return f"not a ClientUpdate but a {type(update).__name__}"
    if update.round_id != round_id:
        return f"reply for round {update.round_id}, not round {round_id} (late or duplicate)"
    if update.center != center:
        return f"reply names center {update.center!r}, sent to {center!r}"
    n = update.num_samples
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
        return f"num_samples {n!r} is not a positive integer"
    for kind, got, names in (("LoRA factor", update.lora, lora_spec),
                             ("dense update", update.dense, dense_spec)):
        if not isinstance(got, Mapping):
            return f"{kind}s are a {type(got).__name__}, not a mapping of names to tensors"
        missing, extra = sorted(set(names) - set(got)), sorted(set(got) - set(names))
        if extra:
            return f"unexpected {kind} {extra[0]!r} ({len(extra)} unexpected)"
        if missing:
            return f"missing {kind} {missing[0]!r} ({len(missing)} missing)"
    for name, t in update.lora.items():
        want = lora_spec[name]
        rank_dim = lora_rank_dim(name)
        if (not isinstance(t, (Tensor, QuantizedTensor)) or t.dim() != len(want)
                or any(a != b for i, (a, b) in enumerate(zip(t.shape, want, strict=True))
                       if i != rank_dim)):
            return f"LoRA factor {name!r} has shape {_shape(t)}, expected {want} (any rank)"
        problem = _dtype_problem(f"LoRA factor {name!r}", (t,), dtype, quantization)
        if problem:
            return problem
        if not _finite(t):
            return f"LoRA factor {name!r} has non-finite values"
    for name, u in update.dense.items():
        want = dense_spec[name]
        if isinstance(u, LowRankUpdate):
            ok = (isinstance(u.U, (Tensor, QuantizedTensor))
                  and isinstance(u.V, (Tensor, QuantizedTensor))
                  and tuple(u.shape) == want and u.U.dim() == 2 and u.V.dim() == 2
                  and u.U.shape[1] == u.V.shape[0] and u.U.shape[0] == want[0]
                  and u.V.shape[1] == math.prod(want[1:]))
            tensors = (u.U, u.V) if ok else ()
        else:
            ok = isinstance(u, (Tensor, QuantizedTensor)) and tuple(u.shape) == want
            tensors = (u,) if ok else ()
        if not ok:
            return f"dense update {name!r} does not fit the tensor's shape {want}"
        problem = _dtype_problem(f"dense update {name!r}", tensors, dtype, quantization)
        if problem:
            return problem
        if not all(_finite(t) for t in tensors):
            return f"dense update {name!r} has non-finite values"
    statistics = update.statistics
    if not isinstance(statistics, Mapping):
        return (f"statistics are a {type(statistics).__name__}, not a mapping of names to "
                f"tensors")
    extra = sorted(set(statistics) - set(spec.statistics), key=str)
    if extra:
        return f"unexpected statistic {extra[0]!r} ({len(extra)} unexpected)"
    for name, t in statistics.items():
        want = spec.statistics[name]
        if not isinstance(t, Tensor) or not _finite(t):
            return f"{name} is not a finite tensor"
        if tuple(t.shape) != tuple(want.shape):
            return f"{name} has shape {tuple(t.shape)}, expected {tuple(want.shape)}"
        if want.counts and bool((t < 0).any()):
            return f"{name} has negative counts"
    metrics = update.metrics
    if not isinstance(metrics, Mapping) or not all(
            isinstance(k, str) and _is_number(v) for k, v in metrics.items()):
        return "metrics are not a mapping of names to numbers"
    return None


# --------------------------------------------------------------------------- size


def _padded(t: Tensor, rank_dim: int, rank: int) -> Tensor:
    """`t` in float64, zero-padded along `rank_dim` to `rank`."""
    t = t.detach().to(_F64)
    missing = rank - t.shape[rank_dim]
    if missing <= 0:
        return t
    pad_shape = list(t.shape)
    pad_shape[rank_dim] = missing
    return torch.cat([t, t.new_zeros(pad_shape)], dim=rank_dim)


def _lora_change(name: str, factor: Tensor, reference: Mapping[str, Tensor],
                 center: str) -> tuple[Tensor, Tensor]:
    """(X - G, G), both float64 and zero-padded to the larger rank (module docstring, 2)."""
    if name not in reference:
        raise FederationError(f"center {center!r}: LoRA factor {name!r} is not in the global "
                              f"state the update is measured against")
    ref = reference[name]
    rank_dim = lora_rank_dim(name)
    rank = max(factor.shape[rank_dim], ref.shape[rank_dim])
    base = _padded(ref.to(factor.device), rank_dim, rank)
    return _padded(factor, rank_dim, rank) - base, base


def _squared_norm(u: LowRankUpdate | Tensor) -> float:
    if isinstance(u, LowRankUpdate):
        U, V = u.U.detach().to(_F64), u.V.detach().to(_F64)
        # ||U V||_F^2 = trace(V^T U^T U V) = sum((U^T U) * (V V^T)): r x r, never U V itself
        return max(0.0, float(((U.T @ U) * (V @ V.T)).sum()))
    return float(u.detach().to(_F64).pow(2).sum())


def update_norm(update: ClientUpdate, reference: Mapping[str, Tensor] | None) -> float:
    """The update norm of `update` against the round's global state `reference` (module
    docstring, 2). An update without tensors (strategy `local`) has norm 0."""
    if not update.lora and not update.dense:
        return 0.0
    if reference is None:
        raise FederationError(f"center {update.center!r}: an update with tensors but no global "
                              f"state to measure it against")
    total = 0.0
    for name, factor in update.lora.items():
        change, _ = _lora_change(name, factor, reference, update.center)
        total += float(change.pow(2).sum())
    for u in update.dense.values():
        total += _squared_norm(u)
    return math.sqrt(total)


def scale_update(update: ClientUpdate, reference: Mapping[str, Tensor], factor: float,
                 ) -> ClientUpdate:
    """A copy of `update` whose change to `reference` is `factor` times as large: LoRA factors
    G + factor * (X - G) (at the larger of the two ranks), dense deltas and the U factor of a
    low-rank delta times `factor`. Its `update_norm` is `factor` times the original's. Tensors
    keep their dtype."""
    lora = {}
    for name, x in update.lora.items():
        change, base = _lora_change(name, x, reference, update.center)
        lora[name] = (base + factor * change).to(x.dtype)
    dense: dict[str, LowRankUpdate | Tensor] = {}
    for name, u in update.dense.items():
        if isinstance(u, LowRankUpdate):
            dense[name] = LowRankUpdate((u.U.to(_F64) * factor).to(u.U.dtype), u.V,
                                        tuple(u.shape))
        else:
            dense[name] = (u.to(_F64) * factor).to(u.dtype)
    return dataclasses.replace(update, lora=lora, dense=dense)


@dataclass
class NormCheck:
    """The outcome of `bound_update_norm`."""

    norm: float  # the update norm as received
    update: ClientUpdate | None  # what to aggregate: the update, its clipped copy, or None
    clipped: bool = False
    reason: str | None = None  # why it was rejected (update is None)


def bound_update_norm(update: ClientUpdate, reference: Mapping[str, Tensor] | None,
                      max_norm: float, action: str) -> NormCheck:
    """Apply the norm bound (module docstring, 3); `max_norm` <= 0 means no bound."""
    if action not in choice_values(NormAction):
        raise FederationError(f"federation.update_norm_action: {action!r} is not one of "
                              f"{choice_values(NormAction)}")
    norm = update_norm(update, reference)
    if not math.isfinite(norm):
        return NormCheck(norm, None, reason=f"update norm is {norm} (overflow)")
    if max_norm <= 0 or norm <= max_norm:
        return NormCheck(norm, update)
    if action == NormAction.REJECT:
        return NormCheck(norm, None, reason=f"update norm {norm:.6g} exceeds "
                                            f"federation.max_update_norm={max_norm:g}")
    return NormCheck(norm, scale_update(update, reference, max_norm / norm), clipped=True)


# --------------------------------------------------------------------------- evaluation


def validate_eval_reply(reply: Any, *, center: str, view: str, run: EvalConfig) -> str | None:
    """Why the evaluation reply `reply` must not be used, or None (module docstring, 4).
    `center`: the dataset evaluated; `view`: the view asked for; `run`: the run's `eval`
    section (what it asked the clients to send)."""
    if type(reply) is not EvalReply:
        return f"not an EvalReply but a {type(reply).__name__}"
    extra = sorted(set(vars(reply)) - {f.name for f in dataclasses.fields(EvalReply)})
    if extra:
        return f"unexpected field {extra[0]!r} ({len(extra)} unexpected)"
    if reply.center != center:
        return f"center: the reply names {_brief(reply.center)}, the evaluation was of {center!r}"
    if reply.view != view:
        return f"view: the reply names {_brief(reply.view)}, the evaluation was {view!r}"
    metrics = reply.metrics
    if not isinstance(metrics, Mapping):
        return f"metrics: a {type(metrics).__name__}, not a mapping of names to numbers"
    if len(metrics) > MAX_METRICS:
        return f"metrics: {len(metrics)} of them, more than {MAX_METRICS}"
    for name, value in metrics.items():
        if not isinstance(name, str) or not 0 < len(name) <= MAX_METRIC_NAME:
            return (f"metrics: a name that is not a string of 1 to {MAX_METRIC_NAME} "
                    f"characters ({type(name).__name__} of length {_length(name)})")
        if not _is_number(value):
            return f"metrics[{name!r}]: a {type(value).__name__}, not a number"
        if math.isinf(float(value)):
            return f"metrics[{name!r}]: {float(value)} is not finite"
    policy = reply.disclosure
    if type(policy) is not DisclosurePolicy:
        return f"disclosure: a {type(policy).__name__}, not a DisclosurePolicy"
    try:
        DisclosurePolicy(policy.share_references, policy.max_samples)  # revalidate the values
    except DisclosureError as e:
        return f"disclosure: {e}"
    allowed = effective_disclosure(run, policy)
    samples = reply.samples
    if not isinstance(samples, list):
        return f"samples: a {type(samples).__name__}, not a list"
    if len(samples) > allowed.samples:
        return (f"samples: {len(samples)} sample(s), more than the {allowed.samples} allowed "
                f"(eval.samples={run.samples}, the center's max_samples="
                f"{policy.max_samples})")
    fields_allowed = set(GENERATED_FIELDS)
    if allowed.share_references:
        fields_allowed |= set(REFERENCE_FIELDS)
    for i, sample in enumerate(samples):
        if not isinstance(sample, Mapping):
            return f"samples[{i}]: a {type(sample).__name__}, not a mapping"
        for key, value in sample.items():
            if key in REFERENCE_FIELDS and not allowed.share_references:
                why = ("the run did not ask for references (eval.share_references=false)"
                       if not run.share_references else
                       "the center's disclosure policy refuses references")
                return f"samples[{i}][{key!r}]: not allowed, {why}"
            if key not in fields_allowed:
                return (f"samples[{i}]: unexpected field ({type(key).__name__} of length "
                        f"{_length(key)}); allowed: {sorted(fields_allowed)}")
            if not isinstance(value, str):
                return f"samples[{i}][{key!r}]: a {type(value).__name__}, not a string"
            if len(value) > MAX_SAMPLE_CHARS:
                return (f"samples[{i}][{key!r}]: {len(value)} characters, more than "
                        f"{MAX_SAMPLE_CHARS}")
    return per_study_problem(reply.per_study, allowed.per_study, run,
                             metrics.get("num_studies"))


PER_STUDY_KEYS = ("ce_labels", "bleu")


def per_study_problem(per_study: Any, allowed: bool, run: EvalConfig, num_studies: Any
                      ) -> str | None:
    """Why an EvalReply's `per_study` must not be used (module docstring, 4), or None."""
    if not isinstance(per_study, Mapping):
        return f"per_study: a {type(per_study).__name__}, not a mapping"
    if not per_study:
        return None
    if not allowed:
        why = ("the run did not ask for them (eval.per_study=false)" if not run.per_study
               else "the center's disclosure policy refuses references")
        return f"per_study: not allowed, {why}"
    if sorted(per_study, key=str) != sorted(PER_STUDY_KEYS):
        return f"per_study: keys must be exactly {list(PER_STUDY_KEYS)}"
    n = int(num_studies) if _is_number(num_studies) and math.isfinite(num_studies) else None
    shapes = {"ce_labels": (2, NUM_OBSERVATIONS), "bleu": (BLEU_STATISTICS,)}
    low = {"ce_labels": 0, "bleu": 0}
    high = {"ce_labels": NUM_STATES - 1, "bleu": None}  # label codes 0..3 (schema)
    for key in PER_STUDY_KEYS:
        items = per_study[key]
        if not isinstance(items, list) or len(items) != n:
            return (f"per_study[{key!r}]: {_length_of_list(items)} item(s), expected one per "
                    f"evaluated study ({num_studies})")
        try:
            array = np.asarray(items)
        except (TypeError, ValueError):
            return f"per_study[{key!r}]: not a rectangular array of integers"
        if array.shape != (n, *shapes[key]) or array.dtype.kind not in "iu":
            return (f"per_study[{key!r}]: shape {array.shape} of {array.dtype}, expected "
                    f"{(n, *shapes[key])} integers")
        if n and (array.min() < low[key] or (high[key] is not None
                                              and array.max() > high[key])):
            return (f"per_study[{key!r}]: a value outside [{low[key]}, "
                    f"{'inf' if high[key] is None else high[key]}]")
    return None


def _length_of_list(value: Any) -> Any:
    return len(value) if isinstance(value, list) else type(value).__name__


def _brief(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _length(value: Any) -> Any:
    return len(value) if isinstance(value, (str, bytes)) else "-"
