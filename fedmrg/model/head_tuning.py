"""A center's own copy of the diagnosis head, tuned on its own training studies.

    tuned = tune_head_locally(model.diagnosis_head, features, labels, steps=200, seed=0,
                              log_prior=label_log_prior(labels), tau=1.0)

The head behind the personalized path is the federation's (fedmrg aggregates it); the
personalized decoder is only as right as the findings that head puts in its prompt. A center
can fit a copy of the head to its own data after training, as FedRep/FedBABU-style
personalization does: the encoder stays frozen, its features of the center's train split are
computed once, and the linear head is trained on them with the training's diagnosis loss
(logit-adjusted cross-entropy, `fedmrg.model.losses`, with the center's own label prior),
starting from the federation's weights. The federation's head is not changed; the copy only
writes the personalized prompts (`eval.head_tuning_steps`, `fedmrg.fl.client`), and each center's
saved model keeps its copy (`MRGModel.own_diagnosis_head`, `fedmrg.model.io`), so `fedmrg
generate`, the MLflow model and serving write the prompts its evaluation scored.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from fedmrg.config import LossConfig
from fedmrg.model.losses import label_log_prior, logit_adjusted_diagnosis_loss


def tune_head_locally(head: nn.Module, features: Tensor, labels: Tensor, *, steps: int,
                      seed: int, lr: float = 1e-3, batch_size: int = 64,
                      log_prior: Tensor | None = None, tau: float = 1.0) -> nn.Module:
    """A copy of `head` trained `steps` AdamW steps on (`features` (N, F), `labels` (N, 14)),
    minibatches drawn with replacement from a generator seeded by `seed`; in eval mode."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if features.shape[0] != labels.shape[0] or features.shape[0] == 0:
        raise ValueError(f"features ({tuple(features.shape)}) and labels "
                         f"({tuple(labels.shape)}) must hold the same non-zero number of studies")
    tuned = copy.deepcopy(head).train()
    for p in tuned.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(tuned.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    features, labels = features.detach(), labels.long()
    n = features.shape[0]
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=generator)
        loss = logit_adjusted_diagnosis_loss(tuned(features[idx]), labels[idx], log_prior, tau)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return tuned.eval()


def tune_own_head(model: nn.Module, train_batches: Iterable[dict], losses: LossConfig,
                  steps: int, seed: int) -> nn.Module:
    """`model`'s diagnosis head tuned on a center's (unaugmented) train batches as its client
    does (`eval.head_tuning_steps`): the frozen encoder's features, the training's diagnosis
    loss settings (`model.losses`) with the center's own label prior."""
    from fedmrg.eval.evaluator import encoded_studies

    features, labels = encoded_studies(model, train_batches)
    tau = losses.diagnosis_logit_adjust_tau
    prior = label_log_prior(labels, losses.diagnosis_prior_smoothing) if tau > 0 else None
    device = next(model.diagnosis_head.parameters()).device
    return tune_head_locally(model.diagnosis_head,
                             features.to(device), labels.to(device), steps=steps, seed=seed,
                             log_prior=None if prior is None else prior.to(device), tau=tau)
