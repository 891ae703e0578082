"""Preference losses on per-sequence log-probabilities (DPO and variants).

With pi_c, pi_r the policy's summed completion log-probs of the chosen and the
rejected answer, and ref_c, ref_r the reference model's, TRL's definitions:

    delta   = (pi_c - ref_c) - (pi_r - ref_r)
    sigmoid = -log sigmoid(beta * delta)                  (DPO, Rafailov et al. 2023)
    hinge   = relu(1 - beta * delta)                      (SLiC)
    ipo     = ((pi_c - ref_c)/n_c - (pi_r - ref_r)/n_r - 1/(2 beta))^2   (IPO; n = completion tokens)

each averaged over pairs. The SFT loss is the fused cross-entropy inside the
model (QLoRALlama.train_step), not here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo")


@dataclass
class PreferenceLogps:
    """Summed completion log-probs [pairs] and completion token counts [pairs]."""
    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


def dpo_loss(policy: PreferenceLogps, reference: PreferenceLogps, beta: float,
             loss_type: str = "sigmoid") -> torch.Tensor:
    """Mean preference loss over pairs; differentiable in policy.chosen / policy.rejected."""
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r}: expected one of {', '.join(DPO_LOSS_TYPES)}")
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    chosen_ratio = policy.chosen - reference.chosen
    rejected_ratio = policy.rejected - reference.rejected
    if loss_type == "sigmoid":
        per_pair = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    elif loss_type == "hinge":
        per_pair = torch.relu(1 - beta * (chosen_ratio - rejected_ratio))
    else:
        n_c = policy.chosen_tokens.to(chosen_ratio.dtype).clamp(min=1.0)
        n_r = policy.rejected_tokens.to(rejected_ratio.dtype).clamp(min=1.0)
        per_pair = (chosen_ratio / n_c - rejected_ratio / n_r - 1 / (2 * beta)) ** 2
    return per_pair.mean()


@torch.no_grad()
def dpo_metrics(policy: PreferenceLogps, reference: PreferenceLogps,
                beta: float) -> Dict[str, torch.Tensor]:
    """The metrics TRL logs, under TRL's names: 0-dim tensors on the log-probs'
    device (read back by the caller, all at once: anita_core.train.host_reads)."""
    chosen_rewards = beta * (policy.chosen - reference.chosen)
    rejected_rewards = beta * (policy.rejected - reference.rejected)
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": policy.chosen.mean(),
        "logps/rejected": policy.rejected.mean(),
    }
