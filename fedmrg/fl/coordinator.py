"""The coordinator: a plain class that runs federated rounds over a `ClientPool`.

Work in progress: the `ClientPool` protocol is committed first so the Ray edge can implement it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from torch import Tensor

from fedmrg.fl.messages import ClientFailure, ClientUpdate, EvalReply, RoundPlan

__all__ = ["ClientFailure", "ClientPool"]


class ClientPool(Protocol):
    """How the coordinator reaches its clients: in-process (`InProcessPool`) or Ray actors.

    A handle is opaque (a Ray ObjectRef, or an in-process record). `wait` returns
    (ready, pending) like `ray.wait`; `result` returns the reply or raises `ClientFailure`.
    `global_state` in `submit_evaluate` is the server's generic state for a generalization
    evaluation (None: the client's own model as it stands).
    """

    def centers(self) -> list[str]: ...

    def submit_fit(self, center: str, plan: RoundPlan) -> Any: ...

    def submit_evaluate(self, center: str, split: str, personalized: bool,
                        dataset_center: str | None = None,
                        global_state: dict[str, Tensor] | None = None) -> Any: ...

    def wait(self, handles: Sequence[Any], num_returns: int, timeout_s: float | None,
             ) -> tuple[list[Any], list[Any]]: ...

    def result(self, handle: Any) -> ClientUpdate | EvalReply: ...
