"""The downlink: bringing clients to the server's shared state with low-rank messages.

Uploads are compressed on the client (LoRA factors, low-rank updates with error feedback,
`fl.lowrank`); this is the same idea for the way down. The server keeps two states:

- S, the strategy's global state (what it aggregates into, evaluates and exports);
- B, the *synced* state: exactly what every up-to-date client holds, at a version number.

Each round, `advance(S)` moves B towards S with one `StateDelta`: LoRA factors, 1-D tensors
and small matrices are sent as they are (`replace`); every other tensor as the best rank-r
approximation of S - B (`add`, a `LowRankUpdate`), cast to the wire dtype. B is updated by
applying that same message, so B is what a client computes from it, and S - B (the part not
sent yet) is sent in later rounds: error feedback on the server, B tracks S within one
round's truncation residual. Clients train from B and send updates relative to it; the
server folds them into S.

A client keeps a copy of the last B it received (its training moves the model away from it)
and applies the next delta to that copy. A client that missed a delta (not sampled, or
restarted) gets the full B instead (`full_state`); the coordinator tracks which version each
client holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedmrg.fl.lowrank import (
    LowRankUpdate,
    decompress,
    factorizes,
    is_lora_factor,
    truncated_svd,
    update_rank,
)
from fedmrg.fl.wire import wire_dtype


class BroadcastError(ValueError):
    """A delta does not fit the state it is applied to; the message names the tensor."""


@dataclass
class StateDelta:
    """Brings a client's shared state from version `base_version` to `version`."""

    base_version: int
    version: int
    replace: dict[str, Tensor] = field(default_factory=dict)  # new values, sent as they are
    add: dict[str, LowRankUpdate | Tensor] = field(default_factory=dict)  # added to the old


def apply_delta(state: Mapping[str, Tensor], delta: StateDelta) -> dict[str, Tensor]:
    """`state` with `delta` applied (new tensors; `state` is not modified). The arithmetic is
    fixed: old + decompress(add) in the old tensor's dtype, so server and client agree."""
    out = dict(state)
    for name, value in delta.replace.items():
        out[name] = value.detach().clone()
    for name, update in delta.add.items():
        if name not in out:
            raise BroadcastError(f"delta adds to {name!r}, which the state does not hold")
        old = out[name]
        if isinstance(update, LowRankUpdate):  # multiply in the state's dtype, not the wire's
            update = LowRankUpdate(update.U.to(old.dtype), update.V.to(old.dtype), update.shape)
        change = decompress(update)
        if tuple(change.shape) != tuple(old.shape):
            raise BroadcastError(f"delta for {name!r} has shape {tuple(change.shape)}, the "
                                 f"state {tuple(old.shape)}")
        out[name] = old + change.to(old.dtype)
    return out


class StateBroadcast:
    """The synced state B and its version (module docstring). `rank` 0 sends every changed
    tensor as it is (no compression)."""

    def __init__(self, initial: Mapping[str, Tensor], rank: int, wire: str = "fp32",
                 whole: Sequence[str] = ()):
        self.rank = rank
        self.whole = tuple(whole)  # name prefixes sent whole (`lowrank.update_rank`)
        self.dtype = wire_dtype(wire)
        self.synced = {n: t.detach().clone() for n, t in initial.items()}
        self.version = 0
        self.last_delta: StateDelta | None = None

    def _travels_low_rank(self, name: str, old: Tensor | None, new: Tensor) -> bool:
        return (old is not None and tuple(old.shape) == tuple(new.shape)
                and new.is_floating_point() and not is_lora_factor(name)
                and factorizes(tuple(new.shape), update_rank(name, self.rank, self.whole)))

    def advance(self, target: Mapping[str, Tensor]) -> StateDelta:
        """The next delta towards `target` (S); B and the version move with it."""
        replace: dict[str, Tensor] = {}
        add: dict[str, LowRankUpdate | Tensor] = {}
        for name, new in target.items():
            old = self.synced.get(name)
            if self._travels_low_rank(name, old, new):
                diff = new.double() - old.double()
                if bool(diff.any()):
                    u = truncated_svd(diff, self.rank)
                    add[name] = LowRankUpdate(u.U.to(self.dtype), u.V.to(self.dtype), u.shape)
            elif old is None or not torch.equal(old, new):
                replace[name] = new.to(self.dtype) if new.is_floating_point() else new
        delta = StateDelta(self.version, self.version + 1, replace, add)
        self.synced = apply_delta(self.synced, delta)
        for name, value in replace.items():  # B holds the tensor's own dtype, as clients do
            old = target[name]
            self.synced[name] = value.to(old.dtype)
        self.version += 1
        self.last_delta = delta
        return delta

    def full_state(self) -> dict[str, Tensor]:
        """B as it is: what a client that missed a delta loads."""
        return self.synced

    def message_for(self, client_version: int | None) -> StateDelta | None:
        """The delta for a client at `client_version` (an empty one when it is up to date: a
        retried round restarts it from the synced state), or None: it needs `full_state()`."""
        if client_version is not None and client_version == self.version:
            return StateDelta(self.version, self.version)
        delta = self.last_delta
        if delta is not None and client_version == delta.base_version:
            return delta
        return None

    def state_dict(self) -> dict:
        """B and its version, for the coordinator's checkpoint (tensors and ints only). The
        last delta is left out: clients rebuilt on resume get the full state anyway."""
        return {"synced": self.synced, "version": self.version}

    def load_state_dict(self, state: Mapping) -> None:
        self.synced = {n: t.detach().clone() for n, t in state["synced"].items()}
        self.version = int(state["version"])
        self.last_delta = None
