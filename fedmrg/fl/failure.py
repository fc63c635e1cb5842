"""What the coordinator does when a client call fails: one pure policy for rounds and
evaluations (no Ray, no I/O).

A failure has a kind (`FailureKind`), decided where it happens, never by reading error text:

- `crash`: the client raised (not a data error). The pool gets it as a structured
  `ClientFault` reply, so the coordinator never parses Ray's traceback text.
- `lost`: the client's actor died or became unreachable (Ray restarts it).
- `deadline`: no reply within the phase's deadline (`federation.round_deadline_s`,
  `federation.eval_deadline_s`).
- `invalid` / `norm`: a reply failed its schema check or the update-norm bound.
- `data`: the client's data is bad (`DatasetError`); the same data fails again, so it is
  never retried and never silently dropped.

The policy answers with an action (`FailureAction`) per phase:

    kind      fit (a round's attempt)   evaluate (test split)      validate (a val point)
    crash     drop                      retry, then raise          retry, then drop
    lost      drop                      retry, then raise          retry, then drop
    deadline  drop                      raise                      drop
    invalid   drop                      drop (recorded)            drop (recorded)
    norm      drop                      -                          -
    data      raise                     raise                      drop

An invalid evaluation reply (`validate_eval_reply`) is left out of that evaluation and
recorded in it (`Evaluation.rejected`), at a test evaluation and a validation point alike.
`drop` in a round leaves the client out of the attempt: the round closes with the others
when at least `min_clients` remain, else it is tried again with a fresh sample
(`retry_round`, up to `retries` times) and then fails. Any other `drop` at a validation
point skips the whole point (a monitoring curve over a changing set of centers would
mislead); the run goes on. A deadline is never retried: an actor runs one call at a time,
so a new call would queue behind the one that hangs. "retry, then X" asks the same client
again while it has been tried at most `retries` times.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fedmrg.choices import Choice
from fedmrg.data.shards import DatasetError


class FailureKind(Choice):
    CRASH = "crash"
    LOST = "lost"
    DEADLINE = "deadline"
    INVALID = "invalid"
    NORM = "norm"
    DATA = "data"


class FailureAction(Choice):
    RETRY = "retry"
    DROP = "drop"
    RAISE = "raise"


class Phase(Choice):
    FIT = "fit"
    EVALUATE = "evaluate"
    VALIDATE = "validate"


# a failure a second call to the same client may not repeat
TRANSIENT = frozenset({FailureKind.CRASH, FailureKind.LOST})


def rejection_kind(kind: FailureKind) -> str:
    """The round metric a rejected client is counted under ("rejected_<kind>"): a crash and
    a lost actor are both "failed" (the names logged since the first release)."""
    return "failed" if kind in TRANSIENT else str(kind)


@dataclass(frozen=True)
class FailurePolicy:
    """The table in the module docstring. `retries`: `federation.round_retries`."""

    retries: int = 2

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"FailurePolicy.retries must be >= 0, got {self.retries}")

    def decide(self, phase: Phase, kind: FailureKind, tries: int = 1) -> FailureAction:
        """The action for a call that failed with `kind` after being made `tries` times."""
        phase, kind = Phase(phase), FailureKind(kind)
        if phase is Phase.FIT:
            return FailureAction.RAISE if kind is FailureKind.DATA else FailureAction.DROP
        if kind is FailureKind.NORM:
            raise ValueError("an evaluation has no update norm to bound")
        if kind is FailureKind.INVALID:
            return FailureAction.DROP
        give_up = FailureAction.RAISE if phase is Phase.EVALUATE else FailureAction.DROP
        if kind in TRANSIENT and tries <= self.retries:
            return FailureAction.RETRY
        return give_up

    def retry_round(self, attempts: int) -> bool:
        """Whether a round that had too few usable updates in `attempts` attempts is tried
        again (with a fresh sample from the same seeded stream)."""
        return attempts <= self.retries


# --------------------------------------------------------------------------- the errors


class ClientFailure(RuntimeError):
    """A client call failed, and the run may go on without it (`kind`: crash, lost or
    deadline); names the center."""

    def __init__(self, center: str, message: str, kind: FailureKind = FailureKind.CRASH):
        super().__init__(f"client {center!r}: {message}")
        self.center = center
        self.message = message
        self.kind = FailureKind(kind)

    def __reduce__(self):  # picklable across Ray
        return (type(self), (self.center, self.message, self.kind))


class ClientDataError(DatasetError):
    """Bad data at one or more clients: a `DatasetError` raised in a client (a corrupt image or
    an empty report under `data.on_error=raise`, a shard file gone, a split with no usable
    row). Not transient: the same data fails again on a retry or after a restart, so the run
    stops with this one error, which keeps each client's own message (center, file, study).
    `errors`: {center: message}."""

    def __init__(self, errors: Mapping[str, str], context: str = ""):
        self.errors = dict(sorted(errors.items()))
        self.context = context
        parts = [f"client {c!r}: {m}" for c, m in self.errors.items()]
        head = f"{context}: " if context else ""
        super().__init__(head + ("bad data at " if len(parts) == 1 else
                                 f"bad data at {len(parts)} clients: ") + " | ".join(parts))

    @property
    def centers(self) -> list[str]:
        return list(self.errors)

    def __reduce__(self):  # picklable across Ray (the coordinator may run in an actor)
        return (type(self), (self.errors, self.context))


@dataclass(frozen=True)
class ClientFault:
    """A client's own failure, as a reply instead of an exception: the client knows whether
    its data was bad (`data`) or it crashed (`crash`), so the coordinator never has to guess
    from Ray's traceback text. `error`: the exception's type name; `message`: its text."""

    center: str
    kind: FailureKind
    error: str
    message: str

    @classmethod
    def from_exception(cls, center: str, e: BaseException) -> ClientFault:
        kind = FailureKind.DATA if isinstance(e, DatasetError) else FailureKind.CRASH
        return cls(center, kind, type(e).__name__, str(e))

    def as_error(self, head: str = "") -> ClientFailure | ClientDataError:
        """The exception the pool raises for this reply; `head` (e.g. "fit failed: ") starts
        its message."""
        if self.kind is FailureKind.DATA:
            return ClientDataError({self.center: head + self.message})
        return ClientFailure(self.center, f"{head}{self.error}: {self.message}", self.kind)
