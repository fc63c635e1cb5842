"""Small trainable heads on the (B, F) study features.

- `Projector`: features -> visual tokens in the LM's embedding space (B, N_v, D).
- `DiagnosisHead`: features -> (B, 14, 4) logits over the label states of each observation.
- `ProjectionHead`: features -> (B, P) embedding for the contrastive losses (global and local).
"""

from __future__ import annotations

import torch
from torch import nn

from fedmrg.data.schema import NUM_OBSERVATIONS, NUM_STATES


class Projector(nn.Module):
    """Linear + GELU + Linear, reshaped to `visual_tokens` tokens of width `lm_hidden`.

    The hidden width is the LM's, a bottleneck: parameters grow as F*D + D*N_v*D, not
    F*N_v*D, which also keeps the dense update low-rank-friendly for the federation.
    """

    def __init__(self, num_features: int, visual_tokens: int, lm_hidden: int):
        super().__init__()
        self.visual_tokens, self.lm_hidden = visual_tokens, lm_hidden
        self.net = nn.Sequential(
            nn.Linear(num_features, lm_hidden), nn.GELU(),
            nn.Linear(lm_hidden, visual_tokens * lm_hidden),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).view(-1, self.visual_tokens, self.lm_hidden)  # (B, N_v, D)


class DiagnosisHead(nn.Module):
    """One linear classifier: 4 state logits for each of the 14 observations."""

    def __init__(self, num_features: int):
        super().__init__()
        self.linear = nn.Linear(num_features, NUM_OBSERVATIONS * NUM_STATES)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features).view(-1, NUM_OBSERVATIONS, NUM_STATES)  # (B, 14, 4)


class ProjectionHead(nn.Module):
    """SimCLR-style MLP to the contrastive space (losses normalize the output)."""

    def __init__(self, num_features: int, projection_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(num_features, num_features), nn.GELU(),
            nn.Linear(num_features, projection_dim),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)  # (B, P)
