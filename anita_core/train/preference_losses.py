"""The preference losses, one function each, on per-sequence log-probs.

Every loss here is a differentiable function of per-pair summed completion
log-probs and completion token counts (``PreferenceLogps``), the policy's and,
for the losses that have one, the reference model's: the model's backward only
needs d(loss)/d(per-pair sums). Definitions and metric names follow TRL 1.16
(DPOTrainer, experimental ORPOTrainer and CPOTrainer); docs/preference-losses.md
gives the formulas and when to use which.

With pi_c, pi_r the policy's summed log-probs of the chosen and rejected answer,
ref_c, ref_r the reference's, n_c, n_r their completion token counts:

    sigmoid     -log s(beta * delta),  delta = (pi_c - ref_c) - (pi_r - ref_r)   (DPO)
    hinge       relu(1 - beta * delta)                                          (SLiC)
    ipo         ((pi_c-ref_c)/n_c - (pi_r-ref_r)/n_r - 1/(2 beta))^2            (IPO)
    robust      ((1-e) * -log s(beta*delta) - e * -log s(-beta*delta)) / (1-2e)  (rDPO)
    apo_zero    1 - s(beta*(pi_c-ref_c)) + s(beta*(pi_r-ref_r))                 (APO-zero)
    sigmoid_sft w_dpo * sigmoid + w_sft * NLL(chosen completions, per token over the batch)
    simpo       -log s(beta*(pi_c/n_c - pi_r/n_r) - gamma)   [+ cpo_alpha * NLL]   (SimPO)
    orpo        NLL(chosen, per token over the batch) - beta * log s(log odds(pi_c/n_c) - log odds(pi_r/n_r))

(s = sigmoid, log odds(p) = p - log(1 - exp(p)) for a log-prob p), each per-pair
term averaged over the pairs of the batch.

ORPO's NLL covers the tokens the caller chose: TRL's ORPOTrainer scores the
chosen answer's whole sequence, prompt included (every attended token after the
first), so the policy's log-probs for ORPO come as ``SequenceLogps``, which adds
those sums and counts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from anita_core.train.losses import PreferenceLogps, dpo_loss, dpo_metrics

Metrics = Dict[str, torch.Tensor]

DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected")


@dataclass
class SequenceLogps(PreferenceLogps):
    """PreferenceLogps plus, per pair, the chosen sequence's log-probs summed over
    the tokens an NLL term covers and their count (ORPO: prompt and completion)."""
    chosen_nll_logps: Optional[torch.Tensor] = None
    chosen_nll_tokens: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class PreferenceLoss:
    """One loss: ``function(policy, reference, options) -> (loss, metrics)``."""
    function: Callable[[PreferenceLogps, Optional[PreferenceLogps], Mapping[str, float]],
                       Tuple[torch.Tensor, Metrics]]
    needs_reference: bool
    metrics: Tuple[str, ...]
    defaults: Mapping[str, float] = field(default_factory=dict)
    needs_sequence_logps: bool = False   # policy must be a SequenceLogps with the NLL fields


def _counts(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return tokens.to(like.dtype).clamp(min=1.0)


def _batch_token_nll(logps: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean NLL per token over the whole batch (TRL's cross-entropy with mean
    reduction): long answers weigh more than short ones, unlike a mean of means."""
    return -logps.sum() / tokens.to(logps.dtype).sum().clamp(min=1.0)


def _log_ratios(policy: PreferenceLogps, reference: PreferenceLogps):
    return policy.chosen - reference.chosen, policy.rejected - reference.rejected


# --- losses against a reference model ---------------------------------------------------

def _dpo_family(loss_type: str):
    def loss_fn(policy, reference, options):
        beta = options["beta"]
        return (dpo_loss(policy, reference, beta, loss_type),
                dpo_metrics(policy, reference, beta))
    loss_fn.__name__ = f"{loss_type}_loss"
    loss_fn.__doc__ = f"TRL DPOTrainer loss_type={loss_type!r} (anita_core.train.losses.dpo_loss)."
    return loss_fn


sigmoid_loss = _dpo_family("sigmoid")
hinge_loss = _dpo_family("hinge")
ipo_loss = _dpo_family("ipo")


