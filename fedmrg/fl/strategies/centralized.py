"""`centralized`: fedavg over ONE client that holds the pooled data of every center (the
experiment builds that client, `pools_data`); aggregation of one update is that update, so
this is plain training on pooled data."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedmrg.fl.strategies.base import FederationError
from fedmrg.fl.strategies.fedavg import FedAvg


class Centralized(FedAvg):
    """FedAvg over one client that holds the pooled data of every center."""

    name = "centralized"
    summary = "one client trained on the pooled data of every center (upper baseline)"
    order = 0
    pools_data = True

    def configure_round(self, round_id: int, centers: Sequence[str],
                        rng: np.random.Generator) -> list[str]:
        if len(centers) != 1:
            raise FederationError(f"centralized trains one client over the pooled data; the "
                                  f"pool has {len(centers)}: {sorted(centers)}")
        return list(centers)
