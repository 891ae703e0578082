"""What one micro-batch means for each training stage.

SFT: the fused lm-head cross-entropy of QLoRALlama.train_step; unit = target token.
DPO: the policy's per-token log-probs on chosen and rejected sequences, summed
per sequence, against a reference (the base with adapters off, or a given
frozen adapter); unit = preference pair. The DPO loss is differentiated by
torch on [pairs]-sized tensors only; that per-sequence gradient is spread over
the completion tokens and pushed through the model's hand-written backward.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Optional, Sequence

import torch

from anita_core.train.losses import PreferenceLogps, dpo_loss, dpo_metrics
from anita_core.train.reference_logprobs import INDEX_KEY
from anita_core.model import IGNORE_INDEX


def _to(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _real_tokens(batch: dict) -> int:
    seg = batch.get("segment_ids")
    return int((seg >= 0).sum()) if seg is not None else batch["input_ids"].numel()


class SFTObjective:
    def __init__(self, model):
        self.model = model

    def units(self, batch) -> int:
        return int((batch["targets"] != IGNORE_INDEX).sum())

    def micro_step(self, batch, grad_scale: float) -> Dict[str, float]:
        b = _to(batch, self.model.device)
        loss_sum, _ = self.model.train_step(b["input_ids"], b["targets"], b.get("position_ids"),
                                            b.get("segment_ids"), grad_scale=grad_scale)
        return {"loss": float(loss_sum), "tokens": _real_tokens(batch)}

    @torch.no_grad()
    def evaluate(self, batches: Sequence) -> Dict[str, float]:
        total, count = 0.0, 0
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in batches:
                b = _to(batch, self.model.device)
                loss_sum, n = self.model.loss(b["input_ids"], b["targets"], b.get("position_ids"),
                                              b.get("segment_ids"))
                total, count = total + float(loss_sum), count + int(n)
        finally:
            self.model.train(was_training)
        return {"eval_loss": total / max(count, 1)}


def _stack_pair(batch: dict) -> dict:
    """One model batch holding the chosen rows then the rejected rows."""
    chosen, rejected = batch["chosen"], batch["rejected"]
    if chosen["input_ids"].shape != rejected["input_ids"].shape:
        raise ValueError("chosen and rejected batches must be padded to one shape, got "
                         f"{tuple(chosen['input_ids'].shape)} and {tuple(rejected['input_ids'].shape)}")
    return {k: torch.cat([chosen[k], rejected[k]]) for k in chosen if chosen.get(k) is not None}


class DPOObjective:
    """``reference_adapters``: None = the base model (adapters off); otherwise a frozen
    LoRAAdapters (e.g. the SFT adapter) swapped in for the reference pass.
    ``reference_store``: the reference log-probs of every pair computed once
    (reference_logprobs.ReferenceLogps); batches then carry ``example_index``
    and a step, or an evaluation, runs only the policy."""

    def __init__(self, model, beta: float = 0.1, loss_type: str = "sigmoid",
                 reference_adapters=None, reference_store=None):
        self.model, self.beta, self.loss_type = model, beta, loss_type
        self.reference_adapters = reference_adapters
        self.reference_store = reference_store
        self.reference_passes = 0       # reference forwards run (one per stacked batch)

    def units(self, batch) -> int:
        return int(batch["chosen"]["input_ids"].shape[0])

    @contextmanager
    def _reference_mode(self):
        model, previous, was_training = self.model, self.model.adapters, self.model.training
        model.eval()  # no LoRA dropout in the reference pass
        try:
            if self.reference_adapters is not None:
                model.adapters = self.reference_adapters
                yield
            else:
                with previous.disabled():
                    yield
        finally:
            model.adapters = previous
            model.train(was_training)

    def _sequence_logps(self, stacked: dict, for_backward: bool):
        logp, saved = self.model.token_logprobs(stacked["input_ids"], stacked["targets"],
                                                stacked.get("position_ids"), stacked.get("segment_ids"),
                                                for_backward=for_backward)
        return logp.sum(dim=1), saved

    def stack_batch(self, batch: dict) -> dict:
        """The chosen rows then the rejected rows, on the model's device."""
        return _to(_stack_pair(batch), self.model.device)

    def reference_logps(self, stacked: dict) -> torch.Tensor:
        self.reference_passes += 1
        with torch.no_grad(), self._reference_mode():
            seq, _ = self._sequence_logps(stacked, for_backward=False)
        return seq

    def _reference_for(self, batch: dict, stacked: dict) -> torch.Tensor:
        if self.reference_store is None:
            return self.reference_logps(stacked)
        if INDEX_KEY not in batch:
            raise ValueError(f"precomputed reference log-probs need batches with {INDEX_KEY!r} "
                             "(reference_logprobs.indexed_dpo_batches)")
        return self.reference_store.lookup(batch[INDEX_KEY]).to(self.model.device)

    def micro_step(self, batch, grad_scale: float) -> Dict[str, float]:
        stacked = self.stack_batch(batch)
        n_pairs = self.units(batch)
        counted = stacked["targets"] != IGNORE_INDEX
        n_tokens = counted.sum(dim=1)
        ref = self._reference_for(batch, stacked)
        seq, saved = self._sequence_logps(stacked, for_backward=True)
        policy_seq = seq.detach().requires_grad_()
        pc, pr = policy_seq.chunk(2)
        policy = PreferenceLogps(pc, pr, *n_tokens.chunk(2))
        reference = PreferenceLogps(*ref.chunk(2), *n_tokens.chunk(2))
        loss_sum = dpo_loss(policy, reference, self.beta, self.loss_type) * n_pairs
        if not torch.isfinite(loss_sum):
            raise FloatingPointError(f"DPO loss is {float(loss_sum)}; gradients were not applied")
        (d_seq,) = torch.autograd.grad(loss_sum, policy_seq)
        d_token = (d_seq * grad_scale)[:, None] * counted.to(d_seq.dtype)
        self.model.logprobs_backward(d_token, saved)
        metrics = dpo_metrics(policy, reference, self.beta)
        sums = {k: v * n_pairs for k, v in metrics.items()}
        sums.update(loss=float(loss_sum.detach()), tokens=_real_tokens(stacked))
        return sums

    @torch.no_grad()
    def evaluate(self, batches: Sequence) -> Dict[str, float]:
        totals: Dict[str, float] = {}
        pairs = 0
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in batches:
                stacked = self.stack_batch(batch)
                n_tokens = (stacked["targets"] != IGNORE_INDEX).sum(dim=1)
                ref = self._reference_for(batch, stacked)
                seq, _ = self._sequence_logps(stacked, for_backward=False)
                policy = PreferenceLogps(*seq.chunk(2), *n_tokens.chunk(2))
                reference = PreferenceLogps(*ref.chunk(2), *n_tokens.chunk(2))
                n = self.units(batch)
                pairs += n
                totals["eval_loss"] = totals.get("eval_loss", 0.0) + float(
                    dpo_loss(policy, reference, self.beta, self.loss_type)) * n
                for k, v in dpo_metrics(policy, reference, self.beta).items():
                    totals[f"eval_{k}"] = totals.get(f"eval_{k}", 0.0) + v * n
        finally:
            self.model.train(was_training)
        return {k: v / max(pairs, 1) for k, v in totals.items()}