def robust_loss(policy, reference, options):
    """Robust DPO (Chowdhury et al. 2024): an unbiased DPO loss when a fraction
    label_smoothing of the pairs has its labels flipped."""
    beta, eps = options["beta"], options["label_smoothing"]
    chosen_ratio, rejected_ratio = _log_ratios(policy, reference)
    logits = beta * (chosen_ratio - rejected_ratio)
    per_pair = (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)
    return per_pair.mean(), dpo_metrics(policy, reference, beta)


def apo_zero_loss(policy, reference, options):
    """APO-zero (D'Oosterlinck et al. 2024, eq. 7): raise the chosen answer's
    likelihood and lower the rejected one's, each on its own."""
    beta = options["beta"]
    chosen_ratio, rejected_ratio = _log_ratios(policy, reference)
    per_pair = 1 - torch.sigmoid(beta * chosen_ratio) + torch.sigmoid(beta * rejected_ratio)
    return per_pair.mean(), dpo_metrics(policy, reference, beta)


def sigmoid_sft_loss(policy, reference, options):
    """DPO plus the chosen completions' NLL (TRL loss_type=["sigmoid", "sft"]
    with loss_weights=[sigmoid_weight, sft_weight])."""
    beta = options["beta"]
    sigmoid = dpo_loss(policy, reference, beta, "sigmoid")
    nll = _batch_token_nll(policy.chosen, policy.chosen_tokens)
    loss = options["sigmoid_weight"] * sigmoid + options["sft_weight"] * nll
    return loss, dpo_metrics(policy, reference, beta)


# --- reference-free losses --------------------------------------------------------------

def _averaged(policy: PreferenceLogps):
    """Length-averaged log-probs (log-prob per completion token)."""
    return (policy.chosen / _counts(policy.chosen_tokens, policy.chosen),
            policy.rejected / _counts(policy.rejected_tokens, policy.rejected))


@torch.no_grad()
def _free_metrics(beta: float, avg_c: torch.Tensor, avg_r: torch.Tensor) -> Metrics:
    """TRL's CPO/ORPO rewards: beta times the length-averaged log-probs; their
    logps/* are the averaged log-probs too."""
    chosen_rewards, rejected_rewards = beta * avg_c.detach(), beta * avg_r.detach()
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": avg_c.detach().mean(),
        "logps/rejected": avg_r.detach().mean(),
    }


