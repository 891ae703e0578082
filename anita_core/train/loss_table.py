"""Preference losses as values, by name: the DPO objective takes one of these
records, so a new loss (anita_core.train.preference_losses) is one table entry.

A record's ``loss(policy, reference, beta)`` is the mean loss over pairs,
differentiable in policy.chosen / policy.rejected; ``metrics(policy, reference,
beta)`` the 0-dim metric tensors under TRL's names. A reference-free loss sets
``needs_reference=False`` and gets ``reference=None``: the objective then runs
no reference pass and precomputes nothing."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, Optional

import torch

from anita_core.train.losses import DPO_LOSS_TYPES, PreferenceLogps, dpo_loss, dpo_metrics

LossFn = Callable[[PreferenceLogps, Optional[PreferenceLogps], float], torch.Tensor]
MetricsFn = Callable[[PreferenceLogps, Optional[PreferenceLogps], float], Dict[str, torch.Tensor]]


@dataclass(frozen=True)
class PreferenceLoss:
    loss: LossFn
    metrics: MetricsFn = dpo_metrics
    needs_reference: bool = True


# today's DPO family (sigmoid, hinge, ipo), in --loss-type's order
PREFERENCE_LOSSES: Dict[str, PreferenceLoss] = {
    name: PreferenceLoss(partial(dpo_loss, loss_type=name)) for name in DPO_LOSS_TYPES}


def preference_loss(name: str) -> PreferenceLoss:
    """The table's record for ``name``; a ValueError naming the choices otherwise."""
    if name not in PREFERENCE_LOSSES:
        raise ValueError(f"loss_type {name!r}: expected one of {', '.join(PREFERENCE_LOSSES)}")
    return PREFERENCE_LOSSES[name]
