"""What one micro-batch means for each training stage.

SFT: the fused lm-head cross-entropy of QLoRALlama.train_step; unit = target token.
DPO: the policy's per-token log-probs on chosen and rejected sequences, summed
per sequence, against a reference (the base with adapters off, or a given
frozen adapter); unit = preference pair. The DPO loss is differentiated by
torch on [pairs]-sized tensors only; that per-sequence gradient is spread over
the completion tokens and pushed through the model's hand-written backward.

Nothing here makes the host wait for the device: what the model needs to know
about a batch (its target count, its positions' reach, that its ids are in the
vocabulary) is read from the CPU-side batch (batch_facts), the batch goes up
without blocking, and the sums a micro-batch reports are device tensors that the
trainer reads back once per optimizer step (host_reads).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Optional, Sequence

import torch

from anita_core.model.batch_facts import BatchFacts, batch_facts
from anita_core.train.host_reads import batch_to_device, read_floats, to_device
from anita_core.train.loss_table import PreferenceLoss, preference_loss
from anita_core.train.losses import PreferenceLogps
from anita_core.train.reference_logprobs import INDEX_KEY
from anita_core.model import IGNORE_INDEX


def _real_tokens(batch: dict) -> int:
    """Tokens that are not padding, counted on the CPU-side batch."""
    seg = batch.get("segment_ids")
    return int((seg >= 0).sum()) if seg is not None else batch["input_ids"].numel()


def _facts(model, batch: dict) -> BatchFacts:
    return batch_facts(batch["input_ids"], batch["targets"], batch.get("position_ids"),
                       model.config.vocab_size)


class SFTObjective:
    def __init__(self, model):
        self.model = model

    def units(self, batch) -> int:
        return int((batch["targets"] != IGNORE_INDEX).sum())

    def micro_step(self, batch, grad_scale: float) -> Dict[str, object]:
        facts = _facts(self.model, batch)
        b = batch_to_device(batch, self.model.device)
        loss_sum, _ = self.model.train_step(b["input_ids"], b["targets"], b.get("position_ids"),
                                            b.get("segment_ids"), grad_scale=grad_scale, facts=facts)
        return {"loss": loss_sum, "tokens": _real_tokens(batch), "computed": batch["input_ids"].numel()}

    @torch.no_grad()
    def evaluate(self, batches: Sequence) -> Dict[str, float]:
        total, count = 0.0, 0           # the loss sums stay on the device, in float64
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in batches:
                facts = _facts(self.model, batch)
                b = batch_to_device(batch, self.model.device)
                loss_sum, _ = self.model.loss(b["input_ids"], b["targets"], b.get("position_ids"),
                                              b.get("segment_ids"), facts=facts)
                total, count = total + loss_sum.double(), count + facts.num_targets
        finally:
            self.model.train(was_training)
        return {"eval_loss": read_floats({"sum": total})["sum"] / max(count, 1)}


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
    and a step, or an evaluation, runs only the policy.
    ``loss``: the preference loss as a value (loss_table.PreferenceLoss); default: the
    table's ``loss_type``. A reference-free loss gets no reference pass (reference None)."""

    def __init__(self, model, beta: float = 0.1, loss_type: str = "sigmoid",
                 reference_adapters=None, reference_store=None,
                 loss: Optional[PreferenceLoss] = None):
        self.model, self.beta, self.loss_type = model, beta, loss_type
        self.loss = loss if loss is not None else preference_loss(loss_type)
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

    def _sequence_logps(self, stacked: dict, for_backward: bool, facts: Optional[BatchFacts]):
        logp, saved = self.model.token_logprobs(stacked["input_ids"], stacked["targets"],
                                                stacked.get("position_ids"), stacked.get("segment_ids"),
                                                for_backward=for_backward, facts=facts)
        return logp.sum(dim=1), saved

    def stack_batch(self, batch: dict) -> dict:
        """The chosen rows then the rejected rows, on the model's device."""
        return batch_to_device(_stack_pair(batch), self.model.device)

    def _stacked(self, batch: dict):
        """(stacked batch on the device, its CPU-side copy, the facts read from that)."""
        host = _stack_pair(batch)
        return batch_to_device(host, self.model.device), host, _facts(self.model, host)

    def reference_logps(self, stacked: dict, facts: Optional[BatchFacts] = None) -> torch.Tensor:
        self.reference_passes += 1
        with torch.no_grad(), self._reference_mode():
            seq, _ = self._sequence_logps(stacked, False, facts)
        return seq

    def _reference_for(self, batch: dict, stacked: dict, facts: BatchFacts) -> Optional[torch.Tensor]:
        if not self.loss.needs_reference:
            return None
        if self.reference_store is None:
            return self.reference_logps(stacked, facts)
        if INDEX_KEY not in batch:
            raise ValueError(f"precomputed reference log-probs need batches with {INDEX_KEY!r} "
                             "(reference_logprobs.indexed_dpo_batches)")
        return to_device(self.reference_store.lookup(batch[INDEX_KEY]), self.model.device)

    def micro_step(self, batch, grad_scale: float) -> Dict[str, object]:
        stacked, host, facts = self._stacked(batch)
        n_pairs = self.units(batch)
        counted = stacked["targets"] != IGNORE_INDEX
        n_tokens = counted.sum(dim=1)
        ref = self._reference_for(batch, stacked, facts)
        seq, saved = self._sequence_logps(stacked, True, facts)
        policy_seq = seq.detach().requires_grad_()
        pc, pr = policy_seq.chunk(2)
        policy = PreferenceLogps(pc, pr, *n_tokens.chunk(2))
        reference = PreferenceLogps(*ref.chunk(2), *n_tokens.chunk(2)) if ref is not None else None
        # a NaN loss is not looked at here (a host read): its gradients are NaN too,
        # and the trainer checks the step's loss and gradient norm before any update
        loss_sum = self.loss.loss(policy, reference, self.beta) * n_pairs
        (d_seq,) = torch.autograd.grad(loss_sum, policy_seq)
        d_token = (d_seq * grad_scale)[:, None] * counted.to(d_seq.dtype)
        self.model.logprobs_backward(d_token, saved)
        metrics = self.loss.metrics(policy, reference, self.beta)
        sums: Dict[str, object] = {k: v.double() * n_pairs for k, v in metrics.items()}
        sums.update(loss=loss_sum.detach(), tokens=_real_tokens(host),
                    computed=host["input_ids"].numel())
        return sums

    @torch.no_grad()
    def evaluate(self, batches: Sequence) -> Dict[str, float]:
        totals: Dict[str, float] = {}
        pairs = 0
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in batches:
                stacked, _, facts = self._stacked(batch)
                n_tokens = (stacked["targets"] != IGNORE_INDEX).sum(dim=1)
                ref = self._reference_for(batch, stacked, facts)
                seq, _ = self._sequence_logps(stacked, False, facts)
                policy = PreferenceLogps(*seq.chunk(2), *n_tokens.chunk(2))
                reference = (PreferenceLogps(*ref.chunk(2), *n_tokens.chunk(2))
                             if ref is not None else None)
                n = self.units(batch)
                pairs += n
                # sums stay on the device in float64 until the one read below
                totals["eval_loss"] = totals.get("eval_loss", 0.0) + self.loss.loss(
                    policy, reference, self.beta).double() * n
                for k, v in self.loss.metrics(policy, reference, self.beta).items():
                    totals[f"eval_{k}"] = totals.get(f"eval_{k}", 0.0) + v.double() * n
        finally:
            self.model.train(was_training)
        return {k: v / max(pairs, 1) for k, v in read_floats(totals).items()}