def simpo_loss(policy, reference, options):
    """SimPO (Meng et al. 2024): length-normalized margin, no reference; TRL's
    CPOTrainer loss_type="simpo" (cpo_alpha > 0 adds CPO's chosen NLL)."""
    beta, gamma, eps, alpha = (options["beta"], options["simpo_gamma"],
                               options["label_smoothing"], options["cpo_alpha"])
    avg_c, avg_r = _averaged(policy)
    logits = beta * (avg_c - avg_r) - gamma
    per_pair = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
    loss = per_pair.mean()
    if alpha != 0:
        nll = _batch_token_nll(policy.chosen, policy.chosen_tokens)
        loss = loss + alpha * nll
    else:
        nll = torch.zeros((), dtype=loss.dtype, device=loss.device)
    metrics = _free_metrics(beta, avg_c, avg_r)
    metrics["nll_loss"] = nll.detach()
    return loss, metrics


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, each branch where it does not cancel (Maechler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(policy, reference, options):
    """ORPO (Hong et al. 2024): the chosen sequence's NLL minus beta times the
    log-sigmoid of the log odds ratio of the length-averaged answer log-probs."""
    beta = options["beta"]
    avg_c, avg_r = _averaged(policy)
    log_odds = (avg_c - avg_r) - (_log1mexp(avg_c) - _log1mexp(avg_r))
    ratio = F.logsigmoid(log_odds)
    nll = _batch_token_nll(policy.chosen_nll_logps, policy.chosen_nll_tokens)
    loss = nll - beta * ratio.mean()
    metrics = _free_metrics(beta, avg_c, avg_r)
    metrics.update({"nll_loss": nll.detach(), "log_odds_ratio": ratio.detach().mean(),
                    "log_odds_chosen": log_odds.detach().mean()})
    return loss, metrics


PREFERENCE_LOSSES: Dict[str, PreferenceLoss] = {
    "sigmoid": PreferenceLoss(sigmoid_loss, True, DPO_METRICS, {"beta": 0.1}),
    "hinge": PreferenceLoss(hinge_loss, True, DPO_METRICS, {"beta": 0.1}),
    "ipo": PreferenceLoss(ipo_loss, True, DPO_METRICS, {"beta": 0.1}),
    "robust": PreferenceLoss(robust_loss, True, DPO_METRICS, {"beta": 0.1, "label_smoothing": 0.0}),
    "apo_zero": PreferenceLoss(apo_zero_loss, True, DPO_METRICS, {"beta": 0.1}),
    "sigmoid_sft": PreferenceLoss(sigmoid_sft_loss, True, DPO_METRICS,
                                  {"beta": 0.1, "sigmoid_weight": 1.0, "sft_weight": 1.0}),
    "simpo": PreferenceLoss(simpo_loss, False, DPO_METRICS + ("nll_loss",),
                            {"beta": 0.1, "simpo_gamma": 0.5, "cpo_alpha": 0.0,
                             "label_smoothing": 0.0}),
    "orpo": PreferenceLoss(orpo_loss, False,
                           DPO_METRICS + ("nll_loss", "log_odds_ratio", "log_odds_chosen"),
                           {"beta": 0.1}, needs_sequence_logps=True),
}


def loss_options() -> Tuple[str, ...]:
    """Every hyperparameter some loss takes besides beta, in table order (the DPO
    recipe's flags and config fields)."""
    names: Dict[str, None] = {}
    for record in PREFERENCE_LOSSES.values():
        names.update((key, None) for key in record.defaults if key != "beta")
    return tuple(names)


def losses_using(option: str) -> Tuple[str, ...]:
    """The losses that take hyperparameter ``option``."""
    return tuple(name for name, record in PREFERENCE_LOSSES.items() if option in record.defaults)


def resolve_options(name: str, options: Mapping[str, float]) -> Dict[str, float]:
    """The loss's defaults overridden by ``options``, checked."""
    if name not in PREFERENCE_LOSSES:
        raise ValueError(f"preference loss {name!r}: expected one of {', '.join(PREFERENCE_LOSSES)}")
    record = PREFERENCE_LOSSES[name]
    unknown = sorted(set(options) - set(record.defaults))
    if unknown:
        raise ValueError(f"preference loss {name!r}: unknown option(s) {', '.join(unknown)}; "
                         f"it takes {', '.join(record.defaults)}")
    resolved = {**record.defaults, **options}
    for key, value in resolved.items():
        if not math.isfinite(value):
            raise ValueError(f"preference loss {name!r}: {key} must be finite, got {value}")
    if resolved["beta"] <= 0:
        raise ValueError(f"preference loss {name!r}: beta must be positive, got {resolved['beta']}")
    if "label_smoothing" in resolved and not 0.0 <= resolved["label_smoothing"] < 0.5:
        raise ValueError(f"preference loss {name!r}: label_smoothing must lie in [0, 0.5), "
                         f"got {resolved['label_smoothing']}")
    for key in ("sigmoid_weight", "sft_weight", "cpo_alpha", "simpo_gamma"):
        if key in resolved and resolved[key] < 0:
            raise ValueError(f"preference loss {name!r}: {key} must be >= 0, got {resolved[key]}")
    return resolved


def preference_loss(name: str, policy: PreferenceLogps, reference: Optional[PreferenceLogps] = None,
                    **options: float) -> Tuple[torch.Tensor, Metrics]:
    """(mean loss over the pairs, TRL's metrics as 0-dim tensors) of loss ``name``;
    the loss is differentiable in the policy's per-pair sums."""
    resolved = resolve_options(name, options)
    record = PREFERENCE_LOSSES[name]
    if record.needs_reference and reference is None:
        raise ValueError(f"preference loss {name!r} needs the reference model's log-probs "
                         "(reference=None given)")
    if record.needs_sequence_logps and (getattr(policy, "chosen_nll_logps", None) is None
                                        or getattr(policy, "chosen_nll_tokens", None) is None):
        raise ValueError(f"preference loss {name!r} needs the chosen sequences' NLL log-probs: "
                         "pass the policy as SequenceLogps with chosen_nll_logps and chosen_nll_tokens")
    # a reference handed to a reference-free loss is not used
    return record.function(policy, reference if record.needs_reference else None, resolved)
